//! A small builder around the `cairn` binary.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
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

/// What of op `uuid`'s adopted attempts is left in `$TMPDIR` (which the test hosts share): their
/// directories and notes, by name.
pub fn adopt_left(uuid: &str) -> Vec<String> {
    std::fs::read_dir(std::env::temp_dir())
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with(&format!("cairn-adopt-{uuid}")))
        .collect()
}

pub fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

pub fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Whether the suite runs on PostgreSQL: `CAIRN_TEST_BACKEND=postgres` makes every [`Sandbox`] use
/// a fresh database on the server at 127.0.0.1:5432 instead of a SQLite file. Anything else, or
/// nothing, is SQLite.
pub fn postgres() -> bool {
    std::env::var("CAIRN_TEST_BACKEND").is_ok_and(|v| v == "postgres")
}

/// True, after printing why, when the suite runs on PostgreSQL and the calling test is about the
/// SQLite file itself (its bytes, its locks, its file system), which has no PostgreSQL meaning.
/// Such a test starts with `if sqlite_only("why") { return; }`.
pub fn sqlite_only(why: &str) -> bool {
    let skip = postgres();
    if skip {
        eprintln!("skipped on PostgreSQL: {why}");
    }
    skip
}

/// The PostgreSQL server the suite uses: local, trust authentication, as `postgres`.
pub const PG_SERVER: &str = "postgres@127.0.0.1:5432";

/// `psql` on the suite's server, connected to `database`, unaligned and quiet, stopping at the
/// first error.
fn psql(database: &str) -> Command {
    let mut command = Command::new("psql");
    command
        .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1"])
        .args(["-h", "127.0.0.1", "-p", "5432", "-U", "postgres", "-d"])
        .arg(database)
        .env_remove("PGPASSWORD");
    command
}

/// Runs `psql` with one `-c` per statement (each its own transaction: `CREATE DATABASE` may not
/// run inside one); its output, or why it failed.
fn psql_run(database: &str, statements: &[&str]) -> Result<String, String> {
    let mut command = psql(database);
    for statement in statements {
        command.arg("-c").arg(statement);
    }
    let out = command
        .output()
        .map_err(|e| format!("cannot run psql (postgresql-client): {e}"))?;
    if out.status.success() {
        Ok(stdout(&out))
    } else {
        Err(format!(
            "psql on {PG_SERVER}/{database}, {statements:?}: {}",
            stderr(&out).trim()
        ))
    }
}

/// Where a sandbox's cairn keeps its state.
enum Database {
    /// `cairn.db` in the sandbox directory.
    Sqlite(PathBuf),
    /// A database of its own on the suite's server, dropped with the sandbox; the secret key in a
    /// file of the sandbox directory.
    Postgres { name: String, key_file: PathBuf },
}

impl Database {
    /// A SQLite file in `dir`, or a fresh database on the suite's server (`on_postgres`).
    fn new(dir: &Path, on_postgres: bool) -> Self {
        // Numbers the databases of this test process.
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        if !on_postgres {
            return Self::Sqlite(dir.join("cairn.db"));
        }
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let name = format!("cairn_e2e_{}_{n}", std::process::id());
        // A database of that name is left over from an earlier run whose process had this pid.
        let drop = format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)");
        let create = format!("CREATE DATABASE {name}");
        psql_run("postgres", &[&drop, &create]).unwrap_or_else(|e| panic!("{e}"));
        let key_file = dir.join("cairn.key");
        write_key(&key_file);
        Self::Postgres { name, key_file }
    }
}

impl Drop for Database {
    fn drop(&mut self) {
        if let Self::Postgres { name, .. } = self {
            // `WITH (FORCE)` ends the connections a still-running cairn holds.
            let drop = format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)");
            if let Err(e) = psql_run("postgres", &[&drop]) {
                eprintln!("the test database is left behind: {e}");
            }
        }
    }
}

/// `bytes` in lower-case hex, two digits each.
fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// Writes a fresh secret key as cairn reads one: 32 random bytes as 64 hex digits, mode 0600.
fn write_key(path: &Path) {
    use std::io::{Read as _, Write as _};
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .expect("reads /dev/urandom");
    let hex = hex(&bytes);
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut f| f.write_all(format!("{hex}\n").as_bytes()))
        .unwrap_or_else(|e| panic!("cannot write the key {}: {e}", path.display()));
}

/// A scratch directory with a database, where plans are written and `cairn` runs. The database is
/// a SQLite file in the directory, or with `CAIRN_TEST_BACKEND=postgres` a fresh PostgreSQL
/// database (see [`postgres`]).
pub struct Sandbox {
    db: Database,
    dir: tempfile::TempDir,
}

impl Sandbox {
    pub fn new() -> Self {
        Self::on(postgres())
    }

    /// A sandbox whose database is a SQLite file, whatever `CAIRN_TEST_BACKEND` says.
    pub fn sqlite() -> Self {
        Self::on(false)
    }

    /// A sandbox whose database is a fresh PostgreSQL database, whatever `CAIRN_TEST_BACKEND`
    /// says.
    pub fn on_postgres() -> Self {
        Self::on(true)
    }

    fn on(postgres: bool) -> Self {
        let dir = tempfile::tempdir().unwrap();
        Self {
            db: Database::new(dir.path(), postgres),
            dir,
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

    /// What `CAIRN_DB` says: the SQLite file's path or the PostgreSQL URL.
    pub fn db(&self) -> OsString {
        match &self.db {
            Database::Sqlite(path) => path.clone().into_os_string(),
            Database::Postgres { name, .. } => format!("postgres://{PG_SERVER}/{name}").into(),
        }
    }

    /// The secret key cairn seals secret params with: beside the SQLite file (cairn makes it), or
    /// the sandbox's own file for PostgreSQL (made with the sandbox, named by
    /// `CAIRN_SECRET_KEY_FILE`).
    pub fn key_file(&self) -> PathBuf {
        match &self.db {
            Database::Sqlite(path) => path.with_extension("db.key"),
            Database::Postgres { key_file, .. } => key_file.clone(),
        }
    }

    /// Points `command` at this sandbox's database (and, for PostgreSQL, its key file).
    pub fn use_db(&self, command: &mut Command) {
        command
            .env("CAIRN_DB", self.db())
            .env_remove("CAIRN_SECRET_KEY");
        match &self.db {
            Database::Sqlite(_) => command.env_remove("CAIRN_SECRET_KEY_FILE"),
            Database::Postgres { key_file, .. } => command.env("CAIRN_SECRET_KEY_FILE", key_file),
        };
    }

    pub fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_cairn"));
        command
            .args(args)
            .current_dir(self.path())
            .env("NO_COLOR", "1");
        self.use_db(&mut command);
        command
    }

    /// `sqlite3` holding the sandbox's SQLite database's write lock (`BEGIN EXCLUSIVE`) once this
    /// returns, until it is killed; with `exclusive_mode` readers are shut out too. `first` runs
    /// inside the transaction first.
    pub fn hold_the_database(&self, exclusive_mode: bool, first: &str) -> Child {
        let mode = if exclusive_mode {
            "PRAGMA locking_mode=EXCLUSIVE; "
        } else {
            ""
        };
        let mut holder = Command::new("sqlite3")
            .arg(self.path().join("cairn.db"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        {
            use std::io::Write as _;
            let stdin = holder.stdin.as_mut().unwrap();
            writeln!(stdin, "{mode}BEGIN EXCLUSIVE; {first} SELECT 'locked';").unwrap();
            stdin.flush().unwrap();
        }
        let mut reader = std::io::BufReader::new(holder.stdout.take().unwrap());
        let mut line = String::new();
        while std::io::BufRead::read_line(&mut reader, &mut line).unwrap_or(0) > 0 {
            if line.trim() == "locked" {
                return holder;
            }
            line.clear();
        }
        let _ = holder.kill();
        let _ = holder.wait();
        panic!("sqlite3 never took the lock");
    }

    /// Runs `sql` on the sandbox's database (`sqlite3` or `psql`) and returns its output: one line
    /// per row, columns separated by `|` (both tools print rows that way).
    pub fn sql(&self, sql: &str) -> String {
        match &self.db {
            Database::Sqlite(path) => {
                let out = Command::new("sqlite3")
                    .arg(path)
                    .arg(sql)
                    .output()
                    .expect("sqlite3 runs");
                assert!(out.status.success(), "sqlite3 `{sql}`: {}", stderr(&out));
                stdout(&out)
            }
            Database::Postgres { name, .. } => {
                psql_run(name, &[sql]).unwrap_or_else(|e| panic!("{e}"))
            }
        }
    }

    /// Whether the database holds an op: a refused command stores nothing (on SQLite it does not
    /// even make the file; the PostgreSQL database exists from the start, maybe without tables).
    pub fn holds_ops(&self) -> bool {
        match &self.db {
            Database::Sqlite(path) => path.exists(),
            Database::Postgres { .. } => {
                self.sql("SELECT to_regclass('ops') IS NOT NULL").trim() == "t"
                    && self.sql("SELECT count(*) FROM ops").trim() != "0"
            }
        }
    }

    /// Asserts that the database does not hold `secret` in clear: the SQLite file and its WAL, or
    /// everything `pg_dump` writes out of the PostgreSQL database (text as it is, byte columns in
    /// hex, so the secret is looked for in both forms).
    pub fn assert_not_stored(&self, secret: &str) {
        match &self.db {
            Database::Sqlite(path) => {
                let wal = path.with_extension("db-wal");
                for file in [path, &wal] {
                    let bytes = std::fs::read(file).unwrap_or_default();
                    assert!(
                        !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
                        "{} holds the secret in clear",
                        file.display()
                    );
                }
            }
            Database::Postgres { name, .. } => {
                let out = Command::new("pg_dump")
                    .args(["-h", "127.0.0.1", "-p", "5432", "-U", "postgres", name])
                    .output()
                    .expect("pg_dump (postgresql-client) runs");
                assert!(out.status.success(), "pg_dump {name}: {}", stderr(&out));
                let dump = stdout(&out);
                assert!(
                    dump.contains("CREATE TABLE"),
                    "pg_dump {name} dumped no table"
                );
                let hex = hex(secret.as_bytes());
                assert!(
                    !dump.contains(secret) && !dump.contains(&hex),
                    "the PostgreSQL database {name} holds the secret in clear"
                );
            }
        }
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

    /// Waits until `name` exists (a step wrote it), up to `limit`.
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

/// Sends `signal` to a child process.
pub fn signal(child: &Child, signal: nix::sys::signal::Signal) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap()),
        signal,
    )
    .unwrap();
}

/// Waits until `done` holds, polling; fails the test, naming `what`, after two minutes rather
/// than hanging it.
pub fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let started = Instant::now();
    while !done() {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "{what} never happened"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Servers made by `examples/<example>/sandbox.sh` in a directory `path` of their own (readable
/// by the servers' user), with the `KEY=value` lines of the `env` file the script writes there;
/// taken down when dropped.
pub struct ExampleServers {
    pub path: PathBuf,
    script: PathBuf,
    env: String,
    _dir: tempfile::TempDir,
}

impl ExampleServers {
    pub fn up(example: &str, name: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .unwrap();
        let path = dir.path().join(name);
        let script = root().join("examples").join(example).join("sandbox.sh");
        let out = Command::new(&script).arg("up").arg(&path).output().unwrap();
        assert!(out.status.success(), "sandbox.sh up: {}", stderr(&out));
        let env = std::fs::read_to_string(path.join("env")).unwrap();
        Self {
            path,
            script,
            env,
            _dir: dir,
        }
    }

    /// The value of `key` in the `env` file.
    pub fn get(&self, key: &str) -> String {
        self.env
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{key}=")))
            .unwrap_or_else(|| panic!("no {key} in {}", self.env))
            .to_owned()
    }

    /// `sandbox.sh <what> <path> <args>`, which must succeed.
    pub fn run(&self, what: &str, args: &[&str]) {
        let out = Command::new(&self.script)
            .arg(what)
            .arg(&self.path)
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "sandbox.sh {what} {args:?}: {}",
            stderr(&out)
        );
    }
}

impl Drop for ExampleServers {
    fn drop(&mut self) {
        let _ = Command::new(&self.script)
            .arg("down")
            .arg(&self.path)
            .status();
    }
}
