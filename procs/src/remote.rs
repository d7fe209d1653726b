//! Steps on other hosts, over the system's OpenSSH client.
//!
//! - [`Transport`]: the `ssh` command lines of a run: `BatchMode`, strict host key checking, and
//!   one master connection per host ([`Transport::connect`]) whose socket is in a private
//!   directory of the run.
//! - [`spawn`]: starts a step on a host. A POSIX shell wrapper, sent on the connection's standard
//!   input, makes a private directory there, writes the step's environment into a file of it,
//!   starts the step in a session (and process group) of its own, and says its pid, start time and
//!   boot id on its first line of output ([`Remote`]).
//! - [`RemoteRunning::wait`]: the step's end, its exit code and `$CAIRN_OUTPUT` collected; a
//!   stop or a timeout ends its group on the host ([`end`]), as a resume's sweep does.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};

use crate::spawn::{self, Chunk, Exit, SpawnError, Spec, Stopped, Stream};

/// Names a file holding the `ssh` configuration to use in place of `~/.ssh/config` (`-F`).
pub const CONFIG_VAR: &str = "CAIRN_SSH_CONFIG";
/// How long an idle master connection stays up after its last client (`ControlPersist`): it
/// outlives a killed cairn by no more than this.
const PERSIST: &str = "120";
/// The first line the wrapper prints: `cairn-remote PID START BOOT_ID`.
const HELLO: &str = "cairn-remote ";
/// What cairn sends a supervised step's wrapper once the attempt's end is recorded.
const RECORDED: &str = "recorded";

/// A step process on another host, as a resume's sweep finds it again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Remote {
    /// The SSH destination.
    pub host: String,
    pub pid: u32,
    /// Clock ticks since the host's boot (`/proc/PID/stat` field 22).
    pub start: u64,
    /// `/proc/sys/kernel/random/boot_id` of the host.
    pub boot_id: String,
}

/// The `ssh` command lines of one run, and its master connections.
#[derive(Debug)]
pub struct Transport {
    /// Private (0700) to this run: the masters' sockets.
    dir: PathBuf,
    config: Option<PathBuf>,
    /// The hosts whose master connection this run started; held while one starts.
    masters: tokio::sync::Mutex<std::collections::HashSet<String>>,
    /// The wrappers told their end is recorded ([`Recorded`]), which may still be removing their
    /// directories: the tasks that wait for their clients to end.
    told: std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

/// How long the end of a run waits for wrappers told their end is recorded to finish.
const TOLD_WAIT: Duration = Duration::from_secs(3);

impl Drop for Transport {
    fn drop(&mut self) {
        let hosts = self.masters.get_mut().drain().collect::<Vec<_>>();
        for host in hosts {
            let mut argv = self.argv();
            argv.extend(["-O".into(), "exit".into(), "--".into(), host]);
            let _ = std::process::Command::new(&argv[0])
                .args(&argv[1..])
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Whether `host` may be given to `ssh` as a destination: not an option, no blank or control
/// character.
pub fn check_destination(host: &str) -> Result<(), String> {
    if host.is_empty() {
        return Err("`on` rendered empty: no host to run on".to_owned());
    }
    if host.starts_with('-') {
        return Err(format!(
            "`on` rendered `{host}`, which `ssh` would read as an option"
        ));
    }
    if host.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!(
            "`on` rendered `{}`, which holds a blank or control character",
            host.escape_debug()
        ));
    }
    Ok(())
}

/// `text` quoted for a POSIX shell: `'it'\''s'`.
#[must_use]
pub fn quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}

impl Transport {
    /// A transport whose sockets go in a new private directory `$TMPDIR/cairn-ssh-<random>`
    /// (short: a socket's path holds at most 107 bytes, and `ssh` adds 58 to it).
    pub fn new() -> std::io::Result<Self> {
        use std::os::unix::fs::DirBuilderExt as _;
        let mut token = random_token();
        token.truncate(8);
        let dir = std::env::temp_dir().join(format!("cairn-ssh-{token}"));
        std::fs::DirBuilder::new().mode(0o700).create(&dir)?;
        Ok(Self {
            dir,
            config: std::env::var_os(CONFIG_VAR).map(PathBuf::from),
            masters: tokio::sync::Mutex::default(),
            told: std::sync::Mutex::default(),
        })
    }

    /// `ssh` and the options of every connection of this run.
    fn argv(&self) -> Vec<String> {
        let mut argv = vec!["ssh".to_owned()];
        if let Some(config) = &self.config {
            argv.extend(["-F".to_owned(), config.display().to_string()]);
        }
        // A host that stops answering is noticed within 15 s, and one that never answers within
        // 15 s: no stop, timeout or probe waits on TCP's own minutes.
        for option in [
            "BatchMode=yes".to_owned(),
            "StrictHostKeyChecking=yes".to_owned(),
            "ServerAliveInterval=5".to_owned(),
            "ServerAliveCountMax=3".to_owned(),
            "ConnectTimeout=15".to_owned(),
            format!("ControlPath={}/%C", self.dir.display()),
        ] {
            argv.extend(["-o".to_owned(), option]);
        }
        argv
    }

    /// The command line that runs `command` on `host` through its master connection (or a
    /// connection of its own, should the master be gone).
    fn command(&self, host: &str, command: &str) -> Vec<String> {
        let mut argv = self.argv();
        argv.extend(["-o", "ControlMaster=no", "-T", "--", host, command].map(str::to_owned));
        argv
    }

    /// Starts the master connection to `host` unless this run has one: fails with an error
    /// naming the host and what `ssh` said.
    pub async fn connect(&self, host: &str) -> Result<(), String> {
        let mut masters = self.masters.lock().await;
        if masters.contains(host) {
            return Ok(());
        }
        let log = self.dir.join(format!("connect-{}", random_token()));
        let stderr =
            std::fs::File::create(&log).map_err(|e| format!("cannot connect to `{host}`: {e}"))?;
        let mut argv = self.argv();
        let persist = format!("ControlPersist={PERSIST}");
        argv.extend(
            [
                "-o",
                "ControlMaster=yes",
                "-o",
                &persist,
                "-N",
                "-f",
                "--",
                host,
            ]
            .map(str::to_owned),
        );
        // In a group of its own, without an attempt's marker: no step's sweep ends it.
        let status = tokio::process::Command::new(&argv[0])
            .args(&argv[1..])
            .env_remove(crate::proc::MARKER_VAR)
            .process_group(0)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(stderr)
            // Given up on (a stop, the step's timeout): the attempt to connect ends too.
            .kill_on_drop(true)
            .status()
            .await;
        let said = std::fs::read_to_string(&log).unwrap_or_default();
        let _ = std::fs::remove_file(&log);
        match status {
            Ok(s) if s.success() => {
                masters.insert(host.to_owned());
                Ok(())
            }
            Ok(_) => Err(unreachable(host, &said)),
            Err(e) => Err(format!("cannot start `ssh` to connect to `{host}`: {e}")),
        }
    }
}

impl Transport {
    /// Waits (up to 3 s) for the wrappers told their end is recorded to remove their
    /// directories and end: the end of a run, before its master connections close under them.
    pub async fn settle(&self) {
        let told = std::mem::take(
            &mut *self
                .told
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        let _ = tokio::time::timeout(TOLD_WAIT, async {
            for task in told {
                let _ = task.await;
            }
        })
        .await;
    }

    /// Keeps `task` (waiting for a told wrapper's client) for [`Transport::settle`].
    fn keep_told(&self, task: tokio::task::JoinHandle<()>) {
        let mut told = self
            .told
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        told.retain(|t| !t.is_finished());
        told.push(task);
    }

    /// Forgets `host`'s master connection, lost with the connection: the next
    /// [`Transport::connect`] starts another, rather than every later session connecting anew.
    pub async fn forget(&self, host: &str) {
        self.masters.lock().await.remove(host);
    }
}

/// The error for a host `ssh` could not connect to, from what it said.
fn unreachable(host: &str, said: &str) -> String {
    let said: Vec<&str> = said
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    let reason = if said.is_empty() {
        "ssh failed and said nothing".to_owned()
    } else {
        said.join("; ")
    };
    let hint = if reason.contains("host key is known") || reason.contains("Host key verification") {
        format!(
            " (its host key is not in known_hosts: check its fingerprint, then add it with `ssh-keyscan -H HOST >> ~/.ssh/known_hosts` or by connecting once with `ssh {host}`)"
        )
    } else {
        String::new()
    };
    format!("cannot connect to `{host}`: {reason}{hint}")
}

/// Random hex, for names no one can guess.
fn random_token() -> String {
    use std::io::Read as _;
    let mut bytes = [0u8; 8];
    let read = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut bytes));
    if read.is_err() {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        bytes = (nanos as u64 ^ u64::from(std::process::id()).rotate_left(32)).to_le_bytes();
    }
    bytes.iter().fold(String::new(), |mut hex, b| {
        let _ = write!(hex, "{b:02x}");
        hex
    })
}

/// Shell functions of the wrapper and of [`end`]: `cairn_end PGID START TENTHS` ends the process
/// group `PGID` whose leader started at `START` (TERM and CONT, up to `TENTHS` tenths of a second,
/// then KILL). A leader alive with another start time means the pid is another process's: nothing
/// is signalled. Only members started no earlier than the leader count.
const END_FUNCTIONS: &str = r#"cairn_members() {
  n=0
  for f in /proc/[0-9]*/stat; do
    { read -r l < "$f"; } 2>/dev/null || continue
    set -- ${l##*) }
    [ "$3" = "$pg" ] && [ "$1" != Z ] && [ "${20}" -ge "$st" ] && n=$((n+1))
  done
  [ "$n" -gt 0 ]
}
cairn_end() {
  pg=$1 st=$2 t=$3
  if { read -r l < "/proc/$pg/stat"; } 2>/dev/null; then
    set -- ${l##*) }
    [ "${20}" = "$st" ] || return 0
  fi
  kill -s 0 -- "-$pg" 2>/dev/null || return 0
  cairn_members || return 0
  found=$n
  kill -s TERM -- "-$pg" 2>/dev/null
  kill -s CONT -- "-$pg" 2>/dev/null
  while [ "$t" -gt 0 ] && cairn_members; do sleep 0.1; t=$((t-1)); done
  kill -s KILL -- "-$pg" 2>/dev/null
  return 0
}
"#;

/// A step to start on a host.
#[derive(Debug, Clone)]
pub struct Job {
    pub host: String,
    /// The name of its directory in the host's `$TMPDIR` (or `/tmp`): unique to the attempt.
    pub dir: String,
    /// Its variables, added to the login environment there.
    pub env: BTreeMap<String, String>,
    /// Variables naming a file: each file is written into its directory there (a param too long
    /// for the environment), the variable set to its path.
    pub files: BTreeMap<String, String>,
    pub argv: Vec<String>,
    /// A directory on the host; `None`: the login's.
    pub cwd: Option<String>,
    pub timeout: Option<Duration>,
    /// Between TERM and KILL.
    pub grace: Duration,
    /// Under the supervisor ([`crate::adopt`]): the step outlives the connection, its directory
    /// stays until [`remove_dir`].
    pub adopt: bool,
}

fn tenths(d: Duration) -> u128 {
    d.as_millis().div_ceil(100)
}

/// The wrapper script for `job`, sent on the connection's standard input to `sh`; `end` is the
/// line that ends the step's output (see [`Framing`]).
fn wrapper(job: &Job, end: &str) -> String {
    let mut env = String::new();
    for (name, value) in &job.env {
        let valid = name.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
            && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if valid {
            let _ = writeln!(env, "export {name}={}", quote(value));
        }
    }
    env.push_str("export CAIRN_OUTPUT=\"$1/output\" CAIRN_PROGRESS=\"$1/progress\"\n");
    // The wrapper's shell counts as one level, as bash would count itself: a `bash` step, its
    // `SSH_CLIENT` set and `SHLVL` still 1, would take itself for sshd's and read `~/.bashrc`
    // (slow, and unlike a local step).
    env.push_str("export SHLVL=$((${SHLVL:-0} + 1))\n");
    let mut files = String::new();
    for (n, (name, text)) in job.files.iter().enumerate() {
        let _ = writeln!(env, "export {name}=\"$1/file-{n}\"");
        // `printf %s` of a quoted word: the text as it is, whatever lines it holds.
        let _ = writeln!(files, "printf %s {} > \"$d/file-{n}\"", quote(text));
    }
    if let Some(cwd) = &job.cwd {
        let _ = writeln!(env, "cd {} || exit 1", quote(cwd));
    }
    let argv = job
        .argv
        .iter()
        .map(|a| quote(a))
        .collect::<Vec<_>>()
        .join(" ");
    let head = format!(
        r#"umask 077
command -v setsid >/dev/null || {{ echo "cairn: this host has no setsid (util-linux)" >&2; exit 255; }}
{END_FUNCTIONS}d="${{TMPDIR:-/tmp}}"/{dir}
mkdir -m 700 "$d" || exit 255
printf %s {env} > "$d/env"
{files}mkfifo "$d/go" || exit 255
"#,
        dir = quote(&job.dir),
        env = quote(&env),
    );
    if job.adopt {
        return format!(
            r#"{head}printf %s {supervisor} > "$d/supervise"
: > "$d/out"; : > "$d/err"
setsid sh -c 'read _ < "$1/go"; . "$1/env" || exit 127; rm -f "$1/go" "$1/env"; exec sh "$1/supervise" "$@"' sh "$d" {argv} </dev/null >/dev/null 2>&1 &
pid=$!
{{ read -r l < "/proc/$pid/stat"; }} 2>/dev/null
set -- ${{l##*) }}
start=${{20}}
read -r boot < /proc/sys/kernel/random/boot_id
printf '%s %s %s\n' "$pid" "$start" "$boot" > "$d/launched"
echo "{HELLO}$pid $start $boot"
printf '\n%s\n' {end}_S >&2
echo go > "$d/go"
oo=0 eo=0
{attach_script}"#,
            supervisor = quote(crate::adopt::SUPERVISOR),
            attach_script = attach(end, job.grace),
        );
    }
    format!(
        r#"{head}setsid sh -c 'read _ < "$1/go"; . "$1/env" || exit 127; rm -f "$1/go" "$1/env"; shift; exec "$@"' sh "$d" {argv} </dev/null &
pid=$!
{{ read -r l < "/proc/$pid/stat"; }} 2>/dev/null
set -- ${{l##*) }}
start=${{20}}
read -r boot < /proc/sys/kernel/random/boot_id
echo "{HELLO}$pid $start $boot"
printf '\n%s\n' {end}_S >&2
echo go > "$d/go"
wait "$pid"
code=$?
cairn_end "$pid" "$start" {grace}
echo "$code" > "$d/exit"
printf '\n%s\n' {end} >&2
printf '\n%s\nexit=%s\n' {end} "$code"
[ -f "$d/output" ] && cat "$d/output"
printf '\n%s\n' {end}
rm -rf "$d"
exit "$code"
"#,
        grace = tenths(job.grace),
    )
}

/// The end of a script that follows a supervised step in `$d` (pid `$pid`, start `$start`),
/// its output streamed from offsets `$oo` and `$eo` (what cairn recorded before), until its result is
/// written or its supervisor is gone; then the rest of its group is ended and the trailer
/// printed (see [`Framing`]). The directory stays until cairn says on standard input that the
/// attempt's end is recorded ([`Recorded`]): removed in the same session, no connection more.
/// Checked at growing intervals (10 ms, doubling to 200 ms): a short step is seen ended at once.
fn attach(end: &str, grace: Duration) -> String {
    format!(
        r#"cairn_tail() {{
  t=$2
  n=$(wc -c < "$1" 2>/dev/null) || return 0
  n=$((n))
  if [ "$n" -gt "$2" ]; then tail -c +$(($2+1)) "$1" | head -c $((n-$2)); t=$n; fi
}}
cairn_alive() {{
  {{ read -r l < "/proc/$pid/stat"; }} 2>/dev/null || return 1
  set -- ${{l##*) }}
  [ "$1" != Z ] && [ "${{20}}" = "$start" ]
}}
w=0.01
while :; do
  f=; [ -f "$d/exit" ] && f=1
  cairn_tail "$d/out" "$oo"; oo=$t
  cairn_tail "$d/err" "$eo" >&2; eo=$t
  [ -n "$f" ] && break
  if ! cairn_alive; then [ -f "$d/exit" ] && continue; break; fi
  sleep "$w"
  case $w in 0.01) w=0.02 ;; 0.02) w=0.05 ;; 0.05) w=0.1 ;; *) w=0.2 ;; esac
done
code=
[ -f "$d/exit" ] && read -r code < "$d/exit"
cairn_end "$pid" "$start" {grace}
cairn_tail "$d/out" "$oo"; oo=$t
cairn_tail "$d/err" "$eo" >&2; eo=$t
[ -n "$code" ] || echo "cairn: the step's supervisor ended without a result" >&2
printf '\n%s\n' {end} >&2
printf '\n%s\nexit=%s\n' {end} "$code"
[ -n "$code" ] && [ -f "$d/output" ] && cat "$d/output"
printf '\n%s\n' {end}
if read -r said && [ "$said" = {RECORDED} ]; then rm -rf "$d" && exit 0; exit 1; fi
exit 2
"#,
        grace = tenths(grace),
    )
}

/// Attaches again to a supervised step (`job.adopt`) started on its host by an earlier run:
/// its output streamed from where the last reader left it, its end waited for and collected as
/// [`spawn`]'s is. Its hello line names the supervisor from the directory's `pid` file.
pub fn reattach(
    transport: &std::sync::Arc<Transport>,
    job: Job,
    (marker, sent): (&str, [u64; 2]),
    sink: &mpsc::Sender<Chunk>,
) -> Result<RemoteRunning, SpawnError> {
    let end = format!("CAIRN_END_{}", random_token());
    let script = format!(
        r#"{END_FUNCTIONS}d="${{TMPDIR:-/tmp}}"/{dir}
[ -f "$d/pid" ] || {{ echo "cairn: the step's directory {dir} is not on this host" >&2; exit 1; }}
read -r pid start boot < "$d/pid"
oo={oo} eo={eo}
echo "{HELLO}$pid $start $boot"
printf '\n%s\n' {end}_S >&2
{attach_script}"#,
        dir = quote(&job.dir),
        attach_script = attach(&end, job.grace),
        oo = sent[0],
        eo = sent[1],
    );
    start_script(transport, job, marker, sink, (script, end))
}

/// What a supervised step's directory on its host says ([`crate::adopt::Found`]); with `end`,
/// or when its command never started or is gone without a result, what is left of its group is
/// ended (TERM, KILL after `grace`) and the directory removed (then `Gone`).
pub async fn probe(
    transport: &Transport,
    host: &str,
    dir: &str,
    (grace, end): (Duration, bool),
) -> Result<crate::adopt::Found, String> {
    use crate::adopt::Found;
    transport.connect(host).await?;
    let script = format!(
        r#"{END_FUNCTIONS}d="${{TMPDIR:-/tmp}}"/{dir}
alive() {{
  {{ read -r l < "/proc/$pid/stat"; }} 2>/dev/null || return 1
  set -- ${{l##*) }}
  [ "$1" != Z ] && [ "${{20}}" = "$start" ] && [ "$(cat /proc/sys/kernel/random/boot_id)" = "$boot" ]
}}
pid= start= boot=
[ -f "$d/pid" ] && read -r pid start boot < "$d/pid"
if [ -z "$pid" ] && [ -f "$d/launched" ]; then read -r pid start boot < "$d/launched"; fi
if [ {end} = no ] && [ -f "$d/exit" ]; then echo "finished $(cat "$d/exit")"; exit 0; fi
if [ {end} = no ] && [ -n "$pid" ] && [ ! -p "$d/go" ] && alive; then echo "running $pid $start"; exit 0; fi
if [ {end} = no ] && [ -f "$d/exit" ]; then echo "finished $(cat "$d/exit")"; exit 0; fi
[ -n "$pid" ] && [ "$pid" -gt 1 ] && alive && cairn_end "$pid" "$start" {grace}
rm -rf "$d"
echo gone
"#,
        dir = quote(dir),
        end = if end { "yes" } else { "no" },
        grace = tenths(grace),
    );
    let said = run(transport, host, &script).await?;
    let mut words = said.split_whitespace();
    Ok(match (words.next(), words.next(), words.next()) {
        (Some("finished"), Some(code), _) => Found::Finished(code.parse().unwrap_or(1)),
        (Some("running"), Some(pid), Some(start)) => Found::Running {
            pid: pid.parse().unwrap_or(0),
            start: start.parse().unwrap_or(0),
        },
        _ => Found::Gone,
    })
}

/// Removes a supervised step's directory on its host, once its end is recorded.
pub async fn remove_dir(transport: &Transport, host: &str, dir: &str) -> Result<(), String> {
    transport.connect(host).await?;
    let script = format!("rm -rf \"${{TMPDIR:-/tmp}}\"/{}\n", quote(dir));
    run(transport, host, &script).await.map(|_| ())
}

/// A step started on a host.
#[derive(Debug)]
pub struct RemoteRunning {
    local: spawn::Running,
    job: Job,
    /// Turns `Some` once the wrapper said where the step runs.
    hello: Option<oneshot::Receiver<Remote>>,
    /// What the wrapper printed after the step's output (see [`Framing`]).
    trailer: oneshot::Receiver<Said>,
    /// Turns true when the grace must end now: see [`RemoteRunning::hurried_by`].
    hurry: Option<watch::Receiver<bool>>,
    remote: Option<Remote>,
    transport: std::sync::Arc<Transport>,
    /// A supervised step's: what tells its wrapper that the end is recorded.
    recorded: Option<Recorded>,
}

/// Tells a supervised step's wrapper, still connected, that the attempt's end is recorded: it
/// removes the step's directory on its host and ends. Dropped unsent, the wrapper ends and the
/// directory stays (a resume finds the result there again).
pub struct Recorded {
    tell: Option<oneshot::Sender<Vec<u8>>>,
    transport: std::sync::Arc<Transport>,
    /// The task that waits for the `ssh` client's end: 0 once the wrapper removed the directory.
    client: Option<tokio::task::JoinHandle<Exit>>,
}

impl std::fmt::Debug for Recorded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recorded").finish_non_exhaustive()
    }
}

impl Recorded {
    /// Tells the wrapper; `removed` runs once it says it removed the directory (its client ended
    /// with 0). [`Transport::settle`] waits for it.
    pub fn send(mut self, removed: impl FnOnce() + Send + 'static) {
        let told = self
            .tell
            .take()
            .is_some_and(|tell| tell.send(format!("{RECORDED}\n").into_bytes()).is_ok());
        if let Some(client) = self.client.take() {
            self.transport.keep_told(tokio::spawn(async move {
                if told && client.await.is_ok_and(|exit| exit.code == Some(0)) {
                    removed();
                }
            }));
        }
    }
}

/// How a step on a host ended, and what it wrote to `$CAIRN_OUTPUT` there.
#[derive(Debug)]
pub struct RemoteExit {
    pub exit: Exit,
    pub outputs: String,
    /// A supervised step (`Job::adopt`) whose connection was lost while it ran on: no result
    /// yet; attach again ([`reattach`]).
    pub lost: bool,
    /// A supervised step whose wrapper is still connected, waiting to hear that the end is
    /// recorded.
    pub recorded: Option<Recorded>,
    /// The bytes of the step's stdout and stderr this connection forwarded: where a reader
    /// attaching again goes on from.
    pub forwarded: [u64; 2],
}

/// Starts `job` on its host through `transport`'s master connection (connect first), its output
/// going to `sink` in chunks. `marker` marks the local `ssh` client, as a local step is marked.
pub fn spawn(
    transport: &std::sync::Arc<Transport>,
    job: Job,
    marker: &str,
    sink: &mpsc::Sender<Chunk>,
) -> Result<RemoteRunning, SpawnError> {
    let end = format!("CAIRN_END_{}", random_token());
    let script = wrapper(&job, &end);
    start_script(transport, job, marker, sink, (script, end))
}

/// Runs `script` (framed by `end`) with `sh` on `job`'s host, its output relayed to `sink`. The
/// script is sent as one `{ ... }` group, which the shell reads whole before it runs any of it:
/// what a supervised step's wrapper reads from standard input afterwards is cairn's word
/// ([`Recorded`]), never the script's own text.
fn start_script(
    transport: &std::sync::Arc<Transport>,
    job: Job,
    marker: &str,
    sink: &mpsc::Sender<Chunk>,
    (script, end): (String, String),
) -> Result<RemoteRunning, SpawnError> {
    let spec = Spec {
        argv: transport.command(&job.host, "sh"),
        env: std::env::vars().collect(),
        cwd: std::env::temp_dir(),
        marker: marker.to_owned(),
        timeout: None,
        grace: Duration::from_secs(1),
        located: None,
        alone: false,
        stdin: Some(format!("{{\n{script}\n}}\n").into_bytes()),
        hold_stdin: job.adopt,
        keep: false,
    };
    let (inner, chunks) = spawn::sink();
    let mut local = spawn::spawn(&spec, &inner)?;
    let recorded = local.more_input().map(|tell| Recorded {
        tell: Some(tell),
        transport: transport.clone(),
        client: None,
    });
    let (hello_tx, hello) = oneshot::channel();
    let (trailer_tx, trailer) = oneshot::channel();
    tokio::spawn(relay(
        chunks,
        sink.clone(),
        (hello_tx, trailer_tx),
        (job.host.clone(), end),
    ));
    Ok(RemoteRunning {
        local,
        job,
        hello: Some(hello),
        trailer,
        hurry: None,
        remote: None,
        transport: transport.clone(),
        recorded,
    })
}

/// What the wrapper printed once the step ended: `exit=N` and the step's `$CAIRN_OUTPUT`; with
/// the last of the step's standard error, for the message of a failure.
#[derive(Debug)]
struct Trailer {
    text: Vec<u8>,
    stderr_tail: Vec<u8>,
}

/// What a connection said: the trailer (`None` if it never came: the connection or the wrapper
/// failed), and the bytes of output it forwarded.
#[derive(Debug, Default)]
struct Said {
    trailer: Option<Trailer>,
    forwarded: [u64; 2],
}

/// A stream cut at a line: what comes before it is forwarded as it arrives (less what could
/// begin the line, held until it is clear), what follows is kept.
#[derive(Debug)]
struct Cut {
    /// `\n<end>\n`: unguessable, made for the job.
    end: Vec<u8>,
    held: Vec<u8>,
    /// Everything after the line, once it was seen.
    after: Option<Vec<u8>>,
}

impl Cut {
    fn new(end: &str) -> Self {
        Self {
            end: format!("\n{end}\n").into_bytes(),
            held: Vec::new(),
            after: None,
        }
    }

    /// What of `data` comes before the line, to forward now.
    fn feed(&mut self, data: &[u8]) -> Vec<u8> {
        if let Some(after) = &mut self.after {
            after.extend_from_slice(data);
            return Vec::new();
        }
        self.held.extend_from_slice(data);
        if let Some(at) = find(&self.held, &self.end) {
            self.after = Some(self.held.split_off(at + self.end.len()));
            self.held.truncate(at);
            return std::mem::take(&mut self.held);
        }
        // Only an end that could begin the line is held back.
        let keep = (1..self.end.len().min(self.held.len() + 1))
            .rev()
            .find(|&k| self.held.ends_with(&self.end[..k]))
            .unwrap_or(0);
        let rest = self.held.split_off(self.held.len() - keep);
        std::mem::replace(&mut self.held, rest)
    }

    /// The trailer, once the line came a second time after the first (closing it).
    fn closed(&self) -> Option<&[u8]> {
        let after = self.after.as_deref()?;
        find(after, &self.end).map(|at| &after[..at])
    }
}

fn find(data: &[u8], what: &[u8]) -> Option<usize> {
    data.windows(what.len()).position(|w| w == what)
}

/// The client's output as the wrapper frames it. Standard output: its first line
/// (`cairn-remote ...`), then the step's output, then, once the step's group is gone, a line
/// `\n<end>\n`, the trailer (`exit=N` and the step's `$CAIRN_OUTPUT`) and the line again.
/// Standard error: the step's, then the line. Once both are in, the step's end is known without
/// waiting for the connection to close.
#[derive(Debug)]
struct Framing {
    hello: Option<oneshot::Sender<Remote>>,
    head: Vec<u8>,
    stdout: Cut,
    /// Standard error before the wrapper's start line (`\n<end>_S\n`): the login's, not the
    /// step's.
    begin: Option<Cut>,
    stderr: Cut,
}

impl Framing {
    fn new(hello: oneshot::Sender<Remote>, end: &str) -> Self {
        Self {
            hello: Some(hello),
            head: Vec::new(),
            stdout: Cut::new(end),
            begin: Some(Cut::new(&format!("{end}_S"))),
            stderr: Cut::new(end),
        }
    }

    /// What of `data` (from stdout) to forward now: what the login printed before the hello
    /// line, and the step's output.
    fn stdout(&mut self, data: &[u8], host: &str) -> (Vec<u8>, Vec<u8>) {
        if self.hello.is_none() {
            return (Vec::new(), self.stdout.feed(data));
        }
        self.head.extend_from_slice(data);
        let mut noise = Vec::new();
        while let Some(at) = self.head.iter().position(|b| *b == b'\n') {
            let line = String::from_utf8_lossy(&self.head[..at]).into_owned();
            if let Some(remote) = parse_hello(&line, host) {
                if let Some(tx) = self.hello.take() {
                    let _ = tx.send(remote);
                }
                let rest = self.head.split_off(at + 1);
                self.head.clear();
                return (noise, self.stdout.feed(&rest));
            }
            noise.extend(self.head.drain(..=at));
        }
        (noise, Vec::new())
    }

    /// What of `data` (from stderr) to forward now: what came before the start line, and the
    /// step's.
    fn stderr(&mut self, data: &[u8]) -> (Vec<u8>, Vec<u8>) {
        let Some(begin) = self.begin.as_mut() else {
            return (Vec::new(), self.stderr.feed(data));
        };
        let noise = begin.feed(data);
        match begin.after.take() {
            Some(after) => {
                self.begin = None;
                (noise, self.stderr.feed(&after))
            }
            None => (noise, Vec::new()),
        }
    }

    /// The trailer, once both streams are at their end line and the trailer is closed.
    fn complete(&self) -> Option<Vec<u8>> {
        self.stderr.after.as_ref()?;
        self.stdout.closed().map(<[u8]>::to_vec)
    }

    /// What is left when the output ended: held bytes (of stdout: noise, output; of stderr:
    /// noise, output), and the trailer if its first line came (closed or not: the connection
    /// ended).
    fn finish(&mut self) -> ([[Vec<u8>; 2]; 2], Option<Vec<u8>>) {
        let noise = std::mem::take(&mut self.head);
        let output = std::mem::take(&mut self.stdout.held);
        let err_noise = self
            .begin
            .as_mut()
            .map(|b| std::mem::take(&mut b.held))
            .unwrap_or_default();
        let err = std::mem::take(&mut self.stderr.held);
        let trailer = self
            .stdout
            .closed()
            .map(<[u8]>::to_vec)
            .or_else(|| self.stdout.after.clone());
        ([[noise, output], [err_noise, err]], trailer)
    }
}

/// Forwards the client's output to `sink`, less the wrapper's framing (see [`Framing`]); sends
/// the trailer as soon as the wrapper printed it whole (then stops forwarding: `sink` is
/// dropped, and what the client says after is read and dropped), or when the output ends
/// (`None` if it never came).
async fn relay(
    mut chunks: mpsc::Receiver<Chunk>,
    sink: mpsc::Sender<Chunk>,
    (hello, trailer): (oneshot::Sender<Remote>, oneshot::Sender<Said>),
    (host, end): (String, String),
) {
    let mut framing = Framing::new(hello, &end);
    let mut stderr_tail: Vec<u8> = Vec::new();
    let mut sink = Some(sink);
    let mut trailer = Some(trailer);
    let mut forwarded = [0u64; 2];
    while let Some(chunk) = chunks.recv().await {
        let Some(to) = &sink else { continue };
        let parts = if chunk.stream == Stream::Stdout {
            framing.stdout(&chunk.data, &host)
        } else {
            framing.stderr(&chunk.data)
        };
        let [noise, data] = [parts.0, parts.1];
        forward(
            to,
            chunk.stream,
            [noise, data],
            (&mut forwarded, &mut stderr_tail),
        )
        .await;
        if let Some(text) = framing.complete() {
            sink = None;
            if let Some(tx) = trailer.take() {
                let _ = tx.send(Said {
                    trailer: Some(Trailer {
                        text,
                        stderr_tail: std::mem::take(&mut stderr_tail),
                    }),
                    forwarded,
                });
            }
        }
    }
    let Some(tx) = trailer else { return };
    let ([out, err], text) = framing.finish();
    if let Some(to) = &sink {
        forward(to, Stream::Stdout, out, (&mut forwarded, &mut stderr_tail)).await;
        forward(to, Stream::Stderr, err, (&mut forwarded, &mut stderr_tail)).await;
    }
    let _ = tx.send(Said {
        trailer: text.map(|text| Trailer { text, stderr_tail }),
        forwarded,
    });
}

/// Sends `data` (the step's output, counted in `forwarded`) of `stream` to `to`. `noise` (the
/// login's, before the wrapper's framing: a `.bashrc` that prints) is not the step's and not in
/// its files: it goes only to `tail`, the last of stderr kept for the message of a step that did
/// not start, never into the log, whose offsets count the step's files.
async fn forward(
    to: &mpsc::Sender<Chunk>,
    stream: Stream,
    [noise, data]: [Vec<u8>; 2],
    (forwarded, tail): (&mut [u64; 2], &mut Vec<u8>),
) {
    if stream == Stream::Stderr {
        for part in [&noise, &data] {
            tail.extend_from_slice(part);
            let over = tail.len().saturating_sub(spawn::STDERR_TAIL);
            tail.drain(..over);
        }
    }
    if data.is_empty() {
        return;
    }
    forwarded[usize::from(stream == Stream::Stderr)] += data.len() as u64;
    let _ = to.send(Chunk { stream, data }).await;
}

fn parse_hello(line: &str, host: &str) -> Option<Remote> {
    let mut words = line.strip_prefix(HELLO)?.split_whitespace();
    Some(Remote {
        host: host.to_owned(),
        pid: words.next()?.parse().ok()?,
        start: words.next()?.parse().ok()?,
        boot_id: words.next()?.to_owned(),
    })
}

impl RemoteRunning {
    /// Ends the grace between TERM and KILL as soon as `hurry` turns true.
    #[must_use]
    pub fn hurried_by(mut self, hurry: watch::Receiver<bool>) -> Self {
        self.hurry = Some(hurry);
        self
    }

    /// Where the step runs, once the wrapper said it; `None` if it never will (the connection or
    /// the wrapper failed).
    pub async fn started(&mut self) -> Option<Remote> {
        if let Some(hello) = self.hello.take() {
            self.remote = hello.await.ok();
        }
        self.remote.clone()
    }

    /// Waits until the step ends, its timeout passes or `stop` turns true; then ends its group on
    /// the host (the grace decided by `grace` when the stop comes) and collects its exit code and
    /// outputs. A step not supervised has its directory removed there; a supervised one's stays
    /// until [`RemoteExit::recorded`] is sent.
    pub async fn wait_with_grace(
        mut self,
        mut stop: watch::Receiver<bool>,
        grace: impl FnOnce() -> Duration,
    ) -> RemoteExit {
        let remote = self.started().await;
        let Self {
            local,
            job,
            transport,
            mut trailer,
            hurry,
            recorded,
            ..
        } = self;
        let (stop_client, client_stop) = watch::channel(false);
        let client = Box::pin(local.wait(client_stop));
        let timeout = async {
            match job.timeout {
                Some(t) => tokio::time::sleep(t).await,
                None => std::future::pending().await,
            }
        };
        let stopped = tokio::select! {
            biased;
            said = &mut trailer => {
                let said = said.unwrap_or_default();
                return collect(&transport, &job, (remote.is_some(), said, recorded), client, None).await;
            }
            () = timeout => Stopped::TimedOut,
            () = stopped(&mut stop) => Stopped::Asked,
        };
        let grace = grace();
        if let Some(remote) = &remote {
            // A hurry (a second Ctrl-C) ends the grace: what is left is killed at once.
            let mut hurry = hurry;
            tokio::select! {
                _ = end(&transport, remote, grace, None) => {}
                () = async {
                    match hurry.as_mut() {
                        Some(h) => self::stopped(h).await,
                        None => std::future::pending().await,
                    }
                } => {
                    let _ = end(&transport, remote, Duration::ZERO, None).await;
                }
            }
        }
        // The wrapper says the end once the group is gone; a client that does not (a lost
        // connection) is ended here.
        let said = tokio::select! {
            said = &mut trailer => said.unwrap_or_default(),
            () = tokio::time::sleep(grace + Duration::from_secs(10)) => {
                let _ = stop_client.send(true);
                trailer.await.unwrap_or_default()
            }
        };
        collect(
            &transport,
            &job,
            (remote.is_some(), said, recorded),
            client,
            Some(stopped),
        )
        .await
    }
}

/// The step's exit code and outputs: from the trailer the wrapper printed (the client is then
/// left to end in the background), else (the connection was lost) read from its directory on
/// the host once the client ended; a step not supervised has that directory removed.
async fn collect(
    transport: &Transport,
    job: &Job,
    (started, said, recorded): (bool, Said, Option<Recorded>),
    client: std::pin::Pin<Box<impl Future<Output = Exit> + Send + 'static>>,
    stopped: Option<Stopped>,
) -> RemoteExit {
    let Said { trailer, forwarded } = said;
    let cut = trailer.is_none();
    let (said, mut exit, recorded) = if let Some(trailer) = trailer {
        // The wrapper ends by itself (a supervised one once told the end is recorded, or at the
        // end of its input).
        let client = tokio::spawn(client);
        let recorded = recorded.map(|mut recorded| {
            recorded.client = Some(client);
            recorded
        });
        let exit = Exit {
            code: None,
            signal: None,
            stopped: None,
            stderr_tail: String::from_utf8_lossy(&trailer.stderr_tail)
                .trim_end()
                .to_owned(),
            leftovers: 0,
            kept: Vec::new(),
        };
        (
            Ok(String::from_utf8_lossy(&trailer.text).into_owned()),
            exit,
            recorded,
        )
    } else {
        // Nothing more to tell a wrapper whose output ended.
        drop(recorded);
        let exit = client.await;
        let script = format!(
            "d=\"${{TMPDIR:-/tmp}}\"/{dir}\n[ -f \"$d/exit\" ] && printf 'exit=%s\\n' \"$(cat \"$d/exit\")\"\n[ -f \"$d/output\" ] && cat \"$d/output\"\nrm -rf \"$d\"\n",
            dir = quote(&job.dir)
        );
        // A supervised step's directory stays until its end is recorded.
        let script = if job.adopt {
            script.replace("rm -rf \"$d\"\n", "")
        } else {
            script
        };
        (run(transport, &job.host, &script).await, exit, None)
    };
    let (code, outputs) = match said {
        Ok(text) => match text.strip_prefix("exit=") {
            Some(rest) => {
                let (code, outputs) = rest.split_once('\n').unwrap_or((rest, ""));
                (code.trim().parse::<i32>().ok(), outputs.to_owned())
            }
            None => (None, String::new()),
        },
        Err(_) => (None, String::new()),
    };
    match code {
        // A shell reports a process killed by signal N as 128 + N.
        Some(c) if c > 128 && c < 128 + 65 => {
            exit.code = None;
            exit.signal = Some(c - 128);
        }
        Some(c) => {
            exit.code = Some(c);
            exit.signal = None;
        }
        None if !started => {
            let said = exit.stderr_tail.lines().collect::<Vec<_>>().join("; ");
            exit.stderr_tail = format!("the step did not start on `{}`: {said}", job.host);
            exit.code = None;
        }
        None => {}
    }
    // A supervised step's cut connection is attached to again even when its directory shows the
    // result: the rest of its output is streamed from there.
    let lost = job.adopt && cut && stopped.is_none() && started;
    exit.stopped = stopped.or(exit.stopped);
    RemoteExit {
        exit,
        outputs,
        lost,
        recorded,
        forwarded,
    }
}

/// Completes once `stop` turns true; never if its sender is gone.
pub async fn stopped(stop: &mut watch::Receiver<bool>) {
    if stop.wait_for(|s| *s).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Runs `script` with `sh` on `host`, sent on standard input; its standard output (after a line
/// it prints first: what the login printed before is not its), or what went wrong.
async fn run(transport: &Transport, host: &str, script: &str) -> Result<String, String> {
    let mark = format!("CAIRN_SAID_{}", random_token());
    let script = format!("printf '\\n%s\\n' {mark}\n{{\n{script}\n}}\n");
    let argv = transport.command(host, "sh");
    let mut child = tokio::process::Command::new(&argv[0])
        .args(&argv[1..])
        .env_remove(crate::proc::MARKER_VAR)
        .process_group(0)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot start `ssh`: {e}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        use tokio::io::AsyncWriteExt as _;
        let _ = stdin.write_all(script.as_bytes()).await;
    }
    let out = child
        .wait_with_output()
        .await
        .map_err(|e| format!("ssh to `{host}`: {e}"))?;
    if out.status.code() == Some(255) {
        return Err(unreachable(host, &String::from_utf8_lossy(&out.stderr)));
    }
    let said = String::from_utf8_lossy(&out.stdout);
    match said.split_once(&format!("\n{mark}\n")) {
        Some((_, said)) => Ok(said.to_owned()),
        None => Err(format!(
            "`{host}` did not run cairn's script: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )),
    }
}

/// Ends the process group `remote` started on its host (TERM, then KILL after `grace`), unless
/// its host rebooted or its pid is now another process's; with `dirs`, removes those directories
/// of the host's `$TMPDIR` too (a resume's sweep: what a killed run left there). Returns how many
/// of its processes were running.
pub async fn end(
    transport: &Transport,
    remote: &Remote,
    grace: Duration,
    dirs: Option<&[String]>,
) -> Result<usize, String> {
    transport.connect(&remote.host).await?;
    let mut script = format!(
        "{END_FUNCTIONS}found=0\nif [ \"$(cat /proc/sys/kernel/random/boot_id)\" = {boot} ]; then cairn_end {pid} {start} {grace}; fi\necho \"$found\"\n",
        boot = quote(&remote.boot_id),
        pid = remote.pid,
        start = remote.start,
        grace = tenths(grace),
    );
    for dir in dirs.unwrap_or_default() {
        let _ = writeln!(script, "rm -rf \"${{TMPDIR:-/tmp}}\"/{}", quote(dir));
    }
    let said = run(transport, &remote.host, &script).await?;
    Ok(said.trim().parse().unwrap_or(0))
}

/// The directory a transport's sockets are in.
impl Transport {
    #[must_use]
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn framing() -> (Framing, oneshot::Receiver<Remote>) {
        let (tx, rx) = oneshot::channel();
        (Framing::new(tx, "CAIRN_END_x"), rx)
    }

    /// The output split at every byte: the hello line, the step's output and the trailer come
    /// apart the same way, and the trailer is whole once both streams reached their end line.
    #[test]
    fn framing_separates_hello_output_and_trailer_at_any_split() {
        let stream = b"motd\ncairn-remote 42 7 boot-1\nout\nCAIRN_END_ not it\nlast\nCAIRN_END_x\nexit=3\nk=v\n\nCAIRN_END_x\n";
        let err = b"login noise\n\nCAIRN_END_x_S\noops\n\nCAIRN_END_x\nssh: closed\n";
        for split in 1..stream.len() {
            let (mut framing, mut rx) = framing();
            let (mut noise, mut out) = framing.stdout(&stream[..split], "h");
            let (more_noise, more) = framing.stdout(&stream[split..], "h");
            noise.extend(more_noise);
            out.extend(more);
            assert_eq!(String::from_utf8_lossy(&noise), "motd\n");
            assert_eq!(
                String::from_utf8_lossy(&out),
                "out\nCAIRN_END_ not it\nlast",
                "split at {split}"
            );
            assert_eq!(framing.complete(), None, "stderr's end line is not in yet");
            let at = split.min(err.len() - 1);
            let (mut err_noise, mut step_err) = framing.stderr(&err[..at]);
            let (more_noise, more) = framing.stderr(&err[at..]);
            err_noise.extend(more_noise);
            step_err.extend(more);
            assert_eq!(err_noise, b"login noise\n", "split at {at}");
            assert_eq!(step_err, b"oops\n", "split at {at}");
            assert_eq!(framing.complete().as_deref(), Some(&b"exit=3\nk=v\n"[..]));
            let remote = rx.try_recv().unwrap();
            assert_eq!((remote.pid, remote.start), (42, 7));
            assert_eq!(remote.boot_id, "boot-1");
        }
    }

    /// Output is held back only while its end could begin the end line.
    #[test]
    fn only_what_could_begin_the_end_line_is_held_back() {
        let mut cut = Cut::new("CAIRN_END_x");
        assert_eq!(cut.feed(b"last line\n"), b"last line");
        assert_eq!(cut.feed(b"more\nCAI"), b"\nmore");
        assert_eq!(cut.feed(b"RN things"), b"\nCAIRN things");
        assert!(cut.after.is_none());
    }

    /// A trailer cut short by a lost connection is still what came after the first end line.
    #[test]
    fn a_trailer_cut_short_is_what_came() {
        let (mut framing, _rx) = framing();
        framing.stdout(b"cairn-remote 1 2 b\nx\nCAIRN_END_x\nexit=0\nk=", "h");
        assert_eq!(framing.complete(), None);
        let ([[noise, output], _], trailer) = framing.finish();
        assert!(noise.is_empty() && output.is_empty());
        assert_eq!(trailer.as_deref(), Some(&b"exit=0\nk="[..]));
    }

    /// Without a hello line (the wrapper failed), everything is output.
    #[test]
    fn output_without_hello_is_kept() {
        let (mut framing, mut rx) = framing();
        let (mut out, none) = framing.stdout(b"mkdir: cannot create\nmore", "h");
        assert!(none.is_empty());
        // A line not yet ended is held until the output ends (then the relay sends it).
        let ([[left, _], _], trailer) = framing.finish();
        out.extend(left);
        assert_eq!(String::from_utf8_lossy(&out), "mkdir: cannot create\nmore");
        assert!(rx.try_recv().is_err());
        assert!(trailer.is_none());
    }

    #[test]
    fn a_destination_that_is_an_option_is_refused() {
        assert!(check_destination("-oProxyCommand=touch /tmp/x").is_err());
        assert!(check_destination("a b").is_err());
        assert!(check_destination("db-2").is_ok());
        assert!(check_destination("root@10.0.0.1").is_ok());
    }
}
