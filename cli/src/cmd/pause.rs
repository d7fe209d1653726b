//! `cairn pause` and `cairn unpause`: the global switch.

use crate::db::DbArgs;
use crate::exit::Failure;
use crate::output::Output;

/// Stop new ops from starting (`run` and `resume` refuse, unless `--ignore-pause`); running ops
/// go on. `cairn locks` shows who paused, when and why.
#[derive(Debug, clap::Args)]
pub struct PauseArgs {
    /// Why, for the people who will be refused.
    #[arg(long)]
    reason: Option<String>,
    #[command(flatten)]
    db: DbArgs,
}

/// Let new ops start again.
#[derive(Debug, clap::Args)]
pub struct UnpauseArgs {
    #[command(flatten)]
    db: DbArgs,
}

pub fn pause(args: &PauseArgs, _out: &Output) -> Result<(), Failure> {
    let store = args.db.store()?;
    let request = store::Request {
        by: engine::op::whoami(),
        at: engine::owner::now(),
        reason: args.reason.clone(),
    };
    store.apply_blocking(vec![store::Change::Pause { request }])?;
    crate::output::diagnostic("paused: no new op starts until `cairn unpause`\n");
    Ok(())
}

pub fn unpause(args: &UnpauseArgs, _out: &Output) -> Result<(), Failure> {
    let store = args.db.store()?;
    store.apply_blocking(vec![store::Change::Unpause])?;
    crate::output::diagnostic("unpaused\n");
    Ok(())
}
