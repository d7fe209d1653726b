//! Notifications, each heard by a thread that listens on its own connection, starts on first use,
//! makes its connection again (with backoff) when it breaks, and stops once nothing uses it:
//! - wake-ups ([`Changes`], `LISTEN cairn`): a transaction that may give a serving node work
//!   committed (the writer's `NOTIFY cairn`, from any process);
//! - moves ([`Moved`], `LISTEN cairn_moves`): which op recorded events (every `append_events`
//!   notifies its op's id), numbered as they arrive, for the followers of changes.

use std::collections::{HashSet, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock, PoisonError, Weak};
use std::thread;
use std::time::Duration;

use postgres::fallible_iterator::FallibleIterator;
use tokio::sync::watch;

use super::Target;
use crate::types::{Moves, OpId};

/// How often the listener looks whether its store is gone, while nothing is notified.
const TICK: Duration = Duration::from_secs(1);

/// The changes seen so far (a count), shared by the listener thread and the waiters.
#[derive(Debug)]
pub(super) struct Changes {
    target: Arc<Target>,
    seen: Arc<watch::Sender<u64>>,
    started: OnceLock<()>,
}

impl Changes {
    pub(super) fn new(target: Arc<Target>) -> Self {
        Self {
            target,
            seen: Arc::new(watch::Sender::new(0)),
            started: OnceLock::new(),
        }
    }

    /// Resolves at the next change notified after this call, or after `timeout`.
    pub(super) fn wait(&self, timeout: Duration) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        self.started.get_or_init(|| {
            let (target, seen) = (self.target.clone(), Arc::downgrade(&self.seen));
            // Without the thread, waiting is polling: the timeout still ends each wait.
            let alive = {
                let seen = seen.clone();
                move || seen.strong_count() > 0
            };
            let _ = thread::Builder::new()
                .name("cairn-pg-listener".into())
                .spawn(move || listen(&target, "cairn", alive, || bump(&seen), |_| bump(&seen)));
        });
        let mut seen = self.seen.subscribe();
        Box::pin(async move {
            let _ = tokio::time::timeout(timeout, seen.changed()).await;
        })
    }
}

#[cfg(test)]
impl Changes {
    /// How many changes were seen so far.
    pub(super) fn seen(&self) -> u64 {
        *self.seen.borrow()
    }
}

/// A listener thread: listens on `channel`, tells `notified` of each notification's payload,
/// calls `connected` each time it (re)starts listening (what was notified while it did not is
/// lost), and returns once `alive` says nothing uses it.
fn listen(
    target: &Target,
    channel: &str,
    alive: impl Fn() -> bool,
    connected: impl Fn(),
    notified: impl Fn(&str),
) {
    let mut backoff = Duration::from_millis(50);
    while alive() {
        let listening = target.connect().and_then(|mut c| {
            c.batch_execute(&format!("LISTEN {channel}"))
                .map(|()| c)
                .map_err(|e| target.unusable(&super::tx::describe(&e)))
        });
        let Ok(mut client) = listening else {
            thread::sleep(backoff);
            backoff = (backoff * 2).min(Duration::from_secs(2));
            continue;
        };
        backoff = Duration::from_millis(50);
        connected();
        loop {
            let next = client.notifications().timeout_iter(TICK).next();
            match next {
                Ok(Some(n)) => notified(n.payload()),
                Ok(None) if !alive() => return,
                Ok(None) if client.is_closed() => break,
                Ok(None) => {}
                Err(_) => break,
            }
        }
    }
}

/// The channel the writers notify an op's id on when it records events.
pub(super) const MOVES: &str = "cairn_moves";

/// How many moves are kept for followers that have not asked yet.
const MOVES_KEPT: usize = 1 << 17;

/// The ops notified as moved, numbered as heard, shared by a store's readers.
#[derive(Debug)]
pub(crate) struct Moved {
    target: Arc<Target>,
    log: Arc<Mutex<MoveLog>>,
    started: OnceLock<()>,
}

/// Moves `next - kept.len() .. next`; a cursor below `known_from` asks about a time nothing
/// listened.
#[derive(Debug)]
struct MoveLog {
    next: u64,
    kept: VecDeque<OpId>,
    known_from: u64,
}

impl MoveLog {
    /// Nothing notified before now is known: when the listener (re)connects, or a payload is
    /// not an op's id.
    fn lost(&mut self) {
        self.next += 1;
        self.kept.clear();
        self.known_from = self.next;
    }

    fn push(&mut self, payload: &str) {
        let Ok(op) = payload.parse() else {
            self.lost();
            return;
        };
        self.kept.push_back(OpId(op));
        self.next += 1;
        if self.kept.len() > MOVES_KEPT {
            self.kept.pop_front();
        }
    }

    fn since(&self, after: Option<u64>) -> Moves {
        let from = self.next - self.kept.len() as u64;
        let ops = after
            .filter(|a| *a >= self.known_from && *a >= from && *a <= self.next)
            .map(|a| {
                let mut seen = HashSet::new();
                self.kept
                    .iter()
                    .skip(usize::try_from(a - from).unwrap_or(usize::MAX))
                    .filter(|op| seen.insert(**op))
                    .copied()
                    .collect()
            });
        Moves {
            cursor: self.next,
            ops,
        }
    }
}

impl Moved {
    pub(crate) fn new(target: Arc<Target>) -> Self {
        Self {
            target,
            log: Arc::new(Mutex::new(MoveLog {
                next: 0,
                kept: VecDeque::new(),
                // Nothing is known until the listener listens.
                known_from: 1,
            })),
            started: OnceLock::new(),
        }
    }

    /// The ops notified after `after` (see [`crate::ReadBackend::moves`]); the first call
    /// starts the listener.
    pub(crate) fn since(&self, after: Option<u64>) -> Moves {
        self.started.get_or_init(|| {
            let (target, log) = (self.target.clone(), Arc::downgrade(&self.log));
            let with = move |f: &dyn Fn(&mut MoveLog)| {
                if let Some(log) = log.upgrade() {
                    f(&mut log.lock().unwrap_or_else(PoisonError::into_inner));
                }
            };
            let alive = {
                let log = Arc::downgrade(&self.log);
                move || log.strong_count() > 0
            };
            let _ = thread::Builder::new()
                .name("cairn-pg-moves".into())
                .spawn(move || {
                    listen(
                        &target,
                        MOVES,
                        alive,
                        || with(&MoveLog::lost),
                        |payload| with(&|log| log.push(payload)),
                    );
                });
        });
        self.log
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .since(after)
    }
}

/// Counts a change, waking every waiter.
fn bump(seen: &Weak<watch::Sender<u64>>) {
    if let Some(seen) = seen.upgrade() {
        seen.send_modify(|n| *n += 1);
    }
}
