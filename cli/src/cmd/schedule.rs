//! `cairn schedule`: cron schedules that `cairn serve` fires.

use anyhow::Context as _;

use crate::cmd::run::PlanArgs;
use crate::db::DbArgs;
use crate::exit::Failure;
use crate::output::Output;

/// Cron schedules: `cairn serve` submits an op of the plan when one is due.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Add a schedule: the plan and its params are checked now, and read again at each firing.
    ///
    /// A firing is skipped while the op of the previous one is still active. Firings missed while
    /// no `serve` ran fire once when one starts (catch-up), unless `--skip-missed`.
    Add {
        /// The schedule's name.
        name: String,
        #[command(flatten)]
        plan: PlanArgs,
        /// A 5-field crontab expression (`0 2 * * *`) or `@hourly`, `@daily`, `@weekly`...;
        /// by default the plan's `schedule`.
        #[arg(long)]
        cron: Option<String>,
        /// The time zone the expression is read in; by default the plan's, or UTC.
        #[arg(long)]
        timezone: Option<String>,
        /// Skip firings missed while no `serve` ran, instead of firing once for them.
        #[arg(long)]
        skip_missed: bool,
        #[command(flatten)]
        db: DbArgs,
    },
    /// The schedules, with their next firing and what the last one did.
    List {
        /// Print them as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        db: DbArgs,
    },
    /// Remove a schedule (its ops stay).
    Remove {
        name: String,
        #[command(flatten)]
        db: DbArgs,
    },
    /// Stop a schedule from firing.
    Pause {
        name: String,
        #[command(flatten)]
        db: DbArgs,
    },
    /// Let a paused schedule fire again (from now: what it missed is not fired).
    Unpause {
        name: String,
        #[command(flatten)]
        db: DbArgs,
    },
}

pub fn run(args: &Args, out: &Output) -> Result<(), Failure> {
    match &args.command {
        Command::Add {
            name,
            plan,
            cron,
            timezone,
            skip_missed,
            db,
        } => {
            let new = plan.load(out)?;
            let default = new.plan.schedule.clone();
            let Some(cron) = cron
                .clone()
                .or_else(|| default.as_ref().map(|s| s.cron.clone()))
            else {
                return Err(Failure::BadInput(anyhow::anyhow!(
                    "plan `{}` has no `schedule`: give `--cron`",
                    new.plan.name
                )));
            };
            let timezone = timezone
                .clone()
                .or_else(|| default.map(|s| s.timezone))
                .unwrap_or_else(|| "UTC".to_owned());
            plans::cron::parse(&cron).map_err(|e| anyhow::anyhow!("bad `--cron {cron}`: {e}"))?;
            jiff_zone(&timezone)?;
            let given = plan.given()?;
            // A schedule's params are stored as given, in clear: secrets have no place there.
            if let Some(secret) = new
                .plan
                .params
                .iter()
                .find(|p| p.secret && given.contains_key(&p.name))
            {
                return Err(Failure::BadInput(anyhow::anyhow!(
                    "param `{}` is secret, and a schedule stores its params in clear; give the plan a way to read it at run time (an `env.*` name)",
                    secret.name
                )));
            }
            let store = db.store()?;
            let path = std::path::absolute(plan.path())
                .with_context(|| format!("cannot resolve `{}`", plan.path().display()))?;
            store.apply_blocking(vec![store::Change::AddSchedule(store::NewSchedule {
                name: name.clone(),
                plan: path.display().to_string(),
                params: given,
                cron,
                timezone,
                catch_up: !skip_missed,
                created_at: engine::owner::now(),
            })])?;
            crate::output::diagnostic(&format!(
                "schedule `{}` added\n",
                crate::output::shown(name)
            ));
            Ok(())
        }
        Command::List { json, db } => list(*json, db),
        Command::Remove { name, db } => {
            db.store()?
                .apply_blocking(vec![store::Change::RemoveSchedule { name: name.clone() }])?;
            crate::output::diagnostic(&format!(
                "schedule `{}` removed\n",
                crate::output::shown(name)
            ));
            Ok(())
        }
        Command::Pause { name, db } | Command::Unpause { name, db } => {
            let paused = matches!(args.command, Command::Pause { .. });
            let store = db.store()?;
            let current = store
                .reader()?
                .schedules()?
                .into_iter()
                .find(|s| &s.name == name)
                .ok_or_else(|| anyhow::anyhow!("no schedule `{name}`"))?;
            if current.paused == paused {
                crate::output::diagnostic(&format!(
                    "schedule `{name}` is {} already\n",
                    if paused { "paused" } else { "not paused" }
                ));
                return Ok(());
            }
            let mut batch = vec![store::Change::PauseSchedule {
                name: name.clone(),
                paused,
            }];
            if !paused {
                // Fire from now on: what it missed while paused is not fired.
                batch.push(store::Change::ScheduleNote {
                    name: name.clone(),
                    due: engine::owner::now(),
                    note: "unpaused".to_owned(),
                    handled: true,
                });
            }
            store.apply_blocking(batch)?;
            crate::output::diagnostic(&format!(
                "schedule `{name}` {}\n",
                if paused { "paused" } else { "unpaused" }
            ));
            Ok(())
        }
    }
}

/// `schedule list`: every schedule with its next firing, as a table or JSON.
fn list(json: bool, db: &DbArgs) -> Result<(), Failure> {
    let now = engine::owner::now();
    let schedules = db.reader()?.schedules()?;
    if json {
        let list: Vec<serde_json::Value> = schedules
            .iter()
            .map(|s| web::view::schedule_json(s, now))
            .collect();
        let mut text = serde_json::to_string_pretty(&list).context("cannot encode")?;
        text.push('\n');
        crate::output::data(&text).context("cannot write")?;
        return Ok(());
    }
    let mut table = crate::output::plain_table();
    table.set_header([
        "NAME", "CRON", "TIMEZONE", "NEXT", "LAST_OP", "PLAN", "NOTE",
    ]);
    for s in &schedules {
        table.add_row([
            s.name.clone(),
            s.cron.clone(),
            s.timezone.clone(),
            if s.paused {
                "(paused)".to_owned()
            } else {
                engine::schedule::next_firing(s, now)
                    .map_or_else(|| "-".to_owned(), engine::time::local)
            },
            s.last_op.map_or_else(|| "-".to_owned(), |o| o.to_string()),
            s.plan.clone(),
            s.note.clone().unwrap_or_default(),
        ]);
    }
    let text = crate::output::render_table(&table, "(no schedules)");
    crate::output::data(&text).context("cannot write")?;
    Ok(())
}

fn jiff_zone(name: &str) -> Result<(), Failure> {
    plans::cron::next("@daily", name, 0)
        .map(|_| ())
        .map_err(|e| Failure::BadInput(anyhow::anyhow!("bad `--timezone {name}`: {e}")))
}
