//! The log rule: an attempt's log keeps at most its limit of output, its head and its tail. Over
//! the limit, the chunks after the first eighth of it are dropped, oldest first, and a note (a
//! chunk of `stream` 0, where the first chunk dropped was) says how much was cut there. The tail
//! is what a failing step printed last; the head, how it began.

use super::Tx;
use crate::error::Result;
use crate::types::{Millis, OpId, TaskNo};

/// What the note begins with; its count of bytes follows.
const NOTE: &str = "[cairn: ";

/// An attempt's log: (op, task, attempt).
type Log = (OpId, TaskNo, u32);

/// Appends a chunk of output to an attempt's log, then cuts the log to its `limit`.
pub(super) fn append<T: Tx>(
    tx: &mut T,
    log: Log,
    (stream, at): (u8, Millis),
    data: &[u8],
    limit: u64,
) -> Result<()> {
    let (op, task, attempt) = log;
    let (head, tail) = parts(limit);
    let cut_now = append_within(tx, log, (stream, at), data, (head, tail))?;
    let mut size = tx.log_size(op, task, attempt, 0)?;
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let tail_part = i64::try_from(tail).unwrap_or(i64::MAX);
    if size <= tail_part && cut_now == 0 {
        return Ok(());
    }
    let noted = tx.log_note(op, task, attempt)?;
    if size <= limit && cut_now == 0 && noted.is_none() {
        return Ok(());
    }
    let Some((seq, mut cut, after)) = where_to_cut(tx, log, noted, cut_now, head)? else {
        return Ok(());
    };
    // The tail: the chunks after the note (or where it goes), within the tail's part.
    let mut tail_size = tx.log_size(op, task, attempt, after)?;
    let mut dropped_any = false;
    while size > limit || tail_size > tail_part || cut_now > 0 {
        let Some(dropped) = tx.drop_log_after(op, task, attempt, after)? else {
            break;
        };
        dropped_any = true;
        size -= dropped;
        tail_size -= dropped;
        cut += u64::try_from(dropped).unwrap_or(0);
    }
    if !dropped_any && cut_now == 0 {
        return Ok(());
    }
    cut += cut_now;
    tx.put_log_note(op, task, attempt, seq, at, note(cut, head, tail).as_bytes())
}

/// Appends `data`, or, when it is larger than the tail's part, its end: the bytes cut from it
/// are returned. Its start then fills what room the head has left, and an empty note comes
/// between that and its end (the caller drops everything else between head and end, so that
/// what was cut lies in one place).
fn append_within<T: Tx>(
    tx: &mut T,
    (op, task, attempt): Log,
    (stream, at): (u8, Millis),
    data: &[u8],
    (head, tail): (u64, u64),
) -> Result<u64> {
    let kept = tail_of(data, tail);
    let mut cut = (data.len() - kept.len()) as u64;
    if cut == 0 || tx.log_note(op, task, attempt)?.is_some() {
        tx.append_log(op, task, attempt, stream, at, kept)?;
        return Ok(cut);
    }
    let size = u64::try_from(tx.log_size(op, task, attempt, 0)?).unwrap_or(0);
    let room = head.saturating_sub(size);
    if room >= cut {
        // The head's room and the tail's part hold it all.
        tx.append_log(op, task, attempt, stream, at, data)?;
        return Ok(0);
    }
    if room > 0 {
        let start = usize::try_from(room).unwrap_or(0);
        tx.append_log(op, task, attempt, stream, at, &data[..start])?;
        cut -= room;
    }
    tx.append_log(op, task, attempt, 0, at, b"")?;
    tx.append_log(op, task, attempt, stream, at, kept)?;
    Ok(cut)
}

/// Where the note is or goes, what it counted so far, and after which chunk dropping starts;
/// `None` when the log has nothing past its head.
fn where_to_cut<T: Tx>(
    tx: &mut T,
    (op, task, attempt): Log,
    noted: Option<(i64, Vec<u8>)>,
    cut_now: u64,
    head: u64,
) -> Result<Option<(i64, u64, i64)>> {
    let head = i64::try_from(head).unwrap_or(0);
    Ok(match noted {
        Some((seq, text)) if cut_now == 0 || !text.is_empty() => Some((seq, counted(&text), seq)),
        // Written just now, before a chunk that lost its start: what lies between the head
        // and that chunk goes.
        Some((seq, _)) => match tx.log_head_end(op, task, attempt, head)? {
            Some(end) => Some((seq, 0, end - 1)),
            None => Some((seq, 0, seq)),
        },
        // The first cut: the note takes the place of the first chunk past the head.
        None => tx
            .log_head_end(op, task, attempt, head)?
            .map(|end| (end, 0, end - 1)),
    })
}

/// How a log's `limit` is shared: its first eighth for the head, the rest for the tail.
fn parts(limit: u64) -> (u64, u64) {
    let head = limit / 8;
    (head, limit - head)
}

/// The note's text, for `cut` bytes cut from a log kept as `head` and `tail` bytes.
fn note(cut: u64, head: u64, tail: u64) -> String {
    format!(
        "{NOTE}{} bytes cut here; the log keeps its first {} and last {}]\n",
        grouped(cut),
        size(head),
        size(tail)
    )
}

/// The count of bytes a note says were cut (0 if it says none this rule wrote).
fn counted(text: &[u8]) -> u64 {
    let text = String::from_utf8_lossy(text);
    text.strip_prefix(NOTE)
        .and_then(|rest| rest.split_once(' '))
        .and_then(|(count, _)| count.replace(',', "").parse().ok())
        .unwrap_or(0)
}

/// `115431300` as `115,431,300`.
fn grouped(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// A size as a plan writes it when it is whole MiB or KiB (`56 MiB`), else in bytes.
fn size(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 20 && b.is_multiple_of(1 << 20) => format!("{} MiB", b >> 20),
        b if b >= 1 << 10 && b.is_multiple_of(1 << 10) => format!("{} KiB", b >> 10),
        b => format!("{} bytes", grouped(b)),
    }
}

/// The end of `data` within `limit` bytes: one write larger than that keeps its end, from the
/// start of a line (the part of a line whose start is gone is left out too), or the last `limit`
/// bytes when they hold no line break.
fn tail_of(data: &[u8], limit: u64) -> &[u8] {
    let limit = usize::try_from(limit).unwrap_or(usize::MAX);
    if data.len() <= limit {
        return data;
    }
    let kept = &data[data.len() - limit..];
    match kept.iter().position(|&b| b == b'\n') {
        Some(end) if end + 1 < kept.len() => &kept[end + 1..],
        _ => kept,
    }
}

#[cfg(test)]
mod tests {
    use super::{counted, grouped, note, parts, size};

    #[test]
    fn a_note_reads_back_its_count() {
        let (head, tail) = parts(64 << 20);
        let text = note(115_431_300, head, tail);
        assert_eq!(
            text,
            "[cairn: 115,431,300 bytes cut here; the log keeps its first 8 MiB and last 56 MiB]\n"
        );
        assert_eq!(counted(text.as_bytes()), 115_431_300);
        assert_eq!(counted(b"something else"), 0);
    }

    #[test]
    fn sizes_and_counts_read_as_people_write_them() {
        assert_eq!(grouped(0), "0");
        assert_eq!(grouped(999), "999");
        assert_eq!(grouped(1000), "1,000");
        assert_eq!(grouped(1_234_567), "1,234,567");
        assert_eq!(size(128 << 10), "128 KiB");
        assert_eq!(size(3 << 20), "3 MiB");
        assert_eq!(size(1000), "1,000 bytes");
    }
}
