//! What a new user hit in a day of use (issue 22), each through the real binary: the item's number
//! is in each test's comment.

use crate::support::{Sandbox, code, stderr, stdout, task};

/// Item 11: `--quiet` prints only errors: nothing for an op that succeeded, the end of one that
/// failed.
#[test]
fn quiet_prints_nothing_for_a_success_and_the_end_of_a_failure() {
    let sandbox = Sandbox::new();
    sandbox.write(
        "ok.yaml",
        "name: ok\nsteps:\n  - id: a\n    run: \"true\"\n",
    );
    sandbox.write(
        "bad.yaml",
        "name: bad\nsteps:\n  - id: a\n    run: exit 3\n",
    );
    let out = sandbox.cairn(&["-q", "run", "ok.yaml"]);
    assert_eq!(code(&out), Some(0), "{}", stderr(&out));
    assert_eq!(stderr(&out), "", "a success says nothing with --quiet");
    assert_eq!(stdout(&out), "");
    let out = sandbox.cairn(&["-q", "run", "bad.yaml"]);
    assert_eq!(code(&out), Some(1));
    let err = stderr(&out);
    assert!(err.contains("op 2 failed"), "{err}");
    assert!(!err.contains("started"), "only the end: {err}");
}

/// Item 21: written `key = value` in `$CAIRN_OUTPUT`, the spaces around `=` are not part of the
/// value (`key= value` keeps its space: nothing there is layout).
#[test]
fn spaces_around_the_equals_sign_of_an_output_are_layout() {
    let sandbox = Sandbox::new();
    sandbox.write(
        "plan.yaml",
        "name: out\nsteps:\n  - id: a\n    run: |\n      echo 'spaced = node-2' >> \"$CAIRN_OUTPUT\"\n      echo 'tabbed\t=\tx' >> \"$CAIRN_OUTPUT\"\n      echo 'kept= y' >> \"$CAIRN_OUTPUT\"\n",
    );
    let out = sandbox.cairn(&["run", "plan.yaml"]);
    assert_eq!(code(&out), Some(0), "{}", stderr(&out));
    let show = sandbox.show(1);
    let outputs = &task(&show, "a")["outputs"];
    assert_eq!(outputs["spaced"], "node-2");
    assert_eq!(outputs["tabbed"], "x");
    assert_eq!(outputs["kept"], " y");
}

/// Item 21: a mistyped step name gets a "did you mean" (`approve`, `mark`, `resume --from`).
#[test]
fn a_mistyped_step_gets_a_did_you_mean() {
    let sandbox = Sandbox::new();
    sandbox.write(
        "plan.yaml",
        "name: gate\nsteps:\n  - id: confirm\n    approve: go?\n  - id: switch\n    needs: [confirm]\n    run: \"true\"\n",
    );
    let mut run = sandbox.spawn(&["run", "plan.yaml"]);
    sandbox.wait_for_db();
    let started = std::time::Instant::now();
    while sandbox.op_count() == 0 || sandbox.show(1)["status"] != "waiting" {
        assert!(started.elapsed() < std::time::Duration::from_secs(20));
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let out = sandbox.cairn(&["approve", "1", "confirn"]);
    assert_eq!(code(&out), Some(2));
    assert!(
        stderr(&out).contains("has no step or hook `confirn`; did you mean `confirm`?"),
        "{}",
        stderr(&out)
    );
    let out = sandbox.cairn(&["approve", "1", "confirm"]);
    assert_eq!(code(&out), Some(0), "{}", stderr(&out));
    assert_eq!(run.wait().unwrap().code(), Some(0));
    let out = sandbox.cairn(&["resume", "1", "--from", "swich", "--dry-run"]);
    assert_eq!(code(&out), Some(2));
    assert!(
        stderr(&out).contains("did you mean `switch`?"),
        "{}",
        stderr(&out)
    );
}

/// Item 11: `status` says when `--limit` left ops out; `status --watch` into a pipe writes one
/// table after another, no screen-clearing codes.
#[test]
fn status_says_when_the_list_is_cut_and_watch_writes_no_escape_codes_into_a_pipe() {
    let sandbox = Sandbox::new();
    sandbox.write("plan.yaml", "name: n\nsteps:\n  - id: a\n    noop: true\n");
    for _ in 0..3 {
        assert_eq!(code(&sandbox.cairn(&["run", "plan.yaml"])), Some(0));
    }
    let out = sandbox.cairn(&["status", "--limit", "2"]);
    assert_eq!(code(&out), Some(0));
    assert_eq!(stdout(&out).lines().count(), 3, "a header and two ops");
    assert!(
        stderr(&out).contains("the newest 2 ops; `--limit N` or `--all` lists more"),
        "{}",
        stderr(&out)
    );
    let out = sandbox.cairn(&["status", "--limit", "3"]);
    assert_eq!(stderr(&out), "", "nothing was left out");

    let mut watch = sandbox
        .command(&["status", "--watch"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(1500));
    watch.kill().unwrap();
    let out = watch.wait_with_output().unwrap();
    let text = stdout(&out);
    assert!(!text.contains('\u{1b}'), "escape codes in a pipe: {text:?}");
    assert!(
        text.matches("OP_ID").count() >= 2,
        "one table per refresh: {text}"
    );
}

/// Item 4 (and the contract's reads): a read of a database that does not exist is an error that
/// names it (exit 2), not an empty list, and creates nothing.
#[test]
fn a_read_of_a_database_that_does_not_exist_names_it() {
    let sandbox = Sandbox::new();
    if crate::support::postgres() {
        return a_read_of_a_postgres_database_that_does_not_exist_names_it(&sandbox);
    }
    let typo = sandbox.path().join("typo/cairn.db");
    let db = typo.to_str().unwrap();
    for args in [
        &["--db", db, "status"][..],
        &["--db", db, "status", "--json"][..],
        &["--db", db, "locks"][..],
        &["--db", db, "show", "1"][..],
        &["--db", db, "logs", "1"][..],
        &["--db", db, "schedule", "list"][..],
    ] {
        let out = sandbox.cairn(args);
        assert_eq!(code(&out), Some(2), "{args:?}");
        assert_eq!(stdout(&out), "", "{args:?}");
        assert!(
            stderr(&out).contains(&format!("there is no database at `{db}`")),
            "{args:?}: {}",
            stderr(&out)
        );
    }
    assert!(
        !sandbox.path().join("typo").exists(),
        "a read created something"
    );
}

/// On PostgreSQL: a database missing on the server is named by every read, which prints nothing
/// and creates nothing (cairn never creates a database, only its tables in one that exists).
fn a_read_of_a_postgres_database_that_does_not_exist_names_it(sandbox: &Sandbox) {
    let name = format!("cairn_e2e_typo_{}", std::process::id());
    let db = format!("postgres://{}/{name}", crate::support::PG_SERVER);
    let exists = format!("SELECT count(*) FROM pg_database WHERE datname = '{name}'");
    for args in [
        &["--db", &db, "status"][..],
        &["--db", &db, "status", "--json"][..],
        &["--db", &db, "locks"][..],
        &["--db", &db, "show", "1"][..],
        &["--db", &db, "logs", "1"][..],
        &["--db", &db, "schedule", "list"][..],
    ] {
        let out = sandbox.cairn(args);
        assert_eq!(code(&out), Some(2), "{args:?}: {}", stderr(&out));
        assert_eq!(stdout(&out), "", "{args:?}");
        assert!(stderr(&out).contains(&name), "{args:?}: {}", stderr(&out));
    }
    assert_eq!(
        sandbox.sql(&exists).trim(),
        "0",
        "a read created the database"
    );
}

/// Item 16: canceling a failed op takes it over only to end it: it says so, never "resumed".
#[test]
fn canceling_a_failed_op_does_not_say_it_resumed() {
    let sandbox = Sandbox::new();
    sandbox.write(
        "plan.yaml",
        "name: f\nsteps:\n  - id: a\n    run: exit 3\nhooks:\n  on_cancel:\n    - run: touch cleaned\n",
    );
    assert_eq!(code(&sandbox.cairn(&["run", "plan.yaml"])), Some(1));
    let out = sandbox.cairn(&["cancel", "1", "--reason", "given up"]);
    assert_eq!(code(&out), Some(0), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(!err.contains("resumed"), "{err}");
    assert!(err.contains("op 1 taken over to cancel it"), "{err}");
    assert!(err.contains("op 1 canceled"), "{err}");
    assert!(sandbox.path().join("cleaned").exists());
    assert_eq!(sandbox.show(1)["status"], "canceled");
}

/// Item 21: an op that failed (here: its gate was rejected) keeps its lock, and its last line says
/// so and how to let go; an op without a lock says nothing of locks.
#[test]
fn a_failed_op_that_keeps_its_lock_says_how_to_release_it() {
    let sandbox = Sandbox::new();
    sandbox.write(
        "plan.yaml",
        "name: gate\nlock: cluster/a\nsteps:\n  - id: confirm\n    approve: go?\n",
    );
    let run = sandbox
        .command(&["run", "plan.yaml"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    sandbox.wait_for_db();
    let started = std::time::Instant::now();
    while sandbox.show(1)["status"] != "waiting" {
        assert!(started.elapsed() < std::time::Duration::from_secs(20));
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let out = sandbox.cairn(&["approve", "1", "confirm", "--reject"]);
    assert_eq!(code(&out), Some(0), "{}", stderr(&out));
    let ended = run.wait_with_output().unwrap();
    assert_eq!(ended.status.code(), Some(1));
    let err = stderr(&ended);
    assert!(
        err.contains("until then it keeps its lock `cluster/a`, which `cairn cancel 1` releases"),
        "{err}"
    );
    sandbox.write(
        "free.yaml",
        "name: free\nsteps:\n  - id: a\n    run: exit 1\n",
    );
    let out = sandbox.cairn(&["run", "free.yaml"]);
    assert_eq!(code(&out), Some(1));
    assert!(!stderr(&out).contains("lock"), "{}", stderr(&out));
}

/// Every command that takes `--json` honours it: `submit` prints `{id, uuid}`, `run` and `resume`
/// the op's record once it ends (as `show --json`), `logs` one object per line of output, `graph`
/// the steps and their edges; before or after the subcommand alike.
#[test]
fn json_is_honoured_by_submit_run_resume_logs_and_graph() {
    let sandbox = Sandbox::new();
    sandbox.write(
        "plan.yaml",
        "name: j\nsteps:\n  - id: a\n    outputs: [x]\n    run: |\n      echo hi\n      echo oops >&2\n      echo x=1 >> \"$CAIRN_OUTPUT\"\n  - id: b\n    needs: [a]\n    run: test -e go\n",
    );
    let json = |args: &[&str]| -> Vec<serde_json::Value> {
        let out = sandbox.cairn(args);
        assert!(
            matches!(code(&out), Some(0 | 1)),
            "{args:?}: {}",
            stderr(&out)
        );
        serde_json::Deserializer::from_slice(&out.stdout)
            .into_iter::<serde_json::Value>()
            .map(Result::unwrap)
            .collect()
    };
    let submitted = json(&["submit", "plan.yaml", "--json"]);
    assert_eq!(submitted[0]["id"], 1);
    assert!(submitted[0]["uuid"].as_str().is_some_and(|u| u.len() == 36));
    assert_eq!(json(&["--json", "submit", "plan.yaml"])[0]["id"], 2);

    let ran = json(&["run", "plan.yaml", "--json"]);
    assert_eq!(ran.len(), 1);
    assert_eq!(
        (&ran[0]["id"], &ran[0]["status"]),
        (&3.into(), &"failed".into())
    );
    assert_eq!(ran[0]["tasks"][0]["outputs"]["x"], "1");
    sandbox.write("go", "");
    let resumed = json(&["resume", "3", "--json"]);
    assert_eq!(resumed[0]["status"], "succeeded");

    let lines = json(&["logs", "3", "a", "--json"]);
    let texts: Vec<(&str, &str)> = lines
        .iter()
        .map(|l| (l["stream"].as_str().unwrap(), l["text"].as_str().unwrap()))
        .collect();
    assert_eq!(texts, [("stdout", "hi"), ("stderr", "oops")]);
    assert!(
        lines
            .iter()
            .all(|l| l["task"] == "a" && l["attempt"] == 1 && l["time"].is_string())
    );

    let graph = json(&["graph", "plan.yaml", "--json"]);
    assert_eq!(
        graph[0]["edges"],
        serde_json::json!([{"from": "a", "to": "b"}])
    );
    assert_eq!(graph[0]["nodes"][1]["needs"], serde_json::json!(["a"]));
}

/// `logs` picks what to read: `--tail N` lines of each attempt, `--attempt N`, `--since` (a
/// duration back, or a time), `--timestamps`; a log cut at `log_limit` keeps its start, says what
/// was cut, and its end starts at a line.
#[test]
fn logs_take_tail_attempt_since_and_timestamps_and_a_cut_log_starts_at_a_line() {
    let sandbox = Sandbox::new();
    sandbox.write(
        "plan.yaml",
        "name: l\nsteps:\n  - id: a\n    retry: { attempts: 2, delay: 1s }\n    run: |\n      for i in 1 2 3 4 5; do echo \"line $i\"; done\n      test -e ok || { touch ok; exit 1; }\n  - id: big\n    needs: [a]\n    log_limit: 1KiB\n    run: |\n      for i in $(seq 1 300); do echo \"line number $i of the output\"; done\n",
    );
    let out = sandbox.cairn(&["run", "plan.yaml"]);
    assert_eq!(code(&out), Some(0), "{}", stderr(&out));
    let logs = |args: &[&str]| {
        let mut all = vec!["logs", "1"];
        all.extend_from_slice(args);
        let out = sandbox.cairn(&all);
        assert_eq!(code(&out), Some(0), "{args:?}: {}", stderr(&out));
        stdout(&out)
    };
    assert_eq!(
        logs(&["a", "--tail", "2"]),
        "==> a (attempt 1) <==\nline 4\nline 5\n==> a (attempt 2) <==\nline 4\nline 5\n"
    );
    assert_eq!(
        logs(&["a", "--attempt", "2", "--tail", "1"]),
        "==> a (attempt 2) <==\nline 5\n"
    );
    let stamped = logs(&["a", "--attempt", "1", "--tail", "1", "--timestamps"]);
    let line = stamped.lines().nth(1).unwrap();
    assert!(
        line.ends_with(" line 5") && line.len() == "2026-12-03 13:18:04 line 5".len(),
        "{stamped}"
    );
    assert_eq!(logs(&["a", "--since", "2099-01-01T00:00:00Z"]), "");
    assert_eq!(
        logs(&["a", "--since", "1h", "--attempt", "1"])
            .lines()
            .count(),
        6
    );
    let bad = sandbox.cairn(&["logs", "1", "--since", "yesterday"]);
    assert_eq!(code(&bad), Some(2));
    // Over the limit: the start, a line saying what was cut, the end from the start of a line.
    let big = logs(&["big"]);
    let mut lines = big.lines().skip(1);
    assert_eq!(lines.next(), Some("line number 1 of the output"), "{big}");
    let mut after = lines.skip_while(|l| !l.starts_with("[cairn: "));
    assert!(
        after.next().is_some_and(|note| note
            .ends_with(" bytes cut here; the log keeps its first 128 bytes and last 896 bytes]")),
        "{big}"
    );
    let first = after.next().unwrap();
    assert!(
        first.starts_with("line number ") && first.ends_with(" of the output"),
        "{big}"
    );
    assert!(big.ends_with("line number 300 of the output\n"), "{big}");
    // An event says an exit code once.
    let failed: Vec<String> = sandbox.show(1)["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "task-failed" || e["kind"] == "task-retrying")
        .map(|e| e["message"].as_str().unwrap().to_owned())
        .collect();
    assert!(
        failed
            .iter()
            .any(|m| m.ends_with("attempt 1 failed, exit code 1")),
        "{failed:?}"
    );
    assert!(
        failed.iter().all(|m| !m.contains(": exit code")),
        "{failed:?}"
    );
}

/// Item 8: child ops of sub-plans are listed under their parent in `status` (`--limit` counts the
/// parent; `--children` lists them flat), their live lines say which item and op they belong to,
/// fan-out items have short labels (the whole item in `show`), and `logs` of a sub-plan step
/// points to its child ops.
#[test]
fn children_are_listed_under_their_parent_and_their_lines_say_whose_they_are() {
    let sandbox = Sandbox::new();
    sandbox.write(
        "child.yaml",
        "name: child\nparams:\n  host: { required: true }\nsteps:\n  - id: copy\n    run: echo copied {{ params.host }}\n  - id: check\n    needs: [copy]\n    run: echo checked\n",
    );
    sandbox.write(
        "parent.yaml",
        r#"name: parent
params:
  items: { type: list, default: [a, b, c] }
steps:
  - id: each
    for_each: ["/srv/mysql/data-node-1", "/srv/mysql/data-node-2", "/srv/mysql/a-very-long-directory-name-for-node-3/"]
    run: echo {{ item }}
  - id: sub
    needs: [each]
    for_each: "{{ params.items }}"
    plan: ./child.yaml
    with:
      host: "{{ item }}"
"#,
    );
    let out = sandbox.cairn(&["run", "parent.yaml"]);
    assert_eq!(code(&out), Some(0), "{}", stderr(&out));
    let err = stderr(&out);
    // Short labels: a path's last part; too long, the item's position.
    assert!(
        err.contains("  each[data-node-1]: started") && err.contains("  each[3]: started"),
        "{err}"
    );
    assert!(!err.contains("/srv/mysql"), "{err}");
    let show = stdout(&sandbox.cairn(&["show", "1"]));
    assert!(
        show.contains("item=/srv/mysql/a-very-long-directory-name-for-node-3/"),
        "{show}"
    );
    // Each child's lines name the parent's item and the child op.
    let children = sandbox.json(&["status", "--json", "--children", "--all"]);
    assert_eq!(
        children
            .as_array()
            .unwrap()
            .iter()
            .filter(|o| o["parent"] == 1)
            .count(),
        3,
        "{children}"
    );
    for (item, op) in ["a", "b", "c"].iter().zip([2, 3, 4]) {
        for line in [
            format!("  sub[{item}] › op {op} started: child"),
            format!("  sub[{item}] (op {op}) › copy: started"),
            format!("  sub[{item}] (op {op}) › check: succeeded"),
            format!("  sub[{item}] › op {op} succeeded"),
        ] {
            assert!(err.contains(&line), "no `{line}` in:\n{err}");
        }
    }
    // A second parent, of five children: `--limit 2` lists both parents, each with its children
    // under it; more than three that succeeded are one line.
    let out = sandbox.cairn(&["run", "parent.yaml", "-p", r#"items=["a","b","c","d","e"]"#]);
    assert_eq!(code(&out), Some(0), "{}", stderr(&out));
    let table = stdout(&sandbox.cairn(&["status", "--limit", "2"]));
    let firsts: Vec<&str> = table
        .lines()
        .skip(1)
        .map(|l| l.split("  ").next().unwrap())
        .collect();
    assert_eq!(firsts, ["5", "└ …", "1", "└ 2", "└ 3", "└ 4"], "{table}");
    assert!(
        table.contains("child (sub[c])") && table.contains("5 child ops (`--children` lists them)"),
        "{table}"
    );
    let flat = sandbox.json(&["status", "--json", "--children", "--limit", "4"]);
    let ids: Vec<i64> = flat
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["id"].as_i64().unwrap())
        .collect();
    assert_eq!(ids, [10, 9, 8, 7]);
    // `logs` of a sub-plan step says where its steps printed.
    let out = sandbox.cairn(&["logs", "1", "sub"]);
    assert_eq!(code(&out), Some(0), "{}", stderr(&out));
    assert!(
        stderr(&out)
            .contains("op 2 (`sub[a]`), op 3 (`sub[b]`), op 4 (`sub[c]`); see `cairn logs 2`"),
        "{}",
        stderr(&out)
    );
    let out = sandbox.cairn(&["logs", "2"]);
    assert!(stdout(&out).contains("copied a"), "{}", stdout(&out));
}

/// The `CUR_TASK` cell of the first op in `status`'s table.
fn cur_task_cell(sandbox: &Sandbox) -> String {
    let out = sandbox.cairn(&["status"]);
    assert_eq!(code(&out), Some(0), "{}", stderr(&out));
    let text = stdout(&out);
    let mut lines = text.lines();
    let at = lines.next().unwrap().find("CUR_TASK").unwrap();
    lines.next().unwrap()[at..].trim().to_owned()
}

/// The tasks `status --json` lists for the first op, as (task, status).
fn current_tasks(sandbox: &Sandbox) -> Vec<(String, String)> {
    sandbox.json(&["status", "--json"])[0]["current_tasks"]
        .as_array()
        .map(|tasks| {
            tasks
                .iter()
                .map(|t| {
                    (
                        t["task"].as_str().unwrap().to_owned(),
                        t["status"].as_str().unwrap().to_owned(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Polls `status --json` until the first op lists `count` current tasks, up to 20 s.
fn wait_for_current(sandbox: &Sandbox, count: usize) -> Vec<(String, String)> {
    let started = std::time::Instant::now();
    loop {
        if sandbox.cairn(&["status"]).status.code() == Some(0) {
            let current = current_tasks(sandbox);
            if current.len() >= count {
                return current;
            }
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(20),
            "never {count} current tasks"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
    list.iter()
        .map(|(a, b)| ((*a).to_owned(), (*b).to_owned()))
        .collect()
}

/// Every task of `show` with its status.
fn task_statuses(show: &serde_json::Value) -> Vec<(String, String)> {
    show["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            (
                t["id"].as_str().unwrap().to_owned(),
                t["status"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

/// A step that runs until the test writes `go` (a minute at most, should the test fail first).
const WAIT_FOR_GO: &str =
    "i=0; while [ ! -f go ] && [ $i -lt 1200 ]; do sleep 0.05; i=$((i+1)); done";

/// A `cairn run` that is killed when the test ends, however it ends.
struct Running(std::process::Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Lets the steps of op `op` that wait for `go` end, and waits until they have.
fn let_steps_end(sandbox: &Sandbox, op: i64) {
    let uuid = sandbox.show(op)["uuid"].as_str().unwrap().to_owned();
    sandbox.write("go", "");
    let started = std::time::Instant::now();
    while !crate::support::step_processes(&uuid).is_empty() {
        assert!(started.elapsed() < std::time::Duration::from_secs(20));
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Items 6 and 7: `CUR_TASK` lists every task running or waiting (two processes, a sleep, an
/// approval gate), in plan order, the table the first two and how many more; after `kill -9` of
/// `cairn run`, no task of the interrupted op shows `running` or `waiting`: each shows
/// `interrupted`, derived when read.
#[test]
fn cur_task_lists_every_running_task_and_after_a_kill_none_shows_running() {
    let sandbox = Sandbox::new();
    sandbox.write(
        "plan.yaml",
        &format!(
            "name: many\nsteps:\n  - id: a\n    run: {WAIT_FOR_GO}\n  - id: b\n    run: {WAIT_FOR_GO}\n  - id: nap\n    sleep: 1h\n  - id: gate\n    approve: go on?\n  - id: after\n    needs: [a]\n    noop: true\n"
        ),
    );
    let mut run = Running(sandbox.spawn(&["run", "plan.yaml"]));
    let current = wait_for_current(&sandbox, 4);
    assert_eq!(
        current,
        pairs(&[
            ("a", "running"),
            ("b", "running"),
            ("nap", "running"),
            ("gate", "waiting")
        ])
    );
    let op = &sandbox.json(&["status", "--json"])[0];
    assert_eq!(op["current_task"], "a, b, nap, gate", "{op}");
    assert!(op["current_tasks"][0]["host"].is_null(), "{op}");
    assert_eq!(cur_task_cell(&sandbox), "a, b (+2)");

    run.0.kill().unwrap();
    run.0.wait().unwrap();
    let show = sandbox.show(1);
    assert_eq!(show["status"], "interrupted");
    assert_eq!(
        task_statuses(&show),
        pairs(&[
            ("a", "interrupted"),
            ("b", "interrupted"),
            ("nap", "interrupted"),
            ("gate", "interrupted"),
            ("after", "pending"),
        ]),
        "{show}"
    );
    assert!(show["current_tasks"].as_array().unwrap().is_empty());
    assert_eq!(cur_task_cell(&sandbox), "-");
    let table = stdout(&sandbox.cairn(&["show", "1"]));
    assert!(!table.contains("running"), "{table}");
    let dry = stdout(&sandbox.cairn(&["resume", "1", "--dry-run"]));
    assert!(dry.contains("run   a  (interrupted)"), "{dry}");
    // The steps the kill left behind end by themselves.
    let_steps_end(&sandbox, 1);
}

/// Item 7: Ctrl-C (SIGINT to `cairn run`'s process group) stops the op `interrupted`; the task it
/// cut off shows `interrupted`, not a `pending` that looks like one never started, and the one
/// that never started stays `pending`. A resume runs it again.
#[test]
fn ctrl_c_shows_the_task_it_cut_off_interrupted() {
    use std::os::unix::process::CommandExt as _;
    let sandbox = Sandbox::new();
    sandbox.write(
        "plan.yaml",
        &format!(
            "name: cut\nsteps:\n  - id: long\n    run: touch started; {WAIT_FOR_GO}\n  - id: after\n    needs: [long]\n    noop: true\n"
        ),
    );
    let mut run = Running(
        sandbox
            .command(&["run", "plan.yaml"])
            .process_group(0)
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    sandbox.wait_for("started", std::time::Duration::from_secs(20));
    nix::sys::signal::killpg(
        nix::unistd::Pid::from_raw(i32::try_from(run.0.id()).unwrap()),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    assert_eq!(run.0.wait().unwrap().code(), Some(4));
    let show = sandbox.show(1);
    assert_eq!(show["status"], "interrupted");
    assert_eq!(
        task_statuses(&show),
        pairs(&[("long", "interrupted"), ("after", "pending")]),
        "{show}"
    );
    assert_eq!(task(&show, "long")["history"][0]["status"], "interrupted");
    assert_eq!(cur_task_cell(&sandbox), "-");

    sandbox.write("go", "");
    let out = sandbox.cairn(&["resume", "1"]);
    assert_eq!(code(&out), Some(0), "{}", stderr(&out));
    assert_eq!(
        task_statuses(&sandbox.show(1)),
        pairs(&[("long", "succeeded"), ("after", "succeeded")])
    );
}

/// Item 6: an approval gate shows in `CUR_TASK` while it waits, beside a process that runs at the
/// same time; items 7 and 15: once another step fails the op, the gate it left unanswered ends
/// `canceled`, not `waiting` under a failed op.
#[test]
fn a_waiting_gate_is_a_current_task_and_not_waiting_under_a_failed_op() {
    let sandbox = Sandbox::new();
    sandbox.write(
        "plan.yaml",
        &format!(
            "name: gated\nsteps:\n  - id: gate\n    approve: go on?\n  - id: work\n    run: {WAIT_FOR_GO}; exit 3\n"
        ),
    );
    let mut run = Running(sandbox.spawn(&["run", "plan.yaml"]));
    let current = wait_for_current(&sandbox, 2);
    assert_eq!(current, pairs(&[("gate", "waiting"), ("work", "running")]));
    assert_eq!(cur_task_cell(&sandbox), "gate, work");

    let_steps_end(&sandbox, 1);
    assert_eq!(run.0.wait().unwrap().code(), Some(1));
    let show = sandbox.show(1);
    assert_eq!(show["status"], "failed");
    assert_eq!(
        task_statuses(&show),
        pairs(&[("gate", "canceled"), ("work", "failed")]),
        "{show}"
    );
    assert_eq!(cur_task_cell(&sandbox), "-");
}

/// `-p KEY=@FILE` and `-p KEY=env:NAME` keep a secret off cairn's command line (where `ps` shows
/// it); the step gets the value itself (a file's one trailing line break dropped). A secret
/// written inline still works, with a warning saying how not to. `@@` is a literal `@`.
#[test]
fn a_secret_param_may_come_from_a_file_or_the_environment() {
    let sandbox = Sandbox::new();
    sandbox.write(
        "plan.yaml",
        "name: login\nparams:\n  password: { secret: true, required: true }\n  handle: { required: true }\nsteps:\n  - id: login\n    env: { PW: \"{{ params.password }}\" }\n    run: |\n      printf %s \"$PW\" > got-password\n      printf %s {{ params.handle }} > got-handle\n",
    );
    sandbox.write("pw.txt", "s3cr3t-from-file\n");
    let out = sandbox.cairn(&[
        "run",
        "plan.yaml",
        "-p",
        "password=@pw.txt",
        "-p",
        "handle=@@ops",
    ]);
    assert_eq!(code(&out), Some(0), "{}", stderr(&out));
    assert_eq!(sandbox.read("got-password"), "s3cr3t-from-file");
    assert_eq!(sandbox.read("got-handle"), "@ops");
    assert!(!stderr(&out).contains("warning"), "{}", stderr(&out));

    let out = sandbox
        .command(&[
            "run",
            "plan.yaml",
            "-p",
            "password=env:LOGIN_PW",
            "-p",
            "handle=x",
        ])
        .env("LOGIN_PW", "s3cr3t-from-env")
        .output()
        .unwrap();
    assert_eq!(code(&out), Some(0), "{}", stderr(&out));
    assert_eq!(sandbox.read("got-password"), "s3cr3t-from-env");

    let out = sandbox.cairn(&[
        "run",
        "plan.yaml",
        "-p",
        "password=inline",
        "-p",
        "handle=x",
    ]);
    assert_eq!(code(&out), Some(0), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("warning: the secret param `password` is on the command line")
            && stderr(&out).contains("password=@FILE"),
        "{}",
        stderr(&out)
    );

    for (arg, says) in [
        ("password=@missing.txt", "missing.txt"),
        (
            "password=env:NO_SUCH_VARIABLE_HERE",
            "`NO_SUCH_VARIABLE_HERE` is not set",
        ),
        ("password=@", "name the file"),
    ] {
        let out = sandbox.cairn(&["run", "plan.yaml", "-p", arg, "-p", "handle=x"]);
        assert_eq!(code(&out), Some(2), "{arg}: {}", stderr(&out));
        assert!(stderr(&out).contains(says), "{arg}: {}", stderr(&out));
    }
    assert_eq!(sandbox.op_count(), 3, "a refused `-p` stores no op");
}

/// Polls `status --json` until the op's first current task reports `progress`.
fn wait_for_progress(sandbox: &Sandbox, progress: &str) -> serde_json::Value {
    let started = std::time::Instant::now();
    loop {
        let ops = sandbox.json(&["status", "--json"]);
        if ops[0]["current_tasks"][0]["progress"] == progress {
            return ops;
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(30),
            "never showed progress `{progress}`: {ops}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// A step's `$CAIRN_PROGRESS` lines show in `status` (the table and `--json`) and `show`; a
/// resume after `kill -9` starts the new attempt's progress afresh; the last one is kept when the
/// task ends.
#[test]
fn a_steps_progress_shows_while_it_runs_and_across_a_resume() {
    let sandbox = Sandbox::new();
    sandbox.write(
        "plan.yaml",
        "name: restore\nsteps:\n  - id: copy\n    run: |\n      if [ \"$CAIRN_ATTEMPT\" = 1 ]; then\n        echo 'progress=10' >> \"$CAIRN_PROGRESS\"\n        echo 'progress=45/100 restoring table x' >> \"$CAIRN_PROGRESS\"\n      else\n        echo 'progress=90' >> \"$CAIRN_PROGRESS\"\n      fi\n      while [ ! -f go ]; do sleep 0.05; done\n",
    );
    let mut run = sandbox.spawn(&["run", "plan.yaml"]);
    sandbox.wait_for_db();
    let ops = wait_for_progress(&sandbox, "45/100 restoring table x");
    assert_eq!(ops[0]["current_tasks"][0]["task"], "copy");
    let table = stdout(&sandbox.cairn(&["status"]));
    assert!(table.contains("copy (45/100 restoring table x)"), "{table}");
    let show = sandbox.show(1);
    assert_eq!(task(&show, "copy")["progress"], "45/100 restoring table x");
    let text = stdout(&sandbox.cairn(&["show", "1"]));
    assert!(
        text.contains("progress: 45/100 restoring table x"),
        "{text}"
    );

    run.kill().unwrap();
    run.wait().unwrap();
    let mut resumed = sandbox.spawn(&["resume", "1"]);
    wait_for_progress(&sandbox, "90%");
    sandbox.write("go", "");
    assert!(resumed.wait().unwrap().success());
    let show = sandbox.show(1);
    assert_eq!(task(&show, "copy")["status"], "succeeded");
    assert_eq!(task(&show, "copy")["progress"], "90%");
}
