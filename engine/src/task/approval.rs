//! An approval gate (`approve:`): the task waits until someone runs `cairn approve` (or
//! `--reject`), or until its own `timeout` passes (the gate fails). A gate never outlives its op
//! waiting: when the op fails, times out or is canceled, the gate ends `canceled`. A stop, or the
//! op parked at its gates, leaves it waiting, for the resume (or the answer) to go on.

use std::time::{Duration, Instant};

use store::{Change, TaskStatus};
use tokio::sync::watch;

use super::context::{Shared, StopReason};
use super::{Fatal, Job, TaskEnd};
use crate::owner::now;
use crate::progress::Progress;

/// How the `task-waiting` event of a gate begins; the prompt follows.
const WAITING: &str = "waiting for approval: ";

/// A gate's prompt, from the message of its `task-waiting` event.
#[must_use]
pub fn prompt_of(message: &str) -> &str {
    message.strip_prefix(WAITING).unwrap_or(message)
}

/// How often a waiting gate reads its answer.
const LOOK_EVERY: Duration = Duration::from_millis(300);

/// An approval gate: the task waits (`waiting`, listed in `CUR_TASK`) until someone runs `cairn
/// approve` or `cairn approve --reject`, or its `timeout` (counted from when it started waiting,
/// across resumes) passes.
pub(crate) async fn run(
    shared: &Shared,
    job: &Job,
    prompt: &str,
    stop: &watch::Receiver<bool>,
) -> Result<TaskEnd, Fatal> {
    let task = job.task();
    let reader = shared.store.reader().map_err(Fatal::from)?;
    let row = reader.task(shared.op, task).map_err(Fatal::from)?;
    // A gate that still waits (the op was parked, or its owner died) keeps waiting since then.
    let since = if row.status == TaskStatus::Waiting {
        row.started_at.unwrap_or_else(now)
    } else {
        let at = now();
        shared
            .apply(vec![Change::SetTask {
                op: shared.op,
                owner: shared.me.clone(),
                task,
                status: TaskStatus::Waiting,
                at,
                message: format!("{WAITING}{prompt}"),
            }])
            .await?;
        at
    };
    shared.say(&Progress::TaskWaiting {
        op: shared.op,
        task: job.name.clone(),
        prompt: prompt.to_owned(),
    });
    let limit = shared.step(job.step).timeout;
    let deadline = limit.map(|l| since.saturating_add(millis(l)));
    let started = Instant::now();
    let mut signal = stop.clone();
    let mut gates = shared.gates_closed();
    let mut parked = shared.gates_parked();
    let mut said = false;
    loop {
        let row = reader.task(shared.op, task).map_err(Fatal::from)?;
        if row.status != TaskStatus::Waiting {
            if row.status == TaskStatus::Succeeded {
                shared.say(&Progress::TaskSucceeded {
                    task: job.name.clone(),
                    by_check: false,
                    elapsed: started.elapsed(),
                });
            } else if row.status == TaskStatus::Failed {
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
        if let (Some(deadline), Some(limit)) = (deadline, limit)
            && now() >= deadline
        {
            let took = plans::units::format_duration(limit);
            end_gate(
                shared,
                task,
                TaskStatus::Failed,
                format!("no answer within {took}"),
                format!("no answer within {took} (the step's `timeout`): the gate fails"),
            )
            .await?;
            continue;
        }
        if !said {
            // Waiting, in time: the op may be parked now.
            shared.gate_waits(job.no);
            said = true;
        }
        let wait = deadline.map_or(LOOK_EVERY, |d| {
            LOOK_EVERY.min(Duration::from_millis(
                u64::try_from(d.saturating_sub(now())).unwrap_or(0),
            ))
        });
        let woke = tokio::select! {
            () = tokio::time::sleep(wait) => Woke::Look,
            // Its owner gave the op up until an answer comes: the gate stays waiting.
            _ = parked.wait_for(|p| *p) => Woke::Parked,
            _ = signal.wait_for(|s| *s) => Woke::Stopped,
            _ = gates.wait_for(|s| *s) => Woke::Failed,
        };
        match woke {
            Woke::Look => {}
            Woke::Parked => return Ok(TaskEnd::Interrupted),
            Woke::Stopped => {
                let why = match shared.stop_reason() {
                    _ if shared.is_lost() => None,
                    Some(StopReason::Timeout(why)) => Some(why),
                    Some(StopReason::Cancel(by)) => Some(format!("the op was canceled by {by}")),
                    // Ctrl-C, a drain: the op is interrupted and resumable; the gate waits on.
                    None => None,
                };
                let Some(why) = why else {
                    return Ok(TaskEnd::Interrupted);
                };
                let error = format!("no answer: {why}");
                let message = format!("no answer before the op stopped: {why}");
                end_gate(shared, task, TaskStatus::Canceled, error, message).await?;
                // The next read returns the gate as it ended (answered meanwhile, or canceled).
            }
            // The op (or its parent op) failed elsewhere: the gate cannot lead anywhere; a
            // resume asks again.
            Woke::Failed => {
                let why = shared
                    .stop_handle()
                    .gates_why()
                    .unwrap_or_else(|| "the op failed".to_owned());
                let error = format!("no answer: {why}");
                let message = format!("no answer before {why}; a resume asks again");
                end_gate(shared, task, TaskStatus::Canceled, error, message).await?;
            }
        }
    }
}

/// What a waiting gate woke up for.
enum Woke {
    /// Time to read its answer again.
    Look,
    /// The op was parked.
    Parked,
    /// The run stops.
    Stopped,
    /// The op failed elsewhere.
    Failed,
}

/// Ends the gate `status` unless it was answered meanwhile.
async fn end_gate(
    shared: &Shared,
    task: store::TaskNo,
    status: TaskStatus,
    error: String,
    message: String,
) -> Result<(), Fatal> {
    shared
        .apply(vec![Change::EndGate {
            op: shared.op,
            owner: shared.me.clone(),
            task,
            status,
            at: now(),
            error,
            message,
        }])
        .await
}

/// A duration in milliseconds, as the store counts them.
fn millis(d: Duration) -> store::Millis {
    store::Millis::try_from(d.as_millis()).unwrap_or(store::Millis::MAX)
}
