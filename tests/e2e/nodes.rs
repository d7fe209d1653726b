//! Several `cairn serve` processes on one database: they share the queue without running an op
//! twice, `cairn nodes` lists the live ones, `status` names each op's owner; `cairn db migrate`;
//! the secret key file's refusals.

use std::collections::BTreeMap;
use std::process::{Child, Stdio};

use nix::sys::signal::Signal;
use serde_json::Value;

use crate::support::{Sandbox, code, postgres, signal, stderr, stdout, wait_until};

/// Each op says it started, waits for `go`, then says it ended.
const GATED: &str = r"
name: gated
params:
  n: { type: int, required: true }
steps:
  - id: work
    run: |
      echo start {{ params.n }} >> runs
      while [ ! -e go ]; do sleep 0.05; done
      echo end {{ params.n }} >> runs
";

fn submit(sandbox: &Sandbox, n: u32) {
    let out = sandbox.cairn(&["submit", "gated.yaml", "-p", &format!("n={n}")]);
    assert_eq!(code(&out), Some(0), "{}", stderr(&out));
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

fn lines(sandbox: &Sandbox) -> Vec<String> {
    sandbox
        .read("runs")
        .lines()
        .map(ToOwned::to_owned)
        .collect()
}

fn nodes(sandbox: &Sandbox) -> Vec<Value> {
    sandbox
        .json(&["nodes", "--json"])
        .as_array()
        .cloned()
        .unwrap()
}

fn pids(nodes: &[Value]) -> Vec<u64> {
    nodes.iter().map(|n| n["pid"].as_u64().unwrap()).collect()
}

/// Stops a server with SIGTERM and waits for it; its output.
fn stop(child: Child, what: &str) -> std::process::Output {
    signal(&child, Signal::SIGTERM);
    let mut child = child;
    wait_until(&format!("{what} exiting"), || {
        child.try_wait().unwrap().is_some()
    });
    child.wait_with_output().unwrap()
}

#[test]
fn two_nodes_share_forty_queued_ops_and_no_op_runs_twice() {
    let sandbox = Sandbox::new();
    sandbox.write("gated.yaml", GATED);
    for n in 1..=40 {
        submit(&sandbox, n);
    }
    let first = serve(&sandbox, &["--workers", "2"]);
    let second = serve(&sandbox, &["--workers", "2"]);
    let (a, b) = (u64::from(first.id()), u64::from(second.id()));
    // Every op waits for `go`: two workers each, so four run, two on each node.
    wait_until("four ops starting", || lines(&sandbox).len() == 4);
    wait_until("both nodes holding two ops", || {
        let listed = nodes(&sandbox);
        listed.len() == 2
            && listed
                .iter()
                .all(|n| n["running"].as_array().is_some_and(|r| r.len() == 2))
    });
    let listed = nodes(&sandbox);
    let mut listed_pids = pids(&listed);
    listed_pids.sort_unstable();
    let mut expected = vec![a, b];
    expected.sort_unstable();
    assert_eq!(listed_pids, expected, "{listed:?}");
    for node in &listed {
        assert_eq!(node["workers"], 2, "{node}");
        assert!(
            node["started_at"]
                .as_str()
                .is_some_and(|t| t.ends_with('Z'))
        );
        assert!(
            node["heartbeat_at"]
                .as_str()
                .is_some_and(|t| t.ends_with('Z'))
        );
    }
    // What each node holds is what status says it owns.
    let status = sandbox.json(&["status", "--json", "--all"]);
    for node in &listed {
        for op in node["running"].as_array().unwrap() {
            let row = status
                .as_array()
                .unwrap()
                .iter()
                .find(|o| o["id"] == *op)
                .unwrap();
            assert_eq!(row["owner"]["pid"], node["pid"], "{row}");
            assert_eq!(row["owner"]["host"], node["host"], "{row}");
        }
    }
    sandbox.write("go", "");
    wait_until("all forty ops succeeding", || {
        let status = sandbox.json(&["status", "--json", "--all"]);
        status
            .as_array()
            .is_some_and(|ops| ops.len() == 40 && ops.iter().all(|o| o["status"] == "succeeded"))
    });
    let first = stop(first, "the first node");
    let second = stop(second, "the second node");
    assert_eq!(code(&first), Some(0), "{}", stderr(&first));
    assert_eq!(code(&second), Some(0), "{}", stderr(&second));
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for line in lines(&sandbox) {
        *counts.entry(line).or_default() += 1;
    }
    assert_eq!(counts.len(), 80, "{counts:?}");
    assert!(
        counts.values().all(|&c| c == 1),
        "an op ran twice: {counts:?}"
    );
    // A clean stop removes a node's row at once.
    assert_eq!(nodes(&sandbox), Vec::<Value>::new());
    let out = sandbox.cairn(&["nodes"]);
    assert_eq!(code(&out), Some(0), "{}", stderr(&out));
    assert!(stdout(&out).contains("no live nodes"), "{}", stdout(&out));
}

#[test]
fn a_killed_node_leaves_the_list_once_its_lease_runs_out() {
    let sandbox = Sandbox::new();
    sandbox.write("gated.yaml", GATED);
    let mut killed = serve(&sandbox, &["--lease-ttl", "2s"]);
    let kept = serve(&sandbox, &["--lease-ttl", "2s"]);
    sandbox.wait_for_db();
    wait_until("both nodes listed", || nodes(&sandbox).len() == 2);
    let out = sandbox.cairn(&["nodes"]);
    let table = stdout(&out);
    let header = table.lines().next().unwrap_or_default();
    for column in ["HOST", "PID", "WORKERS", "STARTED", "HEARTBEAT", "RUNNING"] {
        assert!(header.contains(column), "{table}");
    }
    assert!(table.contains(&killed.id().to_string()), "{table}");
    killed.kill().unwrap();
    killed.wait().unwrap();
    let gone = u64::from(killed.id());
    wait_until("the killed node leaving the list", || {
        !pids(&nodes(&sandbox)).contains(&gone)
    });
    assert_eq!(pids(&nodes(&sandbox)), vec![u64::from(kept.id())]);
    let out = stop(kept, "the kept node");
    assert_eq!(code(&out), Some(0), "{}", stderr(&out));
    assert_eq!(nodes(&sandbox), Vec::<Value>::new());
}

#[test]
fn a_lease_shorter_than_a_second_is_refused() {
    let sandbox = Sandbox::new();
    let out = sandbox.cairn(&["serve", "--lease-ttl", "200ms"]);
    assert_eq!(code(&out), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("at least 1s"), "{}", stderr(&out));
}

#[test]
fn status_names_the_owner_of_a_running_op_and_none_once_it_ended() {
    let sandbox = Sandbox::new();
    sandbox.write("gated.yaml", GATED);
    let mut run = sandbox
        .command(&["run", "gated.yaml", "-p", "n=1"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_until("the op starting", || lines(&sandbox).len() == 1);
    let status = sandbox.json(&["status", "--json"]);
    assert_eq!(status[0]["status"], "running", "{status}");
    assert_eq!(status[0]["owner"]["pid"], u64::from(run.id()), "{status}");
    assert!(
        status[0]["owner"]["host"]
            .as_str()
            .is_some_and(|h| !h.is_empty())
    );
    // One machine's database: the table is the one the brief prints, without a NODE column; a
    // shared one names the node that runs each op.
    let table = stdout(&sandbox.cairn(&["status"]));
    assert_eq!(table.contains("NODE"), postgres(), "{table}");
    // `show` says who owns it.
    let show = stdout(&sandbox.cairn(&["show", "1"]));
    assert!(
        show.contains(&format!("owner:    pid {}", run.id())),
        "{show}"
    );
    sandbox.write("go", "");
    assert!(run.wait().unwrap().success());
    let status = sandbox.json(&["status", "--json"]);
    assert_eq!(status[0]["status"], "succeeded", "{status}");
    assert_eq!(status[0]["owner"], Value::Null, "{status}");
}

#[test]
fn db_migrate_makes_the_database_and_says_its_schema_version() {
    let sandbox = Sandbox::new();
    let out = sandbox.cairn(&["db", "migrate"]);
    assert_eq!(code(&out), Some(0), "{}", stderr(&out));
    let said = stdout(&out);
    let version = said
        .trim()
        .rsplit_once("schema version ")
        .and_then(|(_, v)| v.parse::<u32>().ok());
    // SQLite's schema is at 7 or later; PostgreSQL's started at 1.
    let least = if postgres() { 1 } else { 7 };
    assert!(version.is_some_and(|v| v >= least), "{said}");
    // The database is there and reads; migrating again changes nothing.
    let status = sandbox.cairn(&["status", "--json"]);
    assert_eq!(code(&status), Some(0), "{}", stderr(&status));
    let again = sandbox.cairn(&["db", "migrate"]);
    assert_eq!(stdout(&again), said);
}

const SECRET: &str = r"
name: secret
params:
  password: { type: string, secret: true, required: true }
steps:
  - id: use
    run: test -e go
";

#[test]
fn a_key_file_others_may_read_is_refused_and_a_wrong_key_is_named() {
    use std::os::unix::fs::PermissionsExt as _;
    let sandbox = Sandbox::new();
    sandbox.write("secret.yaml", SECRET);
    // Fails (no `go`): the op keeps its sealed password for a resume.
    let out = sandbox.cairn(&["run", "secret.yaml", "-p", "password=hunter2"]);
    assert_eq!(code(&out), Some(1), "{}", stderr(&out));
    let key = sandbox.key_file();
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let original = std::fs::read(&key).unwrap();

    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    for args in [
        vec!["resume", "1"],
        vec!["run", "secret.yaml", "-p", "password=x"],
    ] {
        let out = sandbox.cairn(&args);
        assert_eq!(code(&out), Some(2), "{args:?}: {}", stderr(&out));
        let said = stderr(&out);
        assert!(said.contains(&key.display().to_string()), "{said}");
        assert!(said.contains("chmod 600"), "{said}");
    }
    assert_eq!(sandbox.op_count(), 1, "nothing new stored");

    // Another key, private as it should be: the sealed value does not open, and the error says
    // which key file is the wrong one.
    std::fs::write(&key, "ab".repeat(32)).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let out = sandbox.cairn(&["resume", "1"]);
    assert_eq!(code(&out), Some(2), "{}", stderr(&out));
    let said = stderr(&out);
    assert!(
        said.contains(&format!(
            "`{}` is not the key these secrets were sealed with",
            key.display()
        )),
        "{said}"
    );
    assert!(!said.contains("hunter2"), "{said}");

    // The right key, as 32 raw bytes (`head -c 32 /dev/urandom`), opens it.
    let raw: Vec<u8> = (0..32)
        .map(|i| {
            u8::from_str_radix(
                std::str::from_utf8(&original[i * 2..i * 2 + 2]).unwrap(),
                16,
            )
            .unwrap()
        })
        .collect();
    std::fs::write(&key, raw).unwrap();
    sandbox.write("go", "");
    let out = sandbox.cairn(&["resume", "1"]);
    assert_eq!(code(&out), Some(0), "{}", stderr(&out));
}

/// Shifts `CLOCK_REALTIME` by `$SKEW_MS` milliseconds, for the process it is preloaded into.
const SKEW_SHIM: &str = r#"
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdlib.h>
#include <time.h>
int clock_gettime(clockid_t id, struct timespec *ts) {
    static int (*real)(clockid_t, struct timespec *);
    if (!real) real = dlsym(RTLD_NEXT, "clock_gettime");
    int r = real(id, ts);
    if (r == 0 && (id == CLOCK_REALTIME || id == CLOCK_REALTIME_COARSE)) {
        const char *s = getenv("SKEW_MS");
        long long ms = s ? atoll(s) : 0;
        long long ns = (long long)ts->tv_nsec + (ms % 1000) * 1000000LL;
        ts->tv_sec += ms / 1000 + ns / 1000000000LL;
        ts->tv_nsec = ns % 1000000000LL;
        if (ts->tv_nsec < 0) { ts->tv_nsec += 1000000000LL; ts->tv_sec -= 1; }
    }
    return r;
}
"#;

/// On a shared database, leases are times in each node's clock: a writer whose clock is seconds
/// off the server's is refused (exit 2, saying by how much), before it could take a live op early.
#[test]
fn a_writer_whose_clock_is_off_the_servers_is_refused() {
    if !postgres() {
        // One machine's SQLite file: one clock.
        return;
    }
    let sandbox = Sandbox::new();
    sandbox.write("gated.yaml", GATED);
    sandbox.write("skew.c", SKEW_SHIM);
    let shim = sandbox.path().join("skew.so");
    let built = std::process::Command::new("cc")
        .args(["-shared", "-fPIC", "-o"])
        .arg(&shim)
        .arg(sandbox.path().join("skew.c"))
        .arg("-ldl")
        .status()
        .expect("a C compiler (the Rust toolchain's linker)");
    assert!(built.success());
    let skewed = |ms: &str, args: &[&str]| {
        sandbox
            .command(args)
            .env("LD_PRELOAD", &shim)
            .env("SKEW_MS", ms)
            .output()
            .unwrap()
    };
    for (ms, word) in [("20000", "ahead of"), ("-20000", "behind")] {
        for args in [
            &["submit", "gated.yaml", "-p", "n=1"][..],
            &["serve", "--once"],
        ] {
            let out = skewed(ms, args);
            assert_eq!(code(&out), Some(2), "{args:?}: {}", stderr(&out));
            let said = stderr(&out);
            assert!(
                said.contains(&format!("clock is 20.0 s {word} the server's")),
                "{said}"
            );
        }
    }
    assert_eq!(sandbox.op_count(), 0, "nothing was stored");
    // Within the bound, it works.
    let out = skewed("500", &["submit", "gated.yaml", "-p", "n=1"]);
    assert_eq!(code(&out), Some(0), "{}", stderr(&out));
    assert_eq!(sandbox.op_count(), 1);
}
