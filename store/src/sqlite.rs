//! The SQLite backend: opening (and refusing) files, migrations, applying changes, reading.
//!
//! PRAGMAs, on every connection that may write:
//!
//! | pragma | value | why |
//! | --- | --- | --- |
//! | `journal_mode` | `WAL` | readers (`status`) never block the writer, nor it them |
//! | `synchronous` | `FULL` | a commit is on disk (`fdatasync` of the WAL: SQLite is built with `HAVE_FDATASYNC`) before it returns: invariant 2. `NORMAL` for a commit of nothing but what dies with the boot (`store::sync_for`) |
//! | `foreign_keys` | `ON` | tasks, attempts and events cannot outlive their op |
//! | `busy_timeout` | 5 s (or `CAIRN_BUSY_TIMEOUT_MS`) | another cairn process writing is waited for, not an error |
//! | `application_id` | [`APPLICATION_ID`] | a SQLite file that is not cairn's is recognised and left alone |
//! | `user_version` | the schema version | migrations run once; a newer schema is refused |

use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use rusqlite::config::DbConfig;
use rusqlite::{Connection, ErrorCode, OpenFlags, OptionalExtension, Transaction, params};

use crate::error::{Error, Result};
use crate::types::{
    Applied, AttemptRow, AttemptStatus, Change, CooldownRow, EventRow, LockRow, LogChunk, Millis,
    NewOp, NewTask, OpId, OpRow, OpStatus, Outcome, ProcessId, Request, ScheduleRow, Snapshot,
    TaskNo, TaskRow, TaskStatus,
};

/// `cair` in ASCII: the `application_id` of a cairn database.
pub const APPLICATION_ID: i32 = 0x6361_6972;

/// The migrations, in order; the schema version is their count.
const MIGRATIONS: &[&str] = &[
    include_str!("../migrations/0001_initial.sql"),
    include_str!("../migrations/0002_children.sql"),
    include_str!("../migrations/0003_schedules.sql"),
    include_str!("../migrations/0004_owner_index.sql"),
    include_str!("../migrations/0005_older_writers.sql"),
    include_str!("../migrations/0006_status_checks.sql"),
];

/// The schema version this cairn writes.
#[allow(clippy::cast_possible_wrap)]
pub const SCHEMA_VERSION: i32 = MIGRATIONS.len() as i32;

/// How long a write waits for another process holding the database: 5 s, or
/// `CAIRN_BUSY_TIMEOUT_MS`. Read once.
pub(crate) fn busy_timeout() -> Duration {
    static TIMEOUT: std::sync::OnceLock<Duration> = std::sync::OnceLock::new();
    *TIMEOUT.get_or_init(|| {
        std::env::var("CAIRN_BUSY_TIMEOUT_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .map_or(Duration::from_secs(5), Duration::from_millis)
    })
}

/// What went wrong, in the words of the path's owner.
pub(crate) fn classify(path: &Path, err: &rusqlite::Error) -> Error {
    let code = err.sqlite_error_code();
    let reason = match code {
        Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) => {
            return Error::Locked {
                path: path.to_path_buf(),
                waited_ms: u64::try_from(busy_timeout().as_millis()).unwrap_or(u64::MAX),
            };
        }
        Some(ErrorCode::NotADatabase) => "it is not a SQLite database (nor a cairn one)".to_owned(),
        Some(ErrorCode::DatabaseCorrupt) => "the file is corrupt".to_owned(),
        Some(ErrorCode::DiskFull) => {
            return Error::Write {
                path: path.to_path_buf(),
                reason: "the disk is full".to_owned(),
            };
        }
        Some(ErrorCode::ReadOnly) => {
            return Error::Write {
                path: path.to_path_buf(),
                reason: "the file is read-only".to_owned(),
            };
        }
        Some(ErrorCode::SystemIoFailure) => {
            return Error::Write {
                path: path.to_path_buf(),
                reason: format!("I/O error: {err}"),
            };
        }
        Some(ErrorCode::CannotOpen | ErrorCode::PermissionDenied) => {
            // SQLite keeps `-wal` and `-shm` files beside the database: its directory matters.
            let dir = path
                .parent()
                .filter(|d| !d.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
            match nix::unistd::access(dir, nix::unistd::AccessFlags::W_OK) {
                Err(nix::errno::Errno::EROFS) => format!(
                    "its directory `{}` is on a read-only file system, and SQLite must write its `-wal` and `-shm` files beside it",
                    dir.display()
                ),
                Err(errno) => format!(
                    "its directory `{}` cannot be written ({}), and SQLite must write its `-wal` and `-shm` files beside it",
                    dir.display(),
                    std::io::Error::from(errno)
                ),
                Ok(()) => format!("cannot open it: {err}"),
            }
        }
        _ => err.to_string(),
    };
    Error::Unusable {
        path: path.to_path_buf(),
        reason,
    }
}

/// More than the writer's distinct statements (about eighty), so that none is evicted.
const WRITER_STATEMENTS: usize = 128;

/// Opens the database for writing, creating it (private to the user) if it does not exist.
pub(crate) fn open_writer(path: &Path) -> Result<Connection> {
    let fresh = create_private(path)?;
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags(path, flags).map_err(|e| classify(path, &e))?;
    conn.busy_timeout(busy_timeout())
        .map_err(|e| classify(path, &e))?;
    // Every statement the writer runs stays prepared: a step's commit runs a score of them, and
    // with rusqlite's default of 16 they pushed each other out and were parsed again every time.
    conn.set_prepared_statement_cache_capacity(WRITER_STATEMENTS);
    // A stable plan for each statement. Without it, SQLite marks a statement whose plan might
    // depend on a bound value (as `MAX(seq) ... WHERE op_id = ?1`, run for every event) to be
    // parsed and planned again whenever a value is bound: twice a step.
    conn.set_db_config(DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG, true)
        .map_err(|e| classify(path, &e))?;
    let version = check_identity(&conn, path, fresh)?;
    switch_to_wal(&conn, path)?;
    conn.pragma_update(None, "synchronous", "FULL")
        .map_err(|e| classify(path, &e))?;
    conn.pragma_update(None, "foreign_keys", "ON")
        .map_err(|e| classify(path, &e))?;
    if version < SCHEMA_VERSION {
        migrate(&conn, path, version)?;
    }
    Ok(conn)
}

/// Puts the database in WAL mode (a no-op once it is). Two processes creating the file together
/// both try to switch it from the rollback journal; SQLite refuses one at once with `SQLITE_BUSY`
/// (a lock upgrade that would deadlock does not call the busy handler), so the refusal is retried
/// here until the busy timeout, as any other wait for the lock is.
fn switch_to_wal(conn: &Connection, path: &Path) -> Result<()> {
    let deadline = std::time::Instant::now() + busy_timeout();
    loop {
        match conn.pragma_update(None, "journal_mode", "WAL") {
            Ok(()) => return Ok(()),
            Err(e)
                if matches!(
                    e.sqlite_error_code(),
                    Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked)
                ) && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(classify(path, &e)),
        }
    }
}

/// Opens the database for reading; `None` when the file does not exist. Never writes to it.
pub(crate) fn open_reader(path: &Path) -> Result<Option<Connection>> {
    match std::fs::metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(Error::Unusable {
                path: path.to_path_buf(),
                reason: format!("cannot read it: {e}"),
            });
        }
        Ok(meta) if meta.is_dir() => {
            return Err(Error::Unusable {
                path: path.to_path_buf(),
                reason: "it is a directory".to_owned(),
            });
        }
        Ok(_) => {}
    }
    // Fail early and clearly on a file the user cannot read, before SQLite's vaguer error. Never
    // by opening it: closing any descriptor of the file drops every POSIX lock this process holds
    // on it, the writer connection's included, and another SQLite client would then delete the WAL
    // under a live op. access(2) opens nothing.
    if let Err(errno) = nix::unistd::access(path, nix::unistd::AccessFlags::R_OK) {
        return Err(Error::Unusable {
            path: path.to_path_buf(),
            reason: format!("cannot read it: {}", std::io::Error::from(errno)),
        });
    }
    let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags(path, flags).map_err(|e| classify(path, &e))?;
    conn.busy_timeout(busy_timeout())
        .map_err(|e| classify(path, &e))?;
    let (conn, version) = match check_identity(&conn, path, false) {
        Ok(version) => (conn, version),
        Err(e) if on_read_only_fs(path) => {
            // A database on read-only media (a snapshot, a mounted backup): nobody can write it,
            // so reading it as immutable (without `-shm`) is safe.
            drop(conn);
            let uri = format!(
                "file:{}?immutable=1",
                path.display()
                    .to_string()
                    .replace('%', "%25")
                    .replace('?', "%3f")
                    .replace('#', "%23")
            );
            let conn = Connection::open_with_flags(uri, flags | OpenFlags::SQLITE_OPEN_URI)
                .map_err(|_| e)?;
            let version = check_identity(&conn, path, false)?;
            (conn, version)
        }
        Err(e) => return Err(e),
    };
    if version == 0 {
        // An empty file: just created by a writer that has not committed the schema yet. No op yet.
        return Ok(None);
    }
    if version < SCHEMA_VERSION {
        return Err(Error::Unusable {
            path: path.to_path_buf(),
            reason: format!(
                "its schema (version {version}) is older than this cairn's ({SCHEMA_VERSION}); run any command that writes (e.g. `cairn run`) to upgrade it"
            ),
        });
    }
    Ok(Some(conn))
}

/// Whether the database's directory is on a read-only file system.
fn on_read_only_fs(path: &Path) -> bool {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    nix::unistd::access(dir, nix::unistd::AccessFlags::W_OK) == Err(nix::errno::Errno::EROFS)
}

/// Creates the file (and its directory) private to the user when missing; returns whether it did.
fn create_private(path: &Path) -> Result<bool> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    let unusable = |reason: String| Error::Unusable {
        path: path.to_path_buf(),
        reason,
    };
    if path.is_dir() {
        return Err(unusable("it is a directory".to_owned()));
    }
    if path.exists() {
        return Ok(false);
    }
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| {
                unusable(format!(
                    "cannot create its directory `{}`: {e}",
                    dir.display()
                ))
            })?;
    }
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Ok(file) => {
            file.sync_all()
                .map_err(|e| unusable(format!("cannot create it: {e}")))?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Ok(false),
        Err(e) => return Err(unusable(format!("cannot create it: {e}"))),
    }
    // The new file's name must survive a crash too.
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(true)
}

/// Checks that the file is a cairn database this cairn can use; returns its schema version
/// (0 for a new, empty file).
fn check_identity(conn: &Connection, path: &Path, fresh: bool) -> Result<i32> {
    // One statement, so one snapshot: read separately, the three could straddle the commit of the
    // first migration by another process and contradict each other.
    let (app, version, objects): (i32, i32, i64) = conn
        .query_row(
            "SELECT (SELECT application_id FROM pragma_application_id()), \
                    (SELECT user_version FROM pragma_user_version()), \
                    (SELECT count(*) FROM sqlite_schema)",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .map_err(|e| classify(path, &e))?;
    let unusable = |reason: String| {
        Err(Error::Unusable {
            path: path.to_path_buf(),
            reason,
        })
    };
    if app == 0 && version == 0 && objects == 0 {
        // An empty file: new, or made empty by someone; either way nothing is lost by using it.
        let _ = fresh;
        return Ok(0);
    }
    if app != APPLICATION_ID {
        return unusable("it is a SQLite database, but not a cairn one".to_owned());
    }
    if version > SCHEMA_VERSION {
        return unusable(format!(
            "it was written by a newer cairn (schema version {version}; this cairn knows up to {SCHEMA_VERSION})"
        ));
    }
    Ok(version)
}

fn migrate(conn: &Connection, path: &Path, from: i32) -> Result<()> {
    let err = |e: rusqlite::Error| classify(path, &e);
    conn.execute_batch("BEGIN IMMEDIATE").map_err(err)?;
    let result = (|| {
        // Another process may have migrated while this one waited for the lock.
        let version: i32 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        for (i, sql) in MIGRATIONS
            .iter()
            .enumerate()
            .skip(usize::try_from(version.max(from)).unwrap_or(0))
        {
            let schema: i64 = conn.pragma_query_value(None, "schema_version", |r| r.get(0))?;
            conn.execute_batch(sql)?;
            if sql.contains("writable_schema") {
                // The tables' text was edited in place: a new schema version makes every
                // connection, this one too, read it again.
                conn.pragma_update(None, "schema_version", schema + 1)?;
            }
            conn.pragma_update(
                None,
                "user_version",
                i32::try_from(i + 1).unwrap_or(i32::MAX),
            )?;
        }
        conn.pragma_update(None, "application_id", APPLICATION_ID)?;
        conn.execute_batch("COMMIT")
    })();
    if let Err(e) = result {
        let _ = conn.execute_batch("ROLLBACK");
        return Err(err(e));
    }
    Ok(())
}

/// Appends an event to the op's trail; every change that alters state calls this in its own
/// transaction (invariant 6).
fn event(
    tx: &Transaction<'_>,
    op: OpId,
    at: Millis,
    kind: &str,
    task: Option<&str>,
    message: &str,
) -> rusqlite::Result<()> {
    events(tx, op, at, task, &[(kind, message)])
}

/// Appends several events of one task (or of the op) at one time, in order.
fn events(
    tx: &Transaction<'_>,
    op: OpId,
    at: Millis,
    task: Option<&str>,
    events: &[(&str, &str)],
) -> rusqlite::Result<()> {
    let first: i64 = tx
        .prepare_cached("SELECT COALESCE(MAX(seq), 0) + 1 FROM events WHERE op_id = ?1")?
        .query_row([op.0], |r| r.get(0))?;
    let mut insert = tx.prepare_cached(
        "INSERT INTO events (op_id, seq, at, kind, task, message) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?;
    for (seq, (kind, message)) in (first..).zip(events) {
        insert.execute(params![op.0, seq, at, kind, task, message])?;
    }
    Ok(())
}

/// A failure of one change: either the store's own refusal or SQLite's error.
pub(crate) enum ApplyError {
    Refused(Error),
    Sqlite(rusqlite::Error),
}

impl From<rusqlite::Error> for ApplyError {
    fn from(e: rusqlite::Error) -> Self {
        Self::Sqlite(e)
    }
}

impl From<Error> for ApplyError {
    fn from(e: Error) -> Self {
        Self::Refused(e)
    }
}

type Apply<T> = std::result::Result<T, ApplyError>;

fn owner_of(
    tx: &Transaction<'_>,
    op: OpId,
) -> Apply<(OpStatus, Option<ProcessId>, Option<Millis>)> {
    let row = tx
        .prepare_cached(
            "SELECT status, owner_host, owner_boot, owner_pid, owner_start, lease_until FROM ops INDEXED BY ops_owner WHERE id = ?1",
        )?
        .query_row([op.0], |r| {
            Ok((r.get::<_, String>(0)?, process_at(r, 1)?, r.get::<_, Option<Millis>>(5)?))
        })
        .optional()?;
    let (status, owner, lease) = row.ok_or(Error::NotFound(op))?;
    Ok((
        OpStatus::parse(&status).unwrap_or(OpStatus::Failed),
        owner,
        lease,
    ))
}

/// Refuses a write by a process that no longer owns the op (its lease was taken over): a fenced
/// owner must stop, not overwrite the new owner's progress.
fn fence(tx: &Transaction<'_>, op: OpId, writer: &ProcessId) -> Apply<()> {
    let (_, owner, lease) = owner_of(tx, op)?;
    match owner {
        Some(owner) if &owner == writer => Ok(()),
        Some(owner) => Err(Error::Owned {
            op,
            owner,
            lease_until: lease.unwrap_or(0),
        }
        .into()),
        None => Err(Error::Fenced {
            op,
            writer: writer.to_string(),
        }
        .into()),
    }
}

fn process_at(r: &rusqlite::Row<'_>, first: usize) -> rusqlite::Result<Option<ProcessId>> {
    let host: Option<String> = r.get(first)?;
    let boot: Option<String> = r.get(first + 1)?;
    let pid: Option<i64> = r.get(first + 2)?;
    let start: Option<i64> = r.get(first + 3)?;
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

/// A task's name (`restore[shard-3]`), for events.
fn task_name(tx: &Transaction<'_>, op: OpId, task: TaskNo) -> rusqlite::Result<String> {
    tx.prepare_cached("SELECT name FROM tasks WHERE op_id = ?1 AND task_no = ?2")?
        .query_row(params![op.0, task.0], |r| r.get(0))
}

/// The name of a task that may start a new attempt. The last guard of "a finished step never runs
/// again": the store refuses to start a task that succeeded or was skipped.
fn startable(tx: &Transaction<'_>, op: OpId, task: TaskNo) -> Apply<String> {
    let (status, name): (String, String) = tx
        .prepare_cached("SELECT status, name FROM tasks WHERE op_id = ?1 AND task_no = ?2")?
        .query_row(params![op.0, task.0], |r| Ok((r.get(0)?, r.get(1)?)))?;
    if TaskStatus::parse(&status).is_some_and(TaskStatus::is_kept) {
        return Err(Error::Conflict {
            op,
            status: OpStatus::Running,
            reason: format!("task `{name}` is {status} and must not run again"),
        }
        .into());
    }
    Ok(name)
}

/// The task's `outputs` (as JSON) and `ended_at` for an attempt's outcome at `at`: a task left
/// pending (to be retried) has not ended.
fn outcome_columns(outcome: &Outcome, at: Millis) -> (Option<String>, Option<Millis>) {
    let outputs = outcome
        .outputs
        .as_ref()
        .map(|o| serde_json::Value::Object(o.clone()).to_string());
    let ended = (outcome.task != TaskStatus::Pending).then_some(at);
    (outputs, ended)
}

/// The event that says how attempt `n` ended: its kind and message.
fn attempt_end(n: u32, outcome: &Outcome) -> (&'static str, String) {
    let mut message = format!("attempt {n} {}", outcome.attempt);
    if outcome.by_check {
        message.push_str(" by check: already done, the step did not run");
    }
    if let Some(code) = outcome.exit_code {
        write!(message, ", exit code {code}").ok();
    }
    if let Some(error) = &outcome.error {
        write!(message, ": {error}").ok();
    }
    let kind = match outcome.attempt {
        AttemptStatus::Succeeded => "task-succeeded",
        AttemptStatus::Failed => "task-failed",
        AttemptStatus::Interrupted => "task-interrupted",
        AttemptStatus::Canceled => "task-canceled",
        AttemptStatus::Running => "task-running",
    };
    (kind, message)
}

/// Stores new tasks of an op; ones that exist are left as they are.
fn insert_tasks(tx: &Transaction<'_>, op: OpId, tasks: &[NewTask]) -> rusqlite::Result<()> {
    let mut insert = tx.prepare_cached(
        "INSERT OR IGNORE INTO tasks (op_id, task_no, step, name, item, status) VALUES (?1, ?2, ?3, ?4, ?5, 'pending')",
    )?;
    for t in tasks {
        insert.execute(params![
            op.0,
            t.task_no.0,
            t.step,
            t.name,
            t.item.as_ref().map(ToString::to_string)
        ])?;
    }
    Ok(())
}

/// Stores a plan snapshot (content-addressed: an equal one is reused); its row id.
fn store_snapshot(tx: &Transaction<'_>, snapshot: &Snapshot) -> rusqlite::Result<i64> {
    let files: serde_json::Map<String, serde_json::Value> = snapshot
        .files
        .iter()
        .map(|(path, text)| (path.clone(), serde_json::Value::String(text.clone())))
        .collect();
    let files = serde_json::Value::Object(files).to_string();
    tx.prepare_cached(
        "INSERT INTO plan_snapshots (hash, name, text, files) VALUES (?1, ?2, ?3, ?4) ON CONFLICT (hash) DO NOTHING",
    )?
    .execute(params![snapshot.hash, snapshot.name, snapshot.text, files])?;
    tx.prepare_cached("SELECT id FROM plan_snapshots WHERE hash = ?1")?
        .query_row([&snapshot.hash], |r| r.get(0))
}

#[allow(clippy::cast_possible_wrap)]
fn submit(tx: &Transaction<'_>, new: &NewOp) -> Apply<Applied> {
    let snapshot_id = store_snapshot(tx, &new.snapshot)?;
    let id: i64 = tx
        .prepare_cached(
            "INSERT INTO ops (uuid, plan, snapshot_id, title, status, params, workdir, env, created_at, lock_key, cooldown_ms, \
             parent_id, parent_task) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13) RETURNING id",
        )?
        .query_row(
            params![
                new.uuid,
                new.snapshot.name,
                snapshot_id,
                new.title,
                new.status.as_str(),
                new.params.to_string(),
                new.workdir,
                serde_json::Value::Object(new.env.clone()).to_string(),
                new.at,
                new.lock,
                new.cooldown_ms,
                new.parent.map(|(op, _)| op.0),
                new.parent.map(|(_, task)| task.0)
            ],
            |r| r.get(0),
        )?;
    insert_tasks(tx, OpId(id), &new.tasks)?;
    if let Some((name, due)) = &new.fired_by {
        // Compare-and-set: a firing is submitted once, whoever else tries it.
        let fired = tx
            .prepare_cached(
                "UPDATE schedules SET last_fire = ?2, last_op = ?3, note = ?4 \
                 WHERE name = ?1 AND (last_fire IS NULL OR last_fire < ?2)",
            )?
            .execute(params![name, due, id, format!("fired: op {id}")])?;
        if fired == 0 {
            return Err(Error::Conflict {
                op: OpId(id),
                status: OpStatus::Queued,
                reason: format!("schedule `{name}` already fired for this time"),
            }
            .into());
        }
    }
    event(
        tx,
        OpId(id),
        new.at,
        "submitted",
        None,
        &format!(
            "plan `{}` ({}), {} tasks",
            new.snapshot.name,
            new.snapshot.hash,
            new.tasks.len()
        ),
    )?;
    if let Some((parent, task)) = new.parent {
        // The parent's task says which op runs its sub-plan, in the same transaction.
        let name = task_name(tx, parent, task)?;
        event(
            tx,
            parent,
            new.at,
            "task-child",
            Some(&name),
            &format!("runs plan `{}` as op {id}", new.snapshot.name),
        )?;
        tx.prepare_cached("UPDATE ops SET current_task = ?2 WHERE id = ?1")?
            .execute(params![parent.0, format!("{name} → op {id}")])?;
    }
    if let Some((owner, lease_until)) = new.owner.as_ref().filter(|_| !new.start) {
        tx.prepare_cached(
            "UPDATE ops SET owner_host = ?2, owner_boot = ?3, owner_pid = ?4, owner_start = ?5, lease_until = ?6 WHERE id = ?1",
        )?
        .execute(params![id, owner.host, owner.boot_id, owner.pid, owner.start as i64, lease_until])?;
    }
    if let Some((owner, lease_until)) = new.owner.as_ref().filter(|_| new.start) {
        // Started at once: its lock is taken now, or nothing is stored.
        take_lock(tx, OpId(id), new.at, new.ignore_cooldown)?;
        tx.prepare_cached(
            "UPDATE ops SET owner_host = ?2, owner_boot = ?3, owner_pid = ?4, owner_start = ?5, lease_until = ?6, \
             status = 'running', started_at = ?7 WHERE id = ?1",
        )?
        .execute(params![id, owner.host, owner.boot_id, owner.pid, owner.start as i64, lease_until, new.at])?;
        event(
            tx,
            OpId(id),
            new.at,
            "started",
            None,
            &format!("started by {owner}"),
        )?;
    }
    Ok(Applied::Submitted {
        id: OpId(id),
        uuid: new.uuid.clone(),
    })
}

#[allow(clippy::cast_possible_wrap)]
#[expect(
    clippy::too_many_lines,
    reason = "to be split by concern by the re-layering of the store (issue 17)"
)]
/// Applies one change. `fenced`: the transaction already proved, for an earlier change with no
/// effect on ownership, that this change's writer owns its op (see [`Change::attempt_fence`]): an
/// attempt's change skips its own fence read then.
pub(crate) fn apply(tx: &Transaction<'_>, change: &Change, fenced: bool) -> Apply<Applied> {
    match change {
        Change::Submit(new) => return submit(tx, new),
        Change::Claim {
            op,
            owner,
            lease_until,
            dead_owner,
            now,
            queued,
            reopen,
            kind,
            message,
        } => {
            let (status, current, lease) = owner_of(tx, *op)?;
            if status.is_final() && !(*reopen && status == OpStatus::Succeeded) {
                return Err(Error::Conflict {
                    op: *op,
                    status,
                    reason: "it cannot run again".to_owned(),
                }
                .into());
            }
            if let Some(current) = current {
                let expired = lease.is_some_and(|l| l < *now);
                let known_dead = dead_owner.as_ref() == Some(&current);
                if &current != owner && !expired && !known_dead {
                    return Err(Error::Owned {
                        op: *op,
                        owner: current,
                        lease_until: lease.unwrap_or(0),
                    }
                    .into());
                }
            }
            if *queued {
                tx.prepare_cached(
                    "UPDATE ops SET owner_host = ?2, owner_boot = ?3, owner_pid = ?4, owner_start = ?5, lease_until = ?6 WHERE id = ?1",
                )?
                .execute(params![op.0, owner.host, owner.boot_id, owner.pid, owner.start as i64, lease_until])?;
            } else {
                tx.prepare_cached(
                    "UPDATE ops SET owner_host = ?2, owner_boot = ?3, owner_pid = ?4, owner_start = ?5, lease_until = ?6, \
                     status = 'running', started_at = COALESCE(started_at, ?7), ended_at = NULL, error = NULL WHERE id = ?1",
                )?
                .execute(params![op.0, owner.host, owner.boot_id, owner.pid, owner.start as i64, lease_until, now])?;
                event(tx, *op, *now, kind, None, message)?;
            }
        }
        Change::Heartbeat {
            op,
            owner,
            lease_until,
        } => {
            fence(tx, *op, owner)?;
            tx.prepare_cached("UPDATE ops SET lease_until = ?2 WHERE id = ?1")?
                .execute(params![op.0, lease_until])?;
        }
        Change::StartAttempt {
            op,
            owner,
            task,
            n,
            retry_from,
            at,
        } => {
            if !fenced {
                fence(tx, *op, owner)?;
            }
            let name = startable(tx, *op, *task)?;
            tx.prepare_cached(
                "INSERT INTO attempts (op_id, task_no, n, status, started_at) VALUES (?1, ?2, ?3, 'running', ?4)",
            )?
            .execute(params![op.0, task.0, n, at])?;
            tx.prepare_cached(
                "UPDATE tasks SET status = 'running', attempts = ?3, retry_from = ?5, started_at = COALESCE(started_at, ?4), \
                 ended_at = NULL, exit_code = NULL, error = NULL WHERE op_id = ?1 AND task_no = ?2",
            )?
            .execute(params![op.0, task.0, n, at, retry_from])?;
            event(
                tx,
                *op,
                *at,
                "task-started",
                Some(&name),
                &format!("attempt {n}"),
            )?;
        }
        Change::AttemptProcess {
            op,
            owner,
            task,
            n,
            process,
            pgid,
        } => {
            if !fenced {
                fence(tx, *op, owner)?;
            }
            tx.prepare_cached(
                "UPDATE attempts SET host = ?4, boot_id = ?5, pid = ?6, pgid = ?7, proc_start = ?8 \
                 WHERE op_id = ?1 AND task_no = ?2 AND n = ?3",
            )?
            .execute(params![
                op.0,
                task.0,
                n,
                process.host,
                process.boot_id,
                process.pid,
                pgid,
                process.start as i64
            ])?;
        }
        Change::FinishAttempt {
            op,
            owner,
            task,
            n,
            at,
            outcome,
        } => {
            if !fenced {
                fence(tx, *op, owner)?;
            }
            tx.prepare_cached(
                "UPDATE attempts SET status = ?4, ended_at = ?5, exit_code = ?6, error = ?7 \
                 WHERE op_id = ?1 AND task_no = ?2 AND n = ?3",
            )?
            .execute(params![
                op.0,
                task.0,
                n,
                outcome.attempt.as_str(),
                at,
                outcome.exit_code,
                outcome.error
            ])?;
            let (outputs, ended) = outcome_columns(outcome, *at);
            // A task resolved by hand (`cairn mark`) while an attempt of it was in doubt keeps what
            // the person said; only the attempt's own end is recorded.
            let (current, name): (String, String) = tx
                .prepare_cached("SELECT status, name FROM tasks WHERE op_id = ?1 AND task_no = ?2")?
                .query_row(params![op.0, task.0], |r| Ok((r.get(0)?, r.get(1)?)))?;
            if TaskStatus::parse(&current).is_some_and(TaskStatus::is_kept)
                && outcome.task != TaskStatus::Succeeded
            {
                event(
                    tx,
                    *op,
                    *at,
                    "attempt-ended",
                    Some(&name),
                    &format!("attempt {n} {}; the task stays {current}", outcome.attempt),
                )?;
                return Ok(Applied::Done);
            }
            // No `RETURNING name`: SQLite gathers returned rows in a temporary table, and the
            // name was just read.
            tx.prepare_cached(
                "UPDATE tasks SET status = ?3, ended_at = ?4, exit_code = ?5, error = ?6, \
                 outputs = COALESCE(?7, outputs), by_check = ?8 WHERE op_id = ?1 AND task_no = ?2",
            )?
            .execute(params![
                op.0,
                task.0,
                outcome.task.as_str(),
                ended,
                outcome.exit_code,
                outcome.error,
                outputs,
                outcome.by_check
            ])?;
            let (kind, message) = attempt_end(*n, outcome);
            event(tx, *op, *at, kind, Some(&name), &message)?;
        }
        Change::WholeAttempt {
            op,
            owner,
            task,
            n,
            retry_from,
            at,
            outcome,
        } => {
            // StartAttempt and FinishAttempt in one: an attempt row that is final when written,
            // one update of the task, both events.
            if !fenced {
                fence(tx, *op, owner)?;
            }
            let name = startable(tx, *op, *task)?;
            tx.prepare_cached(
                "INSERT INTO attempts (op_id, task_no, n, status, started_at, ended_at, exit_code, error) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?5, ?6, ?7)",
            )?
            .execute(params![
                op.0,
                task.0,
                n,
                outcome.attempt.as_str(),
                at,
                outcome.exit_code,
                outcome.error
            ])?;
            let (outputs, ended) = outcome_columns(outcome, *at);
            tx.prepare_cached(
                "UPDATE tasks SET status = ?3, attempts = ?4, retry_from = ?5, started_at = COALESCE(started_at, ?6), \
                 ended_at = ?7, exit_code = ?8, error = ?9, outputs = COALESCE(?10, outputs), by_check = ?11 \
                 WHERE op_id = ?1 AND task_no = ?2",
            )?
            .execute(params![
                op.0,
                task.0,
                outcome.task.as_str(),
                n,
                retry_from,
                at,
                ended,
                outcome.exit_code,
                outcome.error,
                outputs,
                outcome.by_check
            ])?;
            let started = format!("attempt {n}");
            let (kind, message) = attempt_end(*n, outcome);
            events(
                tx,
                *op,
                *at,
                Some(&name),
                &[("task-started", &started), (kind, &message)],
            )?;
        }
        Change::SetTask {
            op,
            owner,
            task,
            status,
            at,
            message,
        } => {
            fence(tx, *op, owner)?;
            if *status == TaskStatus::Waiting {
                // A gate (again) waits for its answer; one answered meanwhile keeps the answer.
                let current: String = tx
                    .prepare_cached("SELECT status FROM tasks WHERE op_id = ?1 AND task_no = ?2")?
                    .query_row(params![op.0, task.0], |r| r.get(0))?;
                if TaskStatus::parse(&current).is_some_and(TaskStatus::is_kept) {
                    return Ok(Applied::Done);
                }
                tx.prepare_cached(
                    "UPDATE tasks SET outputs = NULL, error = NULL, ended_at = NULL WHERE op_id = ?1 AND task_no = ?2",
                )?
                .execute(params![op.0, task.0])?;
            }
            let ended = matches!(
                status,
                TaskStatus::Succeeded
                    | TaskStatus::Failed
                    | TaskStatus::Skipped
                    | TaskStatus::Canceled
            )
            .then_some(*at);
            let name: String = tx
                .prepare_cached(
                    "UPDATE tasks SET status = ?3, ended_at = COALESCE(?4, ended_at) WHERE op_id = ?1 AND task_no = ?2 RETURNING name",
                )?
                .query_row(params![op.0, task.0, status.as_str(), ended], |r| r.get(0))?;
            event(
                tx,
                *op,
                *at,
                &format!("task-{status}"),
                Some(&name),
                message,
            )?;
        }
        Change::Log {
            op,
            task,
            attempt,
            stream,
            at,
            data,
            limit,
        } => {
            tx.prepare_cached(
                "INSERT INTO logs (op_id, task_no, attempt, seq, stream, at, data) VALUES (?1, ?2, ?3, \
                 (SELECT COALESCE(MAX(seq), 0) + 1 FROM logs WHERE op_id = ?1 AND task_no = ?2 AND attempt = ?3), ?4, ?5, ?6)",
            )?
            .execute(params![op.0, task.0, attempt, stream, at, tail(data, *limit)])?;
            // Keep the tail: drop the oldest chunks while the attempt's log is over its limit.
            let limit = i64::try_from(*limit).unwrap_or(i64::MAX);
            loop {
                let total: i64 = tx
                    .prepare_cached(
                        "SELECT COALESCE(SUM(length(data)), 0) FROM logs WHERE op_id = ?1 AND task_no = ?2 AND attempt = ?3",
                    )?
                    .query_row(params![op.0, task.0, attempt], |r| r.get(0))?;
                if total <= limit {
                    break;
                }
                let removed = tx
                    .prepare_cached(
                        "DELETE FROM logs WHERE op_id = ?1 AND task_no = ?2 AND attempt = ?3 AND seq = \
                         (SELECT MIN(seq) FROM logs WHERE op_id = ?1 AND task_no = ?2 AND attempt = ?3) \
                         AND (SELECT count(*) FROM logs WHERE op_id = ?1 AND task_no = ?2 AND attempt = ?3) > 1",
                    )?
                    .execute(params![op.0, task.0, attempt])?;
                if removed == 0 {
                    break;
                }
            }
        }
        Change::SetOp {
            op,
            owner,
            status,
            at,
            error,
            release,
            kind,
            message,
        } => {
            if let Some(owner) = owner {
                fence(tx, *op, owner)?;
            }
            let ended = status.is_ended().then_some(*at);
            tx.prepare_cached(
                "UPDATE ops SET status = ?2, error = ?3, ended_at = ?4, \
                 current_task = CASE WHEN ?4 IS NULL THEN current_task ELSE NULL END, \
                 ending = CASE WHEN ?2 IN ('succeeded', 'failed', 'canceled') THEN NULL ELSE ending END, \
                 owner_host = CASE WHEN ?5 THEN NULL ELSE owner_host END, \
                 owner_boot = CASE WHEN ?5 THEN NULL ELSE owner_boot END, \
                 owner_pid = CASE WHEN ?5 THEN NULL ELSE owner_pid END, \
                 owner_start = CASE WHEN ?5 THEN NULL ELSE owner_start END, \
                 lease_until = CASE WHEN ?5 THEN NULL ELSE lease_until END WHERE id = ?1",
            )?
            .execute(params![op.0, status.as_str(), error, ended, release])?;
            event(tx, *op, *at, kind, None, message)?;
            if matches!(status, OpStatus::Succeeded | OpStatus::Canceled) {
                release_lock(tx, *op, *at)?;
            }
        }
        Change::Mark {
            op,
            task,
            status,
            outputs,
            dead_owner,
            request,
        } => {
            let (_, owner, lease) = owner_of(tx, *op)?;
            if let Some(owner) = owner.filter(|o| Some(o) != dead_owner.as_ref()) {
                return Err(Error::Owned {
                    op: *op,
                    owner,
                    lease_until: lease.unwrap_or(0),
                }
                .into());
            }
            let why = request
                .reason
                .as_ref()
                .map_or(String::new(), |r| format!(": {r}"));
            let shown: Vec<String> = outputs
                .iter()
                .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
                .collect();
            let name: String = tx
                .prepare_cached(
                    "UPDATE tasks SET status = ?3, outputs = ?4, ended_at = ?5, error = NULL, exit_code = NULL, by_check = 0 \
                     WHERE op_id = ?1 AND task_no = ?2 RETURNING name",
                )?
                .query_row(
                    params![op.0, task.0, status.as_str(), serde_json::Value::Object(outputs.clone()).to_string(), request.at],
                    |r| r.get(0),
                )
                .optional()?
                .ok_or(Error::NotFound(*op))?;
            let mut message = format!("marked {status} by hand by {}{why}", request.by);
            if !shown.is_empty() {
                write!(message, "; outputs {}", shown.join(" ")).ok();
            }
            event(tx, *op, request.at, "task-marked", Some(&name), &message)?;
        }
        Change::ResetTasks {
            op,
            owner,
            tasks,
            at,
            message,
        } => {
            fence(tx, *op, owner)?;
            let mut reset = tx.prepare_cached(
                "UPDATE tasks SET status = 'pending', outputs = NULL, ended_at = NULL, error = NULL, exit_code = NULL, \
                 by_check = 0, retry_from = attempts WHERE op_id = ?1 AND task_no = ?2",
            )?;
            // A fan-out step's list is expanded again, and a sub-plan step's child op stays as
            // history while a new one runs.
            let mut unfreeze = tx.prepare_cached(
                "UPDATE tasks SET item = NULL WHERE op_id = ?1 AND task_no = ?2 AND name = step",
            )?;
            let mut detach = tx.prepare_cached(
                "UPDATE ops SET parent_task = NULL WHERE parent_id = ?1 AND parent_task = ?2",
            )?;
            for task in tasks {
                reset.execute(params![op.0, task.0])?;
                unfreeze.execute(params![op.0, task.0])?;
                detach.execute(params![op.0, task.0])?;
            }
            tx.prepare_cached("UPDATE ops SET ending = NULL WHERE id = ?1")?
                .execute([op.0])?;
            event(tx, *op, *at, "rerun", None, message)?;
        }
        Change::CancelUnstarted {
            op,
            dead_owner,
            request,
        } => {
            let (status, owner, _) = owner_of(tx, *op)?;
            let started: Option<Millis> = tx
                .prepare_cached("SELECT started_at FROM ops WHERE id = ?1")?
                .query_row([op.0], |r| r.get(0))?;
            let unowned = owner.is_none() || owner == *dead_owner;
            if status.is_final() || started.is_some() || !unowned {
                return Err(Error::Conflict {
                    op: *op,
                    status,
                    reason: "it has started, or has an owner".to_owned(),
                }
                .into());
            }
            let why = request
                .reason
                .as_ref()
                .map_or(String::new(), |r| format!(": {r}"));
            let error = format!("canceled by {}{why}", request.by);
            tx.prepare_cached(
                "UPDATE ops SET status = 'canceled', error = ?2, ended_at = ?3, current_task = NULL, owner_host = NULL, \
                 owner_boot = NULL, owner_pid = NULL, owner_start = NULL, lease_until = NULL WHERE id = ?1",
            )?
            .execute(params![op.0, error, request.at])?;
            event(
                tx,
                *op,
                request.at,
                "op-canceled",
                None,
                &format!("op canceled before it started: {error}"),
            )?;
        }
        Change::SetEnding { op, owner, ending } => {
            fence(tx, *op, owner)?;
            tx.prepare_cached("UPDATE ops SET ending = ?2 WHERE id = ?1")?
                .execute(params![op.0, ending.to_string()])?;
            let status = ending["status"].as_str().unwrap_or("?");
            event(
                tx,
                *op,
                now_of(ending),
                "op-finishing",
                None,
                &format!("the op {status}; its finishing hooks run"),
            )?;
        }
        Change::TakeLock {
            op,
            at,
            ignore_cooldown,
        } => take_lock(tx, *op, *at, *ignore_cooldown)?,
        Change::RequestCancel { op, request } => {
            let (status, _, _) = owner_of(tx, *op)?;
            if status.is_final() {
                return Err(Error::Conflict {
                    op: *op,
                    status,
                    reason: "it has ended; there is nothing to cancel".into(),
                }
                .into());
            }
            tx.prepare_cached(
                "UPDATE ops SET cancel_requested_at = COALESCE(cancel_requested_at, ?2), cancel_by = COALESCE(cancel_by, ?3), \
                 cancel_reason = COALESCE(cancel_reason, ?4) WHERE id = ?1",
            )?
            .execute(params![op.0, request.at, request.by, request.reason])?;
            let why = request
                .reason
                .as_ref()
                .map_or(String::new(), |r| format!(": {r}"));
            event(
                tx,
                *op,
                request.at,
                "cancel-requested",
                None,
                &format!("cancel requested by {}{why}", request.by),
            )?;
        }
        Change::Approve {
            op,
            task,
            approve,
            request,
        } => {
            let (status, name): (String, String) = tx
                .prepare_cached("SELECT status, name FROM tasks WHERE op_id = ?1 AND task_no = ?2")?
                .query_row(params![op.0, task.0], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()?
                .ok_or(Error::NotFound(*op))?;
            if status != "waiting" {
                return Err(Error::Conflict {
                    op: *op,
                    status: owner_of(tx, *op)?.0,
                    reason: format!("task `{name}` is {status}, not waiting for an answer"),
                }
                .into());
            }
            let why = request
                .reason
                .as_ref()
                .map_or(String::new(), |r| format!(": {r}"));
            let (new_status, kind, error) = if *approve {
                ("succeeded", "approved", None)
            } else {
                (
                    "failed",
                    "rejected",
                    Some(format!("rejected by {}{why}", request.by)),
                )
            };
            tx.prepare_cached(
                "UPDATE tasks SET status = ?3, ended_at = ?4, error = ?5, outputs = ?6 WHERE op_id = ?1 AND task_no = ?2",
            )?
            .execute(params![
                op.0,
                task.0,
                new_status,
                request.at,
                error,
                serde_json::json!({"by": request.by, "comment": request.reason.clone().unwrap_or_default()}).to_string()
            ])?;
            event(
                tx,
                *op,
                request.at,
                kind,
                Some(&name),
                &format!("{kind} by {}{why}", request.by),
            )?;
        }
        Change::Expand {
            op,
            owner,
            task,
            items,
            tasks,
            at,
        } => {
            fence(tx, *op, owner)?;
            // The list is frozen once: a step expanded before keeps its items.
            let frozen: Option<Option<String>> = tx
                .prepare_cached("SELECT item FROM tasks WHERE op_id = ?1 AND task_no = ?2")?
                .query_row(params![op.0, task.0], |r| r.get(0))
                .optional()?;
            let Some(None) = frozen else {
                return Err(Error::Conflict {
                    op: *op,
                    status: OpStatus::Running,
                    reason: format!("task {} was already expanded into its items", task.0),
                }
                .into());
            };
            let list = serde_json::Value::Array(items.clone()).to_string();
            let name: String = tx
                .prepare_cached(
                    "UPDATE tasks SET item = ?3, status = 'running', started_at = COALESCE(started_at, ?4) \
                     WHERE op_id = ?1 AND task_no = ?2 RETURNING name",
                )?
                .query_row(params![op.0, task.0, list, at], |r| r.get(0))?;
            // Items of an earlier expansion keep their task when their name comes again (reset
            // to pending by the rerun); the others stay as history, no longer items.
            // An item of an expansion before the last (no longer linked: `item` NULL) that comes
            // back runs again, with a fresh retry round.
            let mut upsert = tx.prepare_cached(
                "INSERT INTO tasks (op_id, task_no, step, name, item, status) VALUES (?1, ?2, ?3, ?4, ?5, 'pending') \
                 ON CONFLICT (op_id, task_no) DO UPDATE SET item = excluded.item, \
                 status = CASE WHEN item IS NULL THEN 'pending' ELSE status END, \
                 outputs = CASE WHEN item IS NULL THEN NULL ELSE outputs END, \
                 error = CASE WHEN item IS NULL THEN NULL ELSE error END, \
                 ended_at = CASE WHEN item IS NULL THEN NULL ELSE ended_at END, \
                 retry_from = CASE WHEN item IS NULL THEN attempts ELSE retry_from END",
            )?;
            for t in tasks {
                upsert.execute(params![
                    op.0,
                    t.task_no.0,
                    t.step,
                    t.name,
                    t.item.as_ref().map(ToString::to_string)
                ])?;
            }
            let numbers = serde_json::Value::Array(
                tasks
                    .iter()
                    .map(|t| serde_json::Value::from(t.task_no.0))
                    .collect(),
            )
            .to_string();
            tx.prepare_cached(
                "UPDATE tasks SET item = NULL, \
                 status = CASE WHEN status = 'pending' THEN 'skipped' ELSE status END, \
                 error = CASE WHEN status = 'pending' THEN 'no longer in the fan-out list' ELSE error END \
                 WHERE op_id = ?1 AND step = (SELECT step FROM tasks WHERE op_id = ?1 AND task_no = ?2) \
                 AND name != step AND item IS NOT NULL AND task_no NOT IN (SELECT value FROM json_each(?3))",
            )?
            .execute(params![op.0, task.0, numbers])?;
            let shown: Vec<&str> = tasks.iter().take(10).map(|t| t.name.as_str()).collect();
            let more = if tasks.len() > shown.len() {
                ", ..."
            } else {
                ""
            };
            event(
                tx,
                *op,
                *at,
                "task-expanded",
                Some(&name),
                &format!(
                    "{} item{}: {}{more}",
                    tasks.len(),
                    if tasks.len() == 1 { "" } else { "s" },
                    shown.join(", ")
                ),
            )?;
        }
        Change::Gather {
            op,
            owner,
            task,
            status,
            outputs,
            error,
            at,
        } => {
            fence(tx, *op, owner)?;
            let ended = (*status != TaskStatus::Pending).then_some(*at);
            let name: String = tx
                .prepare_cached(
                    "UPDATE tasks SET status = ?3, ended_at = ?4, error = ?5, outputs = ?6 \
                     WHERE op_id = ?1 AND task_no = ?2 RETURNING name",
                )?
                .query_row(
                    params![
                        op.0,
                        task.0,
                        status.as_str(),
                        ended,
                        error,
                        outputs
                            .as_ref()
                            .map(|o| serde_json::Value::Object(o.clone()).to_string())
                    ],
                    |r| r.get(0),
                )?;
            let message = match error {
                Some(e) => format!("{status}: {e}"),
                None => format!("{status}: every item is done"),
            };
            event(
                tx,
                *op,
                *at,
                &format!("task-{status}"),
                Some(&name),
                &message,
            )?;
        }
        Change::AddSchedule(new) => {
            let added = tx
                .prepare_cached(
                    "INSERT INTO schedules (name, plan, params, cron, timezone, catch_up, created_at) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) ON CONFLICT (name) DO NOTHING",
                )?
                .execute(params![
                    new.name,
                    new.plan,
                    serde_json::Value::Object(new.params.clone()).to_string(),
                    new.cron,
                    new.timezone,
                    new.catch_up,
                    new.created_at
                ])?;
            if added == 0 {
                return Err(Error::Schedule(format!(
                    "a schedule `{}` exists; remove it first",
                    new.name
                ))
                .into());
            }
        }
        Change::RemoveSchedule { name } => {
            let removed = tx
                .prepare_cached("DELETE FROM schedules WHERE name = ?1")?
                .execute([name])?;
            if removed == 0 {
                return Err(Error::Schedule(format!("no schedule `{name}`")).into());
            }
        }
        Change::PauseSchedule { name, paused } => {
            let changed = tx
                .prepare_cached("UPDATE schedules SET paused = ?2 WHERE name = ?1")?
                .execute(params![name, paused])?;
            if changed == 0 {
                return Err(Error::Schedule(format!("no schedule `{name}`")).into());
            }
        }
        Change::ScheduleNote { name, due, note } => {
            // A firing handled without an op (skipped, or the plan could not be read).
            tx.prepare_cached(
                "UPDATE schedules SET last_fire = ?2, note = ?3 \
                 WHERE name = ?1 AND (last_fire IS NULL OR last_fire < ?2)",
            )?
            .execute(params![name, due, note])?;
        }
        Change::AddTasks { op, owner, tasks } => {
            fence(tx, *op, owner)?;
            insert_tasks(tx, *op, tasks)?;
        }
        Change::DetachChild {
            op,
            owner,
            task,
            at,
            message,
        } => {
            fence(tx, *op, owner)?;
            tx.prepare_cached(
                "UPDATE ops SET parent_task = NULL WHERE parent_id = ?1 AND parent_task = ?2",
            )?
            .execute(params![op.0, task.0])?;
            let name = task_name(tx, *op, *task)?;
            event(tx, *op, *at, "task-child", Some(&name), message)?;
        }
        Change::Replan {
            op,
            owner,
            snapshot,
            renumber,
            tasks,
            params: op_params,
            env,
            at,
            message,
        } => {
            const AWAY: i64 = 1 << 40;
            fence(tx, *op, owner)?;
            // The outcome is decided again, by the new plan's tasks.
            tx.prepare_cached("UPDATE ops SET params = ?2, env = ?3, ending = NULL WHERE id = ?1")?
                .execute(params![
                    op.0,
                    op_params.to_string(),
                    serde_json::Value::Object(env.clone()).to_string()
                ])?;
            let old: String = tx
                .prepare_cached(
                    "SELECT s.hash FROM ops o JOIN plan_snapshots s ON s.id = o.snapshot_id WHERE o.id = ?1",
                )?
                .query_row([op.0], |r| r.get(0))?;
            let snapshot_id = store_snapshot(tx, snapshot)?;
            tx.prepare_cached("UPDATE ops SET snapshot_id = ?2 WHERE id = ?1")?
                .execute(params![op.0, snapshot_id])?;
            // Attempts and logs follow their task; the keys are checked at commit.
            tx.pragma_update(None, "defer_foreign_keys", "ON")?;
            // Tasks, and what names a task by number: attempts, logs, child ops.
            for (table, of, no) in [
                ("tasks", "op_id", "task_no"),
                ("attempts", "op_id", "task_no"),
                ("logs", "op_id", "task_no"),
                ("ops", "parent_id", "parent_task"),
            ] {
                tx.execute(
                    &format!("UPDATE {table} SET {no} = {no} + ?2 WHERE {of} = ?1"),
                    params![op.0, AWAY],
                )?;
                let mut back = tx.prepare(&format!(
                    "UPDATE {table} SET {no} = ?3 WHERE {of} = ?1 AND {no} = ?2"
                ))?;
                for (from, to) in renumber {
                    back.execute(params![op.0, i64::from(from.0) + AWAY, to.0])?;
                }
                let left: i64 = tx.query_row(
                    &format!("SELECT count(*) FROM {table} WHERE {of} = ?1 AND {no} >= ?2"),
                    params![op.0, AWAY],
                    |r| r.get(0),
                )?;
                if left > 0 {
                    return Err(Error::Conflict {
                        op: *op,
                        status: OpStatus::Running,
                        reason: format!(
                            "{left} rows of {table} were not renumbered to the new plan"
                        ),
                    }
                    .into());
                }
            }
            // Checked at this transaction's commit; the requests after it in the same group
            // commit check theirs at once again.
            tx.pragma_update(None, "defer_foreign_keys", "OFF")?;
            insert_tasks(tx, *op, tasks)?;
            event(
                tx,
                *op,
                *at,
                "plan-changed",
                None,
                &format!("{message}; plan {old} replaced by {}", snapshot.hash),
            )?;
        }
        Change::Ack { key, request } => {
            let op: Option<i64> = tx
                .prepare_cached("UPDATE cooldowns SET acked_by = ?2, acked_at = ?3 WHERE key = ?1 RETURNING op_id")?
                .query_row(params![key, request.by, request.at], |r| r.get(0))
                .optional()?;
            let Some(op) = op else {
                return Err(Error::NoCooldown { key: key.clone() }.into());
            };
            let why = request
                .reason
                .as_ref()
                .map_or(String::new(), |r| format!(": {r}"));
            event(
                tx,
                OpId(op),
                request.at,
                "cooldown-acked",
                None,
                &format!("cooldown of `{key}` acknowledged by {}{why}", request.by),
            )?;
        }
        Change::Pause { request } => {
            let value = serde_json::to_string(request).unwrap_or_default();
            tx.prepare_cached(
                "INSERT OR REPLACE INTO settings (key, value) VALUES ('paused', ?1)",
            )?
            .execute([value])?;
        }
        Change::Unpause => {
            tx.prepare_cached("DELETE FROM settings WHERE key = 'paused'")?
                .execute([])?;
        }
        Change::CurrentTask { op, text } => {
            tx.prepare_cached("UPDATE ops SET current_task = ?2 WHERE id = ?1")?
                .execute(params![op.0, text])?;
        }
        Change::Event {
            op,
            at,
            kind,
            task,
            message,
        } => {
            event(tx, *op, *at, kind, task.as_deref(), message)?;
        }
    }
    Ok(Applied::Done)
}

/// The time a JSON change carries in `at`, or 0.
fn now_of(value: &serde_json::Value) -> Millis {
    value["at"].as_i64().unwrap_or(0)
}

/// Takes the op's lock key, unless another op holds it or it cools down.
fn take_lock(tx: &Transaction<'_>, op: OpId, at: Millis, ignore_cooldown: bool) -> Apply<()> {
    let key: Option<String> = tx
        .prepare_cached("SELECT lock_key FROM ops WHERE id = ?1")?
        .query_row([op.0], |r| r.get(0))
        .optional()?
        .ok_or(Error::NotFound(op))?;
    let Some(key) = key else { return Ok(()) };
    let holder: Option<i64> = tx
        .prepare_cached("SELECT op_id FROM locks WHERE key = ?1")?
        .query_row([&key], |r| r.get(0))
        .optional()?;
    match holder {
        Some(h) if h == op.0 => return Ok(()),
        Some(h) => {
            return Err(Error::LockHeld {
                key,
                holder: OpId(h),
            }
            .into());
        }
        None => {}
    }
    let cooling: Option<(i64, i64)> = tx
        .prepare_cached(
            "SELECT op_id, until FROM cooldowns WHERE key = ?1 AND until > ?2 AND acked_at IS NULL",
        )?
        .query_row(params![key, at], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    if let Some((after, until)) = cooling {
        if !ignore_cooldown {
            return Err(Error::CoolingDown {
                key,
                after: OpId(after),
                until,
            }
            .into());
        }
        event(
            tx,
            op,
            at,
            "cooldown-ignored",
            None,
            &format!(
                "started despite the cooldown of `{key}` after op {after} (--ignore-cooldown)"
            ),
        )?;
    }
    tx.prepare_cached("INSERT INTO locks (key, op_id, since) VALUES (?1, ?2, ?3)")?
        .execute(params![key, op.0, at])?;
    tx.prepare_cached("DELETE FROM cooldowns WHERE key = ?1")?
        .execute([&key])?;
    event(
        tx,
        op,
        at,
        "lock-taken",
        None,
        &format!("took lock `{key}`"),
    )?;
    Ok(())
}

/// Releases the op's lock (it succeeded or was canceled) and starts the key's cooldown.
fn release_lock(tx: &Transaction<'_>, op: OpId, at: Millis) -> Apply<()> {
    let row: Option<(String, Option<i64>)> = tx
        .prepare_cached("SELECT l.key, o.cooldown_ms FROM locks l JOIN ops o ON o.id = l.op_id WHERE l.op_id = ?1")?
        .query_row([op.0], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    let Some((key, cooldown)) = row else {
        return Ok(());
    };
    tx.prepare_cached("DELETE FROM locks WHERE key = ?1")?
        .execute([&key])?;
    let mut message = format!("released lock `{key}`");
    if let Some(ms) = cooldown.filter(|ms| *ms > 0) {
        tx.prepare_cached(
            "INSERT OR REPLACE INTO cooldowns (key, op_id, until) VALUES (?1, ?2, ?3)",
        )?
        .execute(params![key, op.0, at + ms])?;
        write!(message, "; it cools down for {} s", ms / 1000).ok();
    }
    event(tx, op, at, "lock-released", None, &message)?;
    Ok(())
}

/// The last `limit` bytes of `data`: one write larger than a log's limit keeps its end.
fn tail(data: &[u8], limit: u64) -> &[u8] {
    let limit = usize::try_from(limit).unwrap_or(usize::MAX);
    &data[data.len().saturating_sub(limit)..]
}

const OP_COLUMNS: &str = "id, uuid, plan, title, status, params, created_at, started_at, ended_at, \
     owner_host, owner_boot, owner_pid, owner_start, lease_until, current_task, error, workdir, env, \
     lock_key, cancel_requested_at, cancel_by, cancel_reason, ending, parent_id, parent_task";

fn op_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<OpRow> {
    let status: String = r.get(4)?;
    let params: String = r.get(5)?;
    Ok(OpRow {
        id: OpId(r.get(0)?),
        uuid: r.get(1)?,
        plan: r.get(2)?,
        title: r.get(3)?,
        status: OpStatus::parse(&status).unwrap_or(OpStatus::Failed),
        params: serde_json::from_str(&params).unwrap_or(serde_json::Value::Null),
        created_at: r.get(6)?,
        started_at: r.get(7)?,
        ended_at: r.get(8)?,
        owner: process_at(r, 9)?,
        lease_until: r.get(13)?,
        current_task: r.get(14)?,
        error: r.get(15)?,
        workdir: r.get(16)?,
        env: serde_json::from_str(&r.get::<_, String>(17)?).unwrap_or_default(),
        lock_key: r.get(18)?,
        cancel: match r.get::<_, Option<Millis>>(19)? {
            Some(at) => Some(Request {
                by: r.get::<_, Option<String>>(20)?.unwrap_or_default(),
                at,
                reason: r.get(21)?,
            }),
            None => None,
        },
        ending: r
            .get::<_, Option<String>>(22)?
            .and_then(|e| serde_json::from_str(&e).ok()),
        parent: match (r.get::<_, Option<i64>>(23)?, r.get::<_, Option<u32>>(24)?) {
            (Some(op), Some(task)) => Some((OpId(op), TaskNo(task))),
            _ => None,
        },
    })
}

/// Which ops `list_ops` returns, newest first.
#[derive(Debug, Clone, Default)]
pub struct OpFilter {
    pub status: Option<OpStatus>,
    pub plan: Option<String>,
    pub limit: Option<u32>,
}

/// Read queries, on any connection.
pub(crate) struct Reads<'c> {
    pub conn: &'c Connection,
    pub path: &'c Path,
}

impl Reads<'_> {
    fn err(&self, e: &rusqlite::Error) -> Error {
        classify(self.path, e)
    }

    pub fn list_ops(&self, filter: &OpFilter) -> Result<Vec<OpRow>> {
        let mut sql = format!("SELECT {OP_COLUMNS} FROM ops WHERE 1");
        if filter.status.is_some() {
            sql.push_str(" AND status = ?1");
        }
        if filter.plan.is_some() {
            sql.push_str(" AND plan = ?2");
        }
        sql.push_str(" ORDER BY id DESC LIMIT ?3");
        let limit = filter.limit.map_or(-1, i64::from);
        let mut stmt = self.conn.prepare_cached(&sql).map_err(|e| self.err(&e))?;
        let rows = stmt
            .query_map(
                params![filter.status.map(OpStatus::as_str), filter.plan, limit],
                op_row,
            )
            .map_err(|e| self.err(&e))?;
        rows.collect::<rusqlite::Result<Vec<_>>>()
            .map_err(|e| self.err(&e))
    }

    /// Every schedule, by name.
    pub fn schedules(&self) -> Result<Vec<ScheduleRow>> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT name, plan, params, cron, timezone, paused, catch_up, created_at, last_fire, last_op, note \
                 FROM schedules ORDER BY name",
            )
            .map_err(|e| self.err(&e))?;
        let rows = stmt
            .query_map([], |r| {
                let params: String = r.get(2)?;
                Ok(ScheduleRow {
                    name: r.get(0)?,
                    plan: r.get(1)?,
                    params: serde_json::from_str(&params).unwrap_or_default(),
                    cron: r.get(3)?,
                    timezone: r.get(4)?,
                    paused: r.get(5)?,
                    catch_up: r.get(6)?,
                    created_at: r.get(7)?,
                    last_fire: r.get(8)?,
                    last_op: r.get::<_, Option<i64>>(9)?.map(OpId),
                    note: r.get(10)?,
                })
            })
            .map_err(|e| self.err(&e))?;
        rows.collect::<rusqlite::Result<Vec<_>>>()
            .map_err(|e| self.err(&e))
    }

    /// The child op that runs task `task` of `op`, if any.
    pub fn child(&self, op: OpId, task: TaskNo) -> Result<Option<OpRow>> {
        self.conn
            .prepare_cached(&format!(
                "SELECT {OP_COLUMNS} FROM ops WHERE parent_id = ?1 AND parent_task = ?2"
            ))
            .and_then(|mut s| s.query_row(params![op.0, task.0], op_row).optional())
            .map_err(|e| self.err(&e))
    }

    /// The child ops an op started (its `plan:` steps), by task.
    pub fn children(&self, op: OpId) -> Result<Vec<OpRow>> {
        let mut stmt = self
            .conn
            .prepare_cached(&format!(
                "SELECT {OP_COLUMNS} FROM ops WHERE parent_id = ?1 ORDER BY parent_task"
            ))
            .map_err(|e| self.err(&e))?;
        let rows = stmt.query_map([op.0], op_row).map_err(|e| self.err(&e))?;
        rows.collect::<rusqlite::Result<Vec<_>>>()
            .map_err(|e| self.err(&e))
    }

    pub fn op(&self, op: OpId) -> Result<OpRow> {
        self.conn
            .prepare_cached(&format!("SELECT {OP_COLUMNS} FROM ops WHERE id = ?1"))
            .and_then(|mut s| s.query_row([op.0], op_row).optional())
            .map_err(|e| self.err(&e))?
            .ok_or(Error::NotFound(op))
    }

    pub fn tasks(&self, op: OpId) -> Result<Vec<TaskRow>> {
        self.task_rows(op, None)
    }

    /// One task of an op.
    pub fn task(&self, op: OpId, task: TaskNo) -> Result<TaskRow> {
        self.task_rows(op, Some(task))?
            .pop()
            .ok_or(Error::NotFound(op))
    }

    fn task_rows(&self, op: OpId, only: Option<TaskNo>) -> Result<Vec<TaskRow>> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT task_no, step, name, item, status, attempts, started_at, ended_at, exit_code, error, outputs, by_check, retry_from \
                 FROM tasks WHERE op_id = ?1 AND (?2 IS NULL OR task_no = ?2) ORDER BY task_no",
            )
            .map_err(|e| self.err(&e))?;
        let rows = stmt
            .query_map(params![op.0, only.map(|t| t.0)], |r| {
                let item: Option<String> = r.get(3)?;
                let status: String = r.get(4)?;
                let outputs: Option<String> = r.get(10)?;
                Ok(TaskRow {
                    task_no: TaskNo(r.get(0)?),
                    step: r.get(1)?,
                    name: r.get(2)?,
                    item: item.and_then(|i| serde_json::from_str(&i).ok()),
                    status: TaskStatus::parse(&status).unwrap_or(TaskStatus::Failed),
                    attempts: r.get(5)?,
                    started_at: r.get(6)?,
                    ended_at: r.get(7)?,
                    exit_code: r.get(8)?,
                    error: r.get(9)?,
                    outputs: outputs.and_then(|o| serde_json::from_str(&o).ok()),
                    by_check: r.get(11)?,
                    retry_from: r.get(12)?,
                })
            })
            .map_err(|e| self.err(&e))?;
        rows.collect::<rusqlite::Result<Vec<_>>>()
            .map_err(|e| self.err(&e))
    }

    pub fn attempts(&self, op: OpId) -> Result<Vec<AttemptRow>> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT task_no, n, status, started_at, ended_at, exit_code, error, host, boot_id, pid, proc_start, pgid \
                 FROM attempts WHERE op_id = ?1 ORDER BY task_no, n",
            )
            .map_err(|e| self.err(&e))?;
        let rows = stmt
            .query_map([op.0], |r| {
                let status: String = r.get(2)?;
                let pgid: Option<i64> = r.get(11)?;
                Ok(AttemptRow {
                    task_no: TaskNo(r.get(0)?),
                    n: r.get(1)?,
                    status: AttemptStatus::parse(&status).unwrap_or(AttemptStatus::Failed),
                    started_at: r.get(3)?,
                    ended_at: r.get(4)?,
                    exit_code: r.get(5)?,
                    error: r.get(6)?,
                    process: process_at(r, 7)?,
                    pgid: pgid.and_then(|p| u32::try_from(p).ok()),
                })
            })
            .map_err(|e| self.err(&e))?;
        rows.collect::<rusqlite::Result<Vec<_>>>()
            .map_err(|e| self.err(&e))
    }

    pub fn events(&self, op: OpId) -> Result<Vec<EventRow>> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT seq, at, kind, task, message FROM events WHERE op_id = ?1 ORDER BY seq",
            )
            .map_err(|e| self.err(&e))?;
        let rows = stmt
            .query_map([op.0], |r| {
                Ok(EventRow {
                    seq: r.get(0)?,
                    at: r.get(1)?,
                    kind: r.get(2)?,
                    task: r.get(3)?,
                    message: r.get(4)?,
                })
            })
            .map_err(|e| self.err(&e))?;
        rows.collect::<rusqlite::Result<Vec<_>>>()
            .map_err(|e| self.err(&e))
    }

    /// Log chunks of the op (or of one task), in order, after `after` = (task, attempt, seq).
    pub fn logs(
        &self,
        op: OpId,
        task: Option<TaskNo>,
        after: Option<(TaskNo, u32, i64)>,
    ) -> Result<Vec<LogChunk>> {
        let (t, a, s) = after.map_or((-1, -1, -1), |(t, a, s)| (i64::from(t.0), i64::from(a), s));
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT task_no, attempt, seq, stream, at, data FROM logs WHERE op_id = ?1 \
                 AND (?2 IS NULL OR task_no = ?2) AND (task_no, attempt, seq) > (?3, ?4, ?5) \
                 ORDER BY task_no, attempt, seq",
            )
            .map_err(|e| self.err(&e))?;
        let rows = stmt
            .query_map(params![op.0, task.map(|t| t.0), t, a, s], |r| {
                Ok(LogChunk {
                    task_no: TaskNo(r.get(0)?),
                    attempt: r.get(1)?,
                    seq: r.get(2)?,
                    stream: r.get(3)?,
                    at: r.get(4)?,
                    data: r.get(5)?,
                })
            })
            .map_err(|e| self.err(&e))?;
        rows.collect::<rusqlite::Result<Vec<_>>>()
            .map_err(|e| self.err(&e))
    }

    pub fn locks(&self) -> Result<Vec<LockRow>> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT key, op_id, since FROM locks ORDER BY key")
            .map_err(|e| self.err(&e))?;
        let rows = stmt
            .query_map([], |r| {
                Ok(LockRow {
                    key: r.get(0)?,
                    op: OpId(r.get(1)?),
                    since: r.get(2)?,
                })
            })
            .map_err(|e| self.err(&e))?;
        rows.collect::<rusqlite::Result<Vec<_>>>()
            .map_err(|e| self.err(&e))
    }

    /// Cooldowns that still run at `now` (acknowledged ones included, marked).
    pub fn cooldowns(&self, now: Millis) -> Result<Vec<CooldownRow>> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT key, op_id, until, acked_by, acked_at FROM cooldowns WHERE until > ?1 ORDER BY key")
            .map_err(|e| self.err(&e))?;
        let rows = stmt
            .query_map([now], |r| {
                let by: Option<String> = r.get(3)?;
                let at: Option<Millis> = r.get(4)?;
                Ok(CooldownRow {
                    key: r.get(0)?,
                    op: OpId(r.get(1)?),
                    until: r.get(2)?,
                    acked: by.zip(at).map(|(by, at)| Request {
                        by,
                        at,
                        reason: None,
                    }),
                })
            })
            .map_err(|e| self.err(&e))?;
        rows.collect::<rusqlite::Result<Vec<_>>>()
            .map_err(|e| self.err(&e))
    }

    /// Who paused cairn, when and why; `None` when it is not paused.
    pub fn paused(&self) -> Result<Option<Request>> {
        let value: Option<String> = self
            .conn
            .prepare_cached("SELECT value FROM settings WHERE key = 'paused'")
            .and_then(|mut s| s.query_row([], |r| r.get(0)).optional())
            .map_err(|e| self.err(&e))?;
        Ok(value
            .and_then(|v| serde_json::from_str::<serde_json::Value>(&v).ok())
            .map(|v| Request {
                by: v["by"].as_str().unwrap_or_default().to_owned(),
                at: v["at"].as_i64().unwrap_or_default(),
                reason: v["reason"].as_str().map(ToOwned::to_owned),
            }))
    }

    pub fn snapshot(&self, op: OpId) -> Result<Snapshot> {
        let row = self
            .conn
            .prepare_cached(
                "SELECT s.hash, s.name, s.text, s.files FROM ops o JOIN plan_snapshots s ON s.id = o.snapshot_id WHERE o.id = ?1",
            )
            .and_then(|mut s| {
                s.query_row([op.0], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, String>(2)?, r.get::<_, String>(3)?)))
                    .optional()
            })
            .map_err(|e| self.err(&e))?
            .ok_or(Error::NotFound(op))?;
        let files: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(&row.3).unwrap_or_default();
        Ok(Snapshot {
            hash: row.0,
            name: row.1,
            text: row.2,
            files: files
                .into_iter()
                .map(|(k, v)| (k, v.as_str().unwrap_or_default().to_owned()))
                .collect(),
        })
    }
}
