//! One op's state machine: [`Scheduler`], whose fields are the run's state and whose methods are
//! its transitions.
//!
//! - A task is *ready* once every task it needs is done (`waiting_on` reaches 0); it is launched
//!   while nothing failed, nothing is fatal, the run is not stopping or draining, and fewer than
//!   the plan's `max_parallel` tasks run. Its end releases its dependents, once each; a failure
//!   (but under `continue_on_error`) stops new launches and lets running tasks end.
//! - A fan-out step is expanded into its items' tasks, launched within its own `max_parallel`,
//!   and gathered once they have all ended (see `fanout`).
//! - The ends of tasks reach the database through the [`Ledger`] (see `task::carry`): a task
//!   never starts before the ends of its needs are durable.
//! - [`TaskState`]: a task as the scheduler keeps it.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;

use plans::model::{Action, Plan, Step};
use plans::template::Context;
use serde_json::{Map, Value};
use store::{Change, EventKind, OpStatus, TaskNo, TaskStatus};
use tokio::sync::watch;
use tokio::task::JoinSet;

use super::rest::{self, Loaded, Rest};
use crate::owner::now;
use crate::progress::Progress;
use crate::task::carry::{Carry, Ledger};
use crate::task::context::{Shared, StopReason};
use crate::task::{self, Fatal, Job, TaskEnd};

/// A task's state as the scheduler keeps it.
#[derive(Debug, Clone)]
pub(crate) struct TaskState {
    pub status: TaskStatus,
    pub attempts: u32,
    /// Attempts before the current retry round (see `store::TaskRow::retry_from`).
    pub retry_from: u32,
    pub outputs: Option<Map<String, Value>>,
    /// The step (or hook) it runs, by index into `Shared::steps`; `None` for a task of a step the
    /// plan no longer has (after `resume --plan`), which is kept as history and never runs.
    pub step: Option<usize>,
    pub name: String,
    /// A fan-out item's value; on a fan-out step's own task, `Some` once expanded (the frozen
    /// list as stored after a take-over; an empty array when this run expanded it, whose list
    /// went to the store: only whether there is one is asked of it).
    pub item: Option<Item>,
    /// Why it failed, as stored when the run started.
    pub error: Option<String>,
    /// Launched by this run (its status in memory changes only when it ends).
    pub launched: bool,
}

/// A fan-out item as the scheduler keeps it: as stored (its JSON text, parsed only when the item
/// runs: a take-over of a million items parses none of those already done), or as this run
/// evaluated it.
#[derive(Debug, Clone)]
pub(crate) enum Item {
    Stored(Box<str>),
    Evaluated(Value),
}

impl Item {
    pub(crate) fn value(&self) -> Value {
        match self {
            // The store wrote it from a value: it parses.
            Self::Stored(text) => serde_json::from_str(text).unwrap_or(Value::Null),
            Self::Evaluated(value) => value.clone(),
        }
    }
}

impl TaskState {
    /// A task not yet stored or not yet run.
    pub(crate) fn new(step: usize, name: String, item: Option<Item>) -> Self {
        Self {
            status: TaskStatus::Pending,
            attempts: 0,
            retry_from: 0,
            outputs: None,
            step: Some(step),
            name,
            item,
            launched: false,
            error: None,
        }
    }

    /// In place of a task number with no row: history that never runs.
    pub(crate) fn gone() -> Self {
        Self {
            step: None,
            ..Self::new(0, String::new(), None)
        }
    }

    /// The op's tasks before anything ran: the steps, then the hooks.
    pub(crate) fn initial(steps: &[Step]) -> Vec<Self> {
        steps
            .iter()
            .enumerate()
            .map(|(i, s)| Self::new(i, s.id.clone(), None))
            .collect()
    }

    /// The op's tasks as stored, in task order, for `steps` (the plan's steps, then its hooks).
    pub(crate) fn load(steps: &[Step], rows: Vec<store::TaskBrief>) -> Vec<Self> {
        let mut tasks = Self::initial(steps);
        tasks.reserve(rows.len().saturating_sub(tasks.len()));
        // The fan-out steps by id: an item finds its step without a scan of the plan.
        let fan_outs: std::collections::HashMap<&str, usize> = steps
            .iter()
            .enumerate()
            .filter(|(_, s)| s.for_each.is_some())
            .map(|(i, s)| (s.id.as_str(), i))
            .collect();
        // The step of the last item read: a fan-out's items are a run of rows sharing their
        // step's id.
        let mut last: Option<(std::sync::Arc<str>, Option<usize>)> = None;
        for row in rows {
            let no = row.task_no.0 as usize;
            let step = if no < steps.len() && *row.step == *steps[no].id {
                Some(no)
            } else if no >= steps.len() && row.item.is_some() {
                // A fan-out item: its step must still fan out.
                match &last {
                    Some((id, step)) if std::sync::Arc::ptr_eq(id, &row.step) => *step,
                    _ => {
                        let step = fan_outs.get(&*row.step).copied();
                        last = Some((row.step.clone(), step));
                        step
                    }
                }
            } else {
                None
            };
            let state = Self {
                status: row.status,
                attempts: row.attempts,
                retry_from: row.retry_from,
                outputs: row.outputs,
                step,
                name: row.name,
                item: row.item.map(Item::Stored),
                error: row.error,
                launched: false,
            };
            if no == tasks.len() {
                tasks.push(state);
                continue;
            }
            if no > tasks.len() {
                tasks.resize_with(no + 1, Self::gone);
            }
            tasks[no] = state;
        }
        tasks
    }

    /// `(prior, retry_from)`: the attempts made, and those before this retry round. A task that
    /// had failed starts a fresh round; one interrupted in the middle of a round (a crash during
    /// a retry delay) goes on with what is left of it.
    pub(crate) fn round(&self) -> (u32, u32) {
        let prior = self.attempts;
        let retry_from = if self.status == TaskStatus::Failed {
            prior
        } else {
            self.retry_from.min(prior)
        };
        (prior, retry_from)
    }

    /// The job that runs this task (task number `no`), if it still belongs to the plan.
    pub(crate) fn job(&self, no: usize) -> Option<Job> {
        Some(Job {
            no,
            step: self.step?,
            name: self.name.clone(),
            item: if self.step == Some(no) {
                None
            } else {
                self.item.as_ref().map(Item::value)
            },
            defer: false,
        })
    }
}

/// Whether a task's end lets its dependents run: kept (succeeded, skipped), or failed under
/// `continue_on_error`.
pub(super) fn satisfied(state: &TaskState, step: &Step) -> bool {
    state.status.is_kept() || (state.status == TaskStatus::Failed && step.continue_on_error)
}

/// Each fan-out step's items (task numbers, in order).
fn items_of(tasks: &[TaskState]) -> BTreeMap<usize, Vec<usize>> {
    let mut items_of: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for (no, t) in tasks.iter().enumerate() {
        if let Some(s) = t.step.filter(|&s| s != no) {
            items_of.entry(s).or_default().push(no);
        }
    }
    items_of
}

/// What a running task's future returns: its task number and its end.
type Joined = (usize, Result<TaskEnd, Fatal>);

/// A task counted in the run's task count from its spawn until it ends (so that a fan-out's items
/// are all counted before the first of them commits anything); it holds the run's context for
/// the task.
pub(super) struct Counted(Arc<Shared>);

impl Counted {
    pub(super) fn new(shared: &Arc<Shared>) -> Self {
        shared.options.tasks.enter();
        Self(shared.clone())
    }

    pub(super) fn shared(&self) -> &Arc<Shared> {
        &self.0
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.options.tasks.leave();
    }
}

/// The state of one op's run (see the module's doc).
pub(crate) struct Scheduler {
    pub(super) shared: Arc<Shared>,
    /// The op's tasks, by task number: the steps, the hooks, then fan-out items.
    pub(super) tasks: Vec<TaskState>,
    /// Per step, how many of its needs are not yet done.
    waiting_on: Vec<usize>,
    /// Steps whose needs are done, in launch order.
    ready: VecDeque<usize>,
    pub(super) running: JoinSet<Joined>,
    /// The tasks running now (steps, items, expansions, gatherings).
    pub(super) in_flight: BTreeSet<usize>,
    /// Whether the op is shown `waiting` (only approval gates are in flight).
    shown_waiting: bool,
    /// Whether the op was parked at its gates: its owner gave it up, the run ends without an
    /// outcome.
    pub(super) parked: bool,
    stop: watch::Receiver<bool>,
    /// The gates that wait for their answer: a run that parks tries again when it changes.
    gate_news: watch::Receiver<BTreeSet<usize>>,
    /// The plan's `max_parallel`.
    pub(super) max: usize,
    /// Fan-outs: each step's items (task numbers, in item order), the ones still to start, how
    /// many run now, and the steps expanded whose own task has not yet gathered its items.
    pub(super) items_of: BTreeMap<usize, Vec<usize>>,
    pub(super) queued: BTreeMap<usize, VecDeque<usize>>,
    pub(super) busy: BTreeMap<usize, usize>,
    pub(super) open: BTreeSet<usize>,
    /// Per fan-out step, the template context its items share (built once per step).
    pub(super) step_contexts: BTreeMap<usize, Context>,
    ledger: Ledger,
    /// The op's tasks still being read (see `rest`): until they are merged, `tasks` holds the
    /// steps, the hooks and the first items to run, and nothing needing every task happens.
    rest: Option<Rest>,
    /// The first task that failed (its name, and the op's error).
    pub(super) first_failure: Option<(String, String)>,
    /// What ended the run: ownership lost, or the store failed.
    pub(super) fatal: Option<Fatal>,
}

impl Scheduler {
    /// The run of `plan`'s tasks as stored; with `decided`, the outcome was decided by an earlier
    /// run and no step runs (only finishing hooks are left). With `answered`, the op goes on after
    /// an answer to its gates (it was parked): a gate that failed (rejected, or no answer in
    /// time) is this run's failure, not asked again.
    pub(crate) fn new(shared: Arc<Shared>, loaded: Loaded, decided: bool, answered: bool) -> Self {
        let Loaded { tasks, rest } = loaded;
        let plan = &shared.plan;
        let answer_failed = |i: usize| {
            answered
                && tasks[i].status == TaskStatus::Failed
                && matches!(plan.steps[i].action, Action::Approve { .. })
        };
        // At the start only kept tasks count as done: every other task, a failed
        // `continue_on_error` one included, runs again, and its dependents wait for that run.
        // A gate's answer that woke the op stands.
        let done = |i: usize| {
            tasks[i].status.is_kept() || (answer_failed(i) && plan.steps[i].continue_on_error)
        };
        let waiting_on: Vec<usize> = plan
            .steps
            .iter()
            .map(|step| step.needs.iter().filter(|&&need| !done(need)).count())
            .collect();
        let ready: VecDeque<usize> = plan
            .dag
            .order()
            .iter()
            .copied()
            .filter(|&i| !decided && waiting_on[i] == 0 && !done(i) && !answer_failed(i))
            .collect();
        let first_failure = (0..plan.steps.len())
            .find(|&i| !decided && answer_failed(i) && !plan.steps[i].continue_on_error)
            .map(|i| {
                let name = tasks[i].name.clone();
                let error = tasks[i].error.clone().unwrap_or_default();
                let why = format!("task `{name}` failed: {error}");
                (name, why)
            });
        let items_of = items_of(&tasks);
        let max = usize::try_from(plan.max_parallel).unwrap_or(usize::MAX);
        let stop = shared.stop_signal().clone();
        let gate_news = shared.gates_waiting();
        Self {
            shared,
            tasks,
            waiting_on,
            ready,
            running: JoinSet::new(),
            in_flight: BTreeSet::new(),
            shown_waiting: false,
            parked: false,
            stop,
            gate_news,
            max,
            items_of,
            queued: BTreeMap::new(),
            busy: BTreeMap::new(),
            open: BTreeSet::new(),
            step_contexts: BTreeMap::new(),
            ledger: Ledger::default(),
            rest,
            first_failure,
            fatal: None,
        }
    }

    /// Whether every task of the op is in `tasks` (none still being read).
    pub(super) fn rest_read(&self) -> bool {
        self.rest.is_none()
    }

    /// Whether new tasks may be launched: nothing failed or is fatal, and the run goes on.
    pub(super) fn launching(&self) -> bool {
        self.fatal.is_none() && self.first_failure.is_none() && self.shared.may_start()
    }

    /// The outputs of the steps `step`'s templates use.
    pub(super) fn outputs_for(&self, step: &Step) -> Vec<(usize, Map<String, Value>)> {
        step.uses
            .iter()
            .filter_map(|&u| self.tasks[u].outputs.clone().map(|o| (u, o)))
            .collect()
    }

    /// A failure that ends the run: kept (the first one), and every running step is stopped.
    pub(super) fn fail_fatally(&mut self, fatal: Fatal) {
        self.fatal.get_or_insert(fatal);
        self.shared.stop_all();
    }

    /// Runs the steps until every task has ended, or the run stops and what runs has ended.
    pub(crate) async fn drive(&mut self) {
        let shared = self.shared.clone();
        let plan = &shared.plan;
        loop {
            self.launch_ready(plan).await;
            self.ledger.flush(&self.shared);
            let launching = self.launching();
            self.launch_items(plan, launching);
            if self.fatal.is_none() {
                self.gather_ended(plan, launching);
            }
            self.show_waiting().await;
            if self.running.is_empty() && !self.rest_read() && self.fatal.is_none() {
                // Nothing runs, and what comes next (more items, a gathering, the outcome)
                // needs every task.
                self.complete().await;
                continue;
            }
            if self.running.is_empty() && (self.open.is_empty() || self.fatal.is_some()) {
                // Every end is durable before the op's outcome is decided and recorded.
                if let Err(f) = self.ledger.wait_all().await {
                    self.fatal.get_or_insert(f);
                }
                return;
            }
            tokio::select! {
                read = rest::arrival(&mut self.rest), if !self.rest_read() => {
                    self.took_rest(read);
                }
                joined = self.running.join_next() => {
                    if let Some(joined) = joined {
                        self.joined(plan, joined);
                    }
                }
                changed = self.stop.changed(), if !*self.stop.borrow() => {
                    if changed.is_ok() {
                        self.say_stopping();
                    }
                }
                // A gate now waits: the op may be shown waiting, or parked (see `show_waiting`).
                _ = self.gate_news.changed(), if !self.parked => {}
            }
        }
    }

    /// Waits for the rest of the op's tasks, if still being read, and merges them.
    pub(super) async fn complete(&mut self) {
        if !self.rest_read() {
            let read = rest::arrival(&mut self.rest).await;
            self.took_rest(read);
        }
    }

    /// Merges the rest of the op's tasks (see `rest`): the items not yet known that are to
    /// run join their open steps' queues, in order, after those of the first part.
    fn took_rest(&mut self, read: (Vec<usize>, Result<Vec<TaskState>, store::Error>)) {
        self.rest = None;
        let (first, all) = read;
        let all = match all {
            Ok(all) => all,
            Err(e) => {
                self.fail_fatally(Fatal::from(e));
                return;
            }
        };
        rest::merge(&mut self.tasks, &first, all);
        self.items_of = items_of(&self.tasks);
        let first: std::collections::HashSet<usize> = first.into_iter().collect();
        for (s, queue) in &mut self.queued {
            let new = self.items_of.get(s).into_iter().flatten().copied();
            queue.extend(new.filter(|no| !first.contains(no) && !self.tasks[*no].status.is_kept()));
        }
    }

    /// Launches ready steps while launches are allowed.
    async fn launch_ready(&mut self, plan: &Plan) {
        while self.launching() && self.running.len() < self.max {
            let Some(i) = self.ready.pop_front() else {
                break;
            };
            let step = &plan.steps[i];
            // The ends this task needs are durable before it starts: the one just joined is
            // carried by its first commit (or recorded on its own first), others are waited for.
            let released = self
                .ledger
                .release(&self.shared, &step.needs, step.for_each.is_some())
                .await;
            let carry = match released {
                Ok(carry) => carry,
                Err(f) => {
                    self.fail_fatally(f);
                    break;
                }
            };
            let outputs = self.outputs_for(step);
            if step.for_each.is_some() && self.tasks[i].item.is_none() {
                // Expanding numbers and names its items after every task: all of them read.
                self.complete().await;
                if !self.launching() {
                    // The read failed (or the run stops meanwhile): nothing is expanded.
                    self.ready.push_front(i);
                    break;
                }
            }
            let Some(job) = self.tasks[i].job(i) else {
                continue;
            };
            if step.for_each.is_some() && self.fan_out(plan, i, &job, &outputs) {
                continue;
            }
            self.launch_step(plan, job, &outputs, carry);
        }
    }

    /// Launches step task `job` (not a fan-out's expansion), carrying `carry`.
    fn launch_step(
        &mut self,
        plan: &Plan,
        mut job: Job,
        outputs: &[(usize, Map<String, Value>)],
        carry: Carry,
    ) {
        let i = job.no;
        let step = &plan.steps[i];
        let (prior, retry_from) = self.tasks[i].round();
        self.in_flight.insert(i);
        self.tasks[i].launched = true;
        // A `noop` chain's step has nothing to render: no context to build, clone and drop.
        let ctx = if step.when.is_some() || step.action.renders() {
            self.shared.context(step, outputs)
        } else {
            Context::new()
        };
        // Its end may wait for a task it releases to carry it, if anything needs it.
        job.defer = !plan.dag.dependents(i).is_empty();
        let counted = Counted::new(&self.shared);
        self.running.spawn(async move {
            let shared = counted.shared();
            let stop = shared.stop_signal().clone();
            let mut carry = carry;
            let end = task::run(shared, &job, (prior, retry_from), ctx, &stop, &mut carry).await;
            // A task that ended before its first commit still records what it carried.
            let carried = carry.flush(shared).await;
            (i, end.and_then(|end| carried.map(|()| end)))
        });
    }

    /// A task's future returned: its end is taken in, its dependents released.
    fn joined(&mut self, plan: &Plan, joined: Result<Joined, tokio::task::JoinError>) {
        let (i, result) = match joined {
            Ok(r) => r,
            Err(e) => {
                self.fail_fatally(Fatal::Store(format!("a task panicked: {e}")));
                return;
            }
        };
        self.in_flight.remove(&i);
        let result = match result {
            Ok(TaskEnd::Unrecorded {
                status,
                outputs,
                error,
                record,
            }) => {
                self.ledger.hold(i, record);
                Ok(TaskEnd::Done {
                    status,
                    outputs,
                    error,
                })
            }
            other => other,
        };
        let step_of = self.tasks[i].step.unwrap_or(i);
        let item = step_of != i;
        if item && let Some(count) = self.busy.get_mut(&step_of) {
            *count = count.saturating_sub(1);
        }
        match result {
            Ok(TaskEnd::Expanded) => {
                self.open.insert(i);
            }
            Ok(TaskEnd::Done {
                status,
                outputs,
                error,
            }) => self.done(plan, i, item, status, outputs, error),
            Ok(TaskEnd::Interrupted) => {}
            Ok(TaskEnd::Unrecorded { .. }) => unreachable!("held by the ledger above"),
            Err(f) => {
                if let Fatal::Lost(why) = &f {
                    self.shared.mark_lost(why);
                }
                self.fatal.get_or_insert(f);
            }
        }
        if self.fatal.is_some() && !self.shared.stopping() {
            // Nothing more can be recorded: end the running steps now.
            self.shared.stop_all();
        }
        if self.first_failure.is_some() || self.fatal.is_some() {
            // Approval gates still waiting can no longer lead anywhere.
            self.shared.close_gates();
        }
    }

    /// Task `i` ended `status`: a failure is kept (but under `continue_on_error`); a step's end
    /// that lets its dependents run releases each of them, once.
    fn done(
        &mut self,
        plan: &Plan,
        i: usize,
        item: bool,
        status: TaskStatus,
        outputs: Option<Map<String, Value>>,
        error: Option<String>,
    ) {
        self.tasks[i].status = status;
        self.tasks[i].outputs = outputs;
        let step = &plan.steps[self.tasks[i].step.unwrap_or(i)];
        if status == TaskStatus::Failed && !step.continue_on_error {
            self.first_failure.get_or_insert_with(|| {
                let name = &self.tasks[i].name;
                (
                    name.clone(),
                    format!("task `{name}` failed: {}", error.unwrap_or_default()),
                )
            });
        } else if !item && satisfied(&self.tasks[i], step) {
            for &d in plan.dag.dependents(i) {
                self.waiting_on[d] = self.waiting_on[d]
                    .checked_sub(1)
                    .expect("a task is released by each of its needs once");
                // A dependent kept from an earlier run is not run again.
                if self.waiting_on[d] == 0 && !self.tasks[d].status.is_kept() {
                    self.ready.push_back(d);
                }
            }
        }
    }

    /// The op is `waiting` while approval gates are all that is in flight: said when that changes.
    /// Under `cairn serve` (`Options::park`) the op is parked then, when nothing else can start.
    async fn show_waiting(&mut self) {
        // Gates that have recorded themselves waiting (and whose own `timeout` has not passed),
        // with no item of the op still being read (see `rest`).
        let only_gates = {
            let waiting = self.gate_news.borrow();
            self.rest_read()
                && !self.in_flight.is_empty()
                && self.in_flight.iter().all(|i| waiting.contains(i))
        };
        if self.parked || self.fatal.is_some() || self.shared.stopping() {
            return;
        }
        if only_gates && self.may_park() {
            self.park().await;
            return;
        }
        if only_gates == self.shown_waiting {
            return;
        }
        let shared = self.shared.clone();
        let (status, kind, message) = if only_gates {
            (
                OpStatus::Waiting,
                EventKind::OpWaiting,
                "waiting for approval",
            )
        } else {
            (OpStatus::Running, EventKind::OpRunning, "running")
        };
        let change = Change::SetOp {
            op: shared.op,
            owner: Some(shared.me.clone()),
            status,
            at: now(),
            error: None,
            release: false,
            interrupted_by: None,
            kind,
            message: message.to_owned(),
        };
        match shared.apply(vec![change]).await {
            Ok(()) => {
                self.shown_waiting = only_gates;
                // The op's own `timeout` does not run while only gates wait.
                shared.set_at_gates(only_gates);
            }
            Err(f) => self.fail_fatally(f),
        }
    }

    /// Whether the op may be parked now that only gates are in flight: its owner parks ops (it is
    /// `cairn serve`), the op is not a sub-plan's (its parent's task runs it), nothing else is
    /// ready and nothing failed.
    fn may_park(&self) -> bool {
        self.shared.options.park
            && self.shared.ancestors.is_empty()
            && self.launching()
            && self.ready.is_empty()
            && self.queued.values().all(VecDeque::is_empty)
            && self.rest_read()
    }

    /// Gives the op up until an answer comes: every end is made durable, then one commit records
    /// the op `waiting` with no owner (its lock stays its own). The gates leave the run still
    /// waiting, and the run ends without an outcome. An answer that came first keeps the run on.
    async fn park(&mut self) {
        if let Err(f) = self.ledger.wait_all().await {
            self.fail_fatally(f);
            return;
        }
        let shared = self.shared.clone();
        let gates: Vec<TaskNo> = self
            .in_flight
            .iter()
            .map(|&i| TaskNo(u32::try_from(i).unwrap_or(u32::MAX)))
            .collect();
        let names: Vec<String> = self
            .in_flight
            .iter()
            .map(|&i| format!("`{}`", self.tasks[i].name))
            .collect();
        let change = Change::Park {
            op: shared.op,
            owner: shared.me.clone(),
            gates,
            at: now(),
            message: format!(
                "waiting for approval of {}; no process holds the op until an answer comes",
                names.join(", ")
            ),
        };
        if shared.is_lost() {
            return;
        }
        match shared.store.apply(vec![change]).await {
            Ok(_) => {
                self.parked = true;
                shared.park_gates();
                shared.say(&Progress::Parked {
                    op: shared.op,
                    gates: names,
                });
            }
            // A gate was answered first: the run goes on, and sees the answer.
            Err(store::Error::Conflict { .. }) => {}
            Err(e) => {
                let f = Fatal::from(e);
                if let Fatal::Lost(why) = &f {
                    shared.mark_lost(why);
                }
                self.fail_fatally(f);
            }
        }
    }

    /// Says why the run stops.
    fn say_stopping(&self) {
        let shared = &self.shared;
        let reason = match shared.stop_reason() {
            _ if shared.is_lost() => shared.lost_why(),
            Some(StopReason::Cancel(by)) => format!("canceled by {by}"),
            Some(StopReason::Timeout(why)) => why,
            None => "asked to stop".to_owned(),
        };
        shared.say(&Progress::Stopping { reason });
    }
}
