//! The retry policy of a step (`retry:`), on tokio's paused clock: a backoff of minutes passes in
//! no time, and the delays taken are the policy's.

mod support;

use std::time::{Duration, Instant};

use engine::{Options, RunEnd};
use store::{AttemptStatus, TaskStatus};
use support::{attempts, run, store, task};

/// The options of these runs: a lease of ten minutes. They are about backoff, not leases; the
/// lease is judged by the real clock, and a virtual machine's storage can freeze for tens of
/// seconds, which would end a run's lease mid-test.
fn options() -> Options {
    Options::default().with_lease(Duration::from_secs(600))
}

#[tokio::test(start_paused = true)]
async fn a_failing_step_is_retried_after_its_backoff_without_sleeping_through_it() {
    let (dir, store) = store();
    let plan = "name: flaky
steps:
  - id: flaky
    run: exit 7
    retry: { attempts: 3, backoff: exponential, delay: 10m }
";
    let wall = Instant::now();
    let clock = tokio::time::Instant::now();
    let (op, end) = run(&store, dir.path(), plan, options()).await;
    assert!(matches!(end, RunEnd::Failed(_)), "{end:?}");
    let tried = attempts(&store, op, "flaky");
    assert_eq!(tried.len(), 3, "the first attempt and two retries");
    assert!(tried.iter().all(|a| a.status == AttemptStatus::Failed));
    assert!(tried.iter().all(|a| a.exit_code == Some(7)));
    assert_eq!(task(&store, op, "flaky").status, TaskStatus::Failed);
    // 10 minutes before the second attempt, 20 before the third, on the paused clock only.
    assert!(
        clock.elapsed() >= Duration::from_secs(30 * 60),
        "{:?}",
        clock.elapsed()
    );
    assert!(
        wall.elapsed() < Duration::from_secs(60),
        "{:?}",
        wall.elapsed()
    );
}

#[tokio::test(start_paused = true)]
async fn a_step_that_succeeds_on_a_retry_ends_succeeded() {
    let (dir, store) = store();
    let plan = "name: second-time
steps:
  - id: once
    run: test -f done || { touch done; exit 1; }
    retry: { attempts: 5, delay: 1h }
";
    let (op, end) = run(&store, dir.path(), plan, options()).await;
    assert_eq!(end, RunEnd::Succeeded);
    let tried = attempts(&store, op, "once");
    assert_eq!(tried.len(), 2);
    assert_eq!(tried[0].status, AttemptStatus::Failed);
    assert_eq!(tried[1].status, AttemptStatus::Succeeded);
}

#[tokio::test(start_paused = true)]
async fn an_exit_code_the_policy_does_not_name_is_not_retried() {
    let (dir, store) = store();
    let plan = "name: picky
steps:
  - id: picky
    run: exit 3
    retry: { attempts: 3, delay: 1s, on_exit_codes: [75] }
";
    let (op, end) = run(&store, dir.path(), plan, options()).await;
    assert!(matches!(end, RunEnd::Failed(_)), "{end:?}");
    assert_eq!(attempts(&store, op, "picky").len(), 1);
}
