//! Ending an attempt's processes is complete on every path: a step whose TERM trap starts a new
//! process (in a new session, or ignoring TERM) as it is being ended leaves nothing behind after a
//! `resume`'s sweep or an owner-less `cancel`; and a second Ctrl-C ends the steps at once.

use std::process::Child;
use std::time::{Duration, Instant};

use crate::support::{Sandbox, code, signal, stderr, step_processes};

/// The step: a TERM trap that notes it ran, starts `respawn` and exits; `sleep 1000` in the
/// foreground, so the trap runs once TERM has ended that sleep. Its stderr goes to a file: once
/// cairn is killed, the shell's report of the sleep's end ("Terminated") on the broken pipe would
/// end it by SIGPIPE before its trap ran.
fn plan(respawn: &str) -> String {
    format!(
        "name: respawn\nsteps:\n  - id: trapped\n    run: |\n      exec 2>>step.err\n      echo \"$CAIRN_OP_ID $CAIRN_ATTEMPT\" >> started\n      trap 'echo \"$CAIRN_OP_ID $CAIRN_ATTEMPT\" >> trapped; {respawn} & exit 1' TERM\n      sleep 1000\n"
    )
}

/// Asserts that the step's trap has run `count` times in all: each sweep was the attack.
fn assert_trapped(sandbox: &Sandbox, count: usize, when: &str) {
    let trapped = sandbox.read("trapped");
    assert_eq!(
        trapped.lines().count(),
        count,
        "{when}: the trap ran {trapped:?}"
    );
}

/// The pids of processes whose command line is `sleep <arg>`.
fn sleepers(arg: &str) -> Vec<u32> {
    let wanted = format!("sleep\0{arg}\0");
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| {
            crate::support::alive(pid)
                && std::fs::read(format!("/proc/{pid}/cmdline"))
                    .is_ok_and(|c| c.ends_with(wanted.as_bytes()))
        })
        .collect()
}

/// Kills every `sleep <arg>`, and every process working in the sandbox (cairn, its steps), when
/// dropped: a failing test leaves nothing behind.
struct Sweeper<'a>(&'a str, &'a std::path::Path);

impl Drop for Sweeper<'_> {
    fn drop(&mut self) {
        let here: Vec<u32> = std::fs::read_dir("/proc")
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
            .filter(|pid| {
                std::fs::read_link(format!("/proc/{pid}/cwd")).is_ok_and(|cwd| cwd == self.1)
            })
            .collect();
        for pid in sleepers(self.0).into_iter().chain(here) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap()),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// A sleep argument no other test (or test process) uses.
fn unique_arg(variant: u32) -> String {
    format!("777{variant}{}", std::process::id())
}

/// Waits until the step has started `count` times in all.
fn wait_started(sandbox: &Sandbox, count: usize) {
    let since = Instant::now();
    while sandbox.read("started").lines().count() < count {
        assert!(
            since.elapsed() < Duration::from_secs(30),
            "the step did not start a {count}th time: {}",
            sandbox.read("started")
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn kill_9(mut cairn: Child) {
    cairn.kill().unwrap();
    cairn.wait().unwrap();
}

/// The attempt markers (`<op uuid>/<task>/<n>`) the op's running processes carry.
fn markers(uuid: &str) -> Vec<String> {
    let wanted = format!("CAIRN_ATTEMPT_ID={uuid}/");
    step_processes(uuid)
        .into_iter()
        .filter_map(|pid| {
            let env = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
            env.split(|b| *b == 0)
                .find(|v| v.starts_with(wanted.as_bytes()))
                .and_then(|v| v.strip_prefix(b"CAIRN_ATTEMPT_ID=".as_slice()))
                .map(|v| String::from_utf8_lossy(v).into_owned())
        })
        .collect()
}

/// `rounds` of `kill -9` of cairn and `resume` of the op (whose sweep ends the killed run's step,
/// its trap and what the trap starts), then `rounds` of `kill -9` and an owner-less `cancel`:
/// after each, nothing the step's trap started is left, nor any process of an earlier attempt.
fn respawning_step_leaves_nothing(respawn: &str, arg: &str, rounds: usize) {
    let sandbox = Sandbox::new();
    let _sweeper = Sweeper(arg, sandbox.path());
    sandbox.write("plan.yaml", &plan(respawn));
    let mut started = 1;
    let mut cairn = sandbox.spawn(&["run", "plan.yaml", "--grace", "1s"]);
    wait_started(&sandbox, started);
    let uuid = sandbox.show(1)["uuid"].as_str().unwrap().to_owned();
    for round in 0..rounds {
        kill_9(cairn);
        cairn = sandbox.spawn(&["resume", "1", "--grace", "1s"]);
        started += 1;
        // The new attempt runs: the sweep of the killed one is over.
        wait_started(&sandbox, started);
        assert_trapped(&sandbox, round + 1, &format!("resume round {round}"));
        let left = sleepers(arg);
        assert!(left.is_empty(), "resume round {round}: {left:?} escaped");
        let attempt = format!("{uuid}/0/{started}");
        let others: Vec<String> = markers(&uuid)
            .into_iter()
            .filter(|m| *m != attempt)
            .collect();
        assert!(others.is_empty(), "resume round {round}: {others:?} left");
    }
    kill_9(cairn);
    for op in 1..=rounds {
        if op > 1 {
            let cairn = sandbox.spawn(&["run", "plan.yaml", "--grace", "1s"]);
            started += 1;
            wait_started(&sandbox, started);
            kill_9(cairn);
        }
        let op = i64::try_from(op).unwrap();
        let out = sandbox.cairn(&["cancel", &op.to_string(), "--grace", "1s"]);
        assert_eq!(code(&out), Some(0), "cancel of op {op}: {}", stderr(&out));
        let sweeps = rounds + usize::try_from(op).unwrap();
        assert_trapped(&sandbox, sweeps, &format!("cancel of op {op}"));
        let left = sleepers(arg);
        assert!(left.is_empty(), "cancel of op {op}: {left:?} escaped");
        let show = sandbox.show(op);
        let uuid = show["uuid"].as_str().unwrap();
        assert!(
            step_processes(uuid).is_empty(),
            "cancel of op {op}: {:?} left",
            markers(uuid)
        );
        assert_eq!(show["status"], "canceled");
    }
}

#[test]
fn a_trap_starting_a_new_session_leaves_nothing_after_resume_or_cancel() {
    let arg = unique_arg(1);
    respawning_step_leaves_nothing(&format!("setsid sleep {arg}"), &arg, 10);
}

#[test]
fn a_trap_starting_a_sleeper_in_the_group_leaves_nothing_after_resume_or_cancel() {
    let arg = unique_arg(2);
    respawning_step_leaves_nothing(&format!("sleep {arg}"), &arg, 10);
}

/// The sleeper the trap starts ignores TERM (inherited across `exec`): only the KILL after the
/// grace ends it.
#[test]
fn a_trap_starting_a_sleeper_deaf_to_term_leaves_nothing_after_resume_or_cancel() {
    let arg = unique_arg(3);
    respawning_step_leaves_nothing(&format!("trap \"\" TERM; setsid sleep {arg}"), &arg, 5);
}

#[test]
#[ignore = "50 rounds of each, on demand: cargo test -p cairn-cli --test e2e -- --ignored"]
fn fifty_rounds_of_trap_respawns_leave_nothing() {
    let arg = unique_arg(4);
    respawning_step_leaves_nothing(&format!("setsid sleep {arg}"), &arg, 50);
    let arg = unique_arg(5);
    respawning_step_leaves_nothing(&format!("sleep {arg}"), &arg, 50);
    let arg = unique_arg(6);
    respawning_step_leaves_nothing(&format!("trap \"\" TERM; setsid sleep {arg}"), &arg, 50);
}

const DEAF: &str = "name: deaf\nsteps:\n  - id: deaf\n    run: |\n      trap '' TERM\n      touch started\n      sleep 1000\n";

/// Signals `child` (`cairn run` or `serve`, running op 1's step deaf to TERM, with a long grace)
/// twice: after the first, the step lives on through its grace and so does `child`; after the
/// second, `child` leaves promptly, says so, having recorded the stop, and the step is gone.
/// Returns `child`'s exit status and op 1 as `show --json` has it.
fn signal_twice(
    sandbox: &Sandbox,
    child: &mut Child,
    sig: nix::sys::signal::Signal,
) -> (std::process::ExitStatus, serde_json::Value) {
    sandbox.wait_for("started", Duration::from_secs(20));
    let uuid = sandbox.show(1)["uuid"].as_str().unwrap().to_owned();
    signal(child, sig);
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        child.try_wait().unwrap().is_none(),
        "cairn left at the first {sig}"
    );
    assert!(
        !step_processes(&uuid).is_empty(),
        "the step was ended before its grace"
    );
    signal(child, sig);
    let since = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            since.elapsed() < Duration::from_secs(60),
            "a second {sig} did not end cairn"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut said = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut said).unwrap();
    assert!(
        said.contains("second interrupt: ending the steps now"),
        "{said}"
    );
    assert!(
        !said.contains("stopping now"),
        "it left without recording: {said}"
    );
    assert!(step_processes(&uuid).is_empty(), "the step outlived cairn");
    let show = sandbox.show(1);
    assert_eq!(show["status"], "interrupted", "{show:#}");
    (status, show)
}

/// A step deaf to TERM, with a long grace: the first Ctrl-C gives it the grace; the second ends it
/// at once, says so, and the op is still recorded interrupted (not left by the owner vanishing).
#[test]
fn a_second_ctrl_c_ends_the_steps_at_once() {
    let sandbox = Sandbox::new();
    sandbox.write("plan.yaml", DEAF);
    let mut run = sandbox.spawn(&["run", "plan.yaml", "--grace", "10m"]);
    let (status, show) = signal_twice(&sandbox, &mut run, nix::sys::signal::Signal::SIGINT);
    assert_eq!(status.code(), Some(4));
    assert_eq!(show["interrupted_by"], "signal", "{show:#}");
}

/// A second SIGTERM to `cairn serve` ends its ops' steps at once too: neither the drain's grace
/// nor the steps' is waited for, and the op is still recorded interrupted by the shutdown.
#[test]
fn a_second_sigterm_to_serve_ends_the_steps_at_once() {
    let sandbox = Sandbox::new();
    sandbox.write("plan.yaml", DEAF);
    assert_eq!(code(&sandbox.cairn(&["submit", "plan.yaml"])), Some(0));
    let mut serve = sandbox.spawn(&["serve", "--poll", "100ms", "--grace", "10m"]);
    let _sweeper = Sweeper("-", sandbox.path());
    let (_, show) = signal_twice(&sandbox, &mut serve, nix::sys::signal::Signal::SIGTERM);
    assert_eq!(show["interrupted_by"], "shutdown", "{show:#}");
}
