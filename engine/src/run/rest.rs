//! A taken-over op's tasks, read in two parts when it has many: its steps and hooks and the
//! first items still to run, with which the run starts, then every task, read on a blocking
//! thread while those run ([`Loaded`]).
//!
//! The rest is read while this process owns the op and runs only the tasks of the first part:
//! every other task's row is as this run found it. Merged, the first part's tasks keep the
//! state the run gave them and every other task takes its row ([`merge`]). Whatever needs every
//! task (gathering a fan-out, expanding one, the op's outcome, `resume --from`) waits for the
//! merge first.

use std::sync::Arc;

use store::{Briefs, Reader};
use tokio::sync::oneshot;

use super::scheduler::TaskState;
use crate::task::context::Shared;

/// How many items still to run the first part holds: enough to keep the op's `max_parallel`
/// busy while the rest is read.
const FIRST_ITEMS: u32 = 2048;

/// An op's tasks as loaded: `tasks` by task number, and the rest still being read, if any.
pub(crate) struct Loaded {
    pub tasks: Vec<TaskState>,
    pub rest: Option<Rest>,
}

/// The rest of a [`Loaded`]: the task numbers the first part read, and every task, once read.
pub(crate) struct Rest {
    first: Vec<usize>,
    answer: oneshot::Receiver<Result<Vec<TaskState>, store::Error>>,
}

impl Loaded {
    /// Every task of `op` at once, as stored.
    pub(crate) fn whole(tasks: Vec<TaskState>) -> Self {
        Self { tasks, rest: None }
    }

    /// Every task of the op, in one read.
    pub(crate) fn read_whole(shared: &Shared, reader: &Reader) -> Result<Self, store::Error> {
        every_task(shared, reader).map(Self::whole)
    }

    /// `op`'s tasks: in one read when it has fewer than its steps and hooks and
    /// [`FIRST_ITEMS`] more, else in two parts.
    pub(crate) fn read(shared: &Arc<Shared>, reader: &Reader) -> Result<Self, store::Error> {
        let op = shared.op;
        let steps = u32::try_from(shared.steps.len()).unwrap_or(u32::MAX);
        let small = reader
            .last_task(op)?
            .is_none_or(|last| last.0 < steps.saturating_add(FIRST_ITEMS));
        if small {
            return Self::read_whole(shared, reader);
        }
        let which = Briefs::First {
            steps,
            items: FIRST_ITEMS,
        };
        let rows = reader.task_briefs(op, which)?;
        // Every step and hook is of the first part, stored or not yet.
        let mut first: Vec<usize> = (0..shared.steps.len())
            .chain(rows.iter().map(|r| r.task_no.0 as usize))
            .collect();
        first.sort_unstable();
        first.dedup();
        let tasks = TaskState::load(&shared.steps, rows);
        let (tell, answer) = oneshot::channel();
        let shared = shared.clone();
        tokio::task::spawn_blocking(move || {
            // Nobody waits any more when the run ended first (it failed at once): dropped.
            let all = shared
                .store
                .reader()
                .and_then(|reader| every_task(&shared, &reader));
            let _ = tell.send(all);
        });
        Ok(Self {
            tasks,
            rest: Some(Rest { first, answer }),
        })
    }

    /// Waits for the rest, if any, and merges it.
    pub(crate) async fn complete(&mut self) -> Result<(), store::Error> {
        if self.rest.is_some() {
            let (first, all) = arrival(&mut self.rest).await;
            merge(&mut self.tasks, &first, all?);
        }
        Ok(())
    }
}

/// Every task of the op, as the run keeps them.
fn every_task(shared: &Shared, reader: &Reader) -> Result<Vec<TaskState>, store::Error> {
    let rows = reader.task_briefs(shared.op, Briefs::All)?;
    Ok(TaskState::load(&shared.steps, rows))
}

/// Makes `tasks` every task: `all` as read, but for the tasks numbered in `first` (each once),
/// which keep their state in `tasks` (the run may have moved them since).
pub(crate) fn merge(tasks: &mut Vec<TaskState>, first: &[usize], mut all: Vec<TaskState>) {
    for &no in first {
        if no < tasks.len() {
            if no >= all.len() {
                all.resize_with(no + 1, TaskState::gone);
            }
            all[no] = std::mem::replace(&mut tasks[no], TaskState::gone());
        }
    }
    *tasks = all;
}

/// The rest, once read: the first part's task numbers and every task; `rest` emptied. Never
/// resolves when there is none. Dropped before it resolves (another branch of a `select!` won), it leaves
/// `rest` as it was.
pub(super) async fn arrival(
    rest: &mut Option<Rest>,
) -> (Vec<usize>, Result<Vec<TaskState>, store::Error>) {
    let Some(waiting) = rest.as_mut() else {
        return std::future::pending().await;
    };
    // The reading thread goes without answering only as the runtime shuts down.
    let all = (&mut waiting.answer)
        .await
        .unwrap_or(Err(store::Error::Closed));
    let first = rest.take().map(|r| r.first).unwrap_or_default();
    (first, all)
}

#[cfg(test)]
mod tests {
    use store::TaskStatus;

    use super::*;

    fn task(name: &str, status: TaskStatus) -> TaskState {
        TaskState {
            status,
            ..TaskState::new(0, name.to_owned(), None)
        }
    }

    #[test]
    fn the_first_part_keeps_what_the_run_made_of_it_and_the_rest_comes_as_read() {
        // Read first: task 0 (the step) and item 3; the run then ended item 3.
        let mut tasks = vec![
            task("work", TaskStatus::Pending),
            TaskState::gone(),
            TaskState::gone(),
            task("work[3]", TaskStatus::Succeeded),
        ];
        let all = vec![
            task("work", TaskStatus::Pending),
            task("work[1]", TaskStatus::Succeeded),
            task("work[2]", TaskStatus::Pending),
            task("work[3]", TaskStatus::Pending),
            task("work[4]", TaskStatus::Pending),
        ];
        merge(&mut tasks, &[0, 3], all);
        let seen: Vec<(&str, TaskStatus)> =
            tasks.iter().map(|t| (t.name.as_str(), t.status)).collect();
        assert_eq!(
            seen,
            [
                ("work", TaskStatus::Pending),
                ("work[1]", TaskStatus::Succeeded),
                ("work[2]", TaskStatus::Pending),
                ("work[3]", TaskStatus::Succeeded),
                ("work[4]", TaskStatus::Pending),
            ]
        );
    }
}
