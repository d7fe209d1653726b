//! The commit-carrying protocol: a task's end is made durable by the first commit of the task it
//! releases.
//!
//! On a serial chain the end of one step and the start of the next would be two durable commits,
//! one after the other, each waited for. Instead the run loop hands the end's [`Record`] to the one
//! task the end releases, whose first commit carries it: both batches in one transaction, the
//! record's first, each in its own savepoint (see `Store::apply_together`). The released task
//! starts nothing before that commit is in and the record in it succeeded; any other task that
//! needs the ended one waits until the record is durable before it is launched; and a record that
//! no task carries is applied by the loop itself before it goes on. So a task still never starts
//! before the ends of its needs are durable (ARCHITECTURE.md, crash rule 3), with one commit fewer
//! per step. A task that ends before its first commit still records what it carried, and a failure
//! to record it stops the run.
//!
//! - [`Record`]: an end not yet durable (made by `task::finish` for a task others need).
//! - [`Carry`]: what a task was handed to carry; [`Carry::commit`] makes its commits.
//! - [`Ledger`]: the run loop's side: the end joined last, and the ends on their way to the
//!   database, waited for before a task that needs them starts.

use std::collections::BTreeMap;
use std::sync::Arc;

use store::{Change, Error as StoreError};
use tokio::sync::watch;

use super::Fatal;
use super::context::{Shared, patiently};
use crate::progress::Progress;

/// The end of a task that is not yet durable: the changes that record it and the line that says
/// so once it is.
pub(crate) struct Record {
    changes: Vec<Change>,
    progress: Progress,
    /// `Some(true)` once durable, `Some(false)` if it could not be recorded.
    recorded: watch::Sender<Option<bool>>,
}

impl std::fmt::Debug for Record {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Record").finish_non_exhaustive()
    }
}

impl Record {
    pub(crate) fn new(changes: Vec<Change>, progress: Progress) -> Self {
        Self {
            changes,
            progress,
            recorded: watch::channel(None).0,
        }
    }

    /// Records this end on its own, in the background; the receiver says when it is durable.
    fn alone(self: Box<Self>, shared: &Arc<Shared>) -> watch::Receiver<Option<bool>> {
        let recorded = self.recorded.subscribe();
        let shared = shared.clone();
        tokio::spawn(async move {
            let _ = Carry(Some(self)).commit(&shared, Vec::new()).await;
        });
        recorded
    }
}

/// The record a task carries into its first commit, if it was handed one.
#[derive(Debug, Default)]
pub(crate) struct Carry(Option<Box<Record>>);

impl Carry {
    /// Nothing to carry.
    pub(crate) fn none() -> Self {
        Self(None)
    }

    /// Applies `batch` in one commit with the record this holds (taking it), the record first and
    /// each in its own savepoint; says the record's line and marks it recorded once it is. An error
    /// recording it is returned even when `batch` itself went in: what `batch` starts must not run.
    /// With nothing carried, `batch` is a task's own commit ([`Shared::apply_own`]).
    pub(crate) async fn commit(
        &mut self,
        shared: &Shared,
        batch: Vec<Change>,
    ) -> Result<(), Fatal> {
        let Some(record) = self.0.take() else {
            return if batch.is_empty() {
                Ok(())
            } else {
                shared.apply_own(batch).await
            };
        };
        if let Err(lost) = shared.not_lost() {
            record.recorded.send_replace(Some(false));
            return Err(lost);
        }
        let mut batches = vec![record.changes.clone()];
        if !batch.is_empty() {
            batches.push(batch);
        }
        // A transient failure is the whole commit's (another process held the database): both
        // again.
        let recorded = patiently(shared.options.lease / 2, || async {
            let mut results = shared.commit_together(batches.clone()).await.into_iter();
            results
                .next()
                .unwrap_or(Err(StoreError::Closed))
                .map(|_| results.next())
        })
        .await;
        let own = match recorded {
            Ok(own) => own,
            Err(e) => {
                record.recorded.send_replace(Some(false));
                return Err(e.into());
            }
        };
        shared.say(&record.progress);
        record.recorded.send_replace(Some(true));
        match own {
            None | Some(Ok(_)) => Ok(()),
            Some(Err(e)) => Err(e.into()),
        }
    }

    /// Records what is still carried, if anything (a task that ended before its first commit).
    pub(crate) async fn flush(&mut self, shared: &Shared) -> Result<(), Fatal> {
        self.commit(shared, Vec::new()).await
    }
}

/// The run loop's side of the protocol (see the module's doc).
#[derive(Debug, Default)]
pub(crate) struct Ledger {
    /// The end of the task joined last, when it is not yet recorded.
    pending: Option<(usize, Box<Record>)>,
    /// Ends on their way to the database, carried by a task or applied on their own.
    unconfirmed: BTreeMap<usize, watch::Receiver<Option<bool>>>,
}

impl Ledger {
    /// Task `task` ended with `record` not yet durable.
    pub(crate) fn hold(&mut self, task: usize, record: Box<Record>) {
        self.pending = Some((task, record));
    }

    /// What a task with `needs` carries, once the ends of its other needs are durable: the end
    /// joined last, if it needs it (a fan-out step, whose first commit is its expansion, leaves it
    /// to be recorded on its own). On an error, what it would have carried is still recorded, if
    /// the store lets it.
    pub(crate) async fn release(
        &mut self,
        shared: &Arc<Shared>,
        needs: &[usize],
        fans_out: bool,
    ) -> Result<Carry, Fatal> {
        let mut carry = Carry::none();
        let mut carried = None;
        if let Some((ended, _)) = &self.pending
            && needs.contains(ended)
        {
            let (ended, record) = self.pending.take().expect("checked just above");
            if fans_out {
                self.unconfirmed.insert(ended, record.alone(shared));
            } else {
                self.unconfirmed.insert(ended, record.recorded.subscribe());
                carry = Carry(Some(record));
                carried = Some(ended);
            }
        }
        if let Err(f) = self.wait(needs, carried).await {
            if let (Some(ended), Some(record)) = (carried, carry.0.take()) {
                self.unconfirmed.insert(ended, record.alone(shared));
            }
            return Err(f);
        }
        Ok(carry)
    }

    /// A record no task carried goes on its own; what needs it waits for it.
    pub(crate) fn flush(&mut self, shared: &Arc<Shared>) {
        if let Some((ended, record)) = self.pending.take() {
            self.unconfirmed.insert(ended, record.alone(shared));
        }
    }

    /// Waits until every end on its way to the database is durable.
    pub(crate) async fn wait_all(&mut self) -> Result<(), Fatal> {
        let all: Vec<usize> = self.unconfirmed.keys().copied().collect();
        self.wait(&all, None).await
    }

    /// Waits until the ends of `needs` on their way to the database (but `skip`'s) are durable.
    async fn wait(&mut self, needs: &[usize], skip: Option<usize>) -> Result<(), Fatal> {
        for &need in needs {
            if Some(need) == skip {
                continue;
            }
            let Some(recorded) = self.unconfirmed.get_mut(&need) else {
                continue;
            };
            let durable = recorded
                .wait_for(Option::is_some)
                .await
                .is_ok_and(|r| *r == Some(true));
            if !durable {
                return Err(Fatal::Store(format!(
                    "the end of task {need} could not be recorded"
                )));
            }
            self.unconfirmed.remove(&need);
        }
        Ok(())
    }
}
