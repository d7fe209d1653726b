//! Who owns an op, and whether that owner still lives: the one liveness rule ([`Rule`]) that
//! `status`, `show`, `resume`, `cancel` and `serve` share.

use procs::proc::{self, Identity, Liveness};
use store::{AttemptStatus, Interruption, Millis, OpRow, OpStatus, ProcessId, TaskStatus};

/// The calling process, as an owner.
#[must_use]
pub fn me() -> ProcessId {
    to_store(&proc::me())
}

#[must_use]
pub fn to_store(id: &Identity) -> ProcessId {
    ProcessId {
        host: id.host.clone(),
        boot_id: id.boot_id.clone(),
        pid: id.pid,
        start: id.start,
    }
}

#[must_use]
pub fn to_identity(id: &ProcessId) -> Identity {
    Identity {
        host: id.host.clone(),
        boot_id: id.boot_id.clone(),
        pid: id.pid,
        start: id.start,
    }
}

/// What can be said of an op's owner now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OwnerState {
    /// No process owns the op.
    None,
    /// The owner runs (on this machine, checked by pid and start time; elsewhere, its lease holds).
    Alive(ProcessId),
    /// The owner is gone: its process died, the machine rebooted, or (elsewhere) its lease expired.
    Dead(ProcessId),
}

/// How an owner's liveness is judged, which depends on the store ([`Rule::of`]). Passed to whoever
/// judges (the op layer, `serve`, the CLI's `status` and `show`), never kept in a static.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Rule {
    /// One machine's store (a SQLite file): on the owner's own boot and pid namespace its process
    /// decides (a stopped owner is alive, a zombie dead), and the lease is not needed; elsewhere
    /// only the lease can tell.
    #[default]
    Local,
    /// A store that processes on other machines share (PostgreSQL): an owner lives only while its
    /// lease holds, even on its own machine, so that a node stopped (SIGSTOP) past its lease has
    /// lost its ops to another; a pid known dead on this very boot is still dead at once (another
    /// boot id is another machine, whose lease decides).
    Shared,
}

impl Rule {
    /// The rule for a store at `location`.
    #[must_use]
    pub fn of(location: &store::Location) -> Self {
        if location.is_shared() {
            Self::Shared
        } else {
            Self::Local
        }
    }

    /// Decides the state of `op`'s owner at `now`.
    #[must_use]
    pub fn owner_state(self, op: &OpRow, now: Millis) -> OwnerState {
        let Some(owner) = &op.owner else {
            return OwnerState::None;
        };
        if self.lives(owner, op.lease_until, now) {
            OwnerState::Alive(owner.clone())
        } else {
            OwnerState::Dead(owner.clone())
        }
    }

    /// Whether `process`, which holds a lease until `lease_until` (an op's owner, a serving
    /// node), lives at `now`.
    #[must_use]
    pub fn lives(self, process: &ProcessId, lease_until: Option<Millis>, now: Millis) -> bool {
        let lease_holds = lease_until.is_some_and(|l| l >= now);
        let identity = to_identity(process);
        match (proc::liveness(&identity), self) {
            // On a shared store another boot id is most likely another machine, not a reboot of
            // this one: only a pid checked here, on the owner's own boot, is known dead.
            (Liveness::Dead, Self::Shared) if identity.boot_id != proc::boot_id() => lease_holds,
            (Liveness::Dead, _) => false,
            (Liveness::Alive, Self::Local) => true,
            (Liveness::Alive, Self::Shared) | (Liveness::Unknown, _) => lease_holds,
        }
    }

    /// The status to show: an op whose owner is gone while it was running is `interrupted`.
    #[must_use]
    pub fn shown_status(self, op: &OpRow, now: Millis) -> OpStatus {
        // A queued op with an owner is one a process waits to run (for its lock) or a serving
        // node reserved; if that process is gone, the op is interrupted too. A queued op without
        // one waits for `cairn serve`.
        // A waiting op without one is parked at its gates: nobody holds it until an answer.
        let parked = op.status == OpStatus::Waiting && op.owner.is_none();
        let owned = (op.status.is_owned() && !parked)
            || (op.status == OpStatus::Queued && op.owner.is_some());
        if owned
            && matches!(
                self.owner_state(op, now),
                OwnerState::Dead(_) | OwnerState::None
            )
        {
            OpStatus::Interrupted
        } else {
            op.status
        }
    }

    /// Who or what interrupted an op shown `interrupted`: as its owner recorded it, or
    /// `OwnerDied` when it is shown so because its owner is gone. `None` for an op not shown
    /// interrupted, or interrupted before cairn recorded why.
    #[must_use]
    pub fn interrupted_by(self, op: &OpRow, now: Millis) -> Option<Interruption> {
        match self.shown_status(op, now) {
            OpStatus::Interrupted if op.status == OpStatus::Interrupted => op.interrupted_by,
            OpStatus::Interrupted => Some(Interruption::OwnerDied),
            _ => None,
        }
    }
}

/// A task's status as shown: the stored one, or `interrupted` for a task its op's run left cut
/// off ([`shown_task`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShownTask {
    Stored(TaskStatus),
    Interrupted,
}

impl ShownTask {
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stored(status) => status.as_str(),
            Self::Interrupted => "interrupted",
        }
    }
}

impl std::fmt::Display for ShownTask {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The status to show for a task stored `task`, whose last attempt is `last_attempt`, in an op
/// shown `op` (see [`Rule::shown_status`]). A task never contradicts its op: once the op is not
/// running (ended, failed, canceled or interrupted), a task still stored `running` or `waiting`
/// (its owner died, or stopped waiting on it) and a `pending` one whose last attempt was
/// interrupted (Ctrl-C, SIGTERM, a shutdown) show `interrupted`. Derived when read, like the op's.
#[must_use]
pub fn shown_task(
    op: OpStatus,
    task: TaskStatus,
    last_attempt: Option<AttemptStatus>,
) -> ShownTask {
    let cut_off = match task {
        TaskStatus::Running | TaskStatus::Waiting => true,
        TaskStatus::Pending => last_attempt == Some(AttemptStatus::Interrupted),
        _ => false,
    };
    if op.is_ended() && cut_off {
        ShownTask::Interrupted
    } else {
        ShownTask::Stored(task)
    }
}

/// Milliseconds since the Unix epoch, never going back within this process: the wall clock,
/// followed whenever it is ahead, else the time it showed plus the monotonic time since. A wall
/// clock set back (by hand, or by NTP stepping it) leaves this process on its earlier timeline, so
/// that an end is never recorded before its start nor an elapsed time below zero; a clock set
/// forward is followed at once.
#[must_use]
pub fn now() -> Millis {
    use std::sync::OnceLock;
    use std::sync::atomic::{AtomicI64, Ordering};
    use std::time::Instant;
    static ANCHOR: OnceLock<Instant> = OnceLock::new();
    /// What to add to the monotonic milliseconds since `ANCHOR` for the time shown; only grows.
    static OFFSET: AtomicI64 = AtomicI64::new(Millis::MIN);
    let wall = wall_clock();
    let mono = Millis::try_from(ANCHOR.get_or_init(Instant::now).elapsed().as_millis())
        .unwrap_or(Millis::MAX);
    let offset = OFFSET
        .fetch_max(wall - mono, Ordering::SeqCst)
        .max(wall - mono);
    mono.saturating_add(offset)
}

/// The wall clock: milliseconds since the Unix epoch.
fn wall_clock() -> Millis {
    let since = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    Millis::try_from(since.as_millis()).unwrap_or(Millis::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: Millis = 1_000_000;

    /// A running op owned by `owner`, its lease until `lease_until`.
    fn op(owner: ProcessId, lease_until: Option<Millis>) -> OpRow {
        OpRow {
            id: store::OpId(1),
            uuid: "u".into(),
            plan: "p".into(),
            title: "t".into(),
            status: OpStatus::Running,
            params: serde_json::Value::Null,
            workdir: "/".into(),
            env: serde_json::Map::new(),
            lock_key: None,
            cancel: None,
            cancel_grace_ms: None,
            interrupted_by: None,
            ending: None,
            parent: None,
            created_at: 0,
            started_at: Some(0),
            ended_at: None,
            owner: Some(owner),
            lease_until,
            current_task: None,
            error: None,
        }
    }

    /// This process with its boot id's parts replaced: `boot` (the kernel's), `ns` (the pid
    /// namespace's), when given.
    fn me_with(boot: Option<&str>, ns: Option<&str>) -> ProcessId {
        let mut id = me();
        let (here_boot, here_ns) = id.boot_id.split_once('/').unwrap();
        id.boot_id = format!("{}/{}", boot.unwrap_or(here_boot), ns.unwrap_or(here_ns));
        id
    }

    /// Whether the owner of an op with that lease is alive under `rule`; the lease holds, has run
    /// out, or there is none.
    fn alive(rule: Rule, owner: &ProcessId) -> [bool; 3] {
        [Some(NOW + 1), Some(NOW - 1), None].map(|lease| {
            let state = rule.owner_state(&op(owner.clone(), lease), NOW);
            assert!(
                matches!(&state, OwnerState::Alive(o) | OwnerState::Dead(o) if o == owner),
                "{state:?}"
            );
            matches!(state, OwnerState::Alive(_))
        })
    }

    const ALWAYS: [bool; 3] = [true, true, true];
    const NEVER: [bool; 3] = [false, false, false];
    const LEASE: [bool; 3] = [true, false, false];

    #[test]
    fn this_process_lives_by_its_pid_on_one_machine_s_store_and_by_its_lease_on_a_shared_one() {
        let live = me();
        assert_eq!(alive(Rule::Local, &live), ALWAYS);
        assert_eq!(alive(Rule::Shared, &live), LEASE);
    }

    #[test]
    fn a_pid_known_dead_on_this_boot_is_dead_whatever_its_lease() {
        // This pid, but not this process: it started at another time.
        let mut dead = me();
        dead.start += 1;
        assert_eq!(alive(Rule::Local, &dead), NEVER);
        assert_eq!(alive(Rule::Shared, &dead), NEVER);
    }

    #[test]
    fn another_pid_namespace_of_this_boot_lives_by_its_lease() {
        let elsewhere = me_with(None, Some("4026599999"));
        assert_eq!(alive(Rule::Local, &elsewhere), LEASE);
        assert_eq!(alive(Rule::Shared, &elsewhere), LEASE);
    }

    #[test]
    fn dead_on_another_boot_is_a_reboot_on_one_machine_s_store_and_another_machine_on_a_shared_one()
    {
        let other_boot = me_with(Some("00000000-0000-4000-8000-000000000000"), None);
        assert_eq!(proc::liveness(&to_identity(&other_boot)), Liveness::Dead);
        // One machine's store: its boot ended, and the owner with it.
        assert_eq!(alive(Rule::Local, &other_boot), NEVER);
        // A shared store: another machine, whose lease decides.
        assert_eq!(alive(Rule::Shared, &other_boot), LEASE);

        let running = op(other_boot.clone(), Some(NOW + 1));
        assert_eq!(Rule::Shared.shown_status(&running, NOW), OpStatus::Running);
        assert_eq!(
            Rule::Local.shown_status(&running, NOW),
            OpStatus::Interrupted
        );
        let expired = op(other_boot, Some(NOW - 1));
        assert_eq!(
            Rule::Shared.shown_status(&expired, NOW),
            OpStatus::Interrupted
        );
    }

    #[test]
    fn an_interrupted_op_says_who_stopped_it_and_a_dead_owner_is_derived() {
        let live = op(me(), Some(NOW + 1));
        assert_eq!(Rule::Local.interrupted_by(&live, NOW), None);
        let mut dead_owner = me();
        dead_owner.start += 1;
        let died = op(dead_owner, Some(NOW + 1));
        assert_eq!(
            Rule::Local.interrupted_by(&died, NOW),
            Some(Interruption::OwnerDied)
        );
        let mut stopped = op(me(), None);
        stopped.owner = None;
        stopped.status = OpStatus::Interrupted;
        stopped.interrupted_by = Some(Interruption::Signal);
        assert_eq!(
            Rule::Shared.interrupted_by(&stopped, NOW),
            Some(Interruption::Signal)
        );
        // Recorded before cairn kept why: not known.
        stopped.interrupted_by = None;
        assert_eq!(Rule::Local.interrupted_by(&stopped, NOW), None);
    }

    #[test]
    fn a_task_shows_interrupted_when_its_op_stopped_running_it_and_never_contradicts_it() {
        use AttemptStatus as A;
        use TaskStatus as T;
        let interrupted = ShownTask::Interrupted;
        for op in [
            OpStatus::Interrupted,
            OpStatus::Failed,
            OpStatus::Canceled,
            OpStatus::Succeeded,
        ] {
            assert_eq!(shown_task(op, T::Running, Some(A::Running)), interrupted);
            assert_eq!(shown_task(op, T::Waiting, None), interrupted);
            assert_eq!(
                shown_task(op, T::Pending, Some(A::Interrupted)),
                interrupted
            );
            // Never started, or waiting for its retry: pending as stored.
            for last in [None, Some(A::Failed)] {
                assert_eq!(
                    shown_task(op, T::Pending, last),
                    ShownTask::Stored(T::Pending)
                );
            }
            for done in [T::Succeeded, T::Failed, T::Skipped, T::Canceled] {
                assert_eq!(
                    shown_task(op, done, Some(A::Interrupted)),
                    ShownTask::Stored(done)
                );
            }
        }
        // While the op runs, a task is as stored.
        for op in [
            OpStatus::Queued,
            OpStatus::Running,
            OpStatus::Waiting,
            OpStatus::Canceling,
        ] {
            for task in [T::Running, T::Waiting, T::Pending] {
                assert_eq!(
                    shown_task(op, task, Some(A::Interrupted)),
                    ShownTask::Stored(task)
                );
            }
        }
    }

    #[test]
    fn an_op_without_an_owner_has_none() {
        let mut row = op(me(), None);
        row.owner = None;
        assert_eq!(Rule::Shared.owner_state(&row, NOW), OwnerState::None);
        assert_eq!(Rule::Local.shown_status(&row, NOW), OpStatus::Interrupted);
    }
}
