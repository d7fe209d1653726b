//! The PostgreSQL scenarios, run with `--db postgres://user@host:port/db`: each on a fresh
//! database of that server (`cairn_bench_<scenario>`, dropped and made again), each against a limit
//! measured in the same run: single-row durable commits per second over one connection
//! (`synchronous_commit = on`, one `INSERT` each, as `pgbench` would do them).
//!
//! - `pg-chain`: a serial chain of 10,000 `noop` steps (one durable commit per step at best);
//! - `pg-independent`: 10,000 independent `noop` steps (group commit);
//! - `pg-serve`: 1,000 queued ops drained by three `cairn serve` nodes at once;
//! - `pg-dbos`: the same 1,000-step chain run by cairn and by `DBOS` (the Python package `dbos`,
//!   run by the Python that `CAIRN_BENCH_PYTHON` names, else `python3`) on the same server.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

use super::{Bench, Row, Target, per_second, write_chain};

/// The PostgreSQL scenarios, by name.
pub(crate) const SCENARIOS: [(&str, super::Scenario); 4] = [
    ("pg-chain", Bench::pg_chain),
    ("pg-independent", Bench::pg_independent),
    ("pg-serve", Bench::pg_serve),
    ("pg-dbos", Bench::pg_dbos),
];

/// The server's URL with `database` in place of the one it names.
fn with_database(url: &str, database: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("postgres", url));
    let authority = rest.split(['/', '?']).next().unwrap_or(rest);
    let query = rest.split_once('?').map(|(_, q)| format!("?{q}"));
    format!(
        "{scheme}://{authority}/{database}{}",
        query.unwrap_or_default()
    )
}

fn connect(url: &str) -> postgres::Client {
    postgres::Client::connect(url, postgres::NoTls)
        .unwrap_or_else(|e| panic!("cannot connect to {url}: {e}"))
}

impl Bench {
    /// A fresh database for `scenario`: its URL.
    fn pg_fresh(&self, scenario: &str) -> String {
        let server = self.pg.as_deref().expect("--db names a PostgreSQL server");
        let name = format!("cairn_bench_{}", scenario.replace('-', "_"));
        let mut admin = connect(server);
        // Two statements: a multi-statement string is one transaction, which DROP DATABASE refuses.
        admin
            .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .unwrap();
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .unwrap();
        with_database(server, &name)
    }

    /// Runs `cairn` on the PostgreSQL database at `url`, in `dir`, to its end.
    fn pg_timed(&self, dir: &Path, url: &str, args: &[&str]) -> std::time::Duration {
        let started = Instant::now();
        let out = self.cairn(dir, args).env("CAIRN_DB", url).output().unwrap();
        let took = started.elapsed();
        assert!(
            out.status.success(),
            "cairn {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        took
    }

    /// Single-row durable commits per second over one connection.
    fn pg_raw_commits(&self) -> f64 {
        let url = self.pg_fresh("raw");
        let mut client = connect(&url);
        client
            .batch_execute(
                "SET synchronous_commit = on; \
                 CREATE TABLE t (id BIGSERIAL PRIMARY KEY, at BIGINT, v TEXT)",
            )
            .unwrap();
        let insert = client
            .prepare("INSERT INTO t (at, v) VALUES ($1, 'succeeded')")
            .unwrap();
        let n = self.n(1000);
        let started = Instant::now();
        for i in 0..n {
            client
                .execute(&insert, &[&i64::try_from(i).unwrap()])
                .unwrap();
        }
        per_second(n, started.elapsed())
    }

    /// Steps per second over op 1's run as it recorded it.
    fn pg_op_rate(url: &str, n: usize) -> f64 {
        let ms: i64 = connect(url)
            .query_one("SELECT ended_at - started_at FROM ops WHERE id = 1", &[])
            .unwrap()
            .get(0);
        eprintln!("   {n} in {ms} ms from the op's start to its end");
        n as f64 / (ms.max(1) as f64 / 1000.0)
    }

    /// A chain of `n` noop steps run by `cairn run` on a fresh database: steps per second.
    fn pg_cairn_chain(&self, n: usize) -> f64 {
        let dir = self.fresh("pg-chain");
        let url = self.pg_fresh("chain");
        write_chain(&dir, "name: chain\n", n, "noop: true");
        self.pg_timed(&dir, &url, &["-q", "run", "plan.yaml"]);
        Self::pg_op_rate(&url, n)
    }

    pub(crate) fn pg_chain(&mut self) {
        let n = self.n(10_000);
        let (value, limit) = self.paired(
            |bench| bench.pg_raw_commits(),
            |bench| bench.pg_cairn_chain(n),
        );
        self.rows.push(Row {
            id: "pg-chain",
            what: format!("PostgreSQL: serial chain of {n} noop steps"),
            value,
            unit: "steps/s",
            rate: true,
            limit,
            limit_what: "durable PostgreSQL commits/s".to_owned(),
            target: Target::Ratio(0.6),
            peer: None,
        });
    }

    pub(crate) fn pg_independent(&mut self) {
        let n = self.n(10_000);
        let dir = self.fresh("pg-independent");
        let url = self.pg_fresh("independent");
        let mut plan = format!("name: independent\nmax_parallel: {n}\nsteps:\n");
        for i in 0..n {
            use std::fmt::Write as _;
            let _ = writeln!(plan, "  - id: s{i}\n    noop: true");
        }
        std::fs::write(dir.join("plan.yaml"), plan).unwrap();
        self.pg_timed(&dir, &url, &["-q", "run", "plan.yaml"]);
        let value = Self::pg_op_rate(&url, n);
        let limit = self.pg_raw_commits();
        self.rows.push(Row {
            id: "pg-independent",
            what: format!("PostgreSQL: {n} independent noop steps"),
            value,
            unit: "steps/s",
            rate: true,
            limit,
            limit_what: "durable PostgreSQL commits/s".to_owned(),
            target: Target::AtLeast(10_000.0),
            peer: None,
        });
    }

    pub(crate) fn pg_serve(&mut self) {
        let n = self.n(1000);
        let dir = self.fresh("pg-serve");
        let url = self.pg_fresh("serve");
        std::fs::write(
            dir.join("plan.yaml"),
            "name: queued\nparams:\n  n: { type: int, required: true }\ntitle: op {{ params.n }}\nsteps:\n  - id: a\n    noop: true\n  - id: b\n    needs: [a]\n    noop: true\n",
        )
        .unwrap();
        for i in 0..n {
            self.pg_timed(
                &dir,
                &url,
                &["submit", "plan.yaml", "-p", &format!("n={i}")],
            );
        }
        let started = Instant::now();
        let nodes: Vec<_> = (0..3)
            .map(|_| {
                self.cairn(&dir, &["-q", "serve", "--once", "--workers", "8"])
                    .env("CAIRN_DB", &url)
                    .spawn()
                    .unwrap()
            })
            .collect();
        for node in nodes {
            let out = node.wait_with_output().unwrap();
            assert!(
                out.status.success(),
                "a serve node failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let took = started.elapsed();
        let left: i64 = connect(&url)
            .query_one("SELECT count(*) FROM ops WHERE status <> 'succeeded'", &[])
            .unwrap()
            .get(0);
        assert_eq!(left, 0, "every queued op succeeded");
        let limit = self.pg_raw_commits();
        self.rows.push(Row {
            id: "pg-serve",
            what: format!("PostgreSQL: {n} queued ops (2 noop steps each), 3 nodes × 8 workers"),
            value: per_second(n, took),
            unit: "ops/s",
            rate: true,
            limit,
            limit_what: "durable PostgreSQL commits/s".to_owned(),
            target: Target::None,
            peer: None,
        });
    }

    pub(crate) fn pg_dbos(&mut self) {
        let n = self.n(1000);
        let python = std::env::var("CAIRN_BENCH_PYTHON").unwrap_or_else(|_| "python3".to_owned());
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("peers/dbos_chain.py");
        let url = self.pg_fresh("dbos");
        let out = Command::new(&python)
            .arg(&script)
            .arg(url.replacen("postgres://", "postgresql://", 1))
            .arg(n.to_string())
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {python}: {e}"));
        if !out.status.success() {
            eprintln!(
                "   DBOS did not run ({}); `pip install dbos` into the Python that CAIRN_BENCH_PYTHON names: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
                    .lines()
                    .last()
                    .unwrap_or_default()
            );
            return;
        }
        let dbos: f64 = String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .expect("DBOS's script prints its steps per second");
        let cairn = self.pg_cairn_chain(n);
        self.rows.push(Row {
            id: "pg-dbos",
            what: format!("PostgreSQL: chain of {n} noop steps, against DBOS"),
            value: cairn,
            unit: "steps/s",
            rate: true,
            limit: dbos,
            limit_what: "DBOS's steps/s, same chain and server".to_owned(),
            target: Target::Ratio(5.0),
            peer: Some(dbos),
        });
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_database_name_replaces_the_urls() {
        assert_eq!(
            super::with_database("postgres://me@h:5432/test?x=1", "b"),
            "postgres://me@h:5432/b?x=1"
        );
        assert_eq!(super::with_database("postgres://h", "b"), "postgres://h/b");
    }
}
