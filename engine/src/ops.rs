//! What the CLI asks of the engine: start an op and run it, resume one, say what a resume would do.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64};

use plans::model::{Action, Plan};
use plans::template::{Context, Template};
use serde_json::{Map, Value};
use store::{
    Applied, AttemptStatus, Change, Millis, NewOp, NewTask, OpId, OpStatus, Outcome as TaskOutcome,
    ProcessId, Reader, Request, Snapshot, Store, TaskNo, TaskStatus,
};
use tokio::sync::watch;

use crate::owner::{self, OwnerState, now};
use crate::progress::{Progress, Sink};
use crate::runner::{self, Options, RunEnd, Shared, TaskState};
use crate::secrets;

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
    #[error("the plan cannot be run by this version of cairn: {0}")]
    Unsupported(String),
    #[error("the op's plan snapshot does not validate any more: {0}")]
    Snapshot(String),
    #[error(transparent)]
    Secret(#[from] secrets::Error),
    #[error(
        "cairn is paused (by {by} at {at}: {reason}); `cairn unpause` lifts it, `--ignore-pause` starts anyway"
    )]
    Paused {
        by: String,
        at: String,
        reason: String,
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
    #[error("op {op} has no step or hook `{step}`")]
    UnknownStep { op: OpId, step: String },
    #[error("{0}")]
    Refused(String),
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

/// Refuses plans with step kinds this version does not run yet, before anything is stored.
pub fn check_supported(plan: &Plan) -> Result<(), Error> {
    let unsupported: Vec<String> = plan
        .steps
        .iter()
        .filter(|s| matches!(s.action, Action::Plan { .. }) || s.for_each.is_some())
        .map(|s| {
            format!(
                "`{}` ({})",
                s.id,
                if s.for_each.is_some() {
                    "for_each"
                } else {
                    s.action.kind()
                }
            )
        })
        .collect();
    if unsupported.is_empty() {
        Ok(())
    } else {
        Err(Error::Unsupported(format!(
            "steps {} use features that come in a later version",
            unsupported.join(", ")
        )))
    }
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
}

/// The handle a caller keeps to stop a run (Ctrl-C, SIGTERM).
pub type StopHandle = Arc<watch::Sender<bool>>;

#[must_use]
pub fn stop_handle() -> StopHandle {
    Arc::new(watch::channel(false).0)
}

fn secret_names(plan: &Plan) -> Vec<&str> {
    plan.params
        .iter()
        .filter(|p| p.secret)
        .map(|p| p.name.as_str())
        .collect()
}

fn secret_values(plan: &Plan, params: &Map<String, Value>) -> Vec<String> {
    secret_names(plan)
        .into_iter()
        .filter_map(|n| params.get(n))
        .map(|v| match v {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        })
        .collect()
}

/// What a person allowed when starting or resuming an op; each use is recorded in its events.
#[derive(Debug, Clone, Copy, Default)]
pub struct Overrides {
    /// Refuse at once, rather than wait, when another op holds the lock.
    pub no_wait: bool,
    /// Start even while the lock key cools down after an earlier op.
    pub ignore_cooldown: bool,
    /// Start even while cairn is paused.
    pub ignore_pause: bool,
}

/// Who runs this command, for the audit trail: the OS user.
#[must_use]
pub fn whoami() -> String {
    steps::proc::user_name()
}

/// Refuses while cairn is paused, unless the caller overrides it; returns the pause it overrode.
fn check_pause(store: &Store, overrides: Overrides) -> Result<Option<Request>, Error> {
    match store.reader()?.paused()? {
        Some(pause) if !overrides.ignore_pause => Err(Error::Paused {
            by: pause.by,
            at: show_time(pause.at),
            reason: pause.reason.unwrap_or_else(|| "no reason given".to_owned()),
        }),
        other => Ok(other),
    }
}

fn pause_event(op: OpId, pause: Option<Request>) -> Vec<Change> {
    pause
        .map(|p| Change::Event {
            op,
            at: now(),
            kind: "pause-ignored",
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

/// Sets `CUR_TASK` to `text`, unless it already says that.
async fn tell(store: &Store, op: OpId, said: &mut String, text: String) -> Result<(), Error> {
    if text != *said {
        store
            .apply(vec![Change::CurrentTask {
                op,
                text: Some(text.clone()),
            }])
            .await?;
        *said = text;
    }
    Ok(())
}

/// The op's owner if it is gone (for a takeover to name), `None` if it has none; refused while it
/// lives, naming it and its lease.
fn dead_owner_or_refuse(row: &store::OpRow) -> Result<Option<ProcessId>, Error> {
    match owner::owner_state(row, now()) {
        OwnerState::Alive(owner) => Err(Error::Owned {
            op: row.id,
            owner,
            lease: row.lease_until.map_or_else(|| "-".to_owned(), show_time),
        }),
        OwnerState::Dead(owner) => Ok(Some(owner)),
        OwnerState::None => Ok(None),
    }
}

/// How waiting for an op's lock ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Acquired {
    /// The lock is taken and the op is this process's, running.
    Yes,
    /// Stopped (Ctrl-C, SIGTERM) while waiting; the op was left interrupted.
    Stopped,
    /// The op was canceled while it waited; it is recorded canceled.
    Canceled,
}

/// Takes the op's lock and ownership. While another op holds the lock, this process owns the op
/// as `queued` (so `status` and `cancel` know someone waits) and waits, renewing its lease: it
/// notices a cancel request, waits out a pause, and says why in `CUR_TASK`.
#[allow(clippy::too_many_arguments)] // the parts of one take-over; a struct would only rename them
async fn acquire(
    store: &Store,
    op: OpId,
    me: &ProcessId,
    dead: Option<ProcessId>,
    options: &Options,
    overrides: Overrides,
    progress: &Sink,
    stop: &StopHandle,
    kind: &'static str,
    message: String,
    reopen: bool,
) -> Result<Acquired, Error> {
    let reader = store.reader()?;
    let mut said = String::new();
    let mut owns_queued =
        dead.is_none() && reader.op(op).is_ok_and(|r| r.owner.as_ref() == Some(me));
    let mut stopped = stop.subscribe();
    let claim = |queued: bool| Change::Claim {
        op,
        owner: me.clone(),
        lease_until: lease_until(options),
        dead_owner: dead.clone(),
        now: now(),
        queued,
        reopen,
        kind,
        message: message.clone(),
    };
    loop {
        let row = read_op(&reader, op)?;
        if row.status.is_final() && !(reopen && row.status == OpStatus::Succeeded) {
            return Ok(Acquired::Canceled);
        }
        if owns_queued && let Some(request) = &row.cancel {
            let why = request
                .reason
                .as_ref()
                .map_or(String::new(), |r| format!(": {r}"));
            store
                .apply(vec![Change::SetOp {
                    op,
                    owner: Some(me.clone()),
                    status: OpStatus::Canceled,
                    at: now(),
                    error: Some(format!("canceled by {}{why}", request.by)),
                    release: true,
                    kind: "op-canceled",
                    message: format!("op canceled by {}{why} before it started", request.by),
                }])
                .await?;
            return Ok(Acquired::Canceled);
        }
        let paused = if overrides.ignore_pause {
            None
        } else {
            store.reader()?.paused()?
        };
        let attempt = match &paused {
            Some(pause) => {
                let why = pause
                    .reason
                    .clone()
                    .unwrap_or_else(|| "no reason given".to_owned());
                tell(
                    store,
                    op,
                    &mut said,
                    format!("waiting: cairn is paused by {}: {why}", pause.by),
                )
                .await?;
                Err(None)
            }
            None => store
                .apply(vec![
                    Change::TakeLock {
                        op,
                        at: now(),
                        ignore_cooldown: overrides.ignore_cooldown,
                    },
                    claim(false),
                ])
                .await
                .map_err(Some),
        };
        match attempt {
            Ok(_) => return Ok(Acquired::Yes),
            Err(None) => {}
            Err(Some(store::Error::LockHeld { key, holder })) if !overrides.no_wait => {
                if !said.contains(&format!("held by op {holder}")) {
                    progress(&Progress::WaitingForLock {
                        key: key.clone(),
                        holder,
                    });
                }
                tell(
                    store,
                    op,
                    &mut said,
                    format!("waiting for lock {key} held by op {holder}"),
                )
                .await?;
            }
            Err(Some(store::Error::Owned {
                op,
                owner,
                lease_until,
            })) => {
                return Err(Error::Owned {
                    op,
                    owner,
                    lease: show_time(lease_until),
                });
            }
            Err(Some(store::Error::Conflict { op, status, .. })) => {
                return Err(Error::Final { op, status });
            }
            Err(Some(e)) => {
                let error = lock_error(e);
                if owns_queued {
                    // Refused while waiting (the key began to cool down): the op stays, failed,
                    // for a resume once the cooldown is acknowledged.
                    let _ = store
                        .apply(vec![Change::SetOp {
                            op,
                            owner: Some(me.clone()),
                            status: OpStatus::Failed,
                            at: now(),
                            error: Some(error.to_string()),
                            release: true,
                            kind: "op-failed",
                            message: format!("op refused before it started: {error}"),
                        }])
                        .await;
                }
                return Err(error);
            }
        }
        // Own the waiting op (or renew the lease on it), so that it is known to be waited for.
        let renew = if owns_queued {
            Change::Heartbeat {
                op,
                owner: me.clone(),
                lease_until: lease_until(options),
            }
        } else {
            claim(true)
        };
        match store.apply(vec![renew]).await {
            Ok(_) => owns_queued = true,
            Err(store::Error::Owned {
                op,
                owner,
                lease_until,
            }) => {
                return Err(Error::Owned {
                    op,
                    owner,
                    lease: show_time(lease_until),
                });
            }
            Err(e) => return Err(e.into()),
        }
        tokio::select! {
            () = tokio::time::sleep(std::time::Duration::from_millis(500)) => {}
            _ = stopped.wait_for(|s| *s) => {
                store
                    .apply(vec![Change::SetOp {
                        op,
                        owner: Some(me.clone()),
                        status: OpStatus::Interrupted,
                        at: now(),
                        error: Some("stopped while waiting to start".to_owned()),
                        release: true,
                        kind: "op-interrupted",
                        message: "stopped while waiting to start".to_owned(),
                    }])
                    .await?;
                return Ok(Acquired::Stopped);
            }
        }
    }
}

/// Stores a new op owned by this process (submit, lock and take in one transaction, so no other
/// process can claim it in between), then runs it. While another op holds its lock it is stored
/// `queued` and waits (or, with `no_wait`, nothing is stored and the holder is named).
pub async fn run(
    store: &Store,
    new: NewRun,
    options: Options,
    overrides: Overrides,
    progress: Sink,
    stop: StopHandle,
) -> Result<(OpId, RunEnd), Error> {
    check_supported(&new.plan)?;
    let paused = check_pause(store, overrides)?;
    let uuid = uuid::Uuid::now_v7().to_string();
    let title = match &new.plan.title {
        Some(t) => render_header(t, &new, &uuid, "title")?,
        None => new.plan.name.clone(),
    };
    let lock = new
        .plan
        .lock
        .as_ref()
        .map(|t| render_header(t, &new, &uuid, "lock key"))
        .transpose()?;
    let secret = secret_names(&new.plan);
    let stored_params = if secret.iter().any(|n| new.params.contains_key(*n)) {
        let key = secrets::key(store.path(), true)?.ok_or_else(|| secrets::Error::Key {
            path: secrets::key_path(store.path()),
            reason: "it could not be created".into(),
        })?;
        secrets::seal(&new.params, &secret, &key)
    } else {
        new.params.clone()
    };
    let me = owner::me();
    let at = now();
    let mut op = NewOp {
        uuid: uuid.clone(),
        snapshot: Snapshot {
            hash: new.plan.hash.clone(),
            name: new.plan.name.clone(),
            text: new.plan.text.clone(),
            files: Vec::new(),
        },
        title: title.clone(),
        status: OpStatus::Queued,
        params: Value::Object(stored_params),
        workdir: new.workdir.display().to_string(),
        env: new
            .env
            .iter()
            .map(|(k, v)| (k.clone(), Value::String(v.clone())))
            .collect(),
        tasks: new
            .plan
            .steps
            .iter()
            .enumerate()
            .map(|(i, s)| NewTask {
                task_no: TaskNo(u32::try_from(i).unwrap_or(u32::MAX)),
                step: s.id.clone(),
                name: s.id.clone(),
                item: None,
            })
            .collect(),
        at,
        owner: Some((me.clone(), lease_until(&options))),
        start: true,
        lock,
        cooldown_ms: new
            .plan
            .cooldown
            .map(|c| i64::try_from(c.as_millis()).unwrap_or(i64::MAX)),
        ignore_cooldown: overrides.ignore_cooldown,
    };
    let submitted = match store.apply(vec![Change::Submit(op.clone())]).await {
        Ok(applied) => Ok((applied, true)),
        Err(store::Error::LockHeld { .. }) if !overrides.no_wait => {
            // Stored `queued`, owned by this process, which waits for the lock.
            op.start = false;
            store
                .apply(vec![Change::Submit(op)])
                .await
                .map(|a| (a, false))
                .map_err(Error::from)
        }
        Err(e) => Err(lock_error(e)),
    }?;
    let (mut applied, owned) = submitted;
    let Some(Applied::Submitted { id, .. }) = applied.pop() else {
        return Err(Error::Store(store::Error::Closed));
    };
    if !owned {
        let message = format!("started by {me}");
        match acquire(
            store, id, &me, None, &options, overrides, &progress, &stop, "started", message, false,
        )
        .await?
        {
            Acquired::Yes => {}
            Acquired::Stopped => return Ok((id, RunEnd::Interrupted)),
            Acquired::Canceled => {
                return Ok((id, RunEnd::Canceled("while it waited to start".to_owned())));
            }
        }
    }
    let events = pause_event(id, paused);
    if !events.is_empty() {
        store.apply(events).await?;
    }
    progress(&Progress::OpStarted {
        op: id,
        title: title.clone(),
        resumed: false,
    });
    let secrets = secret_values(&new.plan, &new.params);
    let shared = shared(
        store,
        Arc::new(new.plan),
        id,
        uuid,
        title,
        me,
        new.params,
        new.env,
        new.workdir,
        options,
        progress,
        stop,
        secrets,
    )?;
    let tasks = vec![
        TaskState {
            status: TaskStatus::Pending,
            attempts: 0,
            retry_from: 0,
            outputs: None
        };
        shared.steps.len()
    ];
    Ok((id, runner::run(shared, tasks, None, None).await))
}

/// Renders the op's title or lock key: params, `op.uuid`, `op.plan` and the kept environment.
fn render_header(
    template: &Template,
    new: &NewRun,
    uuid: &str,
    what: &'static str,
) -> Result<String, Error> {
    let mut ctx = Context::new();
    for (name, value) in &new.params {
        ctx.param(name, value);
    }
    ctx.op("uuid", &Value::from(uuid))
        .op("plan", &Value::from(new.plan.name.clone()));
    for (name, value) in &new.env {
        ctx.env(name, value);
    }
    template.render(&ctx).map_err(|e| Error::Render {
        what,
        reason: e.message,
    })
}

#[allow(clippy::too_many_arguments)]
fn shared(
    store: &Store,
    plan: Arc<Plan>,
    op: OpId,
    uuid: String,
    title: String,
    me: ProcessId,
    params: Map<String, Value>,
    env: BTreeMap<String, String>,
    workdir: PathBuf,
    options: Options,
    progress: Sink,
    stop: StopHandle,
    secrets: Vec<String>,
) -> Result<Arc<Shared>, Error> {
    let outdir = tempfile::Builder::new()
        .prefix("cairn-")
        .tempdir()
        .map_err(|e| {
            Error::Store(store::Error::Write {
                path: std::env::temp_dir(),
                reason: e.to_string(),
            })
        })?;
    let receiver = stop.subscribe();
    let options_lease = options.clone();
    let (steps, hooks) = runner::with_hooks(&plan);
    let (calm_tx, calm) = watch::channel(false);
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
        outdir,
        secrets,
        stop_tx: stop,
        stop: receiver,
        lost: AtomicBool::new(false),
        // The claim was made just before, with this length.
        lease_until: AtomicI64::new(lease_until(&options_lease)),
        steps,
        hooks,
        stop_reason: std::sync::Mutex::new(None),
        outcome: std::sync::Mutex::new(None),
        calm,
        _calm_tx: calm_tx,
        gates: watch::channel(false).0,
    }))
}

/// The op's plan, from its snapshot (never from the file as it is today).
pub fn snapshot_plan(reader: &Reader, op: OpId) -> Result<Plan, Error> {
    let snapshot = reader.snapshot(op)?;
    plans::parse(&format!("op {op} plan snapshot"), &snapshot.text)
        .map_err(|p| Error::Snapshot(p.render(false)))
}

fn read_op(reader: &Reader, op: OpId) -> Result<store::OpRow, Error> {
    reader.op(op).map_err(|e| match e {
        store::Error::NotFound(op) => Error::UnknownOp(op),
        other => Error::Store(other),
    })
}

/// A time for messages: RFC 3339, UTC.
#[must_use]
pub fn show_time(ms: Millis) -> String {
    crate::time::rfc3339(ms)
}

/// Takes an op over for this process: refused while its owner lives. Also takes the op's lock,
/// waiting for it (or not, with `no_wait`) when another op holds it. `Ok(None)` when stopped while
/// waiting.
#[allow(clippy::too_many_arguments)]
async fn take(
    store: &Store,
    row: &store::OpRow,
    options: &Options,
    overrides: Overrides,
    progress: &Sink,
    stop: &StopHandle,
    kind: &'static str,
    verb: &str,
    reopen: bool,
) -> Result<(Acquired, ProcessId), Error> {
    let op = row.id;
    if row.status.is_final() && !(reopen && row.status == OpStatus::Succeeded) {
        return Err(Error::Final {
            op,
            status: row.status,
        });
    }
    let me = owner::me();
    let dead = dead_owner_or_refuse(row)?;
    let mut message = format!("{verb} by {me}");
    if let Some(dead) = &dead {
        write!(message, "; its previous owner ({dead}) is gone").ok();
    }
    let acquired = acquire(
        store, op, &me, dead, options, overrides, progress, stop, kind, message, reopen,
    )
    .await?;
    Ok((acquired, me))
}

/// Ends whatever is left of attempts that were running when their owner died, and records them
/// interrupted, before any task runs again.
async fn sweep(
    store: &Store,
    reader: &Reader,
    row: &store::OpRow,
    plan: &Plan,
    me: &ProcessId,
    options: &Options,
    progress: &Sink,
) -> Result<(), Error> {
    // Hooks are tasks too: name them as the runner does.
    let (tasks, _) = runner::with_hooks(plan);
    for attempt in reader
        .attempts(row.id)?
        .into_iter()
        .filter(|a| a.status == AttemptStatus::Running)
    {
        let step = tasks
            .get(attempt.task_no.0 as usize)
            .map_or("?", |s| s.id.as_str())
            .to_owned();
        let marker = format!("{}/{}/{}", row.uuid, attempt.task_no.0, attempt.n);
        let same_machine = attempt
            .process
            .as_ref()
            .is_none_or(|p| p.boot_id == steps::proc::boot_id());
        let count = if same_machine {
            let pgid = attempt.pgid;
            let start = attempt.process.as_ref().map(|p| p.start);
            let check_marker = format!("{marker}/check");
            steps::proc::terminate(
                || {
                    let mut pids = steps::proc::attempt_processes(pgid, start, &marker);
                    pids.extend(steps::proc::attempt_processes(None, None, &check_marker));
                    pids
                },
                options.grace,
            )
            .await
        } else {
            0
        };
        let mut batch = Vec::new();
        if count > 0 {
            batch.push(Change::Event {
                op: row.id,
                at: now(),
                kind: "leftovers-ended",
                task: Some(step.clone()),
                message: format!("ended {count} process(es) left running by attempt {} before running the task again", attempt.n),
            });
            progress(&Progress::LeftoversEnded {
                task: step.clone(),
                attempt: attempt.n,
                count,
            });
        }
        batch.push(Change::FinishAttempt {
            op: row.id,
            owner: me.clone(),
            task: attempt.task_no,
            n: attempt.n,
            at: now(),
            outcome: TaskOutcome {
                task: TaskStatus::Pending,
                attempt: AttemptStatus::Interrupted,
                exit_code: None,
                error: Some("interrupted: the process running the op died".to_owned()),
                outputs: None,
                by_check: false,
            },
        });
        store.apply(batch).await?;
    }
    Ok(())
}

/// Continues an op where it stopped, with its plan snapshot. An op with a cancel request is only
/// finished as canceled.
pub async fn resume(
    store: &Store,
    op: OpId,
    from: Option<&str>,
    options: Options,
    overrides: Overrides,
    progress: Sink,
    stop: StopHandle,
) -> Result<RunEnd, Error> {
    let reader = store.reader()?;
    let row = read_op(&reader, op)?;
    if row.status == OpStatus::Succeeded && from.is_none() {
        // Resuming after a crash must be safe to repeat: the work is done, and that is success.
        progress(&Progress::AlreadyDone { op });
        return Ok(RunEnd::Succeeded);
    }
    let rerun = match from {
        Some(step) => Some(rerun_from(&snapshot_plan(&reader, op)?, op, step)?),
        None => None,
    };
    let paused = if row.cancel.is_none() {
        check_pause(store, overrides)?
    } else {
        None
    };
    let reopen = rerun.is_some();
    let (shared, mut tasks) = match take_and_load(
        store, &reader, &row, options, overrides, progress, stop, "resumed", "resumed", reopen,
    )
    .await?
    {
        Ok(loaded) => loaded,
        Err(Acquired::Canceled) => {
            return Ok(RunEnd::Canceled("while it waited to start".to_owned()));
        }
        Err(_) => return Ok(RunEnd::Interrupted),
    };
    let events = pause_event(op, paused);
    if !events.is_empty() {
        store.apply(events).await?;
    }
    let mut ending = row.ending.as_ref().and_then(runner::EndState::from_json);
    if let (Some(step), Some(steps)) = (from, rerun) {
        // The step, what is downstream of it, and the finishing hooks run again; nothing upstream.
        let hooks = &shared.hooks;
        let again: Vec<usize> = steps
            .into_iter()
            .chain(
                hooks
                    .on_success
                    .iter()
                    .chain(&hooks.on_failure)
                    .chain(&hooks.on_cancel)
                    .copied(),
            )
            .collect();
        let names: Vec<&str> = again
            .iter()
            .filter(|&&i| i < shared.plan.steps.len())
            .map(|&i| shared.step(i).id.as_str())
            .collect();
        store
            .apply(vec![Change::ResetTasks {
                op,
                owner: shared.me.clone(),
                tasks: again
                    .iter()
                    .map(|&i| TaskNo(u32::try_from(i).unwrap_or(u32::MAX)))
                    .collect(),
                at: now(),
                message: format!(
                    "run again from `{step}`, as asked by {}: {}",
                    whoami(),
                    names.join(", ")
                ),
            }])
            .await?;
        for i in again {
            if let Some(t) = tasks.get_mut(i) {
                *t = TaskState {
                    status: TaskStatus::Pending,
                    attempts: t.attempts,
                    retry_from: t.attempts,
                    outputs: None,
                };
            }
        }
        ending = None;
    }
    let cancel = row.cancel.as_ref().map(requester);
    Ok(runner::run(shared, tasks, cancel, ending).await)
}

/// The steps `resume --from STEP` runs again: STEP and everything downstream of it.
fn rerun_from(plan: &Plan, op: OpId, step: &str) -> Result<Vec<usize>, Error> {
    let index = plan.step_index(step).ok_or_else(|| Error::UnknownStep {
        op,
        step: step.to_owned(),
    })?;
    Ok(plan.dag.downstream(index))
}

/// Resolves a step by hand: succeeded (with outputs) or skipped, with who and why. Refused while a
/// live process runs the op; the next `resume` goes on from there.
pub async fn mark(
    store: &Store,
    op: OpId,
    step: &str,
    status: TaskStatus,
    outputs: Map<String, Value>,
    reason: String,
) -> Result<(), Error> {
    let reader = store.reader()?;
    let row = read_op(&reader, op)?;
    if row.status.is_final() {
        return Err(Error::Final {
            op,
            status: row.status,
        });
    }
    let task = reader
        .tasks(op)?
        .into_iter()
        .find(|t| t.name == step || t.step == step)
        .ok_or_else(|| Error::UnknownStep {
            op,
            step: step.to_owned(),
        })?;
    let dead_owner = dead_owner_or_refuse(&row)?;
    let request = Request {
        by: whoami(),
        at: now(),
        reason: Some(reason),
    };
    store
        .apply(vec![Change::Mark {
            op,
            task: task.task_no,
            status,
            outputs,
            dead_owner,
            request,
        }])
        .await
        .map_err(|e| match e {
            store::Error::Owned {
                op,
                owner,
                lease_until,
            } => Error::Owned {
                op,
                owner,
                lease: show_time(lease_until),
            },
            other => Error::Store(other),
        })?;
    Ok(())
}

/// Takes the op over, ends what its dead owner left running, and loads its state.
#[allow(clippy::too_many_arguments)]
async fn take_and_load(
    store: &Store,
    reader: &Reader,
    row: &store::OpRow,
    options: Options,
    overrides: Overrides,
    progress: Sink,
    stop: StopHandle,
    kind: &'static str,
    verb: &str,
    reopen: bool,
) -> Result<Result<(Arc<Shared>, Vec<TaskState>), Acquired>, Error> {
    let op = row.id;
    let plan = snapshot_plan(reader, op)?;
    check_supported(&plan)?;
    let stored: Map<String, Value> = row.params.as_object().cloned().unwrap_or_default();
    let key = if stored.values().any(secrets::is_sealed) {
        secrets::key(store.path(), false)?
    } else {
        None
    };
    let params = secrets::open(&stored, key.as_ref())?;
    let (acquired, me) = take(
        store, row, &options, overrides, &progress, &stop, kind, verb, reopen,
    )
    .await?;
    if acquired != Acquired::Yes {
        return Ok(Err(acquired));
    }
    progress(&Progress::OpStarted {
        op,
        title: row.title.clone(),
        resumed: true,
    });
    sweep(store, reader, row, &plan, &me, &options, &progress).await?;
    let env: BTreeMap<String, String> = row
        .env
        .iter()
        .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
        .collect();
    let secrets = secret_values(&plan, &params);
    let shared = shared(
        store,
        Arc::new(plan),
        op,
        row.uuid.clone(),
        row.title.clone(),
        me,
        params,
        env,
        PathBuf::from(&row.workdir),
        options,
        progress,
        stop,
        secrets,
    )?;
    let mut tasks = vec![
        TaskState {
            status: TaskStatus::Pending,
            attempts: 0,
            retry_from: 0,
            outputs: None
        };
        shared.steps.len()
    ];
    for t in reader.tasks(op)? {
        if let Some(state) = tasks.get_mut(t.task_no.0 as usize) {
            *state = TaskState {
                status: t.status,
                attempts: t.attempts,
                retry_from: t.retry_from,
                outputs: t.outputs,
            };
        }
    }
    Ok(Ok((shared, tasks)))
}

/// `by: reason`, for messages.
fn requester(request: &Request) -> String {
    match &request.reason {
        Some(reason) => format!("{}: {reason}", request.by),
        None => request.by.clone(),
    }
}

/// How `cairn cancel` ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CancelEnd {
    /// The op is canceled (by its owner, or by this process when it had none).
    Canceled,
    /// It already was.
    AlreadyCanceled,
    /// The request is recorded; the live owner had not finished canceling when this stopped waiting.
    Requested { owner: ProcessId },
}

/// Cancels an op. The request is recorded first (durably); a live owner acts on it, and this waits
/// for it (up to `wait`). An op that never started is canceled as it is. One that started and has
/// no live owner is taken over: what its dead owner left running is ended, its `on_cancel` hooks
/// run, and it ends `canceled`.
pub async fn cancel(
    store: &Store,
    op: OpId,
    reason: Option<String>,
    options: Options,
    wait: std::time::Duration,
    progress: Sink,
) -> Result<CancelEnd, Error> {
    let reader = store.reader()?;
    let row = read_op(&reader, op)?;
    match row.status {
        OpStatus::Canceled => return Ok(CancelEnd::AlreadyCanceled),
        OpStatus::Succeeded => {
            return Err(Error::Refused(format!(
                "op {op} has succeeded; there is nothing to cancel"
            )));
        }
        _ => {}
    }
    let request = Request {
        by: whoami(),
        at: now(),
        reason,
    };
    store
        .apply(vec![Change::RequestCancel {
            op,
            request: request.clone(),
        }])
        .await
        .map_err(|e| match e {
            store::Error::Conflict { status, .. } => Error::Refused(format!(
                "op {op} has ended ({status}); there is nothing to cancel"
            )),
            other => Error::Store(other),
        })?;
    let deadline = std::time::Instant::now() + wait;
    loop {
        let row = read_op(&reader, op)?;
        match (row.status, owner::owner_state(&row, now())) {
            (OpStatus::Canceled, _) => return Ok(CancelEnd::Canceled),
            (OpStatus::Succeeded, _) => {
                return Err(Error::Refused(format!(
                    "op {op} succeeded before the cancel took effect"
                )));
            }
            (_, OwnerState::Alive(owner)) => {
                if std::time::Instant::now() >= deadline {
                    return Ok(CancelEnd::Requested { owner });
                }
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
            (_, state) if row.started_at.is_none() => {
                // Nothing of it ever ran: no step to end, no hook to run.
                let dead_owner = match state {
                    OwnerState::Dead(owner) => Some(owner),
                    _ => None,
                };
                match store
                    .apply(vec![Change::CancelUnstarted {
                        op,
                        dead_owner,
                        request: request.clone(),
                    }])
                    .await
                {
                    Ok(_) => return Ok(CancelEnd::Canceled),
                    // It started (or was taken) meanwhile: look again.
                    Err(store::Error::Conflict { .. }) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            _ => {
                // It started and its owner is gone: finish the cancel here.
                let overrides = Overrides {
                    no_wait: true,
                    ignore_cooldown: false,
                    ignore_pause: true,
                };
                let taken = take_and_load(
                    store,
                    &reader,
                    &row,
                    options.clone(),
                    overrides,
                    progress.clone(),
                    stop_handle(),
                    "cancel-taken",
                    "taken over to cancel it",
                    false,
                )
                .await;
                let (shared, tasks) = match taken {
                    Ok(Ok(loaded)) => loaded,
                    Ok(Err(_)) => {
                        return Err(Error::Refused(format!(
                            "op {op} could not be taken over to cancel it"
                        )));
                    }
                    // Another process took it first: wait for that one.
                    Err(Error::Owned { .. }) => continue,
                    Err(e) => return Err(e),
                };
                return match runner::run(shared, tasks, Some(requester(&request)), None).await {
                    RunEnd::Canceled(_) => Ok(CancelEnd::Canceled),
                    other => Err(Error::Refused(format!(
                        "op {op} could not be canceled: it ended {}",
                        other.status()
                    ))),
                };
            }
        }
    }
}

/// Answers an approval gate of an op, with or without a live owner (a waiting `run` goes on by
/// itself; otherwise `cairn resume` does).
pub async fn approve(
    store: &Store,
    op: OpId,
    step: &str,
    approve: bool,
    comment: Option<String>,
) -> Result<(), Error> {
    let reader = store.reader()?;
    read_op(&reader, op)?;
    let task = reader
        .tasks(op)?
        .into_iter()
        .find(|t| t.name == step || t.step == step)
        .ok_or_else(|| Error::UnknownStep {
            op,
            step: step.to_owned(),
        })?;
    store
        .apply(vec![Change::Approve {
            op,
            task: task.task_no,
            approve,
            request: Request {
                by: whoami(),
                at: now(),
                reason: comment,
            },
        }])
        .await
        .map_err(|e| match e {
            store::Error::Conflict { reason, .. } => Error::Refused(format!("op {op}: {reason}")),
            other => Error::Store(other),
        })?;
    Ok(())
}

/// One line of `resume --dry-run`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Planned {
    pub task: String,
    pub status: TaskStatus,
    /// Kept as it is (succeeded or skipped), or run again.
    pub kept: bool,
}

/// What a resume would keep and what it would run, without changing anything.
pub fn dry_run(
    reader: &Reader,
    op: OpId,
    from: Option<&str>,
) -> Result<(store::OpRow, Vec<Planned>), Error> {
    let row = read_op(reader, op)?;
    if row.status == OpStatus::Canceled {
        return Err(Error::Final {
            op,
            status: row.status,
        });
    }
    let again = match from {
        Some(step) => rerun_from(&snapshot_plan(reader, op)?, op, step)?,
        None => Vec::new(),
    };
    let planned = reader
        .tasks(op)?
        .into_iter()
        .map(|t| {
            let rerun = again.contains(&(t.task_no.0 as usize));
            Planned {
                task: t.name,
                status: t.status,
                kept: t.status.is_kept() && !rerun,
            }
        })
        .collect();
    Ok((row, planned))
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
