//! The PostgreSQL [`Backend`]: one writer thread that owns the write connection and commits
//! whatever is queued in one transaction (group commit), each batch in its own savepoint so that
//! one refused batch does not undo the others.
//!
//! Every transaction is `SERIALIZABLE` and commits with `synchronous_commit = on` (set on the
//! connection, never left to the server's default), so a reply means the change is durable. A
//! transaction that conflicts with another node's (SQLSTATE 40001, 40P01) runs again whole. A
//! connection lost before `COMMIT` was sent is made again (backing off from 50 ms to 2 s) and the
//! transaction runs again; one lost during `COMMIT` leaves it in doubt: each transaction inserts a
//! token of its own, and after reconnecting the token says whether it committed (answer with the
//! results computed) or not (run it again). While the server cannot be reached, requests wait, up
//! to [`PATIENCE`]; the engine's lease rule stops a run whose lease it cannot renew meanwhile.

use std::fmt::Write as _;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use super::listen::{Changes, Moved};
use super::tx::{BEGIN, BEGIN_READ, COMMIT, Conn, Fault, PgTx, Session, describe, fault_of};
use super::{PgReader, Target, migrations};
use crate::api::{Backend, Committing, Reader, Results, Waiting};
use crate::error::{Error, Result};
use crate::location::Location;
use crate::rules;
use crate::types::{Change, OpId, ProcessId};

/// The most requests one transaction takes from the queue (unbounded, as SQLite's: each request
/// has a caller waiting for it).
const QUEUE: usize = 1024;

/// How long requests wait for a server that cannot be reached before they fail.
const PATIENCE: Duration = Duration::from_secs(600);

/// The first wait before reconnecting, doubled each time up to [`BACKOFF_MAX`].
const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(2);

/// How many times a transaction that keeps conflicting with others runs before it fails.
const CONFLICT_RUNS: u32 = 1000;

/// Commit tokens older than this are deleted, every [`PRUNE_EVERY`] commits.
const TOKEN_AGE_MS: i64 = 3_600_000;
const PRUNE_EVERY: u64 = 1000;

/// Batches sent together: they share one transaction, each in its own savepoint.
struct Queued {
    batches: Vec<Vec<Change>>,
    reply: tokio::sync::oneshot::Sender<Results>,
}

/// The database open for writing; the writer thread stops when this drops.
#[derive(Debug)]
pub(crate) struct PgStore {
    target: Arc<Target>,
    sender: mpsc::Sender<Queued>,
    reader: PgReader,
    changes: Changes,
}

impl PgStore {
    /// Connects, brings the schema up to date (or refuses the database), and starts the writer.
    pub(crate) fn open(location: &Location) -> Result<Self> {
        let target = Arc::new(Target::new(location)?);
        let unusable = |reason: String| target.unusable(&reason);
        let fail = |e: &postgres::Error| target.unusable(&describe(e));
        migrations::migrate(&mut target.connect()?, &unusable, &fail)?;
        let mut conn = connect_writer(&target)?;
        refuse_clock_skew(&mut conn, &target)?;
        let (sender, receiver) = mpsc::channel::<Queued>();
        let thread_target = target.clone();
        thread::Builder::new()
            .name("cairn-pg-writer".into())
            .spawn(move || writer(&thread_target, Some(conn), &receiver))
            .map_err(|e| target.unusable(&format!("cannot start its writer: {e}")))?;
        Ok(Self {
            reader: PgReader::new(target.config.clone(), location.clone())
                .with_moves(Arc::new(Moved::new(target.clone()))),
            changes: Changes::new(target.clone()),
            target,
            sender,
        })
    }
}

impl Backend for PgStore {
    fn commit(&self, batches: Vec<Vec<Change>>) -> Committing<'_> {
        let count = batches.len();
        let (reply, wait) = tokio::sync::oneshot::channel();
        let sent = self.sender.send(Queued { batches, reply }).is_ok();
        Box::pin(async move {
            let closed = || (0..count).map(|_| Err(Error::Closed)).collect();
            if !sent {
                return closed();
            }
            wait.await.unwrap_or_else(|_| closed())
        })
    }

    fn commit_blocking(&self, batches: Vec<Vec<Change>>) -> Results {
        let count = batches.len();
        let closed = || (0..count).map(|_| Err(Error::Closed)).collect();
        let (reply, wait) = tokio::sync::oneshot::channel();
        if self.sender.send(Queued { batches, reply }).is_err() {
            return closed();
        }
        wait.blocking_recv().unwrap_or_else(|_| closed())
    }

    fn location(&self) -> &Location {
        &self.target.location
    }

    /// Resolves when another process (or this one) committed a change that may give a serving
    /// node work (`NOTIFY cairn`), or after `timeout`.
    fn wait_for_change(&self, timeout: Duration) -> Waiting<'_> {
        self.changes.wait(timeout)
    }

    /// `CAIRN_SECRET_KEY_FILE`, else `postgres.key` in cairn's state directory
    /// (`$XDG_STATE_HOME/cairn`, or `~/.local/state/cairn`): the database is shared, the key is
    /// this machine's.
    fn secret_key_file(&self) -> PathBuf {
        secret_key_file()
    }

    fn reader(&self) -> Result<Reader> {
        Ok(Reader::from_backend(self.reader.clone()))
    }
}

/// Where the key that seals secret params is kept for a PostgreSQL store.
pub(crate) fn secret_key_file() -> PathBuf {
    let var = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty());
    if let Some(file) = var("CAIRN_SECRET_KEY_FILE") {
        return PathBuf::from(file);
    }
    let state = var("XDG_STATE_HOME").map_or_else(
        || {
            var("HOME")
                .map_or_else(|| PathBuf::from("."), PathBuf::from)
                .join(".local/state")
        },
        PathBuf::from,
    );
    state.join("cairn").join("postgres.key")
}

/// A connection for the writer: `synchronous_commit = on`, whatever the server's default.
fn connect_writer(target: &Target) -> Result<Conn> {
    let mut client = target.connect_pipe()?;
    client
        // Every statement of the writer finds its rows by key: an index scan always, joins by
        // nested loop, so that a gathered statement (`Pipe::gather`) is planned as its rows one
        // by one, and `SERIALIZABLE` locks those rows, not the table (which would conflict with
        // every other node's writes). Every transaction is `SERIALIZABLE`, a statement that is
        // one (a fused step) too; what it reads or deletes outside them (the next tasks after a
        // step's commit, `Conn::send_next_tasks`; a token after a lost connection; old tokens)
        // says `READ COMMITTED`: it locks nothing.
        .batch_execute(
            "SET synchronous_commit = on; SET enable_seqscan = off; \
             SET enable_hashjoin = off; SET enable_mergejoin = off; \
             SET default_transaction_isolation = 'serializable'",
        )
        .map_err(|e| target.unusable(&describe(&e)))?;
    let session = client
        .query_one(
            "SELECT pid, (extract(epoch FROM backend_start) * 1000000)::bigint \
             FROM pg_stat_activity WHERE pid = pg_backend_pid()",
            &[],
        )
        .map_err(|e| target.unusable(&describe(&e)))?;
    let mut conn = Conn::new(client);
    conn.session = Some(Session {
        pid: session.get(0),
        started: session.get(1),
    });
    // Prepared now, so that a transaction's commit never waits for them.
    conn.prepare_steps()
        .map_err(|e| target.unusable(&describe(&e)))?;
    Ok(conn)
}

/// How far this machine's clock may be from the server's. Leases are times in the writers'
/// clocks: a node whose clock runs ahead takes over live ops early, one behind keeps lost ones.
const MAX_CLOCK_SKEW_MS: i64 = 2_000;

/// Refuses a writer whose clock is more than [`MAX_CLOCK_SKEW_MS`] from the server's (compared
/// with the middle of the round trip that read it).
fn refuse_clock_skew(conn: &mut Conn, target: &Target) -> Result<()> {
    let before = now_ms();
    let row = conn
        .client
        .query_one(
            "SELECT (extract(epoch FROM clock_timestamp()) * 1000)::bigint",
            &[],
        )
        .map_err(|e| target.unusable(&describe(&e)))?;
    let after = now_ms();
    let server: i64 = row.get(0);
    let skew = before / 2 + after / 2 - server;
    if skew.abs() <= MAX_CLOCK_SKEW_MS.max(after - before) {
        return Ok(());
    }
    #[allow(
        clippy::cast_precision_loss,
        reason = "a skew in seconds, for a message"
    )]
    let seconds = skew.abs() as f64 / 1000.0;
    Err(target.unusable(&format!(
        "this machine's clock is {seconds:.1} s {} the server's; nodes sharing a database hold ops by leases in their own clocks, which must agree within {} s (keep them in step with NTP)",
        if skew > 0 { "ahead of" } else { "behind" },
        MAX_CLOCK_SKEW_MS / 1000
    )))
}

/// Ends the server session `old` (a connection this writer lost) and waits until it is gone: its
/// last transaction has then committed or never will.
fn end_session(
    conn: &mut Conn,
    old: Session,
    patience: &mut Patience,
) -> std::result::Result<(), postgres::Error> {
    let alive = "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                 WHERE pid = $1 AND (extract(epoch FROM backend_start) * 1000000)::bigint = $2";
    while !conn
        .client
        .query(alive, &[&old.pid, &old.started])?
        .is_empty()
    {
        patience.why = format!(
            "the server session of the lost connection (pid {}) is still ending",
            old.pid
        );
        if !patience.wait_briefly() {
            break;
        }
    }
    Ok(())
}

fn writer(target: &Target, conn: Option<Conn>, receiver: &mpsc::Receiver<Queued>) {
    let mut state = Writer {
        target,
        path: target.location.as_path().to_path_buf(),
        conn,
        tokens: Tokens::new(),
    };
    while let Ok(first) = receiver.recv() {
        let mut requests = vec![first];
        while requests.len() < QUEUE {
            match receiver.try_recv() {
                Ok(more) => requests.push(more),
                Err(_) => break,
            }
        }
        let batches: Vec<&Vec<Change>> = requests.iter().flat_map(|r| &r.batches).collect();
        let mut results = state.commit(&batches);
        for request in requests {
            let rest = results.split_off(request.batches.len());
            let _ = request.reply.send(std::mem::replace(&mut results, rest));
        }
    }
}

/// The writer thread's state: its connection (none while the server cannot be reached).
struct Writer<'a> {
    target: &'a Target,
    path: PathBuf,
    conn: Option<Conn>,
    tokens: Tokens,
}

/// How one run of a transaction ended.
enum Run {
    /// Committed (or refused alone, nothing written): each batch's result.
    Done(Results),
    /// Conflicted with another transaction: run it again.
    Again,
    /// The connection broke before `COMMIT` was sent: nothing was committed.
    Lost(String),
    /// The connection broke while `COMMIT` was on the way: it may have committed, with these
    /// results.
    InDoubt(Results, String),
    /// The server refused the transaction for a reason that another run would not change.
    Failed(Error),
    /// A batch was refused in a run without savepoints: nothing was kept; run it again with them.
    Refused,
}

impl Writer<'_> {
    /// Commits the batches in one transaction, running it again as often as it must; each
    /// batch's result.
    fn commit(&mut self, batches: &[&Vec<Change>]) -> Results {
        let mut patience = Patience::new();
        let mut conflicts = 0;
        // Batches are seldom refused: first without a savepoint each (two round trips fewer per
        // batch), and only after a refusal with them.
        let mut savepoints = false;
        loop {
            let token = self.tokens.next();
            let Some(conn) = connection(&mut self.conn, self.target, &mut patience) else {
                return self.failed(&patience.why, batches.len());
            };
            match run(conn, &self.path, batches, &token, savepoints) {
                Run::Refused => savepoints = true,
                Run::Done(results) => {
                    self.tokens.committed(conn);
                    return results;
                }
                Run::Again => {
                    // Perhaps a row taken as read had changed: read them all again.
                    conn.forget();
                    conflicts += 1;
                    if conflicts >= CONFLICT_RUNS {
                        let why = format!(
                            "the transaction conflicted with others {conflicts} times in a row"
                        );
                        return self.failed(&why, batches.len());
                    }
                }
                Run::Lost(why) => {
                    self.conn = None;
                    patience.why = why;
                }
                Run::InDoubt(results, why) => {
                    let session = self.conn.take().and_then(|c| c.session);
                    patience.why = why;
                    match self.committed(&token, session, &mut patience) {
                        Some(true) => return results,
                        Some(false) => {}
                        None => {
                            let why = format!(
                                "{} (the last changes were sent to be committed and may have been recorded: `cairn status` says, once it is back)",
                                patience.why
                            );
                            return self.failed(&why, batches.len());
                        }
                    }
                }
                Run::Failed(err) => return each(&err, batches.len()),
            }
        }
    }

    /// Whether the transaction that inserted `token` committed, asked on a new connection;
    /// `None` once [`PATIENCE`] ran out. The old connection's server session (`session`) may still
    /// be committing it (waiting for a standby, a slow disk, or cut off only on this side): it is
    /// ended first, and the answer read once it is gone, so that a transaction is never run again
    /// while it may still commit.
    fn committed(
        &mut self,
        token: &str,
        session: Option<Session>,
        patience: &mut Patience,
    ) -> Option<bool> {
        loop {
            let conn = connection(&mut self.conn, self.target, patience)?;
            // Read as committed (the lost session is gone): it locks nothing.
            let asked = session
                .map_or(Ok(()), |old| end_session(conn, old, patience))
                .and_then(|()| conn.client.batch_execute(BEGIN_READ))
                .and_then(|()| {
                    conn.client
                        .query_opt("SELECT 1 FROM commit_tokens WHERE token = $1", &[&token])
                })
                .and_then(|row| conn.client.batch_execute(COMMIT).map(|()| row));
            match asked {
                Ok(row) => return Some(row.is_some()),
                Err(e) => {
                    patience.why = describe(&e);
                    self.conn = None;
                }
            }
        }
    }

    /// Every batch failed with `why`: the server could not be used.
    fn failed(&self, why: &str, count: usize) -> Results {
        let err = Error::Write {
            path: self.path.clone(),
            reason: format!("cannot reach {}: {why}", self.target.server()),
        };
        each(&err, count)
    }
}

/// The connection, made again if it broke, waiting (with backoff) while the server cannot be
/// reached; `None` once [`PATIENCE`] ran out.
fn connection<'c>(
    conn: &'c mut Option<Conn>,
    target: &Target,
    patience: &mut Patience,
) -> Option<&'c mut Conn> {
    while conn.is_none() {
        if !patience.wait() {
            return None;
        }
        match connect_writer(target) {
            Ok(made) => *conn = Some(made),
            Err(e) => patience.why = e.to_string(),
        }
    }
    conn.as_mut()
}

/// `count` batches' results when their whole commit failed with `err`: that error, for each.
fn each(err: &Error, count: usize) -> Results {
    let one = || match err {
        Error::Write { path, reason } => Error::Write {
            path: path.clone(),
            reason: reason.clone(),
        },
        Error::Unusable { path, reason } => Error::Unusable {
            path: path.clone(),
            reason: reason.clone(),
        },
        other => Error::Write {
            path: PathBuf::new(),
            reason: other.to_string(),
        },
    };
    (0..count).map(|_| Err(one())).collect()
}

/// Waiting for the server with backoff, for at most [`PATIENCE`] from the first wait.
struct Patience {
    since: Option<Instant>,
    backoff: Duration,
    /// What went wrong last, for the error once patience runs out.
    why: String,
}

impl Patience {
    fn new() -> Self {
        Self {
            since: None,
            backoff: BACKOFF_MIN,
            why: String::new(),
        }
    }

    /// Sleeps a little (a session ending is quick), without backing off; false once patience
    /// ran out.
    fn wait_briefly(&mut self) -> bool {
        let since = *self.since.get_or_insert_with(Instant::now);
        if since.elapsed() >= PATIENCE {
            return false;
        }
        thread::sleep(BACKOFF_MIN);
        true
    }

    /// Sleeps before the next try (not before the first); false once patience ran out.
    fn wait(&mut self) -> bool {
        let Some(since) = self.since else {
            self.since = Some(Instant::now());
            return true;
        };
        if since.elapsed() >= PATIENCE {
            return false;
        }
        thread::sleep(self.backoff);
        self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
        true
    }
}

/// Runs the transaction once: the batches (each in its savepoint when `savepoints`; without, a
/// refused batch abandons the run), then the commit token, `NOTIFY cairn` when a change may give a
/// serving node work, and `COMMIT`.
///
/// Statements whose answers the rules do not read are sent without waiting (`BEGIN`, the writes,
/// the commit: see [`super::pipe`]), so a transaction takes a round trip for each read and one for
/// its writes and commit together. `BEGIN` and a plain `COMMIT` are held with the guards and the
/// token, so that a step that takes its rows as read goes as one statement, a transaction of its
/// own (`tx::GUARDED_STEP`): its failure answers under its first guard's ticket, between `begin`'s
/// and `commit`'s, as a write's would. A write refused that way is found before the commit is
/// trusted, and its batch counts as refused; with savepoints, each batch's writes are answered
/// before its savepoint is released.
fn run(
    conn: &mut Conn,
    path: &Path,
    batches: &[&Vec<Change>],
    token: &str,
    savepoints: bool,
) -> Run {
    let broke = |conn: &Conn, e: &postgres::Error| match fault_of(e, &conn.client) {
        Some(Fault::Conflict) => Run::Again,
        Some(Fault::Lost) => Run::Lost(describe(e)),
        None => Run::Failed(Error::Write {
            path: path.to_path_buf(),
            reason: describe(e),
        }),
    };
    let refused = |e: &postgres::Error| Error::Write {
        path: path.to_path_buf(),
        reason: describe(e),
    };
    // Held, as the `COMMIT` is: a step whose statements fuse into one goes without either, as a
    // transaction of its own (`tx::GUARDED_STEP`).
    let begin = conn.client.hold_batch(BEGIN);
    let alone = batches.len() == 1;
    // A batch alone may take rows earlier transactions read as read (see `tx::Known`).
    if let Err(e) = conn.read_ahead(rules::read_ahead(batches), alone && !savepoints) {
        return abandon(conn, broke(conn, &e));
    }
    let savepoints = savepoints && !alone;
    let mut results = Vec::with_capacity(batches.len());
    let mut wakes = false;
    // The op and writer the last change applied proved ownership for (`Change::attempt_fence`).
    let mut fenced: Option<(OpId, &ProcessId)> = None;
    for &batch in batches {
        if savepoints && let Err(e) = conn.client.batch_execute("SAVEPOINT request") {
            return abandon(conn, broke(conn, &e));
        }
        let mut tx = PgTx::new(conn, path);
        let mut applied = rules::apply_batch(&mut tx, batch, &mut fenced);
        let fault = tx.fault;
        if savepoints
            && fault.is_none()
            && applied.is_ok()
            && let Err(failed) = conn.client.settle()
        {
            if fault_of(&failed.error, &conn.client).is_some() {
                return abandon(conn, broke(conn, &failed.error));
            }
            applied = Err(refused(&failed.error));
            // Its savepoint is rolled back, and the owner's row lock with it.
            fenced = None;
        }
        match fault {
            Some(Fault::Conflict) => return abandon(conn, Run::Again),
            Some(Fault::Lost) => {
                let why = applied.err().map(|e| e.to_string()).unwrap_or_default();
                return Run::Lost(why);
            }
            None => {}
        }
        let step = match applied {
            Ok(applied) => {
                wakes |= batch.iter().any(Change::wakes_nodes);
                results.push(Ok(applied));
                if savepoints {
                    conn.client.batch_execute("RELEASE request")
                } else {
                    Ok(())
                }
            }
            // Nothing of it is kept: the transaction ends here. A refusal decided on rows taken
            // as read holds only if they had not changed: their guards answer first.
            Err(e) if alone => {
                let settled = if conn.took() {
                    conn.client.settle()
                } else {
                    Ok(())
                };
                let run = match settled {
                    Err(failed) if fault_of(&failed.error, &conn.client).is_some() => {
                        broke(conn, &failed.error)
                    }
                    // A statement before a guard failed, so the guard never ran: run it again
                    // reading (`Writer::commit` forgets the rows kept), for its own answer.
                    Err(_) => Run::Again,
                    Ok(()) => Run::Done(vec![Err(e)]),
                };
                return abandon(conn, run);
            }
            Err(_) if !savepoints => return abandon(conn, Run::Refused),
            Err(e) => {
                results.push(Err(e));
                // The batch's writes answered first: a refusal among them is this batch's, not
                // the rollback's.
                match conn.client.settle() {
                    Err(failed) if fault_of(&failed.error, &conn.client).is_some() => {
                        Err(failed.error)
                    }
                    _ => conn
                        .client
                        .batch_execute("ROLLBACK TO request; RELEASE request"),
                }
            }
        };
        if let Err(e) = step {
            return abandon(conn, broke(conn, &e));
        }
    }
    // The token (a statement prepared when the connection was made), the notification and the
    // commit, sent after the writes.
    let commit = match conn.send_token(token, now_ms()) {
        Ok(ticket) => ticket,
        Err(e) => return abandon(conn, broke(conn, &e)),
    };
    if wakes {
        conn.client.send_batch("NOTIFY cairn; COMMIT".to_owned());
    } else {
        conn.client.hold_batch(COMMIT);
    }
    conn.send_next_tasks();
    let Err(failed) = conn.client.settle() else {
        conn.keep_next_tasks();
        return Run::Done(results);
    };
    match broke(conn, &failed.error) {
        // Whether it failed before the `COMMIT` or during it, the token says.
        Run::Lost(why) => Run::InDoubt(results, why),
        // A write refused: the `COMMIT` after it was not run. (Not `BEGIN`: without it, each
        // write would have stood alone, and running them again could not be right.)
        Run::Failed(_) if failed.ticket > begin && failed.ticket < commit && alone => {
            abandon(conn, Run::Done(vec![Err(refused(&failed.error))]))
        }
        Run::Failed(_) if failed.ticket > begin && failed.ticket < commit => {
            abandon(conn, Run::Refused)
        }
        other => abandon(conn, other),
    }
}

/// Ends a transaction that will not commit, then says how it ended.
fn abandon(conn: &mut Conn, run: Run) -> Run {
    if !matches!(run, Run::Lost(_) | Run::InDoubt(..)) {
        let _ = conn.client.batch_execute("ROLLBACK");
    }
    run
}

/// Milliseconds since the Unix epoch.
fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// The writer's commit tokens: a random prefix of its own and a counter, so that no two
/// transactions anywhere share one; and the count of commits, to prune old tokens now and then.
struct Tokens {
    prefix: String,
    next: u64,
    commits: u64,
}

impl Tokens {
    fn new() -> Self {
        let mut random = [0u8; 16];
        let read = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut random));
        let prefix = if read.is_ok() {
            random.iter().fold(String::new(), |mut hex, b| {
                let _ = write!(hex, "{b:02x}");
                hex
            })
        } else {
            // Still unique enough: this process, this moment.
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos());
            format!("{}-{nanos}", std::process::id())
        };
        Self {
            prefix,
            next: 0,
            commits: 0,
        }
    }

    fn next(&mut self) -> String {
        self.next += 1;
        format!("{}-{}", self.prefix, self.next)
    }

    /// Counts a commit; every [`PRUNE_EVERY`], deletes the tokens older than an hour (a failure
    /// here changes nothing: they are deleted next time).
    fn committed(&mut self, conn: &mut Conn) {
        self.commits += 1;
        if self.commits.is_multiple_of(PRUNE_EVERY) {
            let pruned = conn.client.batch_execute(&format!(
                "BEGIN ISOLATION LEVEL READ COMMITTED; \
                 DELETE FROM commit_tokens WHERE at < {}; COMMIT",
                now_ms() - TOKEN_AGE_MS
            ));
            // A failed `DELETE` skips the `COMMIT` after it: its transaction is ended here, not
            // left open under the next one.
            if pruned.is_err() {
                let _ = conn.client.batch_execute("ROLLBACK");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A database of the test's own on the server at 127.0.0.1:5432, dropped at the end.
    struct Db(String);

    impl Db {
        fn new(tag: &str) -> Self {
            let name = format!("cairn_t_{tag}_{}", std::process::id());
            admin()
                .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                .unwrap();
            admin()
                .batch_execute(&format!("CREATE DATABASE {name}"))
                .unwrap();
            Self(name)
        }

        fn location(&self) -> Location {
            Location::parse(&format!("postgres://postgres@127.0.0.1:5432/{}", self.0))
        }
    }

    impl Drop for Db {
        fn drop(&mut self) {
            let _ =
                admin().batch_execute(&format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.0));
        }
    }

    /// A database of the test's own, migrated: its target, and a client of it.
    fn migrated(tag: &str) -> (Db, Target, postgres::Client) {
        let db = Db::new(tag);
        let target = Target::new(&db.location()).unwrap();
        let mut client = target.connect().unwrap();
        let fail = |e: &postgres::Error| target.unusable(&describe(e));
        migrations::migrate(&mut client, &|r| target.unusable(&r), &fail).unwrap();
        (db, target, client)
    }

    fn admin() -> postgres::Client {
        postgres::Client::connect(
            "host=127.0.0.1 port=5432 user=postgres dbname=test",
            postgres::NoTls,
        )
        .unwrap()
    }

    /// A wait ends when another store commits a change that may give a node work.
    #[test]
    fn a_wait_ends_when_another_store_commits_a_change_that_wakes_nodes() {
        let db = Db::new("wake");
        let waiter = PgStore::open(&db.location()).unwrap();
        let other = PgStore::open(&db.location()).unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            // Until the listener listens (it wakes every waiter once when it does).
            while waiter.changes.seen() == 0 {
                waiter.wait_for_change(Duration::from_millis(100)).await;
            }
            let before = waiter.changes.seen();
            let wait = waiter.wait_for_change(PATIENCE);
            let results = other
                .commit(vec![vec![Change::Unpause {
                    scope: crate::types::PauseScope::default(),
                }]])
                .await;
            assert!(results.iter().all(Result::is_ok), "{results:?}");
            wait.await;
            assert!(waiter.changes.seen() > before);
        });
    }

    /// A read sent aside gives its rows, or none when it fails, and never answers for another
    /// statement: a failed one leaves the others' answers as they are, and a failed read sent
    /// the usual way is the first failure.
    #[test]
    fn a_failed_read_sent_aside_answers_for_no_other_statement() {
        let db = Db::new("aside");
        let target = Target::new(&db.location()).unwrap();
        let mut pipe = target.connect_pipe().unwrap();
        let read = pipe.prepare("SELECT 10 / $1::bigint").unwrap();
        let zero = pipe.send_aside(&read, &[&0_i64]).unwrap();
        let five = pipe.send_aside(&read, &[&2_i64]).unwrap();
        assert!(pipe.settle().is_ok());
        assert!(pipe.take(zero).is_none());
        let rows = pipe.take(five).unwrap().unwrap();
        assert_eq!(rows[0].get::<_, i64>(0), 5);
        let failing = pipe.send_read(&read, &[&0_i64]).unwrap();
        let failed = pipe.settle().err().unwrap();
        assert_eq!(failed.ticket, failing);
    }

    /// A prune of old tokens that fails (here: it waits on a locked token past `lock_timeout`)
    /// leaves no transaction open under the writer's next one.
    #[test]
    fn a_failed_prune_leaves_no_transaction_open() {
        let (_db, target, mut client) = migrated("prune");
        client
            .batch_execute("INSERT INTO commit_tokens (token, at) VALUES ('old', 1)")
            .unwrap();
        let mut locker = target.connect().unwrap();
        let mut holding = locker.transaction().unwrap();
        holding
            .batch_execute("SELECT 1 FROM commit_tokens WHERE token = 'old' FOR UPDATE")
            .unwrap();
        let mut conn = connect_writer(&target).unwrap();
        conn.client
            .batch_execute("SET lock_timeout = '50ms'")
            .unwrap();
        let mut tokens = Tokens::new();
        tokens.commits = PRUNE_EVERY - 1;
        tokens.committed(&mut conn);
        let left: i64 = client
            .query_one("SELECT count(*) FROM commit_tokens", &[])
            .unwrap()
            .get(0);
        assert_eq!(left, 1, "the prune failed");
        // The writer's next transaction runs as on a fresh session.
        conn.client
            .batch_execute(&format!("{BEGIN}; SELECT count(*) FROM ops; {COMMIT}"))
            .unwrap();
        holding.rollback().unwrap();
    }

    /// A database holding op 1 (`running`, unowned) and its task 0 (`s`, `pending`), and the
    /// writer's connection to it with [`super::super::tx::GUARDED_STEP`] prepared.
    fn one_task(tag: &str) -> (Db, postgres::Client, Conn, postgres::Statement) {
        let (db, target, mut client) = migrated(tag);
        client
            .batch_execute(
                "INSERT INTO plan_snapshots (hash, name, text) VALUES ('h', 'p', 'steps: []'); \
                 INSERT INTO ops (id, uuid, plan, snapshot_id, title, status, params, workdir, env, created_at) \
                 VALUES (1, 'u', 'p', (SELECT id FROM plan_snapshots), 't', 'running', '{}', '/', '{}', 1); \
                 INSERT INTO tasks (op_id, task_no, step, name, status) VALUES (1, 0, 's', 's', 'pending')",
            )
            .unwrap();
        let mut conn = connect_writer(&target).unwrap();
        let step = conn
            .statement(super::super::tx::GUARDED_STEP.as_str())
            .unwrap();
        (db, client, conn, step)
    }

    /// [`super::super::tx::GUARDED_STEP`] for [`one_task`]'s task, known `pending`: its first
    /// attempt succeeded, its commit token `token`.
    fn guarded_step(
        conn: &mut Conn,
        step: &postgres::Statement,
        token: &str,
    ) -> std::result::Result<u64, postgres::Error> {
        let none_text: Option<&str> = None;
        let none_int: Option<i64> = None;
        let (op, task, n, at) = (1_i64, 0_i64, 1_i64, 5_i64);
        let (ats, names) = (vec![at, at], vec!["s", "s"]);
        let kinds = vec!["task-started", "task-succeeded"];
        let messages = vec!["attempt 1", "attempt 1 succeeded"];
        let params: [&(dyn postgres::types::ToSql + Sync); 36] = [
            // The owner's guard, the task's guard.
            &op,
            &"running",
            &none_text,
            &none_text,
            &none_int,
            &none_int,
            &none_int,
            &op,
            &task,
            &"pending",
            &"s",
            // The attempt, the task's end, the events, the token.
            &op,
            &task,
            &n,
            &"succeeded",
            &at,
            &none_int,
            &none_text,
            &op,
            &task,
            &"succeeded",
            &n,
            &0_i64,
            &at,
            &at,
            &none_int,
            &none_text,
            &none_text,
            &0_i64,
            &op,
            &ats,
            &names,
            &kinds,
            &messages,
            &token,
            &at,
        ];
        conn.client.execute(step, &params)
    }

    fn count(client: &mut postgres::Client, sql: &str) -> i64 {
        client.query_one(sql, &[]).unwrap().get(0)
    }

    /// A step sent as a transaction of its own (`tx::GUARDED_STEP`) is `SERIALIZABLE` by the
    /// session's default: run in any other isolation, it raises and writes nothing (the writer
    /// then runs it again reading, in a transaction that says `SERIALIZABLE`).
    #[test]
    fn a_step_alone_writes_nothing_unless_serializable() {
        let (_db, mut client, mut conn, step) = one_task("isolation");
        conn.client
            .batch_execute("SET default_transaction_isolation = 'read committed'")
            .unwrap();
        let err = guarded_step(&mut conn, &step, "t1").unwrap_err();
        assert!(
            matches!(fault_of(&err, &conn.client), Some(Fault::Conflict)),
            "{err}"
        );
        assert_eq!(count(&mut client, "SELECT count(*) FROM attempts"), 0);
        assert_eq!(count(&mut client, "SELECT count(*) FROM commit_tokens"), 0);
        conn.client
            .batch_execute("SET default_transaction_isolation = 'serializable'")
            .unwrap();
        guarded_step(&mut conn, &step, "t2").unwrap();
        assert_eq!(count(&mut client, "SELECT count(*) FROM attempts"), 1);
        assert_eq!(
            count(
                &mut client,
                "SELECT count(*) FROM tasks WHERE status = 'succeeded'"
            ),
            1
        );
        assert_eq!(
            count(
                &mut client,
                "SELECT count(*) FROM commit_tokens WHERE token = 't2'"
            ),
            1
        );
    }

    /// A step alone whose task changed behind the writer's back, and whose attempt was written
    /// meanwhile, answers with its guard (a conflict: run again, reading), never with its write's
    /// refusal: no write of it runs before its guards passed.
    #[test]
    fn a_step_alone_answers_with_its_guard_before_any_write() {
        let (_db, mut client, mut conn, step) = one_task("guard_first");
        client
            .batch_execute(
                "UPDATE tasks SET status = 'running'; \
                 INSERT INTO attempts (op_id, task_no, n, status, started_at) VALUES (1, 0, 1, 'running', 1)",
            )
            .unwrap();
        let err = guarded_step(&mut conn, &step, "t1").unwrap_err();
        assert_eq!(
            err.code().map(postgres::error::SqlState::code),
            Some(super::super::tx::CHANGED),
            "{err}"
        );
        assert_eq!(count(&mut client, "SELECT count(*) FROM commit_tokens"), 0);
    }

    /// A fused statement goes in its parts' place only if it takes their parameters as they are
    /// encoded; all of the writer's do, on a migrated database.
    #[test]
    fn every_fused_statement_takes_its_parts_parameters() {
        let (_db, target, _client) = migrated("fused");
        let conn = connect_writer(&target).unwrap();
        assert_eq!(conn.client.fused(), 3);
    }

    /// What a writer whose connection broke during `COMMIT` asks on its new connection: the token
    /// of a transaction that committed is there, one that did not commit is not.
    #[test]
    fn a_commit_in_doubt_is_settled_by_its_token() {
        let (_db, target, _client) = migrated("doubt");
        let mut writer = Writer {
            target: &target,
            path: target.location.as_path().to_path_buf(),
            conn: Some(Conn::new(target.connect_pipe().unwrap())),
            tokens: Tokens::new(),
        };
        let (committed, refused) = (writer.tokens.next(), writer.tokens.next());
        let unpause = vec![Change::Unpause {
            scope: crate::types::PauseScope::default(),
        }];
        let conn = writer.conn.as_mut().unwrap();
        assert!(matches!(
            run(conn, &writer.path, &[&unpause], &committed, false),
            Run::Done(_)
        ));
        // A batch refused alone commits nothing, its token neither.
        let refused_batch = vec![Change::Event {
            op: OpId(999),
            at: 1,
            kind: crate::types::EventKind::Note,
            task: None,
            message: String::new(),
            owner: None,
        }];
        match run(conn, &writer.path, &[&refused_batch], &refused, false) {
            Run::Done(results) => assert!(results[0].is_err(), "{results:?}"),
            _ => panic!("the refusal is an answer"),
        }
        // As after a broken connection: the question goes on a new one.
        writer.conn = None;
        let mut patience = Patience::new();
        assert_eq!(
            writer.committed(&committed, None, &mut patience),
            Some(true)
        );
        assert_eq!(writer.committed(&refused, None, &mut patience), Some(false));

        // The lost connection's session still holds the transaction open (its COMMIT not yet
        // done): it is ended before the answer is read, so the answer cannot change after.
        let old = connect_writer(&target).unwrap();
        let session = old.session.unwrap();
        let mut old = old.client;
        let pending = writer.tokens.next();
        old.batch_execute(&format!(
            "BEGIN; INSERT INTO commit_tokens (token, at) VALUES ('{pending}', 1)"
        ))
        .unwrap();
        assert_eq!(
            writer.committed(&pending, Some(session), &mut patience),
            Some(false)
        );
        assert!(
            old.batch_execute("COMMIT").is_err(),
            "the old session was ended"
        );
        assert_eq!(writer.committed(&pending, None, &mut patience), Some(false));
    }

    #[test]
    fn the_secret_key_file_is_named_by_the_environment_or_in_the_state_directory() {
        // Only this test reads these variables in this process's unit tests.
        let file = secret_key_file();
        match std::env::var_os("CAIRN_SECRET_KEY_FILE").filter(|v| !v.is_empty()) {
            Some(named) => assert_eq!(file, PathBuf::from(named)),
            None => assert!(file.ends_with("cairn/postgres.key"), "{}", file.display()),
        }
    }
}
