//! A backend for tests that fails or delays commits on demand: [`Faulty`] wraps a real store and
//! passes every commit through, unless told to fail it (as a failed write: nothing of it is made
//! durable) or to hold it back for a while first. It counts the commits it sees.
//!
//! ```no_run
//! # fn main() -> store::Result<()> {
//! let faulty = store::testing::Faulty::new(store::Store::open("cairn.db".as_ref())?);
//! let store = faulty.store();
//! faulty.fail_after(3); // the 4th commit and every one after fail
//! # Ok(()) }
//! ```

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::api::{Backend, Committing, Reader, Results, Store};
use crate::error::{Error, Result};
use crate::location::Location;
use crate::types::Change;

/// A backend that wraps another and fails or delays its commits on demand. Cheap to clone: the
/// clones share the faults and the count, so a test keeps one to steer the store it hands out.
#[derive(Debug, Clone)]
pub struct Faulty {
    inner: Store,
    state: Arc<State>,
}

#[derive(Debug, Default)]
struct State {
    /// Commits seen so far, failed ones included.
    commits: AtomicUsize,
    /// Commits numbered in `fail_from..fail_until` (from 1) fail.
    fail_from: AtomicUsize,
    fail_until: AtomicUsize,
    delay: Mutex<Duration>,
}

impl Faulty {
    /// Wraps `inner`; every commit passes through until told otherwise.
    #[must_use]
    pub fn new(inner: Store) -> Self {
        Self {
            inner,
            state: Arc::default(),
        }
    }

    /// A store whose commits go through this backend.
    #[must_use]
    pub fn store(&self) -> Store {
        Store::from_backend(self.clone())
    }

    /// Fails the `n`th commit (counting from 1, every commit seen since [`Faulty::new`]).
    pub fn fail_commit(&self, n: usize) {
        self.fail(n, n.saturating_add(1));
    }

    /// Fails every commit after the `n`th.
    pub fn fail_after(&self, n: usize) {
        self.fail(n.saturating_add(1), usize::MAX);
    }

    /// Lets every commit through again.
    pub fn heal(&self) {
        self.fail(0, 0);
    }

    /// Holds each commit back for `delay` before it goes through (or fails).
    pub fn delay(&self, delay: Duration) {
        *self
            .state
            .delay
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = delay;
    }

    /// How many commits this backend has seen, failed ones included.
    #[must_use]
    pub fn commits(&self) -> usize {
        self.state.commits.load(Ordering::SeqCst)
    }

    fn fail(&self, from: usize, until: usize) {
        self.state.fail_until.store(until, Ordering::SeqCst);
        self.state.fail_from.store(from, Ordering::SeqCst);
    }

    /// Counts a commit; its delay, and whether it fails.
    fn next(&self) -> (Duration, bool) {
        let n = self.state.commits.fetch_add(1, Ordering::SeqCst) + 1;
        let from = self.state.fail_from.load(Ordering::SeqCst);
        let until = self.state.fail_until.load(Ordering::SeqCst);
        let delay = *self
            .state
            .delay
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        (delay, (from..until).contains(&n))
    }

    /// Each batch's result when the commit fails: a write error, nothing written.
    fn failed(&self, count: usize) -> Results {
        (0..count)
            .map(|_| {
                Err(Error::Write {
                    path: self.inner.path().to_path_buf(),
                    reason: "a failure injected by the test".to_owned(),
                })
            })
            .collect()
    }
}

impl Backend for Faulty {
    fn commit(&self, batches: Vec<Vec<Change>>) -> Committing<'_> {
        let (delay, fails) = self.next();
        Box::pin(async move {
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            if fails {
                return self.failed(batches.len());
            }
            self.inner.apply_together(batches).await
        })
    }

    fn commit_solo(&self, batches: Vec<Vec<Change>>) -> Committing<'_> {
        let (delay, fails) = self.next();
        Box::pin(async move {
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            if fails {
                return self.failed(batches.len());
            }
            self.inner.apply_solo(batches).await
        })
    }

    /// [`Store::apply_blocking`] takes one batch; several here are committed one by one.
    fn commit_blocking(&self, batches: Vec<Vec<Change>>) -> Results {
        let (delay, fails) = self.next();
        std::thread::sleep(delay);
        if fails {
            return self.failed(batches.len());
        }
        let mut results = Vec::with_capacity(batches.len());
        for batch in batches {
            results.push(self.inner.apply_blocking(batch));
        }
        results
    }

    fn location(&self) -> &Location {
        self.inner.location()
    }

    fn secret_key_file(&self) -> PathBuf {
        self.inner.secret_key_file()
    }

    fn reader(&self) -> Result<Reader> {
        self.inner.reader()
    }

    fn wait_for_change(&self, timeout: std::time::Duration) -> crate::api::Waiting<'_> {
        Box::pin(self.inner.wait_for_change(timeout))
    }
}
