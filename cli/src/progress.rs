//! Live progress of a run on stderr: one line per transition, with the time.

use std::io::Write as _;
use std::sync::Arc;

use engine::progress::{Progress, Sink};

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

/// A sink that prints each transition as a line on stderr (nothing with `--quiet`).
pub fn printer(quiet: bool) -> Sink {
    Arc::new(move |p: &Progress| {
        if quiet && !matches!(p, Progress::OpEnded { .. }) {
            return;
        }
        match p {
            Progress::OpStarted { op, title, resumed } => {
                line(&format!(
                    "op {op} {}: {title}",
                    if *resumed { "resumed" } else { "started" }
                ));
            }
            Progress::TaskStarted { task, attempt } => {
                if *attempt > 1 {
                    line(&format!("  {task}: started (attempt {attempt})"));
                } else {
                    line(&format!("  {task}: started"));
                }
            }
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
                line(&format!(
                    "  {task}: succeeded{how} in {}",
                    engine::time::elapsed(i64::try_from(elapsed.as_millis()).unwrap_or(0))
                ));
            }
            Progress::TaskSkipped { task } => line(&format!("  {task}: skipped")),
            Progress::TaskFailed {
                task,
                error,
                retry_in,
            } => {
                let retry = retry_in.map_or(String::new(), |d| {
                    format!(
                        " (retry in {})",
                        engine::time::elapsed(i64::try_from(d.as_millis()).unwrap_or(0))
                    )
                });
                line(&format!("  {task}: failed: {error}{retry}"));
            }
            Progress::TaskInterrupted { task } => line(&format!("  {task}: interrupted")),
            Progress::LeftoversEnded {
                task,
                attempt,
                count,
            } => {
                line(&format!(
                    "  {task}: ended {count} process(es) left running by attempt {attempt}"
                ));
            }
            Progress::Stopping { reason } => {
                line(&format!("stopping: {reason}; ending running steps"));
            }
            Progress::AlreadyDone { op } => {
                line(&format!("op {op} already succeeded; nothing to resume"));
            }
            Progress::OpEnded { op, status, error } => match error {
                Some(e) => line(&format!("op {op} {status}: {e}")),
                None => line(&format!("op {op} {status}")),
            },
        }
    })
}
