//! Operating ops: cancel, retries, timeouts, `check`, hooks, locks, cooldowns, pause, approvals.

use std::time::{Duration, Instant};

use crate::support::{Sandbox, code, events, stderr, step_processes, task};

#[test]
fn cancel_ends_a_running_op_its_processes_runs_on_cancel_and_refuses_resume() {
    let sandbox = Sandbox::new();
    sandbox.write(
        "plan.yaml",
        "name: cancel-me\nsteps:\n  - id: long\n    run: |\n      sleep 1000 &\n      touch started\n      sleep 1000\nhooks:\n  on_cancel:\n    - run: echo {{ op.status }} > on-cancel\n",
    );
    let mut run = sandbox.spawn(&["run", "plan.yaml", "--grace", "1s"]);
    sandbox.wait_for("started", Duration::from_secs(20));
    let uuid = sandbox.json(&["status", "--json"])[0]["uuid"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        step_processes(&uuid).len() >= 2,
        "the step and its background child run"
    );
    let started = Instant::now();
    let cancel = sandbox.cairn(&["cancel", "1", "--reason", "wrong target", "--grace", "1s"]);
    assert_eq!(code(&cancel), Some(0), "{}", stderr(&cancel));
    assert!(
        started.elapsed()
            < Duration::from_secs(2) + Duration::from_secs(1) + Duration::from_secs(2)
    );
    assert!(
        step_processes(&uuid).is_empty(),
        "no process of the step remains"
    );
    assert_eq!(run.wait().unwrap().code(), Some(3), "the run exits 3");
    assert_eq!(sandbox.read("on-cancel"), "canceled\n");
    let show = sandbox.show(1);
    assert_eq!(show["status"], "canceled");
    assert_eq!(task(&show, "long")["status"], "canceled");
    assert!(
        events(&show)
            .iter()
            .any(|(k, m)| k == "cancel-requested" && m.contains("wrong target"))
    );
    let resume = sandbox.cairn(&["resume", "1"]);
    assert_eq!(code(&resume), Some(2));
    assert!(
        stderr(&resume).contains("canceled and cannot be resumed"),
        "{}",
        stderr(&resume)
    );
}

#[test]
fn cancel_of_an_op_without_owner_is_done_by_the_command_hooks_included() {
    let sandbox = Sandbox::new();
    sandbox.write(
        "plan.yaml",
        "name: x\nsteps:\n  - id: a\n    run: test -f never\nhooks:\n  on_cancel:\n    - run: echo cleaned > cleaned\n",
    );
    assert_eq!(code(&sandbox.cairn(&["run", "plan.yaml"])), Some(1));
    let cancel = sandbox.cairn(&["cancel", "1"]);
    assert_eq!(code(&cancel), Some(0), "{}", stderr(&cancel));
    assert_eq!(sandbox.read("cleaned"), "cleaned\n");
    assert_eq!(sandbox.show(1)["status"], "canceled");
    let again = sandbox.cairn(&["cancel", "1"]);
    assert_eq!(code(&again), Some(0), "canceling twice is not an error");
    assert!(
        stderr(&again).contains("already canceled"),
        "{}",
        stderr(&again)
    );
    sandbox.write("ok.yaml", "name: ok\nsteps:\n  - id: a\n    noop: true\n");
    assert_eq!(code(&sandbox.cairn(&["run", "ok.yaml"])), Some(0));
    let done = sandbox.cairn(&["cancel", "2"]);
    assert_eq!(code(&done), Some(2));
    assert!(
        stderr(&done).contains("has succeeded; there is nothing to cancel"),
        "{}",
        stderr(&done)
    );
}

#[test]
fn retries_follow_the_backoff_and_every_attempt_is_recorded() {
    let sandbox = Sandbox::new();
    sandbox.write(
        "plan.yaml",
        "name: flaky\nsteps:\n  - id: flaky\n    retry: { attempts: 3, backoff: exponential, delay: 1s }\n    run: |\n      date +%s%3N >> starts\n      echo try $CAIRN_ATTEMPT\n      [ $CAIRN_ATTEMPT -ge 3 ]\n",
    );
    let out = sandbox.cairn(&["run", "plan.yaml"]);
    assert_eq!(code(&out), Some(0), "{}", stderr(&out));
    let show = sandbox.show(1);
    let flaky = task(&show, "flaky");
    assert_eq!(flaky["attempts"], 3);
    let history = flaky["history"].as_array().unwrap();
    assert_eq!(
        history
            .iter()
            .map(|a| a["status"].as_str().unwrap())
            .collect::<Vec<_>>(),
        ["failed", "failed", "succeeded"]
    );
    let starts: Vec<i64> = sandbox
        .read("starts")
        .lines()
        .map(|l| l.parse().unwrap())
        .collect();
    assert_eq!(starts.len(), 3);
    // Exponential from 1 s: at least 1 s, then at least 2 s between starts.
    assert!(starts[1] - starts[0] >= 1000, "{starts:?}");
    assert!(starts[2] - starts[1] >= 2000, "{starts:?}");
    let logs = sandbox.cairn(&["logs", "1", "flaky"]);
    let text = String::from_utf8_lossy(&logs.stdout);
    for n in 1..=3 {
        assert!(
            text.contains(&format!("==> flaky (attempt {n}) <==\ntry {n}\n")),
            "attempt {n} is in the logs: {text}"
        );
    }
}

#[test]
fn a_step_timeout_kills_its_process_group() {
    let sandbox = Sandbox::new();
    sandbox.write(
        "plan.yaml",
        "name: slow\nsteps:\n  - id: slow\n    timeout: 1s\n    run: |\n      sleep 1000 &\n      echo $! > child\n      sleep 1000\n",
    );
    let out = sandbox.cairn(&["run", "plan.yaml", "--grace", "1s"]);
    assert_eq!(code(&out), Some(1));
    let show = sandbox.show(1);
    assert_eq!(task(&show, "slow")["error"], "timed out after 1s");
    let child: u32 = sandbox.read("child").trim().parse().unwrap();
    assert!(
        !crate::support::alive(child),
        "the step's child was killed with its group"
    );
}

#[test]
fn an_op_timeout_fails_the_op() {
    let sandbox = Sandbox::new();
    sandbox.write(
        "plan.yaml",
        "name: slow\ntimeout: 1s\nsteps:\n  - id: slow\n    run: sleep 1000\n",
    );
    let out = sandbox.cairn(&["run", "plan.yaml", "--grace", "1s"]);
    assert_eq!(code(&out), Some(1), "{}", stderr(&out));
    assert_eq!(sandbox.show(1)["error"], "the op timed out after 1s");
}

#[test]
fn a_passing_check_skips_the_command_and_runs_first_after_a_crash() {
    let sandbox = Sandbox::new();
    sandbox.write(
        "plan.yaml",
        "name: idem\nsteps:\n  - id: copy\n    check: test -f done\n    run: |\n      echo ran >> runs\n      touch started\n      while [ ! -f go ]; do sleep 0.05; done\n      touch done\n",
    );
    sandbox.write("done", "");
    assert_eq!(code(&sandbox.cairn(&["run", "plan.yaml"])), Some(0));
    let show = sandbox.show(1);
    assert_eq!(task(&show, "copy")["by_check"], true);
    assert!(sandbox.read("runs").is_empty(), "the command never ran");
    assert!(events(&show).iter().any(|(_, m)| m.contains("by check")));

    // After a crash mid-step, the resume asks the check first: the step finished meanwhile.
    std::fs::remove_file(sandbox.path().join("done")).unwrap();
    let mut run = sandbox.spawn(&["run", "plan.yaml"]);
    sandbox.wait_for("started", Duration::from_secs(20));
    run.kill().unwrap();
    run.wait().unwrap();
    sandbox.write("done", "");
    let out = sandbox.cairn(&["resume", "2", "--grace", "1s"]);
    assert_eq!(code(&out), Some(0), "{}", stderr(&out));
    assert_eq!(sandbox.read("runs"), "ran\n", "the step did not run again");
    assert_eq!(task(&sandbox.show(2), "copy")["by_check"], true);
}

#[test]
fn a_failing_pre_hook_fails_the_op_before_any_step_and_on_failure_sees_the_task() {
    let sandbox = Sandbox::new();
    sandbox.write(
        "plan.yaml",
        "name: hooks\nsteps:\n  - id: step\n    run: echo ran > ran\nhooks:\n  pre:\n    - run: echo first >> order\n    - run: exit 7\n    - run: echo third >> order\n  on_failure:\n    - run: echo {{ op.failed_task }}:$CAIRN_FAILED_TASK:$CAIRN_OP_STATUS > failed\n",
    );
    let out = sandbox.cairn(&["run", "plan.yaml"]);
    assert_eq!(code(&out), Some(1));
    assert!(!sandbox.path().join("ran").exists(), "no step ran");
    assert_eq!(
        sandbox.read("order"),
        "first\n",
        "hooks run in order and stop at the failure"
    );
    assert_eq!(sandbox.read("failed"), "pre[2]:pre[2]:failed\n");
    let show = sandbox.show(1);
    assert_eq!(task(&show, "pre[2]")["exit_code"], 7);
    assert_eq!(task(&show, "step")["status"], "pending");

    // on_failure after a failing step sees that step.
    sandbox.write(
        "plan2.yaml",
        "name: hooks2\nsteps:\n  - id: restore\n    run: exit 3\nhooks:\n  on_failure:\n    - run: echo {{ op.failed_task }} > failed2\n",
    );
    assert_eq!(code(&sandbox.cairn(&["run", "plan2.yaml"])), Some(1));
    assert_eq!(sandbox.read("failed2"), "restore\n");
}

#[test]
fn ops_on_one_lock_never_overlap_and_a_dead_holder_keeps_it_until_canceled() {
    let sandbox = Sandbox::new();
    sandbox.write(
        "plan.yaml",
        "name: locked\nparams:\n  tag: { required: true }\nlock: shared-target\nsteps:\n  - id: work\n    run: |\n      echo \"start {{ params.tag | raw }} $(date +%s%N)\" >> timeline\n      sleep 0.5\n      echo \"end {{ params.tag | raw }} $(date +%s%N)\" >> timeline\n",
    );
    let a = sandbox.spawn(&["run", "plan.yaml", "-p", "tag=a"]);
    let b = sandbox.spawn(&["run", "plan.yaml", "-p", "tag=b"]);
    for mut child in [a, b] {
        assert!(child.wait().unwrap().success());
    }
    let timeline: Vec<(String, String, u128)> = sandbox
        .read("timeline")
        .lines()
        .map(|l| {
            let parts: Vec<&str> = l.split(' ').collect();
            (
                parts[0].to_owned(),
                parts[1].to_owned(),
                parts[2].parse().unwrap(),
            )
        })
        .collect();
    assert_eq!(timeline.len(), 4);
    assert_eq!(timeline[0].0, "start");
    assert_eq!(timeline[1].0, "end");
    assert_eq!(
        timeline[0].1, timeline[1].1,
        "one op's start and end are not interleaved: {timeline:?}"
    );
    assert!(timeline[1].2 <= timeline[2].2);

    // --no-wait refuses while another op holds the lock, naming it.
    sandbox.write("holder.yaml", "name: holder\nlock: shared-target\nsteps:\n  - id: hold\n    run: |\n      touch holding\n      sleep 1000\n");
    let mut holder = sandbox.spawn(&["run", "holder.yaml"]);
    sandbox.wait_for("holding", Duration::from_secs(20));
    let refused = sandbox.cairn(&["run", "plan.yaml", "-p", "tag=c", "--no-wait"]);
    assert_eq!(code(&refused), Some(2));
    assert!(
        stderr(&refused).contains("held by op 3"),
        "{}",
        stderr(&refused)
    );

    // kill -9 of the holder: its op is interrupted and keeps the lock.
    holder.kill().unwrap();
    holder.wait().unwrap();
    let locks = sandbox.json(&["locks", "--json"]);
    assert_eq!(locks["locks"][0]["op"], 3);
    assert_eq!(
        code(&sandbox.cairn(&["run", "plan.yaml", "-p", "tag=d", "--no-wait"])),
        Some(2)
    );
    // Canceling it frees the lock.
    let cancel = sandbox.cairn(&["cancel", "3", "--grace", "1s"]);
    assert_eq!(code(&cancel), Some(0), "{}", stderr(&cancel));
    assert!(
        sandbox.json(&["locks", "--json"])["locks"]
            .as_array()
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        code(&sandbox.cairn(&["run", "plan.yaml", "-p", "tag=e", "--no-wait"])),
        Some(0)
    );
}

#[test]
fn a_waiting_op_says_why_and_runs_when_the_lock_frees() {
    let sandbox = Sandbox::new();
    sandbox.write("holder.yaml", "name: holder\nlock: k\nsteps:\n  - id: hold\n    run: |\n      touch holding\n      while [ ! -f release ]; do sleep 0.05; done\n");
    sandbox.write(
        "waiter.yaml",
        "name: waiter\nlock: k\nsteps:\n  - id: go\n    run: touch waited\n",
    );
    let mut holder = sandbox.spawn(&["run", "holder.yaml"]);
    sandbox.wait_for("holding", Duration::from_secs(20));
    let mut waiter = sandbox.spawn(&["run", "waiter.yaml"]);
    let started = Instant::now();
    loop {
        let ops = sandbox.json(&["status", "--json"]);
        let waiting = ops
            .as_array()
            .unwrap()
            .iter()
            .find(|o| o["plan"] == "waiter");
        if let Some(op) = waiting
            && op["current_task"] == "waiting for lock k held by op 1"
        {
            assert_eq!(op["status"], "queued");
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(20), "{ops}");
        std::thread::sleep(Duration::from_millis(50));
    }
    sandbox.write("release", "");
    assert!(holder.wait().unwrap().success());
    assert!(waiter.wait().unwrap().success());
    assert!(sandbox.path().join("waited").exists());
}

#[test]
fn a_cooldown_refuses_a_new_op_until_acknowledged() {
    let sandbox = Sandbox::new();
    sandbox.write("plan.yaml", "name: failover\nlock: cluster/main\ncooldown: 1h\nsteps:\n  - id: promote\n    run: echo promoted >> promotions\n");
    assert_eq!(code(&sandbox.cairn(&["run", "plan.yaml"])), Some(0));
    let refused = sandbox.cairn(&["run", "plan.yaml"]);
    assert_eq!(code(&refused), Some(2));
    let message = stderr(&refused);
    assert!(
        message.contains("cools down for 59m") && message.contains("after op 1"),
        "{message}"
    );
    let ack = sandbox.cairn(&["ack", "cluster/main", "--reason", "the cluster is healthy"]);
    assert_eq!(code(&ack), Some(0), "{}", stderr(&ack));
    assert_eq!(code(&sandbox.cairn(&["run", "plan.yaml"])), Some(0));
    assert_eq!(sandbox.read("promotions"), "promoted\npromoted\n");
    let first = events(&sandbox.show(1));
    assert!(
        first
            .iter()
            .any(|(k, m)| k == "lock-released" && m.contains("cools down")),
        "{first:?}"
    );
    assert!(
        first
            .iter()
            .any(|(k, m)| k == "cooldown-acked" && m.contains("the cluster is healthy")),
        "{first:?}"
    );
    // --ignore-cooldown overrides, and says so.
    assert_eq!(
        code(&sandbox.cairn(&["run", "plan.yaml", "--ignore-cooldown"])),
        Some(0)
    );
    assert!(
        events(&sandbox.show(3))
            .iter()
            .any(|(k, _)| k == "cooldown-ignored")
    );
}

#[test]
fn pause_refuses_new_ops_but_not_running_ones() {
    let sandbox = Sandbox::new();
    sandbox.write("slow.yaml", "name: slow\nsteps:\n  - id: a\n    run: |\n      touch started\n      while [ ! -f go ]; do sleep 0.05; done\n  - id: b\n    needs: [a]\n    run: touch finished\n");
    sandbox.write(
        "quick.yaml",
        "name: quick\nsteps:\n  - id: a\n    noop: true\n",
    );
    let mut running = sandbox.spawn(&["run", "slow.yaml"]);
    sandbox.wait_for("started", Duration::from_secs(20));
    assert_eq!(
        code(&sandbox.cairn(&["pause", "--reason", "storage migration"])),
        Some(0)
    );
    let refused = sandbox.cairn(&["run", "quick.yaml"]);
    assert_eq!(code(&refused), Some(2));
    assert!(
        stderr(&refused).contains("storage migration"),
        "{}",
        stderr(&refused)
    );
    let locks = String::from_utf8_lossy(&sandbox.cairn(&["locks"]).stdout).into_owned();
    assert!(
        locks.contains("paused by") && locks.contains("storage migration"),
        "{locks}"
    );
    sandbox.write("go", "");
    assert!(running.wait().unwrap().success(), "the running op went on");
    assert!(sandbox.path().join("finished").exists());
    let forced = sandbox.cairn(&["run", "quick.yaml", "--ignore-pause"]);
    assert_eq!(code(&forced), Some(0));
    assert_eq!(code(&sandbox.cairn(&["unpause"])), Some(0));
    assert_eq!(code(&sandbox.cairn(&["run", "quick.yaml"])), Some(0));
    assert!(
        events(&sandbox.show(2))
            .iter()
            .any(|(k, _)| k == "pause-ignored")
    );
}

#[test]
fn an_approval_gate_waits_and_approve_or_reject_decides() {
    let sandbox = Sandbox::new();
    sandbox.write(
        "plan.yaml",
        "name: gate\nparams:\n  target: { default: node-2 }\nsteps:\n  - id: restore\n    run: echo restored\n  - id: confirm\n    needs: [restore]\n    approve: Switch {{ params.target }} into the group?\n  - id: switch\n    needs: [confirm]\n    run: echo switched >> switched\n",
    );
    let mut run = sandbox.spawn(&["run", "plan.yaml"]);
    sandbox.wait_for_db();
    let started = Instant::now();
    let op = loop {
        let ops = sandbox.json(&["status", "--json"]);
        // The op says `waiting` once only the gate is in flight, in a commit of its own: the
        // gate's own `waiting` may land just after it.
        if let Some(op) = ops.as_array().unwrap().first()
            && op["status"] == "waiting"
            && op["current_tasks"][0]["status"] == "waiting"
        {
            break op.clone();
        }
        assert!(started.elapsed() < Duration::from_secs(20), "{ops}");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(op["current_task"], "confirm");
    assert_eq!(op["current_tasks"][0]["status"], "waiting");
    assert_eq!(
        op["current_tasks"][0]["prompt"],
        "Switch node-2 into the group?"
    );
    let approve = sandbox.cairn(&["approve", "1", "confirm", "--comment", "looks right"]);
    assert_eq!(code(&approve), Some(0), "{}", stderr(&approve));
    assert!(run.wait().unwrap().success());
    assert_eq!(sandbox.read("switched"), "switched\n");
    let show = sandbox.show(1);
    let approved = events(&show)
        .into_iter()
        .find(|(k, _)| k == "approved")
        .unwrap();
    assert!(approved.1.contains("looks right"), "{approved:?}");
    // Answering twice is refused.
    assert_eq!(code(&sandbox.cairn(&["approve", "1", "confirm"])), Some(2));

    let mut run = sandbox.spawn(&["run", "plan.yaml"]);
    let started = Instant::now();
    while sandbox.json(&["status", "--json"])[0]["status"] != "waiting" {
        assert!(started.elapsed() < Duration::from_secs(20));
        std::thread::sleep(Duration::from_millis(50));
    }
    let reject = sandbox.cairn(&[
        "approve",
        "2",
        "confirm",
        "--reject",
        "--comment",
        "wrong node",
    ]);
    assert_eq!(code(&reject), Some(0));
    assert_eq!(run.wait().unwrap().code(), Some(1));
    let show = sandbox.show(2);
    assert_eq!(task(&show, "confirm")["status"], "failed");
    assert!(
        task(&show, "confirm")["error"]
            .as_str()
            .unwrap()
            .contains("wrong node")
    );
    assert_eq!(task(&show, "switch")["status"], "pending");
}

#[test]
fn status_says_when_a_task_waits_for_its_retry() {
    let sandbox = Sandbox::new();
    sandbox.write("plan.yaml", "name: wait\nsteps:\n  - id: flaky\n    retry: { attempts: 2, delay: 3s }\n    run: exit 1\n");
    let mut run = sandbox.spawn(&["run", "plan.yaml"]);
    sandbox.wait_for_db();
    let started = Instant::now();
    let current = loop {
        let ops = sandbox.json(&["status", "--json"]);
        if let Some(text) = ops[0]["current_task"]
            .as_str()
            .filter(|t| t.contains("retry"))
        {
            break text.to_owned();
        }
        assert!(started.elapsed() < Duration::from_secs(20), "{ops}");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        current.starts_with("flaky (attempt 1 failed; retry 2 at "),
        "{current}"
    );
    assert_eq!(run.wait().unwrap().code(), Some(1));
}

/// A `run` waiting for its lock owns its queued op: it notices a cancel at once (exit 3), and a
/// killed waiter leaves the op shown interrupted, not queued forever. (Controls review #4, #5.)
#[test]
fn a_waiting_run_notices_cancel_and_a_dead_waiter_shows_interrupted() {
    let sandbox = Sandbox::new();
    sandbox.write("holder.yaml", "name: holder\nlock: k\nsteps:\n  - id: hold\n    run: |\n      touch holding\n      while [ ! -f release ]; do sleep 0.05; done\n");
    sandbox.write("waiter.yaml", "name: waiter\nlock: k\nsteps:\n  - id: go\n    run: touch ran\nhooks:\n  on_cancel:\n    - run: touch cleaned\n");
    let mut holder = sandbox.spawn(&["run", "holder.yaml"]);
    sandbox.wait_for("holding", Duration::from_secs(20));
    let wait_for_queue = |op: usize| {
        let started = Instant::now();
        while sandbox.op_count() < op {
            assert!(started.elapsed() < Duration::from_secs(20));
            std::thread::sleep(Duration::from_millis(50));
        }
        // The waiter owns its queued op once it has tried the lock.
        std::thread::sleep(Duration::from_millis(700));
    };
    let mut waiter = sandbox.spawn(&["run", "waiter.yaml"]);
    wait_for_queue(2);
    let cancel = sandbox.cairn(&["cancel", "2"]);
    assert_eq!(code(&cancel), Some(0), "{}", stderr(&cancel));
    assert_eq!(
        waiter.wait().unwrap().code(),
        Some(3),
        "the waiting run ends canceled"
    );
    assert_eq!(sandbox.show(2)["status"], "canceled");
    assert!(
        !sandbox.path().join("cleaned").exists(),
        "an op that never started has nothing to clean"
    );

    let mut waiter = sandbox.spawn(&["run", "waiter.yaml"]);
    wait_for_queue(3);
    waiter.kill().unwrap();
    waiter.wait().unwrap();
    assert_eq!(
        sandbox.json(&["status", "--json"])[0]["status"],
        "interrupted"
    );
    sandbox.write("release", "");
    assert!(holder.wait().unwrap().success());
    assert_eq!(code(&sandbox.cairn(&["resume", "3"])), Some(0));
    assert!(sandbox.path().join("ran").exists());
}

/// A queued op waits out a pause instead of starting while paused. (Controls review #7.)
#[test]
fn a_queued_op_does_not_start_while_paused() {
    let sandbox = Sandbox::new();
    sandbox.write("holder.yaml", "name: holder\nlock: k\nsteps:\n  - id: hold\n    run: |\n      touch holding\n      while [ ! -f release ]; do sleep 0.05; done\n");
    sandbox.write(
        "waiter.yaml",
        "name: waiter\nlock: k\nsteps:\n  - id: go\n    run: touch ran\n",
    );
    let mut holder = sandbox.spawn(&["run", "holder.yaml"]);
    sandbox.wait_for("holding", Duration::from_secs(20));
    let mut waiter = sandbox.spawn(&["run", "waiter.yaml"]);
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(
        code(&sandbox.cairn(&["pause", "--reason", "freeze"])),
        Some(0)
    );
    sandbox.write("release", "");
    assert!(holder.wait().unwrap().success());
    let started = Instant::now();
    loop {
        let ops = sandbox.json(&["status", "--json"]);
        let current = ops[0]["current_task"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        if current.contains("paused") {
            assert!(current.contains("freeze"), "{current}");
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(20), "{ops}");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!sandbox.path().join("ran").exists());
    assert_eq!(code(&sandbox.cairn(&["unpause"])), Some(0));
    assert!(waiter.wait().unwrap().success());
    assert!(sandbox.path().join("ran").exists());
}

/// A failed branch ends the op even while an approval gate waits elsewhere (controls review #8);
/// the gate ends with it, canceled, and an answer is then refused (issue 22, item 15).
#[test]
fn a_failure_elsewhere_ends_the_op_without_waiting_for_a_gate() {
    let sandbox = Sandbox::new();
    sandbox.write("plan.yaml", "name: gate\nsteps:\n  - id: ok\n    approve: go ahead?\n  - id: other\n    run: sleep 0.5; exit 4\n  - id: after\n    needs: [ok]\n    noop: true\n");
    let started = Instant::now();
    let out = sandbox.cairn(&["run", "plan.yaml"]);
    assert_eq!(code(&out), Some(1), "{}", stderr(&out));
    assert!(started.elapsed() < Duration::from_secs(15));
    let show = sandbox.show(1);
    assert_eq!(task(&show, "ok")["status"], "canceled", "{show}");
    assert_eq!(task(&show, "ok")["error"], "no answer: the op failed");
    assert!(
        events(&show)
            .iter()
            .any(|(k, m)| k == "task-canceled" && m.contains("no answer before the op failed")),
        "{show}"
    );
    let out = sandbox.cairn(&["approve", "1", "ok"]);
    assert_eq!(code(&out), Some(2));
    assert!(
        stderr(&out).contains(
            "task `ok` is canceled, not waiting for an answer; the op is failed: `cairn resume 1` asks again"
        ),
        "{}",
        stderr(&out)
    );
}

/// Issue 22, item 15: the op's `timeout` bounds its work, not the time a person takes to answer:
/// an op waiting at a gate past its timeout goes on once approved. Time running beside a
/// waiting gate counts: the op times out, and the gate ends with it.
#[test]
fn the_op_timeout_does_not_count_time_waiting_at_a_gate() {
    let sandbox = Sandbox::new();
    sandbox.write(
        "plan.yaml",
        "name: gate\ntimeout: 2s\nsteps:\n  - id: confirm\n    approve: go?\n  - id: after\n    needs: [confirm]\n    run: echo after >> runs\n",
    );
    let mut run = sandbox.spawn(&["run", "plan.yaml"]);
    sandbox.wait_for_db();
    let started = Instant::now();
    while sandbox.json(&["status", "--json"])[0]["status"] != "waiting" {
        assert!(started.elapsed() < Duration::from_secs(20));
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_secs(3));
    let show = sandbox.show(1);
    assert_eq!(show["status"], "waiting", "{show}");
    assert_eq!(task(&show, "confirm")["status"], "waiting");
    let out = sandbox.cairn(&["approve", "1", "confirm"]);
    assert_eq!(code(&out), Some(0), "{}", stderr(&out));
    assert!(run.wait().unwrap().success());
    assert_eq!(sandbox.read("runs"), "after\n");

    sandbox.write(
        "busy.yaml",
        "name: busy\ntimeout: 2s\nsteps:\n  - id: confirm\n    approve: go?\n  - id: slow\n    run: sleep 30\n",
    );
    let out = sandbox.cairn(&["run", "busy.yaml"]);
    assert_eq!(code(&out), Some(1), "{}", stderr(&out));
    let show = sandbox.show(2);
    assert_eq!(show["status"], "failed");
    assert!(
        show["error"]
            .as_str()
            .unwrap()
            .contains("timed out after 2s"),
        "{show}"
    );
    assert_eq!(task(&show, "confirm")["status"], "canceled", "{show}");
    assert_eq!(
        task(&show, "confirm")["error"],
        "no answer: the op timed out after 2s"
    );
}

/// Issue 22, item 15: an approval step's own `timeout` fails the gate when no answer comes in
/// time, and the op with it; the event says why, and a late answer is refused.
#[test]
fn an_approval_step_timeout_fails_the_gate() {
    let sandbox = Sandbox::new();
    sandbox.write(
        "plan.yaml",
        "name: gate\nsteps:\n  - id: confirm\n    approve: go?\n    timeout: 1s\n  - id: after\n    needs: [confirm]\n    run: echo after >> runs\n",
    );
    let out = sandbox.cairn(&["run", "plan.yaml"]);
    assert_eq!(code(&out), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("confirm: failed: no answer within 1s"),
        "{}",
        stderr(&out)
    );
    let show = sandbox.show(1);
    assert_eq!(show["status"], "failed");
    assert_eq!(task(&show, "confirm")["status"], "failed");
    assert_eq!(task(&show, "after")["status"], "pending");
    assert!(
        events(&show).iter().any(|(k, m)| k == "task-failed"
            && m == "no answer within 1s (the step's `timeout`): the gate fails"),
        "{show}"
    );
    let out = sandbox.cairn(&["approve", "1", "confirm"]);
    assert_eq!(code(&out), Some(2));
    assert!(!sandbox.path().join("runs").exists());
}

/// A crash among the finishing hooks: the resume runs the hooks left, not the failed step again.
/// (Controls review #10.)
#[test]
fn a_crash_during_finishing_hooks_resumes_with_the_hooks() {
    let sandbox = Sandbox::new();
    sandbox.write(
        "plan.yaml",
        "name: hooks\nsteps:\n  - id: s\n    run: echo s >> runs; exit 1\nhooks:\n  on_failure:\n    - run: |\n        echo hook1 >> runs\n        touch in-hook\n        while [ ! -f go ]; do sleep 0.05; done\n    - run: echo hook2 >> runs\n",
    );
    let mut run = sandbox.spawn(&["run", "plan.yaml"]);
    sandbox.wait_for("in-hook", Duration::from_secs(20));
    run.kill().unwrap();
    run.wait().unwrap();
    sandbox.write("go", "");
    let out = sandbox.cairn(&["resume", "1", "--grace", "1s"]);
    assert_eq!(code(&out), Some(1), "{}", stderr(&out));
    assert_eq!(
        sandbox.read("runs"),
        "s\nhook1\nhook1\nhook2\n",
        "the step did not run again"
    );
    assert_eq!(sandbox.show(1)["status"], "failed");
}

/// Canceling an op that never started leaves the key's cooldown alone. (Controls review #6.)
#[test]
fn canceling_an_unstarted_op_keeps_the_cooldown() {
    let sandbox = Sandbox::new();
    sandbox.write("holder.yaml", "name: holder\nlock: k\ncooldown: 1h\nsteps:\n  - id: hold\n    run: |\n      touch holding\n      while [ ! -f release ]; do sleep 0.05; done\n");
    sandbox.write(
        "waiter.yaml",
        "name: waiter\nlock: k\nsteps:\n  - id: go\n    run: touch ran\n",
    );
    let mut holder = sandbox.spawn(&["run", "holder.yaml"]);
    sandbox.wait_for("holding", Duration::from_secs(20));
    let mut waiter = sandbox.spawn(&["run", "waiter.yaml"]);
    std::thread::sleep(Duration::from_millis(800));
    crate::support::signal(&waiter, nix::sys::signal::Signal::SIGINT);
    assert_eq!(waiter.wait().unwrap().code(), Some(4));
    sandbox.write("release", "");
    assert!(holder.wait().unwrap().success());
    assert_eq!(
        sandbox.json(&["locks", "--json"])["cooldowns"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    assert_eq!(code(&sandbox.cairn(&["cancel", "2"])), Some(0));
    assert_eq!(sandbox.show(2)["status"], "canceled");
    assert_eq!(
        sandbox.json(&["locks", "--json"])["cooldowns"]
            .as_array()
            .unwrap()
            .len(),
        1,
        "the cooldown stands"
    );
    assert!(!sandbox.path().join("ran").exists());
}

#[test]
fn resume_from_reruns_exactly_the_step_and_its_dependents() {
    let sandbox = Sandbox::new();
    sandbox.write(
        "plan.yaml",
        "name: chain\nsteps:\n  - id: fetch\n    run: echo fetch >> runs\n  - id: restore\n    needs: [fetch]\n    run: echo restore >> runs\n  - id: verify\n    needs: [restore]\n    run: echo verify >> runs\n  - id: side\n    needs: [fetch]\n    run: echo side >> runs\nhooks:\n  on_success:\n    - run: echo hook >> runs\n",
    );
    assert_eq!(code(&sandbox.cairn(&["run", "plan.yaml"])), Some(0));
    let dry = sandbox.cairn(&["resume", "1", "--from", "restore", "--dry-run"]);
    let dry = String::from_utf8_lossy(&dry.stdout).into_owned();
    assert!(
        dry.contains("keep  fetch")
            && dry.contains("run   restore")
            && dry.contains("run   verify")
            && dry.contains("keep  side"),
        "{dry}"
    );
    assert!(dry.contains("nothing upstream of it runs again"), "{dry}");
    std::fs::remove_file(sandbox.path().join("runs")).unwrap();
    let out = sandbox.cairn(&["resume", "1", "--from", "restore"]);
    assert_eq!(code(&out), Some(0), "{}", stderr(&out));
    assert_eq!(sandbox.read("runs"), "restore\nverify\nhook\n");
    let show = sandbox.show(1);
    assert_eq!(show["status"], "succeeded");
    assert_eq!(task(&show, "restore")["attempts"], 2);
    assert_eq!(task(&show, "fetch")["attempts"], 1);
    assert_eq!(
        code(&sandbox.cairn(&["resume", "1", "--from", "nope"])),
        Some(2)
    );
}

#[test]
fn mark_resolves_a_failed_step_by_hand_and_resume_uses_its_outputs() {
    let sandbox = Sandbox::new();
    sandbox.write(
        "plan.yaml",
        "name: manual\nsteps:\n  - id: pick\n    outputs: [source]\n    run: exit 1\n  - id: copy\n    needs: [pick]\n    run: echo from {{ steps.pick.outputs.source }} > copied\n",
    );
    assert_eq!(code(&sandbox.cairn(&["run", "plan.yaml"])), Some(1));
    let no_reason = sandbox.cairn(&["mark", "1", "pick", "--succeeded"]);
    assert_eq!(code(&no_reason), Some(2), "a reason is required");
    let mark = sandbox.cairn(&[
        "mark",
        "1",
        "pick",
        "--succeeded",
        "--reason",
        "picked node-3 by hand",
        "--output",
        "source=node-3",
    ]);
    assert_eq!(code(&mark), Some(0), "{}", stderr(&mark));
    let out = sandbox.cairn(&["resume", "1"]);
    assert_eq!(code(&out), Some(0), "{}", stderr(&out));
    assert_eq!(sandbox.read("copied"), "from node-3\n");
    let show = sandbox.show(1);
    assert_eq!(task(&show, "pick")["outputs"]["source"], "node-3");
    assert_eq!(
        task(&show, "pick")["attempts"],
        1,
        "the step itself did not run again"
    );
    let marked = events(&show)
        .into_iter()
        .find(|(k, _)| k == "task-marked")
        .expect("an event");
    assert!(
        marked.1.contains("picked node-3 by hand")
            && marked.1.contains("marked succeeded by hand by"),
        "{marked:?}"
    );
}

/// A step marked succeeded without the outputs it declares is refused (exit 2, naming them), since
/// the steps after it would fail on them; `--allow-missing-outputs` marks it anyway, and the resume
/// then fails naming the value that is not set.
#[test]
fn mark_without_declared_outputs_is_refused_and_a_missing_value_is_named() {
    let sandbox = Sandbox::new();
    sandbox.write(
        "plan.yaml",
        "name: manual\nsteps:\n  - id: dump\n    outputs: [archive, size]\n    run: exit 1\n  - id: verify\n    needs: [dump]\n    run: tar -tzf {{ steps.dump.outputs.archive }}\n",
    );
    assert_eq!(code(&sandbox.cairn(&["run", "plan.yaml"])), Some(1));
    let mark = |extra: &[&str]| {
        let mut args = vec!["mark", "1", "dump", "--succeeded", "--reason", "by hand"];
        args.extend_from_slice(extra);
        sandbox.cairn(&args)
    };
    let out = mark(&["--output", "size=10"]);
    assert_eq!(code(&out), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("declares the output(s) `archive` that no `--output` gives"),
        "{}",
        stderr(&out)
    );
    assert_eq!(
        task(&sandbox.show(1), "dump")["status"],
        "failed",
        "nothing marked"
    );
    let out = mark(&["--allow-missing-outputs"]);
    assert_eq!(code(&out), Some(0), "{}", stderr(&out));
    let out = sandbox.cairn(&["resume", "1"]);
    assert_eq!(code(&out), Some(1), "{}", stderr(&out));
    let show = sandbox.show(1);
    let error = task(&show, "verify")["error"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(
        error.contains("`steps.dump.outputs.archive` is not set"),
        "{show}"
    );
}

/// A step that ignores TERM: only KILL ends it. It writes `late` once it ran 20 s.
const STUBBORN: &str = "name: stubborn\nsteps:\n  - id: long\n    run: |\n      trap '' TERM\n      touch started\n      sleep 20\n      touch late\nhooks:\n  on_cancel:\n    - run: touch on-cancel\n";

/// Whether op `op`'s events come to hold one of `kind` within `limit`.
fn event_within(sandbox: &Sandbox, op: i64, kind: &str, limit: Duration) -> bool {
    let started = Instant::now();
    while !events(&sandbox.show(op)).iter().any(|(k, _)| k == kind) {
        if started.elapsed() > limit {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    true
}

/// The op was canceled and its step killed (KILL) long before it could write `late`: nothing of it runs
/// any more, so it never will.
fn assert_killed_early(sandbox: &Sandbox) {
    let show = sandbox.show(1);
    assert_eq!(show["status"], "canceled", "{show}");
    assert!(
        step_processes(show["uuid"].as_str().unwrap()).is_empty(),
        "no process of the step remains"
    );
    assert!(
        !sandbox.path().join("late").exists(),
        "the step ran on past TERM for 20 s: it got more than the cancel's grace"
    );
    assert!(sandbox.path().join("on-cancel").exists());
}

#[test]
fn cancel_grace_is_the_live_owner_s_grace_for_the_steps() {
    let sandbox = Sandbox::new();
    sandbox.write("plan.yaml", STUBBORN);
    let mut run = sandbox.spawn(&["run", "plan.yaml", "--grace", "30s"]);
    sandbox.wait_for("started", Duration::from_secs(20));
    let cancel = sandbox.cairn(&["cancel", "1", "--grace", "1s"]);
    assert_eq!(code(&cancel), Some(0), "{}", stderr(&cancel));
    assert!(
        stderr(&cancel).contains("op 1 canceled"),
        "{}",
        stderr(&cancel)
    );
    assert_eq!(run.wait().unwrap().code(), Some(3), "the run exits 3");
    assert_killed_early(&sandbox);
    assert!(
        events(&sandbox.show(1))
            .iter()
            .any(|(k, m)| k == "cancel-requested"
                && m.contains("its running steps get 1s between TERM and KILL")),
        "{}",
        sandbox.show(1)
    );
}

#[test]
fn cancel_grace_holds_when_the_owner_is_gone_whoever_finishes_the_cancel() {
    let sandbox = Sandbox::new();
    sandbox.write("plan.yaml", STUBBORN);
    // The request is recorded while the owner cannot act on it (stopped); then the owner and the
    // canceling command both die, and a server finishes the cancel, with a grace of its own of
    // 30 s: the request's 1 s is what the step's leftover gets.
    let mut run = sandbox.spawn(&["run", "plan.yaml", "--grace", "30s"]);
    sandbox.wait_for("started", Duration::from_secs(20));
    for attempt in 1.. {
        crate::support::signal(&run, nix::sys::signal::Signal::SIGSTOP);
        let mut cancel = sandbox.spawn(&["cancel", "1", "--grace", "1s"]);
        let recorded = event_within(&sandbox, 1, "cancel-requested", Duration::from_secs(5));
        cancel.kill().unwrap();
        cancel.wait().unwrap();
        if recorded || event_within(&sandbox, 1, "cancel-requested", Duration::ZERO) {
            break;
        }
        // Stopped inside a transaction that holds the op's row (a lease renewal): the request
        // waits for it. Let the owner finish it, and stop it again.
        assert!(attempt < 5, "no cancel-requested event");
        crate::support::signal(&run, nix::sys::signal::Signal::SIGCONT);
        std::thread::sleep(Duration::from_millis(200));
    }
    run.kill().unwrap();
    run.wait().unwrap();
    let serve = sandbox.cairn(&["serve", "--once", "--poll", "100ms", "--grace", "30s"]);
    assert_eq!(code(&serve), Some(0), "{}", stderr(&serve));
    assert_killed_early(&sandbox);

    // With no live owner, `cairn cancel --grace` ends the leftovers itself, with its grace.
    let sandbox = Sandbox::new();
    sandbox.write("plan.yaml", STUBBORN);
    let mut run = sandbox.spawn(&["run", "plan.yaml", "--grace", "30s"]);
    sandbox.wait_for("started", Duration::from_secs(20));
    run.kill().unwrap();
    run.wait().unwrap();
    let cancel = sandbox.cairn(&["cancel", "1", "--grace", "1s"]);
    assert_eq!(code(&cancel), Some(0), "{}", stderr(&cancel));
    assert_killed_early(&sandbox);
}

/// The ops that hold a lock, as `cairn locks --json` lists them.
fn held(sandbox: &Sandbox) -> Vec<i64> {
    sandbox.json(&["locks", "--json"])["locks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["op"].as_i64().unwrap())
        .collect()
}

/// `lock: {key, on_failure: release}`: a failing op frees its key (said in its events), so that the
/// next op on it runs; its resume takes the key again, waiting while another op holds it, and
/// keeps it across a `kill -9` as any running op does.
#[test]
fn a_lock_released_on_failure_is_taken_again_by_the_resume() {
    let sandbox = Sandbox::new();
    sandbox.write(
        "backup.yaml",
        "name: backup\nparams:\n  ds: {type: string}\nlock:\n  key: \"dataset/{{ params.ds }}\"\n  on_failure: release\nsteps:\n  - id: copy\n    run: |\n      if [ -f broken ]; then echo 'disk gone' >&2; exit 3; fi\n      touch copying-$CAIRN_OP_ID\n      while [ -f hold-$CAIRN_OP_ID ]; do sleep 0.05; done\n",
    );
    sandbox.write("broken", "");
    let failed = sandbox.cairn(&["run", "backup.yaml", "-p", "ds=a"]);
    assert_eq!(code(&failed), Some(1), "{}", stderr(&failed));
    assert!(held(&sandbox).is_empty(), "op 1 failed and kept its lock");
    let said = events(&sandbox.show(1));
    assert!(
        said.iter().any(|(kind, message)| kind == "lock-released"
            && message.contains("dataset/a")
            && message.contains("as the op fails")),
        "{said:?}"
    );
    std::fs::remove_file(sandbox.path().join("broken")).unwrap();

    // The next backup runs; op 1's resume waits for it, then takes the key again.
    sandbox.write("hold-2", "");
    let mut next = sandbox.spawn(&["run", "backup.yaml", "-p", "ds=a"]);
    sandbox.wait_for("copying-2", Duration::from_secs(20));
    assert_eq!(held(&sandbox), vec![2]);
    let refused = sandbox.cairn(&["resume", "1", "--no-wait"]);
    assert_eq!(code(&refused), Some(2), "{}", stderr(&refused));
    assert!(
        stderr(&refused).contains("held by op 2"),
        "{}",
        stderr(&refused)
    );
    sandbox.write("hold-1", "");
    let mut resumed = sandbox.spawn(&["resume", "1"]);
    std::fs::remove_file(sandbox.path().join("hold-2")).unwrap();
    assert!(next.wait().unwrap().success());
    sandbox.wait_for("copying-1", Duration::from_secs(20));
    assert_eq!(held(&sandbox), vec![1]);

    // kill -9 while it runs: op 1 keeps the key; a resume finishes it and frees the key.
    resumed.kill().unwrap();
    resumed.wait().unwrap();
    assert_eq!(held(&sandbox), vec![1]);
    let refused = sandbox.cairn(&["run", "backup.yaml", "-p", "ds=a", "--no-wait"]);
    assert_eq!(code(&refused), Some(2), "{}", stderr(&refused));
    std::fs::remove_file(sandbox.path().join("hold-1")).unwrap();
    let out = sandbox.cairn(&["resume", "1"]);
    assert_eq!(code(&out), Some(0), "{}", stderr(&out));
    assert!(held(&sandbox).is_empty());
    let kinds: Vec<String> = events(&sandbox.show(1)).into_iter().map(|e| e.0).collect();
    assert_eq!(
        kinds.iter().filter(|k| *k == "lock-taken").count(),
        2,
        "taken at the start and again by the resume: {kinds:?}"
    );
}

/// `lock: {key, on_failure: release, keep_from: STEP}`: an op that fails before STEP began (its
/// check of the target refused it) frees the key, and the next op on the key runs; one that fails
/// once STEP began (and when STEP is a fan-out, once one of its items began) keeps it: its target
/// is half-done.
#[test]
fn a_lock_is_freed_on_failure_only_before_its_keep_from_step_began() {
    let sandbox = Sandbox::new();
    sandbox.write(
        "rebuild.yaml",
        "name: rebuild\nparams:\n  n: {type: string}\nlock:\n  key: cluster/main\n  on_failure: release\n  keep_from: stop\nsteps:\n  - id: check\n    run: test ! -f refuse-$CAIRN_PARAM_N\n  - id: stop\n    needs: [check]\n    for_each: [a, b]\n    run: test ! -f break-{{ item }}-$CAIRN_PARAM_N\n  - id: start\n    needs: [stop]\n    run: test ! -f break-start-$CAIRN_PARAM_N\n",
    );
    let run =
        |n: &str| sandbox.cairn(&["run", "rebuild.yaml", "-p", &format!("n={n}"), "--no-wait"]);

    // Refused by its check: nothing changed, the key is free.
    sandbox.write("refuse-1", "");
    assert_eq!(code(&run("1")), Some(1));
    assert!(
        held(&sandbox).is_empty(),
        "op 1 failed before `stop` and kept its lock"
    );
    assert!(
        events(&sandbox.show(1))
            .iter()
            .any(|(kind, message)| kind == "lock-released" && message.contains("as the op fails")),
        "{:?}",
        events(&sandbox.show(1))
    );

    // An item of `stop` failed: the key is kept, and the next op is refused.
    sandbox.write("break-b-2", "");
    assert_eq!(code(&run("2")), Some(1));
    assert_eq!(held(&sandbox), vec![2]);
    let refused = run("x");
    assert_eq!(code(&refused), Some(2), "{}", stderr(&refused));
    assert!(
        stderr(&refused).contains("held by op 2"),
        "{}",
        stderr(&refused)
    );
    std::fs::remove_file(sandbox.path().join("break-b-2")).unwrap();
    assert_eq!(code(&sandbox.cairn(&["resume", "2"])), Some(0));
    assert!(held(&sandbox).is_empty());

    // A step after `stop` failed: kept too.
    sandbox.write("break-start-3", "");
    assert_eq!(code(&run("3")), Some(1));
    assert_eq!(held(&sandbox), vec![3]);
    // Resumed from the check, which now refuses it: `stop` ran in an earlier run, so the key
    // stays held.
    sandbox.write("refuse-3", "");
    let out = sandbox.cairn(&["resume", "3", "--from", "check"]);
    assert_eq!(code(&out), Some(1), "{}", stderr(&out));
    assert_eq!(held(&sandbox), vec![3]);
    std::fs::remove_file(sandbox.path().join("refuse-3")).unwrap();
    std::fs::remove_file(sandbox.path().join("break-start-3")).unwrap();
    assert_eq!(code(&sandbox.cairn(&["resume", "3"])), Some(0));

    // The op's timeout ends it while `stop` runs: kept.
    sandbox.write(
        "slow.yaml",
        "name: slow\nlock:\n  key: cluster/main\n  on_failure: release\n  keep_from: stop\ntimeout: 2s\nsteps:\n  - id: check\n    run: 'true'\n  - id: stop\n    needs: [check]\n    run: sleep 30\n",
    );
    let out = sandbox.cairn(&["run", "slow.yaml"]);
    assert_eq!(code(&out), Some(1), "{}", stderr(&out));
    assert_eq!(held(&sandbox), vec![4]);
}

/// `on_failure` takes `keep` or `release`; anything else is refused where it is written.
#[test]
fn a_lock_policy_is_validated_where_it_is_written() {
    let sandbox = Sandbox::new();
    sandbox.write(
        "plan.yaml",
        "name: p\nlock:\n  key: k\n  on_failure: drop\nsteps:\n  - id: a\n    run: true\n",
    );
    let out = sandbox.cairn(&["validate", "plan.yaml"]);
    assert_eq!(code(&out), Some(2));
    let err = stderr(&out);
    assert!(
        err.contains("unknown `on_failure` `drop`") && err.contains("plan.yaml:4:15"),
        "{err}"
    );
    sandbox.write(
        "plan.yaml",
        "name: p\nlock:\n  key: k\n  on_falure: release\nsteps:\n  - id: a\n    run: true\n",
    );
    let out = sandbox.cairn(&["validate", "plan.yaml"]);
    assert_eq!(code(&out), Some(2));
    let err = stderr(&out);
    assert!(
        err.contains("on_falure") && err.contains("plan.yaml:4"),
        "{err}"
    );
    // `keep_from` names a step, and only where a failed op would free its lock.
    sandbox.write(
        "plan.yaml",
        "name: p\nlock:\n  key: k\n  on_failure: release\n  keep_from: stpo\nsteps:\n  - id: stop\n    run: true\n",
    );
    let out = sandbox.cairn(&["validate", "plan.yaml"]);
    assert_eq!(code(&out), Some(2));
    let err = stderr(&out);
    assert!(
        err.contains("`keep_from` names `stpo`")
            && err.contains("did you mean `stop`?")
            && err.contains("plan.yaml:5:14"),
        "{err}"
    );
    sandbox.write(
        "plan.yaml",
        "name: p\nlock:\n  key: k\n  keep_from: stop\nsteps:\n  - id: stop\n    run: true\n",
    );
    let out = sandbox.cairn(&["validate", "plan.yaml"]);
    assert_eq!(code(&out), Some(2));
    let err = stderr(&out);
    assert!(
        err.contains("never freed on failure") && err.contains("plan.yaml:4:14"),
        "{err}"
    );
}
