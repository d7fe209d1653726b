//! `cairn nodes`: the `cairn serve` processes that serve the database now.

use anyhow::Context as _;
use serde_json::Value;
use store::{NodeRow, OpId};

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
    let nodes = web::view::live_nodes(&reader, engine::owner::now())?;
    let text = if args.json {
        let list: Vec<Value> = nodes
            .iter()
            .map(|(n, r)| web::view::node_json(n, r))
            .collect();
        let mut text = serde_json::to_string_pretty(&list).context("cannot encode")?;
        text.push('\n');
        text
    } else {
        table(&nodes)
    };
    crate::output::data(&text).context("cannot write")?;
    Ok(())
}
