//! Recovering a database whose write-ahead log is damaged (`cairn db recover`): keep what SQLite
//! reads, never give again an op id that may have been shown.
//!
//! The files are copied first, as they are. Then, holding the database alone (`locking_mode =
//! EXCLUSIVE`: no other connection may even read meanwhile), the readable part is taken, the
//! schema brought up to date, `sqlite_sequence` for `ops` moved past every id the dropped
//! transactions may have given, and everything checkpointed into the database file, the log
//! emptied: the damaged frames are gone from the database (the copy keeps them).

use std::path::{Path, PathBuf};

use rusqlite::{Connection, OpenFlags};

use super::wal::{self, Damage, wal_path};
use super::{SCHEMA_VERSION, busy_timeout, check_identity, classify, files, migrations};
use crate::error::{Error, Result};
use crate::types::OpId;

/// How far past the highest readable op id new ids start, per dropped transaction (one commit
/// holds at most 1,024 requests), and at least.
const SKIP_PER_TRANSACTION: i64 = 1_024;
const SKIP_AT_LEAST: i64 = 1_000;

/// What [`recover`] did to a damaged database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recovered {
    /// The first frame of the log SQLite could not read (0: the log's header).
    pub first_bad_frame: u64,
    /// The frames kept: those SQLite reads.
    pub kept_frames: u64,
    /// Committed transactions after the damage, dropped.
    pub dropped_transactions: u64,
    /// The highest op id that was readable (0 when none was).
    pub highest_kept: OpId,
    /// The id the next op gets: past every id the dropped transactions may have given.
    pub next_op: OpId,
    /// Copies of the database and of its log as they were, beside them.
    pub copies: Vec<PathBuf>,
}

/// Recovers the SQLite database at `path` from damage in its write-ahead log; `None` when its log
/// holds nothing SQLite would drop (then nothing is changed).
///
/// # Errors
///
/// The database is missing, empty, not cairn's, held by another process, or cannot be written.
pub fn recover(path: &Path) -> Result<Option<Recovered>> {
    let unusable = |reason: String| Error::Unusable {
        path: path.to_path_buf(),
        reason,
    };
    let meta = std::fs::metadata(path).map_err(|e| unusable(format!("cannot read it: {e}")))?;
    if meta.is_dir() {
        return Err(unusable("it is a directory".to_owned()));
    }
    files::refuse_empty(path, &meta)?;
    files::give_owner_write(path);
    files::refuse_unwritable_side_files(path)?;
    let log = wal_path(path);
    if wal::scan(&log).is_none() {
        return Ok(None);
    }
    // Copied before SQLite opens the file here: closing a descriptor of it later would drop the
    // connection's locks.
    let copies = copy_aside(path, &log)?;
    let err = |e: rusqlite::Error| classify(path, &e);
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags(path, flags).map_err(err)?;
    conn.busy_timeout(busy_timeout()).map_err(err)?;
    conn.pragma_update(None, "locking_mode", "EXCLUSIVE")
        .map_err(err)?;
    // The first read takes the database for this connection alone, and reads what SQLite can.
    let version = check_identity(&conn, path)?;
    // Read again now that no other process can write: the damage as it stands.
    let Some(damage) = wal::scan(&log) else {
        for copy in &copies {
            let _ = std::fs::remove_file(copy);
        }
        return Ok(None);
    };
    conn.pragma_update(None, "synchronous", "FULL")
        .map_err(err)?;
    conn.pragma_update(None, "foreign_keys", "ON")
        .map_err(err)?;
    if version < SCHEMA_VERSION {
        migrations::migrate(&conn, path, version)?;
    }
    let (highest, next) = skip_op_ids(&conn, &damage).map_err(err)?;
    let (busy, _, _): (i64, i64, i64) = conn
        .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })
        .map_err(err)?;
    if busy != 0 {
        return Err(unusable(
            "its log could not be checkpointed into it; nothing more was changed (run `cairn db recover` again)".to_owned(),
        ));
    }
    conn.close().map_err(|(_, e)| err(e))?;
    Ok(Some(Recovered {
        first_bad_frame: damage.first_bad,
        kept_frames: damage.readable,
        dropped_transactions: damage.lost_commits,
        highest_kept: OpId(highest),
        next_op: OpId(next),
        copies,
    }))
}

/// Moves the `ops` sequence past any id the dropped transactions may have given; returns the
/// highest readable id and the next id.
fn skip_op_ids(conn: &Connection, damage: &Damage) -> rusqlite::Result<(i64, i64)> {
    let lost = i64::try_from(damage.lost_commits).unwrap_or(i64::MAX / 2 / SKIP_PER_TRANSACTION);
    let skip = (lost.saturating_mul(SKIP_PER_TRANSACTION)).max(SKIP_AT_LEAST);
    conn.execute_batch("BEGIN IMMEDIATE")?;
    let result = (|| {
        let highest: i64 = conn.query_row(
            "SELECT max(coalesce((SELECT max(id) FROM ops), 0), \
                        coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'ops'), 0))",
            [],
            |r| r.get(0),
        )?;
        let seq = highest.saturating_add(skip);
        let updated = conn.execute(
            "UPDATE sqlite_sequence SET seq = ?1 WHERE name = 'ops'",
            [seq],
        )?;
        if updated == 0 {
            conn.execute(
                "INSERT INTO sqlite_sequence (name, seq) VALUES ('ops', ?1)",
                [seq],
            )?;
        }
        conn.execute_batch("COMMIT")?;
        Ok((highest, seq + 1))
    })();
    if result.is_err() {
        let _ = conn.execute_batch("ROLLBACK");
    }
    result
}

/// Copies the database and its log beside them (`<name>.damaged-<milliseconds>`), synced.
fn copy_aside(path: &Path, log: &Path) -> Result<Vec<PathBuf>> {
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    let mut copies = Vec::new();
    for from in [path, log] {
        let to = wal::side_file(from, &format!(".damaged-{stamp}"));
        let copied = std::fs::copy(from, &to)
            .and_then(|_| std::fs::File::open(&to))
            .and_then(|f| f.sync_all());
        if let Err(e) = copied {
            for copy in &copies {
                let _ = std::fs::remove_file(copy);
            }
            return Err(Error::Unusable {
                path: path.to_path_buf(),
                reason: format!(
                    "cannot keep a copy of `{}` as `{}` before recovering: {e}; nothing was changed",
                    from.display(),
                    to.display()
                ),
            });
        }
        copies.push(to);
    }
    if let Ok(d) = std::fs::File::open(files::directory(path)) {
        let _ = d.sync_all();
    }
    Ok(copies)
}
