//! The plan's hooks, run as tasks of their own: the `pre` hooks before any step (a failure ends
//! the op before a step runs), the finishing hooks of the op's outcome (`on_success`,
//! `on_failure`, `on_cancel`) after it is decided, before the op becomes final.

use plans::model::Step;
use serde_json::{Map, Value};
use store::{Change, EventKind, NewTask, OpStatus, TaskNo, TaskStatus};

use super::scheduler::Scheduler;
use crate::outcome::{EndState, RunEnd};
use crate::owner::now;
use crate::task::carry::Carry;
use crate::task::context::Shared;
use crate::task::{self, Fatal, TaskEnd};

/// Stores the task rows of hooks about to run (ones that exist are left as they are).
async fn add_hook_tasks(shared: &Shared, hooks: &[usize]) -> Result<(), Fatal> {
    let tasks = hooks
        .iter()
        .map(|&i| NewTask {
            task_no: TaskNo(u32::try_from(i).unwrap_or(u32::MAX)),
            step: shared.step(i).id.clone(),
            name: shared.step(i).id.clone(),
            item: None,
        })
        .collect();
    shared
        .apply(vec![Change::AddTasks {
            op: shared.op,
            owner: shared.me.clone(),
            tasks,
        }])
        .await
}

/// The `pre` hooks, in order: any failure ends the op before a step runs.
pub(super) async fn run_pre(run: &mut Scheduler) {
    let shared = run.shared.clone();
    let pre = &shared.hooks.pre;
    if pre.iter().all(|&i| run.tasks[i].status.is_kept()) || !shared.may_start() {
        return;
    }
    if let Err(f) = add_hook_tasks(&shared, pre).await {
        run.fatal = Some(f);
    }
    for &i in pre {
        if run.fatal.is_some() || run.tasks[i].status.is_kept() {
            continue;
        }
        // A hook is a start too: none once the run stops or drains.
        if !shared.may_start() {
            break;
        }
        let stop = shared.stop_signal().clone();
        let Some(job) = run.tasks[i].job(i) else {
            continue;
        };
        let ctx = shared.context(shared.step(i), &[]);
        let attempts = run.tasks[i].attempts;
        let mut carry = Carry::none();
        let end = task::run(&shared, &job, (attempts, attempts), ctx, &stop, &mut carry);
        match end.await {
            Ok(TaskEnd::Done {
                status,
                outputs,
                error,
            }) => {
                run.tasks[i].status = status;
                run.tasks[i].outputs = outputs;
                if status == TaskStatus::Failed {
                    let name = shared.step(i).id.clone();
                    let error = format!("hook `{name}` failed: {}", error.unwrap_or_default());
                    run.first_failure = Some((name, error));
                    break;
                }
            }
            Ok(TaskEnd::Interrupted | TaskEnd::Expanded) => break,
            Ok(TaskEnd::Unrecorded { .. }) => unreachable!("a hook records its own end"),
            Err(f) => run.fatal = Some(f),
        }
    }
}

/// The finishing hooks of `end`'s status, with the op's outcome (`op.status`...) in their
/// context; recorded first as the op's `ending`, so that a resume among them keeps it.
pub(super) async fn run_finishing(
    shared: &Shared,
    tasks: &[super::scheduler::TaskState],
    end: EndState,
) -> Result<(), RunEnd> {
    let phase = match end.status {
        OpStatus::Succeeded => &shared.hooks.on_success,
        OpStatus::Failed => &shared.hooks.on_failure,
        OpStatus::Canceled => &shared.hooks.on_cancel,
        _ => return Ok(()),
    };
    if phase.is_empty() {
        return Ok(());
    }
    let record = Change::SetEnding {
        op: shared.op,
        owner: shared.me.clone(),
        ending: end.to_json(),
    };
    shared.set_outcome(end);
    shared.apply(vec![record]).await.map_err(Fatal::into_end)?;
    add_hook_tasks(shared, phase)
        .await
        .map_err(Fatal::into_end)?;
    let n = shared.plan.steps.len();
    let every_output: Vec<(usize, Map<String, Value>)> = (0..n)
        .filter_map(|i| tasks[i].outputs.clone().map(|o| (i, o)))
        .collect();
    for &i in phase {
        if tasks[i].status.is_kept() {
            continue;
        }
        // Finishing hooks run to their end (or timeout) even when the op was stopped.
        let calm = shared.calm().clone();
        let Some(job) = tasks[i].job(i) else { continue };
        let hook: &Step = shared.step(i);
        let ctx = shared.context(hook, &every_output);
        let attempts = tasks[i].attempts;
        let mut carry = Carry::none();
        let end = task::run(shared, &job, (attempts, attempts), ctx, &calm, &mut carry);
        match end.await {
            Ok(TaskEnd::Done {
                status: TaskStatus::Failed,
                error,
                ..
            }) => {
                let _ = shared
                    .apply(vec![Change::Event {
                        op: shared.op,
                        owner: Some(shared.me.clone()),
                        at: now(),
                        kind: EventKind::HookFailed,
                        task: Some(hook.id.clone()),
                        message: format!("the op's outcome stands: {}", error.unwrap_or_default()),
                    }])
                    .await;
            }
            Ok(_) => {}
            Err(f) => return Err(f.into_end()),
        }
    }
    Ok(())
}
