//! A `noop` step: one attempt that starts and ends at once, recorded in one commit (which also
//! carries the end of the task that released it).

use std::time::Instant;

use serde_json::Map;
use store::{AttemptStatus, Outcome as TaskOutcome, TaskStatus};

use super::carry::Carry;
use super::context::Shared;
use super::{Fatal, Job, TaskEnd, whole_attempt};
use crate::progress::Progress;

/// Records attempt `n` of a `noop` task, succeeded.
pub(crate) async fn run(
    shared: &Shared,
    job: &Job,
    n: u32,
    started: Instant,
    carry: &mut Carry,
) -> Result<TaskEnd, Fatal> {
    let outcome = TaskOutcome {
        task: TaskStatus::Succeeded,
        attempt: AttemptStatus::Succeeded,
        exit_code: None,
        error: None,
        outputs: Some(Map::new()),
        by_check: false,
    };
    whole_attempt(shared, job, n, outcome, carry).await?;
    shared.say(&Progress::TaskSucceeded {
        task: job.name.clone(),
        by_check: false,
        elapsed: started.elapsed(),
    });
    Ok(TaskEnd::Done {
        status: TaskStatus::Succeeded,
        outputs: Some(Map::new()),
        error: None,
    })
}
