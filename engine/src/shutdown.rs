//! Stopping and draining, through handles passed in: the engine keeps no process-wide state.
//!
//! - [`StopHandle`]: what a caller keeps to stop one run (Ctrl-C, SIGTERM, a parent op's stop),
//!   and who or what stopped it ([`Stop`]), for the op's record.
//! - [`Drain`]: set when the process drains (`cairn serve` stops): no task starts any more; the
//!   running ones go on to their end, and their ops end interrupted, to be resumed.
//! - [`TaskCount`]: the tasks running in this process, across all its ops (a `serve`'s, a
//!   sub-plan's); while at most one runs, its commits are made on the engine's own thread.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use store::Interruption;
use tokio::sync::watch;

/// Stops a run: running steps are ended and the op is left for a resume. Cheap to clone; every
/// clone stops the same run.
#[derive(Debug, Clone)]
pub struct StopHandle(Arc<Inner>);

#[derive(Debug)]
struct Inner {
    stopped: watch::Sender<bool>,
    /// Set by a second ask: the steps' grace ends now. Shared with the handles of the runs this
    /// one's stop reaches (sub-plans' ops, a serve's ops: [`StopHandle::beneath`]).
    hurried: Arc<watch::Sender<bool>>,
    /// Who or what asked first, when it said (a signal); `None` for the engine's own stops.
    cause: Mutex<Option<Stop>>,
    /// Set when the run's approval gates can no longer lead anywhere: by the run itself when it
    /// fails, or from above ([`StopHandle::close_gates`]) when a sub-plan's parent fails.
    gates: Arc<watch::Sender<bool>>,
    /// Why they were closed from above, for the gates' own record.
    gates_why: Mutex<Option<String>>,
}

/// Who or what stopped a run, as the op's record says it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stop {
    pub by: Interruption,
    /// For people: "Ctrl-C (SIGINT) from the terminal".
    pub how: String,
}

impl Stop {
    /// Who or what stopped a run of a process that `drains` (a `cairn serve` stopping: its own
    /// shutdown, whatever signal asked for it), or that was stopped with `cause`.
    pub(crate) fn of(drains: &Drain, cause: Option<Self>) -> Option<Self> {
        if drains.is_draining() {
            return Some(Self {
                by: Interruption::Shutdown,
                how: "the shutdown of the cairn serve that ran it".to_owned(),
            });
        }
        cause
    }

    /// The op's error, and the end of its event's message: "stopped by ...".
    pub(crate) fn error(stop: Option<&Self>) -> String {
        stop.map_or_else(
            || "stopped before it finished".to_owned(),
            |s| format!("stopped by {}", s.how),
        )
    }
}

impl StopHandle {
    #[must_use]
    pub fn new() -> Self {
        Self(Arc::new(Inner {
            stopped: watch::channel(false).0,
            hurried: Arc::new(watch::channel(false).0),
            cause: Mutex::new(None),
            gates: Arc::new(watch::channel(false).0),
            gates_why: Mutex::new(None),
        }))
    }

    /// A handle for a run under this one's (a sub-plan's op, an op of a serve): stopped on its own,
    /// but hurried with this one.
    #[must_use]
    pub fn beneath(&self) -> Self {
        Self(Arc::new(Inner {
            stopped: watch::channel(false).0,
            hurried: self.0.hurried.clone(),
            cause: Mutex::new(None),
            gates: Arc::new(watch::channel(false).0),
            gates_why: Mutex::new(None),
        }))
    }

    /// Ends the grace of the steps being stopped: what is left of them is killed now (a second
    /// Ctrl-C). Stops the run too, if it was not yet.
    pub fn hurry(&self) {
        self.0.hurried.send_replace(true);
        self.stop();
    }

    pub(crate) fn subscribe_hurry(&self) -> watch::Receiver<bool> {
        self.0.hurried.subscribe()
    }

    /// Completes once [`StopHandle::hurry`] was called (at once if it was).
    pub(crate) fn hurried(&self) -> impl Future<Output = ()> + use<> {
        let mut hurried = self.subscribe_hurry();
        async move {
            if hurried.wait_for(|h| *h).await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }

    /// Asks the run to stop (the first ask counts; later ones change nothing).
    pub fn stop(&self) {
        self.0.stopped.send_replace(true);
    }

    /// Asks the run to stop, saying who or what asks: recorded with the op if it is the first
    /// cause given.
    pub fn stop_by(&self, by: Interruption, how: impl Into<String>) {
        if let Ok(mut cause) = self.0.cause.lock() {
            cause.get_or_insert_with(|| Stop {
                by,
                how: how.into(),
            });
        }
        self.stop();
    }

    /// Who or what stopped the run, if it was said.
    #[must_use]
    pub fn cause(&self) -> Option<Stop> {
        self.0.cause.lock().ok().and_then(|c| c.clone())
    }

    #[must_use]
    pub fn is_stopped(&self) -> bool {
        *self.0.stopped.borrow()
    }

    pub(crate) fn subscribe(&self) -> watch::Receiver<bool> {
        self.0.stopped.subscribe()
    }

    /// Ends the run's approval gates still waiting (they can lead nowhere: `why`), without
    /// stopping its running steps, which go on to their end.
    pub(crate) fn close_gates(&self, why: &str) {
        if let Ok(mut slot) = self.0.gates_why.lock() {
            slot.get_or_insert_with(|| why.to_owned());
        }
        self.0.gates.send_replace(true);
    }

    /// Why the gates were closed from above, if they were.
    pub(crate) fn gates_why(&self) -> Option<String> {
        self.0.gates_why.lock().ok().and_then(|w| w.clone())
    }

    /// The run's gates signal (see [`StopHandle::close_gates`]).
    pub(crate) fn gates(&self) -> Arc<watch::Sender<bool>> {
        self.0.gates.clone()
    }
}

impl Default for StopHandle {
    fn default() -> Self {
        Self::new()
    }
}

/// Stops every run that shares it from starting tasks (see the module's doc).
#[derive(Debug, Clone, Default)]
pub struct Drain(Arc<AtomicBool>);

impl Drain {
    pub fn drain(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    #[must_use]
    pub fn is_draining(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// How many tasks run now in the runs that share it (see the module's doc).
#[derive(Debug, Clone, Default)]
pub struct TaskCount(Arc<AtomicUsize>);

impl TaskCount {
    pub(crate) fn get(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }

    /// One more task runs; [`TaskCount::leave`] when it ends.
    pub(crate) fn enter(&self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }

    pub(crate) fn leave(&self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}
