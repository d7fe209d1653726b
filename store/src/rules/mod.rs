//! The durable rules, written once for every backend: what each [`Change`] may do and what it
//! records, over a transaction ([`Tx`]) that a backend implements with its own queries.
//!
//! The rules decide (who may claim an op, the fence on a writer that no longer owns it, which
//! task may start, that a kept task stays kept, a lock held or cooling down, an op that cannot run
//! again, a schedule's firing taken once); a [`Tx`] only reads and writes rows. The rules are
//! generic over the transaction, so each backend gets its own copy with no dynamic call per
//! statement.
//!
//! - [`ops`]: submit, claim, heartbeat, set op, park, cancel, ending, mark, reset, replan.
//! - [`attempts`]: start, process, finish, a whole attempt, set task, logs, approve, end a gate.
//! - [`fan_out`]: expand, gather, add tasks, detach a child op.
//! - [`locks`]: take and release a lock, cooldowns and their acknowledgement, pause.
//! - [`schedules`]: add, remove, pause, note a firing.
//! - [`nodes`]: serving processes' heartbeats, and reserving queued ops for one of them.
//! - [`events`]: every event's kind and message.

pub(crate) mod attempts;
pub(crate) mod events;
pub(crate) mod fan_out;
pub(crate) mod locks;
mod logs;
pub(crate) mod nodes;
pub(crate) mod ops;
pub(crate) mod schedules;

use crate::error::{Error, Result};
use crate::types::{
    Applied, Change, EventKind, Interruption, Millis, NewOp, NewSchedule, NewTask, OpId, OpStatus,
    ProcessId, Request, Snapshot, TaskNo, TaskStatus, TokenRow,
};

/// Who owns an op as stored: its status, its owner (if any) and the owner's lease.
pub(crate) type Ownership = (OpStatus, Option<ProcessId>, Option<Millis>);

/// One open transaction of a backend: the rows the rules read and write, nothing decided here.
///
/// A method fails only when the backend does (an I/O error, a constraint it enforces, a row the
/// caller required and that is missing); refusals are the rules'. Where one statement does a
/// conditional update (the fan-out upsert, renumbering for a replan, a schedule's firing), the
/// method is that statement, named for what it does. JSON columns travel as their text.
pub(crate) trait Tx {
    // --- ops ---

    /// The op's status, owner and lease; `None` when there is no such op.
    fn owner_of(&mut self, op: OpId) -> Result<Option<Ownership>>;
    /// Stores a plan snapshot, reusing an equal one (same hash); its id.
    fn store_snapshot(&mut self, snapshot: &Snapshot) -> Result<i64>;
    /// Inserts a new op (not its tasks) with the given snapshot; its id.
    fn insert_op(&mut self, new: &NewOp, snapshot: i64) -> Result<OpId>;
    /// Sets the op's owner and lease, nothing else.
    fn set_owner(&mut self, op: OpId, owner: &ProcessId, lease_until: Millis) -> Result<()>;
    /// Sets the owner and lease of a new op and makes it `running`, started at `at`.
    fn start_new(
        &mut self,
        op: OpId,
        owner: &ProcessId,
        lease_until: Millis,
        at: Millis,
    ) -> Result<()>;
    /// Sets the owner and lease of an op taken over and makes it `running` again (started at
    /// `now` unless it had started; no end, no error).
    fn run_claimed(
        &mut self,
        op: OpId,
        owner: &ProcessId,
        lease_until: Millis,
        now: Millis,
    ) -> Result<()>;
    fn set_lease(&mut self, op: OpId, lease_until: Millis) -> Result<()>;
    fn set_current_task(&mut self, op: OpId, text: Option<&str>) -> Result<()>;
    /// Sets the op's status and error; with `ended`, its end (and no current task); a final
    /// status drops the recorded ending; `release` clears the owner and lease; `interrupted_by`
    /// replaces who or what stopped it.
    fn set_op_status(
        &mut self,
        op: OpId,
        status: OpStatus,
        error: Option<&str>,
        ended: Option<Millis>,
        release: bool,
        interrupted_by: Option<Interruption>,
    ) -> Result<()>;
    fn op_started_at(&mut self, op: OpId) -> Result<Option<Millis>>;
    /// Ends an op that never started: `canceled` with `error` at `at`, without owner or lease.
    fn cancel_unstarted(&mut self, op: OpId, error: &str, at: Millis) -> Result<()>;
    /// Records a cancel request and the grace it asks for (in milliseconds), keeping the first
    /// request (with its grace) if there is one.
    fn request_cancel(
        &mut self,
        op: OpId,
        request: &Request,
        grace_ms: Option<Millis>,
    ) -> Result<()>;

    fn set_ending(&mut self, op: OpId, ending: &str) -> Result<()>;
    fn clear_ending(&mut self, op: OpId) -> Result<()>;
    /// Sets the op's params and env and drops its recorded ending.
    fn set_params(&mut self, op: OpId, params: &str, env: &str) -> Result<()>;
    /// The hash of the op's plan snapshot.
    fn plan_hash(&mut self, op: OpId) -> Result<String>;
    fn set_snapshot(&mut self, op: OpId, snapshot: i64) -> Result<()>;
    /// Gives the op's tasks, and what names a task by number (attempts, logs, child ops), their
    /// new numbers; `Some((table, rows))` when rows of a table were left without one.
    fn renumber_tasks(
        &mut self,
        op: OpId,
        renumber: &[(TaskNo, TaskNo)],
    ) -> Result<Option<(&'static str, i64)>>;

    // --- tasks and attempts ---

    /// Inserts tasks; ones that exist are left as they are.
    fn insert_tasks(&mut self, op: OpId, tasks: &[NewTask]) -> Result<()>;
    /// A task's name; the task must exist.
    fn task_name(&mut self, op: OpId, task: TaskNo) -> Result<String>;
    /// A task's stored status and name; the task must exist.
    fn task_state(&mut self, op: OpId, task: TaskNo) -> Result<(String, String)>;
    /// A task's stored status and name, if the task exists.
    fn find_task_state(&mut self, op: OpId, task: TaskNo) -> Result<Option<(String, String)>>;
    /// A task's stored status; the task must exist.
    fn task_status(&mut self, op: OpId, task: TaskNo) -> Result<String>;
    /// Inserts attempt `n`, running since `at`.
    fn insert_attempt(&mut self, op: OpId, task: TaskNo, n: u32, at: Millis) -> Result<()>;
    /// Makes the task `running` in attempt `n` (started at `at` unless it had started).
    fn run_task(
        &mut self,
        op: OpId,
        task: TaskNo,
        n: u32,
        retry_from: u32,
        at: Millis,
    ) -> Result<()>;
    /// Records how far a supervised attempt's output files are in its log (see `Change::Logged`).
    fn attempt_logged(&mut self, op: OpId, task: TaskNo, n: u32, bytes: [u64; 2]) -> Result<()>;
    /// Records what a running task's process last said of its progress.
    fn set_task_progress(&mut self, op: OpId, task: TaskNo, text: &str) -> Result<()>;
    /// Records the process (and its group) that runs an attempt, started `at`: the attempt's
    /// first process moves the attempt's start (and the task's, when they are the same) to `at`.
    fn attempt_process(
        &mut self,
        op: OpId,
        task: TaskNo,
        n: u32,
        process: &ProcessId,
        pgid: u32,
        at: Millis,
    ) -> Result<()>;
    /// Records how an attempt ended.
    fn end_attempt(
        &mut self,
        op: OpId,
        task: TaskNo,
        n: u32,
        at: Millis,
        end: &End<'_>,
    ) -> Result<()>;
    /// Records an attempt's outcome on its task (`outputs` kept when `None`).
    fn end_task(&mut self, op: OpId, task: TaskNo, end: &End<'_>) -> Result<()>;
    /// Leaves the task's last attempt out of its retry round (`retry_from` one more): an
    /// interrupted attempt is not a failure.
    fn uncount_attempt(&mut self, op: OpId, task: TaskNo) -> Result<()>;
    /// Inserts attempt `n` final at once: started and ended at `at`.
    fn insert_whole_attempt(
        &mut self,
        op: OpId,
        task: TaskNo,
        n: u32,
        at: Millis,
        end: &End<'_>,
    ) -> Result<()>;
    /// Records a whole attempt `n` (started at `at`) on its task.
    fn whole_task(
        &mut self,
        op: OpId,
        task: TaskNo,
        n: u32,
        retry_from: u32,
        at: Millis,
        end: &End<'_>,
    ) -> Result<()>;
    /// Clears a task's outputs, error and end, and starts it at `at` (a gate waiting again, since
    /// `at`).
    fn clear_answer(&mut self, op: OpId, task: TaskNo, at: Millis) -> Result<()>;
    /// Sets a task's status (and its end, when `ended`); its name.
    fn set_task_status(
        &mut self,
        op: OpId,
        task: TaskNo,
        status: TaskStatus,
        ended: Option<Millis>,
    ) -> Result<String>;
    /// Sets a task's status and outputs by hand, ended at `at`; its name, `None` when no task.
    fn mark_task(
        &mut self,
        op: OpId,
        task: TaskNo,
        status: TaskStatus,
        outputs: &str,
        at: Millis,
    ) -> Result<Option<String>>;
    /// Makes each task pending again for a rerun: no outputs, no end, a fresh retry round, a
    /// fan-out step's list to be expanded again and its child op (if any) kept as history.
    fn reset_tasks(&mut self, op: OpId, tasks: &[TaskNo]) -> Result<()>;
    /// Records a gate's answer on its task.
    fn answer_task(
        &mut self,
        op: OpId,
        task: TaskNo,
        status: &str,
        at: Millis,
        error: Option<&str>,
        outputs: &str,
    ) -> Result<()>;
    /// Appends a log chunk, numbered after the attempt's last.
    fn append_log(
        &mut self,
        op: OpId,
        task: TaskNo,
        attempt: u32,
        stream: u8,
        at: Millis,
        data: &[u8],
    ) -> Result<()>;
    /// The bytes of output an attempt's log holds in its chunks numbered after `after` (its note
    /// not counted).
    fn log_size(&mut self, op: OpId, task: TaskNo, attempt: u32, after: i64) -> Result<i64>;
    /// An attempt's note of what was cut from its log (its `stream` 0 chunk): its number and text.
    fn log_note(&mut self, op: OpId, task: TaskNo, attempt: u32) -> Result<Option<(i64, Vec<u8>)>>;
    /// The number of the first chunk of an attempt's log that ends more than `head` bytes into it.
    fn log_head_end(
        &mut self,
        op: OpId,
        task: TaskNo,
        attempt: u32,
        head: i64,
    ) -> Result<Option<i64>>;
    /// Drops the first chunk of an attempt's log numbered after `after`, unless it is the last
    /// chunk; its size, if it did.
    fn drop_log_after(
        &mut self,
        op: OpId,
        task: TaskNo,
        attempt: u32,
        after: i64,
    ) -> Result<Option<i64>>;
    /// Writes an attempt's note of what was cut (`stream` 0) as chunk `seq`, or rewrites its text.
    fn put_log_note(
        &mut self,
        op: OpId,
        task: TaskNo,
        attempt: u32,
        seq: i64,
        at: Millis,
        text: &[u8],
    ) -> Result<()>;

    // --- fan-out and child ops ---

    /// Whether the task exists and has no frozen list yet (a fan-out step not expanded).
    fn unexpanded(&mut self, op: OpId, task: TaskNo) -> Result<bool>;
    /// Freezes a fan-out step's list and makes it `running`; its name.
    fn freeze_list(&mut self, op: OpId, task: TaskNo, list: &str, at: Millis) -> Result<String>;
    /// Inserts the items' tasks; an item's existing task keeps its state unless it was no longer
    /// an item, which then runs again with a fresh retry round.
    fn upsert_items(&mut self, op: OpId, tasks: &[NewTask]) -> Result<()>;
    /// Whether the fan-out step of `task` has any item's task stored (an earlier expansion's).
    fn has_items(&mut self, op: OpId, task: TaskNo) -> Result<bool>;
    /// Unlinks the step's earlier items that are not in `numbers` (a JSON array); those still
    /// pending are skipped.
    fn drop_other_items(&mut self, op: OpId, task: TaskNo, numbers: &str) -> Result<()>;
    /// Records a fan-out step's gathered end; its name.
    fn gather_task(
        &mut self,
        op: OpId,
        task: TaskNo,
        status: TaskStatus,
        ended: Option<Millis>,
        error: Option<&str>,
        outputs: Option<&str>,
    ) -> Result<String>;
    /// Unlinks the child op that ran a task (it stays as history).
    fn detach_child(&mut self, op: OpId, task: TaskNo) -> Result<()>;

    // --- locks, cooldowns, pause ---

    /// The op's lock key (`Some(None)`: it takes none); `None` when no op.
    #[expect(
        clippy::option_option,
        reason = "no op, and an op without a key, are two answers"
    )]
    fn lock_key(&mut self, op: OpId) -> Result<Option<Option<String>>>;
    fn lock_holder(&mut self, key: &str) -> Result<Option<OpId>>;
    /// The unacknowledged cooldown of `key` still running at `at`: after which op, until when.
    fn cooldown(&mut self, key: &str, at: Millis) -> Result<Option<(OpId, Millis)>>;
    fn insert_lock(&mut self, key: &str, op: OpId, at: Millis) -> Result<()>;
    fn delete_cooldown(&mut self, key: &str) -> Result<()>;
    /// The lock the op holds and the op's cooldown.
    fn held_lock(&mut self, op: OpId) -> Result<Option<(String, Option<i64>)>>;
    fn delete_lock(&mut self, key: &str) -> Result<()>;
    /// Starts (or restarts) the key's cooldown after `op`, until `until`.
    fn start_cooldown(&mut self, key: &str, op: OpId, until: Millis) -> Result<()>;
    /// Acknowledges the key's cooldown; the op it follows, `None` when there is none.
    fn ack_cooldown(&mut self, key: &str, request: &Request) -> Result<Option<OpId>>;
    /// Stores a pause (JSON) in its settings row `setting`, replacing one of the same scope.
    fn set_paused(&mut self, setting: &str, pause: &str) -> Result<()>;
    fn clear_paused(&mut self, setting: &str) -> Result<()>;

    // --- tokens ---

    /// Inserts a token; false when one of that name (or hash) exists.
    fn add_token(&mut self, token: &TokenRow) -> Result<bool>;
    /// False when there was none.
    fn delete_token(&mut self, name: &str) -> Result<bool>;

    // --- schedules ---

    /// Inserts a schedule; false when one of that name exists.
    fn add_schedule(&mut self, new: &NewSchedule) -> Result<bool>;
    /// False when there was none.
    fn remove_schedule(&mut self, name: &str) -> Result<bool>;
    /// False when there is none.
    fn pause_schedule(&mut self, name: &str, paused: bool) -> Result<bool>;
    /// Compare-and-set: records the firing due at `due` (by `op`, when one was submitted) only if
    /// no firing at or after it was; whether it did.
    fn fire_schedule(
        &mut self,
        name: &str,
        due: Millis,
        op: Option<OpId>,
        note: &str,
    ) -> Result<bool>;
    /// Sets the schedule's note, leaving `last_fire` as it is, only if no firing at or after
    /// `due` was recorded; whether it did.
    fn note_schedule(&mut self, name: &str, due: Millis, note: &str) -> Result<bool>;

    // --- serving nodes ---

    /// Records a serving process, or renews its row (by boot, pid and start time).
    fn beat_node(
        &mut self,
        node: &ProcessId,
        workers: u32,
        started_at: Millis,
        at: Millis,
        lease_until: Millis,
    ) -> Result<()>;
    fn delete_node(&mut self, node: &ProcessId) -> Result<()>;
    /// Deletes the rows of nodes whose lease ran out before `before`.
    fn prune_nodes(&mut self, before: Millis) -> Result<()>;
    /// Of `candidates`: the ops that are `queued`, never started, and have no owner (or one whose
    /// lease ran out before `now`), in id order, at most `limit`, locked for this transaction;
    /// rows another transaction holds are passed over, not waited for (PostgreSQL's
    /// `FOR UPDATE SKIP LOCKED`).
    fn lock_unowned(&mut self, candidates: &[OpId], now: Millis, limit: u32) -> Result<Vec<OpId>>;

    // --- events ---

    /// Appends events of one task (or of the op) at one time, in order, after the op's last.
    fn append_events(
        &mut self,
        op: OpId,
        at: Millis,
        task: Option<&str>,
        events: &[(&str, &str)],
    ) -> Result<()>;
}

/// How an attempt ended, in the columns that record it.
#[derive(Debug)]
pub(crate) struct End<'a> {
    pub task: TaskStatus,
    pub attempt: &'a str,
    pub ended: Option<Millis>,
    pub exit_code: Option<i32>,
    pub error: Option<&'a str>,
    /// JSON, or `None` to keep what the task has.
    pub outputs: Option<String>,
    pub by_check: bool,
}

/// Appends one event to the op's trail; every change that alters state records one in its own
/// transaction (invariant 6).
pub(crate) fn event<T: Tx>(
    tx: &mut T,
    op: OpId,
    at: Millis,
    kind: EventKind,
    task: Option<&str>,
    message: &str,
) -> Result<()> {
    tx.append_events(op, at, task, &[(kind.as_str(), message)])
}

/// The tasks a transaction's attempt changes name (see [`read_ahead`]).
#[derive(Debug, Default)]
pub(crate) struct ReadAhead {
    /// Those whose state the rules will read and nothing in the transaction changes before they
    /// are read: a backend may read them all first, in one go (PostgreSQL sends the reads
    /// together).
    pub(crate) once: Vec<(OpId, TaskNo)>,
    /// Every task whose state the transaction may change, sorted.
    pub(crate) named: Vec<(OpId, TaskNo)>,
}

/// The tasks of a transaction of `batches` ([`ReadAhead`]). Empty unless every change is an
/// attempt's (see [`Change::attempt_fence`]) or a heartbeat, of which only a start, an end or a
/// whole attempt changes a task's state; a task that two of those name is left to be read when
/// its change comes, after the other's writes.
pub(crate) fn read_ahead(batches: &[&Vec<Change>]) -> ReadAhead {
    let mut tasks = Vec::new();
    for change in batches.iter().flat_map(|batch| batch.iter()) {
        match change {
            Change::StartAttempt { op, task, .. }
            | Change::WholeAttempt { op, task, .. }
            | Change::FinishAttempt { op, task, .. } => tasks.push((*op, *task)),
            Change::Heartbeat { .. } => {}
            other if other.attempt_fence().is_some() => {}
            _ => return ReadAhead::default(),
        }
    }
    let mut named = tasks.clone();
    named.sort_unstable();
    let twice: Vec<_> = named
        .windows(2)
        .filter(|pair| pair[0] == pair[1])
        .map(|pair| pair[0])
        .collect();
    tasks.retain(|task| twice.binary_search(task).is_err());
    named.dedup();
    ReadAhead { once: tasks, named }
}

/// Applies a batch, all of its changes or the first refusal. `fenced` carries, from one batch to
/// the next of the same transaction, the op and writer the last change proved ownership for (see
/// [`Change::attempt_fence`]); any other change, or a refusal, forgets it.
pub(crate) fn apply_batch<'c, T: Tx>(
    tx: &mut T,
    batch: &'c [Change],
    fenced: &mut Option<(OpId, &'c ProcessId)>,
) -> Result<Vec<Applied>> {
    let mut applied = Vec::with_capacity(batch.len());
    for change in batch {
        let needs = change.attempt_fence();
        let known = needs.is_some() && needs == *fenced;
        match apply(tx, change, known) {
            Ok(a) => {
                applied.push(a);
                *fenced = needs;
            }
            Err(e) => {
                *fenced = None;
                return Err(e);
            }
        }
    }
    Ok(applied)
}

/// Applies one change. `fenced`: the transaction already proved, for an earlier change with no
/// effect on ownership, that this change's writer owns its op: an attempt's change skips its own
/// fence read then.
pub(crate) fn apply<T: Tx>(tx: &mut T, change: &Change, fenced: bool) -> Result<Applied> {
    match change {
        Change::Submit(new) => ops::submit(tx, new),
        Change::Claim { .. }
        | Change::Heartbeat { .. }
        | Change::SetOp { .. }
        | Change::Mark { .. }
        | Change::ResetTasks { .. }
        | Change::CancelUnstarted { .. }
        | Change::SetEnding { .. }
        | Change::RequestCancel { .. }
        | Change::Park { .. }
        | Change::Replan { .. }
        | Change::SetParams { .. } => ops::apply(tx, change).map(|()| Applied::Done),
        Change::CurrentTask { .. } | Change::Event { .. } => {
            ops::note(tx, change, fenced).map(|()| Applied::Done)
        }
        Change::StartAttempt { .. }
        | Change::AttemptProcess { .. }
        | Change::TaskProgress { .. }
        | Change::FinishAttempt { .. }
        | Change::WholeAttempt { .. }
        | Change::SetTask { .. }
        | Change::Log { .. }
        | Change::Logged { .. }
        | Change::Approve { .. }
        | Change::EndGate { .. } => attempts::apply(tx, change, fenced).map(|()| Applied::Done),
        Change::Expand { .. }
        | Change::Gather { .. }
        | Change::AddTasks { .. }
        | Change::DetachChild { .. } => fan_out::apply(tx, change).map(|()| Applied::Done),
        Change::TakeLock {
            op,
            at,
            ignore_cooldown,
        } => locks::take(tx, *op, *at, *ignore_cooldown).map(|()| Applied::Done),
        Change::ReleaseLock { op, owner, at } => {
            fence(tx, *op, owner)?;
            locks::release_on_failure(tx, *op, *at).map(|()| Applied::Done)
        }
        Change::Ack { key, request } => locks::ack(tx, key, request).map(|()| Applied::Done),
        Change::Pause { pause } => locks::pause(tx, pause).map(|()| Applied::Done),
        Change::Unpause { scope } => tx.clear_paused(&scope.setting()).map(|()| Applied::Done),
        Change::AddToken(token) => {
            if tx.add_token(token)? {
                Ok(Applied::Done)
            } else {
                Err(Error::Token(format!(
                    "a token named `{}` exists",
                    token.name
                )))
            }
        }
        Change::RevokeToken { name } => {
            if tx.delete_token(name)? {
                Ok(Applied::Done)
            } else {
                Err(Error::Token(format!("no token is named `{name}`")))
            }
        }
        Change::AddSchedule(_)
        | Change::RemoveSchedule { .. }
        | Change::PauseSchedule { .. }
        | Change::ScheduleNote { .. } => schedules::apply(tx, change).map(|()| Applied::Done),
        Change::NodeBeat { .. } | Change::NodeGone { .. } | Change::Reserve { .. } => {
            nodes::apply(tx, change)
        }
    }
}

/// Refuses a write by a process that no longer owns the op (its lease was taken over): a fenced
/// owner must stop, not overwrite the new owner's progress.
pub(crate) fn fence<T: Tx>(tx: &mut T, op: OpId, writer: &ProcessId) -> Result<()> {
    let (_, owner, lease) = owner_of(tx, op)?;
    match owner {
        Some(owner) if &owner == writer => Ok(()),
        Some(owner) => Err(Error::Owned {
            op,
            owner,
            lease_until: lease.unwrap_or(0),
        }),
        None => Err(Error::Fenced {
            op,
            writer: writer.to_string(),
        }),
    }
}

/// The op's status, owner and lease; [`Error::NotFound`] when there is no such op.
pub(crate) fn owner_of<T: Tx>(tx: &mut T, op: OpId) -> Result<Ownership> {
    tx.owner_of(op)?.ok_or(Error::NotFound(op))
}

/// Whether a stored task status is one a task keeps: succeeded or skipped, by its run or by hand.
pub(crate) fn is_kept(status: &str) -> bool {
    TaskStatus::parse(status).is_some_and(TaskStatus::is_kept)
}
