//! Who holds the database: the process whose lock a write waited for, read from `/proc/locks`
//! (SQLite takes POSIX record locks; in WAL mode the writer's lock is byte 120 of the `-shm`
//! file, a database in exclusive locking mode locks the file itself).

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// The writer's lock in the `-shm` file: `WALINDEX_LOCK_OFFSET` (120) + `WAL_WRITE_LOCK` (0).
const WAL_WRITE_LOCK: u64 = 120;

/// `` `command`, pid N `` of another process holding a write lock on the database at `path`, if the
/// kernel says which.
pub(crate) fn holder(path: &Path) -> Option<String> {
    let table = std::fs::read_to_string("/proc/locks").ok()?;
    let mut shm = path.as_os_str().to_owned();
    shm.push("-shm");
    let files = [
        (PathBuf::from(shm), Some(WAL_WRITE_LOCK)),
        (path.to_path_buf(), None),
    ];
    let me = std::process::id();
    files.iter().find_map(|(file, byte)| {
        let meta = std::fs::metadata(file).ok()?;
        let id = FileId {
            major: nix::sys::stat::major(meta.dev()),
            minor: nix::sys::stat::minor(meta.dev()),
            inode: meta.ino(),
        };
        table
            .lines()
            .filter_map(Lock::parse)
            .find(|lock| lock.file == id && lock.pid != me && byte.is_none_or(|b| lock.covers(b)))
            .map(|lock| name(lock.pid))
    })
}

fn name(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm")).map_or_else(
        |_| format!("pid {pid}"),
        |comm| format!("`{}`, pid {pid}", comm.trim_end()),
    )
}

#[derive(Debug, PartialEq, Eq)]
struct FileId {
    major: u64,
    minor: u64,
    inode: u64,
}

/// One granted write lock of `/proc/locks`:
/// `1: POSIX  ADVISORY  WRITE 29581 fe:00:10018880 120 120` (waiters, `->`, are skipped).
#[derive(Debug)]
struct Lock {
    pid: u32,
    file: FileId,
    start: u64,
    /// `None`: to the end of the file (`EOF`).
    end: Option<u64>,
}

impl Lock {
    fn parse(line: &str) -> Option<Self> {
        let mut words = line.split_whitespace().skip(1);
        let class = words.next()?;
        if class != "POSIX" {
            return None;
        }
        let _advisory = words.next()?;
        if words.next()? != "WRITE" {
            return None;
        }
        let pid = words.next()?.parse().ok()?;
        let mut file = words.next()?.split(':');
        let file = FileId {
            major: u64::from_str_radix(file.next()?, 16).ok()?,
            minor: u64::from_str_radix(file.next()?, 16).ok()?,
            inode: file.next()?.parse().ok()?,
        };
        let start = words.next()?.parse().ok()?;
        let end = match words.next()? {
            "EOF" => None,
            n => Some(n.parse().ok()?),
        };
        Some(Self {
            pid,
            file,
            start,
            end,
        })
    }

    fn covers(&self, byte: u64) -> bool {
        self.start <= byte && self.end.is_none_or(|end| byte <= end)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_granted_write_lock_and_skips_others() {
        let lock = Lock::parse("1: POSIX  ADVISORY  WRITE 29581 fe:00:10018880 120 120").unwrap();
        assert_eq!(lock.pid, 29581);
        assert_eq!(
            lock.file,
            FileId {
                major: 0xfe,
                minor: 0,
                inode: 10_018_880
            }
        );
        assert!(lock.covers(120) && !lock.covers(121));
        assert!(
            Lock::parse("7: POSIX  ADVISORY  WRITE 3822 fe:00:770190 0 EOF")
                .is_some_and(|l| l.covers(1 << 40))
        );
        assert!(Lock::parse("2: POSIX  ADVISORY  READ 29581 fe:00:10018880 123 123").is_none());
        assert!(Lock::parse("5: FLOCK  ADVISORY  WRITE 28398 fe:00:5350568 0 EOF").is_none());
        assert!(Lock::parse("1: -> POSIX  ADVISORY  WRITE 30000 fe:00:10018880 120 120").is_none());
    }
}
