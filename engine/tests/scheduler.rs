//! The scheduler's transitions, driven through the real engine: ready → running → done releases
//! dependents once; a failure stops new launches but lets running tasks end; `continue_on_error`;
//! a fan-out gathers its items once they have all ended.

mod support;

use engine::{Options, RunEnd};
use serde_json::json;
use store::TaskStatus;
use support::{attempts, run, store, task};

#[tokio::test]
async fn a_step_starts_once_after_every_need_has_ended() {
    let (dir, store) = store();
    let plan = "name: diamond
steps:
  - id: a
    noop: true
  - id: b
    needs: [a]
    noop: true
  - id: c
    needs: [a]
    run: 'true'
  - id: d
    needs: [b, c]
    noop: true
";
    let (op, end) = run(&store, dir.path(), plan, Options::default()).await;
    assert_eq!(end, RunEnd::Succeeded);
    for name in ["a", "b", "c", "d"] {
        assert_eq!(
            task(&store, op, name).status,
            TaskStatus::Succeeded,
            "{name}"
        );
        assert_eq!(attempts(&store, op, name).len(), 1, "{name} ran once");
    }
    let ended = |name| attempts(&store, op, name)[0].ended_at.expect("ended");
    let started = |name| attempts(&store, op, name)[0].started_at;
    assert!(started("b") >= ended("a") && started("c") >= ended("a"));
    assert!(started("d") >= ended("b") && started("d") >= ended("c"));
}

#[tokio::test]
async fn a_failure_stops_new_launches_but_lets_running_steps_end() {
    let (dir, store) = store();
    let plan = "name: failing
steps:
  - id: slow
    sleep: 300ms
  - id: bad
    run: exit 3
  - id: after-slow
    needs: [slow]
    noop: true
  - id: after-bad
    needs: [bad]
    noop: true
";
    let (op, end) = run(&store, dir.path(), plan, Options::default()).await;
    assert!(
        matches!(&end, RunEnd::Failed(why) if why.contains("task `bad` failed")),
        "{end:?}"
    );
    assert_eq!(task(&store, op, "bad").status, TaskStatus::Failed);
    // Running when `bad` failed: it ran to its end.
    assert_eq!(task(&store, op, "slow").status, TaskStatus::Succeeded);
    // Released after the failure, or needing the failed step: never launched.
    for name in ["after-slow", "after-bad"] {
        assert_eq!(task(&store, op, name).status, TaskStatus::Pending, "{name}");
        assert!(
            attempts(&store, op, name).is_empty(),
            "{name} never started"
        );
    }
}

#[tokio::test]
async fn continue_on_error_lets_dependents_run_and_the_op_succeed() {
    let (dir, store) = store();
    let plan = "name: tolerant
steps:
  - id: bad
    run: 'false'
    continue_on_error: true
  - id: next
    needs: [bad]
    noop: true
";
    let (op, end) = run(&store, dir.path(), plan, Options::default()).await;
    assert_eq!(end, RunEnd::Succeeded);
    assert_eq!(task(&store, op, "bad").status, TaskStatus::Failed);
    assert_eq!(task(&store, op, "next").status, TaskStatus::Succeeded);
}

#[tokio::test]
async fn a_fan_out_gathers_its_items_once_they_have_all_ended() {
    let (dir, store) = store();
    let plan = "name: fan
steps:
  - id: shard
    for_each: [x, y, z]
    max_parallel: 2
    outputs: [v]
    run: echo v={{ item }} >> \"$CAIRN_OUTPUT\"
  - id: after
    needs: [shard]
    noop: true
";
    let (op, end) = run(&store, dir.path(), plan, Options::default()).await;
    assert_eq!(end, RunEnd::Succeeded);
    for item in ["x", "y", "z"] {
        let name = format!("shard[{item}]");
        assert_eq!(
            task(&store, op, &name).status,
            TaskStatus::Succeeded,
            "{name}"
        );
    }
    let shard = task(&store, op, "shard");
    assert_eq!(shard.status, TaskStatus::Succeeded);
    assert_eq!(
        serde_json::Value::Object(shard.outputs.expect("gathered outputs")),
        json!({"v": ["x", "y", "z"]})
    );
    let gathered = attempts(&store, op, "shard[z]")[0].ended_at.expect("ended");
    assert!(attempts(&store, op, "after")[0].started_at >= gathered);
}

#[tokio::test]
async fn a_fan_out_with_a_failed_item_fails_its_step() {
    let (dir, store) = store();
    let plan = "name: fan
steps:
  - id: shard
    for_each: [1, 2, 3]
    run: test {{ item }} != 2
  - id: after
    needs: [shard]
    noop: true
";
    let (op, end) = run(&store, dir.path(), plan, Options::default()).await;
    assert!(matches!(end, RunEnd::Failed(_)), "{end:?}");
    assert_eq!(task(&store, op, "shard[2]").status, TaskStatus::Failed);
    let shard = task(&store, op, "shard");
    assert_eq!(shard.status, TaskStatus::Failed);
    assert_eq!(
        shard.error.as_deref(),
        Some("1 of 3 items failed: shard[2]")
    );
    assert_eq!(task(&store, op, "after").status, TaskStatus::Pending);
}
