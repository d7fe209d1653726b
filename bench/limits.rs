//! cairn's benchmark: every scenario of the brief's targets, each against the physical limit of
//! this machine measured in the same run, on a fresh database file.
//!
//! ```text
//! cargo bench -p cairn-bench --bench limits -- [--json FILE] [--only NAME,...] [--scale DIVISOR]
//!     [--db postgres://user@host:port/db]
//! ```
//!
//! It builds the real `cairn` binary with the bench profile (`cargo build --profile bench -p
//! cairn-cli`), or takes the one `CAIRN_BENCH_CAIRN` names, drives it as a user would, and reads what it recorded from the database. `--scale 10` divides every size by ten, for a quick look.
//! `--db` runs the PostgreSQL scenarios (`postgres.rs`) on that server instead.
//! See docs/BENCHMARKS.md for what each scenario measures and what limits it.

#![allow(clippy::print_stdout, clippy::cast_precision_loss)]

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

mod postgres;
mod remote;
mod sse;

use comfy_table::{Table, presets};
use rusqlite::{Connection, OpenFlags};
use serde_json::{Value, json};

/// How a scenario's number is judged.
#[derive(Clone, Copy)]
enum Target {
    /// At least this share of the limit.
    Ratio(f64),
    /// At least this many per second.
    AtLeast(f64),
    /// At most this much (milliseconds or megabytes).
    AtMost(f64),
    /// No target: reported for comparison.
    None,
}

struct Row {
    id: &'static str,
    what: String,
    value: f64,
    unit: &'static str,
    /// A rate (higher is better) or a cost (lower is better).
    rate: bool,
    limit: f64,
    limit_what: String,
    target: Target,
    /// The best figure the brief quotes for the peers, in the same unit.
    peer: Option<f64>,
}

impl Row {
    /// How close to the limit: the value over the limit for a rate, the limit over the value for a
    /// cost; 1.0 is the machine's limit.
    fn ratio(&self) -> f64 {
        if self.rate {
            self.value / self.limit
        } else {
            self.limit / self.value
        }
    }

    fn meets(&self) -> Option<bool> {
        let peer_ok = self.peer.is_none_or(|p| {
            if self.rate {
                self.value > p
            } else {
                self.value < p
            }
        });
        let target_ok = match self.target {
            Target::Ratio(r) => self.ratio() >= r,
            Target::AtLeast(v) => self.value >= v,
            Target::AtMost(v) => self.value <= v,
            Target::None => return self.peer.map(|_| peer_ok),
        };
        Some(target_ok && peer_ok)
    }

    fn target_text(&self) -> String {
        let mut text = match self.target {
            Target::Ratio(r) => format!("≥ {:.0}% of limit", r * 100.0),
            Target::AtLeast(v) => format!("≥ {} {}", number(v), self.unit),
            Target::AtMost(v) => format!("≤ {} {}", number(v), self.unit),
            Target::None => String::new(),
        };
        if let Some(p) = self.peer {
            if !text.is_empty() {
                text.push_str("; ");
            }
            let _ = write!(
                text,
                "peers {} {}",
                if self.rate { "≤" } else { "≥" },
                number(p)
            );
        }
        text
    }

    fn to_json(&self) -> Value {
        json!({
            "id": self.id,
            "scenario": self.what,
            "value": self.value,
            "unit": self.unit,
            "limit": self.limit,
            "limit_is": self.limit_what,
            "ratio": self.ratio(),
            "target": self.target_text(),
            "meets": self.meets(),
        })
    }
}

fn number(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// One scenario: it measures and adds its rows.
type Scenario = fn(&mut Bench);

struct Bench {
    cairn: PathBuf,
    dir: PathBuf,
    scale: usize,
    only: Option<Vec<String>>,
    rows: Vec<Row>,
    /// How long `cairn --version` takes: the floor of any command.
    floor_ms: Option<f64>,
    /// `--db`: the PostgreSQL server the PostgreSQL scenarios run on.
    pg: Option<String>,
}

fn main() {
    let mut args = std::env::args().skip(1);
    let mut json_out = None;
    let mut only = None;
    let mut scale = 1;
    let mut pg = None;
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--json" => json_out = args.next().map(PathBuf::from),
            "--only" => {
                only = args
                    .next()
                    .map(|v| v.split(',').map(str::to_owned).collect::<Vec<_>>());
            }
            "--scale" => scale = args.next().and_then(|v| v.parse().ok()).unwrap_or(1),
            "--db" => pg = args.next(),
            // Passed by `cargo bench` itself.
            "--bench" => {}
            other => {
                eprintln!(
                    "unknown argument `{other}`; usage: limits [--json FILE] [--only NAME,...] [--scale N] [--db postgres://...]"
                );
                std::process::exit(2);
            }
        }
    }
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("bench");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("cannot create the bench directory");
    let mut bench = Bench {
        cairn: build_cairn(),
        dir,
        scale: scale.max(1),
        only,
        rows: Vec::new(),
        floor_ms: None,
        pg,
    };
    let scenarios: [(&str, Scenario); 11] = [
        ("chain", Bench::chain),
        ("independent", Bench::independent),
        ("shell", Bench::shell),
        ("for-each", Bench::for_each),
        ("resume", Bench::resume),
        ("status", Bench::status),
        ("memory", Bench::memory),
        ("validate", Bench::validate),
        ("serve", Bench::serve),
        ("sse", Bench::sse),
        ("remote", Bench::remote),
    ];
    let scenarios: &[(&str, Scenario)] = if bench.pg.is_some() {
        &postgres::SCENARIOS
    } else {
        &scenarios
    };
    for &(name, scenario) in scenarios {
        if bench
            .only
            .as_ref()
            .is_some_and(|o| !o.iter().any(|n| n == name))
        {
            continue;
        }
        eprintln!("== {name}");
        scenario(&mut bench);
    }
    print_table(&bench.rows);
    if let Some(path) = json_out {
        let doc = json!({
            "machine": machine(),
            "scale": bench.scale,
            "scenarios": bench.rows.iter().map(Row::to_json).collect::<Vec<_>>(),
        });
        std::fs::write(&path, serde_json::to_string_pretty(&doc).unwrap())
            .expect("cannot write the JSON file");
        eprintln!("wrote {}", path.display());
    }
}

/// Builds `cairn` with this benchmark's own profile and returns its path. The benchmark is a crate
/// of its own, so cargo does not build another crate's binary for it.
fn build_cairn() -> PathBuf {
    // `CAIRN_BENCH_CAIRN`: a `cairn` built before, to measure one build against another.
    if let Some(given) = std::env::var_os("CAIRN_BENCH_CAIRN") {
        return PathBuf::from(given);
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| env!("CARGO").into());
    let built = Command::new(cargo)
        .args([
            "build",
            "--profile",
            "bench",
            "-p",
            "cairn-cli",
            "--bin",
            "cairn",
        ])
        .status()
        .expect("cannot run cargo to build `cairn`");
    if !built.success() {
        eprintln!("building `cairn` failed ({built})");
        std::process::exit(2);
    }
    let cairn = profile_dir().join("cairn");
    if !cairn.is_file() {
        eprintln!(
            "`cairn` is missing from {} after it was built (set CARGO_TARGET_DIR to the target directory)",
            cairn.display()
        );
        std::process::exit(2);
    }
    cairn
}

/// Where this build's profile puts binaries: the benchmark runs as `<target>/<profile>/deps/limits-*`
/// and `cairn` is `<target>/<profile>/cairn`; failing that, the bench profile's `release` directory
/// of `CARGO_TARGET_DIR` or of the workspace's `target`.
fn profile_dir() -> PathBuf {
    let beside = std::env::current_exe().ok().and_then(|exe| {
        let deps = exe.parent()?;
        (deps.file_name()? == "deps").then(|| deps.parent().map(Path::to_path_buf))?
    });
    beside.unwrap_or_else(|| {
        let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(
            || Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"),
            PathBuf::from,
        );
        target.join("release")
    })
}

fn print_table(rows: &[Row]) {
    let mut table = Table::new();
    table.load_style(presets::ASCII_MARKDOWN);
    table.set_header(["scenario", "cairn", "limit", "ratio", "target", "meets"]);
    for row in rows {
        table.add_row([
            row.what.clone(),
            format!("{} {}", number(row.value), row.unit),
            format!("{} ({})", number(row.limit), row.limit_what),
            format!("{:.0}%", row.ratio() * 100.0),
            row.target_text(),
            match row.meets() {
                Some(true) => "yes".to_owned(),
                Some(false) => "NO".to_owned(),
                None => String::new(),
            },
        ]);
    }
    println!("{table}");
}

fn machine() -> Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_owned())
        })
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, std::num::NonZero::get);
    let memory = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| t.lines().next().map(str::to_owned))
        .unwrap_or_default();
    json!({ "cpu": cpu, "cores": cores, "memory": memory })
}

fn now_ms() -> i64 {
    i64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis(),
    )
    .unwrap()
}

/// How many times the scenarios measured against a rate limit (`chain`, `shell`) are run.
const ROUNDS: usize = 3;

/// The rate of a step that is one spawn (at `spawns` a second) then one durable commit (at
/// `commits` a second), one after the other.
fn spawn_and_commit([spawns, commits]: [f64; 2]) -> f64 {
    1.0 / (1.0 / spawns + 1.0 / commits)
}

/// Runs `argv` from Rust, with nothing to read or write, and waits for its success.
fn spawn_quiet(argv: &[String]) {
    let status = Command::new(&argv[0])
        .args(&argv[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
}

/// One durable commit of one small row (the `i`th) into a table made by `Bench::raw_table`.
fn commit_row(conn: &Connection, i: usize) {
    conn.execute_batch("BEGIN IMMEDIATE").unwrap();
    conn.execute(
        "INSERT INTO t (at, v) VALUES (?1, 'succeeded')",
        [i64::try_from(i).unwrap()],
    )
    .unwrap();
    conn.execute_batch("COMMIT").unwrap();
}

fn per_second(n: usize, took: Duration) -> f64 {
    n as f64 / took.as_secs_f64()
}

fn median(mut samples: Vec<f64>) -> f64 {
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

/// The resident-set high-water mark of a live process, in MB.
fn peak_rss_mb(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: f64 = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kb / 1024.0)
}

/// Waits for `child`, sampling its peak RSS until it ends; fails the bench if it failed.
fn wait_sampling(mut child: Child, what: &str) -> f64 {
    let mut peak: f64 = 0.0;
    loop {
        if let Some(mb) = peak_rss_mb(child.id()) {
            peak = peak.max(mb);
        }
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "{what} failed: {status}");
            return peak;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

impl Bench {
    fn n(&self, full: usize) -> usize {
        (full / self.scale).max(1)
    }

    /// A fresh directory for a scenario; its database is `cairn.db` inside.
    fn fresh(&self, name: &str) -> PathBuf {
        let dir = self.dir.join(name);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn cairn(&self, dir: &Path, args: &[&str]) -> Command {
        let mut command = Command::new(&self.cairn);
        command
            .args(args)
            .current_dir(dir)
            .env("CAIRN_DB", dir.join("cairn.db"))
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        command
    }

    /// Runs a cairn command to its end; the bench stops if it fails.
    fn timed(&self, dir: &Path, args: &[&str]) -> Duration {
        let started = Instant::now();
        let out = self.cairn(dir, args).output().unwrap();
        let took = started.elapsed();
        assert!(
            out.status.success(),
            "cairn {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        took
    }

    fn median_ms(&self, dir: &Path, args: &[&str], runs: usize) -> f64 {
        median(
            (0..runs)
                .map(|_| self.timed(dir, args).as_secs_f64() * 1000.0)
                .collect(),
        )
    }

    /// The rate of durable commits (WAL, `synchronous=FULL`: cairn's pragmas) of one small row
    /// each, on a fresh file in the bench's directory.
    fn raw_commits(&self) -> f64 {
        let conn = self.raw_table("raw-commits");
        let n = self.n(5000);
        let started = Instant::now();
        for i in 0..n {
            commit_row(&conn, i);
        }
        per_second(n, started.elapsed())
    }

    /// A fresh database (`<dir>/raw.db`) as cairn sets its own (WAL, `synchronous=FULL`) with
    /// one small table, for [`commit_row`].
    fn raw_table(&self, name: &str) -> Connection {
        let dir = self.fresh(name);
        let conn = Connection::open(dir.join("raw.db")).unwrap();
        conn.pragma_update(None, "journal_mode", "WAL").unwrap();
        conn.pragma_update(None, "synchronous", "FULL").unwrap();
        conn.execute_batch("CREATE TABLE t (id INTEGER PRIMARY KEY, at INTEGER, v TEXT)")
            .unwrap();
        conn
    }

    /// The rate at which SQLite stores what a finished step is (an attempt row, its task's update,
    /// an event) when every step shares one durable commit: no engine at all.
    fn raw_rows(&self, n: usize) -> f64 {
        let dir = self.fresh("raw-rows");
        let mut conn = Connection::open(dir.join("raw.db")).unwrap();
        conn.pragma_update(None, "journal_mode", "WAL").unwrap();
        conn.pragma_update(None, "synchronous", "FULL").unwrap();
        conn.execute_batch(
            "CREATE TABLE tasks (no INTEGER PRIMARY KEY, status TEXT, ended_at INTEGER);
             CREATE TABLE attempts (no INTEGER, n INTEGER, status TEXT, at INTEGER, PRIMARY KEY (no, n)) WITHOUT ROWID;
             CREATE TABLE events (seq INTEGER PRIMARY KEY, at INTEGER, kind TEXT, message TEXT);",
        )
        .unwrap();
        let tx = conn.transaction().unwrap();
        for i in 0..n {
            tx.execute(
                "INSERT INTO tasks (no, status) VALUES (?1, 'pending')",
                [i64::try_from(i).unwrap()],
            )
            .unwrap();
        }
        tx.commit().unwrap();
        let started = Instant::now();
        let tx = conn.transaction().unwrap();
        {
            let mut attempt = tx
                .prepare("INSERT INTO attempts (no, n, status, at) VALUES (?1, 1, 'succeeded', ?2)")
                .unwrap();
            let mut task = tx
                .prepare("UPDATE tasks SET status = 'succeeded', ended_at = ?2 WHERE no = ?1")
                .unwrap();
            let mut event = tx
                .prepare("INSERT INTO events (at, kind, message) VALUES (?2, 'task-succeeded', ?1)")
                .unwrap();
            for i in 0..n {
                let i = i64::try_from(i).unwrap();
                attempt.execute([i, now_ms()]).unwrap();
                task.execute([i, now_ms()]).unwrap();
                event.execute([i, now_ms()]).unwrap();
            }
        }
        tx.commit().unwrap();
        per_second(n, started.elapsed())
    }

    /// How long `cairn --version` takes: starting the binary and nothing else.
    fn floor_ms(&mut self) -> f64 {
        if let Some(ms) = self.floor_ms {
            return ms;
        }
        let dir = self.fresh("floor");
        let ms = self.median_ms(&dir, &["--version"], 21);
        self.floor_ms = Some(ms);
        ms
    }

    /// The rate of spawning `argv` from Rust and waiting for it, one after another.
    fn raw_spawns(argv: &[String], n: usize) -> f64 {
        let started = Instant::now();
        for _ in 0..n {
            spawn_quiet(argv);
        }
        per_second(n, started.elapsed())
    }

    /// One spawn of `argv` then one durable commit of one small row, `n` times: the two parts of
    /// a shell step's limit done as a step must do them, one after the other. On a virtual
    /// machine this is slower than the two rates measured apart make it (`spawn_and_commit`):
    /// a commit after an idle millisecond costs more than one right after another.
    /// The mean spawn and commit of the loop are shown, to compare with the two loops apart.
    fn raw_spawns_then_commits(&self, argv: &[String], n: usize) -> f64 {
        let conn = self.raw_table("raw-spawns-commits");
        let (mut spawning, mut committing) = (Duration::ZERO, Duration::ZERO);
        let started = Instant::now();
        for i in 0..n {
            let spawned = Instant::now();
            spawn_quiet(argv);
            let committed = Instant::now();
            spawning += committed - spawned;
            commit_row(&conn, i);
            committing += committed.elapsed();
        }
        let rate = per_second(n, started.elapsed());
        let each = |total: Duration| total.as_secs_f64() * 1e6 / n as f64;
        eprintln!(
            "   one after the other: {} /s, a spawn {:.0} µs, a commit {:.0} µs",
            number(rate),
            each(spawning),
            each(committing)
        );
        rate
    }

    /// cairn's rate and its limit's, measured in [`ROUNDS`] rounds, the limit just before and just
    /// after cairn's run in each (their mean is the round's limit): this machine's speed drifts by
    /// a quarter within minutes. The round with the median ratio is the result.
    fn paired(
        &mut self,
        mut limit: impl FnMut(&mut Self) -> f64,
        cairn: impl FnMut(&mut Self) -> f64,
    ) -> (f64, f64) {
        let (value, [limit]) = self.paired_parts(|bench| [limit(bench)], |[l]| l, cairn);
        (value, limit)
    }

    /// [`Self::paired`] for a limit made of several rates measured together (`parts`, each the
    /// mean of its measurements before and after cairn's run), which `combine` makes one. The
    /// median round's value and parts.
    fn paired_parts<const K: usize>(
        &mut self,
        mut parts: impl FnMut(&mut Self) -> [f64; K],
        combine: impl Fn([f64; K]) -> f64,
        mut cairn: impl FnMut(&mut Self) -> f64,
    ) -> (f64, [f64; K]) {
        let mut rounds: Vec<(f64, [f64; K])> = (0..ROUNDS)
            .map(|round| {
                let before = parts(self);
                let value = cairn(self);
                let after = parts(self);
                let mean: [f64; K] = std::array::from_fn(|i| f64::midpoint(before[i], after[i]));
                let show = |p: [f64; K]| number(combine(p));
                let limit = combine(mean);
                let of_parts = if K > 1 {
                    let each: Vec<String> = mean.iter().map(|&p| number(p)).collect();
                    format!(" [of {}]", each.join(", "))
                } else {
                    String::new()
                };
                eprintln!(
                    "   round {}: {} against a limit of {}{of_parts} ({} before, {} after): {:.0}%",
                    round + 1,
                    number(value),
                    number(limit),
                    show(before),
                    show(after),
                    value / limit * 100.0
                );
                (value, mean)
            })
            .collect();
        rounds.sort_by(|a, b| (a.0 / combine(a.1)).total_cmp(&(b.0 / combine(b.1))));
        rounds[rounds.len() / 2]
    }

    /// 1. A serial chain of `noop` steps: one durable commit per step at best.
    fn chain(&mut self) {
        let n = self.n(10_000);
        let (value, limit) = self.paired(
            |bench| bench.raw_commits(),
            |bench| {
                let dir = bench.fresh("chain");
                write_chain(&dir, "name: chain\n", n, "noop: true");
                let took = bench.timed(&dir, &["-q", "run", "plan.yaml"]);
                op_rate(&dir, n, took)
            },
        );
        self.rows.push(Row {
            id: "chain",
            what: format!("serial chain of {n} noop steps"),
            value,
            unit: "steps/s",
            rate: true,
            limit,
            limit_what: "durable SQLite commits/s".to_owned(),
            target: Target::Ratio(0.85),
            peer: Some(470.0),
        });
    }

    /// 2. Independent `noop` steps: group commit.
    fn independent(&mut self) {
        let n = self.n(10_000);
        let dir = self.fresh("independent");
        let mut plan = format!("name: independent\nmax_parallel: {n}\nsteps:\n");
        for i in 0..n {
            let _ = writeln!(plan, "  - id: s{i}\n    noop: true");
        }
        std::fs::write(dir.join("plan.yaml"), plan).unwrap();
        let took = self.timed(&dir, &["-q", "run", "plan.yaml"]);
        self.rows.push(Row {
            id: "independent",
            what: format!("{n} independent noop steps"),
            value: op_rate(&dir, n, took),
            unit: "steps/s",
            rate: true,
            limit: self.raw_rows(n),
            limit_what: "steps' rows/s in one SQLite commit".to_owned(),
            target: Target::AtLeast(25_000.0),
            peer: Some(470.0),
        });
    }

    /// 3. Sequential `run: "true"` steps, with bash and with `shell: sh`. A step can go no faster
    ///    than one spawn and one durable commit: the limit is `1 / (1/spawns + 1/commits)`, both
    ///    rates measured in the same round. Beside it: the ratio to the spawn rate alone, and to
    ///    the rate of the same spawn and commit done one after the other in a loop (what a step
    ///    does), measured in the same round too.
    fn shell(&mut self) {
        let n = self.n(1000);
        for (shell, peer) in [("bash", None), ("sh", Some(655.0))] {
            let argv = if shell == "bash" {
                plans::model::Shell::Bash
            } else {
                plans::model::Shell::Sh
            }
            .command_line("true");
            let (value, [spawns, commits, both]) = self.paired_parts(
                |bench| {
                    [
                        Self::raw_spawns(&argv, n),
                        bench.raw_commits(),
                        bench.raw_spawns_then_commits(&argv, n),
                    ]
                },
                |[spawns, commits, _]| spawn_and_commit([spawns, commits]),
                |bench| {
                    let dir = bench.fresh(&format!("shell-{shell}"));
                    let head = format!("name: shell-{shell}\nshell: {shell}\n");
                    write_chain(&dir, &head, n, "run: \"true\"");
                    let took = bench.timed(&dir, &["-q", "run", "plan.yaml"]);
                    op_rate(&dir, n, took)
                },
            );
            self.rows.push(Row {
                id: if shell == "bash" {
                    "shell-bash"
                } else {
                    "shell-sh"
                },
                what: format!("{n} sequential `run: \"true\"` steps, {shell}"),
                value,
                unit: "steps/s",
                rate: true,
                limit: spawn_and_commit([spawns, commits]),
                limit_what: format!(
                    "one spawn of `{}` from Rust ({} /s) and one durable commit ({} /s); {:.0}% of the spawn rate alone; {:.0}% of the two done one after the other ({} /s)",
                    argv.join(" "),
                    number(spawns),
                    number(commits),
                    value / spawns * 100.0,
                    value / both * 100.0,
                    number(both),
                ),
                target: Target::Ratio(0.90),
                peer,
            });
        }
    }

    /// 4. A fan-out over a list param.
    fn for_each(&mut self) {
        let n = self.n(10_000);
        let dir = self.fresh("for-each");
        // Every item at once, as the independent steps.
        write_fan_out(&dir, n, n);
        let took = self.timed(&dir, &["-q", "run", "plan.yaml", "--params", "items.json"]);
        self.rows.push(Row {
            id: "for-each",
            what: format!("for_each over {n} items (noop)"),
            value: op_rate(&dir, n, took),
            unit: "items/s",
            rate: true,
            limit: self.raw_rows(n),
            limit_what: "steps' rows/s in one SQLite commit".to_owned(),
            target: Target::AtLeast(25_000.0),
            peer: None,
        });
    }

    /// 5. An op of 1,000,000 tasks killed (`kill -9`) half done, then resumed: how long until its
    ///    first new task starts.
    fn resume(&mut self) {
        let n = self.n(1_000_000);
        let dir = self.fresh("resume");
        write_fan_out(&dir, n, plans::model::DEFAULT_MAX_PARALLEL as usize);
        let mut run = self
            .cairn(&dir, &["-q", "run", "plan.yaml", "--params", "items.json"])
            .spawn()
            .unwrap();
        let db = dir.join("cairn.db");
        let half = i64::try_from(n / 2).unwrap();
        loop {
            std::thread::sleep(Duration::from_millis(20));
            if let Some(status) = run.try_wait().unwrap() {
                panic!("the op ended ({status}) before it was half done");
            }
            let done = read_only(&db).and_then(|c| {
                c.query_row(
                    "SELECT count(*) FROM tasks WHERE op_id = 1 AND status = 'succeeded'",
                    [],
                    |r| r.get::<_, i64>(0),
                )
                .ok()
            });
            if done.is_some_and(|d| d >= half) {
                break;
            }
        }
        run.kill().unwrap();
        run.wait().unwrap();
        let done: i64 = read_only(&db)
            .unwrap()
            .query_row(
                "SELECT count(*) FROM tasks WHERE op_id = 1 AND status = 'succeeded'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        let before = now_ms();
        let started = Instant::now();
        self.timed(&dir, &["-q", "resume", "1"]);
        let whole = started.elapsed();
        let first: i64 = read_only(&db)
            .unwrap()
            .query_row(
                "SELECT min(started_at) FROM attempts WHERE op_id = 1 AND started_at >= ?1",
                [before],
                |r| r.get(0),
            )
            .unwrap();
        let total: i64 = read_only(&db)
            .unwrap()
            .query_row("SELECT count(*) FROM tasks WHERE op_id = 1", [], |r| {
                r.get(0)
            })
            .unwrap();
        eprintln!(
            "   {total} tasks, {done} done at the kill; the resume ran the rest in {:.1} s",
            whole.as_secs_f64()
        );
        let floor = self.floor_ms();
        self.rows.push(Row {
            id: "resume",
            what: format!("resume of {total} tasks, {done} done: first new task starts"),
            value: (first - before) as f64,
            unit: "ms",
            rate: false,
            limit: floor,
            limit_what: "start-up of the binary".to_owned(),
            target: Target::AtMost(1000.0),
            // DBOS's figure is for 100,000 tasks: compared only at that size.
            peer: (n == 100_000).then_some(1900.0),
        });
    }

    /// 6. `cairn status` with 10,000,000 ops stored.
    fn status(&mut self) {
        let n = self.n(10_000_000);
        let dir = self.fresh("status");
        fill_ops(&dir.join("cairn.db"), n);
        let floor = self.floor_ms();
        for (args, what) in [
            (&["status"][..], "`cairn status` (default page)"),
            (
                &["status", "--json", "--limit", "100"][..],
                "`cairn status --json --limit 100`",
            ),
        ] {
            let ms = self.median_ms(&dir, args, 21);
            self.rows.push(Row {
                id: if args.len() == 1 {
                    "status"
                } else {
                    "status-json"
                },
                what: format!("{what}, {n} ops stored"),
                value: ms,
                unit: "ms",
                rate: false,
                limit: floor,
                limit_what: "start-up of the binary".to_owned(),
                target: Target::AtMost(50.0),
                peer: None,
            });
        }
    }

    /// 7. Peak memory of running an op of 1,000,000 tasks to its end.
    fn memory(&mut self) {
        let n = self.n(1_000_000);
        let dir = self.fresh("memory");
        write_fan_out(&dir, n, plans::model::DEFAULT_MAX_PARALLEL as usize);
        let started = Instant::now();
        let run = self
            .cairn(&dir, &["-q", "run", "plan.yaml", "--params", "items.json"])
            .spawn()
            .unwrap();
        let peak = wait_sampling(run, "the fan-out op");
        eprintln!(
            "   ran {n} items in {:.1} s",
            started.elapsed().as_secs_f64()
        );
        let small = self.fresh("memory-floor");
        std::fs::write(
            small.join("plan.yaml"),
            "name: one\nsteps:\n  - id: wait\n    sleep: 300ms\n",
        )
        .unwrap();
        let floor = wait_sampling(
            self.cairn(&small, &["-q", "run", "plan.yaml"])
                .spawn()
                .unwrap(),
            "a one-task op",
        );
        self.rows.push(Row {
            id: "memory",
            what: format!("peak RSS running an op of {n} tasks"),
            value: peak,
            unit: "MB",
            rate: false,
            limit: floor,
            limit_what: "RSS of a one-task op".to_owned(),
            target: Target::AtMost(1024.0),
            peer: None,
        });
    }

    /// 8. `cairn validate` of a 100,000-step plan.
    fn validate(&mut self) {
        let n = self.n(100_000);
        let dir = self.fresh("validate");
        write_chain(
            &dir,
            "name: big\nparams:\n  target: { type: string, required: true }\n",
            n,
            "run: echo {{ params.target }} > \"$CAIRN_OUTPUT\"",
        );
        let ms = self.median_ms(&dir, &["validate", "plan.yaml"], 11);
        let floor = self.floor_ms();
        self.rows.push(Row {
            id: "validate",
            what: format!("`cairn validate` of a {n}-step plan"),
            value: ms,
            unit: "ms",
            rate: false,
            limit: floor,
            limit_what: "start-up of the binary".to_owned(),
            target: Target::AtMost(2000.0),
            peer: None,
        });
    }

    /// 9. Queued ops drained by `serve --once --workers 8`.
    fn serve(&mut self) {
        let n = self.n(1000);
        let dir = self.fresh("serve");
        std::fs::write(
            dir.join("plan.yaml"),
            "name: queued\nparams:\n  n: { type: int, required: true }\ntitle: op {{ params.n }}\nsteps:\n  - id: a\n    noop: true\n  - id: b\n    needs: [a]\n    noop: true\n",
        )
        .unwrap();
        for i in 0..n {
            self.timed(&dir, &["submit", "plan.yaml", "-p", &format!("n={i}")]);
        }
        let took = self.timed(&dir, &["-q", "serve", "--once", "--workers", "8"]);
        let left: i64 = read_only(&dir.join("cairn.db"))
            .unwrap()
            .query_row(
                "SELECT count(*) FROM ops WHERE status <> 'succeeded'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(left, 0, "every queued op succeeded");
        let limit = self.raw_commits();
        self.rows.push(Row {
            id: "serve",
            what: format!("{n} queued ops (2 noop steps each), serve --once --workers 8"),
            value: per_second(n, took),
            unit: "ops/s",
            rate: true,
            limit,
            limit_what: "durable SQLite commits/s".to_owned(),
            target: Target::None,
            peer: None,
        });
    }
}

/// Steps per second over op 1's run as it recorded it (from its start to its end); the wall time
/// of the whole command (start-up, reading and storing the plan included) is printed beside it.
fn op_rate(dir: &Path, n: usize, wall: Duration) -> f64 {
    let ms: i64 = read_only(&dir.join("cairn.db"))
        .unwrap()
        .query_row(
            "SELECT ended_at - started_at FROM ops WHERE id = 1",
            [],
            |r| r.get(0),
        )
        .unwrap();
    eprintln!(
        "   {n} in {ms} ms from the op's start to its end; {:.0} ms for the whole command",
        wall.as_secs_f64() * 1000.0
    );
    n as f64 / (ms.max(1) as f64 / 1000.0)
}

fn read_only(db: &Path) -> Option<Connection> {
    Connection::open_with_flags(db, OpenFlags::SQLITE_OPEN_READ_ONLY).ok()
}

/// `plan.yaml`: `head` (the plan's keys before `steps`), then a chain of `n` steps `s0`, `s1`, ...,
/// each needing the one before, each doing `action`.
fn write_chain(dir: &Path, head: &str, n: usize, action: &str) {
    let mut plan = format!("{head}steps:\n");
    for i in 0..n {
        let _ = writeln!(plan, "  - id: s{i}");
        if i > 0 {
            let _ = writeln!(plan, "    needs: [s{}]", i - 1);
        }
        let _ = writeln!(plan, "    {action}");
    }
    std::fs::write(dir.join("plan.yaml"), plan).unwrap();
}

/// A plan with one `noop` step fanned out over the list param `items`, and `items.json` of `n`;
/// `max_parallel` items at once.
fn write_fan_out(dir: &Path, n: usize, max_parallel: usize) {
    std::fs::write(
        dir.join("plan.yaml"),
        format!("name: fan-out\nmax_parallel: {max_parallel}\nparams:\n  items: {{ type: list, required: true }}\nsteps:\n  - id: work\n    for_each: \"{{{{ params.items }}}}\"\n    noop: true\n"),
    )
    .unwrap();
    let items: Vec<usize> = (0..n).collect();
    std::fs::write(
        dir.join("items.json"),
        serde_json::to_string(&json!({ "items": items })).unwrap(),
    )
    .unwrap();
}

/// Stores `n` ended ops, as many runs over months would leave them: the first submitted through
/// cairn's own store, the others copied from its rows with SQL (each op's own id, uuid, title,
/// status, params and times; its tasks and events as the first's), a million ops a transaction.
/// Submitting ten million ops one by one through the store would take the benchmark most of an
/// hour; the rows it leaves are the rows a submit writes, so `status` reads the same database.
fn fill_ops(db: &Path, n: usize) {
    use store::{Change, NewOp, NewTask, OpStatus, Snapshot, TaskNo};
    let started = Instant::now();
    let base = now_ms() - i64::try_from(n).unwrap() * 1000;
    {
        let store = store::Store::open(db).unwrap();
        let snapshot = Snapshot {
            hash: "sha256:bench".into(),
            name: "rebuild-follower".into(),
            text: "name: rebuild-follower\nsteps:\n  - id: a\n    noop: true\n".into(),
            files: vec![],
        };
        store
            .apply_blocking(vec![Change::Submit(NewOp {
                uuid: format!("bench-{:010}", 0),
                snapshot,
                title: "xstore-0/node-0".into(),
                status: OpStatus::Failed,
                params: json!({ "xstore": "xstore-0" }),
                workdir: "/".into(),
                env: serde_json::Map::new(),
                tasks: vec![NewTask {
                    task_no: TaskNo(0),
                    step: "a".into(),
                    name: "a".into(),
                    item: None,
                }],
                at: base,
                owner: None,
                start: false,
                lock: None,
                cooldown_ms: None,
                ignore_cooldown: false,
                parent: None,
                fired_by: None,
            })])
            .unwrap();
    }
    let mut conn = Connection::open(db).unwrap();
    conn.pragma_update(None, "cache_size", -1_000_000).unwrap();
    let columns = |conn: &Connection, table: &str| -> Vec<String> {
        let mut stmt = conn
            .prepare(&format!("SELECT name FROM pragma_table_info('{table}')"))
            .unwrap();
        stmt.query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    };
    // Op `k.x` (ids from 1) is the `k.x - 1`th: its own identity, the first's other columns.
    let op_columns = columns(&conn, "ops");
    let op_values: Vec<String> = op_columns
        .iter()
        .map(|c| match c.as_str() {
            "id" => "k.x".to_owned(),
            "uuid" => "printf('bench-%010d', k.x - 1)".to_owned(),
            "title" => "printf('xstore-%d/node-%d', (k.x - 1) % 97, (k.x - 1) % 3)".to_owned(),
            "status" => {
                "CASE WHEN (k.x - 1) % 50 = 0 THEN 'failed' ELSE 'succeeded' END".to_owned()
            }
            "params" => "printf('{\"xstore\":\"xstore-%d\"}', (k.x - 1) % 97)".to_owned(),
            "created_at" | "started_at" | "ended_at" => "?3 + (k.x - 1) * 1000".to_owned(),
            other => format!("o.{other}"),
        })
        .collect();
    let copies = [("ops", op_columns, op_values, "o.id = 1")]
        .into_iter()
        .chain(["tasks", "events"].into_iter().map(|table| {
            let cols = columns(&conn, table);
            let values = cols
                .iter()
                .map(|c| {
                    if c == "op_id" {
                        "k.x".to_owned()
                    } else {
                        format!("o.{c}")
                    }
                })
                .collect();
            (table, cols, values, "o.op_id = 1")
        }))
        .collect::<Vec<_>>();
    let mut from = 2;
    while from <= n {
        let to = n.min(from + 999_999);
        let tx = conn.transaction().unwrap();
        for (table, cols, values, first) in &copies {
            tx.execute(
                &format!(
                    "WITH RECURSIVE k(x) AS (SELECT ?1 UNION ALL SELECT x + 1 FROM k WHERE x < ?2) \
                     INSERT INTO {table} ({}) SELECT {} FROM k, {table} o WHERE {first}",
                    cols.join(", "),
                    values.join(", "),
                ),
                rusqlite::params_from_iter(
                    [
                        i64::try_from(from).unwrap(),
                        i64::try_from(to).unwrap(),
                        base,
                    ]
                    .into_iter()
                    .take(if *table == "ops" { 3 } else { 2 }),
                ),
            )
            .unwrap();
        }
        tx.commit().unwrap();
        from = to + 1;
    }
    conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
        .unwrap();
    eprintln!(
        "   stored {n} ops in {:.1} s (one submitted, the rest copied with SQL)",
        started.elapsed().as_secs_f64()
    );
}
