//! `remote`: a step on another host costs little more than the SSH round trip it needs. 200
//! sequential `run: "true"` steps with `on: host-a`, an sshd this benchmark starts on 127.0.0.2
//! with keys of its own, against `ssh host-a true` run as many times one after another over one
//! multiplexed connection (a `ControlMaster`, as cairn keeps one per host and run), in the same
//! rounds.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{Bench, Row, Target, op_rate, write_chain};

/// The address the test host listens on: loopback, never another machine.
const ADDRESS: &str = "127.0.0.2";

impl Bench {
    pub(crate) fn remote(&mut self) {
        let n = self.n(200);
        let host = Host::start(&self.fresh("remote-host"));
        let (value, limit) = self.paired(
            |_| host.ssh_rate(n),
            |bench| {
                let dir = bench.fresh("remote");
                write_chain(&dir, "name: remote\n", n, "on: host-a\n    run: \"true\"");
                let started = Instant::now();
                let out = bench
                    .cairn(&dir, &["-q", "run", "plan.yaml"])
                    .env("CAIRN_SSH_CONFIG", host.dir.join("config"))
                    .output()
                    .unwrap();
                assert!(
                    out.status.success(),
                    "cairn run failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
                op_rate(&dir, n, started.elapsed())
            },
        );
        self.rows.push(Row {
            id: "remote",
            what: format!("{n} sequential `run: \"true\"` steps with `on:` another host"),
            value,
            unit: "steps/s",
            rate: true,
            limit,
            limit_what: "`ssh HOST true`/s over one multiplexed connection".to_owned(),
            target: Target::Ratio(0.70),
            peer: None,
        });
    }
}

/// An sshd on [`ADDRESS`] with its own host key, and the `ssh` configuration that reaches it as
/// `host-a`; ended when dropped.
struct Host {
    dir: PathBuf,
    sshd: Child,
}

impl Drop for Host {
    fn drop(&mut self) {
        let _ = self.sshd.kill();
        let _ = self.sshd.wait();
    }
}

fn keygen(path: &Path) {
    let made = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "cairn-bench", "-f"])
        .arg(path)
        .status()
        .expect("ssh-keygen runs (the openssh-client package)");
    assert!(made.success());
}

impl Host {
    fn start(dir: &Path) -> Self {
        assert!(
            Path::new("/usr/sbin/sshd").exists(),
            "no /usr/sbin/sshd: install the `openssh-server` package"
        );
        keygen(&dir.join("id"));
        keygen(&dir.join("host_key"));
        std::fs::copy(dir.join("id.pub"), dir.join("authorized_keys")).unwrap();
        // As root, sshd wants its privilege separation directory.
        let _ = std::fs::create_dir_all("/run/sshd");
        let port = std::net::TcpListener::bind((ADDRESS, 0))
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let d = dir.display();
        std::fs::write(
            dir.join("sshd_config"),
            format!(
                "Port {port}\nListenAddress {ADDRESS}\nHostKey {d}/host_key\nPidFile {d}/sshd.pid\nAuthorizedKeysFile {d}/authorized_keys\nPasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\nPermitRootLogin prohibit-password\nMaxStartups 100\nMaxSessions 100\n"
            ),
        )
        .unwrap();
        let public = std::fs::read_to_string(dir.join("host_key.pub")).unwrap();
        std::fs::write(
            dir.join("known_hosts"),
            format!("[{ADDRESS}]:{port} {public}"),
        )
        .unwrap();
        let user = std::env::var("USER")
            .ok()
            .or_else(|| {
                let out = Command::new("id").arg("-un").output().ok()?;
                Some(String::from_utf8_lossy(&out.stdout).trim().to_owned())
            })
            .unwrap();
        let mut config = String::new();
        let _ = write!(
            config,
            "Host host-a\n  HostName {ADDRESS}\n  Port {port}\n  User {user}\n  UserKnownHostsFile {d}/known_hosts\n  IdentityFile {d}/id\n  IdentitiesOnly yes\n  GlobalKnownHostsFile /dev/null\n"
        );
        std::fs::write(dir.join("config"), config).unwrap();
        let sshd = Command::new("/usr/sbin/sshd")
            .args(["-D", "-e", "-f"])
            .arg(dir.join("sshd_config"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let started = Instant::now();
        while std::net::TcpStream::connect((ADDRESS, port)).is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "sshd never listened"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Self {
            dir: dir.to_owned(),
            sshd,
        }
    }

    /// `ssh host-a true`, `n` times one after another over one master connection: per second.
    fn ssh_rate(&self, n: usize) -> f64 {
        let socket = self.dir.join("master");
        let ssh = || {
            let mut ssh = Command::new("ssh");
            ssh.arg("-F")
                .arg(self.dir.join("config"))
                .args([
                    "-o",
                    "BatchMode=yes",
                    "-o",
                    "StrictHostKeyChecking=yes",
                    "-S",
                ])
                .arg(&socket);
            ssh
        };
        let master = ssh().args(["-M", "-f", "-N", "host-a"]).status().unwrap();
        assert!(master.success(), "no master connection to host-a");
        let started = Instant::now();
        for _ in 0..n {
            let out = ssh().args(["host-a", "true"]).output().unwrap();
            assert!(
                out.status.success(),
                "ssh host-a true: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let rate = f64::from(u32::try_from(n).unwrap()) / started.elapsed().as_secs_f64();
        let _ = ssh().args(["-O", "exit", "host-a"]).output();
        rate
    }
}
