//! Resuming an op where it stopped ([`resume`]; `resume_as` says why in its events), running
//! steps again from one of them (`--from`: `rerun_tasks`, `rerun_from`), and saying what a resume
//! would do ([`dry_run`]).

use plans::model::Plan;
use store::Change;
use store::EventKind;
use store::OpId;
use store::OpStatus;
use store::Reader;
use store::Store;
use store::TaskNo;
use store::TaskStatus;

use super::lock::Acquired;
use super::params::{NewParams, param_changes};
use super::replan::{Replan, plan_drift};
use super::take::Takeover;
use super::{
    Error, Overrides, check_pause, children, pause_event, read_op, requester, snapshot_plan, whoami,
};
use crate::options::Options;
use crate::outcome::EndState;
use crate::outcome::RunEnd;
use crate::owner::now;
use crate::progress::Progress;
use crate::progress::Sink;
use crate::run::scheduler::TaskState;
use crate::shutdown::StopHandle;
use crate::task::context::Shared;

/// What a resume changes before the op goes on: the steps to run again from (`--from`), an
/// edited plan (`--plan`), new param values (`--param`).
#[derive(Debug, Clone, Default)]
pub struct Edits<'a> {
    pub from: Option<&'a str>,
    pub replan: Option<Replan>,
    pub params: Option<NewParams>,
}

/// Continues an op where it stopped, with its plan snapshot. An op with a cancel request is only
/// finished as canceled.
pub async fn resume(
    store: &Store,
    op: OpId,
    edits: Edits<'_>,
    options: Options,
    overrides: Overrides,
    progress: Sink,
    stop: StopHandle,
) -> Result<RunEnd, Error> {
    let takeover = Takeover {
        store,
        options,
        overrides,
        progress,
        stop,
        kind: EventKind::Resumed,
        verb: "resumed",
        reopen: false,
    };
    resume_as(takeover, op, edits).await
}

/// [`resume`], taking the op over as `takeover` says (its events say why, e.g.
/// [`EventKind::AutoResumed`] and "resumed by cairn serve"). A queued op is started the same way.
pub(crate) async fn resume_as(
    mut takeover: Takeover<'_>,
    op: OpId,
    edits: Edits<'_>,
) -> Result<RunEnd, Error> {
    let Edits {
        from,
        replan,
        params,
    } = edits;
    let store = takeover.store;
    let reader = store.reader()?;
    let row = read_op(&reader, op)?;
    // New params: refused if work already done used an old value, unless it runs again.
    let changes = match &params {
        Some(new) => Some(param_changes(&reader, op, new)?),
        None => None,
    };
    let rerun_params = changes.as_ref().is_some_and(|c| !c.used.is_empty());
    if row.status == OpStatus::Succeeded
        && let Some(c) = changes
            .as_ref()
            .filter(|c| !c.values.is_empty() && !rerun_params)
    {
        let names: Vec<String> = c.values.keys().map(|k| format!("`{k}`")).collect();
        return Err(Error::Refused(format!(
            "op {op} succeeded and none of its steps used {}: no step would run with the new values; nothing changed",
            names.join(", ")
        )));
    }
    if row.status == OpStatus::Succeeded && from.is_none() && replan.is_none() && !rerun_params {
        // Resuming after a crash must be safe to repeat: the work is done, and that is success.
        (takeover.progress)(&Progress::AlreadyDone { op });
        return Ok(RunEnd::Succeeded);
    }
    // An edited plan: refused unless accepted, and unless done work that changed is to run again.
    let drifted = match &replan {
        Some(r) => Some(plan_drift(&reader, op, r)?),
        None => None,
    };
    let rerun = match from {
        Some(step) => Some(rerun_from(
            replan
                .as_ref()
                .map_or(&snapshot_plan(&reader, op)?, |r| &r.plan),
            op,
            step,
        )?),
        None => None,
    };
    let paused = if row.cancel.is_none() {
        check_pause(
            store,
            takeover.overrides,
            &row.plan,
            row.lock_key.as_deref(),
        )?
    } else {
        None
    };
    takeover.reopen = rerun.is_some() || replan.is_some() || rerun_params;
    let replace = replan.map(|r| (r, drifted.clone().unwrap_or_default()));
    let changes = changes.filter(|c| !c.values.is_empty());
    let metrics = takeover.options.metrics.clone();
    let loaded = takeover
        .take_and_load(&reader, &row, replace, changes.as_ref())
        .await?;
    let (shared, mut tasks) = match loaded {
        Ok(loaded) => {
            if row.owner.is_some() {
                // It had an owner, which the take found dead or gone.
                metrics.took_over();
            }
            loaded
        }
        Err(Acquired::Canceled) => {
            return Ok(RunEnd::Canceled("while it waited to start".to_owned()));
        }
        Err(_) => return Ok(RunEnd::Interrupted),
    };
    let events = pause_event(op, &shared.me, paused);
    if !events.is_empty() {
        store.apply(events).await?;
    }
    let mut ending = row.ending.as_ref().and_then(EndState::from_json);
    let mut again: Vec<usize> = rerun.unwrap_or_default();
    let why = from.map(|step| format!("run again from `{step}`"));
    again.sort_unstable();
    again.dedup();
    if let Some(why) = why.filter(|_| !again.is_empty()) {
        ending = None;
        // A step's items run again with it: every task is needed.
        tasks.complete().await?;
        rerun_tasks(&shared, &mut tasks.tasks, again, &why).await?;
    }
    if ending.is_some() && (drifted.is_some() || changes.is_some()) {
        // An edited plan or new params: the outcome is decided again.
        ending = None;
    }
    if ending.is_none() {
        // A new run decides a new outcome: finishing hooks that ran for an earlier one (a failed
        // op's `on_failure`) run again for this one.
        let hooks = &shared.hooks;
        let done: Vec<usize> = hooks
            .on_success
            .iter()
            .chain(&hooks.on_failure)
            .chain(&hooks.on_cancel)
            .copied()
            .filter(|&i| tasks.tasks.get(i).is_some_and(|t| t.status.is_kept()))
            .collect();
        if !done.is_empty() {
            store
                .apply(vec![Change::ResetTasks {
                    op,
                    owner: shared.me.clone(),
                    tasks: done
                        .iter()
                        .map(|&i| TaskNo(u32::try_from(i).unwrap_or(u32::MAX)))
                        .collect(),
                    at: now(),
                    message: "the finishing hooks run again for this run's outcome".to_owned(),
                }])
                .await?;
            // Hooks are in the first part of the tasks read.
            for i in done {
                let hook = &mut tasks.tasks[i];
                hook.status = TaskStatus::Pending;
                hook.retry_from = hook.attempts;
                hook.outputs = None;
            }
        }
    }
    let cancel = row.cancel.as_ref().map(requester);
    // An op queued after it started was parked at its gates and woken by an answer: the answer
    // stands (a rejected gate is not asked again).
    let answered = row.status == OpStatus::Queued && row.started_at.is_some();
    Ok(crate::run::run(shared, tasks, cancel, ending, answered).await)
}

/// Makes `steps` (and their fan-out items) and the finishing hooks pending again, with a fresh
/// retry round: they run again; nothing upstream of them does.
async fn rerun_tasks(
    shared: &Shared,
    tasks: &mut [TaskState],
    steps: Vec<usize>,
    why: &str,
) -> Result<(), Error> {
    let hooks = &shared.hooks;
    // A fan-out step's items run again with it (its list stays as it was frozen).
    let items: Vec<usize> = tasks
        .iter()
        .enumerate()
        .filter(|(no, t)| t.step.is_some_and(|s| s != *no && steps.contains(&s)))
        .map(|(no, _)| no)
        .collect();
    // A `plan:` step runs a new child op: one that had not ended is canceled first.
    let ids: Vec<String> = steps.iter().map(|&i| shared.step(i).id.clone()).collect();
    children::cancel_children(
        &shared.store,
        &shared.me,
        shared.op,
        Some(&ids),
        &shared.options,
        &shared.progress,
    )
    .await
    .map_err(|e| Error::Refused(format!("a sub-plan of these steps still runs: {e}")))?;
    let names: Vec<&str> = steps.iter().map(|&i| shared.step(i).id.as_str()).collect();
    let message = format!("{why}, as asked by {}: {}", whoami(), names.join(", "));
    let again: Vec<usize> = steps
        .iter()
        .copied()
        .chain(
            hooks
                .on_success
                .iter()
                .chain(&hooks.on_failure)
                .chain(&hooks.on_cancel)
                .copied(),
        )
        .chain(items)
        .collect();
    shared
        .store
        .apply(vec![Change::ResetTasks {
            op: shared.op,
            owner: shared.me.clone(),
            tasks: again
                .iter()
                .map(|&i| TaskNo(u32::try_from(i).unwrap_or(u32::MAX)))
                .collect(),
            at: now(),
            message,
        }])
        .await?;
    for i in again {
        if let Some(t) = tasks.get_mut(i) {
            t.status = TaskStatus::Pending;
            t.retry_from = t.attempts;
            t.outputs = None;
            if t.step == Some(i) {
                // A fan-out step's list is expanded again.
                t.item = None;
            }
        }
    }
    Ok(())
}

/// The steps `resume --from STEP` runs again: STEP and everything downstream of it.
fn rerun_from(plan: &Plan, op: OpId, step: &str) -> Result<Vec<usize>, Error> {
    let index = plan
        .step_index(step)
        .ok_or_else(|| Error::unknown_step(op, step, plan.steps.iter().map(|s| s.id.as_str())))?;
    Ok(plan.dag.downstream(index))
}

/// One line of `resume --dry-run`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Planned {
    pub task: String,
    /// As shown ([`crate::owner::shown_task`]): a task the op's last run left cut off is
    /// `interrupted`.
    pub status: crate::owner::ShownTask,
    /// Kept as it is (succeeded or skipped), or run again.
    pub kept: bool,
}

/// What a resume would keep and what it would run, without changing anything.
pub fn dry_run(
    reader: &Reader,
    rule: crate::owner::Rule,
    op: OpId,
    from: Option<&str>,
) -> Result<(store::OpRow, Vec<Planned>), Error> {
    let row = read_op(reader, op)?;
    let shown = rule.shown_status(&row, crate::owner::now());
    let last: std::collections::HashMap<store::TaskNo, store::AttemptStatus> = reader
        .attempts(op)?
        .into_iter()
        .map(|a| (a.task_no, a.status))
        .collect();
    if row.status == OpStatus::Canceled {
        return Err(Error::Final {
            op,
            status: row.status,
        });
    }
    let plan = snapshot_plan(reader, op)?;
    let again = match from {
        Some(step) => rerun_from(&plan, op, step)?,
        None => Vec::new(),
    };
    let planned = reader
        .tasks(op)?
        .into_iter()
        .map(|t| {
            // A fan-out item runs again with its step.
            let step = if t.name == t.step {
                t.task_no.0 as usize
            } else {
                plan.step_index(&t.step).unwrap_or(usize::MAX)
            };
            let rerun = again.contains(&step);
            Planned {
                status: crate::owner::shown_task(shown, t.status, last.get(&t.task_no).copied()),
                task: t.name,
                kept: t.status.is_kept() && !rerun,
            }
        })
        .collect();
    Ok((row, planned))
}
