//! A step's output on its way to the logs: bounded memory whatever a step prints, and a log over
//! its `log_limit` keeps its head and its tail, with a line saying what was cut between them.

use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::{Sandbox, code, stderr, stdout, task};

/// The highest resident memory of a running process so far (`VmHWM`), in KiB; `None` once it
/// has exited.
fn peak_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// The lines of `cairn logs OP STEP --json`: (stream, text).
fn json_lines(sandbox: &Sandbox, step: &str) -> Vec<(String, String)> {
    let out = sandbox.cairn(&["logs", "1", step, "--json"]);
    assert_eq!(code(&out), Some(0), "{}", stderr(&out));
    stdout(&out)
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            (
                v["stream"].as_str().unwrap().to_owned(),
                v["text"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

/// The count of bytes a note `[cairn: 1,234 bytes cut here; ...]` says were cut.
fn cut_count(note: &str) -> u64 {
    let count = note
        .strip_prefix("[cairn: ")
        .and_then(|rest| rest.split_once(" bytes cut here; the log keeps its first "))
        .unwrap_or_else(|| panic!("not a note: {note:?}"))
        .0;
    count.replace(',', "").parse().unwrap()
}

/// A step that prints 300 MB (numbers, a line each) and then its error, on stdout and stderr, and
/// fails: `cairn run`'s memory stays bounded (the output was held in memory until the store took
/// it, and the end was dropped when the store fell behind), the log ends with the error, says
/// what was cut, and the attempt's error names it. 300 MB, not more: the tests run a debug build.
#[test]
fn logs_of_a_step_printing_hundreds_of_megabytes_keep_the_end_in_bounded_memory() {
    let sandbox = Sandbox::new();
    // `seq 1 33000000` prints 285,888,897 bytes.
    sandbox.write(
        "plan.yaml",
        "name: flood\nsteps:\n  - id: flood\n    run: |\n      seq 1 33000000\n      echo 'FATAL: the real error is here'\n      echo 'FATAL: the real error is here (stderr)' >&2\n      exit 1\n",
    );
    let mut run = sandbox.spawn(&["run", "plan.yaml"]);
    let started = Instant::now();
    let mut peak = 0;
    while run.try_wait().unwrap().is_none() {
        peak = peak.max(peak_kib(run.id()).unwrap_or(0));
        assert!(
            started.elapsed() < Duration::from_secs(600),
            "the run never ended"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let status = run.wait_with_output().unwrap();
    assert_eq!(
        status.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    assert!(peak > 0, "the run's memory was never read");
    assert!(
        peak < 100 * 1024,
        "cairn run peaked at {peak} KiB while a step printed 286 MB"
    );
    let logs = sandbox.cairn(&["logs", "1", "flood"]);
    assert_eq!(code(&logs), Some(0), "{}", stderr(&logs));
    let text = stdout(&logs);
    assert!(
        text.starts_with("==> flood (attempt 1) <==\n1\n2\n3\n"),
        "the head is kept"
    );
    // stderr's line comes where it was read, perhaps within stdout's last lines.
    let on_stderr = "FATAL: the real error is here (stderr)\n";
    assert!(text.contains(on_stderr), "stderr's end is kept");
    assert!(
        text.replacen(on_stderr, "", 1)
            .ends_with("\n32999999\n33000000\nFATAL: the real error is here\n"),
        "the tail is kept, the error last: {}",
        &text[text.len() - 200..]
    );
    let lines = json_lines(&sandbox, "flood");
    let notes: Vec<&str> = lines
        .iter()
        .filter(|(s, _)| s == "cairn")
        .map(|(_, t)| t.as_str())
        .collect();
    assert_eq!(notes.len(), 1, "{notes:?}");
    // The default limit, 1 MiB, kept of 285,888,897 + 30 + 39 bytes: at least half of it.
    let printed: u64 = 285_888_897 + 30 + 39;
    let cut = cut_count(notes[0]);
    assert!(
        (printed - (1 << 20)..=printed - (1 << 19)).contains(&cut),
        "{}",
        notes[0]
    );
    let show = sandbox.show(1);
    let error = task(&show, "flood")["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("FATAL: the real error is here"),
        "the attempt's error: {error:?}"
    );
}

/// `seq -s ' ' 1 N`: numbers separated by spaces, one line; how many bytes it prints.
fn spaced_numbers_bytes(n: u64) -> u64 {
    (1..=n).map(|i| i.to_string().len() as u64 + 1).sum()
}

/// With `log_limit: 1MiB`, a step printing 10 MB keeps its first eighth and its last seven, and
/// one line between them says how many bytes were cut: exactly what is missing. A secret in the
/// tail and in the error stays masked.
#[test]
fn logs_over_a_small_limit_keep_head_and_tail_and_count_what_was_cut() {
    let sandbox = Sandbox::new();
    // 10,000,000 bytes on one line (no line break before its end, so that what `logs` prints
    // between the head and the note is exactly one break more than the head).
    let n = 1_388_888;
    let printed = spaced_numbers_bytes(n);
    assert_eq!(printed, 10_000_000);
    sandbox.write(
        "plan.yaml",
        &format!(
            "name: ten\nparams:\n  pw: {{ secret: true, required: true }}\nsteps:\n  - id: ten\n    log_limit: 1MiB\n    env: {{ PW: \"{{{{ params.pw }}}}\" }}\n    run: |\n      seq -s ' ' 1 {n}\n      echo \"FATAL: login with $PW refused\" >&2\n      exit 3\n"
        ),
    );
    let secret = "hunter2-very-secret";
    let out = sandbox.cairn(&["run", "plan.yaml", "-p", &format!("pw={secret}")]);
    assert_eq!(code(&out), Some(1), "{}", stderr(&out));
    let logs = sandbox.cairn(&["logs", "1", "ten"]);
    assert_eq!(code(&logs), Some(0), "{}", stderr(&logs));
    let text = stdout(&logs);
    let (header, body) = text.split_once('\n').unwrap();
    assert_eq!(header, "==> ten (attempt 1) <==");
    let (head, rest) = body.split_once("[cairn: ").expect("a note of the cut");
    let (note, tail) = rest.split_once('\n').unwrap();
    let note = format!("[cairn: {note}");
    assert!(
        note.ends_with(" bytes cut here; the log keeps its first 128 KiB and last 896 KiB]"),
        "{note}"
    );
    assert!(
        head.starts_with("1 2 3 4 5 6 7 8 9 10 11 "),
        "{}",
        &head[..40]
    );
    // The head is a start of the one line: `logs` ended it to print the note on a line of its own.
    let head = head.strip_suffix('\n').unwrap();
    assert!(!head.contains('\n'));
    assert!(
        (64 * 1024..=128 * 1024).contains(&head.len()),
        "the head holds {} bytes",
        head.len()
    );
    // stderr's line comes where it was read, perhaps within stdout's last line.
    let fatal_line = "FATAL: login with ******** refused\n";
    assert!(tail.contains(fatal_line), "stderr's end is kept");
    let stdout_tail = tail.replacen(fatal_line, "", 1);
    assert!(
        stdout_tail.ends_with(&format!(" {} {n}\n", n - 1)),
        "the tail ends the line"
    );
    assert!(
        tail.len() <= 896 * 1024 && tail.len() > 700 * 1024,
        "{}",
        tail.len()
    );
    let fatal = fatal_line.len() as u64;
    assert_eq!(
        cut_count(&note) + head.len() as u64 + tail.len() as u64,
        printed + fatal,
        "the note counts exactly what is missing"
    );
    let show = sandbox.show(1);
    let error = task(&show, "ten")["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("FATAL: login with ******** refused"),
        "the attempt's error: {error:?}"
    );
    sandbox.assert_not_stored(secret);
}

/// A process that left the step's session and dropped its environment, and never stops writing to
/// the step's stdout: the step ends when its leader does (its readers take what the pipe held, not
/// the daemon's endless output), and what it printed before is in the log.
#[test]
fn a_daemon_that_never_stops_writing_does_not_hold_the_step() {
    let sandbox = Sandbox::new();
    sandbox.write(
        "plan.yaml",
        "name: chatter\nsteps:\n  - id: start\n    run: |\n      echo before\n      setsid env -i /usr/bin/yes daemon-line &\n      echo $! > daemon.pid\n      sleep 0.5\n",
    );
    let started = Instant::now();
    let out = sandbox.cairn(&["run", "plan.yaml"]);
    let took = started.elapsed();
    let pid: i32 = sandbox.read("daemon.pid").trim().parse().unwrap();
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    );
    assert_eq!(code(&out), Some(0), "{}", stderr(&out));
    assert!(
        took < Duration::from_secs(60),
        "the step waited for the daemon: {took:?}"
    );
    let logs = sandbox.cairn(&["logs", "1", "start"]);
    assert!(
        stdout(&logs).starts_with("==> start (attempt 1) <==\nbefore\n"),
        "{}",
        &stdout(&logs)[..200]
    );
}
