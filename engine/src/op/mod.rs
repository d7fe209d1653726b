//! The op layer: what the CLI asks of the engine, one use case per file (mirroring
//! `cli/src/cmd/`).
//!
//! - [`start`](submit): `submit` queues an op, `run` starts one and runs it.
//! - `take`: taking an op over (refused while its owner lives), ending what a dead owner left.
//! - `lock`: acquiring an op's lock and ownership, waiting while another op holds the lock.
//! - `resume` ([`resume()`], [`dry_run`]), `replan` ([`plan_drift`]), `cancel` ([`cancel()`]),
//!   `mark` ([`mark()`]), `approve` ([`approve()`]).
//! - [`children`]: sub-plans: loads them at submit, and starts, resumes and cancels child ops
//!   for `plan:` tasks (it implements `task::subplan::Children`).
//! - [`input`]: reading plan and params files, capped in size.
//! - Here: [`Error`], [`Overrides`], [`NewRun`], and what the use cases share (the run's context
//!   built once per run, pause and lock checks, reading ops).
//!
//! It uses the run layer (`crate::run::run`) and the task layer; nothing below names it.

mod approve;
mod cancel;
pub mod children;
mod daemons;
pub mod input;
mod lock;
mod mark;
mod params;
mod replan;
mod resume;
mod start;
mod take;

pub use approve::approve;
pub use cancel::{CancelEnd, cancel};
pub use daemons::{Daemon, daemons};
pub use mark::mark;
pub use params::{NewParams, ParamChanges, param_changes};
pub use replan::{PlanDrift, Replan, plan_drift};
pub(crate) use resume::resume_as;
pub use resume::{Edits, Planned, dry_run, resume};
pub use start::{run, submit};
pub(crate) use take::Takeover;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use plans::model::Plan;
use serde_json::{Map, Value};
use store::{
    Change, EventKind, Millis, OpId, OpStatus, Pause, PauseScope, ProcessId, Reader, Request,
    Store, TaskNo,
};

use crate::options::Options;
use crate::owner::{OwnerState, Rule, now};
use crate::progress::Sink;
use crate::secrets;
use crate::shutdown::StopHandle;
use crate::task::context::{Made, Shared, Signals, with_hooks};
use crate::task::files::OutputFiles;

/// Why the engine could not start or resume an op. All of these are bad input for the CLI (exit 2).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Store(#[from] store::Error),
    #[error("no op {0}")]
    UnknownOp(OpId),
    #[error(
        "op {op} is being run by {owner} (its lease runs until {lease}); wait for it, or cancel it"
    )]
    Owned {
        op: OpId,
        owner: ProcessId,
        lease: String,
    },
    #[error("op {op} is {status} and cannot be resumed")]
    Final { op: OpId, status: OpStatus },
    #[error("cannot render the op's {what}: {reason}")]
    Render { what: &'static str, reason: String },
    #[error("the op's plan snapshot does not validate any more: {0}")]
    Snapshot(String),
    #[error(transparent)]
    Secret(#[from] secrets::Error),
    #[error(
        "cairn is paused{scope} (by {by} at {at}{until}: {reason}); `{lift}` lifts it, `--ignore-pause` starts anyway"
    )]
    Paused {
        /// ` for plan backup`, or nothing for the global pause.
        scope: String,
        by: String,
        at: String,
        /// `, until 03:00` for a maintenance window, else nothing.
        until: String,
        reason: String,
        /// The command that lifts this pause.
        lift: String,
    },
    #[error(
        "lock `{key}` is held by op {holder}; wait for it (without --no-wait), or cancel that op"
    )]
    LockHeld { key: String, holder: OpId },
    #[error(
        "lock `{key}` cools down for {left} more after op {after}; `cairn ack {key}` lifts it, `--ignore-cooldown` starts anyway"
    )]
    CoolingDown {
        key: String,
        after: OpId,
        left: String,
    },
    #[error("op {op} has no step or hook `{step}`{hint}")]
    UnknownStep {
        op: OpId,
        step: String,
        /// `; did you mean `x`?` when a name of the op is close, else nothing.
        hint: String,
    },
    #[error("{0}")]
    Refused(String),
    #[error("{0}")]
    SubPlan(String),
}

impl Error {
    /// A store's refusal as this layer says it: another live owner is [`Error::Owned`], with its
    /// lease for people; anything else the store's own error.
    pub(crate) fn from_store(e: store::Error) -> Self {
        match e {
            store::Error::Owned {
                op,
                owner,
                lease_until,
            } => Self::Owned {
                op,
                owner,
                lease: show_time(lease_until),
            },
            other => Self::Store(other),
        }
    }

    /// `step` is no step or hook of op `op`; `names` are the ones it has, for a "did you mean".
    pub(crate) fn unknown_step<'a>(
        op: OpId,
        step: &str,
        names: impl Iterator<Item = &'a str>,
    ) -> Self {
        let hint = plans::suggest(step, names)
            .map(|near| format!("; did you mean `{near}`?"))
            .unwrap_or_default();
        Self::UnknownStep {
            op,
            step: step.to_owned(),
            hint,
        }
    }
}

/// Environment variables every op keeps from the environment it was started in (besides those
/// its templates name with `env.*`): enough for scripts to find programs and speak the language.
const BASE_ENV: &[&str] = &[
    "PATH", "HOME", "USER", "LOGNAME", "SHELL", "LANG", "LANGUAGE", "TZ", "TMPDIR", "TERM",
];

/// The environment an op keeps: the base variables, `LC_*`, and the ones its templates name.
#[must_use]
pub fn capture_env(plan: &Plan) -> BTreeMap<String, String> {
    std::env::vars()
        .filter(|(name, _)| {
            BASE_ENV.contains(&name.as_str())
                || name.starts_with("LC_")
                || plan.env_names.iter().any(|n| n == name)
        })
        .collect()
}

fn lease_until(options: &Options) -> Millis {
    now() + i64::try_from(options.lease.as_millis()).unwrap_or(i64::MAX)
}

/// Everything `run` needs to start an op.
#[derive(Debug, Clone)]
pub struct NewRun {
    pub plan: Plan,
    pub params: Map<String, Value>,
    /// The plan file's directory.
    pub workdir: PathBuf,
    pub env: BTreeMap<String, String>,
    /// Its sub-plans and theirs, by absolute path (see [`children::load`]).
    pub files: Vec<(String, String)>,
    /// The op and task that start it, for a sub-plan's op.
    pub parent: Option<(OpId, TaskNo)>,
}

fn secret_names(plan: &Plan) -> Vec<&str> {
    plan.params
        .iter()
        .filter(|p| p.secret)
        .map(|p| p.name.as_str())
        .collect()
}

/// The values of the secret params: those the plan declares secret, and `sealed`, the names whose
/// stored value was sealed (a plan edited on resume may no longer say they are secret).
fn secret_values(plan: &Plan, params: &Map<String, Value>, sealed: &[String]) -> Vec<String> {
    secret_names(plan)
        .into_iter()
        .chain(sealed.iter().map(String::as_str))
        .filter_map(|n| params.get(n))
        .map(|v| match v {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        })
        .collect()
}

/// What a person allowed when starting or resuming an op; each use is recorded in its events.
#[derive(Debug, Clone, Copy, Default)]
#[allow(clippy::struct_excessive_bools)] // independent switches, each given by a person or a caller
pub struct Overrides {
    /// Refuse at once, rather than wait, when another op holds the lock.
    pub no_wait: bool,
    /// Start even while the lock key cools down after an earlier op.
    pub ignore_cooldown: bool,
    /// Start even while cairn is paused.
    pub ignore_pause: bool,
    /// Stopped while it waits for its lock, an op that never started goes back to the queue
    /// (`cairn serve`) instead of ending interrupted (`cairn run`, whose person stopped it).
    pub requeue: bool,
}

/// Who runs this command, for the audit trail: the OS user.
#[must_use]
pub fn whoami() -> String {
    procs::proc::user_name()
}

/// Refuses while a pause holds an op of `plan` with `lock_key`, unless the caller overrides it;
/// returns the pause it overrode.
fn check_pause(
    store: &Store,
    overrides: Overrides,
    plan: &str,
    lock_key: Option<&str>,
) -> Result<Option<Pause>, Error> {
    match store.reader()?.pause_of(plan, lock_key, now())? {
        Some(pause) if !overrides.ignore_pause => Err(Error::Paused {
            scope: if pause.scope.is_global() {
                String::new()
            } else {
                format!(" for {}", pause.scope.describe())
            },
            until: pause
                .until
                .map_or(String::new(), |u| format!(", until {}", show_time(u))),
            lift: unpause_command(&pause.scope),
            by: pause.by,
            at: show_time(pause.at),
            reason: pause.reason.unwrap_or_else(|| "no reason given".to_owned()),
        }),
        other => Ok(other),
    }
}

/// The command that lifts the pause of `scope`: `cairn unpause --plan backup`.
#[must_use]
pub fn unpause_command(scope: &PauseScope) -> String {
    let quote = |v: &str| {
        shlex::try_quote(v)
            .map(std::borrow::Cow::into_owned)
            .unwrap_or_default()
    };
    let plan = scope
        .plan
        .as_deref()
        .map(|p| format!(" --plan {}", quote(p)));
    let key = scope.key.as_deref().map(|k| format!(" --key {}", quote(k)));
    format!(
        "cairn unpause{}{}",
        plan.unwrap_or_default(),
        key.unwrap_or_default()
    )
}

/// Why a pause holds an op, for `status`: `cairn is paused for plan backup by ann: upgrade`.
#[must_use]
pub fn pause_note(pause: &Pause) -> String {
    let scope = if pause.scope.is_global() {
        String::new()
    } else {
        format!(" for {}", pause.scope.describe())
    };
    let until = pause
        .until
        .map_or(String::new(), |u| format!(" until {}", show_time(u)));
    let why = pause.reason.as_deref().unwrap_or("no reason given");
    format!(
        "waiting: cairn is paused{scope}{until} by {}: {why}",
        pause.by
    )
}

/// The event of a start over a pause, written by `owner` (fenced: a process that lost the op
/// writes nothing more for it).
fn pause_event(op: OpId, owner: &ProcessId, pause: Option<Pause>) -> Vec<Change> {
    pause
        .map(|p| Change::Event {
            op,
            owner: Some(owner.clone()),
            at: now(),
            kind: EventKind::PauseIgnored,
            task: None,
            message: format!(
                "started while cairn is paused (by {}), with --ignore-pause",
                p.by
            ),
        })
        .into_iter()
        .collect()
}

fn lock_error(e: store::Error) -> Error {
    match e {
        store::Error::LockHeld { key, holder } => Error::LockHeld { key, holder },
        store::Error::CoolingDown { key, after, until } => Error::CoolingDown {
            key,
            after,
            left: crate::time::elapsed((until - now()).max(0)),
        },
        other => Error::Store(other),
    }
}

/// The op's owner if it is gone (for a takeover to name), `None` if it has none; refused while it
/// lives, naming it and its lease. Liveness is judged by the rule of `store`.
fn dead_owner_or_refuse(store: &Store, row: &store::OpRow) -> Result<Option<ProcessId>, Error> {
    match Rule::of(store.location()).owner_state(row, now()) {
        OwnerState::Alive(owner) => Err(Error::Owned {
            op: row.id,
            owner,
            lease: row.lease_until.map_or_else(|| "-".to_owned(), show_time),
        }),
        OwnerState::Dead(owner) => Ok(Some(owner)),
        OwnerState::None => Ok(None),
    }
}

/// A task of an op by its name (`restore[s3]`), or by its step (the step's own task).
fn find_task(reader: &Reader, op: OpId, step: &str) -> Result<store::TaskRow, Error> {
    let tasks = reader.tasks(op)?;
    let by_name = tasks.iter().position(|t| t.name == step);
    by_name
        .or_else(|| tasks.iter().position(|t| t.step == step))
        .map(|i| tasks[i].clone())
        .ok_or_else(|| Error::unknown_step(op, step, tasks.iter().map(|t| t.name.as_str())))
}

/// An op that never started goes back to the queue, owned by nobody (`serve` takes it later).
fn requeued(op: OpId, me: &ProcessId, why: &str) -> Change {
    Change::SetOp {
        op,
        owner: Some(me.clone()),
        status: OpStatus::Queued,
        at: now(),
        error: None,
        release: true,
        interrupted_by: None,
        kind: EventKind::OpRequeued,
        message: format!("back in the queue: {why}"),
    }
}

/// What a run of an op is made of: the op as submitted or stored, its params in clear.
pub(super) struct RunParts {
    pub plan: Arc<Plan>,
    pub op: OpId,
    pub uuid: String,
    pub title: String,
    pub me: ProcessId,
    pub params: Map<String, Value>,
    pub env: BTreeMap<String, String>,
    pub workdir: PathBuf,
    /// The secret params' values, masked in logs.
    pub secrets: Vec<String>,
    pub files: crate::task::context::Files,
    pub ancestors: Vec<OpId>,
    /// Until when the lease is known to hold: what the last claim or renewal wrote, never more.
    pub lease_until: Millis,
}

/// The context every task of a run shares, built once per run.
fn shared(
    store: &Store,
    run: RunParts,
    options: Options,
    progress: Sink,
    stop: StopHandle,
) -> Result<Arc<Shared>, Error> {
    let RunParts {
        plan,
        op,
        uuid,
        title,
        me,
        params,
        env,
        workdir,
        secrets,
        files,
        ancestors,
        lease_until: lease,
    } = run;
    let outputs = OutputFiles::new(&uuid).map_err(|e| {
        Error::Store(store::Error::Write {
            path: std::env::temp_dir(),
            reason: e.to_string(),
        })
    })?;
    let (steps, hooks) = with_hooks(&plan);
    Ok(Arc::new(Shared {
        store: store.clone(),
        plan,
        op,
        uuid,
        title,
        me,
        params,
        env,
        workdir,
        options,
        progress,
        outputs,
        secrets,
        steps,
        hooks,
        files,
        children: &children::SubPlans,
        ancestors,
        signals: Signals::new(stop, lease),
        made: Made::default(),
    }))
}

/// The op's plan, from its snapshot (never from the file as it is today).
pub fn snapshot_plan(reader: &Reader, op: OpId) -> Result<Plan, Error> {
    let snapshot = reader.snapshot(op)?;
    plans::parse(&format!("op {op} plan snapshot"), &snapshot.text)
        .map_err(|p| Error::Snapshot(p.render(false)))
}

fn read_op(reader: &Reader, op: OpId) -> Result<store::OpRow, Error> {
    reader.op(op).map_err(unknown_op)
}

/// [`read_op`] without the op's params and env ([`Reader::op_head`]).
fn read_op_head(reader: &Reader, op: OpId) -> Result<store::OpRow, Error> {
    reader.op_head(op).map_err(unknown_op)
}

fn unknown_op(e: store::Error) -> Error {
    match e {
        store::Error::NotFound(op) => Error::UnknownOp(op),
        other => Error::Store(other),
    }
}

/// A time for messages: RFC 3339, UTC.
#[must_use]
pub fn show_time(ms: Millis) -> String {
    crate::time::rfc3339(ms)
}

/// `by: reason`, for messages.
fn requester(request: &Request) -> String {
    match &request.reason {
        Some(reason) => format!("{}: {reason}", request.by),
        None => request.by.clone(),
    }
}

/// Where a plan's relative paths start: the directory of its file.
#[must_use]
pub fn plan_dir(path: &Path) -> PathBuf {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf())
}
