//! `cairn cancel`: cancel an op.

use std::time::Duration;

use crate::db::{DbArgs, op_id};
use crate::exit::Failure;
use crate::output::Output;

/// Cancel a queued, running, waiting, failed or interrupted op.
///
/// The request is recorded first. A live owner (a `cairn run`, `cairn resume` or `cairn serve`)
/// ends the op's running steps (TERM, then KILL after the grace period), runs its `on_cancel` hooks
/// and ends it `canceled`; this waits for that. An op with no live owner is canceled by this
/// command, hooks included. A canceled op cannot be resumed.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The op's id.
    op: String,
    /// Why, for the audit trail.
    #[arg(long)]
    reason: Option<String>,
    /// How long the op's running steps get between TERM and KILL. Recorded with the request, so
    /// that the op's owner uses it; without it, the owner's own `--grace` (10s when this command
    /// ends the steps).
    #[arg(long, value_name = "DURATION", value_parser = crate::cmd::run::duration)]
    grace: Option<Duration>,
    #[command(flatten)]
    db: DbArgs,
}

pub fn run(args: &Args, out: &Output) -> Result<(), Failure> {
    let op = op_id(&args.op)?;
    let store = args.db.store()?;
    let runtime = crate::runtime()?;
    let progress = crate::progress::printer(out);
    let options = engine::Options::default();
    // The owner's grace is not known here: at least the default's, and the one asked for.
    let wait = args.grace.unwrap_or(options.grace).max(options.grace) + Duration::from_secs(30);
    let end = runtime.block_on(engine::op::cancel(
        &store,
        op,
        (engine::op::whoami(), args.reason.clone()),
        args.grace,
        options,
        wait,
        progress,
    ))?;
    let text = match end {
        engine::op::CancelEnd::Canceled => format!("op {op} canceled\n"),
        engine::op::CancelEnd::AlreadyCanceled => format!("op {op} is already canceled\n"),
        engine::op::CancelEnd::Requested { owner } => {
            let owner = owner.to_string();
            let owner = crate::output::shown(&owner);
            format!("op {op}: cancel requested; {owner} is still ending it (see `cairn status`)\n")
        }
    };
    crate::output::diagnostic(&text);
    Ok(())
}
