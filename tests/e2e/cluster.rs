//! Several `cairn serve` nodes on one PostgreSQL database: ops spread over them, a node killed
//! with `kill -9` has its ops taken over once its lease runs out, a node stopped past its lease is
//! fenced off the op it lost, a schedule fires once per tick however many nodes look at it, and
//! nodes on two machines (the other one made by a mount namespace with another kernel boot id:
//! [`OtherHost`]) leave each other's running ops alone, and leave a schedule's firings to the
//! node that can read its plan.
//!
//! PostgreSQL only (`CAIRN_TEST_BACKEND=postgres`): nodes of a SQLite database share one host,
//! where liveness is decided by the owner's pid, not by leases.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nix::sys::signal::Signal;
use serde_json::Value;

use crate::support::{Sandbox, code, events, postgres, stderr, stdout};

/// The lease every node of these tests takes, in milliseconds (`--lease-ttl 3s`).
const TTL_MS: i64 = 3_000;

/// True, after saying why, when the suite does not run on PostgreSQL.
fn skip() -> bool {
    let skip = !postgres();
    if skip {
        eprintln!("skipped: several nodes need a shared database; set CAIRN_TEST_BACKEND=postgres");
    }
    skip
}

/// Milliseconds since the epoch, the unit of the database's times.
fn now_ms() -> i64 {
    i64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis(),
    )
    .unwrap()
}

/// An RFC 3339 time as cairn prints it, in milliseconds since the epoch.
fn ms(rfc3339: &Value) -> i64 {
    rfc3339
        .as_str()
        .and_then(|t| t.parse::<jiff::Timestamp>().ok())
        .unwrap_or_else(|| panic!("not an RFC 3339 time: {rfc3339}"))
        .as_millisecond()
}

/// Polls `done` every 50 ms until it holds, failing with `what` after `limit`.
fn wait_until(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let started = Instant::now();
    while !done() {
        assert!(started.elapsed() < limit, "{what}: not after {limit:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One `cairn serve`, its log in a file of the sandbox (a pipe nobody reads would fill and block
/// it); killed when dropped, so that a failing test leaves no node behind.
struct Node {
    child: Child,
    log: PathBuf,
}

impl Node {
    fn start(sandbox: &Sandbox, name: &str, args: &[&str]) -> Self {
        Self::start_on(None, sandbox, name, args)
    }

    /// A node on `host` (`None`: this machine).
    fn start_on(host: Option<&OtherHost>, sandbox: &Sandbox, name: &str, args: &[&str]) -> Self {
        let log = sandbox.path().join(format!("{name}.log"));
        let mut all = vec![
            "serve",
            "--lease-ttl",
            "3s",
            "--poll",
            "100ms",
            "--grace",
            "2s",
        ];
        all.extend_from_slice(args);
        let mut command = match host {
            None => sandbox.command(&all),
            Some(host) => host.command(sandbox, &all),
        };
        let child = command
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        Self { child, log }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn signal(&self, signal: Signal) {
        crate::support::signal(&self.child, signal);
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM, then its exit, within a minute.
    fn terminate(&mut self) -> ExitStatus {
        self.signal(Signal::SIGTERM);
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "serve {} never exited after SIGTERM:\n{}",
                self.pid(),
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Another machine, as far as cairn can tell: its commands run in a mount namespace of their own
/// (`unshare -m`, as root) where a made-up kernel boot id is bind-mounted over
/// `/proc/sys/kernel/random/boot_id`, and where some directories of this machine may be hidden
/// (an empty `tmpfs` mounted over each). Processes, pids and the rest of the file system are
/// shared with this machine's.
struct OtherHost {
    boot_id: PathBuf,
    hidden: Vec<PathBuf>,
}

impl OtherHost {
    /// Its kernel's boot id.
    const BOOT_ID: &str = "6f1c2a7e-3b4d-4e5f-8a9b-0c1d2e3f4a5b";

    /// Its boot id in a file of the sandbox.
    fn new(sandbox: &Sandbox, hidden: &[PathBuf]) -> Self {
        let boot_id = sandbox.write("other-boot-id", &format!("{}\n", Self::BOOT_ID));
        Self {
            boot_id,
            hidden: hidden.to_vec(),
        }
    }

    /// `cairn args` there, in the sandbox, on its database.
    fn command(&self, sandbox: &Sandbox, args: &[&str]) -> Command {
        // sh -c SCRIPT sh BOOT_ID HIDDEN... -- CAIRN ARGS...
        const SCRIPT: &str = r#"set -e
boot_id=$1; shift
while [ "$1" != -- ]; do mount -t tmpfs -o size=1m,mode=0755 none "$1"; shift; done; shift
mount --bind "$boot_id" /proc/sys/kernel/random/boot_id
exec "$@""#;
        let mut command = Command::new("unshare");
        command
            .args(["-m", "sh", "-c", SCRIPT, "sh"])
            .arg(&self.boot_id)
            .args(&self.hidden)
            .arg("--")
            .arg(env!("CARGO_BIN_EXE_cairn"))
            .args(args)
            .current_dir(sandbox.path())
            .env("NO_COLOR", "1");
        sandbox.use_db(&mut command);
        command
    }

    /// `cairn status --json --all` there.
    fn status(&self, sandbox: &Sandbox) -> Vec<Value> {
        let out = self
            .command(sandbox, &["status", "--json", "--all"])
            .output()
            .unwrap();
        assert_eq!(
            code(&out),
            Some(0),
            "status on the other host (unshare and mount need root): {}",
            stderr(&out)
        );
        serde_json::from_slice::<Value>(&out.stdout)
            .unwrap()
            .as_array()
            .unwrap()
            .clone()
    }
}

fn submit(sandbox: &Sandbox, plan: &str, n: u32) -> i64 {
    let out = sandbox.cairn(&["submit", plan, "-p", &format!("n={n}")]);
    assert_eq!(code(&out), Some(0), "{}", stderr(&out));
    stdout(&out).trim().parse().unwrap()
}

fn status(sandbox: &Sandbox) -> Vec<Value> {
    sandbox
        .json(&["status", "--json", "--all"])
        .as_array()
        .unwrap()
        .clone()
}

/// The pid an op's owner has in `cairn status --json`, if it has an owner.
fn owner_pid(op: &Value) -> Option<u32> {
    op["owner"]["pid"]
        .as_u64()
        .map(|pid| u32::try_from(pid).unwrap())
}

/// The pids `cairn nodes --json` lists.
fn node_pids(sandbox: &Sandbox) -> BTreeSet<u32> {
    sandbox
        .json(&["nodes", "--json"])
        .as_array()
        .unwrap()
        .iter()
        .map(|n| u32::try_from(n["pid"].as_u64().unwrap()).unwrap())
        .collect()
}

/// Four steps, two of them in parallel; each appends `<n> <attempt>` to a file of its own when its
/// work is done, so the test knows every time a step ran.
const BRANCHY: &str = r#"
name: branchy
params:
  n: { type: int, required: true }
steps:
  - id: a
    run: |
      sleep 0.1
      echo {{ params.n }} "$CAIRN_ATTEMPT" >> side-a
  - id: b1
    needs: [a]
    run: |
      sleep 0.2
      echo {{ params.n }} "$CAIRN_ATTEMPT" >> side-b1
  - id: b2
    needs: [a]
    run: |
      sleep 0.1
      echo {{ params.n }} "$CAIRN_ATTEMPT" >> side-b2
  - id: c
    needs: [b1, b2]
    run: |
      echo {{ params.n }} "$CAIRN_ATTEMPT" >> side-c
"#;

/// Every attempt of every step ran at most once, none ran after the step's recorded success, and
/// the attempt that succeeded left its line.
fn assert_no_step_ran_twice(sandbox: &Sandbox, ops: &BTreeMap<u32, i64>) {
    const STEPS: [&str; 4] = ["a", "b1", "b2", "c"];
    let mut runs: BTreeMap<(&str, u32, u64), usize> = BTreeMap::new();
    for step in STEPS {
        for line in sandbox.read(&format!("side-{step}")).lines() {
            let (n, attempt) = line.split_once(' ').unwrap();
            *runs
                .entry((step, n.parse().unwrap(), attempt.parse().unwrap()))
                .or_default() += 1;
        }
    }
    for (&n, &op) in ops {
        let show = sandbox.show(op);
        for step in STEPS {
            let task = crate::support::task(&show, step);
            assert_eq!(task["status"], "succeeded", "op {op}: {task}");
            let succeeded_in = task["attempts"].as_u64().unwrap();
            for (&(_, _, attempt), &count) in runs.range((step, n, 0)..=(step, n, u64::MAX)) {
                assert_eq!(
                    count, 1,
                    "op {op}: {step} attempt {attempt} ran {count} times"
                );
                assert!(
                    attempt <= succeeded_in,
                    "op {op}: {step} ran attempt {attempt} after succeeding in {succeeded_in}"
                );
            }
            assert!(
                runs.contains_key(&(step, n, succeeded_in)),
                "op {op}: {step}'s recorded success left no line"
            );
        }
    }
}

#[test]
fn three_nodes_run_200_ops_and_take_over_a_killed_one_s_within_its_lease() {
    if skip() {
        return;
    }
    let sandbox = Sandbox::new();
    sandbox.write("branchy.yaml", BRANCHY);
    let ops: BTreeMap<u32, i64> = (1..=200)
        .map(|n| (n, submit(&sandbox, "branchy.yaml", n)))
        .collect();
    let mut nodes: Vec<Node> = (0..3)
        .map(|i| Node::start(&sandbox, &format!("node-{i}"), &["--workers", "4"]))
        .collect();
    let pids: BTreeSet<u32> = nodes.iter().map(Node::pid).collect();
    wait_until(
        "every node listed by cairn nodes",
        Duration::from_secs(30),
        || node_pids(&sandbox) == pids,
    );
    let listed = sandbox.json(&["nodes", "--json"]);
    for node in listed.as_array().unwrap() {
        assert_eq!(node["workers"], 4, "{listed}");
        assert!(
            node["host"].is_string() && node["running"].is_array(),
            "{listed}"
        );
        assert!(
            ms(&node["heartbeat_at"]) >= ms(&node["started_at"]),
            "{listed}"
        );
    }

    // Mid-run: some ops done, and the victim running some.
    let victim = nodes[0].pid();
    // The ops it runs, as last seen before the kill (some may end before the kill lands).
    let mut orphans: Vec<i64> = Vec::new();
    wait_until(
        "the first node running two ops",
        Duration::from_secs(120),
        || {
            let ops = status(&sandbox);
            orphans = ops
                .iter()
                .filter(|o| {
                    o["status"] == "running"
                        && owner_pid(o) == Some(victim)
                        && !o["started_at"].is_null()
                })
                .map(|o| o["id"].as_i64().unwrap())
                .collect();
            ops.iter().filter(|o| o["status"] == "succeeded").count() >= 10 && orphans.len() >= 2
        },
    );
    nodes[0].child.kill().unwrap();
    let killed_at = now_ms();
    nodes[0].child.wait().unwrap();
    // What it left unfinished, read before its lease can run out (an op seen running above may
    // have ended before the kill landed): `status` shows an op whose owner is dead on this machine
    // as interrupted, and nothing else was interrupted here. An op it had only reserved (never
    // started) is started by another node, not taken over.
    let left: Vec<i64> = status(&sandbox)
        .iter()
        .filter(|o| {
            !o["started_at"].is_null()
                && (o["status"] == "interrupted"
                    || (o["status"] == "running" && owner_pid(o) == Some(victim)))
        })
        .map(|o| o["id"].as_i64().unwrap())
        .collect();
    for op in &left {
        if !orphans.contains(op) {
            orphans.push(*op);
        }
    }

    // Once its lease has run out, it is no longer listed; the others still are.
    std::thread::sleep(Duration::from_millis(
        u64::try_from(TTL_MS + killed_at - now_ms()).unwrap_or(0),
    ));
    wait_until(
        "the killed node gone from cairn nodes",
        Duration::from_secs(5),
        || !node_pids(&sandbox).contains(&victim),
    );
    let live: BTreeSet<u32> = nodes[1..].iter().map(Node::pid).collect();
    assert_eq!(node_pids(&sandbox), live);

    wait_until("every op succeeded", Duration::from_secs(600), || {
        status(&sandbox)
            .iter()
            .filter(|o| o["status"] == "succeeded")
            .count()
            == ops.len()
    });
    // Each op it ran was taken over within the lease and two seconds of the kill, unless it
    // ended before the kill. Event times are whole seconds (rounded down).
    let mut taken_over = 0;
    for &op in &orphans {
        let show = sandbox.show(op);
        let first = |kind: &str| {
            show["events"]
                .as_array()
                .unwrap()
                .iter()
                .find(|e| e["kind"] == kind)
                .cloned()
        };
        let Some(taken) = first("auto-resumed") else {
            let ended = first("op-succeeded").unwrap_or_else(|| panic!("op {op}: {show}"));
            assert!(
                ms(&ended["at"]) <= killed_at,
                "op {op} of the killed node was never auto-resumed: {show}"
            );
            continue;
        };
        taken_over += 1;
        let after = ms(&taken["at"]) - killed_at;
        assert!(
            after <= TTL_MS + 2_000,
            "op {op} was taken over {after} ms after the kill: {taken}"
        );
    }
    assert!(
        taken_over >= left.len() && !left.is_empty(),
        "the kill left {left:?} running, {taken_over} of {orphans:?} taken over"
    );
    assert_no_step_ran_twice(&sandbox, &ops);
    for node in &mut nodes[1..] {
        let status = node.terminate();
        assert_eq!(status.code(), Some(0), "{}", node.log());
    }
}

/// A step that says which attempt it is, who started it (`$PPID`: the node) and its own pid, then
/// waits for `go` (for a minute at most, so that a failed test leaves nothing running).
const FENCED: &str = r#"
name: fenced
params:
  n: { type: int, required: true }
steps:
  - id: first
    run: echo first {{ params.n }} "$CAIRN_ATTEMPT $PPID" >> runs
  - id: long
    needs: [first]
    run: |
      echo long {{ params.n }} "$CAIRN_ATTEMPT $PPID $$" >> runs
      for i in $(seq 1 1200); do [ -e go ] && break; sleep 0.05; done
      [ -e go ]
  - id: last
    needs: [long]
    run: echo last {{ params.n }} "$CAIRN_ATTEMPT $PPID" >> runs
"#;

/// The `runs` lines of `step` for op param `n`, split in words after the step and `n`.
fn runs_of(sandbox: &Sandbox, step: &str, n: u32) -> Vec<Vec<u32>> {
    sandbox
        .read("runs")
        .lines()
        .filter_map(|l| {
            let mut words = l.split(' ');
            (words.next() == Some(step) && words.next() == Some(&n.to_string()))
                .then(|| words.map(|w| w.parse().unwrap()).collect())
        })
        .collect()
}

#[test]
fn a_node_stopped_past_its_lease_is_fenced_off_the_op_it_lost_and_serves_on() {
    if skip() {
        return;
    }
    let sandbox = Sandbox::new();
    sandbox.write("fenced.yaml", FENCED);
    // One worker each: the node that takes the op over is busy with it from then on.
    let mut nodes = [
        Node::start(&sandbox, "node-0", &["--workers", "1"]),
        Node::start(&sandbox, "node-1", &["--workers", "1"]),
    ];
    let op = submit(&sandbox, "fenced.yaml", 1);
    wait_until("long running", Duration::from_secs(60), || {
        !runs_of(&sandbox, "long", 1).is_empty()
    });
    let first = runs_of(&sandbox, "long", 1)[0].clone();
    let (stopped, step_pid) = (first[1], first[2]);
    assert_eq!(first[0], 1, "attempt 1");
    let (x, y) = if nodes[0].pid() == stopped {
        (0, 1)
    } else {
        (1, 0)
    };
    assert_eq!(
        nodes[x].pid(),
        stopped,
        "long was started by a node of the test"
    );
    let taker = nodes[y].pid();
    let op_row = status(&sandbox);
    assert_eq!(owner_pid(&op_row[0]), Some(stopped), "{op_row:?}");

    nodes[x].signal(Signal::SIGSTOP);
    wait_until("the op taken over", Duration::from_secs(60), || {
        events(&sandbox.show(op))
            .iter()
            .any(|(kind, _)| kind == "auto-resumed")
            && runs_of(&sandbox, "long", 1).len() == 2
    });
    let second = runs_of(&sandbox, "long", 1)[1].clone();
    assert_eq!(
        second[..2],
        [2, taker],
        "attempt 2 by the node that took it over"
    );
    // What the op holds once taken over, before the stopped node wakes.
    let attempts = format!(
        "SELECT task_no, n, status, ended_at, error, pid FROM attempts \
         WHERE op_id = {op} ORDER BY task_no, n"
    );
    let before = (sandbox.show(op)["events"].clone(), sandbox.sql(&attempts));

    nodes[x].signal(Signal::SIGCONT);
    wait_until(
        "the stopped node's step process ended",
        Duration::from_secs(30),
        || !crate::support::alive(step_pid),
    );
    // It serves on: the other node is busy, so it runs the next op.
    let next = submit(&sandbox, "fenced.yaml", 2);
    // Both ops wait at `long` until `go` is written, so neither node is freed before the next
    // op is claimed; writing it sooner lets the other node finish the first op and race for it.
    wait_until("the next op at long", Duration::from_secs(60), || {
        !runs_of(&sandbox, "long", 2).is_empty()
    });
    sandbox.write("go", "");
    wait_until("the next op succeeded", Duration::from_secs(60), || {
        sandbox.show(next)["status"] == "succeeded"
    });
    let by: BTreeSet<u32> = ["first", "long", "last"]
        .iter()
        .flat_map(|step| runs_of(&sandbox, step, 2))
        .map(|words| words[1])
        .collect();
    assert_eq!(
        by,
        BTreeSet::from([stopped]),
        "the next op ran on the woken node"
    );
    wait_until("the op succeeded", Duration::from_secs(60), || {
        sandbox.show(op)["status"] == "succeeded"
    });

    // The woken node recorded nothing for the op it lost: its events up to the takeover are as
    // they were, every attempt after it is the new owner's, and no step of it ran again.
    let show = sandbox.show(op);
    let (events_before, attempts_before) = before;
    let events_before = events_before.as_array().unwrap();
    let events_after = show["events"].as_array().unwrap();
    assert_eq!(
        &events_after[..events_before.len()],
        &events_before[..],
        "{show:#}"
    );
    let later: Vec<&Value> = events_after[events_before.len()..].iter().collect();
    let names_stopped = |e: &&Value| {
        e["message"]
            .as_str()
            .unwrap()
            .split(|c: char| !c.is_ascii_digit())
            .any(|number| number == stopped.to_string())
    };
    assert!(
        !later.iter().any(names_stopped),
        "an event after the takeover names the stopped node: {later:?}"
    );
    assert!(
        later
            .iter()
            .all(|e| e["kind"] != "task-failed" && e["kind"] != "op-interrupted"),
        "the stopped node's end of long was recorded: {later:?}"
    );
    let attempts_after = sandbox.sql(&attempts);
    let lines_before: Vec<&str> = attempts_before.lines().collect();
    let long_first = lines_before
        .iter()
        .position(|l| l.split('|').nth(1) == Some("1") && l.contains(&step_pid.to_string()))
        .unwrap_or_else(|| panic!("no attempt 1 of long with pid {step_pid}: {attempts_before}"));
    assert_eq!(
        attempts_after.lines().nth(long_first),
        Some(lines_before[long_first]),
        "the stopped node's attempt changed after the takeover:\n{attempts_before}\n{attempts_after}"
    );
    for (step, attempts) in [("first", 1), ("long", 2), ("last", 1)] {
        assert_eq!(
            runs_of(&sandbox, step, 1).len(),
            attempts,
            "{step}: {}",
            sandbox.read("runs")
        );
    }
    assert_eq!(crate::support::task(&show, "last")["attempts"], 1);
    for node in &mut nodes {
        let status = node.terminate();
        assert_eq!(status.code(), Some(0), "{}", node.log());
    }
}

#[test]
fn a_schedule_due_every_minute_fires_once_per_tick_with_three_nodes() {
    if skip() {
        return;
    }
    let sandbox = Sandbox::new();
    sandbox.write(
        "tick.yaml",
        "name: tick\nsteps:\n  - id: a\n    noop: true\n",
    );
    let out = sandbox.cairn(&[
        "schedule",
        "add",
        "every",
        "tick.yaml",
        "--cron",
        "* * * * *",
    ]);
    assert_eq!(code(&out), Some(0), "{}", stderr(&out));
    // Each node's schedule clock starts tomorrow at 02:00:30 and runs 30 times as fast as real
    // time: a tick every 2 s. The first poll (within a second) fires the 02:00 tick, the latest
    // since the schedule was made, then each minute of that clock fires once.
    let day = jiff::Timestamp::now()
        .checked_add(jiff::SignedDuration::from_hours(24))
        .unwrap()
        .strftime("%Y-%m-%d")
        .to_string();
    let first_tick: i64 = format!("{day}T02:00:00Z")
        .parse::<jiff::Timestamp>()
        .unwrap()
        .as_millisecond();
    let clock = format!("{day}T02:00:30Zx30");
    let mut nodes: Vec<Node> = (0..3)
        .map(|i| {
            Node::start(
                &sandbox,
                &format!("node-{i}"),
                &["--workers", "2", "--schedule-clock", &clock],
            )
        })
        .collect();
    let last_fire = || {
        let list = sandbox.json(&["schedule", "list", "--json"]);
        list[0]["last_fire"]
            .is_string()
            .then(|| ms(&list[0]["last_fire"]))
    };
    wait_until("six ticks fired", Duration::from_secs(120), || {
        last_fire().is_some_and(|at| at >= first_tick + 5 * 60_000)
    });
    for node in &mut nodes {
        let status = node.terminate();
        assert_eq!(status.code(), Some(0), "{}", node.log());
    }
    // Every tick from the first to the last one fired made one op: none twice, none skipped.
    let last = last_fire().unwrap();
    let ticks = usize::try_from((last - first_tick) / 60_000 + 1).unwrap();
    let list = sandbox.json(&["schedule", "list", "--json"]);
    let ops = status(&sandbox);
    assert_eq!(
        ops.len(),
        ticks,
        "{ticks} ticks, ops {ops:#?}, schedule {list}"
    );
    // Newest first: the last may have been fired as the nodes stopped, and wait for the next.
    assert!(
        ops[1..].iter().all(|o| o["status"] == "succeeded"),
        "{ops:#?}"
    );
    assert_eq!(list[0]["last_op"], ops.len(), "{list}");
}

/// A step that says which op it runs for, which attempt it is and who started it (`$PPID`: the
/// node) as it starts, then waits for `go` (for a minute at most, so that a failed test leaves
/// nothing running).
const HELD: &str = r#"
name: held
params:
  n: { type: int, required: true }
steps:
  - id: long
    run: |
      echo {{ params.n }} "$CAIRN_ATTEMPT $PPID" >> starts
      for i in $(seq 1 1200); do [ -e go ] && break; sleep 0.05; done
      [ -e go ]
"#;

#[test]
fn nodes_on_two_machines_leave_each_other_s_running_ops_alone() {
    if skip() {
        return;
    }
    let sandbox = Sandbox::new();
    sandbox.write("held.yaml", HELD);
    let other = OtherHost::new(&sandbox, &[]);
    // The node here has one worker, busy with the first op from then on; the other machine's has
    // a free worker all along, and so looks at the first op at every poll.
    let mut here = Node::start(&sandbox, "here", &["--workers", "1"]);
    let first = submit(&sandbox, "held.yaml", 1);
    wait_until(
        "the first op's step started",
        Duration::from_secs(60),
        || !sandbox.read("starts").is_empty(),
    );
    let mut there = Node::start_on(Some(&other), &sandbox, "there", &["--workers", "2"]);
    let pids = BTreeSet::from([here.pid(), there.pid()]);
    wait_until(
        "both nodes listed by cairn nodes",
        Duration::from_secs(30),
        || node_pids(&sandbox) == pids,
    );
    let boots = sandbox.sql("SELECT pid, split_part(boot_id, '/', 1) FROM nodes ORDER BY pid");
    let this_boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap();
    for (pid, boot) in [
        (here.pid(), this_boot.trim()),
        (there.pid(), OtherHost::BOOT_ID),
    ] {
        assert!(
            boots.lines().any(|l| l == format!("{pid}|{boot}")),
            "node {pid} runs on boot {boot}: {boots}"
        );
    }
    // Only the other machine's node has a free worker: it runs the second op.
    let second = submit(&sandbox, "held.yaml", 2);
    wait_until(
        "the second op's step started",
        Duration::from_secs(60),
        || sandbox.read("starts").lines().count() >= 2,
    );
    let expected = format!("1 1 {}\n2 1 {}\n", here.pid(), there.pid());

    // For two leases and more, each machine sees both ops running, by their nodes, and no step
    // starts again.
    let owners = BTreeMap::from([(first, here.pid()), (second, there.pid())]);
    let started = Instant::now();
    while started.elapsed() < Duration::from_millis(u64::try_from(2 * TTL_MS + 1_000).unwrap()) {
        for (place, ops) in [
            ("here", status(&sandbox)),
            ("there", other.status(&sandbox)),
        ] {
            for op in &ops {
                let id = op["id"].as_i64().unwrap();
                assert_eq!(
                    (op["status"].as_str(), owner_pid(op)),
                    (Some("running"), Some(owners[&id])),
                    "cairn status {place}, op {id}: {ops:#?}\nhere:\n{}\nthere:\n{}",
                    here.log(),
                    there.log()
                );
            }
            assert_eq!(ops.len(), 2, "{ops:#?}");
        }
        assert_eq!(sandbox.read("starts"), expected, "each step started once");
        std::thread::sleep(Duration::from_millis(300));
    }

    sandbox.write("go", "");
    wait_until("both ops succeeded", Duration::from_secs(60), || {
        status(&sandbox).iter().all(|o| o["status"] == "succeeded")
    });
    assert_eq!(sandbox.read("starts"), expected, "each step started once");
    for op in [first, second] {
        let show = sandbox.show(op);
        assert_eq!(
            crate::support::task(&show, "long")["attempts"],
            1,
            "{show:#}"
        );
        assert!(
            !events(&show).iter().any(|(kind, _)| kind == "auto-resumed"),
            "op {op} was taken over: {show:#}"
        );
    }
    for node in [&mut here, &mut there] {
        let status = node.terminate();
        assert_eq!(status.code(), Some(0), "{}", node.log());
    }
}

/// The firing times a node's log says it `fired for`, or (`skipped the firing of`) skipped while
/// the previous firing's op was active, in order.
fn firings(log: &str, what: &str) -> Vec<i64> {
    log.lines()
        .filter_map(|l| l.split_once(&format!(" {what} ")).map(|(_, rest)| rest))
        .map(|rest| {
            let time = rest.split_whitespace().next().unwrap();
            ms(&Value::from(time.trim_end_matches(':')))
        })
        .collect()
}

#[test]
fn a_node_that_cannot_read_a_schedule_s_plan_leaves_each_firing_to_one_that_can() {
    if skip() {
        return;
    }
    let sandbox = Sandbox::new();
    let plans = sandbox.path().join("plans");
    std::fs::create_dir(&plans).unwrap();
    std::fs::write(
        plans.join("tick.yaml"),
        "name: tick\nsteps:\n  - id: a\n    noop: true\n",
    )
    .unwrap();
    let out = sandbox.cairn(&[
        "schedule",
        "add",
        "every",
        "plans/tick.yaml",
        "--cron",
        "* * * * *",
    ]);
    assert_eq!(code(&out), Some(0), "{}", stderr(&out));
    // The other machine has no such directory: an empty one hides this machine's.
    let other = OtherHost::new(&sandbox, std::slice::from_ref(&plans));
    // As in the test above, each node's schedule clock starts tomorrow at 02:00:30 and runs 30
    // times as fast as real time. The node that cannot read the plan starts first, so that its
    // clock is ahead: it finds each firing due before the other does.
    let day = jiff::Timestamp::now()
        .checked_add(jiff::SignedDuration::from_hours(24))
        .unwrap()
        .strftime("%Y-%m-%d")
        .to_string();
    let first_tick: i64 = format!("{day}T02:00:00Z")
        .parse::<jiff::Timestamp>()
        .unwrap()
        .as_millisecond();
    let clock = format!("{day}T02:00:30Zx30");
    let args = ["--workers", "2", "--schedule-clock", &clock];
    let mut blind = Node::start_on(Some(&other), &sandbox, "blind", &args);
    std::thread::sleep(Duration::from_millis(300));
    let mut reader = Node::start(&sandbox, "reader", &args);
    let last_fire = || {
        let list = sandbox.json(&["schedule", "list", "--json"]);
        list[0]["last_fire"]
            .is_string()
            .then(|| ms(&list[0]["last_fire"]))
    };
    wait_until("six ticks fired", Duration::from_secs(120), || {
        last_fire().is_some_and(|at| at >= first_tick + 5 * 60_000)
    });
    for node in [&mut blind, &mut reader] {
        let status = node.terminate();
        assert_eq!(status.code(), Some(0), "{}", node.log());
    }
    let (blind_log, reader_log) = (blind.log(), reader.log());
    let logs = format!("blind:\n{blind_log}\nreader:\n{reader_log}");

    // The blind node tried, and said so once per firing, not once per poll (it polled about
    // every 100 ms for seconds).
    let tries = blind_log
        .lines()
        .filter(|l| l.contains("cannot fire"))
        .count();
    assert!(
        blind_log.contains("cannot read") && tries >= 1,
        "the blind node never tried: {logs}"
    );
    // Every tick from the first to the last one handled was fired once, by the node that reads
    // the plan, unless it was skipped because the previous tick's op was still active (a slow
    // machine): none was used up by the other node's failure.
    let last = last_fire().unwrap();
    let ticks: Vec<i64> = (first_tick..=last).step_by(60_000).collect();
    assert!(
        tries <= ticks.len() + 2,
        "{tries} tries for {} ticks: {logs}",
        ticks.len()
    );
    let fired = firings(&reader_log, "fired for");
    assert!(firings(&blind_log, "fired for").is_empty(), "{logs}");
    assert!(
        fired.is_sorted_by(|a, b| a < b),
        "a tick fired twice: {logs}"
    );
    let skipped: Vec<i64> = [&blind_log, &reader_log]
        .iter()
        .flat_map(|log| firings(log, "skipped the firing of"))
        .collect();
    for tick in &ticks {
        assert!(
            fired.contains(tick) || skipped.contains(tick),
            "the tick at {tick} was neither fired nor skipped: {logs}"
        );
    }
    let ops = status(&sandbox);
    assert_eq!(ops.len(), fired.len(), "ops {ops:#?}\n{logs}");
    assert!(
        ops[1..].iter().all(|o| o["status"] == "succeeded"),
        "{ops:#?}"
    );
}
