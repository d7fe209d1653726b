//! What every task of a run shares ([`Shared`]), and the writes a run makes through it.
//!
//! - [`Shared`]: the op's identity and inputs, the store, the run's options and handles.
//! - [`Signals`] (private fields): the stop signal and why it fired, ownership lost, the lease,
//!   the decided outcome, the approval gates; [`Made`]: what is made once per run.
//! - Writes: [`Shared::apply`] (waits out a busy database), [`Shared::apply_own`] (a task's own
//!   start or end: on the caller's thread while it is the only task running), `patiently`.
//! - [`with_hooks`]: the steps a run's tasks run, by task number: the plan's steps, then its hooks.
//! - [`StopReason`]: why the engine itself stopped the run.
//!
//! It sits in the task layer, the lowest that needs it; the run layer builds on it.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use plans::model::{Plan, Step};
use plans::template::Context;
use serde_json::{Map, Value};
use store::{Change, Error as StoreError, OpId, ProcessId, Store};
use tokio::sync::watch;

use super::Fatal;
use super::files::OutputFiles;
use super::logs::Masker;
use super::subplan::Children;
use crate::options::Options;
use crate::outcome::EndState;
use crate::owner::now;
use crate::progress::{Progress, Sink};
use crate::secrets::{self, SecretKey};
use crate::shutdown::{Stop, StopHandle};

/// Files of a bundle, by key: a plan's sub-plans (and theirs), from the op's snapshot.
pub(crate) type Files = Arc<BTreeMap<String, String>>;

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
    /// The plan's steps, then its hooks as steps (see [`with_hooks`]); indexed by task number.
    pub steps: Vec<Step>,
    pub hooks: HookTasks,
    /// The plan's sub-plans (and theirs), from the snapshot: absolute path → text.
    pub files: Files,
    /// Starts and resumes the child ops of `plan:` tasks (the op layer provides it).
    pub children: &'static dyn Children,
    /// The ops above this one, nearest first (for a sub-plan's op); a cancel of any ends it too.
    pub ancestors: Vec<OpId>,
    /// How the run is told to stop, and what it knows of its lease and outcome.
    pub signals: Signals,
    /// What is made once per run, the first time a task needs it.
    pub made: Made,
}

/// How a run is told to stop, and what it knows of its lease and its outcome: written by the run
/// loop, the heartbeat and the cancel watcher, read by every task.
pub(crate) struct Signals {
    /// Set when the run must stop: by a signal (the caller holds a clone) or by the engine itself.
    stop_handle: StopHandle,
    stop: watch::Receiver<bool>,
    /// Why the run is stopping, when the engine stopped it.
    stop_reason: Arc<std::sync::Mutex<Option<StopReason>>>,
    /// The grace a cancel request asks the steps for (`cairn cancel --grace`), in milliseconds;
    /// `u64::MAX`: none asked, the run's own `--grace`.
    cancel_grace_ms: AtomicU64,
    /// Set when ownership was lost: nothing more may be written.
    lost: AtomicBool,
    /// Why it was lost (the first reason given), for the run's end and its last line. The flag
    /// above is kept apart so that the check before every commit reads no mutex.
    lost_why: std::sync::Mutex<Option<String>>,
    /// Until when the lease is known to hold (the last successful claim or renewal).
    lease_until: AtomicI64,
    /// The op's outcome, once decided, for its finishing hooks.
    outcome: std::sync::Mutex<Option<EndState>>,
    /// Set when the op failed: approval gates still waiting end (they cannot lead anywhere).
    gates: Arc<watch::Sender<bool>>,
    /// Set when the op is parked at its gates: they leave the run, still waiting.
    parked: watch::Sender<bool>,
    /// The gates (by task number) that wait for their answer, recorded and within their own
    /// `timeout`: the op may be parked once every task in flight is one of them.
    gates_waiting: watch::Sender<std::collections::BTreeSet<usize>>,
    /// Whether only approval gates are in flight (the op is shown `waiting`): the op's own
    /// `timeout` does not run meanwhile.
    at_gates: watch::Sender<bool>,
    /// A stop signal that never fires: finishing hooks run to their end even when the op was
    /// stopped. Its sender lives as long as this.
    calm: watch::Receiver<bool>,
    _calm_tx: watch::Sender<bool>,
}

impl Signals {
    /// The signals of a run stopped through `stop`, whose owner's lease holds until
    /// `lease_until` (the claim just made).
    pub(crate) fn new(stop: StopHandle, lease_until: store::Millis) -> Self {
        let (calm_tx, calm) = watch::channel(false);
        Self {
            stop: stop.subscribe(),
            gates: stop.gates(),
            stop_handle: stop,
            stop_reason: Arc::new(std::sync::Mutex::new(None)),
            cancel_grace_ms: AtomicU64::new(u64::MAX),
            lost: AtomicBool::new(false),
            lost_why: std::sync::Mutex::new(None),
            lease_until: AtomicI64::new(lease_until),
            outcome: std::sync::Mutex::new(None),
            parked: watch::channel(false).0,
            gates_waiting: watch::channel(std::collections::BTreeSet::new()).0,
            at_gates: watch::channel(false).0,
            calm,
            _calm_tx: calm_tx,
        }
    }
}

/// What every task of a run would otherwise make again, made the first time one needs it.
#[derive(Default)]
pub(crate) struct Made {
    /// What every task's template context holds (params, `op`, `env`): a param may be a list of
    /// 100,000 items, and each item's task would otherwise convert it again.
    base_context: std::sync::OnceLock<Context>,
    /// The params as every process's environment passes them (`files::param_env`).
    param_env: std::sync::OnceLock<BTreeMap<String, String>>,
    /// The key that seals and opens outputs holding a secret, read the first time one is met.
    key: std::sync::OnceLock<Option<SecretKey>>,
    /// The SSH connections of the run's steps on other hosts.
    ssh: std::sync::OnceLock<Result<std::sync::Arc<procs::remote::Transport>, String>>,
}

/// Applies a batch through the store's writer, waiting out a database that another process holds
/// (up to `patience`).
pub(crate) async fn apply_patiently(
    store: &Store,
    batch: Vec<Change>,
    patience: Duration,
) -> Result<(), Fatal> {
    patiently(patience, || store.apply(batch.clone()))
        .await
        .map(drop)
        .map_err(Fatal::from)
}

/// Runs `write` again while it fails because another process holds the database, up to
/// `patience`, backing off between tries.
pub(crate) async fn patiently<T, F>(
    patience: Duration,
    mut write: impl FnMut() -> F,
) -> Result<T, StoreError>
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
            Err(e) => return Err(e.after_waiting(started.elapsed())),
            done => return done,
        }
    }
}

impl Shared {
    pub(crate) async fn apply(&self, batch: Vec<Change>) -> Result<(), Fatal> {
        self.not_lost()?;
        let applied = apply_patiently(&self.store, batch, self.options.lease / 2).await;
        self.lost_if_fenced(applied)
    }

    /// A write refused because another process owns the op (or the op is gone) means the op is
    /// lost, whoever made it: the run's steps are ended and nothing more is written.
    fn lost_if_fenced(&self, applied: Result<(), Fatal>) -> Result<(), Fatal> {
        if let Err(Fatal::Lost(why)) = &applied {
            self.mark_lost(why);
            self.stop_all();
        }
        applied
    }

    /// [`Shared::apply`] for a task's own start or end (see [`Shared::commit_together`]).
    pub(crate) async fn apply_own(&self, batch: Vec<Change>) -> Result<(), Fatal> {
        self.not_lost()?;
        let applied = patiently(self.options.lease / 2, || async {
            self.commit_together(vec![batch.clone()])
                .await
                .pop()
                .unwrap_or(Err(StoreError::Closed))
        })
        .await
        .map(drop)
        .map_err(Fatal::from);
        self.lost_if_fenced(applied)
    }

    /// Refuses a write once ownership was lost: nothing more may be written.
    pub(crate) fn not_lost(&self) -> Result<(), Fatal> {
        if self.is_lost() {
            return Err(Fatal::Lost(self.lost_why()));
        }
        Ok(())
    }

    /// Commits a task's own start or end, `batches` together (see [`Store::apply_together`]).
    /// While no other task runs in this process, on this thread, when the writer is idle and the
    /// database free ([`Store::apply_solo`]): the task waits for this commit anyway, and a serial
    /// chain's step is spared two thread wakes. With other tasks running, through the writer, so
    /// that their commits are shared. Writes made while a process runs (its pid, its logs,
    /// heartbeats) always go through the writer: the engine's thread keeps reading the process's
    /// output meanwhile.
    pub(crate) async fn commit_together(
        &self,
        batches: Vec<Vec<Change>>,
    ) -> Vec<Result<Vec<store::Applied>, StoreError>> {
        if self.options.tasks.get() > 1 {
            return self.store.apply_together(batches).await;
        }
        self.store.apply_solo(batches).await
    }

    /// Whether tasks may start: not once the run stops or the process drains.
    pub(crate) fn may_start(&self) -> bool {
        !self.stopping() && !self.draining()
    }

    pub(crate) fn draining(&self) -> bool {
        self.options.drain.is_draining()
    }

    /// Asks every running step to stop, for the engine's own reasons (ownership lost, store
    /// failed).
    pub(crate) fn stop_all(&self) {
        self.signals.stop_handle.stop();
    }

    /// The run's stop signal, for a task to wait on.
    pub(crate) fn stop_signal(&self) -> &watch::Receiver<bool> {
        &self.signals.stop
    }

    /// A stop signal that never fires (finishing hooks run to their end).
    pub(crate) fn calm(&self) -> &watch::Receiver<bool> {
        &self.signals.calm
    }

    /// Whether ownership was lost: nothing more may be written.
    pub(crate) fn is_lost(&self) -> bool {
        self.signals.lost.load(Ordering::SeqCst)
    }

    /// Ownership is lost, for `why` (the first reason given is kept): nothing more may be written.
    pub(crate) fn mark_lost(&self, why: &str) {
        if let Ok(mut slot) = self.signals.lost_why.lock() {
            slot.get_or_insert_with(|| why.to_owned());
        }
        self.signals.lost.store(true, Ordering::SeqCst);
    }

    /// Why ownership was lost, as the store said it (which process owns the op now, or why the
    /// lease could not be renewed).
    pub(crate) fn lost_why(&self) -> String {
        self.signals
            .lost_why
            .lock()
            .ok()
            .and_then(|why| why.clone())
            .unwrap_or_else(|| "another process owns the op".to_owned())
    }

    /// The op failed or cannot go on: approval gates still waiting end.
    pub(crate) fn close_gates(&self) {
        self.signals.gates.send_replace(true);
    }

    /// Fires when approval gates can no longer lead anywhere (see [`Shared::close_gates`]).
    pub(crate) fn gates_closed(&self) -> watch::Receiver<bool> {
        self.signals.gates.subscribe()
    }

    /// The op is parked at its gates (its owner gave it up): they leave the run, still waiting.
    pub(crate) fn park_gates(&self) {
        self.signals.parked.send_replace(true);
    }

    /// Fires when the op is parked (see [`Shared::park_gates`]).
    pub(crate) fn gates_parked(&self) -> watch::Receiver<bool> {
        self.signals.parked.subscribe()
    }

    /// Gate `task` waits for its answer: recorded, and within its own `timeout`.
    pub(crate) fn gate_waits(&self, task: usize) {
        self.signals.gates_waiting.send_modify(|gates| {
            gates.insert(task);
        });
    }

    /// The gates that wait for their answer (see [`Shared::gate_waits`]), as they change.
    pub(crate) fn gates_waiting(&self) -> watch::Receiver<std::collections::BTreeSet<usize>> {
        self.signals.gates_waiting.subscribe()
    }

    /// Says whether only approval gates are in flight now.
    pub(crate) fn set_at_gates(&self, only_gates: bool) {
        self.signals.at_gates.send_replace(only_gates);
    }

    /// Whether only approval gates are in flight, as it changes (the op's timer pauses then).
    pub(crate) fn at_gates(&self) -> watch::Receiver<bool> {
        self.signals.at_gates.subscribe()
    }

    /// The op's outcome once decided, for its finishing hooks.
    pub(crate) fn outcome(&self) -> Option<EndState> {
        self.signals.outcome.lock().ok().and_then(|o| o.clone())
    }

    pub(crate) fn set_outcome(&self, end: EndState) {
        if let Ok(mut outcome) = self.signals.outcome.lock() {
            *outcome = Some(end);
        }
    }

    /// The params as every process's environment passes them, made the first time (a failure, a
    /// full disk, is tried again by the next process).
    /// The run's SSH transport, made the first time a step on another host needs it.
    pub(crate) fn ssh(&self) -> Result<std::sync::Arc<procs::remote::Transport>, String> {
        self.made
            .ssh
            .get_or_init(|| {
                procs::remote::Transport::new()
                    .map(std::sync::Arc::new)
                    .map_err(|e| format!("cannot make the directory of SSH connections: {e}"))
            })
            .clone()
    }

    /// Waits for the wrappers of steps on other hosts told their end is recorded (see
    /// [`procs::remote::Transport::settle`]), if any step of the run went to another host.
    pub(crate) async fn settle_ssh(&self) {
        if let Some(Ok(transport)) = self.made.ssh.get() {
            transport.settle().await;
        }
    }

    pub(crate) fn param_env(
        &self,
        make: impl FnOnce() -> Result<BTreeMap<String, String>, String>,
    ) -> Result<&BTreeMap<String, String>, String> {
        if let Some(params) = self.made.param_env.get() {
            return Ok(params);
        }
        let made = make()?;
        Ok(self.made.param_env.get_or_init(|| made))
    }

    pub(crate) fn say(&self, p: &Progress) {
        (self.progress)(p);
    }

    pub(crate) fn stopping(&self) -> bool {
        *self.signals.stop.borrow()
    }

    pub(crate) fn step(&self, i: usize) -> &Step {
        &self.steps[i]
    }

    /// Stops the run for `reason` (the first reason given is kept).
    pub(crate) fn stop_because(&self, reason: StopReason) {
        if let Ok(mut slot) = self.signals.stop_reason.lock() {
            slot.get_or_insert(reason);
        }
        self.stop_all();
    }

    pub(crate) fn stop_reason(&self) -> Option<StopReason> {
        self.signals.stop_reason.lock().ok().and_then(|r| r.clone())
    }

    /// Who or what stopped the run from outside (a signal, its server's shutdown, a parent op's
    /// stop), if it was said.
    pub(crate) fn stop_cause(&self) -> Option<Stop> {
        Stop::of(&self.options.drain, self.signals.stop_handle.cause())
    }

    /// The handle that stops the run (a child op's stop follows it, cause included).
    pub(crate) fn stop_handle(&self) -> StopHandle {
        self.signals.stop_handle.clone()
    }

    /// A cancel request asks the steps to get `grace` between TERM and KILL, not the run's own.
    pub(crate) fn set_cancel_grace(&self, grace: Duration) {
        let ms = u64::try_from(grace.as_millis()).unwrap_or(u64::MAX - 1);
        self.signals
            .cancel_grace_ms
            .store(ms.min(u64::MAX - 1), Ordering::SeqCst);
    }

    /// How long a step's processes get between TERM and KILL, decided when they must stop: the
    /// grace a cancel request asked for, else the run's `--grace`; a run that lost its op (its
    /// lease) stops its steps before another owner may start them: within a sixth of the lease.
    pub(crate) fn step_grace(&self) -> Duration {
        let asked = self.signals.cancel_grace_ms.load(Ordering::SeqCst);
        let grace = if asked == u64::MAX {
            self.options.grace
        } else {
            Duration::from_millis(asked)
        };
        if self.is_lost() {
            grace.min(self.options.lease / 6)
        } else {
            grace
        }
    }

    /// A request to cancel this op, or an op above it (a sub-plan's parent), if one was made.
    pub(crate) fn cancel_request(&self, reader: &store::Reader) -> Option<store::Request> {
        cancel_request_in(reader, &self.cancel_targets()).map(|(request, _)| request)
    }

    /// This op and those above it (a sub-plan's parents): a cancel of any of them cancels it.
    pub(crate) fn cancel_targets(&self) -> Vec<OpId> {
        std::iter::once(self.op)
            .chain(self.ancestors.iter().copied())
            .collect()
    }

    /// Reads why the run stops, from anywhere (a task that outlives the borrow of this).
    pub(crate) fn stop_reason_handle(&self) -> impl Fn() -> Option<StopReason> + Send + 'static {
        let slot = self.signals.stop_reason.clone();
        move || slot.lock().ok().and_then(|r| r.clone())
    }

    /// Whether the lease still holds with a safety margin: past it, another process may take the
    /// op over, so this one must not start anything.
    pub(crate) fn lease_holds(&self) -> bool {
        let margin = i64::try_from(self.options.lease.as_millis() / 3).unwrap_or(i64::MAX);
        now()
            < self
                .signals
                .lease_until
                .load(Ordering::SeqCst)
                .saturating_sub(margin)
    }

    /// A fenced write that also renews the lease: proof, right before starting a process, that this
    /// process still owns the op.
    pub(crate) async fn renew(&self) -> Result<(), Fatal> {
        self.renew_within(self.options.lease / 2).await
    }

    /// [`Shared::renew`], trying again while the database is locked for up to `patience`.
    pub(crate) async fn renew_within(&self, patience: Duration) -> Result<(), Fatal> {
        self.not_lost()?;
        let until = now() + i64::try_from(self.options.lease.as_millis()).unwrap_or(i64::MAX);
        let batch = vec![Change::Heartbeat {
            op: self.op,
            owner: self.me.clone(),
            lease_until: until,
        }];
        let applied = apply_patiently(&self.store, batch, patience).await;
        self.lost_if_fenced(applied)?;
        self.signals.lease_until.store(until, Ordering::SeqCst);
        Ok(())
    }

    /// The template context of a task: params, the op, the captured environment, and the outputs of
    /// the steps its templates use.
    pub(crate) fn context(&self, step: &Step, outputs: &[(usize, Map<String, Value>)]) -> Context {
        let mut ctx = self
            .made
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
            if !step.uses.contains(index) {
                continue;
            }
            if map.values().any(secrets::is_sealed) {
                let (opened, hidden) = self.open_outputs(map);
                ctx.outputs(*index, &Value::Object(opened))
                    .hidden_outputs(*index, &Value::Object(hidden));
            } else {
                ctx.outputs(*index, &Value::Object(map.clone()));
            }
        }
        if let Some(end) = self.outcome() {
            ctx.op("status", &Value::from(end.status.as_str()))
                .op("error", &end.error.map_or(Value::Null, Value::from))
                .op(
                    "failed_task",
                    &end.failed_task.map_or(Value::Null, Value::from),
                );
        }
        ctx
    }

    pub(crate) fn mask(&self, data: &[u8]) -> Vec<u8> {
        Masker::new(&self.secrets).mask(data)
    }

    /// The op's secret key (`None` when there is none to be had), read once.
    fn secret_key(&self) -> Option<&SecretKey> {
        self.made
            .key
            .get_or_init(|| secrets::key(&self.store, false).ok().flatten())
            .as_ref()
    }

    /// A step's `outputs` as they are stored: each value that holds a secret sealed like a secret
    /// param (or, should the key be out of reach, masked), the others as they are.
    pub(crate) fn seal_outputs(&self, outputs: Map<String, Value>) -> Map<String, Value> {
        if self.secrets.iter().all(String::is_empty) {
            return outputs;
        }
        outputs
            .into_iter()
            .map(|(name, value)| {
                if !secrets::holds_secret(&value, &self.secrets) {
                    return (name, value);
                }
                let stored = match self.secret_key() {
                    Some(key) => secrets::seal_value(&value, key),
                    None => Value::String(
                        String::from_utf8_lossy(&self.mask(value.to_string().as_bytes()))
                            .into_owned(),
                    ),
                };
                (name, stored)
            })
            .collect()
    }

    /// A step's stored `outputs` opened, and as they read with the values that held a secret
    /// hidden (a value that cannot be opened stays sealed in both).
    fn open_outputs(
        &self,
        outputs: &Map<String, Value>,
    ) -> (Map<String, Value>, Map<String, Value>) {
        let mut opened = Map::new();
        let mut hidden = Map::new();
        for (name, value) in outputs {
            let open = secrets::is_sealed(value)
                .then(|| secrets::open_value(name, value, self.secret_key()).ok())
                .flatten();
            let shown = if open.is_some() {
                Value::from("********")
            } else {
                value.clone()
            };
            opened.insert(name.clone(), open.unwrap_or_else(|| value.clone()));
            hidden.insert(name.clone(), shown);
        }
        (opened, hidden)
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
                on: hook.on.clone(),
                timeout: Some(hook.timeout),
                retry: plans::model::Retry::default(),
                check: None,
                until: None,
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
                params: Vec::new(),
                daemon: false,
                adopt: false,
            });
        }
    }
    (steps, tasks)
}

/// The first cancel request made of `ops`, as `reader` reads them, with the grace it asks for
/// between TERM and KILL (`cairn cancel --grace`; `None`: the owner's own).
pub(crate) fn cancel_request_in(
    reader: &store::Reader,
    ops: &[OpId],
) -> Option<(store::Request, Option<Duration>)> {
    ops.iter().find_map(|&op| {
        let row = reader.op_head(op).ok()?;
        let grace = row
            .cancel_grace_ms
            .map(|ms| Duration::from_millis(u64::try_from(ms).unwrap_or(0)));
        row.cancel.map(|request| (request, grace))
    })
}
