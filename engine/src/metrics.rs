//! What this process counts of its own work, for `/metrics` (Prometheus text): tasks' durations by
//! kind, lease renewals and their failures, ops taken over. Shared by the runs of one process
//! through their [`crate::Options`]; never a static.

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use plans::model::Action;
use store::stats::{Histogram, TASK_BOUNDS};

/// The kinds a task's duration is counted under (an approval gate's wait is not counted).
const KINDS: [&str; 5] = ["process", "sql", "sleep", "plan", "noop"];

/// This process's counts; clones share them.
#[derive(Debug, Clone)]
pub struct Metrics(Arc<Counts>);

#[derive(Debug)]
struct Counts {
    tasks: [Histogram; KINDS.len()],
    lease_renewals: AtomicU64,
    lease_renewal_failures: AtomicU64,
    taken_over: AtomicU64,
}

impl Default for Metrics {
    fn default() -> Self {
        Self(Arc::new(Counts {
            tasks: std::array::from_fn(|_| Histogram::new(TASK_BOUNDS)),
            lease_renewals: AtomicU64::new(0),
            lease_renewal_failures: AtomicU64::new(0),
            taken_over: AtomicU64::new(0),
        }))
    }
}

impl Metrics {
    /// A task of `action` ended after `took` (all its attempts).
    pub(crate) fn task_ended(&self, action: &Action, took: Duration) {
        let kind = match action {
            Action::Run { .. } | Action::Exec { .. } => 0,
            Action::Sql(_) => 1,
            Action::Sleep(_) => 2,
            Action::Plan { .. } => 3,
            Action::Noop => 4,
            Action::Approve { .. } => return,
        };
        self.0.tasks[kind].observe(took);
    }

    pub(crate) fn lease_renewed(&self) {
        self.0.lease_renewals.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn lease_renewal_failed(&self) {
        self.0
            .lease_renewal_failures
            .fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn took_over(&self) {
        self.0.taken_over.fetch_add(1, Ordering::Relaxed);
    }

    /// Writes every series, with its `# HELP` and `# TYPE` lines.
    pub fn write(&self, out: &mut String) {
        let counter = |out: &mut String, name: &str, help: &str, value: &AtomicU64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            let _ = writeln!(out, "{name} {}", value.load(Ordering::Relaxed));
        };
        let name = "cairn_task_duration_seconds";
        let _ = writeln!(
            out,
            "# HELP {name} How long this process's tasks took to end, all attempts, by kind.\n\
             # TYPE {name} histogram"
        );
        for (kind, histogram) in KINDS.iter().zip(&self.0.tasks) {
            histogram.write(out, name, &format!("kind=\"{kind}\""));
        }
        counter(
            out,
            "cairn_lease_renewals_total",
            "Leases of running ops this process renewed.",
            &self.0.lease_renewals,
        );
        counter(
            out,
            "cairn_lease_renewal_failures_total",
            "Renewals of a lease that failed (the database refused or did not answer).",
            &self.0.lease_renewal_failures,
        );
        counter(
            out,
            "cairn_ops_taken_over_total",
            "Ops this process took over after their owner died or stopped.",
            &self.0.taken_over,
        );
    }
}
