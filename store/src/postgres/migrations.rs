//! The schema's migrations on PostgreSQL: numbered SQL files in `store/migrations/postgres/`,
//! built into the binary and run once each, in order, in one transaction. `cairn_meta` says how
//! many ran (`schema_version`) and whose database it is (`application`).
//!
//! Nodes that start at once all try to migrate: each takes the same transaction-scoped advisory
//! lock first, so one migrates and the others, once it committed, find nothing left to do.

use postgres::Client;

use crate::error::{Error, Result};

/// The migrations, in order; the schema version is their count.
const MIGRATIONS: &[&str] = &[
    include_str!("../../migrations/postgres/0001_initial.sql"),
    include_str!("../../migrations/postgres/0002_stops.sql"),
    include_str!("../../migrations/postgres/0003_progress.sql"),
    include_str!("../../migrations/postgres/0004_log_notes.sql"),
    include_str!("../../migrations/postgres/0005_tokens.sql"),
    include_str!("../../migrations/postgres/0006_moves.sql"),
    include_str!("../../migrations/postgres/0007_logged.sql"),
    include_str!("../../migrations/postgres/0008_running_attempts.sql"),
    include_str!("../../migrations/postgres/0009_writer_indexes.sql"),
    include_str!("../../migrations/postgres/0010_read_changed.sql"),
];

/// The schema version this cairn writes on PostgreSQL.
#[allow(clippy::cast_possible_wrap)]
pub(crate) const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

/// The key of the advisory lock migrations take: `cairn` in ASCII.
const MIGRATION_LOCK: i64 = 0x63_6169_726e;

/// What a database holds, as far as cairn is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Found {
    /// No table at all: nothing to read yet; the first writer migrates it.
    Empty,
    /// cairn's, at this schema version (at most this cairn's).
    Cairn(i64),
}

/// Brings the database to this cairn's schema, or refuses it (not cairn's, newer); `describe`
/// turns a failure of the server into the store's error.
pub(crate) fn migrate(
    client: &mut Client,
    unusable: &dyn Fn(String) -> Error,
    describe: &dyn Fn(&postgres::Error) -> Error,
) -> Result<()> {
    // Nothing to do (the common case) is found without taking the lock.
    if identify(client, unusable, describe)? == Found::Cairn(SCHEMA_VERSION) {
        return Ok(());
    }
    let mut tx = client.transaction().map_err(|e| describe(&e))?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .map_err(|e| describe(&e))?;
    // Another node may have migrated while this one waited for the lock.
    let from = match identify(&mut tx, unusable, describe)? {
        Found::Empty => 0,
        Found::Cairn(version) => version,
    };
    for sql in MIGRATIONS.iter().skip(usize::try_from(from).unwrap_or(0)) {
        tx.batch_execute(sql).map_err(|e| describe(&e))?;
    }
    tx.execute(
        "INSERT INTO cairn_meta (key, value) VALUES ('application', 'cairn'), ('schema_version', $1) \
         ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        &[&SCHEMA_VERSION.to_string()],
    )
    .map_err(|e| describe(&e))?;
    tx.commit().map_err(|e| describe(&e))
}

/// What the database holds: nothing, or cairn's schema at a version this cairn can use. A
/// database with tables but no `cairn_meta`, or another application's, is not cairn's; a newer
/// schema is refused.
pub(crate) fn identify(
    client: &mut impl postgres::GenericClient,
    unusable: &dyn Fn(String) -> Error,
    describe: &dyn Fn(&postgres::Error) -> Error,
) -> Result<Found> {
    let row = client
        .query_one(
            "SELECT to_regclass('cairn_meta') IS NOT NULL, \
             (SELECT count(*) FROM pg_catalog.pg_tables WHERE schemaname = current_schema())",
            &[],
        )
        .map_err(|e| describe(&e))?;
    let (has_meta, tables): (bool, i64) = (row.get(0), row.get(1));
    if !has_meta {
        if tables == 0 {
            return Ok(Found::Empty);
        }
        return Err(unusable(format!(
            "it holds {tables} table(s) but no `cairn_meta`: it is not cairn's database"
        )));
    }
    let rows = client
        .query(
            "SELECT key, value FROM cairn_meta WHERE key IN ('application', 'schema_version')",
            &[],
        )
        .map_err(|e| describe(&e))?;
    let value = |key: &str| {
        rows.iter()
            .find(|r| r.get::<_, &str>(0) == key)
            .map(|r| r.get::<_, String>(1))
    };
    if value("application").as_deref() != Some("cairn") {
        return Err(unusable(
            "its `cairn_meta` does not name cairn: it is not cairn's database".to_owned(),
        ));
    }
    let version = value("schema_version")
        .and_then(|v| v.parse::<i64>().ok())
        .ok_or_else(|| unusable("its `cairn_meta` has no schema version".to_owned()))?;
    if version > SCHEMA_VERSION {
        return Err(unusable(format!(
            "it was written by a newer cairn (schema version {version}; this cairn knows up to {SCHEMA_VERSION})"
        )));
    }
    Ok(Found::Cairn(version))
}
