//! `cairn nodes`: the `cairn serve` processes that serve the database now.

use std::collections::BTreeMap;

use anyhow::Context as _;
use serde_json::{Value, json};
use store::{NodeRow, OpFilter, OpId, OpStatus, ProcessId};

use crate::db::DbArgs;
use crate::exit::Failure;
use crate::output::Output;

/// List the live `cairn serve` processes of the database, by host and pid: their workers, when
/// they started, their last heartbeat, and the ops each one holds.
///
/// A node is live while its lease holds (`cairn serve --lease-ttl`): one killed drops off the list
/// once its lease runs out; one stopped cleanly, at once.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Print a JSON array.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    db: DbArgs,
}

/// The ops each owner holds that have not ended (queued waiting for a lock, running, waiting for
/// an approval, canceling), by owner, in id order.
fn held(reader: &store::Reader) -> anyhow::Result<BTreeMap<ProcessKey, Vec<OpId>>> {
    let mut held: BTreeMap<ProcessKey, Vec<OpId>> = BTreeMap::new();
    for status in [
        OpStatus::Queued,
        OpStatus::Running,
        OpStatus::Waiting,
        OpStatus::Canceling,
    ] {
        let rows = reader.list_ops(&OpFilter {
            status: Some(status),
            plan: None,
            limit: None,
            before: None,
        })?;
        for row in rows {
            if let Some(owner) = &row.owner {
                held.entry(key(owner)).or_default().push(row.id);
            }
        }
    }
    for ops in held.values_mut() {
        ops.sort_unstable();
    }
    Ok(held)
}

/// A process as a map key: boot, pid and start time say which process it is.
type ProcessKey = (String, u32, u64);

fn key(id: &ProcessId) -> ProcessKey {
    (id.boot_id.clone(), id.pid, id.start)
}

fn node_json(node: &NodeRow, running: &[OpId]) -> Value {
    json!({
        "host": node.id.host,
        "pid": node.id.pid,
        "workers": node.workers,
        "started_at": engine::time::rfc3339(node.started_at),
        "heartbeat_at": engine::time::rfc3339(node.heartbeat_at),
        "running": running.iter().map(|op| op.0).collect::<Vec<_>>(),
    })
}

fn table(nodes: &[(NodeRow, Vec<OpId>)]) -> String {
    let mut table = crate::output::plain_table();
    table.set_header(["HOST", "PID", "WORKERS", "STARTED", "HEARTBEAT", "RUNNING"]);
    for (node, running) in nodes {
        table.add_row([
            node.id.host.clone(),
            node.id.pid.to_string(),
            node.workers.to_string(),
            engine::time::local(node.started_at),
            engine::time::local(node.heartbeat_at),
            if running.is_empty() {
                "-".to_owned()
            } else {
                running
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(",")
            },
        ]);
    }
    crate::output::render_table(
        &table,
        "(no live nodes: no `cairn serve` serves this database)",
    )
}

pub fn run(args: &Args, _out: &Output) -> Result<(), Failure> {
    let reader = args.db.reader()?;
    let now = engine::owner::now();
    let mut held = held(&reader)?;
    let mut nodes: Vec<(NodeRow, Vec<OpId>)> = reader
        .nodes()?
        .into_iter()
        .filter(|n| n.lease_until >= now)
        .map(|n| {
            let running = held.remove(&key(&n.id)).unwrap_or_default();
            (n, running)
        })
        .collect();
    nodes.sort_by(|(a, _), (b, _)| (&a.id.host, a.id.pid).cmp(&(&b.id.host, b.id.pid)));
    let text = if args.json {
        let list: Vec<Value> = nodes.iter().map(|(n, r)| node_json(n, r)).collect();
        let mut text = serde_json::to_string_pretty(&list).context("cannot encode")?;
        text.push('\n');
        text
    } else {
        table(&nodes)
    };
    crate::output::data(&text).context("cannot write")?;
    Ok(())
}
