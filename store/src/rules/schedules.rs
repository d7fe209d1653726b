//! The rules of schedules: a name is taken once, removing or pausing needs the schedule, and a
//! firing is recorded once (compare-and-set on its due time, see also [`super::ops::submit`]).

use super::Tx;
use crate::error::{Error, Result};
use crate::types::Change;

/// Applies a schedule change (see [`super::apply`] for which).
pub(crate) fn apply<T: Tx>(tx: &mut T, change: &Change) -> Result<()> {
    match change {
        Change::AddSchedule(new) => {
            if !tx.add_schedule(new)? {
                return Err(Error::Schedule(format!(
                    "a schedule `{}` exists; remove it first",
                    new.name
                )));
            }
        }
        Change::RemoveSchedule { name } => {
            if !tx.remove_schedule(name)? {
                return Err(Error::Schedule(format!("no schedule `{name}`")));
            }
        }
        Change::PauseSchedule { name, paused } => {
            if !tx.pause_schedule(name, *paused)? {
                return Err(Error::Schedule(format!("no schedule `{name}`")));
            }
        }
        Change::ScheduleNote { name, due, note } => {
            // A firing handled without an op (skipped, or the plan could not be read).
            tx.fire_schedule(name, *due, None, note)?;
        }
        _ => unreachable!("not a schedule change: {change:?}"),
    }
    Ok(())
}
