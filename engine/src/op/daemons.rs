//! The servers an op's `daemon` steps started and left running ([`daemons`]), for `cairn show`.

use store::{AttemptStatus, OpId, Reader};

use super::{Error, snapshot_plan};

/// A `daemon` step's server, as its task's last attempt recorded it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Daemon {
    /// The task: the step's id, or `step[item]`.
    pub task: String,
    pub attempt: u32,
    pub pid: u32,
    pub pgid: Option<u32>,
    pub host: String,
    /// Whether it still runs; `None` when this machine cannot tell (another machine or pid
    /// namespace).
    pub alive: Option<bool>,
}

/// The servers of `op`'s `daemon` steps: for each of their tasks, the process its last attempt
/// recorded, unless that attempt failed or was canceled (its server was ended with it).
pub fn daemons(reader: &Reader, op: OpId) -> Result<Vec<Daemon>, Error> {
    // Most plans have no daemon step: their snapshot is not parsed. A snapshot this cairn cannot
    // read (a resume says why) shows no daemons rather than no op.
    if !reader.snapshot(op)?.text.contains("daemon") {
        return Ok(Vec::new());
    }
    let Ok(plan) = snapshot_plan(reader, op) else {
        return Ok(Vec::new());
    };
    if !plan.steps.iter().any(|s| s.daemon) {
        return Ok(Vec::new());
    }
    let attempts = reader.attempts(op)?;
    let mut out = Vec::new();
    for task in reader.tasks(op)? {
        if !plan
            .step_index(&task.step)
            .is_some_and(|i| plan.steps[i].daemon)
        {
            continue;
        }
        let Some(last) = attempts
            .iter()
            .filter(|a| a.task_no == task.task_no)
            .max_by_key(|a| a.n)
        else {
            continue;
        };
        if matches!(last.status, AttemptStatus::Failed | AttemptStatus::Canceled) {
            continue;
        }
        let Some(process) = &last.process else {
            continue;
        };
        out.push(Daemon {
            task: task.name.clone(),
            attempt: last.n,
            pid: process.pid,
            pgid: last.pgid,
            host: process.host.clone(),
            alive: match procs::proc::liveness(&crate::owner::to_identity(process)) {
                procs::proc::Liveness::Alive => Some(true),
                procs::proc::Liveness::Dead => Some(false),
                procs::proc::Liveness::Unknown => None,
            },
        });
    }
    Ok(out)
}
