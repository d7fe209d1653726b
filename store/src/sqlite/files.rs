//! The database file and the `-wal` and `-shm` files SQLite keeps beside it: creating the
//! database whole, refusing an empty one, and keeping the side files writable by the database's
//! owner.
//!
//! A new database is built under a temporary name in the same directory (private to the user),
//! switched to WAL, migrated, checkpointed into the file and closed, and only then linked into
//! place. So a file at the path is never cairn's creation in progress, and an empty file there is
//! not a database cairn made: it is refused, never taken as a new database (its ops would be gone
//! and op ids would start again at 1).

use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rusqlite::{Connection, OpenFlags};

use super::wal::side_file;
use super::{busy_timeout, classify, migrations};
use crate::error::{Error, Result};

fn unusable(path: &Path, reason: String) -> Error {
    Error::Unusable {
        path: path.to_path_buf(),
        reason,
    }
}

/// The directory SQLite keeps the database's side files in.
pub(super) fn directory(path: &Path) -> &Path {
    path.parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

/// Creates the database whole at `path` when it does not exist (and its directory, private to the
/// user); returns whether this call made it. When another process creates it at the same time,
/// the first to link its file wins and the other uses that one.
pub(super) fn create(path: &Path) -> Result<bool> {
    use std::os::unix::fs::DirBuilderExt;
    if path.is_dir() {
        return Err(unusable(path, "it is a directory".to_owned()));
    }
    if path.exists() {
        return Ok(false);
    }
    let dir = directory(path);
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| {
                unusable(
                    path,
                    format!("cannot create its directory `{}`: {e}", dir.display()),
                )
            })?;
    }
    let temporary = temporary_name(path);
    let built = build(&temporary, path);
    let linked = built.and_then(|()| match std::fs::hard_link(&temporary, path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(unusable(path, format!("cannot create it: {e}"))),
    });
    for name in [
        temporary.clone(),
        side_file(&temporary, "-wal"),
        side_file(&temporary, "-shm"),
    ] {
        let _ = std::fs::remove_file(name);
    }
    // The new name must survive a crash too.
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    linked
}

/// A name beside `path` that no other process or thread uses:
/// `.<name>.new-<pid>-<count>-<nanoseconds>` (threads of one process may read the same clock).
fn temporary_name(path: &Path) -> PathBuf {
    static COUNT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let name = path
        .file_name()
        .map_or_else(|| "cairn.db".into(), |n| n.to_string_lossy().into_owned());
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let count = COUNT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    directory(path).join(format!(
        ".{name}.new-{}-{count}-{nanos}",
        std::process::id()
    ))
}

/// Makes a complete database at `temporary`: private to the user, in WAL mode, migrated, every
/// page in the file itself (the log checkpointed and removed), synced. Errors name `path`.
fn build(temporary: &Path, path: &Path) -> Result<()> {
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(temporary)
        .map_err(|e| unusable(path, format!("cannot create it: {e}")))?;
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let err = |e: rusqlite::Error| classify(path, &e);
    let conn = Connection::open_with_flags(temporary, flags).map_err(err)?;
    conn.busy_timeout(busy_timeout()).map_err(err)?;
    conn.pragma_update(None, "journal_mode", "WAL")
        .map_err(err)?;
    conn.pragma_update(None, "synchronous", "FULL")
        .map_err(err)?;
    migrations::migrate(&conn, path, 0)?;
    // Every page into the database file (synced), the log emptied.
    let busy: i64 = conn
        .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| r.get(0))
        .map_err(err)?;
    if busy != 0 {
        return Err(unusable(
            path,
            "cannot create it: its first checkpoint did not complete".to_owned(),
        ));
    }
    conn.close().map_err(|(_, e)| err(e))
}

/// Refuses a database file of 0 bytes (whose log holds nothing either): not a database cairn
/// made, or one whose creation was cut short.
pub(super) fn refuse_empty(path: &Path, meta: &std::fs::Metadata) -> Result<()> {
    if meta.len() != 0 {
        return Ok(());
    }
    let log = std::fs::metadata(side_file(path, "-wal")).map_or(0, |m| m.len());
    if log != 0 {
        // Everything may still be in the log: SQLite reads it.
        return Ok(());
    }
    Err(unusable(
        path,
        "it is empty (0 bytes): not a database cairn made, or its creation was cut short; if it should hold ops, restore it from a backup, else delete it".to_owned(),
    ))
}

/// Gives the database's `-wal` and `-shm` their owner's write bit back where this process may
/// (it owns them, or is root). SQLite creates them with the database's mode: a reader of a
/// read-only database (`0444`) leaves them read-only, and once the database is made writable
/// again SQLite opens them read-only without a word and every write fails. A change of mode by
/// name (chmod(2)) opens nothing, so no lock of a connection of this process is dropped.
pub(super) fn give_owner_write(path: &Path) {
    let me = nix::unistd::geteuid().as_raw();
    for suffix in ["-wal", "-shm"] {
        let side = side_file(path, suffix);
        let Ok(meta) = std::fs::symlink_metadata(&side) else {
            continue;
        };
        if !meta.is_file() || meta.mode() & 0o200 != 0 || (me != 0 && me != meta.uid()) {
            continue;
        }
        let mode = (meta.mode() & 0o7777) | 0o200;
        let _ = std::fs::set_permissions(&side, std::fs::Permissions::from_mode(mode));
    }
}

/// Before a writer opens the database: a `-wal` or `-shm` this process cannot write (and could
/// not fix: [`give_owner_write`]) would make every write fail as "read-only" (SQLite opens it
/// read-only without a word); refused here, named, with how to fix it.
pub(super) fn refuse_unwritable_side_files(path: &Path) -> Result<()> {
    for suffix in ["-wal", "-shm"] {
        let side = side_file(path, suffix);
        let Ok(meta) = std::fs::symlink_metadata(&side) else {
            continue;
        };
        match nix::unistd::access(&side, nix::unistd::AccessFlags::W_OK) {
            // ENOENT: gone since it was looked at (the last connection of another process closed,
            // deleting it); SQLite makes it anew, writable.
            Ok(()) | Err(nix::errno::Errno::EROFS | nix::errno::Errno::ENOENT) => {}
            Err(errno) => {
                return Err(unusable(
                    path,
                    format!(
                        "SQLite's `{}` beside it cannot be written ({}; mode {:o}, owner uid {}), so nothing could be recorded; make it writable by the database's owner (`chmod u+w {}`, as that user)",
                        side.display(),
                        std::io::Error::from(errno),
                        meta.mode() & 0o7777,
                        meta.uid(),
                        side.display()
                    ),
                ));
            }
        }
    }
    Ok(())
}
