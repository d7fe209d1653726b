//! Resuming with an edited plan (`resume --plan`): [`plan_drift`] compares it with the op's
//! snapshot and refuses what is not allowed; `renumber` maps the op's tasks to the new plan.

use plans::model::Plan;
use serde_json::Map;
use serde_json::Value;
use store::Change;
use store::NewTask;
use store::OpId;
use store::ProcessId;
use store::Reader;
use store::Store;
use store::TaskNo;

use super::{Error, capture_env, children, read_op, snapshot_plan, whoami};
use crate::options::Options;
use crate::owner::now;
use crate::progress::Sink;
use crate::task::context::with_hooks;

/// An edited plan to resume an op with (`resume --plan FILE`).
#[derive(Debug, Clone)]
pub struct Replan {
    pub plan: Plan,
    /// Its sub-plans, read from the op's directory.
    pub files: Vec<(String, String)>,
    /// `--accept-plan-change`: without it, the diff is shown and nothing changes.
    pub accept: bool,
    /// `--rerun-changed`: changed steps that already succeeded run again, with what is downstream.
    pub rerun_changed: bool,
}

/// How an edited plan differs from an op's snapshot.
#[derive(Debug, Clone, Default)]
pub struct PlanDrift {
    pub drift: plans::drift::Drift,
    /// Changed or removed steps that had already succeeded or been skipped.
    pub kept_changed: Vec<String>,
    /// The op's params, read again for the new plan (its new defaults filled in).
    pub params: Map<String, Value>,
}

/// Compares an edited plan with the op's snapshot; refuses what `replan` does not allow: any
/// change without `accept`, a change to done work without `rerun_changed`, params that the new
/// plan does not take. A removed step that had run cannot run again: it is refused either way.
pub fn plan_drift(reader: &Reader, op: OpId, replan: &Replan) -> Result<PlanDrift, Error> {
    let old = snapshot_plan(reader, op)?;
    let snapshot = reader.snapshot(op)?;
    let row = read_op(reader, op)?;
    let mut drift = plans::drift::diff(&old, &replan.plan);
    // A `plan:` step whose sub-plan's text changed changed too.
    for (i, path) in replan.plan.sub_plans() {
        let key = plans::bundle::sub_plan_key(&row.workdir, path);
        let before = snapshot
            .files
            .iter()
            .find(|(k, _)| k == &key)
            .map(|(_, t)| t);
        let after = replan.files.iter().find(|(k, _)| k == &key).map(|(_, t)| t);
        let id = &replan.plan.steps[i].id;
        if before != after && old.step_index(id).is_some() {
            if !drift.changed.contains(id) {
                drift.changed.push(id.clone());
            }
            drift
                .step_fields
                .entry(id.clone())
                .or_default()
                .push(plans::drift::FieldChange {
                    path: format!("{path} (the sub-plan's text)"),
                    old: before.map(|t| Value::String(t.clone())),
                    new: after.map(|t| Value::String(t.clone())),
                });
        }
    }
    let tasks = reader.tasks(op)?;
    let children = reader.children(op)?;
    // Done work: a task of the step (its own, or an item) that succeeded, or a child op it ran.
    let kept = |id: &str| {
        tasks.iter().any(|t| {
            t.step == id
                && (t.status.is_kept()
                    || children.iter().any(|c| c.parent == Some((op, t.task_no))))
        })
    };
    let kept_changed: Vec<String> = drift
        .changed
        .iter()
        .chain(&drift.removed)
        .filter(|id| kept(id))
        .cloned()
        .collect();
    let diff = drift.render();
    if drift.is_empty() {
        return Err(Error::Refused(
            "the plan given is the op's plan: nothing changed; resume without `--plan`".to_owned(),
        ));
    }
    if !replan.accept {
        return Err(Error::Refused(format!(
            "the plan differs from op {op}'s:\n{diff}add `--accept-plan-change` to resume with it"
        )));
    }
    let removed_done: Vec<&String> = drift.removed.iter().filter(|id| kept(id)).collect();
    if !kept_changed.is_empty() && !replan.rerun_changed || !removed_done.is_empty() {
        let list: Vec<String> = kept_changed.iter().map(|s| format!("`{s}`")).collect();
        let hint = if removed_done.is_empty() {
            "; add `--rerun-changed` to run them (and what is downstream of them) again"
        } else {
            "; a removed step cannot run again: put it back, or start a new op"
        };
        return Err(Error::Refused(format!(
            "the plan changes steps of op {op} that already ran: {}\n{diff}refused{hint}",
            list.join(", ")
        )));
    }
    if drift.settings.iter().any(|k| k == "lock") {
        return Err(Error::Refused(format!(
            "the plan's `lock` changed:\n{diff}an op keeps the lock it was submitted with; start a new op"
        )));
    }
    // The op's params for the new plan, as stored: its values for the params the plan still
    // has, the new params' defaults.
    let given: Map<String, Value> = row.params.as_object().cloned().unwrap_or_default();
    let mut params = Map::new();
    let mut missing = Vec::new();
    for param in &replan.plan.params {
        match (given.get(&param.name), &param.default) {
            (Some(value), _) => {
                params.insert(param.name.clone(), value.clone());
            }
            (None, _) if param.secret => missing.push(format!("`{}` (a new secret)", param.name)),
            (None, Some(default)) => {
                params.insert(param.name.clone(), default.clone());
            }
            (None, None) if param.required => missing.push(format!("`{}`", param.name)),
            (None, None) => {}
        }
    }
    if !missing.is_empty() {
        return Err(Error::Refused(format!(
            "the new plan needs params op {op} was not given: {}; start a new op",
            missing.join(", ")
        )));
    }
    Ok(PlanDrift {
        drift,
        kept_changed,
        params,
    })
}

/// Old task number → new for every task of an op moving to `new` (its steps and hooks), and the
/// tasks of the steps `new` adds. Steps and hooks keep their ids; fan-out items, and tasks of
/// steps the plan no longer has (kept as history), follow them.
fn renumber(
    rows: &[store::TaskRow],
    old: &[plans::model::Step],
    new: &[plans::model::Step],
    new_steps: usize,
) -> (Vec<(TaskNo, TaskNo)>, Vec<NewTask>) {
    let no = |i: usize| TaskNo(u32::try_from(i).unwrap_or(u32::MAX));
    let mut map = Vec::with_capacity(rows.len());
    let mut taken = std::collections::HashSet::new();
    let mut next = new.len();
    let index: std::collections::HashMap<&str, usize> = new
        .iter()
        .enumerate()
        .map(|(j, s)| (s.id.as_str(), j))
        .collect();
    for row in rows {
        let i = row.task_no.0 as usize;
        let own = i < old.len() && old[i].id == row.step && row.name == row.step;
        if let Some(&j) = index.get(row.step.as_str()).filter(|_| own) {
            taken.insert(j);
            map.push((row.task_no, no(j)));
        } else {
            map.push((row.task_no, no(next)));
            next += 1;
        }
    }
    let added = (0..new_steps)
        .filter(|j| !taken.contains(j))
        .map(|j| NewTask {
            task_no: no(j),
            step: new[j].id.clone(),
            name: new[j].id.clone(),
            item: None,
        })
        .collect();
    (map, added)
}

/// An op taken over, with what its edits at a resume need: an edited plan ([`TakenOver::replan`])
/// and new params (`TakenOver::set_params`).
pub(super) struct TakenOver<'a> {
    pub store: &'a Store,
    pub reader: &'a Reader,
    pub row: &'a store::OpRow,
    pub me: &'a ProcessId,
    pub options: &'a Options,
    pub progress: &'a Sink,
}

impl TakenOver<'_> {
    /// Moves the op from `plan` to `replan`'s plan: its tasks renumbered, what `--rerun-changed`
    /// runs again reset, in one transaction; `params` gets the new plan's defaults. Returns the
    /// new plan.
    pub(super) async fn replan(
        &self,
        plan: &Plan,
        replan: Replan,
        drift: PlanDrift,
        params: &mut Map<String, Value>,
    ) -> Result<Plan, Error> {
        let Replan {
            plan: new, files, ..
        } = replan;
        let op = self.row.id;
        let (old_steps, _) = with_hooks(plan);
        let (new_steps, _) = with_hooks(&new);
        let rows = self.reader.tasks(op)?;
        let (renumber, tasks) = renumber(&rows, &old_steps, &new_steps, new.steps.len());
        let diff = drift.drift.summary();
        // `--rerun-changed`: what runs again is reset in the same transaction as the new plan.
        let mut again: Vec<usize> = Vec::new();
        for id in &drift.kept_changed {
            if let Some(i) = new.step_index(id) {
                again.extend(new.dag.downstream(i));
            }
        }
        again.sort_unstable();
        again.dedup();
        let mut reset: Vec<TaskNo> = Vec::new();
        if !again.is_empty() {
            let ids: Vec<String> = again.iter().map(|&i| new.steps[i].id.clone()).collect();
            children::cancel_children(
                self.store,
                self.me,
                op,
                Some(&ids),
                self.options,
                self.progress,
            )
            .await
            .map_err(|e| {
                Error::Refused(format!("a sub-plan of the changed steps still runs: {e}"))
            })?;
            for (row, (_, to)) in rows.iter().zip(&renumber) {
                let own = (to.0 as usize) < new.steps.len();
                if ids.contains(&row.step) && (own || (row.name != row.step && row.item.is_some()))
                {
                    reset.push(*to);
                }
            }
            let (_, hooks) = with_hooks(&new);
            reset.extend(
                hooks
                    .on_success
                    .iter()
                    .chain(&hooks.on_failure)
                    .chain(&hooks.on_cancel)
                    .map(|&i| TaskNo(u32::try_from(i).unwrap_or(u32::MAX))),
            );
        }
        let mut env = self.row.env.clone();
        for (name, value) in capture_env(&new) {
            env.entry(name).or_insert(Value::String(value));
        }
        let mut batch = vec![Change::Replan {
            op,
            owner: self.me.clone(),
            snapshot: store::Snapshot {
                hash: plans::bundle::hash(&new.text, &files),
                name: new.name.clone(),
                text: new.text.clone(),
                files,
            },
            renumber,
            tasks,
            at: now(),
            message: format!(
                "resumed with an edited plan, accepted by {}: {}",
                whoami(),
                diff.lines().map(str::trim).collect::<Vec<_>>().join("; ")
            ),
            params: Value::Object(drift.params.clone()),
            env,
        }];
        if !reset.is_empty() {
            batch.push(Change::ResetTasks {
                op,
                owner: self.me.clone(),
                tasks: reset,
                at: now(),
                message: format!(
                    "run again: changed in the plan, as asked by {}: {}",
                    whoami(),
                    drift.kept_changed.join(", ")
                ),
            });
        }
        self.store.apply(batch).await?;
        // New defaults fill in; secrets stay as they were given.
        for (name, value) in drift.params {
            params.entry(name).or_insert(value);
        }
        Ok(new)
    }
}
