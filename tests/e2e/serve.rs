//! `cairn submit` and `cairn serve` through the real binary: several servers on one database,
//! `kill -9` of a server, SIGTERM.

use std::collections::BTreeMap;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use crate::support::{Sandbox, code, events, sqlite_only, stderr, stdout, task};

const WORK: &str = r"
name: work
params:
  n: { type: int, required: true }
steps:
  - id: a
    run: echo {{ params.n }} a >> runs
  - id: b
    needs: [a]
    run: |
      sleep 0.1
      echo {{ params.n }} b >> runs
  - id: c
    needs: [b]
    run: echo {{ params.n }} c >> runs
";

fn submit(sandbox: &Sandbox, plan: &str, n: u32) -> String {
    let out = sandbox.cairn(&["submit", plan, "-p", &format!("n={n}")]);
    assert_eq!(code(&out), Some(0), "{}", stderr(&out));
    stdout(&out).trim().to_owned()
}

fn serve(sandbox: &Sandbox, args: &[&str]) -> Child {
    let mut all = vec!["serve", "--poll", "100ms", "--grace", "2s"];
    all.extend_from_slice(args);
    sandbox
        .command(&all)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Waits for a process to exit, failing the test rather than hanging it.
fn wait(mut child: Child, what: &str) -> std::process::Output {
    let started = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > Duration::from_secs(120) {
            child.kill().unwrap();
            panic!("{what} never exited");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().unwrap()
}

fn lines(sandbox: &Sandbox, name: &str) -> Vec<String> {
    sandbox.read(name).lines().map(ToOwned::to_owned).collect()
}

/// `cairn -q serve` logs only what went wrong: a failed step and op, not each step that started
/// or succeeded; without `-q` those are logged too.
#[test]
fn quiet_serve_logs_only_failures() {
    let sandbox = Sandbox::new();
    sandbox.write(
        "plan.yaml",
        "name: p\nparams:\n  n: {type: int}\nsteps:\n  - id: work\n    run: test {{ params.n }} != 2\n",
    );
    submit(&sandbox, "plan.yaml", 1);
    submit(&sandbox, "plan.yaml", 2);
    let out = sandbox.cairn(&["-q", "serve", "--once", "--poll", "100ms"]);
    assert_eq!(code(&out), Some(0), "{}", stderr(&out));
    let said = stderr(&out);
    assert!(
        said.contains("WARN") && said.contains("op=2") && said.contains("failed"),
        "{said}"
    );
    assert!(
        !said.contains("INFO") && !said.contains("op=1"),
        "-q logged more than the failures: {said}"
    );
    submit(&sandbox, "plan.yaml", 3);
    let out = sandbox.cairn(&["serve", "--once", "--poll", "100ms"]);
    let said = stderr(&out);
    assert!(said.contains("INFO") && said.contains("op=3"), "{said}");
}

#[test]
fn submit_prints_the_op_id_and_queues_it() {
    let sandbox = Sandbox::new();
    sandbox.write("work.yaml", WORK);
    assert_eq!(submit(&sandbox, "work.yaml", 1), "1");
    let status = sandbox.json(&["status", "--json"]);
    assert_eq!(status[0]["status"], "queued");
    assert!(sandbox.read("runs").is_empty(), "nothing ran");
    // Bad input is refused before anything is stored.
    let out = sandbox.cairn(&["submit", "work.yaml"]);
    assert_eq!(code(&out), Some(2));
    assert_eq!(sandbox.op_count(), 1);
}

#[test]
fn two_servers_run_twenty_ops_each_step_once() {
    let sandbox = Sandbox::new();
    sandbox.write("work.yaml", WORK);
    for n in 1..=20 {
        submit(&sandbox, "work.yaml", n);
    }
    let first = serve(&sandbox, &["--once", "--workers", "2"]);
    let second = serve(&sandbox, &["--once", "--workers", "2"]);
    let first = wait(first, "the first serve");
    let second = wait(second, "the second serve");
    assert_eq!(first.status.code(), Some(0), "{}", stderr(&first));
    assert_eq!(second.status.code(), Some(0), "{}", stderr(&second));
    let status = sandbox.json(&["status", "--json", "--all"]);
    let ops = status.as_array().unwrap();
    assert_eq!(ops.len(), 20);
    assert!(ops.iter().all(|o| o["status"] == "succeeded"), "{status}");
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for line in lines(&sandbox, "runs") {
        *counts.entry(line).or_default() += 1;
    }
    assert_eq!(counts.len(), 60, "{counts:?}");
    assert!(
        counts.values().all(|&c| c == 1),
        "a step ran twice: {counts:?}"
    );
    // Both took part.
    assert!(stderr(&first).contains("starting"), "{}", stderr(&first));
    assert!(stderr(&second).contains("starting"), "{}", stderr(&second));
}

const SLOW: &str = r"
name: slow
params:
  n: { type: int, required: true }
steps:
  - id: first
    run: echo first >> runs
  - id: long
    needs: [first]
    run: |
      echo long >> runs
      while [ ! -e go ]; do sleep 0.05; done
  - id: last
    needs: [long]
    run: echo last >> runs
";

fn wait_for_line(sandbox: &Sandbox, line: &str) {
    let started = Instant::now();
    while !lines(sandbox, "runs").iter().any(|l| l == line) {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "`{line}` never ran"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_killed_server_s_op_is_resumed_by_the_next_one_unless_the_plan_says_no() {
    let sandbox = Sandbox::new();
    sandbox.write("slow.yaml", SLOW);
    sandbox.write(
        "manual.yaml",
        &SLOW.replace("name: slow", "name: manual\nauto_resume: false"),
    );
    submit(&sandbox, "slow.yaml", 1);
    let mut server = serve(&sandbox, &["--workers", "1"]);
    wait_for_line(&sandbox, "long");
    server.kill().unwrap();
    server.wait().unwrap();
    assert_eq!(sandbox.show(1)["status"], "interrupted");

    sandbox.write("go", "");
    let out = wait(serve(&sandbox, &["--once"]), "serve --once");
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let show = sandbox.show(1);
    assert_eq!(show["status"], "succeeded");
    assert_eq!(
        lines(&sandbox, "runs"),
        vec!["first", "long", "long", "last"]
    );
    assert_eq!(task(&show, "first")["attempts"], 1);
    assert!(
        events(&show)
            .iter()
            .any(|(kind, m)| kind == "auto-resumed" && m.contains("is gone")),
        "{show}"
    );

    // A plan that says `auto_resume: false` waits for a person.
    std::fs::remove_file(sandbox.path().join("go")).unwrap();
    std::fs::remove_file(sandbox.path().join("runs")).unwrap();
    submit(&sandbox, "manual.yaml", 2);
    let mut server = serve(&sandbox, &["--workers", "1"]);
    wait_for_line(&sandbox, "long");
    server.kill().unwrap();
    server.wait().unwrap();
    let out = wait(serve(&sandbox, &["--once"]), "serve --once");
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("auto_resume: false"),
        "{}",
        stderr(&out)
    );
    let show = sandbox.show(2);
    assert_eq!(show["status"], "interrupted");
    assert_eq!(lines(&sandbox, "runs"), vec!["first", "long"]);

    // Nobody resumes op 2, so its killed server's step still waits: let it end, so that it does
    // not outlive the test (polling for ever in a removed directory).
    sandbox.write("go", "");
    let uuid = show["uuid"].as_str().unwrap();
    let started = Instant::now();
    while !crate::support::step_processes(uuid).is_empty() {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the step never ended"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn sigterm_stops_a_server_and_the_next_one_resumes_at_once() {
    let sandbox = Sandbox::new();
    sandbox.write("slow.yaml", SLOW);
    submit(&sandbox, "slow.yaml", 1);
    let server = serve(&sandbox, &["--workers", "1"]);
    wait_for_line(&sandbox, "long");
    crate::support::signal(&server, nix::sys::signal::Signal::SIGTERM);
    let out = wait(server, "the stopped serve");
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    // Released: nobody owns it, so the next serve takes it without waiting for a lease.
    let status = sandbox.json(&["status", "--json"]);
    assert_eq!(status[0]["status"], "interrupted");
    assert_eq!(status[0]["interrupted_by"], "shutdown", "{status}");
    assert!(status[0]["owner"].is_null(), "{status}");
    assert!(crate::support::step_processes(status[0]["uuid"].as_str().unwrap()).is_empty());

    sandbox.write("go", "");
    let out = wait(serve(&sandbox, &["--once"]), "serve --once");
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(sandbox.show(1)["status"], "succeeded");
    assert_eq!(
        lines(&sandbox, "runs"),
        vec!["first", "long", "long", "last"]
    );
}

const NIGHTLY: &str = r"
name: nightly
params:
  tag: { type: string, default: none }
steps:
  - id: work
    run: |
      echo {{ params.tag }} >> runs
      while [ -e hold ]; do sleep 0.05; done
";

/// An RFC 3339 time `days` days from now (UTC), at `hh:mm:ss`.
fn at(days: i64, time: &str) -> String {
    let day = jiff::Timestamp::now()
        .checked_add(jiff::SignedDuration::from_hours(24 * days))
        .unwrap()
        .strftime("%Y-%m-%d")
        .to_string();
    format!("{day}T{time}Z")
}

/// `serve --once` with the schedules' clock at `clock`; then what ran, sorted.
fn serve_once_at(sandbox: &Sandbox, clock: &str) -> Vec<String> {
    let out = wait(
        serve(sandbox, &["--once", "--schedule-clock", clock]),
        "serve",
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let mut runs = lines(sandbox, "runs");
    runs.sort();
    runs
}

fn schedules(sandbox: &Sandbox) -> serde_json::Value {
    sandbox.json(&["schedule", "list", "--json"])
}

#[test]
fn a_schedule_fires_when_due_and_catches_up_once_or_skips_what_it_missed() {
    let sandbox = Sandbox::new();
    sandbox.write("nightly.yaml", NIGHTLY);
    for (name, extra) in [("catch-up", None), ("skip", Some("--skip-missed"))] {
        let mut args = vec![
            "schedule",
            "add",
            name,
            "nightly.yaml",
            "--cron",
            "0 2 * * *",
            "-p",
        ];
        let tag = format!("tag={name}");
        args.push(&tag);
        args.extend(extra);
        let out = sandbox.cairn(&args);
        assert_eq!(code(&out), Some(0), "{}", stderr(&out));
    }
    let list = schedules(&sandbox);
    assert!(
        list[0]["next"].as_str().unwrap().ends_with("T02:00:00Z"),
        "{list}"
    );

    // Tomorrow, 20 s after 02:00: both are due, on time, and fire.
    let clock = at(1, "02:00:20");
    let runs = serve_once_at(&sandbox, &clock);
    assert_eq!(runs, vec!["catch-up", "skip"]);

    // Four days later at noon, no serve having run since: four firings were missed. One fires
    // once for all of them; the other skips them, and says so.
    let clock = at(5, "12:00:00");
    let runs = serve_once_at(&sandbox, &clock);
    assert_eq!(runs, vec!["catch-up", "catch-up", "skip"]);
    let list = schedules(&sandbox);
    let by_name = |name: &str| {
        list.as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == name)
            .unwrap()
            .clone()
    };
    assert_eq!(by_name("catch-up")["last_op"], 3, "{list}");
    assert!(
        by_name("skip")["note"]
            .as_str()
            .unwrap()
            .starts_with("skipped 4 missed firings"),
        "{list}"
    );
    assert_eq!(sandbox.op_count(), 3);
}

#[test]
fn a_firing_is_skipped_while_the_previous_op_is_still_active() {
    let sandbox = Sandbox::new();
    sandbox.write("nightly.yaml", NIGHTLY);
    let out = sandbox.cairn(&[
        "schedule",
        "add",
        "often",
        "nightly.yaml",
        "--cron",
        "* * * * *",
    ]);
    assert_eq!(code(&out), Some(0), "{}", stderr(&out));
    sandbox.write("hold", "");
    // A clock that runs a minute every half second: a firing every half second.
    let clock = format!("{}x120", at(1, "02:00:59"));
    let server = serve(&sandbox, &["--workers", "2", "--schedule-clock", &clock]);
    let started = Instant::now();
    loop {
        let note = schedules(&sandbox)[0]["note"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        if note.contains("skipped the firing") {
            // Active either way: started, or (a minute passes in half a second here, and a
            // server's commits are slower than a file's) not yet started.
            assert!(
                note.contains("op 1 of the previous firing is still running")
                    || note.contains("op 1 of the previous firing is still queued"),
                "{note}"
            );
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "no firing was skipped: {note}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(sandbox.op_count(), 1);
    // Once the op ends, the next firing goes ahead.
    std::fs::remove_file(sandbox.path().join("hold")).unwrap();
    let started = Instant::now();
    while sandbox.op_count() < 2 {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "it never fired again"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    crate::support::signal(&server, nix::sys::signal::Signal::SIGTERM);
    let out = wait(server, "serve");
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
}

#[test]
fn an_op_whose_lock_is_taken_or_cooling_waits_without_holding_a_worker() {
    let sandbox = Sandbox::new();
    sandbox.write(
        "locked.yaml",
        "name: locked\nlock: shared\ncooldown: 1h\nsteps:\n  - id: a\n    run: echo locked >> runs\n",
    );
    sandbox.write(
        "failing.yaml",
        "name: failing\nlock: other\nsteps:\n  - id: a\n    run: exit 1\n",
    );
    sandbox.write(
        "free.yaml",
        "name: free\nsteps:\n  - id: a\n    run: echo free >> runs\n",
    );
    // A failed op keeps its lock; another op of that lock waits, an unrelated one runs.
    assert_eq!(code(&sandbox.cairn(&["run", "failing.yaml"])), Some(1));
    assert_eq!(code(&sandbox.cairn(&["submit", "failing.yaml"])), Some(0));
    // An op on a key that cools down waits too.
    assert_eq!(code(&sandbox.cairn(&["run", "locked.yaml"])), Some(0));
    let cooling: i64 = stdout(&sandbox.cairn(&["submit", "locked.yaml"]))
        .trim()
        .parse()
        .unwrap();
    let free: i64 = stdout(&sandbox.cairn(&["submit", "free.yaml"]))
        .trim()
        .parse()
        .unwrap();
    let out = wait(
        serve(&sandbox, &["--once", "--workers", "1"]),
        "serve --once",
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(sandbox.show(free)["status"], "succeeded");
    assert_eq!(sandbox.show(2)["status"], "queued");
    assert_eq!(
        sandbox.show(2)["current_task"],
        "waiting for lock other held by op 1"
    );
    assert_eq!(sandbox.show(cooling)["status"], "queued");
    assert_eq!(lines(&sandbox, "runs"), vec!["locked", "free"]);
    // Once the cooldown is acknowledged, the next serve starts it.
    assert_eq!(code(&sandbox.cairn(&["ack", "shared"])), Some(0));
    let out = wait(serve(&sandbox, &["--once"]), "serve --once");
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(sandbox.show(cooling)["status"], "succeeded");
}

#[test]
fn sigterm_lets_a_running_step_finish_and_starts_nothing_new() {
    let sandbox = Sandbox::new();
    sandbox.write(
        "two.yaml",
        "name: two\nsteps:\n  - id: a\n    run: |\n      echo start >> runs\n      sleep 1\n      echo a >> runs\n  - id: b\n    needs: [a]\n    run: echo b >> runs\n",
    );
    assert_eq!(code(&sandbox.cairn(&["submit", "two.yaml"])), Some(0));
    let server = sandbox
        .command(&["serve", "--poll", "100ms", "--grace", "30s"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_line(&sandbox, "start");
    crate::support::signal(&server, nix::sys::signal::Signal::SIGTERM);
    let out = wait(server, "the draining serve");
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    // `a` finished; `b` did not start; the op waits for the next server.
    assert_eq!(lines(&sandbox, "runs"), vec!["start", "a"]);
    let show = sandbox.show(1);
    assert_eq!(show["status"], "interrupted");
    assert_eq!(task(&show, "a")["status"], "succeeded");
    let out = wait(serve(&sandbox, &["--once"]), "serve --once");
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(lines(&sandbox, "runs"), vec!["start", "a", "b"]);
    assert_eq!(sandbox.show(1)["status"], "succeeded");
}

/// Another program holding the database past a node's lease (issue 22, item 17): the node stops
/// the op's steps, says which program held the database, and once the lock is gone lets go of the
/// op and runs it to its end; nothing says another process took it over.
#[test]
fn a_program_holding_the_database_past_the_lease_is_named_and_the_op_goes_on_after_it() {
    if sqlite_only("SQLite's file locks") {
        return;
    }
    let sandbox = Sandbox::new();
    sandbox.write(
        "slow.yaml",
        // The first attempt says it runs only once its process is recorded (10 ms after its
        // start): the database is held while the step runs, not in its first moment, where the
        // record's write would fail and stop the run on the store's error instead.
        "name: slow\nsteps:\n  - id: a\n    run: |\n      if [ \"$CAIRN_ATTEMPT\" = 1 ]; then sleep 0.5; fi\n      echo \"$CAIRN_ATTEMPT\" >> a-runs\n      if [ \"$CAIRN_ATTEMPT\" = 1 ]; then sleep 60; fi\n  - id: c\n    needs: [a]\n    run: echo c >> c-runs\n",
    );
    let out = sandbox.cairn(&["submit", "slow.yaml"]);
    assert_eq!(code(&out), Some(0), "{}", stderr(&out));
    let op: i64 = stdout(&out).trim().parse().unwrap();
    let log = std::fs::File::create(sandbox.path().join("serve.log")).unwrap();
    let mut server = sandbox
        .command(&[
            "serve",
            "--poll",
            "100ms",
            "--grace",
            "1s",
            "--lease-ttl",
            "3s",
        ])
        .env("CAIRN_BUSY_TIMEOUT_MS", "200")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    sandbox.wait_for("a-runs", Duration::from_secs(30));
    let mut holder = sandbox.hold_the_database(false, "");
    let named = format!(
        "stayed locked by another process (`sqlite3`, pid {})",
        holder.id()
    );
    let started = Instant::now();
    while !sandbox.read("serve.log").contains("lost the op") {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the node never gave the op up: {}",
            sandbox.read("serve.log")
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    holder.kill().unwrap();
    holder.wait().unwrap();

    let started = Instant::now();
    while sandbox.json(&["status", "--json", "--all"])[0]["status"] != "succeeded" {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the op never went on after the lock: {}\n{}",
            sandbox.read("serve.log"),
            sandbox.show(op)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    crate::support::signal(&server, nix::sys::signal::Signal::SIGTERM);
    let end = server.wait().unwrap();
    assert_eq!(end.code(), Some(0), "{}", sandbox.read("serve.log"));
    let log = sandbox.read("serve.log");
    assert!(log.contains(&named) && !log.contains("took"), "{log}");
    let events = events(&sandbox.show(op));
    let released = events
        .iter()
        .find(|(kind, _)| kind == "op-released")
        .unwrap_or_else(|| panic!("{events:?}"));
    assert!(released.1.contains(&named), "{released:?}");
    assert!(
        events.iter().any(|(kind, _)| kind == "auto-resumed"),
        "{events:?}"
    );
    assert!(
        events.iter().all(|(_, text)| !text.contains("took")),
        "{events:?}"
    );
    // The cut-off attempt ran again; the step after it once.
    assert_eq!(lines(&sandbox, "a-runs"), ["1", "2"]);
    assert_eq!(lines(&sandbox, "c-runs"), ["c"]);
}

/// The op `status --json` lists with id `op`.
fn listed(sandbox: &Sandbox, op: i64) -> serde_json::Value {
    sandbox
        .json(&["status", "--json", "--all"])
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["id"] == op)
        .cloned()
        .unwrap_or_else(|| panic!("no op {op}"))
}

#[test]
fn serve_leaves_an_op_stopped_with_ctrl_c_for_a_person_and_resumes_one_whose_run_was_killed() {
    let sandbox = Sandbox::new();
    sandbox.write("slow.yaml", SLOW);
    sandbox.write(
        "quick.yaml",
        "name: quick\nsteps:\n  - id: q\n    run: echo quick >> runs\n",
    );
    // Ctrl-C in the terminal of a `cairn run`: the op is recorded interrupted by a signal.
    let run = sandbox.spawn(&["run", "slow.yaml", "-p", "n=1", "--grace", "2s"]);
    wait_for_line(&sandbox, "long");
    crate::support::signal(&run, nix::sys::signal::Signal::SIGINT);
    let out = wait(run, "the stopped run");
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    let op = listed(&sandbox, 1);
    assert_eq!(op["status"], "interrupted");
    assert_eq!(op["interrupted_by"], "signal", "{op}");
    assert!(
        events(&sandbox.show(1))
            .iter()
            .any(|(kind, m)| kind == "op-interrupted"
                && m.contains("stopped by Ctrl-C (SIGINT) from the terminal")),
        "{}",
        sandbox.show(1)
    );
    let table = stdout(&sandbox.cairn(&["status"]));
    assert!(table.contains("interrupted (signal)"), "{table}");

    // A server runs what waits for it (op 2) and leaves op 1 alone: it is not its to resume.
    sandbox.write("go", "");
    assert_eq!(code(&sandbox.cairn(&["submit", "quick.yaml"])), Some(0));
    let out = wait(serve(&sandbox, &["--once"]), "serve --once");
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(sandbox.show(2)["status"], "succeeded");
    let op = listed(&sandbox, 1);
    assert_eq!(op["status"], "interrupted", "{op}");
    assert_eq!(op["interrupted_by"], "signal", "{op}");
    assert_eq!(lines(&sandbox, "runs"), vec!["first", "long", "quick"]);
    assert!(
        !events(&sandbox.show(1))
            .iter()
            .any(|(kind, _)| kind == "auto-resumed")
    );
    // A person resumes it.
    let out = sandbox.cairn(&["resume", "1"]);
    assert_eq!(code(&out), Some(0), "{}", stderr(&out));
    assert_eq!(
        listed(&sandbox, 1)["interrupted_by"],
        serde_json::Value::Null
    );

    // A `cairn run` killed (`kill -9`): its owner died, and a server resumes the op.
    std::fs::remove_file(sandbox.path().join("go")).unwrap();
    std::fs::remove_file(sandbox.path().join("runs")).unwrap();
    let mut run = sandbox.spawn(&["run", "slow.yaml", "-p", "n=3"]);
    wait_for_line(&sandbox, "long");
    run.kill().unwrap();
    run.wait().unwrap();
    let op = listed(&sandbox, 3);
    assert_eq!(op["status"], "interrupted");
    assert_eq!(op["interrupted_by"], "owner-died", "{op}");
    let table = stdout(&sandbox.cairn(&["status"]));
    assert!(table.contains("interrupted (owner-died)"), "{table}");
    sandbox.write("go", "");
    let out = wait(serve(&sandbox, &["--once"]), "serve --once");
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let show = sandbox.show(3);
    assert_eq!(show["status"], "succeeded", "{show}");
    assert!(
        events(&show).iter().any(|(kind, _)| kind == "auto-resumed"),
        "{show}"
    );
}

const GATE: &str = r"
name: gate
lock: gate-{{ params.n }}
params:
  n: { type: int, required: true }
steps:
  - id: before
    run: echo {{ params.n }} before >> runs
  - id: confirm
    needs: [before]
    approve: go on with {{ params.n }}?
  - id: after
    needs: [confirm]
    run: echo {{ params.n }} after >> runs
";

/// Waits until op `op` shows `status` (from `show --json`), up to a minute.
fn wait_for_status(sandbox: &Sandbox, op: i64, status: &str) -> serde_json::Value {
    let started = Instant::now();
    loop {
        let show = sandbox.show(op);
        if show["status"] == status {
            return show;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "op {op} never became {status}: {show}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Issue 22, item 12: ops waiting at approval gates hold no worker. With one worker, three ops
/// park at their gates and a fourth runs; an answer wakes its op, which goes on from the gate (an
/// approval runs what follows, a rejection fails it without asking again); a parked op is
/// canceled with no live owner.
#[test]
fn ops_waiting_at_approval_gates_hold_no_worker() {
    let sandbox = Sandbox::new();
    sandbox.write("gate.yaml", GATE);
    sandbox.write(
        "free.yaml",
        "name: free\nsteps:\n  - id: a\n    run: echo free >> runs\n",
    );
    for n in 1..=3 {
        submit(&sandbox, "gate.yaml", n);
    }
    let server = serve(&sandbox, &["--workers", "1"]);
    for op in 1..=3 {
        let show = wait_for_status(&sandbox, op, "waiting");
        assert_eq!(task(&show, "confirm")["status"], "waiting");
        assert!(
            events(&show).iter().any(|(k, _)| k == "op-parked"),
            "{show}"
        );
    }
    let status = sandbox.json(&["status", "--json"]);
    let first = status
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["id"] == 1)
        .unwrap();
    assert_eq!(first["status"], "waiting", "{status}");
    assert_eq!(first["current_task"], "confirm", "{first}");
    assert_eq!(
        first["current_tasks"][0]["prompt"], "go on with 1?",
        "{first}"
    );
    // The worker is free: a plain op runs while the three wait.
    let out = sandbox.cairn(&["submit", "free.yaml"]);
    assert_eq!(code(&out), Some(0), "{}", stderr(&out));
    let free: i64 = stdout(&out).trim().parse().unwrap();
    wait_for_status(&sandbox, free, "succeeded");
    // Parked, not taken as "owner died": nobody took them back before an answer.
    let show = sandbox.show(2);
    let kinds: Vec<String> = events(&show).into_iter().map(|(k, _)| k).collect();
    assert_eq!(
        kinds.iter().filter(|k| *k == "op-parked").count(),
        1,
        "{kinds:?}"
    );
    assert!(!kinds.iter().any(|k| k == "auto-resumed"), "{kinds:?}");
    // The parked ops keep their locks.
    let locks = sandbox.sql("select count(*) from locks");
    assert_eq!(locks.trim(), "3", "{locks}");

    let out = sandbox.cairn(&["approve", "1", "confirm"]);
    assert_eq!(code(&out), Some(0), "{}", stderr(&out));
    let show = wait_for_status(&sandbox, 1, "succeeded");
    assert_eq!(task(&show, "confirm")["status"], "succeeded");
    assert_eq!(sandbox.show(2)["status"], "waiting");
    assert_eq!(sandbox.show(3)["status"], "waiting");

    let out = sandbox.cairn(&["approve", "2", "confirm", "--reject", "--comment", "no"]);
    assert_eq!(code(&out), Some(0), "{}", stderr(&out));
    let show = wait_for_status(&sandbox, 2, "failed");
    assert_eq!(task(&show, "confirm")["status"], "failed");
    assert_eq!(task(&show, "after")["status"], "pending");
    assert!(
        show["error"].as_str().unwrap().contains("rejected"),
        "{show}"
    );

    let out = sandbox.cairn(&["cancel", "3"]);
    assert_eq!(code(&out), Some(0), "{}", stderr(&out));
    let show = wait_for_status(&sandbox, 3, "canceled");
    assert_eq!(task(&show, "confirm")["status"], "canceled");

    crate::support::signal(&server, nix::sys::signal::Signal::SIGTERM);
    let out = wait(server, "serve");
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let mut runs = lines(&sandbox, "runs");
    runs.sort();
    assert_eq!(
        runs,
        vec!["1 after", "1 before", "2 before", "3 before", "free"]
    );
}

/// Issue 22, item 15: a parked gate's own `timeout` still passes: `serve` takes the op back and
/// the gate fails, with the op; nothing is left waiting.
#[test]
fn a_parked_gate_fails_when_its_own_timeout_passes() {
    let sandbox = Sandbox::new();
    sandbox.write(
        "gate.yaml",
        "name: gate\nsteps:\n  - id: confirm\n    approve: go?\n    timeout: 2s\n  - id: after\n    needs: [confirm]\n    run: echo after >> runs\n",
    );
    let out = sandbox.cairn(&["submit", "gate.yaml"]);
    assert_eq!(code(&out), Some(0), "{}", stderr(&out));
    let server = serve(&sandbox, &["--workers", "1"]);
    let show = wait_for_status(&sandbox, 1, "failed");
    assert_eq!(task(&show, "confirm")["status"], "failed");
    assert_eq!(task(&show, "confirm")["error"], "no answer within 2s");
    assert!(
        events(&show).iter().any(|(k, _)| k == "op-parked"),
        "{show}"
    );
    let out = sandbox.cairn(&["approve", "1", "confirm"]);
    assert_eq!(code(&out), Some(2), "{}", stderr(&out));
    crate::support::signal(&server, nix::sys::signal::Signal::SIGTERM);
    let out = wait(server, "serve");
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(sandbox.read("runs"), "");
}
