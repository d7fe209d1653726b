//! `cairn locks` and `cairn ack`: held locks, cooldowns, the pause switch.

use std::fmt::Write as _;

use anyhow::Context as _;

use crate::db::DbArgs;
use crate::exit::Failure;
use crate::output::{Output, shown};

/// List held locks with their holder op and since when, running cooldowns with their end, and
/// whether cairn is paused (by whom, when, why).
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    db: DbArgs,
}

/// Acknowledge a lock key's cooldown, so a new op on it may start now (recorded in the events).
#[derive(Debug, clap::Args)]
pub struct AckArgs {
    /// The lock key, as `cairn locks` shows it.
    key: String,
    /// Why, for the audit trail.
    #[arg(long)]
    reason: Option<String>,
    #[command(flatten)]
    db: DbArgs,
}

pub fn run(args: &Args, _out: &Output) -> Result<(), Failure> {
    let now = engine::owner::now();
    let reader = args.db.reader()?;
    let (locks, cooldowns, pauses) = (reader.locks()?, reader.cooldowns(now)?, reader.pauses(now)?);
    let time = engine::time::local;
    let text = if args.json {
        let value = web::view::locks(&reader, now)?;
        let mut text = serde_json::to_string_pretty(&value).context("cannot encode")?;
        text.push('\n');
        text
    } else {
        let mut text = String::new();
        if pauses.is_empty() {
            writeln!(text, "not paused").ok();
        }
        for p in &pauses {
            let scope = if p.scope.is_global() {
                String::new()
            } else {
                format!(" {}", shown(&p.scope.describe()))
            };
            let until = p
                .until
                .map_or(String::new(), |u| format!(" until {}", time(u)));
            writeln!(
                text,
                "paused{scope} by {} since {}{until}: {}",
                shown(&p.by),
                time(p.at),
                shown(p.reason.as_deref().unwrap_or("no reason given"))
            )
            .ok();
        }
        if locks.is_empty() {
            writeln!(text, "no lock is held").ok();
        }
        for l in &locks {
            writeln!(
                text,
                "lock      {}  held by op {} since {}",
                shown(&l.key),
                l.op,
                time(l.since)
            )
            .ok();
        }
        for c in &cooldowns {
            let state = match &c.acked {
                Some(a) => format!("acknowledged by {}", shown(&a.by)),
                None => format!("{} left", engine::time::elapsed(c.until - now)),
            };
            writeln!(
                text,
                "cooldown  {}  after op {} until {} ({state})",
                shown(&c.key),
                c.op,
                time(c.until)
            )
            .ok();
        }
        text
    };
    crate::output::data(&text).context("cannot write")?;
    Ok(())
}

pub fn ack(args: &AckArgs, _out: &Output) -> Result<(), Failure> {
    let store = args.db.store()?;
    let request = store::Request {
        by: engine::op::whoami(),
        at: engine::owner::now(),
        reason: args.reason.clone(),
    };
    store.apply_blocking(vec![store::Change::Ack {
        key: args.key.clone(),
        request,
    }])?;
    crate::output::diagnostic(&format!(
        "cooldown of `{}` acknowledged: a new op on it may start\n",
        shown(&args.key)
    ));
    Ok(())
}
