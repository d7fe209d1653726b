//! `daemon: true`: a step that starts a server which outlives it, through the real binary. The
//! server is recorded and shown; it survives the step's end, a `kill -9` of cairn while the step
//! waits for it to be ready (the resume waits again and starts no second server), and a cancel
//! of the op afterwards. A server not yet ready when its step fails or is canceled is ended. A
//! real HTTP server serves the steps after it, and runs until a later op stops it.

use std::time::{Duration, Instant};

use crate::support::{Sandbox, alive, code, events, stderr, task};

/// A plan whose `start` step leaves a shell loop running (its pid in `daemon.pid`, its starts
/// counted in `starts`); the loop makes `ready` once the test writes `go`. `use` needs the server;
/// `hold` runs until the test writes `release`.
const PLAN: &str = r#"name: svc
steps:
  - id: start
    daemon: true
    run: |
      echo start >> starts
      sh -c 'echo $$ > daemon.pid; while :; do if [ -f go ]; then touch ready; fi; sleep 0.1; done' >/dev/null 2>&1 &
    until: { probe: "test -f ready", every: 200ms, timeout: TIMEOUT }
  - id: use
    needs: [start]
    run: test -f ready && echo used > used
  - id: hold
    needs: [use]
    run: while [ ! -f release ]; do sleep 0.1; done
"#;

/// Ends the test's server, whatever the test's end.
struct Server(u32);

impl Drop for Server {
    fn drop(&mut self) {
        if let Ok(pid) = i32::try_from(self.0) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// Waits until op 1's events hold one of `kind` whose message contains `text`.
fn wait_for_event(sandbox: &Sandbox, kind: &str, text: &str) {
    let started = Instant::now();
    loop {
        let out = sandbox.cairn(&["show", "1", "--json"]);
        if code(&out) == Some(0) {
            let show: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            if events(&show)
                .iter()
                .any(|(k, m)| k == kind && m.contains(text))
            {
                return;
            }
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "no `{kind}` event with `{text}`"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until op 1's task `id` has the status `status`.
fn wait_for_task(sandbox: &Sandbox, id: &str, status: &str) {
    let started = Instant::now();
    while task(&sandbox.show(1), id)["status"] != status {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "{id} never {status}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn server_pid(sandbox: &Sandbox) -> u32 {
    sandbox.wait_for("daemon.pid", Duration::from_secs(30));
    let started = Instant::now();
    loop {
        if let Ok(pid) = sandbox.read("daemon.pid").trim().parse() {
            return pid;
        }
        assert!(started.elapsed() < Duration::from_secs(10));
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_daemon_outlives_its_step_a_kill_a_resume_and_a_cancel() {
    let sandbox = Sandbox::new();
    sandbox.write("plan.yaml", &PLAN.replace("TIMEOUT", "5m"));
    let mut run = sandbox.spawn(&["run", "plan.yaml"]);
    let pid = server_pid(&sandbox);
    let server = Server(pid);
    // Killed while the step waits for its server to be ready.
    wait_for_event(&sandbox, "daemon-kept", &format!("pid {pid}"));
    run.kill().unwrap();
    run.wait().unwrap();
    assert!(alive(pid), "the server died with cairn");

    let resumed = sandbox
        .command(&["resume", "1"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_event(&sandbox, "daemon-kept", "not started again");
    assert!(alive(pid), "the resume ended the server");
    sandbox.write("go", "");
    wait_for_task(&sandbox, "hold", "running");
    assert!(alive(pid), "the server ended with its step");
    assert_eq!(sandbox.read("starts").lines().count(), 1, "a second server");
    assert_eq!(sandbox.read("used").trim(), "used");
    let show = sandbox.show(1);
    assert_eq!(task(&show, "start")["status"], "succeeded");
    let daemons = show["daemons"].as_array().unwrap();
    assert_eq!(daemons.len(), 1, "{show:#}");
    assert_eq!(daemons[0]["task"], "start");
    assert_eq!(daemons[0]["pid"], pid);
    assert_eq!(daemons[0]["alive"], true);
    let text = String::from_utf8_lossy(&sandbox.cairn(&["show", "1"]).stdout).into_owned();
    assert!(
        text.contains(&format!("start  pid {pid}")) && text.contains("alive"),
        "{text}"
    );

    // The op is canceled afterwards: the server outlives the op too.
    assert_eq!(code(&sandbox.cairn(&["cancel", "1"])), Some(0));
    let out = resumed.wait_with_output().unwrap();
    assert_eq!(code(&out), Some(3), "{}", stderr(&out));
    assert!(alive(pid), "the cancel ended the server");
    assert_eq!(sandbox.show(1)["daemons"][0]["alive"], true);

    // Once it is stopped, `show` says so.
    drop(server);
    let started = Instant::now();
    while alive(pid) {
        assert!(started.elapsed() < Duration::from_secs(10));
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(sandbox.show(1)["daemons"][0]["alive"], false);
}

#[test]
fn a_daemon_not_yet_ready_is_ended_when_its_step_fails_or_is_canceled() {
    // The wait times out: the step fails and its server is ended.
    let sandbox = Sandbox::new();
    sandbox.write("plan.yaml", &PLAN.replace("TIMEOUT", "1s"));
    let out = sandbox.cairn(&["run", "plan.yaml"]);
    assert_eq!(code(&out), Some(1), "{}", stderr(&out));
    let pid = server_pid(&sandbox);
    let _server = Server(pid);
    assert!(!alive(pid), "the server of a failed step still runs");
    assert!(sandbox.show(1)["daemons"].as_array().unwrap().is_empty());

    // Canceled while it waits, by its live owner.
    let sandbox = Sandbox::new();
    sandbox.write("plan.yaml", &PLAN.replace("TIMEOUT", "5m"));
    let run = sandbox.spawn(&["run", "plan.yaml"]);
    let pid = server_pid(&sandbox);
    let _server = Server(pid);
    wait_for_event(&sandbox, "daemon-kept", &format!("pid {pid}"));
    assert_eq!(code(&sandbox.cairn(&["cancel", "1"])), Some(0));
    let out = run.wait_with_output().unwrap();
    assert_eq!(code(&out), Some(3), "{}", stderr(&out));
    assert!(!alive(pid), "the server of a canceled step still runs");

    // Canceled while it waits, after a `kill -9` of its owner: the cancel ends it.
    let sandbox = Sandbox::new();
    sandbox.write("plan.yaml", &PLAN.replace("TIMEOUT", "5m"));
    let mut run = sandbox.spawn(&["run", "plan.yaml"]);
    let pid = server_pid(&sandbox);
    let _server = Server(pid);
    wait_for_event(&sandbox, "daemon-kept", &format!("pid {pid}"));
    run.kill().unwrap();
    run.wait().unwrap();
    assert!(alive(pid));
    assert_eq!(code(&sandbox.cairn(&["cancel", "1"])), Some(0));
    assert!(!alive(pid), "the server of a canceled step still runs");
}

#[test]
fn a_real_server_started_by_a_step_serves_the_steps_after_it_until_a_step_stops_it() {
    assert!(
        std::process::Command::new("python3")
            .arg("--version")
            .output()
            .is_ok(),
        "python3 runs the test's HTTP server"
    );
    let port = std::net::TcpListener::bind("127.0.0.2:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let sandbox = Sandbox::new();
    sandbox.write("hello.txt", "hello from the daemon\n");
    sandbox.write(
        "plan.yaml",
        &format!(
            r#"name: http
params:
  port: {{ type: int, default: {port} }}
steps:
  - id: serve
    daemon: true
    run: |
      python3 -m http.server {{{{ params.port }}}} --bind 127.0.0.2 >server.log 2>&1 &
      echo $! > server.pid
    until: {{ probe: "python3 -c 'import urllib.request as u, sys; u.urlopen(sys.argv[1], timeout=2)' http://127.0.0.2:{{{{ params.port }}}}/hello.txt", every: 200ms, timeout: 1m }}
  - id: fetch
    needs: [serve]
    run: python3 -c 'import urllib.request as u, sys; print(u.urlopen(sys.argv[1]).read().decode(), end="")' http://127.0.0.2:{{{{ params.port }}}}/hello.txt > fetched
  - id: check-alive
    needs: [fetch]
    run: kill -0 "$(cat server.pid)"
"#
        ),
    );
    let out = sandbox.cairn(&["run", "plan.yaml"]);
    assert_eq!(code(&out), Some(0), "{}", stderr(&out));
    let pid: u32 = sandbox.read("server.pid").trim().parse().unwrap();
    let server = Server(pid);
    assert_eq!(sandbox.read("fetched"), "hello from the daemon\n");
    assert!(alive(pid), "the server ended with the op");
    let show = sandbox.show(1);
    assert_eq!(show["daemons"][0]["pid"], pid, "{show:#}");
    assert_eq!(show["daemons"][0]["alive"], true);

    // A later op (or step) stops it, as the plan wants: cairn never does once it was ready.
    sandbox.write(
        "stop.yaml",
        "name: stop\nsteps:\n  - id: stop\n    run: kill \"$(cat server.pid)\"\n",
    );
    let out = sandbox.cairn(&["run", "stop.yaml"]);
    assert_eq!(code(&out), Some(0), "{}", stderr(&out));
    let started = Instant::now();
    while alive(pid) {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the server did not stop"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(sandbox.show(1)["daemons"][0]["alive"], false);
    drop(server);
}

#[test]
fn a_daemon_step_killed_before_its_command_ended_takes_over_the_server_on_resume() {
    let sandbox = Sandbox::new();
    sandbox.write(
        "plan.yaml",
        r#"name: slow-start
steps:
  - id: start
    daemon: true
    run: |
      echo start >> starts
      echo $$ > leader.pid
      sh -c 'echo $$ > daemon.pid; while :; do if [ -f go ]; then touch ready; fi; sleep 0.1; done' >/dev/null 2>&1 &
      while [ ! -f started ]; do sleep 0.05; done
    until: { probe: "test -f ready", every: 200ms, timeout: 5m }
"#,
    );
    let mut run = sandbox.spawn(&["run", "plan.yaml"]);
    let pid = server_pid(&sandbox);
    let _server = Server(pid);
    // Killed while the command itself still runs.
    run.kill().unwrap();
    run.wait().unwrap();
    let resumed = sandbox
        .command(&["resume", "1"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_event(&sandbox, "daemon-kept", "not started again");
    // The killed attempt's command ends; then the server is ready: the step's record names the
    // server, not the command gone.
    let leader: u32 = sandbox.read("leader.pid").trim().parse().unwrap();
    sandbox.write("started", "");
    let started = Instant::now();
    while alive(leader) {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the command never ended"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    sandbox.write("go", "");
    let out = resumed.wait_with_output().unwrap();
    assert_eq!(code(&out), Some(0), "{}", stderr(&out));
    assert_eq!(sandbox.read("starts").lines().count(), 1, "a second server");
    assert!(alive(pid), "the server ended with its step");
    assert_eq!(sandbox.show(1)["daemons"][0]["alive"], true);
}
