//! `cairn submit`: queue an op for `cairn serve`.

use anyhow::Context as _;

use crate::cmd::run::PlanArgs;
use crate::db::DbArgs;
use crate::exit::Failure;
use crate::output::Output;

/// Queue an op for `cairn serve`; print its id alone on stdout.
///
/// The plan, its sub-plans and the params are checked as `cairn run` checks them, and the op is
/// stored `queued`, with its plan's snapshot, in one transaction. A `serve` starts it (its lock is
/// taken then).
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    plan: PlanArgs,
    /// Print `{"id": N, "uuid": "..."}` instead of the id alone.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    db: DbArgs,
}

pub fn run(args: &Args, out: &Output) -> Result<(), Failure> {
    let new = args.plan.load(out)?;
    let store = args.db.store()?;
    let runtime = crate::runtime()?;
    let op = runtime.block_on(engine::op::submit(&store, new, None))?;
    let text = if args.json {
        let uuid = store.reader()?.op(op)?.uuid;
        format!("{}\n", serde_json::json!({"id": op.0, "uuid": uuid}))
    } else {
        format!("{op}\n")
    };
    crate::output::data(&text).context("cannot write")?;
    Ok(())
}
