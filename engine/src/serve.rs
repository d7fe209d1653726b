//! `cairn serve`: runs the ops that wait for it. Every `poll` it fires the schedules that are due
//! (`crate::schedule`), then looks for
//! - queued ops nobody owns (or whose owner is gone), oldest first: it starts them;
//! - ops whose owner is gone (killed, its machine rebooted) or that a serving process drained or
//!   released (`interrupted_by`: `shutdown`, `released`), of plans with `auto_resume: true`: it
//!   resumes them, as an event `auto-resumed` says; never an op a signal to the process that ran
//!   it stopped (Ctrl-C, SIGTERM to a `cairn run`: `signal`), which waits for `cairn resume`;
//! - ops it parked at their approval gates (`waiting`, unowned: a run whose only tasks in flight
//!   are gates gives its op up, `Options::park`) once an answer queued them again, or once a
//!   gate's own `timeout` passed: it goes on with them from the gate;
//!
//! and runs up to `workers` at once. Queued ops are reserved for this process before it gives them
//! workers (`Change::Reserve`), so that several `serve` processes looking at once take different
//! ops; resumes go through the claim alone. It records itself as a serving node (a heartbeat
//! every `options.heartbeat`, with a lease of `options.lease`, which is also the lease of every op
//! it runs; `cairn nodes` lists the live ones), and between polls waits for the store to say that
//! something changed (PostgreSQL) or for the poll interval (SQLite). An op whose lock another op holds is left for a later poll
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

use store::{Applied, Change, EventKind, OpId, OpStatus, ProcessId, Store};
use tokio::task::JoinSet;

use crate::op::{self, Error, Overrides};
use crate::options::Options;
use crate::outcome::RunEnd;
use crate::owner::{self, OwnerState, Rule};
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
    /// An op parked at its approval gates goes on: a gate was answered (the op is queued
    /// again), or a gate's own `timeout` passed.
    Wake,
}

/// How long an op refused for a passing reason waits before it is tried again.
const RETRY_AFTER: Duration = Duration::from_secs(30);

/// The ops this process runs, and how to reach each.
#[derive(Default)]
struct Workers {
    running: JoinSet<(OpId, Result<RunEnd, Error>)>,
    tasks: HashMap<tokio::task::Id, OpId>,
    handles: BTreeMap<OpId, StopHandle>,
    /// The serve's own stop: each op's handle is [`StopHandle::beneath`] it, so that a second
    /// signal hurries their steps.
    under: StopHandle,
}

impl Workers {
    fn len(&self) -> usize {
        self.running.len()
    }

    fn is_empty(&self) -> bool {
        self.running.is_empty()
    }

    /// Starts a worker that starts or resumes `op`.
    fn spawn(&mut self, store: &Store, config: &Config, sink: Sink, op: OpId, what: Work) {
        let handle = self.under.beneath();
        self.handles.insert(op, handle.clone());
        let store = store.clone();
        let options = config.options.clone();
        tracing::info!(
            op = op.0,
            "{}",
            if what == Work::Start {
                "starting"
            } else {
                "resuming"
            }
        );
        let task = self
            .running
            .spawn(async move { (op, run_one(&store, op, what, options, sink, handle).await) });
        self.tasks.insert(task.id(), op);
    }

    /// The next worker to end: its op and how its run ended (`None` when none runs).
    async fn next(&mut self) -> Option<(OpId, Result<RunEnd, Error>)> {
        loop {
            let (op, end) = match self.running.join_next_with_id().await? {
                Ok((id, (op, end))) => {
                    self.tasks.remove(&id);
                    (op, end)
                }
                Err(e) => {
                    // A worker panicked: its op is released for the next poll (or server).
                    let Some(op) = self.tasks.remove(&e.id()) else {
                        continue;
                    };
                    (op, Err(Error::Refused(format!("its worker failed: {e}"))))
                }
            };
            self.handles.remove(&op);
            return Some((op, end));
        }
    }
}

/// Runs ops until `stop` is set (or, with `once`, until nothing is left). `progress` gives each
/// op's sink. The process records itself as a serving node for as long as it serves
/// ([`Node`]); `config.options.lease` is both its own lease and the lease of every op it runs.
pub async fn serve(
    store: &Store,
    mut config: Config,
    progress: Arc<dyn Fn(OpId) -> Sink + Send + Sync>,
    stop: StopHandle,
) -> Result<(), Error> {
    // An op waiting only for approvals holds no worker: it is parked until an answer comes.
    config.options.park = true;
    let mut stopped = stop.subscribe();
    let mut workers = Workers {
        under: stop.clone(),
        ..Workers::default()
    };
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
    let node = Node::start(store, &me, &config).await;
    tracing::info!(workers = config.workers, "serving");
    loop {
        if *stopped.borrow() {
            break;
        }
        seen.later.retain(|_, at| *at > Instant::now());
        if !seen.to_release.is_empty() {
            release(store, &me, &mut seen).await;
        }
        // A database error here (locked for longer than the busy timeout, a full disk) is said,
        // and the next poll tries again: the running ops go on.
        let found = match poll(
            store,
            &config,
            (schedule_now(), window),
            &workers.handles,
            &mut seen,
            workers.len(),
        )
        .await
        {
            Ok(found) => found,
            Err(e) => {
                tracing::warn!(error = %e, "cannot look for work; trying again");
                Vec::new()
            }
        };
        let free = config.workers.saturating_sub(workers.len());
        for (op, what) in choose(store, &me, &config, found, free).await {
            workers.spawn(store, &config, progress(op), op, what);
        }
        if config.once && workers.is_empty() {
            // Nothing was found and nothing runs: drained.
            tracing::info!("nothing left to do");
            break;
        }
        tokio::select! {
            Some((op, end)) = workers.next(), if !workers.is_empty() => {
                ended(store, &me, op, end, &mut seen).await;
            }
            // SQLite: the poll interval; PostgreSQL: sooner, when another process commits
            // something that gives this node work.
            () = store.wait_for_change(config.poll) => {}
            _ = stopped.changed() => {}
        }
    }
    drain(store, &config, &me, &mut workers, &mut seen).await;
    node.stop(store).await;
    tracing::info!("stopped");
    Ok(())
}

/// Stopping: no task starts any more; running steps get the grace period to finish. Those still
/// running then are stopped as `cairn run` stops them (TERM, KILL after the grace period). Every
/// op is released, for the next server.
async fn drain(
    store: &Store,
    config: &Config,
    me: &ProcessId,
    workers: &mut Workers,
    seen: &mut Seen,
) {
    if !workers.is_empty() {
        tracing::info!(
            ops = workers.len(),
            "draining: running steps get {} to finish",
            plans::units::format_duration(config.options.grace)
        );
        config.options.drain.drain();
        let deadline = tokio::time::sleep(config.options.grace);
        tokio::pin!(deadline);
        // A second signal ends the drain's grace too.
        let hurried = workers.under.hurried();
        tokio::pin!(hurried);
        loop {
            tokio::select! {
                next = workers.next() => match next {
                    Some((op, end)) => ended(store, me, op, end, seen).await,
                    None => break,
                },
                () = &mut deadline => break,
                () = &mut hurried => break,
            }
        }
    }
    if !workers.is_empty() {
        tracing::info!(ops = workers.len(), "stopping the steps still running");
    }
    for handle in workers.handles.values() {
        handle.stop();
    }
    while let Some((op, end)) = workers.next().await {
        ended(store, me, op, end, seen).await;
    }
}

/// This process as a serving node in the store: recorded when it starts, renewed every heartbeat
/// period with a lease of `options.lease` (what `cairn nodes` lists), deleted when it stops
/// cleanly. A node killed leaves its row until its lease runs out.
struct Node {
    id: ProcessId,
    beat: tokio::task::JoinHandle<()>,
}

impl Node {
    async fn start(store: &Store, me: &ProcessId, config: &Config) -> Self {
        let workers = u32::try_from(config.workers).unwrap_or(u32::MAX);
        let started_at = owner::now();
        let lease = config.options.lease;
        let every = config.options.heartbeat;
        let beat = move |store: Store, me: ProcessId| async move {
            let at = owner::now();
            let change = Change::NodeBeat {
                node: me,
                workers,
                started_at,
                at,
                lease_until: at + millis(lease),
            };
            if let Err(e) = store.apply(vec![change]).await {
                tracing::warn!(error = %e, "cannot record this node's heartbeat; trying again");
            }
        };
        beat(store.clone(), me.clone()).await;
        let (store, id) = (store.clone(), me.clone());
        let beat = tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                beat(store.clone(), id.clone()).await;
            }
        });
        Self {
            id: me.clone(),
            beat,
        }
    }

    /// The node stops cleanly: no more heartbeats, and its row goes at once.
    async fn stop(self, store: &Store) {
        self.beat.abort();
        let _ = self.beat.await;
        if let Err(e) = store
            .apply(vec![Change::NodeGone {
                node: self.id.clone(),
            }])
            .await
        {
            tracing::warn!(error = %e, "cannot remove this node's record; it goes once its lease runs out");
        }
    }
}

/// A duration in milliseconds, as the store counts them.
fn millis(d: Duration) -> store::Millis {
    store::Millis::try_from(d.as_millis()).unwrap_or(store::Millis::MAX)
}

/// Of what a poll `found`, what this node runs now, at most `free`: resumes first (each taken by
/// its own claim), then the queued ops never started that it could reserve (`Change::Reserve`):
/// nodes looking at the queue at once reserve different ops, where claiming the same ones would
/// leave all but one of them idle until the next poll.
async fn choose(
    store: &Store,
    me: &ProcessId,
    config: &Config,
    found: Vec<(OpId, Work)>,
    free: usize,
) -> Vec<(OpId, Work)> {
    let (resumes, starts): (Vec<_>, Vec<_>) = found
        .into_iter()
        .partition(|(_, what)| *what != Work::Start);
    let mut chosen: Vec<(OpId, Work)> = resumes.into_iter().take(free).collect();
    let left = free - chosen.len();
    if left == 0 || starts.is_empty() {
        return chosen;
    }
    let now = owner::now();
    let reserve = Change::Reserve {
        owner: me.clone(),
        lease_until: now + millis(config.options.lease),
        now,
        candidates: starts.iter().map(|(op, _)| *op).collect(),
        limit: u32::try_from(left).unwrap_or(u32::MAX),
    };
    match store.apply(vec![reserve]).await {
        Ok(applied) => {
            for reserved in applied {
                if let Applied::Reserved(ops) = reserved {
                    chosen.extend(ops.into_iter().map(|op| (op, Work::Start)));
                }
            }
        }
        Err(e) => tracing::warn!(error = %e, "cannot reserve queued ops; trying again"),
    }
    chosen
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
        Work::Wake => (
            EventKind::AutoResumed,
            "taken by cairn serve to go on after its approval gates",
        ),
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
    op::resume_as(takeover, op, op::Edits::default()).await
}

/// What `serve` remembers between polls: of ops, of the pause, of firings it could not fire.
#[derive(Debug, Default)]
struct Seen {
    /// Ops this process leaves alone (`auto_resume` off, cannot run).
    passed: HashSet<OpId>,
    /// Ops a person stopped, that this process said it leaves alone.
    stopped: HashSet<OpId>,
    /// Ops refused for a passing reason, and when to try them again.
    later: HashMap<OpId, Instant>,
    /// Whether the pause was said (once per pause).
    said_paused: bool,
    /// The schedules' firings this process could not fire, said once each.
    misfires: crate::schedule::Misfires,
    /// Ops this process owns and could not carry on, with why: to release.
    to_release: HashMap<OpId, String>,
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
    let pauses = store.reader()?.pauses(owner::now())?;
    if let Some(pause) = pauses.iter().find(|p| p.scope.is_global()) {
        if !seen.said_paused {
            tracing::info!(by = %pause.by, "cairn is paused: no op starts and no schedule fires until `cairn unpause`");
            seen.said_paused = true;
        }
        return Ok(Vec::new());
    }
    seen.said_paused = false;
    let rule = Rule::of(store.location());
    crate::schedule::fire_due(store, rule, now, window, &mut seen.misfires).await?;
    if busy >= config.workers {
        return Ok(Vec::new());
    }
    let (found, waiting) = work(&store.reader()?, rule, running, seen, &pauses)?;
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

/// Says how an op this process ran ended; one it could not carry on is to be released.
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
            e
        }
        Ok(RunEnd::Parked) => {
            tracing::info!(op = op.0, "waiting for approval; its worker is free");
            return;
        }
        Ok(RunEnd::LostOwnership(why)) => {
            // Its steps were ended and nothing more was written for it; the other ops go on.
            // When the lease ran out (the database locked or cut off) and no other process took
            // the op, it is still this process's: released below, or nobody could take it.
            tracing::warn!(op = op.0, "lost the op: {why}");
            why
        }
        Ok(end) => {
            tracing::info!(op = op.0, status = %end.status(), "op ended");
            return;
        }
        Err(Error::Owned { .. }) => {
            tracing::debug!(op = op.0, "another process took it first");
            return;
        }
        Err(
            e @ (Error::Final { .. } | Error::UnknownOp(_) | Error::Snapshot(_) | Error::Secret(_)),
        ) => {
            tracing::warn!(op = op.0, error = %e, "cannot run it; left alone");
            seen.passed.insert(op);
            e.to_string()
        }
        Err(e) => {
            tracing::info!(op = op.0, "not now ({e}); trying again later");
            seen.later.insert(op, Instant::now() + RETRY_AFTER);
            e.to_string()
        }
    };
    seen.to_release.insert(op, failure);
    release(store, me, seen).await;
}

/// Lets go of the ops this process took and could not carry on: nobody else could take one
/// while this (live) process owned it. Fenced: only an op it still owns. One the database does
/// not let it release yet (locked, cut off) is tried again at the next poll.
async fn release(store: &Store, me: &store::ProcessId, seen: &mut Seen) {
    for (op, why) in std::mem::take(&mut seen.to_release) {
        if !release_one(store, me, op, &why).await {
            seen.to_release.insert(op, why);
        }
    }
}

/// Releases `op` if this process still owns it: `false` when the database does not let it yet.
async fn release_one(store: &Store, me: &store::ProcessId, op: OpId, why: &str) -> bool {
    let row = match store.reader().and_then(|r| r.op_head(op)) {
        Ok(row) => row,
        Err(e) => return !(e.is_transient() || e.kind() == store::ErrorKind::Closed),
    };
    if row.owner.as_ref() != Some(me) {
        return true;
    }
    let status = if row.started_at.is_none() {
        OpStatus::Queued
    } else {
        OpStatus::Interrupted
    };
    let released = store
        .apply(vec![Change::SetOp {
            op,
            owner: Some(me.clone()),
            status,
            at: owner::now(),
            error: Some(why.to_owned()),
            release: true,
            interrupted_by: Some(store::Interruption::Released),
            kind: EventKind::OpReleased,
            message: format!("released by cairn serve: {why}"),
        }])
        .await;
    match released {
        Err(e) if e.is_transient() => {
            tracing::info!(op = op.0, error = %e, "cannot release it yet; trying again");
            false
        }
        _ => true,
    }
}

/// Whether a gate of a parked op has waited past its own `timeout` (or none waits any more).
fn gate_due(reader: &store::Reader, row: &store::OpRow, now: store::Millis) -> bool {
    let Ok(tasks) = reader.tasks(row.id) else {
        return false;
    };
    let waiting: Vec<_> = tasks
        .iter()
        .filter(|t| t.status == store::TaskStatus::Waiting)
        .collect();
    if waiting.is_empty() {
        return true;
    }
    let Ok(plan) = op::snapshot_plan(reader, row.id) else {
        return false;
    };
    waiting.iter().any(|t| {
        let limit = plan
            .steps
            .iter()
            .find(|s| s.id == t.step)
            .and_then(|s| s.timeout);
        match (limit, t.started_at) {
            (Some(limit), Some(since)) => since.saturating_add(millis(limit)) <= now,
            _ => false,
        }
    })
}

/// The ops a poll found: those to start or resume now, and those that wait for a lock with what
/// their `CUR_TASK` should say.
type Found = (Vec<(OpId, Work)>, Vec<(OpId, String)>);

/// The ops to start or resume now, oldest first; ops whose lock another op holds wait (with what
/// their `CUR_TASK` should say, when it does not say it yet).
fn work(
    reader: &store::Reader,
    rule: Rule,
    running: &BTreeMap<OpId, StopHandle>,
    seen: &mut Seen,
    pauses: &[store::Pause],
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
            before: None,
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
            if matches!(rule.owner_state(&row, now), OwnerState::Alive(_)) {
                continue;
            }
            // A person stopped it (Ctrl-C in a terminal, a SIGTERM to `cairn run`): it waits
            // for `cairn resume` (or a cancel), whoever serves.
            if row.status == OpStatus::Interrupted
                && row.interrupted_by.is_some_and(|by| !by.resumes_by_itself())
            {
                if seen.stopped.insert(row.id) {
                    tracing::info!(
                        op = row.id.0,
                        "interrupted by a signal to the process that ran it: left for a person (`cairn resume`)"
                    );
                }
                continue;
            }
            // Parked at its gates: left alone until an answer queues it again, unless a gate's
            // own `timeout` passed (the woken run fails it). `cairn cancel` cancels it itself.
            let parked = row.status == OpStatus::Waiting && row.owner.is_none();
            if parked && (row.cancel.is_some() || !gate_due(reader, &row, now)) {
                continue;
            }
            // A scoped pause (`cairn pause --plan`, `--key`) holds it where it is.
            if row.cancel.is_none()
                && let Some(pause) = pauses
                    .iter()
                    .find(|p| p.scope.holds(&row.plan, row.lock_key.as_deref()))
            {
                let text = op::pause_note(pause);
                if row.current_task.as_deref() != Some(text.as_str()) {
                    waiting.push((row.id, text));
                }
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
            let what = match (row.status, row.started_at) {
                (OpStatus::Queued, None) => Work::Start,
                // Queued after it started: a gate's answer woke it.
                (OpStatus::Queued, Some(_)) => Work::Wake,
                _ if parked => Work::Wake,
                _ => Work::Resume,
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
