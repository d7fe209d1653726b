//! `cairn mark`: resolve a step by hand.

use crate::db::{DbArgs, op_id};
use crate::exit::Failure;
use crate::output::Output;

/// Resolve a step of an op by hand, when it was fixed or done outside cairn: the next `resume` goes
/// on from there, its dependents using the outputs given. Who (the OS user), when and why are
/// recorded. Refused while a live process runs the op.
#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("as").required(true).args(["succeeded", "skipped"])))]
pub struct Args {
    /// The op's id.
    op: String,
    /// The step (or task) to resolve.
    step: String,
    /// Record it succeeded.
    #[arg(long)]
    succeeded: bool,
    /// Record it skipped.
    #[arg(long)]
    skipped: bool,
    /// Why, for the audit trail (required).
    #[arg(long, required = true)]
    reason: String,
    /// An output the step would have published, `KEY=VALUE` (repeatable).
    #[arg(long = "output", value_name = "KEY=VALUE")]
    outputs: Vec<String>,
    /// Mark it succeeded without every output the step declares (when nothing after it uses them).
    #[arg(long)]
    allow_missing_outputs: bool,
    #[command(flatten)]
    db: DbArgs,
}

pub fn run(args: &Args, _out: &Output) -> Result<(), Failure> {
    let op = op_id(&args.op)?;
    let mut outputs = serde_json::Map::new();
    for pair in &args.outputs {
        let (key, value) =
            plans::params::split_pair(pair).map_err(|e| anyhow::anyhow!("bad `--output`: {e}"))?;
        let valid = key.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
            && key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if !valid {
            return Err(anyhow::anyhow!(
                "bad `--output`: `{key}` is not a valid output key (letters, digits, `_`)"
            )
            .into());
        }
        outputs.insert(key, serde_json::Value::String(value));
    }
    let status = if args.succeeded {
        store::TaskStatus::Succeeded
    } else {
        store::TaskStatus::Skipped
    };
    let store = args.db.store()?;
    let runtime = crate::runtime()?;
    runtime.block_on(engine::op::mark(
        &store,
        op,
        &args.step,
        status,
        outputs,
        (engine::op::whoami(), args.reason.clone()),
        args.allow_missing_outputs,
    ))?;
    crate::output::diagnostic(&format!(
        "op {op}: `{}` marked {status}; `cairn resume {op}` goes on from there\n",
        crate::output::shown(&args.step)
    ));
    Ok(())
}
