//! Reads on a PostgreSQL server: [`PgReader`], the [`ReadBackend`], with the same rows in the
//! same order as the SQLite backend's reads (`crate::sqlite::reads`).
//!
//! The synchronous `postgres::Client` runs its own small runtime and blocks on it, which panics on
//! a thread that drives async tasks, and the engine reads from tokio workers. So no caller ever
//! touches a client: a [`PgReader`] owns a pool of [`READERS`] threads, each with its own
//! connection, made on the first read and shared by every clone. A read is a job (a boxed closure
//! given the thread's connection) sent over a channel; the caller blocks for its answer, as it
//! does on SQLite. A connection that broke is made again on the next job, and a read that failed
//! because its connection broke is tried once more on a new one.

use std::collections::HashMap;
use std::error::Error as StdError;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex, PoisonError, mpsc};
use std::time::Duration;

use postgres::config::{Host, SslMode};
use postgres::error::SqlState;
use postgres::types::{FromSql, ToSql, Type};
use postgres::{Client, NoTls, Row, Statement};

use crate::api::ReadBackend;
use crate::error::{Error, Result};
use crate::location::Location;
use crate::types::{
    AttemptRow, AttemptStatus, Briefs, CooldownRow, EventKind, EventRow, Interruption, LockRow,
    LogChunk, Millis, Moves, NodeRow, OpFilter, OpId, OpRow, OpStatus, Pause, ProcessId, Request,
    ScheduleRow, Snapshot, TaskBrief, TaskNo, TaskRow, TaskStatus, TokenRow,
};

/// How long a caller waits for a read's answer: a server that stopped answering (a network cut
/// off, a row held locked) is reported, never waited for without end.
const READ_WAIT: Duration = Duration::from_secs(30);

/// How many connections (and threads) serve reads.
const READERS: usize = 2;

/// How long making a connection may take when the configuration does not say: a server that
/// does not answer is reported rather than waited for without end.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

type PgResult<T> = std::result::Result<T, postgres::Error>;

/// Reads on a PostgreSQL database, over a pool of reader threads shared by every clone.
#[derive(Debug, Clone)]
pub(crate) struct PgReader {
    pool: Arc<Pool>,
    /// The store's log of moved ops, for a reader the store made; another reader knows of none.
    moved: Option<Arc<super::listen::Moved>>,
}

/// The reader threads' queue of jobs, made on the first read. The threads end once every
/// [`PgReader`] clone is gone (the queue's sender with them).
#[derive(Debug)]
struct Pool {
    server: Arc<Server>,
    jobs: Mutex<Option<mpsc::Sender<Job>>>,
}

/// A read to run on a reader thread, given that thread's [`Worker`].
type Job = Box<dyn FnOnce(&mut Worker) + Send>;

/// What a reader thread connects to, and the words to name it in errors (never the password).
#[derive(Debug)]
struct Server {
    config: postgres::Config,
    location: Location,
    /// `host:port` (or the socket directory), for messages.
    host: String,
    /// The database's name, for messages.
    database: String,
}

impl PgReader {
    /// A reader of the database `config` names; `location` is what messages call it. Connects on
    /// the first read, not here.
    pub(crate) fn new(mut config: postgres::Config, location: Location) -> Self {
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        let host = match (config.get_hosts().first(), config.get_ports().first()) {
            (Some(Host::Tcp(name)), port) => format!("{name}:{}", port.copied().unwrap_or(5432)),
            (Some(Host::Unix(dir)), _) => dir.display().to_string(),
            (None, port) => format!("localhost:{}", port.copied().unwrap_or(5432)),
        };
        let database = config
            .get_dbname()
            .or(config.get_user())
            .unwrap_or_default()
            .to_owned();
        let server = Server {
            config,
            location,
            host,
            database,
        };
        Self {
            pool: Arc::new(Pool {
                server: Arc::new(server),
                jobs: Mutex::new(None),
            }),
            moved: None,
        }
    }

    /// This reader, telling moves from the store's log.
    pub(crate) fn with_moves(mut self, moved: Arc<super::listen::Moved>) -> Self {
        self.moved = Some(moved);
        self
    }

    /// Runs `read` on a reader thread and waits for its answer.
    fn run<T: Send + 'static>(
        &self,
        mut read: impl FnMut(&mut Conn) -> PgResult<T> + Send + 'static,
    ) -> Result<T> {
        let (answer, answered) = mpsc::sync_channel(1);
        let job: Job = Box::new(move |worker: &mut Worker| {
            // The caller may have gone (its thread ended); the answer is then nobody's.
            let _ = answer.send(worker.read(&mut read));
        });
        self.pool.send(job)?;
        match answered.recv_timeout(READ_WAIT) {
            Ok(answer) => answer,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let server = &self.pool.server;
                Err(server.unusable(format!(
                    "reading database `{}` on {}: the server did not answer within {} s",
                    server.database,
                    server.host,
                    READ_WAIT.as_secs()
                )))
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => Err(Error::Closed),
        }
    }
}

impl PgReader {
    fn op_with(&self, op: OpId, columns: &'static str) -> Result<OpRow> {
        self.run(move |c| {
            c.query_opt(
                &format!("SELECT {columns} FROM ops WHERE id = $1::bigint"),
                &[&op.0],
            )?
            .as_ref()
            .map(op_row)
            .transpose()
        })?
        .ok_or(Error::NotFound(op))
    }
}

impl Pool {
    /// Queues `job`, starting the reader threads on the first one.
    fn send(&self, job: Job) -> Result<()> {
        let mut jobs = self.jobs.lock().unwrap_or_else(PoisonError::into_inner);
        if jobs.is_none() {
            *jobs = Some(self.start()?);
        }
        let sender = jobs.as_ref().ok_or(Error::Closed)?;
        if let Err(mpsc::SendError(job)) = sender.send(job) {
            // Every reader thread is gone (one panicked, say): start new ones, once.
            let sender = jobs.insert(self.start()?);
            sender.send(job).map_err(|_| Error::Closed)?;
        }
        Ok(())
    }

    /// Starts the reader threads; they share one queue.
    fn start(&self) -> Result<mpsc::Sender<Job>> {
        let (sender, receiver) = mpsc::channel::<Job>();
        let receiver = Arc::new(Mutex::new(receiver));
        for n in 0..READERS {
            let receiver = Arc::clone(&receiver);
            let mut worker = Worker {
                server: Arc::clone(&self.server),
                conn: None,
            };
            std::thread::Builder::new()
                .name(format!("cairn-pg-read-{n}"))
                .spawn(move || {
                    loop {
                        // The lock is held only while waiting for the next job, not while it runs.
                        let next = receiver
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .recv();
                        match next {
                            Ok(job) => job(&mut worker),
                            Err(mpsc::RecvError) => break,
                        }
                    }
                })
                .map_err(|e| {
                    self.server
                        .unusable(format!("cannot start a reader thread: {e}"))
                })?;
        }
        Ok(sender)
    }
}

/// A reader thread's state: its connection, made when a job needs it.
struct Worker {
    server: Arc<Server>,
    conn: Option<Conn>,
}

impl Worker {
    /// Runs `read` on this thread's connection, connecting first if there is none (or it broke);
    /// a read that failed because the connection broke runs once more on a new one.
    fn read<T>(&mut self, read: &mut impl FnMut(&mut Conn) -> PgResult<T>) -> Result<T> {
        let mut retried = false;
        loop {
            let conn = match self.conn.take() {
                Some(conn) if !conn.client.is_closed() => conn,
                _ => self.server.connect()?,
            };
            let conn = self.conn.insert(conn);
            match read(conn) {
                Ok(value) => return Ok(value),
                Err(e) if broke(&conn.client, &e) => {
                    self.conn = None;
                    if retried {
                        return Err(self.server.unusable(format!(
                            "the connection to the PostgreSQL server at {} (database `{}`) \
                             broke twice in a row: {e}",
                            self.server.host, self.server.database
                        )));
                    }
                    retried = true;
                }
                Err(e) => {
                    // A statement prepared before a change of the schema may no longer fit it.
                    conn.statements.clear();
                    return Err(self.server.failed(&e));
                }
            }
        }
    }
}

/// Whether `err` means the connection is gone (rather than that the query was refused).
fn broke(client: &Client, err: &postgres::Error) -> bool {
    if client.is_closed() || err.is_closed() {
        return true;
    }
    if let Some(code) = err.code() {
        // Class 08: connection exceptions; 57P01..57P03: the server shut down or is starting.
        return code.code().starts_with("08")
            || *code == SqlState::ADMIN_SHUTDOWN
            || *code == SqlState::CRASH_SHUTDOWN
            || *code == SqlState::CANNOT_CONNECT_NOW;
    }
    // No SQLSTATE: the socket failed, or the server's answer was not understood.
    err.source()
        .is_some_and(|source| source.downcast_ref::<std::io::Error>().is_some())
}

impl Server {
    /// A new connection, read-only: a read never changes the database, whatever its SQL says.
    fn connect(&self) -> Result<Conn> {
        if self.config.get_ssl_mode() == SslMode::Require {
            return Err(self.unusable(
                "the URL asks for TLS (sslmode=require), which cairn does not support yet"
                    .to_owned(),
            ));
        }
        let mut client = self.config.connect(NoTls).map_err(|e| {
            self.unusable(format!(
                "cannot connect to the PostgreSQL server at {} (database `{}`): {e}",
                self.host, self.database
            ))
        })?;
        client
            .batch_execute("SET default_transaction_read_only = on")
            .map_err(|e| self.failed(&e))?;
        Ok(Conn {
            client,
            statements: HashMap::new(),
        })
    }

    /// A read the server refused, in the store's words.
    fn failed(&self, err: &postgres::Error) -> Error {
        if err.code() == Some(&SqlState::UNDEFINED_TABLE) {
            return self.unusable(format!(
                "database `{}` on {} has no cairn tables (it is not cairn's, or cairn has not \
                 written to it yet): {err}",
                self.database, self.host
            ));
        }
        self.unusable(format!(
            "reading database `{}` on {}: {err}",
            self.database, self.host
        ))
    }

    fn unusable(&self, reason: String) -> Error {
        Error::Unusable {
            path: self.location.as_path().to_path_buf(),
            reason,
        }
    }
}

/// A reader thread's connection, with the statements it prepared (a read runs one round trip,
/// not two, from its second time on).
struct Conn {
    client: Client,
    statements: HashMap<String, Statement>,
}

impl Conn {
    fn query(&mut self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> PgResult<Vec<Row>> {
        let statement = if let Some(statement) = self.statements.get(sql) {
            statement.clone()
        } else {
            let statement = self.client.prepare(sql)?;
            self.statements.insert(sql.to_owned(), statement.clone());
            statement
        };
        self.client.query(&statement, params)
    }

    fn query_opt(&mut self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> PgResult<Option<Row>> {
        Ok(self.query(sql, params)?.into_iter().next())
    }
}

/// An integer column, read whatever its width (`smallint`, `integer` or `bigint`) and checked to
/// fit `T`.
struct Int<T>(T);

impl<'a, T> FromSql<'a> for Int<T>
where
    T: TryFrom<i64>,
    T::Error: StdError + Sync + Send + 'static,
{
    fn from_sql(
        ty: &Type,
        raw: &'a [u8],
    ) -> std::result::Result<Self, Box<dyn StdError + Sync + Send>> {
        let wide = match *ty {
            Type::INT2 => i64::from(i16::from_sql(ty, raw)?),
            Type::INT4 => i64::from(i32::from_sql(ty, raw)?),
            _ => i64::from_sql(ty, raw)?,
        };
        Ok(Self(T::try_from(wide)?))
    }

    fn accepts(ty: &Type) -> bool {
        matches!(*ty, Type::INT2 | Type::INT4 | Type::INT8)
    }
}

/// A 0/1 flag, kept as an integer (or a boolean).
struct Flag(bool);

impl<'a> FromSql<'a> for Flag {
    fn from_sql(
        ty: &Type,
        raw: &'a [u8],
    ) -> std::result::Result<Self, Box<dyn StdError + Sync + Send>> {
        if *ty == Type::BOOL {
            return Ok(Self(bool::from_sql(ty, raw)?));
        }
        Ok(Self(Int::<i64>::from_sql(ty, raw)?.0 != 0))
    }

    fn accepts(ty: &Type) -> bool {
        *ty == Type::BOOL || Int::<i64>::accepts(ty)
    }
}

/// The integer in column `i`.
fn num<T>(r: &Row, i: usize) -> PgResult<T>
where
    for<'a> Int<T>: FromSql<'a>,
{
    r.try_get::<_, Int<T>>(i).map(|v| v.0)
}

/// The integer in column `i`, if set.
/// An `events` row read as `seq, at, kind, task, message`.
fn event_row(r: &Row) -> PgResult<EventRow> {
    Ok(EventRow {
        seq: num(r, 0)?,
        at: num(r, 1)?,
        kind: r.try_get(2)?,
        task: r.try_get(3)?,
        message: r.try_get(4)?,
    })
}

fn num_opt<T>(r: &Row, i: usize) -> PgResult<Option<T>>
where
    for<'a> Int<T>: FromSql<'a>,
{
    Ok(r.try_get::<_, Option<Int<T>>>(i)?.map(|v| v.0))
}

fn flag(r: &Row, i: usize) -> PgResult<bool> {
    r.try_get::<_, Flag>(i).map(|v| v.0)
}

/// The process whose four columns start at `first`, if they are all set.
fn process_at(r: &Row, first: usize) -> PgResult<Option<ProcessId>> {
    let host: Option<String> = r.try_get(first)?;
    let boot: Option<String> = r.try_get(first + 1)?;
    let pid: Option<i64> = num_opt(r, first + 2)?;
    let start: Option<i64> = num_opt(r, first + 3)?;
    Ok(match (host, boot, pid, start) {
        (Some(host), Some(boot_id), Some(pid), Some(start)) => Some(ProcessId {
            host,
            boot_id,
            pid: u32::try_from(pid).unwrap_or(0),
            start: u64::try_from(start).unwrap_or(0),
        }),
        _ => None,
    })
}

const OP_COLUMNS: &str = "id, uuid, plan, title, status, params, created_at, started_at, ended_at, \
     owner_host, owner_boot, owner_pid, owner_start, lease_until, current_task, error, workdir, env, \
     lock_key, cancel_requested_at, cancel_by, cancel_reason, ending, parent_id, parent_task, \
     interrupted_by, cancel_grace_ms";

/// [`OP_COLUMNS`] with the params and env left out ([`ReadBackend::op_head`]).
static OP_HEAD_COLUMNS: std::sync::LazyLock<String> =
    std::sync::LazyLock::new(|| crate::types::head_columns(OP_COLUMNS));

fn op_row(r: &Row) -> PgResult<OpRow> {
    let status: String = r.try_get(4)?;
    let params: String = r.try_get(5)?;
    let env: String = r.try_get(17)?;
    Ok(OpRow {
        id: OpId(num(r, 0)?),
        uuid: r.try_get(1)?,
        plan: r.try_get(2)?,
        title: r.try_get(3)?,
        status: OpStatus::parse(&status).unwrap_or(OpStatus::Failed),
        params: serde_json::from_str(&params).unwrap_or(serde_json::Value::Null),
        created_at: num(r, 6)?,
        started_at: num_opt(r, 7)?,
        ended_at: num_opt(r, 8)?,
        owner: process_at(r, 9)?,
        lease_until: num_opt(r, 13)?,
        current_task: r.try_get(14)?,
        error: r.try_get(15)?,
        workdir: r.try_get(16)?,
        env: serde_json::from_str(&env).unwrap_or_default(),
        lock_key: r.try_get(18)?,
        cancel: match num_opt::<Millis>(r, 19)? {
            Some(at) => Some(Request {
                by: r.try_get::<_, Option<String>>(20)?.unwrap_or_default(),
                at,
                reason: r.try_get(21)?,
            }),
            None => None,
        },
        ending: r
            .try_get::<_, Option<String>>(22)?
            .and_then(|e| serde_json::from_str(&e).ok()),
        parent: match (num_opt::<i64>(r, 23)?, num_opt::<u32>(r, 24)?) {
            (Some(op), Some(task)) => Some((OpId(op), TaskNo(task))),
            _ => None,
        },
        interrupted_by: r
            .try_get::<_, Option<String>>(25)?
            .as_deref()
            .and_then(Interruption::parse),
        cancel_grace_ms: num_opt(r, 26)?,
    })
}

fn ops(rows: &[Row]) -> PgResult<Vec<OpRow>> {
    rows.iter().map(op_row).collect()
}

fn task_row(r: &Row) -> PgResult<TaskRow> {
    let item: Option<String> = r.try_get(3)?;
    let status: String = r.try_get(4)?;
    let outputs: Option<String> = r.try_get(10)?;
    Ok(TaskRow {
        task_no: TaskNo(num(r, 0)?),
        step: r.try_get(1)?,
        name: r.try_get(2)?,
        item: item.and_then(|i| serde_json::from_str(&i).ok()),
        status: TaskStatus::parse(&status).unwrap_or(TaskStatus::Failed),
        attempts: num(r, 5)?,
        started_at: num_opt(r, 6)?,
        ended_at: num_opt(r, 7)?,
        exit_code: num_opt(r, 8)?,
        error: r.try_get(9)?,
        outputs: outputs.and_then(|o| serde_json::from_str(&o).ok()),
        by_check: flag(r, 11)?,
        retry_from: num(r, 12)?,
        progress: r.try_get(13)?,
    })
}

/// An op's tasks (or one of them), by number.
fn task_rows(c: &mut Conn, op: OpId, only: Option<TaskNo>, active: bool) -> PgResult<Vec<TaskRow>> {
    c.query(
        "SELECT task_no, step, name, item, status, attempts, started_at, ended_at, exit_code, \
         error, outputs, by_check, retry_from, progress \
         FROM tasks WHERE op_id = $1::bigint AND ($2::bigint IS NULL OR task_no = $2::bigint) \
         AND (NOT $3::boolean OR status IN ('running', 'waiting')) ORDER BY task_no",
        &[&op.0, &only.map(|t| i64::from(t.0)), &active],
    )?
    .iter()
    .map(task_row)
    .collect()
}

/// An op's tasks as a run takes them up, by number.
fn task_briefs(c: &mut Conn, op: OpId, which: Briefs) -> PgResult<Vec<TaskBrief>> {
    let rows = match which {
        Briefs::All => c.query(which.sql(), &[&op.0])?,
        Briefs::First { steps, items } => {
            c.query(which.sql(), &[&op.0, &i64::from(steps), &i64::from(items)])?
        }
    };
    let mut briefs: Vec<TaskBrief> = Vec::with_capacity(rows.len());
    for r in &rows {
        let step: &str = r.try_get(1)?;
        let status: &str = r.try_get(4)?;
        let outputs: Option<&str> = r.try_get(8)?;
        let brief = TaskBrief {
            task_no: TaskNo(num(r, 0)?),
            step: TaskBrief::step_id(step, briefs.last()),
            name: r.try_get(2)?,
            item: r.try_get::<_, Option<&str>>(3)?.map(Box::from),
            status: TaskStatus::parse(status).unwrap_or(TaskStatus::Failed),
            attempts: num(r, 5)?,
            retry_from: num(r, 6)?,
            error: r.try_get(7)?,
            outputs: outputs.and_then(|o| serde_json::from_str(o).ok()),
        };
        briefs.push(brief);
    }
    Ok(briefs)
}

fn attempt_row(r: &Row) -> PgResult<AttemptRow> {
    let status: String = r.try_get(2)?;
    let pgid: Option<i64> = num_opt(r, 11)?;
    Ok(AttemptRow {
        task_no: TaskNo(num(r, 0)?),
        n: num(r, 1)?,
        status: AttemptStatus::parse(&status).unwrap_or(AttemptStatus::Failed),
        started_at: num(r, 3)?,
        ended_at: num_opt(r, 4)?,
        exit_code: num_opt(r, 5)?,
        error: r.try_get(6)?,
        process: process_at(r, 7)?,
        pgid: pgid.and_then(|p| u32::try_from(p).ok()),
        logged: [num::<i64>(r, 12)?, num::<i64>(r, 13)?].map(|b| u64::try_from(b).unwrap_or(0)),
    })
}

fn schedule_row(r: &Row) -> PgResult<ScheduleRow> {
    let params: String = r.try_get(2)?;
    Ok(ScheduleRow {
        name: r.try_get(0)?,
        plan: r.try_get(1)?,
        params: serde_json::from_str(&params).unwrap_or_default(),
        cron: r.try_get(3)?,
        timezone: r.try_get(4)?,
        paused: flag(r, 5)?,
        catch_up: flag(r, 6)?,
        created_at: num(r, 7)?,
        last_fire: num_opt(r, 8)?,
        last_op: num_opt::<i64>(r, 9)?.map(OpId),
        note: r.try_get(10)?,
    })
}

fn snapshot_of(hash: String, name: String, text: String, files: &str) -> Snapshot {
    let files: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(files).unwrap_or_default();
    Snapshot {
        hash,
        name,
        text,
        files: files
            .into_iter()
            .map(|(k, v)| (k, v.as_str().unwrap_or_default().to_owned()))
            .collect(),
    }
}

/// Text keys sort by their bytes (`COLLATE "C"`), as SQLite sorts them, whatever the database's
/// collation.
impl ReadBackend for PgReader {
    fn tokens(&self) -> Result<Vec<TokenRow>> {
        self.run(|c| {
            c.query(
                "SELECT name, role, hash, created_at, created_by FROM tokens \
                 ORDER BY name COLLATE \"C\"",
                &[],
            )?
            .iter()
            .map(|r| {
                Ok(TokenRow {
                    name: r.try_get(0)?,
                    role: r.try_get(1)?,
                    hash: r.try_get(2)?,
                    created_at: num(r, 3)?,
                    created_by: r.try_get(4)?,
                })
            })
            .collect()
        })
    }

    fn nodes(&self) -> Result<Vec<NodeRow>> {
        self.run(|c| {
            c.query(
                "SELECT host, boot_id, pid, start, workers, started_at, heartbeat_at, lease_until \
                 FROM nodes ORDER BY host COLLATE \"C\", pid",
                &[],
            )?
            .iter()
            .map(|r| {
                Ok(NodeRow {
                    id: ProcessId {
                        host: r.try_get(0)?,
                        boot_id: r.try_get(1)?,
                        pid: num(r, 2)?,
                        start: num(r, 3)?,
                    },
                    workers: num(r, 4)?,
                    started_at: num(r, 5)?,
                    heartbeat_at: num(r, 6)?,
                    lease_until: num(r, 7)?,
                })
            })
            .collect()
        })
    }

    fn count_ops(&self, status: OpStatus) -> Result<u64> {
        self.run(move |c| {
            let n: i64 = c
                .query_opt(
                    "SELECT COUNT(*) FROM ops WHERE status = $1::text",
                    &[&status.as_str()],
                )?
                .map_or(Ok(0), |r| r.try_get(0))?;
            Ok(u64::try_from(n).unwrap_or(0))
        })
    }

    fn list_ops(&self, filter: &OpFilter) -> Result<Vec<OpRow>> {
        let status = filter.status.map(OpStatus::as_str);
        let plan = filter.plan.clone();
        let limit = filter.limit.map(i64::from);
        let before = filter.before.map(|b| b.0);
        self.run(move |c| {
            // Only the filters given are in the SQL, so that the planner sees which index fits.
            let mut sql = format!("SELECT {OP_COLUMNS} FROM ops WHERE TRUE");
            let mut args: Vec<&(dyn ToSql + Sync)> = Vec::new();
            if let Some(status) = &status {
                args.push(status);
                write!(sql, " AND status = ${}::text", args.len()).ok();
            }
            if let Some(plan) = &plan {
                args.push(plan);
                write!(sql, " AND plan = ${}::text", args.len()).ok();
            }
            if let Some(before) = &before {
                args.push(before);
                write!(sql, " AND id < ${}::bigint", args.len()).ok();
            }
            sql.push_str(" ORDER BY id DESC");
            if let Some(limit) = &limit {
                args.push(limit);
                write!(sql, " LIMIT ${}::bigint", args.len()).ok();
            }
            ops(&c.query(&sql, &args)?)
        })
    }

    fn op(&self, op: OpId) -> Result<OpRow> {
        self.op_with(op, OP_COLUMNS)
    }

    fn op_head(&self, op: OpId) -> Result<OpRow> {
        self.op_with(op, &OP_HEAD_COLUMNS)
    }

    fn schedules(&self) -> Result<Vec<ScheduleRow>> {
        self.run(|c| {
            c.query(
                "SELECT name, plan, params, cron, timezone, paused, catch_up, created_at, \
                 last_fire, last_op, note FROM schedules ORDER BY name COLLATE \"C\"",
                &[],
            )?
            .iter()
            .map(schedule_row)
            .collect()
        })
    }

    fn child(&self, op: OpId, task: TaskNo) -> Result<Option<OpRow>> {
        self.run(move |c| {
            c.query_opt(
                &format!(
                    "SELECT {OP_COLUMNS} FROM ops \
                     WHERE parent_id = $1::bigint AND parent_task = $2::bigint"
                ),
                &[&op.0, &i64::from(task.0)],
            )?
            .as_ref()
            .map(op_row)
            .transpose()
        })
    }

    fn children(&self, op: OpId) -> Result<Vec<OpRow>> {
        self.run(move |c| {
            ops(&c.query(
                &format!(
                    "SELECT {OP_COLUMNS} FROM ops WHERE parent_id = $1::bigint ORDER BY parent_task"
                ),
                &[&op.0],
            )?)
        })
    }

    fn tasks(&self, op: OpId) -> Result<Vec<TaskRow>> {
        self.run(move |c| task_rows(c, op, None, false))
    }

    fn active_tasks(&self, op: OpId) -> Result<Vec<TaskRow>> {
        self.run(move |c| task_rows(c, op, None, true))
    }

    fn task(&self, op: OpId, task: TaskNo) -> Result<TaskRow> {
        self.run(move |c| task_rows(c, op, Some(task), false))?
            .pop()
            .ok_or(Error::NotFound(op))
    }

    fn task_briefs(&self, op: OpId, which: Briefs) -> Result<Vec<TaskBrief>> {
        self.run(move |c| task_briefs(c, op, which))
    }

    fn last_task(&self, op: OpId) -> Result<Option<TaskNo>> {
        self.run(move |c| {
            let last: Option<i64> = match c.query_opt(
                "SELECT max(task_no)::bigint FROM tasks WHERE op_id = $1::bigint",
                &[&op.0],
            )? {
                Some(row) => row.try_get(0)?,
                None => None,
            };
            Ok(last.and_then(|n| u32::try_from(n).ok()).map(TaskNo))
        })
    }

    fn attempts(&self, op: OpId) -> Result<Vec<AttemptRow>> {
        self.run(move |c| {
            c.query(
                "SELECT task_no, n, status, started_at, ended_at, exit_code, error, host, boot_id, \
                 pid, proc_start, pgid, out_logged, err_logged FROM attempts WHERE op_id = $1::bigint ORDER BY task_no, n",
                &[&op.0],
            )?
            .iter()
            .map(attempt_row)
            .collect()
        })
    }

    fn running_attempts(&self, op: OpId) -> Result<Vec<AttemptRow>> {
        self.run(move |c| {
            c.query(
                "SELECT task_no, n, status, started_at, ended_at, exit_code, error, host, boot_id, \
                 pid, proc_start, pgid, out_logged, err_logged FROM attempts WHERE op_id = $1::bigint \
                 AND status = 'running' ORDER BY task_no, n",
                &[&op.0],
            )?
            .iter()
            .map(attempt_row)
            .collect()
        })
    }

    fn events(&self, op: OpId) -> Result<Vec<EventRow>> {
        self.run(move |c| {
            c.query(
                "SELECT seq, at, kind, task, message FROM events WHERE op_id = $1::bigint \
                 ORDER BY seq",
                &[&op.0],
            )?
            .iter()
            .map(event_row)
            .collect()
        })
    }

    fn moves(&self, after: Option<u64>) -> Result<Moves> {
        Ok(self.moved.as_ref().map_or(
            Moves {
                cursor: 0,
                ops: None,
            },
            |moved| moved.since(after),
        ))
    }

    fn last_event(&self, op: OpId, task: &str, kind: EventKind) -> Result<Option<EventRow>> {
        let task = task.to_owned();
        self.run(move |c| {
            c.query(
                "SELECT seq, at, kind, task, message FROM events WHERE op_id = $1::bigint \
                 AND task = $2 AND kind = $3 ORDER BY seq DESC LIMIT 1",
                &[&op.0, &task, &kind.as_str()],
            )?
            .iter()
            .map(event_row)
            .next()
            .transpose()
        })
    }

    fn logs(
        &self,
        op: OpId,
        task: Option<TaskNo>,
        after: Option<(TaskNo, u32, i64)>,
    ) -> Result<Vec<LogChunk>> {
        let (t, a, s) = after.map_or((-1, -1, -1), |(t, a, s)| (i64::from(t.0), i64::from(a), s));
        let task = task.map(|t| i64::from(t.0));
        self.run(move |c| {
            c.query(
                "SELECT task_no, attempt, seq, stream, at, data FROM logs WHERE op_id = $1::bigint \
                 AND ($2::bigint IS NULL OR task_no = $2::bigint) \
                 AND (task_no, attempt, seq) > ($3::bigint, $4::bigint, $5::bigint) \
                 ORDER BY task_no, attempt, seq",
                &[&op.0, &task, &t, &a, &s],
            )?
            .iter()
            .map(|r| {
                Ok(LogChunk {
                    task_no: TaskNo(num(r, 0)?),
                    attempt: num(r, 1)?,
                    seq: num(r, 2)?,
                    stream: num(r, 3)?,
                    at: num(r, 4)?,
                    data: r.try_get(5)?,
                })
            })
            .collect()
        })
    }

    fn snapshot(&self, op: OpId) -> Result<Snapshot> {
        self.run(move |c| {
            let Some(r) = c.query_opt(
                "SELECT s.hash, s.name, s.text, s.files FROM ops o \
                 JOIN plan_snapshots s ON s.id = o.snapshot_id WHERE o.id = $1::bigint",
                &[&op.0],
            )?
            else {
                return Ok(None);
            };
            let files: String = r.try_get(3)?;
            Ok(Some(snapshot_of(
                r.try_get(0)?,
                r.try_get(1)?,
                r.try_get(2)?,
                &files,
            )))
        })?
        .ok_or(Error::NotFound(op))
    }

    fn locks(&self) -> Result<Vec<LockRow>> {
        self.run(|c| {
            c.query(
                "SELECT key, op_id, since FROM locks ORDER BY key COLLATE \"C\"",
                &[],
            )?
            .iter()
            .map(|r| {
                Ok(LockRow {
                    key: r.try_get(0)?,
                    op: OpId(num(r, 1)?),
                    since: num(r, 2)?,
                })
            })
            .collect()
        })
    }

    fn cooldowns(&self, now: Millis) -> Result<Vec<CooldownRow>> {
        self.run(move |c| {
            c.query(
                "SELECT key, op_id, until, acked_by, acked_at FROM cooldowns \
                 WHERE until > $1::bigint ORDER BY key COLLATE \"C\"",
                &[&now],
            )?
            .iter()
            .map(|r| {
                let by: Option<String> = r.try_get(3)?;
                let at: Option<Millis> = num_opt(r, 4)?;
                Ok(CooldownRow {
                    key: r.try_get(0)?,
                    op: OpId(num(r, 1)?),
                    until: num(r, 2)?,
                    acked: by.zip(at).map(|(by, at)| Request {
                        by,
                        at,
                        reason: None,
                    }),
                })
            })
            .collect()
        })
    }

    fn pauses(&self) -> Result<Vec<Pause>> {
        let values = self.run(|c| {
            c.query(
                "SELECT value FROM settings WHERE key = 'paused' OR key LIKE 'paused:%' ORDER BY key",
                &[],
            )?
            .iter()
            .map(|r| r.try_get::<_, String>(0))
            .collect::<PgResult<Vec<_>>>()
        })?;
        Ok(values
            .iter()
            .filter_map(|v| Pause::from_setting(v))
            .collect())
    }

    fn any_sealed(&self) -> Result<bool> {
        self.run(|c| {
            c.query_opt(
                r#"SELECT EXISTS (SELECT 1 FROM ops WHERE params LIKE '%{"$secret":"%')"#,
                &[],
            )?
            .map_or(Ok(false), |r| r.try_get::<_, bool>(0))
        })
    }
}

#[cfg(test)]
mod tests {
    //! Against the real server: `CAIRN_TEST_PG` (a libpq connection string), by default the
    //! local one (`host=127.0.0.1 port=5432 user=postgres dbname=test`). Each test makes a
    //! database of its own and drops it.

    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    /// The schema, as the backend migrates a new database.
    const SCHEMA: &str = include_str!("../../migrations/postgres/0001_initial.sql");
    const SCHEMA_2: &str = include_str!("../../migrations/postgres/0002_stops.sql");
    const SCHEMA_3: &str = include_str!("../../migrations/postgres/0003_progress.sql");
    const SCHEMA_7: &str = include_str!("../../migrations/postgres/0007_logged.sql");

    /// Two plans, and five ops: 3 runs, owned, with a cancel asked and an ending decided; 4 and
    /// 5 are its children (tasks 1 and 0).
    const OPS: &str = r#"
        INSERT INTO plan_snapshots (id, hash, name, text, files) VALUES
            (1, 'sha256:aa', 'deploy', 'name: deploy', '{"sub/a.yaml": "name: a"}'),
            (2, 'sha256:bb', 'backup', 'name: backup', '{}');
        INSERT INTO ops (id, uuid, plan, snapshot_id, title, status, params, workdir, env,
                         created_at) VALUES
            (1, 'u1', 'deploy', 1, 'deploy one', 'succeeded', '{"n": 1}', '/w', '{}', 1000),
            (2, 'u2', 'backup', 2, 'backup', 'failed', '{}', '/w', '{}', 2000);
        INSERT INTO ops (id, uuid, plan, snapshot_id, title, status, params, workdir, env,
                         created_at, started_at, owner_host, owner_boot, owner_pid, owner_start,
                         lease_until, current_task, error, lock_key, ending,
                         cancel_requested_at, cancel_by, cancel_reason) VALUES
            (3, 'u3', 'deploy', 1, 'deploy three', 'running', '{"env": "prod"}', '/srv/plans',
             '{"HOME": "/root"}', 3000, 3100, 'web-1', 'boot-a/4026531836', 4242, 987654,
             9000, 'build', 'it broke', 'prod', '{"status": "failed"}', 3500, 'ann', 'oops');
        INSERT INTO ops (id, uuid, plan, snapshot_id, title, status, params, workdir, env,
                         created_at, parent_id, parent_task) VALUES
            (4, 'u4', 'deploy', 1, 'child of task 1', 'queued', '{}', '/w', '{}', 4000, 3, 1),
            (5, 'u5', 'deploy', 1, 'child of task 0', 'queued', '{}', '/w', '{}', 5000, 3, 0);
    "#;

    fn admin_config() -> postgres::Config {
        std::env::var("CAIRN_TEST_PG")
            .unwrap_or_else(|_| "host=127.0.0.1 port=5432 user=postgres dbname=test".to_owned())
            .parse()
            .expect("CAIRN_TEST_PG is a libpq connection string")
    }

    /// Runs `f` on a new connection to database `db`, on a thread of its own: a test may run in
    /// a tokio runtime, on whose threads the synchronous client must not be called.
    fn on_db<T: Send>(db: &str, f: impl FnOnce(&mut Client) -> T + Send) -> T {
        std::thread::scope(|s| {
            s.spawn(|| {
                let mut config = admin_config();
                config.dbname(db);
                let mut client = config.connect(NoTls).expect("the test server answers");
                f(&mut client)
            })
            .join()
            .expect("the test's SQL ran")
        })
    }

    /// A database of the test's own, dropped at the end.
    struct Db {
        name: String,
    }

    impl Db {
        /// A new database with the tables (and `sql` run in it). Its collation is ICU's `en-US`
        /// where the server has ICU, which does not sort by bytes: reads must sort as SQLite.
        fn new(sql: &str) -> Self {
            static NEXT: AtomicU32 = AtomicU32::new(0);
            let name = format!(
                "cairn_reads_{}_{}",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::SeqCst)
            );
            on_db("test", |c| {
                c.batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .expect("drop a leftover database");
                let icu = c.batch_execute(&format!(
                    "CREATE DATABASE {name} TEMPLATE template0 ENCODING 'UTF8' \
                     LOCALE_PROVIDER icu ICU_LOCALE 'en-US' LOCALE 'C.UTF-8'"
                ));
                if icu.is_err() {
                    c.batch_execute(&format!("CREATE DATABASE {name}"))
                        .expect("create the test database");
                }
            });
            let db = Self { name };
            db.exec(SCHEMA);
            db.exec(SCHEMA_2);
            db.exec(SCHEMA_3);
            db.exec(SCHEMA_7);
            db.exec(sql);
            db
        }

        fn exec(&self, sql: &str) {
            on_db(&self.name, |c| c.batch_execute(sql)).expect("the test's SQL runs");
        }

        fn reader(&self) -> PgReader {
            let mut config = admin_config();
            config.dbname(&self.name);
            PgReader::new(
                config,
                Location::parse(&format!("postgres://127.0.0.1/{}", self.name)),
            )
        }

        /// How many connections to this database the server has.
        fn connections(&self) -> i64 {
            on_db("test", |c| {
                c.query_one(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = $1",
                    &[&self.name],
                )
                .expect("pg_stat_activity")
                .get(0)
            })
        }

        /// Ends every connection to this database but the caller's; returns how many it ended.
        fn kill_connections(&self) -> i64 {
            on_db("test", |c| {
                c.query_one(
                    "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                     WHERE datname = $1 AND pid <> pg_backend_pid()) ended",
                    &[&self.name],
                )
                .expect("pg_terminate_backend")
                .get(0)
            })
        }
    }

    impl Drop for Db {
        fn drop(&mut self) {
            let name = self.name.clone();
            // Never panic here: a failed test is already unwinding through it.
            let _ = std::thread::spawn(move || {
                let mut client = admin_config().connect(NoTls)?;
                client.batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            })
            .join();
        }
    }

    fn ids(rows: &[OpRow]) -> Vec<i64> {
        rows.iter().map(|r| r.id.0).collect()
    }

    #[test]
    fn ops_are_listed_newest_first_with_the_filters_and_limit_given() {
        let db = Db::new(OPS);
        let reader = db.reader();
        let list = |status: Option<OpStatus>, plan: Option<&str>, limit: Option<u32>| {
            let filter = OpFilter {
                status,
                plan: plan.map(ToOwned::to_owned),
                limit,
                before: None,
            };
            ids(&reader.list_ops(&filter).expect("list"))
        };
        assert_eq!(list(None, None, None), [5, 4, 3, 2, 1]);
        assert_eq!(list(Some(OpStatus::Running), None, None), [3]);
        assert_eq!(list(None, Some("deploy"), None), [5, 4, 3, 1]);
        assert_eq!(list(Some(OpStatus::Queued), Some("deploy"), None), [5, 4]);
        assert_eq!(list(None, None, Some(2)), [5, 4]);
        assert_eq!(list(None, Some("deploy"), Some(3)), [5, 4, 3]);
        assert_eq!(
            list(Some(OpStatus::Canceled), None, None),
            Vec::<i64>::new()
        );
        assert_eq!(list(None, Some("nope"), Some(0)), Vec::<i64>::new());
    }

    #[test]
    fn an_op_is_read_whole_and_a_missing_one_is_not_found() {
        let db = Db::new(OPS);
        let reader = db.reader();
        let op = reader.op(OpId(3)).expect("op 3");
        let expected = OpRow {
            id: OpId(3),
            uuid: "u3".into(),
            plan: "deploy".into(),
            title: "deploy three".into(),
            status: OpStatus::Running,
            params: serde_json::json!({"env": "prod"}),
            workdir: "/srv/plans".into(),
            env: serde_json::json!({"HOME": "/root"})
                .as_object()
                .cloned()
                .unwrap_or_default(),
            lock_key: Some("prod".into()),
            cancel: Some(Request {
                by: "ann".into(),
                at: 3500,
                reason: Some("oops".into()),
            }),
            cancel_grace_ms: None,
            interrupted_by: None,
            ending: Some(serde_json::json!({"status": "failed"})),
            parent: None,
            created_at: 3000,
            started_at: Some(3100),
            ended_at: None,
            owner: Some(ProcessId {
                host: "web-1".into(),
                boot_id: "boot-a/4026531836".into(),
                pid: 4242,
                start: 987_654,
            }),
            lease_until: Some(9000),
            current_task: Some("build".into()),
            error: Some("it broke".into()),
        };
        assert_eq!(op, expected);
        let plain = reader.op(OpId(1)).expect("op 1");
        assert_eq!(
            (plain.owner, plain.cancel, plain.ending),
            (None, None, None)
        );
        assert_eq!(plain.params, serde_json::json!({"n": 1}));
        assert!(matches!(
            reader.op(OpId(99)),
            Err(Error::NotFound(OpId(99)))
        ));
    }

    #[test]
    fn children_come_by_task_and_a_child_by_its_task() {
        let db = Db::new(OPS);
        let reader = db.reader();
        assert_eq!(ids(&reader.children(OpId(3)).expect("children")), [5, 4]);
        assert!(reader.children(OpId(1)).expect("none").is_empty());
        let child = reader.child(OpId(3), TaskNo(1)).expect("child");
        assert_eq!(
            child.map(|c| (c.id, c.parent)),
            Some((OpId(4), Some((OpId(3), TaskNo(1)))))
        );
        assert_eq!(reader.child(OpId(3), TaskNo(7)).expect("no child"), None);
    }

    #[test]
    fn tasks_and_attempts_come_in_order_with_every_column() {
        let db = Db::new(&format!(
            "{OPS}
            INSERT INTO tasks (op_id, task_no, step, name, item, status, attempts, retry_from,
                               started_at, ended_at, exit_code, error, outputs, by_check) VALUES
                (3, 2, 'check', 'check', NULL, 'pending', 0, 0, NULL, NULL, NULL, NULL, NULL, 0),
                (3, 0, 'build', 'build', NULL, 'succeeded', 1, 0, 10, 20, 0, NULL,
                 '{{\"v\": \"1.2\"}}', 1),
                (3, 1, 'shard', 'shard[b]', '\"b\"', 'failed', 2, 1, 30, 40, -9, 'killed', NULL, 0),
                (1, 0, 'other', 'other', NULL, 'succeeded', 0, 0, NULL, NULL, NULL, NULL, NULL, 0);
            INSERT INTO attempts (op_id, task_no, n, status, started_at, ended_at, exit_code,
                                  error, host, boot_id, pid, pgid, proc_start) VALUES
                (3, 1, 2, 'failed', 35, 40, -9, 'killed', 'web-1', 'boot-a/1', 77, 77, 555),
                (3, 0, 1, 'succeeded', 10, 20, 0, NULL, 'web-1', 'boot-a/1', 70, 70, 500),
                (3, 1, 1, 'interrupted', 30, 31, NULL, NULL, NULL, NULL, NULL, NULL, NULL),
                (1, 0, 1, 'running', 5, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL);"
        ));
        let reader = db.reader();
        let tasks = reader.tasks(OpId(3)).expect("tasks");
        let numbers: Vec<u32> = tasks.iter().map(|t| t.task_no.0).collect();
        assert_eq!(numbers, [0, 1, 2]);
        let build = &tasks[0];
        assert_eq!(build.status, TaskStatus::Succeeded);
        assert!(build.by_check);
        assert_eq!(
            build.outputs,
            serde_json::json!({"v": "1.2"}).as_object().cloned()
        );
        assert_eq!(
            (build.started_at, build.ended_at, build.exit_code),
            (Some(10), Some(20), Some(0))
        );
        let shard = reader.task(OpId(3), TaskNo(1)).expect("task 1");
        assert_eq!(shard, tasks[1]);
        assert_eq!(shard.name, "shard[b]");
        assert_eq!(shard.item, Some(serde_json::json!("b")));
        assert_eq!((shard.attempts, shard.retry_from), (2, 1));
        assert_eq!(
            (shard.exit_code, shard.error.as_deref()),
            (Some(-9), Some("killed"))
        );
        assert!(!shard.by_check);
        assert!(matches!(
            reader.task(OpId(3), TaskNo(9)),
            Err(Error::NotFound(OpId(3)))
        ));

        let attempts = reader.attempts(OpId(3)).expect("attempts");
        let keys: Vec<(u32, u32)> = attempts.iter().map(|a| (a.task_no.0, a.n)).collect();
        assert_eq!(keys, [(0, 1), (1, 1), (1, 2)]);
        assert_eq!(attempts[1].process, None);
        assert_eq!(attempts[1].status, AttemptStatus::Interrupted);
        assert_eq!(
            attempts[2],
            AttemptRow {
                task_no: TaskNo(1),
                n: 2,
                status: AttemptStatus::Failed,
                started_at: 35,
                ended_at: Some(40),
                exit_code: Some(-9),
                error: Some("killed".into()),
                process: Some(ProcessId {
                    host: "web-1".into(),
                    boot_id: "boot-a/1".into(),
                    pid: 77,
                    start: 555,
                }),
                pgid: Some(77),
                logged: [0, 0],
            }
        );
    }

    #[test]
    fn events_come_by_seq_and_logs_after_the_point_given() {
        let db = Db::new(&format!(
            "{OPS}
            INSERT INTO events (op_id, seq, at, kind, task, message) VALUES
                (3, 2, 20, 'task-started', 'build', 'attempt 1'),
                (3, 1, 10, 'started', NULL, 'started by ann'),
                (3, 3, 30, 'note', NULL, 'hello'),
                (1, 1, 5, 'started', NULL, 'other op');
            INSERT INTO logs (op_id, task_no, attempt, seq, stream, at, data) VALUES
                (3, 1, 2, 1, 1, 50, 'x'::bytea),
                (3, 0, 1, 2, 2, 41, '\\xff00fe'::bytea),
                (3, 0, 1, 1, 1, 40, 'first'::bytea),
                (3, 1, 1, 1, 1, 45, 'y'::bytea),
                (1, 0, 1, 1, 1, 1, 'other op'::bytea);"
        ));
        let reader = db.reader();
        let events = reader.events(OpId(3)).expect("events");
        let seqs: Vec<i64> = events.iter().map(|e| e.seq).collect();
        assert_eq!(seqs, [1, 2, 3]);
        assert_eq!(
            events[1],
            EventRow {
                seq: 2,
                at: 20,
                kind: "task-started".into(),
                task: Some("build".into()),
                message: "attempt 1".into(),
            }
        );
        assert_eq!(events[0].task, None);

        let keys = |task: Option<u32>, after: Option<(u32, u32, i64)>| -> Vec<(u32, u32, i64)> {
            reader
                .logs(
                    OpId(3),
                    task.map(TaskNo),
                    after.map(|(t, a, s)| (TaskNo(t), a, s)),
                )
                .expect("logs")
                .iter()
                .map(|c| (c.task_no.0, c.attempt, c.seq))
                .collect()
        };
        assert_eq!(
            keys(None, None),
            [(0, 1, 1), (0, 1, 2), (1, 1, 1), (1, 2, 1)]
        );
        assert_eq!(keys(Some(1), None), [(1, 1, 1), (1, 2, 1)]);
        assert_eq!(
            keys(None, Some((0, 1, 1))),
            [(0, 1, 2), (1, 1, 1), (1, 2, 1)]
        );
        assert_eq!(keys(Some(1), Some((1, 1, 1))), [(1, 2, 1)]);
        assert_eq!(keys(None, Some((1, 2, 1))), []);
        let chunks = reader.logs(OpId(3), Some(TaskNo(0)), None).expect("logs");
        assert_eq!(
            chunks[1],
            LogChunk {
                task_no: TaskNo(0),
                attempt: 1,
                seq: 2,
                stream: 2,
                at: 41,
                data: vec![0xff, 0x00, 0xfe],
            }
        );
    }

    #[test]
    fn a_snapshot_is_read_with_its_files() {
        let db = Db::new(OPS);
        let reader = db.reader();
        assert_eq!(
            reader.snapshot(OpId(3)).expect("snapshot"),
            Snapshot {
                hash: "sha256:aa".into(),
                name: "deploy".into(),
                text: "name: deploy".into(),
                files: vec![("sub/a.yaml".into(), "name: a".into())],
            }
        );
        assert!(reader.snapshot(OpId(2)).expect("snapshot").files.is_empty());
        assert!(matches!(
            reader.snapshot(OpId(99)),
            Err(Error::NotFound(OpId(99)))
        ));
    }

    #[test]
    fn locks_cooldowns_schedules_and_nodes_sort_by_bytes() {
        let db = Db::new(&format!(
            "{OPS}
            INSERT INTO locks (key, op_id, since) VALUES
                ('b', 1, 10), ('C', 2, 20), ('a_', 3, 30), ('A', 3, 40);
            INSERT INTO cooldowns (key, op_id, until, acked_by, acked_at) VALUES
                ('b', 1, 1000, NULL, NULL), ('C', 2, 2000, 'bob', 150),
                ('gone', 2, 100, NULL, NULL), ('A', 1, 101, NULL, NULL);
            INSERT INTO schedules (name, plan, params, cron, timezone, paused, catch_up,
                                   created_at, last_fire, last_op, note) VALUES
                ('b-nightly', '/p/b.yaml', '{{\"x\": \"1\"}}', '@daily', 'UTC', 1, 0, 7, 8, 2,
                 'skipped'),
                ('Weekly', '/p/w.yaml', '{{}}', '0 3 * * 1', 'Europe/Paris', 0, 1, 9, NULL,
                 NULL, NULL);
            INSERT INTO nodes (host, boot_id, pid, start, workers, started_at, heartbeat_at,
                               lease_until) VALUES
                ('web-b', 'boot-2', 10, 1, 4, 100, 200, 300),
                ('Web-a', 'boot-1', 30, 3, 2, 101, 201, 301),
                ('web-b', 'boot-2', 9, 2, 8, 102, 202, 302);"
        ));
        let reader = db.reader();
        let locks = reader.locks().expect("locks");
        let keys: Vec<&str> = locks.iter().map(|l| l.key.as_str()).collect();
        assert_eq!(keys, ["A", "C", "a_", "b"]);
        assert_eq!(
            locks[2],
            LockRow {
                key: "a_".into(),
                op: OpId(3),
                since: 30
            }
        );

        let cooldowns = reader.cooldowns(100).expect("cooldowns");
        let keys: Vec<&str> = cooldowns.iter().map(|c| c.key.as_str()).collect();
        assert_eq!(keys, ["A", "C", "b"], "`gone` ended at 100");
        assert_eq!(
            cooldowns[1].acked,
            Some(Request {
                by: "bob".into(),
                at: 150,
                reason: None
            })
        );
        assert_eq!(
            (cooldowns[2].op, cooldowns[2].until, &cooldowns[2].acked),
            (OpId(1), 1000, &None)
        );
        assert_eq!(reader.cooldowns(1000).expect("cooldowns").len(), 1);

        let schedules = reader.schedules().expect("schedules");
        let names: Vec<&str> = schedules.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["Weekly", "b-nightly"]);
        assert_eq!(
            schedules[1],
            ScheduleRow {
                name: "b-nightly".into(),
                plan: "/p/b.yaml".into(),
                params: serde_json::json!({"x": "1"})
                    .as_object()
                    .cloned()
                    .unwrap_or_default(),
                cron: "@daily".into(),
                timezone: "UTC".into(),
                paused: true,
                catch_up: false,
                created_at: 7,
                last_fire: Some(8),
                last_op: Some(OpId(2)),
                note: Some("skipped".into()),
            }
        );
        assert!(!schedules[0].paused && schedules[0].catch_up);
        assert_eq!((schedules[0].last_fire, schedules[0].last_op), (None, None));

        let nodes = reader.nodes().expect("nodes");
        let order: Vec<(&str, u32)> = nodes
            .iter()
            .map(|n| (n.id.host.as_str(), n.id.pid))
            .collect();
        assert_eq!(order, [("Web-a", 30), ("web-b", 9), ("web-b", 10)]);
        assert_eq!(
            nodes[1],
            NodeRow {
                id: ProcessId {
                    host: "web-b".into(),
                    boot_id: "boot-2".into(),
                    pid: 9,
                    start: 2,
                },
                workers: 8,
                started_at: 102,
                heartbeat_at: 202,
                lease_until: 302,
            }
        );
    }

    #[test]
    fn paused_is_read_from_its_setting() {
        let db = Db::new("");
        let reader = db.reader();
        assert_eq!(reader.pauses().expect("paused"), Vec::new());
        db.exec(
            r#"INSERT INTO settings (key, value)
               VALUES ('paused', '{"by": "ann", "at": 77, "reason": "upgrade"}')"#,
        );
        assert_eq!(
            reader.pauses().expect("paused"),
            vec![Pause {
                scope: crate::types::PauseScope::default(),
                by: "ann".into(),
                at: 77,
                reason: Some("upgrade".into()),
                until: None,
            }]
        );
    }

    /// The engine reads from tokio workers: a read there must not run the synchronous client on
    /// the caller's thread (it would panic: a runtime within a runtime).
    #[tokio::test(flavor = "current_thread")]
    async fn reads_from_a_current_thread_runtime_do_not_panic() {
        let db = Db::new(OPS);
        let reader = db.reader();
        assert_eq!(reader.op(OpId(3)).expect("op").title, "deploy three");
        assert_eq!(reader.list_ops(&OpFilter::default()).expect("ops").len(), 5);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reads_from_a_multi_thread_runtime_do_not_panic() {
        let db = Db::new(OPS);
        let reader = db.reader();
        let task = tokio::spawn({
            let reader = reader.clone();
            async move { reader.children(OpId(3)).map(|c| ids(&c)) }
        });
        assert_eq!(task.await.expect("the task ran").expect("children"), [5, 4]);
        assert!(reader.locks().expect("locks").is_empty());
    }

    #[test]
    fn clones_share_a_pool_of_two_connections() {
        let db = Db::new(OPS);
        let reader = db.reader();
        std::thread::scope(|s| {
            for _ in 0..8 {
                let reader = reader.clone();
                s.spawn(move || {
                    for _ in 0..20 {
                        assert_eq!(reader.op(OpId(3)).expect("op").uuid, "u3");
                    }
                });
            }
        });
        let connections = db.connections();
        assert!(
            (1..=i64::try_from(READERS).unwrap_or(i64::MAX)).contains(&connections),
            "{connections} connections"
        );
    }

    #[test]
    fn a_read_on_a_broken_connection_runs_again_on_a_new_one() {
        let db = Db::new(OPS);
        let reader = db.reader();
        // Both reader threads connect: two reads at once.
        std::thread::scope(|s| {
            for _ in 0..4 {
                let reader = reader.clone();
                s.spawn(move || reader.op(OpId(1)).expect("op 1"));
            }
        });
        assert!(db.kill_connections() >= 1, "the readers were connected");
        for _ in 0..READERS * 2 {
            assert_eq!(reader.op(OpId(3)).expect("read again").uuid, "u3");
        }
    }

    #[test]
    fn a_server_that_cannot_be_reached_is_named_without_the_password() {
        let config: postgres::Config = "host=127.0.0.1 port=1 user=ann password=sekrit dbname=ops"
            .parse()
            .expect("config");
        let reader = PgReader::new(
            config,
            Location::parse("postgres://ann:sekrit@127.0.0.1:1/ops"),
        );
        let err = reader.op(OpId(1)).expect_err("nothing listens on port 1");
        assert!(matches!(err, Error::Unusable { .. }), "{err:?}");
        let text = err.to_string();
        assert!(
            text.contains("127.0.0.1:1") && text.contains("`ops`"),
            "{text}"
        );
        assert!(
            !text.contains("sekrit") && !format!("{err:?}").contains("sekrit"),
            "{text}"
        );
    }

    #[test]
    fn a_database_without_the_tables_is_not_cairns() {
        let db = Db::new("DROP TABLE nodes");
        let err = db.reader().nodes().expect_err("no table");
        assert!(matches!(err, Error::Unusable { .. }), "{err:?}");
        assert!(err.to_string().contains("no cairn tables"), "{err}");
    }

    #[test]
    fn tls_is_refused_with_a_reason() {
        let config: postgres::Config = "host=127.0.0.1 user=postgres dbname=test sslmode=require"
            .parse()
            .expect("config");
        let err = PgReader::new(config, Location::parse("postgres://127.0.0.1/test"))
            .pauses()
            .expect_err("no TLS");
        assert!(err.to_string().contains("sslmode=require"), "{err}");
    }
}
