//! The SQLite database file itself: created whole, an empty one refused, its log checked.

use std::os::unix::fs::PermissionsExt;

use store::{Error, Reader, Store};

/// An empty file is not a database cairn made (cairn links a new database in place only once it
/// is whole): readers and writers refuse it, name it, and leave it empty.
#[test]
fn an_empty_file_is_refused_and_left_as_it_is() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.db");
    std::fs::write(&path, b"").unwrap();
    let err = Store::open(&path).unwrap_err();
    assert!(
        matches!(&err, Error::Unusable { path: p, reason } if *p == path && reason.contains("empty (0 bytes)")),
        "{err}"
    );
    let err = Reader::open(&path).unwrap_err();
    assert!(err.to_string().contains("empty (0 bytes)"), "{err}");
    assert_eq!(
        std::fs::read(&path).unwrap(),
        b"",
        "refusing it wrote to it"
    );
    assert!(!dir.path().join("c.db-wal").exists());
}

/// A new database is whole as soon as it is at its path: its schema is in the file itself (no
/// log needed to read it), it is private to the user, and nothing of its making is left beside.
#[test]
fn a_new_database_is_whole_when_it_appears() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.db");
    let store = Store::open(&path).unwrap();
    // The file alone, copied before anything is written through the store, reads as cairn's.
    let copy = dir.path().join("copy.db");
    std::fs::copy(&path, &copy).unwrap();
    drop(store);
    assert!(Reader::open(&copy).unwrap().is_some());
    assert_eq!(
        std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let mut names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with("copy.db"))
        .collect();
    names.sort();
    assert!(
        names.iter().all(|n| n.starts_with("c.db")),
        "left beside it: {names:?}"
    );
}

/// A log whose first bytes are not a log's header is not taken as damage (SQLite ignores it).
#[test]
fn a_log_that_is_not_a_log_is_left_to_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.db");
    drop(Store::open(&path).unwrap());
    std::fs::write(dir.path().join("c.db-wal"), vec![0u8; 5000]).unwrap();
    assert!(Reader::open(&path).unwrap().is_some());
    assert!(store::recover_sqlite(&path).unwrap().is_none());
}
