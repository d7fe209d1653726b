//! Stopping and draining, through handles passed in: the engine keeps no process-wide state.
//!
//! - [`StopHandle`]: what a caller keeps to stop one run (Ctrl-C, SIGTERM, a parent op's stop).
//! - [`Drain`]: set when the process drains (`cairn serve` stops): no task starts any more; the
//!   running ones go on to their end, and their ops end interrupted, to be resumed.
//! - [`TaskCount`]: the tasks running in this process, across all its ops (a `serve`'s, a
//!   sub-plan's); while at most one runs, its commits are made on the engine's own thread.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use tokio::sync::watch;

/// Stops a run: running steps are ended and the op is left for a resume. Cheap to clone; every
/// clone stops the same run.
#[derive(Debug, Clone)]
pub struct StopHandle(Arc<watch::Sender<bool>>);

impl StopHandle {
    #[must_use]
    pub fn new() -> Self {
        Self(Arc::new(watch::channel(false).0))
    }

    /// Asks the run to stop (the first ask counts; later ones change nothing).
    pub fn stop(&self) {
        self.0.send_replace(true);
    }

    #[must_use]
    pub fn is_stopped(&self) -> bool {
        *self.0.borrow()
    }

    pub(crate) fn subscribe(&self) -> watch::Receiver<bool> {
        self.0.subscribe()
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
