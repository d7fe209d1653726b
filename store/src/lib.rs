//! cairn's durable state: ops, tasks, attempts, logs and the event trail, behind one interface.
//! SQLite (a file) or PostgreSQL (a shared server) is the backend; nothing outside this crate
//! knows which.
//!
//! - [`types`]: ids, statuses, the [`EventKind`]s of the event trail, rows, and the [`Change`]s
//!   the engine asks to make durable.
//! - `api`: the interface a backend implements ([`Backend`] for writes, [`ReadBackend`] for
//!   reads) and the handles the engine holds, [`Store`] and [`Reader`].
//! - `location`: [`Location`] (a file path, or a server's URL) and [`open`] / [`open_reader`],
//!   which pick the backend.
//! - `rules`: the durable rules, written once over a backend's transaction (claim and fence,
//!   what may start, locks and cooldowns, fan-out, replan, schedules, the event texts).
//! - `sqlite`: the SQLite backend: opening and refusing files, migrations (`migrations/`), the
//!   writer thread and group commit, the rules' transaction in SQL, reads.
//! - `postgres`: the PostgreSQL backend: reading the URL, migrations (`migrations/postgres/`),
//!   the writer thread (SERIALIZABLE group commit, reconnecting, commit tokens), the rules'
//!   transaction in SQL, reads, and the listener behind wake-ups.
//! - [`copy`]: `cairn db copy`, a SQLite file's history moved into a PostgreSQL database.
//! - [`testing`]: a backend wrapper that fails or delays commits on demand, for tests.
//! - [`Error`]: grouped by what the caller can do ([`ErrorKind`]).

mod api;
pub mod copy;
mod error;
mod location;
mod postgres;
mod rules;
mod sqlite;
pub mod stats;
pub mod testing;
pub mod types;

pub use api::{Backend, Committing, ReadBackend, Reader, Results, Store, Waiting};
pub use error::{Error, ErrorKind, Result};
pub use location::{Location, open, open_reader};
pub use sqlite::{
    APPLICATION_ID, Recovered, SCHEMA_VERSION, check as check_sqlite, recover as recover_sqlite,
};
pub use types::*;
