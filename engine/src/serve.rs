//! `cairn serve`: runs the ops that wait for it. Every `poll` it fires the schedules that are due
//! (`crate::schedule`), then looks for
//! - queued ops nobody owns (or whose owner is gone), oldest first: it starts them;
//! - ops whose owner is gone (killed, its machine rebooted) or that a stop left interrupted, of
//!   plans with `auto_resume: true`: it resumes them, as an event `auto-resumed` says;
//!
//! and runs up to `workers` at once. An op whose lock another op holds is left for a later poll
//! rather than given a worker to wait in (a failed op keeps its lock until it is resumed or
//! canceled). Taking an op is the store's compare-and-set (`Claim`), so several `serve` processes
//! on one database never run an op twice: the loser of a race is told another process owns the op
//! and moves on. An op refused for a passing reason (a cooldown, a pause) is tried again later;
//! one that cannot run (its snapshot no longer parses) is left alone and said so. An op this
//! process took but could not carry on (the store failed under it) is released at once. While
//! cairn is paused nothing new starts. A stop (SIGTERM, SIGINT) ends the claiming and drains: no
//! task starts any more, and running steps get the grace period to finish; those still running then
//! are stopped the way `cairn run` stops them (TERM, then KILL after the grace period). The ops are
//! recorded interrupted (or, if they never started, queued again) and released, so that the next
//! `serve` takes them at once.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use store::{Change, EventKind, OpId, OpStatus, Store};
use tokio::task::JoinSet;

use crate::op::{self, Error, Overrides};
use crate::options::Options;
use crate::outcome::RunEnd;
use crate::owner::{self, OwnerState};
use crate::progress::Sink;
use crate::shutdown::StopHandle;

/// How `serve` runs.
#[derive(Debug, Clone)]
pub struct Config {
    /// Ops run at once.
    pub workers: usize,
    /// Exit once nothing is left to do (no op to start or resume, none running).
    pub once: bool,
    pub options: Options,
    /// How often the database is looked at for work.
    pub poll: Duration,
    /// The clock schedules are fired by: `(start, speed)` makes it read `start` when `serve`
    /// starts and advance `speed` times as fast as real time (for tests); `None`: the real clock.
    pub schedule_clock: Option<(store::Millis, f64)>,
}

/// What `serve` does with an op it found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Work {
    Start,
    Resume,
}

/// How long an op refused for a passing reason waits before it is tried again.
const RETRY_AFTER: Duration = Duration::from_secs(30);

/// Runs ops until `stop` is set (or, with `once`, until nothing is left). `progress` gives each
/// op's sink.
pub async fn serve(
    store: &Store,
    config: Config,
    progress: Arc<dyn Fn(OpId) -> Sink + Send + Sync>,
    stop: StopHandle,
) -> Result<(), Error> {
    let mut stopped = stop.subscribe();
    let mut running: JoinSet<(OpId, Result<RunEnd, Error>)> = JoinSet::new();
    let mut tasks: HashMap<tokio::task::Id, OpId> = HashMap::new();
    let mut handles: BTreeMap<OpId, StopHandle> = BTreeMap::new();
    let mut seen = Seen::default();
    let started = Instant::now();
    let speed = config.schedule_clock.map_or(1.0, |(_, speed)| speed);
    let schedule_now = || match config.schedule_clock {
        #[allow(clippy::cast_possible_wrap, clippy::cast_precision_loss)]
        Some((start, speed)) => start + (started.elapsed().as_millis() as f64 * speed) as i64,
        None => owner::now(),
    };
    // A firing is on time when found within a minute (of schedule time) and a poll of it.
    #[allow(clippy::cast_possible_wrap, clippy::cast_precision_loss)]
    let window = 60_000 + (config.poll.as_millis() as f64 * speed) as i64;
    let me = owner::me();
    tracing::info!(workers = config.workers, "serving");
    loop {
        if *stopped.borrow() {
            break;
        }
        seen.later.retain(|_, at| *at > Instant::now());
        // A database error here (locked for longer than the busy timeout, a full disk) is said,
        // and the next poll tries again: the running ops go on.
        let found = match poll(
            store,
            &config,
            (schedule_now(), window),
            &handles,
            &mut seen,
            running.len(),
        )
        .await
        {
            Ok(found) => found,
            Err(e) => {
                tracing::warn!(error = %e, "cannot look for work; trying again");
                Vec::new()
            }
        };
        for (op, what) in found {
            if running.len() >= config.workers {
                break;
            }
            let handle = StopHandle::new();
            handles.insert(op, handle.clone());
            let store = store.clone();
            let options = config.options.clone();
            let sink = progress(op);
            tracing::info!(
                op = op.0,
                "{}",
                if what == Work::Start {
                    "starting"
                } else {
                    "resuming"
                }
            );
            let task = running
                .spawn(async move { (op, run_one(&store, op, what, options, sink, handle).await) });
            tasks.insert(task.id(), op);
        }
        if config.once && running.is_empty() {
            // Nothing was found and nothing runs: drained.
            tracing::info!("nothing left to do");
            break;
        }
        tokio::select! {
            joined = running.join_next_with_id(), if !running.is_empty() => {
                let (op, end) = match joined {
                    Some(Ok((id, (op, end)))) => {
                        tasks.remove(&id);
                        (op, end)
                    }
                    Some(Err(e)) => {
                        // A worker panicked: its op is released for the next poll (or server).
                        let Some(op) = tasks.remove(&e.id()) else { continue };
                        (op, Err(Error::Refused(format!("its worker failed: {e}"))))
                    }
                    None => continue,
                };
                handles.remove(&op);
                ended(store, &me, op, end, &mut seen).await;
            }
            () = tokio::time::sleep(config.poll) => {}
            _ = stopped.changed() => {}
        }
    }
    // Stopping: no task starts any more; running steps get the grace period to finish. Those
    // still running then are stopped as `cairn run` stops them (TERM, KILL after the grace
    // period). Every op is released, for the next server.
    if !running.is_empty() {
        tracing::info!(
            ops = running.len(),
            "draining: running steps get {} to finish",
            plans::units::format_duration(config.options.grace)
        );
        config.options.drain.drain();
        let deadline = tokio::time::sleep(config.options.grace);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                joined = running.join_next_with_id() => match joined {
                    Some(Ok((id, (op, end)))) => {
                        tasks.remove(&id);
                        handles.remove(&op);
                        ended(store, &me, op, end, &mut seen).await;
                    }
                    Some(Err(_)) => {}
                    None => break,
                },
                () = &mut deadline => break,
            }
        }
    }
    if !running.is_empty() {
        tracing::info!(ops = running.len(), "stopping the steps still running");
    }
    for handle in handles.values() {
        handle.stop();
    }
    while let Some(joined) = running.join_next().await {
        if let Ok((op, end)) = joined {
            ended(store, &me, op, end, &mut seen).await;
        }
    }
    tracing::info!("stopped");
    Ok(())
}

/// A worker: starts or resumes `op` through the resume path, saying why in its events.
async fn run_one(
    store: &Store,
    op: OpId,
    what: Work,
    options: Options,
    progress: Sink,
    stop: StopHandle,
) -> Result<RunEnd, Error> {
    let (kind, verb) = match what {
        Work::Start => (EventKind::Started, "started by cairn serve"),
        Work::Resume => (EventKind::AutoResumed, "resumed by cairn serve"),
    };
    let takeover = op::Takeover {
        store,
        options,
        overrides: Overrides {
            requeue: true,
            ..Overrides::default()
        },
        progress,
        stop,
        kind,
        verb,
        reopen: false,
    };
    op::resume_as(takeover, op, None, None).await
}

/// What `serve` remembers of ops between polls.
#[derive(Debug, Default)]
struct Seen {
    /// Ops this process leaves alone (`auto_resume` off, cannot run).
    passed: HashSet<OpId>,
    /// Ops refused for a passing reason, and when to try them again.
    later: HashMap<OpId, Instant>,
    /// Whether the pause was said (once per pause).
    said_paused: bool,
}

/// One look at the database: fire the schedules that are due (`now` on the schedules' clock,
/// within `window`), then find the ops to take (none while `busy` workers are all there are).
async fn poll(
    store: &Store,
    config: &Config,
    (now, window): (store::Millis, store::Millis),
    running: &BTreeMap<OpId, StopHandle>,
    seen: &mut Seen,
    busy: usize,
) -> Result<Vec<(OpId, Work)>, Error> {
    if let Some(pause) = store.reader()?.paused()? {
        if !seen.said_paused {
            tracing::info!(by = %pause.by, "cairn is paused: no op starts and no schedule fires until `cairn unpause`");
            seen.said_paused = true;
        }
        return Ok(Vec::new());
    }
    seen.said_paused = false;
    crate::schedule::fire_due(store, now, window).await?;
    if busy >= config.workers {
        return Ok(Vec::new());
    }
    let (found, waiting) = work(&store.reader()?, running, seen)?;
    // `status` says why a queued op does not start.
    let notes: Vec<Change> = waiting
        .into_iter()
        .map(|(op, text)| Change::CurrentTask {
            op,
            owner: None,
            text: Some(text),
        })
        .collect();
    if !notes.is_empty() {
        // Only a note: failing to write it changes nothing else.
        let _ = store.apply(notes).await;
    }
    Ok(found)
}

/// Says how an op this process ran ended, and lets go of it if it could not carry it on.
async fn ended(
    store: &Store,
    me: &store::ProcessId,
    op: OpId,
    end: Result<RunEnd, Error>,
    seen: &mut Seen,
) {
    let failure = match end {
        Ok(RunEnd::StoreFailed(e)) => {
            tracing::warn!(op = op.0, error = %e, "the store failed under it");
            Some(e)
        }
        Ok(end) => {
            tracing::info!(op = op.0, status = %end.status(), "op ended");
            None
        }
        Err(Error::Owned { .. }) => {
            tracing::debug!(op = op.0, "another process took it first");
            None
        }
        Err(
            e @ (Error::Final { .. } | Error::UnknownOp(_) | Error::Snapshot(_) | Error::Secret(_)),
        ) => {
            tracing::warn!(op = op.0, error = %e, "cannot run it; left alone");
            seen.passed.insert(op);
            Some(e.to_string())
        }
        Err(e) => {
            tracing::info!(op = op.0, "not now ({e}); trying again later");
            seen.later.insert(op, Instant::now() + RETRY_AFTER);
            Some(e.to_string())
        }
    };
    // An op this process took and could not carry on is released: nobody could take it while
    // this (live) process owned it. Fenced: only if it still owns it.
    if let Some(why) = failure
        && let Ok(row) = store.reader().and_then(|r| r.op(op))
        && row.owner.as_ref() == Some(me)
    {
        let status = if row.started_at.is_none() {
            OpStatus::Queued
        } else {
            OpStatus::Interrupted
        };
        let _ = store
            .apply(vec![Change::SetOp {
                op,
                owner: Some(me.clone()),
                status,
                at: owner::now(),
                error: Some(why.clone()),
                release: true,
                kind: EventKind::OpReleased,
                message: format!("released by cairn serve: {why}"),
            }])
            .await;
    }
}

/// The ops a poll found: those to start or resume now, and those that wait for a lock with what
/// their `CUR_TASK` should say.
type Found = (Vec<(OpId, Work)>, Vec<(OpId, String)>);

/// The ops to start or resume now, oldest first; ops whose lock another op holds wait (with what
/// their `CUR_TASK` should say, when it does not say it yet).
fn work(
    reader: &store::Reader,
    running: &BTreeMap<OpId, StopHandle>,
    seen: &mut Seen,
) -> Result<Found, Error> {
    let mut waiting = Vec::new();
    let now = owner::now();
    let mut held: HashMap<String, OpId> =
        reader.locks()?.into_iter().map(|l| (l.key, l.op)).collect();
    let mut found = Vec::new();
    for status in [
        OpStatus::Queued,
        OpStatus::Running,
        OpStatus::Waiting,
        OpStatus::Canceling,
        OpStatus::Interrupted,
    ] {
        let rows = reader.list_ops(&store::OpFilter {
            status: Some(status),
            plan: None,
            limit: None,
        })?;
        for row in rows {
            if running.contains_key(&row.id)
                || seen.passed.contains(&row.id)
                || seen.later.contains_key(&row.id)
                // Sub-plans' ops are run by their parent's op.
                || row.parent.is_some()
            {
                continue;
            }
            if matches!(owner::owner_state(&row, now), OwnerState::Alive(_)) {
                continue;
            }
            if let Some((key, holder)) = row
                .lock_key
                .as_ref()
                .and_then(|k| held.get(k).map(|h| (k, *h)))
                && holder != row.id
                && row.cancel.is_none()
            {
                // Its lock is taken: a worker would only wait. It stays queued for now.
                let text = format!("waiting for lock {key} held by op {holder}");
                if row.current_task.as_deref() != Some(text.as_str()) {
                    waiting.push((row.id, text));
                }
                continue;
            }
            let what = if row.status == OpStatus::Queued && row.started_at.is_none() {
                Work::Start
            } else {
                Work::Resume
            };
            if what == Work::Resume {
                match op::snapshot_plan(reader, row.id).map(|p| p.auto_resume) {
                    Ok(true) => {}
                    Ok(false) => {
                        tracing::info!(
                            op = row.id.0,
                            "interrupted, and its plan says `auto_resume: false`: left for a person (`cairn resume`)"
                        );
                        seen.passed.insert(row.id);
                        continue;
                    }
                    Err(e) => {
                        tracing::warn!(op = row.id.0, error = %e, "cannot read its plan; left alone");
                        seen.passed.insert(row.id);
                        continue;
                    }
                }
            }
            // Two ops of one lock key do not both get a worker in one poll.
            if let Some(key) = &row.lock_key {
                held.insert(key.clone(), row.id);
            }
            found.push((row.id, what));
        }
    }
    // Resumes first (they may hold locks that queued ops wait for), then by age.
    found.sort_by_key(|(op, what)| (*what == Work::Start, *op));
    Ok((found, waiting))
}
