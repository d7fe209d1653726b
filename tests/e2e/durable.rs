//! The durable core, through the real binary on a real database file: runs, failures and
//! resumes, `kill -9` at random moments, Ctrl-C, leftover processes, snapshots, refusals.

use std::process::Command;
use std::time::{Duration, Instant};

use crate::support::{Sandbox, alive, code, stderr, step_processes, task};

const PARALLEL: &str = r#"
name: parallel
params:
  who: { default: world }
steps:
  - id: start
    outputs: [greeting]
    run: |
      echo start >> runs
      echo greeting=hello {{ params.who }} >> "$CAIRN_OUTPUT"
  - id: left
    needs: [start]
    outputs: [side]
    run: |
      test {{ steps.start.outputs.greeting }} = "hello world"
      echo left >> runs
      echo side=L >> "$CAIRN_OUTPUT"
  - id: right
    needs: [start]
    outputs: [side]
    exec: [sh, -c, 'echo right >> runs; echo side=R >> "$CAIRN_OUTPUT"']
  - id: join
    needs: [left, right]
    run: |
      echo {{ steps.left.outputs.side }}{{ steps.right.outputs.side }} > joined
      echo join >> runs
"#;

#[test]
fn a_dag_with_parallel_branches_passes_outputs_downstream() {
    let sandbox = Sandbox::new();
    sandbox.write("plan.yaml", PARALLEL);
    let out = sandbox.cairn(&["run", "plan.yaml"]);
    assert_eq!(code(&out), Some(0), "{}", stderr(&out));
    assert_eq!(sandbox.read("joined"), "LR\n");
    let mut runs: Vec<String> = sandbox.read("runs").lines().map(str::to_owned).collect();
    runs.sort();
    assert_eq!(runs, ["join", "left", "right", "start"]);

    let status = sandbox.json(&["status", "--json"]);
    let op = &status[0];
    for key in [
        "id",
        "uuid",
        "plan",
        "name",
        "status",
        "created_at",
        "started_at",
        "ended_at",
        "elapsed_ms",
        "current_task",
    ] {
        assert!(op.get(key).is_some(), "status --json lacks `{key}`: {op}");
    }
    assert!(op["id"].is_i64());
    assert_eq!(op["plan"], "parallel");
    assert_eq!(op["status"], "succeeded");
    assert!(op["ended_at"].as_str().unwrap().ends_with('Z'));
    assert!(op["current_task"].is_null());

    let show = sandbox.show(op["id"].as_i64().unwrap());
    assert_eq!(show["params"]["who"], "world");
    let start = task(&show, "start");
    for key in [
        "id",
        "step",
        "item",
        "status",
        "attempts",
        "started_at",
        "ended_at",
        "exit_code",
        "error",
        "outputs",
    ] {
        assert!(start.get(key).is_some(), "task lacks `{key}`: {start}");
    }
    assert_eq!(start["outputs"]["greeting"], "hello world");
    assert_eq!(start["exit_code"], 0);
    assert_eq!(start["attempts"], 1);
    assert!(start["item"].is_null());
    let events = show["events"].as_array().unwrap();
    for key in ["at", "kind", "task", "message"] {
        assert!(events[0].get(key).is_some());
    }
    assert_eq!(events.first().unwrap()["kind"], "submitted");
    assert_eq!(events.last().unwrap()["kind"], "op-succeeded");
}

#[test]
fn a_failed_op_resumes_without_rerunning_what_succeeded() {
    let sandbox = Sandbox::new();
    sandbox.write(
        "plan.yaml",
        "name: fix-me\nsteps:\n  - id: one\n    run: echo one >> runs\n  - id: two\n    needs: [one]\n    run: test -f fixed && echo two >> runs\n  - id: three\n    needs: [two]\n    run: echo three >> runs\n",
    );
    let out = sandbox.cairn(&["run", "plan.yaml"]);
    assert_eq!(code(&out), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("cairn resume 1"), "{}", stderr(&out));
    let show = sandbox.show(1);
    assert_eq!(show["status"], "failed");
    assert_eq!(task(&show, "two")["status"], "failed");
    assert_eq!(task(&show, "two")["exit_code"], 1);
    assert_eq!(task(&show, "three")["status"], "pending");

    let dry = sandbox.cairn(&["resume", "1", "--dry-run"]);
    let dry = String::from_utf8_lossy(&dry.stdout);
    assert!(
        dry.contains("keep  one") && dry.contains("run   two") && dry.contains("run   three"),
        "{dry}"
    );

    sandbox.write("fixed", "");
    let out = sandbox.cairn(&["resume", "1"]);
    assert_eq!(code(&out), Some(0), "{}", stderr(&out));
    assert_eq!(sandbox.read("runs"), "one\ntwo\nthree\n", "`one` ran once");
    // Resuming a finished op is safe to repeat: success, and nothing runs.
    let again = sandbox.cairn(&["resume", "1"]);
    assert_eq!(code(&again), Some(0));
    assert!(
        stderr(&again).contains("already succeeded"),
        "{}",
        stderr(&again)
    );
    assert_eq!(sandbox.read("runs"), "one\ntwo\nthree\n");
    let show = sandbox.show(1);
    assert_eq!(show["status"], "succeeded");
    assert_eq!(task(&show, "two")["attempts"], 2);
    assert_eq!(task(&show, "one")["attempts"], 1);
}

#[test]
fn resume_uses_the_snapshot_not_the_file() {
    let sandbox = Sandbox::new();
    let plan = sandbox.write(
        "plan.yaml",
        "name: snap\nsteps:\n  - id: a\n    run: test -f go && echo original >> runs\n",
    );
    assert_eq!(code(&sandbox.cairn(&["run", "plan.yaml"])), Some(1));
    std::fs::write(
        &plan,
        "name: snap\nsteps:\n  - id: a\n    run: echo edited >> runs\n",
    )
    .unwrap();
    sandbox.write("go", "");
    assert_eq!(code(&sandbox.cairn(&["resume", "1"])), Some(0));
    assert_eq!(sandbox.read("runs"), "original\n");
    // And with the file gone.
    assert_eq!(code(&sandbox.cairn(&["run", "plan.yaml"])), Some(0));
    std::fs::remove_file(&plan).unwrap();
    std::fs::remove_file(sandbox.path().join("go")).unwrap();
    std::fs::write(
        sandbox.path().join("plan2.yaml"),
        "name: snap2\nsteps:\n  - id: a\n    run: test -f go2\n",
    )
    .unwrap();
    assert_eq!(code(&sandbox.cairn(&["run", "plan2.yaml"])), Some(1));
    std::fs::remove_file(sandbox.path().join("plan2.yaml")).unwrap();
    sandbox.write("go2", "");
    let out = sandbox.cairn(&["resume", "3"]);
    assert_eq!(code(&out), Some(0), "{}", stderr(&out));
}

#[test]
fn parameters_cannot_inject_shell_code() {
    let sandbox = Sandbox::new();
    sandbox.write(
        "plan.yaml",
        "name: inject\nparams:\n  target: { required: true }\nsteps:\n  - id: a\n    run: |\n      echo {{ params.target }} > seen\n      ls {{ params.target }} 2>/dev/null || true\n",
    );
    for value in [
        "x; touch pwned",
        "$(touch pwned)",
        "`touch pwned`",
        "a' ; touch pwned; '",
        "\"; touch pwned; \"",
        "x\ntouch pwned",
    ] {
        let out = sandbox.cairn(&["run", "plan.yaml", "-p", &format!("target={value}")]);
        assert_eq!(code(&out), Some(0), "{value:?}: {}", stderr(&out));
        assert!(!sandbox.path().join("pwned").exists(), "{value:?} ran code");
        assert_eq!(
            sandbox.read("seen"),
            format!("{value}\n"),
            "the value arrived as one word"
        );
    }
}

#[test]
fn a_second_resume_is_refused_while_the_first_runs() {
    let sandbox = Sandbox::new();
    sandbox.write(
        "plan.yaml",
        "name: wait\nsteps:\n  - id: first\n    run: echo first >> runs\n  - id: gate\n    needs: [first]\n    run: |\n      echo gate >> runs\n      touch started\n      while [ ! -f go ]; do sleep 0.05; done\n",
    );
    let mut run = sandbox.spawn(&["run", "plan.yaml"]);
    sandbox.wait_for("started", Duration::from_secs(20));
    run.kill().unwrap(); // SIGKILL
    run.wait().unwrap();
    std::fs::remove_file(sandbox.path().join("started")).unwrap();
    assert_eq!(
        sandbox.json(&["status", "--json"])[0]["status"],
        "interrupted"
    );

    let mut first = sandbox.spawn(&["resume", "1", "--grace", "1s"]);
    sandbox.wait_for("started", Duration::from_secs(20));
    let second = sandbox.cairn(&["resume", "1"]);
    assert_eq!(code(&second), Some(2), "{}", stderr(&second));
    let message = stderr(&second);
    assert!(
        message.contains(&format!("pid {}", first.id())),
        "names the owner: {message}"
    );
    assert!(message.contains("lease"), "{message}");
    assert_eq!(sandbox.json(&["status", "--json"])[0]["status"], "running");

    sandbox.write("go", "");
    assert!(first.wait().unwrap().success());
    assert_eq!(
        sandbox.read("runs"),
        "first\ngate\ngate\n",
        "`first` once; `gate` in flight at the kill, once more"
    );
}

#[test]
fn ctrl_c_interrupts_leaves_no_process_and_resume_finishes() {
    let sandbox = Sandbox::new();
    sandbox.write(
        "plan.yaml",
        "name: interrupt\nsteps:\n  - id: long\n    run: |\n      sleep 1000 &\n      touch started\n      while [ ! -f go ]; do sleep 0.05; done\n      echo long >> runs\n",
    );
    let mut run = sandbox.spawn(&["run", "plan.yaml", "--grace", "2s"]);
    sandbox.wait_for("started", Duration::from_secs(20));
    let uuid = sandbox.json(&["status", "--json"])[0]["uuid"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(!step_processes(&uuid).is_empty());
    crate::support::signal(&run, nix::sys::signal::Signal::SIGINT);
    let started = Instant::now();
    let status = run.wait().unwrap();
    assert_eq!(status.code(), Some(4));
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(
        step_processes(&uuid).is_empty(),
        "no step process is left behind"
    );
    let show = sandbox.show(1);
    assert_eq!(show["status"], "interrupted");
    assert_eq!(task(&show, "long")["status"], "interrupted");

    sandbox.write("go", "");
    let out = sandbox.cairn(&["resume", "1"]);
    assert_eq!(code(&out), Some(0), "{}", stderr(&out));
    assert_eq!(sandbox.read("runs"), "long\n");
    assert!(step_processes(&uuid).is_empty());
}

#[test]
fn resume_ends_a_leftover_process_group_before_running_the_step_again() {
    let sandbox = Sandbox::new();
    sandbox.write(
        "plan.yaml",
        r#"name: leftover
steps:
  - id: spawner
    run: |
      sleep 1000 &
      echo $! > child.$CAIRN_ATTEMPT
      touch started
      if [ "$CAIRN_ATTEMPT" = 1 ]; then wait; fi
      state=$(cut -d' ' -f3 /proc/$(cat child.1)/stat 2>/dev/null || echo gone)
      echo "$state" > seen-by-attempt-2
      case $state in Z|X|gone) ;; *) echo "attempt 1's child still runs" >&2; exit 1 ;; esac
"#,
    );
    let mut run = sandbox.spawn(&["run", "plan.yaml"]);
    sandbox.wait_for("child.1", Duration::from_secs(20));
    sandbox.wait_for("started", Duration::from_secs(20));
    run.kill().unwrap();
    run.wait().unwrap();
    let child: u32 = sandbox.read("child.1").trim().parse().unwrap();
    assert!(
        alive(child),
        "the step's child outlived the engine, as a real one would"
    );

    let out = sandbox.cairn(&["resume", "1", "--grace", "1s"]);
    assert_eq!(code(&out), Some(0), "{}", stderr(&out));
    assert!(!alive(child));
    let show = sandbox.show(1);
    let ended = show["events"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["kind"] == "leftovers-ended")
        .expect("an event says so");
    assert_eq!(ended["task"], "spawner");
    // The event comes before the second attempt started.
    let kinds: Vec<&str> = show["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    let ended_at = kinds.iter().position(|k| *k == "leftovers-ended").unwrap();
    let second_start = kinds.iter().rposition(|k| *k == "task-started").unwrap();
    assert!(ended_at < second_start, "{kinds:?}");
}

#[test]
fn status_refuses_files_that_are_not_usable_and_changes_nothing() {
    if crate::support::sqlite_only("files that are not SQLite databases, a lock held by sqlite3") {
        return;
    }
    let sandbox = Sandbox::new();
    let text = sandbox.write("notes.db", &"not a database at all\n".repeat(100));
    let before = std::fs::read(&text).unwrap();
    let out = sandbox.cairn(&["status", "--db", text.to_str().unwrap()]);
    assert_eq!(code(&out), Some(2));
    assert!(
        stderr(&out).contains("not a SQLite database"),
        "{}",
        stderr(&out)
    );
    assert_eq!(std::fs::read(&text).unwrap(), before);

    let other = sandbox.path().join("other.db");
    assert!(
        Command::new("sqlite3")
            .arg(&other)
            .arg("CREATE TABLE t (x);")
            .status()
            .unwrap()
            .success()
    );
    let before = std::fs::read(&other).unwrap();
    let out = sandbox.cairn(&["status", "--db", other.to_str().unwrap()]);
    assert_eq!(code(&out), Some(2));
    assert!(stderr(&out).contains("not a cairn one"), "{}", stderr(&out));
    assert_eq!(std::fs::read(&other).unwrap(), before);

    let dir = sandbox.path().join("a-directory");
    std::fs::create_dir(&dir).unwrap();
    let out = sandbox.cairn(&["status", "--db", dir.to_str().unwrap()]);
    assert_eq!(code(&out), Some(2));
    assert!(stderr(&out).contains("is a directory"), "{}", stderr(&out));

    // A database the user may not read: made by another user (root here), private to it.
    sandbox.write("plan.yaml", "name: x\nsteps:\n  - id: a\n    noop: true\n");
    let private = sandbox.path().join("private.db");
    let made = sandbox
        .command(&["run", "plan.yaml", "--db", private.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(code(&made), Some(0), "{}", stderr(&made));
    let before = std::fs::read(&private).unwrap();
    let out = if nix::unistd::geteuid().is_root() {
        // Root reads anything: ask as `nobody` instead.
        std::fs::set_permissions(
            sandbox.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .unwrap();
        Command::new("setpriv")
            .args([
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                env!("CARGO_BIN_EXE_cairn"),
                "status",
                "--db",
            ])
            .arg(&private)
            .output()
            .expect("setpriv (util-linux) runs cairn as another user")
    } else {
        std::fs::set_permissions(
            &private,
            std::os::unix::fs::PermissionsExt::from_mode(0o000),
        )
        .unwrap();
        sandbox.cairn(&["status", "--db", private.to_str().unwrap()])
    };
    assert_eq!(code(&out), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("cannot read it: Permission denied"),
        "{}",
        stderr(&out)
    );
    std::fs::set_permissions(
        &private,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    assert_eq!(std::fs::read(&private).unwrap(), before);

    // A database another process holds exclusively for longer than the busy timeout.
    assert_eq!(code(&sandbox.cairn(&["run", "plan.yaml"])), Some(0));
    let mut holder = sandbox.hold_the_database(
        true,
        "INSERT INTO events SELECT op_id, seq + 100, at, kind, task, message FROM events LIMIT 1;",
    );
    let out = sandbox
        .command(&["status"])
        .env("CAIRN_BUSY_TIMEOUT_MS", "200")
        .output()
        .unwrap();
    assert_eq!(code(&out), Some(2), "{}", stderr(&out));
    // It says who holds it.
    assert!(
        stderr(&out).contains(&format!(
            "stayed locked by another process (`sqlite3`, pid {})",
            holder.id()
        )),
        "{}",
        stderr(&out)
    );
    holder.kill().unwrap();
    holder.wait().unwrap();
    assert_eq!(sandbox.op_count(), 1, "nothing was lost");
}

#[test]
fn unknown_ops_and_bad_params_are_bad_input() {
    let sandbox = Sandbox::new();
    sandbox.write(
        "plan.yaml",
        "name: x\nparams:\n  n: { type: int, required: true }\n  mode: { enum: [fast, safe], default: safe }\nsteps:\n  - id: a\n    noop: true\n",
    );
    let out = sandbox.cairn(&["run", "plan.yaml", "-p", "n=many", "-p", "m=1"]);
    assert_eq!(code(&out), Some(2));
    let err = stderr(&out);
    assert!(
        err.contains("param `n` takes an int, found `many`") && err.contains("no param `m`"),
        "{err}"
    );
    // Missing, not one of the choices, misspelt: each said, nothing stored.
    for (args, said) in [
        (&["run", "plan.yaml"][..], "param `n` is required"),
        (
            &["run", "plan.yaml", "-p", "n=1", "-p", "mode=quick"],
            "`quick` is not one of `fast`, `safe`",
        ),
        (
            &["run", "plan.yaml", "-p", "n=1", "-p", "mdoe=fast"],
            "did you mean `mode`?",
        ),
    ] {
        let out = sandbox.cairn(args);
        assert_eq!(code(&out), Some(2), "{args:?}");
        assert!(stderr(&out).contains(said), "{}", stderr(&out));
    }
    assert!(!sandbox.holds_ops(), "a refused op is not stored");
    for args in [
        &["show", "7"][..],
        &["resume", "7"],
        &["logs", "7"],
        &["show", "seven"],
    ] {
        let out = sandbox.cairn(args);
        assert_eq!(code(&out), Some(2), "{args:?}");
    }
    assert!(stderr(&sandbox.cairn(&["show", "7"])).contains("no op 7"));
}

#[test]
fn a_secret_is_sealed_in_the_database_masked_everywhere_and_reaches_its_step() {
    let sandbox = Sandbox::new();
    let secret = "s3cr3t-Value-42";
    sandbox.write(
        "plan.yaml",
        "name: secret\nparams:\n  user: { default: admin }\n  password: { secret: true, required: true }\nsteps:\n  - id: login\n    env: { PGPASSWORD: \"{{ params.password }}\" }\n    run: |\n      echo connecting as {{ params.user }} with \"$PGPASSWORD\"\n      printf %s \"$PGPASSWORD\" > got-env\n      printf %s \"$CAIRN_PARAM_PASSWORD\" > got-param\n      test -f go\n",
    );
    let run = sandbox.cairn(&["run", "plan.yaml", "-p", &format!("password={secret}")]);
    assert_eq!(code(&run), Some(1), "{}", stderr(&run));
    sandbox.write("go", "");
    // The resume needs the secret again: it comes sealed from the database, opened with the key.
    let resumed = sandbox.cairn(&["resume", "1"]);
    assert_eq!(code(&resumed), Some(0), "{}", stderr(&resumed));

    let mut everything = String::new();
    for args in [
        &["status", "--json"][..],
        &["show", "1"],
        &["show", "1", "--json"],
        &["logs", "1"],
    ] {
        let out = sandbox.cairn(args);
        everything.push_str(&String::from_utf8_lossy(&out.stdout));
        everything.push_str(&stderr(&out));
    }
    everything.push_str(&stderr(&run));
    everything.push_str(&stderr(&resumed));
    assert!(
        !everything.contains(secret),
        "the secret leaked:\n{everything}"
    );
    assert!(
        everything.contains("connecting as admin with ********"),
        "{everything}"
    );
    assert_eq!(sandbox.show(1)["params"]["password"], "********");
    assert_eq!(
        sandbox.read("got-env"),
        secret,
        "the step received the secret after the resume"
    );
    assert_eq!(sandbox.read("got-param"), secret);
    sandbox.assert_not_stored(secret);
    // Beside a SQLite file cairn makes the key itself, private; PostgreSQL's is the sandbox's own.
    let key = sandbox.key_file();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&key).unwrap().permissions())
            & 0o777,
        0o600
    );
}

/// Outputs come from what steps printed, which may be anything a remote system said: they are
/// quoted like params wherever a template inserts them, also in a fan-out's items.
#[test]
fn step_outputs_and_fan_out_items_cannot_inject_shell_code() {
    let sandbox = Sandbox::new();
    sandbox.write(
        "plan.yaml",
        r#"
name: inject-outputs
steps:
  - id: remote
    outputs: [name, list]
    run: |
      printf '%s\n' 'name=x; touch pwned $(touch pwned) `touch pwned`' >> "$CAIRN_OUTPUT"
      printf '%s\n' 'list=["a; touch pwned","$(touch pwned)"]' >> "$CAIRN_OUTPUT"
  - id: use
    needs: [remote]
    run: echo {{ steps.remote.outputs.name }} > seen
  - id: each
    needs: [remote]
    for_each: "{{ steps.remote.outputs.list }}"
    run: echo {{ item }} >> items
"#,
    );
    let out = sandbox.cairn(&["run", "plan.yaml"]);
    assert_eq!(code(&out), Some(0), "{}", stderr(&out));
    assert!(!sandbox.path().join("pwned").exists(), "an output ran code");
    assert_eq!(
        sandbox.read("seen"),
        "x; touch pwned $(touch pwned) `touch pwned`\n"
    );
    let mut items: Vec<String> = sandbox
        .read("items")
        .lines()
        .map(ToOwned::to_owned)
        .collect();
    items.sort();
    assert_eq!(items, vec!["$(touch pwned)", "a; touch pwned"]);
}

/// A step's pid is recorded by a commit that is not synced (`Change::dies_with_the_boot`): once
/// cairn is killed, the operating system still holds it, and the resume finds through it a
/// process of the step's group that carries no marker.
#[test]
fn a_killed_runs_unsynced_pid_record_finds_a_markerless_child_on_resume() {
    let sandbox = Sandbox::new();
    sandbox.write(
        "plan.yaml",
        r#"name: markerless
steps:
  - id: spawner
    run: |
      if [ "$CAIRN_ATTEMPT" = 1 ]; then
        env -u CAIRN_ATTEMPT_ID sleep 1000 &
        echo $! > child
        touch started
        wait
      fi
"#,
    );
    let mut run = sandbox.spawn(&["run", "plan.yaml"]);
    sandbox.wait_for("started", Duration::from_secs(20));
    // The pid is recorded right after the spawn, beside the step's start: wait for that record
    // (it names the running task), or a kill before it proves nothing about it.
    let recorded = Instant::now();
    while sandbox.json(&["status", "--json"])[0]["current_task"] != "spawner" {
        assert!(
            recorded.elapsed() < Duration::from_secs(20),
            "the pid was never recorded"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    run.kill().unwrap();
    run.wait().unwrap();
    let child: u32 = sandbox.read("child").trim().parse().unwrap();
    assert!(alive(child), "the child outlived the engine");
    let environ = std::fs::read(format!("/proc/{child}/environ")).unwrap();
    assert!(
        !String::from_utf8_lossy(&environ).contains("CAIRN_ATTEMPT_ID="),
        "the child carries no marker"
    );
    let out = sandbox.cairn(&["resume", "1", "--grace", "1s"]);
    assert_eq!(code(&out), Some(0), "{}", stderr(&out));
    assert!(
        !alive(child),
        "the resume ended it through the recorded group"
    );
}

/// A step's process is recorded once it has run 10 ms, or with its end: cairn killed before that
/// leaves a `running` attempt with no process. The resume still ends a child of the step's group
/// that carries no marker: through the group its marked leader leads. The kill has to land in
/// those 10 ms, so the test tries again (a fresh run) until one did.
#[test]
fn a_run_killed_before_its_step_s_process_is_recorded_ends_a_markerless_child_on_resume() {
    for _ in 0..20 {
        let sandbox = Sandbox::new();
        sandbox.write(
            "plan.yaml",
            r#"name: unrecorded
steps:
  - id: spawner
    run: |
      if [ "$CAIRN_ATTEMPT" = 1 ]; then
        env -u CAIRN_ATTEMPT_ID sleep 1000 &
        echo $! > child
        touch started
        sleep 1000
      fi
"#,
        );
        let mut run = sandbox.spawn(&["run", "plan.yaml"]);
        let started = sandbox.path().join("started");
        let waited = Instant::now();
        while !started.exists() {
            assert!(waited.elapsed() < Duration::from_secs(20), "never started");
            std::thread::sleep(Duration::from_micros(200));
        }
        run.kill().unwrap();
        run.wait().unwrap();
        let child: u32 = sandbox.read("child").trim().parse().unwrap();
        let recorded = sandbox.sql("SELECT COUNT(*) FROM attempts WHERE pid IS NOT NULL");
        if recorded.trim() != "0" {
            // Too late: the record was in. End what is left and try again.
            let out = sandbox.cairn(&["cancel", "1"]);
            assert_eq!(code(&out), Some(0), "{}", stderr(&out));
            assert!(!alive(child));
            continue;
        }
        assert!(alive(child), "the child outlived the engine");
        let out = sandbox.cairn(&["resume", "1", "--grace", "1s"]);
        assert_eq!(code(&out), Some(0), "{}", stderr(&out));
        assert!(
            !alive(child),
            "the resume ended it through its marked leader's group"
        );
        return;
    }
    panic!("no kill landed before the step's process was recorded in 20 runs");
}

/// An attempt interrupted by Ctrl-C or by `kill -9` of cairn is not a failure: it does not use up
/// one of the step's `retry.attempts` (issue 22, item 13). With `attempts: 2`, the step that fails
/// every time after the interruption still gets both of its tries.
#[test]
fn an_interrupted_attempt_does_not_use_up_a_retry() {
    for kill in [false, true] {
        let sandbox = Sandbox::new();
        sandbox.write(
            "plan.yaml",
            "name: flaky\nsteps:\n  - id: flaky\n    retry: { attempts: 2, delay: 100ms }\n    run: |\n      echo \"$CAIRN_ATTEMPT\" >> tries\n      if [ ! -f started ]; then touch started; sleep 1000; fi\n      exit 3\n",
        );
        let mut run = sandbox.spawn(&["run", "plan.yaml", "--grace", "2s"]);
        sandbox.wait_for("started", Duration::from_secs(20));
        if kill {
            run.kill().unwrap();
        } else {
            crate::support::signal(&run, nix::sys::signal::Signal::SIGINT);
        }
        run.wait().unwrap();
        let out = sandbox.cairn(&["resume", "1", "--grace", "1s"]);
        assert_eq!(code(&out), Some(1), "kill {kill}: {}", stderr(&out));
        let show = sandbox.show(1);
        assert_eq!(
            sandbox.read("tries"),
            "1\n2\n3\n",
            "kill {kill}: the interrupted try, then both tries of the round"
        );
        assert_eq!(task(&show, "flaky")["attempts"], 3, "kill {kill}");
        assert_eq!(task(&show, "flaky")["status"], "failed");
    }
}
