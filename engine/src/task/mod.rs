//! The task layer: one task of a run, from its `when` to its recorded end, one file per step kind.
//!
//! - [`run`]: dispatch by the step's action, after its `when`.
//! - [`noop`], [`sleep`], [`approval`], [`process`] (`run`/`exec` and their `check`),
//!   [`sql`] (statements on a database server), [`subplan`] (a child op, through the [`subplan::Children`] interface the op layer provides).
//! - [`attempts`]: the one attempt/retry loop of process and sub-plan tasks.
//! - [`finish`]: recording an attempt's end ([`Ended`]) as the task's ([`TaskEnd`]).
//! - [`context`] (what the tasks of a run share), [`carry`] (the commit-carrying protocol),
//!   [`files`] (output files, param files, a process's environment), [`logs`] (log writer,
//!   secret masking).
//!
//! This layer names neither the run nor the op layer.

pub(crate) mod approval;
pub(crate) mod attempts;
pub(crate) mod carry;
pub(crate) mod context;
pub(crate) mod files;
pub(crate) mod logs;
pub(crate) mod noop;
pub(crate) mod process;
pub(crate) mod sleep;
pub(crate) mod sql;
pub(crate) mod subplan;

use std::time::{Duration, Instant};

use plans::model::Action;
use plans::template::Context;
use serde_json::{Map, Value};
use store::{
    AttemptStatus, Change, Error as StoreError, Outcome as TaskOutcome, TaskNo, TaskStatus,
};
use tokio::sync::watch;

use crate::outcome::RunEnd;
use crate::owner::now;
use crate::progress::Progress;
use carry::{Carry, Record};
use context::{Shared, StopReason};

/// What a task ended as, as the scheduler needs it: the task layer's one end type.
#[derive(Debug)]
pub(crate) enum TaskEnd {
    Done {
        status: TaskStatus,
        outputs: Option<Map<String, Value>>,
        error: Option<String>,
    },
    Interrupted,
    /// A fan-out step's list was expanded into its items' tasks.
    Expanded,
    /// Ended, but not yet recorded: the run loop records it, if it can together with the first
    /// commit of a task it releases (see [`carry`]). Only a job with `defer` ends this way.
    Unrecorded {
        status: TaskStatus,
        outputs: Option<Map<String, Value>>,
        error: Option<String>,
        record: Box<Record>,
    },
}

/// How one attempt ended, before it is recorded: the attempt's one end type.
#[derive(Debug)]
pub(crate) enum Ended {
    /// With its outputs; `true` when its `check` found the work done.
    Succeeded(Map<String, Value>, bool),
    Failed {
        error: String,
        exit_code: Option<i32>,
        /// Whether the step's `retry` may try again (not after a cancel by hand, or a failure
        /// before the process had a say).
        retryable: bool,
    },
    Interrupted,
}

/// What one task runs: a step (or hook), or one item of a fan-out step.
#[derive(Debug, Clone)]
pub(crate) struct Job {
    /// The task number.
    pub no: usize,
    /// The step, by index into `Shared::steps`.
    pub step: usize,
    /// `restore[shard-3]`, or the step's id.
    pub name: String,
    /// The fan-out item, for an item's task.
    pub item: Option<Value>,
    /// Whether its final end may be left to the run loop to record ([`TaskEnd::Unrecorded`]).
    pub defer: bool,
}

impl Job {
    pub(crate) fn task(&self) -> TaskNo {
        TaskNo(u32::try_from(self.no).unwrap_or(u32::MAX))
    }
}

/// Failures that end the run, not just a task.
#[derive(Debug)]
pub(crate) enum Fatal {
    Lost(String),
    Store(String),
}

impl From<StoreError> for Fatal {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Owned { .. } => Self::Lost(format!("another process owns the op: {e}")),
            StoreError::Fenced { .. } | StoreError::NotFound(_) => Self::Lost(e.to_string()),
            other => Self::Store(other.to_string()),
        }
    }
}

impl Fatal {
    pub(crate) fn into_end(self) -> RunEnd {
        match self {
            Self::Lost(m) => RunEnd::LostOwnership(m),
            Self::Store(m) => RunEnd::StoreFailed(m),
        }
    }
}

/// Runs a task: its `when` (a step's; a fan-out item's was its step's), then attempts until one
/// succeeds, retries run out, or the run stops. `carry` is the end of a task this one was released
/// by (see [`carry`]): a process or `noop` step's first commit carries it; any other task records
/// it first, before it does anything.
pub(crate) async fn run(
    shared: &Shared,
    job: &Job,
    (prior, retry_from): (u32, u32),
    mut ctx: Context,
    stop: &watch::Receiver<bool>,
    carry: &mut Carry,
) -> Result<TaskEnd, Fatal> {
    let step = shared.step(job.step);
    if let Some(item) = &job.item {
        ctx.item(item);
    }
    if !matches!(
        step.action,
        Action::Run { .. } | Action::Exec { .. } | Action::Noop | Action::Sql(_)
    ) {
        carry.flush(shared).await?;
    }
    if job.item.is_none()
        && step.when.is_some()
        && let Some(end) = when(shared, job, prior, &ctx, carry).await?
    {
        return Ok(end);
    }
    let started = Instant::now();
    let end = match &step.action {
        Action::Noop => noop::run(shared, job, prior + 1, started, carry).await,
        Action::Sleep(duration) => sleep::run(shared, job, prior + 1, *duration, stop).await,
        // Boxed, as the other long arms: a task's future is as large as its largest arm, and a
        // fan-out of 10,000 `noop` items would otherwise allocate and move 10,000 of those.
        Action::Run { .. } | Action::Exec { .. } => {
            Box::pin(process::run(
                shared,
                job,
                (prior, retry_from),
                &ctx,
                started,
                stop,
                carry,
            ))
            .await
        }
        Action::Approve { prompt } => match render_public(&ctx, "`approve`", USE_ENV, |c| {
            prompt.render(c).map_err(|e| e.to_string())
        }) {
            Ok(prompt) => Box::pin(approval::run(shared, job, &prompt, stop)).await,
            Err(e) => {
                let error = format!("cannot render `approve`: {e}");
                fail_before_start(shared, job, prior + 1, error).await
            }
        },
        Action::Sql(_) => {
            Box::pin(sql::run(
                shared,
                job,
                (prior, retry_from),
                &ctx,
                started,
                stop,
                carry,
            ))
            .await
        }
        Action::Plan { .. } => {
            Box::pin(subplan::run(
                shared,
                job,
                (prior, retry_from),
                &ctx,
                started,
                stop,
            ))
            .await
        }
    };
    shared
        .options
        .metrics
        .task_ended(&step.action, started.elapsed());
    end
}

/// A step's `when`: `None` when the task is to run, else its end (skipped, or failed when `when`
/// cannot be evaluated).
async fn when(
    shared: &Shared,
    job: &Job,
    prior: u32,
    ctx: &Context,
    carry: &mut Carry,
) -> Result<Option<TaskEnd>, Fatal> {
    let Some(when) = &shared.step(job.step).when else {
        return Ok(None);
    };
    match when.is_true(ctx) {
        Ok(true) => Ok(None),
        Ok(false) => {
            carry.flush(shared).await?;
            shared
                .apply(vec![Change::SetTask {
                    op: shared.op,
                    owner: shared.me.clone(),
                    task: job.task(),
                    status: TaskStatus::Skipped,
                    at: now(),
                    message: format!("skipped: `when: {}` is false", when.source().trim()),
                }])
                .await?;
            shared.say(&Progress::TaskSkipped {
                task: job.name.clone(),
            });
            Ok(Some(TaskEnd::Done {
                status: TaskStatus::Skipped,
                outputs: None,
                error: None,
            }))
        }
        Err(e) => {
            carry.flush(shared).await?;
            let error = format!("cannot evaluate `when`: {e}");
            fail_before_start(shared, job, prior + 1, error)
                .await
                .map(Some)
        }
    }
}

/// Records an attempt that starts and ends at once (a `noop`, a render error): one commit, which
/// also holds what `carry` holds.
async fn whole_attempt(
    shared: &Shared,
    job: &Job,
    n: u32,
    outcome: TaskOutcome,
    carry: &mut Carry,
) -> Result<(), Fatal> {
    let task = job.task();
    let at = now();
    let owner = shared.me.clone();
    carry
        .commit(
            shared,
            vec![Change::WholeAttempt {
                op: shared.op,
                owner,
                task,
                n,
                retry_from: n - 1,
                at,
                outcome,
            }],
        )
        .await
}

/// Records a task that ends without running a process (a render error): one attempt, failed.
pub(crate) async fn fail_before_start(
    shared: &Shared,
    job: &Job,
    n: u32,
    error: String,
) -> Result<TaskEnd, Fatal> {
    let outcome = TaskOutcome {
        task: TaskStatus::Failed,
        attempt: AttemptStatus::Failed,
        exit_code: None,
        error: Some(error.clone()),
        outputs: None,
        by_check: false,
    };
    whole_attempt(shared, job, n, outcome, &mut Carry::none()).await?;
    shared.say(&Progress::TaskFailed {
        task: job.name.clone(),
        error: error.clone(),
        retry_in: None,
    });
    Ok(TaskEnd::Done {
        status: TaskStatus::Failed,
        outputs: None,
        error: Some(error),
    })
}

/// Attempt `n` of a task starts: committed (with the end a task carries, if it carries one) before
/// anything of it runs.
async fn start_attempt(
    shared: &Shared,
    job: &Job,
    n: u32,
    retry_from: u32,
    carry: &mut Carry,
) -> Result<(), Fatal> {
    let batch = vec![Change::StartAttempt {
        op: shared.op,
        owner: shared.me.clone(),
        task: job.task(),
        n,
        retry_from,
        at: now(),
    }];
    carry.commit(shared, batch).await?;
    shared.say(&Progress::TaskStarted {
        task: job.name.clone(),
        attempt: n,
    });
    Ok(())
}

/// What an attempt's end is recorded as, the task's end it makes, and the line that says so.
fn outcome_of(
    shared: &Shared,
    job: &Job,
    ended: Ended,
    retry_in: Option<Duration>,
    started: Instant,
) -> (TaskOutcome, TaskEnd, Progress) {
    match ended {
        Ended::Succeeded(outputs, by_check) => {
            let outputs = shared.seal_outputs(outputs);
            // A `sql` step runs no process: it has no exit code to show.
            let ran_process = !matches!(shared.step(job.step).action, Action::Sql(_));
            (
                TaskOutcome {
                    task: TaskStatus::Succeeded,
                    attempt: AttemptStatus::Succeeded,
                    exit_code: Some(0).filter(|_| !by_check && ran_process),
                    error: None,
                    outputs: Some(outputs.clone()),
                    by_check,
                },
                TaskEnd::Done {
                    status: TaskStatus::Succeeded,
                    outputs: Some(outputs),
                    error: None,
                },
                Progress::TaskSucceeded {
                    task: job.name.clone(),
                    by_check,
                    elapsed: started.elapsed(),
                },
            )
        }
        Ended::Failed {
            error, exit_code, ..
        } => (
            TaskOutcome {
                task: if retry_in.is_some() {
                    TaskStatus::Pending
                } else {
                    TaskStatus::Failed
                },
                attempt: AttemptStatus::Failed,
                exit_code,
                error: Some(error.clone()),
                outputs: None,
                by_check: false,
            },
            TaskEnd::Done {
                status: TaskStatus::Failed,
                outputs: None,
                error: Some(error.clone()),
            },
            Progress::TaskFailed {
                task: job.name.clone(),
                error,
                retry_in,
            },
        ),
        Ended::Interrupted => {
            let (task, attempt, error) = match shared.stop_reason() {
                Some(StopReason::Cancel(by)) => (
                    TaskStatus::Canceled,
                    AttemptStatus::Canceled,
                    format!("canceled by {by}"),
                ),
                Some(StopReason::Timeout(why)) => (TaskStatus::Failed, AttemptStatus::Failed, why),
                None => (
                    TaskStatus::Pending,
                    AttemptStatus::Interrupted,
                    "cairn was asked to stop".to_owned(),
                ),
            };
            (
                TaskOutcome {
                    task,
                    attempt,
                    exit_code: None,
                    error: Some(error),
                    outputs: None,
                    by_check: false,
                },
                TaskEnd::Interrupted,
                Progress::TaskInterrupted {
                    task: job.name.clone(),
                },
            )
        }
    }
}

/// Records attempt `n`'s end and reports it; returns the task's end. `retry_in`: the attempt
/// failed and the task tries again after that delay (it stays pending). `held`: what the attempt
/// held back to go in with its end (its process's record: see `task::process`). A job with
/// `defer` leaves its final end to the run loop ([`TaskEnd::Unrecorded`]).
pub(crate) async fn finish(
    shared: &Shared,
    job: &Job,
    (n, held): (u32, Option<Change>),
    ended: Ended,
    retry_in: Option<Duration>,
    started: Instant,
) -> Result<TaskEnd, Fatal> {
    let (outcome, end, progress) = outcome_of(shared, job, ended, retry_in, started);
    let final_end = outcome.task != TaskStatus::Pending;
    let mut changes: Vec<Change> = held.into_iter().collect();
    changes.push(Change::FinishAttempt {
        op: shared.op,
        owner: shared.me.clone(),
        task: job.task(),
        n,
        at: now(),
        outcome,
    });
    if let (
        true,
        true,
        TaskEnd::Done {
            status,
            outputs,
            error,
        },
    ) = (job.defer, final_end, &end)
    {
        return Ok(TaskEnd::Unrecorded {
            status: *status,
            outputs: outputs.clone(),
            error: error.clone(),
            record: Box::new(Record::new(changes, progress)),
        });
    }
    shared.apply_own(changes).await?;
    shared.say(&progress);
    Ok(end)
}

/// An attempt failed before or without its process having a say (a file could not be made, a
/// check's output was bad): no exit code, no retry.
fn failed_early(error: String) -> Ended {
    Ended::Failed {
        error,
        exit_code: None,
        retryable: false,
    }
}

/// The remedy [`render_public`] names when a template puts an output holding a secret where others
/// see it.
pub(crate) const USE_ENV: &str = "pass the output in `env:` (`env: { NAME: \"{{ steps.<id>.outputs.<key> }}\" }`) and read the variable";

/// `render(ctx)`, refused when what it renders inserts an output of an earlier step that holds a
/// secret: `what` (a command line, a prompt) is seen by others or stored in clear; `remedy` says
/// what to do instead. Told by rendering again with those outputs hidden: what inserts one reads
/// otherwise.
pub(crate) fn render_public<T: PartialEq>(
    ctx: &Context,
    what: &str,
    remedy: &str,
    render: impl Fn(&Context) -> Result<T, String>,
) -> Result<T, String> {
    let shown = render(ctx)?;
    if ctx.holds_secrets() && render(&ctx.hiding())? != shown {
        return Err(format!(
            "{what} inserts an output of an earlier step that holds a secret, and would show it to others or store it in clear: {remedy}"
        ));
    }
    Ok(shown)
}

fn shared_mask(shared: &Shared, text: &str) -> String {
    String::from_utf8_lossy(&shared.mask(text.as_bytes())).into_owned()
}

/// The first declared output a step did not publish.
fn missing_output<'s>(
    step: &'s plans::model::Step,
    outputs: &Map<String, Value>,
) -> Option<&'s str> {
    step.outputs
        .as_ref()?
        .iter()
        .find(|k| !outputs.contains_key(k.as_str()))
        .map(String::as_str)
}

fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
