//! Steps that outlive cairn (`adopt: true`): a step's command runs under a small POSIX shell
//! supervisor, the same on this host and on others, in a private directory of its attempt that
//! nothing of cairn removes until the attempt's end is recorded.
//!
//! The directory holds: `pid` (the supervisor's pid, `/proc` start time and boot id, written
//! first, by rename), `out` and `err` (the command's output), `output` (its `$CAIRN_OUTPUT`),
//! `exit` (its exit code, written by rename once it ended: the result). How far `out` and `err`
//! are in the log is recorded with the log itself (the attempt's `logged`). The supervisor runs the
//! command in the foreground: it lives exactly as long as the command, so its identity says
//! whether the command still runs, and it leads the attempt's process group (cancel and timeout
//! end that group as for any step).

use std::io::{Read as _, Seek as _, SeekFrom};
use std::path::{Path, PathBuf};

use tokio::sync::mpsc;

use crate::spawn::{Chunk, Stream};

/// The supervisor, run as `sh -c SUPERVISOR sh DIR ARGV...`.
pub const SUPERVISOR: &str = r#"d=$1; shift
cairn_start() { { read -r l < "/proc/$1/stat"; } 2>/dev/null || return 1; set -- ${l##*) }; echo "${20}"; }
read -r boot < /proc/sys/kernel/random/boot_id
printf '%s %s %s\n' "$$" "$(cairn_start $$)" "$boot" > "$d/pid.tmp" && mv -f "$d/pid.tmp" "$d/pid" || exit 125
exec >/dev/null 2>&1
"$@" </dev/null >>"$d/out" 2>>"$d/err"
code=$?
printf '%s\n' "$code" > "$d/exit.tmp" && mv -f "$d/exit.tmp" "$d/exit"
exit "$code"
"#;

/// The name of attempt `n` of task `task` of op `uuid`'s directory (in `$TMPDIR` of the host the
/// step runs on).
#[must_use]
pub fn dir_name(uuid: &str, task: u32, n: u32) -> String {
    format!("cairn-adopt-{uuid}-{task}-{n}")
}

/// The directory of an attempt on this host.
#[must_use]
pub fn dir(uuid: &str, task: u32, n: u32) -> PathBuf {
    std::env::temp_dir().join(dir_name(uuid, task, n))
}

/// Makes the attempt's directory (`0700`, fsynced into its parent) with its empty `out` and `err`.
pub fn prepare(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
    std::fs::DirBuilder::new().mode(0o700).create(dir)?;
    for name in ["out", "err"] {
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(dir.join(name))?;
    }
    if let Some(parent) = dir.parent() {
        std::fs::File::open(parent)?.sync_all()?;
    }
    Ok(())
}

/// The command line that runs `argv` under the supervisor in `dir`.
#[must_use]
pub fn argv(dir: &Path, argv: &[String]) -> Vec<String> {
    let mut all = vec![
        "sh".to_owned(),
        "-c".to_owned(),
        SUPERVISOR.to_owned(),
        "sh".to_owned(),
        dir.display().to_string(),
    ];
    all.extend(argv.iter().cloned());
    all
}

/// What an attempt's directory says of its command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Found {
    /// It ended with this exit code (a shell's: 128 + N for signal N).
    Finished(i32),
    /// It still runs, under the supervisor with this pid and start time.
    Running { pid: u32, start: u64 },
    /// No result and no supervisor: it never started, or died with its supervisor.
    Gone,
}

/// This host's boot id, as the supervisor writes it.
fn kernel_boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .unwrap_or_default()
        .trim()
        .to_owned()
}

/// The exit code in `dir`, once written.
#[must_use]
pub fn exit_code(dir: &Path) -> Option<i32> {
    std::fs::read_to_string(dir.join("exit"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// What `dir` (of an attempt on this host) says.
#[must_use]
pub fn probe(dir: &Path) -> Found {
    if let Some(code) = exit_code(dir) {
        return Found::Finished(code);
    }
    let alive = std::fs::read_to_string(dir.join("pid"))
        .ok()
        .and_then(|text| {
            let mut words = text.split_whitespace();
            let pid: u32 = words.next()?.parse().ok()?;
            let start: u64 = words.next()?.parse().ok()?;
            let boot = words.next()?.to_owned();
            let stat = crate::proc::stat(pid)?;
            (boot == kernel_boot_id() && stat.start == start && stat.state != 'Z')
                .then_some(Found::Running { pid, start })
        });
    // The result may have come while the supervisor was looked at.
    match (alive, exit_code(dir)) {
        (_, Some(code)) => Found::Finished(code),
        (Some(running), None) => running,
        (None, None) => Found::Gone,
    }
}

/// Removes an attempt's directory (its result is recorded, or it is not to be adopted), or the
/// `.sent` note an older cairn kept here for a remote attempt.
pub fn remove(dir: &Path) {
    if std::fs::remove_dir_all(dir).is_err() {
        let _ = std::fs::remove_file(dir);
    }
}

/// The directories of op `uuid`'s attempts on this host (and the `.sent` notes an older cairn
/// kept for its remote attempts), with their task and attempt numbers.
#[must_use]
pub fn dirs_of(uuid: &str) -> Vec<(u32, u32, PathBuf)> {
    attempts_of(uuid, |rest| {
        Some(rest.strip_suffix(".sent").unwrap_or(rest))
    })
    .collect()
}

/// The entries of `$TMPDIR` named after op `uuid`'s attempts, `which` cutting the name's rest
/// (`<task>-<n>...`) down to `<task>-<n>`, or refusing it: task, attempt number and path.
fn attempts_of(
    uuid: &str,
    which: impl Fn(&str) -> Option<&str>,
) -> impl Iterator<Item = (u32, u32, PathBuf)> {
    let prefix = format!("cairn-adopt-{uuid}-");
    std::fs::read_dir(std::env::temp_dir())
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .filter_map(move |e| {
            let name = e.file_name().into_string().ok()?;
            let (task, n) = which(name.strip_prefix(&prefix)?)?.split_once('-')?;
            Some((task.parse().ok()?, n.parse().ok()?, e.path()))
        })
}

/// Streams a supervised command's output from its directory into the logs, from where the last
/// reader left it.
#[derive(Debug)]
pub struct Tail {
    dir: PathBuf,
    /// The bytes of `out` and `err` sent on so far.
    sent: [u64; 2],
}

impl Tail {
    /// A tail of `dir` from `from`: the bytes of `out` and `err` already in the log.
    #[must_use]
    pub fn new(dir: &Path, from: [u64; 2]) -> Self {
        Self {
            dir: dir.to_owned(),
            sent: from,
        }
    }

    /// Sends what was written since the last call; whether anything was.
    pub async fn pump(&mut self, sink: &mpsc::Sender<Chunk>) -> bool {
        let mut any = false;
        for (i, (name, stream)) in [("out", Stream::Stdout), ("err", Stream::Stderr)]
            .into_iter()
            .enumerate()
        {
            while let Some(data) = read_from(&self.dir.join(name), self.sent[i]) {
                if data.is_empty() {
                    break;
                }
                self.sent[i] += data.len() as u64;
                any = true;
                if sink.send(Chunk { stream, data }).await.is_err() {
                    return any;
                }
            }
        }
        any
    }

    /// Streams until `done` completes, then what is left.
    pub async fn follow(mut self, sink: mpsc::Sender<Chunk>, done: impl Future<Output = ()>) {
        tokio::pin!(done);
        loop {
            while self.pump(&sink).await {}
            tokio::select! {
                () = &mut done => break,
                () = tokio::time::sleep(std::time::Duration::from_millis(100)) => {}
            }
        }
        while self.pump(&sink).await {}
    }
}

/// Up to 64 KiB of `path` from `offset`.
fn read_from(path: &Path, offset: u64) -> Option<Vec<u8>> {
    let mut file = std::fs::File::open(path).ok()?;
    file.seek(SeekFrom::Start(offset)).ok()?;
    let mut data = Vec::new();
    file.take(64 * 1024).read_to_end(&mut data).ok()?;
    Some(data)
}

/// The end of what the command wrote on stderr (for an error message).
#[must_use]
pub fn stderr_tail(dir: &Path) -> String {
    let Ok(mut file) = std::fs::File::open(dir.join("err")) else {
        return String::new();
    };
    let len = file.metadata().map_or(0, |m| m.len());
    let _ = file.seek(SeekFrom::Start(len.saturating_sub(4096)));
    let mut data = Vec::new();
    let _ = file.read_to_end(&mut data);
    String::from_utf8_lossy(&data).into_owned()
}

/// Where cairn notes the host a supervised step of another host has its directory on: written
/// before the step starts there, removed once that directory is. A note left for an attempt no
/// longer running says its run could not remove the directory (the host was out of reach when
/// the attempt's end was recorded, or cairn was killed first): what is left there, maybe the
/// step still running, is for the next resume or cancel to end.
#[must_use]
pub fn host_file(dir_name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("{dir_name}.host"))
}

/// Writes the `.host` note of the attempt whose directory is `dir_name` ([`host_file`]).
pub fn note_host(dir_name: &str, host: &str) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(host_file(dir_name))
        .and_then(|mut f| writeln!(f, "{host}"))
}

/// The `.host` notes of op `uuid`'s attempts on this host: task, attempt number, host and the
/// note's path.
#[must_use]
pub fn hosts_of(uuid: &str) -> Vec<(u32, u32, String, PathBuf)> {
    attempts_of(uuid, |rest| rest.strip_suffix(".host"))
        .filter_map(|(task, n, path)| {
            let host = std::fs::read_to_string(&path).ok()?.trim().to_owned();
            crate::remote::check_destination(&host).ok()?;
            Some((task, n, host, path))
        })
        .collect()
}
