//! Running one step process: its own process group, a cleared environment with only what cairn
//! passes, stdout and stderr read concurrently into log chunks, a timeout, a stop signal, and the
//! whole group ended when the leader exits or is stopped.

use std::collections::BTreeMap;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::sync::{mpsc, watch};

use crate::proc::{self, Identity, MARKER_VAR};

/// How much of stderr is kept for the error message of a failed attempt.
pub(crate) const STDERR_TAIL: usize = 2048;
/// How long a reader waits for more output once the group is gone (a daemon may hold the pipe
/// open). Only waiting on the pipe counts: time spent handing output on to a slow sink does not.
const PIPE_DRAIN: Duration = Duration::from_secs(1);
/// How much a reader takes from its pipe once the group is gone: what the pipe held then (at most
/// the largest pipe an unprivileged process can make, `/proc/sys/fs/pipe-max-size`); more comes
/// from a process outside the attempt's reach that still writes.
const PIPE_LEFT: usize = 1 << 20;
/// How many chunks (of up to 64 KiB) a sink made by [`sink`] holds before the readers wait.
pub const SINK_CHUNKS: usize = 16;

/// A process to start.
#[derive(Debug, Clone)]
pub struct Spec {
    pub argv: Vec<String>,
    /// The whole environment: the process inherits nothing else.
    pub env: BTreeMap<String, String>,
    pub cwd: PathBuf,
    /// `<op uuid>/<task>/<attempt>`, set as [`MARKER_VAR`].
    pub marker: String,
    pub timeout: Option<Duration>,
    /// Between TERM and KILL when the process must stop.
    pub grace: Duration,
    /// Where [`locate`] found `argv[0]` beforehand (while the attempt's start commits); `None`:
    /// look now.
    pub located: Option<PathBuf>,
    /// Whether the spawning thread steps to another CPU once the child is started (see
    /// [`step_aside`]): for a process that runs alone, not one of many.
    pub alone: bool,
    /// A daemon's start: when the leader exits 0, what it leaves running is kept, not ended
    /// ([`Exit::kept`]). On any other end, the group is ended as always.
    pub keep: bool,
    /// What the process reads on its standard input, then end of file; `None`: nothing
    /// (`/dev/null`).
    pub stdin: Option<Vec<u8>>,
    /// Standard input stays open after `stdin` until [`Running::more_input`]'s sender sends what
    /// follows, or is dropped (then end of file).
    pub hold_stdin: bool,
}

/// Which stream a log chunk came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout = 1,
    Stderr = 2,
}

/// A chunk of output, as it arrives.
#[derive(Debug)]
pub struct Chunk {
    pub stream: Stream,
    pub data: Vec<u8>,
}

/// Why a process did not end by itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stopped {
    TimedOut,
    /// The engine asked it to stop (Ctrl-C, SIGTERM, cancel).
    Asked,
}

/// How a process ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exit {
    pub code: Option<i32>,
    pub signal: Option<i32>,
    pub stopped: Option<Stopped>,
    /// The end of what it wrote on stderr.
    pub stderr_tail: String,
    /// How many processes of its group were still running after the leader ended, and were ended.
    pub leftovers: usize,
    /// With [`Spec::keep`] and an exit 0: the attempt's processes left running, not ended.
    pub kept: Vec<u32>,
}

impl Exit {
    #[must_use]
    pub fn success(&self) -> bool {
        self.code == Some(0) && self.stopped.is_none()
    }
}

/// A started process.
#[derive(Debug)]
pub struct Running {
    child: tokio::process::Child,
    pub identity: Identity,
    pub pgid: u32,
    marker: String,
    grace: Duration,
    timeout: Option<Duration>,
    keep: bool,
    readers: Vec<tokio::task::JoinHandle<Vec<u8>>>,
    /// Turns true when the grace must end now (a second Ctrl-C): see [`Running::hurried_by`].
    hurry: Option<watch::Receiver<bool>>,
    /// Turned true once the group is gone: the readers then take only what is left in the pipes.
    gone: watch::Sender<bool>,
    /// Set once [`Running::wait`] has ended the attempt's processes; until then, dropping this
    /// kills its group (an error between spawn and wait must not leave a step running).
    waited: bool,
    /// With [`Spec::hold_stdin`]: what the process reads after its input, once sent.
    more_input: Option<tokio::sync::oneshot::Sender<Vec<u8>>>,
}

impl Drop for Running {
    fn drop(&mut self) {
        if !self.waited
            && let Ok(pgid) = i32::try_from(self.pgid)
        {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(pgid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        for reader in &self.readers {
            reader.abort();
        }
    }
}

/// Why a process could not be started.
#[derive(Debug, thiserror::Error)]
#[error("cannot start `{program}`: {source}{hint}")]
pub struct SpawnError {
    pub program: String,
    #[source]
    pub source: std::io::Error,
    /// What to change, when the error says little by itself (empty otherwise).
    pub hint: String,
}

/// For `E2BIG`: which string of the command line or environment is the longest, since the kernel
/// refuses one over 128 KiB, and all of them together over a quarter of the stack limit.
fn too_long(spec: &Spec) -> String {
    let strings: Vec<(String, usize)> = spec
        .argv
        .iter()
        .enumerate()
        .map(|(i, a)| (format!("argument {i}"), a.len()))
        .chain(
            spec.env
                .iter()
                .map(|(k, v)| (format!("`{k}`"), k.len() + 1 + v.len())),
        )
        .collect();
    let total: usize = strings.iter().map(|(_, len)| len).sum();
    match strings.into_iter().max_by_key(|(_, len)| *len) {
        Some((what, len)) => format!(
            " (its command line and environment hold {total} bytes; the longest, {what}, {len} bytes; Linux takes at most 128 KiB in one)"
        ),
        None => String::new(),
    }
}

/// A bounded channel for a process's output: [`SINK_CHUNKS`] chunks, about 1 MiB. When its
/// receiver falls behind, the readers wait, the pipes fill, and the process blocks on its writes
/// until the output is taken: memory stays bounded whatever a process prints.
#[must_use]
pub fn sink() -> (mpsc::Sender<Chunk>, mpsc::Receiver<Chunk>) {
    mpsc::channel(SINK_CHUNKS)
}

/// Starts `spec` in a new process group; its output goes to `sink` in chunks (see [`sink`]).
pub fn spawn(spec: &Spec, sink: &mpsc::Sender<Chunk>) -> Result<Running, SpawnError> {
    let program = spec.argv.first().cloned().unwrap_or_default();
    let command = |path: &std::path::Path| {
        let mut command = tokio::process::Command::new(path);
        command
            .arg0(&program)
            .args(&spec.argv[1..])
            .env_clear()
            .envs(&spec.env)
            .env(MARKER_VAR, &spec.marker)
            .current_dir(&spec.cwd)
            .process_group(0)
            .stdin(if spec.stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        command
    };
    let bare = || command(std::path::Path::new(&program)).spawn();
    let spawned = match spec.located.clone().or_else(|| found(&program, &spec.env)) {
        // The match would not start (a `#!` interpreter or a loader that is missing, another
        // architecture): nothing ran, and `execvp` would go on down `PATH`; let it.
        Some(path) => command(&path).spawn().or_else(|e| {
            let retry = matches!(
                e.raw_os_error(),
                Some(nix::libc::ENOENT | nix::libc::EACCES | nix::libc::ENOEXEC)
            );
            if retry { bare() } else { Err(e) }
        }),
        None => bare(),
    };
    let mut child = spawned.map_err(|source| SpawnError {
        program: program.clone(),
        hint: if source.raw_os_error() == Some(nix::libc::E2BIG) {
            too_long(spec)
        } else {
            String::new()
        },
        source,
    })?;
    let mut more_input = None;
    if let (Some(input), Some(mut pipe)) = (spec.stdin.clone(), child.stdin.take()) {
        let more = spec.hold_stdin.then(|| {
            let (tx, rx) = tokio::sync::oneshot::channel::<Vec<u8>>();
            more_input = Some(tx);
            rx
        });
        tokio::spawn(async move {
            use tokio::io::AsyncWriteExt as _;
            let _ = pipe.write_all(&input).await;
            if let Some(Ok(more)) = match more {
                Some(rx) => Some(rx.await),
                None => None,
            } {
                let _ = pipe.write_all(&more).await;
            }
        });
    }
    let pid = child.id().unwrap_or(0);
    if spec.alone {
        step_aside();
    }
    let identity = Identity {
        host: proc::hostname(),
        boot_id: proc::boot_id(),
        pid,
        start: proc::stat(pid).map_or(0, |s| s.start),
    };
    let (gone, group_gone) = watch::channel(false);
    let mut readers = Vec::new();
    if let Some(out) = child.stdout.take() {
        let reader = read(out, Stream::Stdout, sink.clone(), group_gone.clone());
        readers.push(tokio::spawn(reader));
    }
    if let Some(err) = child.stderr.take() {
        let reader = read(err, Stream::Stderr, sink.clone(), group_gone);
        readers.push(tokio::spawn(reader));
    }
    Ok(Running {
        child,
        identity,
        pgid: pid,
        marker: spec.marker.clone(),
        grace: spec.grace,
        timeout: spec.timeout,
        keep: spec.keep,
        readers,
        hurry: None,
        gone,
        waited: false,
        more_input,
    })
}

/// Moves the calling thread off the CPU it runs on, to another this process may use, and leaves
/// its CPUs as they were. Called right after a spawn: the child, released from `vfork` while it
/// still loads its program, is on this CPU, and the engine's bookkeeping for it (its pipes, pid
/// and start time, its record) would otherwise preempt it there while another CPU idles; a
/// virtual machine's scheduler may not move either (a halted virtual CPU looks busy to it). A
/// short step's program then starts in half the time. The thread's mask is restored before it
/// returns, and the processes it starts later inherit that mask, all of its CPUs; with one CPU,
/// or when the mask cannot be read, nothing moves. Only for a process that runs alone: with
/// others running, every CPU is busy anyway, and the moves cost (8 processes at once: 15% fewer
/// steps a second).
fn step_aside() {
    use nix::sched::{CpuSet, sched_getaffinity, sched_getcpu, sched_setaffinity};
    use nix::unistd::Pid;
    let this_thread = Pid::from_raw(0);
    let (Ok(mask), Ok(here)) = (sched_getaffinity(this_thread), sched_getcpu()) else {
        return;
    };
    let mut elsewhere = mask;
    let other = (0..CpuSet::count()).any(|cpu| cpu != here && mask.is_set(cpu).unwrap_or(false));
    if other && elsewhere.unset(here).is_ok() && sched_setaffinity(this_thread, &elsewhere).is_ok()
    {
        // Refused only if none of those CPUs is allowed any longer (a cpuset changed meanwhile).
        let _ = sched_setaffinity(this_thread, &mask);
    }
}

/// Where a process with `argv` and `env` would be started from, when that is certain (see
/// [`found`]): looked up ahead, it is passed in [`Spec::located`]. Should the file have gone by
/// the time of the spawn, `execvp` looks again.
#[must_use]
pub fn locate(argv: &[String], env: &BTreeMap<String, String>) -> Option<PathBuf> {
    found(argv.first()?, env)
}

/// Where `execvp` in the child would find a bare program name, when that is certain from here.
///
/// Given a path, the standard library starts the process with `posix_spawn` (a `vfork`); given a
/// bare name while the step's `PATH` differs from cairn's, it must `fork` this whole process so
/// that the child searches the step's `PATH`, which costs more the larger the engine's memory.
/// The search here answers only where `execvp`'s answer cannot differ: every `PATH` entry up to
/// the match is absolute, every entry before it plainly lacks the name, and the match is a
/// regular file this user may execute that starts as a binary or a `#!` script. Anything else
/// (a relative or empty entry, an entry that cannot be read, a directory or an unexecutable file
/// by that name, a script without `#!`, no `PATH`) is left to `execvp`: `None`. `argv[0]` stays
/// the name as written.
fn found(program: &str, env: &BTreeMap<String, String>) -> Option<PathBuf> {
    use std::io::Read as _;
    if program.is_empty() || program.contains('/') {
        return None;
    }
    for dir in env.get("PATH")?.split(':') {
        if !dir.starts_with('/') {
            return None;
        }
        let candidate = std::path::Path::new(dir).join(program);
        match std::fs::metadata(&candidate) {
            Ok(meta) if meta.is_file() => {
                nix::unistd::access(&candidate, nix::unistd::AccessFlags::X_OK).ok()?;
                let mut head = [0u8; 4];
                std::fs::File::open(&candidate)
                    .ok()?
                    .read_exact(&mut head)
                    .ok()?;
                return (head == *b"\x7fELF" || head.starts_with(b"#!")).then_some(candidate);
            }
            // Not there: `execvp` goes on to the next entry too.
            Err(e)
                if e.kind() == std::io::ErrorKind::NotFound
                    || e.raw_os_error() == Some(nix::libc::ENOTDIR) => {}
            // A directory or device by that name, or an entry that cannot be read.
            _ => return None,
        }
    }
    None
}

/// Forwards a stream in chunks; returns the tail of what it read (kept for stderr). A full sink
/// is waited for (the process then blocks on its writes); a sink whose receiver is gone is no
/// reason to stop reading: the process must not block on a pipe nobody reads. Once `gone` turns
/// true, it takes what is left in the pipe ([`PIPE_LEFT`] at most) and stops when it would wait
/// longer than [`PIPE_DRAIN`] for more.
async fn read(
    mut stream: impl AsyncReadExt + Unpin,
    which: Stream,
    sink: mpsc::Sender<Chunk>,
    mut gone: watch::Receiver<bool>,
) -> Vec<u8> {
    // Read into its spare capacity: a zeroed 64 KiB for each stream of each process cost more
    // than most steps print.
    let mut buffer = Vec::with_capacity(64 * 1024);
    let mut tail = Vec::new();
    // Once the group is gone: until when a read may wait, and how much more may be read.
    let mut draining: Option<(tokio::time::Instant, usize)> = None;
    loop {
        buffer.clear();
        let read = if let Some((deadline, _)) = draining {
            // A read that finds data returns it even past the deadline (the read is polled first).
            tokio::time::timeout_at(deadline, stream.read_buf(&mut buffer))
                .await
                .unwrap_or(Ok(0))
        } else {
            // `read_buf` is cancel safe: when the group goes first, nothing was read.
            tokio::select! {
                read = stream.read_buf(&mut buffer) => read,
                _ = gone.wait_for(|gone| *gone) => {
                    draining = Some((tokio::time::Instant::now() + PIPE_DRAIN, PIPE_LEFT));
                    continue;
                }
            }
        };
        let n = match read {
            Ok(0) | Err(_) => return tail,
            Ok(n) => n,
        };
        if let Some((_, left)) = &mut draining {
            *left = left.saturating_sub(n);
        }
        let data = buffer.clone();
        if which == Stream::Stderr {
            tail.extend_from_slice(&data);
            if tail.len() > STDERR_TAIL {
                tail.drain(..tail.len() - STDERR_TAIL);
            }
        }
        let _ = sink
            .send(Chunk {
                stream: which,
                data,
            })
            .await;
        if draining.is_some_and(|(_, left)| left == 0) {
            return tail;
        }
    }
}

impl Running {
    /// With [`Spec::hold_stdin`], the sender of what the process reads after its input (once);
    /// dropping it ends its input.
    pub fn more_input(&mut self) -> Option<tokio::sync::oneshot::Sender<Vec<u8>>> {
        self.more_input.take()
    }

    /// The running processes of this attempt's group (and any carrying its marker).
    fn members(&self) -> Vec<u32> {
        proc::attempt_processes(Some(self.pgid), Some(self.identity.start), &self.marker)
    }

    /// Ends the grace between TERM and KILL as soon as `hurry` turns true (or at once if it is):
    /// whoever stopped the step wants it gone now.
    #[must_use]
    pub fn hurried_by(mut self, hurry: watch::Receiver<bool>) -> Self {
        self.hurry = Some(hurry);
        self
    }

    /// Completes when the grace must end now; never without [`Running::hurried_by`].
    fn hurried(&self) -> impl Future<Output = ()> + use<> {
        let hurry = self.hurry.clone();
        async move {
            if let Some(mut hurry) = hurry
                && hurry.wait_for(|h| *h).await.is_ok()
            {
                return;
            }
            std::future::pending::<()>().await;
        }
    }

    /// Waits until the process ends, its timeout passes, or `stop` turns true; then ends whatever is
    /// left of its group, so that nothing of the attempt outlives it.
    pub async fn wait(self, stop: watch::Receiver<bool>) -> Exit {
        let grace = self.grace;
        self.wait_with_grace(stop, || grace).await
    }

    /// [`Running::wait`], with the grace between TERM and KILL decided when the stop comes
    /// (`grace` is called then): a process that lost its right to run a step (its lease) gives
    /// the step less time than one stopping in order.
    pub async fn wait_with_grace(
        mut self,
        mut stop: watch::Receiver<bool>,
        grace: impl FnOnce() -> Duration,
    ) -> Exit {
        let timeout = async {
            match self.timeout {
                Some(t) => tokio::time::sleep(t).await,
                None => std::future::pending().await,
            }
        };
        let stopped_by = async {
            loop {
                if *stop.borrow_and_update() {
                    return;
                }
                if stop.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
        };
        let mut stopped = None;
        // `biased`: an exit that is already in wins over a stop or a timeout that came at the same
        // moment, so a step that finished is recorded as finished.
        let status = tokio::select! {
            biased;
            status = self.child.wait() => status.ok(),
            () = timeout => { stopped = Some(Stopped::TimedOut); None }
            () = stopped_by => { stopped = Some(Stopped::Asked); None }
        };
        let status = if let Some(status) = status {
            Some(status)
        } else {
            self.grace = grace();
            proc::terminate_or_sooner(|| self.members(), self.grace, self.hurried()).await;
            self.child.wait().await.ok()
        };
        // The leader is gone; whatever it left running in its group goes too, unless it started
        // a daemon that is to be kept.
        let keep = self.keep && stopped.is_none() && status.is_some_and(|s| s.code() == Some(0));
        let kept = if keep && !proc::none_started_since(self.pgid) {
            self.members()
        } else {
            Vec::new()
        };
        let leftovers = if keep || proc::none_started_since(self.pgid) {
            0
        } else {
            proc::terminate_or_sooner(|| self.members(), self.grace, self.hurried()).await
        };
        // A process outside the attempt's reach (it left the group and dropped the marker) may
        // hold a pipe open: the readers take what is left and stop, so that the output closes.
        let _ = self.gone.send(true);
        let mut tail = Vec::new();
        for reader in std::mem::take(&mut self.readers) {
            if let Ok(t) = reader.await {
                tail.extend(t);
            }
        }
        self.waited = true;
        Exit {
            code: status.and_then(|s| s.code()),
            signal: status.and_then(|s| s.signal()),
            stopped,
            stderr_tail: String::from_utf8_lossy(&tail).trim_end().to_owned(),
            leftovers,
            kept,
        }
    }
}

/// Reads the `key=value` lines a step appended to its `$CAIRN_OUTPUT` file. Keys are identifiers;
/// a later line wins over an earlier one with the same key.
pub fn read_outputs(
    path: &std::path::Path,
) -> Result<serde_json::Map<String, serde_json::Value>, String> {
    let text = match std::fs::read(path) {
        Ok(bytes) => {
            String::from_utf8(bytes).map_err(|_| "its output file is not UTF-8".to_owned())?
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(serde_json::Map::new()),
        Err(e) => return Err(format!("cannot read its output file: {e}")),
    };
    let mut outputs = serde_json::Map::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            return Err(format!(
                "output line {} is not `key=value`: `{line}`",
                n + 1
            ));
        };
        // Written `key = value`, the spaces around `=` are layout, not part of the value.
        let value = if key.ends_with([' ', '\t']) {
            value.trim_start_matches([' ', '\t'])
        } else {
            value
        };
        let key = key.trim();
        let valid = key.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
            && key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if !valid {
            return Err(format!(
                "output line {}: `{key}` is not a valid key (letters, digits, `_`)",
                n + 1
            ));
        }
        outputs.insert(key.to_owned(), serde_json::Value::String(value.to_owned()));
    }
    Ok(outputs)
}
