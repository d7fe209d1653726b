//! Who owns an op, and whether that owner still lives: the one liveness rule that `status`,
//! `resume` and (later) `cancel` and `serve` share.

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

/// Decides the owner's state. On the owner's own boot and pid namespace the process decides and
/// the lease is not needed; elsewhere only the lease can tell.
#[must_use]
pub fn owner_state(op: &OpRow, now: Millis) -> OwnerState {
    let Some(owner) = &op.owner else {
        return OwnerState::None;
    };
    let alive = match proc::liveness(&to_identity(owner)) {
        Liveness::Alive => true,
        Liveness::Dead => false,
        Liveness::Unknown => op.lease_until.is_some_and(|l| l >= now),
    };
    if alive {
        OwnerState::Alive(owner.clone())
    } else {
        OwnerState::Dead(owner.clone())
    }
}

/// The status to show: an op whose owner is gone while it was running is `interrupted`.
#[must_use]
pub fn shown_status(op: &OpRow, now: Millis) -> OpStatus {
    // A queued op with an owner is one a process waits to run (for its lock); if that process is
    // gone, the op is interrupted too. A queued op without one waits for `cairn serve`.
    let owned = op.status.is_owned() || (op.status == OpStatus::Queued && op.owner.is_some());
    if owned && matches!(owner_state(op, now), OwnerState::Dead(_) | OwnerState::None) {
        OpStatus::Interrupted
    } else {
        op.status
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
