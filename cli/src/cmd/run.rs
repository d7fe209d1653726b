//! `cairn run`: submit an op and run it in this process.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;

use crate::cmd::validate::load;
use crate::db::DbArgs;
use crate::exit::Failure;
use crate::output::Output;

/// Submit a plan as an op and run it here, with live progress on stderr.
///
/// Exits 0 when the op succeeds, 1 when it fails, 4 when it is interrupted (Ctrl-C, SIGTERM):
/// `cairn resume OP` continues it.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    plan: PlanArgs,
    #[command(flatten)]
    run: RunArgs,
    /// When the op ends, print its record on stdout, as `cairn show --json` does (id, status,
    /// tasks with their outputs, events).
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    db: DbArgs,
}

/// Options of a process that runs ops (`run`, `resume`).
#[derive(Debug, Clone, clap::Args)]
pub struct RunArgs {
    /// How long steps get to exit after TERM before they are killed, when they must stop.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = duration)]
    pub grace: Duration,
    /// When another op holds the lock, refuse (exit 2, naming it) instead of waiting.
    #[arg(long)]
    pub no_wait: bool,
    /// Start even while the lock key cools down after an earlier op (recorded in the events).
    #[arg(long)]
    pub ignore_cooldown: bool,
    /// Start even while cairn is paused (recorded in the events).
    #[arg(long)]
    pub ignore_pause: bool,
}

impl RunArgs {
    pub fn overrides(&self) -> engine::op::Overrides {
        engine::op::Overrides {
            no_wait: self.no_wait,
            ignore_cooldown: self.ignore_cooldown,
            ignore_pause: self.ignore_pause,
            requeue: false,
        }
    }

    pub fn options(&self) -> engine::Options {
        engine::Options {
            grace: self.grace,
            ..engine::Options::default()
        }
    }
}

pub(crate) fn duration(text: &str) -> Result<Duration, String> {
    plans::units::parse_duration(text)
}

/// Reads `--params FILE` as a mapping.
fn params_file(
    path: &std::path::Path,
) -> anyhow::Result<serde_json::Map<String, serde_json::Value>> {
    let text = engine::op::input::read_text(path)?;
    Ok(plans::params::parse_file(
        &path.display().to_string(),
        &text,
    )?)
}

/// Where a `-p` value came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Source {
    /// Written on the command line.
    Inline,
    /// `@FILE` or `env:NAME`.
    Elsewhere,
}

/// A `-p KEY=VALUE`'s key and value: `@FILE` read from the file, `env:NAME` from the environment,
/// `@@...` the value `@...`.
pub(crate) fn param_value(pair: &str) -> anyhow::Result<(String, String, Source)> {
    let (key, value) =
        plans::params::split_pair(pair).map_err(|e| anyhow::anyhow!("bad `-p`: {e}"))?;
    if let Some(literal) = value.strip_prefix("@@") {
        return Ok((key, format!("@{literal}"), Source::Inline));
    }
    if let Some(path) = value.strip_prefix('@') {
        if path.is_empty() {
            anyhow::bail!(
                "bad `-p {key}=@`: name the file to read the value from (`@@` for a value that starts with `@`)"
            );
        }
        let text = engine::op::input::read_text(std::path::Path::new(path))
            .with_context(|| format!("cannot read the value of `-p {key}`"))?;
        let text = text
            .strip_suffix('\n')
            .map_or(text.as_str(), |t| t.strip_suffix('\r').unwrap_or(t));
        return Ok((key, text.to_owned(), Source::Elsewhere));
    }
    if let Some(name) = value.strip_prefix("env:") {
        let value = std::env::var(name).map_err(|e| {
            anyhow::anyhow!(
                "bad `-p {key}=env:{name}`: the environment variable `{name}` {}",
                match e {
                    std::env::VarError::NotPresent => "is not set",
                    std::env::VarError::NotUnicode(_) => "is not UTF-8",
                }
            )
        })?;
        return Ok((key, value, Source::Elsewhere));
    }
    Ok((key, value, Source::Inline))
}

/// Warns of each secret param written on the command line, where `ps` shows it to every user of
/// the machine while cairn runs.
pub(crate) fn warn_of_inline_secrets(plan: &plans::Plan, pairs: &[(String, String, Source)]) {
    for (key, _, source) in pairs {
        if *source == Source::Inline && plan.params.iter().any(|p| p.name == *key && p.secret) {
            crate::output::diagnostic(&format!(
                "warning: the secret param `{key}` is on the command line, where `ps` shows it to every user of this machine; give it as `-p {key}=@FILE` or `-p {key}=env:NAME`\n"
            ));
        }
    }
}

/// The plan file and its params, as `run` and `submit` take them.
#[derive(Debug, clap::Args)]
pub struct PlanArgs {
    /// The plan file.
    plan: PathBuf,
    /// A parameter, `KEY=VALUE` (repeatable). `KEY=@FILE` reads the value from a file (one trailing
    /// line break dropped; `@@` for a value that starts with `@`), `KEY=env:NAME` from the
    /// environment: a secret given so is not on the command line, where `ps` shows it.
    #[arg(short = 'p', long = "param", value_name = "KEY=VALUE")]
    params: Vec<String>,
    /// A YAML or JSON file of parameters; `-p` values override it.
    #[arg(long = "params", value_name = "FILE")]
    params_file: Option<PathBuf>,
}

impl PlanArgs {
    /// The plan file, as given.
    pub fn path(&self) -> &std::path::Path {
        &self.plan
    }

    /// The `-p` params, each read from where it says.
    fn pairs(&self) -> anyhow::Result<Vec<(String, String, Source)>> {
        self.params.iter().map(|p| param_value(p)).collect()
    }

    /// The params as given (`--params` file, then `-p`), not yet read as their types.
    pub fn given(&self) -> Result<serde_json::Map<String, serde_json::Value>, Failure> {
        let mut given = self
            .params_file
            .as_deref()
            .map(params_file)
            .transpose()?
            .unwrap_or_default();
        for (key, value, _) in self.pairs()? {
            given.insert(key, serde_json::Value::String(value));
        }
        Ok(given)
    }

    /// Reads and checks the plan, its sub-plans and its params: what an op needs to be stored.
    pub fn load(&self, out: &Output) -> Result<engine::NewRun, Failure> {
        let plan = match load(&self.plan) {
            Ok(plan) => plan,
            Err(problems) => {
                crate::output::diagnostic(&problems.render(out.color));
                return Err(Failure::Reported);
            }
        };
        let pairs = self.pairs()?;
        warn_of_inline_secrets(&plan, &pairs);
        let given: Vec<(String, String)> = pairs.into_iter().map(|(k, v, _)| (k, v)).collect();
        let file = self.params_file.as_deref().map(params_file).transpose()?;
        let params = match plans::params::resolve(&plan, &given, file.as_ref()) {
            Ok(params) => params,
            Err(problems) => {
                for p in problems {
                    crate::output::diagnostic(&format!(
                        "error: {}\n",
                        crate::output::shown(&p.message)
                    ));
                }
                return Err(Failure::Reported);
            }
        };
        let workdir = engine::op::plan_dir(&self.plan);
        let files = engine::op::children::load(&workdir, &plan)?;
        Ok(engine::NewRun {
            env: engine::op::capture_env(&plan),
            workdir,
            files,
            parent: None,
            plan,
            params,
        })
    }
}

pub fn run(args: &Args, out: &Output) -> Result<(), Failure> {
    let new = args.plan.load(out)?;
    let store = args.db.store()?;
    let (op, end) = drive(out, |progress, stop| {
        engine::op::run(
            &store,
            new,
            args.run.options(),
            args.run.overrides(),
            progress,
            stop,
        )
    })?;
    finish(&store, &args.db, op, &end, args.json)
}

/// The end of `run` or `resume` of `op`: its record on stdout when `json`, then its exit code.
pub fn finish(
    store: &store::Store,
    db: &DbArgs,
    op: store::OpId,
    end: &engine::RunEnd,
    json: bool,
) -> Result<(), Failure> {
    if json {
        let reader = store.reader().context("cannot read the op")?;
        let row = reader.op(op).context("cannot read the op")?;
        crate::cmd::show::print_record(&reader, &row, db.rule()?, engine::owner::now())?;
    }
    let lock = crate::exit::held_lock(store, op, end);
    crate::exit::of_run(end, op, lock.as_deref())
}

/// Runs an op-running future on the runtime, with Ctrl-C, SIGTERM and SIGHUP turned into a clean
/// stop and progress printed on stderr.
pub fn drive<T, F>(
    out: &Output,
    start: impl FnOnce(engine::progress::Sink, engine::StopHandle) -> F,
) -> Result<T, Failure>
where
    F: std::future::Future<Output = Result<T, engine::Error>>,
{
    let runtime = crate::runtime()?;
    runtime.block_on(async {
        let stop = engine::StopHandle::new();
        crate::signals::watch(stop.clone()).context("cannot watch for Ctrl-C")?;
        Ok(start(crate::progress::printer(out), stop).await?)
    })
}
