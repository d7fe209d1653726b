//! The SQLite backend: one database file, written by one thread per process (group commit) and
//! read by read-only connections. Its speed tricks (prepared statements kept, a commit of nothing
//! but what dies with the boot left unsynced, a lone caller's commit on its own thread) stay here.
//!
//! - this file: opening (and refusing) files, the PRAGMAs below, [`classify`] (SQLite's errors in
//!   the store's words).
//! - [`files`]: creating a database whole (built aside, linked in place), refusing an empty file,
//!   keeping `-wal` and `-shm` writable by the database's owner.
//! - [`wal`]: damage in the write-ahead log that SQLite would silently read past; [`recover`]:
//!   `cairn db recover`, keeping what is readable without reusing an op id.
//! - [`migrations`]: the schema, `store/migrations/*.sql`, run once each.
//! - [`writer`]: [`SqliteStore`], the [`Backend`](crate::Backend): the writer thread, group
//!   commit with a savepoint per batch, the solo commit, `synchronous` per commit.
//! - [`tx`]: the rules' transaction ([`crate::rules::Tx`]) in SQL.
//! - [`reads`]: [`SqliteReader`], the [`ReadBackend`](crate::ReadBackend).
//!
//! PRAGMAs, on every connection that may write:
//!
//! | pragma | value | why |
//! | --- | --- | --- |
//! | `journal_mode` | `WAL` | readers (`status`) never block the writer, nor it them |
//! | `synchronous` | `FULL` | a commit is on disk (`fdatasync` of the WAL: SQLite is built with `HAVE_FDATASYNC`) before it returns: invariant 2. `NORMAL` for a commit of nothing but what dies with the boot (`writer::sync_for`) |
//! | `foreign_keys` | `ON` | tasks, attempts and events cannot outlive their op |
//! | `busy_timeout` | 5 s (or `CAIRN_BUSY_TIMEOUT_MS`) | another cairn process writing is waited for, not an error |
//! | `application_id` | [`APPLICATION_ID`] | a SQLite file that is not cairn's is recognised and left alone |
//! | `user_version` | the schema version | migrations run once; a newer schema is refused |

mod files;
mod holder;
mod migrations;
mod reads;
mod recover;
mod tx;
mod wal;
mod writer;

use std::path::Path;
use std::time::Duration;

use rusqlite::config::DbConfig;
use rusqlite::{Connection, ErrorCode, OpenFlags};

use crate::error::{Error, Result};
pub use migrations::{APPLICATION_ID, SCHEMA_VERSION};
pub(crate) use reads::{Reads, SqliteReader};
pub use recover::{Recovered, recover};
pub(crate) use writer::SqliteStore;

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

/// Another connection holds the lock (cheap: [`classify`] also asks the kernel who).
pub(crate) fn is_busy(err: &rusqlite::Error) -> bool {
    matches!(
        err.sqlite_error_code(),
        Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked)
    )
}

/// What went wrong, in the words of the path's owner.
pub(crate) fn classify(path: &Path, err: &rusqlite::Error) -> Error {
    // A stored value that is not what cairn wrote (text that is not UTF-8, a number where text
    // belongs): a damaged page, read as such.
    if matches!(
        err,
        rusqlite::Error::Utf8Error(..)
            | rusqlite::Error::FromSqlConversionFailure(..)
            | rusqlite::Error::InvalidColumnType(..)
            | rusqlite::Error::IntegralValueOutOfRange(..)
    ) {
        return damaged(
            path,
            &format!("a stored value is not what cairn wrote ({err})"),
        );
    }
    let code = err.sqlite_error_code();
    let reason = match code {
        Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) => {
            return Error::Locked {
                path: path.to_path_buf(),
                waited_ms: u64::try_from(busy_timeout().as_millis()).unwrap_or(u64::MAX),
                holder: holder::holder(path),
            };
        }
        Some(ErrorCode::NotADatabase) => "it is not a SQLite database (nor a cairn one)".to_owned(),
        Some(ErrorCode::DatabaseCorrupt) => return damaged(path, &err.to_string()),
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

/// The database file is damaged: nothing more is written to it.
fn damaged(path: &Path, what: &str) -> Error {
    Error::Unusable {
        path: path.to_path_buf(),
        reason: format!(
            "it is damaged: {what}. Nothing was written to it. Restore it from a backup; `sqlite3 {} .recover` salvages what is still readable into a new file",
            path.display()
        ),
    }
}

/// How long the check of a database before its first write may take: within it a file of a few
/// hundred megabytes, in the page cache, is checked whole; beyond it the check stops where it is
/// (`cairn db check` checks every page).
const CHECK_BUDGET: Duration = Duration::from_millis(300);

/// Damage found before anything is written: `PRAGMA quick_check` (every page's structure, every
/// row's `NOT NULL` and `CHECK`), within [`CHECK_BUDGET`]. Without it, a damaged page that the
/// next transactions do not touch goes unnoticed, and SQLite writes on around it.
fn check_pages(conn: &Connection, path: &Path, budget: Option<Duration>) -> Result<()> {
    let interrupt = conn.get_interrupt_handle();
    let (done, finished) = std::sync::mpsc::channel::<()>();
    let timer = budget.map(|budget| {
        std::thread::spawn(move || {
            if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = finished.recv_timeout(budget) {
                interrupt.interrupt();
            }
        })
    });
    let found = conn.prepare("PRAGMA quick_check(20)").and_then(|mut s| {
        s.query_map([], |row| row.get::<_, String>(0))?
            .collect::<rusqlite::Result<Vec<String>>>()
    });
    let _ = done.send(());
    if let Some(timer) = timer {
        let _ = timer.join();
    }
    match found {
        Ok(problems) if problems == ["ok"] => Ok(()),
        Ok(problems) => Err(damaged(path, &problems.join("; "))),
        // Out of time: checked as far as it got.
        Err(e) if e.sqlite_error_code() == Some(ErrorCode::OperationInterrupted) => Ok(()),
        Err(e) => Err(classify(path, &e)),
    }
}

/// Every page of the database at `path` checked, however long it takes (`cairn db check`).
/// Opened as the writer opens it: on a read-only connection SQLite skips the `CHECK`s.
pub fn check(path: &Path) -> Result<()> {
    open_reader(path, false)?;
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags(path, flags).map_err(|e| classify(path, &e))?;
    conn.busy_timeout(busy_timeout())
        .map_err(|e| classify(path, &e))?;
    check_identity(&conn, path)?;
    check_pages(&conn, path, None)
}

/// Where the key that seals secret params is kept for the database at `path`: the file beside
/// it, `<db>.key`.
pub(crate) fn key_file(path: &Path) -> std::path::PathBuf {
    let mut name = path
        .file_name()
        .map(std::ffi::OsStr::to_os_string)
        .unwrap_or_default();
    name.push(".key");
    path.with_file_name(name)
}

/// More than the writer's distinct statements (about eighty), so that none is evicted.
const WRITER_STATEMENTS: usize = 128;

/// Opens the database for writing, creating it (whole, private to the user) if it does not exist.
/// An empty file, a side file it cannot write and a damaged log are refused before SQLite
/// touches anything.
pub(super) fn open_writer(path: &Path) -> Result<Connection> {
    files::create(path)?;
    let meta = std::fs::metadata(path).map_err(|e| Error::Unusable {
        path: path.to_path_buf(),
        reason: format!("cannot read it: {e}"),
    })?;
    files::refuse_empty(path, &meta)?;
    files::give_owner_write(path);
    files::refuse_unwritable_side_files(path)?;
    wal::check(path)?;
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
    let version = check_identity(&conn, path)?;
    check_pages(&conn, path, Some(CHECK_BUDGET))?;
    switch_to_wal(&conn, path)?;
    conn.pragma_update(None, "synchronous", "FULL")
        .map_err(|e| classify(path, &e))?;
    conn.pragma_update(None, "foreign_keys", "ON")
        .map_err(|e| classify(path, &e))?;
    if version < SCHEMA_VERSION {
        migrations::migrate(&conn, path, version)?;
    }
    Ok(conn)
}

/// Puts the database in WAL mode (a no-op once it is: cairn creates its files in WAL mode; a
/// SQLite file without a table, made by another program, may not be). Two processes opening such
/// a file together both try to switch it from the rollback journal; SQLite refuses one at once with `SQLITE_BUSY`
/// (a lock upgrade that would deadlock does not call the busy handler), so the refusal is retried
/// here until the busy timeout, as any other wait for the lock is.
fn switch_to_wal(conn: &Connection, path: &Path) -> Result<()> {
    let deadline = std::time::Instant::now() + busy_timeout();
    loop {
        match conn.pragma_update(None, "journal_mode", "WAL") {
            Ok(()) => return Ok(()),
            Err(e) if is_busy(&e) && std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(classify(path, &e)),
        }
    }
}

/// Opens the database for reading; `None` when the file does not exist. Never writes to it.
/// `beside_writer`: this process has it open for writing, and has checked it already.
pub(super) fn open_reader(path: &Path, beside_writer: bool) -> Result<Option<Connection>> {
    let meta = match std::fs::metadata(path) {
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
        Ok(meta) => meta,
    };
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
    if !beside_writer {
        files::refuse_empty(path, &meta)?;
        wal::check(path)?;
    }
    let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags(path, flags).map_err(|e| classify(path, &e))?;
    conn.busy_timeout(busy_timeout())
        .map_err(|e| classify(path, &e))?;
    let (conn, version) = match check_identity(&conn, path) {
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
            let version = check_identity(&conn, path)?;
            (conn, version)
        }
        Err(e) => return Err(e),
    };
    if !beside_writer {
        // The first read made the side files if they were missing, perhaps read-only.
        files::give_owner_write(path);
    }
    if version == 0 {
        // A SQLite file without a table yet (cairn never links one in place: see `files`): no op.
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

/// Checks that the file is a cairn database this cairn can use; returns its schema version
/// (0 for a SQLite file without a table).
fn check_identity(conn: &Connection, path: &Path) -> Result<i32> {
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
        // No table: a new database, or a SQLite file with nothing in it; nothing is lost by
        // using it. (A file of 0 bytes was refused before.)
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
