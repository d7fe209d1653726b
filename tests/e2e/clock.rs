//! Recorded times, through the real binary: a wall clock set back during a run leaves no end before
//! its start and no negative elapsed time; a step's time runs from its process's start, not from
//! a wait for the database before it.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::support::{Sandbox, code, sqlite_only, stderr};

/// libfaketime, which moves the wall clock of the processes it is preloaded into (the monotonic
/// clock left alone, as setting the system's clock leaves it).
const FAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1";

/// `(name, started_at, ended_at)` of each task of op 1, and of each attempt, in milliseconds.
fn recorded_times(sandbox: &Sandbox) -> Vec<(String, i64, i64)> {
    let rows = sandbox.sql(
        "SELECT name, started_at, ended_at FROM tasks WHERE op_id = 1 UNION ALL \
         SELECT 'attempt', started_at, ended_at FROM attempts WHERE op_id = 1 UNION ALL \
         SELECT 'op', started_at, ended_at FROM ops WHERE id = 1",
    );
    rows.lines()
        .map(|line| {
            let cols: Vec<&str> = line.split('|').map(str::trim).collect();
            (
                cols[0].to_owned(),
                cols[1].parse().unwrap(),
                cols[2].parse().unwrap(),
            )
        })
        .collect()
}

/// Waits until `path` exists (a step made it).
fn wait_for_file(path: &Path) {
    let started = Instant::now();
    while !path.exists() {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "{} never appeared",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_wall_clock_set_back_during_a_run_never_ends_a_task_before_it_starts() {
    assert!(
        Path::new(FAKETIME).exists(),
        "libfaketime is missing: install the `libfaketime` package"
    );
    let sandbox = Sandbox::new();
    sandbox.write(
        "plan.yaml",
        "name: clock\nsteps:\n  - id: slow\n    run: touch started; sleep 2\n  - id: after\n    needs: [slow]\n    run: sleep 0.3\n",
    );
    let offset = sandbox.write("offset", "+0\n");
    let mut command = sandbox.command(&["run", "plan.yaml"]);
    command
        .env("LD_PRELOAD", FAKETIME)
        .env("FAKETIME_TIMESTAMP_FILE", &offset)
        .env("FAKETIME_NO_CACHE", "1")
        .env("FAKETIME_DONT_FAKE_MONOTONIC", "1")
        .stderr(Stdio::piped());
    let child = command.spawn().unwrap();
    wait_for_file(&sandbox.path().join("started"));
    // Two hours back, while `slow` runs.
    std::fs::write(&offset, "-2h\n").unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(code(&out), Some(0), "{}", stderr(&out));
    let times = recorded_times(&sandbox);
    assert_eq!(times.len(), 5, "{times:?}");
    for (name, started, ended) in &times {
        assert!(
            ended >= started,
            "{name} ended before it started: {times:?}"
        );
    }
    let op = &times.iter().find(|t| t.0 == "op").unwrap();
    assert!(
        op.2 - op.1 >= 2_000 && op.2 - op.1 < 3_600_000,
        "the op's recorded time is off: {times:?}"
    );
    let status = sandbox.json(&["status", "--json"]);
    let elapsed = status[0]["elapsed_ms"].as_i64().unwrap();
    assert!(
        (2_000..3_600_000).contains(&elapsed),
        "elapsed_ms {elapsed}"
    );
}

#[test]
fn a_steps_time_runs_from_its_process_not_from_a_wait_for_the_database() {
    if sqlite_only("holding SQLite's write lock") {
        return;
    }
    let sandbox = Sandbox::new();
    sandbox.write(
        "plan.yaml",
        "name: waits\nsteps:\n  - id: first\n    run: touch first-ran; sleep 1\n  - id: second\n    needs: [first]\n    run: sleep 1\n",
    );
    let mut command = sandbox.command(&["run", "plan.yaml"]);
    command
        .env("CAIRN_BUSY_TIMEOUT_MS", "60000")
        .stderr(Stdio::piped());
    let child = command.spawn().unwrap();
    wait_for_file(&sandbox.path().join("first-ran"));
    // `second` is to start while another process holds the database for 4 s.
    let mut holder = sandbox.hold_the_database(false, "");
    std::thread::sleep(Duration::from_secs(4));
    holder.kill().unwrap();
    holder.wait().unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(code(&out), Some(0), "{}", stderr(&out));
    let times = recorded_times(&sandbox);
    let second = times.iter().find(|t| t.0 == "second").unwrap();
    let took = second.2 - second.1;
    assert!(
        (1_000..3_500).contains(&took),
        "`second` slept 1 s after a 3 s wait for the database, recorded as {took} ms: {times:?}"
    );
    let err = stderr(&out);
    let line = err
        .lines()
        .find(|l| l.contains("second: succeeded in"))
        .unwrap_or_else(|| panic!("no line of `second` succeeding: {err}"));
    assert!(
        line.ends_with(" 1s") || line.ends_with(" 2s"),
        "the live line counts the wait: {line}"
    );
}
