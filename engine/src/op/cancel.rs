//! Canceling an op ([`cancel`]): the request is recorded first; a live owner acts on it, a dead
//! one's op is taken over to run its `on_cancel` hooks.

use store::Change;
use store::EventKind;
use store::OpId;
use store::OpStatus;
use store::ProcessId;
use store::Request;
use store::Store;

use super::take::Takeover;
use super::{Error, Overrides, read_op, requester};
use crate::options::Options;
use crate::outcome::RunEnd;
use crate::owner;
use crate::owner::OwnerState;
use crate::owner::now;
use crate::progress::Sink;
use crate::shutdown::StopHandle;

/// How `cairn cancel` ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CancelEnd {
    /// The op is canceled (by its owner, or by this process when it had none).
    Canceled,
    /// It already was.
    AlreadyCanceled,
    /// The request is recorded; the live owner had not finished canceling when this stopped waiting.
    Requested { owner: ProcessId },
}

/// Cancels an op. The request is recorded first (durably), with `grace`: how long the op's running
/// steps get between TERM and KILL (`None`: the owner's own `--grace`). A live owner acts on it,
/// and this waits for it (up to `wait`). An op that never started is canceled as it is. One that
/// started and has no live owner is taken over: what its dead owner left running is ended (with
/// `grace`, else `options.grace`), its `on_cancel` hooks run, and it ends `canceled`. `by`: who
/// asks, for the audit trail.
pub async fn cancel(
    store: &Store,
    op: OpId,
    (by, reason): (String, Option<String>),
    grace: Option<std::time::Duration>,
    mut options: Options,
    wait: std::time::Duration,
    progress: Sink,
) -> Result<CancelEnd, Error> {
    if let Some(grace) = grace {
        options.grace = grace;
    }
    let reader = store.reader()?;
    let row = read_op(&reader, op)?;
    match row.status {
        OpStatus::Canceled => return Ok(CancelEnd::AlreadyCanceled),
        OpStatus::Succeeded => {
            return Err(Error::Refused(format!(
                "op {op} has succeeded; there is nothing to cancel"
            )));
        }
        _ => {}
    }
    let request = Request {
        by,
        at: now(),
        reason,
    };
    store
        .apply(vec![Change::RequestCancel {
            op,
            request: request.clone(),
            grace_ms: grace.map(|g| i64::try_from(g.as_millis()).unwrap_or(i64::MAX)),
        }])
        .await
        .map_err(|e| match e {
            store::Error::Conflict { status, .. } => Error::Refused(format!(
                "op {op} has ended ({status}); there is nothing to cancel"
            )),
            other => Error::Store(other),
        })?;
    let deadline = std::time::Instant::now() + wait;
    loop {
        let row = read_op(&reader, op)?;
        match (
            row.status,
            owner::Rule::of(store.location()).owner_state(&row, now()),
        ) {
            (OpStatus::Canceled, _) => return Ok(CancelEnd::Canceled),
            (OpStatus::Succeeded, _) => {
                return Err(Error::Refused(format!(
                    "op {op} succeeded before the cancel took effect"
                )));
            }
            (_, OwnerState::Alive(owner)) => {
                if std::time::Instant::now() >= deadline {
                    return Ok(CancelEnd::Requested { owner });
                }
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
            (_, state) if row.started_at.is_none() => {
                // Nothing of it ever ran: no step to end, no hook to run.
                let dead_owner = match state {
                    OwnerState::Dead(owner) => Some(owner),
                    _ => None,
                };
                match store
                    .apply(vec![Change::CancelUnstarted {
                        op,
                        dead_owner,
                        request: request.clone(),
                    }])
                    .await
                {
                    Ok(_) => return Ok(CancelEnd::Canceled),
                    // It started (or was taken) meanwhile: look again.
                    Err(store::Error::Conflict { .. }) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            _ => {
                // It started and its owner is gone: finish the cancel here.
                let overrides = Overrides {
                    no_wait: true,
                    ignore_cooldown: false,
                    ignore_pause: true,
                    requeue: false,
                };
                let takeover = Takeover {
                    store,
                    options: options.clone(),
                    overrides,
                    progress: progress.clone(),
                    stop: StopHandle::new(),
                    kind: EventKind::CancelTaken,
                    verb: "taken over to cancel it",
                    reopen: false,
                };
                let taken = takeover.take_and_load(&reader, &row, None, None).await;
                let (shared, tasks) = match taken {
                    Ok(Ok(loaded)) => loaded,
                    Ok(Err(_)) => {
                        return Err(Error::Refused(format!(
                            "op {op} could not be taken over to cancel it"
                        )));
                    }
                    // Another process took it first (or ended it meanwhile): look again.
                    Err(Error::Owned { .. } | Error::Final { .. }) => continue,
                    Err(e) => return Err(e),
                };
                // Its sub-plans' ops that have not ended are canceled first, with their hooks.
                for child in reader.children(op)? {
                    if !child.status.is_final() {
                        let _ = Box::pin(cancel(
                            store,
                            child.id,
                            (request.by.clone(), request.reason.clone()),
                            grace,
                            options.clone(),
                            wait,
                            progress.clone(),
                        ))
                        .await;
                    }
                }
                return match crate::run::run(shared, tasks, Some(requester(&request)), None, false)
                    .await
                {
                    RunEnd::Canceled(_) => Ok(CancelEnd::Canceled),
                    other => Err(Error::Refused(format!(
                        "op {op} could not be canceled: it ended {}",
                        other.status()
                    ))),
                };
            }
        }
    }
}
