//! What the engine tells whoever watches an op run (the CLI prints it on stderr).

use std::sync::Arc;
use std::time::Duration;

use store::{OpId, OpStatus};

/// One thing that happened while running an op.
#[derive(Debug, Clone, PartialEq)]
pub enum Progress {
    OpStarted {
        op: OpId,
        title: String,
        how: Start,
    },
    TaskStarted {
        task: String,
        attempt: u32,
    },
    TaskSucceeded {
        task: String,
        by_check: bool,
        elapsed: Duration,
    },
    TaskSkipped {
        task: String,
    },
    /// A running task's process said how far it is (`$CAIRN_PROGRESS`).
    TaskProgress {
        task: String,
        text: String,
    },
    TaskFailed {
        task: String,
        error: String,
        retry_in: Option<Duration>,
    },
    TaskInterrupted {
        task: String,
    },
    /// An approval gate waits for `cairn approve`.
    TaskWaiting {
        op: OpId,
        task: String,
        prompt: String,
    },
    /// The op's only tasks in flight are approval gates and it is given up (`cairn serve`) until
    /// an answer comes.
    Parked {
        op: OpId,
        gates: Vec<String>,
    },
    /// The op waits for its lock, held by another op.
    WaitingForLock {
        key: String,
        holder: OpId,
    },
    /// Processes left by an attempt whose owner died were ended before the task runs again.
    LeftoversEnded {
        task: String,
        attempt: u32,
        count: usize,
    },
    /// Output of an attempt that is not in its log: a write failed, or the op was lost while
    /// output was still coming.
    LogIncomplete {
        task: String,
        attempt: u32,
        /// `None`: not known (the rest of the output).
        bytes: Option<u64>,
        why: String,
    },
    /// The op is stopping (Ctrl-C, SIGTERM, lost ownership): running tasks are being ended.
    Stopping {
        reason: String,
    },
    OpEnded {
        op: OpId,
        status: OpStatus,
        error: Option<String>,
    },
    /// A resume found the op already succeeded: nothing to do.
    AlreadyDone {
        op: OpId,
    },
    /// What happened in a child op, run by the parent's task `task` (a `plan:` step or one of
    /// its items): `op` once the child op is known.
    Child {
        task: String,
        op: Option<OpId>,
        event: Box<Progress>,
    },
}

/// Where progress goes; cheap to clone.
pub type Sink = Arc<dyn Fn(&Progress) + Send + Sync>;

/// The sink for the child op that the parent's task `task` runs: each of its events goes to
/// `parent` as a [`Progress::Child`], naming the task and, once it started, the child op.
pub(crate) fn of_child(parent: &Sink, task: &str) -> Sink {
    let parent = parent.clone();
    let task = task.to_owned();
    let child = std::sync::OnceLock::new();
    Arc::new(move |event: &Progress| {
        if let Progress::OpStarted { op, .. } | Progress::AlreadyDone { op } = event {
            let _ = child.set(*op);
        }
        parent(&Progress::Child {
            task: task.clone(),
            op: child.get().copied(),
            event: Box::new(event.clone()),
        });
    })
}

/// How a run of an op begins.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// A new op, or a queued one's first run.
    New,
    /// An op that stopped goes on.
    Resumed,
    /// An op with no live owner is taken over only to end it canceled (its `on_cancel` hooks).
    ToCancel,
}
