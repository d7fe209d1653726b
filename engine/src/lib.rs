//! The cairn engine: runs an op's DAG on tokio, checkpointing every step through the store.
//!
//! - [`ops`]: what the CLI asks: start and run an op, resume one (taking it over from a dead
//!   owner, ending the processes it left), say what a resume would do.
//! - `runner`: the scheduler and one task's attempts (`check`, retries, timeouts, logs), the
//!   heartbeat that renews the owner's lease.
//! - [`owner`]: the one liveness rule for owners; the status an op is shown with.
//! - [`secrets`]: secret params sealed at rest.
//! - [`progress`]: what a run reports as it goes. [`time`]: times for people and machines.

pub mod children;
pub mod ops;
pub mod owner;
pub mod progress;
mod runner;
pub mod schedule;
pub mod secrets;
pub mod serve;
pub mod time;

pub use ops::{Error, NewRun, StopHandle, stop_handle};
pub use runner::{Options, RunEnd};
