//! `cairn db copy`: a team's history moved from its SQLite file into a PostgreSQL database, so
//! that several `cairn serve` nodes can share it. [`copy`] is the one entry point.
//!
//! Both databases are first brought to this cairn's schema, as any command that writes does
//! ([`crate::open`]). Then, on a thread of its own (the PostgreSQL client blocks on a runtime of
//! its own, which must never happen on a tokio worker):
//!
//! - [`source`]: the SQLite file, read in one read transaction: its tables and columns from
//!   `sqlite_schema`; refused while a live process uses it (an op whose owner lives, a `serve`
//!   node); at the end, refused if another process committed to it meanwhile.
//! - [`target`]: the PostgreSQL database, written in one transaction: its tables, columns and
//!   types from the catalog, checked against the source's; refused unless it holds nothing yet;
//!   each table streamed in with binary `COPY`, values unchanged; sequences moved past the copied
//!   maximum. A copy that fails or is killed commits nothing.
//! - The secret key: when the source holds sealed secret params, the target's key file must hold
//!   the key beside the source; a missing one is made just before the commit.
//!
//! What only the engine can judge (whether a process lives, what a sealed value is, reading and
//! writing key files) it answers through a [`Judge`].

mod source;
mod target;

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::location::Location;
use crate::types::{Millis, OpId, ProcessId};
use crate::{postgres, sqlite};
use source::Source;
use target::Writing;

/// What a copy asks of the engine.
pub trait Judge: Sync {
    /// Whether `process` lives: an op's owner (whose lease runs until `lease_until`) or a
    /// serving node, judged by the source's rule.
    fn alive(&self, process: &ProcessId, lease_until: Option<Millis>) -> bool;

    /// Whether a param's stored value is a sealed secret.
    fn sealed(&self, value: &serde_json::Value) -> bool;

    /// Whether the key file `to` is still to be made: `Ok(false)` when it holds the key of `from`
    /// already, `Ok(true)` when there is no file there; why not, when it holds another key or
    /// either cannot be read.
    fn key_missing(&self, from: &Path, to: &Path) -> std::result::Result<bool, String>;

    /// Makes the key file `to` hold the key of `from`, atomically, private to the user.
    fn copy_key(&self, from: &Path, to: &Path) -> std::result::Result<(), String>;
}

/// What became of the key that sealed the source's secret params.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Key {
    /// The source holds no sealed value: no key is needed.
    NotNeeded,
    /// The target's key file `to` held the key of `from` already.
    Same { from: PathBuf, to: PathBuf },
    /// The target's key file `to` was made with the key of `from`.
    Created { from: PathBuf, to: PathBuf },
    /// The source holds sealed values, but there is no key file `from` beside it (they were
    /// sealed with `CAIRN_SECRET_KEY`, or the file is lost).
    Missing { from: PathBuf },
}

/// What a copy did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Copied {
    /// Each table, in the order it was copied, with its count of rows.
    pub tables: Vec<(String, u64)>,
    pub key: Key,
    /// The highest op id and the id SQLite would have given next, when that is past it (ids
    /// `cairn db recover` skipped): PostgreSQL gives the highest plus one.
    pub skipped_ids: Option<(OpId, OpId)>,
}

/// Copies everything the SQLite database `from` holds into the PostgreSQL database `to`, which
/// must hold no op yet, in one transaction; see the module's documentation.
pub fn copy(from: &Path, to: &Location, judge: &dyn Judge) -> Result<Copied> {
    let unusable = |path: &Path, reason: String| Error::Unusable {
        path: path.to_path_buf(),
        reason,
    };
    if !matches!(to, Location::Postgres { .. }) {
        return Err(unusable(
            to.as_path(),
            "a copy goes into a PostgreSQL database (a `postgres://` URL)".to_owned(),
        ));
    }
    match std::fs::metadata(from) {
        Ok(meta) if meta.is_file() => {}
        Ok(_) => return Err(unusable(from, "it is not a file".to_owned())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(unusable(from, "there is no database there".to_owned()));
        }
        Err(e) => return Err(unusable(from, format!("cannot read it: {e}"))),
    }
    // Brought to this cairn's schema: opened for writing (which migrates), then closed.
    drop(crate::open(&Location::Sqlite(from.to_path_buf()))?);
    std::thread::scope(|scope| {
        std::thread::Builder::new()
            .name("cairn-copy".into())
            .spawn_scoped(scope, || into_postgres(from, to, judge))
            .map_err(|e| unusable(from, format!("cannot start the copy: {e}")))?
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

/// The copy itself, on its own thread.
fn into_postgres(from: &Path, to: &Location, judge: &dyn Judge) -> Result<Copied> {
    // The target's schema, made or brought up to date as any command that writes does.
    drop(crate::open(to)?);
    let source = Source::open(from)?;
    source.refuse_live(judge)?;
    let tables = source.tables()?;
    let target = postgres::Target::new(to)?;
    let mut client = target.connect()?;
    let mut writing = Writing::begin(&mut client, &target)?;
    let plan = writing.plan(&tables)?;
    writing.refuse_unless_empty(&plan)?;
    let key = key(&source, from, judge, &target)?;
    let mut counts = Vec::with_capacity(plan.len());
    for table in &plan {
        counts.push((table.name.clone(), writing.copy(table, &source)?));
    }
    writing.finish(&plan)?;
    let skipped_ids = source.skipped_ids()?;
    source.finish()?;
    // Last before the commit: a copy refused until here leaves no key file behind.
    if let Key::Created { from, to } = &key {
        judge
            .copy_key(from, to)
            .map_err(|why| target.unusable(&format!("{why}; nothing was copied")))?;
    }
    writing.commit()?;
    Ok(Copied {
        tables: counts,
        key,
        skipped_ids,
    })
}

/// What the key needs: nothing (no sealed value), nothing more (the target's file holds it),
/// a file made before the commit (`Created`), or nothing that can be done (`Missing`). Refused
/// when the target's key file holds another key.
fn key(source: &Source, from: &Path, judge: &dyn Judge, target: &postgres::Target) -> Result<Key> {
    if !source.holds_sealed(judge)? {
        return Ok(Key::NotNeeded);
    }
    let (from, to) = (sqlite::key_file(from), postgres::secret_key_file());
    if !from.exists() {
        return Ok(Key::Missing { from });
    }
    match judge.key_missing(&from, &to) {
        Ok(true) => Ok(Key::Created { from, to }),
        Ok(false) => Ok(Key::Same { from, to }),
        Err(why) => Err(target.unusable(&format!("{why}; nothing was copied"))),
    }
}
