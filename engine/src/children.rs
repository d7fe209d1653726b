//! Sub-plans: a `plan:` step runs another plan as a child op, linked to the step's task.
//!
//! - At submit, the plan's sub-plans (and theirs) are read and stored in its snapshot, keyed by
//!   absolute path (`plans::bundle`); a child op's snapshot is the same bundle with the child's
//!   text, so every op of the tree finds its sub-plans from its own directory, never from disk.
//! - The task's attempt starts; the child op is found by its link (`ops.parent_id`,
//!   `parent_task`) or submitted, owned by the same process, and run (or resumed) to its end.
//!   A child that already succeeded is not run again: its outputs are taken as they are.
//! - The child's outcome becomes the task's: its steps' outputs, merged in plan order; a failed
//!   or canceled child fails the task. Cancelling the parent cancels the child (the child's
//!   cancel watcher also reads its ancestors' requests); a stop reaches it through its stop handle.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use plans::model::{Action, Arg, Plan};
use plans::template::Context;
use serde_json::{Map, Value};
use store::{OpId, OpStatus, Reader, TaskNo};
use tokio::sync::watch;

use crate::ops::{self, Error};
use crate::runner::{Job, Shared, StopReason};

/// Reads the sub-plans `plan` names, and theirs, from `workdir` (the plan's directory): key →
/// text, each validated and checked against the `with:` that calls it. A sub-plan that names one
/// of the plans calling it is refused: it would never end.
pub fn load(workdir: &Path, plan: &Plan) -> Result<Vec<(String, String)>, Error> {
    let mut files = BTreeMap::new();
    let mut chain = Vec::new();
    walk(&workdir.to_string_lossy(), plan, &mut chain, &mut files)?;
    Ok(files.into_iter().collect())
}

fn walk(
    dir: &str,
    plan: &Plan,
    chain: &mut Vec<String>,
    files: &mut BTreeMap<String, String>,
) -> Result<(), Error> {
    for (step, path) in plan.sub_plans() {
        let key = plans::bundle::sub_plan_key(dir, path);
        if chain.contains(&key) {
            return Err(Error::SubPlan(format!(
                "step `{}` of plan `{}` runs `{key}`, which runs it again: sub-plans must not form a cycle",
                plan.steps[step].id, plan.name
            )));
        }
        let text = match files.get(&key) {
            Some(text) => text.clone(),
            None => std::fs::read_to_string(&key).map_err(|e| {
                Error::SubPlan(format!(
                    "step `{}` of plan `{}` runs `{key}`, which cannot be read: {e}",
                    plan.steps[step].id, plan.name
                ))
            })?,
        };
        let child = plans::parse(&key, &text).map_err(|p| Error::SubPlan(p.render(false)))?;
        let problems = plans::validate::sub_plan_problems(plan, step, &child);
        if let Some(problem) = problems.first() {
            return Err(Error::SubPlan(format!(
                "step `{}` of plan `{}`: {}",
                plan.steps[step].id, plan.name, problem.message
            )));
        }
        files.insert(key.clone(), text);
        chain.push(key.clone());
        walk(plans::bundle::key_dir(&key), &child, chain, files)?;
        chain.pop();
    }
    Ok(())
}

/// The ops above `parent` (nearest first), with the lock keys they hold: a child never waits for
/// a lock its own ancestor holds.
pub(crate) fn lineage(
    reader: &Reader,
    mut parent: Option<(OpId, TaskNo)>,
) -> Result<(Vec<OpId>, Vec<String>), Error> {
    let mut ops = Vec::new();
    let mut locks = Vec::new();
    while let Some((op, _)) = parent {
        if ops.contains(&op) {
            break;
        }
        let row = reader.op(op)?;
        ops.push(op);
        locks.extend(row.lock_key.clone());
        parent = row.parent;
    }
    Ok((ops, locks))
}

/// How a child op ended, for its parent's task.
pub(crate) enum ChildEnd {
    Succeeded(Map<String, Value>),
    Failed(String),
    /// Canceled by hand: the task fails, and `retry` does not undo a person's cancel.
    Canceled(String),
    /// Stopped (a signal, the parent's cancel or timeout): the task ends as the parent's stop says.
    Stopped,
    /// The store could not record the child's progress: the parent cannot go on either.
    StoreFailed(String),
}

/// Runs (or resumes, or just reads) the child op of a `plan:` task.
/// (A boxed future, not an `async fn`: the runner runs this, which runs a runner.)
pub(crate) fn run<'a>(
    shared: &'a Shared,
    job: &'a Job,
    ctx: &'a Context,
    stop: &'a watch::Receiver<bool>,
) -> Boxed<'a, Result<ChildEnd, String>> {
    Box::pin(run_inner(shared, job, ctx, stop))
}

async fn run_inner(
    shared: &Shared,
    job: &Job,
    ctx: &Context,
    stop: &watch::Receiver<bool>,
) -> Result<ChildEnd, String> {
    let step = shared.step(job.step);
    let Action::Plan { path, with } = &step.action else {
        return Err("not a sub-plan step".to_owned());
    };
    let link = (shared.op, job.task());
    let mut existing = shared
        .store
        .reader()
        .and_then(|reader| reader.child(shared.op, job.task()))
        .map_err(|e| e.to_string())?;
    if let Some(row) = existing.as_ref().filter(|r| r.status == OpStatus::Canceled) {
        // Someone canceled the child; running the task again means a new child.
        shared
            .store
            .apply(vec![store::Change::DetachChild {
                op: shared.op,
                owner: shared.me.clone(),
                task: job.task(),
                at: crate::owner::now(),
                message: format!("op {} was canceled; a new op runs the sub-plan", row.id),
            }])
            .await
            .map_err(|e| e.to_string())?;
        existing = None;
    }
    let child_stop = ops::stop_handle();
    // The step's `timeout` stops the child; the task then fails.
    let timed_out = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let timer = step.timeout.map(|limit| {
        let child_stop = child_stop.clone();
        let timed_out = timed_out.clone();
        tokio::spawn(async move {
            tokio::time::sleep(limit).await;
            timed_out.store(true, std::sync::atomic::Ordering::SeqCst);
            child_stop.send_replace(true);
        })
    });
    // A stop reaches the child; a cancel reaches it through its watcher, so that it ends
    // canceled, with its own `on_cancel` hooks.
    // When the parent fails elsewhere, the child stops too (left interrupted, resumable): it
    // could otherwise wait at an approval gate that can no longer lead anywhere.
    let forward = {
        let mut parent_stop = stop.clone();
        let mut parent_failed = shared.gates.subscribe();
        let child_stop = child_stop.clone();
        let reason = shared.stop_reason_handle();
        tokio::spawn(async move {
            let stop_child = tokio::select! {
                r = parent_stop.wait_for(|s| *s) => {
                    r.is_ok() && !matches!(reason(), Some(StopReason::Cancel(_)))
                }
                r = parent_failed.wait_for(|s| *s) => r.is_ok(),
            };
            if stop_child {
                child_stop.send_replace(true);
            }
        })
    };
    let result = match existing {
        Some(row) if row.status == OpStatus::Succeeded => Ok((row.id, crate::RunEnd::Succeeded)),
        Some(row) => ops::resume_child(shared, row.id, child_stop)
            .await
            .map(|end| (row.id, end)),
        None => {
            let key = plans::bundle::sub_plan_key(&shared.workdir.to_string_lossy(), path);
            let Some(text) = shared.files.get(&key) else {
                forward.abort();
                if let Some(timer) = &timer {
                    timer.abort();
                }
                return Err(format!("sub-plan `{key}` is not in the op's snapshot"));
            };
            let plan = plans::parse(&key, text).map_err(|p| p.render(false))?;
            let mut given = Map::new();
            for (name, arg) in with {
                let value = match arg {
                    Arg::Template(t) => Value::String(
                        t.render(ctx)
                            .map_err(|e| format!("cannot render `with.{name}`: {e}"))?,
                    ),
                    Arg::Value(v) => v.clone(),
                };
                given.insert(name.clone(), value);
            }
            let params = plans::params::resolve(&plan, &[], Some(&given)).map_err(|problems| {
                let all: Vec<String> = problems.into_iter().map(|p| p.message).collect();
                format!("sub-plan `{}`: {}", plan.name, all.join("; "))
            })?;
            let new = ops::NewRun {
                workdir: Path::new(plans::bundle::key_dir(&key)).to_path_buf(),
                env: shared.env.clone(),
                files: shared
                    .files
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
                parent: Some(link),
                plan,
                params,
            };
            ops::start_child(shared, new, child_stop).await
        }
    };
    forward.abort();
    if let Some(timer) = timer {
        timer.abort();
    }
    let (child, end) = result.map_err(|e| e.to_string())?;
    if timed_out.load(std::sync::atomic::Ordering::SeqCst) && end != crate::RunEnd::Succeeded {
        return Ok(ChildEnd::Failed(format!(
            "timed out after {}; sub-plan op {child} was stopped",
            plans::units::format_duration(step.timeout.unwrap_or_default())
        )));
    }
    Ok(match end {
        crate::RunEnd::Succeeded => ChildEnd::Succeeded(outputs(
            &shared.store.reader().map_err(|e| e.to_string())?,
            child,
        )?),
        crate::RunEnd::Failed(e) => ChildEnd::Failed(format!("sub-plan op {child} failed: {e}")),
        crate::RunEnd::Canceled(e) if shared.stop_reason().is_none() => {
            // The child may have seen this op's (or an ancestor's) cancel before this op did.
            let request = shared
                .store
                .reader()
                .ok()
                .and_then(|reader| shared.cancel_request(&reader));
            match request {
                Some(request) => {
                    shared.stop_because(StopReason::Cancel(request.by));
                    ChildEnd::Stopped
                }
                None => ChildEnd::Canceled(format!("sub-plan op {child} was canceled: {e}")),
            }
        }
        crate::RunEnd::Canceled(_) | crate::RunEnd::Interrupted => ChildEnd::Stopped,
        // The child was taken over by another process: this task cannot know how it ends.
        crate::RunEnd::LostOwnership(m) => {
            ChildEnd::Failed(format!("sub-plan op {child} was taken over: {m}"))
        }
        crate::RunEnd::StoreFailed(m) => ChildEnd::StoreFailed(m),
    })
}

/// A succeeded child's outputs: its steps' outputs, merged in plan order (a later step's key
/// wins).
fn outputs(reader: &Reader, child: OpId) -> Result<Map<String, Value>, String> {
    let plan = ops::snapshot_plan(reader, child).map_err(|e| e.to_string())?;
    let mut merged = Map::new();
    for task in reader.tasks(child).map_err(|e| e.to_string())? {
        let no = task.task_no.0 as usize;
        if no < plan.steps.len() && plan.steps[no].id == task.step {
            merged.extend(task.outputs.unwrap_or_default());
        }
    }
    Ok(merged)
}

/// Cancels `op`'s child ops that have not ended (those run by the steps named in `only`, or all),
/// with their own `on_cancel` hooks. Children that could not be canceled, or whose live owner
/// (another process) has not ended them yet, are named in the error and in `op`'s events.
pub(crate) fn cancel_children<'a>(
    store: &'a store::Store,
    op: OpId,
    only: Option<&'a [String]>,
    options: &'a crate::Options,
    progress: &'a crate::progress::Sink,
) -> Boxed<'a, Result<(), String>> {
    Box::pin(async move {
        let reader = store.reader().map_err(|e| e.to_string())?;
        let children = reader.children(op).map_err(|e| e.to_string())?;
        let tasks = reader.tasks(op).map_err(|e| e.to_string())?;
        let mut running = Vec::new();
        for child in children.into_iter().filter(|c| !c.status.is_final()) {
            let Some((_, task)) = child.parent else {
                continue;
            };
            if let Some(only) = only {
                let step = tasks.iter().find(|t| t.task_no == task).map(|t| &t.step);
                if !step.is_some_and(|s| only.contains(s)) {
                    continue;
                }
            }
            let ended = ops::cancel(
                store,
                child.id,
                Some(format!("its parent op {op} no longer needs it")),
                options.clone(),
                options.grace + std::time::Duration::from_secs(5),
                progress.clone(),
            )
            .await;
            let failure = match ended {
                Ok(ops::CancelEnd::Requested { owner }) => {
                    format!("op {} is still run by {owner}", child.id)
                }
                Ok(_) => continue,
                Err(e) => format!("op {} could not be canceled: {e}", child.id),
            };
            let _ = store
                .apply(vec![store::Change::Event {
                    op,
                    at: crate::owner::now(),
                    kind: "child-not-canceled",
                    task: None,
                    message: failure.clone(),
                }])
                .await;
            running.push(failure);
        }
        if running.is_empty() {
            Ok(())
        } else {
            Err(running.join("; "))
        }
    })
}

type Boxed<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;

/// Files of a bundle, by key.
pub(crate) type Files = Arc<BTreeMap<String, String>>;
