//! `resume --param KEY=VALUE`: a param fixed on resume, through the real binary. The value is read
//! as the plan's type; refused (exit 2, naming the param and the steps) when a step that already
//! ran used it, unless `--rerun-changed`, which runs those steps and what is downstream again;
//! recorded in the events (secrets masked); what a rerun step sees, across a `kill -9` and
//! another resume.

use std::time::{Duration, Instant};

use crate::support::{Sandbox, code, events, stderr, stdout, task};

/// `first` uses `a`; `second` uses `b` and fails until `ok` exists; `third` gets the secret `pw`
/// in its environment and waits for `go`.
const PLAN: &str = r#"name: fix
params:
  a: { type: int, default: 1 }
  b: { default: x }
  pw: { secret: true, default: first-secret }
  note: { default: none }
steps:
  - id: first
    run: echo {{ params.a }} >> seen-a
  - id: second
    needs: [first]
    run: |
      echo {{ params.b }} >> seen-b
      test -f ok
  - id: third
    needs: [second]
    env: { PW: "{{ params.pw }}" }
    run: |
      while [ ! -f go ]; do sleep 0.05; done
      [ "$PW" = "$(cat pw-file)" ] && echo the new secret >> seen-pw
      echo {{ params.a }} >> seen-third
"#;

fn changed(sandbox: &Sandbox) -> Vec<String> {
    events(&sandbox.show(1))
        .into_iter()
        .filter(|(kind, _)| kind == "param-changed")
        .map(|(_, message)| message)
        .collect()
}

#[test]
fn a_param_is_fixed_on_resume_unless_done_work_used_it() {
    let sandbox = Sandbox::new();
    sandbox.write("plan.yaml", PLAN);
    sandbox.write("go", "");
    let out = sandbox.cairn(&["run", "plan.yaml"]);
    assert_eq!(code(&out), Some(1), "{}", stderr(&out));

    // Read as the plan's type, and only the plan's params.
    let out = sandbox.cairn(&["resume", "1", "--param", "a=many"]);
    assert_eq!(code(&out), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("`a` takes an int"),
        "{}",
        stderr(&out)
    );
    let out = sandbox.cairn(&["resume", "1", "-p", "nope=1"]);
    assert_eq!(code(&out), Some(2));
    assert!(stderr(&out).contains("no param `nope`"), "{}", stderr(&out));
    // `first` succeeded with `a`: refused, naming both; nothing changes.
    let out = sandbox.cairn(&["resume", "1", "-p", "a=2"]);
    assert_eq!(code(&out), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("`a` (used by `first`)") && stderr(&out).contains("--rerun-changed"),
        "{}",
        stderr(&out)
    );
    assert_eq!(sandbox.show(1)["params"]["a"], 1);
    assert!(changed(&sandbox).is_empty());

    // `second` failed: `b` may change, and the retried step sees it; the secret comes from a
    // file, and is never shown.
    sandbox.write("ok", "");
    sandbox.write("pw-file", "second-secret\n");
    let out = sandbox.cairn(&["resume", "1", "-p", "b=y z", "-p", "pw=@pw-file"]);
    assert_eq!(code(&out), Some(0), "{}", stderr(&out));
    assert_eq!(sandbox.read("seen-b"), "x\ny z\n");
    assert_eq!(sandbox.read("seen-a"), "1\n", "`first` ran again");
    assert_eq!(sandbox.read("seen-pw"), "the new secret\n");
    let show = sandbox.show(1);
    assert_eq!(show["params"]["b"], "y z");
    assert_eq!(show["params"]["pw"], "********");
    let changed = changed(&sandbox);
    assert!(
        changed
            .iter()
            .any(|m| m.contains("param `b` changed") && m.contains("`x` → `y z`")),
        "{changed:?}"
    );
    assert!(
        changed
            .iter()
            .any(|m| m.contains("param `pw` changed") && m.contains("******** → ********")),
        "{changed:?}"
    );
    let all = stdout(&sandbox.cairn(&["show", "1"])) + &stderr(&out);
    assert!(!all.contains("second-secret"), "{all}");
    sandbox.assert_not_stored("second-secret");

    // The op succeeded: a param no step used would change nothing, and is refused.
    let out = sandbox.cairn(&["resume", "1", "-p", "note=later"]);
    assert_eq!(code(&out), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("none of its steps used `note`"),
        "{}",
        stderr(&out)
    );
    assert_eq!(sandbox.show(1)["params"]["note"], "none");
    // `--rerun-changed` alone says what it goes with.
    let out = sandbox.cairn(&["resume", "1", "--rerun-changed"]);
    assert_eq!(code(&out), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("`--param KEY=VALUE`"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn a_changed_param_reruns_what_used_it_and_holds_across_a_kill() {
    let sandbox = Sandbox::new();
    sandbox.write("plan.yaml", PLAN);
    sandbox.write("ok", "");
    sandbox.write("go", "");
    sandbox.write("pw-file", "second-secret");
    let out = sandbox.cairn(&["run", "plan.yaml", "-p", "pw=@pw-file"]);
    assert_eq!(code(&out), Some(0), "{}", stderr(&out));
    std::fs::remove_file(sandbox.path().join("go")).unwrap();

    let out = sandbox.cairn(&["resume", "1", "-p", "a=2"]);
    assert_eq!(code(&out), Some(2), "{}", stderr(&out));
    // Run again from `first`, killed while `third` runs with the new value.
    let mut resumed = sandbox.spawn(&["resume", "1", "-p", "a=2", "--rerun-changed"]);
    let started = Instant::now();
    while task(&sandbox.show(1), "third")["status"] != "running" {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "third never ran again"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let attempts = task(&sandbox.show(1), "third")["attempts"]
        .as_u64()
        .unwrap();
    resumed.kill().unwrap();
    resumed.wait().unwrap();
    assert_eq!(sandbox.read("seen-a"), "1\n2\n");
    assert_eq!(
        sandbox.read("seen-b"),
        "x\nx\n",
        "what is downstream ran again"
    );

    // Resumed without `--param`: the new value is the op's. `go` comes once the resume has ended
    // what the killed run left and started `third` again.
    let resumed = sandbox.spawn(&["resume", "1"]);
    let started = Instant::now();
    while task(&sandbox.show(1), "third")["attempts"]
        .as_u64()
        .unwrap()
        == attempts
    {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "third never ran again"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    sandbox.write("go", "");
    let out = resumed.wait_with_output().unwrap();
    assert_eq!(code(&out), Some(0), "{}", stderr(&out));
    assert_eq!(sandbox.read("seen-a"), "1\n2\n", "`first` ran a third time");
    assert_eq!(sandbox.read("seen-third"), "1\n2\n");
    assert_eq!(sandbox.read("seen-pw"), "the new secret\nthe new secret\n");
    let show = sandbox.show(1);
    assert_eq!(show["params"]["a"], 2);
    assert_eq!(show["status"], "succeeded");
    let changed = changed(&sandbox);
    assert_eq!(changed.len(), 1, "{changed:?}");
    assert!(
        changed[0].contains("`1` → `2`") && changed[0].contains("run again: first"),
        "{changed:?}"
    );
}
