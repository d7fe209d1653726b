//! Where the database is (`--db`, `CAIRN_DB`, or the user's XDG state directory) and opening it.

use std::path::PathBuf;

use anyhow::Context as _;

/// `--db PATH`, shared by every command that touches ops.
#[derive(Debug, Clone, clap::Args)]
pub struct DbArgs {
    /// The database file [default: `$XDG_STATE_HOME/cairn/cairn.db`].
    #[arg(long, global = true, env = "CAIRN_DB", value_name = "PATH")]
    pub db: Option<PathBuf>,
}

impl DbArgs {
    /// The database path, resolved.
    pub fn path(&self) -> anyhow::Result<PathBuf> {
        if let Some(path) = &self.db {
            return Ok(path.clone());
        }
        let state = std::env::var_os("XDG_STATE_HOME")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/state")))
            .context(
                "cannot find a place for the database: set --db, CAIRN_DB, XDG_STATE_HOME or HOME",
            )?;
        Ok(state.join("cairn").join("cairn.db"))
    }

    /// Where the store is: a `postgres://` URL names a server, anything else a SQLite file.
    pub fn location(&self) -> anyhow::Result<store::Location> {
        Ok(location_of(self.path()?))
    }

    /// How owners' liveness is judged on this store (`status`, `show`, `logs --follow`).
    pub fn rule(&self) -> anyhow::Result<engine::owner::Rule> {
        Ok(engine::owner::Rule::of(&self.location()?))
    }

    /// Opens the database for writing (creating it).
    pub fn store(&self) -> anyhow::Result<store::Store> {
        Ok(store::open(&self.location()?)?)
    }

    /// Opens the database for reading. A database that does not exist is bad input, named: a
    /// read never creates one (only `run` and `submit` do), and a mistyped `--db` must not read
    /// as "no ops".
    pub fn reader(&self) -> anyhow::Result<store::Reader> {
        let location = self.location()?;
        store::open_reader(&location)?.with_context(|| {
            format!(
                "there is no database at `{location}`: `cairn run` or `cairn submit` makes it (is `--db` or `CAIRN_DB` right?)"
            )
        })
    }
}

/// Where a store given as `--db` gives it is: a `postgres://` URL names a server, anything else
/// a SQLite file.
pub fn location_of(path: PathBuf) -> store::Location {
    match path.to_str() {
        Some(text) => store::Location::parse(text),
        None => store::Location::Sqlite(path),
    }
}

/// The op `op` for reading, with the reader it came from; an unknown op (or no database) is bad
/// input.
pub fn read_op(db: &DbArgs, op: store::OpId) -> anyhow::Result<(store::Reader, store::OpRow)> {
    let reader = db.reader()?;
    let row = reader.op(op).map_err(|e| match e {
        store::Error::NotFound(op) => engine::Error::UnknownOp(op),
        other => engine::Error::Store(other),
    })?;
    Ok((reader, row))
}

/// Reads an op id as people type it.
pub fn op_id(text: &str) -> anyhow::Result<store::OpId> {
    text.trim()
        .parse::<i64>()
        .ok()
        .filter(|n| *n > 0)
        .map(store::OpId)
        .with_context(|| format!("`{text}` is not an op id (a number, as `cairn status` shows)"))
}
