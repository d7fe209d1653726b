//! `GET /changes`: Server-Sent Events that say which ops moved, driven by the store's event
//! numbers (every change of an op or of a task records an event). One watcher per server reads
//! each op's newest event number while anyone follows, and each client is sent only the ops whose
//! number moved since it last heard; the dashboard then re-reads just those ops.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::response::IntoResponse;
use axum::response::sse::{Event, KeepAlive, Sse};
use serde_json::json;
use tokio::sync::watch;

use crate::api::App;

/// How often the watcher reads the event numbers while someone follows.
const EVERY: Duration = Duration::from_millis(250);

/// Each op's newest event number, by op id; `None` until the watcher's first read.
type Marks = Option<Arc<HashMap<i64, i64>>>;

/// The newest event number of each op, shared by the clients of `/changes`; the watcher that
/// fills it starts with the first client.
#[derive(Debug, Clone, Default)]
pub struct Heads {
    sender: Arc<Mutex<Option<watch::Sender<Marks>>>>,
}

impl Heads {
    fn subscribe(&self, app: &App) -> watch::Receiver<Marks> {
        let mut sender = self
            .sender
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(sender) = sender.as_ref() {
            return sender.subscribe();
        }
        let (tx, rx) = watch::channel(Marks::default());
        *sender = Some(tx.clone());
        let app = app.clone();
        tokio::spawn(async move {
            loop {
                if tx.receiver_count() > 0 {
                    let read = app
                        .read(|reader, _| {
                            Ok(reader
                                .event_heads()?
                                .into_iter()
                                .map(|(op, seq)| (op.0, seq))
                                .collect::<HashMap<_, _>>())
                        })
                        .await;
                    match read {
                        Ok(marks) => {
                            tx.send_if_modified(|old| {
                                let moved = old.as_deref() != Some(&marks);
                                if moved {
                                    *old = Some(Arc::new(marks));
                                }
                                moved
                            });
                        }
                        Err(e) => tracing::warn!("reading the ops' event numbers: {}", e.message),
                    }
                }
                tokio::time::sleep(EVERY).await;
            }
        });
        rx
    }
}

/// `GET /changes`: an event `ops` (`[[id, number], ...]`) with every op at first, then with the
/// ops whose newest event number moved, as they move.
pub async fn follow(State(app): State<App>) -> axum::response::Response {
    let rx = app.heads.subscribe(&app);
    let stream = futures_util::stream::unfold(
        (rx, HashMap::<i64, i64>::new(), true),
        |(mut rx, mut seen, first)| async move {
            loop {
                let marks = rx.borrow_and_update().clone();
                if let Some(marks) = marks {
                    let mut moved: Vec<(i64, i64)> = marks
                        .iter()
                        .filter(|(op, seq)| seen.get(op) != Some(seq))
                        .map(|(op, seq)| (*op, *seq))
                        .collect();
                    if first || !moved.is_empty() {
                        moved.sort_unstable();
                        seen.clone_from(&*marks);
                        let event = Event::default().event("ops").data(json!(moved).to_string());
                        return Some((Ok::<_, Infallible>(event), (rx, seen, false)));
                    }
                }
                if rx.changed().await.is_err() {
                    return None;
                }
            }
        },
    );
    Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response()
}
