//! cairn's durable state: ops, tasks, attempts, logs and the event trail, behind one interface.
//! SQLite is the backend today; nothing outside this crate knows it.
//!
//! - [`types`]: ids, statuses, rows, and the [`Change`]s the engine asks to make durable.
//! - [`Store`]: the writer (group commit) and [`Reader`]s.
//! - `sqlite`: opening and refusing files, the schema and its migrations (`migrations/`), queries.
//! - [`Error`]: grouped by what the caller can do.

mod error;
mod sqlite;
mod store;
pub mod types;

pub use error::{Error, Result};
pub use sqlite::{APPLICATION_ID, OpFilter, SCHEMA_VERSION};
pub use store::{Reader, Store};
pub use types::*;
