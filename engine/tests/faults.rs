//! The engine against a store that fails under it: a commit refused mid-op stops the run cleanly
//! and loses nothing recorded; a write fenced because another process took the op over stops the
//! op's steps and says so. The store is a real SQLite file behind `store::testing::Faulty`, the
//! steps real processes.

mod support;

use std::path::Path;
use std::time::Duration;

use engine::{Options, RunEnd};
use store::testing::Faulty;
use store::{AttemptStatus, Change, EventKind, OpId, OpStatus, ProcessId, Store, TaskStatus};
use support::{attempts, run, store, task};

/// Starts `yaml` on `store` in the background, as `cairn run` would, with `options`.
fn start(
    store: &Store,
    dir: &Path,
    yaml: &str,
    options: Options,
) -> tokio::task::JoinHandle<(OpId, RunEnd)> {
    let (store, dir, yaml) = (store.clone(), dir.to_path_buf(), yaml.to_owned());
    tokio::spawn(async move { run(&store, &dir, &yaml, options).await })
}

/// Waits (up to 20 s) until `path` exists.
async fn appears(path: &Path) {
    for _ in 0..400 {
        if path.exists() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{} never appeared", path.display());
}

/// Whether process `pid` still runs (a zombie does not).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit(')')
            .next()
            .is_some_and(|s| !s.trim_start().starts_with('Z'))
    })
}

/// A chain whose middle step says it started, then runs for `middle` seconds.
fn chain(middle: u32) -> String {
    format!(
        "name: chain
steps:
  - id: first
    outputs: [word]
    run: echo word=kept >> \"$CAIRN_OUTPUT\"; echo ran >> first.ran
  - id: middle
    needs: [first]
    run: echo $$ > middle.pid; touch middle.started; sleep {middle}; touch middle.done
  - id: last
    needs: [middle]
    run: touch last.ran
"
    )
}

#[tokio::test(flavor = "current_thread")]
async fn a_commit_failing_mid_op_stops_the_run_and_keeps_what_was_recorded() {
    let (guard, real) = store();
    let dir = guard.path();
    let faulty = Faulty::new(real.clone());
    let run = start(&faulty.store(), dir, &chain(1), Options::default());
    appears(&dir.join("middle.started")).await;
    // From now on the database refuses every write: the middle step's end cannot be recorded.
    faulty.fail_after(faulty.commits());
    let (op, end) = run.await.expect("the run ends");
    assert!(
        matches!(&end, RunEnd::StoreFailed(m) if m.contains("injected")),
        "{end:?}"
    );

    // What was recorded stays: the first step succeeded once, with its output.
    let first = task(&real, op, "first");
    assert_eq!(first.status, TaskStatus::Succeeded);
    assert_eq!(
        first.outputs.as_ref().and_then(|o| o.get("word")),
        Some(&"kept".into())
    );
    assert_eq!(
        std::fs::read_to_string(dir.join("first.ran")).unwrap(),
        "ran\n"
    );
    // Nothing was guessed for the middle step, and nothing after it started.
    let middle = attempts(&real, op, "middle");
    assert_eq!(middle.len(), 1);
    assert_eq!(
        middle[0].status,
        AttemptStatus::Running,
        "its end was never recorded"
    );
    assert_eq!(task(&real, op, "last").status, TaskStatus::Pending);
    assert!(attempts(&real, op, "last").is_empty());
    assert!(
        !dir.join("last.ran").exists(),
        "no step starts after a failed commit"
    );
    // The op is left as last recorded: not final, so a resume carries it on once the cause is gone.
    let row = real.reader().unwrap().op(op).unwrap();
    assert_eq!(row.status, OpStatus::Running);
    assert!(row.ended_at.is_none());
}

#[tokio::test(flavor = "current_thread")]
async fn a_fenced_write_stops_the_steps_and_says_another_process_owns_the_op() {
    let (guard, store) = store();
    let dir = guard.path();
    let options = Options {
        heartbeat: Duration::from_millis(200),
        grace: Duration::from_secs(2),
        ..Options::default()
    };
    let run = start(&store, dir, &chain(60), options);
    appears(&dir.join("middle.started")).await;
    let pid: u32 = std::fs::read_to_string(dir.join("middle.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(alive(pid));

    // Another process takes the op over, as a resume does once it finds the owner dead.
    let op = OpId(1);
    let mine = store
        .reader()
        .unwrap()
        .op(op)
        .unwrap()
        .owner
        .expect("an owner");
    let other = ProcessId {
        host: "elsewhere".into(),
        boot_id: "other-boot/1".into(),
        pid: 4_000_000,
        start: 1,
    };
    let now = engine::owner::now();
    store
        .apply(vec![Change::Claim {
            op,
            owner: other.clone(),
            lease_until: now + 600_000,
            dead_owner: Some(mine),
            now,
            queued: false,
            reopen: false,
            kind: EventKind::Resumed,
            message: "taken over by the test".into(),
        }])
        .await
        .expect("the claim");
    let events_at_claim = store.reader().unwrap().events(op).unwrap().len();

    let (_, end) = tokio::time::timeout(Duration::from_secs(30), run)
        .await
        .expect("the run stops once fenced")
        .expect("the run ends");
    let RunEnd::LostOwnership(why) = &end else {
        panic!("{end:?}");
    };
    assert!(
        why.starts_with("another process owns the op") && why.contains("elsewhere"),
        "names the new owner: {why}"
    );
    // Its step was ended, not left running beside the new owner's.
    assert!(!alive(pid), "the step's process {pid} still runs");
    assert!(!dir.join("middle.done").exists());
    // The fenced process wrote nothing more: no event, no attempt end, the new owner stays.
    let reader = store.reader().unwrap();
    assert_eq!(reader.events(op).unwrap().len(), events_at_claim);
    assert_eq!(
        attempts(&store, op, "middle")[0].status,
        AttemptStatus::Running
    );
    assert_eq!(reader.op(op).unwrap().owner, Some(other));
    assert!(attempts(&store, op, "last").is_empty());
}
