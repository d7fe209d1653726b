//! `cairn db copy`: moves a team's history from its SQLite file into a PostgreSQL database
//! (`store::copy`), with the engine's judgements: whether an owner lives, what a sealed secret
//! is, the key files.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use engine::owner::Rule;
use engine::secrets;
use store::copy::{Copied, Key};
use store::{Location, Millis, ProcessId};

use crate::db::location_of;
use crate::exit::Failure;
use crate::output::Output;

/// Copy a team's history from its SQLite file into a PostgreSQL database, which several `cairn
/// serve` nodes (on several machines) can share.
///
/// Everything is copied, unchanged: ops (ids, uuids, times, statuses, owners), tasks, attempts,
/// events, logs, plan snapshots, locks, cooldowns, schedules, the pause. Both databases are first
/// brought to this cairn's schema; then the SQLite file is read in one read transaction and the
/// PostgreSQL database written in one transaction: a copy that fails or is killed leaves it
/// without any of it. The PostgreSQL database must exist and hold no op. The SQLite file is left
/// as it was.
///
/// Refused (exit 2) while a process uses the SQLite file: an op whose owner is alive, a live
/// `cairn serve`. Stop them first. Ops whose owner is gone are copied as they are: on
/// PostgreSQL, `cairn serve` or `cairn resume` takes them over once their lease is past.
///
/// Secret params stay sealed with the key beside the SQLite file (`<db>.key`). The PostgreSQL
/// store's key file (`CAIRN_SECRET_KEY_FILE`, else `$XDG_STATE_HOME/cairn/postgres.key`) is made
/// with that key when it does not exist (`0600`); one that holds another key is refused.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The SQLite database file to copy from.
    #[arg(value_name = "FROM")]
    from: PathBuf,
    /// The PostgreSQL database to copy into:
    /// `postgres://USER[:PASSWORD]@HOST[:PORT]/DATABASE`.
    #[arg(value_name = "TO")]
    to: PathBuf,
}

/// What the copy asks of the engine, judged at one moment (`now`) by the SQLite file's rule.
struct Judge {
    rule: Rule,
    now: Millis,
}

impl store::copy::Judge for Judge {
    fn alive(&self, process: &ProcessId, lease_until: Option<Millis>) -> bool {
        self.rule.lives(process, lease_until, self.now)
    }

    fn sealed(&self, value: &serde_json::Value) -> bool {
        secrets::is_sealed(value)
    }

    fn key_missing(&self, from: &Path, to: &Path) -> Result<bool, String> {
        match secrets::same_key(from, to) {
            Ok(None) => Ok(true),
            Ok(Some(true)) => Ok(false),
            Ok(Some(false)) => Err(secrets::Error::Differs {
                from: from.to_path_buf(),
                to: to.to_path_buf(),
            }
            .to_string()),
            Err(e) => Err(e.to_string()),
        }
    }

    fn copy_key(&self, from: &Path, to: &Path) -> Result<(), String> {
        secrets::copy_key(from, to)
            .map(drop)
            .map_err(|e| e.to_string())
    }
}

/// FROM as a SQLite file and TO as a PostgreSQL database; any other pair is refused, saying what
/// is supported.
fn locations(args: &Args) -> anyhow::Result<(PathBuf, Location)> {
    let (from, to) = (location_of(args.from.clone()), location_of(args.to.clone()));
    match (from, &to) {
        (Location::Sqlite(path), Location::Postgres { .. }) => Ok((path, to)),
        (from, _) => Err(anyhow::anyhow!(
            "`cairn db copy` copies a SQLite file into a PostgreSQL database (FROM a file's path, TO a `postgres://` URL); it cannot copy `{from}` into `{to}`"
        )),
    }
}

pub fn run(args: &Args, out: &Output) -> Result<(), Failure> {
    let (from, to) = locations(args)?;
    let judge = Judge {
        rule: Rule::of(&Location::Sqlite(from.clone())),
        now: engine::owner::now(),
    };
    let copied = store::copy::copy(&from, &to, &judge)
        .with_context(|| format!("cannot copy `{}` into `{to}`", from.display()))?;
    crate::output::data(&summary(&from, &to, &copied)).context("cannot write")?;
    if let Key::Missing { from } = &copied.key {
        crate::output::diagnostic(&format!(
            "warning: the copied ops hold sealed secret params, but there is no key beside the SQLite file (`{}`): they open only with the key that sealed them (CAIRN_SECRET_KEY, or that file restored as the PostgreSQL key file)\n",
            from.display()
        ));
    }
    out.note(&next_steps(&from, &to, &copied));
    Ok(())
}

/// What was copied: a line per table with its count of rows.
fn summary(from: &Path, to: &Location, copied: &Copied) -> String {
    let mut text = format!(
        "copied `{}` into `{to}` (schema version {}):\n",
        from.display(),
        to.schema_version()
    );
    let width = copied
        .tables
        .iter()
        .map(|(t, _)| t.len())
        .max()
        .unwrap_or(0);
    for (table, rows) in &copied.tables {
        let unit = if *rows == 1 { "row" } else { "rows" };
        writeln!(text, "  {table:<width$}  {rows:>9} {unit}").ok();
    }
    text
}

/// What to do next: the key, skipped op ids, and pointing cairn at the new database.
fn next_steps(from: &Path, to: &Location, copied: &Copied) -> String {
    let mut text = String::new();
    match &copied.key {
        Key::Created { from, to } => writeln!(
            text,
            "the secret key `{}` was copied to `{}` (mode 0600): every machine that runs cairn on this database needs that key (name its file with CAIRN_SECRET_KEY_FILE)",
            from.display(),
            to.display()
        ),
        Key::Same { from, to } => writeln!(
            text,
            "the secret key `{}` was already the key of `{}`",
            to.display(),
            from.display()
        ),
        Key::NotNeeded | Key::Missing { .. } => Ok(()),
    }
    .ok();
    if let Some((highest, next)) = copied.skipped_ids {
        writeln!(
            text,
            "note: the SQLite file would have given op id {next} next (`cairn db recover` skipped the ids after {highest}, which lost ops may have shown); PostgreSQL gives op id {} next, so those ids may be given again",
            highest.0 + 1
        )
        .ok();
    }
    let (url, had_password) = to.without_password();
    let password = if had_password {
        " (and the password in PGPASSWORD)"
    } else {
        ""
    };
    writeln!(
        text,
        "next: stop using `{}` (it is left as it was), and point every cairn at the new database{password}:\n  export CAIRN_DB={url}\nthen start `cairn serve` on each node; ops whose owner is gone are taken over once their lease is past",
        from.display()
    )
    .ok();
    text
}
