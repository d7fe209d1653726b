//! `sse`: dashboards following an op cost it little. One op of 1,000 `run: "true"` steps in a
//! chain, run by `cairn serve --http`, with no client and then with 50 clients each doing what
//! the dashboard's op page does: follow `/api/v1/changes` (Server-Sent Events) and read the op
//! (`GET /api/v1/ops/1`) whenever the feed says it moved or asks for a fresh read. The op's steps/s with the clients over
//! its steps/s without them, rounds alternating, medians compared.

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::{Bench, Row, Target, median, op_rate, read_only, write_chain};

const CLIENTS: usize = 50;
const ROUNDS: usize = 3;

impl Bench {
    pub(crate) fn sse(&mut self) {
        let n = self.n(1000);
        let mut alone = Vec::new();
        let mut followed = Vec::new();
        let mut reads = 0;
        for round in 0..ROUNDS {
            alone.push(self.followed_round(n, 0, &format!("sse-{round}-alone")).0);
            let (rate, served) = self.followed_round(n, CLIENTS, &format!("sse-{round}-50"));
            followed.push(rate);
            reads += served;
        }
        eprintln!(
            "   alone {alone:.0?} steps/s; with {CLIENTS} followers {followed:.0?} steps/s; {reads} reads of the op answered"
        );
        self.rows.push(Row {
            id: "sse",
            what: format!(
                "chain of {n} `true` steps under serve --http, {CLIENTS} dashboards following it"
            ),
            value: median(followed),
            unit: "steps/s",
            rate: true,
            limit: median(alone),
            limit_what: "the same op with no client".to_owned(),
            target: Target::Ratio(0.9),
            peer: None,
        });
    }

    /// One op run by a fresh `serve --http` with `clients` followers: its steps/s and how many
    /// reads of the op the followers made.
    fn followed_round(&self, n: usize, clients: usize, name: &str) -> (f64, u64) {
        let dir = self.fresh(name);
        write_chain(&dir, "name: followed\n", n, "run: \"true\"");
        let out = self
            .cairn(&dir, &["token", "create", "bench", "--role", "viewer"])
            .stdout(Stdio::piped())
            .output()
            .unwrap();
        let token = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        assert!(token.starts_with("cairn_"), "no token: {token}");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let mut serve = Server(
            self.cairn(
                &dir,
                &[
                    "-q",
                    "serve",
                    "--poll",
                    "100ms",
                    "--http",
                    &addr.to_string(),
                ],
            )
            // Its log goes to a file: a pipe nobody reads would stop it once full.
            .stderr(std::fs::File::create(dir.join("serve.log")).unwrap())
            .spawn()
            .unwrap(),
        );
        let started = Instant::now();
        while TcpStream::connect(addr).is_err() {
            assert!(serve.0.try_wait().unwrap().is_none(), "serve exited");
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "serve never listened"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let done = Arc::new(AtomicBool::new(false));
        let reads = Arc::new(AtomicU64::new(0));
        let followers: Vec<_> = (0..clients)
            .map(|_| {
                let (token, done, reads) = (token.clone(), done.clone(), reads.clone());
                std::thread::spawn(move || follow(addr, &token, &done, &reads))
            })
            .collect();
        // Every follower has its feed open before the op is submitted.
        std::thread::sleep(Duration::from_millis(300));
        let submitted = Instant::now();
        let out = self.cairn(&dir, &["submit", "plan.yaml"]).output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        wait_ended(&dir.join("cairn.db"), &mut serve.0);
        let rate = op_rate(&dir, n, submitted.elapsed());
        done.store(true, Ordering::Relaxed);
        for follower in followers {
            let _ = follower.join();
        }
        (rate, reads.load(Ordering::Relaxed))
    }
}

/// A `serve` ended when the round ends, however it ends.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits until op 1 has succeeded.
fn wait_ended(db: &Path, serve: &mut Child) {
    let started = Instant::now();
    loop {
        let status: Option<String> = read_only(db).and_then(|c| {
            c.query_row("SELECT status FROM ops WHERE id = 1", [], |r| r.get(0))
                .ok()
        });
        match status.as_deref() {
            Some("succeeded") => return,
            Some("failed" | "canceled") => panic!("the followed op ended {status:?}"),
            _ => {}
        }
        assert!(serve.try_wait().unwrap().is_none(), "serve exited");
        assert!(
            started.elapsed() < Duration::from_secs(600),
            "the op never ended"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// What the dashboard's op page does: follows the feed, and reads the op each time it moved.
fn follow(addr: SocketAddr, token: &str, done: &AtomicBool, reads: &AtomicU64) {
    let Ok(mut feed) = TcpStream::connect(addr) else {
        return;
    };
    let _ = feed.set_read_timeout(Some(Duration::from_millis(200)));
    let _ = write!(
        feed,
        "GET /api/v1/changes HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\nAccept: text/event-stream\r\n\r\n"
    );
    let mut lines = BufReader::new(feed);
    let mut line = String::new();
    while !done.load(Ordering::Relaxed) {
        line.clear();
        match lines.read_line(&mut line) {
            Ok(0) => return,
            Ok(_) if moved(&line) && read_op(addr, token) => {
                reads.fetch_add(1, Ordering::Relaxed);
            }
            _ => {}
        }
    }
}

/// Whether a line of the feed asks the op page to read op 1 again: its `resync`, or an `ops`
/// event that names it.
fn moved(line: &str) -> bool {
    line.starts_with("event: resync")
        || line
            .strip_prefix("data: [")
            .is_some_and(|ids| ids.split([',', ']']).any(|id| id.trim() == "1"))
}

/// `GET /api/v1/ops/1` on a connection of its own, read to its end, taking gzip as a browser does.
fn read_op(addr: SocketAddr, token: &str) -> bool {
    let Ok(mut conn) = TcpStream::connect(addr) else {
        return false;
    };
    let _ = write!(
        conn,
        "GET /api/v1/ops/1 HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\nAccept-Encoding: gzip, deflate, br\r\nConnection: close\r\n\r\n"
    );
    let mut answer = Vec::new();
    conn.read_to_end(&mut answer).is_ok() && answer.starts_with(b"HTTP/1.1 200")
}
