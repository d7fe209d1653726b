//! Wake-ups: a thread that listens on its own connection (`LISTEN cairn`) and tells every waiter
//! when a transaction that may give a serving node work committed (the writer's `NOTIFY cairn`,
//! from any process). It starts on first use, makes its connection again (with backoff) when it
//! breaks, and stops once the store is dropped.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock, Weak};
use std::thread;
use std::time::Duration;

use postgres::fallible_iterator::FallibleIterator;
use tokio::sync::watch;

use super::Target;

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
            let _ = thread::Builder::new()
                .name("cairn-pg-listener".into())
                .spawn(move || listen(&target, &seen));
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

/// The listener thread: listens, tells the waiters of each notification, connects again when
/// the connection breaks; returns once the store (the sender) is gone.
fn listen(target: &Target, seen: &Weak<watch::Sender<u64>>) {
    let mut backoff = Duration::from_millis(50);
    while seen.strong_count() > 0 {
        let listening = target.connect().and_then(|mut c| {
            c.batch_execute("LISTEN cairn")
                .map(|()| c)
                .map_err(|e| target.unusable(&super::tx::describe(&e)))
        });
        let Ok(mut client) = listening else {
            thread::sleep(backoff);
            backoff = (backoff * 2).min(Duration::from_secs(2));
            continue;
        };
        backoff = Duration::from_millis(50);
        // Changes made while no connection listened are not known: wake every waiter once.
        bump(seen);
        loop {
            let next = client.notifications().timeout_iter(TICK).next();
            match next {
                Ok(Some(_)) => bump(seen),
                Ok(None) if seen.strong_count() == 0 => return,
                Ok(None) if client.is_closed() => break,
                Ok(None) => {}
                Err(_) => break,
            }
        }
    }
}

/// Counts a change, waking every waiter.
fn bump(seen: &Weak<watch::Sender<u64>>) {
    if let Some(seen) = seen.upgrade() {
        seen.send_modify(|n| *n += 1);
    }
}
