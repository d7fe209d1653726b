//! The rules of fan-out steps and sub-plans: a step's list expanded once into item tasks, the
//! step's gathered end, tasks added while an op runs, and a task's child op detached.

use super::{Tx, event, events, fence};
use crate::error::{Error, Result};
use crate::types::{Change, EventKind, Millis, NewTask, OpId, OpStatus, TaskNo, TaskStatus};

/// Applies a fan-out change (see [`super::apply`] for which).
pub(crate) fn apply<T: Tx>(tx: &mut T, change: &Change) -> Result<()> {
    match change {
        Change::Expand {
            op,
            owner,
            task,
            items,
            tasks,
            at,
        } => {
            fence(tx, *op, owner)?;
            expand(tx, *op, *task, items, tasks, *at)
        }
        Change::Gather {
            op,
            owner,
            task,
            status,
            outputs,
            error,
            at,
        } => {
            fence(tx, *op, owner)?;
            let ended = (*status != TaskStatus::Pending).then_some(*at);
            let outputs = outputs
                .as_ref()
                .map(|o| serde_json::Value::Object(o.clone()).to_string());
            let name = tx.gather_task(
                *op,
                *task,
                *status,
                ended,
                error.as_deref(),
                outputs.as_deref(),
            )?;
            let (kind, message) = events::gathered(*status, error.as_deref());
            event(tx, *op, *at, kind, Some(&name), &message)
        }
        Change::AddTasks { op, owner, tasks } => {
            fence(tx, *op, owner)?;
            tx.insert_tasks(*op, tasks)
        }
        Change::DetachChild {
            op,
            owner,
            task,
            at,
            message,
        } => {
            fence(tx, *op, owner)?;
            tx.detach_child(*op, *task)?;
            let name = tx.task_name(*op, *task)?;
            event(tx, *op, *at, EventKind::TaskChild, Some(&name), message)
        }
        _ => unreachable!("not a fan-out change: {change:?}"),
    }
}

/// Expands a fan-out step into its items' tasks. The list is frozen once: a step expanded before
/// keeps its items. Items of an earlier expansion keep their task when their name comes again;
/// the others stay as history, no longer items (those still pending are skipped).
fn expand<T: Tx>(
    tx: &mut T,
    op: OpId,
    task: TaskNo,
    items: &[serde_json::Value],
    tasks: &[NewTask],
    at: Millis,
) -> Result<()> {
    if !tx.unexpanded(op, task)? {
        return Err(Error::Conflict {
            op,
            status: OpStatus::Running,
            reason: format!("task {} was already expanded into its items", task.0),
        });
    }
    // Written straight from the items: no copy of a list that may hold a million.
    let list = serde_json::to_string(items).expect("JSON values always serialize");
    // Only a step expanded before (and rerun) has earlier items to unlink: on the first
    // expansion there is nothing to compare the new items with.
    let earlier = tx.has_items(op, task)?;
    let name = tx.freeze_list(op, task, &list, at)?;
    drop(list);
    tx.upsert_items(op, tasks)?;
    if earlier {
        let mut numbers = String::with_capacity(tasks.len() * 8 + 2);
        numbers.push('[');
        for (i, t) in tasks.iter().enumerate() {
            if i > 0 {
                numbers.push(',');
            }
            numbers.push_str(&t.task_no.0.to_string());
        }
        numbers.push(']');
        tx.drop_other_items(op, task, &numbers)?;
    }
    let (kind, message) = events::expanded(tasks);
    event(tx, op, at, kind, Some(&name), &message)
}
