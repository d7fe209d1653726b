//! A `sleep` step: one attempt that waits its duration, or until the run stops.

use std::time::{Duration, Instant};

use serde_json::Map;
use store::Change;
use tokio::sync::watch;

use super::context::Shared;
use super::{Ended, Fatal, Job, TaskEnd, finish};
use crate::owner::now;
use crate::progress::Progress;

/// Attempt `n` of a `sleep` task: started, waited, recorded.
pub(crate) async fn run(
    shared: &Shared,
    job: &Job,
    n: u32,
    duration: Duration,
    stop: &watch::Receiver<bool>,
) -> Result<TaskEnd, Fatal> {
    let started = Instant::now();
    shared
        .apply(vec![Change::StartAttempt {
            op: shared.op,
            owner: shared.me.clone(),
            task: job.task(),
            n,
            retry_from: n - 1,
            at: now(),
        }])
        .await?;
    shared.say(&Progress::TaskStarted {
        task: job.name.clone(),
        attempt: n,
    });
    let mut signal = stop.clone();
    let stopped = tokio::select! {
        () = tokio::time::sleep(duration) => false,
        _ = signal.wait_for(|s| *s) => true,
    };
    let ended = if stopped {
        Ended::Interrupted
    } else {
        Ended::Succeeded(Map::new(), false)
    };
    finish(shared, job, (n, None), ended, None, started).await
}
