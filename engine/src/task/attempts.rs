//! The one attempt/retry loop, used by process (`run`/`exec`) and sub-plan (`plan:`) tasks.
//!
//! - [`Attempt`]: what one attempt of a task kind does, from its start to its [`Ended`].
//! - [`attempts`]: attempts until one succeeds, the step's `retry` gives up, or the run stops.
//! - [`retry_in`]: the retry policy: whether a failed attempt is tried again, and after how long.
//!
//! The delay before a retry is a `tokio::time` sleep, so tests run it on tokio's paused clock.

use std::future::Future;
use std::time::{Duration, Instant};

use plans::model::Step;
use store::Change;
use tokio::sync::watch;

use super::carry::Carry;
use super::context::Shared;
use super::{Ended, Fatal, Job, TaskEnd, finish};
use crate::owner::now;

/// One attempt of a task kind.
pub(crate) trait Attempt {
    /// Runs attempt `n`: its start is committed (carrying `carry`, on the first) before anything
    /// of it runs.
    fn attempt(
        &mut self,
        n: u32,
        carry: &mut Carry,
    ) -> impl Future<Output = Result<Ended, Fatal>> + Send;

    /// When the task's work began, if not when its first start was asked for: a process task's
    /// time runs from its first process's start, not counting a wait for the database before it.
    fn began(&self) -> Option<Instant> {
        None
    }

    /// Attempt `n`'s end is recorded (and durable, for a job not deferred): what it kept for
    /// that moment may go.
    fn recorded(&mut self, _n: u32) -> impl Future<Output = ()> + Send {
        async {}
    }

    /// What attempt `n` held back to be recorded with its end, if anything.
    fn held(&mut self, _n: u32) -> Option<Change> {
        None
    }
}

/// After attempt `attempt_in_round` of a retry round failed (with `exit_code`), the delay before
/// the next one, or `None` when the step's `retry` gives up.
#[must_use]
pub(crate) fn retry_in(
    step: &Step,
    attempt_in_round: u32,
    exit_code: Option<i32>,
) -> Option<Duration> {
    step.retry
        .retries(attempt_in_round, exit_code)
        .then(|| step.retry.delay_before(attempt_in_round + 1))
}

/// Runs attempts of `job` (`prior` attempts made, `retry_from` before this retry round) until one
/// succeeds, the step's `retry` gives up, or the run stops; records each attempt's end.
pub(crate) async fn attempts<A: Attempt + Send>(
    shared: &Shared,
    job: &Job,
    (prior, retry_from): (u32, u32),
    started: Instant,
    stop: &watch::Receiver<bool>,
    carry: &mut Carry,
    kind: &mut A,
) -> Result<TaskEnd, Fatal> {
    let step = shared.step(job.step);
    // Attempts of this retry round so far.
    let mut attempt_in_round = prior - retry_from;
    let mut retrying = false;
    loop {
        attempt_in_round += 1;
        let n = retry_from + attempt_in_round;
        // A retry is a new start: none while the process drains.
        if *stop.borrow() || (retrying && shared.draining()) {
            return Ok(TaskEnd::Interrupted);
        }
        retrying = true;
        let ended = kind.attempt(n, carry).await?;
        let retry = match &ended {
            Ended::Failed {
                exit_code,
                retryable: true,
                ..
            } => retry_in(step, attempt_in_round, *exit_code),
            _ => None,
        };
        let end = finish(
            shared,
            job,
            (n, kind.held(n)),
            ended,
            retry,
            kind.began().unwrap_or(started),
        )
        .await?;
        kind.recorded(n).await;
        let Some(delay) = retry else {
            return Ok(end);
        };
        if !wait_to_retry(shared, job, n, attempt_in_round + 1, delay, stop).await {
            return Ok(TaskEnd::Interrupted);
        }
    }
}

/// Waits `delay` before retry `next` of a task (attempt `n` failed), saying so in `CUR_TASK`
/// (its note, shown while no task runs; cleared when the wait ends); `false` when the run stops
/// meanwhile.
async fn wait_to_retry(
    shared: &Shared,
    job: &Job,
    n: u32,
    next: u32,
    delay: Duration,
    stop: &watch::Receiver<bool>,
) -> bool {
    let at = crate::time::local(now() + i64::try_from(delay.as_millis()).unwrap_or(0));
    let _ = shared
        .apply(vec![Change::CurrentTask {
            op: shared.op,
            owner: Some(shared.me.clone()),
            text: Some(format!(
                "{} (attempt {n} failed; retry {next} at {})",
                job.name,
                at.split(' ').nth(1).unwrap_or_default()
            )),
        }])
        .await;
    let mut signal = stop.clone();
    let waited = tokio::select! {
        () = tokio::time::sleep(delay) => true,
        _ = signal.wait_for(|s| *s) => false,
    };
    let _ = shared
        .apply(vec![Change::CurrentTask {
            op: shared.op,
            owner: Some(shared.me.clone()),
            text: None,
        }])
        .await;
    waited
}
