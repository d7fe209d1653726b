//! Answering an approval gate ([`approve`]), with or without a live owner.

use store::Change;
use store::OpId;
use store::Request;
use store::Store;

use super::{Error, find_task, read_op};
use crate::owner::now;

/// Answers an approval gate of an op, with or without a live owner (a waiting `run` goes on by
/// itself; otherwise `cairn resume` does). `by`: who answers, for the audit trail.
pub async fn approve(
    store: &Store,
    op: OpId,
    step: &str,
    approve: bool,
    comment: Option<String>,
    by: String,
) -> Result<(), Error> {
    let reader = store.reader()?;
    read_op(&reader, op)?;
    let task = find_task(&reader, op, step)?;
    store
        .apply(vec![Change::Approve {
            op,
            task: task.task_no,
            approve,
            request: Request {
                by,
                at: now(),
                reason: comment,
            },
        }])
        .await
        .map_err(|e| match e {
            store::Error::Conflict { reason, .. } => Error::Refused(format!("op {op}: {reason}")),
            other => Error::Store(other),
        })?;
    Ok(())
}
