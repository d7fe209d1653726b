//! Who owns an op, and whether that owner still lives: the one liveness rule ([`Rule`]) that
//! `status`, `show`, `resume`, `cancel` and `serve` share.

use procs::proc::{self, Identity, Liveness};
use store::{Millis, OpRow, OpStatus, ProcessId};

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
        let owned = op.status.is_owned() || (op.status == OpStatus::Queued && op.owner.is_some());
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
}

/// Milliseconds since the Unix epoch.
#[must_use]
pub fn now() -> Millis {
    let since = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    Millis::try_from(since.as_millis()).unwrap_or(Millis::MAX)
}
