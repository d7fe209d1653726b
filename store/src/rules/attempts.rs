//! The rules of a task's attempts: which task may start one (never a kept one), its process, its
//! end (a task resolved by hand meanwhile keeps what the person said), a whole attempt in one
//! change, a task's status set by its owner, logs (the rule in `logs.rs`), and a gate's answer.

use super::{End, Tx, event, events, fence, is_kept, logs, owner_of};
use crate::error::{Error, Result};
use crate::types::{
    AttemptStatus, Change, EventKind, Millis, OpId, OpStatus, Outcome, ProcessId, TaskNo,
    TaskStatus,
};

/// Applies an attempt change (see [`super::apply`] for which); `fenced` as there.
pub(crate) fn apply<T: Tx>(tx: &mut T, change: &Change, fenced: bool) -> Result<()> {
    match change {
        Change::StartAttempt {
            op,
            owner,
            task,
            n,
            retry_from,
            at,
        } => {
            fence_unless(tx, *op, owner, fenced)?;
            let name = startable(tx, *op, *task)?;
            tx.insert_attempt(*op, *task, *n, *at)?;
            tx.run_task(*op, *task, *n, *retry_from, *at)?;
            let message = events::attempt_started(*n);
            event(tx, *op, *at, EventKind::TaskStarted, Some(&name), &message)
        }
        Change::AttemptProcess {
            op,
            owner,
            task,
            n,
            process,
            pgid,
            at,
        } => {
            fence_unless(tx, *op, owner, fenced)?;
            tx.attempt_process(*op, *task, *n, process, *pgid, *at)
        }
        Change::TaskProgress {
            op,
            owner,
            task,
            text,
        } => {
            fence_unless(tx, *op, owner, fenced)?;
            tx.set_task_progress(*op, *task, text)
        }
        Change::FinishAttempt {
            op,
            owner,
            task,
            n,
            at,
            outcome,
        } => {
            fence_unless(tx, *op, owner, fenced)?;
            finish(tx, *op, *task, *n, *at, outcome)
        }
        Change::WholeAttempt {
            op,
            owner,
            task,
            n,
            retry_from,
            at,
            outcome,
        } => {
            // StartAttempt and FinishAttempt in one: an attempt row that is final when written,
            // one update of the task, both events.
            fence_unless(tx, *op, owner, fenced)?;
            let name = startable(tx, *op, *task)?;
            let end = end_of(outcome, *at);
            tx.insert_whole_attempt(*op, *task, *n, *at, &end)?;
            tx.whole_task(*op, *task, *n, *retry_from, *at, &end)?;
            let started = events::attempt_started(*n);
            let (kind, message) = events::attempt_end(*n, outcome);
            tx.append_events(
                *op,
                *at,
                Some(&name),
                &[
                    (EventKind::TaskStarted.as_str(), &started),
                    (kind.as_str(), &message),
                ],
            )
        }
        Change::SetTask {
            op,
            owner,
            task,
            status,
            at,
            message,
        } => {
            fence(tx, *op, owner)?;
            set_task(tx, *op, *task, *status, *at, message)
        }
        Change::Log {
            op,
            owner,
            task,
            attempt,
            stream,
            at,
            data,
            limit,
        } => {
            if let Some(owner) = owner {
                fence_unless(tx, *op, owner, fenced)?;
            }
            logs::append(tx, (*op, *task, *attempt), (*stream, *at), data, *limit)
        }
        Change::Logged {
            op,
            owner,
            task,
            attempt,
            bytes,
        } => {
            fence_unless(tx, *op, owner, fenced)?;
            tx.attempt_logged(*op, *task, *attempt, *bytes)
        }
        Change::Approve {
            op,
            task,
            approve,
            request,
        } => answer(tx, *op, *task, *approve, request),
        Change::EndGate {
            op,
            owner,
            task,
            status,
            at,
            error,
            message,
        } => {
            fence(tx, *op, owner)?;
            let (current, name) = tx.task_state(*op, *task)?;
            if current != "waiting" {
                // Answered meanwhile: the answer stands.
                return Ok(());
            }
            tx.answer_task(*op, *task, status.as_str(), *at, Some(error), "{}")?;
            event(tx, *op, *at, EventKind::task(*status), Some(&name), message)
        }
        _ => unreachable!("not an attempt change: {change:?}"),
    }
}

/// Answers a gate that waits. The op is read first (on PostgreSQL this locks its row, so that an
/// answer and its owner parking the op are applied one after the other): an op parked at its
/// gates (`waiting` with no owner) is queued again by the answer, for `cairn serve` to go on.
fn answer<T: Tx>(
    tx: &mut T,
    op: OpId,
    task: TaskNo,
    approve: bool,
    request: &crate::types::Request,
) -> Result<()> {
    let (op_status, owner, _) = owner_of(tx, op)?;
    let (status, name) = tx.find_task_state(op, task)?.ok_or(Error::NotFound(op))?;
    if status != "waiting" {
        let why = match op_status {
            OpStatus::Failed | OpStatus::Interrupted => {
                format!("; the op is {op_status}: `cairn resume {op}` asks again")
            }
            OpStatus::Canceled | OpStatus::Succeeded => format!("; the op is {op_status}"),
            _ => String::new(),
        };
        return Err(Error::Conflict {
            op,
            status: op_status,
            reason: format!("task `{name}` is {status}, not waiting for an answer{why}"),
        });
    }
    let (new_status, error) = if approve {
        ("succeeded", None)
    } else {
        ("failed", Some(events::rejected_error(request)))
    };
    let outputs = serde_json::json!({"by": request.by, "comment": request.reason.clone().unwrap_or_default()})
        .to_string();
    tx.answer_task(op, task, new_status, request.at, error.as_deref(), &outputs)?;
    let (kind, message) = events::answered(approve, request);
    event(tx, op, request.at, kind, Some(&name), &message)?;
    if op_status == OpStatus::Waiting && owner.is_none() {
        tx.set_op_status(op, OpStatus::Queued, None, None, false, None)?;
        let (kind, message) = events::woken(&name);
        event(tx, op, request.at, kind, None, &message)?;
    }
    Ok(())
}

/// The fence, unless the transaction already proved it for this writer (see [`super::apply`]).
fn fence_unless<T: Tx>(tx: &mut T, op: OpId, owner: &ProcessId, fenced: bool) -> Result<()> {
    if fenced { Ok(()) } else { fence(tx, op, owner) }
}

/// The name of a task that may start a new attempt. The last guard of "a finished step never runs
/// again": the store refuses to start a task that succeeded or was skipped.
fn startable<T: Tx>(tx: &mut T, op: OpId, task: TaskNo) -> Result<String> {
    let (status, name) = tx.task_state(op, task)?;
    if is_kept(&status) {
        return Err(Error::Conflict {
            op,
            status: OpStatus::Running,
            reason: format!("task `{name}` is {status} and must not run again"),
        });
    }
    Ok(name)
}

/// Records how attempt `n` ended, and the task's outcome unless it was resolved by hand meanwhile.
fn finish<T: Tx>(
    tx: &mut T,
    op: OpId,
    task: TaskNo,
    n: u32,
    at: Millis,
    outcome: &Outcome,
) -> Result<()> {
    let end = end_of(outcome, at);
    tx.end_attempt(op, task, n, at, &end)?;
    // A task resolved by hand (`cairn mark`) while an attempt of it was in doubt keeps what the
    // person said; only the attempt's own end is recorded.
    let (current, name) = tx.task_state(op, task)?;
    if is_kept(&current) && outcome.task != TaskStatus::Succeeded {
        let (kind, message) = events::attempt_ended_kept(n, outcome.attempt, &current);
        return event(tx, op, at, kind, Some(&name), &message);
    }
    tx.end_task(op, task, &end)?;
    if outcome.attempt == AttemptStatus::Interrupted && outcome.task == TaskStatus::Pending {
        // A kill, Ctrl-C or shutdown is not a failure: the attempt it interrupted does not use up
        // one of the step's `retry.attempts`.
        tx.uncount_attempt(op, task)?;
    }
    let (kind, message) = events::attempt_end(n, outcome);
    event(tx, op, at, kind, Some(&name), &message)
}

/// Sets a task's status by its owner. A gate (again) waits for its answer; one answered
/// meanwhile keeps the answer.
fn set_task<T: Tx>(
    tx: &mut T,
    op: OpId,
    task: TaskNo,
    status: TaskStatus,
    at: Millis,
    message: &str,
) -> Result<()> {
    if status == TaskStatus::Waiting {
        if is_kept(&tx.task_status(op, task)?) {
            return Ok(());
        }
        tx.clear_answer(op, task, at)?;
    }
    let ended = matches!(
        status,
        TaskStatus::Succeeded | TaskStatus::Failed | TaskStatus::Skipped | TaskStatus::Canceled
    )
    .then_some(at);
    let name = tx.set_task_status(op, task, status, ended)?;
    event(tx, op, at, EventKind::task(status), Some(&name), message)
}

/// An attempt's outcome in the columns that record it: a task left pending (to be retried) has
/// not ended.
fn end_of(outcome: &Outcome, at: Millis) -> End<'_> {
    End {
        task: outcome.task,
        attempt: outcome.attempt.as_str(),
        ended: (outcome.task != TaskStatus::Pending).then_some(at),
        exit_code: outcome.exit_code,
        error: outcome.error.as_deref(),
        outputs: outcome
            .outputs
            .as_ref()
            .map(|o| serde_json::Value::Object(o.clone()).to_string()),
        by_check: outcome.by_check,
    }
}
