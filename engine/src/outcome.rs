//! How an op's run ends: [`RunEnd`], the one end type of the op and run layers (a sub-plan's task
//! reads its child run's), and `EndState`, the outcome once decided, stored as `ops.ending` so
//! that a resume among the finishing hooks keeps it.

use serde_json::Value;
use store::OpStatus;

use crate::owner::now;

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunEnd {
    Succeeded,
    Failed(String),
    /// Stopped by a signal; resumable.
    Interrupted,
    /// Canceled (by `cairn cancel`); the `on_cancel` hooks ran.
    Canceled(String),
    /// Another process took the op over (or the store refused this owner): nothing more was written.
    LostOwnership(String),
    /// The op was parked at its approval gates (`cairn serve`): `waiting`, owned by nobody, until
    /// an answer queues it again.
    Parked,
    /// The store could not record progress (disk full, I/O error): the op stays as it was recorded,
    /// shown `interrupted` once this process exits, and resumable.
    StoreFailed(String),
}

impl RunEnd {
    #[must_use]
    pub fn status(&self) -> OpStatus {
        match self {
            Self::Succeeded => OpStatus::Succeeded,
            Self::Failed(_) => OpStatus::Failed,
            Self::Canceled(_) => OpStatus::Canceled,
            Self::Parked => OpStatus::Waiting,
            _ => OpStatus::Interrupted,
        }
    }
}

/// The op's decided outcome, as its finishing hooks see it (`op.status`, `op.error`, `op.failed_task`).
#[derive(Debug, Clone)]
pub(crate) struct EndState {
    pub status: OpStatus,
    pub error: Option<String>,
    pub failed_task: Option<String>,
}

impl EndState {
    pub(crate) fn to_json(&self) -> Value {
        serde_json::json!({
            "status": self.status.as_str(),
            "error": self.error,
            "failed_task": self.failed_task,
            "at": now(),
        })
    }

    pub(crate) fn from_json(value: &Value) -> Option<Self> {
        Some(Self {
            status: OpStatus::parse(value["status"].as_str()?)?,
            error: value["error"].as_str().map(ToOwned::to_owned),
            failed_task: value["failed_task"].as_str().map(ToOwned::to_owned),
        })
    }
}
