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
    let list = serde_json::Value::Array(items.to_vec()).to_string();
    let name = tx.freeze_list(op, task, &list, at)?;
    tx.upsert_items(op, tasks)?;
    let numbers = serde_json::Value::Array(
        tasks
            .iter()
            .map(|t| serde_json::Value::from(t.task_no.0))
            .collect(),
    )
    .to_string();
    tx.drop_other_items(op, task, &numbers)?;
    let (kind, message) = events::expanded(tasks);
    event(tx, op, at, kind, Some(&name), &message)
}
