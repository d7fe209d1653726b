//! What watches a run while it goes: the heartbeat that renews the owner's lease, the watcher
//! of cancel requests, and the op's own `timeout` ([`Watchers`]). The lease rule itself
//! (`Shared::lease_holds`, `Shared::renew`) is the run context's: a task proves the lease before
//! starting a process.

use std::sync::Arc;
use std::time::Duration;

use store::{Change, EventKind, OpStatus};
use tokio::task::JoinHandle;

use crate::owner::now;
use crate::task::Fatal;
use crate::task::context::{Shared, StopReason, cancel_request_in};

/// The background tasks of one run.
pub(super) struct Watchers {
    heartbeat: JoinHandle<()>,
    cancel: JoinHandle<()>,
    timer: Option<JoinHandle<()>>,
}

impl Watchers {
    pub(super) fn start(shared: &Arc<Shared>) -> Self {
        let timer = shared.plan.timeout.map(|limit| {
            let shared = shared.clone();
            tokio::spawn(async move {
                op_timer(&shared, limit).await;
                shared.stop_because(StopReason::Timeout(format!(
                    "the op timed out after {}",
                    plans::units::format_duration(limit)
                )));
            })
        });
        Self {
            heartbeat: tokio::spawn(heartbeat(shared.clone())),
            cancel: tokio::spawn(watch_for_cancel(shared.clone())),
            timer,
        }
    }

    /// The steps have ended: no cancel or timeout stops the run any more. The lease is still
    /// renewed, while the finishing hooks run.
    pub(super) fn steps_ended(&self) {
        self.cancel.abort();
        if let Some(timer) = &self.timer {
            timer.abort();
        }
    }

    /// The run ends: nothing more is renewed.
    pub(super) fn end(&self) {
        self.heartbeat.abort();
    }
}

/// Returns once the run has used up `limit`, not counting the time it waits with only approval
/// gates in flight (the op's `timeout` bounds its work, not a person's answer).
async fn op_timer(shared: &Shared, limit: Duration) {
    let mut at_gates = shared.at_gates();
    let mut left = limit;
    loop {
        // Paused while only gates wait (a closed channel: the run is ending anyway).
        if at_gates.wait_for(|g| !*g).await.is_err() {
            return;
        }
        let from = tokio::time::Instant::now();
        tokio::select! {
            () = tokio::time::sleep(left) => return,
            _ = at_gates.wait_for(|g| *g) => {
                left = left.saturating_sub(from.elapsed());
            }
        }
    }
}

/// How long one look for a cancel request may take before it is given up (and made again on a
/// new reader): the read runs off the run's thread, which a database that does not answer must
/// never hold (the lease's renewal and the steps' stops run there).
const CANCEL_READ_WAIT: Duration = Duration::from_secs(2);

/// Polls the op for a cancel request; on one, stops the run with that reason.
async fn watch_for_cancel(shared: Arc<Shared>) {
    let Ok(mut reader) = shared.store.reader() else {
        return;
    };
    let targets = shared.cancel_targets();
    loop {
        let ops = targets.clone();
        let look = tokio::task::spawn_blocking(move || {
            let found = cancel_request_in(&reader, &ops);
            (reader, found)
        });
        let found =
            if let Ok(Ok((back, found))) = tokio::time::timeout(CANCEL_READ_WAIT, look).await {
                reader = back;
                found
            } else {
                // No answer in time: the old reader is left to its read; the lease decides the rest.
                let Ok(fresh) = shared.store.reader() else {
                    return;
                };
                reader = fresh;
                None
            };
        if let Some(request) = found {
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
                    kind: EventKind::OpCanceling,
                    message: format!("canceling, as asked by {by}"),
                }])
                .await;
            shared.stop_because(StopReason::Cancel(by));
            return;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Renews the lease until the run ends; on losing the op, says so and stops the run.
async fn heartbeat(shared: Arc<Shared>) {
    loop {
        tokio::time::sleep(shared.options.heartbeat).await;
        // A renewal that has not answered when the lease is about to run out (the database cut
        // off, a connection hanging) is given up: the steps stop before another process may take
        // the op over.
        let Some(renewed) = renew_while_the_lease_holds(&shared).await else {
            shared.mark_lost(
                "the lease could not be renewed before it ran out (the database did not answer), so another process may take the op over",
            );
            shared.stop_all();
            return;
        };
        match renewed {
            Ok(()) => {}
            // Lost the op, or cannot renew before the lease runs out (the database is unwritable,
            // this process was paused): past its lease another process may take the op over, and
            // two owners must never run steps at once.
            Err(Fatal::Store(_)) if shared.lease_holds() => {}
            Err(Fatal::Lost(why)) => {
                shared.mark_lost(&why);
                shared.stop_all();
                return;
            }
            Err(Fatal::Store(why)) => {
                shared.mark_lost(&format!(
                    "the lease could not be renewed before it ran out, so another process may take the op over: {why}"
                ));
                shared.stop_all();
                return;
            }
        }
    }
}

/// Renews the lease, unless the lease runs out (less its last third, in the wall clock) before the
/// renewal is answered: `None` then.
async fn renew_while_the_lease_holds(shared: &Shared) -> Option<Result<(), Fatal>> {
    let renewal = shared.renew();
    tokio::pin!(renewal);
    loop {
        tokio::select! {
            renewed = &mut renewal => return Some(renewed),
            () = tokio::time::sleep(Duration::from_millis(100)) => {
                if !shared.lease_holds() {
                    return None;
                }
            }
        }
    }
}
