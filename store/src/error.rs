//! The store's errors, grouped by what the caller can do about them.

use std::path::PathBuf;

use crate::types::{Millis, OpId, OpStatus, ProcessId};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No op has this id.
    #[error("no op {0}")]
    NotFound(OpId),
    /// Another live process owns the op.
    #[error("op {op} is owned by {owner}, whose lease runs until {lease_until}")]
    Owned {
        op: OpId,
        owner: ProcessId,
        lease_until: Millis,
    },
    /// The writer no longer owns the op (another process took it over, or it was released).
    #[error("op {op}: {writer} no longer owns it")]
    Fenced { op: OpId, writer: String },
    /// Another op holds the lock key.
    #[error("lock `{key}` is held by op {holder}")]
    LockHeld { key: String, holder: OpId },
    /// The key cools down after an earlier op; `cairn ack KEY` lets a new op take it.
    #[error("lock `{key}` cools down after op {after} until {until}")]
    CoolingDown {
        key: String,
        after: OpId,
        until: Millis,
    },
    /// `cairn ack` of a key that has no cooldown.
    #[error("lock `{key}` has no cooldown to acknowledge")]
    NoCooldown { key: String },
    /// The op is in a state that does not allow the change.
    #[error("op {op} is {status}: {reason}")]
    Conflict {
        op: OpId,
        status: OpStatus,
        reason: String,
    },
    /// A schedule that exists (or does not).
    #[error("{0}")]
    Schedule(String),
    /// The database file cannot be used; nothing was changed in it.
    #[error("cannot use the database `{path}`: {reason}")]
    Unusable { path: PathBuf, reason: String },
    /// Another process holds the database longer than the busy timeout.
    #[error("the database `{path}` is locked by another process (waited {waited_ms} ms)")]
    Locked { path: PathBuf, waited_ms: u64 },
    /// Writing failed (disk full, I/O error, read-only file); the transaction was rolled back.
    #[error("cannot write to the database `{path}`: {reason}")]
    Write { path: PathBuf, reason: String },
    /// The writer thread is gone (the process is shutting down).
    #[error("the database writer has stopped")]
    Closed,
}

impl Error {
    /// Whether the same request may succeed later without anyone changing anything.
    #[must_use]
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Locked { .. })
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
