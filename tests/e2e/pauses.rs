//! Scoped pauses and maintenance windows: `cairn pause --plan NAME`, `--key PREFIX`, `--for`.

use std::time::{Duration, Instant};

use crate::support::{Sandbox, code, stderr, stdout};

const BACKUP: &str = "name: backup\nlock: pg/{{ params.cluster }}\nparams:\n  cluster: {default: main}\nsteps:\n  - id: dump\n    run: echo dumped >> dumps\n";
const REPORT: &str = "name: report\nsteps:\n  - id: count\n    run: echo counted >> counts\n";
const MYSQL: &str = "name: mysql-backup\nlock: mysql/main\nsteps:\n  - id: dump\n    run: echo dumped >> mysql-dumps\n";

/// Waits until op `op`'s `current_task` contains `text`; returns it.
fn note_of(sandbox: &Sandbox, op: usize, text: &str) -> String {
    let started = Instant::now();
    loop {
        let ops = sandbox.json(&["status", "--json"]);
        let note = ops
            .as_array()
            .unwrap()
            .iter()
            .find(|o| o["id"] == op)
            .and_then(|o| o["current_task"].as_str())
            .unwrap_or_default()
            .to_owned();
        if note.contains(text) {
            return note;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "{ops:#}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A pause of one plan holds that plan's ops and no other: `run` refuses with who, why and the
/// command that lifts it; `locks` lists it; `unpause` of another scope is refused and names the
/// one that holds.
#[test]
fn a_pause_of_one_plan_holds_only_that_plan() {
    let sandbox = Sandbox::new();
    sandbox.write("backup.yaml", BACKUP);
    sandbox.write("report.yaml", REPORT);
    let out = sandbox.cairn(&["pause", "--plan", "backup", "--reason", "disk swap"]);
    assert_eq!(code(&out), Some(0), "{}", stderr(&out));
    let refused = sandbox.cairn(&["run", "backup.yaml"]);
    assert_eq!(code(&refused), Some(2), "{}", stderr(&refused));
    let err = stderr(&refused);
    assert!(
        err.contains("paused for plan backup")
            && err.contains("disk swap")
            && err.contains("`cairn unpause --plan backup`"),
        "{err}"
    );
    assert!(!sandbox.path().join("dumps").exists());
    let out = sandbox.cairn(&["run", "report.yaml"]);
    assert_eq!(code(&out), Some(0), "{}", stderr(&out));

    let locks = sandbox.cairn(&["locks"]);
    assert!(
        stdout(&locks).contains("paused plan backup by") && stdout(&locks).contains("disk swap"),
        "{}",
        stdout(&locks)
    );
    let json = sandbox.json(&["locks", "--json"]);
    assert_eq!(json["paused"], serde_json::Value::Null, "{json:#}");
    assert_eq!(json["pauses"][0]["plan"], "backup", "{json:#}");

    let wrong = sandbox.cairn(&["unpause", "--plan", "report"]);
    assert_eq!(code(&wrong), Some(2));
    assert!(
        stderr(&wrong).contains("no pause of plan report")
            && stderr(&wrong).contains("`cairn unpause --plan backup`"),
        "{}",
        stderr(&wrong)
    );
    // The global unpause is another scope: the plan's pause stays.
    assert_eq!(code(&sandbox.cairn(&["unpause"])), Some(0));
    assert_eq!(code(&sandbox.cairn(&["run", "backup.yaml"])), Some(2));
    assert_eq!(
        code(&sandbox.cairn(&["unpause", "--plan", "backup"])),
        Some(0)
    );
    let out = sandbox.cairn(&["run", "backup.yaml"]);
    assert_eq!(code(&out), Some(0), "{}", stderr(&out));
}

/// A pause of a lock-key prefix with `--for` is a maintenance window: ops whose key starts with
/// the prefix are held, others run, and once the window ends the held ones run without anyone
/// lifting it.
#[test]
fn a_maintenance_window_holds_a_key_prefix_until_it_ends() {
    let sandbox = Sandbox::new();
    sandbox.write("backup.yaml", BACKUP);
    sandbox.write("mysql.yaml", MYSQL);
    let out = sandbox.cairn(&[
        "pause", "--key", "pg/", "--for", "3s", "--reason", "upgrade",
    ]);
    assert_eq!(code(&out), Some(0), "{}", stderr(&out));
    assert!(stderr(&out).contains("until"), "{}", stderr(&out));
    let refused = sandbox.cairn(&["run", "backup.yaml", "-p", "cluster=east"]);
    assert_eq!(code(&refused), Some(2));
    assert!(
        stderr(&refused).contains("lock keys starting with pg/")
            && stderr(&refused).contains("until"),
        "{}",
        stderr(&refused)
    );
    let out = sandbox.cairn(&["run", "mysql.yaml"]);
    assert_eq!(code(&out), Some(0), "{}", stderr(&out));
    // The window ends by itself.
    let started = Instant::now();
    loop {
        let out = sandbox.cairn(&["run", "backup.yaml", "-p", "cluster=east"]);
        if code(&out) == Some(0) {
            break;
        }
        assert!(stderr(&out).contains("upgrade"), "{}", stderr(&out));
        assert!(started.elapsed() < Duration::from_secs(30));
        std::thread::sleep(Duration::from_millis(300));
    }
    assert!(stdout(&sandbox.cairn(&["locks"])).contains("not paused"));
}

/// `serve` leaves a held op queued and says why in `status`; the pause outlives a `kill -9` of
/// serve; once lifted, the op runs, once.
#[test]
fn serve_holds_a_paused_plan_s_ops_across_a_kill_and_runs_them_when_lifted() {
    let sandbox = Sandbox::new();
    sandbox.write("backup.yaml", BACKUP);
    sandbox.write("report.yaml", REPORT);
    assert_eq!(
        code(&sandbox.cairn(&["pause", "--plan", "backup", "--reason", "disk swap"])),
        Some(0)
    );
    assert_eq!(code(&sandbox.cairn(&["submit", "backup.yaml"])), Some(0));
    assert_eq!(code(&sandbox.cairn(&["submit", "report.yaml"])), Some(0));
    let mut serve = sandbox.spawn(&["serve", "--poll", "100ms"]);
    let note = note_of(&sandbox, 1, "paused");
    assert!(
        note.contains("for plan backup") && note.contains("disk swap"),
        "{note}"
    );
    sandbox.wait_for("counts", Duration::from_secs(30));
    serve.kill().unwrap();
    serve.wait().unwrap();
    let status = sandbox.json(&["status", "--json"]);
    let backup = status
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["id"] == 1)
        .unwrap();
    assert_eq!(backup["status"], "queued", "{status:#}");
    assert!(!sandbox.path().join("dumps").exists());

    let mut serve = sandbox.spawn(&["serve", "--poll", "100ms"]);
    note_of(&sandbox, 1, "paused");
    assert_eq!(
        code(&sandbox.cairn(&["unpause", "--plan", "backup"])),
        Some(0)
    );
    sandbox.wait_for("dumps", Duration::from_secs(30));
    let started = Instant::now();
    while sandbox
        .json(&["status", "--json"])
        .as_array()
        .unwrap()
        .iter()
        .any(|o| o["id"] == 1 && o["status"] != "succeeded")
    {
        assert!(started.elapsed() < Duration::from_secs(30));
        std::thread::sleep(Duration::from_millis(100));
    }
    serve.kill().unwrap();
    serve.wait().unwrap();
    let dumps = std::fs::read_to_string(sandbox.path().join("dumps")).unwrap();
    assert_eq!(dumps, "dumped\n");
}
