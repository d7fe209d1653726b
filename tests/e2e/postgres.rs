//! The PostgreSQL runbooks of `examples/postgres/`, run by the real binary against real servers: a
//! primary and a streaming replica made by `examples/postgres/sandbox.sh` on free loopback ports.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::{ExampleServers, Sandbox, code, events, root, stderr, stdout, task};

/// A primary and a replica, destroyed when dropped.
struct Cluster {
    servers: ExampleServers,
    primary_port: String,
    replica_port: String,
    primary_data: String,
    replica_data: String,
}

fn examples() -> PathBuf {
    root().join("examples/postgres")
}

impl Cluster {
    fn up() -> Self {
        let servers = ExampleServers::up("postgres", "pg");
        Self {
            primary_port: servers.get("PRIMARY_PORT"),
            replica_port: servers.get("REPLICA_PORT"),
            primary_data: servers.get("PRIMARY_DATA"),
            replica_data: servers.get("REPLICA_DATA"),
            servers,
        }
    }

    fn sandbox(&self, what: &str) {
        self.servers.run(what, &[]);
    }

    /// `cairn` on the examples' plans, with its database in the cluster's directory.
    fn cairn(&self, args: &[&str]) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_cairn"));
        command
            .args(args)
            .current_dir(examples())
            .env("CAIRN_DB", self.servers.path.join("cairn.db"))
            .env("NO_COLOR", "1");
        command
    }

    fn rebuild_args(&self) -> Vec<String> {
        vec![
            "run".into(),
            "rebuild-replica.yaml".into(),
            "-p".into(),
            "cluster=main".into(),
            "-p".into(),
            format!("replica_data={}", self.replica_data),
            "-p".into(),
            format!("replica_port={}", self.replica_port),
            "-p".into(),
            format!("primary_port={}", self.primary_port),
            "-p".into(),
            format!("notify={}", self.servers.path.join("notify").display()),
        ]
    }

    /// The rebuild's arguments with the primary on `host-a` and the replica on `host-b` (the test
    /// hosts of `remote.rs`, both this machine, so `lib.sh` is where it is here). The replica's
    /// host reaches the primary at `host-a`'s address, 127.0.0.2, where the primary is made to
    /// listen too: a standby that followed another address would not pass the wait.
    fn across_hosts_args(&self) -> Vec<String> {
        let primary = psql(&self.primary_port, "show listen_addresses").unwrap();
        if !primary.contains("127.0.0.2") {
            psql(
                &self.primary_port,
                "alter system set listen_addresses = '127.0.0.1,127.0.0.2'",
            )
            .unwrap();
            let log = format!("{}.log", self.primary_data);
            pg_ctl(
                &self.primary_data,
                &["-m", "fast", "-w", "-l", &log, "restart"],
            );
        }
        let mut args = self.rebuild_args();
        for param in [
            "primary_host=host-a".to_owned(),
            "replica_host=host-b".to_owned(),
            "primary_addr=127.0.0.2".to_owned(),
            format!("lib_dir={}", examples().display()),
        ] {
            args.extend(["-p".to_owned(), param]);
        }
        args
    }

    /// `cairn` on the examples' plans, with `store` as its database and the test hosts' `ssh`
    /// configuration.
    fn cairn_on_hosts(store: &Sandbox, args: &[&str]) -> Command {
        let mut command = crate::remote::hosts().command(store, args);
        command.current_dir(examples());
        command
    }

    /// The host each task of a rebuild across hosts ran on: the primary's side of the wait on
    /// `host-a`, every other step on `host-b`, the hooks here.
    fn assert_ran_where_the_servers_are(show: &serde_json::Value) {
        for t in show["tasks"].as_array().unwrap() {
            let id = t["id"].as_str().unwrap();
            let want = match id {
                "primary-streams" => Some("host-a"),
                _ if id.starts_with("pre") || id.starts_with("on_") => None,
                _ => Some("host-b"),
            };
            match want {
                Some(host) => assert_eq!(t["host"], host, "{id}: {t}"),
                None => assert!(t["host"].is_null(), "{id}: {t}"),
            }
        }
    }

    /// The replica streams from the primary at `host-a`'s address.
    fn assert_follows_host_a(&self) {
        assert_eq!(
            psql(
                &self.replica_port,
                "select status || ' ' || sender_host || ':' || sender_port from pg_stat_wal_receiver"
            ),
            Some(format!("streaming 127.0.0.2:{}", self.primary_port))
        );
    }

    /// A row written on the primary now is readable on the replica.
    fn assert_replicates(&self, value: &str) {
        psql(
            &self.primary_port,
            "create table if not exists probe (v text)",
        )
        .unwrap();
        psql(
            &self.primary_port,
            &format!("insert into probe values ('{value}')"),
        )
        .unwrap();
        wait_for(
            &self.replica_port,
            &format!("select count(*) from probe where v = '{value}'"),
            "1",
        );
        assert_eq!(
            psql(&self.replica_port, "select pg_is_in_recovery()").as_deref(),
            Some("t")
        );
    }
}

/// The PostgreSQL server programs' directory, as `examples/postgres/lib.sh` finds it.
fn pgbin() -> PathBuf {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .unwrap()
        .map(|e| e.unwrap().path().join("bin"))
        .filter(|p| p.join("pg_ctl").exists())
        .collect();
    dirs.sort();
    dirs.pop()
        .expect("PostgreSQL's server programs are installed")
}

/// One query on a database of the member on `port`; `None` when it fails.
fn sql(port: &str, database: &str, query: &str) -> Option<String> {
    let out = Command::new("psql")
        .args([
            "-X",
            "-h",
            "127.0.0.1",
            "-p",
            port,
            "-U",
            "postgres",
            "-d",
            database,
        ])
        .args(["-v", "ON_ERROR_STOP=1", "-Atc", query])
        .output()
        .unwrap();
    out.status.success().then(|| stdout(&out).trim().to_owned())
}

/// One query on the `postgres` database of the member on `port`; `None` when it fails.
fn psql(port: &str, query: &str) -> Option<String> {
    sql(port, "postgres", query)
}

/// `pg_ctl` on a data directory, as the servers' owner.
fn pg_ctl(data: &str, args: &[&str]) {
    let out = Command::new("runuser")
        .args(["-u", "postgres", "--"])
        .arg(pgbin().join("pg_ctl"))
        .args(["-D", data])
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "pg_ctl {args:?}: {}", stderr(&out));
}

/// Waits until `query` on `port` gives `want`.
fn wait_for(port: &str, query: &str, want: &str) {
    let started = Instant::now();
    loop {
        if psql(port, query).as_deref() == Some(want) {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "`{query}` on port {port} never gave {want}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn args(owned: &[String]) -> Vec<&str> {
    owned.iter().map(String::as_str).collect()
}

#[test]
fn a_broken_replica_is_rebuilt_and_streams_again() {
    let pg = Cluster::up();
    pg.assert_replicates("before");
    pg.sandbox("break");
    assert!(!Path::new(&pg.replica_data).exists());

    let out = pg.cairn(&args(&pg.rebuild_args())).output().unwrap();
    assert_eq!(code(&out), Some(0), "{}", stderr(&out));
    pg.assert_replicates("after");
    let notices = std::fs::read_to_string(pg.servers.path.join("notify")).unwrap();
    assert!(notices.contains("rebuilt"), "{notices}");
    // The backup set and the old data are gone.
    assert!(!Path::new(&format!("{}.rebuild-op1", pg.replica_data)).exists());
    assert!(!Path::new(&format!("{}.old", pg.replica_data)).exists());
}

/// The guard asks the servers: the primary's data directory given with the replica's port (or
/// the replica's directory with the primary's port) is refused before anything stops, and both
/// servers still run.
#[test]
fn a_rebuild_given_one_servers_directory_and_anothers_port_is_refused() {
    let pg = Cluster::up();
    for (data, port, says) in [
        (&pg.primary_data, &pg.replica_port, "listens on port"),
        (&pg.replica_data, &pg.primary_port, "listens on port"),
    ] {
        let out = pg
            .cairn(&[
                "run",
                "rebuild-replica.yaml",
                "-p",
                "cluster=main",
                "-p",
                &format!("replica_data={data}"),
                "-p",
                &format!("replica_port={port}"),
                "-p",
                &format!(
                    "primary_port={}",
                    if *port == pg.primary_port {
                        &pg.replica_port
                    } else {
                        &pg.primary_port
                    }
                ),
            ])
            .output()
            .unwrap();
        assert_eq!(code(&out), Some(1), "{}", stderr(&out));
        assert!(stderr(&out).contains(says), "{}", stderr(&out));
        assert_eq!(psql(&pg.primary_port, "select 1").as_deref(), Some("1"));
        assert_eq!(psql(&pg.replica_port, "select 1").as_deref(), Some("1"));
    }
    // `local: false` without `new_data`: refused before any op is stored (nor its lock taken).
    let mut nowhere = pg.rebuild_args();
    nowhere.extend(["-p".into(), "local=false".into()]);
    let out = pg.cairn(&args(&nowhere)).output().unwrap();
    assert_eq!(code(&out), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("`params.new_data` is not set"),
        "{}",
        stderr(&out)
    );
    let ops = pg.cairn(&["status", "--json"]).output().unwrap();
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&ops.stdout)
            .unwrap()
            .as_array()
            .unwrap()
            .len(),
        2,
        "only the two refused ops"
    );
    pg.assert_replicates("after the refusals");
    // Refused before anything stopped, each freed the cluster's lock.
    let locks = pg.cairn(&["locks", "--json"]).output().unwrap();
    let locks: serde_json::Value = serde_json::from_slice(&locks.stdout).unwrap();
    assert_eq!(locks["locks"], serde_json::json!([]), "{locks}");

    // The servers say which cluster they are: a rebuild that names another is refused.
    let mut other = pg.rebuild_args();
    other[3] = "cluster=other".into();
    let out = pg.cairn(&args(&other)).output().unwrap();
    assert_eq!(code(&out), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("is of cluster main (its cluster_name), not other"),
        "{}",
        stderr(&out)
    );

    // A failover and a rebuild of one cluster exclude each other: the failover refused by its
    // hook (the primary answers) keeps the cluster's lock, and the rebuild waits for it.
    let out = pg.cairn(&args(&pg.failover_args())).output().unwrap();
    assert_eq!(code(&out), Some(1), "{}", stderr(&out));
    let mut rebuild = pg.rebuild_args();
    rebuild.push("--no-wait".into());
    let out = pg.cairn(&args(&rebuild)).output().unwrap();
    assert_eq!(code(&out), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("pg-cluster/main") && stderr(&out).contains("held by op 4"),
        "{}",
        stderr(&out)
    );
    let out = pg.cairn(&["cancel", "4"]).output().unwrap();
    assert_eq!(code(&out), Some(0), "{}", stderr(&out));
    pg.assert_replicates("after the failover was canceled");
}

#[test]
fn a_rebuild_killed_during_the_base_backup_resumes_and_the_replica_is_correct() {
    let pg = Cluster::up();
    pg.sandbox("break");
    let mut run_args = pg.rebuild_args();
    // Throttled, so that the copy takes a few seconds.
    run_args.extend(["-p".into(), "max_rate=6M".into()]);
    let run = pg
        .cairn(&args(&run_args))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let staging = kill_during_the_base_backup(run, &pg.replica_data);

    let out = pg.cairn(&["resume", "1"]).output().unwrap();
    assert_eq!(code(&out), Some(0), "{}", stderr(&out));
    pg.assert_replicates("after a crash");
    let show: serde_json::Value =
        serde_json::from_slice(&pg.cairn(&["show", "1", "--json"]).output().unwrap().stdout)
            .unwrap();
    assert_eq!(show["status"], "succeeded");
    // The copy the dead run left going was taken over (`adopt`, the default with `on`, which
    // renders empty here): collected or waited for, not started again.
    assert!(
        events(&show).iter().any(|(kind, _)| kind == "adopted"),
        "{show}"
    );
    assert_eq!(task(&show, "pick-source")["attempts"], 1);
    assert_eq!(task(&show, "base-backup")["attempts"], 1, "{show}");
    assert!(!staging.exists());
}

/// Acceptance 8 of issue 19: the rebuild with the primary on one host and the replica on another.
/// Each step runs where what it acts on or asks is, the replica streams again from the primary's
/// address with every row, and nothing of the rebuild is left behind.
#[test]
fn a_rebuild_across_two_hosts_runs_each_step_where_its_server_is() {
    let pg = Cluster::up();
    let store = Sandbox::new();
    pg.assert_replicates("before");
    let run_args = pg.across_hosts_args();
    // The primary named as the replica, on "another" host with the same port (which two hosts
    // may share): the guard asks the server on that host, which runs as a primary, and refuses.
    let mut wrong = run_args.clone();
    for arg in &mut wrong {
        if arg.starts_with("replica_data=") {
            *arg = format!("replica_data={}", pg.primary_data);
        } else if arg.starts_with("replica_port=") {
            *arg = format!("replica_port={}", pg.primary_port);
        }
    }
    let out = Cluster::cairn_on_hosts(&store, &args(&wrong))
        .output()
        .unwrap();
    assert_eq!(code(&out), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("it runs as a primary"),
        "{}",
        stderr(&out)
    );
    assert_eq!(psql(&pg.primary_port, "select 1").as_deref(), Some("1"));
    pg.assert_replicates("after the refusal");
    psql(
        &pg.primary_port,
        "create table bulk as select g, md5(g::text) h from generate_series(1, 20000) g",
    )
    .unwrap();
    pg.sandbox("break");

    let out = Cluster::cairn_on_hosts(&store, &args(&run_args))
        .output()
        .unwrap();
    assert_eq!(code(&out), Some(0), "{}", stderr(&out));
    pg.assert_replicates("after");
    pg.assert_follows_host_a();
    let rows = "select count(*) || ':' || md5(string_agg(h, ',' order by g)) from bulk";
    assert_eq!(psql(&pg.replica_port, rows), psql(&pg.primary_port, rows));
    assert!(psql(&pg.replica_port, rows).unwrap().starts_with("20000:"));
    let show = store.show(2);
    assert_eq!(show["status"], "succeeded");
    assert_eq!(
        show["name"],
        format!("main: replica host-b:{}", pg.replica_data)
    );
    Cluster::assert_ran_where_the_servers_are(&show);
    assert!(!Path::new(&format!("{}.rebuild-op2", pg.replica_data)).exists());
    assert!(!Path::new(&format!("{}.old", pg.replica_data)).exists());
    let notices = std::fs::read_to_string(pg.servers.path.join("notify")).unwrap();
    assert!(notices.contains("rebuilt"), "{notices}");
}

/// cairn killed during the base backup on the replica's host: the copy goes on there, the resume
/// collects it (or waits for it) instead of copying again, and the replica is correct.
#[test]
fn a_rebuild_across_hosts_killed_during_the_base_backup_resumes_and_the_replica_is_correct() {
    let pg = Cluster::up();
    let store = Sandbox::new();
    let mut run_args = pg.across_hosts_args();
    pg.sandbox("break");
    // Throttled, so that the copy takes a few seconds.
    run_args.extend(["-p".into(), "max_rate=6M".into()]);
    let run = Cluster::cairn_on_hosts(&store, &args(&run_args))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let staging = kill_during_the_base_backup(run, &pg.replica_data);

    let out = Cluster::cairn_on_hosts(&store, &["resume", "1"])
        .output()
        .unwrap();
    assert_eq!(code(&out), Some(0), "{}", stderr(&out));
    pg.assert_replicates("after a crash");
    pg.assert_follows_host_a();
    let show = store.show(1);
    assert_eq!(show["status"], "succeeded");
    Cluster::assert_ran_where_the_servers_are(&show);
    // The copy the dead run left going was taken over, not started again.
    assert!(
        events(&show).iter().any(|(kind, _)| kind == "adopted"),
        "{show}"
    );
    assert_eq!(task(&show, "pick-source")["attempts"], 1);
    assert_eq!(task(&show, "base-backup")["attempts"], 1, "{show}");
    assert!(!staging.exists());
}

/// A table's definition as the catalog has it: its columns (type, not null, default), indexes,
/// constraints and comment, one per line, sorted.
fn definition(port: &str, table: &str) -> String {
    let query = format!(
        "select string_agg(x, E'\\n' order by x) from ( \
           select 'column ' || attname || ' ' || format_type(atttypid, atttypmod) || ' ' \
                  || attnotnull || ' ' || coalesce(pg_get_expr(d.adbin, d.adrelid), '') \
             from pg_attribute a left join pg_attrdef d on d.adrelid = a.attrelid and d.adnum = a.attnum \
            where attrelid = '{table}'::regclass and attnum > 0 and not attisdropped \
           union all select 'index ' || pg_get_indexdef(indexrelid) from pg_index where indrelid = '{table}'::regclass \
           union all select 'constraint ' || conname || ' ' || pg_get_constraintdef(oid) from pg_constraint where conrelid = '{table}'::regclass \
           union all select 'comment ' || coalesce(obj_description('{table}'::regclass, 'pg_class'), '') \
         ) s(x)"
    );
    let text = sql(port, "app", &query).unwrap();
    assert!(text.contains("PRIMARY KEY"), "{text}");
    text
}

/// Row count and checksum of a table's rows.
fn fingerprint(port: &str, table: &str) -> String {
    sql(
        port,
        "app",
        &format!("select count(*) || ':' || md5(string_agg(t::text, ',' order by t::text)) from {table} t"),
    )
    .unwrap()
}

#[test]
fn a_backup_then_a_restore_of_some_tables_gives_back_their_rows() {
    let pg = Cluster::up();
    let port = pg.primary_port.clone();
    psql(&port, "create database app").unwrap();
    sql(
        &port,
        "app",
        "create table orders (id serial primary key, v text not null default 'none'); \
         create index orders_v on orders (v); comment on table orders is 'what was ordered'; \
         insert into orders (v) select md5(g::text) from generate_series(1, 5000) g; \
         create table items (id int, o int); \
         insert into items select g, g % 100 from generate_series(1, 3000) g; \
         create table other (x int); insert into other values (1)",
    )
    .unwrap();
    let before = [fingerprint(&port, "orders"), fingerprint(&port, "items")];
    let defined = definition(&port, "orders");
    let dir = pg.servers.path.join("backups");
    let out = pg
        .cairn(&[
            "run",
            "backup.yaml",
            "-p",
            &format!("port={port}"),
            "-p",
            "database=app",
            "-p",
            &format!("dir={}", dir.display()),
        ])
        .output()
        .unwrap();
    assert_eq!(code(&out), Some(0), "{}", stderr(&out));
    let show: serde_json::Value =
        serde_json::from_slice(&pg.cairn(&["show", "1", "--json"]).output().unwrap().stdout)
            .unwrap();
    let outputs = |id: &str| {
        show["tasks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["id"] == id)
            .unwrap()["outputs"]
            .clone()
    };
    let dump = outputs("dump")["path"].as_str().unwrap().to_owned();
    assert_eq!(outputs("verify")["tables"], "3");
    let sha = std::fs::read_to_string(format!("{dump}.sha256")).unwrap();
    assert!(sha.starts_with(outputs("checksum")["sha256"].as_str().unwrap()));

    // Damage two tables, then restore them.
    sql(
        &port,
        "app",
        "delete from orders where id > 100; update items set o = 0",
    )
    .unwrap();
    assert_ne!(fingerprint(&port, "orders"), before[0]);
    let restore = pg
        .cairn(&[
            "run",
            "restore-tables.yaml",
            "-p",
            &format!("port={port}"),
            "-p",
            "database=app",
            "-p",
            &format!("dump={dump}"),
            "-p",
            "tables=orders,items",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    loop {
        // Nothing to read before the run has made its database.
        let status: serde_json::Value =
            serde_json::from_slice(&pg.cairn(&["status", "--json"]).output().unwrap().stdout)
                .unwrap_or_default();
        // The gate's own `waiting` may land just after the op's.
        if status[0]["status"] == "waiting" && status[0]["current_tasks"][0]["status"] == "waiting"
        {
            assert_eq!(status[0]["current_task"], "confirm", "{status}");
            assert!(
                status[0]["current_tasks"][0]["prompt"]
                    .as_str()
                    .unwrap()
                    .contains("(5000, 3000 rows)"),
                "{status}"
            );
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "{status}");
        std::thread::sleep(Duration::from_millis(100));
    }
    // Nothing is switched before the approval.
    assert_ne!(fingerprint(&port, "orders"), before[0]);
    let out = pg.cairn(&["approve", "2", "confirm"]).output().unwrap();
    assert_eq!(code(&out), Some(0), "{}", stderr(&out));
    let ended = restore.wait_with_output().unwrap();
    assert_eq!(ended.status.code(), Some(0), "{}", stderr(&ended));
    assert_eq!(fingerprint(&port, "orders"), before[0]);
    assert_eq!(fingerprint(&port, "items"), before[1]);
    // The table is whole again: key, index, default, sequence and comment, as before; the
    // application's next insert takes the next key.
    assert_eq!(definition(&port, "orders"), defined);
    assert_eq!(
        sql(
            &port,
            "app",
            "insert into orders default values returning id"
        )
        .unwrap()
        .lines()
        .next(),
        Some("5001")
    );
    // The damaged tables were kept aside; the scratch database is gone.
    assert_eq!(
        sql(&port, "app", "select count(*) from orders_before_op2").as_deref(),
        Some("100")
    );
    assert_eq!(
        psql(
            &port,
            "select count(*) from pg_database where datname like 'restore_%'"
        )
        .as_deref(),
        Some("0")
    );
}

/// Backing up `app` with `keep=1` prunes `app`'s older dumps only, never those of `app-2`, whose
/// name `app` begins; an empty database backs up, with no table in its dump.
#[test]
fn a_backup_prunes_only_its_own_dumps_and_an_empty_database_backs_up() {
    let pg = Cluster::up();
    let port = pg.primary_port.clone();
    for db in ["app", "\"app-2\"", "fresh"] {
        psql(&port, &format!("create database {db}")).unwrap();
    }
    for db in ["app", "app-2"] {
        sql(&port, db, "create table t (id int primary key)").unwrap();
    }
    let dir = pg.servers.path.join("backups");
    let backup = |database: &str| {
        let out = pg
            .cairn(&[
                "run",
                "backup.yaml",
                "-p",
                &format!("port={port}"),
                "-p",
                &format!("database={database}"),
                "-p",
                &format!("dir={}", dir.display()),
                "-p",
                "keep=1",
            ])
            .output()
            .unwrap();
        assert_eq!(code(&out), Some(0), "{database}: {}", stderr(&out));
    };
    backup("app-2");
    backup("app");
    backup("app");
    let mut dumps: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "dump"))
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    dumps.sort();
    assert_eq!(dumps.len(), 2, "{dumps:?}");
    assert!(
        dumps[0].starts_with("app-2-") && dumps[0].ends_with("-op1.dump"),
        "{dumps:?}"
    );
    assert!(dumps[1].ends_with("-op3.dump"), "{dumps:?}");

    backup("fresh");
    let show: serde_json::Value =
        serde_json::from_slice(&pg.cairn(&["show", "4", "--json"]).output().unwrap().stdout)
            .unwrap();
    assert_eq!(show["status"], "succeeded");
    assert_eq!(
        crate::support::task(&show, "verify")["outputs"]["tables"],
        "0"
    );
}

impl Cluster {
    /// `cairn run failover.yaml` of this cluster's primary to its replica.
    fn failover_args(&self) -> Vec<String> {
        vec![
            "run".to_owned(),
            "failover.yaml".into(),
            "-p".into(),
            "cluster=main".into(),
            "-p".into(),
            format!("primary_port={}", self.primary_port),
            "-p".into(),
            format!("primary_data={}", self.primary_data),
            "-p".into(),
            format!("replica_port={}", self.replica_port),
            "-p".into(),
            format!("replica_data={}", self.replica_data),
            "-p".into(),
            format!("notify={}", self.servers.path.join("notify").display()),
        ]
    }
}

/// A real crash, five times: the primary stopped with `-m immediate` while rows are written to
/// it. The failover promotes the replica, rewinds the old primary (which keeps its own port) and
/// succeeds only once the old primary replays what the new one wrote after it; then a row written
/// on the new primary reaches the old one.
#[test]
fn a_failover_after_a_real_crash_leaves_the_old_primary_streaming() {
    for round in 0..5 {
        let pg = Cluster::up();
        psql(&pg.primary_port, "create table w (v int)").unwrap();
        // In the last rounds the primary keeps its WAL, so that pg_rewind can rewind it; in the
        // first, the crash recovery pg_rewind runs recycles what it would need, and the old
        // primary is rebuilt.
        let keeps_wal = round >= 3;
        if keeps_wal {
            psql(&pg.primary_port, "alter system set wal_keep_size = '1GB'").unwrap();
            psql(&pg.primary_port, "select pg_reload_conf()").unwrap();
        }
        let mut writer = Command::new("bash")
            .arg("-c")
            .arg(format!(
                "while psql -X -q -h 127.0.0.1 -p {} -U postgres -c 'insert into w select generate_series(1, 100)' 2>/dev/null; do :; done",
                pg.primary_port
            ))
            .spawn()
            .unwrap();
        wait_for(&pg.replica_port, "select count(*) > 0 from w", "t");
        pg_ctl(&pg.primary_data, &["-m", "immediate", "stop"]);
        writer.wait().unwrap();
        let out = pg.cairn(&args(&pg.failover_args())).output().unwrap();
        assert_eq!(code(&out), Some(0), "round {round}: {}", stderr(&out));
        assert_eq!(
            psql(&pg.primary_port, "select pg_is_in_recovery()").as_deref(),
            Some("t"),
            "round {round}: the old primary is not a standby on its own port"
        );
        psql(&pg.replica_port, "insert into w values (-1)").unwrap();
        wait_for(&pg.primary_port, "select count(*) from w where v = -1", "1");
        let show: serde_json::Value =
            serde_json::from_slice(&pg.cairn(&["show", "1", "--json"]).output().unwrap().stdout)
                .unwrap();
        let rewound = &crate::support::task(&show, "repoint-old-primary")["outputs"]["rewound"];
        let rebuilt = &crate::support::task(&show, "rebuild-old-primary")["status"];
        // Rewound, or (its WAL gone) rebuilt by the sub-plan: never neither.
        assert!(
            (rewound == "yes" && rebuilt == "skipped")
                || (rewound == "no" && rebuilt == "succeeded"),
            "round {round}: rewound {rewound}, rebuilt {rebuilt}"
        );
        if keeps_wal {
            assert_eq!(
                rewound, "yes",
                "round {round}: the WAL was kept, yet no rewind"
            );
        }
    }
}

#[test]
fn a_failover_aborted_by_its_pre_hook_changes_nothing_then_promotes_and_cools_down() {
    let pg = Cluster::up();
    let run = pg.failover_args();
    // The primary answers: the pre hook aborts, nothing changes.
    let out = pg.cairn(&args(&run)).output().unwrap();
    assert_eq!(code(&out), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("hook `pre:primary-is-down` failed"),
        "{}",
        stderr(&out)
    );
    assert_eq!(
        psql(&pg.replica_port, "select pg_is_in_recovery()").as_deref(),
        Some("t")
    );
    assert_eq!(
        psql(&pg.primary_port, "select pg_is_in_recovery()").as_deref(),
        Some("f")
    );

    // The primary goes down; the same op, resumed, fails over.
    psql(
        &pg.primary_port,
        "create table before_failover (v int); insert into before_failover values (1)",
    )
    .unwrap();
    wait_for(
        &pg.replica_port,
        "select count(*) from before_failover",
        "1",
    );
    pg_ctl(&pg.primary_data, &["-m", "fast", "-w", "stop"]);
    let out = pg.cairn(&["resume", "1"]).output().unwrap();
    assert_eq!(code(&out), Some(0), "{}", stderr(&out));
    assert_eq!(
        psql(&pg.replica_port, "select pg_is_in_recovery()").as_deref(),
        Some("f")
    );
    psql(&pg.replica_port, "insert into before_failover values (2)").unwrap();
    // The old primary follows the new one.
    wait_for(
        &pg.primary_port,
        "select count(*) from before_failover",
        "2",
    );
    assert_eq!(
        psql(&pg.primary_port, "select pg_is_in_recovery()").as_deref(),
        Some("t")
    );
    let notices = std::fs::read_to_string(pg.servers.path.join("notify")).unwrap();
    assert!(
        notices.contains("unsuccessful at pre:primary-is-down") && notices.contains("done in op 1"),
        "{notices}"
    );

    // A second failover of the cluster within the cooldown is refused.
    let out = pg.cairn(&args(&run)).output().unwrap();
    assert_eq!(code(&out), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("cools down"), "{}", stderr(&out));
}

/// Kills `run` (`kill -9`) half a second into the copy of the base backup into the rebuild's
/// staging directory beside `replica_data`, and checks that the copy had not finished: that
/// directory.
fn kill_during_the_base_backup(mut run: std::process::Child, replica_data: &str) -> PathBuf {
    let staging = PathBuf::from(format!("{replica_data}.rebuild-op1"));
    let started = Instant::now();
    while !staging.join("base").exists() {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the backup never started"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(500));
    run.kill().unwrap();
    run.wait().unwrap();
    assert!(
        !staging.join("backup_manifest").exists(),
        "the backup finished before the kill"
    );
    staging
}
