//! The MariaDB runbooks of `examples/mariadb/`, run by the real binary against real servers: a
//! primary and two GTID replicas made by `examples/mariadb/sandbox.sh` on free loopback ports
//! (never 3306, never the machine's own MariaDB), crashed with `kill -9`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use crate::support::{ExampleServers, Sandbox, code, root, stderr, stdout, task, wait_until};

fn examples() -> PathBuf {
    root().join("examples/mariadb")
}

/// A primary and two replicas, destroyed when dropped; cairn's database in a [`Sandbox`] (SQLite,
/// or PostgreSQL with `CAIRN_TEST_BACKEND=postgres`).
struct Cluster {
    servers: ExampleServers,
    cairn: Sandbox,
    primary_port: String,
    replica1_port: String,
    replica2_port: String,
    primary_data: String,
    replica1_data: String,
}

impl Cluster {
    fn up() -> Self {
        let servers = ExampleServers::up("mariadb", "my");
        for port in ["PRIMARY_PORT", "REPLICA1_PORT", "REPLICA2_PORT"] {
            assert_ne!(servers.get(port), "3306");
        }
        Self {
            cairn: Sandbox::new(),
            primary_port: servers.get("PRIMARY_PORT"),
            replica1_port: servers.get("REPLICA1_PORT"),
            replica2_port: servers.get("REPLICA2_PORT"),
            primary_data: servers.get("PRIMARY_DATA"),
            replica1_data: servers.get("REPLICA1_DATA"),
            servers,
        }
    }

    fn sandbox(&self, args: &[&str]) {
        self.servers.run(args[0], &args[1..]);
    }

    /// `cairn` on the examples' plans, with the sandbox's database.
    fn cairn(&self, args: &[&str]) -> Command {
        let mut command = self.cairn.command(args);
        command.current_dir(examples());
        command
    }

    fn show(&self, op: u32) -> Value {
        let out = self
            .cairn(&["show", &op.to_string(), "--json"])
            .output()
            .unwrap();
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// `cairn` on the examples' plans, with the sandbox's database and the test hosts' `ssh`
    /// configuration (`host-a` and `host-b`, both this machine).
    fn cairn_on_hosts(&self, args: &[&str]) -> Command {
        let mut command = crate::remote::hosts().command(&self.cairn, args);
        command.current_dir(examples());
        command
    }

    /// Nothing is left of rebuild `op` of replica1: no backup set, old data or fresh directory
    /// beside its data directory.
    fn assert_nothing_left(&self, op: u32) {
        for leftover in [
            format!(".rebuild-op{op}"),
            format!(".rebuild-op{op}.part"),
            format!(".before-op{op}"),
            ".new".to_owned(),
        ] {
            let path = format!("{}{leftover}", self.replica1_data);
            assert!(!Path::new(&path).exists(), "{path} is left");
        }
    }

    /// Rebuild replica1 from the primary.
    fn rebuild_args(&self, extra: &[String]) -> Vec<String> {
        let mut args: Vec<String> = vec![
            "run".into(),
            "rebuild-replica.yaml".into(),
            "-p".into(),
            "cluster=test".into(),
            "-p".into(),
            format!("source_port={}", self.primary_port),
            "-p".into(),
            format!("target_port={}", self.replica1_port),
            "-p".into(),
            format!("target_data={}", self.replica1_data),
            "-p".into(),
            format!(
                "start={} start {} replica1",
                examples().join("sandbox.sh").display(),
                self.servers.path.display()
            ),
            "-p".into(),
            format!("notify={}", self.servers.path.join("notify").display()),
        ];
        args.extend(extra.iter().cloned());
        args
    }

    /// A row written on the primary now arrives on the replica on `port`, which replicates from
    /// the primary with both threads running.
    fn assert_replicates(&self, port: &str, value: &str) {
        assert_follows(port, &self.primary_port, value);
    }
}

/// One query on the member on `port`; `None` when it fails.
fn sql(port: &str, query: &str) -> Option<String> {
    let out = Command::new("mariadb")
        .args(["--no-defaults", "-h", "127.0.0.1", "-u", "root", "-N", "-B"])
        .arg(format!("--port={port}"))
        .args(["-e", query])
        .output()
        .unwrap();
    out.status.success().then(|| stdout(&out).trim().to_owned())
}

/// `SHOW SLAVE STATUS` on the member on `port`, a `Field: value` line each.
fn slave_status(port: &str) -> String {
    let out = Command::new("mariadb")
        .args(["--no-defaults", "-h", "127.0.0.1", "-u", "root", "-E"])
        .arg(format!("--port={port}"))
        .args(["-e", "SHOW SLAVE STATUS"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    stdout(&out)
}

fn args(owned: &[String]) -> Vec<&str> {
    owned.iter().map(String::as_str).collect()
}

/// Whether a moment of a rebuild (of the op given) has come.
type Moment<'a> = Box<dyn Fn(u32) -> bool + 'a>;

fn kill_9(mut run: Child) {
    run.kill().unwrap();
    run.wait().unwrap();
}

#[test]
fn a_broken_mariadb_replica_is_rebuilt_from_a_stream_and_replicates_again() {
    let my = Cluster::up();
    my.assert_replicates(&my.replica1_port, "before");
    my.sandbox(&["break", "replica1"]);
    assert!(!Path::new(&my.replica1_data).exists());
    sql(
        &my.primary_port,
        "INSERT INTO app.t (v) VALUES ('while broken')",
    )
    .unwrap();

    let out = my.cairn(&args(&my.rebuild_args(&[]))).output().unwrap();
    assert_eq!(code(&out), Some(0), "{}", stderr(&out));
    my.assert_replicates(&my.replica1_port, "after");
    assert_eq!(
        sql(
            &my.replica1_port,
            "SELECT count(*) FROM app.t WHERE v IN ('before', 'while broken')"
        )
        .as_deref(),
        Some("2")
    );
    // Asked of the server: it runs from the replica's directory.
    assert_eq!(
        sql(&my.replica1_port, "SELECT @@datadir").map(|d| d.trim_end_matches('/').to_owned()),
        Some(my.replica1_data.clone())
    );
    let notices = std::fs::read_to_string(my.servers.path.join("notify")).unwrap();
    assert!(notices.contains("rebuilt"), "{notices}");
    // The backup set and the old data are gone.
    my.assert_nothing_left(1);
    // The other replica went on replicating throughout.
    my.assert_replicates(&my.replica2_port, "sibling");
}

/// PolarDB-X's logger rebuild on MariaDB (`role: logger`): no data is copied. The broken replica
/// comes back on a fresh data directory with the source's schema (its tables BLACKHOLE, without
/// the rows written before) and replicates from the source's position, keeping in its own binary
/// log what follows, changes to rows it never had included. cairn is killed (`kill -9`) once the
/// fresh directory is in place, then resumed: the schema is not read again.
#[test]
fn a_mariadb_logger_is_rebuilt_without_data_and_logs_what_follows() {
    let my = Cluster::up();
    my.assert_replicates(&my.replica1_port, "before");
    my.sandbox(&["break", "replica1"]);
    sql(
        &my.primary_port,
        "INSERT INTO app.t (v) VALUES ('while broken')",
    )
    .unwrap();

    let logger = ["-p".to_owned(), "role=logger".to_owned()];
    let run = my
        .cairn(&args(&my.rebuild_args(&logger)))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_until("the fresh data directory in place", || {
        my.cairn(&["show", "1", "--json"])
            .output()
            .ok()
            .and_then(|o| serde_json::from_slice::<Value>(&o.stdout).ok())
            .is_some_and(|show| {
                show["tasks"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|t| t["id"] == "swap-in" && t["status"] == "succeeded")
            })
    });
    kill_9(run);
    assert_eq!(
        my.show(1)["status"],
        "interrupted",
        "the kill came after the end"
    );
    let out = my.cairn(&["resume", "1"]).output().unwrap();
    assert_eq!(code(&out), Some(0), "{}", stderr(&out));
    let show = my.show(1);
    assert_eq!(
        show["name"],
        format!("test: logger on port {}", my.replica1_port)
    );
    for (step, status) in [("stream-backup", "skipped"), ("prepare", "skipped")] {
        assert_eq!(task(&show, step)["status"], status, "{step}: {show}");
    }
    assert_eq!(task(&show, "dump-schema")["attempts"], 1, "{show}");

    // The schema, no rows: the table is there, BLACKHOLE and empty.
    assert_eq!(
        sql(
            &my.replica1_port,
            "SELECT engine FROM information_schema.tables WHERE table_schema = 'app' AND table_name = 't'"
        )
        .as_deref(),
        Some("BLACKHOLE")
    );
    assert_eq!(
        sql(&my.replica1_port, "SELECT count(*) FROM app.t").as_deref(),
        Some("0")
    );
    // What follows, a change to a row it never had included, is replicated and logged.
    sql(
        &my.primary_port,
        "INSERT INTO app.t (v) VALUES ('after'); UPDATE app.t SET v = 'changed' WHERE v = 'before'",
    )
    .unwrap();
    let gtid = sql(&my.primary_port, "SELECT @@gtid_binlog_pos").unwrap();
    assert_eq!(
        sql(
            &my.replica1_port,
            &format!("SELECT MASTER_GTID_WAIT('{gtid}', 60)")
        )
        .as_deref(),
        Some("0")
    );
    assert_eq!(
        sql(&my.replica1_port, "SELECT @@gtid_binlog_pos").as_deref(),
        Some(gtid.as_str()),
        "the logger's binary log holds what it replicated"
    );
    assert_replica_of(&my.replica1_port, &my.primary_port);
    my.assert_nothing_left(1);
    my.assert_replicates(&my.replica2_port, "sibling");
}

/// The rebuild with the source on one host and the target on another (the test hosts of
/// `remote.rs`, both this machine): each step runs where the server it asks or acts on is, the
/// stream passes through cairn's host from `mariabackup` on the source's host to `mbstream` on the
/// target's, and a `kill -9` of cairn during the stream, then `resume`, streams again and ends
/// with the replica replicating.
#[test]
fn a_mariadb_rebuild_across_two_hosts_runs_each_step_where_its_server_is() {
    let my = Cluster::up();
    my.assert_replicates(&my.replica1_port, "before");
    my.sandbox(&["break", "replica1"]);
    let hosts = [
        "-p".to_owned(),
        "source_host=host-a".to_owned(),
        "-p".to_owned(),
        "target_host=host-b".to_owned(),
        "-p".to_owned(),
        format!("lib_dir={}", examples().display()),
        "-p".to_owned(),
        "throttle=100".to_owned(),
    ];
    let run = my
        .cairn_on_hosts(&args(&my.rebuild_args(&hosts)))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let part = PathBuf::from(format!("{}.rebuild-op1.part", my.replica1_data));
    wait_until("the stream", || part.join("ibdata1").exists());
    kill_9(run);
    assert!(
        !Path::new(&format!(
            "{}.rebuild-op1/xtrabackup_checkpoints",
            my.replica1_data
        ))
        .exists(),
        "the stream finished before the kill"
    );
    sql(
        &my.primary_port,
        "INSERT INTO app.t (v) VALUES ('while dead')",
    )
    .unwrap();

    let out = my.cairn_on_hosts(&["resume", "1"]).output().unwrap();
    assert_eq!(code(&out), Some(0), "{}", stderr(&out));
    let show = my.show(1);
    assert_eq!(task(&show, "stream-backup")["attempts"], 2, "{show}");
    for t in show["tasks"].as_array().unwrap() {
        let id = t["id"].as_str().unwrap();
        let want = match id {
            "check-source" | "write-probe" => Some("host-a"),
            // Skipped (a logger's), the relay of the stream, and the hooks: here.
            "dump-schema" | "stream-backup" => None,
            _ if id.starts_with("pre[") || id.starts_with("on_") => None,
            _ => Some("host-b"),
        };
        match want {
            Some(host) => assert_eq!(t["host"], host, "{id}: {t}"),
            None => assert!(t["host"].is_null(), "{id}: {t}"),
        }
    }
    my.assert_replicates(&my.replica1_port, "after");
    assert_eq!(
        sql(
            &my.replica1_port,
            "SELECT count(*) FROM app.t WHERE v IN ('before', 'while dead')"
        )
        .as_deref(),
        Some("2")
    );
    // The backup set and the old data are gone.
    my.assert_nothing_left(1);
}

/// The guard asks the servers: the primary's directory with a replica's port, a replica's
/// directory with the other replica's port, and a "source" the target does not replicate from
/// are refused before anything stops; every server still runs.
#[test]
fn a_mariadb_rebuild_that_names_the_wrong_servers_is_refused() {
    let my = Cluster::up();
    let env = std::fs::read_to_string(my.servers.path.join("env")).unwrap();
    let replica2_data = env
        .lines()
        .find_map(|l| l.strip_prefix("REPLICA2_DATA="))
        .unwrap()
        .to_owned();
    let cases = [
        (
            &my.primary_data,
            &my.replica1_port,
            &my.primary_port,
            "is the data directory of the source",
        ),
        (
            &my.replica1_data,
            &my.replica2_port,
            &my.primary_port,
            "is served from",
        ),
        (
            &replica2_data,
            &my.replica2_port,
            &my.replica1_port,
            "is not a replica of port",
        ),
    ];
    for (n, (data, port, source, says)) in cases.into_iter().enumerate() {
        let out = my
            .cairn(&[
                "run",
                "rebuild-replica.yaml",
                "-p",
                "cluster=test",
                "-p",
                &format!("source_port={source}"),
                "-p",
                &format!("target_port={port}"),
                "-p",
                &format!("target_data={data}"),
                "-p",
                "start=false",
            ])
            .output()
            .unwrap();
        assert_eq!(code(&out), Some(1), "{}", stderr(&out));
        assert!(stderr(&out).contains(says), "{says}: {}", stderr(&out));
        for port in [&my.primary_port, &my.replica1_port, &my.replica2_port] {
            assert_eq!(sql(port, "SELECT 1").as_deref(), Some("1"));
        }
        // Refused before anything stopped, the op freed the cluster's lock.
        let locks = my.cairn(&["locks", "--json"]).output().unwrap();
        let locks: Value = serde_json::from_slice(&locks.stdout).unwrap();
        assert_eq!(
            locks["locks"],
            serde_json::json!([]),
            "op {}: {locks}",
            n + 1
        );
    }
    my.assert_replicates(&my.replica1_port, "after the refusals");
    my.assert_replicates(&my.replica2_port, "after the refusals, on replica2");
}

/// A rebuild's checks are not run again on a resume: a target re-pointed meanwhile (as a failover
/// re-points a sibling) is refused by `stop-target`, which stops nothing.
#[test]
fn a_mariadb_rebuild_resumed_after_its_target_was_repointed_stops_nothing() {
    let my = Cluster::up();
    let throttled = ["-p".to_owned(), "throttle=100".to_owned()];
    let run = my
        .cairn(&args(&my.rebuild_args(&throttled)))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let part = PathBuf::from(format!("{}.rebuild-op1.part", my.replica1_data));
    wait_until("the stream", || part.join("ibdata1").exists());
    kill_9(run);
    sql(
        &my.replica1_port,
        &format!(
            "STOP SLAVE; CHANGE MASTER TO MASTER_PORT={}; START SLAVE",
            my.replica2_port
        ),
    )
    .unwrap();

    let out = my.cairn(&["resume", "1"]).output().unwrap();
    assert_eq!(code(&out), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains(&format!(
            "is no longer a replica of port {}",
            my.primary_port
        )),
        "{}",
        stderr(&out)
    );
    assert_eq!(task(&my.show(1), "stop-target")["status"], "failed");
    assert!(!Path::new(&format!("{}.before-op1", my.replica1_data)).exists());
    assert_follows(&my.replica1_port, &my.replica2_port, "after the refusal");
}

/// `kill -9` of cairn at three moments of a rebuild (during the stream, once the old data was
/// moved aside, once the rebuilt server answers), then `resume`: each time the replica ends up
/// replicating rows written on the primary while cairn was dead and after.
#[test]
fn a_mariadb_rebuild_killed_at_any_moment_resumes_to_a_replicating_replica() {
    let my = Cluster::up();
    let data = my.replica1_data.clone();
    let moments: [(&str, Moment); 3] = [
        (
            "during the stream",
            Box::new(|op| {
                let part = PathBuf::from(format!("{data}.rebuild-op{op}.part"));
                part.join("ibdata1").exists()
            }),
        ),
        (
            "with the old data moved aside",
            Box::new(|op| Path::new(&format!("{data}.before-op{op}")).exists()),
        ),
        (
            "once the rebuilt server answers",
            Box::new(|op| {
                Path::new(&format!("{data}.before-op{op}")).exists()
                    && sql(&my.replica1_port, "SELECT 1").is_some()
            }),
        ),
    ];
    for (n, (moment, reached)) in moments.iter().enumerate() {
        let op = n as u32 + 1;
        let mut extra = Vec::new();
        if op == 1 {
            // A broken replica, and a slow copy, so that the kill lands in the stream.
            my.sandbox(&["break", "replica1"]);
            extra = vec!["-p".to_owned(), "throttle=100".to_owned()];
        }
        let run = my
            .cairn(&args(&my.rebuild_args(&extra)))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        wait_until(moment, || reached(op));
        kill_9(run);
        if op == 1 {
            assert!(
                !Path::new(&format!("{data}.rebuild-op1/xtrabackup_checkpoints")).exists(),
                "the stream finished before the kill"
            );
        }
        sql(
            &my.primary_port,
            &format!("INSERT INTO app.t (v) VALUES ('while dead {op}')"),
        )
        .unwrap();

        let out = my.cairn(&["resume", &op.to_string()]).output().unwrap();
        assert_eq!(code(&out), Some(0), "{moment}: {}", stderr(&out));
        let show = my.show(op);
        assert_eq!(show["status"], "succeeded", "{moment}: {show}");
        assert_eq!(task(&show, "check-params")["attempts"], 1, "{moment}");
        if op == 1 {
            assert_eq!(task(&show, "stream-backup")["attempts"], 2, "{moment}");
        }
        my.assert_replicates(&my.replica1_port, &format!("after resume {op}"));
        assert_eq!(
            sql(
                &my.replica1_port,
                &format!("SELECT count(*) FROM app.t WHERE v = 'while dead {op}'")
            )
            .as_deref(),
            Some("1"),
            "{moment}"
        );
        assert!(!Path::new(&format!("{data}.before-op{op}")).exists());
        assert!(!Path::new(&format!("{data}.rebuild-op{op}")).exists());
    }
}

/// A backup is prepared and checked, its location and entry count are outputs; a second backup of
/// the same server while one runs is refused (`--no-wait`), naming the holder.
#[test]
fn a_mariadb_backup_is_prepared_counted_and_one_per_server() {
    let my = Cluster::up();
    let dir = my.servers.path.join("backups");
    let backup = |extra: &[&str]| {
        let mut args = vec![
            "run".to_owned(),
            "backup.yaml".to_owned(),
            "-p".to_owned(),
            format!("port={}", my.replica2_port),
            "-p".to_owned(),
            format!("dir={}", dir.display()),
        ];
        args.extend(extra.iter().map(ToString::to_string));
        args
    };
    let first = my
        .cairn(&args(&backup(&["-p", "throttle=100"])))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_until("the first backup's copy", || {
        dir.join("backup-op1.part").exists()
    });
    let out = my.cairn(&args(&backup(&["--no-wait"]))).output().unwrap();
    assert_ne!(code(&out), Some(0), "{}", stderr(&out));
    assert!(stderr(&out).contains("op 1"), "{}", stderr(&out));
    let out = first.wait_with_output().unwrap();
    assert_eq!(code(&out), Some(0), "{}", stderr(&out));

    let show = my.show(1);
    assert_eq!(show["status"], "succeeded", "{show}");
    let outputs = &task(&show, "verify")["outputs"];
    let path = PathBuf::from(outputs["path"].as_str().unwrap());
    assert_eq!(path, dir.join("backup-op1"));
    assert!(!dir.join("backup-op1.part").exists());
    let entries: usize = outputs["entries"].as_str().unwrap().parse().unwrap();
    let files = walk(&path);
    assert_eq!(entries, files, "{outputs}");
    assert!(path.join("app/t.frm").exists());
    let checkpoints = std::fs::read_to_string(path.join("xtrabackup_checkpoints")).unwrap();
    assert!(
        checkpoints.contains("backup_type = log-applied"),
        "{checkpoints}"
    );
    // The backup's GTID is the server's.
    assert_eq!(
        outputs["gtid"].as_str().unwrap(),
        sql(&my.replica2_port, "SELECT @@gtid_current_pos").unwrap()
    );
}

/// Regular files under `dir`, counted.
fn walk(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let kind = e.file_type().unwrap();
            if kind.is_dir() {
                walk(&e.path())
            } else {
                usize::from(kind.is_file())
            }
        })
        .sum()
}

impl Cluster {
    fn failover(&self, extra: &[&str]) -> std::process::Output {
        let mut args = vec![
            "run".to_owned(),
            "failover.yaml".to_owned(),
            "-p".to_owned(),
            "cluster=test".to_owned(),
            "-p".to_owned(),
            format!("primary_port={}", self.primary_port),
            "-p".to_owned(),
            format!("replicas=[{}, {}]", self.replica1_port, self.replica2_port),
            "-p".to_owned(),
            format!("notify={}", self.servers.path.join("notify").display()),
        ];
        args.extend(extra.iter().map(ToString::to_string));
        self.cairn(&args.iter().map(String::as_str).collect::<Vec<_>>())
            .output()
            .unwrap()
    }
}

/// A session that holds `cairn_probe.failovers` on the member on `port` (`LOCK TABLES ... WRITE`),
/// so that the failover's row cannot be applied there, until it is killed.
fn hold_probe_table(port: &str) -> Child {
    let locker = Command::new("mariadb")
        .args(["--no-defaults", "-h", "127.0.0.1", "-u", "root"])
        .arg(format!("--port={port}"))
        .args([
            "-e",
            "LOCK TABLES cairn_probe.failovers WRITE; SELECT SLEEP(600)",
        ])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    wait_until("the table lock", || {
        sql(
            port,
            "SELECT count(*) FROM information_schema.processlist WHERE info LIKE 'SELECT SLEEP%'",
        )
        .as_deref()
            == Some("1")
    });
    locker
}

/// `kill -9` of `run` a moment into its wait for the row `locker` holds back, then the table let
/// go: the op (`show` shows it) is interrupted, not ended.
fn kill_while_held(run: Child, mut locker: Child, show: impl Fn() -> Value) {
    std::thread::sleep(Duration::from_millis(1500));
    kill_9(run);
    assert_eq!(
        show()["status"],
        "interrupted",
        "the kill came after the end"
    );
    locker.kill().unwrap();
    locker.wait().unwrap();
}

/// A row written on `primary` arrives on the replica on `port`, which follows `primary`.
fn assert_follows(port: &str, primary: &str, value: &str) {
    sql(
        primary,
        &format!("INSERT INTO app.t (v) VALUES ('{value}')"),
    )
    .unwrap();
    let gtid = sql(primary, "SELECT @@gtid_binlog_pos").unwrap();
    assert_eq!(
        sql(port, &format!("SELECT MASTER_GTID_WAIT('{gtid}', 60)")).as_deref(),
        Some("0"),
        "port {port} never reached {gtid} of port {primary}"
    );
    assert_eq!(
        sql(
            port,
            &format!("SELECT count(*) FROM app.t WHERE v = '{value}'")
        )
        .as_deref(),
        Some("1")
    );
    assert_replica_of(port, primary);
}

/// The member on `port` replicates from `primary` by GTID, both threads running.
fn assert_replica_of(port: &str, primary: &str) {
    let status = slave_status(port);
    for line in [
        "Slave_IO_Running: Yes".to_owned(),
        "Slave_SQL_Running: Yes".to_owned(),
        format!("Master_Port: {primary}"),
        "Using_Gtid: Slave_Pos".to_owned(),
    ] {
        assert!(status.contains(&line), "{line} not in {status}");
    }
}

/// orchestrator's shape on real servers: refused by its `pre` hook while the primary answers;
/// once the primary is killed (`kill -9`) and the op resumed, the most advanced replica is
/// promoted even though `prefer` names the other, which was behind (its replication stopped);
/// the other then follows the new primary, catching up what it lacked; another failover of the
/// cluster is refused by the cooldown.
#[test]
fn a_mariadb_failover_promotes_the_most_advanced_replica_after_the_primary_is_killed() {
    let my = Cluster::up();
    let prefer = format!("prefer={}", my.replica2_port);
    let out = my.failover(&["-p", &prefer]);
    assert_eq!(code(&out), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("answers: no failover"),
        "{}",
        stderr(&out)
    );
    my.assert_replicates(&my.replica1_port, "after the refusal");

    // replica2 falls behind; the primary takes writes, then dies.
    sql(&my.replica2_port, "STOP SLAVE").unwrap();
    sql(
        &my.primary_port,
        "INSERT INTO app.t (v) VALUES ('only on replica1')",
    )
    .unwrap();
    let gtid = sql(&my.primary_port, "SELECT @@gtid_binlog_pos").unwrap();
    assert_eq!(
        sql(
            &my.replica1_port,
            &format!("SELECT MASTER_GTID_WAIT('{gtid}', 60)")
        )
        .as_deref(),
        Some("0")
    );
    my.sandbox(&["crash", "primary"]);
    assert!(sql(&my.primary_port, "SELECT 1").is_none());

    let out = my.cairn(&["resume", "1"]).output().unwrap();
    assert_eq!(code(&out), Some(0), "{}", stderr(&out));
    let show = my.show(1);
    assert_eq!(
        task(&show, "pick")["outputs"]["new_primary"],
        my.replica1_port.as_str(),
        "{show}"
    );
    // The new primary takes writes and replicates from nobody.
    assert!(!slave_status(&my.replica1_port).contains("Master_Port"));
    assert_eq!(
        sql(&my.replica1_port, "SELECT @@read_only").as_deref(),
        Some("0")
    );
    assert_follows(&my.replica2_port, &my.replica1_port, "after the failover");
    assert_eq!(
        sql(
            &my.replica2_port,
            "SELECT count(*) FROM app.t WHERE v = 'only on replica1'"
        )
        .as_deref(),
        Some("1")
    );
    let notices = std::fs::read_to_string(my.servers.path.join("notify")).unwrap();
    assert!(
        notices.contains(&format!("to port {} done", my.replica1_port)),
        "{notices}"
    );

    // Anti-flapping: the cluster's next failover is refused for now.
    let out = my.failover(&[]);
    assert_ne!(code(&out), Some(0), "{}", stderr(&out));
    assert!(stderr(&out).contains("cools down"), "{}", stderr(&out));
}

/// With both replicas as advanced, `prefer` picks the candidate: the primary killed, the preferred
/// replica is promoted and the other follows it. cairn is killed (`kill -9`) while it waits for the
/// sibling (held back by a table lock on it), then resumed: nothing done is done again, and the
/// wait ends once the sibling has the row written after the failover.
#[test]
fn a_mariadb_failover_killed_while_it_waits_resumes_with_the_preferred_replica_promoted() {
    let my = Cluster::up();
    sql(
        &my.primary_port,
        "CREATE DATABASE cairn_probe; CREATE TABLE cairn_probe.failovers \
         (op VARCHAR(64) PRIMARY KEY, at TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP)",
    )
    .unwrap();
    my.assert_replicates(&my.replica1_port, "before");
    my.assert_replicates(&my.replica2_port, "before, on replica2");
    // The sibling cannot apply the failover's row while this session holds the table.
    let locker = hold_probe_table(&my.replica1_port);
    my.sandbox(&["crash", "primary"]);

    let mut command = my.cairn(&[
        "run",
        "failover.yaml",
        "-p",
        "cluster=test",
        "-p",
        &format!("primary_port={}", my.primary_port),
        "-p",
        &format!("replicas=[{}, {}]", my.replica1_port, my.replica2_port),
        "-p",
        &format!("prefer={}", my.replica2_port),
    ]);
    let run = command
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_until("the failover's row on the new primary", || {
        sql(
            &my.replica2_port,
            "SELECT count(*) FROM cairn_probe.failovers",
        )
        .as_deref()
            == Some("1")
    });
    kill_while_held(run, locker, || my.show(1));
    let out = my.cairn(&["resume", "1"]).output().unwrap();
    assert_eq!(code(&out), Some(0), "{}", stderr(&out));
    let show = my.show(1);
    assert_eq!(show["status"], "succeeded", "{show}");
    assert_eq!(
        task(&show, "pick")["outputs"]["new_primary"],
        my.replica2_port.as_str(),
        "{show}"
    );
    for done in ["apply-relay-logs", "pick", "promote", "write-probe"] {
        assert_eq!(task(&show, done)["attempts"], 1, "{done}: {show}");
    }
    assert_follows(&my.replica1_port, &my.replica2_port, "after the failover");
}

/// Three shards, each a primary and two replicas, for `recover-shards.yaml`; made at once.
struct Shards {
    shards: Vec<ExampleServers>,
    cairn: Sandbox,
}

impl Shards {
    fn up() -> Self {
        let shards = std::thread::scope(|s| {
            let made: Vec<_> = (1..=3)
                .map(|n| s.spawn(move || ExampleServers::up("mariadb", &format!("shard{n}"))))
                .collect();
            made.into_iter().map(|h| h.join().unwrap()).collect()
        });
        Self {
            shards,
            cairn: Sandbox::new(),
        }
    }

    /// The port of `member` (`PRIMARY`, `REPLICA1`, `REPLICA2`) of shard `n` (from 1).
    fn port(&self, n: usize, member: &str) -> String {
        self.shards[n - 1].get(&format!("{member}_PORT"))
    }

    /// `cairn` on the examples' plans with the sandbox's database; the shards as a params file.
    fn cairn(&self, args: &[&str]) -> Command {
        let shards: Vec<Value> = (1..=3)
            .map(|n| {
                let port = |m: &str| self.port(n, m).parse::<u16>().unwrap();
                serde_json::json!({
                    "name": format!("shard{n}"),
                    "primary_port": port("PRIMARY"),
                    "replicas": [port("REPLICA1"), port("REPLICA2")],
                })
            })
            .collect();
        let params = self.cairn.path().join("shards.json");
        std::fs::write(&params, serde_json::json!({ "shards": shards }).to_string()).unwrap();
        let mut command = self.cairn.command(args);
        command.current_dir(examples());
        command
    }

    fn recover(&self) -> Command {
        let params = self.cairn.path().join("shards.json");
        let mut command = self.cairn(&[
            "run",
            "recover-shards.yaml",
            "--params",
            params.to_str().unwrap(),
        ]);
        command.stdout(Stdio::null()).stderr(Stdio::piped());
        command
    }

    fn show(&self, op: u64) -> Value {
        self.try_show(op)
            .unwrap_or_else(|| panic!("no op {op} to show"))
    }

    /// `show --json` of `op`; `None` while it is not submitted yet.
    fn try_show(&self, op: u64) -> Option<Value> {
        let out = self
            .cairn(&["show", &op.to_string(), "--json"])
            .output()
            .unwrap();
        out.status
            .success()
            .then(|| serde_json::from_slice(&out.stdout).unwrap())
    }

    /// The failover op of each shard the recovery `op` fanned out to, by the shard's name.
    fn failovers(&self, op: u64) -> std::collections::BTreeMap<String, Value> {
        self.show(op)["children"]
            .as_array()
            .unwrap()
            .iter()
            .map(|child| {
                let show = self.show(child["id"].as_u64().unwrap());
                (show["name"].as_str().unwrap().to_owned(), show)
            })
            .collect()
    }
}

/// OpenMLDB's endpoint recovery on real servers: with every primary answering, the recovery finds
/// nothing to do and says so; then every primary is killed (`kill -9`), one shard's replica having
/// fallen behind in a second replication domain, and the recovery fans out over the shards, two at
/// a time, promoting in each the replica with the greatest GTID position in every domain. cairn is killed (`kill -9`) once two shards are
/// recovered and the third waits for its sibling (held back by a table lock), then resumed: no
/// shard's finished work runs again, and each shard ends with one primary whose replica has the
/// rows written before the crash and after the recovery. `status` lists each shard's failover.
#[test]
fn every_shard_whose_primary_was_killed_is_recovered_once_across_a_kill_of_cairn() {
    let my = Shards::up();
    let out = my.recover().output().unwrap();
    assert_eq!(code(&out), Some(0), "{}", stderr(&out));
    let show = my.show(1);
    assert_eq!(task(&show, "find-dead")["outputs"]["dead"], "[]", "{show}");
    assert_eq!(show["children"], serde_json::json!([]), "{show}");

    let locker = crash_every_primary(&my);

    let run = my.recover().spawn().unwrap();
    wait_until("two shards recovered and the third's row written", || {
        let Some(show) = my.try_show(2) else {
            return false;
        };
        ["recover[shard1]", "recover[shard2]"].iter().all(|t| {
            show["tasks"]
                .as_array()
                .unwrap()
                .iter()
                .any(|x| x["id"] == *t && x["status"] == "succeeded")
        }) && sql(
            &my.port(3, "REPLICA1"),
            "SELECT count(*) FROM cairn_probe.failovers",
        )
        .as_deref()
            == Some("1")
    });
    kill_while_held(run, locker, || my.show(2));
    let out = my.cairn(&["resume", "2"]).output().unwrap();
    assert_eq!(code(&out), Some(0), "{}", stderr(&out));
    let show = my.show(2);
    assert_eq!(task(&show, "find-dead")["attempts"], 1, "{show}");
    for done in ["recover[shard1]", "recover[shard2]"] {
        assert_eq!(task(&show, done)["attempts"], 1, "{done}: {show}");
    }
    let failovers = my.failovers(2);
    assert_eq!(failovers.len(), 3, "{failovers:?}");
    for (name, failover) in &failovers {
        assert_eq!(failover["status"], "succeeded", "{name}: {failover}");
        for done in ["apply-relay-logs", "pick", "promote", "write-probe"] {
            assert_eq!(
                task(failover, done)["attempts"],
                1,
                "{name} {done}: {failover}"
            );
        }
    }
    assert_each_shard_recovered(&my, &failovers, &show);

    // Run again, it finds every shard recovered already (the old primaries still down) and says
    // all is well.
    let out = my.recover().output().unwrap();
    assert_eq!(code(&out), Some(0), "{}", stderr(&out));
    let again = my.show(6);
    assert_eq!(
        task(&again, "find-dead")["outputs"]["dead"],
        "[]",
        "{again}"
    );
    assert_eq!(again["children"], serde_json::json!([]), "{again}");

    // `status` is the recovery's `showopstatus`: the op and each shard's failover under it.
    let out = my.cairn(&["status"]).output().unwrap();
    let table = stdout(&out);
    for n in 1..=3 {
        assert!(
            table.lines().any(|l| l.contains("mariadb-failover")
                && l.contains(&format!("shard{n} (recover[shard{n}])"))
                && l.contains("succeeded")),
            "{table}"
        );
    }
}

/// Every primary of `my` killed (`kill -9`) once shard 2's first replica has fallen behind (its
/// second has a row the first lacks) and shard 3's second replica is held back by a table lock,
/// which the returned session holds.
fn crash_every_primary(my: &Shards) -> Child {
    // Shard 2's first replica falls behind: its second has a row the first lacks, written in
    // another replication domain (both are as far in domain 0).
    sql(&my.port(2, "REPLICA1"), "STOP SLAVE").unwrap();
    sql(
        &my.port(2, "PRIMARY"),
        "SET SESSION gtid_domain_id = 1; INSERT INTO app.t (v) VALUES ('only on replica2')",
    )
    .unwrap();
    let gtid = sql(&my.port(2, "PRIMARY"), "SELECT @@gtid_binlog_pos").unwrap();
    assert_eq!(
        sql(
            &my.port(2, "REPLICA2"),
            &format!("SELECT MASTER_GTID_WAIT('{gtid}', 60)")
        )
        .as_deref(),
        Some("0")
    );
    // Shard 3's second replica cannot apply its failover's row while this session holds the table.
    sql(
        &my.port(3, "PRIMARY"),
        "CREATE DATABASE cairn_probe; CREATE TABLE cairn_probe.failovers \
         (op VARCHAR(64) PRIMARY KEY, at TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP)",
    )
    .unwrap();
    let gtid = sql(&my.port(3, "PRIMARY"), "SELECT @@gtid_binlog_pos").unwrap();
    assert_eq!(
        sql(
            &my.port(3, "REPLICA2"),
            &format!("SELECT MASTER_GTID_WAIT('{gtid}', 60)")
        )
        .as_deref(),
        Some("0")
    );
    let locker = hold_probe_table(&my.port(3, "REPLICA2"));
    // Every replica that follows has what its primary wrote, so that the positions compare as
    // this test expects: both replicas of shards 1 and 3 as advanced.
    for n in 1..=3 {
        let gtid = sql(&my.port(n, "PRIMARY"), "SELECT @@gtid_binlog_pos").unwrap();
        for replica in ["REPLICA1", "REPLICA2"] {
            if (n, replica) != (2, "REPLICA1") {
                assert_eq!(
                    sql(
                        &my.port(n, replica),
                        &format!("SELECT MASTER_GTID_WAIT('{gtid}', 60)")
                    )
                    .as_deref(),
                    Some("0"),
                    "shard{n} {replica}"
                );
            }
        }
    }
    for shard in &my.shards {
        shard.run("crash", &["primary"]);
    }

    locker
}

/// Each shard of `my` has its most advanced replica as its primary, which its other replica follows
/// with every row.
fn assert_each_shard_recovered(
    my: &Shards,
    failovers: &std::collections::BTreeMap<String, Value>,
    show: &Value,
) {
    // The greatest position in each: shard 2's second replica, which had the last row; the first
    // replica where both were as advanced.
    for (n, promoted, sibling) in [
        (1, "REPLICA1", "REPLICA2"),
        (2, "REPLICA2", "REPLICA1"),
        (3, "REPLICA1", "REPLICA2"),
    ] {
        let (promoted, sibling) = (my.port(n, promoted), my.port(n, sibling));
        let failover = &failovers[&format!("shard{n}")];
        assert_eq!(
            task(failover, "pick")["outputs"]["new_primary"],
            promoted.as_str(),
            "shard{n}: {failover}"
        );
        assert_follows(
            &sibling,
            &promoted,
            &format!("after the recovery of shard{n}"),
        );
    }
    assert_eq!(
        sql(
            &my.port(2, "REPLICA1"),
            "SELECT count(*) FROM app.t WHERE v = 'only on replica2'"
        )
        .as_deref(),
        Some("1")
    );
    let verified = task(show, "verify")["outputs"]["primaries"]
        .as_str()
        .unwrap()
        .to_owned();
    for (n, promoted) in [(1, "REPLICA1"), (2, "REPLICA2"), (3, "REPLICA1")] {
        assert!(
            verified.contains(&format!("\"shard{n}\": {}", my.port(n, promoted))),
            "{verified}"
        );
    }
}
