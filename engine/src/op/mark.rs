//! Resolving a step by hand ([`mark`]): succeeded (with outputs) or skipped, with who and why.

use serde_json::Map;
use serde_json::Value;
use store::Change;
use store::OpId;
use store::Request;
use store::Store;
use store::TaskStatus;

use super::{Error, dead_owner_or_refuse, find_task, read_op, snapshot_plan};
use crate::owner::now;
use crate::secrets;

/// Resolves a step by hand: succeeded (with outputs) or skipped, with who and why. Refused while a
/// live process runs the op, and (unless `allow_missing_outputs`) when a step marked succeeded is
/// not given every output it declares; the next `resume` goes on from there.
pub async fn mark(
    store: &Store,
    op: OpId,
    step: &str,
    status: TaskStatus,
    outputs: Map<String, Value>,
    (by, reason): (String, String),
    allow_missing_outputs: bool,
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
    if status == TaskStatus::Succeeded && !allow_missing_outputs {
        refuse_missing_outputs(&reader, op, &task, &outputs)?;
    }
    let outputs = seal_secrets(store, &row, outputs)?;
    let dead_owner = dead_owner_or_refuse(store, &row)?;
    let request = Request {
        by,
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

/// The outputs given by hand, those holding a value of one of the op's secret params sealed, as a
/// step's own would be (see `Shared::seal_outputs`).
fn seal_secrets(
    store: &Store,
    row: &store::OpRow,
    outputs: Map<String, Value>,
) -> Result<Map<String, Value>, Error> {
    let stored = row.params.as_object().cloned().unwrap_or_default();
    if !stored.values().any(secrets::is_sealed) {
        return Ok(outputs);
    }
    let key = secrets::key(store, false)?;
    let opened = secrets::open(&stored, key.as_ref())?;
    let values: Vec<String> = stored
        .iter()
        .filter(|(_, v)| secrets::is_sealed(v))
        .filter_map(|(name, _)| opened.get(name))
        .map(|v| v.as_str().map_or_else(|| v.to_string(), ToOwned::to_owned))
        .collect();
    let Some(key) = key else {
        return Ok(outputs);
    };
    Ok(outputs
        .into_iter()
        .map(|(name, value)| {
            if secrets::holds_secret(&value, &values) {
                (name, secrets::seal_value(&value, &key))
            } else {
                (name, value)
            }
        })
        .collect())
}

/// Refuses a step marked succeeded without every output it declares: the steps after it would fail
/// on the first template that uses one.
fn refuse_missing_outputs(
    reader: &store::Reader,
    op: OpId,
    task: &store::TaskRow,
    given: &Map<String, Value>,
) -> Result<(), Error> {
    let plan = snapshot_plan(reader, op)?;
    let declared = plan
        .steps
        .iter()
        .find(|s| s.id == task.step)
        .and_then(|s| s.outputs.clone())
        .unwrap_or_default();
    let missing: Vec<String> = declared
        .iter()
        .filter(|key| !given.contains_key(key.as_str()))
        .map(|key| format!("`{key}`"))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    Err(Error::Refused(format!(
        "op {op}: step `{}` declares the output(s) {} that no `--output` gives; the steps after it use them: give each with `--output KEY=VALUE`, or add `--allow-missing-outputs` if nothing needs them",
        task.step,
        missing.join(", ")
    )))
}
