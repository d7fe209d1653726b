//! The dashboard in a real headless Chromium, driven through chromedriver's `WebDriver` protocol
//! (JSON over HTTP, sent with `curl` as the API tests do), against the real `cairn serve --http`:
//! logging in, the ops table, a task turning from running to succeeded without a reload, a gate
//! approved and an op canceled by clicking, a log followed as it grows. Each test saves
//! screenshots (PNG) under `target/tmp/browser/<test>/` (Cargo's `CARGO_TARGET_TMPDIR`), kept
//! after the run. Waits poll the page until a deadline; no sleep is an assertion.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::support::{Sandbox, code, events, stderr, step_processes};
use crate::web::{Server, start, token, wait_status};

/// How long a wait on the page may take before the test fails.
const DEADLINE: Duration = Duration::from_secs(60);

/// chromedriver, started once for this test binary on a free port; a shell beside it ends it
/// when the test binary ends.
fn driver() -> u16 {
    static DRIVER: OnceLock<(u16, std::process::Child)> = OnceLock::new();
    DRIVER
        .get_or_init(|| {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let watcher = format!(
                "chromedriver --port={port} --allowed-ips=127.0.0.1 >/dev/null 2>&1 & d=$!; \
             while kill -0 {parent} 2>/dev/null; do sleep 1; done; kill $d",
                parent = std::process::id()
            );
            let watcher = Command::new("sh")
                .args(["-c", &watcher])
                .stdin(Stdio::null())
                .spawn()
                .expect("sh runs");
            let started = Instant::now();
            while http("GET", &format!("http://127.0.0.1:{port}/status"), None)["value"]["ready"]
                != true
            {
                assert!(started.elapsed() < DEADLINE, "chromedriver never answered");
                std::thread::sleep(Duration::from_millis(100));
            }
            (port, watcher)
        })
        .0
}

/// One `WebDriver` call: its `value`'s envelope as JSON (`Null` when nothing answers).
fn http(method: &str, url: &str, body: Option<&Value>) -> Value {
    let mut curl = Command::new("curl");
    curl.args(["-s", "-X", method, "-H", "Content-Type: application/json"]);
    if let Some(body) = body {
        curl.args(["--data-binary", &body.to_string()]);
    }
    let out = curl.arg(url).output().expect("curl runs");
    serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
}

/// A Chromium session with a fresh profile, ended when dropped.
struct Browser {
    url: String,
    shots: PathBuf,
    profile: tempfile::TempDir,
}

impl Browser {
    /// A browser for test `name`; its screenshots go to `target/tmp/browser/NAME/`.
    fn new(name: &str) -> Self {
        let port = driver();
        let profile = tempfile::tempdir().unwrap();
        let args = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            "--window-size=1280,900",
            &format!("--user-data-dir={}", profile.path().display()),
        ];
        let answer = http(
            "POST",
            &format!("http://127.0.0.1:{port}/session"),
            Some(&json!({"capabilities": {"alwaysMatch": {
                "browserName": "chrome",
                "goog:chromeOptions": {"binary": "/usr/bin/chromium", "args": args},
            }}})),
        );
        let id = answer["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no browser session: {answer}"))
            .to_owned();
        let shots = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join("browser")
            .join(name);
        let _ = std::fs::remove_dir_all(&shots);
        std::fs::create_dir_all(&shots).unwrap();
        Self {
            url: format!("http://127.0.0.1:{port}/session/{id}"),
            shots,
            profile,
        }
    }

    fn call(&self, method: &str, path: &str, body: Option<&Value>) -> Value {
        let answer = http(method, &format!("{}{path}", self.url), body);
        assert!(
            answer["value"]["error"].is_null(),
            "{method} {path}: {answer}"
        );
        answer["value"].clone()
    }

    fn open(&self, url: &str) {
        self.call("POST", "/url", Some(&json!({"url": url})));
    }

    /// Runs `script` (a function body; `arguments` holds `args`) in the page: what it returns.
    fn run(&self, script: &str, args: &[Value]) -> Value {
        self.call(
            "POST",
            "/execute/sync",
            Some(&json!({"script": script, "args": args})),
        )
    }

    /// The element `css` matches, once one does.
    fn find(&self, css: &str) -> String {
        self.wait(&format!("`{css}` on the page"), || {
            let found = http(
                "POST",
                &format!("{}/element", self.url),
                Some(&json!({"using": "css selector", "value": css})),
            );
            found["value"]["element-6066-11e4-a52e-4f735466cecf"]
                .as_str()
                .map(ToOwned::to_owned)
        })
    }

    /// Clicks what `css` matches; an element redrawn under the click is found again.
    fn click(&self, css: &str) {
        self.wait(&format!("a click on `{css}`"), || {
            let element = self.find(css);
            let answer = http(
                "POST",
                &format!("{}/element/{element}/click", self.url),
                Some(&json!({})),
            );
            match answer["value"]["error"].as_str() {
                None => Some(()),
                Some("stale element reference") => None,
                Some(_) => panic!("click on `{css}`: {answer}"),
            }
        });
    }

    fn type_in(&self, css: &str, text: &str) {
        let element = self.find(css);
        self.call(
            "POST",
            &format!("/element/{element}/value"),
            Some(&json!({"text": text})),
        );
    }

    /// Polls `probe` until it gives something, or fails the test (with a screenshot) at the
    /// deadline.
    fn wait<T>(&self, what: &str, mut probe: impl FnMut() -> Option<T>) -> T {
        let started = Instant::now();
        loop {
            if let Some(found) = probe() {
                return found;
            }
            if started.elapsed() > DEADLINE {
                self.screenshot("timed-out");
                let text = self.run("return document.body.innerText", &[]);
                panic!(
                    "never saw {what}; the page says:\n{}",
                    text.as_str().unwrap_or("")
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until `script` returns `want`.
    fn wait_for(&self, what: &str, script: &str, want: &Value) {
        self.wait(what, || (self.run(script, &[]) == *want).then_some(()));
    }

    /// Saves the page as `NAME.png` in this test's screenshots directory.
    fn screenshot(&self, name: &str) -> PathBuf {
        let data = self.call("GET", "/screenshot", None);
        let png = base64(data.as_str().expect("a screenshot is base64 text"));
        assert!(png.starts_with(b"\x89PNG"), "not a PNG");
        let path = self.shots.join(format!("{name}.png"));
        std::fs::write(&path, png).unwrap();
        path
    }

    /// Logs in on the dashboard with `token`, as a person pastes it.
    fn log_in(&self, server: &Server, token: &str) {
        self.open(&server.url("/"));
        self.type_in("#token", token);
        self.click("#login-button");
        self.find("#nav:not([hidden])");
    }

    /// Opens the page of op `op`.
    fn open_op(&self, server: &Server, op: i64) {
        self.open(&server.url(&format!("/#/op/{op}")));
    }

    /// Waits until the DAG shows `step` with `status`.
    fn wait_node(&self, step: &str, status: &str) {
        self.wait_for(
            &format!("{step} {status}"),
            &node_status(step),
            &json!(status),
        );
    }

    /// Asserts that the page offers no action button.
    fn assert_no_buttons(&self) {
        let script = "return document.querySelectorAll('#actions button').length";
        assert_eq!(self.run(script, &[]), json!(0));
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // Ends Chromium; its profile goes with the temporary directory.
        let _ = http("DELETE", &self.url, None);
        let _ = &self.profile;
    }
}

/// Standard base64 without line breaks.
fn base64(text: &str) -> Vec<u8> {
    let value = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => panic!("not base64: {c}"),
    };
    let bytes: Vec<u8> = text.bytes().filter(|&c| c != b'=').map(value).collect();
    bytes
        .chunks(4)
        .flat_map(|chunk| {
            let n = chunk
                .iter()
                .enumerate()
                .fold(0u32, |n, (i, &v)| n | (u32::from(v) << (18 - 6 * i)));
            let keep = chunk.len() * 6 / 8;
            (0..keep).map(move |i| (n >> (16 - 8 * i)) as u8)
        })
        .collect()
}

/// A plan whose steps wait for files in the op's directory: the test decides when they end (and
/// they end when the test's directory goes, so none outlives the test).
/// `prepare` prints a line per file `go1`..`go3`; `restore` fans out over three shards; then a
/// gate; then `work`, which waits for `done`.
const PLAN: &str = r#"
name: recovery
lock: "target/{{ params.target }}"
steps:
  - id: prepare
    run: |
      for i in 1 2 3; do
        while [ ! -f "$DIR/go$i" ]; do [ -d "$DIR" ] || exit 1; sleep 0.05; done
        echo "prepared part $i"
      done
    env: { DIR: "{{ params.dir }}" }
  - id: restore
    needs: [prepare]
    for_each: [shard-1, shard-2, shard-3]
    run: echo restoring {{ item }}
  - id: gate
    needs: [restore]
    approve: "Restored: switch traffic?"
  - id: work
    needs: [gate]
    run: |
      while [ ! -f "$DIR/done" ]; do [ -d "$DIR" ] || exit 1; sleep 0.05; done
      echo "traffic switched"
    env: { DIR: "{{ params.dir }}" }
params:
  dir: { type: string }
  target: { type: string, default: db-1 }
"#;

/// Submits [`PLAN`] through the API; the files it waits for are made in `sandbox`.
fn submit(sandbox: &Sandbox, server: &Server, operator: &str) -> i64 {
    let dir = sandbox.path().display().to_string();
    submit_with(server, operator, &json!({"dir": dir}))
}

/// Submits [`PLAN`] with `params`.
fn submit_with(server: &Server, operator: &str, params: &Value) -> i64 {
    let body = json!({"plan": PLAN, "params": params}).to_string();
    let answer = server.call("POST", "/ops", Some(operator), Some(&body));
    assert_eq!(answer.status, 201, "{}", answer.text);
    answer.json["id"].as_i64().unwrap()
}

/// What each test starts from: a sandbox, an operator's and a viewer's token in it, the server
/// over it, and a browser named `name`.
fn scene(name: &str) -> (Sandbox, String, String, Server, Browser) {
    let sandbox = Sandbox::new();
    let operator = token(&sandbox, "on-call", "operator");
    let viewer = token(&sandbox, "lead", "viewer");
    let server = start(&sandbox);
    let browser = Browser::new(name);
    (sandbox, operator, viewer, server, browser)
}

/// Waits until the op `uuid`'s step processes are running (`running`) or all ended.
fn wait_processes(uuid: &str, running: bool, what: &str) {
    let started = Instant::now();
    while step_processes(uuid).is_empty() == running {
        assert!(
            started.elapsed() < DEADLINE,
            "{what}: {:?}",
            step_processes(uuid)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The script that reads the op page's status.
const OP_STATUS: &str =
    "const s = document.querySelector('#op-status'); return s && s.dataset.status";

/// The status the op page's DAG shows for `step`.
fn node_status(step: &str) -> String {
    format!(
        "const n = document.querySelector('svg#dag g.node[data-step=\"{step}\"]'); \
         return n ? n.dataset.status : null;"
    )
}

/// Lets `prepare` print its lines and end.
fn release_prepare(sandbox: &Sandbox) {
    for i in 1..=3 {
        sandbox.write(&format!("go{i}"), "");
    }
}

#[test]
fn the_ops_table_lists_ops_live_and_filters_them() {
    let (sandbox, operator, viewer, server, browser) = scene("ops-table");
    let first = submit(&sandbox, &server, &operator);
    wait_status(&server, &viewer, first, "running");

    // A viewer logs in by pasting the token; the cookie is out of the page's scripts' reach.
    browser.log_in(&server, &viewer);
    assert_eq!(browser.run("return document.cookie", &[]), json!(""));
    browser.wait_for(
        "the op running in the table",
        &format!("const r = document.querySelector('#ops tr[data-op=\"{first}\"]'); return r && r.dataset.status"),
        &json!("running"),
    );

    // Without a reload: a new op shows up, and the first one goes on to wait at its gate.
    browser.run("window.kept = true", &[]);
    release_prepare(&sandbox);
    // The second op's step waits for files that never come.
    let elsewhere = sandbox.path().join("elsewhere");
    std::fs::create_dir(&elsewhere).unwrap();
    let second = submit_with(
        &server,
        &operator,
        &json!({"dir": elsewhere.display().to_string(), "target": "db-2"}),
    );
    // A third on the first one's target waits for its lock: the table says why.
    let third = submit_with(
        &server,
        &operator,
        &json!({"dir": elsewhere.display().to_string()}),
    );
    browser.wait_for(
        "why the third op waits",
        &format!("const r = document.querySelector('#ops tr[data-op=\"{third}\"]'); return r && [r.dataset.status, r.querySelector('td.why').textContent]"),
        &json!(["queued", format!("waiting for lock target/db-1 held by op {first}")]),
    );
    browser.wait_for(
        "the first op waiting and the second listed",
        &format!(
            "const s = (id) => {{ const r = document.querySelector(`#ops tr[data-op=\"${{id}}\"]`); return r && r.dataset.status; }}; \
             return [s({first}), s({second}) !== null, window.kept === true]"
        ),
        &json!(["waiting", true, true]),
    );
    let cur = browser.run(
        &format!(
            "return document.querySelector('#ops tr[data-op=\"{first}\"] td.cur').textContent"
        ),
        &[],
    );
    assert_eq!(cur, json!("gate"));

    browser.screenshot("all-ops");

    // Filtered by status: only the waiting op.
    let select = browser.find("#filter-status");
    browser.run(
        "arguments[0].value = 'waiting'; arguments[0].dispatchEvent(new Event('change'));",
        &[json!({"element-6066-11e4-a52e-4f735466cecf": select})],
    );
    browser.wait_for(
        "only the waiting op",
        "return [...document.querySelectorAll('#ops tbody tr')].map(r => Number(r.dataset.op))",
        &json!([first]),
    );
    browser.screenshot("ops-table");

    // A viewer is offered no button on the op page.
    browser.click(&format!("#ops tr[data-op=\"{first}\"] a"));
    browser.wait_for("the op page", &node_status("gate"), &json!("waiting"));
    browser.assert_no_buttons();
    browser.screenshot("viewer-op-page");

    // On a phone's screen, nothing runs off the side of the page (wide tables scroll in place).
    browser.call(
        "POST",
        "/window/rect",
        Some(&json!({"width": 390, "height": 844})),
    );
    browser.wait_for(
        "a page as narrow as the screen",
        "return window.innerWidth < 500 && document.documentElement.scrollWidth <= window.innerWidth",
        &json!(true),
    );
    browser.screenshot("phone-op-page");
}

#[test]
fn a_running_task_turns_succeeded_on_the_page_without_a_reload() {
    let (sandbox, operator, _viewer, server, browser) = scene("task-succeeds");
    let op = submit(&sandbox, &server, &operator);
    browser.log_in(&server, &operator);
    browser.open_op(&server, op);
    browser.wait_node("prepare", "running");
    browser.wait_for(
        "the tasks table",
        "const r = document.querySelector('#tasks tr[data-task=\"prepare\"]'); return r && r.dataset.status",
        &json!("running"),
    );
    browser.screenshot("running");
    browser.run("window.kept = true", &[]);
    release_prepare(&sandbox);
    browser.wait_for(
        "prepare succeeded",
        &node_status("prepare"),
        &json!("succeeded"),
    );
    // The fan-out is one node with its items counted; the gate waits.
    browser.wait_for("the gate waiting", &node_status("gate"), &json!("waiting"));
    let restore = browser.run(
        "return document.querySelector('svg#dag g.node[data-step=\"restore\"]').textContent",
        &[],
    );
    assert!(
        restore.as_str().unwrap().contains("3 items: 3 succeeded"),
        "{restore}"
    );
    assert_eq!(
        browser.run("return window.kept", &[]),
        json!(true),
        "the page reloaded"
    );
    browser.screenshot("succeeded");
}

#[test]
fn a_gate_is_approved_by_clicking() {
    let (sandbox, operator, _viewer, server, browser) = scene("approve");
    let op = submit(&sandbox, &server, &operator);
    release_prepare(&sandbox);
    wait_status(&server, &operator, op, "waiting");
    browser.log_in(&server, &operator);
    browser.open_op(&server, op);
    browser.click("#actions button[data-action=approve][data-task=gate]");
    browser.find("dialog#confirm[open]");
    browser.type_in("#confirm-reason", "restore checked by hand");
    browser.screenshot("confirm");
    browser.click("#confirm-ok");
    browser.wait_for("work running", &node_status("work"), &json!("running"));
    let approved = browser.screenshot("approved");
    if let Some(to) = std::env::var_os("CAIRN_DASHBOARD_PNG") {
        std::fs::copy(approved, to).unwrap();
    }
    sandbox.write("done", "");
    let done = wait_status(&server, &operator, op, "succeeded");
    assert!(
        events(&done)
            .iter()
            .any(|(k, m)| k == "approved"
                && m == "approved by token on-call: restore checked by hand"),
        "{:?}",
        events(&done)
    );
    browser.wait_for(
        "the op succeeded on the page",
        "return document.querySelector('#op-status').dataset.status",
        &json!("succeeded"),
    );
    // Backing out of the dialog does nothing: a finished op offers no button at all.
    browser.assert_no_buttons();
    browser.screenshot("succeeded");
}

#[test]
fn a_running_op_is_canceled_by_clicking_and_its_processes_end() {
    let (sandbox, operator, _viewer, server, browser) = scene("cancel");
    let op = submit(&sandbox, &server, &operator);
    let shown = wait_status(&server, &operator, op, "running");
    let uuid = shown["uuid"].as_str().unwrap().to_owned();
    wait_processes(&uuid, true, "the step never ran");
    browser.log_in(&server, &operator);
    browser.open_op(&server, op);
    browser.wait_node("prepare", "running");
    // Backing out of the dialog leaves the op alone.
    browser.click("#actions button[data-action=cancel]");
    browser.click("#confirm-no");
    browser.find("dialog#confirm:not([open])");
    browser.click("#actions button[data-action=cancel]");
    browser.type_in("#confirm-reason", "wrong shard");
    browser.click("#confirm-ok");
    browser.wait_for("the op canceled", OP_STATUS, &json!("canceled"));
    browser.screenshot("canceled");
    let done = wait_status(&server, &operator, op, "canceled");
    assert!(
        events(&done).iter().any(|(k, m)| k == "cancel-requested"
            && m.contains("token on-call")
            && m.contains("wrong shard")),
        "{:?}",
        events(&done)
    );
    wait_processes(&uuid, false, "processes of the canceled op live on");
}

#[test]
fn a_task_s_log_is_followed_as_it_grows() {
    let (sandbox, operator, viewer, server, browser) = scene("log");
    let op = submit(&sandbox, &server, &operator);
    wait_status(&server, &viewer, op, "running");
    browser.log_in(&server, &viewer);
    browser.open_op(&server, op);
    // The running task's log, picked in the DAG, is followed: each line shows as it is printed,
    // not before.
    browser.wait_node("prepare", "running");
    browser.click("svg#dag g.node[data-step=prepare] rect");
    let log = "const l = document.querySelector('#log'); return l ? l.textContent : null";
    browser.wait_for(
        "the log of prepare, empty",
        "return [document.querySelector('#log').previousElementSibling.textContent, document.querySelector('#log').textContent]",
        &json!(["Log of prepare", ""]),
    );
    for i in 1..=3 {
        sandbox.write(&format!("go{i}"), "");
        let want: String = (1..=i)
            .map(|n| format!("prepared part {n}\n"))
            .collect::<Vec<_>>()
            .concat();
        browser.wait_for(&format!("line {i} in the log"), log, &json!(want));
        browser.screenshot(&format!("log-{i}"));
    }
    // Clicking another node follows that step's log (its fan-out items' lines).
    browser.wait_for("restore done", &node_status("restore"), &json!("succeeded"));
    browser.click("svg#dag g.node[data-step=restore] rect");
    browser.wait("the lines of the three shards", || {
        let text = browser.run(log, &[]);
        let text = text.as_str().unwrap_or("");
        (1..=3)
            .all(|n| text.contains(&format!("restoring shard-{n}")))
            .then_some(())
    });
    let out = sandbox.cairn(&["cancel", &op.to_string()]);
    assert_eq!(code(&out), Some(0), "{}", stderr(&out));
}

#[test]
fn a_gate_is_rejected_and_the_failed_op_resumed_by_clicking() {
    let (sandbox, operator, _viewer, server, browser) = scene("reject-resume");
    let op = submit(&sandbox, &server, &operator);
    release_prepare(&sandbox);
    wait_status(&server, &operator, op, "waiting");
    browser.log_in(&server, &operator);

    // The locks page shows the lock the op holds.
    browser.click("#nav a[href='#/locks']");
    browser.wait(&format!("the lock of op {op}"), || {
        let text = browser.run("return document.querySelector('main').innerText", &[]);
        text.as_str()
            .is_some_and(|t| t.contains("target/db-1") && t.contains("Held locks"))
            .then_some(())
    });
    // An operator pauses everything there, with a reason, and lifts the pause.
    browser.click("#actions button[data-action=pause]");
    browser.type_in("#confirm-reason", "incident 42");
    browser.click("#confirm-ok");
    let pause = "return [...document.querySelectorAll('main tr')].map(r => r.innerText).filter(t => t.includes('everything')).join('|')";
    browser.wait("the pause listed", || {
        let text = browser.run(pause, &[]);
        let text = text.as_str().unwrap_or("");
        (text.contains("token on-call") && text.contains("incident 42")).then_some(())
    });
    let locks = sandbox.json(&["locks", "--json"]);
    assert_eq!(locks["paused"]["reason"], "incident 42", "{locks}");
    browser.screenshot("locks");
    browser.click("main button[data-action=unpause]");
    browser.click("#confirm-ok");
    browser.wait_for("the pause lifted", pause, &json!(""));
    assert_eq!(sandbox.json(&["locks", "--json"])["paused"], Value::Null);

    browser.open_op(&server, op);
    browser.click("#actions button[data-action=reject][data-task=gate]");
    browser.type_in("#confirm-reason", "replica lags");
    browser.click("#confirm-ok");
    browser.wait_for("the op failed", OP_STATUS, &json!("failed"));
    browser.screenshot("rejected");
    browser.click("#actions button[data-action=resume]");
    browser.click("#confirm-ok");
    // Resumed by the server that answered: the gate asks again.
    browser.wait_for("the op waiting again", OP_STATUS, &json!("waiting"));
    browser.wait_for(
        "the gate waiting again",
        &node_status("gate"),
        &json!("waiting"),
    );
    browser.screenshot("resumed");
    let shown = wait_status(&server, &operator, op, "waiting");
    let events = events(&shown);
    for (kind, message) in [
        ("rejected", "rejected by token on-call: replica lags"),
        ("resume-requested", "resume asked by token on-call"),
    ] {
        assert!(
            events.iter().any(|(k, m)| k == kind && m == message),
            "{kind}: {events:?}"
        );
    }
}
