//! The store's errors, and [`ErrorKind`]: the groups they fall in by what the caller can do.

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

/// What a caller can do about an [`Error`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// What was asked for does not exist: nothing to retry.
    NotFound,
    /// The state refuses the change (another owner, a fenced writer, a lock held or cooling
    /// down, an op or task in the wrong state, a schedule that exists or not): someone must
    /// change something first, or the caller must stop.
    Conflict,
    /// The store is busy: the same request may succeed later unchanged.
    Busy,
    /// The store cannot be used (not cairn's, newer, unreadable, unsupported): nothing was changed.
    Unusable,
    /// Writing failed (disk full, I/O error, read-only): the change was not made.
    Write,
    /// The store is shutting down.
    Closed,
}

impl Error {
    /// Whether the same request may succeed later without anyone changing anything.
    #[must_use]
    pub fn is_transient(&self) -> bool {
        self.kind() == ErrorKind::Busy
    }

    /// What the caller can do about it.
    #[must_use]
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::NotFound(_) => ErrorKind::NotFound,
            Self::Owned { .. }
            | Self::Fenced { .. }
            | Self::LockHeld { .. }
            | Self::CoolingDown { .. }
            | Self::NoCooldown { .. }
            | Self::Conflict { .. }
            | Self::Schedule(_) => ErrorKind::Conflict,
            Self::Locked { .. } => ErrorKind::Busy,
            Self::Unusable { .. } => ErrorKind::Unusable,
            Self::Write { .. } => ErrorKind::Write,
            Self::Closed => ErrorKind::Closed,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
