//! Sub-plans: a `plan:` step runs another plan as a child op, linked to the step's task.
//!
//! - [`load`]: at submit, the plan's sub-plans (and theirs) are read and stored in its snapshot,
//!   keyed by absolute path (`plans::bundle`); a child op's snapshot is the same bundle with the
//!   child's text, so every op of the tree finds its sub-plans from its own directory, never from
//!   disk.
//! - `SubPlans`: the op layer's side of `task::subplan::Children`: a `plan:` task's child op is
//!   submitted and run, or resumed, as any op is, owned by the same process; `cancel_children`.
//! - `lineage`: the ops above a child, and the lock keys they hold.

use std::collections::BTreeMap;
use std::path::Path;

use plans::model::Plan;
use store::{OpId, Reader, Store, TaskNo};

use super::{Error, NewRun, Overrides};
use crate::options::Options;
use crate::outcome::RunEnd;
use crate::progress::Sink;
use crate::shutdown::StopHandle;
use crate::task::context::Shared;
use crate::task::subplan::{Boxed, ChildRun, Children};

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
            None => super::input::read_text(std::path::Path::new(&key)).map_err(|e| {
                Error::SubPlan(format!(
                    "step `{}` of plan `{}` runs `{key}`, which cannot be read: {}",
                    plan.steps[step].id, plan.name, e.failure
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
        let row = reader.op_head(op)?;
        ops.push(op);
        locks.extend(row.lock_key.clone());
        parent = row.parent;
    }
    Ok((ops, locks))
}

/// Cancels `op`'s child ops that have not ended (those run by the steps named in `only`, or all),
/// with their own `on_cancel` hooks. Children that could not be canceled, or whose live owner
/// (another process) has not ended them yet, are named in the error and in `op`'s events, written
/// by `owner`, the process that owns `op` (fenced: one that lost it writes nothing more).
pub(crate) fn cancel_children<'a>(
    store: &'a Store,
    owner: &'a store::ProcessId,
    op: OpId,
    only: Option<&'a [String]>,
    options: &'a Options,
    progress: &'a Sink,
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
            let ended = super::cancel(
                store,
                child.id,
                (
                    super::whoami(),
                    Some(format!("its parent op {op} no longer needs it")),
                ),
                None,
                options.clone(),
                options.grace + std::time::Duration::from_secs(5),
                progress.clone(),
            )
            .await;
            let failure = match ended {
                Ok(super::CancelEnd::Requested { owner }) => {
                    format!("op {} is still run by {owner}", child.id)
                }
                Ok(_) => continue,
                Err(e) => format!("op {} could not be canceled: {e}", child.id),
            };
            let _ = store
                .apply(vec![store::Change::Event {
                    op,
                    owner: Some(owner.clone()),
                    at: crate::owner::now(),
                    kind: store::EventKind::ChildNotCanceled,
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

/// The op layer's [`Children`]: a child op runs as any op does, owned by the parent's process.
#[derive(Debug)]
pub(crate) struct SubPlans;

impl Children for SubPlans {
    fn start<'a>(
        &'a self,
        parent: &'a Shared,
        task: TaskNo,
        new: ChildRun,
        stop: StopHandle,
        progress: Sink,
    ) -> Boxed<'a, Result<(OpId, RunEnd), String>> {
        let new = NewRun {
            workdir: new.workdir,
            env: parent.env.clone(),
            files: parent
                .files
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            parent: Some((parent.op, task)),
            plan: new.plan,
            params: new.params,
        };
        Box::pin(async move {
            super::run(
                &parent.store,
                new,
                parent.options.clone(),
                child_overrides(),
                progress,
                stop,
            )
            .await
            .map_err(|e| e.to_string())
        })
    }

    fn resume<'a>(
        &'a self,
        parent: &'a Shared,
        op: OpId,
        stop: StopHandle,
        progress: Sink,
    ) -> Boxed<'a, Result<RunEnd, String>> {
        Box::pin(async move {
            super::resume(
                &parent.store,
                op,
                super::Edits::default(),
                parent.options.clone(),
                child_overrides(),
                progress,
                stop,
            )
            .await
            .map_err(|e| e.to_string())
        })
    }

    fn cancel<'a>(
        &'a self,
        store: &'a Store,
        owner: &'a store::ProcessId,
        op: OpId,
        only: Option<&'a [String]>,
        options: &'a Options,
        progress: &'a Sink,
    ) -> Boxed<'a, Result<(), String>> {
        cancel_children(store, owner, op, only, options, progress)
    }
}

/// What a sub-plan's op may do that a person's `run` may not: start while paused (its parent
/// already runs). Like a `run`, it waits for a lock another op holds (siblings of a fan-out that
/// share a lock key take turns).
fn child_overrides() -> Overrides {
    Overrides {
        no_wait: false,
        ignore_cooldown: false,
        ignore_pause: true,
        requeue: false,
    }
}
