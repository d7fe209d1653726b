//! Damaged and unwritable database files, through the real binary: an empty file is refused, not
//! taken as a new database; damage in the write-ahead log is refused rather than silently dropping
//! committed ops, and `cairn db recover` keeps what is readable without reusing an op id; reading a
//! read-only database does not leave it unwritable.

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use crate::support::{Sandbox, code, sqlite_only, stderr, stdout, step_processes};

const QUICK: &str = "name: quick\nsteps:\n  - id: one\n    run: echo one\n  - id: two\n    needs: [one]\n    run: echo two\n";

/// The ids `status` shows, newest first.
fn op_ids(sandbox: &Sandbox) -> Vec<i64> {
    sandbox
        .json(&["status", "--json", "--all"])
        .as_array()
        .unwrap()
        .iter()
        .map(|op| op["id"].as_i64().unwrap())
        .collect()
}

/// An empty file at the database's path is refused by readers and writers (exit 2, named), and
/// left as it is; a missing one is still created by `run`.
#[test]
fn an_empty_database_file_is_refused_and_a_missing_one_is_created() {
    if sqlite_only("an empty SQLite file") {
        return;
    }
    let sandbox = Sandbox::new();
    sandbox.write("plan.yaml", QUICK);
    let db = sandbox.path().join("cairn.db");
    std::fs::write(&db, b"").unwrap();
    for args in [&["status"][..], &["run", "plan.yaml"]] {
        let out = sandbox.cairn(args);
        assert_eq!(code(&out), Some(2), "{args:?}: {}", stderr(&out));
        let err = stderr(&out);
        assert!(
            err.contains(&db.display().to_string()) && err.contains("empty (0 bytes)"),
            "{args:?}: {err}"
        );
        assert_eq!(
            std::fs::metadata(&db).unwrap().len(),
            0,
            "{args:?} wrote it"
        );
    }
    std::fs::remove_file(&db).unwrap();
    let out = sandbox.cairn(&["run", "plan.yaml"]);
    assert_eq!(code(&out), Some(0), "{}", stderr(&out));
    assert_eq!(op_ids(&sandbox), vec![1]);
    assert_eq!(
        std::fs::metadata(&db).unwrap().permissions().mode() & 0o777,
        0o600
    );
    // Nothing of the creation is left beside it.
    let names: Vec<String> = std::fs::read_dir(sandbox.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(names.is_empty(), "{names:?}");
}

/// Two runs that create the same database at once both succeed, each with its own op.
#[test]
fn two_runs_creating_one_database_at_once_both_succeed() {
    if sqlite_only("two processes creating one SQLite file") {
        return;
    }
    for round in 0..5 {
        let sandbox = Sandbox::new();
        sandbox.write("plan.yaml", QUICK);
        // Both started before either is waited for, so that they race.
        let children: Vec<_> = (0..2)
            .map(|_| {
                sandbox
                    .command(&["run", "plan.yaml"])
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::piped())
                    .spawn()
                    .unwrap()
            })
            .collect();
        for child in children {
            let out = child.wait_with_output().unwrap();
            assert_eq!(code(&out), Some(0), "round {round}: {}", stderr(&out));
        }
        let mut ids = op_ids(&sandbox);
        ids.sort_unstable();
        assert_eq!(ids, vec![1, 2], "round {round}");
    }
}

/// The frames of a write-ahead log: (offset of the frame, whether it ends a transaction).
fn wal_frames(wal: &[u8]) -> Vec<(usize, bool)> {
    let page = u32::from_be_bytes(wal[8..12].try_into().unwrap()) as usize;
    let size = 24 + page;
    (0..(wal.len() - 32) / size)
        .map(|i| {
            let at = 32 + i * size;
            (
                at,
                u32::from_be_bytes(wal[at + 4..at + 8].try_into().unwrap()) != 0,
            )
        })
        .collect()
}

/// A writer killed with `kill -9` leaves its committed transactions in the log. One byte flipped
/// in the middle of them: SQLite would stop reading there and drop the later ops (their ids
/// given again to new ops). cairn refuses the database instead (exit 2, with the ways on), and
/// `cairn db recover` makes it usable, keeping what is readable; the next op's id is past every
/// id shown before.
#[test]
fn a_damaged_log_is_refused_and_recover_never_reuses_an_op_id() {
    if sqlite_only("a SQLite write-ahead log's frames") {
        return;
    }
    let sandbox = Sandbox::new();
    sandbox.write("plan.yaml", QUICK);
    sandbox.write(
        "slow.yaml",
        "name: slow\nsteps:\n  - id: first\n    run: echo first\n  - id: wait\n    needs: [first]\n    run: touch waiting; sleep 60\n",
    );
    for _ in 0..3 {
        let out = sandbox.cairn(&["run", "plan.yaml"]);
        assert_eq!(code(&out), Some(0), "{}", stderr(&out));
    }
    let mut slow = sandbox.spawn(&["run", "slow.yaml"]);
    sandbox.wait_for("waiting", std::time::Duration::from_secs(20));
    let shown = op_ids(&sandbox);
    assert_eq!(shown, vec![4, 3, 2, 1]);
    let uuid = sandbox.show(4)["uuid"].as_str().unwrap().to_owned();
    slow.kill().unwrap();
    slow.wait().unwrap();
    for pid in step_processes(&uuid) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap()),
            nix::sys::signal::Signal::SIGKILL,
        );
    }

    let wal_path = sandbox.path().join("cairn.db-wal");
    let mut wal = std::fs::read(&wal_path).unwrap();
    let frames = wal_frames(&wal);
    let commits: Vec<usize> = (0..frames.len()).filter(|&i| frames[i].1).collect();
    assert!(
        commits.len() >= 3,
        "too few commits in the log: {commits:?}"
    );
    // The first frame of the log, with several transactions committed after it: an op's submit,
    // the last one's at least (a process that closes the database last may have moved what the
    // log held before into the database file).
    let victim = 0;
    wal[frames[victim].0 + 24 + 100] ^= 0xff;
    std::fs::write(&wal_path, &wal).unwrap();

    for args in [&["status"][..], &["run", "plan.yaml"]] {
        let out = sandbox.cairn(args);
        let err = stderr(&out);
        assert_eq!(code(&out), Some(2), "{args:?}: {err}");
        assert!(
            err.contains("cairn.db-wal")
                && err.contains(&format!("damaged at frame {}", victim + 1))
                && err.contains("backup")
                && err.contains("cairn db recover"),
            "{args:?}: {err}"
        );
    }

    let out = sandbox.cairn(&["db", "recover"]);
    let err = stderr(&out);
    assert_eq!(code(&out), Some(0), "{err}");
    assert!(
        err.contains("dropped") && err.contains("new op ids start at"),
        "{err}"
    );
    let kept = op_ids(&sandbox);
    assert!(kept.len() < shown.len(), "nothing was dropped: {kept:?}");
    let out = sandbox.cairn(&["run", "plan.yaml"]);
    assert_eq!(code(&out), Some(0), "{}", stderr(&out));
    let next = op_ids(&sandbox)[0];
    assert!(
        next > shown[0] + 1_000,
        "op id {next} may have been shown before"
    );
    // A second recover finds nothing to do.
    let out = sandbox.cairn(&["db", "recover"]);
    assert_eq!(code(&out), Some(0), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("nothing to recover"),
        "{}",
        stderr(&out)
    );
}

/// A command as the user who owns the sandbox: as root, the permission bits this test is about
/// do not apply, so it runs as `nobody` (util-linux's `setpriv`).
fn as_owner(sandbox: &Sandbox, args: &[&str]) -> std::process::Output {
    let mut command = if nix::unistd::geteuid().is_root() {
        let mut c = Command::new("setpriv");
        c.args(["--reuid=65534", "--regid=65534", "--clear-groups"]);
        c.arg(env!("CARGO_BIN_EXE_cairn"));
        c
    } else {
        Command::new(env!("CARGO_BIN_EXE_cairn"))
    };
    command
        .args(args)
        .current_dir(sandbox.path())
        .env("CAIRN_DB", sandbox.path().join("cairn.db"))
        .env("NO_COLOR", "1")
        .output()
        .unwrap()
}

/// Reading a read-only (0444) database whose `-wal` and `-shm` do not exist yet must not leave
/// them read-only: once the database is made writable again, a run writes.
#[test]
fn a_read_only_database_read_then_made_writable_can_be_written() {
    if sqlite_only("SQLite files made read-only") {
        return;
    }
    let sandbox = Sandbox::new();
    sandbox.write("plan.yaml", QUICK);
    if nix::unistd::geteuid().is_root() {
        let dir = sandbox.path();
        for path in [dir.to_path_buf(), dir.join("plan.yaml")] {
            std::os::unix::fs::chown(&path, Some(65534), Some(65534)).unwrap();
        }
    }
    let out = as_owner(&sandbox, &["run", "plan.yaml"]);
    assert_eq!(code(&out), Some(0), "{}", stderr(&out));
    let db = sandbox.path().join("cairn.db");
    // A checkpoint by the last connection to close removes `-wal` and `-shm`, as after a clean
    // shutdown or a restored backup.
    let status = Command::new("sqlite3")
        .arg(&db)
        .arg("PRAGMA wal_checkpoint(TRUNCATE);")
        .stdout(std::process::Stdio::null())
        .status()
        .expect("the sqlite3 shell is installed (apt-get install sqlite3)");
    assert!(status.success());
    for side in ["cairn.db-wal", "cairn.db-shm"] {
        assert!(!sandbox.path().join(side).exists(), "{side} is still there");
    }
    std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o444)).unwrap();
    let out = as_owner(&sandbox, &["status"]);
    assert_eq!(code(&out), Some(0), "{}", stderr(&out));
    for side in ["cairn.db-wal", "cairn.db-shm"] {
        if let Ok(meta) = std::fs::metadata(sandbox.path().join(side)) {
            assert_ne!(
                meta.permissions().mode() & 0o200,
                0,
                "{side} was left without its owner's write bit"
            );
        }
    }
    std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o600)).unwrap();
    let out = as_owner(&sandbox, &["run", "plan.yaml"]);
    assert_eq!(code(&out), Some(0), "{}", stderr(&out));
}

/// A torn tail (a crash in the middle of writing the last transaction: its last frame cut short,
/// or wrong) is not damage: nothing after it was committed, and the database reads as before.
#[test]
fn a_torn_tail_of_the_log_is_not_damage() {
    if sqlite_only("a SQLite write-ahead log's frames") {
        return;
    }
    let sandbox = Sandbox::new();
    sandbox.write("plan.yaml", QUICK);
    let out = sandbox.cairn(&["run", "plan.yaml"]);
    assert_eq!(code(&out), Some(0), "{}", stderr(&out));
    // A reader holds the database open while the second op runs, so that the last writer to close
    // does not checkpoint the log away; then it dies without closing (as a crash leaves a log).
    let mut holder = Command::new("sqlite3")
        .arg(sandbox.path().join("cairn.db"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("the sqlite3 shell (.ci/test installs it)");
    {
        use std::io::{BufRead as _, Write as _};
        let mut stdin = holder.stdin.take().unwrap();
        writeln!(stdin, "SELECT count(*) FROM ops;").unwrap();
        let mut line = String::new();
        std::io::BufReader::new(holder.stdout.as_mut().unwrap())
            .read_line(&mut line)
            .unwrap();
        holder.stdin = Some(stdin);
    }
    let out = sandbox.cairn(&["run", "plan.yaml"]);
    assert_eq!(code(&out), Some(0), "{}", stderr(&out));
    holder.kill().unwrap();
    holder.wait().unwrap();
    let wal_path = sandbox.path().join("cairn.db-wal");
    let mut wal = std::fs::read(&wal_path).unwrap();
    let frames = wal_frames(&wal);
    let (last, _) = *frames.last().unwrap();
    // The last frame's page wrong, and cut short.
    wal[last + 24 + 100] ^= 0xff;
    wal.truncate(last + 24 + 2048);
    std::fs::write(&wal_path, &wal).unwrap();
    let out = sandbox.cairn(&["status"]);
    assert_eq!(code(&out), Some(0), "{}", stderr(&out));
    let out = sandbox.cairn(&["run", "plan.yaml"]);
    assert_eq!(code(&out), Some(0), "{}", stderr(&out));
    assert_eq!(op_ids(&sandbox)[0], 3);
}

/// Ops whose params (and the logs of their steps, which print them) fill pages, checkpointed
/// into the file: the file's bytes and where `needle` first lies in them (`"marker-03-` is op 3's
/// param in JSON, `log-marker-03-` its step's output).
fn ops_on_pages(sandbox: &Sandbox, needle: &str) -> (Vec<u8>, usize) {
    sandbox.write(
        "plan.yaml",
        "name: filled\nparams:\n  x: {type: string}\nsteps:\n  - id: one\n    run: echo log-{{ params.x }}\n",
    );
    for n in 1..=30 {
        let x = format!("marker-{n:02}-{}", "q".repeat(200));
        let out = sandbox.cairn(&["run", "plan.yaml", "-p", &format!("x={x}")]);
        assert_eq!(code(&out), Some(0), "{}", stderr(&out));
    }
    sandbox.sql("PRAGMA wal_checkpoint(TRUNCATE);");
    let bytes = std::fs::read(sandbox.path().join("cairn.db")).unwrap();
    let at = bytes
        .windows(needle.len())
        .position(|w| w == needle.as_bytes())
        .unwrap_or_else(|| panic!("`{needle}` is not in the file"));
    (bytes, at)
}

/// A value that is no longer UTF-8 on a damaged page reads as damage, named, exit 2 — not as
/// "invalid utf-8 sequence".
#[test]
fn a_damaged_value_reads_as_damage() {
    if sqlite_only("the bytes of a SQLite file") {
        return;
    }
    let sandbox = Sandbox::new();
    let needle = b"\"marker-07-";
    let (mut bytes, _) = ops_on_pages(&sandbox, "\"marker-07-");
    // Every copy: a page's free space may still hold an older copy of the row before the live one.
    let copies: Vec<usize> = bytes
        .windows(needle.len())
        .enumerate()
        .filter_map(|(at, w)| (w == needle).then_some(at))
        .collect();
    for at in copies {
        bytes[at + 1..at + 5].copy_from_slice(&[0xff, 0xfe, 0x80, 0x81]);
    }
    std::fs::write(sandbox.path().join("cairn.db"), &bytes).unwrap();
    let out = sandbox.cairn(&["show", "7"]);
    assert_eq!(code(&out), Some(2), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("cairn.db") && err.contains("is damaged") && err.contains(".recover"),
        "{err}"
    );
}

/// A page whose cells point nowhere, in a part of the file the next op would not touch (an old
/// op's logs): the
/// command that would write refuses (exit 2, damage named) and leaves the file as it was;
/// `cairn db check` finds it too; an undamaged file checks clean.
#[test]
fn a_damaged_page_is_found_before_anything_is_written() {
    if sqlite_only("the bytes of a SQLite file") {
        return;
    }
    let sandbox = Sandbox::new();
    let out = sandbox.cairn(&["db", "check"]);
    assert_eq!(code(&out), Some(2), "no database yet: {}", stderr(&out));
    let (mut bytes, at) = ops_on_pages(&sandbox, "log-marker-03-");
    let out = sandbox.cairn(&["db", "check"]);
    assert_eq!(code(&out), Some(0), "{}", stderr(&out));
    assert!(stdout(&out).contains("no damage found"), "{}", stdout(&out));
    // The cell pointers of the page of op 3's logs, past its 8-byte header, overwritten.
    let page = at / 4096 * 4096;
    bytes[page + 8..page + 40].fill(0xff);
    let db = sandbox.path().join("cairn.db");
    std::fs::write(&db, &bytes).unwrap();
    for args in [
        &["run", "plan.yaml", "-p", "x=new"][..],
        &["submit", "plan.yaml", "-p", "x=new"],
        &["db", "check"],
    ] {
        let out = sandbox.cairn(args);
        assert_eq!(code(&out), Some(2), "{args:?}: {}", stderr(&out));
        let err = stderr(&out);
        assert!(err.contains("is damaged"), "{args:?}: {err}");
        assert_eq!(std::fs::read(&db).unwrap(), bytes, "{args:?} wrote to it");
    }
}
