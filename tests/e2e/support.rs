//! A small builder around the `cairn` binary.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The workspace root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// `cairn` with `args`, run in `dir`, colour off.
pub fn cairn_in(dir: &Path, args: &[&str]) -> Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_cairn"))
        .args(args)
        .current_dir(dir)
        .env("NO_COLOR", "1")
        .env_remove("CAIRN_COLOR")
        .output()
        .expect("cairn runs")
}

pub fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

pub fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// A scratch directory with a database, where plans are written and `cairn` runs.
pub struct Sandbox {
    dir: tempfile::TempDir,
}

impl Sandbox {
    pub fn new() -> Self {
        Self {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.path().join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    pub fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_cairn"));
        command
            .args(args)
            .current_dir(self.path())
            .env("CAIRN_DB", self.path().join("cairn.db"))
            .env("NO_COLOR", "1")
            .env_remove("CAIRN_SECRET_KEY");
        command
    }

    pub fn cairn(&self, args: &[&str]) -> Output {
        self.command(args).output().unwrap()
    }

    pub fn spawn(&self, args: &[&str]) -> Child {
        self.command(args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    }

    pub fn json(&self, args: &[&str]) -> Value {
        let out = self.cairn(args);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// How many ops the database holds.
    pub fn op_count(&self) -> usize {
        self.json(&["status", "--json", "--all"])
            .as_array()
            .map_or(0, Vec::len)
    }

    pub fn show(&self, op: i64) -> Value {
        self.json(&["show", &op.to_string(), "--json"])
    }

    pub fn read(&self, name: &str) -> String {
        std::fs::read_to_string(self.path().join(name)).unwrap_or_default()
    }

    /// Waits until `name` exists (a step wrote it), up to `limit`.
    /// Waits until the database exists and reads (a run makes it as it starts).
    pub fn wait_for_db(&self) {
        let started = Instant::now();
        while self.cairn(&["status"]).status.code() != Some(0) {
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "the database never appeared"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn wait_for(&self, name: &str, limit: Duration) {
        let started = Instant::now();
        while !self.path().join(name).exists() {
            assert!(started.elapsed() < limit, "{name} never appeared");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

pub fn code(out: &Output) -> Option<i32> {
    out.status.code()
}

/// Whether a process runs (a zombie, dead but not yet reaped, does not).
pub fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit(')')
                .next()
                .map(|r| r.split_whitespace().next().unwrap_or("").to_owned())
        })
        .is_some_and(|state| state != "Z" && state != "X")
}

/// Running processes of an op's steps: they carry `CAIRN_ATTEMPT_ID=<op uuid>/...`.
pub fn step_processes(uuid: &str) -> Vec<u32> {
    let wanted = format!("CAIRN_ATTEMPT_ID={uuid}/");
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| {
            alive(pid)
                && std::fs::read(format!("/proc/{pid}/environ")).is_ok_and(|env| {
                    env.split(|b| *b == 0)
                        .any(|v| v.starts_with(wanted.as_bytes()))
                })
        })
        .collect()
}

pub fn task<'a>(show: &'a Value, id: &str) -> &'a Value {
    show["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["id"] == id)
        .unwrap_or_else(|| panic!("no task {id}"))
}

/// An op's events (from `show --json`) as (kind, message).
pub fn events(show: &Value) -> Vec<(String, String)> {
    show["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["kind"].as_str().unwrap().to_owned(),
                e["message"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

/// Asserts that none of the database's files holds `secret` in clear.
pub fn assert_not_stored(dir: &Path, secret: &str) {
    for file in ["cairn.db", "cairn.db-wal"] {
        let bytes = std::fs::read(dir.join(file)).unwrap_or_default();
        assert!(
            !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
            "{file} holds the secret in clear"
        );
    }
}

/// Sends `signal` to a child process.
pub fn signal(child: &Child, signal: nix::sys::signal::Signal) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap()),
        signal,
    )
    .unwrap();
}
