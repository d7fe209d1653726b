//! An attempt's output on its way to the logs: batched into log chunks, secrets masked.
//!
//! - [`write_logs`]: batches an attempt's output chunks into `Log` changes.
//! - [`Masker`]: masks secret values, across the boundaries of the chunks output arrives in.

use std::time::Duration;

use procs::spawn::Chunk;
use store::{Change, OpId, ProcessId, Store, TaskNo};
use tokio::sync::mpsc;

use super::Fatal;
use super::context::apply_patiently;
use crate::owner::now;

/// Masks secret values in output, across the boundaries of the chunks it arrives in: the last bytes,
/// when they could begin a secret, are held back until more output (or the end) shows what follows.
pub(crate) struct Masker {
    secrets: Vec<Vec<u8>>,
    /// Held-back bytes, per stream (1 stdout, 2 stderr).
    carry: [Vec<u8>; 3],
}

const MASK: &[u8] = b"********";

impl Masker {
    pub(crate) fn new(secrets: &[String]) -> Self {
        Self {
            secrets: secrets
                .iter()
                .filter(|s| !s.is_empty())
                .map(|s| s.as_bytes().to_vec())
                .collect(),
            carry: [Vec::new(), Vec::new(), Vec::new()],
        }
    }

    /// Where the secrets occur in `data`: (start, end) of each, left to right, not overlapping;
    /// where several begin at one place, the first secret given wins. Each secret is searched
    /// for with `memmem` (a step may print gigabytes: a byte-by-byte scan costs more than the
    /// writing).
    fn occurrences(&self, data: &[u8]) -> Vec<(usize, usize)> {
        let mut starts: Vec<(usize, usize)> = Vec::new();
        for (which, secret) in self.secrets.iter().enumerate() {
            let finder = memchr::memmem::Finder::new(secret);
            let mut from = 0;
            while let Some(at) = finder.find(&data[from..]) {
                starts.push((from + at, which));
                from += at + 1;
            }
        }
        starts.sort_unstable();
        let mut found = Vec::new();
        let mut free = 0;
        for (start, which) in starts {
            if start >= free {
                free = start + self.secrets[which].len();
                found.push((start, free));
            }
        }
        found
    }

    pub(crate) fn mask(&self, data: &[u8]) -> Vec<u8> {
        if self.secrets.is_empty() {
            return data.to_vec();
        }
        let mut out = Vec::with_capacity(data.len());
        let mut at = 0;
        for (start, end) in self.occurrences(data) {
            out.extend_from_slice(&data[at..start]);
            out.extend_from_slice(MASK);
            at = end;
        }
        out.extend_from_slice(&data[at..]);
        out
    }

    /// The bytes of `stream` held back, not yet written.
    fn held(&self, stream: u8) -> usize {
        self.carry[usize::from(stream.min(2))].len()
    }

    /// The masked bytes that can be written now; with `last`, everything that is left.
    fn feed(&mut self, stream: u8, data: &[u8], last: bool) -> Vec<u8> {
        let slot = usize::from(stream.min(2));
        let mut buffer = std::mem::take(&mut self.carry[slot]);
        buffer.extend_from_slice(data);
        let keep = self
            .secrets
            .iter()
            .map(Vec::len)
            .max()
            .unwrap_or(1)
            .saturating_sub(1);
        if last || keep == 0 {
            return self.mask(&buffer);
        }
        // Hold back from where the end could begin a secret (only there: output held back comes
        // later than what the other stream prints meanwhile), unless a whole secret straddles
        // that point.
        let mut split = (buffer.len().saturating_sub(keep)..buffer.len())
            .find(|&at| {
                let rest = &buffer[at..];
                self.secrets.iter().any(|s| s.starts_with(rest))
            })
            .unwrap_or(buffer.len());
        for (start, end) in self.occurrences(&buffer) {
            if start < split && split < end {
                split = end;
            }
        }
        self.carry[slot] = buffer.split_off(split);
        self.mask(&buffer)
    }
}

/// Output that could not be written to the log: how many bytes (`None`: not known, the writer was
/// given up), and why (the last failure; empty when all was written).
#[derive(Debug, Default)]
pub(crate) struct Unwritten {
    pub(crate) bytes: Option<u64>,
    pub(crate) why: String,
}

/// A log chunk holds at most this much: the unit in which a log over its limit is cut.
const CHUNK: usize = 64 * 1024;
/// One commit takes at most this much of the output already waiting: a step that prints faster
/// than single chunks are written is written in fewer, larger commits.
const BATCH: usize = 1 << 20;
/// How long output waits for more before it is written.
const LINGER: Duration = Duration::from_millis(200);

/// Output taken from the process and not yet written: chunks of one stream each, in order.
#[derive(Default)]
struct Pending {
    parts: Vec<(u8, Vec<u8>)>,
    size: usize,
}

impl Pending {
    fn add(&mut self, chunk: Chunk) {
        self.size += chunk.data.len();
        let stream = chunk.stream as u8;
        match self.parts.last_mut() {
            Some((s, data)) if *s == stream && data.len() + chunk.data.len() <= CHUNK => {
                data.extend(chunk.data);
            }
            _ => self.parts.push((stream, chunk.data)),
        }
    }
}

/// Batches an attempt's output into log chunks: written when 64 KiB are pending or 200 ms after the
/// first pending byte, secrets masked. Each batch is written before more output is taken, so a
/// slow store holds the process back (through the bounded channel) rather than filling memory;
/// the output is read to its end whatever happens, and what a failed write lost is returned.
pub(crate) async fn write_logs(
    store: Store,
    (op, owner): (OpId, ProcessId),
    (task, attempt): (TaskNo, u32),
    chunks: mpsc::Receiver<Chunk>,
    (limit, patience): (u64, Duration),
    secrets: Vec<String>,
) -> Unwritten {
    write_logs_noting(
        store,
        (op, owner),
        (task, attempt),
        chunks,
        (limit, patience),
        secrets,
        None,
    )
    .await
}

/// [`write_logs`] for a supervised attempt (`adopt`), whose output was recorded up to `logged`
/// bytes of stdout and stderr before (by an earlier run): each batch also records how far the
/// output is in the log ([`Change::Logged`]), in the same commit, so that a reader taking the
/// attempt again goes on from exactly there.
pub(crate) async fn write_logs_noting(
    store: Store,
    (op, owner): (OpId, ProcessId),
    (task, attempt): (TaskNo, u32),
    mut chunks: mpsc::Receiver<Chunk>,
    (limit, patience): (u64, Duration),
    secrets: Vec<String>,
    logged: Option<[u64; 2]>,
) -> Unwritten {
    // Bytes of each stream taken from the output so far (held back by the masker or not).
    let mut taken = [0u64; 2];
    let mut unwritten = Unwritten::default();
    let mut masker = Masker::new(&secrets);
    let mut pending = Pending::default();
    let mut deadline: Option<tokio::time::Instant> = None;
    loop {
        let next = match deadline {
            None => Some(chunks.recv().await),
            Some(at) => tokio::time::timeout_at(at, chunks.recv()).await.ok(),
        };
        let mut closed = matches!(next, Some(None));
        if let Some(Some(chunk)) = next {
            pending.add(chunk);
            deadline.get_or_insert_with(|| tokio::time::Instant::now() + LINGER);
            if pending.size < CHUNK {
                continue;
            }
            closed = take_waiting(&mut chunks, &mut pending);
        }
        // 64 KiB pending, the deadline passed, or the output ended: write what is pending.
        let mut batch = Vec::new();
        let mut log = |stream: u8, data: Vec<u8>| {
            if !data.is_empty() {
                batch.push(Change::Log {
                    op,
                    owner: Some(owner.clone()),
                    task,
                    attempt,
                    stream,
                    at: now(),
                    data,
                    limit,
                });
            }
        };
        for (stream, data) in std::mem::take(&mut pending).parts {
            if let Some(size) = taken.get_mut(usize::from(stream).saturating_sub(1)) {
                *size += data.len() as u64;
            }
            log(stream, masker.feed(stream, &data, false));
        }
        if closed {
            for stream in [1u8, 2] {
                log(stream, masker.feed(stream, &[], true));
            }
        }
        if let Some(base) = logged
            && !batch.is_empty()
        {
            let written = |i: usize, stream: u8| base[i] + taken[i] - masker.held(stream) as u64;
            batch.push(Change::Logged {
                op,
                owner: owner.clone(),
                task,
                attempt,
                bytes: [written(0, 1), written(1, 2)],
            });
        }
        deadline = None;
        if !batch.is_empty() {
            // Logs are best effort: a failure must not fail the step (its outcome is what counts),
            // but a busy database is waited for, and what is lost is said.
            let bytes = logged_bytes(&batch);
            if let Err(e) = apply_patiently(&store, batch, patience).await {
                unwritten.bytes = Some(unwritten.bytes.unwrap_or(0) + bytes);
                unwritten.why = match e {
                    Fatal::Lost(why) | Fatal::Store(why) => why,
                };
            }
        }
        if closed {
            return unwritten;
        }
    }
}

/// Adds the output already waiting in `chunks` to `pending`, up to [`BATCH`]; whether the output
/// ended.
fn take_waiting(chunks: &mut mpsc::Receiver<Chunk>, pending: &mut Pending) -> bool {
    while pending.size < BATCH {
        match chunks.try_recv() {
            Ok(chunk) => pending.add(chunk),
            Err(mpsc::error::TryRecvError::Empty) => return false,
            Err(mpsc::error::TryRecvError::Disconnected) => return true,
        }
    }
    false
}

/// The bytes of output a batch of `Log` changes carries.
fn logged_bytes(batch: &[Change]) -> u64 {
    batch
        .iter()
        .map(|c| match c {
            Change::Log { data, .. } => data.len() as u64,
            _ => 0,
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::Masker;

    #[test]
    fn a_secret_split_across_chunks_is_still_masked() {
        let mut m = Masker::new(&["hunter2-very-secret".to_owned()]);
        let mut out = m.feed(1, b"oops hunter2-v", false);
        out.extend(m.feed(1, b"ery-secret and more", false));
        out.extend(m.feed(1, b"", true));
        assert_eq!(String::from_utf8(out).unwrap(), "oops ******** and more");
    }

    #[test]
    fn only_an_end_that_could_begin_a_secret_is_held_back() {
        let mut m = Masker::new(&["hunter2-very-secret".to_owned()]);
        assert_eq!(m.feed(2, b"login refused\n", false), b"login refused\n");
        assert_eq!(m.feed(2, b"as hunt", false), b"as ");
        assert_eq!(m.feed(2, b"ing\n", false), b"hunting\n");
        assert_eq!(m.feed(2, b"", true), b"");
    }

    #[test]
    fn overlapping_secrets_are_all_masked() {
        let m = Masker::new(&["xa".to_owned(), "aa".to_owned()]);
        assert_eq!(m.mask(b"xaaa!"), b"****************!");
    }

    #[test]
    fn binary_output_is_kept_as_it_is() {
        let mut m = Masker::new(&["pw".to_owned()]);
        let data = [0xff, 0xfe, b'p', b'w', 0x00, 0xc3];
        let mut out = m.feed(2, &data, false);
        out.extend(m.feed(2, &[], true));
        assert_eq!(
            out,
            [
                0xff, 0xfe, b'*', b'*', b'*', b'*', b'*', b'*', b'*', b'*', 0x00, 0xc3
            ]
        );
    }
}
