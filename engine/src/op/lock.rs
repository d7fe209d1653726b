//! Acquiring an op: its lock and its ownership. While another op holds the lock, this process
//! owns the op as `queued` (so `status` and `cancel` know someone waits) and waits, renewing its
//! lease: it notices a cancel request, waits out a pause, and says why in `CUR_TASK`.
//!
//! - [`Acquire`]: one take-over (who takes the op, how, what its events say); [`Acquire::run`].
//! - [`Acquired`]: how the wait ended.

use store::{Change, EventKind, OpId, OpRow, OpStatus, ProcessId, Reader, Store};

use super::{Error, Overrides, children, lease_until, lock_error, read_op_head, requeued};
use crate::options::Options;
use crate::owner::{Rule, now};
use crate::progress::{Progress, Sink};
use crate::shutdown::{Stop, StopHandle};

/// How waiting for an op's lock ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Acquired {
    /// The lock is taken and the op is this process's, running.
    Yes,
    /// Stopped (Ctrl-C, SIGTERM) while waiting; the op was left interrupted.
    Stopped,
    /// The op was canceled while it waited; it is recorded canceled.
    Canceled,
}

/// One take-over of op `op` by `me`: `dead`, its previous owner if gone; `kind` and `message`,
/// what the op's events say; `reopen`, a succeeded op runs again (`--from`, `--plan`).
pub(super) struct Acquire<'a> {
    pub store: &'a Store,
    pub op: OpId,
    pub me: &'a ProcessId,
    pub dead: Option<ProcessId>,
    pub options: &'a Options,
    pub overrides: Overrides,
    pub progress: &'a Sink,
    pub kind: EventKind,
    pub message: String,
    pub reopen: bool,
}

/// Where a wait for the lock stands.
struct Waiting {
    /// What `CUR_TASK` says.
    said: String,
    /// Whether this process owns the op, queued.
    owns_queued: bool,
    /// The ops above this one (a sub-plan's op is canceled with any of them).
    ancestors: Vec<OpId>,
}

impl Acquire<'_> {
    /// Takes the op's lock and ownership, waiting while another op holds the lock.
    pub(super) async fn run(&self, stop: &StopHandle) -> Result<Acquired, Error> {
        let reader = self.store.reader()?;
        let owns_queued = self.dead.is_none()
            && reader
                .op_head(self.op)
                .is_ok_and(|r| r.owner.as_ref() == Some(self.me));
        let (ancestors, _) = children::lineage(&reader, reader.op_head(self.op)?.parent)?;
        let mut wait = Waiting {
            said: String::new(),
            owns_queued,
            ancestors,
        };
        let mut stopped = stop.subscribe();
        loop {
            let row = read_op_head(&reader, self.op)?;
            if let Some(ended) = self.before_try(&reader, &row, &wait).await? {
                return Ok(ended);
            }
            if let Some(ended) = self.try_take(&reader, &row, &mut wait).await? {
                return Ok(ended);
            }
            self.hold_queued(&mut wait).await?;
            let asked_to_stop = tokio::select! {
                () = tokio::time::sleep(std::time::Duration::from_millis(500)) => false,
                _ = stopped.wait_for(|s| *s) => true,
            };
            if asked_to_stop {
                return self.stopped_waiting(&reader, stop).await;
            }
        }
    }

    fn claim(&self, queued: bool) -> Change {
        Change::Claim {
            op: self.op,
            owner: self.me.clone(),
            lease_until: lease_until(self.options),
            dead_owner: self.dead.clone(),
            now: now(),
            queued,
            reopen: self.reopen,
            kind: self.kind,
            message: self.message.clone(),
        }
    }

    /// Ends the wait before a try when the op ended, the process drains (an op that never started
    /// does not start now), or a cancel was asked (of it or of an op above it).
    async fn before_try(
        &self,
        reader: &Reader,
        row: &OpRow,
        wait: &Waiting,
    ) -> Result<Option<Acquired>, Error> {
        let (store, op, me) = (self.store, self.op, self.me);
        if row.status.is_final() && !(self.reopen && row.status == OpStatus::Succeeded) {
            return Ok(Some(Acquired::Canceled));
        }
        if self.overrides.requeue && self.options.drain.is_draining() && row.started_at.is_none() {
            if wait.owns_queued {
                store
                    .apply(vec![requeued(op, me, "the server stops")])
                    .await?;
            }
            return Ok(Some(Acquired::Stopped));
        }
        let cancel = row.cancel.clone().or_else(|| {
            wait.ancestors
                .iter()
                .find_map(|&a| reader.op_head(a).ok().and_then(|r| r.cancel))
        });
        let (true, Some(request)) = (wait.owns_queued, &cancel) else {
            return Ok(None);
        };
        let why = request
            .reason
            .as_ref()
            .map_or(String::new(), |r| format!(": {r}"));
        store
            .apply(vec![Change::SetOp {
                op,
                owner: Some(me.clone()),
                status: OpStatus::Canceled,
                at: now(),
                error: Some(format!("canceled by {}{why}", request.by)),
                release: true,
                interrupted_by: None,
                kind: EventKind::OpCanceled,
                message: format!("op canceled by {}{why} before it started", request.by),
            }])
            .await?;
        Ok(Some(Acquired::Canceled))
    }

    /// One try at the lock and ownership (none while cairn is paused): `Some` when the wait ends,
    /// `None` when it goes on.
    async fn try_take(
        &self,
        reader: &Reader,
        row: &OpRow,
        wait: &mut Waiting,
    ) -> Result<Option<Acquired>, Error> {
        let (store, op) = (self.store, self.op);
        let paused = if self.overrides.ignore_pause {
            None
        } else {
            store
                .reader()?
                .pause_of(&row.plan, row.lock_key.as_deref(), now())?
        };
        if let Some(pause) = &paused {
            let text = super::pause_note(pause);
            tell(
                store,
                op,
                wait.owns_queued.then_some(self.me),
                &mut wait.said,
                text,
            )
            .await?;
            return Ok(None);
        }
        let taken = store
            .apply(vec![
                Change::TakeLock {
                    op,
                    at: now(),
                    ignore_cooldown: self.overrides.ignore_cooldown,
                },
                self.claim(false),
            ])
            .await;
        match taken {
            Ok(_) => Ok(Some(Acquired::Yes)),
            // A sub-plan's op does not wait for a holder that has stopped (failed, interrupted):
            // in a tree of ops nobody would resume that holder while this one waits.
            Err(store::Error::LockHeld { key, holder })
                if !self.overrides.no_wait
                    && (wait.ancestors.is_empty()
                        || reader.op_head(holder).is_ok_and(|h| {
                            !Rule::of(self.store.location())
                                .shown_status(&h, now())
                                .is_ended()
                        })) =>
            {
                if !wait.said.contains(&format!("held by op {holder}")) {
                    (self.progress)(&Progress::WaitingForLock {
                        key: key.clone(),
                        holder,
                    });
                }
                let text = format!("waiting for lock {key} held by op {holder}");
                tell(
                    store,
                    op,
                    wait.owns_queued.then_some(self.me),
                    &mut wait.said,
                    text,
                )
                .await?;
                Ok(None)
            }
            Err(e @ store::Error::Owned { .. }) => Err(Error::from_store(e)),
            Err(store::Error::Conflict { op, status, .. }) => Err(Error::Final { op, status }),
            Err(e) => Err(self.refused(row, wait.owns_queued, e).await),
        }
    }

    /// The lock was refused for good (a cooldown began, the store failed): an op this process
    /// owns queued goes back to the queue (`serve` tries it again later) or, refused while
    /// waiting, stays failed, for a resume once the cooldown is acknowledged.
    async fn refused(&self, row: &OpRow, owns_queued: bool, e: store::Error) -> Error {
        let (store, op, me) = (self.store, self.op, self.me);
        let error = lock_error(e);
        if owns_queued && self.overrides.requeue && row.started_at.is_none() {
            let _ = store
                .apply(vec![requeued(op, me, &error.to_string())])
                .await;
        } else if owns_queued {
            let _ = store
                .apply(vec![Change::SetOp {
                    op,
                    owner: Some(me.clone()),
                    status: OpStatus::Failed,
                    at: now(),
                    error: Some(error.to_string()),
                    release: true,
                    interrupted_by: None,
                    kind: EventKind::OpFailed,
                    message: format!("op refused before it started: {error}"),
                }])
                .await;
        }
        error
    }

    /// Owns the waiting op (or renews the lease on it), so that it is known to be waited for.
    async fn hold_queued(&self, wait: &mut Waiting) -> Result<(), Error> {
        let renew = if wait.owns_queued {
            Change::Heartbeat {
                op: self.op,
                owner: self.me.clone(),
                lease_until: lease_until(self.options),
            }
        } else {
            self.claim(true)
        };
        match self.store.apply(vec![renew]).await {
            Ok(_) => {
                wait.owns_queued = true;
                Ok(())
            }
            Err(e) => Err(Error::from_store(e)),
        }
    }

    /// Stopped while waiting: an op that never started goes back to the queue (`serve`), else it
    /// ends interrupted.
    async fn stopped_waiting(&self, reader: &Reader, stop: &StopHandle) -> Result<Acquired, Error> {
        let (op, me) = (self.op, self.me);
        let requeue = self.overrides.requeue && read_op_head(reader, op)?.started_at.is_none();
        let change = if requeue {
            requeued(op, me, "stopped while waiting to start")
        } else {
            let cause = Stop::of(&self.options.drain, stop.cause());
            let why = format!(
                "{} while waiting to start",
                Stop::error(cause.as_ref()).trim_end_matches(" before it finished")
            );
            Change::SetOp {
                op,
                owner: Some(me.clone()),
                status: OpStatus::Interrupted,
                at: now(),
                error: Some(why.clone()),
                release: true,
                interrupted_by: cause.map(|c| c.by),
                kind: EventKind::OpInterrupted,
                message: why,
            }
        };
        self.store.apply(vec![change]).await?;
        Ok(Acquired::Stopped)
    }
}

/// Sets `CUR_TASK` to `text`, unless it already says that.
/// Fenced on `owner` when this process owns the op (queued): one that lost it writes nothing more.
async fn tell(
    store: &Store,
    op: OpId,
    owner: Option<&ProcessId>,
    said: &mut String,
    text: String,
) -> Result<(), Error> {
    if text != *said {
        store
            .apply(vec![Change::CurrentTask {
                op,
                owner: owner.cloned(),
                text: Some(text.clone()),
            }])
            .await?;
        *said = text;
    }
    Ok(())
}
