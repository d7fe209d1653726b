//! Live progress of a run on stderr. On a terminal: a spinner per running task, with every
//! transition printed above them. Elsewhere (a pipe, a log file, CI): one line per transition.

use std::collections::HashMap;
use std::io::{IsTerminal as _, Write as _};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use engine::progress::{Progress, Sink, Start};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::output::{shown, shown_lines};

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
                let task = shown(task);
                bar.set_message(if *attempt > 1 {
                    format!("{within}{task} (attempt {attempt})")
                } else {
                    format!("{within}{task}")
                });
                bar.enable_steady_tick(Duration::from_millis(120));
                bars.insert(format!("{within}{task}"), bar);
                return;
            }
            Progress::TaskProgress { task, text } => {
                // The spinner says it; no line above.
                let task = shown(task);
                if let Some(bar) = bars.get(&format!("{within}{task}")) {
                    bar.set_message(format!("{within}{task}: {}", shown(text)));
                    return;
                }
            }
            Progress::TaskSucceeded { task, .. }
            | Progress::TaskFailed { task, .. }
            | Progress::TaskSkipped { task }
            | Progress::TaskInterrupted { task } => {
                if let Some(bar) = bars.remove(&format!("{within}{}", shown(task))) {
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
    let task = shown(task);
    op.map_or_else(|| task.to_string(), |op| format!("{task} (op {op})"))
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

/// The line for a transition; the data in it (titles, task names, errors, lock keys) [`shown`].
pub fn describe(p: &Progress, verbose: bool) -> String {
    let first_line = |text: &str| {
        if verbose {
            shown_lines(text).into_owned()
        } else {
            shown(&first_line(text)).into_owned()
        }
    };
    let task = |p: &Progress| match p {
        Progress::TaskStarted { task, .. }
        | Progress::TaskSucceeded { task, .. }
        | Progress::TaskSkipped { task }
        | Progress::TaskProgress { task, .. }
        | Progress::TaskFailed { task, .. }
        | Progress::TaskInterrupted { task }
        | Progress::TaskWaiting { task, .. }
        | Progress::LeftoversEnded { task, .. } => shown(task).into_owned(),
        _ => String::new(),
    };
    let named = task(p);
    let ms = |d: &Duration| engine::time::elapsed(i64::try_from(d.as_millis()).unwrap_or(0));
    match p {
        Progress::OpStarted { op, title, how } => {
            let how = match how {
                Start::New => "started",
                Start::Resumed => "resumed",
                Start::ToCancel => "taken over to cancel it",
            };
            format!("op {op} {how}: {}", shown(title))
        }
        Progress::TaskStarted { attempt, .. } if *attempt > 1 => {
            format!("  {named}: started (attempt {attempt})")
        }
        Progress::TaskStarted { .. } => format!("  {named}: started"),
        Progress::TaskSucceeded {
            by_check, elapsed, ..
        } => {
            let how = if *by_check {
                " by its check (already done)"
            } else {
                ""
            };
            format!("  {named}: succeeded{how} in {}", ms(elapsed))
        }
        Progress::TaskSkipped { .. } => format!("  {named}: skipped"),
        Progress::TaskProgress { text, .. } => format!("  {named}: {}", shown(text)),
        Progress::TaskFailed {
            error, retry_in, ..
        } => {
            let retry = retry_in
                .as_ref()
                .map_or(String::new(), |d| format!(" (retry in {})", ms(d)));
            format!("  {named}: failed: {}{retry}", first_line(error))
        }
        Progress::TaskInterrupted { .. } => format!("  {named}: interrupted"),
        Progress::TaskWaiting { op, prompt, .. } => {
            format!(
                "  {named}: waiting for approval: {}\n           answer with `cairn approve {op} {named}` (or `--reject`)",
                shown(prompt)
            )
        }
        Progress::Parked { op, gates } => format!(
            "op {op} waits for approval of {}: no process holds it until an answer comes",
            shown(&gates.join(", "))
        ),
        Progress::WaitingForLock { key, holder } => {
            format!("waiting for lock `{}`, held by op {holder}", shown(key))
        }
        Progress::LeftoversEnded { attempt, count, .. } => {
            format!("  {named}: ended {count} process(es) left running by attempt {attempt}")
        }
        Progress::Stopping { reason } => {
            format!("stopping: {}; ending running steps", shown(reason))
        }
        Progress::LogIncomplete {
            task,
            attempt,
            bytes,
            why,
        } => {
            let what = bytes.map_or("the rest".to_owned(), |b| format!("{b} bytes"));
            format!(
                "  {}: {what} of attempt {attempt}'s output not in its log: {}",
                shown(task),
                first_line(why)
            )
        }
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
                | Progress::AlreadyDone { .. } => shown(task).into_owned(),
                _ => child_label(task, *op),
            };
            format!("  {label} › {}", describe(event, verbose).trim_start())
        }
    }
}
