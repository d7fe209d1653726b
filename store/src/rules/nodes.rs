//! Serving nodes: a `cairn serve` process records itself and renews its row (`NodeBeat`), deletes
//! it when it stops (`NodeGone`), and reserves queued ops before it claims them (`Reserve`), so
//! that nodes looking at the queue at once take different ops rather than race for the same.

use super::Tx;
use crate::error::Result;
use crate::types::{Applied, Change};

/// Applies a node change (see [`super::apply`] for which).
pub(crate) fn apply<T: Tx>(tx: &mut T, change: &Change) -> Result<Applied> {
    match change {
        Change::NodeBeat {
            node,
            workers,
            started_at,
            at,
            lease_until,
        } => {
            tx.beat_node(node, *workers, *started_at, *at, *lease_until)?;
            tx.prune_nodes(*at)?;
            Ok(Applied::Done)
        }
        Change::NodeGone { node } => tx.delete_node(node).map(|()| Applied::Done),
        Change::Reserve {
            owner,
            lease_until,
            now,
            candidates,
            limit,
        } => {
            let taken = tx.lock_unowned(candidates, *now, *limit)?;
            for op in &taken {
                tx.set_owner(*op, owner, *lease_until)?;
            }
            Ok(Applied::Reserved(taken))
        }
        _ => unreachable!("not a node change: {change:?}"),
    }
}
