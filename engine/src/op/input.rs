//! Reading the files an op is made from (a plan, its sub-plans, a params file), never more than
//! [`plans::limits::MAX_FILE_BYTES`]: a regular file is refused by its size before a byte is
//! read; anything else (`/dev/zero`, a FIFO, a `/proc` file) is read to one byte past the cap.

use std::io::Read as _;
use std::path::Path;

use plans::limits::{MAX_FILE_BYTES, size};

/// Why a file could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadFailure {
    #[error("it is {}; a plan or params file may be at most {}", size(*.0), size(MAX_FILE_BYTES))]
    TooLarge(u64),
    #[error(
        "it is endless (not a regular file, and more than {0} came); a plan or params file may be at most {0}",
        size(MAX_FILE_BYTES)
    )]
    Endless,
    #[error("{}", io_reason(.0))]
    Io(std::io::Error),
    #[error("it is not UTF-8 text")]
    NotText,
}

/// A file that could not be read, and why.
#[derive(Debug, thiserror::Error)]
#[error("cannot read `{path}`: {failure}")]
pub struct ReadError {
    pub path: String,
    pub failure: ReadFailure,
}

impl ReadError {
    /// Whether the file was refused for its size.
    #[must_use]
    pub fn too_large(&self) -> bool {
        matches!(
            self.failure,
            ReadFailure::TooLarge(_) | ReadFailure::Endless
        )
    }
}

fn io_reason(err: &std::io::Error) -> String {
    match err.kind() {
        std::io::ErrorKind::NotFound => "no such file".to_owned(),
        std::io::ErrorKind::PermissionDenied => "permission denied".to_owned(),
        _ => err.to_string(),
    }
}

/// The bytes of `path`, at most [`MAX_FILE_BYTES`] of them.
pub fn read(path: &Path) -> Result<Vec<u8>, ReadError> {
    let fail = |failure| ReadError {
        path: path.display().to_string(),
        failure,
    };
    let file = std::fs::File::open(path).map_err(|e| fail(ReadFailure::Io(e)))?;
    let meta = file.metadata().map_err(|e| fail(ReadFailure::Io(e)))?;
    if meta.is_file() && meta.len() > MAX_FILE_BYTES {
        return Err(fail(ReadFailure::TooLarge(meta.len())));
    }
    let expected = if meta.is_file() { meta.len() } else { 0 };
    let mut bytes = Vec::with_capacity(usize::try_from(expected).unwrap_or(0));
    file.take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| fail(ReadFailure::Io(e)))?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        // A regular file that grew while read is over the cap too; its size is not known.
        return Err(fail(if meta.is_file() {
            ReadFailure::TooLarge(bytes.len() as u64)
        } else {
            ReadFailure::Endless
        }));
    }
    Ok(bytes)
}

/// The text of `path`, as [`read`] reads it; refused when it is not UTF-8.
pub fn read_text(path: &Path) -> Result<String, ReadError> {
    String::from_utf8(read(path)?).map_err(|_| ReadError {
        path: path.display().to_string(),
        failure: ReadFailure::NotText,
    })
}
