//! The rules of lock keys and cooldowns: an op takes its key unless another op holds it or it
//! cools down after an earlier one (`--ignore-cooldown` says so in the trail); a succeeded or
//! canceled op releases it and starts its cooldown (a failing one too, when its plan says
//! `on_failure: release`); `cairn ack` ends a cooldown early. Pausing
//! cairn is recorded here too.

use super::{Tx, event, events};
use crate::error::{Error, Result};
use crate::types::{Millis, OpId, Pause, Request};

/// Takes the op's lock key, unless another op holds it or it cools down.
pub(crate) fn take<T: Tx>(tx: &mut T, op: OpId, at: Millis, ignore_cooldown: bool) -> Result<()> {
    let Some(key) = tx.lock_key(op)?.ok_or(Error::NotFound(op))? else {
        return Ok(());
    };
    match tx.lock_holder(&key)? {
        Some(holder) if holder == op => return Ok(()),
        Some(holder) => return Err(Error::LockHeld { key, holder }),
        None => {}
    }
    if let Some((after, until)) = tx.cooldown(&key, at)? {
        if !ignore_cooldown {
            return Err(Error::CoolingDown { key, after, until });
        }
        let (kind, message) = events::cooldown_ignored(&key, after);
        event(tx, op, at, kind, None, &message)?;
    }
    tx.insert_lock(&key, op, at)?;
    tx.delete_cooldown(&key)?;
    let (kind, message) = events::lock_taken(&key);
    event(tx, op, at, kind, None, &message)
}

/// Releases the op's lock (it succeeded or was canceled) and starts the key's cooldown.
pub(crate) fn release<T: Tx>(tx: &mut T, op: OpId, at: Millis) -> Result<()> {
    free(tx, op, at, false)
}

/// Releases the lock of an op that fails, as its plan asks (`lock.on_failure: release`), and
/// starts the key's cooldown.
pub(crate) fn release_on_failure<T: Tx>(tx: &mut T, op: OpId, at: Millis) -> Result<()> {
    free(tx, op, at, true)
}

fn free<T: Tx>(tx: &mut T, op: OpId, at: Millis, failing: bool) -> Result<()> {
    let Some((key, cooldown)) = tx.held_lock(op)? else {
        return Ok(());
    };
    tx.delete_lock(&key)?;
    let cooldown = cooldown.filter(|ms| *ms > 0);
    if let Some(ms) = cooldown {
        tx.start_cooldown(&key, op, at + ms)?;
    }
    let (kind, message) = events::lock_released(&key, cooldown, failing);
    event(tx, op, at, kind, None, &message)
}

/// Acknowledges a key's cooldown, so that a new op may take the key.
pub(crate) fn ack<T: Tx>(tx: &mut T, key: &str, request: &Request) -> Result<()> {
    let Some(op) = tx.ack_cooldown(key, request)? else {
        return Err(Error::NoCooldown {
            key: key.to_owned(),
        });
    };
    let (kind, message) = events::cooldown_acked(key, request);
    event(tx, op, request.at, kind, None, &message)
}

/// Records a pause: its scope, who, when, why and until when.
pub(crate) fn pause<T: Tx>(tx: &mut T, pause: &Pause) -> Result<()> {
    tx.set_paused(&pause.scope.setting(), &pause.to_setting())
}
