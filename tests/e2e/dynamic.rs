//! Dynamic plans through the real binary: fan-out (`for_each`), sub-plans (`plan:`), and resuming
//! with an edited plan (`resume --plan`).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::{Sandbox, code, events, stderr, stdout, task};

/// Lines of a file the steps append to.
fn lines(sandbox: &Sandbox, name: &str) -> Vec<String> {
    sandbox.read(name).lines().map(ToOwned::to_owned).collect()
}

/// Waits until `name` holds at least `count` lines.
fn wait_lines(sandbox: &Sandbox, name: &str, count: usize) {
    let started = Instant::now();
    while lines(sandbox, name).len() < count {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "{name} never reached {count} lines: {:?}",
            lines(sandbox, name)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The items of fan-out step `step` that succeeded, as `show --json` has them.
fn items_done(show: &Value, step: &str) -> Vec<String> {
    show["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["step"] == step && t["id"] != step && t["status"] == "succeeded")
        .map(|t| t["item"].as_str().unwrap().to_owned())
        .collect()
}

fn kill_9(child: &mut std::process::Child) {
    child.kill().unwrap();
    child.wait().unwrap();
}

const FAN_OUT: &str = r#"
name: fan-out
steps:
  - id: list
    outputs: [shards]
    run: |
      echo list >> runs
      echo 'shards=["s01","s02","s03","s04","s05","s06","s07","s08","s09","s10","s11","s12","s13","s14","s15","s16","s17","s18","s19","s20"]' >> "$CAIRN_OUTPUT"
  - id: restore
    needs: [list]
    for_each: "{{ steps.list.outputs.shards }}"
    max_parallel: 4
    outputs: [rows]
    run: |
      echo start $(date +%s%N) {{ item }} >> times
      sleep 0.3
      echo {{ item }} $CAIRN_ATTEMPT >> runs
      echo end $(date +%s%N) {{ item }} >> times
      echo rows=30-{{ item }} >> "$CAIRN_OUTPUT"
  - id: report
    needs: [restore]
    run: |
      for r in {{ steps.restore.outputs.rows }}; do echo "$r"; done > report
"#;

/// The most items whose [start, end] intervals overlap at any start (only complete intervals).
fn max_overlap(times: &[String]) -> usize {
    let mut start = BTreeMap::new();
    let mut spans = Vec::new();
    for line in times {
        let parts: Vec<&str> = line.split_whitespace().collect();
        let at: u128 = parts[1].parse().unwrap();
        match parts[0] {
            "start" => {
                start.insert(parts[2].to_owned(), at);
            }
            _ => {
                if let Some(s) = start.remove(parts[2]) {
                    spans.push((s, at));
                }
            }
        }
    }
    spans
        .iter()
        .map(|&(s, _)| spans.iter().filter(|&&(a, b)| a <= s && s < b).count())
        .max()
        .unwrap_or(0)
}

#[test]
fn a_fan_out_keeps_its_limit_and_a_crash_reruns_only_unfinished_items() {
    let sandbox = Sandbox::new();
    sandbox.write("plan.yaml", FAN_OUT);
    let mut run = sandbox.spawn(&["run", "plan.yaml", "--grace", "1s"]);
    // About half of the items have finished.
    wait_lines(&sandbox, "runs", 11);
    kill_9(&mut run);
    let done_before = items_done(&sandbox.show(1), "restore");
    assert!(
        !done_before.is_empty() && done_before.len() < 20,
        "{done_before:?}"
    );

    let out = sandbox.cairn(&["resume", "1"]);
    assert_eq!(code(&out), Some(0), "{}", stderr(&out));

    let runs = lines(&sandbox, "runs");
    // The list was produced once and never expanded again.
    assert_eq!(runs.iter().filter(|l| *l == "list").count(), 1, "{runs:?}");
    let show = sandbox.show(1);
    let items: Vec<&Value> = show["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["step"] == "restore" && t["id"] != "restore")
        .collect();
    assert_eq!(items.len(), 20);
    assert_eq!(
        events(&show)
            .iter()
            .filter(|(kind, _)| kind == "task-expanded")
            .count(),
        1
    );
    for item in &items {
        assert_eq!(item["status"], "succeeded", "{item}");
        assert_eq!(
            item["id"],
            format!("restore[{}]", item["item"].as_str().unwrap())
        );
    }
    // Items recorded done before the crash ran once; every item ran.
    for shard in &done_before {
        let ran: Vec<&String> = runs
            .iter()
            .filter(|l| l.starts_with(&format!("{shard} ")))
            .collect();
        assert_eq!(ran.len(), 1, "{shard} ran again: {runs:?}");
    }
    for n in 1..=20 {
        let shard = format!("s{n:02}");
        assert!(runs.iter().any(|l| l.starts_with(&format!("{shard} "))));
    }
    // Never more than 4 at once, by the times the steps recorded.
    let overlap = max_overlap(&lines(&sandbox, "times"));
    assert!((1..=4).contains(&overlap), "{overlap} items ran at once");
    // Downstream saw the items' outputs as a list, in item order.
    let report = lines(&sandbox, "report");
    let expected: Vec<String> = (1..=20).map(|n| format!("30-s{n:02}")).collect();
    assert_eq!(report, expected);
    assert_eq!(task(&show, "restore")["outputs"]["rows"][0], "30-s01");
}

#[test]
fn a_fan_out_over_a_list_param_or_lines_and_a_failing_item() {
    let sandbox = Sandbox::new();
    sandbox.write(
        "plan.yaml",
        r#"
name: fan-out-lines
params:
  hosts: { type: list, default: [db-1, db-2] }
steps:
  - id: members
    outputs: [names]
    run: printf 'names=a\n' >> "$CAIRN_OUTPUT"
  - id: ping
    for_each: "{{ params.hosts }}"
    run: echo {{ item }} | tee -a pinged
  - id: objects
    for_each:
      - { name: alpha, port: 1 }
      - { name: beta, port: 2 }
    run: |
      echo {{ item.name }}:{{ item.port }} >> objects
      test {{ item.port }} = 1
"#,
    );
    let out = sandbox.cairn(&["run", "plan.yaml"]);
    assert_eq!(code(&out), Some(1), "{}", stderr(&out));
    let mut pinged = lines(&sandbox, "pinged");
    pinged.sort();
    assert_eq!(pinged, vec!["db-1", "db-2"]);
    // `logs` of a fan-out step shows its items' output.
    let logs = stdout(&sandbox.cairn(&["logs", "1", "ping"]));
    assert!(
        logs.contains("==> ping[db-1] (attempt 1) <==\ndb-1\n")
            && logs.contains("==> ping[db-2] (attempt 1) <==\ndb-2\n"),
        "{logs}"
    );
    let show = sandbox.show(1);
    assert_eq!(task(&show, "objects[alpha]")["status"], "succeeded");
    assert_eq!(task(&show, "objects[beta]")["status"], "failed");
    assert_eq!(task(&show, "objects")["status"], "failed");
    assert!(
        task(&show, "objects")["error"]
            .as_str()
            .unwrap()
            .contains("1 of 2 items failed: objects[beta]")
    );
    // A person resolves the failed item; the resume finishes without running anything again.
    let out = sandbox.cairn(&[
        "mark",
        "1",
        "objects[beta]",
        "--succeeded",
        "--reason",
        "done by hand",
    ]);
    assert_eq!(code(&out), Some(0), "{}", stderr(&out));
    let out = sandbox.cairn(&["resume", "1"]);
    assert_eq!(code(&out), Some(0), "{}", stderr(&out));
    assert_eq!(lines(&sandbox, "objects").len(), 2);
    assert_eq!(task(&sandbox.show(1), "objects")["status"], "succeeded");
}

const PARENT: &str = r#"
name: parent
steps:
  - id: first
    plan: ./child.yaml
    with: { who: one }
  - id: second
    needs: [first]
    plan: ./child.yaml
    with: { who: "{{ steps.first.outputs.greeting }}" }
  - id: last
    needs: [second]
    run: echo {{ steps.second.outputs.greeting }} > last
"#;

const CHILD: &str = r#"
name: child
params:
  who: { type: string, required: true }
steps:
  - id: greet
    outputs: [greeting]
    run: |
      echo greet {{ params.who }} >> runs
      echo greeting=hi-{{ params.who }} >> "$CAIRN_OUTPUT"
  - id: slow
    needs: [greet]
    run: |
      echo slow {{ params.who }} >> runs
      while [ ! -e go ] && [ ! -e go-{{ params.who }} ]; do sleep 0.05; done
hooks:
  on_cancel:
    - run: echo canceled {{ params.who }} >> hooks
"#;

#[test]
fn sub_plans_resume_where_they_stopped_and_the_first_child_is_not_run_again() {
    let sandbox = Sandbox::new();
    sandbox.write("parent.yaml", PARENT);
    sandbox.write("child.yaml", CHILD);
    let mut run = sandbox.spawn(&["run", "parent.yaml", "--grace", "1s"]);
    // The first child's slow step runs: let it finish, then wait for the second child's.
    wait_lines(&sandbox, "runs", 2);
    sandbox.write("go-one", "");
    wait_lines(&sandbox, "runs", 4);
    kill_9(&mut run);
    let status = sandbox.json(&["status", "--json", "--children"]);
    let ops = status.as_array().unwrap();
    assert_eq!(ops.len(), 3, "{status}");
    // Newest first: the second child, the first child, the parent.
    assert_eq!(ops[0]["parent"], 1);
    assert_eq!(ops[0]["status"], "interrupted");
    assert_eq!(ops[1]["status"], "succeeded");
    assert_eq!(ops[2]["status"], "interrupted");
    let text = stdout(&sandbox.cairn(&["show", "1"]));
    assert!(
        text.contains("op 2  child  succeeded  (step first)"),
        "{text}"
    );
    assert!(
        text.contains("op 3  child  interrupted  (step second)"),
        "{text}"
    );

    sandbox.write("go", "");
    let out = sandbox.cairn(&["resume", "1"]);
    assert_eq!(code(&out), Some(0), "{}", stderr(&out));
    assert_eq!(
        lines(&sandbox, "runs"),
        vec![
            "greet one",
            "slow one",
            "greet hi-one",
            "slow hi-one",
            // Only the step that was running when cairn died runs again.
            "slow hi-one",
        ]
    );
    assert_eq!(sandbox.read("last").trim(), "hi-hi-one");
    let child = sandbox.show(3);
    assert_eq!(child["status"], "succeeded");
    assert_eq!(task(&child, "greet")["attempts"], 1);
    let parent = sandbox.show(1);
    assert_eq!(parent["children"].as_array().unwrap().len(), 2);
    assert_eq!(task(&parent, "second")["outputs"]["greeting"], "hi-hi-one");
    // The parent's snapshot holds the sub-plan's text.
    let files = sandbox.sql(
        "SELECT s.files FROM ops o JOIN plan_snapshots s ON s.id = o.snapshot_id WHERE o.id = 1",
    );
    assert!(files.contains("name: child"), "{files}");
}

#[test]
fn cancelling_a_parent_cancels_its_running_child_with_the_childs_hooks() {
    let sandbox = Sandbox::new();
    sandbox.write("parent.yaml", PARENT);
    sandbox.write("child.yaml", CHILD);
    let run = sandbox.spawn(&["run", "parent.yaml", "--grace", "1s"]);
    wait_lines(&sandbox, "runs", 2);
    let out = sandbox.cairn(&["cancel", "1", "--reason", "wrong member"]);
    assert_eq!(code(&out), Some(0), "{}", stderr(&out));
    let ended = run.wait_with_output().unwrap();
    assert_eq!(ended.status.code(), Some(3), "{}", stderr(&ended));
    assert_eq!(sandbox.show(1)["status"], "canceled");
    assert_eq!(sandbox.show(2)["status"], "canceled");
    assert_eq!(lines(&sandbox, "hooks"), vec!["canceled one"]);
    // The second child never started.
    assert_eq!(sandbox.op_count(), 2);
}

const DRIFT: &str = r#"
name: drift
steps:
  - id: a
    outputs: [x]
    run: |
      echo a >> runs
      echo x=1 >> "$CAIRN_OUTPUT"
  - id: b
    needs: [a]
    run: |
      echo b >> runs
      echo b-out
      exit 3
  - id: c
    needs: [b]
    run: echo c {{ steps.a.outputs.x }} >> runs
"#;

#[test]
fn resuming_with_an_edited_plan_shows_the_diff_and_guards_done_work() {
    let sandbox = Sandbox::new();
    sandbox.write("plan.yaml", DRIFT);
    assert_eq!(code(&sandbox.cairn(&["run", "plan.yaml"])), Some(1));
    // Fix the failed step, and add one before every other (the op's tasks are renumbered).
    let fixed = DRIFT.replace("exit 3", "exit 0").replace(
        "steps:\n",
        "steps:\n  - id: d\n    needs: [a]\n    run: echo d >> runs\n",
    );
    sandbox.write("fixed.yaml", &fixed);
    let out = sandbox.cairn(&["resume", "1", "--plan", "fixed.yaml"]);
    assert_eq!(code(&out), Some(2));
    assert!(stderr(&out).contains("~ step b"), "{}", stderr(&out));
    assert!(stderr(&out).contains("+ step d"), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("--accept-plan-change"),
        "{}",
        stderr(&out)
    );
    assert_eq!(sandbox.show(1)["status"], "failed", "nothing changed");

    // Editing a step that succeeded is refused, even accepted, without --rerun-changed.
    let edited = fixed.replace("echo x=1", "echo x=2");
    sandbox.write("edited.yaml", &edited);
    let out = sandbox.cairn(&[
        "resume",
        "1",
        "--plan",
        "edited.yaml",
        "--accept-plan-change",
    ]);
    assert_eq!(code(&out), Some(2));
    assert!(
        stderr(&out).contains("already ran: `a`"),
        "{}",
        stderr(&out)
    );
    assert!(stderr(&out).contains("--rerun-changed"), "{}", stderr(&out));

    let out = sandbox.cairn(&[
        "resume",
        "1",
        "--plan",
        "fixed.yaml",
        "--accept-plan-change",
    ]);
    assert_eq!(code(&out), Some(0), "{}", stderr(&out));
    assert!(stderr(&out).contains("~ step b"), "{}", stderr(&out));
    let mut runs = lines(&sandbox, "runs");
    runs.sort();
    assert_eq!(runs, vec!["a", "b", "b", "c 1", "d"]);
    // Attempts and logs moved with their task.
    let logs = stdout(&sandbox.cairn(&["logs", "1", "b"]));
    assert!(
        logs.contains("==> b (attempt 1) <==\nb-out\n")
            && logs.contains("==> b (attempt 2) <==\nb-out\n"),
        "{logs}"
    );
    assert_eq!(task(&sandbox.show(1), "b")["history"][0]["exit_code"], 3);
    let show = sandbox.show(1);
    let changed: Vec<String> = events(&show)
        .into_iter()
        .filter(|(kind, _)| kind == "plan-changed")
        .map(|(_, m)| m)
        .collect();
    assert_eq!(changed.len(), 1);
    assert!(changed[0].contains("~ step b") && changed[0].contains("replaced by"));

    // With --rerun-changed, the changed step that succeeded runs again, with what follows it.
    let out = sandbox.cairn(&[
        "resume",
        "1",
        "--plan",
        "edited.yaml",
        "--accept-plan-change",
        "--rerun-changed",
    ]);
    assert_eq!(code(&out), Some(0), "{}", stderr(&out));
    let mut again = lines(&sandbox, "runs")[5..].to_vec();
    again.sort();
    assert_eq!(again, vec!["a", "b", "c 2", "d"]);
}

const SCRIPTED: &str = r"
name: scripted
steps:
  - id: build
    run: |
      echo build >> runs
      echo compiling
      exit 3
  - id: report
    needs: [build]
    timeout: 10s
    run: echo report >> runs
";

#[test]
fn resuming_with_an_edited_plan_shows_what_changed_in_each_step() {
    let sandbox = Sandbox::new();
    sandbox.write("plan.yaml", SCRIPTED);
    assert_eq!(code(&sandbox.cairn(&["run", "plan.yaml"])), Some(1));
    // One line of the script changed and one added; the other step's timeout changed.
    let edited = SCRIPTED
        .replace("      exit 3\n", "      echo fixed >> runs\n      exit 0\n")
        .replace("timeout: 10s", "timeout: 20s");
    sandbox.write("edited.yaml", &edited);
    let out = sandbox.cairn(&["resume", "1", "--plan", "edited.yaml"]);
    assert_eq!(code(&out), Some(2), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains(
            "  ~ step build
      run:
        @@ -1,3 +1,4 @@
         echo build >> runs
         echo compiling
        -exit 3
        +echo fixed >> runs
        +exit 0
  ~ step report
      timeout: 10s → 20s
"
        ),
        "{err}"
    );
    assert!(err.contains("--accept-plan-change"), "{err}");
    assert!(!err.contains('\x1b'), "plain text: {err}");
    // Nothing changed until accepted.
    let show = sandbox.show(1);
    assert_eq!(show["status"], "failed");
    assert!(events(&show).iter().all(|(kind, _)| kind != "plan-changed"));
    assert_eq!(lines(&sandbox, "runs"), vec!["build"]);

    let out = sandbox.cairn(&[
        "resume",
        "1",
        "--plan",
        "edited.yaml",
        "--accept-plan-change",
    ]);
    assert_eq!(code(&out), Some(0), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("timeout: 10s → 20s"),
        "{}",
        stderr(&out)
    );
    assert_eq!(
        lines(&sandbox, "runs"),
        vec!["build", "build", "fixed", "report"]
    );
    // The op's events keep the one-line summary.
    let changed: Vec<String> = events(&sandbox.show(1))
        .into_iter()
        .filter(|(kind, _)| kind == "plan-changed")
        .map(|(_, m)| m)
        .collect();
    assert_eq!(changed.len(), 1);
    assert!(
        changed[0].contains("~ step build; ~ step report") && !changed[0].contains("exit"),
        "{}",
        changed[0]
    );
}

#[test]
fn resuming_with_an_edited_sub_plan_shows_its_line_diff_under_the_step() {
    let sandbox = Sandbox::new();
    sandbox.write(
        "parent.yaml",
        "name: parent\nsteps:\n  - id: sub\n    plan: ./child.yaml\n    with: { who: me }\n  - id: after\n    needs: [sub]\n    run: test -e fixed\n",
    );
    sandbox.write(
        "child.yaml",
        "name: child\nparams:\n  who: { type: string }\nsteps:\n  - id: hi\n    run: echo hi\n",
    );
    assert_eq!(code(&sandbox.cairn(&["run", "parent.yaml"])), Some(1));
    sandbox.write(
        "child.yaml",
        "name: child\nparams:\n  who: { type: string }\nsteps:\n  - id: hi\n    run: echo hello\n",
    );
    let out = sandbox.cairn(&["resume", "1", "--plan", "parent.yaml"]);
    assert_eq!(code(&out), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains(
            "  ~ step sub
      ./child.yaml (the sub-plan's text):
        @@ -4,3 +4,3 @@
         steps:
           - id: hi
        -    run: echo hi
        +    run: echo hello
"
        ),
        "{}",
        stderr(&out)
    );
}

#[test]
fn a_failed_op_with_failure_hooks_runs_its_failed_step_again_on_resume() {
    let sandbox = Sandbox::new();
    sandbox.write(
        "plan.yaml",
        r"
name: hooked
steps:
  - id: work
    run: |
      echo work >> runs
      test -e fixed
hooks:
  on_failure:
    - run: echo failed >> hooks
",
    );
    assert_eq!(code(&sandbox.cairn(&["run", "plan.yaml"])), Some(1));
    // A second failure runs the failure hooks again: it is news too.
    assert_eq!(code(&sandbox.cairn(&["resume", "1"])), Some(1));
    assert_eq!(lines(&sandbox, "hooks"), vec!["failed", "failed"]);
    sandbox.write("fixed", "");
    let out = sandbox.cairn(&["resume", "1"]);
    assert_eq!(code(&out), Some(0), "{}", stderr(&out));
    assert_eq!(lines(&sandbox, "runs"), vec!["work", "work", "work"]);
    assert_eq!(lines(&sandbox, "hooks"), vec!["failed", "failed"]);
}

/// A fan-out over what its upstream step reads from the file `names`.
const REFAN: &str = r#"
name: refan
steps:
  - id: list
    outputs: [names]
    run: echo names=$(cat names) >> "$CAIRN_OUTPUT"
  - id: each
    needs: [list]
    for_each: "{{ steps.list.outputs.names }}"
    run: echo {{ item }} >> runs
"#;

#[test]
fn rerunning_a_fan_out_expands_its_list_again_and_keeps_items_named_as_before() {
    let sandbox = Sandbox::new();
    sandbox.write("plan.yaml", REFAN);
    sandbox.write("names", "[\"a\",\"b\"]\n");
    assert_eq!(code(&sandbox.cairn(&["run", "plan.yaml"])), Some(0));
    sandbox.write("names", "[\"b\",\"c\"]\n");
    let out = sandbox.cairn(&["resume", "1", "--from", "list"]);
    assert_eq!(code(&out), Some(0), "{}", stderr(&out));
    let mut runs = lines(&sandbox, "runs");
    runs.sort();
    assert_eq!(runs, vec!["a", "b", "b", "c"]);
    let show = sandbox.show(1);
    // `each[b]` kept its task (two attempts); `each[a]` stays as history.
    assert_eq!(task(&show, "each[b]")["attempts"], 2);
    assert_eq!(task(&show, "each[c]")["attempts"], 1);
    assert_eq!(task(&show, "each[a]")["item"], Value::Null);
    assert_eq!(task(&show, "each")["items"], serde_json::json!(["b", "c"]));
}

#[test]
fn a_sub_plan_step_run_again_or_whose_child_was_canceled_gets_a_new_child() {
    let sandbox = Sandbox::new();
    sandbox.write(
        "parent.yaml",
        r"
name: parent
steps:
  - id: sub
    plan: ./child.yaml
    timeout: 30s
    with: { who: me }
",
    );
    sandbox.write("child.yaml", CHILD);
    sandbox.write("go", "");
    assert_eq!(code(&sandbox.cairn(&["run", "parent.yaml"])), Some(0));
    let out = sandbox.cairn(&["resume", "1", "--from", "sub"]);
    assert_eq!(code(&out), Some(0), "{}", stderr(&out));
    assert_eq!(lines(&sandbox, "runs").len(), 4, "the sub-plan ran again");
    let text = stdout(&sandbox.cairn(&["show", "1"]));
    assert!(
        text.contains("op 2  child  succeeded  (step an earlier run)"),
        "{text}"
    );
    assert!(
        text.contains("op 3  child  succeeded  (step sub)"),
        "{text}"
    );

    // A child canceled by hand fails its parent's step; resuming the parent starts a new child.
    std::fs::remove_file(sandbox.path().join("go")).unwrap();
    let run = sandbox.spawn(&["resume", "1", "--from", "sub"]);
    wait_lines(&sandbox, "runs", 6);
    let out = sandbox.cairn(&["cancel", "4"]);
    assert_eq!(code(&out), Some(0), "{}", stderr(&out));
    let ended = run.wait_with_output().unwrap();
    assert_eq!(ended.status.code(), Some(1), "{}", stderr(&ended));
    assert!(
        task(&sandbox.show(1), "sub")["error"]
            .as_str()
            .unwrap()
            .contains("sub-plan op 4 was canceled")
    );
    sandbox.write("go", "");
    let out = sandbox.cairn(&["resume", "1"]);
    assert_eq!(code(&out), Some(0), "{}", stderr(&out));
    let text = stdout(&sandbox.cairn(&["show", "1"]));
    assert!(
        text.contains("op 4  child  canceled  (step an earlier run)"),
        "{text}"
    );
    assert!(
        text.contains("op 5  child  succeeded  (step sub)"),
        "{text}"
    );
}

#[test]
fn a_sub_plan_steps_timeout_stops_its_child() {
    let sandbox = Sandbox::new();
    sandbox.write(
        "parent.yaml",
        r"
name: parent
steps:
  - id: sub
    plan: ./child.yaml
    timeout: 1s
    with: { who: me }
",
    );
    sandbox.write("child.yaml", CHILD);
    let out = sandbox.cairn(&["run", "parent.yaml", "--grace", "1s"]);
    assert_eq!(code(&out), Some(1), "{}", stderr(&out));
    let show = sandbox.show(1);
    assert!(
        task(&show, "sub")["error"]
            .as_str()
            .unwrap()
            .contains("timed out after 1s"),
        "{show}"
    );
    assert_eq!(sandbox.show(2)["status"], "interrupted");
}

#[test]
fn an_edited_plan_may_add_a_param_with_a_default() {
    let sandbox = Sandbox::new();
    sandbox.write(
        "plan.yaml",
        "name: p\nsteps:\n  - id: a\n    run: test -e fixed\n",
    );
    assert_eq!(code(&sandbox.cairn(&["run", "plan.yaml"])), Some(1));
    sandbox.write(
        "new.yaml",
        "name: p\nparams:\n  mode: { default: fast }\nsteps:\n  - id: a\n    run: echo {{ params.mode }} > mode\n",
    );
    let out = sandbox.cairn(&["resume", "1", "--plan", "new.yaml", "--accept-plan-change"]);
    assert_eq!(code(&out), Some(0), "{}", stderr(&out));
    assert_eq!(sandbox.read("mode").trim(), "fast");
    assert_eq!(sandbox.show(1)["params"]["mode"], "fast");
}

#[test]
fn sub_plans_of_a_fan_out_that_share_a_lock_take_turns() {
    let sandbox = Sandbox::new();
    sandbox.write(
        "parent.yaml",
        r"
name: parent
steps:
  - id: each
    for_each: [x, y, z]
    plan: ./locked.yaml
    with: { who: '{{ item }}' }
",
    );
    sandbox.write(
        "locked.yaml",
        r"
name: locked
params:
  who: { type: string, required: true }
lock: cluster-1
steps:
  - id: work
    run: |
      echo start {{ params.who }} >> order
      sleep 0.3
      echo end {{ params.who }} >> order
",
    );
    let out = sandbox.cairn(&["run", "parent.yaml"]);
    assert_eq!(code(&out), Some(0), "{}", stderr(&out));
    let order = lines(&sandbox, "order");
    assert_eq!(order.len(), 6, "{order:?}");
    for pair in order.chunks(2) {
        assert!(
            pair[0].starts_with("start ") && pair[1].starts_with("end "),
            "{order:?}"
        );
        assert_eq!(pair[0][6..], pair[1][4..], "{order:?}");
    }
}

#[test]
fn a_sub_plan_steps_retry_resumes_its_failed_child() {
    let sandbox = Sandbox::new();
    sandbox.write(
        "parent.yaml",
        r"
name: parent
steps:
  - id: sub
    plan: ./flaky.yaml
    retry: { attempts: 2, delay: 100ms }
",
    );
    sandbox.write(
        "flaky.yaml",
        r"
name: flaky
steps:
  - id: once
    run: echo once >> runs
  - id: flaky
    needs: [once]
    run: |
      echo flaky >> runs
      test -e tried || { touch tried; exit 1; }
",
    );
    let out = sandbox.cairn(&["run", "parent.yaml"]);
    assert_eq!(code(&out), Some(0), "{}", stderr(&out));
    assert_eq!(lines(&sandbox, "runs"), vec!["once", "flaky", "flaky"]);
    assert_eq!(task(&sandbox.show(1), "sub")["attempts"], 2);
    // The same child op, resumed: no second child.
    assert_eq!(sandbox.op_count(), 2);
}

#[test]
fn a_secret_cannot_be_passed_to_a_sub_plan_param_that_is_not_secret() {
    let sandbox = Sandbox::new();
    sandbox.write(
        "parent.yaml",
        r#"
name: parent
params:
  password: { type: string, secret: true, required: true }
steps:
  - id: sub
    plan: ./child.yaml
    with: { pw: "{{ params.password }}" }
"#,
    );
    sandbox.write(
        "child.yaml",
        "name: child\nparams:\n  pw: { type: string, required: true }\nsteps:\n  - id: a\n    noop: true\n",
    );
    let out = sandbox.cairn(&["validate", "parent.yaml"]);
    assert_eq!(code(&out), Some(2));
    assert!(
        stderr(&out).contains("passes the secret param `password` as `pw`"),
        "{}",
        stderr(&out)
    );
    let out = sandbox.cairn(&["run", "parent.yaml", "-p", "password=hunter2"]);
    assert_eq!(code(&out), Some(2), "{}", stderr(&out));
    assert!(!sandbox.holds_ops(), "nothing is stored");
}

#[test]
fn a_sibling_sub_plan_does_not_wait_for_a_lock_a_failed_sibling_keeps() {
    let sandbox = Sandbox::new();
    sandbox.write(
        "parent.yaml",
        r"
name: parent
steps:
  - id: each
    for_each: [bad, good]
    plan: ./locked.yaml
    with: { who: '{{ item }}' }
",
    );
    sandbox.write(
        "locked.yaml",
        r"
name: locked
params:
  who: { type: string, required: true }
lock: cluster-1
steps:
  - id: work
    run: |
      sleep 0.2
      test {{ params.who }} = good
",
    );
    let mut run = sandbox.spawn(&["run", "parent.yaml"]);
    let started = Instant::now();
    let status = loop {
        if let Some(status) = run.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > Duration::from_secs(60) {
            kill_9(&mut run);
            panic!("the parent waits for ever");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status.code(), Some(1));
    let show = sandbox.show(1);
    let each = task(&show, "each")["error"].as_str().unwrap().to_owned();
    assert!(each.contains("items failed"), "{each}");
}

#[test]
fn an_item_name_that_comes_back_after_two_reruns_is_one_task() {
    let sandbox = Sandbox::new();
    sandbox.write("plan.yaml", REFAN);
    for names in ["[\"a\",\"b\"]", "[\"b\",\"c\"]", "[\"a\",\"b\"]"] {
        sandbox.write("names", names);
        let args: &[&str] = if sandbox.holds_ops() {
            &["resume", "1", "--from", "list"]
        } else {
            &["run", "plan.yaml"]
        };
        let out = sandbox.cairn(args);
        assert_eq!(code(&out), Some(0), "{}", stderr(&out));
    }
    let show = sandbox.show(1);
    let named_a: Vec<&Value> = show["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["id"] == "each[a]")
        .collect();
    assert_eq!(named_a.len(), 1, "{show}");
    assert_eq!(named_a[0]["attempts"], 2);
    assert_eq!(named_a[0]["status"], "succeeded");
    assert_eq!(task(&show, "each[c]")["status"], "skipped");
    let mut runs = lines(&sandbox, "runs");
    runs.sort();
    assert_eq!(runs, vec!["a", "a", "b", "b", "b", "c"]);
}

#[test]
fn a_secret_passed_to_a_sub_plan_stays_sealed_and_masked_in_the_child() {
    let sandbox = Sandbox::new();
    let secret = "child-Secret-77";
    sandbox.write(
        "parent.yaml",
        r#"
name: parent
params:
  password: { type: string, secret: true, required: true }
steps:
  - id: sub
    plan: ./child.yaml
    with: { pw: "{{ params.password }}" }
"#,
    );
    sandbox.write(
        "child.yaml",
        r#"
name: child
params:
  pw: { type: string, secret: true, required: true }
steps:
  - id: use
    env: { PW: "{{ params.pw }}" }
    run: |
      echo using "$PW"
      printf %s "$PW" > got
      echo "bad password $PW" >&2
      exit 1
"#,
    );
    let run = sandbox.cairn(&["run", "parent.yaml", "-p", &format!("password={secret}")]);
    assert_eq!(code(&run), Some(1), "{}", stderr(&run));
    assert_eq!(
        sandbox.read("got"),
        secret,
        "the child's step got the secret"
    );
    let mut everything = stderr(&run);
    for args in [
        &["status", "--json"][..],
        &["show", "1", "--json"],
        &["show", "2", "--json"],
        &["show", "2"],
        &["logs", "1"],
        &["logs", "2"],
    ] {
        let out = sandbox.cairn(args);
        everything.push_str(&stdout(&out));
        everything.push_str(&stderr(&out));
    }
    assert!(
        !everything.contains(secret),
        "the secret leaked:\n{everything}"
    );
    assert!(everything.contains("using ********"), "{everything}");
    assert!(everything.contains("bad password ********"), "{everything}");
    sandbox.assert_not_stored(secret);
}

#[test]
fn a_stopped_fan_out_with_continue_on_error_leaves_its_unrun_items_for_the_resume() {
    let sandbox = Sandbox::new();
    sandbox.write(
        "plan.yaml",
        r"
name: tolerant
steps:
  - id: each
    for_each: [1, 2, 3]
    max_parallel: 1
    continue_on_error: true
    run: |
      echo {{ item }} >> runs
      test {{ item }} != 1
      while [ {{ item }} = 2 ] && [ ! -e go ]; do sleep 0.05; done
",
    );
    let run = sandbox.spawn(&["run", "plan.yaml", "--grace", "1s"]);
    wait_lines(&sandbox, "runs", 2);
    crate::support::signal(&run, nix::sys::signal::Signal::SIGINT);
    let ended = run.wait_with_output().unwrap();
    assert_eq!(ended.status.code(), Some(4), "{}", stderr(&ended));
    let show = sandbox.show(1);
    assert_eq!(show["status"], "interrupted", "{show}");
    assert_eq!(task(&show, "each[3]")["status"], "pending");
    sandbox.write("go", "");
    let out = sandbox.cairn(&["resume", "1"]);
    assert_eq!(code(&out), Some(0), "{}", stderr(&out));
    assert_eq!(lines(&sandbox, "runs"), vec!["1", "2", "1", "2", "3"]);
}

/// When a step of the parent fails, a sub-plan's op running beside it goes on like any running
/// task (its process is not ended), but its approval gates close ("the parent op failed"); the
/// parent fails once the child has ended; a resume asks the gate again and runs no step twice.
#[test]
fn a_parent_failing_elsewhere_lets_its_child_finish_and_closes_the_child_s_gates() {
    let sandbox = Sandbox::new();
    sandbox.write(
        "parent.yaml",
        r"
name: parent
steps:
  - id: sub
    plan: ./child.yaml
  - id: boom
    run: |
      while [ ! -e child-started ]; do sleep 0.05; done
      echo boom >> booms
      [ -e fixed ]
",
    );
    sandbox.write(
        "child.yaml",
        r"
name: child
steps:
  - id: work
    run: |
      echo work >> works
      touch child-started
      for i in $(seq 1200); do [ -e go ] && exit 0; sleep 0.05; done; exit 1
  - id: confirm
    needs: [work]
    approve: carry on?
  - id: after
    needs: [confirm]
    run: echo after >> afters
",
    );
    let run = sandbox.spawn(&["run", "parent.yaml"]);
    wait_lines(&sandbox, "booms", 1);
    // The parent's `boom` failed: the child's `work` is not ended.
    let started = Instant::now();
    while task(&sandbox.show(1), "boom")["status"] != "failed" {
        assert!(started.elapsed() < Duration::from_secs(60));
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(task(&sandbox.show(2), "work")["status"], "running");
    sandbox.write("go", "");
    let ended = run.wait_with_output().unwrap();
    assert_eq!(ended.status.code(), Some(1), "{}", stderr(&ended));
    let child = sandbox.show(2);
    assert_eq!(task(&child, "work")["status"], "succeeded", "{child:#}");
    assert_eq!(
        task(&child, "confirm")["error"],
        "no answer: the parent op failed",
        "{child:#}"
    );
    assert!(!sandbox.path().join("afters").exists());

    sandbox.write("fixed", "");
    let resume = sandbox.spawn(&["resume", "1"]);
    let started = Instant::now();
    while task(&sandbox.show(2), "confirm")["status"] != "waiting" {
        assert!(started.elapsed() < Duration::from_secs(60));
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = sandbox.cairn(&["approve", "2", "confirm"]);
    assert_eq!(code(&out), Some(0), "{}", stderr(&out));
    let ended = resume.wait_with_output().unwrap();
    assert_eq!(ended.status.code(), Some(0), "{}", stderr(&ended));
    assert_eq!(lines(&sandbox, "works"), ["work"]);
    assert_eq!(lines(&sandbox, "afters"), ["after"]);
    assert_eq!(lines(&sandbox, "booms"), ["boom", "boom"]);
}

/// More items than a take-over reads before its first task starts (its steps and hooks, and the
/// first 2,048 items still to run; the rest are read while those run).
const MANY_ITEMS: usize = 2600;

#[test]
fn a_large_fan_out_taken_over_runs_every_item_it_had_not_and_gathers_them_all() {
    let sandbox = Sandbox::new();
    sandbox.write(
        "plan.yaml",
        r#"
name: many
shell: sh
max_parallel: 16
params:
  items: { type: list, required: true }
steps:
  - id: work
    for_each: "{{ params.items }}"
    outputs: [n]
    run: |
      echo {{ item }} >> runs
      echo n={{ item }} >> "$CAIRN_OUTPUT"
  - id: report
    needs: [work]
    run: |
      for n in {{ steps.work.outputs.n }}; do echo "$n"; done > report
"#,
    );
    let items: Vec<String> = (1..=MANY_ITEMS).map(|n| format!("i{n:04}")).collect();
    sandbox.write(
        "items.json",
        &serde_json::json!({ "items": items }).to_string(),
    );
    let mut run = sandbox.spawn(&["run", "plan.yaml", "--params", "items.json"]);
    wait_lines(&sandbox, "runs", 300);
    kill_9(&mut run);
    let done_before = items_done(&sandbox.show(1), "work");
    assert!(
        done_before.len() >= 250 && done_before.len() < MANY_ITEMS - 2048,
        "{} items done at the kill",
        done_before.len()
    );

    let out = sandbox.cairn(&["resume", "1"]);
    assert_eq!(code(&out), Some(0), "{}", stderr(&out));

    let runs = lines(&sandbox, "runs");
    let mut times: BTreeMap<&str, usize> = BTreeMap::new();
    for line in &runs {
        *times.entry(line.as_str()).or_default() += 1;
    }
    // Every item ran; those recorded done before the kill never again.
    for item in &items {
        assert!(times.contains_key(item.as_str()), "{item} never ran");
    }
    for item in &done_before {
        assert_eq!(times[item.as_str()], 1, "{item} ran again");
    }
    let show = sandbox.show(1);
    assert_eq!(items_done(&show, "work").len(), MANY_ITEMS);
    assert_eq!(show["status"], "succeeded");
    // The gathering saw every item's output, in item order.
    assert_eq!(lines(&sandbox, "report"), items);
}
