//! What `/proc` says about processes: who we are, whether a recorded process still lives (safe
//! against pid reuse and reboots), which processes belong to a step's group or carry its marker,
//! and how to end them all.

use std::path::Path;
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// The environment variable that marks every process of an attempt: `<op uuid>/<task>/<attempt>`.
/// It finds an attempt's leftovers even when its pid was never recorded (a crash right after spawn).
pub const MARKER_VAR: &str = "CAIRN_ATTEMPT_ID";

/// A process, identified so that the identity outlives pid reuse and reboots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub host: String,
    /// `<boot id>/<pid namespace inode>`.
    pub boot_id: String,
    pub pid: u32,
    /// Start time, clock ticks since boot (`/proc/PID/stat` field 22).
    pub start: u64,
}

/// The parts of `/proc/PID/stat` cairn uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stat {
    pub state: char,
    pub pgrp: u32,
    pub start: u64,
}

impl Stat {
    /// A zombie or dead process: it runs no code any more.
    #[must_use]
    pub fn is_gone(self) -> bool {
        matches!(self.state, 'Z' | 'X' | 'x')
    }
}

/// Reads `/proc/PID/stat`.
#[must_use]
pub fn stat(pid: u32) -> Option<Stat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // `comm` is in parentheses and may hold spaces and parentheses: split after the last `)`.
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    Some(Stat {
        state: fields.first()?.chars().next()?,
        pgrp: fields.get(2)?.parse().ok()?,
        start: fields.get(19)?.parse().ok()?,
    })
}

/// This machine's boot and pid namespace: pids are comparable only within both.
#[must_use]
pub fn boot_id() -> String {
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default();
    let ns = std::fs::read_link("/proc/self/ns/pid")
        .map(|p| {
            p.to_string_lossy()
                .trim_start_matches("pid:")
                .trim_matches(['[', ']'])
                .to_owned()
        })
        .unwrap_or_default();
    format!("{boot}/{ns}")
}

#[must_use]
pub fn hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "localhost".to_owned())
}

/// The name of the user running this process (for the audit trail), or `uid N`.
#[must_use]
pub fn user_name() -> String {
    let uid = nix::unistd::getuid();
    nix::unistd::User::from_uid(uid)
        .ok()
        .flatten()
        .map_or_else(|| format!("uid {uid}"), |u| u.name)
}

/// The identity of the calling process.
#[must_use]
pub fn me() -> Identity {
    let pid = std::process::id();
    Identity {
        host: hostname(),
        boot_id: boot_id(),
        pid,
        start: stat(pid).map_or(0, |s| s.start),
    }
}

/// Whether a recorded process still runs, as far as this machine can tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Liveness {
    Alive,
    Dead,
    /// Another pid namespace on this boot, or another machine: only a lease can tell.
    Unknown,
}

/// Decides whether `id` still lives. Another boot means dead; within this boot and pid namespace,
/// the pid and its start time decide (a zombie is dead); elsewhere it cannot be known here.
#[must_use]
pub fn liveness(id: &Identity) -> Liveness {
    let here = boot_id();
    if id.boot_id != here {
        let same_boot = id.boot_id.split('/').next() == here.split('/').next();
        return if same_boot {
            Liveness::Unknown
        } else {
            Liveness::Dead
        };
    }
    match stat(id.pid) {
        Some(s) if s.start == id.start && !s.is_gone() => Liveness::Alive,
        _ => Liveness::Dead,
    }
}

fn all_pids() -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect()
}

/// Whether the process's environment holds `CAIRN_ATTEMPT_ID=marker`.
fn carries(pid: u32, marker: &str) -> bool {
    let Ok(environ) = std::fs::read(Path::new("/proc").join(pid.to_string()).join("environ"))
    else {
        return false;
    };
    let wanted = format!("{MARKER_VAR}={marker}");
    environ
        .split(|b| *b == 0)
        .any(|entry| entry == wanted.as_bytes())
}

/// The running processes that belong to an attempt: members of its process group `pgid` that are
/// provably its own (the leader still has its recorded start time, or the member carries the
/// marker, or started no earlier than the leader), plus any process carrying the marker.
#[must_use]
pub fn attempt_processes(pgid: Option<u32>, leader_start: Option<u64>, marker: &str) -> Vec<u32> {
    let me = std::process::id();
    let leader_is_ours = pgid
        .zip(leader_start)
        .is_some_and(|(p, start)| stat(p).is_some_and(|s| s.start == start));
    let leader_replaced = pgid.is_some_and(|p| stat(p).is_some()) && !leader_is_ours;
    let mut out = Vec::new();
    for pid in all_pids() {
        if pid == me {
            continue;
        }
        let Some(s) = stat(pid) else { continue };
        if s.is_gone() {
            continue;
        }
        let in_group = pgid.is_some_and(|g| s.pgrp == g)
            && !leader_replaced
            && (leader_is_ours
                || leader_start.is_some_and(|l| s.start >= l)
                || carries(pid, marker));
        if in_group || carries(pid, marker) {
            out.push(pid);
        }
    }
    out
}

fn signal_all(pids: &[u32], signal: Signal) {
    for &pid in pids {
        if let Ok(pid) = i32::try_from(pid) {
            let _ = kill(Pid::from_raw(pid), signal);
        }
    }
}

/// Ends every process `find` returns: TERM (and CONT, so a stopped process can act on it), up to
/// `grace` for them to exit, then KILL. Returns how many processes it found at first.
pub async fn terminate(find: impl Fn() -> Vec<u32>, grace: Duration) -> usize {
    let first = find();
    if first.is_empty() {
        return 0;
    }
    signal_all(&first, Signal::SIGTERM);
    signal_all(&first, Signal::SIGCONT);
    let deadline = tokio::time::Instant::now() + grace;
    loop {
        let left = find();
        if left.is_empty() {
            return first.len();
        }
        if tokio::time::Instant::now() >= deadline {
            signal_all(&left, Signal::SIGKILL);
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    // KILL cannot be ignored; wait (bounded) until the kernel has them gone.
    for _ in 0..200 {
        let left = find();
        if left.is_empty() {
            break;
        }
        signal_all(&left, Signal::SIGKILL);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    first.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn i_am_alive_and_a_recycled_start_time_is_not_me() {
        let me = me();
        assert_eq!(liveness(&me), Liveness::Alive);
        assert_eq!(
            liveness(&Identity {
                start: me.start + 1,
                ..me.clone()
            }),
            Liveness::Dead
        );
        assert_eq!(
            liveness(&Identity {
                boot_id: "other-boot/1".into(),
                ..me.clone()
            }),
            Liveness::Dead
        );
        let other_ns = format!("{}/0", me.boot_id.split('/').next().unwrap());
        assert_eq!(
            liveness(&Identity {
                boot_id: other_ns,
                ..me
            }),
            Liveness::Unknown
        );
    }

    #[test]
    fn stat_reads_names_with_parentheses_and_spaces() {
        let s = stat(std::process::id()).unwrap();
        assert!(!s.is_gone());
        assert!(s.start > 0);
    }
}
