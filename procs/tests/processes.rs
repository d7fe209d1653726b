//! Real processes: nothing of an attempt outlives it.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use procs::proc::{self, attempt_processes};
use procs::spawn::{Spec, Stopped, read_outputs, spawn};
use tokio::sync::watch;

fn spec(script: &str, marker: &str) -> Spec {
    Spec {
        stdin: None,
        hold_stdin: false,
        argv: vec!["bash".into(), "-c".into(), script.into()],
        env: BTreeMap::from([("PATH".to_owned(), std::env::var("PATH").unwrap())]),
        cwd: std::env::temp_dir(),
        marker: marker.into(),
        timeout: None,
        grace: Duration::from_millis(500),
        located: None,
        alone: true,
        keep: false,
    }
}

fn unique(name: &str) -> String {
    format!(
        "test-{}-{name}-{}",
        std::process::id(),
        Instant::now().elapsed().as_nanos()
    )
}

#[tokio::test]
async fn a_background_child_left_by_a_finished_step_is_ended() {
    let marker = unique("bg");
    let (sink, mut chunks) = procs::spawn::sink();
    let running = spawn(&spec("sleep 1000 & echo started; exit 0", &marker), &sink).unwrap();
    let (_stop, stop) = watch::channel(false);
    let exit = running.wait(stop).await;
    assert!(exit.success(), "{exit:?}");
    assert_eq!(
        exit.leftovers, 1,
        "the background sleep was found and ended"
    );
    assert!(
        attempt_processes(None, None, &marker).is_empty(),
        "nothing of the attempt runs"
    );
    let first = chunks.recv().await.unwrap();
    assert_eq!(first.data, b"started\n");
}

#[tokio::test]
async fn a_timeout_ends_the_whole_group() {
    let marker = unique("timeout");
    let (sink, _chunks) = procs::spawn::sink();
    let mut s = spec("sleep 1000 & sleep 1000; echo never", &marker);
    s.timeout = Some(Duration::from_millis(300));
    let running = spawn(&s, &sink).unwrap();
    let pgid = running.pgid;
    let (_stop, stop) = watch::channel(false);
    let exit = running.wait(stop).await;
    assert_eq!(exit.stopped, Some(Stopped::TimedOut));
    assert!(!exit.success());
    assert!(attempt_processes(Some(pgid), None, &marker).is_empty());
}

#[tokio::test]
async fn a_stop_request_ends_the_group_even_when_it_ignores_term() {
    let marker = unique("stop");
    let (sink, _chunks) = procs::spawn::sink();
    let running = spawn(
        &spec("trap '' TERM; sleep 1000 & sleep 1000", &marker),
        &sink,
    )
    .unwrap();
    let (stop_tx, stop) = watch::channel(false);
    let started = Instant::now();
    let waiter = tokio::spawn(running.wait(stop));
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop_tx.send(true).unwrap();
    let exit = waiter.await.unwrap();
    assert_eq!(exit.stopped, Some(Stopped::Asked));
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(attempt_processes(None, None, &marker).is_empty());
}

#[tokio::test]
async fn a_process_that_left_the_group_is_found_by_its_marker() {
    let marker = unique("setsid");
    let (sink, _chunks) = procs::spawn::sink();
    // `setsid` puts the sleep in a new session and group; only the marker still ties it to us.
    let running = spawn(
        &spec(
            "setsid sleep 1000 < /dev/null > /dev/null 2>&1 & exit 0",
            &marker,
        ),
        &sink,
    )
    .unwrap();
    let (_stop, stop) = watch::channel(false);
    let exit = running.wait(stop).await;
    assert!(exit.success());
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        attempt_processes(None, None, &marker).is_empty(),
        "the escaped sleep was ended too"
    );
    assert!(exit.leftovers >= 1);
}

#[tokio::test]
async fn stderr_tail_and_exit_code_are_kept() {
    let (sink, _chunks) = procs::spawn::sink();
    let running = spawn(
        &spec(
            "echo out; echo 'disk is on fire' >&2; exit 3",
            &unique("code"),
        ),
        &sink,
    )
    .unwrap();
    let (_stop, stop) = watch::channel(false);
    let exit = running.wait(stop).await;
    assert_eq!(exit.code, Some(3));
    assert_eq!(exit.stderr_tail, "disk is on fire");
}

#[test]
fn a_dead_process_is_dead_and_a_live_one_alive() {
    let mut child = std::process::Command::new("sleep")
        .arg("1000")
        .spawn()
        .unwrap();
    let pid = child.id();
    let id = proc::Identity {
        pid,
        start: proc::stat(pid).unwrap().start,
        ..proc::me()
    };
    assert_eq!(proc::liveness(&id), proc::Liveness::Alive);
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(proc::liveness(&id), proc::Liveness::Dead);
}

#[test]
fn outputs_are_key_value_lines() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("out");
    std::fs::write(
        &path,
        "source=node-2\nshards=[\"a\",\"b\"]\n\nsource=node-3\nurl=x=y\n",
    )
    .unwrap();
    let outputs = read_outputs(&path).unwrap();
    assert_eq!(outputs["source"], "node-3");
    assert_eq!(outputs["shards"], "[\"a\",\"b\"]");
    assert_eq!(outputs["url"], "x=y");
    std::fs::write(&path, "not a pair\n").unwrap();
    assert!(read_outputs(&path).unwrap_err().contains("line 1"));
    assert!(
        read_outputs(&dir.path().join("missing"))
            .unwrap()
            .is_empty()
    );
}

/// A shell deaf to TERM that keeps starting processes in new sessions (each deaf to TERM too, and
/// carrying the marker): after the grace, the freeze catches every one, and nothing of the attempt
/// runs once the wait returns.
#[tokio::test]
async fn a_process_that_keeps_starting_others_is_ended_completely() {
    let marker = unique("forker");
    let (sink, _chunks) = procs::spawn::sink();
    let running = spawn(
        &spec(
            "trap '' TERM; while :; do setsid sleep 1000 < /dev/null > /dev/null 2>&1 & sleep 0.01; done",
            &marker,
        ),
        &sink,
    )
    .unwrap();
    let (stop_tx, stop) = watch::channel(false);
    let waiter = tokio::spawn(running.wait(stop));
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop_tx.send(true).unwrap();
    let exit = waiter.await.unwrap();
    assert_eq!(exit.stopped, Some(Stopped::Asked));
    let left = attempt_processes(None, None, &marker);
    proc::kill_all(&|| attempt_processes(None, None, &marker)).await;
    assert!(left.is_empty(), "{left:?} outlived the wait");
}

/// A hurry ends the grace: a step deaf to TERM, stopped with a grace of ten minutes, is gone as
/// soon as the hurry comes.
#[tokio::test]
async fn a_hurry_ends_the_grace_at_once() {
    let marker = unique("hurry");
    let (sink, _chunks) = procs::spawn::sink();
    let mut s = spec("trap '' TERM; sleep 1000", &marker);
    s.grace = Duration::from_secs(600);
    let (hurry_tx, hurry) = watch::channel(false);
    let running = spawn(&s, &sink).unwrap().hurried_by(hurry);
    let (stop_tx, stop) = watch::channel(false);
    let waiter = tokio::spawn(running.wait(stop));
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop_tx.send(true).unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiter.is_finished(), "the grace was cut short unasked");
    assert!(!attempt_processes(None, None, &marker).is_empty());
    hurry_tx.send(true).unwrap();
    let exit = tokio::time::timeout(Duration::from_secs(60), waiter)
        .await
        .expect("the hurry did not end the grace")
        .unwrap();
    assert_eq!(exit.stopped, Some(Stopped::Asked));
    assert!(attempt_processes(None, None, &marker).is_empty());
}

#[tokio::test]
async fn the_group_of_a_marked_leader_is_found_without_a_recorded_group() {
    let marker = unique("unrecorded");
    let (sink, _chunks) = procs::spawn::sink();
    // The child drops the marker but stays in the leader's group: found only through the leader,
    // as a resume finds an attempt whose record was not in yet.
    let script = format!("env -u {} sleep 1000 & sleep 1000", procs::proc::MARKER_VAR);
    let running = spawn(&spec(&script, &marker), &sink).unwrap();
    let leader = running.pgid;
    let started = Instant::now();
    let child = loop {
        let members: Vec<u32> = std::fs::read_dir("/proc")
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            .filter(|&pid| {
                pid != leader
                    && proc::stat(pid).is_some_and(|s| s.pgrp == leader && !s.is_gone())
                    && std::fs::read(format!("/proc/{pid}/environ")).is_ok_and(|e| {
                        !String::from_utf8_lossy(&e).contains(procs::proc::MARKER_VAR)
                    })
            })
            .collect();
        if let [child] = members[..] {
            break child;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the child never started"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let leaders = proc::marked_leaders(&marker);
    assert_eq!(leaders.len(), 1, "{leaders:?}");
    assert_eq!(leaders[0].0, leader);
    let found = attempt_processes(Some(leaders[0].0), Some(leaders[0].1), &marker);
    assert!(
        found.contains(&leader),
        "{found:?} holds the leader {leader}"
    );
    assert!(
        found.contains(&child),
        "{found:?} holds the child {child} that dropped the marker"
    );
    // Dropping the process ends its group.
    drop(running);
}
