//! Starting an op: [`submit`] queues it for `cairn serve`; [`run`] stores it owned by this process
//! (waiting for its lock if another op holds it) and runs it. `new_op`: the op row to store.

use std::sync::Arc;

use plans::template::Context;
use plans::template::Template;
use serde_json::Value;
use store::Applied;
use store::Change;
use store::EventKind;
use store::Millis;
use store::NewOp;
use store::NewTask;
use store::OpId;
use store::OpStatus;
use store::Snapshot;
use store::Store;
use store::TaskNo;

use super::lock::{Acquire, Acquired};
use super::{
    Error, NewRun, Overrides, RunParts, check_pause, children, lease_until, lock_error,
    pause_event, secret_names, secret_values, shared,
};
use crate::options::Options;
use crate::outcome::RunEnd;
use crate::owner;
use crate::owner::now;
use crate::progress::Sink;
use crate::progress::{Progress, Start};
use crate::run::rest::Loaded;
use crate::run::scheduler::TaskState;
use crate::secrets;
use crate::shutdown::StopHandle;

/// The op to store for `new`: title and lock key rendered, secrets sealed, one task per step;
/// `queued`, with no owner (the caller sets one to run it at once). `held`: lock keys its
/// ancestors hold (a sub-plan's op does not take them again).
fn new_op(
    store: &Store,
    new: &NewRun,
    held: &[String],
    overrides: Overrides,
) -> Result<NewOp, Error> {
    let uuid = uuid::Uuid::now_v7().to_string();
    let title = match &new.plan.title {
        Some(t) => render_header(t, new, &uuid, "title")?,
        None => new.plan.name.clone(),
    };
    let lock = new
        .plan
        .lock
        .as_ref()
        .map(|t| render_header(t, new, &uuid, "lock key"))
        .transpose()?
        // A sub-plan's op runs under its ancestors' locks: it never waits for them.
        .filter(|key| !held.contains(key));
    let secret = secret_names(&new.plan);
    let stored_params = if secret.iter().any(|n| new.params.contains_key(*n)) {
        let key = secrets::key(store, true)?.ok_or_else(|| secrets::Error::Key {
            path: store.secret_key_file(),
            reason: "it could not be created".into(),
        })?;
        secrets::seal(&new.params, &secret, &key)
    } else {
        new.params.clone()
    };
    Ok(NewOp {
        uuid,
        snapshot: Snapshot {
            hash: plans::bundle::hash(&new.plan.text, &new.files),
            name: new.plan.name.clone(),
            text: new.plan.text.clone(),
            files: new.files.clone(),
        },
        title,
        status: OpStatus::Queued,
        params: Value::Object(stored_params),
        workdir: new.workdir.display().to_string(),
        env: new
            .env
            .iter()
            .map(|(k, v)| (k.clone(), Value::String(v.clone())))
            .collect(),
        tasks: new
            .plan
            .steps
            .iter()
            .enumerate()
            .map(|(i, s)| NewTask {
                task_no: TaskNo(u32::try_from(i).unwrap_or(u32::MAX)),
                step: s.id.clone(),
                name: s.id.clone(),
                item: None,
            })
            .collect(),
        at: now(),
        owner: None,
        start: false,
        lock,
        cooldown_ms: new
            .plan
            .cooldown
            .map(|c| i64::try_from(c.as_millis()).unwrap_or(i64::MAX)),
        ignore_cooldown: overrides.ignore_cooldown,
        parent: new.parent,
        fired_by: None,
    })
}

/// Renders the op's title or lock key: params, `op.uuid`, `op.plan` and the kept environment.
fn render_header(
    template: &Template,
    new: &NewRun,
    uuid: &str,
    what: &'static str,
) -> Result<String, Error> {
    let mut ctx = Context::new();
    for (name, value) in &new.params {
        ctx.param(name, value);
    }
    ctx.op("uuid", &Value::from(uuid))
        .op("plan", &Value::from(new.plan.name.clone()));
    for (name, value) in &new.env {
        ctx.env(name, value);
    }
    template.render(&ctx).map_err(|e| Error::Render {
        what,
        reason: e.message,
    })
}

/// Queues an op for `cairn serve` (`cairn submit`): stored `queued`, owned by nobody; its lock is
/// taken when a `serve` starts it. `fired_by`: the schedule firing it is (stored only once).
pub async fn submit(
    store: &Store,
    new: NewRun,
    fired_by: Option<(String, Millis)>,
) -> Result<OpId, Error> {
    let mut op = new_op(store, &new, &[], Overrides::default())?;
    op.fired_by = fired_by;
    match store.apply(vec![Change::Submit(op)]).await?.pop() {
        Some(Applied::Submitted { id, .. }) => Ok(id),
        _ => Err(Error::Store(store::Error::Closed)),
    }
}

/// Stores a new op owned by this process (submit, lock and take in one transaction, so no other
/// process can claim it in between), then runs it. While another op holds its lock it is stored
/// `queued` and waits (or, with `no_wait`, nothing is stored and the holder is named).
pub async fn run(
    store: &Store,
    new: NewRun,
    options: Options,
    overrides: Overrides,
    progress: Sink,
    stop: StopHandle,
) -> Result<(OpId, RunEnd), Error> {
    let (ancestors, held) = children::lineage(&store.reader()?, new.parent)?;
    let me = owner::me();
    let mut op = new_op(store, &new, &held, overrides)?;
    let paused = check_pause(store, overrides, &new.plan.name, op.lock.as_deref())?;
    // A claim made after waiting for the lock writes a later lease: this one is never more.
    let lease = lease_until(&options);
    op.owner = Some((me.clone(), lease));
    op.start = true;
    let (uuid, title) = (op.uuid.clone(), op.title.clone());
    let submitted = match store.apply(vec![Change::Submit(op.clone())]).await {
        Ok(applied) => Ok((applied, true)),
        Err(store::Error::LockHeld { .. }) if !overrides.no_wait => {
            // Stored `queued`, owned by this process, which waits for the lock.
            op.start = false;
            store
                .apply(vec![Change::Submit(op)])
                .await
                .map(|a| (a, false))
                .map_err(Error::from)
        }
        Err(e) => Err(lock_error(e)),
    }?;
    let (mut applied, owned) = submitted;
    let Some(Applied::Submitted { id, .. }) = applied.pop() else {
        return Err(Error::Store(store::Error::Closed));
    };
    if !owned {
        let message = format!("started by {me}");
        let acquire = Acquire {
            store,
            op: id,
            me: &me,
            dead: None,
            options: &options,
            overrides,
            progress: &progress,
            kind: EventKind::Started,
            message,
            reopen: false,
        };
        match acquire.run(&stop).await? {
            Acquired::Yes => {}
            Acquired::Stopped => return Ok((id, RunEnd::Interrupted)),
            Acquired::Canceled => {
                return Ok((id, RunEnd::Canceled("while it waited to start".to_owned())));
            }
        }
    }
    let events = pause_event(id, &me, paused);
    if !events.is_empty() {
        store.apply(events).await?;
    }
    progress(&Progress::OpStarted {
        op: id,
        title: title.clone(),
        how: Start::New,
    });
    let secrets = secret_values(&new.plan, &new.params, &[]);
    let run = RunParts {
        plan: Arc::new(new.plan),
        op: id,
        uuid,
        title,
        me,
        params: new.params,
        env: new.env,
        workdir: new.workdir,
        secrets,
        files: Arc::new(new.files.into_iter().collect()),
        ancestors,
        lease_until: lease,
    };
    let shared = shared(store, run, options, progress, stop)?;
    let tasks = Loaded::whole(TaskState::initial(&shared.steps));
    Ok((id, crate::run::run(shared, tasks, None, None, false).await))
}
