//! How a run behaves ([`Options`]): its timings, and the handles the runs of one process share.

use std::time::Duration;

use crate::metrics::Metrics;
use crate::shutdown::{Drain, TaskCount};

/// Knobs of a run. The runs given clones of one `Options` (a `serve`'s ops, an op and its
/// sub-plans' ops) share its [`Drain`], [`TaskCount`] and [`Metrics`].
#[derive(Debug, Clone)]
pub struct Options {
    /// Between TERM and KILL when steps must stop.
    pub grace: Duration,
    /// How long an owner's lease lasts without renewal.
    pub lease: Duration,
    /// How often the lease is renewed.
    pub heartbeat: Duration,
    /// Set when the process drains: no task starts any more.
    pub drain: Drain,
    /// The tasks running in the runs sharing these options.
    pub tasks: TaskCount,
    /// An op (not a sub-plan's) whose only tasks in flight are approval gates is given up until
    /// an answer comes (`cairn serve`: it holds no worker meanwhile); otherwise the run waits.
    pub park: bool,
    /// What the process counts of its work, for `/metrics`.
    pub metrics: Metrics,
    /// A takeover ends the processes of `adopt` steps left running (`resume --restart-running`)
    /// instead of taking their attempts again.
    pub restart_running: bool,
}

impl Options {
    /// How many tasks the runs sharing these options are running now.
    #[must_use]
    pub fn running_tasks(&self) -> usize {
        self.tasks.get()
    }

    /// These options with leases of `lease`, renewed every sixth of it (as the default 30 s
    /// lease is every 5 s): a renewal may fail a few times before the lease is in danger.
    #[must_use]
    pub fn with_lease(mut self, lease: Duration) -> Self {
        self.lease = lease;
        self.heartbeat = lease / 6;
        self
    }
}

impl Default for Options {
    fn default() -> Self {
        Self {
            grace: Duration::from_secs(10),
            lease: Duration::from_secs(30),
            heartbeat: Duration::from_secs(5),
            drain: Drain::default(),
            tasks: TaskCount::default(),
            park: false,
            metrics: Metrics::default(),
            restart_running: false,
        }
    }
}
