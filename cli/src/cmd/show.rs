//! `cairn show`: one op in full: params (secrets masked), tasks, attempts, outputs, events.

use std::fmt::Write as _;

use anyhow::Context as _;
use comfy_table::{Table, presets};
use engine::owner::ShownTask;
use serde_json::{Value, json};
use store::{AttemptRow, OpStatus, TaskRow};

use crate::cmd::status::op_json;
use crate::db::{DbArgs, op_id};
use crate::exit::Failure;
use crate::output::{Output, shown};

/// Show one op: its params (secrets masked), every task with its status, attempts, times, exit
/// code, error and outputs, and its events.
///
/// Under an op that is not running, a task it left running or waiting, or whose last attempt it
/// interrupted, shows `interrupted`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The op's id.
    op: String,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    db: DbArgs,
}

/// Params as shown: sealed secrets as `********`.
fn shown_params(params: &Value) -> Value {
    match params {
        Value::Object(map) => Value::Object(shown_values(map)),
        other => other.clone(),
    }
}

/// Params or a step's outputs as shown: sealed values (secrets) as `********`.
fn shown_values(map: &serde_json::Map<String, Value>) -> serde_json::Map<String, Value> {
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

/// The last column of a task's row: its error, else its outputs, else the progress it last
/// reported; an item's whole value when its name holds only a short label.
fn detail(t: &TaskRow) -> String {
    let detail = match (&t.error, &t.outputs) {
        (Some(e), _) => e.lines().next().unwrap_or_default().to_owned(),
        (None, None) if t.progress.is_some() => {
            format!("progress: {}", t.progress.as_deref().unwrap_or_default())
        }
        (None, Some(o)) if !o.is_empty() => shown_values(o)
            .iter()
            .map(|(k, v)| {
                format!(
                    "{k}={}",
                    v.as_str().map_or_else(|| v.to_string(), ToOwned::to_owned)
                )
            })
            .collect::<Vec<_>>()
            .join(" "),
        _ if t.by_check => "(done by check)".to_owned(),
        _ => String::new(),
    };
    // An item's task name holds a short label: the whole item is here.
    let item = t.item.as_ref().filter(|_| is_item(t)).map(|item| {
        item.as_str()
            .map_or_else(|| item.to_string(), ToOwned::to_owned)
    });
    match item {
        Some(item) if !t.name.ends_with(&format!("[{item}]")) => {
            format!("item={item} {detail}").trim_end().to_owned()
        }
        _ => detail,
    }
}

/// A fan-out item's task (`restore[shard-3]`), as opposed to a step's or a hook's.
pub(crate) fn is_item(t: &TaskRow) -> bool {
    t.name != t.step && t.item.is_some()
}

/// Tasks in the order people read them: each step followed by its fan-out items.
pub(crate) fn in_step_order(tasks: Vec<TaskRow>) -> Vec<TaskRow> {
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
fn shown_statuses(tasks: &[TaskRow], attempts: &[AttemptRow], op: OpStatus) -> Vec<ShownTask> {
    let last: std::collections::HashMap<store::TaskNo, store::AttemptStatus> =
        attempts.iter().map(|a| (a.task_no, a.status)).collect();
    tasks
        .iter()
        .map(|t| engine::owner::shown_task(op, t.status, last.get(&t.task_no).copied()))
        .collect()
}

pub fn run(args: &Args, _out: &Output) -> Result<(), Failure> {
    let op = op_id(&args.op)?;
    let (reader, row) = crate::db::read_op(&args.db, op)?;
    let now = engine::owner::now();
    let rule = args.db.rule()?;
    if args.json {
        return print_record(&reader, &row, rule, now);
    }
    let tasks = in_step_order(reader.tasks(op)?);
    let events = reader.events(op)?;
    let status = rule.shown_status(&row, now);
    let statuses = shown_statuses(&tasks, &reader.attempts(op)?, status);
    let summary = op_json(&reader, &row, rule, now)?;
    let mut text = String::new();
    writeln!(
        text,
        "op {}  {}  {}",
        row.id,
        shown(&row.plan),
        shown(&row.title)
    )
    .ok();
    // An interrupted op says who or what stopped it, as `status` does.
    let why = summary["interrupted_by"]
        .as_str()
        .map_or_else(String::new, |by| format!(" ({by})"));
    writeln!(
        text,
        "  status:   {}{why}",
        summary["status"].as_str().unwrap_or_default()
    )
    .ok();
    if let Some(current) = summary["current_task"].as_str() {
        writeln!(text, "  current:  {}", shown(current)).ok();
    }
    writeln!(text, "  uuid:     {}", row.uuid).ok();
    writeln!(text, "  created:  {}", engine::time::local(row.created_at)).ok();
    if let Some(s) = row.started_at {
        writeln!(text, "  started:  {}", engine::time::local(s)).ok();
    }
    if let Some(e) = row.ended_at {
        writeln!(text, "  ended:    {}", engine::time::local(e)).ok();
    }
    if let Some(error) = &row.error {
        writeln!(text, "  error:    {}", shown(error)).ok();
    }
    if let Some(owner) = summary.get("owner").filter(|o| !o.is_null()) {
        // On a shared store the lease is what keeps the owner alive: say until when.
        let lease = row
            .lease_until
            .filter(|_| rule == engine::owner::Rule::Shared)
            .map_or_else(String::new, |l| {
                format!(" (lease until {})", engine::time::local(l))
            });
        writeln!(
            text,
            "  owner:    pid {} on {}{lease}",
            owner["pid"],
            shown(owner["host"].as_str().unwrap_or_default())
        )
        .ok();
    }
    if let Some((parent, task)) = row.parent {
        let step = reader
            .task(parent, task)
            .map_or_else(|_| format!("task {}", task.0), |t| t.name);
        writeln!(text, "  parent:   op {parent} (step {})", shown(&step)).ok();
    }
    let children = reader.children(op)?;
    let by_number: std::collections::HashMap<store::TaskNo, &TaskRow> =
        tasks.iter().map(|t| (t.task_no, t)).collect();
    if !children.is_empty() {
        writeln!(text, "  children:").ok();
        for child in &children {
            let step = child
                .parent
                .and_then(|(_, task)| by_number.get(&task).copied())
                .map_or("an earlier run", |t| t.name.as_str());
            writeln!(
                text,
                "    op {}  {}  {}  (step {})",
                child.id,
                shown(&child.plan),
                rule.shown_status(child, now),
                shown(step)
            )
            .ok();
        }
    }
    writeln!(text, "\nparams:").ok();
    if let Value::Object(params) = shown_params(&row.params) {
        for (k, v) in params {
            let v = v.as_str().map_or_else(|| v.to_string(), ToOwned::to_owned);
            writeln!(text, "  {} = {}", shown(&k), shown(&v)).ok();
        }
    }
    writeln!(text, "\ntasks:").ok();
    let mut table = Table::new();
    table.load_style(presets::NOTHING);
    table.set_header([
        "TASK",
        "STATUS",
        "ATTEMPTS",
        "STARTED",
        "ENDED",
        "EXIT",
        "ERROR / OUTPUTS",
    ]);
    for (t, status) in tasks.iter().zip(&statuses) {
        let detail = detail(t);
        table.add_row([
            t.name.clone(),
            status.to_string() + if t.by_check { " (check)" } else { "" },
            t.attempts.to_string(),
            t.started_at
                .map_or_else(|| "-".to_owned(), engine::time::local),
            t.ended_at
                .map_or_else(|| "-".to_owned(), engine::time::local),
            t.exit_code
                .map_or_else(|| "-".to_owned(), |c| c.to_string()),
            detail,
        ]);
    }
    let mut table = crate::output::shown_cells(&table);
    for column in table.column_iter_mut() {
        column.set_padding((2, 0));
    }
    for l in table.lines() {
        writeln!(text, "{}", l.trim_end()).ok();
    }
    writeln!(text, "\nevents:").ok();
    for e in &events {
        let task = e
            .task
            .as_deref()
            .map_or(String::new(), |t| format!(" {}", shown(t)));
        writeln!(
            text,
            "  {}  {}{task}: {}",
            engine::time::local(e.at),
            e.kind,
            shown(&e.message)
        )
        .ok();
    }
    crate::output::data(&text).context("cannot write")?;
    Ok(())
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
    object["events"] = events
        .iter()
        .map(|e| json!({"at": engine::time::rfc3339(e.at), "kind": e.kind, "task": e.task, "message": e.message}))
        .collect();
    Ok(object)
}

/// Prints [`record`] as pretty JSON on stdout.
pub fn print_record(
    reader: &store::Reader,
    row: &store::OpRow,
    rule: engine::owner::Rule,
    now: i64,
) -> Result<(), Failure> {
    let object = record(reader, row, rule, now)?;
    let mut text = serde_json::to_string_pretty(&object).context("cannot encode")?;
    text.push('\n');
    crate::output::data(&text).context("cannot write")?;
    Ok(())
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
