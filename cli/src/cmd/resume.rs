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
///
/// With `--plan FILE`, the op goes on with an edited plan: the diff against the op's snapshot is
/// printed (each step added, removed or changed, and the fields of a changed one: `timeout: 10s →
/// 20s`, or a line diff of a script), and nothing changes without `--accept-plan-change`. A change to a step
/// that already succeeded is refused unless `--rerun-changed` (then it and what is downstream of
/// it run again). The old snapshot is kept, named in the op's events.
#[allow(
    clippy::struct_excessive_bools,
    reason = "independent command-line switches"
)]
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
    /// Resume with this edited plan instead of the op's snapshot.
    #[arg(long, value_name = "FILE")]
    plan: Option<std::path::PathBuf>,
    /// Accept the differences `--plan` shows.
    #[arg(long, requires = "plan")]
    accept_plan_change: bool,
    /// With `--plan`: run changed steps that already succeeded again, and what is downstream.
    #[arg(long, requires = "plan")]
    rerun_changed: bool,
    #[command(flatten)]
    run: RunArgs,
    /// When the op ends, print its record on stdout, as `cairn show --json` does.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    db: DbArgs,
}

pub fn run(args: &Args, out: &Output) -> Result<(), Failure> {
    let op = op_id(&args.op)?;
    if args.dry_run {
        let reader = args.db.reader()?;
        let (row, planned) =
            engine::op::dry_run(&reader, args.db.rule()?, op, args.from.as_deref())?;
        let shown = crate::output::shown;
        let mut text = format!(
            "op {op} ({}, {}): a resume would\n",
            shown(&row.plan),
            shown(&row.title)
        );
        for p in &planned {
            let what = if p.kept { "keep" } else { "run " };
            writeln!(text, "  {what}  {}  ({})", shown(&p.task), p.status).ok();
        }
        if let Some(step) = &args.from {
            writeln!(text, "(`--from {step}` runs it and what is downstream of it again; nothing upstream of it runs again)").ok();
        }
        crate::output::data(&text).context("cannot write")?;
        return Ok(());
    }
    let store = args.db.store()?;
    let replan = match &args.plan {
        Some(path) => {
            let plan = crate::cmd::validate::load(path).map_err(|problems| {
                crate::output::diagnostic(&problems.render(out.color));
                Failure::Reported
            })?;
            let (_, row) = crate::db::read_op(&args.db, op)?;
            let files = engine::op::children::load(std::path::Path::new(&row.workdir), &plan)?;
            let replan = engine::op::Replan {
                plan,
                files,
                accept: args.accept_plan_change,
                rerun_changed: args.rerun_changed,
            };
            let reader = args.db.reader()?;
            let drift = engine::op::plan_drift(&reader, op, &replan)?;
            out.note(&format!(
                "op {op}: resuming with {} (changes accepted):\n{}",
                crate::output::shown(&path.display().to_string()),
                crate::output::shown_lines(&drift.drift.render())
            ));
            Some(replan)
        }
        None => None,
    };
    let end = crate::cmd::run::drive(out, |progress, stop| {
        engine::op::resume(
            &store,
            op,
            args.from.as_deref(),
            replan,
            args.run.options(),
            args.run.overrides(),
            progress,
            stop,
        )
    })?;
    crate::cmd::run::finish(&store, &args.db, op, &end, args.json)
}
