//! What the CLI asks of the engine: start an op and run it, resume one, say what a resume would do.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64};

use plans::model::Plan;
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
    #[error("{0}")]
    SubPlan(String),
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
    /// Its sub-plans and theirs, by absolute path (see [`crate::children::load`]).
    pub files: Vec<(String, String)>,
    /// The op and task that start it, for a sub-plan's op.
    pub parent: Option<(OpId, TaskNo)>,
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
#[expect(
    clippy::too_many_lines,
    reason = "to be split by the re-layering of the engine (issue 17)"
)]
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
    // A sub-plan's op waiting for its lock is canceled with its parent (or an op above it).
    let (ancestors, _) = crate::children::lineage(&reader, reader.op(op)?.parent)?;
    loop {
        let row = read_op(&reader, op)?;
        if row.status.is_final() && !(reopen && row.status == OpStatus::Succeeded) {
            return Ok(Acquired::Canceled);
        }
        if overrides.requeue && crate::runner::draining() && row.started_at.is_none() {
            // The process drains (`serve` stops): an op that has not started does not start now.
            if owns_queued {
                store
                    .apply(vec![requeued(op, me, "the server stops")])
                    .await?;
            }
            return Ok(Acquired::Stopped);
        }
        let cancel = row.cancel.clone().or_else(|| {
            ancestors
                .iter()
                .find_map(|&a| reader.op(a).ok().and_then(|r| r.cancel))
        });
        if owns_queued && let Some(request) = &cancel {
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
            // A sub-plan's op does not wait for a holder that has stopped (failed, interrupted):
            // in a tree of ops nobody would resume that holder while this one waits.
            Err(Some(store::Error::LockHeld { key, holder }))
                if !overrides.no_wait
                    && (ancestors.is_empty()
                        || reader
                            .op(holder)
                            .is_ok_and(|h| !crate::owner::shown_status(&h, now()).is_ended())) =>
            {
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
                if owns_queued && overrides.requeue && row.started_at.is_none() {
                    // `serve` tries it again later: it goes back to the queue.
                    let _ = store
                        .apply(vec![requeued(op, me, &error.to_string())])
                        .await;
                } else if owns_queued {
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
        let asked_to_stop = tokio::select! {
            () = tokio::time::sleep(std::time::Duration::from_millis(500)) => false,
            _ = stopped.wait_for(|s| *s) => true,
        };
        if asked_to_stop {
            let requeue = overrides.requeue && read_op(&reader, op)?.started_at.is_none();
            let change = if requeue {
                requeued(op, me, "stopped while waiting to start")
            } else {
                Change::SetOp {
                    op,
                    owner: Some(me.clone()),
                    status: OpStatus::Interrupted,
                    at: now(),
                    error: Some("stopped while waiting to start".to_owned()),
                    release: true,
                    kind: "op-interrupted",
                    message: "stopped while waiting to start".to_owned(),
                }
            };
            store.apply(vec![change]).await?;
            return Ok(Acquired::Stopped);
        }
    }
}

/// A task of an op by its name (`restore[s3]`), or by its step (the step's own task).
fn find_task(reader: &Reader, op: OpId, step: &str) -> Result<store::TaskRow, Error> {
    let tasks = reader.tasks(op)?;
    let by_name = tasks.iter().position(|t| t.name == step);
    by_name
        .or_else(|| tasks.iter().position(|t| t.step == step))
        .map(|i| tasks[i].clone())
        .ok_or_else(|| Error::UnknownStep {
            op,
            step: step.to_owned(),
        })
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
        kind: "op-requeued",
        message: format!("back in the queue: {why}"),
    }
}

/// The op to store for `new`: title and lock key rendered, secrets sealed, one task per step;
/// `queued`, with no owner (the caller sets one to run it at once). `held`: lock keys its
/// ancestors hold (a sub-plan's op does not take them again).
fn new_op(
    store: &Store,
    new: &NewRun,
    held: &[String],
    overrides: Overrides,
) -> Result<NewOp, Error> {
    let uuid = uuid::Uuid::now_v7().to_string();
    let title = match &new.plan.title {
        Some(t) => render_header(t, new, &uuid, "title")?,
        None => new.plan.name.clone(),
    };
    let lock = new
        .plan
        .lock
        .as_ref()
        .map(|t| render_header(t, new, &uuid, "lock key"))
        .transpose()?
        // A sub-plan's op runs under its ancestors' locks: it never waits for them.
        .filter(|key| !held.contains(key));
    let secret = secret_names(&new.plan);
    let stored_params = if secret.iter().any(|n| new.params.contains_key(*n)) {
        let key =
            secrets::key(&store.secret_key_file(), true)?.ok_or_else(|| secrets::Error::Key {
                path: store.secret_key_file(),
                reason: "it could not be created".into(),
            })?;
        secrets::seal(&new.params, &secret, &key)
    } else {
        new.params.clone()
    };
    Ok(NewOp {
        uuid,
        snapshot: Snapshot {
            hash: plans::bundle::hash(&new.plan.text, &new.files),
            name: new.plan.name.clone(),
            text: new.plan.text.clone(),
            files: new.files.clone(),
        },
        title,
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
        at: now(),
        owner: None,
        start: false,
        lock,
        cooldown_ms: new
            .plan
            .cooldown
            .map(|c| i64::try_from(c.as_millis()).unwrap_or(i64::MAX)),
        ignore_cooldown: overrides.ignore_cooldown,
        parent: new.parent,
        fired_by: None,
    })
}

/// Queues an op for `cairn serve` (`cairn submit`): stored `queued`, owned by nobody; its lock is
/// taken when a `serve` starts it. `fired_by`: the schedule firing it is (stored only once).
pub async fn submit(
    store: &Store,
    new: NewRun,
    fired_by: Option<(String, Millis)>,
) -> Result<OpId, Error> {
    let mut op = new_op(store, &new, &[], Overrides::default())?;
    op.fired_by = fired_by;
    match store.apply(vec![Change::Submit(op)]).await?.pop() {
        Some(Applied::Submitted { id, .. }) => Ok(id),
        _ => Err(Error::Store(store::Error::Closed)),
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
    let paused = check_pause(store, overrides)?;
    let (ancestors, held) = crate::children::lineage(&store.reader()?, new.parent)?;
    let me = owner::me();
    let mut op = new_op(store, &new, &held, overrides)?;
    op.owner = Some((me.clone(), lease_until(&options)));
    op.start = true;
    let (uuid, title) = (op.uuid.clone(), op.title.clone());
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
    let secrets = secret_values(&new.plan, &new.params, &[]);
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
        Arc::new(new.files.into_iter().collect()),
        ancestors,
    )?;
    let tasks = TaskState::initial(&shared.steps);
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
    files: crate::children::Files,
    ancestors: Vec<OpId>,
) -> Result<Arc<Shared>, Error> {
    let outputs = runner::OutputFiles::new(&uuid).map_err(|e| {
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
        outputs,
        secrets,
        stop_tx: stop,
        stop: receiver,
        lost: AtomicBool::new(false),
        // The claim was made just before, with this length.
        lease_until: AtomicI64::new(lease_until(&options_lease)),
        steps,
        hooks,
        stop_reason: Arc::new(std::sync::Mutex::new(None)),
        files,
        ancestors,
        outcome: std::sync::Mutex::new(None),
        base_context: std::sync::OnceLock::new(),
        param_env: std::sync::OnceLock::new(),
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

/// Ends the processes an attempt left running (on this machine); how many there were.
async fn end_leftovers(uuid: &str, attempt: &store::AttemptRow, options: &Options) -> usize {
    let marker = format!("{uuid}/{}/{}", attempt.task_no.0, attempt.n);
    let same_machine = attempt
        .process
        .as_ref()
        .is_none_or(|p| p.boot_id == steps::proc::boot_id());
    if !same_machine {
        return 0;
    }
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
}

/// Ends the processes left by the running attempts of `op`'s child ops (and theirs) whose owner is
/// gone, when `op` is taken over: nothing of a dead run may go on while the op's tasks are decided
/// again. Their attempts are recorded when the children themselves are resumed.
fn end_children_leftovers<'a>(
    reader: &'a Reader,
    op: OpId,
    options: &'a Options,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), Error>> + Send + 'a>> {
    Box::pin(async move {
        for child in reader.children(op)? {
            if child.status.is_final()
                || matches!(owner::owner_state(&child, now()), OwnerState::Alive(_))
            {
                continue;
            }
            for attempt in reader
                .attempts(child.id)?
                .into_iter()
                .filter(|a| a.status == AttemptStatus::Running)
            {
                end_leftovers(&child.uuid, &attempt, options).await;
            }
            end_children_leftovers(reader, child.id, options).await?;
        }
        Ok(())
    })
}

/// Ends whatever is left of attempts that were running when their owner died, and records them
/// interrupted, before any task runs again.
async fn sweep(
    store: &Store,
    reader: &Reader,
    row: &store::OpRow,
    me: &ProcessId,
    options: &Options,
    progress: &Sink,
) -> Result<(), Error> {
    let names: std::collections::HashMap<TaskNo, String> = reader
        .tasks(row.id)?
        .into_iter()
        .map(|t| (t.task_no, t.name))
        .collect();
    for attempt in reader
        .attempts(row.id)?
        .into_iter()
        .filter(|a| a.status == AttemptStatus::Running)
    {
        let step = names
            .get(&attempt.task_no)
            .map_or("?", String::as_str)
            .to_owned();
        let count = end_leftovers(&row.uuid, &attempt, options).await;
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
#[allow(clippy::too_many_arguments)]
pub async fn resume(
    store: &Store,
    op: OpId,
    from: Option<&str>,
    replan: Option<Replan>,
    options: Options,
    overrides: Overrides,
    progress: Sink,
    stop: StopHandle,
) -> Result<RunEnd, Error> {
    resume_as(
        store,
        op,
        from,
        replan,
        ("resumed", "resumed"),
        options,
        overrides,
        progress,
        stop,
    )
    .await
}

/// [`resume`], saying why in the op's events: `(kind, verb)`, e.g. `("auto-resumed", "resumed
/// by cairn serve")`. A queued op is started the same way.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn resume_as(
    store: &Store,
    op: OpId,
    from: Option<&str>,
    replan: Option<Replan>,
    (kind, verb): (&'static str, &str),
    options: Options,
    overrides: Overrides,
    progress: Sink,
    stop: StopHandle,
) -> Result<RunEnd, Error> {
    let reader = store.reader()?;
    let row = read_op(&reader, op)?;
    if row.status == OpStatus::Succeeded && from.is_none() && replan.is_none() {
        // Resuming after a crash must be safe to repeat: the work is done, and that is success.
        progress(&Progress::AlreadyDone { op });
        return Ok(RunEnd::Succeeded);
    }
    // An edited plan: refused unless accepted, and unless done work that changed is to run again.
    let drifted = match &replan {
        Some(r) => Some(plan_drift(&reader, op, r)?),
        None => None,
    };
    let rerun = match from {
        Some(step) => Some(rerun_from(
            replan
                .as_ref()
                .map_or(&snapshot_plan(&reader, op)?, |r| &r.plan),
            op,
            step,
        )?),
        None => None,
    };
    let paused = if row.cancel.is_none() {
        check_pause(store, overrides)?
    } else {
        None
    };
    let reopen = rerun.is_some() || replan.is_some();
    let (shared, mut tasks) = match take_and_load(
        store,
        &reader,
        &row,
        (options, overrides, progress, stop),
        kind,
        verb,
        reopen,
        replan.map(|r| (r, drifted.clone().unwrap_or_default())),
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
    let mut again: Vec<usize> = rerun.unwrap_or_default();
    let why = from.map(|step| format!("run again from `{step}`"));
    again.sort_unstable();
    again.dedup();
    if let Some(why) = why.filter(|_| !again.is_empty()) {
        ending = None;
        rerun_tasks(&shared, &mut tasks, again, &why).await?;
    }
    if ending.is_some() && drifted.is_some() {
        // An edited plan: the outcome is decided again, by the new plan's tasks.
        ending = None;
    }
    if ending.is_none() {
        // A new run decides a new outcome: finishing hooks that ran for an earlier one (a failed
        // op's `on_failure`) run again for this one.
        let hooks = &shared.hooks;
        let done: Vec<usize> = hooks
            .on_success
            .iter()
            .chain(&hooks.on_failure)
            .chain(&hooks.on_cancel)
            .copied()
            .filter(|&i| tasks.get(i).is_some_and(|t| t.status.is_kept()))
            .collect();
        if !done.is_empty() {
            store
                .apply(vec![Change::ResetTasks {
                    op,
                    owner: shared.me.clone(),
                    tasks: done
                        .iter()
                        .map(|&i| TaskNo(u32::try_from(i).unwrap_or(u32::MAX)))
                        .collect(),
                    at: now(),
                    message: "the finishing hooks run again for this run's outcome".to_owned(),
                }])
                .await?;
            for i in done {
                tasks[i].status = TaskStatus::Pending;
                tasks[i].retry_from = tasks[i].attempts;
                tasks[i].outputs = None;
            }
        }
    }
    let cancel = row.cancel.as_ref().map(requester);
    Ok(runner::run(shared, tasks, cancel, ending).await)
}

/// Makes `steps` (and their fan-out items) and the finishing hooks pending again, with a fresh
/// retry round: they run again; nothing upstream of them does.
async fn rerun_tasks(
    shared: &Shared,
    tasks: &mut [TaskState],
    steps: Vec<usize>,
    why: &str,
) -> Result<(), Error> {
    let hooks = &shared.hooks;
    // A fan-out step's items run again with it (its list stays as it was frozen).
    let items: Vec<usize> = tasks
        .iter()
        .enumerate()
        .filter(|(no, t)| t.step.is_some_and(|s| s != *no && steps.contains(&s)))
        .map(|(no, _)| no)
        .collect();
    // A `plan:` step runs a new child op: one that had not ended is canceled first.
    let ids: Vec<String> = steps.iter().map(|&i| shared.step(i).id.clone()).collect();
    crate::children::cancel_children(
        &shared.store,
        shared.op,
        Some(&ids),
        &shared.options,
        &shared.progress,
    )
    .await
    .map_err(|e| Error::Refused(format!("a sub-plan of these steps still runs: {e}")))?;
    let names: Vec<&str> = steps.iter().map(|&i| shared.step(i).id.as_str()).collect();
    let message = format!("{why}, as asked by {}: {}", whoami(), names.join(", "));
    let again: Vec<usize> = steps
        .iter()
        .copied()
        .chain(
            hooks
                .on_success
                .iter()
                .chain(&hooks.on_failure)
                .chain(&hooks.on_cancel)
                .copied(),
        )
        .chain(items)
        .collect();
    shared
        .store
        .apply(vec![Change::ResetTasks {
            op: shared.op,
            owner: shared.me.clone(),
            tasks: again
                .iter()
                .map(|&i| TaskNo(u32::try_from(i).unwrap_or(u32::MAX)))
                .collect(),
            at: now(),
            message,
        }])
        .await?;
    for i in again {
        if let Some(t) = tasks.get_mut(i) {
            t.status = TaskStatus::Pending;
            t.retry_from = t.attempts;
            t.outputs = None;
            if t.step == Some(i) {
                // A fan-out step's list is expanded again.
                t.item = None;
            }
        }
    }
    Ok(())
}

/// An edited plan to resume an op with (`resume --plan FILE`).
#[derive(Debug, Clone)]
pub struct Replan {
    pub plan: Plan,
    /// Its sub-plans, read from the op's directory.
    pub files: Vec<(String, String)>,
    /// `--accept-plan-change`: without it, the diff is shown and nothing changes.
    pub accept: bool,
    /// `--rerun-changed`: changed steps that already succeeded run again, with what is downstream.
    pub rerun_changed: bool,
}

/// How an edited plan differs from an op's snapshot.
#[derive(Debug, Clone, Default)]
pub struct PlanDrift {
    pub drift: plans::drift::Drift,
    /// Changed or removed steps that had already succeeded or been skipped.
    pub kept_changed: Vec<String>,
    /// The op's params, read again for the new plan (its new defaults filled in).
    pub params: Map<String, Value>,
}

/// Compares an edited plan with the op's snapshot; refuses what `replan` does not allow: any
/// change without `accept`, a change to done work without `rerun_changed`, params that the new
/// plan does not take. A removed step that had run cannot run again: it is refused either way.
pub fn plan_drift(reader: &Reader, op: OpId, replan: &Replan) -> Result<PlanDrift, Error> {
    let old = snapshot_plan(reader, op)?;
    let snapshot = reader.snapshot(op)?;
    let row = read_op(reader, op)?;
    let mut drift = plans::drift::diff(&old, &replan.plan);
    // A `plan:` step whose sub-plan's text changed changed too.
    for (i, path) in replan.plan.sub_plans() {
        let key = plans::bundle::sub_plan_key(&row.workdir, path);
        let before = snapshot
            .files
            .iter()
            .find(|(k, _)| k == &key)
            .map(|(_, t)| t);
        let after = replan.files.iter().find(|(k, _)| k == &key).map(|(_, t)| t);
        let id = &replan.plan.steps[i].id;
        if before != after && old.step_index(id).is_some() && !drift.changed.contains(id) {
            drift.changed.push(id.clone());
        }
    }
    let tasks = reader.tasks(op)?;
    let children = reader.children(op)?;
    // Done work: a task of the step (its own, or an item) that succeeded, or a child op it ran.
    let kept = |id: &str| {
        tasks.iter().any(|t| {
            t.step == id
                && (t.status.is_kept()
                    || children.iter().any(|c| c.parent == Some((op, t.task_no))))
        })
    };
    let kept_changed: Vec<String> = drift
        .changed
        .iter()
        .chain(&drift.removed)
        .filter(|id| kept(id))
        .cloned()
        .collect();
    let diff = drift.render();
    if drift.is_empty() {
        return Err(Error::Refused(
            "the plan given is the op's plan: nothing changed; resume without `--plan`".to_owned(),
        ));
    }
    if !replan.accept {
        return Err(Error::Refused(format!(
            "the plan differs from op {op}'s:\n{diff}add `--accept-plan-change` to resume with it"
        )));
    }
    let removed_done: Vec<&String> = drift.removed.iter().filter(|id| kept(id)).collect();
    if !kept_changed.is_empty() && !replan.rerun_changed || !removed_done.is_empty() {
        let list: Vec<String> = kept_changed.iter().map(|s| format!("`{s}`")).collect();
        let hint = if removed_done.is_empty() {
            "; add `--rerun-changed` to run them (and what is downstream of them) again"
        } else {
            "; a removed step cannot run again: put it back, or start a new op"
        };
        return Err(Error::Refused(format!(
            "the plan changes steps of op {op} that already ran: {}\n{diff}refused{hint}",
            list.join(", ")
        )));
    }
    if drift.settings.iter().any(|k| k == "lock") {
        return Err(Error::Refused(format!(
            "the plan's `lock` changed:\n{diff}an op keeps the lock it was submitted with; start a new op"
        )));
    }
    // The op's params for the new plan, as stored: its values for the params the plan still
    // has, the new params' defaults.
    let given: Map<String, Value> = row.params.as_object().cloned().unwrap_or_default();
    let mut params = Map::new();
    let mut missing = Vec::new();
    for param in &replan.plan.params {
        match (given.get(&param.name), &param.default) {
            (Some(value), _) => {
                params.insert(param.name.clone(), value.clone());
            }
            (None, _) if param.secret => missing.push(format!("`{}` (a new secret)", param.name)),
            (None, Some(default)) => {
                params.insert(param.name.clone(), default.clone());
            }
            (None, None) if param.required => missing.push(format!("`{}`", param.name)),
            (None, None) => {}
        }
    }
    if !missing.is_empty() {
        return Err(Error::Refused(format!(
            "the new plan needs params op {op} was not given: {}; start a new op",
            missing.join(", ")
        )));
    }
    Ok(PlanDrift {
        drift,
        kept_changed,
        params,
    })
}

/// Old task number → new for every task of an op moving to `new` (its steps and hooks), and the
/// tasks of the steps `new` adds. Steps and hooks keep their ids; fan-out items, and tasks of
/// steps the plan no longer has (kept as history), follow them.
fn renumber(
    rows: &[store::TaskRow],
    old: &[plans::model::Step],
    new: &[plans::model::Step],
    new_steps: usize,
) -> (Vec<(TaskNo, TaskNo)>, Vec<NewTask>) {
    let no = |i: usize| TaskNo(u32::try_from(i).unwrap_or(u32::MAX));
    let mut map = Vec::with_capacity(rows.len());
    let mut taken = std::collections::HashSet::new();
    let mut next = new.len();
    let index: std::collections::HashMap<&str, usize> = new
        .iter()
        .enumerate()
        .map(|(j, s)| (s.id.as_str(), j))
        .collect();
    for row in rows {
        let i = row.task_no.0 as usize;
        let own = i < old.len() && old[i].id == row.step && row.name == row.step;
        if let Some(&j) = index.get(row.step.as_str()).filter(|_| own) {
            taken.insert(j);
            map.push((row.task_no, no(j)));
        } else {
            map.push((row.task_no, no(next)));
            next += 1;
        }
    }
    let added = (0..new_steps)
        .filter(|j| !taken.contains(j))
        .map(|j| NewTask {
            task_no: no(j),
            step: new[j].id.clone(),
            name: new[j].id.clone(),
            item: None,
        })
        .collect();
    (map, added)
}

/// What a sub-plan's op may do that a person's `run` may not: start while paused (its parent
/// already runs). Like a `run`, it waits for a lock another op holds (siblings of a fan-out that
/// share a lock key take turns).
fn child_overrides() -> Overrides {
    Overrides {
        no_wait: false,
        ignore_cooldown: false,
        ignore_pause: true,
        requeue: false,
    }
}

/// Submits and runs the child op of a `plan:` task, owned by this process.
pub(crate) async fn start_child(
    parent: &Shared,
    new: NewRun,
    stop: StopHandle,
) -> Result<(OpId, RunEnd), Error> {
    run(
        &parent.store,
        new,
        parent.options.clone(),
        child_overrides(),
        parent.progress.clone(),
        stop,
    )
    .await
}

/// Resumes the child op of a `plan:` task where it stopped.
pub(crate) async fn resume_child(
    parent: &Shared,
    op: OpId,
    stop: StopHandle,
) -> Result<RunEnd, Error> {
    resume(
        &parent.store,
        op,
        None,
        None,
        parent.options.clone(),
        child_overrides(),
        parent.progress.clone(),
        stop,
    )
    .await
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
    let task = find_task(&reader, op, step)?;
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
/// With `replace`, the op goes on with an edited plan (see [`plan_drift`]): its tasks are
/// renumbered to it once the op is taken and swept.
#[allow(clippy::too_many_arguments)]
async fn take_and_load(
    store: &Store,
    reader: &Reader,
    row: &store::OpRow,
    (options, overrides, progress, stop): (Options, Overrides, Sink, StopHandle),
    kind: &'static str,
    verb: &str,
    reopen: bool,
    replace: Option<(Replan, PlanDrift)>,
) -> Result<Result<(Arc<Shared>, Vec<TaskState>), Acquired>, Error> {
    let op = row.id;
    let mut plan = snapshot_plan(reader, op)?;
    let stored: Map<String, Value> = row.params.as_object().cloned().unwrap_or_default();
    let key = if stored.values().any(secrets::is_sealed) {
        secrets::key(&store.secret_key_file(), false)?
    } else {
        None
    };
    let sealed: Vec<String> = stored
        .iter()
        .filter(|(_, v)| secrets::is_sealed(v))
        .map(|(k, _)| k.clone())
        .collect();
    let mut params = secrets::open(&stored, key.as_ref())?;
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
        resumed: kind != "started",
    });
    sweep(store, reader, row, &me, &options, &progress).await?;
    end_children_leftovers(reader, op, &options).await?;
    runner::OutputFiles::remove_left(&row.uuid);
    if let Some((
        Replan {
            plan: new, files, ..
        },
        drift,
    )) = replace
    {
        let (old_steps, _) = runner::with_hooks(&plan);
        let (new_steps, _) = runner::with_hooks(&new);
        let rows = reader.tasks(op)?;
        let (renumber, tasks) = renumber(&rows, &old_steps, &new_steps, new.steps.len());
        let diff = drift.drift.render();
        // `--rerun-changed`: what runs again is reset in the same transaction as the new plan.
        let mut again: Vec<usize> = Vec::new();
        for id in &drift.kept_changed {
            if let Some(i) = new.step_index(id) {
                again.extend(new.dag.downstream(i));
            }
        }
        again.sort_unstable();
        again.dedup();
        let mut reset: Vec<TaskNo> = Vec::new();
        if !again.is_empty() {
            let ids: Vec<String> = again.iter().map(|&i| new.steps[i].id.clone()).collect();
            crate::children::cancel_children(store, op, Some(&ids), &options, &progress)
                .await
                .map_err(|e| {
                    Error::Refused(format!("a sub-plan of the changed steps still runs: {e}"))
                })?;
            for (row, (_, to)) in rows.iter().zip(&renumber) {
                let own = (to.0 as usize) < new.steps.len();
                if ids.contains(&row.step) && (own || (row.name != row.step && row.item.is_some()))
                {
                    reset.push(*to);
                }
            }
            let (_, hooks) = runner::with_hooks(&new);
            reset.extend(
                hooks
                    .on_success
                    .iter()
                    .chain(&hooks.on_failure)
                    .chain(&hooks.on_cancel)
                    .map(|&i| TaskNo(u32::try_from(i).unwrap_or(u32::MAX))),
            );
        }
        let mut env = row.env.clone();
        for (name, value) in capture_env(&new) {
            env.entry(name).or_insert(Value::String(value));
        }
        let mut batch = vec![Change::Replan {
            op,
            owner: me.clone(),
            snapshot: store::Snapshot {
                hash: plans::bundle::hash(&new.text, &files),
                name: new.name.clone(),
                text: new.text.clone(),
                files,
            },
            renumber,
            tasks,
            at: now(),
            message: format!(
                "resumed with an edited plan, accepted by {}: {}",
                whoami(),
                diff.lines().map(str::trim).collect::<Vec<_>>().join("; ")
            ),
            params: Value::Object(drift.params.clone()),
            env,
        }];
        if !reset.is_empty() {
            batch.push(Change::ResetTasks {
                op,
                owner: me.clone(),
                tasks: reset,
                at: now(),
                message: format!(
                    "run again: changed in the plan, as asked by {}: {}",
                    whoami(),
                    drift.kept_changed.join(", ")
                ),
            });
        }
        store.apply(batch).await?;
        // New defaults fill in; secrets stay as they were given.
        for (name, value) in drift.params {
            params.entry(name).or_insert(value);
        }
        plan = new;
    }
    let env: BTreeMap<String, String> = row
        .env
        .iter()
        .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
        .collect();
    let secrets = secret_values(&plan, &params, &sealed);
    let files = reader.snapshot(op)?.files.into_iter().collect();
    let (ancestors, _) = crate::children::lineage(reader, row.parent)?;
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
        Arc::new(files),
        ancestors,
    )?;
    let tasks = TaskState::load(&shared.steps, reader.tasks(op)?);
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
                    requeue: false,
                };
                let taken = take_and_load(
                    store,
                    &reader,
                    &row,
                    (options.clone(), overrides, progress.clone(), stop_handle()),
                    "cancel-taken",
                    "taken over to cancel it",
                    false,
                    None,
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
                // Its sub-plans' ops that have not ended are canceled first, with their hooks.
                for child in reader.children(op)? {
                    if !child.status.is_final() {
                        let _ = Box::pin(cancel(
                            store,
                            child.id,
                            request.reason.clone(),
                            options.clone(),
                            wait,
                            progress.clone(),
                        ))
                        .await;
                    }
                }
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
    let task = find_task(&reader, op, step)?;
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
    let plan = snapshot_plan(reader, op)?;
    let again = match from {
        Some(step) => rerun_from(&plan, op, step)?,
        None => Vec::new(),
    };
    let planned = reader
        .tasks(op)?
        .into_iter()
        .map(|t| {
            // A fan-out item runs again with its step.
            let step = if t.name == t.step {
                t.task_no.0 as usize
            } else {
                plan.step_index(&t.step).unwrap_or(usize::MAX)
            };
            let rerun = again.contains(&step);
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
