//! PostgreSQL going away under running ops: a private server of the test's own (on a free
//! loopback port, run as `postgres`) crashes (`pg_ctl stop -m immediate`) and starts again while 50
//! ops run; every op succeeds and no step runs twice.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::{Sandbox, signal};

/// A PostgreSQL server of this test's own, stopped and deleted when dropped.
struct Server {
    _dir: tempfile::TempDir,
    data: PathBuf,
    port: u16,
}

/// Where PostgreSQL's server programs are (`/usr/lib/postgresql/<version>/bin`).
fn pg_bin() -> PathBuf {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL's server programs are installed (.ci/test installs them)")
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|p| p.join("pg_ctl").exists())
        .collect();
    versions.sort();
    versions.pop().expect("a PostgreSQL version with pg_ctl")
}

/// `program args` as the `postgres` user (the server refuses to run as root).
fn as_postgres(program: &str, args: &[&str]) {
    let status = Command::new("runuser")
        .args(["-u", "postgres", "--"])
        .arg(pg_bin().join(program))
        .args(args)
        .status()
        .unwrap();
    assert!(status.success(), "{program} {args:?}: {status}");
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Server {
    fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .unwrap();
        let data = dir.path().join("data");
        let chown = Command::new("chown")
            .args(["postgres", &dir.path().to_string_lossy()])
            .status()
            .unwrap();
        assert!(chown.success());
        as_postgres(
            "initdb",
            &[
                "-D",
                &data.to_string_lossy(),
                "-U",
                "postgres",
                "--auth=trust",
            ],
        );
        let port = free_port();
        let conf = format!(
            "listen_addresses = '127.0.0.1'\nport = {port}\nunix_socket_directories = '{}'\nmax_connections = 200\n",
            dir.path().display()
        );
        let mut text = std::fs::read_to_string(data.join("postgresql.conf")).unwrap();
        text.push_str(&conf);
        std::fs::write(data.join("postgresql.conf"), text).unwrap();
        let server = Self {
            _dir: dir,
            data,
            port,
        };
        server.pg_ctl(&["start"]);
        server
    }

    fn pg_ctl(&self, args: &[&str]) {
        let data = self.data.to_string_lossy();
        let log = format!("{data}.log");
        let mut all = vec!["-D", &data, "-l", &log, "-w", "-t", "60"];
        all.extend_from_slice(args);
        as_postgres("pg_ctl", &all);
    }

    /// A new database on this server: its URL.
    fn database(&self, name: &str) -> String {
        let status = Command::new("psql")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                "-d",
                "postgres",
                "-qc",
                &format!("CREATE DATABASE {name}"),
            ])
            .status()
            .unwrap();
        assert!(status.success());
        format!("postgres://postgres@127.0.0.1:{}/{name}", self.port)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let data = self.data.to_string_lossy().into_owned();
        let _ = Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(pg_bin().join("pg_ctl"))
            .args(["-D", &data, "-m", "immediate", "stop"])
            .status();
    }
}

/// The ops' JSON on the database at `url`.
fn ops(sandbox: &Sandbox, url: &str) -> Vec<Value> {
    let out = sandbox
        .command(&["status", "--json", "--all"])
        .env("CAIRN_DB", url)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "status: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice::<Value>(&out.stdout)
        .unwrap()
        .as_array()
        .cloned()
        .unwrap_or_default()
}

fn count(ops: &[Value], status: &str) -> usize {
    ops.iter().filter(|o| o["status"] == status).count()
}

/// Lines in `path` (a step appends one each time it runs).
fn lines(path: &Path) -> usize {
    std::fs::read_to_string(path).map_or(0, |t| t.lines().count())
}

#[test]
fn a_server_crashed_and_restarted_while_50_ops_run_loses_nothing_and_runs_nothing_twice() {
    let server = Server::start();
    let url = server.database("cairn");
    let sandbox = Sandbox::new();
    let key = sandbox.path().join("secret.key");
    std::fs::write(&key, [7u8; 32]).unwrap();
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let side = sandbox.path().join("side");
    std::fs::create_dir(&side).unwrap();
    sandbox.write(
        "plan.yaml",
        r#"name: outage
params:
  n: { type: int, required: true }
  side: { type: string, required: true }
title: op {{ params.n }}
steps:
  - id: a
    run: "echo ran >> {{ params.side }}/a-{{ params.n }}; sleep 3"
  - id: b
    needs: [a]
    run: "echo ran >> {{ params.side }}/b-{{ params.n }}"
"#,
    );
    let cairn = |args: &[&str]| {
        let out = sandbox
            .command(args)
            .env("CAIRN_DB", &url)
            .env("CAIRN_SECRET_KEY_FILE", &key)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let side_param = format!("side={}", side.display());
    for n in 0..50 {
        cairn(&[
            "submit",
            "plan.yaml",
            "-p",
            &format!("n={n}"),
            "-p",
            &side_param,
        ]);
    }
    let log = sandbox.path().join("serve.log");
    let mut serve = sandbox
        .command(&["serve", "--workers", "50"])
        .env("CAIRN_DB", &url)
        .env("CAIRN_SECRET_KEY_FILE", &key)
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    // Wait until the ops run (their first steps sleep), then restart the server under them.
    let started = Instant::now();
    while count(&ops(&sandbox, &url), "running") < 40 {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the ops never ran"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // A crash of the server (no checkpoint, connections cut), then a start: recovery replays its
    // log while the steps go on.
    server.pg_ctl(&["stop", "-m", "immediate"]);
    std::thread::sleep(Duration::from_secs(1));
    server.pg_ctl(&["start"]);
    let started = Instant::now();
    loop {
        let all = ops(&sandbox, &url);
        if count(&all, "succeeded") == 50 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "not every op succeeded after the restart: {:?}\nserve said:\n{}",
            all.iter()
                .map(|o| (o["id"].clone(), o["status"].clone()))
                .collect::<Vec<_>>(),
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    signal(&serve, nix::sys::signal::Signal::SIGTERM);
    let _ = serve.wait();
    for n in 0..50 {
        for step in ["a", "b"] {
            assert_eq!(
                lines(&side.join(format!("{step}-{n}"))),
                1,
                "step {step} of op {n} ran once"
            );
        }
    }
}

/// Ctrl-C while the server is down: the steps are ended as always, but the stop cannot be
/// recorded; a second Ctrl-C leaves at once (exit 4, saying so) instead of waiting for the server.
/// Once it is back, the op shows `interrupted` and a resume finishes it.
#[test]
fn a_second_ctrl_c_leaves_a_run_whose_server_is_down() {
    let server = Server::start();
    let url = server.database("cairn");
    let sandbox = Sandbox::new();
    sandbox.write(
        "plan.yaml",
        "name: long\nsteps:\n  - id: wait\n    run: \"echo started >> runs; test -e done || sleep 60\"\n",
    );
    let command = |args: &[&str]| {
        let mut command = sandbox.command(args);
        command.env("CAIRN_DB", &url);
        command
    };
    let mut run = command(&["run", "plan.yaml", "--grace", "1s"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    sandbox.wait_for("runs", Duration::from_secs(30));
    let uuid = ops(&sandbox, &url)[0]["uuid"].as_str().unwrap().to_owned();
    server.pg_ctl(&["stop", "-m", "immediate"]);
    signal(&run, nix::sys::signal::Signal::SIGINT);
    // The steps get their grace (1 s) whatever the database does.
    let ended = Instant::now();
    while !crate::support::step_processes(&uuid).is_empty() {
        assert!(
            ended.elapsed() < Duration::from_secs(10),
            "the step outlived its grace"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(run.try_wait().unwrap().is_none(), "still trying to record");
    signal(&run, nix::sys::signal::Signal::SIGINT);
    let left = Instant::now();
    let status = loop {
        if let Some(status) = run.try_wait().unwrap() {
            break status;
        }
        assert!(
            left.elapsed() < Duration::from_secs(10),
            "a second Ctrl-C did not end it"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut said = String::new();
    std::io::Read::read_to_string(&mut run.stderr.take().unwrap(), &mut said).unwrap();
    assert_eq!(status.code(), Some(4), "{said}");
    assert!(said.contains("stopping now"), "{said}");

    server.pg_ctl(&["start"]);
    assert_eq!(ops(&sandbox, &url)[0]["status"], "interrupted");
    sandbox.write("done", "");
    let out = command(&["resume", "1"]).output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(sandbox.read("runs"), "started\nstarted\n");
    assert_eq!(ops(&sandbox, &url)[0]["status"], "succeeded");
}
