//! Database faults through the real binary: each is a clear error (exit 2, or 4 for a run that
//! cannot go on) and loses nothing already recorded. Small file systems are real `tmpfs` mounts
//! (the tests run as root, as CI does).

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::support::{Sandbox, code, postgres, sqlite_only, stderr, stdout};

const PLAN: &str = "name: x\nsteps:\n  - id: a\n    noop: true\n";

/// A `tmpfs` of `size` mounted on a fresh directory, unmounted when dropped.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn new(size: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0755"),
                "tmpfs",
            ])
            .arg(dir.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "these tests mount a small tmpfs and need root: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Self { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn read_only(&self) {
        let out = Command::new("mount")
            .args(["-o", "remount,ro"])
            .arg(self.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(self.path()).status();
    }
}

/// `cairn` with the database at `db`, run in `dir`.
fn cairn(dir: &Path, db: &Path, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_cairn"))
        .args(args)
        .current_dir(dir)
        .env("CAIRN_DB", db)
        .env("NO_COLOR", "1")
        .output()
        .unwrap()
}

/// A database with one succeeded op, everything in its main file (no `-wal`).
fn one_op(sandbox: &Sandbox) -> PathBuf {
    sandbox.write("plan.yaml", PLAN);
    assert_eq!(code(&sandbox.cairn(&["run", "plan.yaml"])), Some(0));
    let db = sandbox.path().join("cairn.db");
    let out = Command::new("sqlite3")
        .arg(&db)
        .arg("PRAGMA wal_checkpoint(TRUNCATE);")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    db
}

fn sqlite3(db: &Path, sql: &str) {
    let out = Command::new("sqlite3").arg(db).arg(sql).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
}

#[test]
fn a_database_from_a_newer_cairn_is_refused_unchanged() {
    let sandbox = Sandbox::new();
    if postgres() {
        return a_postgres_database_from_a_newer_cairn_is_refused_unchanged(&sandbox);
    }
    let db = one_op(&sandbox);
    sqlite3(&db, "PRAGMA user_version = 99;");
    let before = std::fs::read(&db).unwrap();
    for args in [&["status"][..], &["show", "1"], &["run", "plan.yaml"]] {
        let out = sandbox.cairn(args);
        assert_eq!(code(&out), Some(2), "{args:?}");
        assert!(
            stderr(&out).contains("written by a newer cairn (schema version 99"),
            "{}",
            stderr(&out)
        );
    }
    assert_eq!(std::fs::read(&db).unwrap(), before);
}

/// PostgreSQL keeps its schema version in `cairn_meta`: one from a newer cairn is refused by every
/// command, which names the database and changes nothing.
fn a_postgres_database_from_a_newer_cairn_is_refused_unchanged(sandbox: &Sandbox) {
    sandbox.write("plan.yaml", PLAN);
    assert_eq!(code(&sandbox.cairn(&["run", "plan.yaml"])), Some(0));
    sandbox.sql("UPDATE cairn_meta SET value = '99' WHERE key = 'schema_version'");
    let db = sandbox.db().into_string().unwrap();
    let name = db.rsplit('/').next().unwrap();
    for args in [&["status"][..], &["show", "1"], &["run", "plan.yaml"]] {
        let out = sandbox.cairn(args);
        assert_eq!(code(&out), Some(2), "{args:?}: {}", stderr(&out));
        let err = stderr(&out);
        assert!(err.contains("newer cairn") && err.contains(name), "{err}");
    }
    assert_eq!(
        sandbox
            .sql("SELECT value FROM cairn_meta WHERE key = 'schema_version'")
            .trim(),
        "99"
    );
    assert_eq!(sandbox.sql("SELECT count(*) FROM ops").trim(), "1");
}

#[test]
fn a_corrupt_database_is_refused_unchanged() {
    if sqlite_only("the bytes of a SQLite file scrambled") {
        return;
    }
    let sandbox = Sandbox::new();
    let db = one_op(&sandbox);
    let mut bytes = std::fs::read(&db).unwrap();
    // Keep the header (page 1); scramble every page after it.
    for (i, b) in bytes.iter_mut().enumerate().skip(4096) {
        *b = u8::try_from((i * 7919) % 251).unwrap();
    }
    std::fs::write(&db, &bytes).unwrap();
    for args in [&["status"][..], &["show", "1"], &["run", "plan.yaml"]] {
        let out = sandbox.cairn(args);
        assert_eq!(code(&out), Some(2), "{args:?}");
        assert!(stderr(&out).contains("damaged"), "{}", stderr(&out));
    }
    assert_eq!(std::fs::read(&db).unwrap(), bytes);
}

#[test]
fn a_database_on_a_read_only_file_system_is_read_but_not_written() {
    if sqlite_only("a SQLite file on a read-only file system") {
        return;
    }
    let fs = Tmpfs::new("4m");
    std::fs::write(fs.path().join("plan.yaml"), PLAN).unwrap();
    let db = fs.path().join("cairn.db");
    assert_eq!(code(&cairn(fs.path(), &db, &["run", "plan.yaml"])), Some(0));
    sqlite3(&db, "PRAGMA wal_checkpoint(TRUNCATE);");
    fs.read_only();
    let out = cairn(fs.path(), &db, &["status"]);
    assert_eq!(code(&out), Some(0), "{}", stderr(&out));
    assert!(stdout(&out).contains("succeeded"), "{}", stdout(&out));
    let out = cairn(fs.path(), &db, &["run", "plan.yaml"]);
    assert_eq!(code(&out), Some(2));
    assert!(
        stderr(&out).contains("read-only file system"),
        "{}",
        stderr(&out)
    );
    // A new database cannot be made there either.
    let out = cairn(fs.path(), &fs.path().join("new.db"), &["run", "plan.yaml"]);
    assert_eq!(code(&out), Some(2));
    assert!(
        stderr(&out).contains("cannot create it"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn a_missing_directory_is_made_private() {
    use std::os::unix::fs::PermissionsExt;
    if sqlite_only("the directories made for a SQLite file") {
        return;
    }
    let sandbox = Sandbox::new();
    sandbox.write("plan.yaml", PLAN);
    let db = sandbox.path().join("state/deeper/cairn.db");
    let out = cairn(sandbox.path(), &db, &["run", "plan.yaml"]);
    assert_eq!(code(&out), Some(0), "{}", stderr(&out));
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&sandbox.path().join("state/deeper")), 0o700);
    assert_eq!(mode(&db), 0o600);
}

#[test]
fn a_full_disk_stops_the_op_cleanly_and_it_resumes_once_space_is_freed() {
    if sqlite_only("a SQLite file on a full file system") {
        return;
    }
    let fs = Tmpfs::new("1m");
    // The step fills the disk (once: its marker is made first, so a rerun never fills it again),
    // then prints enough to need space for its logs.
    std::fs::write(
        fs.path().join("plan.yaml"),
        r"
name: full
steps:
  - id: fill
    run: |
      test -e filled || { : > filled; cat /dev/zero > filler 2>/dev/null; } || true
      seq 1 20000
  - id: after
    needs: [fill]
    run: echo after >> runs
",
    )
    .unwrap();
    let db = fs.path().join("cairn.db");
    let out = cairn(fs.path(), &db, &["run", "plan.yaml"]);
    assert_eq!(code(&out), Some(4), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("the disk is full") && stderr(&out).contains("cairn resume 1"),
        "{}",
        stderr(&out)
    );
    assert!(fs.path().join("filler").exists(), "the disk was not filled");
    // What was recorded before the disk filled is all there; the op shows interrupted.
    let show: serde_json::Value =
        serde_json::from_slice(&cairn(fs.path(), &db, &["show", "1", "--json"]).stdout).unwrap();
    assert_eq!(show["status"], "interrupted", "{show}");
    let kinds: Vec<String> = crate::support::events(&show)
        .into_iter()
        .map(|(kind, _)| kind)
        .collect();
    assert_eq!(&kinds[..3], &["submitted", "started", "task-started"]);

    std::fs::remove_file(fs.path().join("filler")).unwrap();
    let out = cairn(fs.path(), &db, &["resume", "1"]);
    assert_eq!(code(&out), Some(0), "{}", stderr(&out));
    let show: serde_json::Value =
        serde_json::from_slice(&cairn(fs.path(), &db, &["show", "1", "--json"]).stdout).unwrap();
    assert_eq!(show["status"], "succeeded");
    assert_eq!(
        std::fs::read_to_string(fs.path().join("runs")).unwrap(),
        "after\n"
    );
}

/// A password given as a URL parameter is hidden too; TLS, which cairn cannot speak yet, is refused
/// whether the URL or `PGSSLMODE` asks for it (never sent in clear without a word).
#[test]
fn a_password_parameter_is_hidden_and_tls_is_refused_not_dropped() {
    let sandbox = Sandbox::new();
    let out = sandbox.cairn(&[
        "--db",
        "postgres://cairn@127.0.0.1:5432/ops?password=hunter2",
        "status",
    ]);
    assert_eq!(code(&out), Some(2), "{}", stderr(&out));
    assert!(!stderr(&out).contains("hunter2"), "{}", stderr(&out));
    assert!(stderr(&out).contains("password=***"), "{}", stderr(&out));
    for (url, env) in [
        ("postgres://cairn@127.0.0.1:5432/ops?sslmode=require", None),
        (
            "postgres://cairn@127.0.0.1:5432/ops?sslmode=verify-full",
            None,
        ),
        ("postgres://cairn@127.0.0.1:5432/ops", Some("require")),
    ] {
        let mut command = sandbox.command(&["--db", url, "status"]);
        if let Some(mode) = env {
            command.env("PGSSLMODE", mode);
        }
        let out = command.output().unwrap();
        assert_eq!(code(&out), Some(2), "{url}: {}", stderr(&out));
        assert!(
            stderr(&out).contains("asks for TLS"),
            "{url}: {}",
            stderr(&out)
        );
    }
}

/// `--db` with a PostgreSQL URL whose login the server refuses: every command says so (exit 2),
/// naming the server, database and user without showing the password, and no file named after
/// the URL is made.
#[test]
fn a_refused_postgres_login_is_named_without_its_password() {
    let sandbox = Sandbox::new();
    sandbox.write("plan.yaml", PLAN);
    let url = "postgres://cairn:hunter2@127.0.0.1:5432/ops";
    for args in [
        &["--db", url, "status"][..],
        &["--db", url, "run", "plan.yaml"][..],
        &["--db", url, "show", "1"][..],
    ] {
        let out = sandbox.cairn(args);
        assert_eq!(code(&out), Some(2), "{args:?}: {}", stderr(&out));
        let err = stderr(&out);
        assert!(
            err.contains("the server refused the login of user `cairn`"),
            "{err}"
        );
        assert!(
            err.contains("127.0.0.1:5432, database `ops`"),
            "names the server: {err}"
        );
        assert!(!err.contains("hunter2"), "shows the password: {err}");
    }
    let made: Vec<_> = std::fs::read_dir(sandbox.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        // The sandbox's own key file, when the tests run on PostgreSQL.
        .filter(|name| name != "cairn.key")
        .collect();
    assert_eq!(
        made,
        vec![std::ffi::OsString::from("plan.yaml")],
        "{made:?}"
    );
}
