//! The run layer: one op's run, from its `pre` hooks to its final status.
//!
//! - [`run`]: pre hooks → drive the steps ([`scheduler::Scheduler`]) → decide the outcome →
//!   finishing hooks → final status.
//! - `scheduler` (the state machine), `fanout` (fan-out steps), `hooks`, `lease` (heartbeat,
//!   cancel watcher, the op's timeout).
//!
//! The rules this layer keeps (ARCHITECTURE.md, "Crash rules"):
//! - a task's completion is committed before any task that needs it is scheduled (through
//!   `task::carry`);
//! - a failure stops new tasks from starting; running ones finish; the op ends `failed`;
//! - a stop (Ctrl-C, SIGTERM, lost ownership) ends running steps' groups and leaves their tasks
//!   pending for a resume.
//!
//! It uses the task layer and never the op layer: a `plan:` task reaches the op layer through
//! `task::subplan::Children`.

mod fanout;
mod hooks;
mod lease;
pub(crate) mod rest;
pub(crate) mod scheduler;

use std::sync::Arc;

use store::{Change, EventKind, OpStatus, TaskNo};

use crate::outcome::{EndState, RunEnd};
use crate::owner::now;
use crate::progress::Progress;
use crate::shutdown::Stop;
use crate::task::Fatal;
use crate::task::context::{Shared, StopReason};
use rest::Loaded;
use scheduler::{Scheduler, TaskState, satisfied};

/// Runs the op until it ends or stops. `tasks` is the op's state as stored, indexed by task number
/// (the steps, then the hooks), or the first part of it (see `rest`). With `cancel` set, the op is only finished as canceled: nothing
/// new starts, the `on_cancel` hooks run. With `ending`, the outcome was decided by a run that
/// crashed among its finishing hooks: only the hooks that had not finished are left to run.
pub(crate) async fn run(
    shared: Arc<Shared>,
    tasks: Loaded,
    cancel: Option<String>,
    ending: Option<EndState>,
    answered: bool,
) -> RunEnd {
    let end = run_steps(shared.clone(), tasks, cancel, ending, answered).await;
    shared.settle_ssh().await;
    end
}

/// [`run`], until its end is decided.
async fn run_steps(
    shared: Arc<Shared>,
    tasks: Loaded,
    cancel: Option<String>,
    ending: Option<EndState>,
    answered: bool,
) -> RunEnd {
    if let Some(by) = cancel {
        shared.stop_because(StopReason::Cancel(by));
    }
    let watchers = lease::Watchers::start(&shared);
    let mut run = Scheduler::new(shared.clone(), tasks, ending.is_some(), answered);
    if ending.is_none() {
        hooks::run_pre(&mut run).await;
    }
    run.drive().await;
    watchers.steps_ended();
    if run.parked && !shared.is_lost() {
        // Given up until an answer comes: no outcome yet, no finishing hook.
        watchers.end();
        return RunEnd::Parked;
    }
    let decided = decide(&run, ending);
    let (end, state) = match decided {
        Ok(decided) => decided,
        Err(end) => {
            watchers.end();
            return end;
        }
    };
    let finished = hooks::run_finishing(&shared, &run.tasks, state.clone()).await;
    watchers.end();
    if let Err(end) = finished {
        return end;
    }
    record_final(&shared, &run.tasks, end, state).await
}

/// The op's outcome once its steps have ended: how the run ends and what is recorded. `Err`: the
/// run ends without an outcome (ownership lost, the store failed).
fn decide(run: &Scheduler, ending: Option<EndState>) -> Result<(RunEnd, EndState), RunEnd> {
    let shared = &run.shared;
    if shared.is_lost() {
        return Err(RunEnd::LostOwnership(shared.lost_why()));
    }
    if let Some(decided) = ending {
        let error = decided.error.clone().unwrap_or_default();
        let end = match decided.status {
            OpStatus::Succeeded => RunEnd::Succeeded,
            OpStatus::Canceled => RunEnd::Canceled(error),
            _ => RunEnd::Failed(error),
        };
        return Ok((end, decided));
    }
    let plan = &shared.plan;
    let undone = (0..plan.steps.len()).find(|&i| !satisfied(&run.tasks[i], &plan.steps[i]));
    let failed_task = run.first_failure.as_ref().map(|(task, _)| task.clone());
    let (end, status, error) = match (&run.fatal, &run.first_failure, undone, shared.stop_reason())
    {
        (Some(Fatal::Lost(m)), ..) => return Err(RunEnd::LostOwnership(m.clone())),
        (Some(Fatal::Store(m)), ..) => return Err(RunEnd::StoreFailed(m.clone())),
        // Everything is done: a stop that came at the end changes nothing.
        (None, None, None, _) => (RunEnd::Succeeded, OpStatus::Succeeded, None),
        (None, _, _, Some(StopReason::Cancel(by))) => {
            let why = format!("canceled by {by}");
            (RunEnd::Canceled(why.clone()), OpStatus::Canceled, Some(why))
        }
        (None, Some((_, f)), ..) => (RunEnd::Failed(f.clone()), OpStatus::Failed, Some(f.clone())),
        (None, None, Some(_), Some(StopReason::Timeout(why))) => {
            (RunEnd::Failed(why.clone()), OpStatus::Failed, Some(why))
        }
        (None, None, Some(_), None) if !shared.may_start() => (
            RunEnd::Interrupted,
            OpStatus::Interrupted,
            Some(Stop::error(shared.stop_cause().as_ref())),
        ),
        (None, None, Some(i), None) => {
            let f = format!("task `{}` could not run", plan.steps[i].id);
            (RunEnd::Failed(f.clone()), OpStatus::Failed, Some(f))
        }
    };
    Ok((
        end,
        EndState {
            status,
            error,
            failed_task,
        },
    ))
}

/// Whether a failing op frees its lock: its plan says `on_failure: release`, and the op never
/// reached the step named by `keep_from`, if any: every task of it is pending, was never tried
/// (no attempt, in any run: a reset by `resume --from` keeps the count) and was not launched by
/// this run. One skipped, or tried, or running when the op stopped, keeps the lock: from that step
/// on, the target may be half-done.
fn frees_lock_on_failure(plan: &plans::model::Plan, tasks: &[TaskState]) -> bool {
    plan.lock_on_failure == plans::model::OnFailure::Release
        && plan.lock_keep_from.is_none_or(|keep| {
            tasks.iter().all(|t| {
                t.step != Some(keep)
                    || (t.status == store::TaskStatus::Pending && t.attempts == 0 && !t.launched)
            })
        })
}

/// Records the op's final status (and, for a canceled op, its tasks that never got to run), once
/// its finishing hooks are recorded.
async fn record_final(
    shared: &Shared,
    tasks: &[TaskState],
    end: RunEnd,
    state: EndState,
) -> RunEnd {
    let EndState { status, error, .. } = state;
    let n = shared.plan.steps.len();
    let mut batch = Vec::new();
    if status == OpStatus::Canceled {
        // Child ops that were not running (failed, interrupted) are canceled too; any that
        // cannot be are named in the events.
        let _ = shared
            .children
            .cancel(
                &shared.store,
                &shared.me,
                shared.op,
                None,
                &shared.options,
                &shared.progress,
            )
            .await;
        // What never got to run will not now: steps and fan-out items (not hooks).
        for i in (0..tasks.len()).filter(|&i| {
            (i < n || tasks[i].step.is_some_and(|s| s != i))
                && !tasks[i].status.is_kept()
                && tasks[i].status != store::TaskStatus::Canceled
        }) {
            batch.push(Change::SetTask {
                op: shared.op,
                owner: shared.me.clone(),
                task: TaskNo(u32::try_from(i).unwrap_or(u32::MAX)),
                status: store::TaskStatus::Canceled,
                at: now(),
                message: "canceled with the op".to_owned(),
            });
        }
    }
    let message = match &error {
        Some(e) => format!("op {status}: {e}"),
        None => format!("op {status}"),
    };
    if status == OpStatus::Failed && frees_lock_on_failure(&shared.plan, tasks) {
        batch.push(Change::ReleaseLock {
            op: shared.op,
            owner: shared.me.clone(),
            at: now(),
        });
    }
    batch.push(Change::SetOp {
        op: shared.op,
        owner: Some(shared.me.clone()),
        status,
        at: now(),
        error: error.clone(),
        release: true,
        interrupted_by: shared.stop_cause().map(|s| s.by),
        kind: EventKind::op_ended(status),
        message,
    });
    match shared.apply(batch).await {
        Ok(()) => {
            shared.say(&Progress::OpEnded {
                op: shared.op,
                status,
                error,
            });
            end
        }
        Err(f) => f.into_end(),
    }
}
