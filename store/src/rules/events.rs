//! The event trail's messages, in one place: each rule records its event's kind (an
//! [`EventKind`], whose text is rendered there) and message from here, so that what
//! `cairn events` shows reads in one voice whatever the backend.

use std::fmt::Write as _;

use crate::types::{
    AttemptStatus, EventKind, Millis, NewOp, NewTask, OpId, Outcome, ProcessId, Request, TaskStatus,
};

/// `": reason"` when the request gives one, else nothing.
pub(crate) fn why(request: &Request) -> String {
    request
        .reason
        .as_ref()
        .map_or(String::new(), |r| format!(": {r}"))
}

/// `submitted`: the plan, its hash and how many tasks.
pub(crate) fn submitted(new: &NewOp) -> String {
    format!(
        "plan `{}` ({}), {} tasks",
        new.snapshot.name,
        new.snapshot.hash,
        new.tasks.len()
    )
}

/// `task-child` on the parent's task: the child op that runs its sub-plan.
pub(crate) fn child(plan: &str, child: OpId) -> String {
    format!("runs plan `{plan}` as op {child}")
}

/// `started`: who started the op.
pub(crate) fn started_by(owner: &ProcessId) -> String {
    format!("started by {owner}")
}

/// `task-started`: which attempt.
pub(crate) fn attempt_started(n: u32) -> String {
    format!("attempt {n}")
}

/// The event that says how attempt `n` ended: its kind and message.
pub(crate) fn attempt_end(n: u32, outcome: &Outcome) -> (EventKind, String) {
    let mut message = format!("attempt {n} {}", outcome.attempt);
    if outcome.by_check {
        message.push_str(" by check: already done, the step did not run");
    }
    if let Some(code) = outcome.exit_code {
        write!(message, ", exit code {code}").ok();
    }
    // An error that only repeats the exit code says nothing more.
    let repeats = |error: &str| {
        outcome
            .exit_code
            .is_some_and(|code| error == format!("exit code {code}"))
    };
    if let Some(error) = outcome.error.as_deref().filter(|e| !repeats(e)) {
        write!(message, ": {error}").ok();
    }
    (EventKind::attempt(outcome.attempt), message)
}

/// `attempt-ended`: an attempt of a task resolved by hand meanwhile, which keeps its status.
pub(crate) fn attempt_ended_kept(
    n: u32,
    attempt: AttemptStatus,
    kept: &str,
) -> (EventKind, String) {
    (
        EventKind::AttemptEnded,
        format!("attempt {n} {attempt}; the task stays {kept}"),
    )
}

/// `task-marked`: who resolved a task by hand, why, and the outputs they gave.
pub(crate) fn marked(
    status: TaskStatus,
    request: &Request,
    outputs: &serde_json::Map<String, serde_json::Value>,
) -> (EventKind, String) {
    let shown: Vec<String> = outputs
        .iter()
        .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
        .collect();
    let mut message = format!("marked {status} by hand by {}{}", request.by, why(request));
    if !shown.is_empty() {
        write!(message, "; outputs {}", shown.join(" ")).ok();
    }
    (EventKind::TaskMarked, message)
}

/// The error of an op canceled before it started.
pub(crate) fn canceled_error(request: &Request) -> String {
    format!("canceled by {}{}", request.by, why(request))
}

/// `op-canceled`, for an op canceled before it started.
pub(crate) fn canceled_unstarted(error: &str) -> (EventKind, String) {
    (
        EventKind::OpCanceled,
        format!("op canceled before it started: {error}"),
    )
}

/// `op-finishing`: the op's outcome is decided and its finishing hooks run.
pub(crate) fn finishing(status: &str) -> (EventKind, String) {
    (
        EventKind::OpFinishing,
        format!("the op {status}; its finishing hooks run"),
    )
}

/// `cancel-requested`.
pub(crate) fn cancel_requested(request: &Request, grace_ms: Option<Millis>) -> (EventKind, String) {
    let grace = grace_ms.map_or_else(String::new, |ms| {
        let grace = if ms % 1000 == 0 {
            format!("{}s", ms / 1000)
        } else {
            format!("{ms}ms")
        };
        format!("; its running steps get {grace} between TERM and KILL")
    });
    (
        EventKind::CancelRequested,
        format!("cancel requested by {}{}{grace}", request.by, why(request)),
    )
}

/// `approved` or `rejected`: a gate's answer.
pub(crate) fn answered(approve: bool, request: &Request) -> (EventKind, String) {
    let kind = if approve {
        EventKind::Approved
    } else {
        EventKind::Rejected
    };
    (kind, format!("{kind} by {}{}", request.by, why(request)))
}

/// `op-woken`: a parked op's gate was answered.
pub(crate) fn woken(gate: &str) -> (EventKind, String) {
    (
        EventKind::OpWoken,
        format!("`{gate}` was answered: the op is queued to go on (`cairn serve` takes it)"),
    )
}

/// A rejected gate's error.
pub(crate) fn rejected_error(request: &Request) -> String {
    format!("rejected by {}{}", request.by, why(request))
}

/// `task-expanded`: how many items, and the first ten names.
pub(crate) fn expanded(tasks: &[NewTask]) -> (EventKind, String) {
    let shown: Vec<&str> = tasks.iter().take(10).map(|t| t.name.as_str()).collect();
    let more = if tasks.len() > shown.len() {
        ", ..."
    } else {
        ""
    };
    (
        EventKind::TaskExpanded,
        format!(
            "{} item{}: {}{more}",
            tasks.len(),
            if tasks.len() == 1 { "" } else { "s" },
            shown.join(", ")
        ),
    )
}

/// The event of a fan-out step's gathered end.
pub(crate) fn gathered(status: TaskStatus, error: Option<&str>) -> (EventKind, String) {
    let message = match error {
        Some(e) => format!("{status}: {e}"),
        None => format!("{status}: every item is done"),
    };
    (EventKind::task(status), message)
}

/// `plan-changed`: the caller's message and the plans' hashes.
pub(crate) fn plan_changed(message: &str, old: &str, new: &str) -> (EventKind, String) {
    (
        EventKind::PlanChanged,
        format!("{message}; plan {old} replaced by {new}"),
    )
}

/// `cooldown-acked`.
pub(crate) fn cooldown_acked(key: &str, request: &Request) -> (EventKind, String) {
    (
        EventKind::CooldownAcked,
        format!(
            "cooldown of `{key}` acknowledged by {}{}",
            request.by,
            why(request)
        ),
    )
}

/// `cooldown-ignored`.
pub(crate) fn cooldown_ignored(key: &str, after: OpId) -> (EventKind, String) {
    (
        EventKind::CooldownIgnored,
        format!("started despite the cooldown of `{key}` after op {after} (--ignore-cooldown)"),
    )
}

/// `lock-taken`.
pub(crate) fn lock_taken(key: &str) -> (EventKind, String) {
    (EventKind::LockTaken, format!("took lock `{key}`"))
}

/// `lock-released`, and the cooldown it starts.
pub(crate) fn lock_released(
    key: &str,
    cooldown_ms: Option<i64>,
    failing: bool,
) -> (EventKind, String) {
    let mut message = format!("released lock `{key}`");
    if failing {
        message.push_str(" as the op fails (`on_failure: release`; a resume takes it again)");
    }
    if let Some(ms) = cooldown_ms {
        write!(message, "; it cools down for {} s", ms / 1000).ok();
    }
    (EventKind::LockReleased, message)
}

/// A schedule's note when a firing submitted an op.
pub(crate) fn fired(op: OpId) -> String {
    format!("fired: op {op}")
}
