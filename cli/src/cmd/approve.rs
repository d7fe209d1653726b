//! `cairn approve`: answer an approval gate.

use crate::db::{DbArgs, op_id};
use crate::exit::Failure;
use crate::output::Output;

/// Answer a manual gate (`approve:` step) of an op: approve it, or reject it (the task fails).
///
/// Who (the OS user), when and the comment are recorded. A `run` waiting at the gate goes on by
/// itself; an op with no live owner goes on with `cairn resume OP`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The op's id.
    op: String,
    /// The gate's step id.
    step: String,
    /// Reject instead of approving: the task fails.
    #[arg(long)]
    reject: bool,
    /// Why, for the audit trail.
    #[arg(long)]
    comment: Option<String>,
    #[command(flatten)]
    db: DbArgs,
}

pub fn run(args: &Args, _out: &Output) -> Result<(), Failure> {
    let op = op_id(&args.op)?;
    let store = args.db.store()?;
    let runtime = crate::runtime()?;
    runtime.block_on(engine::op::approve(
        &store,
        op,
        &args.step,
        !args.reject,
        args.comment.clone(),
        engine::op::whoami(),
    ))?;
    let verb = if args.reject { "rejected" } else { "approved" };
    let step = crate::output::shown(&args.step);
    crate::output::diagnostic(&format!("op {op}: `{step}` {verb}\n"));
    Ok(())
}
