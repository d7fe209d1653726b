//! The store's interface: what a backend provides ([`Backend`] for writes, [`ReadBackend`] for
//! reads), and the handles the engine holds ([`Store`], [`Reader`]), cheap to clone over either.
//!
//! A backend takes [`Change`]s and gives back typed rows and [`Error`]s; nothing here names a
//! database, a file or a connection. Opening one is [`crate::open`] with a [`crate::Location`].

use std::fmt;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use crate::error::{Error, Result};
use crate::location::Location;
use crate::types::{
    Applied, AttemptRow, Briefs, Change, CooldownRow, EventKind, EventRow, LockRow, LogChunk,
    Millis, Moves, NodeRow, OpFilter, OpId, OpRow, OpStatus, Pause, ScheduleRow, Snapshot,
    TaskBrief, TaskNo, TaskRow, TokenRow,
};

/// Each batch's result, in the batches' order.
pub type Results = Vec<Result<Vec<Applied>>>;

/// A commit in progress: resolves once the batches are durable (or refused).
pub type Committing<'a> = Pin<Box<dyn Future<Output = Results> + Send + 'a>>;

/// Where changes become durable. Every batch is all or nothing, and the durable rules
/// (`crate::rules`) decide what each change may do.
pub trait Backend: fmt::Debug + Send + Sync + 'static {
    /// Makes each batch durable, all or nothing each: one refused does not undo the others.
    /// The results are in the batches' order, and come once everything is durable.
    fn commit(&self, batches: Vec<Vec<Change>>) -> Committing<'_>;

    /// [`Backend::commit`] for a caller that waits for it and has nothing else to do meanwhile
    /// (the one task running in its process): a hint the backend may use to commit sooner.
    fn commit_solo(&self, batches: Vec<Vec<Change>>) -> Committing<'_> {
        self.commit(batches)
    }

    /// [`Backend::commit`] for a caller outside an async runtime, which blocks until it is done.
    fn commit_blocking(&self, batches: Vec<Vec<Change>>) -> Results;

    /// Where the store is.
    fn location(&self) -> &Location;

    /// Where the key that seals secret params is kept for this store.
    fn secret_key_file(&self) -> PathBuf;

    /// A view for reading what is committed.
    fn reader(&self) -> Result<Reader>;

    /// Resolves once another process may have committed something a serving node acts on
    /// ([`Change::wakes_nodes`]), or after `timeout`. A backend that cannot tell (SQLite) waits
    /// the timeout: its callers poll.
    fn wait_for_change(&self, timeout: Duration) -> Waiting<'_> {
        Box::pin(tokio::time::sleep(timeout))
    }
}

/// A wait for a change (see [`Backend::wait_for_change`]).
pub type Waiting<'a> = Pin<Box<dyn Future<Output = ()> + Send + 'a>>;

/// Reads of what is committed.
pub trait ReadBackend: fmt::Debug + Send + Sync + 'static {
    fn list_ops(&self, filter: &OpFilter) -> Result<Vec<OpRow>>;
    /// How many ops are stored with `status` (through the index on it).
    fn count_ops(&self, status: OpStatus) -> Result<u64>;
    fn op(&self, op: OpId) -> Result<OpRow>;
    /// The op's row without its params and env (read as `null` and empty): for the checks that
    /// read an op again and again, whose params may hold a list of a million items.
    fn op_head(&self, op: OpId) -> Result<OpRow>;
    /// Every schedule, by name.
    fn schedules(&self) -> Result<Vec<ScheduleRow>>;
    /// The child op that runs task `task` of `op`, if any.
    fn child(&self, op: OpId, task: TaskNo) -> Result<Option<OpRow>>;
    /// The child ops an op started (its `plan:` steps), by task.
    fn children(&self, op: OpId) -> Result<Vec<OpRow>>;
    fn tasks(&self, op: OpId) -> Result<Vec<TaskRow>>;
    /// The op's tasks that are `running` or `waiting` now, by task number: what its `CUR_TASK`
    /// lists.
    fn active_tasks(&self, op: OpId) -> Result<Vec<TaskRow>>;
    fn task(&self, op: OpId, task: TaskNo) -> Result<TaskRow>;
    /// The op's tasks that `which` names, as a run takes them up ([`TaskBrief`]), by number.
    fn task_briefs(&self, op: OpId, which: Briefs) -> Result<Vec<TaskBrief>>;
    /// The op's highest task number, if it has a task: read through the key, not by counting.
    fn last_task(&self, op: OpId) -> Result<Option<TaskNo>>;
    fn attempts(&self, op: OpId) -> Result<Vec<AttemptRow>>;
    /// The op's attempts that are `running` (what a take-over ends and records interrupted), by
    /// task then number: read without the op's other attempts, however many it has.
    fn running_attempts(&self, op: OpId) -> Result<Vec<AttemptRow>>;
    fn events(&self, op: OpId) -> Result<Vec<EventRow>>;
    /// The ops that moved (recorded an event: every change of an op or a task records one)
    /// after `after`, a cursor an earlier call gave; `None` asks where things stand now. It
    /// reads what the writers logged since, never every op.
    fn moves(&self, after: Option<u64>) -> Result<Moves>;
    /// The op's newest event of `kind` on task `task`, if any.
    fn last_event(&self, op: OpId, task: &str, kind: EventKind) -> Result<Option<EventRow>>;
    /// Log chunks of the op (or of one task), in order, after `after` = (task, attempt, seq).
    fn logs(
        &self,
        op: OpId,
        task: Option<TaskNo>,
        after: Option<(TaskNo, u32, i64)>,
    ) -> Result<Vec<LogChunk>>;
    fn snapshot(&self, op: OpId) -> Result<Snapshot>;
    fn locks(&self) -> Result<Vec<LockRow>>;
    /// Cooldowns that still run at `now` (acknowledged ones included, marked).
    fn cooldowns(&self, now: Millis) -> Result<Vec<CooldownRow>>;
    /// Every pause stored, the global one and scoped ones, ended maintenance windows included.
    fn pauses(&self) -> Result<Vec<Pause>>;
    /// Every serving node recorded, live or not (see [`NodeRow`]), by host then pid.
    fn nodes(&self) -> Result<Vec<NodeRow>>;
    /// Every token of the HTTP API, by name.
    fn tokens(&self) -> Result<Vec<TokenRow>>;
    /// Whether any op's params hold a sealed secret (`{"$secret": ...}`): then the secret key
    /// exists somewhere, and a missing one must be restored, never made anew.
    fn any_sealed(&self) -> Result<bool>;
}

/// A handle on the store for writing: cheap to clone; the backend stops when the last clone drops.
#[derive(Debug, Clone)]
pub struct Store {
    backend: Arc<dyn Backend>,
    /// How long each commit took, as its caller waited for it (the queue included).
    commits: Arc<crate::stats::Histogram>,
}

impl Store {
    /// Opens (creating if needed, private to the user) the SQLite database at `path`.
    pub fn open(path: &Path) -> Result<Self> {
        crate::open(&Location::Sqlite(path.to_path_buf()))
    }

    /// A store over `backend` (a test's wrapper, say).
    pub fn from_backend(backend: impl Backend) -> Self {
        Self {
            backend: Arc::new(backend),
            commits: Arc::new(crate::stats::Histogram::new(crate::stats::COMMIT_BOUNDS)),
        }
    }

    /// How long this process's commits took, each as its caller waited for it.
    #[must_use]
    pub fn commit_latency(&self) -> &crate::stats::Histogram {
        &self.commits
    }

    /// Where the store is: the database file, or a server's address.
    #[must_use]
    pub fn path(&self) -> &Path {
        self.backend.location().as_path()
    }

    /// Where the store is.
    #[must_use]
    pub fn location(&self) -> &Location {
        self.backend.location()
    }

    /// Where the key that seals secret params is kept for this store (for SQLite, the file
    /// beside the database, `<db>.key`). The engine never derives it from the store's location.
    #[must_use]
    pub fn secret_key_file(&self) -> PathBuf {
        self.backend.secret_key_file()
    }

    /// [`Store::apply_together`] for a caller that waits for this commit and has nothing else to
    /// do meanwhile (the one task running in its process): the backend may commit it sooner.
    pub async fn apply_solo(&self, batches: Vec<Vec<Change>>) -> Results {
        let started = std::time::Instant::now();
        let results = self.backend.commit_solo(batches).await;
        self.commits.observe(started.elapsed());
        results
    }

    /// Makes `batch` durable, all or nothing; returns once it is committed (and synced, unless it
    /// holds nothing but what dies with the boot: `Change::dies_with_the_boot`).
    pub async fn apply(&self, batch: Vec<Change>) -> Result<Vec<Applied>> {
        self.apply_together(vec![batch])
            .await
            .pop()
            .unwrap_or(Err(Error::Closed))
    }

    /// Makes each batch durable, all or nothing each, in one transaction: they are committed
    /// together, and one refused does not undo the others. The results are in the batches' order.
    pub async fn apply_together(&self, batches: Vec<Vec<Change>>) -> Results {
        let started = std::time::Instant::now();
        let results = self.backend.commit(batches).await;
        self.commits.observe(started.elapsed());
        results
    }

    /// [`Store::apply`] for callers outside an async runtime.
    pub fn apply_blocking(&self, batch: Vec<Change>) -> Result<Vec<Applied>> {
        let started = std::time::Instant::now();
        let results = self.backend.commit_blocking(vec![batch]);
        self.commits.observe(started.elapsed());
        results.into_iter().next().unwrap_or(Err(Error::Closed))
    }

    /// A reader of the same store.
    pub fn reader(&self) -> Result<Reader> {
        self.backend.reader()
    }

    /// Resolves once another process may have committed something a serving node acts on, or
    /// after `timeout` (see [`Backend::wait_for_change`]).
    pub async fn wait_for_change(&self, timeout: Duration) {
        self.backend.wait_for_change(timeout).await;
    }
}

/// A read-only view of the store.
#[derive(Debug)]
pub struct Reader {
    backend: Box<dyn ReadBackend>,
}

impl Reader {
    /// Opens the SQLite database at `path` read-only; `None` when there is no file yet. Never
    /// writes.
    pub fn open(path: &Path) -> Result<Option<Self>> {
        crate::open_reader(&Location::Sqlite(path.to_path_buf()))
    }

    /// A reader over `backend`.
    pub fn from_backend(backend: impl ReadBackend) -> Self {
        Self {
            backend: Box::new(backend),
        }
    }

    /// How many ops are stored with each status that is not final (queued, running, ...): a
    /// read of the status index, whose length is that of the open ops, not of the history.
    pub fn open_op_counts(&self) -> Result<Vec<(OpStatus, u64)>> {
        OpStatus::ALL
            .iter()
            .filter(|status| !status.is_final())
            .map(|status| Ok((*status, self.backend.count_ops(*status)?)))
            .collect()
    }

    pub fn list_ops(&self, filter: &OpFilter) -> Result<Vec<OpRow>> {
        self.backend.list_ops(filter)
    }

    pub fn op(&self, op: OpId) -> Result<OpRow> {
        self.backend.op(op)
    }

    /// [`ReadBackend::op_head`].
    pub fn op_head(&self, op: OpId) -> Result<OpRow> {
        self.backend.op_head(op)
    }

    /// Every schedule, by name.
    pub fn schedules(&self) -> Result<Vec<ScheduleRow>> {
        self.backend.schedules()
    }

    /// The child op that runs task `task` of `op`, if any.
    pub fn child(&self, op: OpId, task: TaskNo) -> Result<Option<OpRow>> {
        self.backend.child(op, task)
    }

    /// The child ops this op started, by task.
    pub fn children(&self, op: OpId) -> Result<Vec<OpRow>> {
        self.backend.children(op)
    }

    pub fn tasks(&self, op: OpId) -> Result<Vec<TaskRow>> {
        self.backend.tasks(op)
    }

    /// The op's tasks that are `running` or `waiting` now, by task number.
    pub fn active_tasks(&self, op: OpId) -> Result<Vec<TaskRow>> {
        self.backend.active_tasks(op)
    }

    pub fn task(&self, op: OpId, task: TaskNo) -> Result<TaskRow> {
        self.backend.task(op, task)
    }

    /// [`ReadBackend::task_briefs`].
    pub fn task_briefs(&self, op: OpId, which: Briefs) -> Result<Vec<TaskBrief>> {
        self.backend.task_briefs(op, which)
    }

    /// [`ReadBackend::last_task`].
    pub fn last_task(&self, op: OpId) -> Result<Option<TaskNo>> {
        self.backend.last_task(op)
    }

    pub fn attempts(&self, op: OpId) -> Result<Vec<AttemptRow>> {
        self.backend.attempts(op)
    }

    /// The op's attempts that are `running`, by task then number.
    pub fn running_attempts(&self, op: OpId) -> Result<Vec<AttemptRow>> {
        self.backend.running_attempts(op)
    }

    pub fn events(&self, op: OpId) -> Result<Vec<EventRow>> {
        self.backend.events(op)
    }

    /// The ops that moved after the cursor `after` (see [`ReadBackend::moves`]).
    pub fn moves(&self, after: Option<u64>) -> Result<Moves> {
        self.backend.moves(after)
    }

    /// The op's newest event of `kind` on task `task` (a gate's `task-waiting`, with its prompt).
    pub fn last_event(&self, op: OpId, task: &str, kind: EventKind) -> Result<Option<EventRow>> {
        self.backend.last_event(op, task, kind)
    }

    pub fn logs(
        &self,
        op: OpId,
        task: Option<TaskNo>,
        after: Option<(TaskNo, u32, i64)>,
    ) -> Result<Vec<LogChunk>> {
        self.backend.logs(op, task, after)
    }

    pub fn snapshot(&self, op: OpId) -> Result<Snapshot> {
        self.backend.snapshot(op)
    }

    pub fn locks(&self) -> Result<Vec<LockRow>> {
        self.backend.locks()
    }

    pub fn cooldowns(&self, now: Millis) -> Result<Vec<CooldownRow>> {
        self.backend.cooldowns(now)
    }

    /// The pauses that hold at `now` (a maintenance window that ended holds nothing).
    pub fn pauses(&self, now: Millis) -> Result<Vec<Pause>> {
        let mut pauses = self.backend.pauses()?;
        pauses.retain(|p| p.holds_at(now));
        Ok(pauses)
    }

    /// The first pause that holds an op of `plan` with `lock_key` at `now`, the global one first.
    pub fn pause_of(
        &self,
        plan: &str,
        lock_key: Option<&str>,
        now: Millis,
    ) -> Result<Option<Pause>> {
        Ok(self
            .pauses(now)?
            .into_iter()
            .find(|p| p.scope.holds(plan, lock_key)))
    }

    pub fn nodes(&self) -> Result<Vec<NodeRow>> {
        self.backend.nodes()
    }

    pub fn tokens(&self) -> Result<Vec<TokenRow>> {
        self.backend.tokens()
    }

    pub fn any_sealed(&self) -> Result<bool> {
        self.backend.any_sealed()
    }
}
