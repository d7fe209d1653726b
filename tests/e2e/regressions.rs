//! Regressions found by reviewing the durable core, each reproduced through the binary.

use std::fmt::Write as _;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::Sandbox;

fn cairn(dir: &Sandbox, args: &[&str]) -> Command {
    dir.command(args)
}

fn show(dir: &Sandbox, op: &str) -> Value {
    let out = cairn(dir, &["show", op, "--json"]).output().unwrap();
    serde_json::from_slice(&out.stdout).unwrap()
}

fn task<'a>(show: &'a Value, id: &str) -> &'a Value {
    show["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["id"] == id)
        .unwrap()
}

fn wait_for(path: &std::path::Path) {
    let started = Instant::now();
    while !path.exists() {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "{} never appeared",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A dependent of a failed `continue_on_error` step must wait, on resume, for that step's new run
/// and for its other needs: it started early, and the scheduler's counts underflowed.
#[test]
fn resume_waits_for_every_need_of_a_task_after_continue_on_error() {
    let dir = Sandbox::new();
    std::fs::write(
        dir.path().join("plan.yaml"),
        r"name: coe
steps:
  - id: a
    continue_on_error: true
    run: test -f fixed
  - id: c
    run: |
      test -f fixed
      sleep 0.5
      touch c-done
  - id: b
    needs: [a, c]
    run: |
      test -f c-done || { echo 'b ran before c finished' >&2; exit 1; }
",
    )
    .unwrap();
    let first = cairn(&dir, &["run", "plan.yaml"]).output().unwrap();
    assert_eq!(first.status.code(), Some(1));
    std::fs::write(dir.path().join("fixed"), "").unwrap();
    let resumed = cairn(&dir, &["resume", "1"]).output().unwrap();
    assert_eq!(
        resumed.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&resumed.stderr)
    );
    assert_eq!(task(&show(&dir, "1"), "b")["attempts"], 1);
}

/// A background process that leaves the step's session and drops its environment holds the step's
/// stdout open: the step must still end when its leader does (it waited until the process ended).
#[test]
fn a_daemon_holding_stdout_does_not_hold_the_step() {
    let dir = Sandbox::new();
    std::fs::write(
        dir.path().join("plan.yaml"),
        "name: daemon\nsteps:\n  - id: start\n    run: |\n      setsid env -i /bin/sleep 30 &\n      echo $! > daemon.pid\n",
    )
    .unwrap();
    let started = Instant::now();
    let out = cairn(&dir, &["run", "plan.yaml"]).output().unwrap();
    let took = started.elapsed();
    let pid: i32 = std::fs::read_to_string(dir.path().join("daemon.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        took < Duration::from_secs(15),
        "the step waited for the daemon: {took:?}"
    );
}

/// A crash in the middle of a retry round must not give the task a fresh budget on resume: with
/// `attempts: 3` it ran 5 times.
#[test]
fn the_retry_budget_survives_a_crash_during_a_retry_delay() {
    let dir = Sandbox::new();
    std::fs::write(
        dir.path().join("plan.yaml"),
        "name: retry\nsteps:\n  - id: flaky\n    retry: { attempts: 3, delay: 2s }\n    run: |\n      echo $CAIRN_ATTEMPT >> tries\n      exit 1\n",
    )
    .unwrap();
    let mut run = cairn(&dir, &["run", "plan.yaml"])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for(&dir.path().join("tries"));
    // Attempt 1 failed; the engine now waits 2 s before attempt 2.
    std::thread::sleep(Duration::from_millis(500));
    run.kill().unwrap();
    run.wait().unwrap();
    let resumed = cairn(&dir, &["resume", "1"]).output().unwrap();
    assert_eq!(resumed.status.code(), Some(1));
    let tries = std::fs::read_to_string(dir.path().join("tries")).unwrap();
    assert_eq!(tries, "1\n2\n3\n", "three attempts in all");
    // A failed task resumed by a person gets a fresh round.
    let again = cairn(&dir, &["resume", "1"]).output().unwrap();
    assert_eq!(again.status.code(), Some(1));
    let tries = std::fs::read_to_string(dir.path().join("tries")).unwrap();
    assert_eq!(tries.lines().count(), 6);
}

/// `logs --follow` followed one cursor across parallel tasks and dropped most of their output.
#[test]
fn logs_follow_shows_every_line_of_parallel_tasks() {
    let dir = Sandbox::new();
    std::fs::write(
        dir.path().join("plan.yaml"),
        "name: chatty\nsteps:\n  - id: a\n    run: for i in 1 2 3 4 5 6; do echo a$i; sleep 0.25; done\n  - id: b\n    run: for i in 1 2 3 4 5 6; do echo b$i; sleep 0.25; done\n",
    )
    .unwrap();
    let mut run = cairn(&dir, &["run", "plan.yaml"])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Follow from as early as the op exists.
    let started = Instant::now();
    while !cairn(&dir, &["show", "1"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap()
        .success()
    {
        assert!(started.elapsed() < Duration::from_secs(20));
        std::thread::sleep(Duration::from_millis(20));
    }
    let follow = cairn(&dir, &["logs", "1", "--follow"]).output().unwrap();
    assert!(run.wait().unwrap().success());
    let text = String::from_utf8_lossy(&follow.stdout);
    for i in 1..=6 {
        assert!(
            text.contains(&format!("a{i}\n")) && text.contains(&format!("b{i}\n")),
            "missing line {i}:\n{text}"
        );
    }
}

/// Output written steadily (a line every 100 ms) reached the database only at the end: the flush
/// timer was reset by every chunk.
#[test]
fn steady_output_reaches_the_logs_while_the_step_runs() {
    let dir = Sandbox::new();
    std::fs::write(
        dir.path().join("plan.yaml"),
        "name: steady\nsteps:\n  - id: talk\n    run: |\n      for i in $(seq 1 40); do echo line$i; sleep 0.1; done\n",
    )
    .unwrap();
    let mut run = cairn(&dir, &["run", "plan.yaml"])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let logs = cairn(&dir, &["logs", "1"]).output().unwrap();
    let text = String::from_utf8_lossy(&logs.stdout).into_owned();
    run.kill().unwrap();
    run.wait().unwrap();
    assert!(
        text.contains("line5\n"),
        "after 2 s the logs held: {text:?}"
    );
}

/// A secret printed in two pieces, with a pause between them, reached the database in clear.
#[test]
fn a_secret_split_across_writes_is_masked() {
    let dir = Sandbox::new();
    std::fs::write(
        dir.path().join("plan.yaml"),
        "name: split\nparams:\n  pw: { secret: true, required: true }\nsteps:\n  - id: leak\n    env: { PW: \"{{ params.pw }}\" }\n    run: |\n      printf 'oops %s' \"${PW:0:8}\"\n      sleep 0.5\n      printf '%s done\\n' \"${PW:8}\"\n",
    )
    .unwrap();
    let secret = "hunter2-very-secret";
    let out = cairn(&dir, &["run", "plan.yaml", "-p", &format!("pw={secret}")])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let logs = cairn(&dir, &["logs", "1"]).output().unwrap();
    let text = String::from_utf8_lossy(&logs.stdout);
    assert!(text.contains("oops ******** done"), "{text}");
    dir.assert_not_stored(secret);
}

/// A `sqlite3` read of the database while an op runs (the schema is documented for that) made the
/// op lose every commit after it: cairn had opened and closed the file outside SQLite, which drops
/// the process's locks on it, and `sqlite3` then deleted the WAL under the live writer.
#[test]
fn a_sqlite3_read_during_a_run_loses_nothing() {
    if crate::support::sqlite_only("sqlite3 reading the database file under a live writer") {
        return;
    }
    let dir = Sandbox::new();
    std::fs::write(
        dir.path().join("plan.yaml"),
        "name: live\nsteps:\n  - id: a\n    run: |\n      touch started\n      while [ ! -f go ]; do sleep 0.05; done\n  - id: b\n    needs: [a]\n    noop: true\n",
    )
    .unwrap();
    let mut run = cairn(&dir, &["run", "plan.yaml"])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for(&dir.path().join("started"));
    // A reader inside cairn too (status opens the database read-only while the run writes).
    assert!(
        cairn(&dir, &["status"])
            .stdout(Stdio::null())
            .status()
            .unwrap()
            .success()
    );
    let out = Command::new("sqlite3")
        .arg(dir.path().join("cairn.db"))
        .arg("SELECT count(*) FROM ops;")
        .output()
        .unwrap();
    assert!(out.status.success());
    std::fs::write(dir.path().join("go"), "").unwrap();
    assert!(run.wait().unwrap().success());
    let show = show(&dir, "1");
    assert_eq!(show["status"], "succeeded", "{show:#}");
    assert_eq!(task(&show, "a")["status"], "succeeded");
    assert_eq!(task(&show, "b")["status"], "succeeded");
}

/// On resume, a step that already succeeded is kept even when a `continue_on_error` step it needs
/// fails again: it was released a second time, and every later resume was refused.
#[test]
fn a_kept_step_is_not_released_again_when_its_need_fails_again() {
    let dir = Sandbox::new();
    std::fs::write(
        dir.path().join("plan.yaml"),
        r"name: kept
steps:
  - id: a
    continue_on_error: true
    run: exit 1
  - id: b
    needs: [a]
    run: echo b >> b-ran
  - id: c
    needs: [b]
    run: test -f fixed
",
    )
    .unwrap();
    let first = cairn(&dir, &["run", "plan.yaml"]).output().unwrap();
    assert_eq!(first.status.code(), Some(1));
    for expected in [Some(1), Some(0)] {
        if expected == Some(0) {
            std::fs::write(dir.path().join("fixed"), "").unwrap();
        }
        let resumed = cairn(&dir, &["resume", "1"]).output().unwrap();
        assert_eq!(
            resumed.status.code(),
            expected,
            "{}",
            String::from_utf8_lossy(&resumed.stderr)
        );
    }
    let shown = show(&dir, "1");
    assert_eq!(task(&shown, "a")["attempts"], 3);
    assert_eq!(task(&shown, "b")["attempts"], 1);
    assert_eq!(task(&shown, "c")["attempts"], 3);
    let ran = std::fs::read_to_string(dir.path().join("b-ran")).unwrap();
    assert_eq!(ran, "b\n");
}

/// `--db` and `--json` are global: they may come before the subcommand as well as after it.
#[test]
fn global_options_may_come_before_the_subcommand() {
    let dir = Sandbox::new();
    std::fs::write(
        dir.path().join("plan.yaml"),
        "name: here\nsteps:\n  - id: a\n    noop: true\n",
    )
    .unwrap();
    let elsewhere = dir.path().join("elsewhere.db");
    let db = elsewhere.to_str().unwrap();
    let ran = cairn(&dir, &["--db", db, "run", "plan.yaml"])
        .output()
        .unwrap();
    assert_eq!(
        ran.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&ran.stderr)
    );
    assert!(elsewhere.exists());
    assert!(!dir.path().join("cairn.db").exists());
    for args in [
        ["--db", db, "status", "--json"],
        ["status", "--json", "--db", db],
        ["--json", "--db", db, "status"],
    ] {
        let out = cairn(&dir, &args).output().unwrap();
        assert_eq!(out.status.code(), Some(0));
        let ops: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(ops.as_array().map(Vec::len), Some(1), "{ops}");
    }
    for args in [
        ["--json", "--db", db, "status", "--watch"],
        ["--db", db, "status", "--watch", "--json"],
    ] {
        let out = cairn(&dir, &args).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(out.stdout.is_empty(), "{args:?}");
    }
}

/// `$CAIRN_OUTPUT` exists, empty, when the step starts, and neither it nor its directory is open
/// to other users.
#[test]
fn the_output_file_is_there_and_private() {
    let dir = Sandbox::new();
    std::fs::write(
        dir.path().join("plan.yaml"),
        r#"name: private
steps:
  - id: a
    outputs: [file, dir]
    run: |
      test -f "$CAIRN_OUTPUT" && ! test -s "$CAIRN_OUTPUT"
      echo "file=$(stat -c %a "$CAIRN_OUTPUT")" >> "$CAIRN_OUTPUT"
      echo "dir=$(stat -c %a "$(dirname "$CAIRN_OUTPUT")")" >> "$CAIRN_OUTPUT"
  - id: b
    needs: [a]
    run: test -f "$CAIRN_OUTPUT" && ! test -s "$CAIRN_OUTPUT"
"#,
    )
    .unwrap();
    let out = cairn(&dir, &["run", "plan.yaml"]).output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let shown = show(&dir, "1");
    let outputs = &task(&shown, "a")["outputs"];
    assert_eq!(outputs["file"], "600", "{outputs}");
    assert_eq!(outputs["dir"], "700", "{outputs}");
}

/// What a finished step leaves running, in its group or in a session of its own (with its marker),
/// is ended before the step it releases starts. A step that starts no process of its own skips that
/// sweep; one that does must not.
#[test]
fn what_a_finished_step_left_running_is_ended_before_the_next_starts() {
    let dir = Sandbox::new();
    std::fs::write(
        dir.path().join("plan.yaml"),
        "name: leftovers\nsteps:\n  - id: leave\n    run: |\n      sleep 1000 &\n      echo $! > grouped.pid\n      setsid sleep 1000 &\n      echo $! > session.pid\n  - id: next\n    needs: [leave]\n    run: |\n      for f in grouped.pid session.pid; do\n        echo \"$f $(cut -d' ' -f3 /proc/$(cat $f)/stat 2>/dev/null || echo gone)\" >> seen\n      done\n",
    )
    .unwrap();
    let out = cairn(&dir, &["run", "plan.yaml"]).output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let seen = std::fs::read_to_string(dir.path().join("seen")).unwrap();
    let states: Vec<&str> = seen.lines().collect();
    assert_eq!(states.len(), 2, "{seen}");
    for line in states {
        let (file, state) = line.split_once(' ').unwrap();
        // Ended: gone, or a zombie nobody reaped (it runs nothing).
        assert!(
            state == "gone" || state == "Z" || state.is_empty(),
            "{file}: the process was still running when the next step started ({state})"
        );
    }
}

/// Runs `plan` in `dir` with the list param `big` of 30,000 numbers, longer as JSON than the
/// kernel lets one string of a command line or an environment be (128 KiB); returns the run's
/// output and that JSON.
fn run_with_a_long_list(dir: &Sandbox, plan: &str) -> (std::process::Output, String) {
    std::fs::write(dir.path().join("plan.yaml"), plan).unwrap();
    let items: Vec<u32> = (0..30_000).collect();
    let json = serde_json::to_string(&items).unwrap();
    assert!(json.len() > 128 * 1024, "over the kernel's limit");
    std::fs::write(
        dir.path().join("params.json"),
        format!("{{\"big\": {json}}}"),
    )
    .unwrap();
    let out = cairn(dir, &["run", "plan.yaml", "--params", "params.json"])
        .output()
        .unwrap();
    (out, json)
}

/// A param too long for a process's environment (Linux refuses one string over 128 KiB: the step
/// could not start at all) is passed in a private file named by `CAIRN_PARAM_<NAME>_FILE`; a short
/// one stays in `CAIRN_PARAM_<NAME>`.
#[test]
fn a_param_too_long_for_the_environment_is_passed_in_a_file() {
    let dir = Sandbox::new();
    let (out, json) = run_with_a_long_list(
        &dir,
        "name: big\nparams:\n  big: { type: list, required: true }\n  small: { type: string, default: hello }\nsteps:\n  - id: use\n    run: |\n      test -z \"${CAIRN_PARAM_BIG:-}\"\n      test \"$CAIRN_PARAM_SMALL\" = hello\n      cp \"$CAIRN_PARAM_BIG_FILE\" seen.json\n      stat -c %a \"$CAIRN_PARAM_BIG_FILE\" > mode\n",
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        std::fs::read_to_string(dir.path().join("seen.json")).unwrap(),
        json
    );
    assert_eq!(
        std::fs::read_to_string(dir.path().join("mode"))
            .unwrap()
            .trim(),
        "400"
    );
}

/// A command line too long for the kernel fails the step with a message that says which string is
/// too long, not only `Argument list too long`.
#[test]
fn a_command_line_too_long_says_which_string_is() {
    let dir = Sandbox::new();
    let (out, _) = run_with_a_long_list(
        &dir,
        "name: long\nparams:\n  big: { type: list, required: true }\nsteps:\n  - id: inline\n    run: \"echo {{ params.big }}\"\n",
    );
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("the longest, argument 5") && stderr.contains("at most 128 KiB"),
        "{stderr}"
    );
}

/// A run killed with `kill -9` leaves its private directory (output files, long params) in the
/// temporary directory; the op's resume removes it, and a finished run leaves none.
#[test]
fn a_killed_runs_files_are_removed_by_its_resume() {
    let dir = Sandbox::new();
    let tmp = dir.path().join("tmp");
    std::fs::create_dir(&tmp).unwrap();
    std::fs::write(
        dir.path().join("plan.yaml"),
        "name: killed\nsteps:\n  - id: wait\n    run: |\n      test -f go || { touch started; sleep 1000; }\n",
    )
    .unwrap();
    let leftovers = || -> Vec<String> {
        std::fs::read_dir(&tmp)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("cairn-"))
            .collect()
    };
    let mut run = cairn(&dir, &["run", "plan.yaml"])
        .env("TMPDIR", &tmp)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for(&dir.path().join("started"));
    run.kill().unwrap();
    run.wait().unwrap();
    let left = leftovers();
    assert_eq!(left.len(), 1, "{left:?}");
    let uuid = show(&dir, "1")["uuid"].as_str().unwrap().to_owned();
    assert!(left[0].starts_with(&format!("cairn-{uuid}-")), "{left:?}");
    // Another op's directory is not touched.
    std::fs::create_dir(tmp.join("cairn-someone-else")).unwrap();
    std::fs::write(dir.path().join("go"), "").unwrap();
    let resumed = cairn(&dir, &["resume", "1"])
        .env("TMPDIR", &tmp)
        .output()
        .unwrap();
    assert_eq!(
        resumed.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&resumed.stderr)
    );
    assert_eq!(leftovers(), ["cairn-someone-else"]);
    // The killed step's `sleep` was ended by the resume's sweep.
}

/// After starting a step's process the engine moves to another CPU for a moment
/// (`procs::spawn::step_aside`); the steps it starts afterwards may still run on every CPU cairn
/// may use.
#[test]
fn steps_may_run_on_every_cpu_cairn_may_use() {
    let allowed = |status: &str| -> String {
        status
            .lines()
            .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
            .unwrap()
            .trim()
            .to_owned()
    };
    let ours = allowed(&std::fs::read_to_string("/proc/self/status").unwrap());
    let dir = Sandbox::new();
    let mut plan = String::from("name: cpus\nsteps:\n");
    for i in 0..4 {
        let needs = if i > 0 {
            format!("    needs: [s{}]\n", i - 1)
        } else {
            String::new()
        };
        let _ = write!(
            plan,
            "  - id: s{i}\n    run: cat /proc/self/status > status-{i}\n{needs}"
        );
    }
    std::fs::write(dir.path().join("plan.yaml"), plan).unwrap();
    let out = cairn(&dir, &["run", "plan.yaml"]).output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for i in 0..4 {
        let status = std::fs::read_to_string(dir.path().join(format!("status-{i}"))).unwrap();
        assert_eq!(allowed(&status), ours, "step {i}");
    }
}
