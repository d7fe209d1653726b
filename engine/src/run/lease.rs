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
        if let Some((request, grace)) = found {
            // Set before the stop: the steps' grace is decided when the stop reaches them.
            if let Some(grace) = grace {
                shared.set_cancel_grace(grace);
            }
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
                    interrupted_by: None,
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
        match renew_while_the_lease_holds(&shared).await {
            Ok(()) => {}
            Err(Fatal::Lost(why)) => {
                shared.mark_lost(&why);
                shared.stop_all();
                return;
            }
            // Past its lease another process may take the op over, and two owners must never
            // run steps at once: the steps stop, nothing more is written.
            Err(Fatal::Store(why)) => {
                shared.mark_lost(&format!(
                    "the lease could not be renewed before it ran out: {why}. Another process may take the op over, so its steps were stopped. Unless one did (`cairn status {op}`), `cairn resume {op}` continues it once the database can be written",
                    op = shared.op.0
                ));
                shared.stop_all();
                return;
            }
        }
    }
}

/// Renews the lease, trying again while it holds (less its last third, in the wall clock); a
/// renewal not answered by then is given up (the database cut off, a connection hanging). The
/// error says why the renewals failed and since when (a lock another program holds on the
/// database, a full disk), or that the database did not answer.
async fn renew_while_the_lease_holds(shared: &Shared) -> Result<(), Fatal> {
    let mut failing: Option<(String, store::Millis)> = None;
    let why_not = |failing: Option<(String, store::Millis)>| {
        Fatal::Store(failing.map_or_else(
            || "the database did not answer".to_owned(),
            |(why, since)| format!("{why}, failing since {}", crate::time::local(since)),
        ))
    };
    loop {
        // One try: the store's own wait for a lock (the busy timeout) is all it gets, so that
        // the reason is known before the lease runs out.
        let tried_at = now();
        let renewal = shared.renew_within(Duration::ZERO);
        tokio::pin!(renewal);
        let renewed = loop {
            tokio::select! {
                renewed = &mut renewal => break renewed,
                () = tokio::time::sleep(Duration::from_millis(100)) => {
                    if !shared.lease_holds() {
                        return Err(why_not(failing));
                    }
                }
            }
        };
        match renewed {
            Err(Fatal::Store(why)) => {
                shared.options.metrics.lease_renewal_failed();
                failing.get_or_insert_with(|| (String::new(), tried_at)).0 = why;
                if !shared.lease_holds() {
                    return Err(why_not(failing));
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            done => {
                if done.is_ok() {
                    shared.options.metrics.lease_renewed();
                }
                return done;
            }
        }
    }
}
