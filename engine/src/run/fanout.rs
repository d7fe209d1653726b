//! Fan-out steps (`for_each`): the list, the items' names, the expansion into items' tasks, the
//! items' launches, and the gathering of their ends into the step's own.
//!
//! - `fan_out_list`, `as_list`, `item_names`, `gather`: pure functions of the list and the items.
//! - [`Scheduler::fan_out`], [`Scheduler::launch_items`], [`Scheduler::gather_ended`]: the
//!   scheduler's fan-out transitions.

use std::collections::{BTreeMap, HashSet, VecDeque};

use plans::model::{ForEach, Plan, Step};
use plans::template::Context;
use serde_json::{Map, Value};
use store::{Change, NewTask, TaskNo, TaskStatus};

use super::scheduler::{Counted, Item, Scheduler, TaskState};
use crate::owner::now;
use crate::task::carry::Carry;
use crate::task::{self, Job, TaskEnd};

impl Scheduler {
    /// Fan-out step `i` is ready: expanded before (its items that are not done run), expanded now
    /// (its list evaluated, its items' tasks stored), or failed (its list cannot be evaluated).
    /// `false` when its `when` is false or cannot be evaluated: its own task then runs, only to be
    /// skipped or to fail with the reason.
    pub(super) fn fan_out(
        &mut self,
        plan: &Plan,
        i: usize,
        job: &Job,
        outputs: &[(usize, Map<String, Value>)],
    ) -> bool {
        let step = &plan.steps[i];
        if self.tasks[i].item.is_some() {
            // Expanded before (the list is frozen): its items that are not done run.
            self.open.insert(i);
            return true;
        }
        let ctx = self.shared.context(step, outputs);
        let prior = self.tasks[i].attempts;
        match fan_out_list(step, &ctx) {
            Ok(None) => false,
            Err(error) => {
                let counted = Counted::new(&self.shared);
                let job = job.clone();
                self.in_flight.insert(i);
                self.running.spawn(async move {
                    let shared = counted.shared();
                    (
                        i,
                        task::fail_before_start(shared, &job, prior + 1, error).await,
                    )
                });
                true
            }
            Ok(Some(list)) => {
                self.expand(step, i, job, list);
                true
            }
        }
    }

    /// Expands fan-out step `i` into the tasks of `list`'s items, stored in one change.
    fn expand(&mut self, step: &Step, i: usize, job: &Job, list: Vec<Value>) {
        // Its items are numbered after every task of the op: all must be read.
        if !self.rest_read() {
            let why = "a fan-out was to be expanded before every task was read".to_owned();
            self.fail_fatally(crate::task::Fatal::Store(why));
            return;
        }
        // After a rerun, an item named as before keeps its task (and history); earlier items not
        // in the list any more stay as history only.
        let mut earlier: BTreeMap<String, usize> = self
            .items_of
            .remove(&i)
            .unwrap_or_default()
            .into_iter()
            .map(|no| (self.tasks[no].name.clone(), no))
            .collect();
        // Items of expansions before the last (history) come back under their name too, so that
        // a name is never given to two tasks.
        let prefix = format!("{}[", step.id);
        for (no, t) in self.tasks.iter().enumerate().skip(self.shared.steps.len()) {
            if t.step.is_none() && t.name.starts_with(&prefix) {
                earlier.entry(t.name.clone()).or_insert(no);
            }
        }
        let names = item_names(&step.id, &list);
        let mut new = Vec::with_capacity(list.len());
        let mut numbers = Vec::with_capacity(list.len());
        let mut reused = HashSet::new();
        for (name, item) in names.into_iter().zip(&list) {
            let no = if let Some(&no) = earlier.get(&name) {
                reused.insert(no);
                let t = &mut self.tasks[no];
                if t.step.is_none() {
                    // History that comes back runs again, in a fresh round.
                    t.status = TaskStatus::Pending;
                    t.outputs = None;
                    t.retry_from = t.attempts;
                }
                t.step = Some(i);
                t.item = Some(Item::Evaluated(item.clone()));
                no
            } else {
                self.tasks.push(TaskState::new(
                    i,
                    name.clone(),
                    Some(Item::Evaluated(item.clone())),
                ));
                self.tasks.len() - 1
            };
            new.push(NewTask {
                task_no: TaskNo(u32::try_from(no).unwrap_or(u32::MAX)),
                step: step.id.clone(),
                name,
                item: Some(item.clone()),
            });
            numbers.push(no);
        }
        for (_, no) in earlier {
            if !reused.contains(&no) && self.tasks[no].step.is_some() {
                let t = &mut self.tasks[no];
                t.step = None;
                if t.status == TaskStatus::Pending {
                    t.status = TaskStatus::Skipped;
                }
            }
        }
        self.items_of.insert(i, numbers);
        // Only whether the step was expanded is asked of its own task's `item`: the list itself
        // goes to the store, not a second copy of it (a list may hold a million items).
        self.tasks[i].item = Some(Item::Evaluated(Value::Array(Vec::new())));
        let change = Change::Expand {
            op: self.shared.op,
            owner: self.shared.me.clone(),
            task: job.task(),
            items: list,
            tasks: new,
            at: now(),
        };
        let counted = Counted::new(&self.shared);
        self.in_flight.insert(i);
        self.running.spawn(async move {
            let shared = counted.shared();
            let end = shared.apply(vec![change]).await.map(|()| TaskEnd::Expanded);
            (i, end)
        });
    }

    /// Launches the items of expanded fan-out steps, within the op's and each step's
    /// `max_parallel`.
    pub(super) fn launch_items(&mut self, plan: &Plan, launching: bool) {
        for &s in &self.open {
            let queue = self.queued.entry(s).or_insert_with(|| {
                self.items_of
                    .get(&s)
                    .into_iter()
                    .flatten()
                    .copied()
                    .filter(|&no| !self.tasks[no].status.is_kept())
                    .collect()
            });
            let limit = plan.steps[s]
                .max_parallel
                .map_or(usize::MAX, |m| usize::try_from(m).unwrap_or(usize::MAX));
            let count = self.busy.entry(s).or_insert(0);
            while launching && self.running.len() < self.max && *count < limit {
                let Some(no) = queue.pop_front() else { break };
                let Some(job) = self.tasks[no].job(no) else {
                    continue;
                };
                // Every item of a step has the same context but for `item`: built once per
                // step, and cloned (cheaply: its values are shared) for each item that renders
                // anything (an item's `when` is its step's, already evaluated).
                let ctx = if plan.steps[s].action.renders() {
                    let tasks = &self.tasks;
                    let shared = &self.shared;
                    self.step_contexts
                        .entry(s)
                        .or_insert_with(|| {
                            let outputs: Vec<(usize, Map<String, Value>)> = plan.steps[s]
                                .uses
                                .iter()
                                .filter_map(|&u| tasks[u].outputs.clone().map(|o| (u, o)))
                                .collect();
                            shared.context(&plan.steps[s], &outputs)
                        })
                        .clone()
                } else {
                    Context::new()
                };
                let round = self.tasks[no].round();
                *count += 1;
                self.in_flight.insert(no);
                self.tasks[no].launched = true;
                let counted = Counted::new(&self.shared);
                self.running.spawn(async move {
                    let shared = counted.shared();
                    let stop = shared.stop_signal().clone();
                    let end = task::run(shared, &job, round, ctx, &stop, &mut Carry::none()).await;
                    (no, end)
                });
            }
        }
    }

    /// A fan-out step whose items have all ended (or will not start now) gathers them: its own
    /// task's end, from theirs.
    pub(super) fn gather_ended(&mut self, plan: &Plan, launching: bool) {
        let ended: Vec<usize> = self
            .open
            .iter()
            .copied()
            .filter(|s| {
                // Only once every item is known (see `rest`).
                self.rest_read()
                    && self.busy.get(s).copied().unwrap_or(0) == 0
                    && (!launching || self.queued.get(s).is_none_or(VecDeque::is_empty))
            })
            .collect();
        for s in ended {
            self.open.remove(&s);
            self.queued.remove(&s);
            self.busy.remove(&s);
            let items = self.items_of.get(&s).map_or(&[][..], Vec::as_slice);
            let (status, outputs, error) = gather(&self.tasks, items, &plan.steps[s]);
            let change = Change::Gather {
                op: self.shared.op,
                owner: self.shared.me.clone(),
                task: TaskNo(u32::try_from(s).unwrap_or(u32::MAX)),
                status,
                outputs: outputs.clone(),
                error: error.clone(),
                at: now(),
            };
            let counted = Counted::new(&self.shared);
            self.in_flight.insert(s);
            self.running.spawn(async move {
                let shared = counted.shared();
                let end = shared.apply(vec![change]).await.map(|()| {
                    if status == TaskStatus::Pending {
                        TaskEnd::Interrupted
                    } else {
                        TaskEnd::Done {
                            status,
                            outputs,
                            error,
                        }
                    }
                });
                (s, end)
            });
        }
    }
}

/// The items of a fan-out step, from its `for_each`; `Ok(None)` when its `when` is false or cannot
/// be evaluated (the step's task then runs only to be skipped or to fail with the reason).
fn fan_out_list(step: &Step, ctx: &Context) -> Result<Option<Vec<Value>>, String> {
    if let Some(when) = &step.when
        && !matches!(when.is_true(ctx), Ok(true))
    {
        return Ok(None);
    }
    match &step.for_each {
        Some(ForEach::Items(items)) => Ok(Some(items.clone())),
        Some(ForEach::Expr(expr)) => {
            // Items are stored and shown: none may come from an output holding a secret.
            let remedy = "give the step the output in `env:` and loop over it in its script";
            let value = task::render_public(ctx, "`for_each`", remedy, |c| {
                expr.eval(c)
                    .map_err(|e| format!("cannot evaluate `for_each`: {e}"))
            })?;
            as_list(value).map(Some)
        }
        None => Ok(Some(Vec::new())),
    }
}

/// A `for_each` value as items: a list; text holding a JSON array; other text, one item per line.
fn as_list(value: Value) -> Result<Vec<Value>, String> {
    match value {
        Value::Array(items) => Ok(items),
        Value::String(text) => {
            let text = text.trim();
            if text.starts_with('[') {
                serde_json::from_str::<Vec<Value>>(text).map_err(|e| {
                    format!(
                        "`for_each` gave text that starts like a JSON array but is not one: {e}"
                    )
                })
            } else {
                Ok(text
                    .lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty())
                    .map(|l| Value::String(l.to_owned()))
                    .collect())
            }
        }
        other => Err(format!(
            "`for_each` must give a list, a JSON array or lines of text, not {}",
            match other {
                Value::Null => "nothing (null)",
                Value::Bool(_) => "a bool",
                Value::Number(_) => "a number",
                _ => "a map",
            }
        )),
    }
}

/// The longest item label in a task name; a longer one is replaced by the item's position.
const LABEL_MAX: usize = 32;

/// The task names of a fan-out's items: `restore[shard-3]`. An item is named by its text, or a
/// map by its `name`, `id`, `host` or `key` field; paths by their last part when those are unique
/// (`/srv/data/node-1` → `node-1`); otherwise, or when the label would be longer than
/// [`LABEL_MAX`], by its position (from 1). `show` has the whole item. Names are unique: a
/// repeated one gets its position too.
fn item_names(step: &str, items: &[Value]) -> Vec<String> {
    let scalar = |v: &Value| match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    };
    let texts: Vec<Option<String>> = items
        .iter()
        .map(|item| {
            match item {
                Value::Object(map) => ["name", "id", "host", "key"]
                    .iter()
                    .find_map(|f| map.get(*f).and_then(scalar)),
                other => scalar(other),
            }
            .map(|l| {
                l.chars()
                    .map(|c| if c.is_control() { '?' } else { c })
                    .collect::<String>()
            })
            .filter(|l| !l.is_empty())
        })
        .collect();
    let base = |text: &str| {
        text.rsplit('/')
            .find(|part| !part.is_empty())
            .map(ToOwned::to_owned)
    };
    let bases: Vec<Option<String>> = texts
        .iter()
        .map(|t| t.as_deref().filter(|t| t.contains('/')).and_then(base))
        .collect();
    let distinct = {
        let mut seen = std::collections::HashSet::new();
        bases.iter().flatten().all(|b| seen.insert(b))
    };
    let mut seen = std::collections::HashSet::new();
    texts
        .into_iter()
        .zip(bases)
        .enumerate()
        .map(|(k, (text, short))| {
            let label = if distinct { short.or(text) } else { text }
                .filter(|l| l.chars().count() <= LABEL_MAX)
                .unwrap_or_else(|| (k + 1).to_string());
            let mut name = format!("{step}[{label}]");
            let mut n = k + 1;
            while !seen.insert(name.clone()) {
                name = format!("{step}[{label}#{n}]");
                n += 1;
            }
            name
        })
        .collect()
}

/// A fan-out step's own outcome from its items': succeeded when every item is done, failed when
/// one failed, canceled, or pending (interrupted) otherwise. Outputs are lists in item order, one
/// entry per item (`null` where an item published nothing), for every key an item published or
/// the step declares.
fn gather(
    tasks: &[TaskState],
    items: &[usize],
    step: &Step,
) -> (TaskStatus, Option<Map<String, Value>>, Option<String>) {
    let failed: Vec<&str> = items
        .iter()
        .filter(|&&no| tasks[no].status == TaskStatus::Failed)
        .map(|&no| tasks[no].name.as_str())
        .collect();
    // Items that never got to run (the op stopped, or drained) leave the step undone when its
    // failures would not stop the op anyway: it must not count as satisfied.
    let unfinished = items.iter().any(|&no| {
        matches!(
            tasks[no].status,
            TaskStatus::Pending | TaskStatus::Running | TaskStatus::Waiting
        )
    });
    let status = if items.iter().all(|&no| tasks[no].status.is_kept()) {
        TaskStatus::Succeeded
    } else if !failed.is_empty() && (!unfinished || !step.continue_on_error) {
        TaskStatus::Failed
    } else if items
        .iter()
        .any(|&no| tasks[no].status == TaskStatus::Canceled)
    {
        TaskStatus::Canceled
    } else {
        TaskStatus::Pending
    };
    let error = (!failed.is_empty()).then(|| {
        let shown: Vec<&str> = failed.iter().take(5).copied().collect();
        format!(
            "{} of {} items failed: {}{}",
            failed.len(),
            items.len(),
            shown.join(", "),
            if failed.len() > shown.len() {
                ", ..."
            } else {
                ""
            }
        )
    });
    if !matches!(status, TaskStatus::Succeeded | TaskStatus::Failed) {
        return (status, None, error);
    }
    let mut keys: Vec<String> = step.outputs.clone().unwrap_or_default();
    for &no in items {
        for key in tasks[no].outputs.iter().flat_map(Map::keys) {
            if !keys.contains(key) {
                keys.push(key.clone());
            }
        }
    }
    let outputs = keys
        .into_iter()
        .map(|key| {
            let list = items
                .iter()
                .map(|&no| {
                    tasks[no]
                        .outputs
                        .as_ref()
                        .and_then(|o| o.get(&key))
                        .cloned()
                        .unwrap_or(Value::Null)
                })
                .collect();
            (key, Value::Array(list))
        })
        .collect();
    (status, Some(outputs), error)
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::item_names;

    #[test]
    fn item_names_are_short_and_unique() {
        let names = |items: Value| item_names("s", items.as_array().unwrap());
        assert_eq!(
            names(json!(["a", 3, {"host": "db-1"}, {"x": 1}])),
            ["s[a]", "s[3]", "s[db-1]", "s[4]"]
        );
        // Paths by their last part, when those are unique.
        assert_eq!(
            names(json!(["/srv/data/node-1/", "/srv/data/node-2"])),
            ["s[node-1]", "s[node-2]"]
        );
        assert_eq!(
            names(json!(["/a/data", "/b/data"])),
            ["s[/a/data]", "s[/b/data]"]
        );
        // Too long: the position.
        let long = "x".repeat(33);
        assert_eq!(names(json!([long, "b"])), ["s[1]", "s[b]"]);
        // Repeated: the position too.
        assert_eq!(names(json!(["a", "a"])), ["s[a]", "s[a#2]"]);
    }
}
