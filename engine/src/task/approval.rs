//! An approval gate (`approve:`): the task waits until someone runs `cairn approve` (or
//! `--reject`); a stop, or the op failing elsewhere, leaves it waiting for a resume.

use std::time::{Duration, Instant};

use store::{Change, TaskStatus};
use tokio::sync::watch;

use super::context::Shared;
use super::{Fatal, Job, TaskEnd};
use crate::owner::now;
use crate::progress::Progress;

/// An approval gate: the task waits (`waiting`, listed in `CUR_TASK`) until someone runs `cairn approve`
/// or `cairn approve --reject`; a stop leaves it waiting, for the resume to wait again.
pub(crate) async fn run(
    shared: &Shared,
    job: &Job,
    prompt: &str,
    stop: &watch::Receiver<bool>,
) -> Result<TaskEnd, Fatal> {
    let task = job.task();
    shared
        .apply(vec![Change::SetTask {
            op: shared.op,
            owner: shared.me.clone(),
            task,
            status: TaskStatus::Waiting,
            at: now(),
            message: format!("waiting for approval: {prompt}"),
        }])
        .await?;
    shared.say(&Progress::TaskWaiting {
        op: shared.op,
        task: job.name.clone(),
        prompt: prompt.to_owned(),
    });
    let reader = shared.store.reader().map_err(Fatal::from)?;
    let started = Instant::now();
    let mut signal = stop.clone();
    let mut gates = shared.gates_closed();
    loop {
        let row = reader.task(shared.op, task).map_err(Fatal::from)?;
        if row.status != TaskStatus::Waiting {
            if row.status == TaskStatus::Succeeded {
                shared.say(&Progress::TaskSucceeded {
                    task: job.name.clone(),
                    by_check: false,
                    elapsed: started.elapsed(),
                });
            } else {
                shared.say(&Progress::TaskFailed {
                    task: job.name.clone(),
                    error: row.error.clone().unwrap_or_default(),
                    retry_in: None,
                });
            }
            return Ok(TaskEnd::Done {
                status: row.status,
                outputs: row.outputs,
                error: row.error,
            });
        }
        tokio::select! {
            () = tokio::time::sleep(Duration::from_millis(300)) => {}
            _ = signal.wait_for(|s| *s) => return Ok(TaskEnd::Interrupted),
            // The op failed elsewhere: leave the gate waiting, for a resume to ask again.
            _ = gates.wait_for(|s| *s) => return Ok(TaskEnd::Interrupted),
        }
    }
}
