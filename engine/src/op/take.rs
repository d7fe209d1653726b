//! Taking an op over for this process: refused while its owner lives; what a dead owner left
//! running (its processes, its children's) is ended and its attempts recorded interrupted before
//! any task runs again (`sweep`); then the op's state is loaded (`take_and_load`).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::Arc;

use serde_json::Map;
use serde_json::Value;
use store::AttemptStatus;
use store::Change;
use store::EventKind;
use store::OpId;
use store::OpStatus;
use store::Outcome as TaskOutcome;
use store::ProcessId;
use store::Reader;
use store::Store;
use store::TaskNo;
use store::TaskStatus;

use super::lock::{Acquire, Acquired};
use super::params::ParamChanges;
use super::replan::{PlanDrift, Replan, TakenOver};
use super::{
    Error, Overrides, RunParts, children, dead_owner_or_refuse, secret_values, shared,
    snapshot_plan,
};
use crate::options::Options;
use crate::owner;
use crate::owner::OwnerState;
use crate::owner::now;
use crate::progress::Sink;
use crate::progress::{Progress, Start};
use crate::run::rest::Loaded;
use crate::secrets;
use crate::shutdown::StopHandle;
use crate::task::context::Shared;
use crate::task::files::OutputFiles;

/// Ends the processes an attempt left running (on this machine); how many there were. A second
/// Ctrl-C (`stop` hurried) ends their grace. Of a `daemon` step's attempt (`daemon`), only its
/// probes: its server outlives the run that started it, and the next attempt waits for it again.
async fn end_leftovers(
    uuid: &str,
    (attempt, daemon): (&store::AttemptRow, bool),
    options: &Options,
    stop: &StopHandle,
) -> usize {
    let marker = format!("{uuid}/{}/{}", attempt.task_no.0, attempt.n);
    if let Some(process) = attempt
        .process
        .as_ref()
        .filter(|p| p.boot_id.starts_with(crate::task::process::REMOTE_BOOT))
    {
        return end_remote_leftovers(process, &marker, options, stop).await;
    }
    let same_machine = attempt
        .process
        .as_ref()
        .is_none_or(|p| p.boot_id == procs::proc::boot_id());
    if !same_machine {
        return 0;
    }
    let pgid = attempt.pgid;
    let start = attempt.process.as_ref().map(|p| p.start);
    let check_marker = format!("{marker}/check");
    // The groups its marked processes lead, with the recorded one: the record may not be in yet
    // (a process is recorded once it has run 10 ms), or name an earlier process of the attempt.
    let leaders = if daemon {
        Vec::new()
    } else {
        procs::proc::marked_leaders(&marker)
    };
    let checks = procs::proc::marked_leaders(&check_marker);
    procs::proc::terminate_or_sooner(
        || {
            let mut pids = if daemon {
                Vec::new()
            } else {
                procs::proc::attempt_processes(pgid, start, &marker)
            };
            pids.extend(procs::proc::attempt_processes(None, None, &check_marker));
            for &(leader, since) in &leaders {
                pids.extend(procs::proc::attempt_processes(
                    Some(leader),
                    Some(since),
                    &marker,
                ));
            }
            for &(leader, since) in &checks {
                let found =
                    procs::proc::attempt_processes(Some(leader), Some(since), &check_marker);
                pids.extend(found);
            }
            pids.sort_unstable();
            pids.dedup();
            pids
        },
        options.grace,
        stop.hurried(),
    )
    .await
}

/// Ends what an attempt left running on another host (its process group there, recorded by pid,
/// start time and boot id) and removes its directories there, then the local `ssh` clients that
/// carry its marker. A host that cannot be reached is said, and the sweep goes on.
async fn end_remote_leftovers(
    process: &ProcessId,
    marker: &str,
    options: &Options,
    stop: &StopHandle,
) -> usize {
    let remote = procs::remote::Remote {
        host: process.host.clone(),
        pid: process.pid,
        start: process.start,
        boot_id: process.boot_id[crate::task::process::REMOTE_BOOT.len()..].to_owned(),
    };
    let dir = format!("cairn-{}", marker.replace('/', "-"));
    let dirs = [dir.clone(), format!("{dir}-check")];
    let ended = match procs::remote::Transport::new() {
        // A supervised step's attempt that died before its step said its pid (0) has only its
        // directory there, handled by `adopt_or_end`.
        Ok(_) if remote.pid == 0 => Ok(0),
        Ok(transport) => procs::remote::end(&transport, &remote, options.grace, Some(&dirs)).await,
        Err(e) => Err(e.to_string()),
    };
    let remote_count = ended.unwrap_or_else(|e| {
        eprintln!(
            "warning: cannot end what an attempt left on `{}`: {e}",
            remote.host
        );
        0
    });
    let check_marker = format!("{marker}/check");
    let local = procs::proc::terminate_or_sooner(
        || {
            let mut pids = procs::proc::attempt_processes(None, None, marker);
            pids.extend(procs::proc::attempt_processes(None, None, &check_marker));
            pids
        },
        options.grace,
        stop.hurried(),
    )
    .await;
    remote_count + local
}

/// Ends the processes left by the running attempts of `op`'s child ops (and theirs) whose owner is
/// gone, when `op` is taken over: nothing of a dead run may go on while the op's tasks are decided
/// again. Their attempts are recorded when the children themselves are resumed.
fn end_children_leftovers<'a>(
    reader: &'a Reader,
    rule: owner::Rule,
    op: OpId,
    options: &'a Options,
    stop: &'a StopHandle,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), Error>> + Send + 'a>> {
    Box::pin(async move {
        for child in reader.children(op)? {
            if child.status.is_final()
                || matches!(rule.owner_state(&child, now()), OwnerState::Alive(_))
            {
                continue;
            }
            let running = reader.running_attempts(child.id)?;
            let daemons = daemon_tasks(reader, &child, &running)?;
            for attempt in running {
                let daemon = daemons.contains(&attempt.task_no);
                end_leftovers(&child.uuid, (&attempt, daemon), options, stop).await;
            }
            end_children_leftovers(reader, rule, child.id, options, stop).await?;
        }
        Ok(())
    })
}

/// The tasks of `running` (attempts of `row`) that run `daemon` steps, whose server a takeover
/// spares: none when the op is to be canceled (a daemon not yet seen ready is ended with its step).
fn daemon_tasks(
    reader: &Reader,
    row: &store::OpRow,
    running: &[store::AttemptRow],
) -> Result<std::collections::HashSet<TaskNo>, Error> {
    let canceling = || {
        reader
            .op_head(row.id)
            .map_or(row.cancel.is_some(), |r| r.cancel.is_some())
    };
    if running.is_empty() || canceling() {
        return Ok(std::collections::HashSet::new());
    }
    running_tasks_of(reader, row, running, &["daemon"], |step| step.daemon)
}

/// The tasks of `running` (attempts of `row` left running) whose steps have `adopt`.
fn adopt_tasks(
    reader: &Reader,
    row: &store::OpRow,
    running: &[store::AttemptRow],
) -> Result<std::collections::HashSet<TaskNo>, Error> {
    running_tasks_of(reader, row, running, &["adopt", "on:"], |step| step.adopt)
}

/// The tasks of `running` whose steps are `chosen`. The plan is parsed only when its text names
/// one of `words` (a plan that names none has no such step), and only the running attempts'
/// tasks are read, never all the op's (a fan-out may have a million).
fn running_tasks_of(
    reader: &Reader,
    row: &store::OpRow,
    running: &[store::AttemptRow],
    words: &[&str],
    chosen: impl Fn(&plans::model::Step) -> bool,
) -> Result<std::collections::HashSet<TaskNo>, Error> {
    let mut tasks = std::collections::HashSet::new();
    if running.is_empty() {
        return Ok(tasks);
    }
    let text = reader.snapshot(row.id)?.text;
    if !words.iter().any(|word| text.contains(word)) {
        return Ok(tasks);
    }
    let plan = snapshot_plan(reader, row.id)?;
    if !plan.steps.iter().any(&chosen) {
        return Ok(tasks);
    }
    for attempt in running {
        let task = reader.task(row.id, attempt.task_no)?;
        if plan
            .step_index(&task.step)
            .is_some_and(|i| chosen(&plan.steps[i]))
        {
            tasks.insert(task.task_no);
        }
    }
    Ok(tasks)
}

/// For an attempt of an `adopt` step left `running`: whether its command is to be taken again
/// (its result is in its directory, or it still runs); if not (`adopt` false: a cancel or
/// `--restart-running`; or it is gone without a result), what is left of it there is ended and
/// its directory removed, and the sweep goes on as for any step.
async fn adopt_or_end(
    uuid: &str,
    attempt: &store::AttemptRow,
    adopt: bool,
    options: &Options,
) -> bool {
    use procs::adopt::Found;
    let remote = attempt
        .process
        .as_ref()
        .filter(|p| p.boot_id.starts_with(crate::task::process::REMOTE_BOOT));
    let Some(process) = remote else {
        let dir = procs::adopt::dir(uuid, attempt.task_no.0, attempt.n);
        let found = procs::adopt::probe(&dir);
        if adopt && found != Found::Gone {
            return true;
        }
        // Its processes are found by its group and marker, as any step's.
        procs::adopt::remove(&dir);
        return false;
    };
    let dir = procs::adopt::dir_name(uuid, attempt.task_no.0, attempt.n);
    let Ok(transport) = procs::remote::Transport::new() else {
        return adopt;
    };
    match procs::remote::probe(&transport, &process.host, &dir, (options.grace, !adopt)).await {
        Ok(Found::Gone) => false,
        Ok(_) => adopt,
        Err(e) => {
            // Unreachable now: the attempt is taken again (its host is tried until the step's
            // timeout), or, ended, said.
            if !adopt {
                eprintln!(
                    "warning: cannot end what an attempt left on `{}`: {e}",
                    process.host
                );
            }
            adopt
        }
    }
}

/// The grace a cancel request of `row` asks for, as the store has it now (the request may be newer
/// than `row`).
fn cancel_grace(reader: &Reader, row: &store::OpRow) -> Option<std::time::Duration> {
    let now = reader.op_head(row.id).ok();
    let row = now.as_ref().unwrap_or(row);
    row.cancel.as_ref()?;
    let ms = row.cancel_grace_ms?;
    Some(std::time::Duration::from_millis(
        u64::try_from(ms).unwrap_or(0),
    ))
}

/// Ends whatever is left of attempts that were running when their owner died, and records them
/// interrupted, before any task runs again.
async fn sweep(
    store: &Store,
    reader: &Reader,
    row: &store::OpRow,
    me: &ProcessId,
    (options, stop): (&Options, &StopHandle),
    progress: &Sink,
    adopting: bool,
) -> Result<(), Error> {
    // Only the running attempts and their tasks are read: a resume of an op of a million tasks
    // does not read them all before its first new task starts.
    let running = reader.running_attempts(row.id)?;
    let daemons = daemon_tasks(reader, row, &running)?;
    let adopted = adopt_tasks(reader, row, &running)?;
    let canceling = reader
        .op_head(row.id)
        .map_or(row.cancel.is_some(), |r| r.cancel.is_some());
    let adopting = adopting && !canceling && !options.restart_running;
    for attempt in running {
        // Left `running`: the task takes this attempt again (`task::process`).
        if adopted.contains(&attempt.task_no)
            && adopt_or_end(&row.uuid, &attempt, adopting, options).await
        {
            continue;
        }
        let step = match reader.task(row.id, attempt.task_no) {
            Ok(task) => task.name,
            Err(store::Error::NotFound(_)) => "?".to_owned(),
            Err(e) => return Err(e.into()),
        };
        let daemon = daemons.contains(&attempt.task_no);
        let count = end_leftovers(&row.uuid, (&attempt, daemon), options, stop).await;
        let mut batch = Vec::new();
        if count > 0 {
            batch.push(Change::Event {
                op: row.id,
                owner: Some(me.clone()),
                at: now(),
                kind: EventKind::LeftoversEnded,
                task: Some(step.clone()),
                message: format!("ended {count} process(es) left running by attempt {} before running the task again", attempt.n),
            });
            progress(&Progress::LeftoversEnded {
                task: step.clone(),
                attempt: attempt.n,
                count,
            });
        }
        batch.push(Change::FinishAttempt {
            op: row.id,
            owner: me.clone(),
            task: attempt.task_no,
            n: attempt.n,
            at: now(),
            outcome: TaskOutcome {
                task: TaskStatus::Pending,
                attempt: AttemptStatus::Interrupted,
                exit_code: None,
                error: Some(
                    "its run ended without recording its end (the process died, or lost the op)"
                        .to_owned(),
                ),
                outputs: None,
                by_check: false,
            },
        });
        store.apply(batch).await?;
    }
    // A supervised attempt's directory whose end was recorded just before a kill: it goes now.
    let running: std::collections::HashSet<(u32, u32)> = reader
        .running_attempts(row.id)?
        .into_iter()
        .map(|a| (a.task_no.0, a.n))
        .collect();
    // And one on another host, the same (first: that host may be this one).
    let left: Vec<_> = procs::adopt::hosts_of(&row.uuid)
        .into_iter()
        .filter(|(task, n, ..)| !running.contains(&(*task, *n)))
        .collect();
    if !left.is_empty() {
        end_left_on_hosts(store, reader, row, (me, options), progress, left).await?;
    }
    for (task, n, dir) in procs::adopt::dirs_of(&row.uuid) {
        if !running.contains(&(task, n)) {
            procs::adopt::remove(&dir);
        }
    }
    Ok(())
}

/// Ends what attempts no longer running left on other hosts, and removes their directories there:
/// those whose `.host` note is still here ([`procs::adopt::host_file`]), because their run could
/// not remove them (the host was out of reach when the attempt's end was recorded, even past the
/// step's timeout while its command ran on, or cairn was killed first). A host still out of reach
/// is said, its note kept for the next time.
async fn end_left_on_hosts(
    store: &Store,
    reader: &Reader,
    row: &store::OpRow,
    (me, options): (&ProcessId, &Options),
    progress: &Sink,
    left: Vec<(u32, u32, String, PathBuf)>,
) -> Result<(), Error> {
    use procs::adopt::Found;
    let Ok(transport) = procs::remote::Transport::new() else {
        return Ok(());
    };
    for (task, n, host, note) in left {
        let dir = procs::adopt::dir_name(&row.uuid, task, n);
        let ended =
            match procs::remote::probe(&transport, &host, &dir, (options.grace, false)).await {
                // Nothing left running there (what was left of the directory is removed).
                Ok(Found::Gone) => Ok(false),
                Ok(found) => procs::remote::probe(&transport, &host, &dir, (options.grace, true))
                    .await
                    .map(|_| matches!(found, Found::Running { .. })),
                Err(e) => Err(e),
            };
        let ran = match ended {
            Ok(ran) => ran,
            Err(e) => {
                eprintln!("warning: cannot end what attempt {n} left on `{host}`: {e}");
                continue;
            }
        };
        let _ = std::fs::remove_file(&note);
        if !ran {
            continue;
        }
        let step = match reader.task(row.id, TaskNo(task)) {
            Ok(task) => task.name,
            Err(store::Error::NotFound(_)) => "?".to_owned(),
            Err(e) => return Err(e.into()),
        };
        store
            .apply(vec![Change::Event {
                op: row.id,
                owner: Some(me.clone()),
                at: now(),
                kind: EventKind::LeftoversEnded,
                task: Some(step.clone()),
                message: format!(
                    "ended what attempt {n} left running on `{host}`, out of reach when its end was recorded"
                ),
            }])
            .await?;
        progress(&Progress::LeftoversEnded {
            task: step,
            attempt: n,
            count: 1,
        });
    }
    Ok(())
}

/// How an op is taken over for this process: the options and handles its run gets, and what its
/// events say.
pub(crate) struct Takeover<'a> {
    pub store: &'a Store,
    pub options: Options,
    pub overrides: Overrides,
    pub progress: Sink,
    pub stop: StopHandle,
    /// The event's kind and its message's verb, e.g. [`EventKind::AutoResumed`] and
    /// "resumed by cairn serve".
    pub kind: EventKind,
    pub verb: &'a str,
    /// A succeeded op runs again (`--from`, `--plan`).
    pub reopen: bool,
}

impl Takeover<'_> {
    /// Takes an op over for this process: refused while its owner lives. Also takes the op's
    /// lock, waiting for it (or not, with `no_wait`) when another op holds it.
    ///
    /// A claim refused because another process owns the op is judged again on the op as it is
    /// now: on a server, a process killed in the middle of its claim may have it committed after
    /// its death (the server finishes what it received), and a dead owner is taken over.
    async fn take(&self, row: &store::OpRow) -> Result<(Acquired, ProcessId), Error> {
        let mut row = row.clone();
        let mut tries = 0;
        loop {
            match self.take_once(&row).await {
                Err(refused @ Error::Owned { .. }) if tries < 3 => {
                    tries += 1;
                    let now_row = self
                        .store
                        .reader()
                        .and_then(|reader| reader.op_head(row.id))
                        .map_err(Error::from_store)?;
                    let rule = owner::Rule::of(self.store.location());
                    if !matches!(rule.owner_state(&now_row, now()), OwnerState::Dead(_)) {
                        return Err(refused);
                    }
                    row = now_row;
                }
                other => return other,
            }
        }
    }

    async fn take_once(&self, row: &store::OpRow) -> Result<(Acquired, ProcessId), Error> {
        let op = row.id;
        if row.status.is_final() && !(self.reopen && row.status == OpStatus::Succeeded) {
            return Err(Error::Final {
                op,
                status: row.status,
            });
        }
        let me = owner::me();
        // An op this process reserved (`cairn serve`) is its own: its claim goes through.
        let dead = if row.owner.as_ref() == Some(&me) {
            None
        } else {
            dead_owner_or_refuse(self.store, row)?
        };
        let mut message = format!("{} by {me}", self.verb);
        if let Some(dead) = &dead {
            write!(message, "; its previous owner ({dead}) is gone").ok();
        }
        let acquired = Acquire {
            store: self.store,
            op,
            me: &me,
            dead,
            options: &self.options,
            overrides: self.overrides,
            progress: &self.progress,
            kind: self.kind,
            message,
            reopen: self.reopen,
        }
        .run(&self.stop)
        .await?;
        Ok((acquired, me))
    }

    /// Takes the op over, ends what its dead owner left running, and loads its state. With
    /// `replace`, the op goes on with an edited plan (see [`super::plan_drift`]): its tasks are
    /// renumbered to it once the op is taken and swept.
    pub(super) async fn take_and_load(
        self,
        reader: &Reader,
        row: &store::OpRow,
        replace: Option<(Replan, PlanDrift)>,
        new_params: Option<&ParamChanges>,
    ) -> Result<Result<(Arc<Shared>, Loaded), Acquired>, Error> {
        let store = self.store;
        let op = row.id;
        let mut plan = snapshot_plan(reader, op)?;
        let stored: Map<String, Value> = row.params.as_object().cloned().unwrap_or_default();
        let key = if stored.values().any(secrets::is_sealed) {
            secrets::key(store, false)?
        } else {
            None
        };
        let mut sealed: Vec<String> = stored
            .iter()
            .filter(|(_, v)| secrets::is_sealed(v))
            .map(|(k, _)| k.clone())
            .collect();
        let mut params = secrets::open(&stored, key.as_ref())?;
        let (acquired, me) = self.take(row).await?;
        if acquired != Acquired::Yes {
            return Ok(Err(acquired));
        }
        (self.progress)(&Progress::OpStarted {
            op,
            title: row.title.clone(),
            how: match self.kind {
                EventKind::Started => Start::New,
                EventKind::CancelTaken => Start::ToCancel,
                _ => Start::Resumed,
            },
        });
        // An op asked to be canceled with a grace (`cairn cancel --grace`) has its leftovers ended
        // with that grace, whoever finishes the cancel.
        let leftovers = cancel_grace(reader, row).map_or_else(
            || self.options.clone(),
            |grace| Options {
                grace,
                ..self.options.clone()
            },
        );
        let ending = (&leftovers, &self.stop);
        // An edited plan or params renumber or reset tasks: attempts are not taken again then.
        let edited = replace.is_some() || new_params.is_some();
        let adopting = !edited;
        sweep(store, reader, row, &me, ending, &self.progress, adopting).await?;
        let rule = owner::Rule::of(store.location());
        end_children_leftovers(reader, rule, op, &leftovers, &self.stop).await?;
        OutputFiles::remove_left(&row.uuid);
        let taken = TakenOver {
            store,
            reader,
            row,
            me: &me,
            options: &self.options,
            progress: &self.progress,
        };
        if let Some((replan, drift)) = replace {
            plan = taken.replan(&plan, replan, drift, &mut params).await?;
        }
        if let Some(changes) = new_params {
            taken
                .set_params(&plan, changes, &mut params, &mut sealed)
                .await?;
        }
        // Ending leftovers may take longer than the lease the claim wrote: renew it (a fenced
        // write, which also proves this process still owns the op) before anything runs, and
        // count from what was written, never from the claim.
        let lease = renew_lease(store, op, &me, &self.options).await?;
        let env: BTreeMap<String, String> = row
            .env
            .iter()
            .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
            .collect();
        let secrets = secret_values(&plan, &params, &sealed);
        let files = reader.snapshot(op)?.files.into_iter().collect();
        let (ancestors, _) = children::lineage(reader, row.parent)?;
        let run = RunParts {
            plan: Arc::new(plan),
            op,
            uuid: row.uuid.clone(),
            title: row.title.clone(),
            me,
            params,
            env,
            workdir: PathBuf::from(&row.workdir),
            secrets,
            files: Arc::new(files),
            ancestors,
            lease_until: lease,
        };
        let shared = shared(store, run, self.options, self.progress, self.stop)?;
        // An edited plan or params take every task at once; a plain take-over starts with the
        // first part of a large op's.
        let tasks = if edited {
            Loaded::read_whole(&shared, reader)?
        } else {
            Loaded::read(&shared, reader)?
        };
        Ok(Ok((shared, tasks)))
    }
}

/// Renews the lease on `op` for `options.lease` from now; the lease written.
async fn renew_lease(
    store: &Store,
    op: OpId,
    me: &ProcessId,
    options: &Options,
) -> Result<store::Millis, Error> {
    let until = super::lease_until(options);
    store
        .apply(vec![Change::Heartbeat {
            op,
            owner: me.clone(),
            lease_until: until,
        }])
        .await?;
    Ok(until)
}
