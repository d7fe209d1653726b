//! `cairn status`: the ops table, newest first (like `OpenMLDB`'s `showopstatus`).

use std::fmt::Write as _;
use std::io::IsTerminal as _;
use std::time::Duration;

use anyhow::Context as _;
use engine::owner::Rule;
use serde_json::{Value, json};
use store::{OpFilter, OpId, OpRow, OpStatus};

use crate::db::DbArgs;
use crate::exit::Failure;
use crate::output::Output;

/// List ops, newest first.
///
/// An op whose owner died while it ran shows as `interrupted`; `cairn resume OP` continues it.
/// An interrupted op's STATUS says who or what stopped it: `signal` (Ctrl-C, SIGHUP or SIGTERM to
/// the process that ran it: `cairn serve` leaves it for a person), `shutdown` (a `cairn serve`
/// drained as it stopped), `released` (a `cairn serve` could not carry it on), `owner-died` (the
/// process that ran it is gone); `--json` has it as `interrupted_by`.
/// `CUR_TASK` lists the tasks running or waiting, in plan order: the first two and how many more
/// (`a, b (+3)`); `--json` gives them all (`current_tasks`).
#[allow(
    clippy::struct_excessive_bools,
    reason = "independent command-line switches"
)]
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Only ops with this status.
    #[arg(long, value_parser = status)]
    status: Option<OpStatus>,
    /// Only ops of this plan.
    #[arg(long, value_name = "NAME")]
    plan: Option<String>,
    /// How many ops to list.
    #[arg(long, default_value_t = 20, conflicts_with = "all")]
    limit: u32,
    /// List every op.
    #[arg(long)]
    all: bool,
    /// Redraw the table every second until interrupted.
    #[arg(long, conflicts_with = "json")]
    watch: bool,
    /// Print a JSON array.
    #[arg(long)]
    json: bool,
    /// List child ops (of `plan:` steps) as ops of their own, rather than under their parent
    /// (`--limit` then counts them too).
    #[arg(long)]
    children: bool,
    #[command(flatten)]
    db: DbArgs,
}

fn status(text: &str) -> Result<OpStatus, String> {
    OpStatus::parse(text).ok_or_else(|| {
        format!(
            "expected one of {}",
            OpStatus::ALL
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )
    })
}

/// How long the op ran: until it ended, or until now while it runs. An op whose owner died without
/// recording its end has no known end: `None`.
fn elapsed_ms(op: &OpRow, shown: OpStatus, now: i64) -> Option<i64> {
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
    fn label(&self) -> String {
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
    let active = crate::cmd::show::in_step_order(reader.active_tasks(op.id)?);
    if active.is_empty() {
        return Ok(Vec::new());
    }
    let children: std::collections::HashMap<store::TaskNo, store::OpId> = reader
        .children(op.id)?
        .into_iter()
        .filter_map(|c| c.parent.map(|(_, task)| (task, c.id)))
        .collect();
    let hosts = crate::cmd::show::remote_hosts(&reader.attempts(op.id)?, true);
    let listed_items: std::collections::HashSet<&str> = active
        .iter()
        .filter(|t| crate::cmd::show::is_item(t))
        .map(|t| t.step.as_str())
        .collect();
    active
        .iter()
        .filter(|t| crate::cmd::show::is_item(t) || !listed_items.contains(t.step.as_str()))
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

/// How many tasks the table's `CUR_TASK` names before it counts the rest (`a, b (+3)`), and the
/// width past which it names fewer.
const NAMED: usize = 2;
const WIDTH: usize = 40;

/// The table's `CUR_TASK`: the first tasks of `current` and how many more (`a, b (+3)`); with none,
/// what the op waits for (`note`: its lock, a retry's delay), else `-`.
fn cur_task_cell(current: &[Current], note: Option<&str>) -> String {
    if current.is_empty() {
        return note.unwrap_or("-").to_owned();
    }
    let mut cell = String::new();
    let mut named = 0;
    for c in current.iter().take(NAMED) {
        let label = c.label();
        if named > 0 && cell.chars().count() + 2 + label.chars().count() > WIDTH {
            break;
        }
        if named > 0 {
            cell.push_str(", ");
        }
        cell.push_str(&label);
        named += 1;
    }
    if current.len() > named {
        let _ = write!(cell, " (+{})", current.len() - named);
    }
    cell
}

/// What an op waits for when no task of it runs (its lock, a retry's delay): the `CUR_TASK`
/// column its owner writes, for an op that runs.
fn note(op: &OpRow, shown: OpStatus) -> Option<&str> {
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

/// The ops to list, and whether `--limit` left some out. The shown status decides, so
/// `--status interrupted` finds ops whose owner died. Unless `--children`, `--limit` counts ops
/// that are not another listed op's child, and each such op is followed by its children.
fn rows(
    reader: &store::Reader,
    args: &Args,
    (rule, now): (Rule, i64),
) -> anyhow::Result<(Vec<Line>, bool)> {
    let limit = (!args.all).then_some(args.limit);
    if args.children {
        let mut out = matching(
            reader,
            args,
            (rule, now),
            limit.map(|l| l.saturating_add(1)),
        )?;
        let cut = limit.is_some_and(|l| out.len() > l as usize);
        if let Some(limit) = limit {
            out.truncate(limit as usize);
        }
        return Ok((out.into_iter().map(|row| Line::op(row, 0)).collect(), cut));
    }
    // Without a filter every op's parent is listed too: an op is a root when it has no parent.
    // With one, when its parent does not match. Read more until `limit + 1` roots are in, or there
    // are no more.
    let filtered = args.status.is_some() || args.plan.is_some();
    let is_root = |op: &OpRow, ids: &std::collections::HashSet<OpId>| {
        op.parent.is_none_or(|(p, _)| filtered && !ids.contains(&p))
    };
    let mut asked = limit.map(|l| l.saturating_add(1).saturating_mul(4));
    let matched = loop {
        let found = matching(reader, args, (rule, now), asked)?;
        let ids: std::collections::HashSet<OpId> = found.iter().map(|o| o.id).collect();
        let roots = found.iter().filter(|o| is_root(o, &ids)).count();
        match (limit, asked) {
            (Some(l), Some(a)) if roots <= l as usize && found.len() >= a as usize => {
                asked = Some(a.saturating_mul(4));
            }
            _ => break found,
        }
    };
    let ids: std::collections::HashSet<OpId> = matched.iter().map(|o| o.id).collect();
    let (mut roots, mut children): (Vec<OpRow>, Vec<OpRow>) =
        matched.into_iter().partition(|o| is_root(o, &ids));
    let cut = limit.is_some_and(|l| roots.len() > l as usize);
    if let Some(limit) = limit {
        roots.truncate(limit as usize);
    }
    if !filtered {
        // The roots' children, however deep, whether or not they were among the newest.
        children.clear();
        let mut parents: Vec<OpId> = roots.iter().map(|r| r.id).collect();
        while let Some(parent) = parents.pop() {
            for child in reader.children(parent)? {
                parents.push(child.id);
                children.push(child);
            }
        }
    }
    let mut under: std::collections::HashMap<OpId, Vec<OpRow>> = std::collections::HashMap::new();
    for child in children {
        if let Some((parent, _)) = child.parent {
            under.entry(parent).or_default().push(child);
        }
    }
    let mut lines = Vec::new();
    for root in roots {
        nest(&mut lines, root, 0, &mut under);
    }
    // A child op listed under its parent is named with the parent's task that runs it (the
    // parent's tasks read once).
    let mut names: std::collections::HashMap<OpId, Vec<store::TaskRow>> =
        std::collections::HashMap::new();
    for line in lines.iter_mut().filter(|l| l.depth > 0) {
        if let Some((parent, task)) = line.row.parent {
            let tasks = match names.entry(parent) {
                std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::hash_map::Entry::Vacant(e) => e.insert(reader.tasks(parent)?),
            };
            line.task = tasks
                .iter()
                .find(|t| t.task_no == task)
                .map(|t| t.name.clone());
        }
    }
    Ok((lines, cut))
}

/// `op`, then its children (oldest first) and theirs, one level deeper each.
fn nest(
    lines: &mut Vec<Line>,
    op: OpRow,
    depth: usize,
    under: &mut std::collections::HashMap<OpId, Vec<OpRow>>,
) {
    let mut children = under.remove(&op.id).unwrap_or_default();
    children.sort_by_key(|c| c.id);
    lines.push(Line::op(op, depth));
    for child in children {
        nest(lines, child, depth + 1, under);
    }
}

/// How many child ops that succeeded the table lists under a parent; more are one line.
const FOLD_ABOVE: usize = 3;

/// One op of the list, `depth` levels under the op it is listed under (whose task `task` runs
/// it).
struct Line {
    row: OpRow,
    depth: usize,
    task: Option<String>,
}

impl Line {
    fn op(row: OpRow, depth: usize) -> Self {
        Self {
            row,
            depth,
            task: None,
        }
    }
}

/// The ops that match the filters, newest first, up to `limit`.
fn matching(
    reader: &store::Reader,
    args: &Args,
    (rule, now): (Rule, i64),
    limit: Option<u32>,
) -> anyhow::Result<Vec<OpRow>> {
    let Some(wanted) = args.status else {
        return Ok(reader.list_ops(&OpFilter {
            status: None,
            plan: args.plan.clone(),
            limit,
        })?);
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
                    plan: args.plan.clone(),
                    limit: None,
                })?
                .into_iter()
                .filter(|op| rule.shown_status(op, now) == wanted),
        );
    }
    out.sort_by_key(|op| std::cmp::Reverse(op.id));
    if let Some(limit) = limit {
        out.truncate(limit as usize);
    }
    Ok(out)
}

/// The STATUS cell: the status, and for an interrupted op who or what stopped it
/// (`interrupted (signal)`, `interrupted (owner-died)`).
fn shown_with_why(op: &OpRow, rule: Rule, now: i64) -> String {
    let shown = rule.shown_status(op, now);
    match rule.interrupted_by(op, now) {
        Some(by) => format!("{shown} ({by})"),
        None => shown.to_string(),
    }
}

/// The ops table. On a store that several machines share (`Rule::Shared`) it has a NODE column,
/// the `host:pid` of each op's owner; on one machine's, it is the table the brief prints.
fn table(reader: &store::Reader, ops: &[Line], rule: Rule, now: i64) -> anyhow::Result<String> {
    let mut table = crate::output::plain_table();
    let shared = rule == Rule::Shared;
    let mut header = vec![
        "OP_ID",
        "TYPE",
        "NAME",
        "STATUS",
        "START_TIME",
        "EXECUTE_TIME",
        "END_TIME",
    ];
    if shared {
        header.push("NODE");
    }
    header.push("CUR_TASK");
    table.set_header(header);
    // Under a parent with more than a few children that succeeded, those are one line: the table
    // keeps what needs a look (`--children` and `--json` list them all).
    let mut succeeded: std::collections::HashMap<OpId, usize> = std::collections::HashMap::new();
    for line in ops.iter().filter(|l| l.depth > 0) {
        if let Some((parent, _)) = line.row.parent
            && rule.shown_status(&line.row, now) == OpStatus::Succeeded
        {
            *succeeded.entry(parent).or_default() += 1;
        }
    }
    let folded = |parent: OpId| succeeded.get(&parent).copied().filter(|&n| n > FOLD_ABOVE);
    let mut hidden: std::collections::HashSet<OpId> = std::collections::HashSet::new();
    for Line {
        row: op,
        depth,
        task,
    } in ops
    {
        let shown = rule.shown_status(op, now);
        if let Some((parent, _)) = op.parent.filter(|_| *depth > 0)
            && (hidden.contains(&parent)
                || (folded(parent).is_some() && shown == OpStatus::Succeeded))
        {
            hidden.insert(op.id);
            continue;
        }
        let elapsed = elapsed_ms(op, shown, now);
        let node = op
            .owner
            .as_ref()
            .filter(|_| !shown.is_ended())
            .map_or_else(|| "-".to_owned(), |o| format!("{}:{}", o.host, o.pid));
        let mut row = vec![
            // A child op under its parent: `└ 2`, one step in per level.
            if *depth == 0 {
                op.id.to_string()
            } else {
                format!("{}└ {}", "  ".repeat(depth - 1), op.id)
            },
            op.plan.clone(),
            match (op.parent, task) {
                (Some((parent, _)), _) if *depth == 0 => format!("{} (in op {parent})", op.title),
                (_, Some(task)) => format!("{} ({task})", op.title),
                _ => op.title.clone(),
            },
            shown_with_why(op, rule, now),
            op.started_at
                .map_or_else(|| "-".to_owned(), engine::time::local),
            elapsed.map_or_else(|| "-".to_owned(), engine::time::elapsed),
            op.ended_at
                .map_or_else(|| "-".to_owned(), engine::time::local),
        ];
        if shared {
            row.push(node);
        }
        row.push(cur_task_cell(
            &current_tasks(reader, op, shown)?,
            note(op, shown),
        ));
        table.add_row(row);
        if let Some(n) = folded(op.id) {
            let mut row = vec![
                format!("{}└ …", "  ".repeat(*depth)),
                "-".to_owned(),
                format!("{n} child ops (`--children` lists them)"),
                OpStatus::Succeeded.to_string(),
                "-".to_owned(),
                "-".to_owned(),
                "-".to_owned(),
            ];
            if shared {
                row.push("-".to_owned());
            }
            row.push("-".to_owned());
            table.add_row(row);
        }
    }
    Ok(crate::output::render_table(&table, "(no ops)"))
}

pub fn run(args: &Args, _out: &Output) -> Result<(), Failure> {
    // clap refuses `status --json --watch`; `--json` given before the subcommand reaches it after
    // clap's check.
    if args.json && args.watch {
        return Err(Failure::BadInput(anyhow::anyhow!(
            "`--watch` redraws a table; it cannot be used with `--json`"
        )));
    }
    // Redrawn in place on a terminal; into a pipe or a file, one table after another.
    let terminal = std::io::stdout().is_terminal();
    loop {
        let now = engine::owner::now();
        let rule = args.db.rule()?;
        let reader = args.db.reader()?;
        let (ops, cut) = rows(&reader, args, (rule, now))?;
        if cut && !args.json && !args.watch {
            crate::output::diagnostic(&format!(
                "(the newest {} ops; `--limit N` or `--all` lists more)\n",
                args.limit
            ));
        }
        let text = if args.json {
            let mut text = serde_json::to_string_pretty(
                &ops.iter()
                    .map(|line| op_json(&reader, &line.row, rule, now))
                    .collect::<anyhow::Result<Vec<_>>>()?,
            )
            .context("cannot encode")?;
            text.push('\n');
            text
        } else {
            table(&reader, &ops, rule, now)?
        };
        if !args.watch {
            crate::output::data(&text).context("cannot write")?;
            return Ok(());
        }
        if terminal {
            // Clear the screen and draw again.
            crate::output::data(&format!("\x1b[2J\x1b[H{text}")).context("cannot write")?;
        } else {
            crate::output::data(&format!("{text}\n")).context("cannot write")?;
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}
