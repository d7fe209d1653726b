//! `adopt: true` on a step on this host (acceptance 7 of issue 19): the step runs under a
//! supervisor, so a `kill -9` of cairn leaves it running; the resume collects its result (it
//! finished meanwhile) or waits for it (it still runs): its side effect happens once, the task has
//! one attempt, its outputs reach the step after it, and its log holds what it printed before and
//! after the kill. `resume --restart-running` ends it and runs it again instead.

use std::time::{Duration, Instant};

use crate::support::{Sandbox, alive, code, events, stderr, stdout, task};

/// `work` notes its start, prints, waits for the test's `go`, prints again, writes its side
/// effect and an output; `after` uses that output.
const PLAN: &str = r#"name: adopted
steps:
  - id: work
    adopt: true
    outputs: [answer]
    run: |
      echo $$ >> starts
      echo "before the kill"
      while [ ! -f go ]; do sleep 0.05; done
      echo "after the kill"
      echo "to stderr" >&2
      echo once >> effects
      echo "answer=42" >> "$CAIRN_OUTPUT"
  - id: after
    needs: [work]
    run: echo {{ steps.work.outputs.answer }} > after
"#;

/// Runs the plan and kills cairn (`kill -9`) once `work` runs and printed its first line.
fn run_and_kill(sandbox: &Sandbox) -> u32 {
    sandbox.write("plan.yaml", PLAN);
    let mut run = sandbox.spawn(&["run", "plan.yaml"]);
    sandbox.wait_for("starts", Duration::from_secs(60));
    let started = Instant::now();
    while !stdout(&sandbox.cairn(&["logs", "1"])).contains("before the kill") {
        assert!(started.elapsed() < Duration::from_secs(60), "no log line");
        std::thread::sleep(Duration::from_millis(20));
    }
    run.kill().unwrap();
    run.wait().unwrap();
    let pid: u32 = sandbox.read("starts").trim().parse().unwrap();
    assert!(alive(pid), "the step died with cairn");
    pid
}

/// What an adopted run must show after the resume: one start, one side effect, one attempt,
/// the output passed on, the whole log, an `adopted` event.
fn assert_collected(sandbox: &Sandbox) {
    assert_eq!(
        sandbox.read("starts").lines().count(),
        1,
        "the step ran again"
    );
    assert_eq!(sandbox.read("effects"), "once\n");
    assert_eq!(sandbox.read("after").trim(), "42");
    let show = sandbox.show(1);
    assert_eq!(show["status"], "succeeded", "{show:#}");
    let work = task(&show, "work");
    assert_eq!(work["status"], "succeeded");
    assert_eq!(work["attempts"], 1, "{work:#}");
    assert!(
        events(&show).iter().any(|(k, _)| k == "adopted"),
        "{show:#}"
    );
    let logs = stdout(&sandbox.cairn(&["logs", "1"]));
    for line in ["before the kill", "after the kill", "to stderr"] {
        assert_eq!(logs.matches(line).count(), 1, "{line}: {logs}");
    }
    let uuid = show["uuid"].as_str().unwrap().to_owned();
    let left = crate::support::adopt_left(&uuid);
    assert!(left.is_empty(), "directories left: {left:?}");
}

#[test]
fn a_step_that_finished_while_cairn_was_dead_is_collected_not_run_again() {
    let sandbox = Sandbox::new();
    let pid = run_and_kill(&sandbox);
    sandbox.write("go", "");
    sandbox.wait_for("effects", Duration::from_secs(60));
    let started = Instant::now();
    while alive(pid) {
        assert!(started.elapsed() < Duration::from_secs(60));
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = sandbox.cairn(&["resume", "1"]);
    assert_eq!(code(&out), Some(0), "{}", stderr(&out));
    assert_collected(&sandbox);
}

#[test]
fn a_step_still_running_is_waited_for_again() {
    let sandbox = Sandbox::new();
    let pid = run_and_kill(&sandbox);
    let resume = sandbox.spawn(&["resume", "1"]);
    // The resume takes the attempt again (shown running), and the step goes on.
    let started = Instant::now();
    while !events(&sandbox.show(1)).iter().any(|(k, _)| k == "adopted") {
        assert!(started.elapsed() < Duration::from_secs(60), "never adopted");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(alive(pid), "the resume ended the step");
    sandbox.write("go", "");
    let out = resume.wait_with_output().unwrap();
    assert_eq!(
        code(&out),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_collected(&sandbox);
}

#[test]
fn restart_running_ends_the_step_and_runs_it_again() {
    let sandbox = Sandbox::new();
    let pid = run_and_kill(&sandbox);
    sandbox.write("go", "");
    // The resume ends the old process before the new attempt: at most it got to finish first.
    let out = sandbox.cairn(&["resume", "1", "--restart-running"]);
    assert_eq!(code(&out), Some(0), "{}", stderr(&out));
    assert!(!alive(pid));
    assert_eq!(sandbox.read("starts").lines().count(), 2);
    let show = sandbox.show(1);
    assert_eq!(task(&show, "work")["attempts"], 2, "{show:#}");
    assert!(!events(&show).iter().any(|(k, _)| k == "adopted"));
    assert_eq!(sandbox.read("after").trim(), "42");
}
