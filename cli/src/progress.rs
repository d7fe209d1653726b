//! Live progress of a run on stderr. On a terminal: a spinner per running task, with every
//! transition printed above them. Elsewhere (a pipe, a log file, CI): one line per transition.

use std::collections::HashMap;
use std::io::{IsTerminal as _, Write as _};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use engine::progress::{Progress, Sink, Start};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

fn clock() -> String {
    engine::time::local(engine::owner::now())
        .split(' ')
        .nth(1)
        .unwrap_or_default()
        .to_owned()
}

fn line(text: &str) {
    // A closed stderr leaves nobody to tell; never panic over it.
    let _ = writeln!(std::io::stderr().lock(), "{} {text}", clock());
}

/// The sink for a run: the live view on a terminal, lines otherwise; with `--quiet`, only an end
/// that is not a success (an error is all `--quiet` prints).
pub fn printer(out: &crate::output::Output) -> Sink {
    let (quiet, verbose) = (out.quiet, out.verbose);
    if !quiet && std::io::stderr().is_terminal() {
        live(verbose)
    } else {
        lines(quiet, verbose)
    }
}

/// One line per transition.
fn lines(quiet: bool, verbose: bool) -> Sink {
    Arc::new(move |p: &Progress| {
        if quiet
            && !matches!(p, Progress::OpEnded { status, .. } if *status != store::OpStatus::Succeeded)
        {
            return;
        }
        line(&describe(p, verbose));
    })
}

/// Spinners for running tasks; transitions printed above them.
fn live(verbose: bool) -> Sink {
    let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr());
    let bars: Mutex<HashMap<String, ProgressBar>> = Mutex::new(HashMap::new());
    let style = ProgressStyle::with_template("  {spinner} {msg} {elapsed}")
        .unwrap_or_else(|_| ProgressStyle::default_spinner());
    Arc::new(move |p: &Progress| {
        let Ok(mut bars) = bars.lock() else { return };
        // A child op's task is told, and keyed, under the parent's task that runs it.
        let (within, leaf) = unwrap_child(p);
        match leaf {
            Progress::TaskStarted { task, attempt } => {
                let bar = multi.add(ProgressBar::new_spinner());
                bar.set_style(style.clone());
                bar.set_message(if *attempt > 1 {
                    format!("{within}{task} (attempt {attempt})")
                } else {
                    format!("{within}{task}")
                });
                bar.enable_steady_tick(Duration::from_millis(120));
                bars.insert(format!("{within}{task}"), bar);
                return;
            }
            Progress::TaskSucceeded { task, .. }
            | Progress::TaskFailed { task, .. }
            | Progress::TaskSkipped { task }
            | Progress::TaskInterrupted { task } => {
                if let Some(bar) = bars.remove(&format!("{within}{task}")) {
                    bar.finish_and_clear();
                    multi.remove(&bar);
                }
            }
            _ => {}
        }
        let _ = multi.println(format!("{} {}", clock(), describe(p, verbose)));
    })
}

/// A child op's event and the parents' tasks it happened under (`sub[a] (op 2) › `), however
/// deep; any other event as it is.
fn unwrap_child(mut p: &Progress) -> (String, &Progress) {
    let mut within = String::new();
    while let Progress::Child { task, op, event } = p {
        within.push_str(&child_label(task, *op));
        within.push_str(" › ");
        p = event;
    }
    (within, p)
}

/// `sub[a] (op 2)`: the parent's task, and the child op once known.
fn child_label(task: &str, op: Option<store::OpId>) -> String {
    op.map_or_else(|| task.to_owned(), |op| format!("{task} (op {op})"))
}

/// The first line of a message, marked when there is more (`cairn show` and `cairn logs` have it all).
fn first_line(text: &str) -> String {
    let mut lines = text.lines();
    let first = lines.next().unwrap_or_default();
    if lines.next().is_some() {
        format!("{first} [...]")
    } else {
        first.to_owned()
    }
}

/// The line for a transition.
pub fn describe(p: &Progress, verbose: bool) -> String {
    let first_line = |text: &str| {
        if verbose {
            text.to_owned()
        } else {
            first_line(text)
        }
    };
    let ms = |d: &Duration| engine::time::elapsed(i64::try_from(d.as_millis()).unwrap_or(0));
    match p {
        Progress::OpStarted { op, title, how } => {
            let how = match how {
                Start::New => "started",
                Start::Resumed => "resumed",
                Start::ToCancel => "taken over to cancel it",
            };
            format!("op {op} {how}: {title}")
        }
        Progress::TaskStarted { task, attempt } if *attempt > 1 => {
            format!("  {task}: started (attempt {attempt})")
        }
        Progress::TaskStarted { task, .. } => format!("  {task}: started"),
        Progress::TaskSucceeded {
            task,
            by_check,
            elapsed,
        } => {
            let how = if *by_check {
                " by its check (already done)"
            } else {
                ""
            };
            format!("  {task}: succeeded{how} in {}", ms(elapsed))
        }
        Progress::TaskSkipped { task } => format!("  {task}: skipped"),
        Progress::TaskFailed {
            task,
            error,
            retry_in,
        } => {
            let retry = retry_in
                .as_ref()
                .map_or(String::new(), |d| format!(" (retry in {})", ms(d)));
            format!("  {task}: failed: {}{retry}", first_line(error))
        }
        Progress::TaskInterrupted { task } => format!("  {task}: interrupted"),
        Progress::TaskWaiting { op, task, prompt } => {
            format!(
                "  {task}: waiting for approval: {prompt}\n           answer with `cairn approve {op} {task}` (or `--reject`)"
            )
        }
        Progress::Parked { op, gates } => format!(
            "op {op} waits for approval of {}: no process holds it until an answer comes",
            gates.join(", ")
        ),
        Progress::WaitingForLock { key, holder } => {
            format!("waiting for lock `{key}`, held by op {holder}")
        }
        Progress::LeftoversEnded {
            task,
            attempt,
            count,
        } => {
            format!("  {task}: ended {count} process(es) left running by attempt {attempt}")
        }
        Progress::LogIncomplete {
            task,
            attempt,
            bytes,
            why,
        } => {
            let what = bytes.map_or("the rest".to_owned(), |b| format!("{b} bytes"));
            format!(
                "  {task}: {what} of attempt {attempt}'s output not in its log: {}",
                first_line(why)
            )
        }
        Progress::Stopping { reason } => format!("stopping: {reason}; ending running steps"),
        Progress::AlreadyDone { op } => format!("op {op} already succeeded; nothing to resume"),
        Progress::OpEnded {
            op,
            status,
            error: Some(e),
        } => format!("op {op} {status}: {}", first_line(e)),
        Progress::OpEnded {
            op,
            status,
            error: None,
        } => format!("op {op} {status}"),
        Progress::Child { task, op, event } => {
            // The child op's own start and end name it already.
            let label = match **event {
                Progress::OpStarted { .. }
                | Progress::OpEnded { .. }
                | Progress::AlreadyDone { .. } => task.clone(),
                _ => child_label(task, *op),
            };
            format!("  {label} › {}", describe(event, verbose).trim_start())
        }
    }
}
