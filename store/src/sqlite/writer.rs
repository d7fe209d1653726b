//! The SQLite [`Backend`]: one writer thread that owns the write connection and commits whatever
//! is queued in one transaction (group commit), or a lone caller's commit on its own thread.
//!
//! Callers send a batch of [`Change`]s and wait for its reply; the reply comes only after the
//! transaction holding the batch committed (with `synchronous=FULL`, after the fsync; a commit of
//! nothing but what dies with the machine's boot is not synced: [`sync_for`]). Each batch
//! is applied in its own savepoint, so one refused batch does not undo the others that share the
//! commit. What a change may do is the rules' ([`crate::rules`]), over [`SqliteTx`].
//!
//! - [`SqliteStore`]: the handle, its [`Backend`] methods and [`SqliteStore::apply_here`].
//! - `writer()`: the thread's loop; [`commit`] and [`commit_in`]: one transaction of batches.
//! - [`sync_for`]: the `synchronous` level each commit needs.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread;

use rusqlite::Connection;

use super::tx::SqliteTx;
use super::{SqliteReader, busy_timeout, classify, is_busy, open_writer};
use crate::api::{Backend, Committing, Reader, Results};
use crate::error::{Error, Result};
use crate::location::Location;
use crate::rules;
use crate::types::{Applied, Change, OpId, ProcessId};

/// The most requests one transaction takes from the queue.
///
/// The queue itself is unbounded: every request has a caller waiting for its reply, so what waits
/// is bounded by the callers (an op's `max_parallel` tasks). A bounded queue made a wide fan-out
/// wait for room on the runtime's blocking threads, hundreds of them contending for the channel.
const QUEUE: usize = 1024;

/// Batches sent together: they share one transaction, each in its own savepoint.
struct Queued {
    batches: Vec<Vec<Change>>,
    reply: tokio::sync::oneshot::Sender<Vec<Result<Vec<Applied>>>>,
}

/// The database open for writing; the writer thread stops when this drops.
#[derive(Debug)]
pub(crate) struct SqliteStore {
    location: Location,
    path: PathBuf,
    sender: mpsc::Sender<Queued>,
    /// The write connection: the writer thread's, lent to a caller that commits on its own thread
    /// while the writer has nothing to do ([`SqliteStore::apply_here`]).
    conn: Arc<Mutex<Writable>>,
    /// Requests sent to the writer and not yet committed.
    queued: Arc<AtomicUsize>,
}

/// The write connection and the `synchronous` level it is set to ([`sync_for`]).
#[derive(Debug)]
struct Writable {
    conn: Connection,
    /// `synchronous=NORMAL`, for a commit of nothing but what dies with the boot.
    unsynced: bool,
}

impl SqliteStore {
    /// Opens (creating if needed, private to the user) the database at `path` for writing.
    pub(crate) fn open(path: &Path) -> Result<Self> {
        let conn = Arc::new(Mutex::new(Writable {
            conn: open_writer(path)?,
            unsynced: false,
        }));
        let queued = Arc::new(AtomicUsize::new(0));
        let (sender, receiver) = mpsc::channel::<Queued>();
        let thread_path = path.to_path_buf();
        let (thread_conn, thread_queued) = (conn.clone(), queued.clone());
        thread::Builder::new()
            .name("cairn-store-writer".into())
            .spawn(move || writer(&thread_conn, &thread_queued, &thread_path, &receiver))
            .map_err(|e| Error::Unusable {
                path: path.to_path_buf(),
                reason: format!("cannot start its writer: {e}"),
            })?;
        Ok(Self {
            location: Location::Sqlite(path.to_path_buf()),
            path: path.to_path_buf(),
            sender,
            conn,
            queued,
        })
    }

    /// [`Backend::commit`] on the calling thread, when the writer has nothing queued and the
    /// database is free at once: the batches are committed here, and their results returned. A
    /// short step's commit is then not handed to the writer thread and back, two thread wakes
    /// that cost as much as the rest of a `noop` step apart from the disk. It blocks the caller
    /// until the commit is durable, so it is for a caller with nothing else to do meanwhile.
    ///
    /// # Errors
    ///
    /// The batches, untouched, when their transaction could not begin here (something is queued,
    /// the writer is committing, another process holds the database): the caller then goes
    /// through the writer, which waits as long as the busy timeout allows. Any failure after the
    /// transaction began is returned in the results, as the writer would.
    pub(crate) fn apply_here(
        &self,
        batches: Vec<Vec<Change>>,
    ) -> std::result::Result<Vec<Result<Vec<Applied>>>, Vec<Vec<Change>>> {
        // Nothing queued before it: a request waiting for the writer is never overtaken.
        if self.queued.load(Ordering::SeqCst) != 0 {
            return Err(batches);
        }
        let Ok(mut writable) = self.conn.try_lock() else {
            return Err(batches);
        };
        if self.queued.load(Ordering::SeqCst) != 0 {
            return Err(batches);
        }
        // Never wait here for another process: the writer thread does, up to the busy timeout.
        let Writable { conn, unsynced } = &mut *writable;
        let Ok(conn) = NoWait::new(conn) else {
            return Err(batches);
        };
        let refs: Vec<&Vec<Change>> = batches.iter().collect();
        if let Err(e) = sync_for(conn.0, unsynced, &refs) {
            if is_busy(&e) {
                return Err(batches);
            }
            return Ok(failed(&classify(&self.path, &e), &self.path, refs.len()));
        }
        let tx = match Immediate::begin(conn.0) {
            Ok(tx) => tx,
            Err(e) if is_busy(&e) => return Err(batches),
            Err(e) => {
                return Ok(failed(&classify(&self.path, &e), &self.path, batches.len()));
            }
        };
        // From here, as the writer would: a failure of the whole commit is each batch's.
        Ok(commit_in(tx, &self.path, &refs)
            .unwrap_or_else(|e| failed(&e, &self.path, batches.len())))
    }

    /// Queues a request for the writer, counted until it is committed; false if the writer ended.
    fn send(&self, request: Queued) -> bool {
        self.queued.fetch_add(1, Ordering::SeqCst);
        if self.sender.send(request).is_err() {
            self.queued.fetch_sub(1, Ordering::SeqCst);
            return false;
        }
        true
    }
}

impl Backend for SqliteStore {
    fn commit(&self, batches: Vec<Vec<Change>>) -> Committing<'_> {
        let count = batches.len();
        let (reply, wait) = tokio::sync::oneshot::channel();
        let sent = self.send(Queued { batches, reply });
        Box::pin(async move {
            let closed = || (0..count).map(|_| Err(Error::Closed)).collect();
            if !sent {
                return closed();
            }
            wait.await.unwrap_or_else(|_| closed())
        })
    }

    /// The commit on the caller's thread when the writer has nothing queued and the database is
    /// free at once ([`SqliteStore::apply_here`]); through the writer otherwise.
    fn commit_solo(&self, batches: Vec<Vec<Change>>) -> Committing<'_> {
        match self.apply_here(batches) {
            Ok(results) => Box::pin(std::future::ready(results)),
            Err(batches) => self.commit(batches),
        }
    }

    fn commit_blocking(&self, batches: Vec<Vec<Change>>) -> Results {
        let count = batches.len();
        let closed = || (0..count).map(|_| Err(Error::Closed)).collect();
        let (reply, wait) = tokio::sync::oneshot::channel();
        if !self.send(Queued { batches, reply }) {
            return closed();
        }
        wait.blocking_recv().unwrap_or_else(|_| closed())
    }

    fn location(&self) -> &Location {
        &self.location
    }

    /// The file beside the database, `<db>.key`.
    fn secret_key_file(&self) -> PathBuf {
        super::key_file(&self.path)
    }

    fn reader(&self) -> Result<Reader> {
        SqliteReader::open_beside_writer(&self.path)?
            .map(Reader::from_backend)
            .ok_or_else(|| Error::Unusable {
                path: self.path.clone(),
                reason: "it disappeared while in use".to_owned(),
            })
    }
}

fn writer(
    conn: &Mutex<Writable>,
    queued: &AtomicUsize,
    path: &Path,
    receiver: &mpsc::Receiver<Queued>,
) {
    while let Ok(first) = receiver.recv() {
        let mut requests = vec![first];
        // Held from here until the requests are committed and no longer counted as queued.
        let mut conn = conn
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        while requests.len() < QUEUE {
            match receiver.try_recv() {
                Ok(more) => requests.push(more),
                Err(_) => break,
            }
        }
        let batches: Vec<&Vec<Change>> = requests.iter().flat_map(|r| &r.batches).collect();
        let results = commit(&mut conn, path, &batches);
        queued.fetch_sub(requests.len(), Ordering::SeqCst);
        drop(conn);
        match results {
            Ok(mut results) => {
                for request in requests {
                    let rest = results.split_off(request.batches.len());
                    let _ = request.reply.send(std::mem::replace(&mut results, rest));
                }
            }
            Err(err) => {
                for request in requests {
                    let _ = request
                        .reply
                        .send(failed(&err, path, request.batches.len()));
                }
            }
        }
    }
}

/// The write connection with no busy timeout, restored when this is dropped (a panic included).
struct NoWait<'c>(&'c mut Connection);

impl<'c> NoWait<'c> {
    fn new(conn: &'c mut Connection) -> rusqlite::Result<Self> {
        conn.busy_timeout(std::time::Duration::ZERO)?;
        Ok(Self(conn))
    }
}

impl Drop for NoWait<'_> {
    fn drop(&mut self) {
        let _ = self.0.busy_timeout(busy_timeout());
    }
}

/// `count` batches' results when their whole commit failed with `err`: that error, for each.
fn failed(err: &Error, path: &Path, count: usize) -> Vec<Result<Vec<Applied>>> {
    let each = || match err {
        Error::Locked {
            path,
            waited_ms,
            holder,
        } => Error::Locked {
            path: path.clone(),
            waited_ms: *waited_ms,
            holder: holder.clone(),
        },
        Error::Write { path, reason } => Error::Write {
            path: path.clone(),
            reason: reason.clone(),
        },
        other => Error::Write {
            path: path.to_path_buf(),
            reason: other.to_string(),
        },
    };
    (0..count).map(|_| Err(each())).collect()
}

/// Sets the write connection's `synchronous` for a commit of `batches`, before it begins: `FULL`,
/// the commit on disk before it returns, unless every change records only what dies with the
/// machine's boot ([`Change::dies_with_the_boot`]): `NORMAL` then, written but not synced (a
/// later synced commit makes it durable with its own). `unsynced` says which the connection is
/// set to: each commit sets the level it needs, none inherits another's.
fn sync_for(
    conn: &Connection,
    unsynced: &mut bool,
    batches: &[&Vec<Change>],
) -> rusqlite::Result<()> {
    let lazy = batches.iter().any(|b| !b.is_empty())
        && batches
            .iter()
            .all(|b| b.iter().all(Change::dies_with_the_boot));
    if lazy != *unsynced {
        // The level changes when the pragma is parsed, which may succeed where running it fails:
        // the flag says `NORMAL` from before the switch to it until the switch back succeeded,
        // so a commit after any failure sets `FULL` again.
        if lazy {
            *unsynced = true;
            conn.prepare_cached("PRAGMA synchronous = NORMAL")?
                .execute([])?;
        } else {
            conn.prepare_cached("PRAGMA synchronous = FULL")?
                .execute([])?;
            *unsynced = false;
        }
    }
    Ok(())
}

/// Applies every batch in one transaction, each in a savepoint; commits once.
fn commit(
    writable: &mut Writable,
    path: &Path,
    batches: &[&Vec<Change>],
) -> Result<Vec<Result<Vec<Applied>>>> {
    let Writable { conn, unsynced } = writable;
    sync_for(conn, unsynced, batches).map_err(|e| classify(path, &e))?;
    let tx = Immediate::begin(conn).map_err(|e| classify(path, &e))?;
    commit_in(tx, path, batches)
}

/// A write transaction of the writer's connection, begun with `BEGIN IMMEDIATE` and rolled back
/// unless committed. Its `BEGIN IMMEDIATE` and `COMMIT` stay prepared, as every statement of a
/// commit does: parsing them anew (as `rusqlite::Transaction` does) costs a step more than running
/// them.
struct Immediate<'c>(&'c Connection);

impl<'c> Immediate<'c> {
    fn begin(conn: &'c Connection) -> rusqlite::Result<Self> {
        conn.prepare_cached("BEGIN IMMEDIATE")?.execute([])?;
        Ok(Self(conn))
    }

    /// Commits; on failure the transaction is rolled back, if SQLite left it open.
    fn commit(self) -> rusqlite::Result<()> {
        self.0.prepare_cached("COMMIT")?.execute([]).map(drop)
    }

    fn rollback(self) -> rusqlite::Result<()> {
        self.end()
    }

    /// Rolls back, unless SQLite already did (it does after some errors, a full disk among them):
    /// a `ROLLBACK` then would fail, and its error hide the one that ended the transaction.
    fn end(&self) -> rusqlite::Result<()> {
        if self.0.is_autocommit() {
            return Ok(());
        }
        self.0.prepare_cached("ROLLBACK")?.execute([]).map(drop)
    }
}

impl std::ops::Deref for Immediate<'_> {
    type Target = Connection;

    fn deref(&self) -> &Connection {
        self.0
    }
}

impl Drop for Immediate<'_> {
    fn drop(&mut self) {
        let _ = self.end();
    }
}

/// [`commit`] once its transaction has begun.
fn commit_in(
    tx: Immediate<'_>,
    path: &Path,
    batches: &[&Vec<Change>],
) -> Result<Vec<Result<Vec<Applied>>>> {
    let err = |e: &rusqlite::Error| classify(path, e);
    let mut results = Vec::with_capacity(batches.len());
    // A batch alone in its transaction needs no savepoint: if it fails, nothing is committed.
    let alone = batches.len() == 1;
    // The op and writer the last change applied proved ownership for (`Change::attempt_fence`).
    let mut fenced: Option<(OpId, &ProcessId)> = None;
    for &batch in batches {
        if !alone {
            // Prepared once and kept: parsing it for every request costs more than running it.
            tx.prepare_cached("SAVEPOINT request")
                .and_then(|mut s| s.execute([]))
                .map_err(|e| err(&e))?;
        }
        let applied = rules::apply_batch(&mut SqliteTx::new(&tx, path), batch, &mut fenced);
        match applied {
            Ok(applied) if alone => results.push(Ok(applied)),
            Ok(applied) => {
                tx.prepare_cached("RELEASE request")
                    .and_then(|mut s| s.execute([]))
                    .map_err(|e| err(&e))?;
                results.push(Ok(applied));
            }
            Err(e) if alone => {
                tx.rollback().map_err(|e| err(&e))?;
                return Ok(vec![Err(e)]);
            }
            Err(e) => {
                tx.execute_batch("ROLLBACK TO request; RELEASE request")
                    .map_err(|e| err(&e))?;
                results.push(Err(e));
            }
        }
    }
    tx.commit().map_err(|e| err(&e))?;
    Ok(results)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A commit here never overtakes a request waiting for the writer, nor waits for the writer:
    /// the batches come back untouched, for the caller to queue.
    #[test]
    fn a_commit_here_steps_aside_while_the_writer_has_work() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("cairn.db")).unwrap();
        let batch = || {
            vec![vec![Change::Unpause {
                scope: crate::types::PauseScope::default(),
            }]]
        };
        // A request queued and not yet committed.
        store.queued.fetch_add(1, Ordering::SeqCst);
        assert_eq!(store.apply_here(batch()).err(), Some(batch()));
        store.queued.fetch_sub(1, Ordering::SeqCst);
        // The writer committing.
        {
            let _writing = store.conn.lock().unwrap();
            assert_eq!(store.apply_here(batch()).err(), Some(batch()));
        }
        assert!(store.apply_here(batch()).is_ok());
    }

    /// Both ways of committing, the writer's and [`Store::apply_here`], set the level each commit
    /// needs, whichever committed before.
    #[tokio::test]
    async fn the_writer_and_a_commit_here_each_set_the_level_they_need() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("cairn.db")).unwrap();
        let now = |store: &SqliteStore| level(&store.conn.lock().unwrap().conn);
        let lazy = || {
            vec![Change::CurrentTask {
                op: OpId(1),
                owner: None,
                text: None,
            }]
        };
        let durable = || {
            vec![Change::Pause {
                pause: crate::types::Pause {
                    scope: crate::types::PauseScope::default(),
                    by: "me".into(),
                    at: 0,
                    reason: None,
                    until: None,
                },
            }]
        };
        let (full, normal) = (2, 1);
        store.commit(vec![lazy()]).await.pop().unwrap().unwrap();
        assert_eq!(now(&store), normal);
        let here = store.apply_here(vec![durable()]).ok().unwrap();
        assert!(here.into_iter().all(|r| r.is_ok()));
        assert_eq!(now(&store), full);
        let here = store.apply_here(vec![lazy()]).ok().unwrap();
        assert!(here.into_iter().all(|r| r.is_ok()));
        assert_eq!(now(&store), normal);
        store
            .commit(vec![vec![Change::Unpause {
                scope: crate::types::PauseScope::default(),
            }]])
            .await
            .pop()
            .unwrap()
            .unwrap();
        assert_eq!(now(&store), full);
    }
    use crate::types::{EventKind, ProcessId, TaskNo};

    /// A commit on the caller's thread happens only when the database is free at once; while
    /// another process holds it, the batches come back untouched (for the writer, which waits),
    /// and nothing of them is written.
    #[test]
    fn a_commit_here_steps_aside_while_another_process_writes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.db");
        let store = SqliteStore::open(&path).unwrap();
        let pause = || {
            vec![vec![Change::Pause {
                pause: crate::types::Pause {
                    scope: crate::types::PauseScope::default(),
                    by: "me".into(),
                    at: 1,
                    reason: None,
                    until: None,
                },
            }]]
        };
        let paused =
            || crate::ReadBackend::pauses(&SqliteReader::open(&path).unwrap().unwrap()).unwrap();
        let other = Connection::open(&path).unwrap();
        other.execute_batch("BEGIN IMMEDIATE").unwrap();
        let back = store.apply_here(pause()).unwrap_err();
        assert_eq!(back, pause());
        other.execute_batch("ROLLBACK").unwrap();
        assert!(paused().is_empty());
        let results = store.apply_here(pause()).unwrap();
        assert!(results.iter().all(Result::is_ok), "{results:?}");
        assert_eq!(paused().len(), 1);
    }

    fn level(conn: &Connection) -> i64 {
        conn.pragma_query_value(None, "synchronous", |r| r.get(0))
            .unwrap()
    }

    #[test]
    fn only_a_commit_of_what_dies_with_the_boot_is_not_synced() {
        let dir = tempfile::tempdir().unwrap();
        let conn = open_writer(&dir.path().join("cairn.db")).unwrap();
        let mut unsynced = false;
        let (full, normal) = (2, 1);
        assert_eq!(level(&conn), full);
        let process = Change::AttemptProcess {
            op: OpId(1),
            owner: ProcessId {
                host: "h".into(),
                boot_id: "b/1".into(),
                pid: 7,
                start: 9,
            },
            task: TaskNo(0),
            n: 1,
            process: ProcessId {
                host: "h".into(),
                boot_id: "b/1".into(),
                pid: 8,
                start: 10,
            },
            pgid: 8,
            at: 0,
        };
        let current = Change::CurrentTask {
            op: OpId(1),
            owner: None,
            text: Some("a".into()),
        };
        let event = Change::Event {
            op: OpId(1),
            owner: None,
            at: 0,
            kind: EventKind::Note,
            task: None,
            message: String::new(),
        };
        let lazy = vec![process.clone(), current.clone()];
        let mixed = vec![process, event.clone()];
        let (current, event, nothing) = (vec![current], vec![event], Vec::new());
        let cases: [(Vec<&Vec<Change>>, i64); 6] = [
            (vec![&lazy], normal),
            (vec![&lazy, &current], normal),
            // Each commit sets its own level: none inherits the one before.
            (vec![&mixed], full),
            (vec![&lazy], normal),
            (vec![&lazy, &event], full),
            // Nothing to write: no reason to change what is durable.
            (vec![&nothing], full),
        ];
        for (i, (batches, expected)) in cases.iter().enumerate() {
            sync_for(&conn, &mut unsynced, batches).unwrap();
            assert_eq!(level(&conn), *expected, "case {i}");
            assert_eq!(unsynced, *expected == normal);
        }
    }

    /// A `COMMIT` that fails (here a deferred foreign key, which SQLite checks at the commit and
    /// leaves the transaction open for) does not leave its transaction open under the next one:
    /// what it wrote is rolled back, and the connection can begin again.
    #[test]
    fn a_failed_commit_leaves_no_transaction_open() {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch(
            "PRAGMA foreign_keys = ON;
             CREATE TABLE parent (id INTEGER PRIMARY KEY);
             CREATE TABLE child (parent INTEGER REFERENCES parent (id) DEFERRABLE INITIALLY DEFERRED);",
        )
        .unwrap();
        let tx = Immediate::begin(&conn).unwrap();
        tx.execute("INSERT INTO child (parent) VALUES (1)", [])
            .unwrap();
        let failed = tx.commit().unwrap_err();
        assert!(failed.to_string().contains("FOREIGN KEY"), "{failed}");
        assert!(conn.is_autocommit());
        let rows: i64 = conn
            .query_row("SELECT count(*) FROM child", [], |r| r.get(0))
            .unwrap();
        assert_eq!(rows, 0);
        let tx = Immediate::begin(&conn).unwrap();
        tx.execute("INSERT INTO parent (id) VALUES (1)", [])
            .unwrap();
        tx.commit().unwrap();
    }

    /// A transaction SQLite already ended by itself (as after a full disk) is not rolled back
    /// again: that `ROLLBACK` would fail, and its error replace the one that ended it.
    #[test]
    fn a_rollback_after_sqlite_rolled_back_is_not_an_error() {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch("CREATE TABLE t (v INTEGER)").unwrap();
        let tx = Immediate::begin(&conn).unwrap();
        tx.execute("INSERT INTO t (v) VALUES (1)", []).unwrap();
        // What SQLite does by itself after such an error.
        conn.execute_batch("ROLLBACK").unwrap();
        tx.rollback().unwrap();
        assert!(conn.is_autocommit());
    }
}
