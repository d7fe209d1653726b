//! What `/proc` says about processes: who we are, whether a recorded process still lives (safe
//! against pid reuse and reboots), which processes belong to a step's group or carry its marker,
//! and how to end them all.

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
    pub ppid: u32,
    pub pgrp: u32,
    pub start: u64,
}

impl Stat {
    /// A zombie or dead process: it runs no code any more.
    #[must_use]
    pub fn is_gone(self) -> bool {
        matches!(self.state, 'Z' | 'X' | 'x')
    }

    /// Stopped by a signal (or by a tracer): it runs no code until continued.
    #[must_use]
    pub fn is_stopped(self) -> bool {
        matches!(self.state, 'T' | 't')
    }
}

/// Reads a small file of `/proc` whole: one `open`, a `read` or two, no `stat` (their size reads as
/// zero, and the standard library's reader then grows its buffer from 32 bytes, a read each time).
/// The sweep after every step reads two of these per process on the machine.
fn read_proc(path: &str, capacity: usize) -> Option<Vec<u8>> {
    use std::io::Read as _;
    let mut file = std::fs::File::open(path).ok()?;
    let mut data = vec![0; capacity];
    let mut len = 0;
    loop {
        if len == data.len() {
            data.resize(len * 2, 0);
        }
        match file.read(&mut data[len..]) {
            Ok(0) => break,
            Ok(n) => len += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return None,
        }
    }
    data.truncate(len);
    Some(data)
}

/// Reads `/proc/PID/stat`.
#[must_use]
pub fn stat(pid: u32) -> Option<Stat> {
    let data = read_proc(&format!("/proc/{pid}/stat"), 1024)?;
    let text = std::str::from_utf8(&data).ok()?;
    // `comm` is in parentheses and may hold spaces and parentheses: split after the last `)`.
    let rest = &text[text.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    let pgrp = fields.next()?.parse().ok()?;
    let start = fields.nth(16)?.parse().ok()?;
    Some(Stat {
        state,
        ppid,
        pgrp,
        start,
    })
}

/// This machine's boot and pid namespace: pids are comparable only within both. Neither changes
/// while a process runs, so it is read once.
#[must_use]
pub fn boot_id() -> String {
    static BOOT_ID: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    if let Some(id) = BOOT_ID.get() {
        return id.clone();
    }
    let id = read_boot_id();
    // Kept only when both parts were read: a failed read is not this machine's identity.
    if id.starts_with('/') || id.ends_with('/') {
        return id;
    }
    BOOT_ID.get_or_init(|| id).clone()
}

fn read_boot_id() -> String {
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

/// Whether no process or thread has been created in this pid namespace (or one nested in it)
/// since `leader`, an attempt's leader that has ended and been reaped: the last pid handed out,
/// `/proc/sys/kernel/ns_last_pid`, is still the leader's, and no process holds that pid now. Then
/// the attempt left nothing: anything it started would have been given a later pid. This spares
/// the sweep, which lists every process on the machine, after a step that started no process of
/// its own.
///
/// `ns_last_pid` is the kernel's own counter for the reader's pid namespace (`/proc/loadavg` shows
/// it too, but container tools such as lxcfs replace that file with numbers of their own). Pids are
/// handed out in increasing order, wrapping at `pid_max`; the leader's could be the last one again
/// only after the count went round the whole pid space and the process given it already ended.
/// Any doubt (the file unreadable, another pid since) means the sweep runs.
#[must_use]
pub fn none_started_since(leader: u32) -> bool {
    let Some(text) = read_proc("/proc/sys/kernel/ns_last_pid", 32) else {
        return false;
    };
    let last = std::str::from_utf8(&text)
        .ok()
        .and_then(|text| text.trim().parse::<u32>().ok());
    leader != 0 && last == Some(leader) && stat(leader).is_none()
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
    let Some(environ) = read_proc(&format!("/proc/{pid}/environ"), 16 * 1024) else {
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
///
/// With the leader's start time known, only processes started no earlier than the leader have
/// their environment read: the marker exists from the leader's start on, so a process carrying it
/// was created after that (its descendants, or anything started with its environment), and a
/// process keeps its start time across `exec`. The one way past this, a process older than the
/// leader `exec`ing itself with the marker handed to it, is not something a step does by accident.
/// Once the leader is gone, a process older than it cannot be the attempt's at all, and one
/// already known to be older (see [`Older`]) is not read again.
#[must_use]
pub fn attempt_processes(pgid: Option<u32>, leader_start: Option<u64>, marker: &str) -> Vec<u32> {
    let leader_is_ours = pgid
        .zip(leader_start)
        .is_some_and(|(p, start)| stat(p).is_some_and(|s| s.start == start));
    let leader_replaced = pgid.is_some_and(|p| stat(p).is_some()) && !leader_is_ours;
    // While the leader lives, an older process that joined its group is the attempt's.
    let older_than = leader_start.filter(|_| !leader_is_ours);
    let mut older = OLDER
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    older.forget_ended();
    loop {
        let mut skipped = Vec::new();
        let found = attempt_pass(
            &mut older,
            &mut skipped,
            (pgid, leader_start, marker),
            (leader_is_ours, leader_replaced, older_than),
        );
        // A skipped process that ended during the pass may have passed its pid on to one of the
        // attempt's: the pass is done again. Otherwise each skipped pid was the held process from
        // before the pass to after it.
        let ended = older.forget_ended();
        if !skipped.iter().any(|p| ended.contains(p)) {
            return found;
        }
    }
}

/// The processes that carry `marker` and lead a process group, each with its start time: an
/// attempt's own process (which leads its group from its spawn) while it lives, and any of its
/// descendants that made a group of its own. A resume's sweep ends their groups with the attempt
/// ([`attempt_processes`] for each): what joined one of them and dropped the marker is found so,
/// even when the attempt's record (its group) was not in yet. Read once, before anything is ended:
/// a leader ended by the sweep's TERM no longer tells whose its group was.
#[must_use]
pub fn marked_leaders(marker: &str) -> Vec<(u32, u64)> {
    let me = std::process::id();
    all_pids()
        .into_iter()
        .filter(|&pid| pid != me)
        .filter_map(|pid| Some((pid, stat(pid)?)))
        .filter(|(pid, s)| s.pgrp == *pid && !s.is_gone() && carries(*pid, marker))
        .map(|(pid, s)| (pid, s.start))
        .collect()
}

fn attempt_pass(
    older: &mut Older,
    skipped: &mut Vec<u32>,
    (pgid, leader_start, marker): (Option<u32>, Option<u64>, &str),
    (leader_is_ours, leader_replaced, older_than): (bool, bool, Option<u64>),
) -> Vec<u32> {
    let me = std::process::id();
    let mut out = Vec::new();
    for pid in all_pids() {
        if pid == me {
            continue;
        }
        if older_than.is_some_and(|l| older.started_before(pid, l)) {
            skipped.push(pid);
            continue;
        }
        let Some(s) = older.stat(pid) else { continue };
        if s.is_gone() {
            continue;
        }
        let may_carry = leader_start.is_none_or(|l| s.start >= l);
        let carries = may_carry && carries(pid, marker);
        let in_group = pgid.is_some_and(|g| s.pgrp == g)
            && !leader_replaced
            && (leader_is_ours || leader_start.is_some_and(|l| s.start >= l) || carries);
        if in_group || carries {
            out.push(pid);
        }
    }
    out
}

/// The processes whose start time the sweep has read, each held by a pidfd: a pidfd refers to
/// one process, never to a later one given the same pid, and polls readable once that process
/// has ended. So while a held pidfd does not, its pid is still the process whose start time was
/// read, and the sweep after each attempt need not read that process's `/proc` files again (it
/// read every process's after every step, which was most of a short step's cost). Without pidfds
/// (an old kernel), or past [`Older::capacity`] processes, every process is read as before.
///
/// The held pidfds are in one epoll set, so that finding the ended ones costs in proportion to
/// them, not to every process held.
static OLDER: std::sync::Mutex<Older> = std::sync::Mutex::new(Older {
    held: None,
    ended: None,
    capacity: 0,
});

type Held = std::collections::HashMap<u32, (std::os::fd::OwnedFd, u64)>;

#[derive(Debug)]
struct Older {
    held: Option<Held>,
    /// The epoll set of the held pidfds (a pidfd is removed from it when it is closed).
    ended: Option<std::os::fd::OwnedFd>,
    capacity: usize,
}

impl Older {
    fn held(&mut self) -> &mut Held {
        if self.held.is_none() {
            self.ended =
                rustix::event::epoll::create(rustix::event::epoll::CreateFlags::CLOEXEC).ok();
            // A sixteenth of the open-file limit at most: the steps' pipes need the rest. None
            // without an epoll set.
            let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile)
                .current
                .unwrap_or(1024);
            self.capacity = match self.ended {
                Some(_) => usize::try_from(limit / 16).unwrap_or(64).min(1024),
                None => 0,
            };
        }
        self.held.get_or_insert_with(Held::new)
    }

    /// Lets go of the processes that have ended since; returns their pids.
    fn forget_ended(&mut self) -> Vec<u32> {
        if self.held().is_empty() {
            return Vec::new();
        }
        let (Some(set), Some(held)) = (&self.ended, self.held.as_mut()) else {
            return Vec::new();
        };
        let now = rustix::event::Timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        let mut ended = Vec::new();
        let mut events: Vec<rustix::event::epoll::Event> = Vec::with_capacity(64);
        loop {
            events.clear();
            let spare = rustix::buffer::spare_capacity(&mut events);
            if rustix::event::epoll::wait(set, spare, Some(&now)).is_err() {
                // Cannot tell: forget them all, and read them again.
                ended.extend(held.drain().map(|(pid, _)| pid));
                return ended;
            }
            for event in &events {
                let data = event.data;
                // Closing the pidfd takes it out of the set.
                if let Some(pid) = u32::try_from(data.u64())
                    .ok()
                    .filter(|p| held.remove(p).is_some())
                {
                    ended.push(pid);
                }
            }
            if events.len() < events.capacity() {
                return ended;
            }
        }
    }

    /// Whether `pid` is a process known to have started before `start`.
    fn started_before(&mut self, pid: u32, start: u64) -> bool {
        self.held().get(&pid).is_some_and(|(_, s)| *s < start)
    }

    /// Reads `/proc/PID/stat`, and holds the process when there is room: its pidfd is opened
    /// first and polled after the read, so that the start time read is the held process's (its
    /// pid cannot pass to another process while it has not ended).
    fn stat(&mut self, pid: u32) -> Option<Stat> {
        let room = self.held().len() < self.capacity;
        let Some(fd) = room
            .then(|| rustix::process::Pid::from_raw(i32::try_from(pid).ok()?))
            .flatten()
            .and_then(|p| {
                rustix::process::pidfd_open(p, rustix::process::PidfdFlags::empty()).ok()
            })
        else {
            return stat(pid);
        };
        let s = stat(pid)?;
        let mut poll = [rustix::event::PollFd::new(
            &fd,
            rustix::event::PollFlags::IN,
        )];
        let now = rustix::event::Timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        if rustix::event::poll(&mut poll, Some(&now)) == Ok(0)
            && self.ended.as_ref().is_some_and(|set| {
                rustix::event::epoll::add(
                    set,
                    &fd,
                    rustix::event::epoll::EventData::new_u64(u64::from(pid)),
                    rustix::event::epoll::EventFlags::IN,
                )
                .is_ok()
            })
        {
            self.held().insert(pid, (fd, s.start));
        }
        Some(s)
    }
}

fn signal_all(pids: &[u32], signal: Signal) {
    for &pid in pids {
        if let Ok(pid) = i32::try_from(pid) {
            let _ = kill(Pid::from_raw(pid), signal);
        }
    }
}

/// Ends every process `find` returns: TERM (and CONT, so a stopped process can act on it), up to
/// `grace` for them to exit, then [`kill_all`]. Returns how many processes it found at first.
pub async fn terminate(find: impl Fn() -> Vec<u32>, grace: Duration) -> usize {
    terminate_or_sooner(find, grace, std::future::pending()).await
}

/// [`terminate`], whose grace ends early when `hurry` completes (a second Ctrl-C): what is left
/// is killed then.
///
/// A process `find` returns later than the others (started by a TERM trap, say) gets its TERM
/// too, but never more than the grace that is left. Whatever the grace ends with, even nothing
/// found, ends in [`kill_all`]: a process started while the last search ran, or between its
/// fork and its `exec`, must not be missed because one search came up empty.
pub async fn terminate_or_sooner(
    find: impl Fn() -> Vec<u32>,
    grace: Duration,
    hurry: impl std::future::Future<Output = ()>,
) -> usize {
    let mut first = find();
    if first.is_empty() {
        // The common case after a step that exited by itself; a second look, without waiting,
        // for a process that a search could not read (in the middle of its `exec`).
        first = find();
        if first.is_empty() {
            return 0;
        }
    }
    let mut told: std::collections::HashSet<u32> = first.iter().copied().collect();
    signal_all(&first, Signal::SIGTERM);
    signal_all(&first, Signal::SIGCONT);
    let deadline = tokio::time::Instant::now() + grace;
    let mut hurry = std::pin::pin!(hurry);
    loop {
        let left = find();
        if left.is_empty() || tokio::time::Instant::now() >= deadline {
            break;
        }
        let new: Vec<u32> = left.into_iter().filter(|p| told.insert(*p)).collect();
        signal_all(&new, Signal::SIGTERM);
        signal_all(&new, Signal::SIGCONT);
        tokio::select! {
            () = tokio::time::sleep(Duration::from_millis(25)) => {}
            () = &mut hurry => break,
        }
    }
    kill_all(&find).await;
    first.len()
}

/// How many times [`kill_all`] freezes and kills before it gives up (each round ends every
/// process it found; a new round is needed only for processes it could not see before).
const KILL_ROUNDS: usize = 100;
/// How long a freeze waits for the processes it sent SIGSTOP to be stopped (a process in an
/// uninterruptible sleep stops only when it leaves it).
const STOP_WAIT: Duration = Duration::from_millis(500);
/// How long a round waits for the processes it killed to be gone.
const GONE_WAIT: Duration = Duration::from_secs(2);

/// Kills every process `find` returns, and every process they start meanwhile, completely: each
/// round [`freeze`]s them all (no process can start another once stopped), then KILLs and CONTs
/// them. Rounds go on until two searches in a row, a few milliseconds apart, find nothing: a
/// process orphaned before the freeze, in the middle of its `exec` while one search ran (its
/// environment unreadable then), is found by the next. A round that finds only processes already
/// killed ends it too: they die when the kernel lets them (one in an uninterruptible sleep), and
/// more rounds would only wait for them.
pub async fn kill_all(find: &impl Fn() -> Vec<u32>) {
    let mut quiet = 0;
    let mut killed = std::collections::BTreeSet::new();
    for _ in 0..KILL_ROUNDS {
        let frozen = freeze(find).await;
        if frozen.is_empty() {
            quiet += 1;
            if quiet == 2 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
            continue;
        }
        quiet = 0;
        if frozen
            .iter()
            .all(|(&pid, &start)| killed.contains(&(pid, start)))
        {
            return;
        }
        for signal in [Signal::SIGKILL, Signal::SIGCONT] {
            for (&pid, &start) in &frozen {
                signal_if_same(pid, start, signal);
            }
        }
        killed.extend(frozen.iter().map(|(&pid, &start)| (pid, start)));
        let deadline = tokio::time::Instant::now() + GONE_WAIT;
        while tokio::time::Instant::now() < deadline && frozen.iter().any(|(p, s)| runs(*p, *s)) {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
}

/// Stops (SIGSTOP) every process `find` returns, and every child of one stopped, until a search
/// finds none that is not stopped yet; returns them with their start times. A process is counted
/// stopped only once `/proc` says so: until then it may still be completing a `fork`, whose child
/// the next search must see. A stopped process's children keep it as their parent, so even one
/// between its fork and its `exec` (neither in the group yet nor readable by its marker) is found.
async fn freeze(find: &impl Fn() -> Vec<u32>) -> std::collections::BTreeMap<u32, u64> {
    let mut frozen = std::collections::BTreeMap::new();
    for _ in 0..1000 {
        let mut new: Vec<u32> = find()
            .into_iter()
            .filter(|p| !frozen.contains_key(p))
            .collect();
        if !frozen.is_empty() {
            for pid in all_pids() {
                if !frozen.contains_key(&pid)
                    && !new.contains(&pid)
                    && stat(pid).is_some_and(|s| !s.is_gone() && frozen.contains_key(&s.ppid))
                {
                    new.push(pid);
                }
            }
        }
        if new.is_empty() {
            break;
        }
        for pid in new {
            if let Some(s) = stat(pid).filter(|s| !s.is_gone()) {
                signal_if_same(pid, s.start, Signal::SIGSTOP);
                frozen.insert(pid, s.start);
            }
        }
        let deadline = tokio::time::Instant::now() + STOP_WAIT;
        while tokio::time::Instant::now() < deadline
            && frozen.iter().any(|(&pid, &start)| {
                stat(pid).is_some_and(|s| s.start == start && !s.is_gone() && !s.is_stopped())
            })
        {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    frozen
}

/// Whether the process `pid` started at `start` still runs code (not a zombie).
fn runs(pid: u32, start: u64) -> bool {
    stat(pid).is_some_and(|s| s.start == start && !s.is_gone())
}

/// Sends `signal` to `pid` unless the pid is now another process's (its start time differs).
fn signal_if_same(pid: u32, start: u64, signal: Signal) {
    if runs(pid, start)
        && let Ok(pid) = i32::try_from(pid)
    {
        let _ = kill(Pid::from_raw(pid), signal);
    }
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
