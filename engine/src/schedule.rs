//! Cron schedules: `cairn serve` submits an op when a schedule is due.
//!
//! Each poll, for each schedule not paused, the firing times since the last one handled
//! (`last_fire`, or its creation) up to now are listed:
//! - none: nothing to do;
//! - the latest is recent (within `window`): it fires, unless the schedule's previous op is still
//!   active (overlap: skipped, noted);
//! - the latest is old (no `serve` ran then): with catch-up (the default) it fires once for all of
//!   them; otherwise they are skipped, noted.
//!
//! A firing is submitted with a compare-and-set on `last_fire` in the op's own transaction
//! (`NewOp::fired_by`): two servers never submit the same firing twice. The plan file is read when
//! the schedule fires: a schedule runs the plan as it is then.
//!
//! A firing that cannot be fired (the plan cannot be read, the submit is refused) is noted on the
//! schedule, once per firing and process ([`Misfires`]). On one machine's store that uses it up,
//! as a skip: every process there sees the same files. On a shared store it does not: the plan's
//! path may be another machine's, so the firing stays for a node that can fire it, this one tries
//! again at each poll, and once it is no longer recent the catch-up or skip rule decides as for
//! any missed firing.

use std::collections::HashMap;
use std::path::Path;

use serde_json::Value;
use store::{Change, Millis, OpId, ScheduleRow, Store};

use crate::op::{self, Error, NewRun};
use crate::owner::{self, Rule};

/// The firings this process could not fire and has said so, by schedule: the due time of the
/// last one, so that a failure is noted (and logged) once per firing, not at every poll.
#[derive(Debug, Default)]
pub struct Misfires(HashMap<String, Millis>);

/// Submits the ops of the schedules due at `now`; returns them. `rule` says whether the store is
/// shared (see the module's text for what a failure to fire does).
pub async fn fire_due(
    store: &Store,
    rule: Rule,
    now: Millis,
    window: Millis,
    misfires: &mut Misfires,
) -> Result<Vec<OpId>, Error> {
    let reader = store.reader()?;
    let mut fired = Vec::new();
    let schedules = reader.schedules()?;
    misfires
        .0
        .retain(|name, _| schedules.iter().any(|s| &s.name == name));
    for schedule in schedules.into_iter().filter(|s| !s.paused) {
        let after = schedule.last_fire.unwrap_or(schedule.created_at);
        // The latest firing due, and how many there were since the last one handled (counted up
        // to a cap: after a long outage, one firing or none stands for all of them).
        let (latest, count) = match plans::cron::latest(
            &schedule.cron,
            &schedule.timezone,
            after,
            now,
            1000,
        ) {
            Ok(Some(due)) => due,
            Ok(None) => continue,
            Err(e) => {
                tracing::warn!(schedule = %schedule.name, error = %e, "cannot read its cron expression");
                continue;
            }
        };
        let missed = count.saturating_sub(1);
        let many = |n: usize| {
            if n >= 1000 {
                "1000 or more".to_owned()
            } else {
                n.to_string()
            }
        };
        let on_time = now - latest <= window;
        let note = |note: String, handled: bool| Change::ScheduleNote {
            name: schedule.name.clone(),
            due: latest,
            note,
            handled,
        };
        if !on_time && !schedule.catch_up {
            let text = format!(
                "skipped {} missed firing{} ({}), the last at {}",
                many(count),
                if count == 1 { "" } else { "s" },
                match (rule, count) {
                    (Rule::Local, _) => "no serve ran",
                    (Rule::Shared, 1) => "no node fired it in time",
                    (Rule::Shared, _) => "no node fired them in time",
                },
                crate::time::rfc3339(latest)
            );
            tracing::info!(schedule = %schedule.name, "{text}");
            store.apply(vec![note(text, true)]).await?;
            continue;
        }
        // Active: not ended for good (failed and final ops are done; an interrupted one will be
        // resumed).
        let active = schedule
            .last_op
            .and_then(|previous| reader.op_head(previous).ok())
            .map(|row| rule.shown_status(&row, owner::now()))
            .filter(|status| !status.is_final() && *status != store::OpStatus::Failed);
        if let (Some(status), Some(previous)) = (active, schedule.last_op) {
            let text = format!(
                "skipped the firing of {}: op {previous} of the previous firing is still {status}",
                crate::time::rfc3339(latest),
            );
            tracing::info!(schedule = %schedule.name, "{text}");
            store.apply(vec![note(text, true)]).await?;
            continue;
        }
        match submit(store, &schedule, latest).await {
            Ok(op) => {
                tracing::info!(
                    schedule = %schedule.name,
                    op = op.0,
                    missed = %many(missed),
                    "fired for {}",
                    crate::time::rfc3339(latest)
                );
                fired.push(op);
            }
            // Another server fired it first.
            Err(Error::Store(store::Error::Conflict { .. })) => {}
            // Said once per firing; on a shared store another node may fire it yet.
            Err(_) if misfires.0.get(&schedule.name) == Some(&latest) => {}
            Err(e) => {
                let text = format!("cannot fire: {e}");
                tracing::warn!(schedule = %schedule.name, "{text}");
                store.apply(vec![note(text, rule == Rule::Local)]).await?;
                misfires.0.insert(schedule.name.clone(), latest);
            }
        }
    }
    Ok(fired)
}

/// Reads the schedule's plan as it is now and submits its op for the firing at `due`.
async fn submit(store: &Store, schedule: &ScheduleRow, due: Millis) -> Result<OpId, Error> {
    let path = Path::new(&schedule.plan);
    let bytes = op::input::read(path).map_err(|e| Error::Refused(e.to_string()))?;
    let plan =
        plans::parse_bytes(&schedule.plan, &bytes).map_err(|p| Error::Refused(p.render(false)))?;
    let given: Vec<(String, String)> = schedule
        .params
        .iter()
        .map(|(k, v)| {
            let text = match v {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            (k.clone(), text)
        })
        .collect();
    let params = plans::params::resolve(&plan, &given, None).map_err(|problems| {
        let all: Vec<String> = problems.into_iter().map(|p| p.message).collect();
        Error::Refused(all.join("; "))
    })?;
    let workdir = op::plan_dir(path);
    let files = crate::op::children::load(&workdir, &plan)?;
    let new = NewRun {
        env: op::capture_env(&plan),
        workdir,
        files,
        parent: None,
        plan,
        params,
    };
    op::submit(store, new, Some((schedule.name.clone(), due))).await
}

/// When a schedule fires next, after its last firing handled (or its creation) and `now`.
#[must_use]
pub fn next_firing(schedule: &ScheduleRow, now: Millis) -> Option<Millis> {
    let after = schedule.last_fire.unwrap_or(schedule.created_at).max(now);
    plans::cron::next(&schedule.cron, &schedule.timezone, after)
        .ok()
        .flatten()
}
