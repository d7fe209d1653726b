//! The schema's migrations: numbered SQL files in `store/migrations/`, built into the binary and
//! run once each, in order, in one transaction; the file's `user_version` says how many ran.
//! A migration that shipped is never edited: a change is a new file.

use std::path::Path;

use rusqlite::Connection;

use super::classify;
use crate::error::Result;

/// `cair` in ASCII: the `application_id` of a cairn database.
pub const APPLICATION_ID: i32 = 0x6361_6972;

/// The migrations, in order; the schema version is their count.
const MIGRATIONS: &[&str] = &[
    include_str!("../../migrations/0001_initial.sql"),
    include_str!("../../migrations/0002_children.sql"),
    include_str!("../../migrations/0003_schedules.sql"),
    include_str!("../../migrations/0004_owner_index.sql"),
    include_str!("../../migrations/0005_older_writers.sql"),
    include_str!("../../migrations/0006_status_checks.sql"),
    include_str!("../../migrations/0007_nodes.sql"),
    include_str!("../../migrations/0008_stops.sql"),
    include_str!("../../migrations/0009_progress.sql"),
    include_str!("../../migrations/0010_log_notes.sql"),
    include_str!("../../migrations/0011_tokens.sql"),
    include_str!("../../migrations/0012_moves.sql"),
    include_str!("../../migrations/0013_logged.sql"),
    include_str!("../../migrations/0014_running_attempts.sql"),
];

/// The schema version this cairn writes.
#[allow(clippy::cast_possible_wrap)]
pub const SCHEMA_VERSION: i32 = MIGRATIONS.len() as i32;

/// Runs the migrations after `from`, in one immediate transaction, and marks the file as cairn's.
pub(super) fn migrate(conn: &Connection, path: &Path, from: i32) -> Result<()> {
    let err = |e: rusqlite::Error| classify(path, &e);
    conn.execute_batch("BEGIN IMMEDIATE").map_err(err)?;
    let result = (|| {
        // Another process may have migrated while this one waited for the lock.
        let version: i32 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        for (i, sql) in MIGRATIONS
            .iter()
            .enumerate()
            .skip(usize::try_from(version.max(from)).unwrap_or(0))
        {
            let schema: i64 = conn.pragma_query_value(None, "schema_version", |r| r.get(0))?;
            conn.execute_batch(sql)?;
            if sql.contains("writable_schema") {
                // The tables' text was edited in place: a new schema version makes every
                // connection, this one too, read it again.
                conn.pragma_update(None, "schema_version", schema + 1)?;
            }
            conn.pragma_update(
                None,
                "user_version",
                i32::try_from(i + 1).unwrap_or(i32::MAX),
            )?;
        }
        conn.pragma_update(None, "application_id", APPLICATION_ID)?;
        conn.execute_batch("COMMIT")
    })();
    if let Err(e) = result {
        let _ = conn.execute_batch("ROLLBACK");
        return Err(err(e));
    }
    Ok(())
}
