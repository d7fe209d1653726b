//! `cairn logs`: what steps printed, attempt by attempt.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::time::Duration;

use anyhow::Context as _;
use store::TaskNo;

use crate::db::{DbArgs, op_id};
use crate::exit::Failure;
use crate::output::Output;

/// Print the output of an op's steps, attempt by attempt (stdout and stderr interleaved as they
/// arrived, up to each step's `log_limit`: over it, the start and the end, and a line saying what
/// was cut between them).
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The op's id.
    op: String,
    /// Only this step's output.
    step: Option<String>,
    /// Keep printing new output until the op stops running.
    #[arg(long, short)]
    follow: bool,
    /// One JSON object per line of output: `task`, `attempt`, `stream` (`stdout`, `stderr`, or
    /// `cairn`: its note of output cut over `log_limit`), `time`, `text`.
    #[arg(long)]
    json: bool,
    /// Only the last N lines of each attempt's output (then, with `--follow`, what comes).
    #[arg(long, value_name = "N")]
    tail: Option<usize>,
    /// Only output written since then: a duration back from now (`10m`) or a time (RFC 3339).
    #[arg(long, value_name = "DURATION|TIME", value_parser = since)]
    since: Option<Since>,
    /// Only attempt N of each task.
    #[arg(long, value_name = "N")]
    attempt: Option<u32>,
    /// Start each line with the time it was written.
    #[arg(long)]
    timestamps: bool,
    #[command(flatten)]
    db: DbArgs,
}

pub fn run(args: &Args, out: &Output) -> Result<(), Failure> {
    let op = op_id(&args.op)?;
    let (reader, row) = crate::db::read_op(&args.db, op)?;
    let rule = args.db.rule()?;
    let tasks = reader.tasks(op)?;
    // A task by name (`restore[s03]`), or a step: its own task and, for a fan-out, its items'.
    let wanted: Option<std::collections::HashSet<TaskNo>> = match &args.step {
        None => None,
        Some(step) => {
            let set: std::collections::HashSet<TaskNo> =
                match tasks.iter().find(|t| &t.name == step) {
                    Some(t) if t.name != t.step => std::iter::once(t.task_no).collect(),
                    _ => tasks
                        .iter()
                        .filter(|t| &t.step == step)
                        .map(|t| t.task_no)
                        .collect(),
                };
            if set.is_empty() {
                return Err(anyhow::anyhow!(
                    "op {op} has no step `{step}`; its steps are {}",
                    tasks
                        .iter()
                        .map(|t| format!("`{}`", t.name))
                        .collect::<Vec<_>>()
                        .join(", ")
                )
                .into());
            }
            Some(set)
        }
    };
    // A `plan:` task's steps print in its child ops: say where.
    let children: Vec<(store::OpId, &str)> = reader
        .children(op)?
        .iter()
        .filter_map(|child| {
            let (_, task) = child.parent?;
            let name = tasks.iter().find(|t| t.task_no == task)?;
            wanted
                .as_ref()
                .is_none_or(|set| set.contains(&task))
                .then_some((child.id, name.name.as_str()))
        })
        .collect();
    if let Some((first, _)) = children.first() {
        let list: Vec<String> = children
            .iter()
            .map(|(id, task)| format!("op {id} (`{}`)", crate::output::shown(task)))
            .collect();
        out.note(&format!(
            "sub-plan steps print in their own ops: {}; see `cairn logs {first}`\n",
            list.join(", ")
        ));
    }
    // One task asked for: read only its logs.
    let task = wanted
        .as_ref()
        .filter(|set| set.len() == 1)
        .and_then(|set| set.iter().next().copied());
    let name = |no: TaskNo| {
        tasks
            .iter()
            .find(|t| t.task_no == no)
            .map_or("?", |t| t.name.as_str())
            .to_owned()
    };
    // Parallel tasks write at the same time: follow each (task, attempt) with its own cursor.
    let mut seen: HashMap<(TaskNo, u32), i64> = HashMap::new();
    let mut current: Option<(TaskNo, u32)> = None;
    let since = args.since.map(|s| s.at(engine::owner::now()));
    let mut first_read = true;
    // Whether the text printed last ended within a line.
    let mut mid_line = false;
    let mut row = row;
    loop {
        let mut lines = Vec::new();
        for chunk in reader.logs(op, task, None)? {
            let key = (chunk.task_no, chunk.attempt);
            let wanted_task = wanted
                .as_ref()
                .is_none_or(|set| set.contains(&chunk.task_no));
            let wanted_attempt = args.attempt.is_none_or(|n| n == chunk.attempt);
            if !wanted_task
                || !wanted_attempt
                || seen.get(&key).is_some_and(|&last| chunk.seq <= last)
            {
                continue;
            }
            // The first chunk kept after older ones were dropped over `log_limit`.
            let cut = chunk.seq > 1 && !seen.contains_key(&key);
            seen.insert(key, chunk.seq);
            lines.extend(split_lines(&chunk, cut));
        }
        lines.retain(|l| since.is_none_or(|at| l.at >= at));
        if first_read && let Some(n) = args.tail {
            lines = last_lines(lines, n);
        }
        first_read = false;
        let mut text = String::new();
        for line in &lines {
            let key = (line.task_no, line.attempt);
            if args.json {
                text.push_str(&line.json(&name(line.task_no)));
                continue;
            }
            if current != Some(key) {
                current = Some(key);
                let dropped = if line.cut {
                    " (earlier output dropped: over `log_limit`)"
                } else {
                    ""
                };
                writeln!(
                    text,
                    "==> {} (attempt {}){dropped} <==",
                    crate::output::shown(&name(line.task_no)),
                    line.attempt
                )
                .ok();
            }
            // cairn's note of output cut over `log_limit` is a line of its own.
            if line.stream == 0 && mid_line {
                text.push('\n');
            }
            if args.timestamps {
                text.push_str(&engine::time::local(line.at));
                text.push(' ');
            }
            text.push_str(&line.text);
            mid_line = !line.text.ends_with('\n');
        }
        let mut std_out = std::io::stdout().lock();
        std::io::Write::write_all(&mut std_out, text.as_bytes()).context("cannot write")?;
        std::io::Write::flush(&mut std_out).context("cannot write")?;
        drop(std_out);
        if !args.follow || rule.shown_status(&row, engine::owner::now()).is_ended() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(250));
        row = reader.op(op)?;
    }
}

/// `--since`: a duration back from now, or a time.
#[derive(Debug, Clone, Copy)]
enum Since {
    Ago(Duration),
    At(i64),
}

impl Since {
    /// The time it names, in milliseconds since the epoch, at `now`.
    fn at(self, now: i64) -> i64 {
        match self {
            Self::Ago(d) => now - i64::try_from(d.as_millis()).unwrap_or(i64::MAX),
            Self::At(at) => at,
        }
    }
}

fn since(text: &str) -> Result<Since, String> {
    plans::units::parse_duration(text)
        .map(Since::Ago)
        .or_else(|_| engine::time::parse_rfc3339(text).map(Since::At))
        .map_err(|_| {
            format!("`{text}` is neither a duration (`10m`) nor a time (`2026-12-03T02:00:00Z`)")
        })
}

/// One line of a step's output (with its newline, when it had one), and where it came from.
struct Line {
    task_no: TaskNo,
    attempt: u32,
    stream: u8,
    at: i64,
    text: String,
    /// The first line after output dropped over `log_limit`.
    cut: bool,
}

impl Line {
    fn json(&self, task: &str) -> String {
        let object = web::view::log_line(task, self.attempt, self.stream, self.at, &self.text);
        format!("{object}\n")
    }
}

/// A chunk's lines; `cut`: the chunk follows output dropped over `log_limit`.
fn split_lines(chunk: &store::LogChunk, cut: bool) -> Vec<Line> {
    String::from_utf8_lossy(&chunk.data)
        .split_inclusive('\n')
        .enumerate()
        .map(|(i, line)| Line {
            task_no: chunk.task_no,
            attempt: chunk.attempt,
            stream: chunk.stream,
            at: chunk.at,
            text: line.to_owned(),
            cut: cut && i == 0,
        })
        .collect()
}

/// The last `n` lines of each attempt, in their order.
fn last_lines(lines: Vec<Line>, n: usize) -> Vec<Line> {
    let mut count: HashMap<(TaskNo, u32), usize> = HashMap::new();
    for line in &lines {
        *count.entry((line.task_no, line.attempt)).or_default() += 1;
    }
    let mut index: HashMap<(TaskNo, u32), usize> = HashMap::new();
    lines
        .into_iter()
        .filter(|line| {
            let key = (line.task_no, line.attempt);
            let i = index.entry(key).or_default();
            *i += 1;
            *i + n > count[&key]
        })
        .collect()
}
