//! `GET /changes`: Server-Sent Events that say which ops moved, read from the store's log of
//! moves ([`store::Reader::moves`]: SQLite's `moves` table, PostgreSQL's notifications), never by
//! reading every op. One watcher per server asks the store while anyone follows and hands what
//! it heard to every client; the dashboard then re-reads just those ops.
//!
//! The events:
//! - `resync` (`{}`): what moved before is not known, so read again what you show. The first
//!   event of every feed, and sent again when the store cannot say what moved (its log was
//!   pruned past the last look, its listener reconnected) or a client fell behind.
//! - `ops` (`[id, ...]`): these ops moved (recorded an event: every change of an op or of one of
//!   its tasks records one).

use std::convert::Infallible;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::response::IntoResponse;
use axum::response::sse::{Event, KeepAlive, Sse};
use serde_json::json;
use tokio::sync::broadcast;

use crate::api::App;

/// How often the watcher asks the store what moved while someone follows.
const EVERY: Duration = Duration::from_millis(250);

/// The least time between two `resync`s the store's answers cause.
const RESYNC_EVERY: Duration = Duration::from_secs(2);

/// How many batches a client may fall behind before it is told to resync.
const BEHIND: usize = 64;

/// What the watcher heard in one look.
#[derive(Debug)]
enum Heard {
    /// The store could not say what moved.
    Resync,
    /// These ops moved.
    Ops(Vec<i64>),
}

/// The watcher's batches, shared by the clients of `/changes`; the watcher starts with the
/// first client and stops once none is left.
#[derive(Debug, Clone, Default)]
pub struct Watcher {
    sender: Arc<Mutex<Option<broadcast::Sender<Arc<Heard>>>>>,
}

impl Watcher {
    fn subscribe(&self, app: &App) -> broadcast::Receiver<Arc<Heard>> {
        let mut slot = self.sender.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(sender) = slot.as_ref() {
            return sender.subscribe();
        }
        let (tx, rx) = broadcast::channel(BEHIND);
        *slot = Some(tx.clone());
        let (app, slot) = (app.clone(), self.sender.clone());
        tokio::spawn(async move {
            let mut cursor = None;
            // When the last `resync` went out, and whether one is owed: a store that cannot say
            // what moved for a while (a listener that cannot connect) is answered with one
            // every [`RESYNC_EVERY`], not every look.
            let mut resynced: Option<Instant> = None;
            let mut owed = false;
            loop {
                match app.read(move |reader, _| Ok(reader.moves(cursor)?)).await {
                    Ok(moves) => {
                        cursor = Some(moves.cursor);
                        match moves.ops {
                            // Also the first look: a client's re-read may have come before it.
                            None => owed = true,
                            Some(ops) if !ops.is_empty() => {
                                // What a dashboard reads next must not be an answer made
                                // before the move.
                                app.forget(&ops);
                                let ops = ops.into_iter().map(|op| op.0).collect();
                                let _ = tx.send(Arc::new(Heard::Ops(ops)));
                            }
                            Some(_) => {}
                        }
                        if owed && resynced.is_none_or(|at| at.elapsed() >= RESYNC_EVERY) {
                            app.forget_all();
                            let _ = tx.send(Arc::new(Heard::Resync));
                            (resynced, owed) = (Some(Instant::now()), false);
                        }
                    }
                    Err(e) => tracing::warn!("reading which ops moved: {}", e.message),
                }
                tokio::time::sleep(EVERY).await;
                // Checked under the lock that subscribing takes: a client coming now either
                // finds this watcher going on or starts the next one.
                let mut slot = slot.lock().unwrap_or_else(PoisonError::into_inner);
                if tx.receiver_count() == 0 {
                    *slot = None;
                    return;
                }
            }
        });
        rx
    }
}

/// `GET /changes`: `resync` first, then `ops` as ops move (see the module's words).
pub async fn follow(State(app): State<App>) -> axum::response::Response {
    let rx = app.watcher.subscribe(&app);
    let resync = || Event::default().event("resync").data("{}");
    let first = futures_util::stream::once(async move { Ok::<_, Infallible>(resync()) });
    let rest = futures_util::stream::unfold(rx, move |mut rx| async move {
        let event = match rx.recv().await {
            Ok(heard) => match &*heard {
                Heard::Resync => resync(),
                Heard::Ops(ops) => Event::default().event("ops").data(json!(ops).to_string()),
            },
            Err(broadcast::error::RecvError::Lagged(_)) => resync(),
            Err(broadcast::error::RecvError::Closed) => return None,
        };
        Some((Ok::<_, Infallible>(event), rx))
    });
    Sse::new(futures_util::StreamExt::chain(first, rest))
        .keep_alive(KeepAlive::default())
        .into_response()
}
