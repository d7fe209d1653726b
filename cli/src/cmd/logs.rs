//! `cairn logs`: what steps printed, attempt by attempt.

use std::time::Duration;

use anyhow::Context as _;
use store::TaskNo;

use crate::db::{DbArgs, op_id};
use crate::exit::Failure;
use crate::output::Output;

/// Print the output of an op's steps, attempt by attempt (stdout and stderr interleaved as they
/// arrived, up to each step's `log_limit`, keeping the end).
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The op's id.
    op: String,
    /// Only this step's output.
    step: Option<String>,
    /// Keep printing new output until the op stops running.
    #[arg(long, short)]
    follow: bool,
    /// One JSON object per line of output: `task`, `attempt`, `stream` (`stdout`, `stderr`),
    /// `time`, `text`.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    db: DbArgs,
}

pub fn run(args: &Args, _out: &Output) -> Result<(), Failure> {
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
    let mut seen: std::collections::HashMap<(TaskNo, u32), i64> = std::collections::HashMap::new();
    let mut current: Option<(TaskNo, u32)> = None;
    let mut row = row;
    loop {
        for chunk in reader.logs(op, task, None)? {
            if wanted
                .as_ref()
                .is_some_and(|set| !set.contains(&chunk.task_no))
            {
                continue;
            }
            let key = (chunk.task_no, chunk.attempt);
            if seen.get(&key).is_some_and(|&last| chunk.seq <= last) {
                continue;
            }
            if args.json {
                seen.insert(key, chunk.seq);
                crate::output::data(&json_lines(&name(chunk.task_no), &chunk))
                    .context("cannot write")?;
                continue;
            }
            if current != Some(key) {
                current = Some(key);
                let dropped = if chunk.seq > 1 && !seen.contains_key(&key) {
                    " (earlier output dropped: over `log_limit`)"
                } else {
                    ""
                };
                crate::output::data(&format!(
                    "==> {} (attempt {}){dropped} <==\n",
                    name(chunk.task_no),
                    chunk.attempt
                ))
                .context("cannot write")?;
            }
            seen.insert(key, chunk.seq);
            let mut std_out = std::io::stdout().lock();
            std::io::Write::write_all(&mut std_out, &chunk.data).context("cannot write")?;
            std::io::Write::flush(&mut std_out).context("cannot write")?;
        }
        if !args.follow || rule.shown_status(&row, engine::owner::now()).is_ended() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(250));
        row = reader.op(op)?;
    }
}

/// A chunk of output as JSON lines, one per line of text (a last line without its newline too).
fn json_lines(task: &str, chunk: &store::LogChunk) -> String {
    let text = String::from_utf8_lossy(&chunk.data);
    let stream = if chunk.stream == 2 {
        "stderr"
    } else {
        "stdout"
    };
    let time = engine::time::rfc3339(chunk.at);
    let mut out = String::new();
    for line in text.split_inclusive('\n') {
        let object = serde_json::json!({
            "task": task,
            "attempt": chunk.attempt,
            "stream": stream,
            "time": time,
            "text": line.strip_suffix('\n').unwrap_or(line),
        });
        out.push_str(&object.to_string());
        out.push('\n');
    }
    out
}
