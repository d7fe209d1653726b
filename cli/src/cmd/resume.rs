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
/// run again. Processes left behind by a crashed run are ended first (not the server a `daemon` step
/// started: its next attempt waits for it again). Refused while another live
/// process runs the op. With `--from STEP`, STEP and every step downstream of it run again even if
/// they succeeded (the op may have succeeded); steps upstream of it are kept, never re-run.
///
/// With `--plan FILE`, the op goes on with an edited plan: the diff against the op's snapshot is
/// printed (each step added, removed or changed, and the fields of a changed one: `timeout: 10s →
/// 20s`, or a line diff of a script), and nothing changes without `--accept-plan-change`. A change to a step
/// that already succeeded is refused unless `--rerun-changed` (then it and what is downstream of
/// it run again). The old snapshot is kept, named in the op's events.
///
/// With `--param KEY=VALUE` (repeatable; `KEY=@FILE` and `KEY=env:NAME` as for `run`), the op
/// goes on with a new value for a param, read as the plan's type. Refused when a step that already
/// ran (succeeded or skipped) used the param, unless `--rerun-changed`: then those steps and what
/// is downstream of them run again, seeing the new value. The old and new values are recorded in
/// the op's events (`param-changed`; secrets as `********`).
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
    /// A new value for a param, `KEY=VALUE` (repeatable): `KEY=@FILE` reads it from a file,
    /// `KEY=env:NAME` from the environment.
    #[arg(short = 'p', long = "param", value_name = "KEY=VALUE", conflicts_with_all = ["plan", "dry_run"])]
    params: Vec<String>,
    /// With `--plan` or `--param`: run changed steps (or steps that used a changed param) that
    /// already ran again, and what is downstream of them.
    #[arg(long)]
    rerun_changed: bool,
    /// End the processes of `adopt` steps that outlived the op's last run (and run those steps
    /// again after `check`) instead of collecting their results.
    #[arg(long)]
    restart_running: bool,
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
    if args.rerun_changed && args.plan.is_none() && args.params.is_empty() {
        return Err(Failure::BadInput(anyhow::anyhow!(
            "`--rerun-changed` goes with `--plan FILE` or `--param KEY=VALUE`"
        )));
    }
    let params = new_params(args, op)?;
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
            engine::op::Edits {
                from: args.from.as_deref(),
                replan,
                params,
            },
            engine::Options {
                restart_running: args.restart_running,
                ..args.run.options()
            },
            args.run.overrides(),
            progress,
            stop,
        )
    })?;
    crate::cmd::run::finish(&store, &args.db, op, &end, args.json)
}

/// `--param`s, read (`@FILE`, `env:NAME`) and checked against the op's plan's params.
fn new_params(args: &Args, op: store::OpId) -> Result<Option<engine::op::NewParams>, Failure> {
    if args.params.is_empty() {
        return Ok(None);
    }
    let pairs = args
        .params
        .iter()
        .map(|p| crate::cmd::run::param_value(p))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let reader = args.db.reader()?;
    let plan = engine::op::snapshot_plan(&reader, op)?;
    crate::cmd::run::warn_of_inline_secrets(&plan, &pairs);
    let given: Vec<(String, String)> = pairs.into_iter().map(|(k, v, _)| (k, v)).collect();
    match plans::params::changes(&plan, &given) {
        Ok(values) => Ok(Some(engine::op::NewParams {
            values,
            rerun_changed: args.rerun_changed,
        })),
        Err(problems) => {
            for p in problems {
                crate::output::diagnostic(&format!(
                    "error: {}\n",
                    crate::output::shown(&p.message)
                ));
            }
            Err(Failure::Reported)
        }
    }
}
