//! Running an owned op: the scheduler, one task's attempts, logs, heartbeats.
//!
//! The rules this file keeps (ARCHITECTURE.md, "Crash rules"):
//! - an attempt is committed `running` before its process is spawned;
//! - a task's completion is committed before any task that needs it is scheduled: a task's future
//!   returns only after its completion's commit, and dependents are released from that return;
//! - a failure stops new tasks from starting; running ones finish; the op ends `failed`;
//! - a stop (Ctrl-C, SIGTERM, lost ownership) ends running steps' groups and leaves their tasks
//!   pending for a resume.

use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::{Duration, Instant};

use plans::model::{Action, ForEach, Plan, Step};
use plans::template::Context;
use serde_json::{Map, Value};
use steps::spawn::{self, Chunk, Spec, Stopped};
use store::{
    AttemptStatus, Change, Error as StoreError, NewTask, OpId, OpStatus, Outcome as TaskOutcome,
    ProcessId, Store, TaskNo, TaskStatus,
};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

use crate::children::ChildEnd;
use crate::owner::{now, to_store};
use crate::progress::{Progress, Sink};

/// Set when this process drains (`cairn serve` asked to stop): no task starts any more; the ones
/// running go on to their end, and their ops end interrupted, to be resumed.
static DRAINING: AtomicBool = AtomicBool::new(false);

/// Stops every run of this process from starting tasks (see [`DRAINING`]).
pub fn drain() {
    DRAINING.store(true, Ordering::SeqCst);
}

pub(crate) fn draining() -> bool {
    DRAINING.load(Ordering::SeqCst)
}

/// Knobs of a run.
#[derive(Debug, Clone)]
pub struct Options {
    /// Between TERM and KILL when steps must stop.
    pub grace: Duration,
    /// How long an owner's lease lasts without renewal.
    pub lease: Duration,
    /// How often the lease is renewed.
    pub heartbeat: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            grace: Duration::from_secs(10),
            lease: Duration::from_secs(30),
            heartbeat: Duration::from_secs(5),
        }
    }
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunEnd {
    Succeeded,
    Failed(String),
    /// Stopped by a signal; resumable.
    Interrupted,
    /// Canceled (by `cairn cancel`); the `on_cancel` hooks ran.
    Canceled(String),
    /// Another process took the op over (or the store refused this owner): nothing more was written.
    LostOwnership(String),
    /// The store could not record progress (disk full, I/O error): the op stays as it was recorded,
    /// shown `interrupted` once this process exits, and resumable.
    StoreFailed(String),
}

impl RunEnd {
    #[must_use]
    pub fn status(&self) -> OpStatus {
        match self {
            Self::Succeeded => OpStatus::Succeeded,
            Self::Failed(_) => OpStatus::Failed,
            Self::Canceled(_) => OpStatus::Canceled,
            _ => OpStatus::Interrupted,
        }
    }
}

/// What a task ended as, as the scheduler needs it.
#[derive(Debug)]
enum TaskEnd {
    Done {
        status: TaskStatus,
        outputs: Option<Map<String, Value>>,
        error: Option<String>,
    },
    Interrupted,
    /// A fan-out step's list was expanded into its items' tasks.
    Expanded,
    /// Ended, but not yet recorded: the run loop records it, if it can together with the first
    /// commit of a task it releases (see [`Record`]). Only a job with `defer` ends this way.
    Unrecorded {
        status: TaskStatus,
        outputs: Option<Map<String, Value>>,
        error: Option<String>,
        record: Box<Record>,
    },
}

/// The end of a task that is not yet durable: the change that records it and the line that says
/// so once it is.
///
/// On a serial chain the end of one step and the start of the next would be two durable commits,
/// one after the other, each waited for. Instead the run loop hands the record to the one task the
/// end releases, whose first commit carries it: both batches in one transaction, the record's
/// first, each in its own savepoint (see `Store::apply_together`). The released task starts
/// nothing before that commit is in and the record in it succeeded; any other task that needs the
/// ended one waits for `recorded` before it is launched; and a record that no task carries is
/// applied by the loop itself before it goes on. So a task still never starts before the ends of
/// its needs are durable (invariant 3), with one commit fewer per step.
pub(crate) struct Record {
    change: Change,
    progress: Progress,
    /// `Some(true)` once durable, `Some(false)` if it could not be recorded.
    recorded: watch::Sender<Option<bool>>,
}

impl std::fmt::Debug for Record {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Record").finish_non_exhaustive()
    }
}

/// A task's state as the scheduler keeps it.
#[derive(Debug, Clone)]
pub(crate) struct TaskState {
    pub status: TaskStatus,
    pub attempts: u32,
    /// Attempts before the current retry round (see `store::TaskRow::retry_from`).
    pub retry_from: u32,
    pub outputs: Option<Map<String, Value>>,
    /// The step (or hook) it runs, by index into `Shared::steps`; `None` for a task of a step the
    /// plan no longer has (after `resume --plan`), which is kept as history and never runs.
    pub step: Option<usize>,
    pub name: String,
    /// A fan-out item's value; on a fan-out step's own task, the frozen list once expanded.
    pub item: Option<Value>,
}

impl TaskState {
    /// A task not yet stored or not yet run.
    pub(crate) fn new(step: usize, name: String, item: Option<Value>) -> Self {
        Self {
            status: TaskStatus::Pending,
            attempts: 0,
            retry_from: 0,
            outputs: None,
            step: Some(step),
            name,
            item,
        }
    }

    /// The op's tasks before anything ran: the steps, then the hooks.
    pub(crate) fn initial(steps: &[Step]) -> Vec<Self> {
        steps
            .iter()
            .enumerate()
            .map(|(i, s)| Self::new(i, s.id.clone(), None))
            .collect()
    }

    /// The op's tasks as stored, in task order, for `steps` (the plan's steps, then its hooks).
    pub(crate) fn load(steps: &[Step], rows: Vec<store::TaskRow>) -> Vec<Self> {
        let mut tasks = Self::initial(steps);
        for row in rows {
            let no = row.task_no.0 as usize;
            let step = if no < steps.len() && row.step == steps[no].id {
                Some(no)
            } else if no >= steps.len() && row.item.is_some() {
                // A fan-out item: its step must still fan out.
                steps
                    .iter()
                    .position(|s| s.id == row.step && s.for_each.is_some())
            } else {
                None
            };
            let state = Self {
                status: row.status,
                attempts: row.attempts,
                retry_from: row.retry_from,
                outputs: row.outputs,
                step,
                name: row.name,
                item: row.item,
            };
            if no >= tasks.len() {
                tasks.resize_with(no + 1, || Self {
                    step: None,
                    ..Self::new(0, String::new(), None)
                });
            }
            tasks[no] = state;
        }
        tasks
    }

    /// The job that runs this task (task number `no`), if it still belongs to the plan.
    fn job(&self, no: usize) -> Option<Job> {
        Some(Job {
            no,
            step: self.step?,
            name: self.name.clone(),
            item: if self.step == Some(no) {
                None
            } else {
                self.item.clone()
            },
            defer: false,
        })
    }
}

/// What one task runs: a step (or hook), or one item of a fan-out step.
#[derive(Debug, Clone)]
pub(crate) struct Job {
    /// The task number.
    pub no: usize,
    /// The step, by index into `Shared::steps`.
    pub step: usize,
    /// `restore[shard-3]`, or the step's id.
    pub name: String,
    /// The fan-out item, for an item's task.
    pub item: Option<Value>,
    /// Whether its final end may be left to the run loop to record ([`TaskEnd::Unrecorded`]).
    pub defer: bool,
}

impl Job {
    pub(crate) fn task(&self) -> TaskNo {
        TaskNo(u32::try_from(self.no).unwrap_or(u32::MAX))
    }
}

/// Failures that end the run, not just a task.
#[derive(Debug)]
enum Fatal {
    Lost(String),
    Store(String),
}

impl From<StoreError> for Fatal {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Owned { .. } | StoreError::Fenced { .. } | StoreError::NotFound(_) => {
                Self::Lost(e.to_string())
            }
            other => Self::Store(other.to_string()),
        }
    }
}

/// Everything a task needs, shared by all tasks of the run.
pub(crate) struct Shared {
    pub store: Store,
    pub plan: Arc<Plan>,
    pub op: OpId,
    pub uuid: String,
    pub title: String,
    pub me: ProcessId,
    /// The op's parameters, secrets in clear (they never leave this process but through `env`).
    pub params: Map<String, Value>,
    /// The base environment captured at submit.
    pub env: BTreeMap<String, String>,
    pub workdir: PathBuf,
    pub options: Options,
    pub progress: Sink,
    /// Attempts' `$CAIRN_OUTPUT` files.
    pub outputs: OutputFiles,
    /// Values that must never be written to logs.
    pub secrets: Vec<String>,
    /// Set when the run must stop: by a signal (the caller holds a clone) or by the engine itself.
    pub stop_tx: Arc<watch::Sender<bool>>,
    pub stop: watch::Receiver<bool>,
    /// Set when ownership was lost: nothing more may be written.
    pub lost: AtomicBool,
    /// Until when the lease is known to hold (the last successful claim or renewal).
    pub lease_until: AtomicI64,
    /// The plan's steps, then its hooks as steps (see [`with_hooks`]); indexed by task number.
    pub steps: Vec<Step>,
    pub hooks: HookTasks,
    /// Why the run is stopping, when the engine stopped it.
    pub stop_reason: Arc<std::sync::Mutex<Option<StopReason>>>,
    /// The plan's sub-plans (and theirs), from the snapshot: absolute path → text.
    pub files: crate::children::Files,
    /// The ops above this one, nearest first (for a sub-plan's op); a cancel of any ends it too.
    pub ancestors: Vec<OpId>,
    /// The op's outcome, once decided, for its finishing hooks.
    pub outcome: std::sync::Mutex<Option<EndState>>,
    /// What every task's template context holds (params, `op`, `env`), built once: a param may be
    /// a list of 100,000 items, and each item's task would otherwise convert it again.
    pub base_context: std::sync::OnceLock<Context>,
    /// The params as every process's environment passes them ([`param_env`]), made once.
    pub param_env: std::sync::OnceLock<BTreeMap<String, String>>,
    /// Set when the op failed: approval gates still waiting end (they cannot lead anywhere).
    pub gates: watch::Sender<bool>,
    /// A stop signal that never fires: finishing hooks run to their end even when the op was
    /// stopped. Its sender lives as long as this.
    pub calm: watch::Receiver<bool>,
    pub _calm_tx: watch::Sender<bool>,
}

/// Tasks running in this process, across all its ops (a `serve`'s, a sub-plan's): while at most
/// one does, its commits are made on the engine's own thread ([`commit_together`]).
static RUNNING: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// `task`, counted in [`RUNNING`] from now (its spawn) until it ends: a fan-out's items are all
/// counted before the first of them commits anything.
fn counted<F: std::future::Future>(task: F) -> impl std::future::Future<Output = F::Output> {
    struct Counted;
    impl Drop for Counted {
        fn drop(&mut self) {
            RUNNING.fetch_sub(1, Ordering::SeqCst);
        }
    }
    RUNNING.fetch_add(1, Ordering::SeqCst);
    let counted = Counted;
    async move {
        let _counted = counted;
        task.await
    }
}

/// Commits a task's own start or end, `batches` together (see [`Store::apply_together`]). While no
/// other task runs in this process, on this thread, when the writer is idle and the database free
/// ([`Store::apply_solo`]): the task waits for this commit anyway, and a serial chain's step is
/// spared two thread wakes. With other tasks running, through the writer, so that their commits
/// are shared. Writes made while a process runs (its pid, its logs, heartbeats) always go through
/// the writer: the engine's thread keeps reading the process's output meanwhile.
async fn commit_together(
    store: &Store,
    batches: Vec<Vec<Change>>,
) -> Vec<Result<Vec<store::Applied>, StoreError>> {
    if RUNNING.load(Ordering::SeqCst) > 1 {
        return store.apply_together(batches).await;
    }
    store.apply_solo(batches).await
}

/// Applies a batch, waiting out a database that another process holds (up to `patience`); `own`:
/// a task's own start or end ([`commit_together`]).
async fn apply(
    store: &Store,
    batch: Vec<Change>,
    patience: Duration,
    own: bool,
) -> Result<(), Fatal> {
    patiently(patience, || async {
        if own {
            commit_together(store, vec![batch.clone()])
                .await
                .pop()
                .unwrap_or(Err(StoreError::Closed))
        } else {
            store.apply(batch.clone()).await
        }
    })
    .await
    .map(drop)
    .map_err(Fatal::from)
}

/// Runs `write` again while it fails because another process holds the database, up to
/// `patience`, backing off between tries.
async fn patiently<T, F>(patience: Duration, mut write: impl FnMut() -> F) -> Result<T, StoreError>
where
    F: std::future::Future<Output = Result<T, StoreError>>,
{
    let started = Instant::now();
    let mut delay = Duration::from_millis(50);
    loop {
        match write().await {
            Err(e) if e.is_transient() && started.elapsed() < patience => {
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(1));
            }
            done => return done,
        }
    }
}

impl Shared {
    async fn apply(&self, batch: Vec<Change>) -> Result<(), Fatal> {
        self.apply_as(batch, false).await
    }

    /// [`Shared::apply`] for a task's own end (see [`commit_together`]).
    async fn apply_own(&self, batch: Vec<Change>) -> Result<(), Fatal> {
        self.apply_as(batch, true).await
    }

    async fn apply_as(&self, batch: Vec<Change>, own: bool) -> Result<(), Fatal> {
        if self.lost.load(Ordering::SeqCst) {
            return Err(Fatal::Lost("another process owns the op".into()));
        }
        apply(&self.store, batch, self.options.lease / 2, own).await
    }

    fn say(&self, p: &Progress) {
        (self.progress)(p);
    }

    fn stopping(&self) -> bool {
        *self.stop.borrow()
    }

    pub(crate) fn step(&self, i: usize) -> &Step {
        &self.steps[i]
    }

    /// Stops the run for `reason` (the first reason given is kept).
    pub(crate) fn stop_because(&self, reason: StopReason) {
        if let Ok(mut slot) = self.stop_reason.lock() {
            slot.get_or_insert(reason);
        }
        stop_all(self);
    }

    pub(crate) fn stop_reason(&self) -> Option<StopReason> {
        self.stop_reason.lock().ok().and_then(|r| r.clone())
    }

    /// A request to cancel this op, or an op above it (a sub-plan's parent), if one was made.
    pub(crate) fn cancel_request(&self, reader: &store::Reader) -> Option<store::Request> {
        std::iter::once(self.op)
            .chain(self.ancestors.iter().copied())
            .find_map(|op| reader.op(op).ok().and_then(|row| row.cancel))
    }

    /// Reads why the run stops, from anywhere (a task that outlives the borrow of this).
    pub(crate) fn stop_reason_handle(&self) -> impl Fn() -> Option<StopReason> + Send + 'static {
        let slot = self.stop_reason.clone();
        move || slot.lock().ok().and_then(|r| r.clone())
    }

    /// Whether the lease still holds with a safety margin: past it, another process may take the
    /// op over, so this one must not start anything.
    fn lease_holds(&self) -> bool {
        let margin = i64::try_from(self.options.lease.as_millis() / 3).unwrap_or(i64::MAX);
        now()
            < self
                .lease_until
                .load(Ordering::SeqCst)
                .saturating_sub(margin)
    }

    /// A fenced write that also renews the lease: proof, right before starting a process, that this
    /// process still owns the op.
    async fn renew(&self) -> Result<(), Fatal> {
        let until = now() + i64::try_from(self.options.lease.as_millis()).unwrap_or(i64::MAX);
        self.apply(vec![Change::Heartbeat {
            op: self.op,
            owner: self.me.clone(),
            lease_until: until,
        }])
        .await?;
        self.lease_until.store(until, Ordering::SeqCst);
        Ok(())
    }

    /// The template context of a task: params, the op, the captured environment, and the outputs of
    /// the steps its templates use.
    fn context(&self, step: &Step, outputs: &[(usize, Map<String, Value>)]) -> Context {
        let mut ctx = self
            .base_context
            .get_or_init(|| {
                let mut ctx = Context::new();
                for (name, value) in &self.params {
                    ctx.param(name, value);
                }
                ctx.op("id", &Value::from(self.op.0))
                    .op("uuid", &Value::from(self.uuid.clone()))
                    .op("name", &Value::from(self.title.clone()))
                    .op("plan", &Value::from(self.plan.name.clone()));
                for (name, value) in &self.env {
                    ctx.env(name, value);
                }
                ctx
            })
            .clone();
        for (index, map) in outputs {
            if step.uses.contains(index) {
                ctx.outputs(*index, &Value::Object(map.clone()));
            }
        }
        if let Some(end) = self.outcome.lock().ok().and_then(|o| o.clone()) {
            ctx.op("status", &Value::from(end.status.as_str()))
                .op("error", &end.error.map_or(Value::Null, Value::from))
                .op(
                    "failed_task",
                    &end.failed_task.map_or(Value::Null, Value::from),
                );
        }
        ctx
    }

    fn mask(&self, data: &[u8]) -> Vec<u8> {
        Masker::new(&self.secrets).mask(data)
    }
}

/// Why a run stops before its tasks are done. A stop with no reason recorded came from outside
/// (Ctrl-C, SIGTERM, SIGHUP).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum StopReason {
    /// Someone ran `cairn cancel`; the text says who and why.
    Cancel(String),
    /// The op's own `timeout` passed.
    Timeout(String),
}

/// The task numbers of the plan's hooks, by phase (they follow the steps).
#[derive(Debug, Clone, Default)]
pub(crate) struct HookTasks {
    pub pre: Vec<usize>,
    pub on_success: Vec<usize>,
    pub on_failure: Vec<usize>,
    pub on_cancel: Vec<usize>,
}

/// The plan's steps followed by its hooks as steps of their own, so that a hook runs, is recorded
/// and is swept like any task; and where each phase's hooks are.
pub(crate) fn with_hooks(plan: &Plan) -> (Vec<Step>, HookTasks) {
    let mut steps = plan.steps.clone();
    let mut tasks = HookTasks::default();
    let all_steps: Vec<usize> = (0..plan.steps.len()).collect();
    for (phase, hooks, slot) in [
        ("pre", &plan.hooks.pre, &mut tasks.pre),
        ("on_success", &plan.hooks.on_success, &mut tasks.on_success),
        ("on_failure", &plan.hooks.on_failure, &mut tasks.on_failure),
        ("on_cancel", &plan.hooks.on_cancel, &mut tasks.on_cancel),
    ] {
        for (k, hook) in hooks.iter().enumerate() {
            let default = format!("{phase}[{}]", k + 1);
            let id = if hook.name == default {
                default
            } else {
                format!("{phase}:{}", hook.name)
            };
            slot.push(steps.len());
            steps.push(Step {
                id,
                description: None,
                needs: Vec::new(),
                when: None,
                action: hook.action.clone(),
                env: hook.env.clone(),
                cwd: hook.cwd.clone(),
                timeout: Some(hook.timeout),
                retry: plans::model::Retry::default(),
                check: None,
                for_each: None,
                max_parallel: None,
                continue_on_error: false,
                outputs: None,
                log_limit: plan.log_limit,
                uses: if phase == "pre" {
                    Vec::new()
                } else {
                    all_steps.clone()
                },
            });
        }
    }
    (steps, tasks)
}

/// How the op ended, as its finishing hooks see it (`op.status`, `op.error`, `op.failed_task`).
#[derive(Debug, Clone)]
pub(crate) struct EndState {
    pub status: OpStatus,
    pub error: Option<String>,
    pub failed_task: Option<String>,
}

impl EndState {
    pub(crate) fn to_json(&self) -> Value {
        serde_json::json!({
            "status": self.status.as_str(),
            "error": self.error,
            "failed_task": self.failed_task,
            "at": now(),
        })
    }

    pub(crate) fn from_json(value: &Value) -> Option<Self> {
        Some(Self {
            status: OpStatus::parse(value["status"].as_str()?)?,
            error: value["error"].as_str().map(ToOwned::to_owned),
            failed_task: value["failed_task"].as_str().map(ToOwned::to_owned),
        })
    }
}

/// Runs the op until it ends or stops. `tasks` is the op's state as stored, indexed by task number
/// (the steps, then the hooks). With `cancel` set, the op is only finished as canceled: nothing
/// new starts, the `on_cancel` hooks run.
#[expect(
    clippy::too_many_lines,
    reason = "to be split by the re-layering of the engine (issue 17)"
)]
pub(crate) async fn run(
    shared: Arc<Shared>,
    mut tasks: Vec<TaskState>,
    cancel: Option<String>,
    ending: Option<EndState>,
) -> RunEnd {
    let plan = shared.plan.clone();
    let n = plan.steps.len();
    // A resume after a crash among the finishing hooks: the outcome was decided; only the hooks
    // that had not finished are left to run.
    let decided = ending.clone();
    if let Some(by) = cancel {
        shared.stop_because(StopReason::Cancel(by));
    }
    let heartbeat = tokio::spawn(heartbeat(shared.clone()));
    let watcher = tokio::spawn(watch_for_cancel(shared.clone()));
    let timer = plan.timeout.map(|limit| {
        let shared = shared.clone();
        tokio::spawn(async move {
            tokio::time::sleep(limit).await;
            shared.stop_because(StopReason::Timeout(format!(
                "the op timed out after {}",
                plans::units::format_duration(limit)
            )));
        })
    });
    let mut first_failure: Option<(String, String)> = None;
    let mut fatal: Option<Fatal> = None;

    // `pre` hooks, in order: any failure ends the op before a step runs.
    let pre = shared.hooks.pre.clone();
    if decided.is_none()
        && !pre.iter().all(|&i| tasks[i].status.is_kept())
        && !shared.stopping()
        && !draining()
    {
        if let Err(f) = add_hook_tasks(&shared, &pre).await {
            fatal = Some(f);
        }
        for &i in &pre {
            if fatal.is_some() || tasks[i].status.is_kept() {
                continue;
            }
            // A hook is a start too: none once the run stops or drains.
            if shared.stopping() || draining() {
                break;
            }
            let stop = shared.stop.clone();
            let Some(job) = tasks[i].job(i) else { continue };
            let ctx = shared.context(shared.step(i), &[]);
            match run_task(
                &shared,
                &job,
                tasks[i].attempts,
                tasks[i].attempts,
                ctx,
                &stop,
                &mut None,
            )
            .await
            {
                Ok(TaskEnd::Done {
                    status,
                    outputs,
                    error,
                }) => {
                    tasks[i].status = status;
                    tasks[i].outputs = outputs;
                    if status == TaskStatus::Failed {
                        let name = shared.step(i).id.clone();
                        first_failure = Some((
                            name.clone(),
                            format!("hook `{name}` failed: {}", error.unwrap_or_default()),
                        ));
                        break;
                    }
                }
                Ok(TaskEnd::Interrupted | TaskEnd::Expanded) => break,
                Ok(TaskEnd::Unrecorded { .. }) => unreachable!("a hook records its own end"),
                Err(f) => fatal = Some(f),
            }
        }
    }

    // The steps.
    let satisfied = |state: &TaskState, step: &Step| {
        state.status.is_kept() || (state.status == TaskStatus::Failed && step.continue_on_error)
    };
    // At the start only kept tasks count as done: every other task, a failed `continue_on_error`
    // one included, runs again, and its dependents wait for that run.
    let mut waiting_on: Vec<usize> = plan
        .steps
        .iter()
        .map(|step| {
            step.needs
                .iter()
                .filter(|&&need| !tasks[need].status.is_kept())
                .count()
        })
        .collect();
    let mut ready: VecDeque<usize> = plan
        .dag
        .order()
        .iter()
        .copied()
        .filter(|&i| decided.is_none() && waiting_on[i] == 0 && !tasks[i].status.is_kept())
        .collect();
    let mut running: JoinSet<(usize, Result<TaskEnd, Fatal>)> = JoinSet::new();
    let mut in_flight: std::collections::BTreeSet<usize> = std::collections::BTreeSet::new();
    let mut shown_waiting = false;
    let mut stop = shared.stop.clone();
    let max = usize::try_from(plan.max_parallel).unwrap_or(usize::MAX);
    // Fan-outs: each step's items (task numbers, in item order), the ones still to start, how
    // many run now, and the steps expanded whose own task has not yet gathered its items.
    let mut items_of: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for (no, t) in tasks.iter().enumerate() {
        if let Some(s) = t.step.filter(|&s| s != no) {
            items_of.entry(s).or_default().push(no);
        }
    }
    let mut queued: BTreeMap<usize, VecDeque<usize>> = BTreeMap::new();
    let mut busy: BTreeMap<usize, usize> = BTreeMap::new();
    let mut open: std::collections::BTreeSet<usize> = std::collections::BTreeSet::new();
    let mut step_contexts: BTreeMap<usize, Context> = BTreeMap::new();
    // The end of the task joined last, when it is not yet recorded (see [`Record`]); and the ends
    // on their way to the database, carried by a task or applied on their own.
    let mut pending: Option<(usize, Box<Record>)> = None;
    let mut unconfirmed: BTreeMap<usize, watch::Receiver<Option<bool>>> = BTreeMap::new();
    loop {
        while fatal.is_none()
            && first_failure.is_none()
            && !shared.stopping()
            && !draining()
            && running.len() < max
        {
            let Some(i) = ready.pop_front() else { break };
            let step = &plan.steps[i];
            // The ends this task needs are durable before it starts: the one just joined is
            // carried by its first commit (or recorded on its own first), others are waited for.
            let mut carry = None;
            let mut carried = None;
            if let Some((ended, _)) = &pending
                && step.needs.contains(ended)
            {
                let (ended, record) = pending.take().expect("checked just above");
                if step.for_each.is_none() {
                    unconfirmed.insert(ended, record.recorded.subscribe());
                    carry = Some(record);
                    carried = Some(ended);
                } else {
                    unconfirmed.insert(ended, record_alone(&shared, record));
                }
            }
            if let Err(f) = wait_recorded(&mut unconfirmed, &step.needs, carried).await {
                // What it would have carried is still recorded, if the store lets it.
                if let (Some(ended), Some(record)) = (carried, carry.take()) {
                    unconfirmed.insert(ended, record_alone(&shared, record));
                }
                fatal.get_or_insert(f);
                stop_all(&shared);
                break;
            }
            let outputs: Vec<(usize, Map<String, Value>)> = step
                .uses
                .iter()
                .filter_map(|&u| tasks[u].outputs.clone().map(|o| (u, o)))
                .collect();
            let Some(mut job) = tasks[i].job(i) else {
                continue;
            };
            let prior = tasks[i].attempts;
            if step.for_each.is_some() {
                if tasks[i].item.is_some() {
                    // Expanded before (the list is frozen): its items that are not done run.
                    open.insert(i);
                    continue;
                }
                let ctx = shared.context(step, &outputs);
                match fan_out_list(step, &ctx) {
                    // `when` is false or cannot be evaluated: the step's task says so.
                    Ok(None) => {}
                    Err(error) => {
                        let shared = shared.clone();
                        in_flight.insert(i);
                        running.spawn(counted(async move {
                            (i, fail_before_start(&shared, &job, prior + 1, error).await)
                        }));
                        continue;
                    }
                    Ok(Some(list)) => {
                        // After a rerun, an item named as before keeps its task (and history);
                        // earlier items not in the list any more stay as history only.
                        let mut earlier: BTreeMap<String, usize> = items_of
                            .remove(&i)
                            .unwrap_or_default()
                            .into_iter()
                            .map(|no| (tasks[no].name.clone(), no))
                            .collect();
                        // Items of expansions before the last (history) come back under their
                        // name too, so that a name is never given to two tasks.
                        let prefix = format!("{}[", step.id);
                        for (no, t) in tasks.iter().enumerate().skip(shared.steps.len()) {
                            if t.step.is_none() && t.name.starts_with(&prefix) {
                                earlier.entry(t.name.clone()).or_insert(no);
                            }
                        }
                        let names = item_names(&step.id, &list);
                        let mut new = Vec::with_capacity(list.len());
                        let mut numbers = Vec::with_capacity(list.len());
                        let mut reused = std::collections::HashSet::new();
                        for (name, item) in names.into_iter().zip(&list) {
                            let no = if let Some(&no) = earlier.get(&name) {
                                reused.insert(no);
                                let t = &mut tasks[no];
                                if t.step.is_none() {
                                    // History that comes back runs again, in a fresh round.
                                    t.status = TaskStatus::Pending;
                                    t.outputs = None;
                                    t.retry_from = t.attempts;
                                }
                                t.step = Some(i);
                                t.item = Some(item.clone());
                                no
                            } else {
                                tasks.push(TaskState::new(i, name.clone(), Some(item.clone())));
                                tasks.len() - 1
                            };
                            new.push(NewTask {
                                task_no: TaskNo(u32::try_from(no).unwrap_or(u32::MAX)),
                                step: step.id.clone(),
                                name,
                                item: Some(item.clone()),
                            });
                            numbers.push(no);
                        }
                        for (_, no) in earlier {
                            if !reused.contains(&no) && tasks[no].step.is_some() {
                                let t = &mut tasks[no];
                                t.step = None;
                                if t.status == TaskStatus::Pending {
                                    t.status = TaskStatus::Skipped;
                                }
                            }
                        }
                        items_of.insert(i, numbers);
                        tasks[i].item = Some(Value::Array(list.clone()));
                        let change = Change::Expand {
                            op: shared.op,
                            owner: shared.me.clone(),
                            task: job.task(),
                            items: list,
                            tasks: new,
                            at: now(),
                        };
                        let shared = shared.clone();
                        in_flight.insert(i);
                        running.spawn(counted(async move {
                            (
                                i,
                                shared.apply(vec![change]).await.map(|()| TaskEnd::Expanded),
                            )
                        }));
                        continue;
                    }
                }
            }
            let shared = shared.clone();
            // A task that had failed starts a fresh retry round; one interrupted in the middle of a
            // round (a crash during a retry delay) goes on with what is left of it.
            let retry_from = if tasks[i].status == TaskStatus::Failed {
                prior
            } else {
                tasks[i].retry_from.min(prior)
            };
            in_flight.insert(i);
            // A `noop` chain's step has nothing to render: no context to build, clone and drop.
            let ctx = if step.when.is_some() || step.action.renders() {
                shared.context(step, &outputs)
            } else {
                Context::new()
            };
            // Its end may wait for a task it releases to carry it, if anything needs it.
            job.defer = !plan.dag.dependents(i).is_empty();
            running.spawn(counted(async move {
                let stop = shared.stop.clone();
                let mut carry = carry;
                let end = run_task(&shared, &job, prior, retry_from, ctx, &stop, &mut carry).await;
                // A task that ended before its first commit still records what it carried.
                let carried = apply_carrying(&shared, &mut carry, Vec::new()).await;
                (i, end.and_then(|end| carried.map(|()| end)))
            }));
        }
        // A record no task carries goes on its own; what needs it waits for it.
        if let Some((ended, record)) = pending.take() {
            unconfirmed.insert(ended, record_alone(&shared, record));
        }
        let launching =
            fatal.is_none() && first_failure.is_none() && !shared.stopping() && !draining();
        // Items of fan-out steps, within the op's and each step's `max_parallel`.
        for &s in &open {
            let queue = queued.entry(s).or_insert_with(|| {
                items_of
                    .get(&s)
                    .into_iter()
                    .flatten()
                    .copied()
                    .filter(|&no| !tasks[no].status.is_kept())
                    .collect()
            });
            let limit = plan.steps[s]
                .max_parallel
                .map_or(usize::MAX, |m| usize::try_from(m).unwrap_or(usize::MAX));
            let count = busy.entry(s).or_insert(0);
            while launching && running.len() < max && *count < limit {
                let Some(no) = queue.pop_front() else { break };
                let Some(job) = tasks[no].job(no) else {
                    continue;
                };
                // Every item of a step has the same context but for `item`: built once per
                // step, and cloned (cheaply: its values are shared) for each item that renders
                // anything (an item's `when` is its step's, already evaluated).
                let ctx = if plan.steps[s].action.renders() {
                    step_contexts
                        .entry(s)
                        .or_insert_with(|| {
                            let outputs: Vec<(usize, Map<String, Value>)> = plan.steps[s]
                                .uses
                                .iter()
                                .filter_map(|&u| tasks[u].outputs.clone().map(|o| (u, o)))
                                .collect();
                            shared.context(&plan.steps[s], &outputs)
                        })
                        .clone()
                } else {
                    Context::new()
                };
                let prior = tasks[no].attempts;
                let retry_from = if tasks[no].status == TaskStatus::Failed {
                    prior
                } else {
                    tasks[no].retry_from.min(prior)
                };
                *count += 1;
                in_flight.insert(no);
                let shared = shared.clone();
                running.spawn(counted(async move {
                    let stop = shared.stop.clone();
                    (
                        no,
                        run_task(&shared, &job, prior, retry_from, ctx, &stop, &mut None).await,
                    )
                }));
            }
        }
        // A fan-out step whose items have all ended (or will not start now) gathers them.
        if fatal.is_none() {
            let ended: Vec<usize> = open
                .iter()
                .copied()
                .filter(|s| {
                    busy.get(s).copied().unwrap_or(0) == 0
                        && (!launching || queued.get(s).is_none_or(VecDeque::is_empty))
                })
                .collect();
            for s in ended {
                open.remove(&s);
                queued.remove(&s);
                busy.remove(&s);
                let items = items_of.get(&s).map_or(&[][..], Vec::as_slice);
                let (status, outputs, error) = gather(&tasks, items, &plan.steps[s]);
                let change = Change::Gather {
                    op: shared.op,
                    owner: shared.me.clone(),
                    task: TaskNo(u32::try_from(s).unwrap_or(u32::MAX)),
                    status,
                    outputs: outputs.clone(),
                    error: error.clone(),
                    at: now(),
                };
                let shared = shared.clone();
                in_flight.insert(s);
                running.spawn(counted(async move {
                    let end = shared.apply(vec![change]).await.map(|()| {
                        if status == TaskStatus::Pending {
                            TaskEnd::Interrupted
                        } else {
                            TaskEnd::Done {
                                status,
                                outputs,
                                error,
                            }
                        }
                    });
                    (s, end)
                }));
            }
        }
        // The op is `waiting` while approval gates are all that is in flight.
        let only_gates = !in_flight.is_empty()
            && in_flight.iter().all(|&i| {
                tasks[i]
                    .step
                    .is_some_and(|s| matches!(shared.step(s).action, Action::Approve { .. }))
            });
        if only_gates != shown_waiting && fatal.is_none() && !shared.stopping() {
            let (status, kind) = if only_gates {
                (OpStatus::Waiting, "op-waiting")
            } else {
                (OpStatus::Running, "op-running")
            };
            let change = Change::SetOp {
                op: shared.op,
                owner: Some(shared.me.clone()),
                status,
                at: now(),
                error: None,
                release: false,
                kind,
                message: if only_gates {
                    "waiting for approval".to_owned()
                } else {
                    "running".to_owned()
                },
            };
            match shared.apply(vec![change]).await {
                Ok(()) => shown_waiting = only_gates,
                Err(f) => {
                    fatal.get_or_insert(f);
                    stop_all(&shared);
                }
            }
        }
        if running.is_empty() && (open.is_empty() || fatal.is_some()) {
            // Every end is durable before the op's outcome is decided and recorded.
            let all: Vec<usize> = unconfirmed.keys().copied().collect();
            if let Err(f) = wait_recorded(&mut unconfirmed, &all, None).await {
                fatal.get_or_insert(f);
            }
            break;
        }
        tokio::select! {
            joined = running.join_next() => {
                let Some(joined) = joined else { continue };
                let (i, result) = match joined {
                    Ok(r) => r,
                    Err(e) => {
                        fatal.get_or_insert(Fatal::Store(format!("a task panicked: {e}")));
                        stop_all(&shared);
                        continue;
                    }
                };
                in_flight.remove(&i);
                let result = match result {
                    Ok(TaskEnd::Unrecorded { status, outputs, error, record }) => {
                        pending = Some((i, record));
                        Ok(TaskEnd::Done { status, outputs, error })
                    }
                    other => other,
                };
                let step_of = tasks[i].step.unwrap_or(i);
                let item = step_of != i;
                if item && let Some(count) = busy.get_mut(&step_of) {
                    *count = count.saturating_sub(1);
                }
                match result {
                    Ok(TaskEnd::Expanded) => {
                        open.insert(i);
                    }
                    Ok(TaskEnd::Done { status, outputs, error }) => {
                        tasks[i].status = status;
                        tasks[i].outputs = outputs;
                        let step = &plan.steps[step_of];
                        if status == TaskStatus::Failed && !step.continue_on_error {
                            first_failure.get_or_insert_with(|| {
                                let name = &tasks[i].name;
                                (name.clone(), format!("task `{name}` failed: {}", error.unwrap_or_default()))
                            });
                        } else if !item && satisfied(&tasks[i], step) {
                            for &d in plan.dag.dependents(i) {
                                waiting_on[d] = waiting_on[d].checked_sub(1).expect("a task is released by each of its needs once");
                                // A dependent kept from an earlier run is not run again.
                                if waiting_on[d] == 0 && !tasks[d].status.is_kept() {
                                    ready.push_back(d);
                                }
                            }
                        }
                    }
                    Ok(TaskEnd::Interrupted) => {}
                    Ok(TaskEnd::Unrecorded { .. }) => unreachable!("made `pending` above"),
                    Err(f) => {
                        if matches!(f, Fatal::Lost(_)) {
                            shared.lost.store(true, Ordering::SeqCst);
                        }
                        fatal.get_or_insert(f);
                    }
                }
                if fatal.is_some() && !shared.stopping() {
                    // Nothing more can be recorded: end the running steps now.
                    stop_all(&shared);
                }
                if first_failure.is_some() || fatal.is_some() {
                    // Approval gates still waiting can no longer lead anywhere.
                    shared.gates.send_replace(true);
                }
            }
            changed = stop.changed(), if !*stop.borrow() => {
                if changed.is_ok() {
                    let reason = match shared.stop_reason() {
                        _ if shared.lost.load(Ordering::SeqCst) => "another process took the op over".to_owned(),
                        Some(StopReason::Cancel(by)) => format!("canceled by {by}"),
                        Some(StopReason::Timeout(why)) => why,
                        None => "asked to stop".to_owned(),
                    };
                    shared.say(&Progress::Stopping { reason });
                }
            }
        }
    }
    watcher.abort();
    if let Some(timer) = timer {
        timer.abort();
    }
    if shared.lost.load(Ordering::SeqCst) {
        heartbeat.abort();
        return RunEnd::LostOwnership(match fatal {
            Some(Fatal::Lost(m) | Fatal::Store(m)) => m,
            None => "another process took the op over".to_owned(),
        });
    }
    let undone = (0..n).find(|&i| !satisfied(&tasks[i], &plan.steps[i]));
    let failed_task = first_failure.as_ref().map(|(task, _)| task.clone());
    let (end, status, error) = if let Some(decided) = decided {
        let error = decided.error.clone();
        let end = match decided.status {
            OpStatus::Succeeded => RunEnd::Succeeded,
            OpStatus::Canceled => RunEnd::Canceled(error.clone().unwrap_or_default()),
            _ => RunEnd::Failed(error.clone().unwrap_or_default()),
        };
        (end, decided.status, error)
    } else {
        match (fatal, first_failure, undone, shared.stop_reason()) {
            (Some(Fatal::Lost(m)), ..) => {
                heartbeat.abort();
                return RunEnd::LostOwnership(m);
            }
            (Some(Fatal::Store(m)), ..) => {
                heartbeat.abort();
                return RunEnd::StoreFailed(m);
            }
            // Everything is done: a stop that came at the end changes nothing.
            (None, None, None, _) => (RunEnd::Succeeded, OpStatus::Succeeded, None),
            (None, _, _, Some(StopReason::Cancel(by))) => {
                let why = format!("canceled by {by}");
                (RunEnd::Canceled(why.clone()), OpStatus::Canceled, Some(why))
            }
            (None, Some((_, f)), ..) => (RunEnd::Failed(f.clone()), OpStatus::Failed, Some(f)),
            (None, None, Some(_), Some(StopReason::Timeout(why))) => {
                (RunEnd::Failed(why.clone()), OpStatus::Failed, Some(why))
            }
            (None, None, Some(_), None) if shared.stopping() || draining() => (
                RunEnd::Interrupted,
                OpStatus::Interrupted,
                Some("stopped before it finished".to_owned()),
            ),
            (None, None, Some(i), None) => {
                let f = format!("task `{}` could not run", plan.steps[i].id);
                (RunEnd::Failed(f.clone()), OpStatus::Failed, Some(f))
            }
        }
    };
    // The finishing hooks; the op becomes final only after they are recorded.
    let phase = match status {
        OpStatus::Succeeded => shared.hooks.on_success.clone(),
        OpStatus::Failed => shared.hooks.on_failure.clone(),
        OpStatus::Canceled => shared.hooks.on_cancel.clone(),
        _ => Vec::new(),
    };
    if !phase.is_empty() {
        let end_state = ending.unwrap_or(EndState {
            status,
            error: error.clone(),
            failed_task,
        });
        if let Ok(mut outcome) = shared.outcome.lock() {
            *outcome = Some(end_state.clone());
        }
        let record = Change::SetEnding {
            op: shared.op,
            owner: shared.me.clone(),
            ending: end_state.to_json(),
        };
        if let Err(f) = shared.apply(vec![record]).await {
            heartbeat.abort();
            return f.into_end();
        }
        if let Err(f) = add_hook_tasks(&shared, &phase).await {
            heartbeat.abort();
            return f.into_end();
        }
        let every_output: Vec<(usize, Map<String, Value>)> = (0..n)
            .filter_map(|i| tasks[i].outputs.clone().map(|o| (i, o)))
            .collect();
        for &i in &phase {
            if tasks[i].status.is_kept() {
                continue;
            }
            // Finishing hooks run to their end (or timeout) even when the op was stopped.
            let calm = shared.calm.clone();
            let Some(job) = tasks[i].job(i) else { continue };
            let ctx = shared.context(shared.step(i), &every_output);
            match run_task(
                &shared,
                &job,
                tasks[i].attempts,
                tasks[i].attempts,
                ctx,
                &calm,
                &mut None,
            )
            .await
            {
                Ok(TaskEnd::Done {
                    status: TaskStatus::Failed,
                    error,
                    ..
                }) => {
                    let _ = shared
                        .apply(vec![Change::Event {
                            op: shared.op,
                            at: now(),
                            kind: "hook-failed",
                            task: Some(shared.step(i).id.clone()),
                            message: format!(
                                "the op's outcome stands: {}",
                                error.unwrap_or_default()
                            ),
                        }])
                        .await;
                }
                Ok(_) => {}
                Err(f) => {
                    heartbeat.abort();
                    return f.into_end();
                }
            }
        }
    }
    heartbeat.abort();
    if status == OpStatus::Canceled {
        // Child ops that were not running (failed, interrupted) are canceled too; any that
        // cannot be are named in the events.
        let _ = crate::children::cancel_children(
            &shared.store,
            shared.op,
            None,
            &shared.options,
            &shared.progress,
        )
        .await;
    }
    let mut batch = Vec::new();
    if status == OpStatus::Canceled {
        // What never got to run will not now: steps and fan-out items (not hooks).
        for i in (0..tasks.len()).filter(|&i| {
            (i < n || tasks[i].step.is_some_and(|s| s != i))
                && !tasks[i].status.is_kept()
                && tasks[i].status != TaskStatus::Canceled
        }) {
            batch.push(Change::SetTask {
                op: shared.op,
                owner: shared.me.clone(),
                task: TaskNo(u32::try_from(i).unwrap_or(u32::MAX)),
                status: TaskStatus::Canceled,
                at: now(),
                message: "canceled with the op".to_owned(),
            });
        }
    }
    let message = match &error {
        Some(e) => format!("op {status}: {e}"),
        None => format!("op {status}"),
    };
    batch.push(Change::SetOp {
        op: shared.op,
        owner: Some(shared.me.clone()),
        status,
        at: now(),
        error: error.clone(),
        release: true,
        kind: match status {
            OpStatus::Succeeded => "op-succeeded",
            OpStatus::Failed => "op-failed",
            OpStatus::Canceled => "op-canceled",
            _ => "op-interrupted",
        },
        message,
    });
    match shared.apply(batch).await {
        Ok(()) => {
            shared.say(&Progress::OpEnded {
                op: shared.op,
                status,
                error,
            });
            end
        }
        Err(f) => f.into_end(),
    }
}

/// The items of a fan-out step, from its `for_each`; `Ok(None)` when its `when` is false or cannot
/// be evaluated (the step's task then runs only to be skipped or to fail with the reason).
fn fan_out_list(step: &Step, ctx: &Context) -> Result<Option<Vec<Value>>, String> {
    if let Some(when) = &step.when
        && !matches!(when.is_true(ctx), Ok(true))
    {
        return Ok(None);
    }
    match &step.for_each {
        Some(ForEach::Items(items)) => Ok(Some(items.clone())),
        Some(ForEach::Expr(expr)) => {
            let value = expr
                .eval(ctx)
                .map_err(|e| format!("cannot evaluate `for_each`: {e}"))?;
            as_list(value).map(Some)
        }
        None => Ok(Some(Vec::new())),
    }
}

/// A `for_each` value as items: a list; text holding a JSON array; other text, one item per line.
fn as_list(value: Value) -> Result<Vec<Value>, String> {
    match value {
        Value::Array(items) => Ok(items),
        Value::String(text) => {
            let text = text.trim();
            if text.starts_with('[') {
                serde_json::from_str::<Vec<Value>>(text).map_err(|e| {
                    format!(
                        "`for_each` gave text that starts like a JSON array but is not one: {e}"
                    )
                })
            } else {
                Ok(text
                    .lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty())
                    .map(|l| Value::String(l.to_owned()))
                    .collect())
            }
        }
        other => Err(format!(
            "`for_each` must give a list, a JSON array or lines of text, not {}",
            match other {
                Value::Null => "nothing (null)",
                Value::Bool(_) => "a bool",
                Value::Number(_) => "a number",
                _ => "a map",
            }
        )),
    }
}

/// The task names of a fan-out's items: `restore[shard-3]`. An item is named by its text, or a
/// map by its `name`, `id`, `host` or `key` field; otherwise by its position (from 1). Names are
/// unique: a repeated one gets its position too.
fn item_names(step: &str, items: &[Value]) -> Vec<String> {
    let scalar = |v: &Value| match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    };
    let mut seen = std::collections::HashSet::new();
    items
        .iter()
        .enumerate()
        .map(|(k, item)| {
            let label = match item {
                Value::Object(map) => ["name", "id", "host", "key"]
                    .iter()
                    .find_map(|f| map.get(*f).and_then(scalar)),
                other => scalar(other),
            }
            .map(|l| {
                let clean: String = l
                    .chars()
                    .map(|c| if c.is_control() { '?' } else { c })
                    .take(60)
                    .collect();
                clean
            })
            .filter(|l| !l.is_empty())
            .unwrap_or_else(|| (k + 1).to_string());
            let mut name = format!("{step}[{label}]");
            let mut n = k + 1;
            while !seen.insert(name.clone()) {
                name = format!("{step}[{label}#{n}]");
                n += 1;
            }
            name
        })
        .collect()
}

/// A fan-out step's own outcome from its items': succeeded when every item is done, failed when
/// one failed, canceled, or pending (interrupted) otherwise. Outputs are lists in item order, one
/// entry per item (`null` where an item published nothing), for every key an item published or
/// the step declares.
fn gather(
    tasks: &[TaskState],
    items: &[usize],
    step: &Step,
) -> (TaskStatus, Option<Map<String, Value>>, Option<String>) {
    let failed: Vec<&str> = items
        .iter()
        .filter(|&&no| tasks[no].status == TaskStatus::Failed)
        .map(|&no| tasks[no].name.as_str())
        .collect();
    // Items that never got to run (the op stopped, or drained) leave the step undone when its
    // failures would not stop the op anyway: it must not count as satisfied.
    let unfinished = items.iter().any(|&no| {
        matches!(
            tasks[no].status,
            TaskStatus::Pending | TaskStatus::Running | TaskStatus::Waiting
        )
    });
    let status = if items.iter().all(|&no| tasks[no].status.is_kept()) {
        TaskStatus::Succeeded
    } else if !failed.is_empty() && (!unfinished || !step.continue_on_error) {
        TaskStatus::Failed
    } else if items
        .iter()
        .any(|&no| tasks[no].status == TaskStatus::Canceled)
    {
        TaskStatus::Canceled
    } else {
        TaskStatus::Pending
    };
    let error = (!failed.is_empty()).then(|| {
        let shown: Vec<&str> = failed.iter().take(5).copied().collect();
        format!(
            "{} of {} items failed: {}{}",
            failed.len(),
            items.len(),
            shown.join(", "),
            if failed.len() > shown.len() {
                ", ..."
            } else {
                ""
            }
        )
    });
    if !matches!(status, TaskStatus::Succeeded | TaskStatus::Failed) {
        return (status, None, error);
    }
    let mut keys: Vec<String> = step.outputs.clone().unwrap_or_default();
    for &no in items {
        for key in tasks[no].outputs.iter().flat_map(Map::keys) {
            if !keys.contains(key) {
                keys.push(key.clone());
            }
        }
    }
    let outputs = keys
        .into_iter()
        .map(|key| {
            let list = items
                .iter()
                .map(|&no| {
                    tasks[no]
                        .outputs
                        .as_ref()
                        .and_then(|o| o.get(&key))
                        .cloned()
                        .unwrap_or(Value::Null)
                })
                .collect();
            (key, Value::Array(list))
        })
        .collect();
    (status, Some(outputs), error)
}

impl Fatal {
    fn into_end(self) -> RunEnd {
        match self {
            Self::Lost(m) => RunEnd::LostOwnership(m),
            Self::Store(m) => RunEnd::StoreFailed(m),
        }
    }
}

/// Stores the task rows of hooks about to run (ones that exist are left as they are).
async fn add_hook_tasks(shared: &Shared, hooks: &[usize]) -> Result<(), Fatal> {
    let tasks = hooks
        .iter()
        .map(|&i| NewTask {
            task_no: TaskNo(u32::try_from(i).unwrap_or(u32::MAX)),
            step: shared.step(i).id.clone(),
            name: shared.step(i).id.clone(),
            item: None,
        })
        .collect();
    shared
        .apply(vec![Change::AddTasks {
            op: shared.op,
            owner: shared.me.clone(),
            tasks,
        }])
        .await
}

/// Polls the op for a cancel request; on one, stops the run with that reason.
async fn watch_for_cancel(shared: Arc<Shared>) {
    let Ok(reader) = shared.store.reader() else {
        return;
    };
    loop {
        if let Some(request) = shared.cancel_request(&reader) {
            let why = request
                .reason
                .as_ref()
                .map_or(String::new(), |r| format!(": {r}"));
            let by = format!("{}{why}", request.by);
            // Shown `canceling` while its steps end and its `on_cancel` hooks run.
            let _ = shared
                .apply(vec![Change::SetOp {
                    op: shared.op,
                    owner: Some(shared.me.clone()),
                    status: OpStatus::Canceling,
                    at: now(),
                    error: None,
                    release: false,
                    kind: "op-canceling",
                    message: format!("canceling, as asked by {by}"),
                }])
                .await;
            shared.stop_because(StopReason::Cancel(by));
            return;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Asks every running step to stop, for the engine's own reasons (ownership lost, store failed).
fn stop_all(shared: &Shared) {
    shared.stop_tx.send_replace(true);
}

/// Renews the lease until the run ends; on losing the op, says so and stops the run.
async fn heartbeat(shared: Arc<Shared>) {
    loop {
        tokio::time::sleep(shared.options.heartbeat).await;
        match shared.renew().await {
            Ok(()) => {}
            // Lost the op, or cannot renew before the lease runs out (the database is unwritable,
            // this process was paused): past its lease another process may take the op over, and
            // two owners must never run steps at once.
            Err(Fatal::Store(_)) if shared.lease_holds() => {}
            Err(_) => {
                shared.lost.store(true, Ordering::SeqCst);
                stop_all(&shared);
                return;
            }
        }
    }
}

/// Records an attempt that starts and ends at once (a `noop`, a render error): one commit, which
/// also holds what `carry` holds.
async fn whole_attempt(
    shared: &Shared,
    job: &Job,
    n: u32,
    outcome: TaskOutcome,
    carry: &mut Option<Box<Record>>,
) -> Result<(), Fatal> {
    let task = job.task();
    let at = now();
    let owner = shared.me.clone();
    apply_carrying(
        shared,
        carry,
        vec![Change::WholeAttempt {
            op: shared.op,
            owner,
            task,
            n,
            retry_from: n - 1,
            at,
            outcome,
        }],
    )
    .await
}

/// Records a task that ends without running a process (a render error): one attempt, failed.
async fn fail_before_start(
    shared: &Shared,
    job: &Job,
    n: u32,
    error: String,
) -> Result<TaskEnd, Fatal> {
    let outcome = TaskOutcome {
        task: TaskStatus::Failed,
        attempt: AttemptStatus::Failed,
        exit_code: None,
        error: Some(error.clone()),
        outputs: None,
        by_check: false,
    };
    whole_attempt(shared, job, n, outcome, &mut None).await?;
    shared.say(&Progress::TaskFailed {
        task: job.name.clone(),
        error: error.clone(),
        retry_in: None,
    });
    Ok(TaskEnd::Done {
        status: TaskStatus::Failed,
        outputs: None,
        error: Some(error),
    })
}

/// Runs a task: its `when` (a step's; a fan-out item's was its step's), then attempts until one
/// succeeds, retries run out, or the run stops. `carry` is the record of a task this one was
/// released by (see [`Record`]): a process step's first start carries it; any other task records
/// it first, before it does anything.
async fn run_task(
    shared: &Shared,
    job: &Job,
    prior: u32,
    retry_from: u32,
    mut ctx: Context,
    stop: &watch::Receiver<bool>,
    carry: &mut Option<Box<Record>>,
) -> Result<TaskEnd, Fatal> {
    let step = shared.step(job.step);
    let task = job.task();
    if let Some(item) = &job.item {
        ctx.item(item);
    }
    if !matches!(
        step.action,
        Action::Run { .. } | Action::Exec { .. } | Action::Noop
    ) {
        apply_carrying(shared, carry, Vec::new()).await?;
    }
    if let Some(when) = step.when.as_ref().filter(|_| job.item.is_none()) {
        match when.is_true(&ctx) {
            Ok(true) => {}
            Ok(false) => {
                apply_carrying(shared, carry, Vec::new()).await?;
                shared
                    .apply(vec![Change::SetTask {
                        op: shared.op,
                        owner: shared.me.clone(),
                        task,
                        status: TaskStatus::Skipped,
                        at: now(),
                        message: format!("skipped: `when: {}` is false", when.source().trim()),
                    }])
                    .await?;
                shared.say(&Progress::TaskSkipped {
                    task: job.name.clone(),
                });
                return Ok(TaskEnd::Done {
                    status: TaskStatus::Skipped,
                    outputs: None,
                    error: None,
                });
            }
            Err(e) => {
                apply_carrying(shared, carry, Vec::new()).await?;
                return fail_before_start(
                    shared,
                    job,
                    prior + 1,
                    format!("cannot evaluate `when`: {e}"),
                )
                .await;
            }
        }
    }
    let started = Instant::now();
    match &step.action {
        Action::Noop => {
            let outcome = TaskOutcome {
                task: TaskStatus::Succeeded,
                attempt: AttemptStatus::Succeeded,
                exit_code: None,
                error: None,
                outputs: Some(Map::new()),
                by_check: false,
            };
            whole_attempt(shared, job, prior + 1, outcome, carry).await?;
            shared.say(&Progress::TaskSucceeded {
                task: job.name.clone(),
                by_check: false,
                elapsed: started.elapsed(),
            });
            Ok(TaskEnd::Done {
                status: TaskStatus::Succeeded,
                outputs: Some(Map::new()),
                error: None,
            })
        }
        Action::Sleep(duration) => {
            let n = prior + 1;
            shared
                .apply(vec![Change::StartAttempt {
                    op: shared.op,
                    owner: shared.me.clone(),
                    task,
                    n,
                    retry_from: n - 1,
                    at: now(),
                }])
                .await?;
            shared.say(&Progress::TaskStarted {
                task: job.name.clone(),
                attempt: n,
            });
            let mut signal = stop.clone();
            let stopped = tokio::select! {
                () = tokio::time::sleep(*duration) => false,
                _ = signal.wait_for(|s| *s) => true,
            };
            finish(
                shared,
                job,
                n,
                if stopped {
                    Ended::Interrupted
                } else {
                    Ended::Succeeded(Map::new(), false)
                },
                started,
            )
            .await
        }
        // Boxed, as the other long arms: a task's future is as large as its largest arm, and a
        // fan-out of 10,000 `noop` items would otherwise allocate and move 10,000 of those.
        Action::Run { .. } | Action::Exec { .. } => {
            Box::pin(run_process_task(
                shared,
                job,
                (prior, retry_from),
                &ctx,
                started,
                stop,
                carry,
            ))
            .await
        }
        Action::Approve { prompt } => match prompt.render(&ctx) {
            Ok(prompt) => Box::pin(await_approval(shared, job, &prompt, stop)).await,
            Err(e) => {
                fail_before_start(
                    shared,
                    job,
                    prior + 1,
                    format!("cannot render `approve`: {e}"),
                )
                .await
            }
        },
        Action::Plan { .. } => {
            Box::pin(run_child_task(
                shared,
                job,
                (prior, retry_from),
                &ctx,
                started,
                stop,
            ))
            .await
        }
    }
}

/// Records an end that no task carries, in the background; the receiver says when it is durable.
fn record_alone(shared: &Arc<Shared>, record: Box<Record>) -> watch::Receiver<Option<bool>> {
    let recorded = record.recorded.subscribe();
    let shared = shared.clone();
    tokio::spawn(async move {
        let _ = apply_carrying(&shared, &mut Some(record), Vec::new()).await;
    });
    recorded
}

/// Waits until the ends of `needs` on their way to the database (but `skip`'s) are durable.
async fn wait_recorded(
    unconfirmed: &mut BTreeMap<usize, watch::Receiver<Option<bool>>>,
    needs: &[usize],
    skip: Option<usize>,
) -> Result<(), Fatal> {
    for &need in needs {
        if Some(need) == skip {
            continue;
        }
        let Some(recorded) = unconfirmed.get_mut(&need) else {
            continue;
        };
        let durable = recorded
            .wait_for(Option::is_some)
            .await
            .is_ok_and(|r| *r == Some(true));
        if !durable {
            return Err(Fatal::Store(format!(
                "the end of task {need} could not be recorded"
            )));
        }
        unconfirmed.remove(&need);
    }
    Ok(())
}

/// Attempt `n` of a task starts: committed (with the record of the task that released it, if it
/// carries one) before anything of it runs. `CUR_TASK` is set here for a `plan:` task; a process's
/// is set with its pid (see [`run_process`]), after the spawn rather than before it, so that the
/// commit a process waits for to start touches one row fewer.
async fn start_attempt(
    shared: &Shared,
    job: &Job,
    n: u32,
    retry_from: u32,
    carry: &mut Option<Box<Record>>,
) -> Result<(), Fatal> {
    let mut batch = vec![Change::StartAttempt {
        op: shared.op,
        owner: shared.me.clone(),
        task: job.task(),
        n,
        retry_from,
        at: now(),
    }];
    if matches!(shared.step(job.step).action, Action::Plan { .. }) {
        batch.push(current_task(shared, job));
    }
    apply_carrying(shared, carry, batch).await?;
    shared.say(&Progress::TaskStarted {
        task: job.name.clone(),
        attempt: n,
    });
    Ok(())
}

/// `CUR_TASK` for a task that runs.
fn current_task(shared: &Shared, job: &Job) -> Change {
    Change::CurrentTask {
        op: shared.op,
        text: Some(job.name.clone()),
    }
}

/// A `plan:` task: attempts that each run (or resume) its child op to its end; a failed child is
/// resumed by the next attempt when the step's `retry` allows one.
async fn run_child_task(
    shared: &Shared,
    job: &Job,
    (prior, retry_from): (u32, u32),
    ctx: &Context,
    started: Instant,
    stop: &watch::Receiver<bool>,
) -> Result<TaskEnd, Fatal> {
    let step = shared.step(job.step);
    let mut attempt_in_run = prior - retry_from;
    let mut retrying = false;
    loop {
        attempt_in_run += 1;
        let n = retry_from + attempt_in_run;
        // A retry is a new start: none while the process drains.
        if *stop.borrow() || (retrying && draining()) {
            return Ok(TaskEnd::Interrupted);
        }
        retrying = true;
        start_attempt(shared, job, n, retry_from, &mut None).await?;
        let ended = match crate::children::run(shared, job, ctx, stop).await {
            Ok(ChildEnd::Succeeded(outputs)) => Ended::Succeeded(outputs, false),
            Ok(ChildEnd::Failed(error)) | Err(error) => Ended::Failed {
                error: shared_mask(shared, &error),
                exit_code: None,
                retry_in: step
                    .retry
                    .retries(attempt_in_run, None)
                    .then(|| step.retry.delay_before(attempt_in_run + 1)),
            },
            Ok(ChildEnd::Canceled(error)) => Ended::Failed {
                error: shared_mask(shared, &error),
                exit_code: None,
                retry_in: None,
            },
            Ok(ChildEnd::Stopped) => Ended::Interrupted,
            Ok(ChildEnd::StoreFailed(m)) => return Err(Fatal::Store(m)),
        };
        let retry = match &ended {
            Ended::Failed { retry_in, .. } => *retry_in,
            _ => None,
        };
        let end = finish(shared, job, n, ended, started).await?;
        let Some(delay) = retry else {
            return Ok(end);
        };
        if !wait_to_retry(shared, job, n, attempt_in_run + 1, delay, stop).await {
            return Ok(TaskEnd::Interrupted);
        }
    }
}

/// How one attempt ended, before it is recorded.
enum Ended {
    Succeeded(Map<String, Value>, bool),
    Failed {
        error: String,
        exit_code: Option<i32>,
        retry_in: Option<Duration>,
    },
    Interrupted,
}

/// Records an attempt's end and reports it; returns the task's end (or `None` when it will retry).
async fn finish(
    shared: &Shared,
    job: &Job,
    n: u32,
    ended: Ended,
    started: Instant,
) -> Result<TaskEnd, Fatal> {
    let task = job.task();
    let (outcome, end, progress) = match ended {
        Ended::Succeeded(outputs, by_check) => (
            TaskOutcome {
                task: TaskStatus::Succeeded,
                attempt: AttemptStatus::Succeeded,
                exit_code: Some(0).filter(|_| !by_check),
                error: None,
                outputs: Some(outputs.clone()),
                by_check,
            },
            TaskEnd::Done {
                status: TaskStatus::Succeeded,
                outputs: Some(outputs),
                error: None,
            },
            Progress::TaskSucceeded {
                task: job.name.clone(),
                by_check,
                elapsed: started.elapsed(),
            },
        ),
        Ended::Failed {
            error,
            exit_code,
            retry_in,
        } => (
            TaskOutcome {
                task: if retry_in.is_some() {
                    TaskStatus::Pending
                } else {
                    TaskStatus::Failed
                },
                attempt: AttemptStatus::Failed,
                exit_code,
                error: Some(error.clone()),
                outputs: None,
                by_check: false,
            },
            TaskEnd::Done {
                status: TaskStatus::Failed,
                outputs: None,
                error: Some(error.clone()),
            },
            Progress::TaskFailed {
                task: job.name.clone(),
                error,
                retry_in,
            },
        ),
        Ended::Interrupted => {
            let (task, attempt, error) = match shared.stop_reason() {
                Some(StopReason::Cancel(by)) => (
                    TaskStatus::Canceled,
                    AttemptStatus::Canceled,
                    format!("canceled by {by}"),
                ),
                Some(StopReason::Timeout(why)) => (TaskStatus::Failed, AttemptStatus::Failed, why),
                None => (
                    TaskStatus::Pending,
                    AttemptStatus::Interrupted,
                    "interrupted: cairn was asked to stop".to_owned(),
                ),
            };
            (
                TaskOutcome {
                    task,
                    attempt,
                    exit_code: None,
                    error: Some(error),
                    outputs: None,
                    by_check: false,
                },
                TaskEnd::Interrupted,
                Progress::TaskInterrupted {
                    task: job.name.clone(),
                },
            )
        }
    };
    let final_end = outcome.task != TaskStatus::Pending;
    let change = Change::FinishAttempt {
        op: shared.op,
        owner: shared.me.clone(),
        task,
        n,
        at: now(),
        outcome,
    };
    if let (
        true,
        true,
        TaskEnd::Done {
            status,
            outputs,
            error,
        },
    ) = (job.defer, final_end, &end)
    {
        return Ok(TaskEnd::Unrecorded {
            status: *status,
            outputs: outputs.clone(),
            error: error.clone(),
            record: Box::new(Record {
                change,
                progress,
                recorded: watch::channel(None).0,
            }),
        });
    }
    shared.apply_own(vec![change]).await?;
    shared.say(&progress);
    Ok(end)
}

/// Applies `batch` in one commit with the record `carry` holds (taking it), the record first and
/// each in its own savepoint; says the record's line and marks it recorded once it is. An error
/// recording it is returned even when `batch` itself went in: what `batch` starts must not run.
async fn apply_carrying(
    shared: &Shared,
    carry: &mut Option<Box<Record>>,
    batch: Vec<Change>,
) -> Result<(), Fatal> {
    let Some(record) = carry.take() else {
        return if batch.is_empty() {
            Ok(())
        } else {
            shared.apply_own(batch).await
        };
    };
    if shared.lost.load(Ordering::SeqCst) {
        record.recorded.send_replace(Some(false));
        return Err(Fatal::Lost("another process owns the op".into()));
    }
    let mut batches = vec![vec![record.change.clone()]];
    if !batch.is_empty() {
        batches.push(batch);
    }
    // A transient failure is the whole commit's (another process held the database): both again.
    let recorded = patiently(shared.options.lease / 2, || async {
        let mut results = commit_together(&shared.store, batches.clone())
            .await
            .into_iter();
        results
            .next()
            .unwrap_or(Err(StoreError::Closed))
            .map(|_| results.next())
    })
    .await;
    let own = match recorded {
        Ok(own) => own,
        Err(e) => {
            record.recorded.send_replace(Some(false));
            return Err(e.into());
        }
    };
    shared.say(&record.progress);
    record.recorded.send_replace(Some(true));
    match own {
        None | Some(Ok(_)) => Ok(()),
        Some(Err(e)) => Err(e.into()),
    }
}

/// Records attempt `n` failed before or without its process having a say (a file could not be
/// made, a check's output was bad): no exit code, no retry.
async fn fail_attempt(
    shared: &Shared,
    job: &Job,
    n: u32,
    error: String,
    started: Instant,
) -> Result<TaskEnd, Fatal> {
    finish(
        shared,
        job,
        n,
        Ended::Failed {
            error,
            exit_code: None,
            retry_in: None,
        },
        started,
    )
    .await
}

/// The longest `NAME=value` string Linux lets into a process's environment (`MAX_ARG_STRLEN`, 128
/// KiB with its terminating NUL): a param whose variable would be longer is passed in a file.
const ENV_STRING_MAX: usize = 128 * 1024 - 1;

/// Every param as the environment passes it: `CAIRN_PARAM_<NAME>`, or, when that variable could
/// not be passed at all, `CAIRN_PARAM_<NAME>_FILE` naming a read-only file that holds it (never a
/// secret's: those stay out of files). The same for every task of the run, so made once: a list
/// param of 100,000 items took milliseconds to write out as JSON, for every process.
fn param_env(shared: &Shared) -> Result<BTreeMap<String, String>, String> {
    let mut env = BTreeMap::new();
    for (name, value) in &shared.params {
        let text = match value {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        let var = format!("CAIRN_PARAM_{}", name.to_uppercase());
        // `secrets` holds every secret param's text: those the plan declares and those stored
        // sealed (`ops::secret_values`).
        let secret = shared.secrets.contains(&text);
        if var.len() + 1 + text.len() > ENV_STRING_MAX && !secret {
            let file_var = format!("{var}_FILE");
            if let Some(other) = shared
                .params
                .keys()
                .find(|n| format!("CAIRN_PARAM_{}", n.to_uppercase()) == file_var)
            {
                return Err(format!(
                    "param `{name}` is too long for the environment and goes in a file named by `{file_var}`, which is param `{other}`'s variable: rename one of them"
                ));
            }
            let path = shared
                .outputs
                .param_file(name, &text)
                .map_err(|e| format!("cannot write param `{name}` to its file: {e}"))?;
            env.insert(file_var, path.display().to_string());
        } else {
            env.insert(var, text);
        }
    }
    Ok(env)
}

/// The environment of a step's process: the captured base, the plan's and step's `env`, every
/// param as `CAIRN_PARAM_<NAME>`, and cairn's own variables.
fn environment(
    shared: &Shared,
    step: &Step,
    job: &Job,
    ctx: &Context,
    n: u32,
    output: &std::path::Path,
) -> Result<BTreeMap<String, String>, String> {
    let mut env = shared.env.clone();
    for var in shared.plan.env.iter().chain(&step.env) {
        let value = var
            .value
            .render(ctx)
            .map_err(|e| format!("cannot render `env.{}`: {e}", var.name))?;
        env.insert(var.name.clone(), value);
    }
    // Kept once made; a failure (a full disk) is tried again by the next process.
    let params = if let Some(params) = shared.param_env.get() {
        params
    } else {
        let made = param_env(shared)?;
        shared.param_env.get_or_init(|| made)
    };
    env.extend(params.iter().map(|(k, v)| (k.clone(), v.clone())));
    env.insert("CAIRN_OP_ID".into(), shared.op.0.to_string());
    env.insert("CAIRN_OP_UUID".into(), shared.uuid.clone());
    env.insert("CAIRN_TASK".into(), job.name.clone());
    if let Some(item) = &job.item {
        let text = match item {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        env.insert("CAIRN_ITEM".into(), text);
    }
    env.insert("CAIRN_ATTEMPT".into(), n.to_string());
    env.insert("CAIRN_OUTPUT".into(), output.display().to_string());
    // Finishing hooks see the op's outcome, as orchestrator's hooks get their placeholders.
    if let Some(end) = shared.outcome.lock().ok().and_then(|o| o.clone()) {
        env.insert("CAIRN_OP_STATUS".into(), end.status.to_string());
        env.insert("CAIRN_OP_ERROR".into(), end.error.unwrap_or_default());
        env.insert(
            "CAIRN_FAILED_TASK".into(),
            end.failed_task.unwrap_or_default(),
        );
    }
    Ok(env)
}

/// The command line of a `run` or `exec` step, rendered.
fn command_line(step: &Step, ctx: &Context) -> Result<Vec<String>, String> {
    match &step.action {
        Action::Run { script, shell } => {
            let script = script
                .render(ctx)
                .map_err(|e| format!("cannot render `run`: {e}"))?;
            Ok(shell.command_line(&script))
        }
        Action::Exec { argv } => argv
            .iter()
            .map(|a| {
                a.render(ctx)
                    .map_err(|e| format!("cannot render `exec`: {e}"))
            })
            .collect(),
        _ => Err("not a process step".to_owned()),
    }
}

/// The outcome of running one process (a step's command or its `check`).
struct ProcessRun {
    exit: spawn::Exit,
    outputs: Result<Map<String, Value>, String>,
}

/// Spawns one process for attempt `n` of a task, records its pid, streams its logs, waits.
#[allow(clippy::too_many_arguments)] // the parts of one process to start; a struct would only rename them
async fn run_process(
    shared: &Shared,
    job: &Job,
    n: u32,
    (argv, located): (Vec<String>, Option<PathBuf>),
    env: BTreeMap<String, String>,
    output: &std::path::Path,
    cwd: PathBuf,
    marker: String,
    stop: &watch::Receiver<bool>,
) -> Result<Result<ProcessRun, String>, Fatal> {
    let step = shared.step(job.step);
    let task = job.task();
    let spec = Spec {
        argv,
        env,
        cwd,
        marker,
        timeout: step.timeout,
        grace: shared.options.grace,
        located,
        alone: RUNNING.load(Ordering::SeqCst) <= 1,
    };
    if !shared.lease_holds() {
        return Err(Fatal::Lost(
            "the lease ran out before the step could start".to_owned(),
        ));
    }
    let (sink, chunks) = mpsc::unbounded_channel();
    let running = match spawn::spawn(&spec, &sink) {
        Ok(r) => r,
        Err(e) => return Ok(Err(e.to_string())),
    };
    drop(sink);
    shared.outputs.make_spare();
    let logs = tokio::spawn(write_logs(
        shared.store.clone(),
        shared.op,
        task,
        n,
        chunks,
        step.log_limit,
        shared.secrets.clone(),
    ));
    shared
        .apply(vec![
            Change::AttemptProcess {
                op: shared.op,
                owner: shared.me.clone(),
                task,
                n,
                process: to_store(&running.identity),
                pgid: running.pgid,
            },
            current_task(shared, job),
        ])
        .await?;
    let exit = running.wait(stop.clone()).await;
    // The log writer ends when the process's output closes (its readers end or are aborted).
    let _ = tokio::time::timeout(Duration::from_secs(15), logs).await;
    let outputs = if exit.success() {
        spawn::read_outputs(output)
    } else {
        Ok(Map::new())
    };
    // Read once: the op's directory does not fill up with a file per attempt.
    let _ = std::fs::remove_file(output);
    Ok(Ok(ProcessRun { exit, outputs }))
}

/// Masks secret values in output, across the boundaries of the chunks it arrives in: the last bytes
/// that could begin a secret are held back until more output (or the end) shows what follows.
struct Masker {
    secrets: Vec<Vec<u8>>,
    /// Held-back bytes, per stream (1 stdout, 2 stderr).
    carry: [Vec<u8>; 3],
}

const MASK: &[u8] = b"********";

impl Masker {
    fn new(secrets: &[String]) -> Self {
        Self {
            secrets: secrets
                .iter()
                .filter(|s| !s.is_empty())
                .map(|s| s.as_bytes().to_vec())
                .collect(),
            carry: [Vec::new(), Vec::new(), Vec::new()],
        }
    }

    /// Where the secrets occur in `data`: (start, end) of each, left to right, not overlapping.
    fn occurrences(&self, data: &[u8]) -> Vec<(usize, usize)> {
        let mut found = Vec::new();
        let mut i = 0;
        while i < data.len() {
            match self.secrets.iter().find(|s| data[i..].starts_with(s)) {
                Some(s) => {
                    found.push((i, i + s.len()));
                    i += s.len();
                }
                None => i += 1,
            }
        }
        found
    }

    fn mask(&self, data: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(data.len());
        let mut at = 0;
        for (start, end) in self.occurrences(data) {
            out.extend_from_slice(&data[at..start]);
            out.extend_from_slice(MASK);
            at = end;
        }
        out.extend_from_slice(&data[at..]);
        out
    }

    /// The masked bytes that can be written now; with `last`, everything that is left.
    fn feed(&mut self, stream: u8, data: &[u8], last: bool) -> Vec<u8> {
        let slot = usize::from(stream.min(2));
        let mut buffer = std::mem::take(&mut self.carry[slot]);
        buffer.extend_from_slice(data);
        let keep = self
            .secrets
            .iter()
            .map(Vec::len)
            .max()
            .unwrap_or(1)
            .saturating_sub(1);
        if last || keep == 0 {
            return self.mask(&buffer);
        }
        // Hold back the last `keep` bytes, unless a whole secret straddles that point.
        let mut split = buffer.len().saturating_sub(keep);
        for (start, end) in self.occurrences(&buffer) {
            if start < split && split < end {
                split = end;
            }
        }
        self.carry[slot] = buffer.split_off(split);
        self.mask(&buffer)
    }
}

/// Batches an attempt's output into log chunks: written when 64 KiB are pending or 200 ms after the
/// first pending byte, secrets masked.
async fn write_logs(
    store: Store,
    op: OpId,
    task: TaskNo,
    attempt: u32,
    mut chunks: mpsc::UnboundedReceiver<Chunk>,
    limit: u64,
    secrets: Vec<String>,
) {
    let mut masker = Masker::new(&secrets);
    let mut pending: Vec<(u8, Vec<u8>)> = Vec::new();
    let mut size = 0;
    let mut deadline: Option<tokio::time::Instant> = None;
    loop {
        let next = match deadline {
            None => Some(chunks.recv().await),
            Some(at) => tokio::time::timeout_at(at, chunks.recv()).await.ok(),
        };
        let closed = matches!(next, Some(None));
        if let Some(Some(chunk)) = next {
            size += chunk.data.len();
            deadline
                .get_or_insert_with(|| tokio::time::Instant::now() + Duration::from_millis(200));
            let stream = chunk.stream as u8;
            match pending.last_mut() {
                Some((s, data)) if *s == stream => data.extend(chunk.data),
                _ => pending.push((stream, chunk.data)),
            }
            if size < 64 * 1024 {
                continue;
            }
        }
        // 64 KiB pending, the deadline passed, or the output ended: write what is pending.
        let mut batch = Vec::new();
        for (stream, data) in pending.drain(..) {
            let data = masker.feed(stream, &data, false);
            if !data.is_empty() {
                batch.push(Change::Log {
                    op,
                    task,
                    attempt,
                    stream,
                    at: now(),
                    data,
                    limit,
                });
            }
        }
        if closed {
            for stream in [1u8, 2] {
                let data = masker.feed(stream, &[], true);
                if !data.is_empty() {
                    batch.push(Change::Log {
                        op,
                        task,
                        attempt,
                        stream,
                        at: now(),
                        data,
                        limit,
                    });
                }
            }
        }
        size = 0;
        deadline = None;
        if !batch.is_empty() {
            // Logs are best effort: a failure must not fail the step (its outcome is what counts),
            // but a busy database is waited for.
            let _ = apply(&store, batch, Duration::from_secs(10), false).await;
        }
        if closed {
            return;
        }
    }
}

/// The `$CAIRN_OUTPUT` file and the environment of one process of attempt `n` (`what`: `check` or
/// `run`).
fn process_files(
    shared: &Shared,
    step: &Step,
    ctx: &Context,
    job: &Job,
    n: u32,
) -> Result<(PathBuf, BTreeMap<String, String>), String> {
    let output = output_file(shared)?;
    let env = environment(shared, step, job, ctx, n, &output)?;
    Ok((output, env))
}

/// A fresh, private `$CAIRN_OUTPUT` file for one process.
/// Where an attempt's process writes its outputs (`$CAIRN_OUTPUT`): an empty file, new to it.
fn output_file(shared: &Shared) -> Result<PathBuf, String> {
    shared
        .outputs
        .take()
        .map_err(|e| format!("cannot create its output file: {e}"))
}

/// The op's `$CAIRN_OUTPUT` files, in a directory private to the user (`0700`), each `0600`, each
/// used by one attempt and removed once read.
///
/// Making a file costs ext4 a search of its inode bitmap (for a free inode not recently deleted),
/// a fifth of a short step's time when it was made between one step's end and the next one's
/// start. So one is made ahead, while a step runs ([`OutputFiles::make_spare`]), and the next
/// attempt takes it.
#[derive(Debug)]
pub struct OutputFiles {
    dir: tempfile::TempDir,
    spare: std::sync::Mutex<Vec<PathBuf>>,
    made: std::sync::atomic::AtomicU64,
    /// The files of params too long for the environment, by name: written once per run.
    params: std::sync::Mutex<BTreeMap<String, PathBuf>>,
}

impl OutputFiles {
    /// Removes what earlier runs of op `uuid` left in the temporary directory (they were killed
    /// before they could: output files, long params). Called by a resume once it owns the op: only
    /// one process owns an op at a time, and a new op has nothing there.
    pub(crate) fn remove_left(uuid: &str) {
        use std::os::unix::fs::MetadataExt as _;
        let prefix = format!("cairn-{uuid}-");
        let me = nix::unistd::geteuid().as_raw();
        if let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) {
            for entry in entries.flatten() {
                let left = entry.file_name().to_str().is_some_and(|name| {
                    name.starts_with(&prefix) && !name[prefix.len()..].contains('/')
                });
                // Only a real directory of this user's, never what a link points to.
                if left
                    && std::fs::symlink_metadata(entry.path())
                        .is_ok_and(|m| m.is_dir() && m.uid() == me)
                {
                    let _ = std::fs::remove_dir_all(entry.path());
                }
            }
        }
    }

    /// A new directory, private to the user, for a run of op `uuid`: `$TMPDIR/cairn-<uuid>-*`.
    pub(crate) fn new(uuid: &str) -> std::io::Result<Self> {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::Builder::new()
            .prefix(&format!("cairn-{uuid}-"))
            .permissions(std::fs::Permissions::from_mode(0o700))
            .tempdir()?;
        Ok(Self {
            dir,
            spare: std::sync::Mutex::new(Vec::new()),
            made: std::sync::atomic::AtomicU64::new(0),
            params: std::sync::Mutex::new(BTreeMap::new()),
        })
    }

    fn make(&self) -> std::io::Result<PathBuf> {
        use std::os::unix::fs::OpenOptionsExt;
        let n = self.made.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = self.dir.path().join(format!("output-{n}"));
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)?;
        Ok(path)
    }

    fn spare(&self) -> std::sync::MutexGuard<'_, Vec<PathBuf>> {
        self.spare
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// An empty file for one attempt: the spare one if there is one, else a new one.
    fn take(&self) -> std::io::Result<PathBuf> {
        let spare = self.spare().pop();
        spare.map_or_else(|| self.make(), Ok)
    }

    /// The file holding param `name`'s `text` (`0400`: every process of the run reads the same
    /// one; beside the output files), written the first time it is asked for. One that could not
    /// be written whole is removed, to be written again next time.
    fn param_file(&self, name: &str, text: &str) -> std::io::Result<PathBuf> {
        use std::io::Write as _;
        use std::os::unix::fs::OpenOptionsExt;
        let mut files = self
            .params
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(path) = files.get(name) {
            return Ok(path.clone());
        }
        let path = self.dir.path().join(format!("param-{name}"));
        let written = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o400)
            .open(&path)
            .and_then(|mut file| file.write_all(text.as_bytes()));
        if let Err(e) = written {
            let _ = std::fs::remove_file(&path);
            return Err(e);
        }
        files.insert(name.to_owned(), path.clone());
        Ok(path)
    }

    /// Makes a file ahead for the next attempt, unless one is waiting already.
    fn make_spare(&self) {
        if self.spare().is_empty()
            && let Ok(path) = self.make()
        {
            self.spare().push(path);
        }
    }
}

/// Attempts of a `run` or `exec` task.
#[expect(
    clippy::too_many_lines,
    reason = "to be split by the re-layering of the engine (issue 17)"
)]
async fn run_process_task(
    shared: &Shared,
    job: &Job,
    (prior, retry_from): (u32, u32),
    ctx: &Context,
    started: Instant,
    stop: &watch::Receiver<bool>,
    carry: &mut Option<Box<Record>>,
) -> Result<TaskEnd, Fatal> {
    let step = shared.step(job.step);
    let cwd = match &step.cwd {
        Some(t) => match t.render(ctx) {
            Ok(dir) => shared.workdir.join(dir),
            Err(e) => {
                apply_carrying(shared, carry, Vec::new()).await?;
                return fail_before_start(
                    shared,
                    job,
                    prior + 1,
                    format!("cannot render `cwd`: {e}"),
                )
                .await;
            }
        },
        None => shared.workdir.clone(),
    };
    let argv = match command_line(step, ctx) {
        Ok(argv) => argv,
        Err(e) => {
            apply_carrying(shared, carry, Vec::new()).await?;
            return fail_before_start(shared, job, prior + 1, e).await;
        }
    };
    let check = match &step.check {
        Some(t) => match t.render(ctx) {
            Ok(script) => {
                let shell = match &step.action {
                    Action::Run { shell, .. } => shell.clone(),
                    _ => plans::model::Shell::Bash,
                };
                Some(shell.command_line(&script))
            }
            Err(e) => {
                apply_carrying(shared, carry, Vec::new()).await?;
                return fail_before_start(
                    shared,
                    job,
                    prior + 1,
                    format!("cannot render `check`: {e}"),
                )
                .await;
            }
        },
        None => None,
    };
    // Attempts of this retry round so far.
    let mut attempt_in_run = prior - retry_from;
    let mut retrying = false;
    loop {
        attempt_in_run += 1;
        let n = retry_from + attempt_in_run;
        // A retry is a new start: none while the process drains.
        if *stop.borrow() || (retrying && draining()) {
            return Ok(TaskEnd::Interrupted);
        }
        retrying = true;
        // The first process's files and environment are made, and the step's program looked up
        // in its `PATH`, while its start commits: nothing of the attempt runs before that commit
        // is durable.
        let (start, (prepared, mut located)) = tokio::join!(
            biased;
            start_attempt(shared, job, n, retry_from, carry),
            async {
                let prepared = process_files(shared, step, ctx, job, n);
                let located = prepared
                    .as_ref()
                    .ok()
                    .and_then(|(_, env)| steps::spawn::locate(&argv, env));
                (prepared, located)
            },
        );
        start?;
        let mut prepared = Some(prepared);
        let marker = format!("{}/{}/{n}", shared.uuid, job.no);
        // The idempotency probe: exit 0 means the work is already done.
        if let Some(check) = &check {
            let made = prepared.take();
            let (output, env) =
                match made.unwrap_or_else(|| process_files(shared, step, ctx, job, n)) {
                    Ok(prepared) => prepared,
                    Err(error) => {
                        return fail_attempt(shared, job, n, error, started).await;
                    }
                };
            match run_process(
                shared,
                job,
                n,
                (check.clone(), None),
                env,
                &output,
                cwd.clone(),
                format!("{marker}/check"),
                stop,
            )
            .await?
            {
                Ok(run) if run.exit.stopped == Some(Stopped::Asked) => {
                    return finish(shared, job, n, Ended::Interrupted, started).await;
                }
                Ok(run) if run.exit.success() => {
                    let outputs = match run.outputs {
                        Ok(o) => o,
                        Err(e) => {
                            return fail_attempt(shared, job, n, format!("`check`: {e}"), started)
                                .await;
                        }
                    };
                    if let Some(missing) = missing_output(step, &outputs) {
                        let error = format!(
                            "`check` said the step is done but did not publish its output `{missing}`"
                        );
                        return fail_attempt(shared, job, n, error, started).await;
                    }
                    return finish(shared, job, n, Ended::Succeeded(outputs, true), started).await;
                }
                _ => {}
            }
        }
        if check.is_some() {
            // The check may have taken long: prove ownership again before starting the step.
            shared.renew().await?;
        }
        let made = prepared.take();
        let (output, env) = match made.unwrap_or_else(|| process_files(shared, step, ctx, job, n)) {
            Ok(prepared) => prepared,
            Err(error) => {
                return fail_attempt(shared, job, n, error, started).await;
            }
        };
        let run = match run_process(
            shared,
            job,
            n,
            (argv.clone(), located.take()),
            env,
            &output,
            cwd.clone(),
            marker,
            stop,
        )
        .await?
        {
            Ok(run) => run,
            Err(error) => {
                return fail_attempt(shared, job, n, error, started).await;
            }
        };
        let exit = &run.exit;
        if exit.stopped == Some(Stopped::Asked) {
            return finish(shared, job, n, Ended::Interrupted, started).await;
        }
        let failure = if exit.stopped == Some(Stopped::TimedOut) {
            Some(format!(
                "timed out after {}",
                plans::units::format_duration(step.timeout.unwrap_or_default())
            ))
        } else if exit.success() {
            match &run.outputs {
                Err(e) => Some(e.clone()),
                Ok(outputs) => missing_output(step, outputs)
                    .map(|k| format!("it did not publish its declared output `{k}`")),
            }
        } else {
            let how = match (exit.code, exit.signal) {
                (Some(code), _) => format!("exit code {code}"),
                (None, Some(signal)) => format!("killed by signal {signal}"),
                (None, None) => "ended without a status".to_owned(),
            };
            Some(if exit.stderr_tail.is_empty() {
                how
            } else {
                format!("{how}: {}", last_lines(&exit.stderr_tail, 5))
            })
        };
        let Some(error) = failure else {
            return finish(
                shared,
                job,
                n,
                Ended::Succeeded(run.outputs.unwrap_or_default(), false),
                started,
            )
            .await;
        };
        let retry_in = step
            .retry
            .retries(attempt_in_run, exit.code)
            .then(|| step.retry.delay_before(attempt_in_run + 1));
        let end = finish(
            shared,
            job,
            n,
            Ended::Failed {
                error: shared_mask(shared, &error),
                exit_code: exit.code,
                retry_in,
            },
            started,
        )
        .await?;
        let Some(delay) = retry_in else {
            return Ok(end);
        };
        if !wait_to_retry(shared, job, n, attempt_in_run + 1, delay, stop).await {
            return Ok(TaskEnd::Interrupted);
        }
    }
}

/// Waits `delay` before retry `next` of a task (attempt `n` failed), saying so in `CUR_TASK`;
/// `false` when the run stops meanwhile.
async fn wait_to_retry(
    shared: &Shared,
    job: &Job,
    n: u32,
    next: u32,
    delay: Duration,
    stop: &watch::Receiver<bool>,
) -> bool {
    let at = crate::time::local(now() + i64::try_from(delay.as_millis()).unwrap_or(0));
    let _ = shared
        .apply(vec![Change::CurrentTask {
            op: shared.op,
            text: Some(format!(
                "{} (attempt {n} failed; retry {next} at {})",
                job.name,
                at.split(' ').nth(1).unwrap_or_default()
            )),
        }])
        .await;
    let mut signal = stop.clone();
    tokio::select! {
        () = tokio::time::sleep(delay) => true,
        _ = signal.wait_for(|s| *s) => false,
    }
}

/// An approval gate: the task waits (and says so in `CUR_TASK`) until someone runs `cairn approve`
/// or `cairn approve --reject`; a stop leaves it waiting, for the resume to wait again.
async fn await_approval(
    shared: &Shared,
    job: &Job,
    prompt: &str,
    stop: &watch::Receiver<bool>,
) -> Result<TaskEnd, Fatal> {
    let task = job.task();
    shared
        .apply(vec![
            Change::SetTask {
                op: shared.op,
                owner: shared.me.clone(),
                task,
                status: TaskStatus::Waiting,
                at: now(),
                message: format!("waiting for approval: {prompt}"),
            },
            Change::CurrentTask {
                op: shared.op,
                text: Some(format!("{}: approve? {prompt}", job.name)),
            },
        ])
        .await?;
    shared.say(&Progress::TaskWaiting {
        op: shared.op,
        task: job.name.clone(),
        prompt: prompt.to_owned(),
    });
    let reader = shared.store.reader().map_err(Fatal::from)?;
    let started = Instant::now();
    let mut signal = stop.clone();
    let mut gates = shared.gates.subscribe();
    loop {
        let row = reader.task(shared.op, task).map_err(Fatal::from)?;
        if row.status != TaskStatus::Waiting {
            if row.status == TaskStatus::Succeeded {
                shared.say(&Progress::TaskSucceeded {
                    task: job.name.clone(),
                    by_check: false,
                    elapsed: started.elapsed(),
                });
            } else {
                shared.say(&Progress::TaskFailed {
                    task: job.name.clone(),
                    error: row.error.clone().unwrap_or_default(),
                    retry_in: None,
                });
            }
            return Ok(TaskEnd::Done {
                status: row.status,
                outputs: row.outputs,
                error: row.error,
            });
        }
        tokio::select! {
            () = tokio::time::sleep(Duration::from_millis(300)) => {}
            _ = signal.wait_for(|s| *s) => return Ok(TaskEnd::Interrupted),
            // The op failed elsewhere: leave the gate waiting, for a resume to ask again.
            _ = gates.wait_for(|s| *s) => return Ok(TaskEnd::Interrupted),
        }
    }
}

fn shared_mask(shared: &Shared, text: &str) -> String {
    String::from_utf8_lossy(&shared.mask(text.as_bytes())).into_owned()
}

/// The first declared output a step did not publish.
fn missing_output<'s>(step: &'s Step, outputs: &Map<String, Value>) -> Option<&'s str> {
    step.outputs
        .as_ref()?
        .iter()
        .find(|k| !outputs.contains_key(k.as_str()))
        .map(String::as_str)
}

fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::Masker;

    #[test]
    fn a_secret_split_across_chunks_is_still_masked() {
        let mut m = Masker::new(&["hunter2-very-secret".to_owned()]);
        let mut out = m.feed(1, b"oops hunter2-v", false);
        out.extend(m.feed(1, b"ery-secret and more", false));
        out.extend(m.feed(1, b"", true));
        assert_eq!(String::from_utf8(out).unwrap(), "oops ******** and more");
    }

    #[test]
    fn binary_output_is_kept_as_it_is() {
        let mut m = Masker::new(&["pw".to_owned()]);
        let data = [0xff, 0xfe, b'p', b'w', 0x00, 0xc3];
        let mut out = m.feed(2, &data, false);
        out.extend(m.feed(2, &[], true));
        assert_eq!(
            out,
            [
                0xff, 0xfe, b'*', b'*', b'*', b'*', b'*', b'*', b'*', b'*', 0x00, 0xc3
            ]
        );
    }
}
