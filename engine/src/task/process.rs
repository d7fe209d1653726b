//! A `run` or `exec` step: each attempt runs its `check` (if it has one; exit 0 means the work is
//! done), then its command, as a process of its own group, its output streamed into the logs.
//!
//! - [`run`]: renders the command line, `cwd` and `check`, then runs [`attempts`].
//! - `ProcessAttempt`: one attempt ([`Attempt`]); `spawn_and_wait` runs one process of it.
//! - `judge`: what a finished process's exit makes of the attempt.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use plans::model::{Action, Step};
use plans::template::Context;
use procs::spawn::{self, Spec, Stopped};
use serde_json::{Map, Value};
use store::Change;
use tokio::sync::watch;

use super::attempts::{Attempt, attempts};
use super::carry::Carry;
use super::context::Shared;
use super::files::{process_files, progress_file};
use super::logs::{Unwritten, write_logs_noting};
use super::{
    Ended, Fatal, Job, TaskEnd, USE_ENV, fail_before_start, failed_early, last_lines,
    missing_output, render_public, shared_mask, start_attempt,
};
use crate::owner::to_store;
use crate::progress::Progress;

/// Attempts of a `run` or `exec` task (`prior` attempts made, `retry_from` before this round).
pub(crate) async fn run(
    shared: &Shared,
    job: &Job,
    (prior, retry_from): (u32, u32),
    ctx: &Context,
    started: Instant,
    stop: &watch::Receiver<bool>,
    carry: &mut Carry,
) -> Result<TaskEnd, Fatal> {
    let step = shared.step(job.step);
    let rendered = render_public(
        ctx,
        "the command line, `cwd`, `on`, `check` or `until.probe`",
        USE_ENV,
        |c| Ok((render(shared, step, c)?, target(step, c)?)),
    );
    let ((cwd, argv, (check, probe)), remote) = match rendered {
        Ok(rendered) => rendered,
        Err(error) => {
            carry.flush(shared).await?;
            return fail_before_start(shared, job, prior + 1, error).await;
        }
    };
    // An adopted step's end is recorded before its directory goes: never deferred.
    let job = &Job {
        defer: job.defer && !step.adopt,
        ..job.clone()
    };
    // An attempt the resume's sweep left running (`adopt`): taken again, not started anew.
    let adopting = if step.adopt {
        shared
            .store
            .reader()
            .and_then(|r| r.attempts(shared.op))
            .map_err(Fatal::from)?
            .into_iter()
            .filter(|a| a.task_no == job.task() && a.status == store::AttemptStatus::Running)
            .map(|a| (a.n, a.logged))
            .max()
            .filter(|&(n, _)| n >= 1 && n <= prior)
    } else {
        None
    };
    let prior = adopting.map_or(prior, |(n, _)| n - 1);
    let retry_from = retry_from.min(prior);
    let mut attempt = ProcessAttempt {
        shared,
        job,
        step,
        ctx,
        retry_from,
        cwd,
        argv,
        check,
        probe,
        stop,
        began: None,
        daemon: None,
        remote,
        adopting,
        adopted: None,
        told: None,
        held: None,
    };
    attempts(
        shared,
        job,
        (prior, retry_from),
        started,
        stop,
        carry,
        &mut attempt,
    )
    .await
}

/// What a process task runs, rendered: its working directory, command line, and the command
/// lines of `check` and `until.probe`.
type Rendered = (
    PathBuf,
    Vec<String>,
    (Option<Vec<String>>, Option<Vec<String>>),
);

/// The step's working directory, command line and `check` and `until.probe` command lines,
/// rendered.
fn render(shared: &Shared, step: &Step, ctx: &Context) -> Result<Rendered, String> {
    let cwd = match &step.cwd {
        Some(t) => shared.workdir.join(
            t.render(ctx)
                .map_err(|e| format!("cannot render `cwd`: {e}"))?,
        ),
        None => shared.workdir.clone(),
    };
    let argv = command_line(step, ctx)?;
    // A script of the step's own, run with its shell.
    let script = |t: Option<&plans::template::Template>, what: &str| {
        t.map(|t| {
            let script = t
                .render(ctx)
                .map_err(|e| format!("cannot render `{what}`: {e}"))?;
            let shell = match &step.action {
                Action::Run { shell, .. } => shell.clone(),
                _ => plans::model::Shell::Bash,
            };
            Ok::<_, String>(shell.command_line(&script))
        })
        .transpose()
    };
    let check = script(step.check.as_ref(), "check")?;
    let probe = script(
        step.until.as_ref().and_then(|u| u.probe.as_ref()),
        "until.probe",
    )?;
    Ok((cwd, argv, (check, probe)))
}

/// Where a step with `on` runs: the host, and the directory there (`cwd` as rendered).
#[derive(Debug, Clone, PartialEq)]
struct Target {
    host: String,
    cwd: Option<String>,
}

/// The step's host and directory there, rendered; `None` for a step on this host: without `on`,
/// or with an `on` that renders empty (`on: "{{ params.host | default('') }}"`), so that one plan
/// runs both here and on other hosts.
fn target(step: &Step, ctx: &Context) -> Result<Option<Target>, String> {
    let Some(on) = &step.on else {
        return Ok(None);
    };
    let host = on
        .render(ctx)
        .map_err(|e| format!("cannot render `on`: {e}"))?;
    let host = host.trim().to_owned();
    if host.is_empty() {
        return Ok(None);
    }
    procs::remote::check_destination(&host)?;
    let cwd = step
        .cwd
        .as_ref()
        .map(|t| t.render(ctx))
        .transpose()
        .map_err(|e| format!("cannot render `cwd`: {e}"))?;
    Ok(Some(Target { host, cwd }))
}

/// The command line of a `run` or `exec` step, rendered.
fn command_line(step: &Step, ctx: &Context) -> Result<Vec<String>, String> {
    match &step.action {
        Action::Run { script, shell } => {
            let script = script
                .render(ctx)
                .map_err(|e| format!("cannot render `run`: {e}"))?;
            Ok(shell.command_line(&script))
        }
        Action::Exec { argv } => argv
            .iter()
            .map(|a| {
                a.render(ctx)
                    .map_err(|e| format!("cannot render `exec`: {e}"))
            })
            .collect(),
        _ => Err("not a process step".to_owned()),
    }
}

/// What every attempt of a process task runs.
struct ProcessAttempt<'a> {
    shared: &'a Shared,
    job: &'a Job,
    step: &'a Step,
    ctx: &'a Context,
    retry_from: u32,
    cwd: PathBuf,
    argv: Vec<String>,
    check: Option<Vec<String>>,
    /// What an `until` wait runs again, when not the command itself.
    probe: Option<Vec<String>>,
    stop: &'a watch::Receiver<bool>,
    /// When the task's first process started.
    began: Option<Instant>,
    /// A `daemon` step's server, once its command left it running (or an earlier attempt's,
    /// found alive).
    daemon: Option<Kept>,
    /// The host its processes run on, if not this one.
    remote: Option<Target>,
    /// The attempt an earlier run left running, to take again (`adopt`), and how far its
    /// output is in its log.
    adopting: Option<(u32, [u64; 2])>,
    /// The directory of a supervised attempt, removed once its end is recorded.
    adopted: Option<(u32, Option<String>, String)>,
    /// A supervised attempt on another host whose wrapper, still connected, removes its
    /// directory when told the end is recorded.
    told: Option<(u32, procs::remote::Recorded)>,
    /// The record of attempt `n`'s process, which ended within [`NOTE_AFTER`]: it goes in with
    /// the attempt's end (or before the attempt's next process starts).
    held: Option<(u32, Change)>,
}

/// How long a step's process may run before its record (pid, group, start time) is written on
/// its own. A process that ends sooner is recorded in its attempt's end commit: a short step then
/// costs its start's durable commit and its end's, not a third write between them. Until the
/// record is in, a resume after a crash finds what the attempt left running by its marker alone
/// (ARCHITECTURE.md, crash rule 2).
const NOTE_AFTER: Duration = Duration::from_millis(10);

/// What a `daemon` step's command left running: found by its group (started no earlier than
/// `start`) and the marker of the attempt that started it.
#[derive(Debug, Clone)]
struct Kept {
    /// The process the attempt's record names (0: none yet).
    pid: u32,
    pgid: Option<u32>,
    start: Option<u64>,
    marker: String,
}

impl Kept {
    fn processes(&self) -> Vec<u32> {
        procs::proc::attempt_processes(self.pgid, self.start, &self.marker)
    }
}

/// One process to start: its command line (and the program found in its `PATH`, if looked up),
/// environment, `$CAIRN_OUTPUT` file, directory, and the marker its leftovers are found by.
struct Launch {
    argv: Vec<String>,
    located: Option<PathBuf>,
    env: BTreeMap<String, String>,
    output: PathBuf,
    cwd: PathBuf,
    marker: String,
    /// A `daemon` step's command: what it leaves running when it exits 0 is kept.
    keep: bool,
}

/// The outcome of running one process (a step's command or its `check`).
struct ProcessRun {
    exit: spawn::Exit,
    outputs: Result<Map<String, Value>, String>,
    /// Why its host could not be reached: the attempt fails (and may be retried).
    unreached: Option<String>,
}

impl Attempt for ProcessAttempt<'_> {
    async fn attempt(&mut self, n: u32, carry: &mut Carry) -> Result<Ended, Fatal> {
        if let Some((m, logged)) = self.adopting.take()
            && m == n
        {
            return self.reattach(n, logged).await;
        }
        let (shared, job, step, ctx) = (self.shared, self.job, self.step, self.ctx);
        // The first process's files and environment are made, and the step's program looked up
        // in its `PATH`, while its start commits: nothing of the attempt runs before that commit
        // is durable.
        let (start, (prepared, located)) = tokio::join!(
            biased;
            start_attempt(shared, job, n, self.retry_from, carry),
            async {
                let prepared = process_files(shared, step, ctx, job, n);
                let located = prepared
                    .as_ref()
                    .ok()
                    .and_then(|(_, env)| procs::spawn::locate(&self.argv, env));
                (prepared, located)
            },
        );
        start?;
        let mut prepared = Some(prepared);
        let marker = format!("{}/{}/{n}", shared.uuid, job.no);
        if let Some(done) = self.check(n, &mut prepared, &marker).await? {
            return Ok(done);
        }
        if step.daemon
            && let Some(ended) = self.adopt(n, &marker, located.clone()).await?
        {
            return Ok(ended);
        }
        let made = prepared.take();
        let (output, env) = match made.unwrap_or_else(|| process_files(shared, step, ctx, job, n)) {
            Ok(prepared) => prepared,
            Err(error) => return Ok(failed_early(error)),
        };
        let launch = Launch {
            argv: self.argv.clone(),
            located: located.clone(),
            env,
            output,
            cwd: self.cwd.clone(),
            marker: marker.clone(),
            keep: step.daemon,
        };
        let run = match self.spawn_and_wait(n, launch).await? {
            Ok(run) => run,
            Err(error) => return Ok(failed_early(error)),
        };
        if step.daemon {
            self.keep_daemon(n, &run.exit.kept, &marker).await?;
        }
        let ended = match &step.until {
            Some(until) => self.wait_until(n, until, run, (&marker, located)).await,
            None => Ok(judge(shared, step, run)),
        };
        self.settle_daemon(n, &ended).await?;
        ended
    }

    fn began(&self) -> Option<Instant> {
        self.began
    }

    fn held(&mut self, n: u32) -> Option<Change> {
        self.held
            .take()
            .and_then(|(m, note)| (m == n).then_some(note))
    }

    async fn recorded(&mut self, n: u32) {
        let Some((m, host, dir)) = self.adopted.take() else {
            return;
        };
        if m != n {
            return;
        }
        let told = self.told.take().filter(|(m, _)| *m == n);
        match host {
            None => procs::adopt::remove(std::path::Path::new(&dir)),
            Some(host) => {
                let note = procs::adopt::host_file(&dir);
                let removed = if let Some((_, told)) = told {
                    // The wrapper, still connected, removes the directory once told; the note
                    // goes once it says it did.
                    told.send(move || {
                        let _ = std::fs::remove_file(note);
                    });
                    false
                } else {
                    // No wrapper to tell (the connection was lost): what may still run there is
                    // ended, then the directory removed.
                    let grace = self.shared.options.grace;
                    match self.shared.ssh() {
                        Ok(transport) => {
                            procs::remote::probe(&transport, &host, &dir, (grace, true))
                                .await
                                .is_ok()
                        }
                        Err(_) => false,
                    }
                };
                // Out of reach: the note stays, for the next resume or cancel to end what is
                // left there (`op::take`).
                if removed {
                    let _ = std::fs::remove_file(procs::adopt::host_file(&dir));
                }
            }
        }
    }
}

type Prepared = Result<(PathBuf, BTreeMap<String, String>), String>;

impl ProcessAttempt<'_> {
    /// The idempotency probe, if the step has one: `Some` end when it says the work is done (or
    /// the attempt cannot go on); `None` when the step's command is to run.
    async fn check(
        &mut self,
        n: u32,
        prepared: &mut Option<Prepared>,
        marker: &str,
    ) -> Result<Option<Ended>, Fatal> {
        let Some(check) = &self.check else {
            return Ok(None);
        };
        let (shared, job, step, ctx) = (self.shared, self.job, self.step, self.ctx);
        let made = prepared.take();
        let (output, env) = match made.unwrap_or_else(|| process_files(shared, step, ctx, job, n)) {
            Ok(prepared) => prepared,
            Err(error) => return Ok(Some(failed_early(error))),
        };
        let launch = Launch {
            argv: check.clone(),
            located: None,
            env,
            output,
            cwd: self.cwd.clone(),
            marker: format!("{marker}/check"),
            keep: false,
        };
        match self.spawn_and_wait(n, launch).await? {
            Ok(run) if run.exit.stopped == Some(Stopped::Asked) => {
                return Ok(Some(Ended::Interrupted));
            }
            Ok(run) if run.exit.success() => {
                let outputs = match run.outputs {
                    Ok(o) => o,
                    Err(e) => {
                        let error = shared_mask(shared, &format!("`check`: {e}"));
                        return Ok(Some(failed_early(error)));
                    }
                };
                if let Some(missing) = missing_output(step, &outputs) {
                    let error = format!(
                        "`check` said the step is done but did not publish its output `{missing}`"
                    );
                    return Ok(Some(failed_early(error)));
                }
                return Ok(Some(Ended::Succeeded(outputs, true)));
            }
            _ => {}
        }
        // The check may have taken long: prove ownership again before starting the step.
        shared.renew().await?;
        Ok(None)
    }

    /// Spawns one process for attempt `n` of the task, records its pid, streams its logs, waits.
    async fn spawn_and_wait(
        &mut self,
        n: u32,
        launch: Launch,
    ) -> Result<Result<ProcessRun, String>, Fatal> {
        if let Some(target) = self.remote.clone() {
            return self.spawn_remote_and_wait(n, launch, target).await;
        }
        let (shared, job, step) = (self.shared, self.job, self.step);
        let task = job.task();
        // A daemon step's probes (and `check`) leave the attempt's record naming its command, then
        // its server: they are found by their marker.
        let probe = step.daemon && launch.marker.ends_with("/check");
        let mut launch = launch;
        let supervised = match self.supervise(n, &mut launch) {
            Ok(supervised) => supervised,
            Err(why) => return Ok(Err(why)),
        };
        let spec = Spec {
            stdin: None,
            hold_stdin: false,
            argv: launch.argv,
            env: launch.env,
            cwd: launch.cwd,
            marker: launch.marker,
            timeout: step.timeout,
            grace: shared.options.grace,
            located: launch.located,
            alone: shared.options.tasks.get() <= 1,
            keep: launch.keep,
        };
        if !shared.lease_holds() {
            return Err(Fatal::Lost(
                "the lease ran out before the step could start".to_owned(),
            ));
        }
        // An earlier process of this attempt whose record was held: recorded first, so that the
        // attempt's time runs from the first of them.
        if let Some((_, note)) = self.held.take() {
            shared.apply(vec![note]).await?;
        }
        let (sink, chunks) = spawn::sink();
        let spawned = crate::owner::now();
        self.began.get_or_insert_with(Instant::now);
        let running = match spawn::spawn(&spec, &sink) {
            Ok(r) => r,
            Err(e) => return Ok(Err(e.to_string())),
        };
        let (done, tail) = match &supervised {
            Some(dir) => {
                let (done, finished) = tokio::sync::oneshot::channel::<()>();
                let follow = procs::adopt::Tail::new(dir, [0, 0]).follow(sink.clone(), async {
                    let _ = finished.await;
                });
                (Some(done), Some(tokio::spawn(follow)))
            }
            None => (None, None),
        };
        drop(sink);
        shared.outputs.make_spare();
        let logged = supervised.as_ref().map(|_| [0, 0]);
        let logs = tokio::spawn(write_logs_noting(
            shared.store.clone(),
            (shared.op, shared.me.clone()),
            (task, n),
            chunks,
            (step.log_limit, shared.options.lease / 2),
            shared.secrets.clone(),
            logged,
        ));
        let note = (self.daemon.is_none() && !probe).then(|| Change::AttemptProcess {
            op: shared.op,
            owner: shared.me.clone(),
            task,
            n,
            process: to_store(&running.identity),
            pgid: running.pgid,
            at: spawned,
        });
        // A supervised or `daemon` step's record is what a resume takes it again by: at once.
        // Any other's waits up to `NOTE_AFTER` to go in with the attempt's end.
        let note = match note {
            Some(note) if supervised.is_some() || step.daemon => {
                shared.apply(vec![note]).await?;
                None
            }
            note => note,
        };
        let attempt = (running.pgid, running.identity.start, spec.marker.clone());
        // The grace is decided when the stop comes: a cancel's own, or a sixth of the lease for a
        // run that lost its op (`Shared::step_grace`). The log writer ends when the process's
        // output closes; it is waited for alongside, since the process's readers wait for it.
        let wait = running
            .hurried_by(shared.stop_handle().subscribe_hurry())
            .wait_with_grace(self.stop.clone(), || shared.step_grace());
        let wait = async {
            let mut exit = wait.await;
            if let Some(done) = done {
                let _ = done.send(());
            }
            if let Some(tail) = tail {
                let _ = tail.await;
            }
            if let Some(dir) = &supervised {
                supervised_exit(&mut exit, dir);
            }
            exit
        };
        let progress = progress_file(&launch.output);
        // On the heap: the futures of a step's run would otherwise be too large to move.
        let ended = Box::pin(async {
            tokio::join!(
                self.watch_progress(wait, &progress),
                finish_logs(shared, logs),
            )
        });
        let ((exit, unwritten), held) = noted(shared, ended, note, &attempt).await?;
        self.held = held.map(|note| (n, note));
        if !unwritten.why.is_empty() {
            shared.say(&Progress::LogIncomplete {
                task: job.name.clone(),
                attempt: n,
                bytes: unwritten.bytes,
                why: unwritten.why,
            });
        }
        Ok(Ok(ran(exit, &launch.output, supervised.is_some())))
    }

    /// Makes a supervised command (`adopt`) of `launch`: its output, outputs and exit code go to
    /// its attempt's directory, which outlives this process. That directory; `None` for any other
    /// command.
    fn supervise(&mut self, n: u32, launch: &mut Launch) -> Result<Option<PathBuf>, String> {
        if !self.step.adopt || launch.marker.ends_with("/check") {
            return Ok(None);
        }
        let dir = procs::adopt::dir(&self.shared.uuid, self.job.task().0, n);
        procs::adopt::prepare(&dir)
            .map_err(|e| format!("cannot make the step's directory {}: {e}", dir.display()))?;
        let output = dir.join("output");
        launch.env.insert(
            "CAIRN_PROGRESS".to_owned(),
            progress_file(&output).display().to_string(),
        );
        launch
            .env
            .insert("CAIRN_OUTPUT".to_owned(), output.display().to_string());
        let _ = std::fs::remove_file(&launch.output);
        launch.output = output;
        launch.argv = procs::adopt::argv(&dir, &launch.argv);
        launch.located = None;
        self.adopted = Some((n, None, dir.display().to_string()));
        Ok(Some(dir))
    }
}

/// A process's run once it ended: its outputs read from `output` if it succeeded. The file is read
/// once, then removed, so that the op's directory does not fill up with a file per attempt (a
/// supervised one's goes with its directory, once its end is recorded).
fn ran(exit: spawn::Exit, output: &Path, supervised: bool) -> ProcessRun {
    let outputs = if exit.success() {
        spawn::read_outputs(output)
    } else {
        Ok(Map::new())
    };
    if !supervised {
        let _ = std::fs::remove_file(output);
    }
    ProcessRun {
        exit,
        outputs,
        unreached: None,
    }
}

impl ProcessAttempt<'_> {
    /// A step's `until` wait, after its command's first run: the command (or the probe, once the
    /// command succeeded) runs again every `until.every` until it exits 0, for at most
    /// `until.timeout` from the command's start. Each run that does not succeed is a line of
    /// progress (`waiting: ...`), not a failure; the wait's end is judged as one run would be.
    async fn wait_until(
        &mut self,
        n: u32,
        until: &plans::model::Until,
        first: ProcessRun,
        (marker, located): (&str, Option<PathBuf>),
    ) -> Result<Ended, Fatal> {
        let (shared, step) = (self.shared, self.step);
        let began = Instant::now();
        let probing = self.probe.is_some();
        // With a probe, the command runs once and decides alone if it fails; its outputs are
        // the step's.
        if probing && (!first.exit.success()) {
            return Ok(judge(shared, step, first));
        }
        let outputs = first.outputs.clone();
        let mut last = first;
        let (mut said, mut probed) = (None, false);
        loop {
            let reached = last.exit.success() && (!probing || probed);
            if reached || last.exit.stopped.is_some() {
                let run = if probing && reached {
                    // A daemon's probe may publish outputs too (an adopted daemon's command
                    // published none this attempt); the probe's win.
                    let outputs = match (outputs, last.outputs) {
                        (Ok(mut outputs), Ok(probed)) if step.daemon => {
                            outputs.extend(probed);
                            Ok(outputs)
                        }
                        (outputs, _) => outputs,
                    };
                    ProcessRun {
                        exit: last.exit,
                        outputs,
                        unreached: None,
                    }
                } else {
                    last
                };
                return Ok(judge(shared, step, run));
            }
            if began.elapsed() + until.every > until.timeout {
                return Ok(match judge(shared, step, last) {
                    Ended::Failed {
                        error,
                        exit_code,
                        retryable,
                    } => Ended::Failed {
                        error: format!(
                            "`until` gave up after {}: {error}",
                            plans::units::format_duration(until.timeout)
                        ),
                        exit_code,
                        retryable,
                    },
                    other => other,
                });
            }
            let note = if probing && !probed {
                "waiting for `until.probe`".to_owned()
            } else {
                format!("waiting: {}", how_it_ended(&last.exit))
            };
            self.show_progress(note, &mut said).await;
            let mut stop = self.stop.clone();
            tokio::select! {
                () = tokio::time::sleep(until.every) => {}
                _ = stop.wait_for(|s| *s) => return Ok(Ended::Interrupted),
            }
            let (output, env) = match process_files(shared, step, self.ctx, self.job, n) {
                Ok(made) => made,
                Err(error) => return Ok(failed_early(error)),
            };
            let launch = match &self.probe {
                Some(probe) => Launch {
                    argv: probe.clone(),
                    located: None,
                    env,
                    output,
                    cwd: self.cwd.clone(),
                    // Marked as `check` is: a resume's sweep looks for both.
                    marker: format!("{marker}/check"),
                    keep: false,
                },
                None => Launch {
                    argv: self.argv.clone(),
                    located: located.clone(),
                    env,
                    output,
                    cwd: self.cwd.clone(),
                    marker: marker.to_owned(),
                    keep: false,
                },
            };
            last = match self.spawn_and_wait(n, launch).await? {
                Ok(run) => run,
                Err(error) => return Ok(failed_early(error)),
            };
            probed = probing;
        }
    }
}

/// Waits for a process's run (`ended`), writing its record (`note`) once it has run
/// [`NOTE_AFTER`]; returns the record still unwritten when the run ended sooner. When the record
/// cannot be written, the attempt's processes (`attempt`: its group, its start, its marker) are
/// ended at once, with what the process started outside its group meanwhile (dropping the process
/// would kill only its group).
async fn noted<T>(
    shared: &Shared,
    mut ended: std::pin::Pin<Box<impl Future<Output = T>>>,
    note: Option<Change>,
    (pgid, start, marker): &(u32, u64, String),
) -> Result<(T, Option<Change>), Fatal> {
    let Some(note) = note else {
        return Ok((ended.await, None));
    };
    tokio::select! {
        biased;
        done = &mut ended => Ok((done, Some(note))),
        () = tokio::time::sleep(NOTE_AFTER) => {
            if let Err(fatal) = shared.apply(vec![note]).await {
                procs::proc::terminate_or_sooner(
                    || procs::proc::attempt_processes(Some(*pgid), Some(*start), marker),
                    Duration::ZERO,
                    std::future::ready(()),
                )
                .await;
                return Err(fatal);
            }
            Ok((ended.await, None))
        }
    }
}

/// Waits for an attempt's log writer to write all of the output. Only a run that lost its op
/// stops waiting (nothing more may be written, and the store may not answer): the writer is
/// dropped, which lets the process's readers go on without it, and the output not written is
/// said to be lost.
pub(crate) async fn finish_logs(
    shared: &Shared,
    mut logs: tokio::task::JoinHandle<Unwritten>,
) -> Unwritten {
    loop {
        tokio::select! {
            done = &mut logs => return done.unwrap_or_default(),
            () = tokio::time::sleep(Duration::from_millis(250)) => {}
        }
        if shared.is_lost() {
            logs.abort();
            return Unwritten {
                bytes: None,
                why: format!("the op was lost: {}", shared.lost_why()),
            };
        }
    }
}

/// How a process ended: `exit code 1`, `killed by signal 9`.
fn exit_status(exit: &spawn::Exit) -> String {
    match (exit.code, exit.signal) {
        (Some(code), _) => format!("exit code {code}"),
        (None, Some(signal)) => format!("killed by signal {signal}"),
        (None, None) => "ended without a status".to_owned(),
    }
}

/// How a run that did not succeed ended, with its last line on stderr: `exit code 1: not yet`.
fn how_it_ended(exit: &spawn::Exit) -> String {
    let how = exit_status(exit);
    match exit
        .stderr_tail
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
    {
        Some(line) => format!("{how}: {}", line.trim()),
        None => how,
    }
}

/// How often a running process's `$CAIRN_PROGRESS` is read.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);

/// The most of a progress line kept.
const PROGRESS_CHARS: usize = 200;

impl ProcessAttempt<'_> {
    /// Waits for the process, recording what it says of its progress in `$CAIRN_PROGRESS` (read
    /// every [`PROGRESS_EVERY`] and once more when it exits; the file is removed then).
    async fn watch_progress(
        &self,
        wait: impl std::future::Future<Output = spawn::Exit>,
        file: &std::path::Path,
    ) -> spawn::Exit {
        tokio::pin!(wait);
        let mut said = None;
        loop {
            tokio::select! {
                biased;
                exit = &mut wait => {
                    self.tell_progress(file, true, &mut said).await;
                    let _ = std::fs::remove_file(file);
                    return exit;
                }
                () = tokio::time::sleep(PROGRESS_EVERY) => {
                    self.tell_progress(file, false, &mut said).await;
                }
            }
        }
    }

    /// Records and shows the file's last progress line, if it is new. Best effort, as logs are:
    /// a failure to record it fails nothing.
    async fn tell_progress(&self, file: &std::path::Path, ended: bool, said: &mut Option<String>) {
        let Some(text) = last_progress(file, ended) else {
            return;
        };
        self.show_progress(text, said).await;
    }

    /// Records and shows `text` as the task's progress, unless it is what was `said` last.
    async fn show_progress(&self, text: String, said: &mut Option<String>) {
        let text = shared_mask(self.shared, &text);
        if said.as_ref() == Some(&text) {
            return;
        }
        let shared = self.shared;
        let _ = shared
            .apply(vec![Change::TaskProgress {
                op: shared.op,
                owner: shared.me.clone(),
                task: self.job.task(),
                text: text.clone(),
            }])
            .await;
        shared.say(&Progress::TaskProgress {
            task: self.job.name.clone(),
            text: text.clone(),
        });
        *said = Some(text);
    }
}

/// The last `progress=...` line of a `$CAIRN_PROGRESS` file, read from its last 4 KiB: the text
/// after `progress=`, `45` shown as `45%`. A line still being written counts only once the
/// process has `ended`.
fn last_progress(file: &std::path::Path, ended: bool) -> Option<String> {
    use std::io::{Read as _, Seek as _};
    let mut f = std::fs::File::open(file).ok()?;
    let len = f.metadata().ok()?.len();
    f.seek(std::io::SeekFrom::Start(len.saturating_sub(4096)))
        .ok()?;
    let mut tail = Vec::new();
    f.read_to_end(&mut tail).ok()?;
    let text = String::from_utf8_lossy(&tail);
    let complete = if ended || text.ends_with('\n') {
        text.as_ref()
    } else {
        text.rsplit_once('\n').map_or("", |(done, _)| done)
    };
    let line = complete
        .lines()
        .rev()
        .find_map(|l| l.trim().strip_prefix("progress="))?
        .trim();
    if line.is_empty() {
        return None;
    }
    let shown = if line.bytes().all(|b| b.is_ascii_digit()) {
        format!("{line}%")
    } else {
        line.to_owned()
    };
    Some(shown.chars().take(PROGRESS_CHARS).collect())
}

/// What the step's process's exit makes of the attempt: interrupted (asked to stop), succeeded
/// (exit 0 and its declared outputs published), or failed, to be retried if the step allows it.
fn judge(shared: &Shared, step: &Step, run: ProcessRun) -> Ended {
    let exit = &run.exit;
    if exit.stopped == Some(Stopped::Asked) {
        return Ended::Interrupted;
    }
    if let Some(error) = run.unreached {
        return Ended::Failed {
            error: shared_mask(shared, &error),
            exit_code: None,
            retryable: true,
        };
    }
    let failure = if exit.stopped == Some(Stopped::TimedOut) {
        Some(format!(
            "timed out after {}",
            plans::units::format_duration(step.timeout.unwrap_or_default())
        ))
    } else if exit.success() {
        match &run.outputs {
            Err(e) => Some(e.clone()),
            Ok(outputs) => missing_output(step, outputs)
                .map(|k| format!("it did not publish its declared output `{k}`")),
        }
    } else {
        let how = exit_status(exit);
        Some(if exit.stderr_tail.is_empty() {
            how
        } else {
            format!("{how}: {}", last_lines(&exit.stderr_tail, 5))
        })
    };
    match failure {
        None => Ended::Succeeded(run.outputs.unwrap_or_default(), false),
        Some(error) => Ended::Failed {
            error: shared_mask(shared, &error),
            exit_code: exit.code,
            retryable: true,
        },
    }
}

/// The process a daemon is recorded by, of those an attempt left running: the oldest (the first
/// started, so the one the others came from), with its group.
fn daemon_of(pids: &[u32]) -> Option<(procs::proc::Identity, u32)> {
    pids.iter()
        .filter_map(|&pid| procs::proc::stat(pid).map(|s| (s.start, pid, s.pgrp)))
        .min()
        .map(|(start, pid, pgrp)| {
            let identity = procs::proc::Identity {
                host: procs::proc::hostname(),
                boot_id: procs::proc::boot_id(),
                pid,
                start,
            };
            (identity, pgrp)
        })
}

impl ProcessAttempt<'_> {
    /// Records what a `daemon` step's command left running as the attempt's process, and keeps
    /// it: probes no longer replace that record, and it is not ended when the step succeeds.
    async fn keep_daemon(&mut self, n: u32, kept: &[u32], marker: &str) -> Result<(), Fatal> {
        let Some((identity, pgid)) = daemon_of(kept) else {
            return Ok(());
        };
        let message = format!(
            "attempt {n}'s command left {} process(es) running as a daemon: pid {} (group {pgid}); they outlive the step",
            kept.len(),
            identity.pid
        );
        self.record_daemon(n, &identity, pgid, message).await?;
        self.daemon = Some(Kept {
            pid: identity.pid,
            pgid: Some(pgid),
            start: Some(identity.start),
            marker: marker.to_owned(),
        });
        Ok(())
    }

    /// Records `identity` as attempt `n`'s process (its daemon), with an event.
    async fn record_daemon(
        &self,
        n: u32,
        identity: &procs::proc::Identity,
        pgid: u32,
        message: String,
    ) -> Result<(), Fatal> {
        let shared = self.shared;
        let at = crate::owner::now();
        shared
            .apply(vec![
                Change::AttemptProcess {
                    op: shared.op,
                    owner: shared.me.clone(),
                    task: self.job.task(),
                    n,
                    process: to_store(identity),
                    pgid,
                    at,
                },
                Change::Event {
                    op: shared.op,
                    owner: Some(shared.me.clone()),
                    at,
                    kind: store::EventKind::DaemonKept,
                    task: Some(self.job.name.clone()),
                    message,
                },
            ])
            .await?;
        Ok(())
    }

    /// A `daemon` step whose earlier attempt was cut off (cairn killed) after its command
    /// started: when what that attempt started still runs, this attempt starts nothing; it takes
    /// that daemon as its own and waits for `until.probe` again. `None`: no such daemon runs, the
    /// command is to run.
    async fn adopt(
        &mut self,
        n: u32,
        marker: &str,
        located: Option<PathBuf>,
    ) -> Result<Option<Ended>, Fatal> {
        let shared = self.shared;
        let Some(until) = &self.step.until else {
            return Ok(None);
        };
        let task = self.job.task();
        let mut earlier: Vec<store::AttemptRow> = shared
            .store
            .reader()
            .and_then(|r| r.attempts(shared.op))
            .map_err(Fatal::from)?
            .into_iter()
            .filter(|a| {
                a.task_no == task && a.n < n && a.status == store::AttemptStatus::Interrupted
            })
            .collect();
        earlier.sort_by_key(|a| std::cmp::Reverse(a.n));
        for attempt in earlier {
            // An attempt cut off before it recorded its pid is found by its marker alone.
            if attempt
                .process
                .as_ref()
                .is_some_and(|p| p.boot_id != procs::proc::boot_id())
            {
                continue;
            }
            let old = Kept {
                pid: 0,
                pgid: attempt.pgid,
                start: attempt.process.as_ref().map(|p| p.start),
                marker: format!("{}/{}/{}", shared.uuid, task.0, attempt.n),
            };
            let Some((identity, pgid)) = daemon_of(&old.processes()) else {
                continue;
            };
            let message = format!(
                "the daemon attempt {} started still runs (pid {}, group {pgid}): not started again; waiting for `until.probe`",
                attempt.n, identity.pid
            );
            self.record_daemon(n, &identity, pgid, message).await?;
            self.daemon = Some(Kept {
                pid: identity.pid,
                pgid: Some(pgid),
                start: Some(identity.start),
                marker: old.marker,
            });
            let first = ProcessRun {
                exit: spawn::Exit {
                    code: Some(0),
                    signal: None,
                    stopped: None,
                    stderr_tail: String::new(),
                    leftovers: 0,
                    kept: Vec::new(),
                },
                outputs: Ok(Map::new()),
                unreached: None,
            };
            let ended = self.wait_until(n, until, first, (marker, located)).await;
            self.settle_daemon(n, &ended).await?;
            return ended.map(Some);
        }
        Ok(None)
    }

    /// Ends a `daemon` step's server unless the step succeeded: a daemon outlives only a step
    /// that saw it ready. A ready one whose recorded process ended meanwhile (the command of an
    /// attempt cut off, taken over with its server) is recorded by the oldest process left.
    async fn settle_daemon(&mut self, n: u32, ended: &Result<Ended, Fatal>) -> Result<(), Fatal> {
        let Some(kept) = self.daemon.take() else {
            return Ok(());
        };
        if !matches!(ended, Ok(Ended::Succeeded(..))) {
            procs::proc::terminate(|| kept.processes(), self.shared.step_grace()).await;
            return Ok(());
        }
        let Some((identity, pgid)) = daemon_of(&kept.processes()) else {
            return Ok(());
        };
        if identity.pid == kept.pid {
            return Ok(());
        }
        let shared = self.shared;
        shared
            .apply(vec![Change::AttemptProcess {
                op: shared.op,
                owner: shared.me.clone(),
                task: self.job.task(),
                n,
                process: to_store(&identity),
                pgid,
                at: crate::owner::now(),
            }])
            .await?;
        Ok(())
    }
}
impl ProcessAttempt<'_> {
    /// [`ProcessAttempt::spawn_and_wait`] for a step on another host: connects (an unreachable
    /// host fails the attempt), starts the step there, records where it runs, streams its logs,
    /// waits, and collects its outputs.
    async fn spawn_remote_and_wait(
        &mut self,
        n: u32,
        launch: Launch,
        target: Target,
    ) -> Result<Result<ProcessRun, String>, Fatal> {
        self.remote_and_wait(n, launch, target, None).await
    }

    /// [`ProcessAttempt::spawn_remote_and_wait`]; `again`: attaches to the supervised command
    /// an earlier run started (`adopt`) instead of starting one, its output in the log up to
    /// these bytes of stdout and stderr.
    async fn remote_and_wait(
        &mut self,
        n: u32,
        launch: Launch,
        target: Target,
        again: Option<[u64; 2]>,
    ) -> Result<Result<ProcessRun, String>, Fatal> {
        let (shared, job, step) = (self.shared, self.job, self.step);
        let transport = match shared.ssh() {
            Ok(t) => t,
            Err(e) => return Ok(Err(e)),
        };
        self.began.get_or_insert_with(Instant::now);
        let mut stop = self.stop.clone();
        match connect_in_time(&transport, &target.host, step.timeout, &mut stop).await {
            None => return Ok(Ok(stopped_before_start())),
            Some(Err(error)) => return Ok(Ok(unreached(error))),
            Some(Ok(())) => {}
        }
        if !shared.lease_holds() {
            return Err(Fatal::Lost(
                "the lease ran out before the step could start".to_owned(),
            ));
        }
        let adopt = step.adopt && !launch.marker.ends_with("/check");
        let remote_job = procs::remote::Job {
            host: target.host.clone(),
            dir: if adopt {
                procs::adopt::dir_name(&shared.uuid, job.task().0, n)
            } else {
                format!("cairn-{}", launch.marker.replace('/', "-"))
            },
            env: remote_env(shared, &launch.env),
            files: remote_files(shared, &launch.env),
            argv: launch.argv,
            cwd: target.cwd,
            timeout: step.timeout,
            grace: shared.options.grace,
            adopt,
        };
        if adopt {
            self.adopted = Some((n, Some(target.host.clone()), remote_job.dir.clone()));
        }
        if adopt && again.is_none() {
            // A retry first ends what attempts before left on their hosts, out of reach then:
            // the step never runs beside itself.
            if let Err(error) = self.end_earlier(n, &transport).await? {
                return Ok(Ok(unreached(error)));
            }
            if let Err(error) = self.record_host(n, &target.host).await? {
                return Ok(Ok(unreached(error)));
            }
        }
        let (sink, chunks) = spawn::sink();
        let spawned = crate::owner::now();
        let deadline = step.timeout.map(|t| tokio::time::Instant::now() + t);
        let mut base = again.unwrap_or_default();
        let started = if again.is_some() {
            procs::remote::reattach(
                &transport,
                remote_job.clone(),
                (&launch.marker, base),
                &sink,
            )
        } else {
            procs::remote::spawn(&transport, remote_job.clone(), &launch.marker, &sink)
        };
        let mut running = match started {
            Ok(r) => r,
            Err(e) => return Ok(Err(e.to_string())),
        };
        let logs = tokio::spawn(write_logs_noting(
            shared.store.clone(),
            (shared.op, shared.me.clone()),
            (job.task(), n),
            chunks,
            (step.log_limit, shared.options.lease / 2),
            shared.secrets.clone(),
            adopt.then_some(base),
        ));
        if let Some(remote) = running.started().await.filter(|_| again.is_none()) {
            shared
                .apply(vec![Change::AttemptProcess {
                    op: shared.op,
                    owner: shared.me.clone(),
                    task: job.task(),
                    n,
                    process: remote_process(&remote),
                    pgid: remote.pid,
                    at: spawned,
                }])
                .await?;
        }
        let stop = self.stop.clone();
        let wait = async move {
            let mut running = running;
            loop {
                let ended = running
                    .hurried_by(shared.stop_handle().subscribe_hurry())
                    .wait_with_grace(stop.clone(), || shared.step_grace())
                    .await;
                if !(adopt && ended.lost) {
                    return ended;
                }
                // The connection was lost while the step runs on: attach again, backing off,
                // until the step's timeout, going on after what came over the lost connection.
                base = [base[0] + ended.forwarded[0], base[1] + ended.forwarded[1]];
                let marker = (launch.marker.as_str(), base);
                match reconnect(&transport, &remote_job, marker, &sink, (&stop, deadline)).await {
                    Ok(again) => running = again,
                    Err(error) => {
                        let mut ended = ended;
                        ended.exit.stderr_tail = error;
                        ended.exit.code = None;
                        if *stop.borrow() {
                            ended.exit.stopped = Some(Stopped::Asked);
                        }
                        return ended;
                    }
                }
            }
        };
        let (mut ended, unwritten) = tokio::join!(wait, finish_logs(shared, logs));
        self.told = ended.recorded.take().map(|told| (n, told));
        if !unwritten.why.is_empty() {
            shared.say(&Progress::LogIncomplete {
                task: job.name.clone(),
                attempt: n,
                bytes: unwritten.bytes,
                why: unwritten.why,
            });
        }
        let outputs = if ended.exit.success() {
            std::fs::write(&launch.output, ended.outputs.as_bytes())
                .map_err(|e| format!("cannot write its outputs: {e}"))
                .and_then(|()| spawn::read_outputs(&launch.output))
        } else {
            Ok(Map::new())
        };
        let _ = std::fs::remove_file(&launch.output);
        Ok(Ok(ProcessRun {
            exit: ended.exit,
            outputs,
            unreached: None,
        }))
    }
}

/// Connects to `host`, within the step's `timeout` (counted from here: a host that does not
/// answer is waited for no longer than the step would run); `None` when the run stopped first.
async fn connect_in_time(
    transport: &procs::remote::Transport,
    host: &str,
    timeout: Option<Duration>,
    stop: &mut watch::Receiver<bool>,
) -> Option<Result<(), String>> {
    let limit = async {
        match timeout {
            Some(t) => tokio::time::sleep(t).await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        connected = transport.connect(host) => Some(connected),
        () = limit => Some(Err(format!(
            "cannot connect to `{host}`: no answer within the step's timeout ({})",
            plans::units::format_duration(timeout.unwrap_or_default())
        ))),
        () = procs::remote::stopped(stop) => None,
    }
}

/// A run that never started because its host could not be reached, or its leftovers there
/// ended: the attempt fails with `error`.
fn unreached(error: String) -> ProcessRun {
    let mut run = stopped_before_start();
    run.exit.stopped = None;
    run.unreached = Some(error);
    run
}

/// A run that never started: stopped before it could.
fn stopped_before_start() -> ProcessRun {
    ProcessRun {
        exit: spawn::Exit {
            code: None,
            signal: None,
            stopped: Some(Stopped::Asked),
            stderr_tail: String::new(),
            leftovers: 0,
            kept: Vec::new(),
        },
        outputs: Ok(Map::new()),
        unreached: None,
    }
}

/// A process on another host as the store records it: its boot id marked `ssh:`, so that a
/// resume's sweep ends it there.
fn remote_process(remote: &procs::remote::Remote) -> store::ProcessId {
    store::ProcessId {
        host: remote.host.clone(),
        boot_id: format!("{}{}", REMOTE_BOOT, remote.boot_id),
        pid: remote.pid,
        start: remote.start,
    }
}

/// How a recorded process's boot id starts when it runs on another host.
pub const REMOTE_BOOT: &str = "ssh:";

/// The environment a step on another host gets on top of its login's: what the plan, the step,
/// the params and cairn set, not this host's own variables (nor its local file paths).
fn remote_env(shared: &Shared, env: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    env.iter()
        .filter(|(k, v)| shared.env.get(*k) != Some(*v))
        .filter(|(k, _)| !matches!(k.as_str(), "CAIRN_OUTPUT" | "CAIRN_PROGRESS"))
        .filter(|(k, _)| !is_param_file(shared, k))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// Whether `var` is a `CAIRN_PARAM_<NAME>_FILE` variable naming the local file of a param too
/// long for the environment (not a param of that name).
fn is_param_file(shared: &Shared, var: &str) -> bool {
    var.starts_with("CAIRN_PARAM_")
        && var.ends_with("_FILE")
        && !shared
            .params
            .keys()
            .any(|name| format!("CAIRN_PARAM_{}", name.to_uppercase()) == var)
}

/// The params too long for the environment, by variable, as the files a step on another host
/// gets: their text, read from the local files.
fn remote_files(shared: &Shared, env: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    env.iter()
        .filter(|(k, _)| is_param_file(shared, k))
        .filter_map(|(k, path)| Some((k.clone(), std::fs::read_to_string(path).ok()?)))
        .collect()
}

impl ProcessAttempt<'_> {
    /// Ends what the attempts of this task before `n` left on their hosts when their notes say
    /// they may still run there (the host was out of reach when the attempt ended), and removes
    /// their directories; an error when a host still cannot be reached.
    async fn end_earlier(
        &self,
        n: u32,
        transport: &procs::remote::Transport,
    ) -> Result<Result<(), String>, Fatal> {
        if n <= 1 {
            return Ok(Ok(()));
        }
        let task = self.job.task().0;
        let left = procs::adopt::hosts_of(&self.shared.uuid)
            .into_iter()
            .filter(|&(t, m, ..)| t == task && m < n);
        for (_, m, host, note) in left {
            if let Err(error) = self.end_left(m, &host, &note, transport).await? {
                return Ok(Err(error));
            }
        }
        Ok(Ok(()))
    }

    /// [`ProcessAttempt::end_earlier`] for attempt `m`, noted at `note` as on `host`.
    async fn end_left(
        &self,
        m: u32,
        host: &str,
        note: &std::path::Path,
        transport: &procs::remote::Transport,
    ) -> Result<Result<(), String>, Fatal> {
        use procs::adopt::Found;
        let shared = self.shared;
        let dir = procs::adopt::dir_name(&shared.uuid, self.job.task().0, m);
        let grace = shared.options.grace;
        let found = match procs::remote::probe(transport, host, &dir, (grace, false)).await {
            Ok(Found::Gone) => Ok(Found::Gone),
            Ok(found) => procs::remote::probe(transport, host, &dir, (grace, true))
                .await
                .map(|_| found),
            Err(e) => Err(e),
        };
        let found = match found {
            Ok(found) => found,
            Err(e) => {
                return Ok(Err(format!(
                    "attempt {m} may still run on `{host}`, which could not be reached to end it: {e}"
                )));
            }
        };
        let _ = std::fs::remove_file(note);
        if !matches!(found, Found::Running { .. }) {
            return Ok(Ok(()));
        }
        shared
            .apply(vec![Change::Event {
                op: shared.op,
                owner: Some(shared.me.clone()),
                at: crate::owner::now(),
                kind: store::EventKind::LeftoversEnded,
                task: Some(self.job.name.clone()),
                message: format!(
                    "ended what attempt {m} left on `{host}`, out of reach when it ended, before the step runs again"
                ),
            }])
            .await?;
        Ok(Ok(()))
    }

    /// Records attempt `n`'s host before anything starts there (`adopt`): a resume finds the
    /// step's directory there even if this run dies before the step says its pid. Notes it on
    /// this host too, until the directory is removed ([`procs::adopt::host_file`]).
    async fn record_host(&self, n: u32, host: &str) -> Result<Result<(), String>, Fatal> {
        let shared = self.shared;
        let dir = procs::adopt::dir_name(&shared.uuid, self.job.task().0, n);
        if let Err(e) = procs::adopt::note_host(&dir, host) {
            return Ok(Err(format!(
                "cannot note on this host where attempt {n} runs, so it could not be ended if `{host}` went out of reach: {e}"
            )));
        }
        shared
            .apply(vec![Change::AttemptProcess {
                op: shared.op,
                owner: shared.me.clone(),
                task: self.job.task(),
                n,
                process: remote_process(&procs::remote::Remote {
                    host: host.to_owned(),
                    pid: 0,
                    start: 0,
                    boot_id: String::new(),
                }),
                pgid: 0,
                at: crate::owner::now(),
            }])
            .await?;
        Ok(Ok(()))
    }
}

/// Attaches again to a supervised step on `job`'s host whose connection was lost: tries with a
/// growing delay (half a second, doubling up to 10 s) until it answers, the run stops, or the
/// step's timeout (`deadline`) passes, which fails the attempt naming the host.
async fn reconnect(
    transport: &std::sync::Arc<procs::remote::Transport>,
    job: &procs::remote::Job,
    (marker, from): (&str, [u64; 2]),
    sink: &tokio::sync::mpsc::Sender<spawn::Chunk>,
    (stop, deadline): (&watch::Receiver<bool>, Option<tokio::time::Instant>),
) -> Result<procs::remote::RemoteRunning, String> {
    let mut delay = Duration::from_millis(500);
    let mut stop = stop.clone();
    loop {
        let wait = match deadline {
            Some(d) => {
                let left = d.saturating_duration_since(tokio::time::Instant::now());
                if left.is_zero() {
                    return Err(format!(
                        "lost the connection to `{}` and could not attach again within the step's timeout",
                        job.host
                    ));
                }
                delay.min(left)
            }
            None => delay,
        };
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = procs::remote::stopped(&mut stop) => {
                return Err(format!("stopped while reconnecting to `{}`", job.host));
            }
        }
        delay = (delay * 2).min(Duration::from_secs(10));
        transport.forget(&job.host).await;
        let found = procs::remote::probe(transport, &job.host, &job.dir, (job.grace, false)).await;
        match found {
            Err(_) => continue,
            Ok(procs::adopt::Found::Gone) => {
                return Err(format!(
                    "lost the connection to `{}`; the step's process there ended without a result",
                    job.host
                ));
            }
            Ok(_) => {}
        }
        let mut again = job.clone();
        again.timeout = deadline.map(|d| d.saturating_duration_since(tokio::time::Instant::now()));
        if let Ok(running) = procs::remote::reattach(transport, again, (marker, from), sink) {
            return Ok(running);
        }
    }
}

/// A supervised command's exit as its directory says: its exit code (a shell's 128 + N is
/// signal N) and the end of its stderr.
fn supervised_exit(exit: &mut spawn::Exit, dir: &std::path::Path) {
    if exit.stopped.is_none()
        && let Some(code) = procs::adopt::exit_code(dir)
    {
        set_code(exit, code);
    }
    exit.stderr_tail = procs::adopt::stderr_tail(dir);
}

fn set_code(exit: &mut spawn::Exit, code: i32) {
    if code > 128 && code < 128 + 65 {
        exit.code = None;
        exit.signal = Some(code - 128);
    } else {
        exit.code = Some(code);
        exit.signal = None;
    }
}

impl ProcessAttempt<'_> {
    /// Attempt `n`, left running by a run that died (`adopt`): its result collected if it ended,
    /// else waited for, its output streamed from where that run left it; no new attempt, the
    /// command does not run again.
    async fn reattach(&mut self, n: u32, logged: [u64; 2]) -> Result<Ended, Fatal> {
        let (shared, job, step) = (self.shared, self.job, self.step);
        let at = crate::owner::now();
        shared
            .apply(vec![Change::Event {
                op: shared.op,
                owner: Some(shared.me.clone()),
                at,
                kind: store::EventKind::Adopted,
                task: Some(job.name.clone()),
                message: format!(
                    "attempt {n}'s process outlived the run that started it: its result is collected, not run again"
                ),
            }])
            .await?;
        shared.say(&Progress::TaskStarted {
            task: job.name.clone(),
            attempt: n,
        });
        self.began.get_or_insert_with(Instant::now);
        let run = if let Some(target) = self.remote.clone() {
            // Noted again: the run that started it may have been another node's.
            let dir = procs::adopt::dir_name(&shared.uuid, job.task().0, n);
            let _ = procs::adopt::note_host(&dir, &target.host);
            let (output, env) = match process_files(shared, step, self.ctx, job, n) {
                Ok(made) => made,
                Err(error) => return Ok(failed_early(error)),
            };
            let launch = Launch {
                argv: self.argv.clone(),
                located: None,
                env,
                output,
                cwd: self.cwd.clone(),
                marker: format!("{}/{}/{n}", shared.uuid, job.no),
                keep: false,
            };
            self.remote_and_wait(n, launch, target, Some(logged))
                .await?
        } else {
            self.reattach_local(n, logged).await?
        };
        Ok(match run {
            Ok(run) => judge(shared, step, run),
            Err(error) => failed_early(error),
        })
    }

    /// [`ProcessAttempt::reattach`] on this host: watches the attempt's directory until its
    /// result is written, the run stops or the step's timeout passes (both end its group).
    async fn reattach_local(
        &mut self,
        n: u32,
        logged: [u64; 2],
    ) -> Result<Result<ProcessRun, String>, Fatal> {
        use procs::adopt::Found;
        let (shared, job, step) = (self.shared, self.job, self.step);
        let dir = procs::adopt::dir(&shared.uuid, job.task().0, n);
        let marker = format!("{}/{}/{n}", shared.uuid, job.no);
        self.adopted = Some((n, None, dir.display().to_string()));
        let (sink, chunks) = spawn::sink();
        let (done, finished) = tokio::sync::oneshot::channel::<()>();
        let tail = procs::adopt::Tail::new(&dir, logged);
        let tail = tokio::spawn(tail.follow(sink, async {
            let _ = finished.await;
        }));
        let logs = tokio::spawn(write_logs_noting(
            shared.store.clone(),
            (shared.op, shared.me.clone()),
            (job.task(), n),
            chunks,
            (step.log_limit, shared.options.lease / 2),
            shared.secrets.clone(),
            Some(logged),
        ));
        let mut stop = self.stop.clone();
        let wait = async {
            let limit = async {
                match step.timeout {
                    Some(t) => tokio::time::sleep(t).await,
                    None => std::future::pending().await,
                }
            };
            tokio::pin!(limit);
            let mut leader = None;
            let (found, stopped) = loop {
                let found = procs::adopt::probe(&dir);
                let Found::Running { pid, start } = found else {
                    break (found, None);
                };
                leader = Some((pid, start));
                tokio::select! {
                    biased;
                    () = procs::remote::stopped(&mut stop) => break (found, Some(Stopped::Asked)),
                    () = &mut limit => break (found, Some(Stopped::TimedOut)),
                    () = tokio::time::sleep(Duration::from_millis(200)) => {}
                }
            };
            // What is left of its group (or carries its marker) ends with it.
            let (pgid, start) = leader.map_or((None, None), |(p, s)| (Some(p), Some(s)));
            let grace = if stopped.is_some() {
                shared.step_grace()
            } else {
                Duration::ZERO
            };
            let leftovers = procs::proc::terminate_or_sooner(
                || procs::proc::attempt_processes(pgid, start, &marker),
                grace,
                shared.stop_handle().hurried(),
            )
            .await;
            let _ = done.send(());
            let _ = tail.await;
            let mut exit = spawn::Exit {
                code: None,
                signal: None,
                stopped,
                stderr_tail: procs::adopt::stderr_tail(&dir),
                leftovers,
                kept: Vec::new(),
            };
            match found {
                Found::Finished(code) if stopped.is_none() => set_code(&mut exit, code),
                Found::Gone => {
                    "its process ended without a result (its supervisor was killed, or the host rebooted)".clone_into(&mut exit.stderr_tail);
                }
                _ => {}
            }
            exit
        };
        let (exit, unwritten) = tokio::join!(wait, finish_logs(shared, logs));
        if !unwritten.why.is_empty() {
            shared.say(&Progress::LogIncomplete {
                task: job.name.clone(),
                attempt: n,
                bytes: unwritten.bytes,
                why: unwritten.why,
            });
        }
        let outputs = if exit.success() {
            spawn::read_outputs(&dir.join("output"))
        } else {
            Ok(Map::new())
        };
        Ok(Ok(ProcessRun {
            exit,
            outputs,
            unreached: None,
        }))
    }
}
