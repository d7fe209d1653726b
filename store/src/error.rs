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
    /// A token of the HTTP API that exists (or does not).
    #[error("{0}")]
    Token(String),
    /// The database file cannot be used; nothing was changed in it.
    #[error("cannot use the database `{path}`: {reason}")]
    Unusable { path: PathBuf, reason: String },
    /// Another process holds the database longer than the busy timeout. `holder`: which
    /// command and pid, when the kernel says who holds the lock.
    #[error(
        "the database `{path}` stayed locked by another process{} for {}",
        holder.as_ref().map_or(String::new(), |h| format!(" ({h})")),
        waited(*waited_ms)
    )]
    Locked {
        path: PathBuf,
        waited_ms: u64,
        holder: Option<String>,
    },
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

    /// The same error, when a caller that tried again for `total` gives up: a lock's wait is the
    /// whole of it, not the last try's.
    #[must_use]
    pub fn after_waiting(self, total: std::time::Duration) -> Self {
        match self {
            Self::Locked {
                path,
                waited_ms,
                holder,
            } => Self::Locked {
                path,
                waited_ms: waited_ms.max(u64::try_from(total.as_millis()).unwrap_or(u64::MAX)),
                holder,
            },
            other => other,
        }
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
            | Self::Schedule(_)
            | Self::Token(_) => ErrorKind::Conflict,
            Self::Locked { .. } => ErrorKind::Busy,
            Self::Unusable { .. } => ErrorKind::Unusable,
            Self::Write { .. } => ErrorKind::Write,
            Self::Closed => ErrorKind::Closed,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A wait as people say it: `800 ms`, `5 s`, `2 min 5 s`.
fn waited(ms: u64) -> String {
    match ms {
        0..1_000 => format!("{ms} ms"),
        1_000..60_000 => format!("{} s", ms / 1_000),
        _ => format!("{} min {} s", ms / 60_000, ms % 60_000 / 1_000),
    }
}
