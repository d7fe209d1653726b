//! An attempt's output on its way to the logs: batched into log chunks, secrets masked.
//!
//! - [`write_logs`]: batches an attempt's output chunks into `Log` changes.
//! - [`Masker`]: masks secret values, across the boundaries of the chunks output arrives in.

use std::time::Duration;

use procs::spawn::Chunk;
use store::{Change, OpId, ProcessId, Store, TaskNo};
use tokio::sync::mpsc;

use super::context::apply_patiently;
use crate::owner::now;

/// Masks secret values in output, across the boundaries of the chunks it arrives in: the last bytes
/// that could begin a secret are held back until more output (or the end) shows what follows.
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

    /// Where the secrets occur in `data`: (start, end) of each, left to right, not overlapping.
    fn occurrences(&self, data: &[u8]) -> Vec<(usize, usize)> {
        let mut found = Vec::new();
        let mut i = 0;
        while i < data.len() {
            match self.secrets.iter().find(|s| data[i..].starts_with(s)) {
                Some(s) => {
                    found.push((i, i + s.len()));
                    i += s.len();
                }
                None => i += 1,
            }
        }
        found
    }

    pub(crate) fn mask(&self, data: &[u8]) -> Vec<u8> {
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
        // Hold back the last `keep` bytes, unless a whole secret straddles that point.
        let mut split = buffer.len().saturating_sub(keep);
        for (start, end) in self.occurrences(&buffer) {
            if start < split && split < end {
                split = end;
            }
        }
        self.carry[slot] = buffer.split_off(split);
        self.mask(&buffer)
    }
}

/// Batches an attempt's output into log chunks: written when 64 KiB are pending or 200 ms after the
/// first pending byte, secrets masked.
pub(crate) async fn write_logs(
    store: Store,
    (op, owner): (OpId, ProcessId),
    task: TaskNo,
    attempt: u32,
    mut chunks: mpsc::UnboundedReceiver<Chunk>,
    limit: u64,
    secrets: Vec<String>,
) {
    let mut masker = Masker::new(&secrets);
    let mut pending: Vec<(u8, Vec<u8>)> = Vec::new();
    let mut size = 0;
    let mut deadline: Option<tokio::time::Instant> = None;
    loop {
        let next = match deadline {
            None => Some(chunks.recv().await),
            Some(at) => tokio::time::timeout_at(at, chunks.recv()).await.ok(),
        };
        let closed = matches!(next, Some(None));
        if let Some(Some(chunk)) = next {
            size += chunk.data.len();
            deadline
                .get_or_insert_with(|| tokio::time::Instant::now() + Duration::from_millis(200));
            let stream = chunk.stream as u8;
            match pending.last_mut() {
                Some((s, data)) if *s == stream => data.extend(chunk.data),
                _ => pending.push((stream, chunk.data)),
            }
            if size < 64 * 1024 {
                continue;
            }
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
        for (stream, data) in pending.drain(..) {
            log(stream, masker.feed(stream, &data, false));
        }
        if closed {
            for stream in [1u8, 2] {
                log(stream, masker.feed(stream, &[], true));
            }
        }
        size = 0;
        deadline = None;
        if !batch.is_empty() {
            // Logs are best effort: a failure must not fail the step (its outcome is what counts),
            // but a busy database is waited for.
            let _ = apply_patiently(&store, batch, Duration::from_secs(10)).await;
        }
        if closed {
            return;
        }
    }
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
