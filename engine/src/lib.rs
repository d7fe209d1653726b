//! The cairn engine: runs an op's DAG on tokio, checkpointing every step through the store.
//!
//! Three layers, each using only the ones below it (no module cycle):
//! - [`op`]: what the CLI asks, one use case per file (start, take over, acquire a lock, resume,
//!   replan, cancel, mark, approve, sub-plans). Uses `run` and `task`.
//! - `run`: one op's run, its state machine (`run::scheduler::Scheduler`), fan-out, hooks, the
//!   heartbeat and cancel watcher. Uses `task`.
//! - `task`: one task, one file per step kind, the one attempt/retry loop (`task::attempts`), the
//!   commit-carrying protocol (`task::carry`), what the tasks of a run share
//!   (`task::context::Shared`). Uses neither `run` nor `op`: a `plan:` task starts and resumes
//!   its child op through `task::subplan::Children`, which the op layer implements and hands
//!   down in the run's context.
//!
//! [`serve`] and [`schedule`] sit above `op`. Leaves any layer may use: [`owner`] (the one
//! liveness rule for owners; the status an op is shown with), [`secrets`] (secret params sealed
//! at rest), [`progress`] (what a run reports as it goes), [`time`], [`shutdown`] (the stop
//! handle, the drain handle, the count of running tasks), [`options`], [`outcome`] (how a run
//! ends). The engine keeps no process-wide state: what runs share is passed in ([`Options`]).

pub mod metrics;
pub mod op;
pub mod options;
pub mod outcome;
pub mod owner;
pub mod progress;
mod run;
pub mod schedule;
pub mod secrets;
pub mod serve;
pub mod shutdown;
mod task;
pub mod time;

pub use op::{Error, NewRun};
pub use options::Options;
pub use outcome::RunEnd;
pub use shutdown::{Drain, Stop, StopHandle};
pub use task::approval::prompt_of as gate_prompt;
pub use task::process::REMOTE_BOOT;
