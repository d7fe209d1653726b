//! Steps on other hosts (`on:`), against real `sshd` servers: one on 127.0.0.2 and one on
//! 127.0.0.3, each with its own host key, started once for this test binary. cairn reaches them
//! through an `ssh` configuration file named by `CAIRN_SSH_CONFIG` (OpenSSH reads `~` from the
//! password database, so a temporary `$HOME` would not do), which gives each host an alias:
//! `host-a`, `host-b`; `stranger` (a host whose key is unknown), `closed` (a port nobody listens
//! on), `nobody` (a user that does not exist). A third, `host-c` (127.0.0.4), is for the tests
//! that cut connections: they kill its `sshd` and start it again ([`cut_host`]).
//!
//! Both hosts are this machine: a step's pids can be checked here. The processes of a remote step
//! are children of `sshd`, not of cairn, and carry no attempt marker: only an end over SSH ends
//! them.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use crate::support::{Sandbox, alive, code, events, stderr, stdout, task, wait_until};

/// The test hosts, started on first use and ended with the test binary.
pub(crate) struct Hosts {
    dir: PathBuf,
}

static HOSTS: OnceLock<Hosts> = OnceLock::new();

/// The running test hosts. Without `sshd` the test fails, saying what to install (`.ci/test`
/// installs it): a test that skipped would prove nothing.
pub(crate) fn hosts() -> &'static Hosts {
    HOSTS.get_or_init(|| {
        assert!(
            Path::new("/usr/sbin/sshd").exists(),
            "no /usr/sbin/sshd: install the `openssh-server` package"
        );
        start_hosts()
    })
}

fn free_port(address: &str) -> u16 {
    std::net::TcpListener::bind((address, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn keygen(path: &Path) {
    let made = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "cairn-test", "-f"])
        .arg(path)
        .status()
        .unwrap();
    assert!(made.success());
}

/// A test host's key and `sshd` configuration in `dir` (listening on a free port of `address`),
/// its key added to `known` and its alias `name` to `config`: the configuration and the port.
fn sshd_host(
    dir: &Path,
    (name, address): (&str, &str),
    user: &str,
    (known, config): (&mut String, &mut String),
) -> (PathBuf, u16) {
    let key = dir.join(format!("{name}_key"));
    keygen(&key);
    let port = free_port(address);
    let sshd_config = dir.join(format!("{name}_sshd_config"));
    std::fs::write(
        &sshd_config,
        format!(
            "Port {port}\nListenAddress {address}\nHostKey {key}\nPidFile {dir}/{name}.pid\nAuthorizedKeysFile {dir}/authorized_keys\nPasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\nPermitRootLogin prohibit-password\nMaxStartups 100\nMaxSessions 100\n",
            key = key.display(),
            dir = dir.display(),
        ),
    )
    .unwrap();
    let public = std::fs::read_to_string(key.with_extension("pub")).unwrap();
    let _ = write!(known, "[{address}]:{port} {public}");
    let _ = write!(
        config,
        "Host {name}\n  HostName {address}\n  Port {port}\n  User {user}\n  UserKnownHostsFile {dir}/known_hosts\n\n",
        dir = dir.display()
    );
    (sshd_config, port)
}

fn start_hosts() -> Hosts {
    // Never removed: the servers use it until the test binary ends.
    let dir = tempfile::tempdir().unwrap().keep();
    keygen(&dir.join("id"));
    std::fs::copy(dir.join("id.pub"), dir.join("authorized_keys")).unwrap();
    std::fs::write(dir.join("empty_known_hosts"), "").unwrap();
    // The login of `noisy` (host-a on a port of its own) prints on both streams before it runs
    // the command, as a chatty `.bashrc` does.
    let noisy_login = dir.join("noisy-login");
    std::fs::write(
        &noisy_login,
        "#!/bin/sh\necho login-noise-out\necho login-noise-err >&2\nexec /bin/sh -c \"$SSH_ORIGINAL_COMMAND\"\n",
    )
    .unwrap();
    std::fs::set_permissions(
        &noisy_login,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    // As root, sshd wants its privilege separation directory.
    let _ = std::fs::create_dir_all("/run/sshd");
    let user = nix::unistd::User::from_uid(nix::unistd::getuid())
        .unwrap()
        .unwrap()
        .name;
    let mut known = String::new();
    let mut config = String::new();
    let mut servers = Vec::new();
    for (name, address) in [("host-a", "127.0.0.2"), ("host-b", "127.0.0.3")] {
        let (sshd_config, port) =
            sshd_host(&dir, (name, address), &user, (&mut known, &mut config));
        servers.push((sshd_config, address, port));
    }
    let noisy_port = free_port("127.0.0.2");
    let mut a_config = std::fs::read_to_string(&servers[0].0).unwrap();
    let _ = write!(
        a_config,
        "Port {a}\nPort {noisy_port}\nMatch LocalPort {noisy_port}\n  ForceCommand {login}\n",
        a = servers[0].2,
        login = noisy_login.display()
    );
    std::fs::write(&servers[0].0, a_config).unwrap();
    let c = CutHost::prepare(&dir, &user, (&mut known, &mut config));
    let _ = CUT_HOST.set(Mutex::new(c));
    let a_port = servers[0].2;
    let _ = write!(
        config,
        "Host stranger\n  HostName 127.0.0.2\n  Port {a_port}\n  User {user}\n  UserKnownHostsFile {dir}/empty_known_hosts\n\nHost closed\n  HostName 127.0.0.2\n  Port {closed}\n  User {user}\n  UserKnownHostsFile {dir}/known_hosts\n\nHost nobody\n  HostName 127.0.0.2\n  Port {a_port}\n  User cairn-no-such-user\n  UserKnownHostsFile {dir}/known_hosts\n\nHost noisy\n  HostName 127.0.0.2\n  Port {noisy_port}\n  User {user}\n  UserKnownHostsFile {dir}/known_hosts\n  HostKeyAlias [127.0.0.2]:{a_port}\n\nHost *\n  IdentityFile {dir}/id\n  IdentitiesOnly yes\n  GlobalKnownHostsFile /dev/null\n",
        closed = free_port("127.0.0.2"),
        dir = dir.display()
    );
    std::fs::write(dir.join("known_hosts"), known).unwrap();
    std::fs::write(dir.join("config"), config).unwrap();
    // Each server is watched by a shell that ends it once the test binary is gone.
    let me = std::process::id();
    for (sshd_config, ..) in &servers {
        let mut watcher = Command::new("sh")
            .args([
                "-c",
                "/usr/sbin/sshd -D -e -f \"$1\" 2>/dev/null & s=$!; while kill -0 \"$2\" 2>/dev/null; do sleep 1; done; kill $s",
                "sh",
            ])
            .arg(sshd_config)
            .arg(me.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // Reaped by a thread of its own: it ends with the test binary.
        std::thread::spawn(move || watcher.wait());
    }
    for (_, address, port) in &servers {
        let started = Instant::now();
        while std::net::TcpStream::connect((*address, *port)).is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "sshd never listened"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    Hosts { dir }
}

impl Hosts {
    /// `cairn` in `sandbox` with this configuration.
    fn cairn(&self, sandbox: &Sandbox, args: &[&str]) -> std::process::Output {
        self.command(sandbox, args).output().unwrap()
    }

    /// `cairn` in `sandbox` with this configuration, to run.
    pub(crate) fn command(&self, sandbox: &Sandbox, args: &[&str]) -> Command {
        let mut command = sandbox.command(args);
        command.env("CAIRN_SSH_CONFIG", self.dir.join("config"));
        command
    }
}

fn wait_for_file(path: &Path) {
    let started = Instant::now();
    while !path.exists() {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "{} never appeared",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn pid_in(path: &Path) -> u32 {
    wait_for_file(path);
    let started = Instant::now();
    loop {
        if let Ok(pid) = std::fs::read_to_string(path).unwrap().trim().parse() {
            return pid;
        }
        assert!(started.elapsed() < Duration::from_secs(10));
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits (up to 30 s) until none of `pids` runs.
fn all_gone(pids: &[u32]) -> bool {
    let started = Instant::now();
    while pids.iter().any(|p| alive(*p)) {
        if started.elapsed() > Duration::from_secs(30) {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    true
}

const TWO_HOSTS: &str = r#"name: two-hosts
steps:
  - id: pick
    run: echo "target=host-b" >> "$CAIRN_OUTPUT"
  - id: on-a
    needs: [pick]
    on: host-a
    run: |
      echo "on a: $SSH_CONNECTION"
      set -- $SSH_CONNECTION
      echo "address=$3" >> "$CAIRN_OUTPUT"
  - id: on-b
    needs: [pick, on-a]
    on: "{{ steps.pick.outputs.target }}"
    run: |
      echo on b, after {{ steps.on-a.outputs.address }}: "$SSH_CONNECTION"
      set -- $SSH_CONNECTION
      echo "address=$3" >> "$CAIRN_OUTPUT"
  - id: back
    needs: [on-a, on-b]
    run: echo got {{ steps.on-a.outputs.address }} {{ steps.on-b.outputs.address }}
  - id: checked
    on: host-b
    check: |
      set -- $SSH_CONNECTION
      test "$3" = 127.0.0.3
    run: exit 1
hooks:
  on_success:
    - on: host-a
      run: echo hook on "$SSH_CONNECTION"
"#;

/// Steps on two hosts and one here pass outputs along; the logs hold each remote step's output,
/// `show --json` names each task's host.
#[test]
fn steps_on_two_hosts_and_here_pass_outputs_along() {
    let hosts = hosts();
    let sandbox = Sandbox::new();
    sandbox.write("plan.yaml", TWO_HOSTS);
    let out = hosts.cairn(&sandbox, &["run", "plan.yaml"]);
    assert_eq!(code(&out), Some(0), "{}", stderr(&out));
    let show = sandbox.show(1);
    assert_eq!(task(&show, "on-a")["host"], "host-a");
    assert_eq!(task(&show, "on-b")["host"], "host-b");
    assert!(task(&show, "pick")["host"].is_null());
    assert_eq!(task(&show, "on-a")["outputs"]["address"], "127.0.0.2");
    assert_eq!(task(&show, "on-b")["outputs"]["address"], "127.0.0.3");
    let logs = stdout(&hosts.cairn(&sandbox, &["logs", "1"]));
    assert!(logs.contains("on a: 127.0.0.1 "), "{logs}");
    assert!(logs.contains("on b, after 127.0.0.2: 127.0.0.1 "), "{logs}");
    assert!(logs.contains("got 127.0.0.2 127.0.0.3"), "{logs}");
    assert!(!logs.contains("cairn-remote"), "{logs}");
    // `check` runs where the step does, and so does a hook with `on`.
    assert_eq!(task(&show, "checked")["by_check"], true);
    assert_eq!(task(&show, "on_success[1]")["host"], "host-a");
    assert!(logs.contains("hook on 127.0.0.1 "), "{logs}");
    // Each step's directory on its host is gone once its end is recorded, the last one's too.
    let left = crate::support::adopt_left(show["uuid"].as_str().unwrap());
    assert!(left.is_empty(), "directories left: {left:?}");
}

/// An `on` that renders empty runs the step here, so that a param decides where a plan's steps
/// run: absent or blank, here; given, on that host.
#[test]
fn an_on_that_renders_empty_runs_the_step_here() {
    let hosts = hosts();
    let sandbox = Sandbox::new();
    sandbox.write(
        "plan.yaml",
        "name: either\nparams:\n  host: { type: string }\nsteps:\n  - id: where\n    on: \"{{ params.host | default('') }}\"\n    run: |\n      set -- ${SSH_CONNECTION:-here}\n      echo \"from=${3:-$1}\" >> \"$CAIRN_OUTPUT\"\n",
    );
    for (n, given, host, from) in [
        (1, None, None, "here"),
        (2, Some("host= "), None, "here"),
        (3, Some("host=host-b"), Some("host-b"), "127.0.0.3"),
    ] {
        let mut args = vec!["run", "plan.yaml"];
        args.extend(given.iter().flat_map(|g| ["-p", g]));
        let out = hosts.cairn(&sandbox, &args);
        assert_eq!(code(&out), Some(0), "{given:?}: {}", stderr(&out));
        let show = sandbox.show(n);
        let step = task(&show, "where");
        assert_eq!(step["outputs"]["from"], from, "{given:?}: {step}");
        match host {
            Some(host) => assert_eq!(step["host"], host, "{step}"),
            None => assert!(step["host"].is_null(), "{step}"),
        }
    }
}

fn slow_plan(dir: &Path, timeout: &str) -> String {
    format!(
        r"name: slow
steps:
  - id: slow
    on: host-a
    {timeout}
    run: |
      sleep 3600 &
      echo $! > {dir}/child.pid
      echo $$ > {dir}/leader.pid
      sleep 3601
",
        dir = dir.display()
    )
}

/// A step's `timeout` ends its whole process group on its host, a background child included.
#[test]
fn a_timeout_ends_the_remote_group() {
    let hosts = hosts();
    let sandbox = Sandbox::new();
    sandbox.write("plan.yaml", &slow_plan(sandbox.path(), "timeout: 3s"));
    let out = hosts.cairn(&sandbox, &["run", "plan.yaml"]);
    assert_eq!(code(&out), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("timed out after 3s"),
        "{}",
        stderr(&out)
    );
    let pids = [
        pid_in(&sandbox.path().join("leader.pid")),
        pid_in(&sandbox.path().join("child.pid")),
    ];
    assert!(all_gone(&pids), "the remote step's processes outlived it");
}

/// `cairn cancel` ends the remote group, a background child included.
#[test]
fn a_cancel_ends_the_remote_group() {
    let hosts = hosts();
    let sandbox = Sandbox::new();
    sandbox.write("plan.yaml", &slow_plan(sandbox.path(), ""));
    let mut run = hosts
        .command(&sandbox, &["run", "plan.yaml"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pids = [
        pid_in(&sandbox.path().join("leader.pid")),
        pid_in(&sandbox.path().join("child.pid")),
    ];
    // Recorded once the wrapper said where the step runs, which the step may precede.
    let started = Instant::now();
    loop {
        let status = stdout(&hosts.cairn(&sandbox, &["status"]));
        if status.contains("slow @host-a") {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "{status}");
        std::thread::sleep(Duration::from_millis(20));
    }
    let status = sandbox.json(&["status", "--json"]);
    assert_eq!(status[0]["current_tasks"][0]["host"], "host-a", "{status}");
    assert!(alive(pids[0]) && alive(pids[1]));
    let cancel = hosts.cairn(&sandbox, &["cancel", "1"]);
    assert_eq!(code(&cancel), Some(0), "{}", stderr(&cancel));
    run.wait().unwrap();
    assert!(
        all_gone(&pids),
        "the remote step's processes outlived the cancel"
    );
    assert_eq!(sandbox.show(1)["status"], "canceled");
}

const VALUE: &str =
    "a $(touch /tmp/cairn-remote-pwned) `touch /tmp/cairn-remote-pwned` ; 'q\" \n\tz";
const SECRET: &str = "remote-secret-5f1c9e2a";

/// Params with shell syntax arrive literally; a secret passes through the environment and is
/// never on a command line there or here, nor in the logs, events or database.
#[test]
fn values_arrive_literally_and_a_secret_is_never_shown() {
    let hosts = hosts();
    let sandbox = Sandbox::new();
    let dir = sandbox.path().display().to_string();
    sandbox.write(
        "plan.yaml",
        &format!(
            r#"name: values
params:
  v: {{ required: true }}
  pw: {{ secret: true, required: true }}
steps:
  - id: there
    on: host-a
    env: {{ PW: "{{{{ params.pw }}}}" }}
    run: |
      printf %s {{{{ params.v }}}} > {dir}/v.txt
      printf %s "$CAIRN_PARAM_V" > {dir}/env.txt
      printf %s "$PW" > {dir}/pw.txt
      echo ready; touch {dir}/ready
      while [ ! -f {dir}/go ]; do sleep 0.05; done
      echo "the secret: $PW"
"#
        ),
    );
    sandbox.write("v", VALUE);
    sandbox.write("pw", SECRET);
    let run = hosts
        .command(
            &sandbox,
            &["run", "plan.yaml", "-p", "v=@v", "-p", "pw=@pw"],
        )
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_file(&sandbox.path().join("ready"));
    let ps = Command::new("ps")
        .args(["-eww", "-o", "args"])
        .output()
        .unwrap();
    let ps = String::from_utf8_lossy(&ps.stdout);
    assert!(ps.contains("sleep 0.05") || ps.contains("sshd"), "{ps}");
    assert!(
        !ps.contains(SECRET),
        "the secret is on a command line:\n{ps}"
    );
    // Nor in a file of the step's directory there once the step started (its environment file
    // is removed once read): the host is this machine.
    let uuid = sandbox.show(1)["uuid"].as_str().unwrap().to_owned();
    let dirs = crate::support::adopt_left(&uuid);
    assert!(!dirs.is_empty(), "no directory of the step on the host");
    for dir in &dirs {
        let dir = std::env::temp_dir().join(dir);
        for file in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let text = std::fs::read(file.path()).unwrap_or_default();
            assert!(
                !String::from_utf8_lossy(&text).contains(SECRET),
                "the secret is in {}",
                file.path().display()
            );
        }
    }
    std::fs::write(sandbox.path().join("go"), "").unwrap();
    let out = run.wait_with_output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The value ends in a line break, which the file reading drops: `-p v=@v`.
    assert_eq!(sandbox.read("v.txt"), VALUE.trim_end_matches('\n'));
    assert_eq!(sandbox.read("env.txt"), VALUE.trim_end_matches('\n'));
    assert_eq!(sandbox.read("pw.txt"), SECRET);
    assert!(!Path::new("/tmp/cairn-remote-pwned").exists());
    let logs = stdout(&hosts.cairn(&sandbox, &["logs", "1"]));
    assert!(logs.contains("the secret: ****"), "{logs}");
    assert!(!logs.contains(SECRET), "{logs}");
    let show = sandbox.show(1);
    assert!(!show.to_string().contains(SECRET));
    sandbox.assert_not_stored(SECRET);
}

/// An unknown host key, a refused connection and a wrong user: the attempt fails with the host's
/// name and ssh's reason, exit 1, the op failed and resumable; retries apply, and no more.
#[test]
fn an_unreachable_host_fails_the_attempt_clearly() {
    let hosts = hosts();
    for (n, (host, said)) in [
        ("stranger", "known_hosts"),
        ("closed", "Connection refused"),
        ("nobody", "Permission denied"),
    ]
    .into_iter()
    .enumerate()
    {
        let sandbox = Sandbox::new();
        sandbox.write(
            "plan.yaml",
            &format!(
                "name: unreachable\nsteps:\n  - id: there\n    on: {host}\n    retry: {{ attempts: 2, delay: 1s }}\n    run: echo never\n"
            ),
        );
        let out = hosts.cairn(&sandbox, &["run", "plan.yaml"]);
        assert_eq!(code(&out), Some(1), "{host}: {}", stderr(&out));
        let error = format!("cannot connect to `{host}`");
        assert!(stderr(&out).contains(&error), "{host}: {}", stderr(&out));
        assert!(stderr(&out).contains(said), "{host}: {}", stderr(&out));
        let show = sandbox.show(1);
        assert_eq!(show["status"], "failed", "{n}");
        let there = task(&show, "there");
        assert_eq!(there["attempts"], 2, "{host}: {there}");
        assert!(there["error"].as_str().unwrap().contains(said), "{there}");
        // Resumable: the op is taken again, and fails the same way.
        let again = hosts.cairn(&sandbox, &["resume", "1"]);
        assert_eq!(code(&again), Some(1), "{host}: {}", stderr(&again));
        assert!(stderr(&again).contains(&error), "{}", stderr(&again));
    }
}

/// cairn killed while a remote step runs: the step goes on there; the resume's sweep ends it
/// over SSH (by pid, start time and boot id) before the step runs again, and nothing is left.
#[test]
fn a_resume_ends_what_a_killed_run_left_on_a_host() {
    let hosts = hosts();
    let sandbox = Sandbox::new();
    let dir = sandbox.path().display().to_string();
    sandbox.write(
        "plan.yaml",
        &format!(
            r"name: killed
steps:
  - id: slow
    on: host-a
    adopt: false
    run: |
      if [ -f {dir}/first ]; then echo second run; exit 0; fi
      touch {dir}/first
      sleep 3600 &
      echo $! > {dir}/child.pid
      echo $$ > {dir}/leader.pid
      sleep 3601
"
        ),
    );
    let mut run = hosts
        .command(&sandbox, &["run", "plan.yaml"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pids = [
        pid_in(&sandbox.path().join("leader.pid")),
        pid_in(&sandbox.path().join("child.pid")),
    ];
    // Recorded once the wrapper said where it runs: wait for the host in `show`.
    let started = Instant::now();
    while task(&sandbox.show(1), "slow")["history"][0]["host"] != "host-a" {
        assert!(started.elapsed() < Duration::from_secs(30));
        std::thread::sleep(Duration::from_millis(20));
    }
    run.kill().unwrap();
    run.wait().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        alive(pids[0]) && alive(pids[1]),
        "the remote step did not outlive cairn"
    );
    let out = hosts.cairn(&sandbox, &["resume", "1"]);
    assert_eq!(code(&out), Some(0), "{}", stderr(&out));
    assert!(all_gone(&pids), "the remote leftovers outlived the resume");
    let show = sandbox.show(1);
    assert_eq!(show["status"], "succeeded");
    assert_eq!(task(&show, "slow")["attempts"], 2);
    assert!(
        events(&show)
            .iter()
            .any(|(kind, _)| kind == "leftovers-ended"),
        "{:?}",
        events(&show)
    );
    let logs = stdout(&hosts.cairn(&sandbox, &["logs", "1"]));
    assert!(logs.contains("second run"), "{logs}");
}

/// A param too long for the environment reaches a step on another host in a file there, as it
/// reaches a local step.
#[test]
fn a_param_too_long_for_the_environment_reaches_the_host_in_a_file() {
    let hosts = hosts();
    let sandbox = Sandbox::new();
    let dir = sandbox.path().display().to_string();
    sandbox.write(
        "plan.yaml",
        &format!(
            "name: big\nparams:\n  big: {{ required: true }}\nsteps:\n  - id: there\n    on: host-b\n    run: cp \"$CAIRN_PARAM_BIG_FILE\" {dir}/got; printf %s \"$CAIRN_PARAM_BIG_FILE\" > {dir}/path\n"
        ),
    );
    let big: String = (0..200_000)
        .map(|i| if i % 80 == 79 { '\n' } else { 'x' })
        .collect();
    let big = format!("{big}'$(touch /tmp/cairn-remote-pwned)'end");
    sandbox.write("big", &big);
    let out = hosts.cairn(&sandbox, &["run", "plan.yaml", "-p", "big=@big"]);
    assert_eq!(code(&out), Some(0), "{}", stderr(&out));
    assert_eq!(sandbox.read("got"), big);
    assert!(!Path::new("/tmp/cairn-remote-pwned").exists());
    // A file of the step's directory there (removed with it), not cairn's local file.
    let path = sandbox.read("path");
    assert!(!path.ends_with("param-big"), "{path}");
    assert!(!Path::new(&path).exists(), "{path}");
}

/// `on` is checked like any template: a secret is refused there (it would be on `ssh`'s command
/// line), and a step that runs no process cannot have it; both named at their place, exit 2.
#[test]
fn validate_refuses_a_secret_in_on_and_on_without_a_process() {
    let sandbox = Sandbox::new();
    sandbox.write(
        "plan.yaml",
        "name: bad\nparams:\n  pw: { secret: true, default: x }\nsteps:\n  - id: a\n    on: \"{{ params.pw }}\"\n    run: \"true\"\n  - id: b\n    on: host-a\n    sleep: 1s\n",
    );
    let out = sandbox.cairn(&["validate", "plan.yaml"]);
    assert_eq!(code(&out), Some(2), "{}", stderr(&out));
    let said = stderr(&out);
    assert!(
        said.contains("`on` of step `a` inserts the secret param `pw`"),
        "{said}"
    );
    assert!(said.contains("plan.yaml:6:"), "{said}");
    assert!(
        said.contains("`on` names the host a process runs on; this step has no `run` or `exec`"),
        "{said}"
    );
    assert!(said.contains("plan.yaml:9:"), "{said}");
}

/// A chain over both hosts and here: each remote step notes its start, runs a while, then writes
/// its side effect and an output the next step uses.
fn chain_plan(dir: &Path) -> String {
    let mut plan = String::from("name: chain\nsteps:\n");
    let mut before: Option<String> = None;
    for (i, host) in ["host-a", "host-b", "host-a", "host-b"].iter().enumerate() {
        let id = format!("s{i}");
        let needs = before
            .as_ref()
            .map(|b| format!("    needs: [{b}]\n"))
            .unwrap_or_default();
        let got = before.as_ref().map_or_else(
            || "0".to_owned(),
            |b| format!("{{{{ steps.{b}.outputs.n }}}}"),
        );
        write!(
            plan,
            "  - id: {id}\n{needs}    on: {host}\n    outputs: [n]\n    run: |\n      echo $$ >> {dir}/{id}.starts\n      echo {id} begins\n      sleep 0.4\n      echo {id} ends\n      echo once >> {dir}/{id}.effects\n      echo \"n=$(( {got} + 1 ))\" >> \"$CAIRN_OUTPUT\"\n",
            dir = dir.display()
        )
        .unwrap();
        before = Some(id);
    }
    write!(
        plan,
        "  - id: here\n    needs: [s3]\n    run: echo {{{{ steps.s3.outputs.n }}}} > {}/last\n",
        dir.display()
    )
    .unwrap();
    plan
}

/// Processes whose command line names `text`.
fn processes_naming(text: &str) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| {
            alive(pid)
                && std::fs::read(format!("/proc/{pid}/cmdline"))
                    .is_ok_and(|c| String::from_utf8_lossy(&c).contains(text))
        })
        .collect()
}

/// Acceptance 2 of issue 19: `kill -9` of cairn at random moments of a plan whose steps run on
/// two hosts, 20 times (each on a new op), then `resume`: a step that finished while cairn was
/// dead is collected and one still running is attached to again, so no step runs twice and each
/// side effect happens once; nothing of the ops is left running on the hosts.
#[test]
fn kills_at_random_moments_across_hosts_never_run_a_step_twice() {
    let hosts = hosts();
    let sandbox = Sandbox::new();
    let mut seed = u64::from(std::process::id())
        ^ std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64;
    let mut adopted = 0;
    for round in 1..=20 {
        let dir = sandbox.path().join(format!("r{round}"));
        std::fs::create_dir(&dir).unwrap();
        sandbox.write("plan.yaml", &chain_plan(&dir));
        seed = seed
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        let after = Duration::from_millis(200 + (seed >> 33) % 2_800);
        let mut run = hosts
            .command(&sandbox, &["run", "plan.yaml"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(after);
        run.kill().unwrap();
        run.wait().unwrap();
        let op = sandbox.op_count();
        if op < round {
            // Killed before the op was stored: nothing to resume; the round runs it again.
            let out = hosts.cairn(&sandbox, &["run", "plan.yaml"]);
            assert_eq!(code(&out), Some(0), "{}", stderr(&out));
        } else {
            let out = hosts.cairn(&sandbox, &["resume", &round.to_string()]);
            assert!(
                matches!(code(&out), Some(0)),
                "round {round}, killed after {after:?}: {}",
                stderr(&out)
            );
        }
        let show = sandbox.show(i64::try_from(round).unwrap());
        assert_eq!(show["status"], "succeeded", "round {round}: {show:#}");
        adopted += events(&show).iter().filter(|(k, _)| k == "adopted").count();
        for i in 0..4 {
            let starts =
                std::fs::read_to_string(dir.join(format!("s{i}.starts"))).unwrap_or_default();
            assert_eq!(
                starts.lines().count(),
                1,
                "round {round} (killed after {after:?}): s{i} started {} times; {show:#}",
                starts.lines().count()
            );
            let effects =
                std::fs::read_to_string(dir.join(format!("s{i}.effects"))).unwrap_or_default();
            assert_eq!(effects, "once\n", "round {round}: s{i}");
        }
        assert_eq!(
            std::fs::read_to_string(dir.join("last")).unwrap().trim(),
            "4"
        );
        // Each line once: a reader taking a step again goes on from exactly what is in the log.
        let logs = stdout(&hosts.cairn(&sandbox, &["logs", &round.to_string()]));
        for i in 0..4 {
            for line in [format!("s{i} begins"), format!("s{i} ends")] {
                assert_eq!(logs.matches(&line).count(), 1, "round {round}: {logs}");
            }
        }
        // Nothing of the op runs on the hosts any more: no supervisor, no step, and no wrapper
        // of a killed run once its step ended (each notices within a poll).
        let uuid = show["uuid"].as_str().unwrap().to_owned();
        let started = Instant::now();
        loop {
            let left = processes_naming(&uuid);
            let dirs: Vec<_> = std::fs::read_dir(std::env::temp_dir())
                .unwrap()
                .filter_map(|e| e.ok()?.file_name().into_string().ok())
                .filter(|n| n.contains(&uuid))
                .collect();
            if left.is_empty() && dirs.is_empty() {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "round {round}: left running {left:?}, directories {dirs:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    // The kills landed while steps ran at least once (else this test proves nothing).
    assert!(adopted > 0, "no kill landed while a remote step ran");
}

/// `host-c` (127.0.0.4): a server of its own for the tests that cut connections, so that killing
/// it never disturbs the tests on `host-a` and `host-b`. Prepared with them (its host key, its
/// lines in `known_hosts` and the `ssh` configuration), started on first use ([`cut_host`]),
/// killed and started again on the same address, port and host key by the test that holds it.
struct CutHost {
    sshd_config: PathBuf,
    address: &'static str,
    port: u16,
    /// While it runs: the shell that watches it (it ends the server once the test binary is
    /// gone) and the server's pid.
    running: Option<(std::process::Child, u32)>,
}

static CUT_HOST: OnceLock<Mutex<CutHost>> = OnceLock::new();

/// `host-c`, running, held by the calling test until the guard is dropped (a test that failed
/// while it was down left it down: it is started again).
fn cut_host() -> MutexGuard<'static, CutHost> {
    hosts();
    let mut host = CUT_HOST
        .get()
        .expect("prepared with the other hosts")
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if host.running.is_none() {
        host.start();
    }
    host
}

impl CutHost {
    const NAME: &'static str = "host-c";

    /// Its host key and `sshd` configuration in `dir`, as `start_hosts` makes the others', its
    /// key added to `known` and its alias to `config`.
    fn prepare(dir: &Path, user: &str, (known, config): (&mut String, &mut String)) -> Self {
        let address = "127.0.0.4";
        let (sshd_config, port) = sshd_host(dir, (Self::NAME, address), user, (known, config));
        Self {
            sshd_config,
            address,
            port,
            running: None,
        }
    }

    /// Starts the server, watched as the others are, and waits until it listens.
    fn start(&mut self) {
        assert!(self.running.is_none(), "host-c already runs");
        let mut watcher = Command::new("sh")
            .args([
                "-c",
                "/usr/sbin/sshd -D -e -f \"$1\" >/dev/null 2>&1 & s=$!; echo $s; while kill -0 \"$2\" 2>/dev/null; do sleep 1; done; kill $s",
                "sh",
            ])
            .arg(&self.sshd_config)
            .arg(std::process::id().to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(watcher.stdout.take().unwrap()),
            &mut line,
        )
        .unwrap();
        let pid: u32 = line.trim().parse().unwrap();
        let started = Instant::now();
        while std::net::TcpStream::connect((self.address, self.port)).is_err() {
            assert!(alive(pid), "sshd of host-c exited (port {})", self.port);
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "sshd of host-c never listened"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        self.running = Some((watcher, pid));
    }

    /// Kills the server and every `sshd` process serving its connections, with SIGKILL: the
    /// connections drop at once, as when a host dies. Only `sshd` processes: what they started
    /// (a step runs in a session of its own) lives on. Returns how many were killed.
    fn kill(&mut self) -> usize {
        use nix::sys::signal::{Signal, kill};
        let (mut watcher, listener) = self.running.take().expect("host-c runs");
        // The watcher first: it would signal the server's pid later, by then maybe another's.
        let _ = watcher.kill();
        let _ = watcher.wait();
        // Stopped, then looked for again with their children until none is new (one forking
        // meanwhile cannot escape), then killed.
        let mut stopped: Vec<u32> = Vec::new();
        loop {
            let new: Vec<u32> = sshd_tree(listener)
                .into_iter()
                .filter(|p| !stopped.contains(p))
                .collect();
            if new.is_empty() {
                break;
            }
            for pid in new {
                let _ = kill(
                    nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap()),
                    Signal::SIGSTOP,
                );
                stopped.push(pid);
            }
        }
        for pid in &stopped {
            let _ = kill(
                nix::unistd::Pid::from_raw(i32::try_from(*pid).unwrap()),
                Signal::SIGKILL,
            );
        }
        assert!(all_gone(&stopped), "sshd of host-c outlived SIGKILL");
        assert!(
            std::net::TcpStream::connect((self.address, self.port)).is_err(),
            "host-c still answers"
        );
        stopped.len()
    }
}

/// `root` and its descendants through `sshd` processes (the server, the processes serving its
/// connections), if `root` is one: those whose command is `sshd` (or `sshd-session`, `sshd-auth`).
fn sshd_tree(root: u32) -> Vec<u32> {
    let mut stats: Vec<(u32, u32, String)> = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().filter_map(Result::ok) {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // `PID (COMM) STATE PPID ...`: the command may hold blanks and parentheses.
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let comm = stat[open + 1..close].to_owned();
        let mut rest = stat[close + 1..].split_whitespace();
        let (state, ppid) = (rest.next(), rest.next().and_then(|p| p.parse().ok()));
        if let (Some(state), Some(ppid)) = (state, ppid)
            && state != "Z"
            && state != "X"
        {
            stats.push((pid, ppid, comm));
        }
    }
    let sshd = |pid: u32| {
        stats
            .iter()
            .any(|(p, _, comm)| *p == pid && comm.starts_with("sshd"))
    };
    if !sshd(root) {
        return Vec::new();
    }
    let mut tree = vec![root];
    let mut i = 0;
    while i < tree.len() {
        let parent = tree[i];
        for (pid, ppid, comm) in &stats {
            if *ppid == parent && comm.starts_with("sshd") && !tree.contains(pid) {
                tree.push(*pid);
            }
        }
        i += 1;
    }
    tree
}

/// Waits (up to 30 s) until nothing of op `uuid` is left on this machine (which the test hosts
/// are): no process naming it (a supervisor, a wrapper) and no directory in `$TMPDIR`.
fn nothing_left_of(uuid: &str) {
    let started = Instant::now();
    loop {
        let left = processes_naming(uuid);
        let dirs: Vec<_> = std::fs::read_dir(std::env::temp_dir())
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| n.contains(uuid))
            .collect();
        if left.is_empty() && dirs.is_empty() {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "left running {left:?}, directories {dirs:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// What op 1 of `sandbox` printed on `stream` (`stdout` or `stderr`), from `logs --json`: the
/// text of its lines, one after the other (`--json` does not say where a line that arrived in
/// pieces was cut, so none is told from the next).
fn stream_text(hosts: &Hosts, sandbox: &Sandbox, stream: &str) -> String {
    let out = hosts.cairn(sandbox, &["logs", "1", "--json"]);
    assert_eq!(code(&out), Some(0), "{}", stderr(&out));
    let mut text = String::new();
    for line in stdout(&out).lines() {
        let piece: serde_json::Value = serde_json::from_str(line).unwrap();
        if piece["stream"] == stream {
            text.push_str(piece["text"].as_str().unwrap());
        }
    }
    text
}

/// Acceptance 3 of issue 19: the connection cut while a remote step runs (its host's `sshd`
/// killed, every process of it), then the host back: the step's process outlives the cut and
/// goes on writing; cairn attaches again once the host answers, streams what the step wrote
/// meanwhile and after, and records its result: one attempt, its side effect once, each line
/// of its output once in the logs, its output passed on to a later step.
#[test]
fn a_cut_connection_is_attached_again_when_the_host_is_back() {
    let mut host = cut_host();
    let hosts = hosts();
    let sandbox = Sandbox::new();
    let dir = sandbox.path().display().to_string();
    sandbox.write(
        "plan.yaml",
        &format!(
            r#"name: cut
steps:
  - id: long
    on: host-c
    timeout: 10m
    outputs: [k]
    run: |
      echo $$ >> {dir}/starts
      echo before the cut
      echo an error before >&2
      touch {dir}/ready
      while [ ! -f {dir}/cut ]; do sleep 0.05; done
      echo while the host is down
      echo an error during >&2
      touch {dir}/written
      while [ ! -f {dir}/back ]; do sleep 0.05; done
      echo after the host is back
      echo once >> {dir}/effects
      echo "k=v-$$" >> "$CAIRN_OUTPUT"
  - id: here
    needs: [long]
    run: echo got {{{{ steps.long.outputs.k }}}} > {dir}/got
"#
        ),
    );
    let run = hosts
        .command(&sandbox, &["run", "plan.yaml"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = pid_in(&sandbox.path().join("starts"));
    wait_for_file(&sandbox.path().join("ready"));
    let logs = || stdout(&hosts.cairn(&sandbox, &["logs", "1"]));
    // What the step wrote to stderr is recorded before the cut (the rest after it goes on from
    // there).
    wait_until("the step's first error in the logs", || {
        logs().contains("an error before")
    });
    // The server and the processes serving cairn's connections (its master's, the step's).
    assert!(host.kill() > 1, "no connection of cairn's was cut");
    std::thread::sleep(Duration::from_millis(300));
    assert!(alive(pid), "the step did not outlive the cut");
    std::fs::write(sandbox.path().join("cut"), "").unwrap();
    // The step goes on writing while its host cannot be reached, and cairn tries again.
    wait_for_file(&sandbox.path().join("written"));
    std::thread::sleep(Duration::from_secs(1));
    assert!(alive(pid), "the step did not outlive the cut");
    assert!(!logs().contains("an error during"), "{}", logs());
    host.start();
    // Attached again while the step runs: what it wrote while its host was down streams in
    // (its stderr; the last bytes of its stdout may be held until more comes).
    wait_until(
        "the step's error written during the cut in the logs",
        || logs().contains("an error during"),
    );
    std::fs::write(sandbox.path().join("back"), "").unwrap();
    let out = run.wait_with_output().unwrap();
    let said = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(0), "{said}");
    let show = sandbox.show(1);
    assert_eq!(show["status"], "succeeded", "{show:#}");
    let long = task(&show, "long");
    assert_eq!(long["attempts"], 1, "{long}");
    assert_eq!(long["history"].as_array().unwrap().len(), 1, "{long}");
    assert_eq!(sandbox.read("starts").lines().count(), 1);
    assert_eq!(sandbox.read("effects"), "once\n");
    assert_eq!(sandbox.read("got"), format!("got v-{pid}\n"));
    // Each line once, in order, on its stream (`logs` interleaves the streams as the output
    // arrived, which may split a line).
    let logs = logs();
    assert_eq!(
        stream_text(hosts, &sandbox, "stdout"),
        [
            "before the cut",
            "while the host is down",
            "after the host is back"
        ]
        .concat(),
        "{logs}"
    );
    assert_eq!(
        stream_text(hosts, &sandbox, "stderr"),
        ["an error before", "an error during"].concat(),
        "{logs}"
    );
    nothing_left_of(show["uuid"].as_str().unwrap());
}

/// The cut too long: the host down past the step's `timeout` fails the attempt, and the op
/// (exit 1), with an error naming the host; the step's process, out of reach, lives on. Once
/// the host is back, the op's `cancel` ends it there and removes its directory: nothing is left.
#[test]
fn a_host_down_past_the_timeout_fails_the_attempt_then_a_cancel_ends_it() {
    host_down_past_the_timeout("cancel");
}

/// The same, then `resume`: what the first attempt left there is ended before the step runs
/// again (its second run sees the first one gone), and the op succeeds.
#[test]
fn a_host_down_past_the_timeout_fails_the_attempt_then_a_resume_ends_it() {
    host_down_past_the_timeout("resume");
}

/// A step on `host-c` cut off (sshd killed) until past its timeout; then, the host back,
/// `then` (`cancel` or `resume`).
fn host_down_past_the_timeout(then: &str) {
    let mut host = cut_host();
    let hosts = hosts();
    let sandbox = Sandbox::new();
    let (run, pids) = run_and_cut(&mut host, hosts, &sandbox, "timeout: 5s");
    let out = run.wait_with_output().unwrap();
    let said = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert!(said.contains("lost the connection to `host-c`"), "{said}");
    let show = sandbox.show(1);
    assert_eq!(show["status"], "failed", "{show:#}");
    let long = task(&show, "long");
    assert_eq!(long["attempts"], 1, "{long}");
    assert!(
        long["error"].as_str().unwrap().contains("`host-c`"),
        "{long}"
    );
    // Out of reach, the step could not be ended.
    assert!(
        pids.iter().all(|p| alive(*p)),
        "the step did not outlive the cut"
    );
    host.start();
    let out = hosts.cairn(&sandbox, &[then, "1"]);
    assert_eq!(code(&out), Some(0), "{then}: {}", stderr(&out));
    assert!(all_gone(&pids), "the step outlived the {then}");
    let show = sandbox.show(1);
    if then == "resume" {
        assert_eq!(show["status"], "succeeded", "{show:#}");
        assert_eq!(task(&show, "long")["attempts"], 2);
        assert_eq!(sandbox.read("first-seen"), "gone\n");
    } else {
        assert_eq!(show["status"], "canceled", "{show:#}");
        assert!(!sandbox.path().join("first-seen").exists());
    }
    assert!(
        events(&show)
            .iter()
            .any(|(kind, said)| kind == "leftovers-ended" && said.contains("`host-c`")),
        "{:?}",
        events(&show)
    );
    nothing_left_of(show["uuid"].as_str().unwrap());
}

/// The cut too long, and the step retried: once the host is back, its second attempt first ends
/// what the first one left running there (out of reach when it failed), so the step never runs
/// beside itself.
#[test]
fn a_retry_after_a_host_was_down_ends_the_attempt_it_left_there_first() {
    let mut host = cut_host();
    let hosts = hosts();
    let sandbox = Sandbox::new();
    let retried = "timeout: 5s\n    retry: { attempts: 2, delay: 5s }";
    let (run, pids) = run_and_cut(&mut host, hosts, &sandbox, retried);
    // The host comes back while the retry waits: once the first attempt failed.
    let started = Instant::now();
    while !sandbox.show(1)["events"]
        .as_array()
        .unwrap()
        .iter()
        .any(|e| {
            e["kind"] == "task-failed" || e["message"].as_str().is_some_and(|m| m.contains("retry"))
        })
    {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the first attempt never failed"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        pids.iter().all(|p| alive(*p)),
        "the step did not outlive the cut"
    );
    host.start();
    let out = run.wait_with_output().unwrap();
    let said = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(0), "{said}");
    let show = sandbox.show(1);
    assert_eq!(task(&show, "long")["attempts"], 2, "{show:#}");
    assert_eq!(
        sandbox.read("first-seen"),
        "gone\n",
        "the second attempt ran beside the first"
    );
    assert!(all_gone(&pids));
    assert!(
        events(&show)
            .iter()
            .any(|(kind, said)| kind == "leftovers-ended"
                && said.contains("before the step runs again")),
        "{:?}",
        events(&show)
    );
    nothing_left_of(show["uuid"].as_str().unwrap());
}

/// Runs a step on `host-c` with `settings` (its `timeout`, ...) that starts a background child and
/// waits; once it runs, cuts the host off. A later run of the step writes `first-seen`: whether
/// the first one's process was `gone` or still `running` then. The run and the first's pids.
fn run_and_cut(
    host: &mut CutHost,
    hosts: &Hosts,
    sandbox: &Sandbox,
    settings: &str,
) -> (std::process::Child, [u32; 2]) {
    let dir = sandbox.path().display().to_string();
    sandbox.write(
        "plan.yaml",
        &format!(
            r"name: cut-too-long
steps:
  - id: long
    on: host-c
    {settings}
    run: |
      if [ -f {dir}/step.pid ]; then
        state=$(sed 's/.*) //' /proc/$(cat {dir}/step.pid)/stat 2>/dev/null | cut -c1) || state=
        case $state in ''|Z|X) echo gone ;; *) echo running ;; esac > {dir}/first-seen
        echo second run
        exit 0
      fi
      echo $$ > {dir}/step.pid
      sleep 120 &
      echo $! > {dir}/child.pid
      echo before the cut
      touch {dir}/ready
      wait
"
        ),
    );
    let run = hosts
        .command(sandbox, &["run", "plan.yaml"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pids = [
        pid_in(&sandbox.path().join("step.pid")),
        pid_in(&sandbox.path().join("child.pid")),
    ];
    wait_for_file(&sandbox.path().join("ready"));
    assert!(host.kill() > 1, "no connection of cairn's was cut");
    (run, pids)
}

/// A login that prints on both streams (a chatty `.bashrc`) is not the step's output: it is
/// neither in the log nor counted where a resume goes on from, so after a `kill -9` of cairn
/// and a resume each line of the step is in the log once.
#[test]
fn a_chatty_login_is_not_in_the_log_and_a_resume_goes_on_from_the_right_place() {
    let hosts = hosts();
    let sandbox = Sandbox::new();
    let dir = sandbox.path().display().to_string();
    sandbox.write(
        "plan.yaml",
        &format!(
            "name: chatty\nsteps:\n  - id: talk\n    on: noisy\n    run: |\n      echo first out\n      echo first err >&2\n      touch {dir}/started\n      while [ ! -f {dir}/go ]; do sleep 0.05; done\n      echo second out\n      echo second err >&2\n"
        ),
    );
    let mut run = hosts
        .command(&sandbox, &["run", "plan.yaml"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for_file(&sandbox.path().join("started"));
    let started = Instant::now();
    loop {
        let logs = stdout(&hosts.cairn(&sandbox, &["logs", "1"]));
        if logs.contains("first out") && logs.contains("first err") {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "{logs}");
        std::thread::sleep(Duration::from_millis(50));
    }
    run.kill().unwrap();
    run.wait().unwrap();
    sandbox.write("go", "");
    let out = hosts.cairn(&sandbox, &["resume", "1"]);
    assert_eq!(code(&out), Some(0), "{}", stderr(&out));
    let logs = stdout(&hosts.cairn(&sandbox, &["logs", "1"]));
    for line in ["first out", "first err", "second out", "second err"] {
        assert_eq!(logs.matches(line).count(), 1, "{line}: {logs}");
    }
    assert!(!logs.contains("login-noise"), "{logs}");
    assert_eq!(task(&sandbox.show(1), "talk")["attempts"], 1);
}
