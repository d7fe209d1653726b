//! `cairn pause` and `cairn unpause`: the global switch, or a pause of one plan or lock-key
//! prefix, for good or for a maintenance window.

use std::time::Duration;

use crate::db::DbArgs;
use crate::exit::Failure;
use crate::output::{Output, shown};

/// Hold new ops (`run` and `resume` refuse, unless `--ignore-pause`; `serve` leaves queued ops
/// waiting, and says why in `status`); running ops go on. Without `--plan` or `--key` every op is
/// held and no schedule fires. `cairn locks` shows the pauses: who, why and until when.
#[derive(Debug, clap::Args)]
pub struct PauseArgs {
    /// Hold only ops of this plan (its `name`).
    #[arg(long, value_name = "NAME")]
    plan: Option<String>,
    /// Hold only ops whose lock key starts with this prefix.
    #[arg(long, value_name = "PREFIX")]
    key: Option<String>,
    /// A maintenance window: the pause ends by itself after this long (`90m`, `2h`).
    #[arg(long = "for", value_name = "DURATION", value_parser = crate::cmd::run::duration)]
    for_: Option<Duration>,
    /// Why, for the people who will be held.
    #[arg(long)]
    reason: Option<String>,
    #[command(flatten)]
    db: DbArgs,
}

/// Lift a pause: the global one, or the one of exactly this `--plan` and `--key`.
#[derive(Debug, clap::Args)]
pub struct UnpauseArgs {
    /// The plan of the pause to lift, as it was paused.
    #[arg(long, value_name = "NAME")]
    plan: Option<String>,
    /// The lock-key prefix of the pause to lift, as it was paused.
    #[arg(long, value_name = "PREFIX")]
    key: Option<String>,
    #[command(flatten)]
    db: DbArgs,
}

fn scope(plan: Option<&String>, key: Option<&String>) -> Result<store::PauseScope, Failure> {
    for (flag, value) in [("--plan", plan), ("--key", key)] {
        if value.is_some_and(String::is_empty) {
            return Err(Failure::BadInput(anyhow::anyhow!(
                "{flag} needs a value that is not empty"
            )));
        }
    }
    Ok(store::PauseScope {
        plan: plan.cloned(),
        key: key.cloned(),
    })
}

pub fn pause(args: &PauseArgs, _out: &Output) -> Result<(), Failure> {
    let scope = scope(args.plan.as_ref(), args.key.as_ref())?;
    let store = args.db.store()?;
    let at = engine::owner::now();
    let until = args
        .for_
        .map(|d| at + i64::try_from(d.as_millis()).unwrap_or(i64::MAX / 2));
    let what = scope.describe();
    let pause = store::Pause {
        scope,
        by: engine::op::whoami(),
        at,
        reason: args.reason.clone(),
        until,
    };
    let lift = engine::op::unpause_command(&pause.scope);
    store.apply_blocking(vec![store::Change::Pause { pause }])?;
    let until = until.map_or(String::new(), |u| {
        format!(" until {}", engine::time::local(u))
    });
    crate::output::diagnostic(&format!(
        "paused {}{until}: no new op of it starts until `{}`\n",
        shown(&what),
        shown(&lift)
    ));
    Ok(())
}

pub fn unpause(args: &UnpauseArgs, _out: &Output) -> Result<(), Failure> {
    let scope = scope(args.plan.as_ref(), args.key.as_ref())?;
    let store = args.db.store()?;
    let now = engine::owner::now();
    let pauses = store.reader()?.pauses(now)?;
    if !scope.is_global() && !pauses.iter().any(|p| p.scope == scope) {
        let held: Vec<String> = pauses
            .iter()
            .map(|p| format!("`{}`", shown(&engine::op::unpause_command(&p.scope))))
            .collect();
        let hint = if held.is_empty() {
            "no pause holds now".to_owned()
        } else {
            format!("the pauses that hold are lifted by {}", held.join(", "))
        };
        return Err(Failure::BadInput(anyhow::anyhow!(
            "no pause of {}: {hint}",
            shown(&scope.describe())
        )));
    }
    let what = scope.describe();
    store.apply_blocking(vec![store::Change::Unpause { scope }])?;
    crate::output::diagnostic(&format!("unpaused {}\n", shown(&what)));
    Ok(())
}
