//! `until`: a step that waits for a state, through the real binary: each run that does not reach
//! it is a line of progress, not a failure; a wait cut by `kill -9` waits again on resume; a fan-out
//! item waits on its own; the wait ends at its timeout; a probe runs after the command ran once.

use std::time::{Duration, Instant};

use crate::support::{Sandbox, code, stderr, task};

/// Waits until the op's current tasks report a progress that contains `text`.
fn wait_for_waiting(sandbox: &Sandbox, text: &str) -> serde_json::Value {
    let started = Instant::now();
    loop {
        let ops = sandbox.json(&["status", "--json"]);
        let found = ops[0]["current_tasks"].as_array().is_some_and(|c| {
            c.iter()
                .any(|t| t["progress"].as_str().is_some_and(|p| p.contains(text)))
        });
        if found {
            return ops;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "never showed `{text}`: {ops}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_wait_is_progress_not_failure_and_a_killed_wait_waits_again() {
    let sandbox = Sandbox::new();
    sandbox.write(
        "plan.yaml",
        "name: load\nsteps:\n  - id: loaded\n    for_each: [a, b]\n    run: |\n      echo \"run\" >> runs-{{ item }}\n      if [ ! -f ready-{{ item }} ]; then echo table {{ item }} not loaded yet >&2; exit 1; fi\n    until: { every: 200ms, timeout: 5m }\n",
    );
    let mut run = sandbox.spawn(&["run", "plan.yaml"]);
    sandbox.wait_for_db();
    wait_for_waiting(&sandbox, "waiting: exit code 1: table a not loaded yet");
    sandbox.write("ready-b", "");
    let show = sandbox.show(1);
    // A wait is one attempt, however many runs it made.
    assert_eq!(task(&show, "loaded[a]")["attempts"], 1, "{show:#}");
    run.kill().unwrap();
    run.wait().unwrap();

    let resumed = sandbox
        .command(&["resume", "1"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The resumed attempt waits (its command runs at least twice) before `a` is loaded: the
    // progress the killed run stored may show before the resume runs anything.
    let before = sandbox.read("runs-a").lines().count();
    let started = Instant::now();
    while sandbox.read("runs-a").lines().count() < before + 2 {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the resume never waited"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    wait_for_waiting(&sandbox, "table a not loaded yet");
    sandbox.write("ready-a", "");
    let out = resumed.wait_with_output().unwrap();
    assert_eq!(code(&out), Some(0), "{}", stderr(&out));
    assert!(!stderr(&out).contains("failed"), "{}", stderr(&out));
    let show = sandbox.show(1);
    assert_eq!(show["status"], "succeeded");
    let history = task(&show, "loaded[a]")["history"]
        .as_array()
        .unwrap()
        .clone();
    assert!(
        history.iter().all(|a| a["status"] != "failed"),
        "a wait's runs are not failures: {history:?}"
    );
    assert!(
        sandbox.read("runs-a").lines().count() > 2,
        "the command ran again while it waited"
    );
}

#[test]
fn a_wait_ends_at_its_timeout_and_a_probe_follows_one_run_of_the_command() {
    let sandbox = Sandbox::new();
    sandbox.write(
        "never.yaml",
        "name: never\nsteps:\n  - id: loaded\n    run: echo 'not yet' >&2; exit 1\n    until: { every: 100ms, timeout: 1s }\n",
    );
    let out = sandbox.cairn(&["run", "never.yaml"]);
    assert_eq!(code(&out), Some(1), "{}", stderr(&out));
    let show = sandbox.show(1);
    let error = task(&show, "loaded")["error"].as_str().unwrap().to_owned();
    assert!(
        error.contains("`until` gave up after 1s") && error.contains("not yet"),
        "{error}"
    );

    sandbox.write(
        "server.yaml",
        "name: server\nsteps:\n  - id: start\n    run: |\n      echo started >> starts\n      echo port=5433 >> \"$CAIRN_OUTPUT\"\n    outputs: [port]\n    until: { probe: 'test -f up', every: 100ms, timeout: 5m }\n  - id: use\n    needs: [start]\n    run: echo {{ steps.start.outputs.port }} > used\n",
    );
    let mut run = sandbox.spawn(&["run", "server.yaml"]);
    wait_for_waiting(&sandbox, "waiting");
    std::thread::sleep(Duration::from_millis(500));
    sandbox.write("up", "");
    assert!(run.wait().unwrap().success());
    assert_eq!(
        sandbox.read("starts").lines().count(),
        1,
        "the command ran once"
    );
    assert_eq!(sandbox.read("used").trim(), "5433");
}

#[test]
fn an_until_is_checked_where_it_is_written() {
    let sandbox = Sandbox::new();
    for (plan, says) in [
        (
            "name: p\nsteps:\n  - id: a\n    sleep: 1s\n    until: { timeout: 1m }\n",
            "plan.yaml:5:12",
        ),
        (
            "name: p\nsteps:\n  - id: a\n    run: 'true'\n    until: { every: 2m, timeout: 1m }\n",
            "is not shorter than `until.timeout`",
        ),
        (
            "name: p\nsteps:\n  - id: a\n    run: 'true'\n    until: { every: 1s }\n",
            "timeout",
        ),
    ] {
        sandbox.write("plan.yaml", plan);
        let out = sandbox.cairn(&["validate", "plan.yaml"]);
        assert_eq!(code(&out), Some(2), "{plan}");
        assert!(stderr(&out).contains(says), "{plan}: {}", stderr(&out));
    }
}
