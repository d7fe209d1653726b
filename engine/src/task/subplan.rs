//! A `plan:` step: each attempt runs (or resumes) its child op to its end; a failed child is
//! resumed by the next attempt when the step's `retry` allows one.
//!
//! - [`Children`]: how a task starts, resumes and cancels child ops. The op layer implements it
//!   and hands it down in the run's [`Shared`]: this layer never names the op layer.
//! - [`run`]: the task's attempts ([`attempts`]); `run_child`: one attempt's child op, found by its
//!   link (`ops.parent_id`, `parent_task`) or submitted, owned by this process. A child that
//!   already succeeded is not run again: its outputs are taken as they are.
//! - The child's end is its run's [`RunEnd`], made the attempt's [`Ended`] by `child_end`: a
//!   succeeded child's steps' outputs, merged in plan order, become the task's; a failed or
//!   canceled child fails the task. Cancelling the parent
//!   cancels the child (the child's cancel watcher also reads its ancestors' requests); a stop
//!   reaches it through its stop handle.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use plans::model::{Action, Arg, Plan};
use plans::template::Context;
use serde_json::{Map, Value};
use store::{OpId, OpStatus, Reader, Store};
use tokio::sync::watch;

use super::attempts::{Attempt, attempts};
use super::carry::Carry;
use super::context::{Shared, StopReason};
use super::{Ended, Fatal, Job, TaskEnd, render_public, shared_mask, start_attempt};
use crate::options::Options;
use crate::outcome::RunEnd;
use crate::progress::Sink;
use crate::shutdown::StopHandle;

/// A boxed future: a child op's run runs a run, so these futures cannot be sized statically.
pub(crate) type Boxed<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;

/// A child op to submit for a `plan:` task: its plan, params and directory (the rest comes from
/// the parent).
#[derive(Debug)]
pub(crate) struct ChildRun {
    pub plan: Plan,
    pub params: Map<String, Value>,
    pub workdir: PathBuf,
}

/// What the op layer provides for `plan:` tasks.
pub(crate) trait Children: Send + Sync {
    /// Submits child op `new` of `parent`'s task `task` and runs it, owned by this process.
    /// Its progress goes to `progress`.
    fn start<'a>(
        &'a self,
        parent: &'a Shared,
        task: store::TaskNo,
        new: ChildRun,
        stop: StopHandle,
        progress: Sink,
    ) -> Boxed<'a, Result<(OpId, RunEnd), String>>;

    /// Resumes child op `op` where it stopped; its progress goes to `progress`.
    fn resume<'a>(
        &'a self,
        parent: &'a Shared,
        op: OpId,
        stop: StopHandle,
        progress: Sink,
    ) -> Boxed<'a, Result<RunEnd, String>>;

    /// Cancels `op`'s child ops that have not ended (those run by the steps named in `only`, or
    /// all), with their own `on_cancel` hooks.
    fn cancel<'a>(
        &'a self,
        store: &'a Store,
        owner: &'a store::ProcessId,
        op: OpId,
        only: Option<&'a [String]>,
        options: &'a Options,
        progress: &'a Sink,
    ) -> Boxed<'a, Result<(), String>>;
}

/// Attempts of a `plan:` task.
pub(crate) async fn run(
    shared: &Shared,
    job: &Job,
    (prior, retry_from): (u32, u32),
    ctx: &Context,
    started: Instant,
    stop: &watch::Receiver<bool>,
) -> Result<TaskEnd, Fatal> {
    let mut attempt = ChildAttempt {
        shared,
        job,
        ctx,
        retry_from,
        stop,
    };
    attempts(
        shared,
        job,
        (prior, retry_from),
        started,
        stop,
        &mut Carry::none(),
        &mut attempt,
    )
    .await
}

struct ChildAttempt<'a> {
    shared: &'a Shared,
    job: &'a Job,
    ctx: &'a Context,
    retry_from: u32,
    stop: &'a watch::Receiver<bool>,
}

impl Attempt for ChildAttempt<'_> {
    async fn attempt(&mut self, n: u32, carry: &mut Carry) -> Result<Ended, Fatal> {
        let shared = self.shared;
        start_attempt(shared, self.job, n, self.retry_from, carry).await?;
        match run_child(shared, self.job, self.ctx, self.stop).await {
            Ok(ended) => ended,
            // The child could not be started, resumed or read: the attempt failed.
            Err(error) => Ok(failed(shared, &error, true)),
        }
    }
}

/// A failed attempt of a `plan:` task; `retryable`: the step's `retry` may run the child again
/// (not after a person canceled it).
fn failed(shared: &Shared, error: &str, retryable: bool) -> Ended {
    Ended::Failed {
        error: shared_mask(shared, error),
        exit_code: None,
        retryable,
    }
}

/// Stops the child when its parent stops (but for a cancel, which reaches the child through its
/// watcher, so that it ends canceled, with its own `on_cancel` hooks). When the parent fails
/// elsewhere, the child goes on like any running task, but its approval gates close: they could
/// otherwise wait for an answer that can no longer lead anywhere (a resume asks again).
fn forward_stop(
    shared: &Shared,
    stop: &watch::Receiver<bool>,
    child_stop: &StopHandle,
) -> tokio::task::JoinHandle<()> {
    let mut parent_stop = stop.clone();
    let mut parent_failed = shared.gates_closed();
    let child_stop = child_stop.clone();
    let reason = shared.stop_reason_handle();
    let parent = shared.stop_handle();
    tokio::spawn(async move {
        let mut failed = false;
        let stop_child = loop {
            tokio::select! {
                r = parent_stop.wait_for(|s| *s) => {
                    break r.is_ok() && !matches!(reason(), Some(StopReason::Cancel(_)));
                }
                r = parent_failed.wait_for(|s| *s), if !failed => {
                    if r.is_ok() {
                        child_stop.close_gates("the parent op failed");
                    }
                    failed = true;
                }
            }
        };
        if stop_child {
            // A signal's stop is the child's too, as the child's record says.
            match parent.cause() {
                Some(cause) => child_stop.stop_by(cause.by, cause.how),
                None => child_stop.stop(),
            }
        }
    })
}

/// Runs (or resumes, or just reads) the child op of a `plan:` task: the attempt's end, from the
/// child run's end; `Err` when the child could not be started, resumed or read.
async fn run_child(
    shared: &Shared,
    job: &Job,
    ctx: &Context,
    stop: &watch::Receiver<bool>,
) -> Result<Result<Ended, Fatal>, String> {
    let step = shared.step(job.step);
    let mut existing = shared
        .store
        .reader()
        .and_then(|reader| reader.child(shared.op, job.task()))
        .map_err(|e| e.to_string())?;
    if let Some(row) = existing.as_ref().filter(|r| r.status == OpStatus::Canceled) {
        // Someone canceled the child; running the task again means a new child.
        shared
            .store
            .apply(vec![store::Change::DetachChild {
                op: shared.op,
                owner: shared.me.clone(),
                task: job.task(),
                at: crate::owner::now(),
                message: format!("op {} was canceled; a new op runs the sub-plan", row.id),
            }])
            .await
            .map_err(|e| e.to_string())?;
        existing = None;
    }
    let child_stop = shared.stop_handle().beneath();
    // The step's `timeout` stops the child; the task then fails.
    let timed_out = Arc::new(AtomicBool::new(false));
    let timer = step.timeout.map(|limit| {
        let child_stop = child_stop.clone();
        let timed_out = timed_out.clone();
        tokio::spawn(async move {
            tokio::time::sleep(limit).await;
            timed_out.store(true, Ordering::SeqCst);
            child_stop.stop();
        })
    });
    let forward = forward_stop(shared, stop, &child_stop);
    let progress = crate::progress::of_child(&shared.progress, &job.name);
    let result = match existing {
        Some(row) if row.status == OpStatus::Succeeded => Ok((row.id, RunEnd::Succeeded)),
        Some(row) => shared
            .children
            .resume(shared, row.id, child_stop, progress)
            .await
            .map(|end| (row.id, end)),
        None => match child_run(shared, job, ctx) {
            Ok(new) => {
                let started = shared
                    .children
                    .start(shared, job.task(), new, child_stop, progress);
                started.await
            }
            Err(e) => Err(e),
        },
    };
    forward.abort();
    if let Some(timer) = timer {
        timer.abort();
    }
    let (child, end) = result?;
    if timed_out.load(Ordering::SeqCst) && end != RunEnd::Succeeded {
        let error = format!(
            "timed out after {}; sub-plan op {child} was stopped",
            plans::units::format_duration(step.timeout.unwrap_or_default())
        );
        return Ok(Ok(failed(shared, &error, true)));
    }
    child_end(shared, child, end)
}

/// The child op a `plan:` task submits: its sub-plan from the op's snapshot, its `with:` rendered.
fn child_run(shared: &Shared, job: &Job, ctx: &Context) -> Result<ChildRun, String> {
    let Action::Plan { path, with } = &shared.step(job.step).action else {
        return Err("not a sub-plan step".to_owned());
    };
    let key = plans::bundle::sub_plan_key(&shared.workdir.to_string_lossy(), path);
    let Some(text) = shared.files.get(&key) else {
        return Err(format!("sub-plan `{key}` is not in the op's snapshot"));
    };
    let plan = plans::parse(&key, text).map_err(|p| p.render(false))?;
    let mut given = Map::new();
    for (name, arg) in with {
        let value = match arg {
            Arg::Template(t) => {
                let render = |c: &Context| {
                    t.render(c)
                        .map_err(|e| format!("cannot render `with.{name}`: {e}"))
                };
                // A child's param that is not secret is stored in clear.
                let rendered = if plan.param(name).is_some_and(|p| p.secret) {
                    render(ctx)?
                } else {
                    let remedy = format!(
                        "mark param `{name}` `secret: true` in sub-plan `{}`",
                        plan.name
                    );
                    render_public(ctx, &format!("`with.{name}`"), &remedy, render)?
                };
                Value::String(rendered)
            }
            Arg::Value(v) => v.clone(),
        };
        given.insert(name.clone(), value);
    }
    let params = plans::params::resolve(&plan, &[], Some(&given)).map_err(|problems| {
        let all: Vec<String> = problems.into_iter().map(|p| p.message).collect();
        format!("sub-plan `{}`: {}", plan.name, all.join("; "))
    })?;
    Ok(ChildRun {
        workdir: Path::new(plans::bundle::key_dir(&key)).to_path_buf(),
        plan,
        params,
    })
}

/// What the child's run's end makes of the task's attempt: a failed child fails it (the step's
/// `retry` may resume the child), a child canceled by hand fails it for good, a stopped child
/// (a signal, the parent's cancel or timeout) leaves it as the parent's stop says, and a child
/// whose progress the store could not record stops the parent too.
fn child_end(shared: &Shared, child: OpId, end: RunEnd) -> Result<Result<Ended, Fatal>, String> {
    Ok(Ok(match end {
        RunEnd::Succeeded => {
            let reader = shared.store.reader().map_err(|e| e.to_string())?;
            Ended::Succeeded(outputs(&reader, child)?, false)
        }
        RunEnd::Failed(e) => failed(shared, &format!("sub-plan op {child} failed: {e}"), true),
        RunEnd::Canceled(e) if shared.stop_reason().is_none() => {
            // The child may have seen this op's (or an ancestor's) cancel before this op did.
            let request = shared
                .store
                .reader()
                .ok()
                .and_then(|reader| shared.cancel_request(&reader));
            match request {
                Some(request) => {
                    shared.stop_because(StopReason::Cancel(request.by));
                    Ended::Interrupted
                }
                None => failed(
                    shared,
                    &format!("sub-plan op {child} was canceled: {e}"),
                    false,
                ),
            }
        }
        // A sub-plan's op is never parked (its parent's task runs it).
        RunEnd::Canceled(_) | RunEnd::Interrupted | RunEnd::Parked => Ended::Interrupted,
        // The child was taken over by another process: this task cannot know how it ends.
        RunEnd::LostOwnership(m) => failed(
            shared,
            &format!("sub-plan op {child} was taken over: {m}"),
            true,
        ),
        RunEnd::StoreFailed(m) => return Ok(Err(Fatal::Store(m))),
    }))
}

/// A succeeded child's outputs: its steps' outputs, merged in plan order (a later step's key
/// wins).
fn outputs(reader: &Reader, child: OpId) -> Result<Map<String, Value>, String> {
    let snapshot = reader.snapshot(child).map_err(|e| e.to_string())?;
    let plan = plans::parse(&format!("op {child} plan snapshot"), &snapshot.text).map_err(|p| {
        format!(
            "the op's plan snapshot does not validate any more: {}",
            p.render(false)
        )
    })?;
    let mut merged = Map::new();
    for task in reader.tasks(child).map_err(|e| e.to_string())? {
        let no = task.task_no.0 as usize;
        if no < plan.steps.len() && plan.steps[no].id == task.step {
            merged.extend(task.outputs.unwrap_or_default());
        }
    }
    Ok(merged)
}
