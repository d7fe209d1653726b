//! The rules of schedules: a name is taken once, removing or pausing needs the schedule, a firing
//! is recorded once (compare-and-set on its due time, see also [`super::ops::submit`]), and a
//! note that a firing failed never covers that firing's success.

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
        Change::ScheduleNote {
            name,
            due,
            note,
            handled,
        } => {
            if *handled {
                // A firing handled without an op (skipped, or nobody else could fire it).
                tx.fire_schedule(name, *due, None, note)?;
            } else {
                // Only why this process could not fire it: never over another's firing of it.
                tx.note_schedule(name, *due, note)?;
            }
        }
        _ => unreachable!("not a schedule change: {change:?}"),
    }
    Ok(())
}
