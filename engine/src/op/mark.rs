//! Resolving a step by hand ([`mark`]): succeeded (with outputs) or skipped, with who and why.

use serde_json::Map;
use serde_json::Value;
use store::Change;
use store::OpId;
use store::Request;
use store::Store;
use store::TaskStatus;

use super::{Error, dead_owner_or_refuse, find_task, read_op, whoami};
use crate::owner::now;

/// Resolves a step by hand: succeeded (with outputs) or skipped, with who and why. Refused while a
/// live process runs the op; the next `resume` goes on from there.
pub async fn mark(
    store: &Store,
    op: OpId,
    step: &str,
    status: TaskStatus,
    outputs: Map<String, Value>,
    reason: String,
) -> Result<(), Error> {
    let reader = store.reader()?;
    let row = read_op(&reader, op)?;
    if row.status.is_final() {
        return Err(Error::Final {
            op,
            status: row.status,
        });
    }
    let task = find_task(&reader, op, step)?;
    let dead_owner = dead_owner_or_refuse(store, &row)?;
    let request = Request {
        by: whoami(),
        at: now(),
        reason: Some(reason),
    };
    store
        .apply(vec![Change::Mark {
            op,
            task: task.task_no,
            status,
            outputs,
            dead_owner,
            request,
        }])
        .await
        .map_err(Error::from_store)?;
    Ok(())
}
