//! `cairn resume`: continue an op where it stopped.

use std::fmt::Write as _;

use anyhow::Context as _;

use crate::cmd::run::RunArgs;
use crate::db::{DbArgs, op_id};
use crate::exit::Failure;
use crate::output::Output;

/// Continue an op where it stopped, with the plan it was submitted with.
///
/// Tasks that succeeded or were skipped are kept with their outputs; failed and interrupted ones
/// run again. Processes left behind by a crashed run are ended first. Refused while another live
/// process runs the op. With `--from STEP`, STEP and every step downstream of it run again even if
/// they succeeded (the op may have succeeded); steps upstream of it are kept, never re-run.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The op's id.
    op: String,
    /// List what would be kept and what would run, and change nothing.
    #[arg(long)]
    dry_run: bool,
    /// Run this step and everything downstream of it again, even if they succeeded.
    #[arg(long, value_name = "STEP")]
    from: Option<String>,
    #[command(flatten)]
    run: RunArgs,
    #[command(flatten)]
    db: DbArgs,
}

pub fn run(args: &Args, out: &Output) -> Result<(), Failure> {
    let op = op_id(&args.op)?;
    if args.dry_run {
        let reader = args.db.reader()?.ok_or(engine::Error::UnknownOp(op))?;
        let (row, planned) = engine::ops::dry_run(&reader, op, args.from.as_deref())?;
        let mut text = format!("op {op} ({}, {}): a resume would\n", row.plan, row.title);
        for p in &planned {
            let what = if p.kept { "keep" } else { "run " };
            writeln!(text, "  {what}  {}  ({})", p.task, p.status).ok();
        }
        if let Some(step) = &args.from {
            writeln!(text, "(`--from {step}` runs it and what is downstream of it again; nothing upstream of it runs again)").ok();
        }
        crate::output::data(&text).context("cannot write")?;
        return Ok(());
    }
    let store = args.db.store()?;
    let end = crate::cmd::run::drive(out, |progress, stop| {
        engine::ops::resume(
            &store,
            op,
            args.from.as_deref(),
            args.run.options(),
            args.run.overrides(),
            progress,
            stop,
        )
    })?;
    crate::exit::of_run(&end, op)
}
