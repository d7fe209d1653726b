//! `sql:` steps against real servers: PostgreSQL (a private database per test on the suite's
//! server at 127.0.0.1:5432) and MariaDB (a private server this test binary starts once, on a
//! free port of 127.0.0.1, never the machine's own). Values are bound, never inserted into the
//! statement; outputs feed later steps; a failed statement's SQLSTATE is the attempt's error; a
//! transaction rolls back; the URL's password is never shown; a statement cut by `kill -9` runs
//! again on resume unless its `sql.check` says it is done.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::support::{Sandbox, code, signal, stderr, stdout, task};

/// A value a naive text substitution would turn into a second statement.
const HOSTILE: &str = r#"it's "quoted" \ '; DROP TABLE t; --"#;

/// A fresh name for a database of this test process.
fn fresh(prefix: &str) -> String {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}_{}_{n}", std::process::id())
}

/// A private database on the suite's PostgreSQL server, dropped with it.
struct PgDb(String);

impl PgDb {
    fn new() -> Self {
        let name = fresh("cairn_sqlstep");
        psql(
            "postgres",
            &format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
        );
        psql("postgres", &format!("CREATE DATABASE {name}"));
        Self(name)
    }

    /// The URL a plan names it by, with `password` (the server lets `postgres` in without one).
    fn url(&self, password: &str) -> String {
        format!("postgres://postgres:{password}@127.0.0.1:5432/{}", self.0)
    }

    fn sql(&self, sql: &str) -> String {
        psql(&self.0, sql)
    }
}

impl Drop for PgDb {
    fn drop(&mut self) {
        // `WITH (FORCE)` also ends a statement a killed cairn left running.
        psql(
            "postgres",
            &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.0),
        );
    }
}

fn psql(database: &str, sql: &str) -> String {
    let out = Command::new("psql")
        .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1"])
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            "5432",
            "-U",
            "postgres",
            "-d",
            database,
        ])
        .args(["-c", sql])
        .env_remove("PGPASSWORD")
        .output()
        .expect("psql (postgresql-client) runs");
    assert!(out.status.success(), "psql `{sql}`: {}", stderr(&out));
    stdout(&out).trim_end_matches('\n').to_owned()
}

/// The private MariaDB server of this test binary: started on first use, ended (and its files
/// removed) when the binary exits, since its keeper ends it when its stdin closes.
struct Mariadb {
    port: u16,
    _keeper: Child,
}

fn mariadb() -> &'static Mariadb {
    static SERVER: OnceLock<Mariadb> = OnceLock::new();
    SERVER.get_or_init(start_mariadb)
}

fn start_mariadb() -> Mariadb {
    let dir: PathBuf = tempfile::tempdir().unwrap().keep();
    let data = dir.join("data");
    let install = Command::new("mariadb-install-db")
        .arg("--no-defaults")
        .arg(format!("--datadir={}", data.display()))
        .arg("--auth-root-authentication-method=normal")
        .arg("--user=root")
        .output()
        .expect("mariadb-install-db (mariadb-server) runs");
    assert!(
        install.status.success(),
        "mariadb-install-db: {}",
        stderr(&install)
    );
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap();
    let server = format!(
        "mariadbd --no-defaults --user=root --datadir={data} --socket={dir}/sock --port={port} \
         --bind-address=127.0.0.1 --skip-grant-tables --log-error={dir}/error.log --pid-file={dir}/pid",
        data = data.display(),
        dir = dir.display(),
    );
    // The keeper: the server runs until the test binary's end closes the keeper's stdin.
    let keeper = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "{server} & m=$!; cat >/dev/null; kill $m; wait $m; rm -rf '{}'",
            dir.display()
        ))
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let server = Mariadb {
        port,
        _keeper: keeper,
    };
    let started = Instant::now();
    while !maria_try(port, "SELECT 1").is_ok_and(|o| o == "1") {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "the MariaDB server never answered: {}",
            std::fs::read_to_string(dir.join("error.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    server
}

fn maria_try(port: u16, sql: &str) -> Result<String, String> {
    let out = Command::new("mariadb")
        .args([
            "--no-defaults",
            "-h",
            "127.0.0.1",
            "-u",
            "root",
            "-N",
            "-B",
            "-r",
        ])
        .arg(format!("--port={port}"))
        .args(["-e", sql])
        .output()
        .map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(stdout(&out).trim_end_matches('\n').to_owned())
    } else {
        Err(stderr(&out))
    }
}

/// A private database on the private MariaDB server.
struct MyDb(String);

impl MyDb {
    fn new() -> Self {
        let name = fresh("sqlstep");
        Self::sql_on("mysql", &format!("CREATE DATABASE {name}"));
        Self(name)
    }

    fn url(&self, password: &str) -> String {
        format!(
            "mariadb://root:{password}@127.0.0.1:{}/{}",
            mariadb().port,
            self.0
        )
    }

    fn sql(&self, sql: &str) -> String {
        Self::sql_on(&self.0, sql)
    }

    fn sql_on(database: &str, sql: &str) -> String {
        maria_try(mariadb().port, &format!("USE {database}; {sql}"))
            .unwrap_or_else(|e| panic!("mariadb `{sql}`: {e}"))
    }
}

/// `cairn run plan.yaml` with `params`; the run's output.
fn run(sandbox: &Sandbox, plan: &str, params: &[&str]) -> std::process::Output {
    sandbox.write("plan.yaml", plan);
    let mut args = vec!["run", "plan.yaml"];
    for p in params {
        args.extend(["-p", p]);
    }
    sandbox.cairn(&args)
}

/// A plan that makes a table, inserts `value` with a bound parameter (`marker` is `$1` or `?`),
/// and reads the row back into outputs.
fn insert_plan(url: &str, marker: &str) -> String {
    format!(
        r#"
name: insert
params:
  value: {{ required: true }}
steps:
  - id: insert
    sql:
      url: "{url}"
      statements:
        - query: CREATE TABLE t (id INT PRIMARY KEY, name TEXT NOT NULL)
        - query: INSERT INTO t (id, name) VALUES (1, {marker})
          params: ["{{{{ params.value }}}}"]
        - query: SELECT name, 7 AS seven FROM t WHERE name = {marker}
          params: ["{{{{ params.value }}}}"]
      outputs: {{ name: name, seven: seven }}
"#
    )
}

#[test]
fn a_value_with_quotes_and_sql_in_it_arrives_literally_on_postgresql_and_mariadb() {
    let (pg, my) = (PgDb::new(), MyDb::new());
    let mut sandbox_logs = None;
    for (url, marker) in [(pg.url("pw-unused"), "$1"), (my.url("pw-unused"), "?")] {
        let sandbox = Sandbox::new();
        let value = format!("value={HOSTILE}");
        let out = run(&sandbox, &insert_plan(&url, marker), &[&value]);
        assert_eq!(code(&out), Some(0), "{url}: {}", stderr(&out));
        let outputs = task(&sandbox.show(1), "insert")["outputs"].clone();
        assert_eq!(outputs["name"], HOSTILE, "{url}");
        assert_eq!(outputs["seven"], 7, "{url}: numbers stay numbers");
        sandbox_logs = Some(sandbox.cairn(&["logs", "1"]));
    }
    // The attempt's log says what each statement did, without the values.
    let logs = stdout(&sandbox_logs.unwrap());
    assert!(
        logs.contains("statement 2 of 3 (`INSERT INTO t (id, name) VALUES (1, ?)`): 1 row")
            && !logs.contains("DROP TABLE"),
        "{logs}"
    );
    // The rows hold exactly the value; the tables are still there.
    assert_eq!(pg.sql("SELECT name FROM t"), HOSTILE);
    assert_eq!(my.sql("SELECT name FROM t"), HOSTILE);
}

#[test]
fn outputs_of_a_single_row_feed_later_steps_and_a_change_master() {
    let (pg, my) = (PgDb::new(), MyDb::new());
    pg.sql("CREATE TABLE primaries (name TEXT, host TEXT, port INT)");
    pg.sql("INSERT INTO primaries VALUES ('db-1', $$db-1.example'; DROP TABLE x; --$$, 3306)");
    let plan = format!(
        r#"
name: repoint
params:
  cluster: {{ default: db-1 }}
steps:
  - id: primary
    sql:
      url: "{pg}"
      query: SELECT host, port FROM primaries WHERE name = $1
      params: ["{{{{ params.cluster }}}}"]
      outputs: {{ host: host, port: port }}
      row_count: found
  - id: position
    sql:
      url: "{my}"
      query: SELECT '0-1-42' AS gtid
      outputs: {{ gtid: gtid }}
  - id: repoint
    needs: [primary, position]
    sql:
      url: "{my}"
      statements:
        - query: SET GLOBAL gtid_slave_pos = ?
          params: ["{{{{ steps.position.outputs.gtid }}}}"]
        - query: SET @primary = ?, @port = ?
          params: ["{{{{ steps.primary.outputs.host }}}}", "{{{{ steps.primary.outputs.port }}}}"]
        - query: >-
            EXECUTE IMMEDIATE CONCAT('CHANGE MASTER TO MASTER_HOST=', QUOTE(@primary),
            ', MASTER_PORT=', @port + 0, ', MASTER_USE_GTID=slave_pos')
  - id: shown
    needs: [repoint]
    sql:
      url: "{my}"
      query: SHOW SLAVE STATUS
      outputs: {{ host: Master_Host, port: Master_Port }}
  - id: written
    needs: [shown]
    run: printf '%s:%s' {{{{ steps.shown.outputs.host }}}} {{{{ steps.shown.outputs.port }}}} > seen
"#,
        pg = pg.url("pw-unused"),
        my = my.url("pw-unused"),
    );
    let sandbox = Sandbox::new();
    let out = run(&sandbox, &plan, &[]);
    assert_eq!(code(&out), Some(0), "{}", stderr(&out));
    assert_eq!(sandbox.read("seen"), "db-1.example'; DROP TABLE x; --:3306");
    let show = sandbox.show(1);
    assert_eq!(task(&show, "primary")["outputs"]["found"], 1);
    assert_eq!(task(&show, "primary")["outputs"]["port"], 3306);
    assert_eq!(
        task(&show, "primary")["exit_code"],
        serde_json::Value::Null,
        "a sql step runs no process"
    );
    // Not exactly one row: the attempt fails, saying so.
    let none = plan.replace("default: db-1", "default: db-9");
    let out = run(&sandbox, &none, &[]);
    assert_eq!(code(&out), Some(1), "{}", stderr(&out));
    let error = task(&sandbox.show(2), "primary")["error"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        error.contains("returned 0 rows; `sql.outputs` reads exactly one"),
        "{error}"
    );
}

#[test]
fn a_failing_statement_gives_its_sqlstate_and_message_and_is_retried() {
    let (pg, my) = (PgDb::new(), MyDb::new());
    for (url, state, message) in [
        (
            pg.url("pw-unused"),
            "SQLSTATE 42P01",
            r#"relation "missing" does not exist"#,
        ),
        (
            my.url("pw-unused"),
            "SQLSTATE 42S02",
            "missing' doesn't exist (error 1146)",
        ),
    ] {
        let plan = format!(
            r#"
name: failing
steps:
  - id: read
    retry: {{ attempts: 2, delay: 10ms }}
    sql:
      url: "{url}"
      statements:
        - query: SELECT 1
        - query: SELECT count(*) FROM missing
"#
        );
        let sandbox = Sandbox::new();
        let out = run(&sandbox, &plan, &[]);
        assert_eq!(code(&out), Some(1), "{url}: {}", stderr(&out));
        let read = task(&sandbox.show(1), "read").clone();
        assert_eq!(read["status"], "failed");
        assert_eq!(read["attempts"], 2, "{url}: retried as the step says");
        let error = read["error"].as_str().unwrap();
        assert!(
            error.starts_with("statement 2 of 2 (`SELECT count(*) FROM missing`) failed: ")
                && error.contains(state)
                && error.contains(message),
            "{url}: {error}"
        );
    }
}

#[test]
fn a_transaction_rolls_back_when_a_later_statement_fails() {
    let (pg, my) = (PgDb::new(), MyDb::new());
    pg.sql("CREATE TABLE t (id INT PRIMARY KEY)");
    my.sql("CREATE TABLE t (id INT PRIMARY KEY) ENGINE=InnoDB");
    for (url, db) in [(pg.url("pw-unused"), 0), (my.url("pw-unused"), 1)] {
        for transaction in [true, false] {
            let plan = format!(
                r#"
name: both-or-none
steps:
  - id: insert
    sql:
      url: "{url}"
      transaction: {transaction}
      statements:
        - query: INSERT INTO t (id) VALUES (1)
        - query: INSERT INTO t (id) VALUES (1)
"#
            );
            let sandbox = Sandbox::new();
            let out = run(&sandbox, &plan, &[]);
            assert_eq!(code(&out), Some(1), "{url}: {}", stderr(&out));
            let error = task(&sandbox.show(1), "insert")["error"]
                .as_str()
                .unwrap()
                .to_owned();
            let count = if db == 0 {
                pg.sql("SELECT count(*) FROM t")
            } else {
                my.sql("SELECT count(*) FROM t")
            };
            if transaction {
                assert_eq!(count, "0", "{url}: the first insert was rolled back");
                assert!(
                    error.ends_with("; the transaction was rolled back"),
                    "{error}"
                );
            } else {
                assert_eq!(
                    count, "1",
                    "{url}: without a transaction the first insert stays"
                );
                if db == 0 {
                    pg.sql("DELETE FROM t");
                } else {
                    my.sql("DELETE FROM t");
                }
            }
        }
    }
}

const PASSWORD: &str = "Pw-sql-5513-secret";
/// A password written in the plan itself: stored with the plan's text, never shown.
const LITERAL: &str = "Literal-pw-8841";

#[test]
fn the_password_in_the_url_is_never_shown_or_stored() {
    let (pg, my) = (PgDb::new(), MyDb::new());
    let plan = format!(
        r#"
name: secret-url
params:
  password: {{ secret: true, required: true }}
steps:
  - id: pg
    sql:
      url: "postgres://postgres:{{{{ params.password }}}}@127.0.0.1:5432/{pg}"
      query: SELECT $1::int AS n
      params: ["{{{{ params.password }}}}"]
      outputs: {{ n: n }}
    continue_on_error: true
  - id: my
    sql:
      url: "mariadb://root:{{{{ params.password }}}}@127.0.0.1:{port}/{my}"
      statements:
        - query: SET @m = CONCAT('cannot log in with ', ?)
          params: ["{{{{ params.password }}}}"]
        - query: SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = @m
    continue_on_error: true
  - id: closed
    sql:
      url: "postgres://postgres:{{{{ params.password }}}}@127.0.0.1:1/{pg}"
      query: SELECT 1
    continue_on_error: true
  - id: literal
    sql:
      url: "postgres://postgres:{LITERAL}@127.0.0.1:1/{pg}"
      query: SELECT 1
"#,
        pg = pg.0,
        my = my.0,
        port = mariadb().port,
    );
    let sandbox = Sandbox::new();
    let password = format!("password={PASSWORD}");
    let out = run(&sandbox, &plan, &[&password]);
    assert_eq!(code(&out), Some(1), "{}", stderr(&out));
    let mut shown = format!("{}{}", stdout(&out), stderr(&out));
    for args in [
        &["status", "--json", "--all"][..],
        &["show", "1"],
        &["show", "1", "--json"],
        &["logs", "1"],
    ] {
        let out = sandbox.cairn(args);
        assert_eq!(code(&out), Some(0), "{args:?}: {}", stderr(&out));
        shown.push_str(&stdout(&out));
        shown.push_str(&stderr(&out));
    }
    let show = sandbox.show(1);
    for (id, expected) in [
        ("pg", "SQLSTATE 22P02"),
        ("my", "SQLSTATE 45000: cannot log in with ********"),
        (
            "closed",
            "cannot connect to postgres://postgres:********@127.0.0.1:1/",
        ),
        (
            "literal",
            "cannot connect to postgres://postgres:********@127.0.0.1:1/",
        ),
    ] {
        let error = task(&show, id)["error"].as_str().unwrap_or_default();
        assert!(error.contains(expected), "{id}: {error}");
    }
    assert!(
        !shown.contains(PASSWORD) && !shown.contains(LITERAL),
        "the password is shown somewhere:\n{shown}"
    );
    sandbox.assert_not_stored(PASSWORD);
}

/// Waits until `probe` returns true, up to a minute.
fn wait_until(what: &str, mut probe: impl FnMut() -> bool) {
    let started = Instant::now();
    while !probe() {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "{what} never happened"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A statement that records its run, then sleeps while it is the first run.
fn resumable_plan(url: &str, table: &str, check: bool) -> String {
    let check = if check {
        format!("      check: {{ query: \"SELECT 1 FROM {table}\" }}\n")
    } else {
        String::new()
    };
    format!(
        r#"
name: resumable
steps:
  - id: record
    sql:
      url: "{url}"
      statements:
        - query: INSERT INTO {table} DEFAULT VALUES
        - query: SELECT pg_sleep(CASE WHEN (SELECT count(*) FROM {table}) < 2 THEN 600 ELSE 0 END)
{check}"#
    )
}

#[test]
fn a_statement_cut_by_kill_9_runs_again_on_resume_unless_its_check_says_done() {
    let pg = PgDb::new();
    for (table, check, runs) in [("again", false, "2"), ("checked", true, "1")] {
        pg.sql(&format!(
            "CREATE TABLE {table} (at TIMESTAMPTZ DEFAULT now())"
        ));
        let sandbox = Sandbox::new();
        sandbox.write(
            "plan.yaml",
            &resumable_plan(&pg.url("pw-unused"), table, check),
        );
        let child = sandbox.spawn(&["run", "plan.yaml"]);
        wait_until("the first statement", || {
            pg.sql(&format!("SELECT count(*) FROM {table}")) == "1"
        });
        signal(&child, nix::sys::signal::Signal::SIGKILL);
        let mut child = child;
        let _ = child.wait();
        let resumed = sandbox.cairn(&["resume", "1"]);
        assert_eq!(code(&resumed), Some(0), "{table}: {}", stderr(&resumed));
        let record = task(&sandbox.show(1), "record").clone();
        assert_eq!(record["status"], "succeeded", "{table}");
        assert_eq!(record["by_check"], check, "{table}");
        assert_eq!(
            pg.sql(&format!("SELECT count(*) FROM {table}")),
            runs,
            "{table}: the statements ran {runs} times"
        );
    }
}

/// Statements still running on the servers whose text holds `marker`.
fn running(pg: &PgDb, marker: &str) -> (String, String) {
    let on_pg = pg.sql(&format!(
        "SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%{marker}%' AND pid <> pg_backend_pid()"
    ));
    let on_my = maria_try(
        mariadb().port,
        &format!(
            "SELECT count(*) FROM information_schema.PROCESSLIST WHERE INFO LIKE '%{marker}%' AND ID <> CONNECTION_ID()"
        ),
    )
    .unwrap();
    (on_pg, on_my)
}

#[test]
fn a_timeout_or_a_cancel_ends_the_statement_on_the_server_too() {
    let (pg, my) = (PgDb::new(), MyDb::new());
    for (url, sleep) in [
        (pg.url("pw-unused"), "pg_sleep(600 + 0.4242)"),
        (my.url("pw-unused"), "SLEEP(600 + 0.4242)"),
    ] {
        // `timeout`: the attempt fails, and the server no longer runs the statement.
        let plan = format!(
            r#"
name: slow
steps:
  - id: slow
    timeout: 2s
    sql: {{ url: "{url}", query: "SELECT {sleep}" }}
"#
        );
        let sandbox = Sandbox::new();
        let out = run(&sandbox, &plan, &[]);
        assert_eq!(code(&out), Some(1), "{url}: {}", stderr(&out));
        let error = task(&sandbox.show(1), "slow")["error"]
            .as_str()
            .unwrap()
            .to_owned();
        assert_eq!(error, "timed out after 2s", "{url}");
        wait_until("the timed-out statement's end", || {
            running(&pg, "0.4242") == ("0".into(), "0".into())
        });
        // `cancel` while the statement runs: the op is canceled, the statement ended.
        sandbox.write("plan.yaml", &plan.replace("    timeout: 2s\n", ""));
        let mut child = sandbox.spawn(&["run", "plan.yaml"]);
        wait_until("the statement's start", || {
            running(&pg, "0.4242") != ("0".into(), "0".into())
        });
        let cancel = sandbox.cairn(&["cancel", "2"]);
        assert_eq!(code(&cancel), Some(0), "{url}: {}", stderr(&cancel));
        let _ = child.wait();
        assert_eq!(sandbox.show(2)["status"], "canceled", "{url}");
        wait_until("the canceled statement's end", || {
            running(&pg, "0.4242") == ("0".into(), "0".into())
        });
    }
}
