//! The rules of an op's life: submit, claim (who may own it), heartbeat, its status and ending,
//! cancel, a task marked by hand, tasks reset for a rerun, a replan, and plain notes.
//!
//! - [`submit`]: a new op, its tasks, a schedule's firing taken once, a parent's link, a start.
//! - [`apply`]: every other op change, each in its own function below.

use super::{Tx, event, events, fence, locks, owner_of};
use crate::error::{Error, Result};
use crate::types::{
    Applied, Change, EventKind, Interruption, Millis, NewOp, OpId, OpStatus, ProcessId, Request,
    Snapshot, TaskNo, TaskStatus,
};

/// Applies an op change (see [`super::apply`] for which).
pub(crate) fn apply<T: Tx>(tx: &mut T, change: &Change) -> Result<()> {
    match change {
        Change::Claim {
            op,
            owner,
            lease_until,
            dead_owner,
            now,
            queued,
            reopen,
            kind,
            message,
        } => {
            let claim = Claim {
                owner,
                dead_owner: dead_owner.as_ref(),
                now: *now,
                reopen: *reopen,
            };
            claim_op(tx, *op, &claim)?;
            if *queued {
                tx.set_owner(*op, owner, *lease_until)
            } else {
                tx.run_claimed(*op, owner, *lease_until, *now)?;
                // What it waited for (a lock, a pause) is over.
                tx.set_current_task(*op, None)?;
                event(tx, *op, *now, *kind, None, message)
            }
        }
        Change::Heartbeat {
            op,
            owner,
            lease_until,
        } => {
            fence(tx, *op, owner)?;
            tx.set_lease(*op, *lease_until)
        }
        Change::SetOp { .. } => set_op(tx, change),
        Change::Park {
            op,
            owner,
            gates,
            at,
            message,
        } => park(tx, *op, owner, gates, *at, message),
        Change::Mark {
            op,
            task,
            status,
            outputs,
            dead_owner,
            request,
        } => mark(
            tx,
            *op,
            (*task, *status, outputs),
            dead_owner.as_ref(),
            request,
        ),
        Change::ResetTasks {
            op,
            owner,
            tasks,
            at,
            message,
        } => {
            fence(tx, *op, owner)?;
            tx.reset_tasks(*op, tasks)?;
            tx.clear_ending(*op)?;
            event(tx, *op, *at, EventKind::Rerun, None, message)
        }
        Change::CancelUnstarted {
            op,
            dead_owner,
            request,
        } => cancel_unstarted(tx, *op, dead_owner.as_ref(), request),
        Change::SetEnding { op, owner, ending } => {
            fence(tx, *op, owner)?;
            tx.set_ending(*op, &ending.to_string())?;
            let (kind, message) = events::finishing(ending["status"].as_str().unwrap_or("?"));
            event(tx, *op, now_of(ending), kind, None, &message)
        }
        Change::RequestCancel {
            op,
            request,
            grace_ms,
        } => request_cancel(tx, *op, request, *grace_ms),
        Change::Replan {
            op,
            owner,
            snapshot,
            renumber,
            tasks,
            params,
            env,
            at,
            message,
        } => {
            fence(tx, *op, owner)?;
            // The outcome is decided again, by the new plan's tasks.
            let env = serde_json::Value::Object(env.clone()).to_string();
            tx.set_params(*op, &params.to_string(), &env)?;
            let old = replan(tx, *op, snapshot, renumber)?;
            tx.insert_tasks(*op, tasks)?;
            let (kind, message) = events::plan_changed(message, &old, &snapshot.hash);
            event(tx, *op, *at, kind, None, &message)
        }
        Change::SetParams {
            op,
            owner,
            params,
            env,
            at,
            messages,
        } => {
            fence(tx, *op, owner)?;
            let env = serde_json::Value::Object(env.clone()).to_string();
            tx.set_params(*op, &params.to_string(), &env)?;
            for message in messages {
                event(tx, *op, *at, EventKind::ParamChanged, None, message)?;
            }
            Ok(())
        }
        _ => unreachable!("not an op change: {change:?}"),
    }
}

/// `Change::SetOp`: the op's status (fenced when it names its owner), the interruption's cause if
/// stored, the event; success and cancel release its lock.
fn set_op<T: Tx>(tx: &mut T, change: &Change) -> Result<()> {
    let Change::SetOp {
        op,
        owner,
        status,
        at,
        error,
        release,
        interrupted_by,
        kind,
        message,
    } = change
    else {
        unreachable!("not a SetOp: {change:?}")
    };
    if let Some(owner) = owner {
        fence(tx, *op, owner)?;
    }
    let ended = status.is_ended().then_some(*at);
    // Only a stored interruption is kept; a dead owner's is derived when read.
    let by = interrupted_by
        .filter(|by| *status == OpStatus::Interrupted && *by != Interruption::OwnerDied);
    tx.set_op_status(*op, *status, error.as_deref(), ended, *release, by)?;
    event(tx, *op, *at, *kind, None, message)?;
    if matches!(status, OpStatus::Succeeded | OpStatus::Canceled) {
        locks::release(tx, *op, *at)?;
    }
    Ok(())
}

/// `Change::Mark`: a task resolved by hand, refused while a live owner (not `dead_owner`) runs
/// the op.
fn mark<T: Tx>(
    tx: &mut T,
    op: OpId,
    (task, status, outputs): (
        TaskNo,
        TaskStatus,
        &serde_json::Map<String, serde_json::Value>,
    ),
    dead_owner: Option<&ProcessId>,
    request: &Request,
) -> Result<()> {
    let (_, owner, lease) = owner_of(tx, op)?;
    if let Some(owner) = owner.filter(|o| Some(o) != dead_owner) {
        return Err(Error::Owned {
            op,
            owner,
            lease_until: lease.unwrap_or(0),
        });
    }
    let (kind, message) = events::marked(status, request, outputs);
    let json = serde_json::Value::Object(outputs.clone()).to_string();
    let name = tx
        .mark_task(op, task, status, &json, request.at)?
        .ok_or(Error::NotFound(op))?;
    event(tx, op, request.at, kind, Some(&name), &message)
}

/// `Change::RequestCancel`: the first request is kept whole, grace included; an ended op refuses.
fn request_cancel<T: Tx>(
    tx: &mut T,
    op: OpId,
    request: &Request,
    grace_ms: Option<Millis>,
) -> Result<()> {
    let (status, _, _) = owner_of(tx, op)?;
    if status.is_final() {
        return Err(Error::Conflict {
            op,
            status,
            reason: "it has ended; there is nothing to cancel".into(),
        });
    }
    tx.request_cancel(op, request, grace_ms)?;
    let (kind, message) = events::cancel_requested(request, grace_ms);
    event(tx, op, request.at, kind, None, &message)
}

/// Applies a note: `CUR_TASK`, or an event alone. Fenced when it names its owner (a process that
/// lost the op writes nothing more for it), unless `fenced` (see [`super::apply`]).
pub(crate) fn note<T: Tx>(tx: &mut T, change: &Change, fenced: bool) -> Result<()> {
    let (op, owner) = match change {
        Change::CurrentTask { op, owner, .. } | Change::Event { op, owner, .. } => (*op, owner),
        _ => unreachable!("not a note: {change:?}"),
    };
    if let Some(owner) = owner
        && !fenced
    {
        fence(tx, op, owner)?;
    }
    match change {
        Change::CurrentTask { text, .. } => tx.set_current_task(op, text.as_deref()),
        Change::Event {
            at,
            kind,
            task,
            message,
            ..
        } => event(tx, op, *at, *kind, task.as_deref(), message),
        _ => unreachable!("not a note: {change:?}"),
    }
}

/// Stores a new op and its tasks. A schedule's firing is taken once (compare-and-set), a child
/// op's parent task names it in the same transaction, and an op started at once takes its lock
/// now or nothing is stored.
pub(crate) fn submit<T: Tx>(tx: &mut T, new: &NewOp) -> Result<Applied> {
    let snapshot = tx.store_snapshot(&new.snapshot)?;
    let id = tx.insert_op(new, snapshot)?;
    tx.insert_tasks(id, &new.tasks)?;
    if let Some((name, due)) = &new.fired_by
        && !tx.fire_schedule(name, *due, Some(id), &events::fired(id))?
    {
        return Err(Error::Conflict {
            op: id,
            status: OpStatus::Queued,
            reason: format!("schedule `{name}` already fired for this time"),
        });
    }
    event(
        tx,
        id,
        new.at,
        EventKind::Submitted,
        None,
        &events::submitted(new),
    )?;
    if let Some((parent, task)) = new.parent {
        let name = tx.task_name(parent, task)?;
        let message = events::child(&new.snapshot.name, id);
        event(
            tx,
            parent,
            new.at,
            EventKind::TaskChild,
            Some(&name),
            &message,
        )?;
    }
    match &new.owner {
        Some((owner, lease_until)) if !new.start => tx.set_owner(id, owner, *lease_until)?,
        Some((owner, lease_until)) => {
            locks::take(tx, id, new.at, new.ignore_cooldown)?;
            tx.start_new(id, owner, *lease_until, new.at)?;
            event(
                tx,
                id,
                new.at,
                EventKind::Started,
                None,
                &events::started_by(owner),
            )?;
        }
        None => {}
    }
    Ok(Applied::Submitted {
        id,
        uuid: new.uuid.clone(),
    })
}

/// Parks an op at its gates: `waiting`, with no owner, its lock kept; refused when a gate no
/// longer waits (it was answered first).
fn park<T: Tx>(
    tx: &mut T,
    op: OpId,
    owner: &ProcessId,
    gates: &[TaskNo],
    at: Millis,
    message: &str,
) -> Result<()> {
    fence(tx, op, owner)?;
    for gate in gates {
        let (status, name) = tx.task_state(op, *gate)?;
        if status != "waiting" {
            return Err(Error::Conflict {
                op,
                status: OpStatus::Running,
                reason: format!("task `{name}` is {status}: it was answered"),
            });
        }
    }
    // Its lock, if it holds one, stays its own: a lock is the op's, not its owner's.
    tx.set_op_status(op, OpStatus::Waiting, None, None, true, None)?;
    event(tx, op, at, EventKind::OpParked, None, message)
}

/// Who asks to own an op, and what they know.
struct Claim<'a> {
    owner: &'a ProcessId,
    dead_owner: Option<&'a ProcessId>,
    now: Millis,
    reopen: bool,
}

/// Whether `claim` may own the op: it has not ended (a succeeded op may be reopened), and it has
/// no owner, or the claimant already is, or its owner's lease expired or the owner is known dead.
fn claim_op<T: Tx>(tx: &mut T, op: OpId, claim: &Claim<'_>) -> Result<()> {
    let (status, current, lease) = owner_of(tx, op)?;
    if status.is_final() && !(claim.reopen && status == OpStatus::Succeeded) {
        return Err(Error::Conflict {
            op,
            status,
            reason: "it cannot run again".to_owned(),
        });
    }
    if let Some(current) = current {
        let expired = lease.is_some_and(|l| l < claim.now);
        let known_dead = claim.dead_owner == Some(&current);
        if &current != claim.owner && !expired && !known_dead {
            return Err(Error::Owned {
                op,
                owner: current,
                lease_until: lease.unwrap_or(0),
            });
        }
    }
    Ok(())
}

/// Cancels an op that has not started and has no live owner.
fn cancel_unstarted<T: Tx>(
    tx: &mut T,
    op: OpId,
    dead_owner: Option<&ProcessId>,
    request: &Request,
) -> Result<()> {
    let (status, owner, _) = owner_of(tx, op)?;
    let started = tx.op_started_at(op)?;
    let unowned = owner.is_none() || owner.as_ref() == dead_owner;
    if status.is_final() || started.is_some() || !unowned {
        return Err(Error::Conflict {
            op,
            status,
            reason: "it has started, or has an owner".to_owned(),
        });
    }
    let error = events::canceled_error(request);
    tx.cancel_unstarted(op, &error, request.at)?;
    let (kind, message) = events::canceled_unstarted(&error);
    event(tx, op, request.at, kind, None, &message)
}

/// Puts the new plan's snapshot in place and renumbers the op's tasks (and what names them) to
/// it; the old plan's hash. Every row must get its new number.
fn replan<T: Tx>(
    tx: &mut T,
    op: OpId,
    snapshot: &Snapshot,
    renumber: &[(TaskNo, TaskNo)],
) -> Result<String> {
    let old = tx.plan_hash(op)?;
    let snapshot_id = tx.store_snapshot(snapshot)?;
    tx.set_snapshot(op, snapshot_id)?;
    if let Some((table, left)) = tx.renumber_tasks(op, renumber)? {
        return Err(Error::Conflict {
            op,
            status: OpStatus::Running,
            reason: format!("{left} rows of {table} were not renumbered to the new plan"),
        });
    }
    Ok(old)
}

/// The time a JSON change carries in `at`, or 0.
fn now_of(value: &serde_json::Value) -> Millis {
    value["at"].as_i64().unwrap_or(0)
}
