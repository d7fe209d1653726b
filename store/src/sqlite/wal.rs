//! Damage in the write-ahead log (`<db>-wal`), found before SQLite reads it.
//!
//! SQLite reads the log's frames in order and stops at the first one whose checksum or salts do
//! not match: whatever was committed after a damaged frame is silently left out, and the next
//! write reuses the op ids those commits had given. [`check`] reads the log itself and looks past
//! the point where SQLite stops.
//!
//! The format (<https://www.sqlite.org/fileformat2.html#walformat>): a 32-byte header (magic,
//! whose low bit says the checksums' byte order; version; page size; checkpoint sequence; two
//! salts; the header's checksum), then frames of a 24-byte header (page number; the database's
//! size in pages after a commit, non-zero only on a transaction's last frame; the salts; the
//! cumulative checksum of everything so far) and one page. SQLite reads the frames up to the last
//! commit frame before the first frame that does not verify.
//!
//! Past that frame, a frame that carries the header's salts, verifies when its checksum is seeded
//! with the previous frame's stored checksum, and ends a transaction is a commit SQLite will not
//! read. A writer syncs every commit (`synchronous=FULL`) before it writes the next transaction,
//! so when such a frame belongs to a later transaction than the damaged frame's, the damaged
//! transaction was on disk whole before: it was damaged afterwards. A torn tail, a crash in the
//! middle of writing one transaction, leaves no such later transaction and is not damage.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::error::{Error, Result};

/// The magic number of a log whose checksums read the data as little-endian words; `+ 1`,
/// big-endian.
const MAGIC: u32 = 0x377f_0682;
const HEADER: usize = 32;
const FRAME_HEADER: usize = 24;

/// What SQLite reads of a damaged log, and what it leaves out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Damage {
    /// The first frame SQLite cannot read (1 is the first frame; 0: the header itself).
    pub first_bad: u64,
    /// The frames SQLite reads: those up to the last commit before `first_bad`.
    pub readable: u64,
    /// Committed transactions past the damage (their last frames verified), which SQLite drops.
    pub lost_commits: u64,
    /// The log's salts: another read sees the same damage only in the same log.
    salts: [u8; 8],
}

/// The `-wal` file beside the database at `path`.
pub(crate) fn wal_path(path: &Path) -> PathBuf {
    side_file(path, "-wal")
}

/// `path` with `suffix` appended to its file name (`-wal`, `-shm`).
pub(crate) fn side_file(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// Refuses the database at `path` when its log holds committed transactions SQLite would drop.
///
/// A writer of another process may be appending while the log is read, and a frame half-written
/// then looks like damage; so damage is concluded only when a second read, a moment later, finds
/// the same in the same log. A log that cannot be read is left to SQLite, which says what is wrong.
pub(crate) fn check(path: &Path) -> Result<()> {
    let wal = wal_path(path);
    let Some(first) = scan(&wal) else {
        return Ok(());
    };
    std::thread::sleep(Duration::from_millis(50));
    if scan(&wal).as_ref() != Some(&first) {
        return Ok(());
    }
    Err(Error::Unusable {
        path: path.to_path_buf(),
        reason: describe(&wal, &first, path),
    })
}

/// The refusal's text: what is damaged, what would be lost, and the two ways on.
fn describe(wal: &Path, damage: &Damage, path: &Path) -> String {
    let at = if damage.first_bad == 0 {
        "in its header".to_owned()
    } else {
        format!("at frame {}", damage.first_bad)
    };
    format!(
        "its write-ahead log `{}` is damaged {at}: SQLite would read only the {} frames before it and silently drop {} committed transaction(s) after it, and the ops they recorded would lose their ids to new ones. Restore the database with its `-wal` from a backup, or run `cairn db recover --db {}` to keep what is readable (it keeps copies of both files; ops recorded after the damage are lost; new op ids start past every id that may have been shown)",
        wal.display(),
        damage.readable,
        damage.lost_commits,
        path.display()
    )
}

/// Reads the log at `wal`; `Some` when it holds committed transactions SQLite would not read.
pub(crate) fn scan(wal: &Path) -> Option<Damage> {
    let file = std::fs::File::open(wal).ok()?;
    let mut log = std::io::BufReader::with_capacity(1 << 16, file);
    let mut header = [0u8; HEADER];
    log.read_exact(&mut header).ok()?;
    let magic = word_be(&header, 0);
    if magic & !1 != MAGIC {
        return None;
    }
    let big = magic & 1 == 1;
    let page_size = match word_be(&header, 8) {
        1 => 65_536,
        n if (512..=32_768).contains(&n) && n.is_power_of_two() => n as usize,
        _ => return None,
    };
    let mut salts = [0u8; 8];
    salts.copy_from_slice(&header[16..24]);
    let stored_header = (word_be(&header, 24), word_be(&header, 28));
    let header_ok = checksum(big, (0, 0), &header[..24]) == stored_header;

    let mut frame = vec![0u8; FRAME_HEADER + page_size];
    // SQLite's running checksum, while every frame so far verified.
    let mut chain = header_ok.then_some(stored_header);
    let mut readable = 0u64;
    let mut first_bad = if header_ok { None } else { Some(0u64) };
    // Whether the first frame SQLite cannot read says it ends a transaction.
    let mut bad_ends_a_transaction = false;
    let mut lost = Vec::new();
    let mut previous = stored_header;
    let mut number = 0u64;
    while log.read_exact(&mut frame).is_ok() {
        number += 1;
        let own_salts = frame[8..16] == salts;
        let page = word_be(&frame, 0);
        let commit = word_be(&frame, 4) != 0;
        let stored = (word_be(&frame, 16), word_be(&frame, 20));
        let sums = |seed| {
            checksum(
                big,
                checksum(big, seed, &frame[..8]),
                &frame[FRAME_HEADER..],
            )
        };
        let well_formed = own_salts && page != 0;
        match chain {
            Some(seed) if well_formed && sums(seed) == stored => {
                chain = Some(stored);
                if commit {
                    readable = number;
                }
            }
            Some(_) => {
                chain = None;
                first_bad = Some(number);
                bad_ends_a_transaction = own_salts && commit;
            }
            None => {
                if well_formed && commit && sums(previous) == stored {
                    lost.push(number);
                }
            }
        }
        previous = stored;
    }
    let first_bad = first_bad?;
    // A commit after the damaged frame's own transaction proves that transaction was synced
    // whole; so does a damaged header followed by frames written under it.
    let proven = match first_bad {
        0 => !lost.is_empty() && first_frame_verifies(wal, big, page_size, salts, stored_header),
        _ => lost.len() >= 2 || (bad_ends_a_transaction && !lost.is_empty()),
    };
    proven.then_some(Damage {
        first_bad,
        readable,
        lost_commits: lost.len() as u64,
        salts,
    })
}

/// Whether the log's first frame verifies against its header's stored checksum and salts: the
/// header was the one its frames were written under (not half of a new one).
fn first_frame_verifies(
    wal: &Path,
    big: bool,
    page_size: usize,
    salts: [u8; 8],
    seed: (u32, u32),
) -> bool {
    let Ok(mut file) = std::fs::File::open(wal) else {
        return false;
    };
    let mut buf = vec![0u8; HEADER + FRAME_HEADER + page_size];
    if file.read_exact(&mut buf).is_err() {
        return false;
    }
    let frame = &buf[HEADER..];
    let stored = (word_be(frame, 16), word_be(frame, 20));
    frame[8..16] == salts
        && checksum(
            big,
            checksum(big, seed, &frame[..8]),
            &frame[FRAME_HEADER..],
        ) == stored
}

fn word_be(bytes: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
}

/// SQLite's WAL checksum of `data` (a multiple of 8 bytes), continuing from `seed`.
pub(crate) fn checksum(big: bool, seed: (u32, u32), data: &[u8]) -> (u32, u32) {
    let (mut s0, mut s1) = seed;
    for pair in data.chunks_exact(8) {
        let word = |at: usize| {
            let b = [pair[at], pair[at + 1], pair[at + 2], pair[at + 3]];
            if big {
                u32::from_be_bytes(b)
            } else {
                u32::from_le_bytes(b)
            }
        };
        s0 = s0.wrapping_add(word(0)).wrapping_add(s1);
        s1 = s1.wrapping_add(word(4)).wrapping_add(s0);
    }
    (s0, s1)
}
