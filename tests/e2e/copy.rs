//! `cairn db copy FROM TO`: a team's SQLite history moved into a PostgreSQL database. The history
//! is made through the real binary; after the copy every value of every table is the same, the
//! commands read the same, and the ops go on there. Refusals: a target that holds ops, a source
//! in use (a running op, a live `serve`), other directions, schemas that differ. A copy killed
//! midway leaves the target without ops.
//!
//! Each test makes its own SQLite file and PostgreSQL database (127.0.0.1:5432), whatever
//! `CAIRN_TEST_BACKEND` says.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt as _;
use std::process::{Child, Output, Stdio};
use std::time::Duration;

use nix::sys::signal::Signal;
use serde_json::Value;

use crate::support::{Sandbox, code, signal, stderr, stdout, wait_until};

/// A child of the fleet: writes a line per step run to `runs`; `second` fails for the last four
/// children until `go` exists.
const COUNTED: &str = r#"
name: counted
params:
  n: { type: int, required: true }
steps:
  - id: first
    run: |
      n={{ params.n }}
      echo "first $n" >> runs
      echo "child $n says hello"
      echo "child $n warns" >&2
  - id: second
    needs: [first]
    run: |
      n={{ params.n }}
      echo "second $n" >> runs
      if [ "$n" -gt 996 ] && [ ! -e go ]; then echo "not yet" >&2; exit 3; fi
"#;

/// How many children the fleet runs (each a child op of its own).
const CHILDREN: u32 = 1000;

/// The secret reaches the step, which keeps it in `secret-seen`, and fails until `go-secret`.
const SECRET: &str = r#"
name: secret
params:
  password: { type: string, secret: true, required: true }
steps:
  - id: use
    env: { PW: "{{ params.password }}" }
    run: printf %s "$PW" > secret-seen && test -e go-secret
"#;

/// Succeeds (leaving a cooldown on its key) unless its key is `held` (then it fails, keeping its
/// lock).
const LOCKED: &str = r#"
name: locked
params:
  key: { type: string, required: true }
lock: "db/{{ params.key }}"
cooldown: 1h
steps:
  - id: work
    run: test {{ params.key }} != held
"#;

/// Waits for `go-gated`, failing after a minute (a test that failed first never writes it).
const GATED: &str = r"
name: gated
steps:
  - id: wait
    run: |
      echo wait >> gated-runs
      for i in $(seq 1200); do [ -e go-gated ] && exit 0; sleep 0.05; done; exit 1
";

fn fleet() -> String {
    let items: Vec<String> = (1..=CHILDREN).map(|n| n.to_string()).collect();
    format!(
        "name: fleet\nsteps:\n  - id: children\n    for_each: [{}]\n    plan: ./counted.yaml\n    with: {{ n: \"{{{{ item }}}}\" }}\n",
        items.join(", ")
    )
}

/// `cairn db copy FROM TO`, FROM the SQLite file of `from`, TO the database of `to` (run as `to`'s
/// commands are: its key file is `CAIRN_SECRET_KEY_FILE`).
fn copy(from: &Sandbox, to: &Sandbox) -> Output {
    to.command(&["db", "copy"])
        .arg(from.db())
        .arg(to.db())
        .output()
        .unwrap()
}

fn ok(sandbox: &Sandbox, args: &[&str]) -> Output {
    let out = sandbox.cairn(args);
    assert_eq!(code(&out), Some(0), "{args:?}: {}", stderr(&out));
    out
}

/// What people see of the history: every op's status, `show` and logs, the schedules, the
/// locks, cooldowns and the pause; by what was asked.
fn seen(sandbox: &Sandbox) -> BTreeMap<String, Value> {
    let mut seen = BTreeMap::new();
    let status = sandbox.json(&["status", "--all", "--json"]);
    for op in status.as_array().unwrap() {
        let id = op["id"].as_i64().unwrap().to_string();
        seen.insert(format!("show {id}"), sandbox.json(&["show", &id, "--json"]));
        let logs = ok(sandbox, &["logs", &id]);
        seen.insert(format!("logs {id}"), Value::String(stdout(&logs)));
    }
    seen.insert("status".to_owned(), status);
    seen.insert(
        "schedule list".to_owned(),
        sandbox.json(&["schedule", "list", "--json"]),
    );
    seen.insert("locks".to_owned(), sandbox.json(&["locks", "--json"]));
    seen
}

/// How many times each line occurs in `text`.
fn counts(text: &str) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for line in text.lines() {
        *counts.entry(line.to_owned()).or_default() += 1;
    }
    counts
}

/// The tables of the SQLite file and their columns. `moves` and `ops.event_seq` are left out: SQLite's schema
/// keeps it unused since version 4, and PostgreSQL's never had it.
fn tables(sqlite: &Sandbox) -> Vec<(String, Vec<String>)> {
    let names = sqlite.sql(
        "SELECT name FROM sqlite_schema WHERE type = 'table' AND name NOT LIKE 'sqlite%' ORDER BY name",
    );
    names
        .lines()
        // Which ops moved lately is for followers of changes, not history: PostgreSQL notifies it.
        .filter(|table| *table != "moves")
        .map(|table| {
            let columns = sqlite
                .sql(&format!("SELECT name FROM pragma_table_info('{table}')"))
                .lines()
                .filter(|c| (table, *c) != ("ops", "event_seq"))
                .map(ToOwned::to_owned)
                .collect();
            (table.to_owned(), columns)
        })
        .collect()
}

/// Every row of `table`, each value in hex (`-` for NULL), a line per row, sorted: the same text
/// on SQLite and PostgreSQL exactly when the values are the same.
fn rows(sandbox: &Sandbox, table: &str, columns: &[String], on_postgres: bool) -> Vec<String> {
    let bytea = if on_postgres {
        sandbox.sql(&format!(
            "SELECT column_name FROM information_schema.columns WHERE table_name = '{table}' AND data_type = 'bytea'"
        ))
    } else {
        String::new()
    };
    let values: Vec<String> = columns
        .iter()
        .map(|c| match on_postgres {
            // SQLite's `hex(NULL)` is the empty text.
            false => format!(
                "CASE WHEN \"{c}\" IS NULL THEN '-' ELSE lower(hex(CAST(\"{c}\" AS BLOB))) END"
            ),
            true if bytea.lines().any(|b| b == c) => {
                format!("coalesce(encode(\"{c}\", 'hex'), '-')")
            }
            true => format!("coalesce(encode(convert_to(\"{c}\"::text, 'UTF8'), 'hex'), '-')"),
        })
        .collect();
    let text = sandbox.sql(&format!("SELECT {} FROM \"{table}\"", values.join(", ")));
    let mut lines: Vec<String> = text.lines().map(ToOwned::to_owned).collect();
    lines.sort();
    lines
}

/// A SQLite history through the real binary: a fleet of 1,000 child ops (four failed, so the fleet
/// failed), a failed op with a secret param, an op killed while it ran (its owner dead), an op on
/// a lock that cools down, one that failed keeping its lock, a schedule, and the pause.
fn history(sqlite: &Sandbox) {
    sqlite.write("counted.yaml", COUNTED);
    sqlite.write("fleet.yaml", &fleet());
    sqlite.write("secret.yaml", SECRET);
    sqlite.write("locked.yaml", LOCKED);
    sqlite.write("gated.yaml", GATED);
    let out = sqlite.cairn(&["run", "fleet.yaml"]);
    assert_eq!(code(&out), Some(1), "{}", stderr(&out));
    let out = sqlite.cairn(&["run", "secret.yaml", "-p", "password=hunter2"]);
    assert_eq!(code(&out), Some(1), "{}", stderr(&out));
    ok(sqlite, &["run", "locked.yaml", "-p", "key=cool"]);
    let out = sqlite.cairn(&["run", "locked.yaml", "-p", "key=held"]);
    assert_eq!(code(&out), Some(1), "{}", stderr(&out));
    let mut killed = sqlite.spawn(&["run", "gated.yaml"]);
    sqlite.wait_for("gated-runs", Duration::from_secs(30));
    killed.kill().unwrap();
    killed.wait().unwrap();
    ok(
        sqlite,
        &[
            "schedule",
            "add",
            "nightly",
            "counted.yaml",
            "--cron",
            "0 3 * * *",
            "-p",
            "n=7",
        ],
    );
    ok(sqlite, &["pause", "--reason", "moving to PostgreSQL"]);
}

#[test]
fn a_sqlite_history_copied_to_postgres_reads_the_same_and_goes_on_there() {
    let sqlite = Sandbox::sqlite();
    history(&sqlite);
    let before = seen(&sqlite);
    let status = before["status"].as_array().unwrap();
    // The fleet and its children (the children after the first that failed may not have
    // started: no new item starts once one failed), the secret op, two on locks, the killed one.
    assert!(status.len() > 996 + 5, "{} ops", status.len());
    let ran_before = counts(&sqlite.read("runs"));
    let shown = |plan: &str| {
        status
            .iter()
            .filter(|o| o["plan"] == plan && o["parent"].is_null())
            .map(|o| (o["id"].as_i64().unwrap(), o["status"].as_str().unwrap()))
            .collect::<Vec<_>>()
    };
    let (fleet_op, secret_op, gated_op) =
        (shown("fleet")[0], shown("secret")[0], shown("gated")[0]);
    assert_eq!(
        (fleet_op.1, secret_op.1, gated_op.1),
        ("failed", "failed", "interrupted")
    );
    let highest = status
        .iter()
        .map(|o| o["id"].as_i64().unwrap())
        .max()
        .unwrap();

    let pg = Sandbox::on_postgres();
    // The PostgreSQL store's key file does not exist yet: the copy makes it.
    std::fs::remove_file(pg.key_file()).unwrap();
    let out = copy(&sqlite, &pg);
    assert_eq!(code(&out), Some(0), "{}", stderr(&out));
    let (said, noted) = (stdout(&out), stderr(&out));
    let key = std::fs::read(pg.key_file()).unwrap();
    assert_eq!(key, std::fs::read(sqlite.key_file()).unwrap());
    let mode = std::fs::metadata(pg.key_file())
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let key_text = String::from_utf8_lossy(&key).trim().to_owned();
    assert!(!said.contains(&key_text) && !noted.contains(&key_text));
    assert!(!said.contains("hunter2") && !noted.contains("hunter2"));
    let url = pg.db().into_string().unwrap();
    assert!(noted.contains(&format!("export CAIRN_DB={url}")), "{noted}");

    // Every table: a line with its count of rows, and on PostgreSQL every value as it was.
    for (table, columns) in tables(&sqlite) {
        let there = rows(&sqlite, &table, &columns, false);
        let line = said
            .lines()
            .find(|l| l.split_whitespace().next() == Some(table.as_str()))
            .unwrap_or_else(|| panic!("no line for `{table}`: {said}"));
        let count: usize = line.split_whitespace().nth(1).unwrap().parse().unwrap();
        assert_eq!(count, there.len(), "{line}");
        assert_eq!(rows(&pg, &table, &columns, true), there, "table `{table}`");
    }
    // Two chunks (stdout, stderr) from each child that ran before the first failure (996).
    assert!(rows(&pg, "logs", &["data".to_owned()], true).len() >= 2 * (CHILDREN as usize - 4));

    // What the commands print is the same, field for field.
    let after = seen(&pg);
    assert_eq!(after.len(), before.len());
    for (asked, value) in &before {
        assert_eq!(&after[asked], value, "{asked}");
    }

    // The ops go on there (their steps run in the plans' directory, the SQLite sandbox's): the
    // fleet's four failed children run only their failed step again; the secret opens; the
    // killed op's step runs again.
    ok(&pg, &["unpause"]);
    for name in ["go", "go-secret", "go-gated"] {
        sqlite.write(name, "");
    }
    std::fs::remove_file(sqlite.path().join("secret-seen")).unwrap();
    for op in [fleet_op.0, secret_op.0, gated_op.0] {
        ok(&pg, &["resume", &op.to_string()]);
    }
    let ran = counts(&sqlite.read("runs"));
    let before = |line: &str| ran_before.get(line).copied().unwrap_or(0);
    assert_eq!(before("second 997"), 1, "the first child to fail ran");
    for n in 1..=CHILDREN {
        let (first, second) = (format!("first {n}"), format!("second {n}"));
        // A child still running when 997 failed went on to its end: `first` ran once.
        assert_eq!(ran.get(&first), Some(&1), "{first}");
        // Children after 996 failed (or never started): `second` runs once more.
        let expected = if n > 996 { before(&second) + 1 } else { 1 };
        assert_eq!(ran.get(&second), Some(&expected), "{second}");
    }
    assert_eq!(sqlite.read("secret-seen"), "hunter2");
    assert_eq!(sqlite.read("gated-runs"), "wait\nwait\n");

    // A new op takes the next id; its plan, new to the database, the next snapshot id.
    pg.write(
        "new.yaml",
        "name: new\nsteps:\n  - id: one\n    run: echo new\n",
    );
    ok(&pg, &["run", "new.yaml"]);
    let newest = pg.json(&["status", "--json", "--limit", "1"]);
    assert_eq!(newest[0]["id"].as_i64(), Some(highest + 1), "{newest}");
}

/// A small history on SQLite: one op that succeeded.
fn small(sqlite: &Sandbox) {
    sqlite.write("locked.yaml", LOCKED);
    ok(sqlite, &["run", "locked.yaml", "-p", "key=one"]);
}

#[test]
fn a_copy_into_a_database_that_holds_ops_is_refused_and_changes_nothing() {
    let sqlite = Sandbox::sqlite();
    small(&sqlite);
    let pg = Sandbox::on_postgres();
    pg.write("locked.yaml", LOCKED);
    ok(&pg, &["run", "locked.yaml", "-p", "key=two"]);
    let status = pg.json(&["status", "--all", "--json"]);
    let key = std::fs::read(pg.key_file()).unwrap();
    let out = copy(&sqlite, &pg);
    assert_eq!(code(&out), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("already holds 1 op:"),
        "{}",
        stderr(&out)
    );
    assert_eq!(pg.json(&["status", "--all", "--json"]), status);
    assert_eq!(pg.json(&["show", "1", "--json"])["params"]["key"], "two");
    assert_eq!(std::fs::read(pg.key_file()).unwrap(), key);
}

#[test]
fn a_copy_is_refused_while_an_op_runs_or_a_serve_serves_the_sqlite_file() {
    let sqlite = Sandbox::sqlite();
    small(&sqlite);
    sqlite.write("gated.yaml", GATED);
    let pg = Sandbox::on_postgres();
    let mut running = sqlite.spawn(&["run", "gated.yaml"]);
    sqlite.wait_for("gated-runs", Duration::from_secs(30));
    let out = copy(&sqlite, &pg);
    assert_eq!(code(&out), Some(2), "{}", stderr(&out));
    let said = stderr(&out);
    assert!(
        said.contains(&format!(
            "op 2 (gated, `gated`) is running, owned by pid {}",
            running.id()
        )),
        "{said}"
    );
    assert!(said.contains("Stop them first"), "{said}");
    assert!(!pg.holds_ops());

    let serve = sqlite
        .command(&["serve", "--poll", "100ms"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_until("the node recording itself", || {
        sqlite
            .json(&["nodes", "--json"])
            .as_array()
            .is_some_and(|n| !n.is_empty())
    });
    let out = copy(&sqlite, &pg);
    assert_eq!(code(&out), Some(2), "{}", stderr(&out));
    let said = stderr(&out);
    assert!(
        said.contains(&format!("`cairn serve` (pid {}", serve.id())),
        "{said}"
    );
    assert!(!pg.holds_ops());

    // Once both have stopped, the copy goes through.
    signal(&serve, Signal::SIGTERM);
    assert!(serve.wait_with_output().unwrap().status.success());
    sqlite.write("go-gated", "");
    assert!(running.wait().unwrap().success());
    let out = copy(&sqlite, &pg);
    assert_eq!(code(&out), Some(0), "{}", stderr(&out));
    assert_eq!(pg.op_count(), 2);
}

#[test]
fn other_directions_and_schemas_that_differ_are_refused() {
    let sqlite = Sandbox::sqlite();
    small(&sqlite);
    let pg = Sandbox::on_postgres();
    let into_sqlite = pg
        .command(&["db", "copy"])
        .arg(pg.db())
        .arg(sqlite.path().join("other.db"))
        .output()
        .unwrap();
    let sqlite_to_sqlite = pg
        .command(&["db", "copy"])
        .arg(sqlite.db())
        .arg(sqlite.path().join("other.db"))
        .output()
        .unwrap();
    for out in [into_sqlite, sqlite_to_sqlite] {
        assert_eq!(code(&out), Some(2), "{}", stderr(&out));
        assert!(
            stderr(&out).contains("copies a SQLite file into a PostgreSQL database"),
            "{}",
            stderr(&out)
        );
    }
    assert!(!sqlite.path().join("other.db").exists());

    ok(&pg, &["db", "migrate"]);
    pg.sql("ALTER TABLE ops ADD COLUMN extra TEXT");
    sqlite.sql("ALTER TABLE schedules ADD COLUMN more TEXT");
    let out = copy(&sqlite, &pg);
    assert_eq!(code(&out), Some(2), "{}", stderr(&out));
    let said = stderr(&out);
    assert!(
        said.contains("its column `ops.extra` is not in the source"),
        "{said}"
    );
    assert!(
        said.contains("the source's column `schedules.more` is not in it"),
        "{said}"
    );
    assert!(!pg.holds_ops());
}

#[test]
fn the_key_must_be_the_same_on_both_sides_and_is_never_printed() {
    let sqlite = Sandbox::sqlite();
    sqlite.write("secret.yaml", SECRET);
    sqlite.write("go-secret", "");
    ok(&sqlite, &["run", "secret.yaml", "-p", "password=hunter2"]);
    let hex = std::fs::read_to_string(sqlite.key_file()).unwrap();
    let pg = Sandbox::on_postgres();
    // The sandbox made a key of its own: another key.
    let theirs = std::fs::read(pg.key_file()).unwrap();
    let out = copy(&sqlite, &pg);
    assert_eq!(code(&out), Some(2), "{}", stderr(&out));
    let said = stderr(&out);
    for file in [pg.key_file(), sqlite.key_file()] {
        assert!(said.contains(&format!("`{}`", file.display())), "{said}");
    }
    assert!(
        !said.contains(hex.trim()) && !said.contains("hunter2"),
        "{said}"
    );
    assert_nothing_copied(&pg);
    assert_eq!(std::fs::read(pg.key_file()).unwrap(), theirs);

    // The same key, as 32 raw bytes: it is the key, and the secret opens there.
    let raw: Vec<u8> = (0..32)
        .map(|i| u8::from_str_radix(&hex.trim()[i * 2..i * 2 + 2], 16).unwrap())
        .collect();
    std::fs::write(pg.key_file(), &raw).unwrap();
    let out = copy(&sqlite, &pg);
    assert_eq!(code(&out), Some(0), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("was already the key"),
        "{}",
        stderr(&out)
    );
    assert_eq!(std::fs::read(pg.key_file()).unwrap(), raw);
    std::fs::remove_file(sqlite.path().join("secret-seen")).unwrap();
    ok(&pg, &["resume", "1", "--from", "use"]);
    assert_eq!(sqlite.read("secret-seen"), "hunter2");

    // No key beside the SQLite file: copied, with a warning that the secrets need theirs.
    std::fs::remove_file(sqlite.key_file()).unwrap();
    let other = Sandbox::on_postgres();
    let out = copy(&sqlite, &other);
    assert_eq!(code(&out), Some(0), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("there is no key beside the SQLite file"),
        "{}",
        stderr(&out)
    );
}

/// Starts `cairn db copy` from `sqlite` into `pg` and returns it once it streams the logs in (the
/// ops and every table before `logs` were sent already, nothing is committed).
fn copy_until_the_logs(sqlite: &Sandbox, pg: &Sandbox) -> Child {
    let copying = "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
                   AND state = 'active' AND query LIKE 'COPY \"logs\"%'";
    let mut child = pg
        .command(&["db", "copy"])
        .arg(sqlite.db())
        .arg(pg.db())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_until("the copy streaming the logs in", || {
        assert!(child.try_wait().unwrap().is_none(), "the copy ended first");
        pg.sql(copying).trim() == "1"
    });
    child
}

/// Asserts that `pg`'s database holds nothing of a copy.
fn assert_nothing_copied(pg: &Sandbox) {
    assert!(!pg.holds_ops());
    for table in [
        "plan_snapshots",
        "ops",
        "tasks",
        "events",
        "logs",
        "settings",
    ] {
        let count = pg.sql(&format!("SELECT count(*) FROM {table}"));
        assert_eq!(count.trim(), "0", "{table}");
    }
}

#[test]
fn a_copy_killed_or_overtaken_by_a_write_midway_leaves_the_target_without_ops() {
    let sqlite = Sandbox::sqlite();
    small(&sqlite);
    // About 200 MB of logs, so that the copy takes a while.
    sqlite.sql(
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 6000) \
         INSERT INTO logs SELECT 1, 0, 1, 1000 + i, 1, 0, randomblob(32768) FROM n",
    );
    let pg = Sandbox::on_postgres();

    // Killed midway: the server rolls its transaction back.
    let mut child = copy_until_the_logs(&sqlite, &pg);
    child.kill().unwrap();
    child.wait().unwrap();
    wait_until("the server ending the copy's session", || {
        let sessions = "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
                        AND application_name = 'cairn'";
        pg.sql(sessions).trim() == "0"
    });
    assert_nothing_copied(&pg);

    // Another process writes to the SQLite file meanwhile: what was read is not all of it.
    let child = copy_until_the_logs(&sqlite, &pg);
    ok(&sqlite, &["pause", "--reason", "a write during the copy"]);
    let out = child.wait_with_output().unwrap();
    assert_eq!(code(&out), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("another process wrote to it while it was being copied"),
        "{}",
        stderr(&out)
    );
    assert_nothing_copied(&pg);

    // Nothing half-done is left in the way: the copy made again goes through, the pause too.
    let out = copy(&sqlite, &pg);
    assert_eq!(code(&out), Some(0), "{}", stderr(&out));
    assert_eq!(pg.op_count(), 1);
    let logs = "SELECT count(*) FROM logs";
    assert_eq!(pg.sql(logs), sqlite.sql(logs));
    let paused = pg.json(&["locks", "--json"]);
    assert_eq!(paused["paused"]["reason"], "a write during the copy");
}
