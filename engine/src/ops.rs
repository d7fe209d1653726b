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
    ProcessId, Reader, Snapshot, Store, TaskNo, TaskStatus,
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
        .filter(|s| {
            matches!(s.action, Action::Approve { .. } | Action::Plan { .. }) || s.for_each.is_some()
        })
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
    let mut unsupported = unsupported;
    let hooks = &plan.hooks;
    if !(hooks.pre.is_empty()
        && hooks.on_success.is_empty()
        && hooks.on_failure.is_empty()
        && hooks.on_cancel.is_empty())
    {
        unsupported.push("`hooks`".to_owned());
    }
    if plan.lock.is_some() {
        unsupported.push("`lock`".to_owned());
    }
    if unsupported.is_empty() {
        Ok(())
    } else {
        Err(Error::Unsupported(format!(
            "{} use features that come in a later version",
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

/// Stores a new op owned by this process (submit and take in one transaction, so no other
/// process can claim it in between), then runs it.
pub async fn run(
    store: &Store,
    new: NewRun,
    options: Options,
    progress: Sink,
    stop: StopHandle,
) -> Result<(OpId, RunEnd), Error> {
    check_supported(&new.plan)?;
    let uuid = uuid::Uuid::now_v7().to_string();
    let title = match &new.plan.title {
        Some(t) => render_title(t, &new, &uuid)?,
        None => new.plan.name.clone(),
    };
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
    let op = NewOp {
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
    };
    let mut applied = store.apply(vec![Change::Submit(op)]).await?;
    let Some(Applied::Submitted { id, .. }) = applied.pop() else {
        return Err(Error::Store(store::Error::Closed));
    };
    progress(&Progress::OpStarted {
        op: id,
        title: title.clone(),
        resumed: false,
    });
    let tasks = vec![
        TaskState {
            status: TaskStatus::Pending,
            attempts: 0,
            retry_from: 0,
            outputs: None
        };
        new.plan.steps.len()
    ];
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
    Ok((id, runner::run(shared, tasks).await))
}

fn render_title(template: &Template, new: &NewRun, uuid: &str) -> Result<String, Error> {
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
        what: "title",
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

/// Takes an op over for this process: refused while its owner lives.
async fn take(
    store: &Store,
    row: &store::OpRow,
    options: &Options,
    kind: &'static str,
) -> Result<ProcessId, Error> {
    let op = row.id;
    if row.status.is_final() {
        return Err(Error::Final {
            op,
            status: row.status,
        });
    }
    let me = owner::me();
    let at = now();
    let dead = match owner::owner_state(row, at) {
        OwnerState::Alive(owner) => {
            return Err(Error::Owned {
                op,
                owner,
                lease: row.lease_until.map_or_else(|| "-".to_owned(), show_time),
            });
        }
        OwnerState::Dead(owner) => Some(owner),
        OwnerState::None => None,
    };
    let mut message = format!("resumed by {me}");
    if let Some(dead) = &dead {
        write!(message, "; its previous owner ({dead}) is gone").ok();
    }
    let claimed = store
        .apply(vec![Change::Claim {
            op,
            owner: me.clone(),
            lease_until: lease_until(options),
            dead_owner: dead,
            now: at,
            kind,
            message,
        }])
        .await;
    match claimed {
        Ok(_) => Ok(me),
        Err(store::Error::Owned {
            op,
            owner,
            lease_until,
        }) => Err(Error::Owned {
            op,
            owner,
            lease: show_time(lease_until),
        }),
        Err(store::Error::Conflict { op, status, .. }) => Err(Error::Final { op, status }),
        Err(e) => Err(e.into()),
    }
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
    for attempt in reader
        .attempts(row.id)?
        .into_iter()
        .filter(|a| a.status == AttemptStatus::Running)
    {
        let step = plan
            .steps
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

/// Continues an op where it stopped, with its plan snapshot.
pub async fn resume(
    store: &Store,
    op: OpId,
    options: Options,
    progress: Sink,
    stop: StopHandle,
) -> Result<RunEnd, Error> {
    let reader = store.reader()?;
    let row = read_op(&reader, op)?;
    if row.status == OpStatus::Succeeded {
        // Resuming after a crash must be safe to repeat: the work is done, and that is success.
        progress(&Progress::AlreadyDone { op });
        return Ok(RunEnd::Succeeded);
    }
    let plan = snapshot_plan(&reader, op)?;
    check_supported(&plan)?;
    let stored: Map<String, Value> = row.params.as_object().cloned().unwrap_or_default();
    let key = if stored.values().any(secrets::is_sealed) {
        secrets::key(store.path(), false)?
    } else {
        None
    };
    let params = secrets::open(&stored, key.as_ref())?;
    let me = take(store, &row, &options, "resumed").await?;
    progress(&Progress::OpStarted {
        op,
        title: row.title.clone(),
        resumed: true,
    });
    sweep(store, &reader, &row, &plan, &me, &options, &progress).await?;
    let tasks: Vec<TaskState> = {
        let mut states = vec![
            TaskState {
                status: TaskStatus::Pending,
                attempts: 0,
                retry_from: 0,
                outputs: None
            };
            plan.steps.len()
        ];
        for t in reader.tasks(op)? {
            if let Some(state) = states.get_mut(t.task_no.0 as usize) {
                *state = TaskState {
                    status: t.status,
                    attempts: t.attempts,
                    retry_from: t.retry_from,
                    outputs: t.outputs,
                };
            }
        }
        states
    };
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
    Ok(runner::run(shared, tasks).await)
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
pub fn dry_run(reader: &Reader, op: OpId) -> Result<(store::OpRow, Vec<Planned>), Error> {
    let row = read_op(reader, op)?;
    if row.status == OpStatus::Canceled {
        return Err(Error::Final {
            op,
            status: row.status,
        });
    }
    let planned = reader
        .tasks(op)?
        .into_iter()
        .map(|t| Planned {
            task: t.name,
            status: t.status,
            kept: t.status.is_kept(),
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
