//! The JSON views of ops, tasks, locks, nodes, schedules and log lines: what `cairn status
//! --json`, `show --json`, `locks --json`, `nodes --json`, `schedule list --json` and `logs --json`
//! print and what the HTTP API answers, built in one place so that both say the same.

use std::collections::BTreeMap;

use engine::owner::{Rule, ShownTask};
use serde_json::{Value, json};
use store::{AttemptRow, NodeRow, OpFilter, OpId, OpRow, OpStatus, ProcessId, TaskRow};

/// How long the op ran: until it ended, or until now while it runs. An op whose owner died without
/// recording its end has no known end: `None`.
#[must_use]
pub fn elapsed_ms(op: &OpRow, shown: OpStatus, now: i64) -> Option<i64> {
    let start = op.started_at?;
    match op.ended_at {
        Some(end) => Some(end - start),
        None if shown.is_ended() => None,
        None => Some(now - start),
    }
}

/// One task that `CUR_TASK` lists: running or waiting now.
#[derive(Debug, Clone)]
pub struct Current {
    pub task: String,
    pub status: store::TaskStatus,
    /// The child op a running `plan:` task runs.
    pub child: Option<store::OpId>,
    /// What a waiting approval gate asks.
    pub prompt: Option<String>,
    /// What a running process last said of its progress (`$CAIRN_PROGRESS`).
    pub progress: Option<String>,
    /// The host a running process runs on, when not this one (`on:`).
    pub host: Option<String>,
}

impl Current {
    /// As the table shows it: `restore[shard-3]`, `refresh → op 14`, `copy (45%)`.
    #[must_use]
    pub fn label(&self) -> String {
        let task = match &self.host {
            Some(host) => format!("{} @{host}", self.task),
            None => self.task.clone(),
        };
        match (self.child, &self.progress) {
            (Some(child), _) => format!("{task} → op {child}"),
            (None, Some(progress)) => format!("{task} ({progress})"),
            (None, None) => task,
        }
    }
}

/// What `CUR_TASK` lists for `op`, shown `shown`: every task running or waiting (a process, a
/// sleep, a sub-plan, an approval gate), in plan order, a fan-out's items in place of their step.
/// Derived from the tasks when read; nothing for an op that does not run.
pub fn current_tasks(
    reader: &store::Reader,
    op: &OpRow,
    shown: OpStatus,
) -> anyhow::Result<Vec<Current>> {
    if shown.is_ended() {
        return Ok(Vec::new());
    }
    let active = in_step_order(reader.active_tasks(op.id)?);
    if active.is_empty() {
        return Ok(Vec::new());
    }
    let children: std::collections::HashMap<store::TaskNo, store::OpId> = reader
        .children(op.id)?
        .into_iter()
        .filter_map(|c| c.parent.map(|(_, task)| (task, c.id)))
        .collect();
    let hosts = remote_hosts(&reader.attempts(op.id)?, true);
    let listed_items: std::collections::HashSet<&str> = active
        .iter()
        .filter(|t| is_item(t))
        .map(|t| t.step.as_str())
        .collect();
    active
        .iter()
        .filter(|t| is_item(t) || !listed_items.contains(t.step.as_str()))
        .map(|t| {
            // A gate's prompt is in the event that says it waits.
            let prompt = if t.status == store::TaskStatus::Waiting {
                reader
                    .last_event(op.id, &t.name, store::EventKind::TaskWaiting)?
                    .map(|e| engine::gate_prompt(&e.message).to_owned())
            } else {
                None
            };
            Ok(Current {
                task: t.name.clone(),
                status: t.status,
                child: children.get(&t.task_no).copied(),
                prompt,
                progress: t.progress.clone(),
                host: hosts.get(&t.task_no).cloned(),
            })
        })
        .collect()
}

/// What an op waits for when no task of it runs (its lock, a retry's delay): the `CUR_TASK`
/// column its owner writes, for an op that runs.
#[must_use]
pub fn note(op: &OpRow, shown: OpStatus) -> Option<&str> {
    op.current_task.as_deref().filter(|_| !shown.is_ended())
}

/// An op as `status --json` and `show --json` print it, its owner judged by `rule`.
/// `current_tasks` lists every task running or waiting (see [`current_tasks`]); `current_task`
/// says the same in one line (or what the op waits for, when no task runs).
pub fn op_json(reader: &store::Reader, op: &OpRow, rule: Rule, now: i64) -> anyhow::Result<Value> {
    let shown = rule.shown_status(op, now);
    let elapsed = elapsed_ms(op, shown, now);
    let current = current_tasks(reader, op, shown)?;
    let line = if current.is_empty() {
        note(op, shown).map(ToOwned::to_owned)
    } else {
        Some(
            current
                .iter()
                .map(Current::label)
                .collect::<Vec<_>>()
                .join(", "),
        )
    };
    Ok(json!({
        "id": op.id.0,
        "uuid": op.uuid,
        "plan": op.plan,
        "name": op.title,
        "status": shown.as_str(),
        "interrupted_by": rule.interrupted_by(op, now).map(store::Interruption::as_str),
        "created_at": engine::time::rfc3339(op.created_at),
        "started_at": op.started_at.map(engine::time::rfc3339),
        "ended_at": op.ended_at.map(engine::time::rfc3339),
        "elapsed_ms": elapsed,
        "current_task": line,
        // `host`: where the task runs (`on:`); null on the owner's machine.
        "current_tasks": current.iter().map(|c| json!({
            "task": c.task,
            "status": c.status.as_str(),
            "child": c.child.map(|id| id.0),
            "prompt": c.prompt,
            "progress": c.progress,
            "host": c.host,
        })).collect::<Vec<_>>(),
        "error": op.error,
        "owner": op.owner.as_ref().filter(|_| !shown.is_ended()).map(|o| json!({"host": o.host, "pid": o.pid})),
        "parent": op.parent.map(|(parent, _)| parent.0),
    }))
}

/// Params as shown: sealed secrets as `********`.
#[must_use]
pub fn shown_params(params: &Value) -> Value {
    match params {
        Value::Object(map) => Value::Object(shown_values(map)),
        other => other.clone(),
    }
}

/// Params or a step's outputs as shown: sealed values (secrets) as `********`.
#[must_use]
pub fn shown_values(map: &serde_json::Map<String, Value>) -> serde_json::Map<String, Value> {
    map.iter()
        .map(|(k, v)| {
            let v = if engine::secrets::is_sealed(v) {
                Value::from("********")
            } else {
                v.clone()
            };
            (k.clone(), v)
        })
        .collect()
}

/// A fan-out item's task (`restore[shard-3]`), as opposed to a step's or a hook's.
#[must_use]
pub fn is_item(t: &TaskRow) -> bool {
    t.name != t.step && t.item.is_some()
}

/// Tasks in the order people read them: each step followed by its fan-out items.
#[must_use]
pub fn in_step_order(tasks: Vec<TaskRow>) -> Vec<TaskRow> {
    let mut items: std::collections::HashMap<String, Vec<TaskRow>> =
        std::collections::HashMap::new();
    let mut steps = Vec::new();
    for t in tasks {
        if is_item(&t) {
            items.entry(t.step.clone()).or_default().push(t);
        } else {
            steps.push(t);
        }
    }
    let mut ordered = Vec::new();
    for t in steps {
        let mine = items.remove(&t.step).unwrap_or_default();
        ordered.push(t);
        ordered.extend(mine);
    }
    // Items of a step the plan no longer has (after `resume --plan`) come last.
    ordered.extend(items.into_values().flatten());
    ordered
}

/// Each task's status as shown under an op shown `op` ([`engine::owner::shown_task`]): a task
/// its op's run left cut off shows `interrupted`, never `running` under an op that does not run.
#[must_use]
pub fn shown_statuses(tasks: &[TaskRow], attempts: &[AttemptRow], op: OpStatus) -> Vec<ShownTask> {
    let last: std::collections::HashMap<store::TaskNo, store::AttemptStatus> =
        attempts.iter().map(|a| (a.task_no, a.status)).collect();
    tasks
        .iter()
        .map(|t| engine::owner::shown_task(op, t.status, last.get(&t.task_no).copied()))
        .collect()
}

/// An op as `show --json` prints it (and `run --json`, `resume --json` once it ends): its record,
/// params (secrets masked), children, tasks with their attempts and outputs, events.
pub fn record(
    reader: &store::Reader,
    row: &store::OpRow,
    rule: engine::owner::Rule,
    now: i64,
) -> anyhow::Result<Value> {
    let op = row.id;
    let tasks = in_step_order(reader.tasks(op)?);
    let attempts = reader.attempts(op)?;
    let events = reader.events(op)?;
    let statuses = shown_statuses(&tasks, &attempts, rule.shown_status(row, now));
    let time = |t: Option<i64>| t.map(engine::time::rfc3339);
    let mut object = op_json(reader, row, rule, now)?;
    object["params"] = shown_params(&row.params);
    object["children"] = reader
        .children(op)?
        .iter()
        .map(
            |c| json!({"id": c.id.0, "plan": c.plan, "status": rule.shown_status(c, now).as_str()}),
        )
        .collect();
    let hosts = remote_hosts(&attempts, false);
    object["tasks"] = tasks
        .iter()
        .zip(&statuses)
        .map(|(t, status)| {
            json!({
                "id": t.name,
                "step": t.step,
                "item": if is_item(t) { t.item.clone() } else { None },
                "items": if is_item(t) { None } else { t.item.clone() },
                "status": status.as_str(),
                "attempts": t.attempts,
                "started_at": time(t.started_at),
                "ended_at": time(t.ended_at),
                "exit_code": t.exit_code,
                "error": t.error,
                "outputs": t.outputs.as_ref().map(shown_values),
                "by_check": t.by_check,
                "progress": t.progress,
                "host": hosts.get(&t.task_no),
                "history": attempts.iter().filter(|a| a.task_no == t.task_no).map(|a| json!({
                    "attempt": a.n,
                    "status": a.status.as_str(),
                    "started_at": engine::time::rfc3339(a.started_at),
                    "ended_at": time(a.ended_at),
                    "exit_code": a.exit_code,
                    "error": a.error,
                    "host": a.process.as_ref().and_then(remote_host),
                })).collect::<Vec<_>>(),
            })
        })
        .collect();
    object["daemons"] = engine::op::daemons(reader, op)?
        .iter()
        .map(|d| {
            json!({
                "task": d.task,
                "attempt": d.attempt,
                "pid": d.pid,
                "pgid": d.pgid,
                "host": d.host,
                "alive": d.alive,
            })
        })
        .collect();
    object["events"] = events
        .iter()
        .map(|e| json!({"at": engine::time::rfc3339(e.at), "kind": e.kind, "task": e.task, "message": e.message}))
        .collect();
    Ok(object)
}

/// Held locks, running cooldowns and the pauses, as `cairn locks --json` prints them (`paused`:
/// the global pause, if any; `pauses`: every pause that holds, scoped ones too).
pub fn locks(reader: &store::Reader, now: i64) -> anyhow::Result<Value> {
    let (locks, cooldowns, pauses) = (reader.locks()?, reader.cooldowns(now)?, reader.pauses(now)?);
    let pause = |p: &store::Pause| {
        json!({
            "plan": p.scope.plan, "key_prefix": p.scope.key,
            "by": p.by, "at": engine::time::rfc3339(p.at), "reason": p.reason,
            "until": p.until.map(engine::time::rfc3339),
        })
    };
    Ok(json!({
        "locks": locks.iter().map(|l| json!({"key": l.key, "op": l.op.0, "since": engine::time::rfc3339(l.since)})).collect::<Vec<_>>(),
        "cooldowns": cooldowns.iter().map(|c| json!({
            "key": c.key, "after_op": c.op.0, "until": engine::time::rfc3339(c.until),
            "acked_by": c.acked.as_ref().map(|a| a.by.clone()),
        })).collect::<Vec<_>>(),
        "paused": pauses.iter().find(|p| p.scope.is_global()).map(pause),
        "pauses": pauses.iter().map(pause).collect::<Vec<_>>(),
    }))
}

/// One line of a step's output as `cairn logs --json` prints it: `stream` 0 is cairn's own note
/// of output cut over `log_limit`, 2 is stderr, anything else stdout; `text` without its newline.
#[must_use]
pub fn log_line(task: &str, attempt: u32, stream: u8, at: i64, text: &str) -> Value {
    json!({
        "task": task,
        "attempt": attempt,
        "stream": match stream {
            0 => "cairn",
            2 => "stderr",
            _ => "stdout",
        },
        "time": engine::time::rfc3339(at),
        "text": text.strip_suffix('\n').unwrap_or(text),
    })
}

/// The ops that match `filter`, newest first, up to its `limit`. The shown status decides, so
/// asking for `interrupted` finds ops whose owner died.
pub fn matching(
    reader: &store::Reader,
    filter: &OpFilter,
    rule: Rule,
    now: i64,
) -> anyhow::Result<Vec<OpRow>> {
    let Some(wanted) = filter.status else {
        return Ok(reader.list_ops(filter)?);
    };
    // Stored statuses that may be shown as `wanted`.
    let stored: Vec<OpStatus> = match wanted {
        OpStatus::Interrupted => vec![
            OpStatus::Interrupted,
            OpStatus::Running,
            OpStatus::Waiting,
            OpStatus::Canceling,
        ],
        other => vec![other],
    };
    let mut out = Vec::new();
    for s in stored {
        out.extend(
            reader
                .list_ops(&OpFilter {
                    status: Some(s),
                    limit: None,
                    ..filter.clone()
                })?
                .into_iter()
                .filter(|op| rule.shown_status(op, now) == wanted),
        );
    }
    out.sort_by_key(|op| std::cmp::Reverse(op.id));
    if let Some(limit) = filter.limit {
        out.truncate(limit as usize);
    }
    Ok(out)
}

/// The ops each owner holds that have not ended (queued waiting for a lock, running, waiting for
/// an approval, canceling), by owner, in id order.
pub fn held(reader: &store::Reader) -> anyhow::Result<BTreeMap<ProcessKey, Vec<OpId>>> {
    let mut held: BTreeMap<ProcessKey, Vec<OpId>> = BTreeMap::new();
    for status in [
        OpStatus::Queued,
        OpStatus::Running,
        OpStatus::Waiting,
        OpStatus::Canceling,
    ] {
        let rows = reader.list_ops(&OpFilter {
            status: Some(status),
            plan: None,
            limit: None,
            before: None,
        })?;
        for row in rows {
            if let Some(owner) = &row.owner {
                held.entry(key(owner)).or_default().push(row.id);
            }
        }
    }
    for ops in held.values_mut() {
        ops.sort_unstable();
    }
    Ok(held)
}

/// A process as a map key: boot, pid and start time say which process it is.
pub type ProcessKey = (String, u32, u64);

#[must_use]
pub fn key(id: &ProcessId) -> ProcessKey {
    (id.boot_id.clone(), id.pid, id.start)
}

#[must_use]
pub fn node_json(node: &NodeRow, running: &[OpId]) -> Value {
    json!({
        "host": node.id.host,
        "pid": node.id.pid,
        "workers": node.workers,
        "started_at": engine::time::rfc3339(node.started_at),
        "heartbeat_at": engine::time::rfc3339(node.heartbeat_at),
        "running": running.iter().map(|op| op.0).collect::<Vec<_>>(),
    })
}

/// The live serving nodes (their lease holds at `now`), by host and pid, each with the ops it
/// holds, as `cairn nodes` lists them.
pub fn live_nodes(
    reader: &store::Reader,
    now: i64,
) -> anyhow::Result<Vec<(store::NodeRow, Vec<store::OpId>)>> {
    let mut held = held(reader)?;
    let mut nodes: Vec<(store::NodeRow, Vec<store::OpId>)> = reader
        .nodes()?
        .into_iter()
        .filter(|n| n.lease_until >= now)
        .map(|n| {
            let running = held.remove(&key(&n.id)).unwrap_or_default();
            (n, running)
        })
        .collect();
    nodes.sort_by(|(a, _), (b, _)| (&a.id.host, a.id.pid).cmp(&(&b.id.host, b.id.pid)));
    Ok(nodes)
}

/// A schedule as `cairn schedule list --json` prints it, with its next firing after `now`.
#[must_use]
pub fn schedule_json(s: &store::ScheduleRow, now: i64) -> Value {
    json!({
        "name": s.name, "plan": s.plan, "params": s.params,
        "cron": s.cron, "timezone": s.timezone, "paused": s.paused, "catch_up": s.catch_up,
        "next": engine::schedule::next_firing(s, now).map(engine::time::rfc3339),
        "last_fire": s.last_fire.map(engine::time::rfc3339),
        "last_op": s.last_op.map(|o| o.0), "note": s.note,
    })
}

/// The host a recorded process ran on, when it ran on another host (`on:`).
fn remote_host(process: &store::ProcessId) -> Option<String> {
    process
        .boot_id
        .starts_with(engine::REMOTE_BOOT)
        .then(|| process.host.clone())
}

/// The host each task's last attempt on another host ran on (only running attempts when
/// `running`).
#[must_use]
pub fn remote_hosts(
    attempts: &[store::AttemptRow],
    running: bool,
) -> std::collections::HashMap<store::TaskNo, String> {
    attempts
        .iter()
        .filter(|a| !running || a.status == store::AttemptStatus::Running)
        .filter_map(|a| Some((a.task_no, remote_host(a.process.as_ref()?)?)))
        .collect()
}
