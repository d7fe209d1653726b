//! What the store holds, in the engine's words: ids, statuses, the kinds of the event trail, rows,
//! and the changes the engine asks for. Nothing here names SQLite.

use std::fmt;

use serde::{Deserialize, Serialize};

/// An op's id, the small integer people type (`cairn show 42`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct OpId(pub i64);

impl fmt::Display for OpId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A task's number within its op: a step's task is its index in the plan; fan-out items follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct TaskNo(pub u32);

/// Milliseconds since the Unix epoch, UTC.
pub type Millis = i64;

macro_rules! status_enum {
    ($(#[$meta:meta])* $name:ident { $($variant:ident => $text:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
        #[serde(rename_all = "lowercase")]
        pub enum $name { $($variant),+ }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            #[must_use]
            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text),+ }
            }

            #[must_use]
            pub fn parse(text: &str) -> Option<Self> {
                match text { $($text => Some($name::$variant),)+ _ => None }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

status_enum! {
    /// Where an op is in its life. `succeeded` and `canceled` are final.
    OpStatus {
        Queued => "queued",
        Running => "running",
        Waiting => "waiting",
        Succeeded => "succeeded",
        Failed => "failed",
        Canceling => "canceling",
        Canceled => "canceled",
        Interrupted => "interrupted",
    }
}

impl OpStatus {
    /// Statuses in which an op has (or had) an owner running it.
    #[must_use]
    pub fn is_owned(self) -> bool {
        matches!(self, Self::Running | Self::Waiting | Self::Canceling)
    }

    /// Final: the op can never run again.
    #[must_use]
    pub fn is_final(self) -> bool {
        matches!(self, Self::Succeeded | Self::Canceled)
    }

    /// Ended: not running now (final, failed or interrupted).
    #[must_use]
    pub fn is_ended(self) -> bool {
        matches!(
            self,
            Self::Succeeded | Self::Canceled | Self::Failed | Self::Interrupted
        )
    }
}

status_enum! {
    /// Where a task is in its life.
    TaskStatus {
        Pending => "pending",
        Running => "running",
        Waiting => "waiting",
        Succeeded => "succeeded",
        Failed => "failed",
        Skipped => "skipped",
        Canceled => "canceled",
    }
}

impl TaskStatus {
    /// Done for good: a resume keeps it and never runs it again.
    #[must_use]
    pub fn is_kept(self) -> bool {
        matches!(self, Self::Succeeded | Self::Skipped)
    }
}

status_enum! {
    /// How one attempt ended (or that it is still running).
    AttemptStatus {
        Running => "running",
        Succeeded => "succeeded",
        Failed => "failed",
        Interrupted => "interrupted",
        Canceled => "canceled",
    }
}

macro_rules! event_kinds {
    ($(#[$meta:meta])* $name:ident { $($(#[doc = $doc:literal])+ $variant:ident => $text:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name { $($(#[doc = $doc])+ $variant),+ }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The kind's text, as the trail stores and shows it.
            #[must_use]
            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text),+ }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

event_kinds! {
    /// What an event of an op's trail records. Its text ([`EventKind::as_str`]) is what the trail
    /// stores and `cairn events` shows; read back, a kind stays text ([`EventRow::kind`]), since an
    /// older database may hold kinds no variant names.
    EventKind {
        // --- an op's life ---
        /// The op is stored (submitted, run, or fired by a schedule).
        Submitted => "submitted",
        /// The process that runs the op starts it.
        Started => "started",
        /// `cairn resume` takes the op over.
        Resumed => "resumed",
        /// `cairn serve` takes over an op whose owner is gone.
        AutoResumed => "auto-resumed",
        /// `cairn cancel` takes over an op whose owner is gone, to cancel it.
        CancelTaken => "cancel-taken",
        /// The op starts while cairn is paused (`--ignore-pause`).
        PauseIgnored => "pause-ignored",
        /// The op runs again once something other than approval gates is left to do.
        OpRunning => "op-running",
        /// Only approval gates are left: the op waits for their answers.
        OpWaiting => "op-waiting",
        /// Only approval gates are left and its owner (`cairn serve`) gives the op up until an
        /// answer comes: no process holds it meanwhile.
        OpParked => "op-parked",
        /// An answer came to a gate of a parked op: it is queued again, to go on.
        OpWoken => "op-woken",
        /// The op's outcome is decided and its finishing hooks run.
        OpFinishing => "op-finishing",
        /// A finishing hook failed; the op's outcome stands.
        HookFailed => "hook-failed",
        /// The op ended succeeded.
        OpSucceeded => "op-succeeded",
        /// The op ended failed, or was refused before it started.
        OpFailed => "op-failed",
        /// The op ended canceled, or was canceled before it started.
        OpCanceled => "op-canceled",
        /// The op stopped before its end (its run was stopped, or it lost the op).
        OpInterrupted => "op-interrupted",
        /// Someone asked to cancel the op.
        CancelRequested => "cancel-requested",
        /// Someone asked, through the HTTP API, to resume the op; the serving process that
        /// answered resumes it.
        ResumeRequested => "resume-requested",
        /// The op's owner acts on a cancel request: its steps end and its `on_cancel` hooks run.
        OpCanceling => "op-canceling",
        /// A child op of a canceled op could not be canceled.
        ChildNotCanceled => "child-not-canceled",
        /// An op that never started goes back to the queue, owned by nobody.
        OpRequeued => "op-requeued",
        /// `cairn serve` gives up an op it took and could not carry on.
        OpReleased => "op-released",
        /// Tasks are reset to run again (`resume --from`).
        Rerun => "rerun",
        /// The op goes on with an edited plan (`resume --plan`).
        PlanChanged => "plan-changed",
        /// A param's value is changed (`resume --param`).
        ParamChanged => "param-changed",
        // --- a task's life ---
        /// An attempt of the task starts.
        TaskStarted => "task-started",
        /// The processes an earlier attempt left running are ended before the task runs again.
        LeftoversEnded => "leftovers-ended",
        /// A `daemon` step's server is recorded: it outlives the step.
        DaemonKept => "daemon-kept",
        /// An attempt's process that outlived its run (`adopt`) is taken by the next: its
        /// result collected, or waited for.
        Adopted => "adopted",
        /// The task goes back to pending (a fan-out step whose items are not all done).
        TaskPending => "task-pending",
        /// The task is set running without an attempt, or an attempt is recorded still running.
        TaskRunning => "task-running",
        /// An approval gate waits for its answer.
        TaskWaiting => "task-waiting",
        /// An attempt succeeded, or a fan-out step's items are all done.
        TaskSucceeded => "task-succeeded",
        /// An attempt failed, or a fan-out step failed with its items.
        TaskFailed => "task-failed",
        /// The task is skipped (its `when` is false).
        TaskSkipped => "task-skipped",
        /// An attempt was canceled, or the task was, with its op.
        TaskCanceled => "task-canceled",
        /// An attempt was interrupted (its owner stopped or died).
        TaskInterrupted => "task-interrupted",
        /// An attempt ended of a task resolved by hand meanwhile, which keeps its status.
        AttemptEnded => "attempt-ended",
        /// A person resolves the task by hand (`cairn mark`).
        TaskMarked => "task-marked",
        /// A fan-out step's list is frozen into its items' tasks.
        TaskExpanded => "task-expanded",
        /// The task's sub-plan starts as a child op, or its child op is unlinked.
        TaskChild => "task-child",
        /// A person approves a gate.
        Approved => "approved",
        /// A person rejects a gate.
        Rejected => "rejected",
        // --- locks and cooldowns ---
        /// The op takes its lock key.
        LockTaken => "lock-taken",
        /// The op releases its lock key, and the key's cooldown starts.
        LockReleased => "lock-released",
        /// The op takes its key despite the key's cooldown (`--ignore-cooldown`).
        CooldownIgnored => "cooldown-ignored",
        /// A person acknowledges the cooldown that follows the op.
        CooldownAcked => "cooldown-acked",
        // --- other ---
        /// A free note that goes with no change of state (the store's tests record these).
        Note => "note",
    }
}

impl EventKind {
    /// The event of a task set to `status` without an attempt (`task-waiting`, `task-skipped`...).
    #[must_use]
    pub fn task(status: TaskStatus) -> Self {
        match status {
            TaskStatus::Pending => Self::TaskPending,
            TaskStatus::Running => Self::TaskRunning,
            TaskStatus::Waiting => Self::TaskWaiting,
            TaskStatus::Succeeded => Self::TaskSucceeded,
            TaskStatus::Failed => Self::TaskFailed,
            TaskStatus::Skipped => Self::TaskSkipped,
            TaskStatus::Canceled => Self::TaskCanceled,
        }
    }

    /// The event of an attempt that ended with `status`.
    #[must_use]
    pub fn attempt(status: AttemptStatus) -> Self {
        match status {
            AttemptStatus::Running => Self::TaskRunning,
            AttemptStatus::Succeeded => Self::TaskSucceeded,
            AttemptStatus::Failed => Self::TaskFailed,
            AttemptStatus::Interrupted => Self::TaskInterrupted,
            AttemptStatus::Canceled => Self::TaskCanceled,
        }
    }

    /// The event of an op's run that ended with `status`: any status but succeeded, failed or
    /// canceled is an interruption.
    #[must_use]
    pub fn op_ended(status: OpStatus) -> Self {
        match status {
            OpStatus::Succeeded => Self::OpSucceeded,
            OpStatus::Failed => Self::OpFailed,
            OpStatus::Canceled => Self::OpCanceled,
            _ => Self::OpInterrupted,
        }
    }
}

/// A process that owns an op, or ran an attempt: enough to tell later whether it still lives,
/// safe against pid reuse (the start time) and reboots (the boot id).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ProcessId {
    /// For people: where it ran.
    pub host: String,
    /// `<kernel boot id>/<pid namespace inode>`: a pid means something only within these.
    pub boot_id: String,
    pub pid: u32,
    /// Start time in clock ticks since boot (`/proc/PID/stat`, field 22).
    pub start: u64,
}

impl fmt::Display for ProcessId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "pid {} on {}", self.pid, self.host)
    }
}

/// A backend's list of an op's columns with its params and env read as `null` and `{}` (see
/// [`crate::ReadBackend::op_head`]).
pub(crate) fn head_columns(columns: &str) -> String {
    columns
        .replacen(" params,", " 'null',", 1)
        .replacen(" env,", " '{}',", 1)
}

/// An op as `status` lists it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OpRow {
    pub id: OpId,
    pub uuid: String,
    pub plan: String,
    pub title: String,
    pub status: OpStatus,
    pub params: serde_json::Value,
    pub workdir: String,
    pub env: serde_json::Map<String, serde_json::Value>,
    pub lock_key: Option<String>,
    /// Set once someone asked to cancel the op.
    pub cancel: Option<Request>,
    /// The grace the cancel request asks for (`cairn cancel --grace`), in milliseconds: how long
    /// the op's running steps get between TERM and KILL. `None`: the owner's own.
    pub cancel_grace_ms: Option<Millis>,
    /// Why an op stored `interrupted` was stopped, as its owner recorded it (`None`: recorded
    /// before cairn kept it). An owner that died records nothing: see [`Interruption::OwnerDied`].
    pub interrupted_by: Option<Interruption>,
    /// The outcome decided before the finishing hooks (see [`Change::SetEnding`]).
    pub ending: Option<serde_json::Value>,
    /// The op and task that started this op (a sub-plan's `plan:` step).
    pub parent: Option<(OpId, TaskNo)>,
    pub created_at: Millis,
    pub started_at: Option<Millis>,
    pub ended_at: Option<Millis>,
    pub owner: Option<ProcessId>,
    pub lease_until: Option<Millis>,
    pub current_task: Option<String>,
    pub error: Option<String>,
}

/// A task as `show` and the engine see it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TaskRow {
    pub task_no: TaskNo,
    pub step: String,
    pub name: String,
    pub item: Option<serde_json::Value>,
    pub status: TaskStatus,
    pub attempts: u32,
    /// How many attempts do not count toward the current retry round's budget: those before the
    /// round, and those in it that were interrupted (a kill, Ctrl-C or shutdown is no failure).
    pub retry_from: u32,
    pub started_at: Option<Millis>,
    pub ended_at: Option<Millis>,
    pub exit_code: Option<i32>,
    pub error: Option<String>,
    pub outputs: Option<serde_json::Map<String, serde_json::Value>>,
    pub by_check: bool,
    /// The last progress its process reported (`$CAIRN_PROGRESS`).
    pub progress: Option<String>,
}

/// A task as a run takes it up: what its scheduler keeps, without the columns only `show` needs.
/// Its item is its JSON text as stored (a fan-out step's own task holds the whole list), parsed
/// only where the item runs.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskBrief {
    pub task_no: TaskNo,
    /// The step's id, shared by the rows of one step (a fan-out's items are a run of rows).
    pub step: std::sync::Arc<str>,
    pub name: String,
    pub item: Option<Box<str>>,
    pub status: TaskStatus,
    pub attempts: u32,
    pub retry_from: u32,
    pub error: Option<String>,
    pub outputs: Option<serde_json::Map<String, serde_json::Value>>,
}

/// Which of an op's tasks [`crate::ReadBackend::task_briefs`] reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Briefs {
    /// Every task.
    All,
    /// The tasks numbered below `steps` (the plan's steps and hooks), and the first `items`
    /// tasks after them that are not kept (succeeded or skipped): what a take-over of a large
    /// fan-out starts running with while it reads the rest.
    First { steps: u32, items: u32 },
}

impl Briefs {
    /// The SQL that reads them on either backend (`$1`: the op; `$2`, `$3`: `steps`, `items`),
    /// `tasks`' columns in [`TaskBrief`]'s order.
    pub(crate) fn sql(self) -> &'static str {
        match self {
            Self::All => {
                "SELECT task_no, step, name, item, status, attempts, retry_from, error, outputs \
                 FROM tasks WHERE op_id = CAST($1 AS BIGINT) ORDER BY task_no"
            }
            Self::First { .. } => {
                "SELECT * FROM (SELECT task_no, step, name, item, status, attempts, retry_from, \
                 error, outputs FROM tasks WHERE op_id = CAST($1 AS BIGINT) AND task_no < CAST($2 AS BIGINT) \
                 UNION ALL SELECT * FROM (SELECT task_no, step, name, item, status, attempts, \
                 retry_from, error, outputs FROM tasks WHERE op_id = CAST($1 AS BIGINT) AND task_no >= CAST($2 AS BIGINT) \
                 AND status <> 'succeeded' AND status <> 'skipped' ORDER BY task_no LIMIT CAST($3 AS BIGINT)) AS items) \
                 AS first ORDER BY task_no"
            }
        }
    }
}

impl TaskBrief {
    /// `step`, or the same text as `previous` shares it.
    pub(crate) fn step_id(step: &str, previous: Option<&TaskBrief>) -> std::sync::Arc<str> {
        match previous {
            Some(p) if &*p.step == step => p.step.clone(),
            _ => step.into(),
        }
    }
}

/// One try of a task.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AttemptRow {
    pub task_no: TaskNo,
    pub n: u32,
    pub status: AttemptStatus,
    pub started_at: Millis,
    pub ended_at: Option<Millis>,
    pub exit_code: Option<i32>,
    pub error: Option<String>,
    pub process: Option<ProcessId>,
    pub pgid: Option<u32>,
    /// Of a supervised attempt (`adopt`): the bytes of its stdout and stderr files whose log
    /// chunks are recorded, committed with those chunks.
    pub logged: [u64; 2],
}

/// One line of an op's audit trail.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EventRow {
    pub seq: i64,
    pub at: Millis,
    pub kind: String,
    pub task: Option<String>,
    pub message: String,
}

/// A chunk of what an attempt printed.
#[derive(Debug, Clone, PartialEq)]
pub struct LogChunk {
    pub task_no: TaskNo,
    pub attempt: u32,
    pub seq: i64,
    /// 1 for stdout, 2 for stderr.
    pub stream: u8,
    pub at: Millis,
    pub data: Vec<u8>,
}

/// The plan an op runs, as it was when the op was submitted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub hash: String,
    pub name: String,
    pub text: String,
    /// Sub-plan path (as written in the plan) → text.
    pub files: Vec<(String, String)>,
}

/// A task to create with a new op.
#[derive(Debug, Clone, PartialEq)]
pub struct NewTask {
    pub task_no: TaskNo,
    pub step: String,
    pub name: String,
    pub item: Option<serde_json::Value>,
}

/// A new op.
#[derive(Debug, Clone, PartialEq)]
pub struct NewOp {
    pub uuid: String,
    pub snapshot: Snapshot,
    pub title: String,
    pub status: OpStatus,
    pub params: serde_json::Value,
    /// The plan file's directory: steps run there.
    pub workdir: String,
    /// The base environment captured at submit, so a resume sees the same.
    pub env: serde_json::Map<String, serde_json::Value>,
    pub tasks: Vec<NewTask>,
    pub at: Millis,
    /// The process that runs the op (`cairn run`), with its lease: no other process can claim the op
    /// in between. With `start`, the op is stored `running` with its lock taken; without, `queued`
    /// and owned by the process that waits for the lock.
    pub owner: Option<(ProcessId, Millis)>,
    pub start: bool,
    /// The rendered lock key, and the cooldown it gets when the op ends.
    pub lock: Option<String>,
    pub cooldown_ms: Option<i64>,
    /// Take the lock even while its key cools down (recorded in the events).
    pub ignore_cooldown: bool,
    /// The op and task that start this one (a sub-plan): at most one child per task.
    pub parent: Option<(OpId, TaskNo)>,
    /// The schedule whose firing (at this time) this op is: it is stored only if that firing was
    /// not submitted already.
    pub fired_by: Option<(String, Millis)>,
}

/// A cron schedule, as `cairn schedule add` stores it.
#[derive(Debug, Clone, PartialEq)]
pub struct NewSchedule {
    pub name: String,
    /// The plan file, absolute: read when the schedule fires.
    pub plan: String,
    pub params: serde_json::Map<String, serde_json::Value>,
    pub cron: String,
    pub timezone: String,
    /// Firings missed while no `serve` ran fire once when one starts (else they are skipped).
    pub catch_up: bool,
    pub created_at: Millis,
}

/// A cron schedule and what its last firing did.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ScheduleRow {
    pub name: String,
    pub plan: String,
    pub params: serde_json::Map<String, serde_json::Value>,
    pub cron: String,
    pub timezone: String,
    pub paused: bool,
    pub catch_up: bool,
    pub created_at: Millis,
    pub last_fire: Option<Millis>,
    pub last_op: Option<OpId>,
    pub note: Option<String>,
}

/// Who or what stopped an op before its end.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Interruption {
    /// A stop signal to the process that ran it in the foreground (`cairn run`, `cairn resume`):
    /// Ctrl-C, a closed terminal, a SIGTERM. A person's (or a supervisor's) decision: the op
    /// waits for `cairn resume`.
    Signal,
    /// A `cairn serve` drained as it stopped: the op is meant to go on with the next one.
    Shutdown,
    /// A `cairn serve` let go of an op it took and could not carry on (the store failed under it).
    Released,
    /// Its owner died without recording anything (killed, its machine rebooted, its lease ran
    /// out): derived when read from an op stored running, never stored.
    OwnerDied,
}

impl Interruption {
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Signal => "signal",
            Self::Shutdown => "shutdown",
            Self::Released => "released",
            Self::OwnerDied => "owner-died",
        }
    }

    #[must_use]
    pub fn parse(text: &str) -> Option<Self> {
        [
            Self::Signal,
            Self::Shutdown,
            Self::Released,
            Self::OwnerDied,
        ]
        .into_iter()
        .find(|i| i.as_str() == text)
    }

    /// Whether `cairn serve` resumes an op interrupted so by itself: not one a person stopped.
    #[must_use]
    pub fn resumes_by_itself(self) -> bool {
        self != Self::Signal
    }
}

impl fmt::Display for Interruption {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Who asked for something, and why, for the audit trail.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Request {
    pub by: String,
    pub at: Millis,
    pub reason: Option<String>,
}

/// What a pause holds: ops of one plan, ops whose lock key starts with a prefix, both, or (both
/// `None`) every op.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PauseScope {
    pub plan: Option<String>,
    pub key: Option<String>,
}

impl PauseScope {
    #[must_use]
    pub fn is_global(&self) -> bool {
        self.plan.is_none() && self.key.is_none()
    }

    /// Whether an op of `plan` with `lock_key` is in this scope (a key prefix holds only ops that
    /// take a lock).
    #[must_use]
    pub fn holds(&self, plan: &str, lock_key: Option<&str>) -> bool {
        self.plan.as_deref().is_none_or(|p| p == plan)
            && self
                .key
                .as_deref()
                .is_none_or(|k| lock_key.is_some_and(|l| l.starts_with(k)))
    }

    /// The settings row the pause of this scope is kept in: `paused` for the global one (as it
    /// always was), else `paused:` and the scope as JSON (any text is a valid name or prefix).
    #[must_use]
    pub fn setting(&self) -> String {
        if self.is_global() {
            "paused".to_owned()
        } else {
            format!("paused:{}", serde_json::json!([self.plan, self.key]))
        }
    }

    /// The scope in words: `every op`, `plan backup`, `lock keys starting with pg/`.
    #[must_use]
    pub fn describe(&self) -> String {
        match (&self.plan, &self.key) {
            (None, None) => "every op".to_owned(),
            (Some(p), None) => format!("plan {p}"),
            (None, Some(k)) => format!("lock keys starting with {k}"),
            (Some(p), Some(k)) => format!("plan {p} with lock keys starting with {k}"),
        }
    }
}

/// A pause, as it is stored and listed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pause {
    #[serde(flatten)]
    pub scope: PauseScope,
    pub by: String,
    pub at: Millis,
    pub reason: Option<String>,
    /// The end of a maintenance window (`--for`): from then on the pause holds nothing.
    pub until: Option<Millis>,
}

impl Pause {
    /// Whether the pause still holds at `now`.
    #[must_use]
    pub fn holds_at(&self, now: Millis) -> bool {
        self.until.is_none_or(|u| now < u)
    }

    /// Reads a pause from its settings row (a global pause of an older cairn has no scope).
    #[must_use]
    pub fn from_setting(value: &str) -> Option<Self> {
        serde_json::from_str(value).ok()
    }

    #[must_use]
    pub fn to_setting(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// Which ops moved after a cursor: what a follower of changes re-reads (see
/// [`crate::ReadBackend::moves`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Moves {
    /// Where to ask from next time.
    pub cursor: u64,
    /// The ops that recorded an event after the cursor asked from, each once, in the order they
    /// first moved; `None` when that is not known (the first ask, a cursor older than what is
    /// kept, changes made while nothing listened): the follower reads everything again.
    pub ops: Option<Vec<OpId>>,
}

/// A token of the HTTP API, as the store keeps it: its SHA-256, never the token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TokenRow {
    pub name: String,
    /// `viewer` or `operator`.
    pub role: String,
    /// The token's SHA-256, in lowercase hex.
    #[serde(skip)]
    pub hash: String,
    pub created_at: Millis,
    pub created_by: String,
}

/// A held lock, as `cairn locks` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LockRow {
    pub key: String,
    pub op: OpId,
    pub since: Millis,
}

/// A cooldown on a key, as `cairn locks` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CooldownRow {
    pub key: String,
    pub op: OpId,
    pub until: Millis,
    pub acked: Option<Request>,
}

/// How a task's attempt ended.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub task: TaskStatus,
    pub attempt: AttemptStatus,
    pub exit_code: Option<i32>,
    pub error: Option<String>,
    pub outputs: Option<serde_json::Map<String, serde_json::Value>>,
    pub by_check: bool,
}

/// A change the engine asks the store to make durable. Each is applied whole, with its events,
/// in one transaction (possibly shared with other changes: group commit). Changes that carry an
/// `owner` are fenced: refused unless that process still owns the op.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    /// Store a new op, its snapshot and its tasks.
    Submit(NewOp),
    /// Become the op's owner: only if it has none, its lease expired at `now`, or its owner is
    /// `dead_owner` (checked dead by the caller). Sets the op `running`.
    Claim {
        op: OpId,
        owner: ProcessId,
        lease_until: Millis,
        dead_owner: Option<ProcessId>,
        now: Millis,
        /// Own the op but leave it `queued` (it waits for its lock): no lock, no start.
        queued: bool,
        /// Reopen a succeeded op (`resume --from`).
        reopen: bool,
        /// The event that says why (e.g. `resumed`).
        kind: EventKind,
        message: String,
    },
    /// Extend the lease of an op this owner holds.
    Heartbeat {
        op: OpId,
        owner: ProcessId,
        lease_until: Millis,
    },
    /// A new attempt of a task starts (recorded before its process is spawned). Refused when the
    /// task already succeeded or was skipped.
    StartAttempt {
        op: OpId,
        owner: ProcessId,
        task: TaskNo,
        n: u32,
        /// Attempts before the retry round this attempt belongs to.
        retry_from: u32,
        at: Millis,
    },
    /// What a running task's process last said of its progress (`$CAIRN_PROGRESS`).
    TaskProgress {
        op: OpId,
        owner: ProcessId,
        task: TaskNo,
        text: String,
    },
    /// The process that runs an attempt, started `at`. The attempt's first process starts its
    /// time (and the task's, when the attempt started the task): a wait for the database before
    /// it is not counted.
    AttemptProcess {
        op: OpId,
        owner: ProcessId,
        task: TaskNo,
        n: u32,
        process: ProcessId,
        pgid: u32,
        at: Millis,
    },
    /// An attempt ended.
    FinishAttempt {
        op: OpId,
        owner: ProcessId,
        task: TaskNo,
        n: u32,
        at: Millis,
        outcome: Outcome,
    },
    /// An attempt that starts and ends at once (a `noop`, a template that cannot be rendered):
    /// `StartAttempt` and `FinishAttempt` in one change, refused as `StartAttempt` is.
    WholeAttempt {
        op: OpId,
        owner: ProcessId,
        task: TaskNo,
        n: u32,
        retry_from: u32,
        at: Millis,
        outcome: Outcome,
    },
    /// A task changes status without an attempt: skipped by `when`, waiting at a gate.
    SetTask {
        op: OpId,
        owner: ProcessId,
        task: TaskNo,
        status: TaskStatus,
        at: Millis,
        message: String,
    },
    /// Take the op's lock key for it (the op must have one): refused while another op holds the key
    /// (`Error::LockHeld`), or while the key cools down and nobody acknowledged it
    /// (`Error::CoolingDown`) unless `ignore_cooldown`.
    TakeLock {
        op: OpId,
        at: Millis,
        ignore_cooldown: bool,
    },
    /// The failing op frees its lock key (its plan's `lock.on_failure: release`), fenced on its
    /// owner; the key's cooldown starts. A resume takes the key again.
    ReleaseLock {
        op: OpId,
        owner: ProcessId,
        at: Millis,
    },
    /// Record a request to cancel the op; its owner (or `cairn cancel` itself) acts on it.
    RequestCancel {
        op: OpId,
        request: Request,
        /// How long the op's running steps get between TERM and KILL (`cairn cancel --grace`), in
        /// milliseconds; `None`: the owner's own grace.
        grace_ms: Option<Millis>,
    },
    /// A person resolves a task by hand (`cairn mark`): succeeded (with the outputs given) or
    /// skipped. Refused while a live owner runs the op (it must have no owner, or only `dead_owner`).
    Mark {
        op: OpId,
        task: TaskNo,
        status: TaskStatus,
        outputs: serde_json::Map<String, serde_json::Value>,
        dead_owner: Option<ProcessId>,
        request: Request,
    },
    /// Make tasks pending again (`resume --from`): they run again, with a fresh retry round. A
    /// fan-out step's list is unfrozen (expanded again), a `plan:` step's child op unlinked.
    ResetTasks {
        op: OpId,
        owner: ProcessId,
        tasks: Vec<TaskNo>,
        at: Millis,
        message: String,
    },
    /// Cancel an op that never started (no step or hook ran): only if it still has not, and has no
    /// owner or only `dead_owner`.
    CancelUnstarted {
        op: OpId,
        dead_owner: Option<ProcessId>,
        request: Request,
    },
    /// The outcome, decided before the finishing hooks run, so a resume after a crash among them
    /// goes on with the hooks, not the steps.
    SetEnding {
        op: OpId,
        owner: ProcessId,
        ending: serde_json::Value,
    },
    /// Answer an approval gate: only a task that is `waiting` changes. An op parked at its gates
    /// (`waiting`, no owner: see [`Change::Park`]) is queued again, for `cairn serve` to go on.
    Approve {
        op: OpId,
        task: TaskNo,
        approve: bool,
        request: Request,
    },
    /// The owner ends an approval gate that still waits (its own `timeout` passed, or the op ends
    /// without an answer): `status` (failed or canceled) with `error`. A gate answered meanwhile
    /// keeps its answer.
    EndGate {
        op: OpId,
        owner: ProcessId,
        task: TaskNo,
        status: TaskStatus,
        at: Millis,
        error: String,
        message: String,
    },
    /// The owner of an op whose only tasks in flight are approval gates gives it up: the op is
    /// `waiting`, unowned (its lock stays its own), until an answer queues it again. Refused
    /// (`Error::Conflict`) when one of `gates` no longer waits: the answer came first.
    Park {
        op: OpId,
        owner: ProcessId,
        gates: Vec<TaskNo>,
        at: Millis,
        message: String,
    },
    /// A fan-out step's list is frozen: stored on the step's task, which becomes `running`, with
    /// one task per item. Refused if the step's list is frozen already. After a rerun (which
    /// unfreezes it), an item whose task number is given again keeps its task; earlier items
    /// not given stay as history.
    Expand {
        op: OpId,
        owner: ProcessId,
        task: TaskNo,
        items: Vec<serde_json::Value>,
        tasks: Vec<NewTask>,
        at: Millis,
    },
    /// A fan-out step's own task ends (or goes back to pending) once its items have: with the
    /// items' outputs, gathered into lists.
    Gather {
        op: OpId,
        owner: ProcessId,
        task: TaskNo,
        status: TaskStatus,
        outputs: Option<serde_json::Map<String, serde_json::Value>>,
        error: Option<String>,
        at: Millis,
    },
    /// The op goes on with an edited plan (`resume --plan`): the new snapshot is stored and the
    /// op's tasks renumbered to it (`renumber`: old → new task number, covering every task);
    /// `tasks` are the new steps' tasks. The old snapshot stays, named in the event.
    Replan {
        op: OpId,
        owner: ProcessId,
        snapshot: Snapshot,
        renumber: Vec<(TaskNo, TaskNo)>,
        tasks: Vec<NewTask>,
        /// The op's params for the new plan (as stored: secrets sealed) and its kept environment.
        params: serde_json::Value,
        env: serde_json::Map<String, serde_json::Value>,
        at: Millis,
        message: String,
    },
    /// New values for some of the op's params (`resume --param`): `params` is the whole map, as
    /// stored (secrets sealed), with the op's kept environment (unchanged); one `param-changed`
    /// event per line of `messages`. The op's outcome, if decided, is decided again.
    SetParams {
        op: OpId,
        owner: ProcessId,
        params: serde_json::Value,
        env: serde_json::Map<String, serde_json::Value>,
        at: Millis,
        messages: Vec<String>,
    },
    /// A `plan:` task's child op stays as history, no longer linked: the task's next attempt
    /// starts a new child (the old one was canceled).
    DetachChild {
        op: OpId,
        owner: ProcessId,
        task: TaskNo,
        at: Millis,
        message: String,
    },
    /// A new schedule; refused if the name is taken.
    AddSchedule(NewSchedule),
    RemoveSchedule {
        name: String,
    },
    PauseSchedule {
        name: String,
        paused: bool,
    },
    /// Why the firing due at `due` made no op (skipped, or this process could not fire it). With
    /// `handled`, the firing is used up (compare-and-set on `last_fire`, as a firing that made an
    /// op); without, only the note is written, and the firing stays for another process to fire
    /// (a shared store's node that cannot: another may). Either changes nothing once that firing
    /// or a later one was handled.
    ScheduleNote {
        name: String,
        due: Millis,
        note: String,
        handled: bool,
    },
    /// Add tasks to an op (its hooks, as they run); ones that exist are left as they are.
    AddTasks {
        op: OpId,
        owner: ProcessId,
        tasks: Vec<NewTask>,
    },
    /// Acknowledge a cooldown, so a new op may take the key at once.
    Ack {
        key: String,
        request: Request,
    },
    /// A pause: while it holds, no new op in its scope starts (a global one: none at all). A
    /// pause of the same scope is replaced.
    Pause {
        pause: Pause,
    },
    /// Lifts the pause of exactly this scope (none: nothing happens).
    Unpause {
        scope: PauseScope,
    },
    /// A new token of the HTTP API; refused when one of that name exists.
    AddToken(TokenRow),
    /// Deletes the token of that name; refused when there is none.
    RevokeToken {
        name: String,
    },
    /// Output of an attempt.
    Log {
        op: OpId,
        /// The op's owner, which this write is fenced on; `None` for a writer that owns nothing.
        owner: Option<ProcessId>,
        task: TaskNo,
        attempt: u32,
        stream: u8,
        at: Millis,
        data: Vec<u8>,
        limit: u64,
    },
    /// How far a supervised attempt's output files (stdout, stderr) are in its log: sent in the
    /// batch of the chunks that got them there, so that a reader taking the attempt again goes
    /// on from exactly there.
    Logged {
        op: OpId,
        owner: ProcessId,
        task: TaskNo,
        attempt: u32,
        bytes: [u64; 2],
    },
    /// The op moves to `status`. `release` gives up ownership (the op ended or stopped).
    SetOp {
        op: OpId,
        owner: Option<ProcessId>,
        status: OpStatus,
        at: Millis,
        error: Option<String>,
        release: bool,
        /// With status `interrupted`: who or what stopped it (stored; cleared by any other
        /// status).
        interrupted_by: Option<Interruption>,
        kind: EventKind,
        message: String,
    },
    /// The `current_task` column: a note of what the op waits for while no task runs (a lock, a
    /// pause, a retry's delay), shown in `CUR_TASK` then; `None` clears it.
    CurrentTask {
        op: OpId,
        /// The op's owner, which this write is fenced on; `None` for a writer that owns nothing
        /// (`serve` noting why a queued op waits).
        owner: Option<ProcessId>,
        text: Option<String>,
    },
    /// A `cairn serve` process says it lives, until `lease_until` (recorded or renewed); rows
    /// of nodes whose lease ran out before `at` are deleted.
    NodeBeat {
        node: ProcessId,
        workers: u32,
        started_at: Millis,
        at: Millis,
        lease_until: Millis,
    },
    /// A `cairn serve` process stops: its row goes.
    NodeGone {
        node: ProcessId,
    },
    /// Take, for `owner`, up to `limit` of `candidates` that are queued, have never started and
    /// have no owner (or one whose lease ran out before `now`), in id order, leaving those another
    /// process is taking at the same moment: serving nodes that look at once take different ops.
    /// They stay queued, with an owner (the claim that runs them follows). Gives
    /// [`Applied::Reserved`].
    Reserve {
        owner: ProcessId,
        lease_until: Millis,
        now: Millis,
        candidates: Vec<OpId>,
        limit: u32,
    },
    /// An event that goes with no other change.
    Event {
        op: OpId,
        /// The op's owner, which this write is fenced on; `None` for a writer that owns nothing.
        owner: Option<ProcessId>,
        at: Millis,
        kind: EventKind,
        task: Option<String>,
        message: String,
    },
}

impl Change {
    /// What this change records is of no use once the machine restarts: the process that runs an
    /// attempt (its pid, process group and start time: a resume on another boot skips it, and
    /// finds by their marker the processes of an attempt whose pid was never recorded) and the
    /// op's `CUR_TASK` note, which says what its owner waits for now. A commit of nothing else is
    /// not synced to disk before it returns (`synchronous=NORMAL`): if this process is killed,
    /// the operating system still holds it and a resume reads it; if the machine stops, that
    /// process stopped with it, and `CUR_TASK` may show an older text until its owner (a resume,
    /// `serve`) writes it again. The next synced commit makes it durable with its own. Add a
    /// change here only if losing it to a power cut is harmless.
    pub(crate) fn dies_with_the_boot(&self) -> bool {
        matches!(
            self,
            Self::AttemptProcess { .. } | Self::CurrentTask { .. } | Self::TaskProgress { .. }
        )
    }

    /// The op and writer an attempt's change is fenced on. These changes never alter who owns the
    /// op, and within one transaction no other process can: once one of them passed its fence,
    /// those that follow it in the same transaction, for the same op and writer, with nothing else
    /// between them, need not read the owner again.
    pub(crate) fn attempt_fence(&self) -> Option<(OpId, &ProcessId)> {
        match self {
            Self::StartAttempt { op, owner, .. }
            | Self::AttemptProcess { op, owner, .. }
            | Self::TaskProgress { op, owner, .. }
            | Self::FinishAttempt { op, owner, .. }
            | Self::WholeAttempt { op, owner, .. }
            | Self::Logged { op, owner, .. }
            | Self::Log {
                op,
                owner: Some(owner),
                ..
            }
            | Self::CurrentTask {
                op,
                owner: Some(owner),
                ..
            }
            | Self::Event {
                op,
                owner: Some(owner),
                ..
            } => Some((*op, owner)),
            _ => None,
        }
    }

    /// Whether, once committed, this change may give a serving node something to do at once: an
    /// op to start, an answer or a cancel for the op it runs, a lock, cooldown or pause lifted, a
    /// schedule to fire. A backend that can tell other processes (PostgreSQL's `NOTIFY`) does so
    /// for these; the others find them at their next poll.
    #[must_use]
    pub fn wakes_nodes(&self) -> bool {
        match self {
            Self::Submit(_)
            | Self::Approve { .. }
            | Self::RequestCancel { .. }
            | Self::CancelUnstarted { .. }
            | Self::Unpause { .. }
            | Self::Ack { .. }
            | Self::ReleaseLock { .. }
            | Self::AddSchedule(_)
            | Self::PauseSchedule { .. }
            | Self::NodeGone { .. } => true,
            Self::SetOp {
                release, status, ..
            } => *release || status.is_ended(),
            _ => false,
        }
    }
}

/// What applying a change gave back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    Done,
    /// The new op's ids.
    Submitted {
        id: OpId,
        uuid: String,
    },
    /// The ops a [`Change::Reserve`] took, in id order.
    Reserved(Vec<OpId>),
}

/// A `cairn serve` process as the store records it. Live while `lease_until` has not passed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NodeRow {
    pub id: ProcessId,
    /// Ops it runs at once.
    pub workers: u32,
    pub started_at: Millis,
    pub heartbeat_at: Millis,
    pub lease_until: Millis,
}

/// Which ops [`Reader::list_ops`](crate::Reader::list_ops) returns, newest first.
#[derive(Debug, Clone, Default)]
pub struct OpFilter {
    pub status: Option<OpStatus>,
    pub plan: Option<String>,
    pub limit: Option<u32>,
    /// Only ops older than this one (a page after the op it names).
    pub before: Option<OpId>,
}

#[cfg(test)]
mod tests {
    use super::EventKind;

    #[test]
    fn every_event_kind_has_its_own_text_in_lowercase_words_joined_by_dashes() {
        let mut seen = std::collections::HashSet::new();
        for kind in EventKind::ALL {
            let text = kind.as_str();
            assert!(seen.insert(text), "`{text}` names two kinds");
            assert_eq!(kind.to_string(), text);
            // `^[a-z]+(-[a-z]+)*$`: words of lowercase letters, one dash between two.
            let words_ok = text
                .split('-')
                .all(|w| !w.is_empty() && w.bytes().all(|b| b.is_ascii_lowercase()));
            assert!(words_ok, "`{text}` is not lowercase words joined by dashes");
        }
    }
}
