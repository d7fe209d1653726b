//! New values for an op's params on resume (`resume --param`): [`param_changes`] says what they
//! change and refuses a value that work already done used (unless it is to run again);
//! `TakenOver::set_params` stores them with the tasks that run again, in one transaction.

use plans::model::Plan;
use serde_json::{Map, Value};
use store::{Change, Reader, TaskNo};

use super::replan::TakenOver;
use super::{Error, children, read_op, snapshot_plan, whoami};
use crate::owner::now;
use crate::secrets;
use crate::task::context::with_hooks;

/// New values for some of an op's params, read as the types of the op's plan.
#[derive(Debug, Clone)]
pub struct NewParams {
    pub values: Map<String, Value>,
    /// `--rerun-changed`: steps that already ran with an old value run again, with what is
    /// downstream of them.
    pub rerun_changed: bool,
}

/// What new params change.
#[derive(Debug, Clone, Default)]
pub struct ParamChanges {
    /// The params whose value changes, with their new values (in clear).
    pub values: Map<String, Value>,
    /// The secret ones among them.
    pub secret: Vec<String>,
    /// One line per param, for its `param-changed` event: the old and new values (secrets as
    /// `********`) and the steps that run again.
    pub lines: Vec<String>,
    /// The steps that already ran with an old value (by index): they run again, with what is
    /// downstream of them.
    pub used: Vec<usize>,
}

/// A param's value as the events show it.
fn shown(value: Option<&Value>, secret: bool) -> String {
    match value {
        None => "(none)".to_owned(),
        Some(_) if secret => "********".to_owned(),
        Some(Value::String(s)) => format!("`{s}`"),
        Some(other) => format!("`{other}`"),
    }
}

/// What `new` changes of op `op`'s params. Refused when a step that already ran (succeeded or was
/// skipped) used a changed param, unless `new.rerun_changed`: the refusal names each such param
/// and its steps.
pub fn param_changes(
    reader: &Reader,
    op: store::OpId,
    new: &NewParams,
) -> Result<ParamChanges, Error> {
    let plan = snapshot_plan(reader, op)?;
    let row = read_op(reader, op)?;
    let stored = row.params.as_object().cloned().unwrap_or_default();
    let tasks = reader.tasks(op)?;
    let mut changes = ParamChanges::default();
    let mut refusals = Vec::new();
    for (name, value) in &new.values {
        let old = stored.get(name);
        let secret =
            plan.param(name).is_some_and(|p| p.secret) || old.is_some_and(secrets::is_sealed);
        // A sealed value cannot be compared here: a secret given is a change.
        if !secret && old == Some(value) {
            continue;
        }
        let mut used: Vec<usize> = (0..plan.steps.len())
            .filter(|&i| plan.steps[i].params.iter().any(|p| p == name))
            .filter(|&i| {
                tasks
                    .iter()
                    .any(|t| t.step == plan.steps[i].id && t.status.is_kept())
            })
            .collect();
        if !used.is_empty() && !new.rerun_changed {
            let steps: Vec<String> = used
                .iter()
                .map(|&i| format!("`{}`", plan.steps[i].id))
                .collect();
            refusals.push(format!("`{name}` (used by {})", steps.join(", ")));
        }
        let again = if used.is_empty() {
            String::new()
        } else {
            let steps: Vec<&str> = used.iter().map(|&i| plan.steps[i].id.as_str()).collect();
            format!("; run again: {}", steps.join(", "))
        };
        changes.lines.push(format!(
            "param `{name}` changed by {}: {} → {}{again}",
            whoami(),
            shown(old, secret),
            shown(Some(value), secret)
        ));
        changes.values.insert(name.clone(), value.clone());
        if secret {
            changes.secret.push(name.clone());
        }
        changes.used.append(&mut used);
    }
    if !refusals.is_empty() {
        return Err(Error::Refused(format!(
            "op {op}: steps that already ran used the params to change: {}; add `--rerun-changed` to run them (and what is downstream of them) again with the new values",
            refusals.join(", ")
        )));
    }
    changes.used.sort_unstable();
    changes.used.dedup();
    Ok(changes)
}

impl TakenOver<'_> {
    /// Stores `changes` (secrets sealed) and resets the steps that used an old value, what is
    /// downstream of them and the finishing hooks, in one transaction; updates `params` (in
    /// clear) and `sealed` (the names of the params stored sealed).
    pub(super) async fn set_params(
        &self,
        plan: &Plan,
        changes: &ParamChanges,
        params: &mut Map<String, Value>,
        sealed: &mut Vec<String>,
    ) -> Result<(), Error> {
        let op = self.row.id;
        let key = if changes.secret.is_empty() {
            None
        } else {
            Some(
                secrets::key(self.store, true)?.ok_or_else(|| secrets::Error::Key {
                    path: self.store.secret_key_file(),
                    reason: "it could not be created".into(),
                })?,
            )
        };
        let mut stored = self.row.params.as_object().cloned().unwrap_or_default();
        for (name, value) in &changes.values {
            let kept = match (&key, changes.secret.contains(name)) {
                (Some(key), true) => secrets::seal_value(value, key),
                _ => value.clone(),
            };
            stored.insert(name.clone(), kept);
            params.insert(name.clone(), value.clone());
            if changes.secret.contains(name) && !sealed.contains(name) {
                sealed.push(name.clone());
            }
        }
        let mut again: Vec<usize> = Vec::new();
        for &i in &changes.used {
            again.extend(plan.dag.downstream(i));
        }
        again.sort_unstable();
        again.dedup();
        let ids: Vec<String> = again.iter().map(|&i| plan.steps[i].id.clone()).collect();
        let mut reset: Vec<TaskNo> = Vec::new();
        if !again.is_empty() {
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
                Error::Refused(format!(
                    "a sub-plan of the steps to run again still runs: {e}"
                ))
            })?;
            reset.extend(
                self.reader
                    .tasks(op)?
                    .iter()
                    .filter(|t| ids.contains(&t.step))
                    .map(|t| t.task_no),
            );
            let (_, hooks) = with_hooks(plan);
            reset.extend(
                hooks
                    .on_success
                    .iter()
                    .chain(&hooks.on_failure)
                    .chain(&hooks.on_cancel)
                    .map(|&i| TaskNo(u32::try_from(i).unwrap_or(u32::MAX))),
            );
        }
        let mut batch = vec![Change::SetParams {
            op,
            owner: self.me.clone(),
            params: Value::Object(stored),
            env: self.row.env.clone(),
            at: now(),
            messages: changes.lines.clone(),
        }];
        if !reset.is_empty() {
            batch.push(Change::ResetTasks {
                op,
                owner: self.me.clone(),
                tasks: reset,
                at: now(),
                message: format!(
                    "run again with changed params, as asked by {}: {}",
                    whoami(),
                    ids.join(", ")
                ),
            });
        }
        self.store.apply(batch).await?;
        Ok(())
    }
}
