//! The PostgreSQL backend against the real server on 127.0.0.1:5432 (trust auth, user
//! `postgres`): the rules through it, a claim raced by two stores, group commit with a refused
//! batch, opening (migrations once, a newer or foreign database refused, connect errors that name
//! the server and hide the password), and a writer whose connection is killed. Each test makes
//! its own database `cairn_t_<unique>` and drops it at the end, even when it fails. What is
//! committed is read back with SQL, on a connection of the test's own.

use store::{
    Applied, AttemptStatus, Change, Error, ErrorKind, EventKind, Location, NewOp, NewTask, OpId,
    OpStatus, Outcome, ProcessId, Snapshot, Store, TaskNo, TaskStatus,
};

#[allow(dead_code, reason = "each test file uses a part of it")]
mod pg;

use pg::Db;

fn owner(pid: u32) -> ProcessId {
    ProcessId {
        host: "h".into(),
        boot_id: "b".into(),
        pid,
        start: 7,
    }
}

fn new_op(tasks: u32, uuid: &str) -> NewOp {
    NewOp {
        uuid: uuid.to_owned(),
        snapshot: Snapshot {
            hash: "sha256:x".into(),
            name: "p".into(),
            text: "name: p".into(),
            files: vec![("/sub.yaml".into(), "name: sub".into())],
        },
        title: "t".into(),
        status: OpStatus::Queued,
        params: serde_json::json!({"a": 1}),
        workdir: "/".into(),
        env: serde_json::Map::new(),
        tasks: (0..tasks)
            .map(|i| NewTask {
                task_no: TaskNo(i),
                step: format!("s{i}"),
                name: format!("s{i}"),
                item: None,
            })
            .collect(),
        at: 1,
        owner: None,
        start: false,
        lock: None,
        cooldown_ms: None,
        ignore_cooldown: false,
        parent: None,
        fired_by: None,
    }
}

fn submit(store: &Store, tasks: u32, uuid: &str) -> OpId {
    match store
        .apply_blocking(vec![Change::Submit(new_op(tasks, uuid))])
        .unwrap()
        .pop()
    {
        Some(Applied::Submitted { id, .. }) => id,
        other => panic!("{other:?}"),
    }
}

fn claim(store: &Store, op: OpId, who: &ProcessId, now: i64) -> store::Result<Vec<Applied>> {
    claim_dead(store, op, who, now, None)
}

fn claim_dead(
    store: &Store,
    op: OpId,
    who: &ProcessId,
    now: i64,
    dead: Option<ProcessId>,
) -> store::Result<Vec<Applied>> {
    store.apply_blocking(vec![Change::Claim {
        op,
        owner: who.clone(),
        lease_until: now + 1000,
        dead_owner: dead,
        now,
        queued: false,
        reopen: false,
        kind: EventKind::Started,
        message: "test".into(),
    }])
}

fn succeeded() -> Outcome {
    Outcome {
        task: TaskStatus::Succeeded,
        attempt: AttemptStatus::Succeeded,
        exit_code: Some(0),
        error: None,
        outputs: Some(serde_json::Map::from_iter([(
            "k".to_owned(),
            serde_json::json!("v"),
        )])),
        by_check: false,
    }
}

// --- The rules through PostgreSQL ---

#[test]
fn an_op_runs_through_postgres_and_a_stale_owner_is_fenced() {
    let db = Db::new("cairn_t");
    let store = db.open();
    let op = submit(&store, 2, "u-1");
    let (a, b) = (owner(1), owner(2));
    claim(&store, op, &a, 100).unwrap();
    // b cannot take it while a's lease holds and a is not known dead...
    let err = claim(&store, op, &b, 200).unwrap_err();
    assert!(matches!(err, Error::Owned { .. }), "{err}");
    // a runs a task to its end, with its output logged.
    let start = |n, at| Change::StartAttempt {
        op,
        owner: a.clone(),
        task: TaskNo(0),
        n,
        retry_from: 0,
        at,
    };
    store.apply_blocking(vec![start(1, 300)]).unwrap();
    store
        .apply_blocking(vec![
            Change::AttemptProcess {
                op,
                owner: a.clone(),
                task: TaskNo(0),
                n: 1,
                process: owner(9),
                pgid: 9,
                at: 0,
            },
            Change::Log {
                owner: None,
                op,
                task: TaskNo(0),
                attempt: 1,
                stream: 1,
                at: 301,
                data: b"hello\n".to_vec(),
                limit: 1 << 20,
            },
            Change::FinishAttempt {
                op,
                owner: a.clone(),
                task: TaskNo(0),
                n: 1,
                at: 302,
                outcome: succeeded(),
            },
        ])
        .unwrap();
    // A succeeded task never starts again.
    let err = store.apply_blocking(vec![start(2, 303)]).unwrap_err();
    assert!(err.to_string().contains("must not run again"), "{err}");
    // b takes it once a is known dead; a, still running somewhere, can no longer write.
    claim_dead(&store, op, &b, 400, Some(a.clone())).unwrap();
    let err = store
        .apply_blocking(vec![Change::StartAttempt {
            op,
            owner: a.clone(),
            task: TaskNo(1),
            n: 1,
            retry_from: 0,
            at: 500,
        }])
        .unwrap_err();
    assert!(matches!(err, Error::Owned { .. }), "{err}");
    let sql = &mut db.connect();
    let row = sql
        .query_one("SELECT owner_pid, status FROM ops WHERE id = $1", &[&op.0])
        .unwrap();
    assert_eq!(row.get::<_, Option<i64>>(0), Some(2));
    assert_eq!(row.get::<_, String>(1), "running");
    let row = sql
        .query_one(
            "SELECT status, outputs FROM tasks WHERE op_id = $1 AND task_no = 0",
            &[&op.0],
        )
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "succeeded");
    assert_eq!(row.get::<_, String>(1), r#"{"k":"v"}"#);
    let row = sql
        .query_one(
            "SELECT status, pid, data FROM attempts JOIN logs USING (op_id, task_no) WHERE op_id = $1",
            &[&op.0],
        )
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "succeeded");
    assert_eq!(row.get::<_, Option<i64>>(1), Some(9));
    assert_eq!(row.get::<_, Vec<u8>>(2), b"hello\n");
    // Events are numbered without gaps.
    let seqs: Vec<i64> = sql
        .query(
            "SELECT seq FROM events WHERE op_id = $1 ORDER BY seq",
            &[&op.0],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(seqs.len() >= 4, "{seqs:?}");
    assert!(seqs.iter().zip(1..).all(|(s, i)| *s == i), "{seqs:?}");
}

/// The rest of the rules' statements, each run once: locks and cooldowns, fan-out, replan,
/// marks and resets, ending, cancel, pause, schedules. Each commit must succeed, and leave what
/// SQLite would.
#[test]
fn every_kind_of_change_commits_through_postgres() {
    let db = Db::new("cairn_t");
    let store = db.open();
    let me = owner(1);
    let mut first = new_op(3, "u-lock");
    first.lock = Some("db".into());
    first.cooldown_ms = Some(60_000);
    first.owner = Some((me.clone(), 10_000));
    first.start = true;
    let op = match store
        .apply_blocking(vec![Change::Submit(first)])
        .unwrap()
        .pop()
    {
        Some(Applied::Submitted { id, .. }) => id,
        other => panic!("{other:?}"),
    };
    let batches = owner_changes(op, &me);
    let batches = batches.into_iter().chain(other_changes()).collect();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let results = runtime.block_on(store.apply_together(batches));
    for (i, result) in results.iter().enumerate() {
        assert!(result.is_ok(), "batch {i}: {result:?}");
    }
    let sql = &mut db.connect();
    let tasks: Vec<(i64, String, String)> = sql
        .query(
            "SELECT task_no, name, status FROM tasks WHERE op_id = $1 ORDER BY task_no",
            &[&op.0],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    let names: Vec<(i64, &str, &str)> = tasks
        .iter()
        .map(|(n, name, status)| (*n, name.as_str(), status.as_str()))
        .collect();
    assert_eq!(
        names,
        [
            (0, "s1", "pending"),
            (1, "s0", "pending"),
            (2, "s2", "pending"),
            (3, "s3", "pending"),
            (10, "s1[x]", "succeeded"),
            (11, "s1[y]", "skipped"),
        ]
    );
    let row = sql
        .query_one(
            "SELECT status, owner_pid, ending, params FROM ops WHERE id = $1",
            &[&op.0],
        )
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "succeeded");
    assert_eq!(row.get::<_, Option<i64>>(1), None);
    assert_eq!(row.get::<_, Option<String>>(2), None);
    assert_eq!(row.get::<_, String>(3), r#"{"a":2}"#);
    assert_eq!(db.count("SELECT count(*) FROM locks"), 0);
    let row = sql
        .query_one(
            "SELECT op_id, acked_by FROM cooldowns WHERE key = 'db'",
            &[],
        )
        .unwrap();
    assert_eq!(row.get::<_, i64>(0), op.0);
    assert_eq!(row.get::<_, Option<String>>(1).as_deref(), Some("me"));
    assert_eq!(db.count("SELECT count(*) FROM settings"), 0);
    let row = sql
        .query_one("SELECT paused, last_fire, note FROM schedules", &[])
        .unwrap();
    assert_eq!(row.get::<_, i64>(0), 1);
    assert_eq!(row.get::<_, Option<i64>>(1), Some(35));
    assert_eq!(
        row.get::<_, Option<String>>(2).as_deref(),
        Some("cannot fire")
    );

    the_next_op_on_the_key_takes_its_lock_and_is_canceled(&db, &store);
}

/// The changes of an op's owner, each in its own batch: a fan-out, a replan, a rerun, the end.
fn owner_changes(op: OpId, me: &ProcessId) -> Vec<Vec<Change>> {
    let items = vec![serde_json::json!("x"), serde_json::json!("y")];
    let item_tasks = |names: &[&str]| -> Vec<NewTask> {
        names
            .iter()
            .enumerate()
            .map(|(i, name)| NewTask {
                task_no: TaskNo(10 + u32::try_from(i).unwrap()),
                step: "s1".into(),
                name: format!("s1[{name}]"),
                item: Some(serde_json::json!(name)),
            })
            .collect()
    };
    vec![
        vec![Change::Expand {
            op,
            owner: me.clone(),
            task: TaskNo(1),
            items: items.clone(),
            tasks: item_tasks(&["x", "y"]),
            at: 20,
        }],
        vec![Change::WholeAttempt {
            op,
            owner: me.clone(),
            task: TaskNo(10),
            n: 1,
            retry_from: 0,
            at: 21,
            outcome: succeeded(),
        }],
        vec![Change::SetTask {
            op,
            owner: me.clone(),
            task: TaskNo(11),
            status: TaskStatus::Skipped,
            at: 22,
            message: "skipped".into(),
        }],
        vec![Change::Gather {
            op,
            owner: me.clone(),
            task: TaskNo(1),
            status: TaskStatus::Succeeded,
            outputs: None,
            error: None,
            at: 23,
        }],
        vec![Change::Replan {
            op,
            owner: me.clone(),
            snapshot: Snapshot {
                hash: "sha256:y".into(),
                name: "p".into(),
                text: "name: p # 2".into(),
                files: vec![],
            },
            renumber: vec![
                (TaskNo(0), TaskNo(1)),
                (TaskNo(1), TaskNo(0)),
                (TaskNo(2), TaskNo(2)),
                (TaskNo(10), TaskNo(10)),
                (TaskNo(11), TaskNo(11)),
            ],
            tasks: vec![NewTask {
                task_no: TaskNo(3),
                step: "s3".into(),
                name: "s3".into(),
                item: None,
            }],
            params: serde_json::json!({"a": 2}),
            env: serde_json::Map::new(),
            at: 24,
            message: "replanned".into(),
        }],
        vec![Change::ResetTasks {
            op,
            owner: me.clone(),
            tasks: vec![TaskNo(0)],
            at: 25,
            message: "rerun".into(),
        }],
        vec![Change::DetachChild {
            op,
            owner: me.clone(),
            task: TaskNo(2),
            at: 26,
            message: "detached".into(),
        }],
        vec![Change::CurrentTask {
            owner: None,
            op,
            text: Some("s3".into()),
        }],
        vec![Change::Heartbeat {
            op,
            owner: me.clone(),
            lease_until: 20_000,
        }],
        vec![Change::SetEnding {
            op,
            owner: me.clone(),
            ending: serde_json::json!({"status": "succeeded"}),
        }],
        vec![Change::SetOp {
            op,
            owner: Some(me.clone()),
            status: OpStatus::Succeeded,
            at: 30,
            error: None,
            release: true,
            interrupted_by: None,
            kind: EventKind::OpSucceeded,
            message: "done".into(),
        }],
    ]
}

/// The changes of people: acknowledging a cooldown, pausing, schedules.
fn other_changes() -> Vec<Vec<Change>> {
    vec![
        vec![Change::Ack {
            key: "db".into(),
            request: store::Request {
                by: "me".into(),
                at: 31,
                reason: None,
            },
        }],
        vec![Change::Pause {
            pause: store::Pause {
                scope: store::PauseScope::default(),
                by: "me".into(),
                at: 32,
                reason: Some("why".into()),
                until: None,
            },
        }],
        vec![Change::Pause {
            pause: store::Pause {
                scope: store::PauseScope::default(),
                by: "me".into(),
                at: 33,
                reason: None,
                until: None,
            },
        }],
        vec![Change::Unpause {
            scope: store::PauseScope::default(),
        }],
        vec![Change::AddSchedule(store::NewSchedule {
            name: "nightly".into(),
            plan: "/p.yaml".into(),
            params: serde_json::Map::new(),
            cron: "@daily".into(),
            timezone: "UTC".into(),
            catch_up: true,
            created_at: 34,
        })],
        vec![Change::PauseSchedule {
            name: "nightly".into(),
            paused: true,
        }],
        vec![Change::ScheduleNote {
            name: "nightly".into(),
            due: 35,
            note: "skipped".into(),
            handled: true,
        }],
        // A firing this node could not fire: the note alone.
        vec![Change::ScheduleNote {
            name: "nightly".into(),
            due: 36,
            note: "cannot fire".into(),
            handled: false,
        }],
    ]
}

fn the_next_op_on_the_key_takes_its_lock_and_is_canceled(db: &Db, store: &Store) {
    let sql = &mut db.connect();
    // A second op on the key: the cooldown was acknowledged, so it may take the lock.
    let mut next = new_op(1, "u-second");
    next.lock = Some("db".into());
    let second = match store
        .apply_blocking(vec![Change::Submit(next)])
        .unwrap()
        .pop()
    {
        Some(Applied::Submitted { id, .. }) => id,
        other => panic!("{other:?}"),
    };
    store
        .apply_blocking(vec![Change::TakeLock {
            op: second,
            at: 40,
            ignore_cooldown: false,
        }])
        .unwrap();
    let holder: i64 = sql
        .query_one("SELECT op_id FROM locks WHERE key = 'db'", &[])
        .unwrap()
        .get(0);
    assert_eq!(holder, second.0);
    store
        .apply_blocking(vec![Change::RequestCancel {
            op: second,
            request: store::Request {
                by: "me".into(),
                at: 41,
                reason: None,
            },
            grace_ms: None,
        }])
        .unwrap();
    store
        .apply_blocking(vec![Change::CancelUnstarted {
            op: second,
            dead_owner: None,
            request: store::Request {
                by: "me".into(),
                at: 42,
                reason: None,
            },
        }])
        .unwrap();
    let status: String = sql
        .query_one("SELECT status FROM ops WHERE id = $1", &[&second.0])
        .unwrap()
        .get(0);
    assert_eq!(status, "canceled");
    store
        .apply_blocking(vec![Change::RemoveSchedule {
            name: "nightly".into(),
        }])
        .unwrap();
    assert_eq!(db.count("SELECT count(*) FROM schedules"), 0);
}

#[test]
fn two_stores_racing_for_each_op_leave_exactly_one_owner() {
    let db = Db::new("cairn_t");
    let (one, two) = (db.open(), db.open());
    let ops: Vec<OpId> = (0..20)
        .map(|i| submit(&one, 1, &format!("u-{i}")))
        .collect();
    let race = |store: Store, pid: u32, ops: Vec<OpId>| {
        std::thread::spawn(move || {
            ops.iter()
                .map(|&op| claim(&store, op, &owner(pid), 100).is_ok())
                .collect::<Vec<bool>>()
        })
    };
    let first = race(one, 1, ops.clone());
    let second = race(two, 2, ops.clone());
    let (first, second) = (first.join().unwrap(), second.join().unwrap());
    for (i, op) in ops.iter().enumerate() {
        assert!(
            first[i] != second[i],
            "op {op}: store one won: {}, store two won: {}",
            first[i],
            second[i]
        );
        let pid: i64 = db
            .connect()
            .query_one("SELECT owner_pid FROM ops WHERE id = $1", &[&op.0])
            .unwrap()
            .get(0);
        assert_eq!(pid, if first[i] { 1 } else { 2 });
    }
}

/// A batch of one whole attempt (`n`) of `task` by `me`.
fn whole(
    op: OpId,
    me: &ProcessId,
    (task, n): (u32, u32),
    at: i64,
    outcome: Outcome,
) -> Vec<Change> {
    vec![Change::WholeAttempt {
        op,
        owner: me.clone(),
        task: TaskNo(task),
        n,
        retry_from: 0,
        at,
        outcome,
    }]
}

/// Failed with an exit code: `task` waits to be tried again when `retry`.
fn failed(code: i32, retry: bool) -> Outcome {
    Outcome {
        task: if retry {
            TaskStatus::Pending
        } else {
            TaskStatus::Failed
        },
        attempt: AttemptStatus::Failed,
        exit_code: Some(code),
        error: Some(format!("exit {code}")),
        outputs: None,
        by_check: false,
    }
}

/// Commits the batches in one group, as the engine does: each batch's result, and which were
/// refused.
fn together(store: &Store, batches: Vec<Vec<Change>>) -> (store::Results, Vec<usize>) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let results = runtime.block_on(store.apply_together(batches));
    let refused = (0..results.len())
        .filter(|&i| results[i].is_err())
        .collect();
    (results, refused)
}

#[test]
fn a_refused_batch_does_not_undo_the_others_in_a_group_commit() {
    let db = Db::new("cairn_t");
    let store = db.open();
    let op = submit(&store, 1, "u-group");
    let event = |at: i64| Change::Event {
        owner: None,
        op,
        at,
        kind: EventKind::Note,
        task: None,
        message: format!("{at}"),
    };
    let mut batches: Vec<Vec<Change>> = (0..100).map(|i| vec![event(i)]).collect();
    // Refused: no such op; its first change must not stay either.
    batches[50] = vec![
        event(1000),
        Change::CurrentTask {
            owner: None,
            op: OpId(999),
            text: None,
        },
        Change::Event {
            owner: None,
            op: OpId(999),
            at: 1,
            kind: EventKind::Note,
            task: None,
            message: String::new(),
        },
    ];
    let (_, refused) = together(&store, batches);
    assert_eq!(refused, [50]);
    assert_eq!(
        db.count("SELECT count(*) FROM events WHERE kind = 'note'"),
        99
    );
    assert_eq!(db.count("SELECT count(*) FROM events WHERE at = 1000"), 0);
    // Many callers at once, each its own request: grouped by the writer, one refused.
    let handles: Vec<_> = (0..40)
        .map(|i| {
            let store = store.clone();
            std::thread::spawn(move || {
                let target = if i == 20 { OpId(999) } else { op };
                store.apply_blocking(vec![Change::Event {
                    owner: None,
                    op: target,
                    at: 2000 + i,
                    kind: EventKind::Note,
                    task: None,
                    message: String::new(),
                }])
            })
        })
        .collect();
    let refused = handles
        .into_iter()
        .map(|h| h.join().unwrap())
        .filter(Result::is_err)
        .count();
    assert_eq!(refused, 1);
    assert_eq!(
        db.count("SELECT count(*) FROM events WHERE kind = 'note' AND at >= 2000"),
        39
    );
}

/// A group commit reads its tasks' states ahead, all at once: a task that two batches of one
/// group name is read when its second change comes, so the second attempt of a task the first
/// finished is refused, and the others run. (Read with the others, its state would be the one
/// from before the first attempt.)
#[test]
fn a_task_ended_earlier_in_a_group_commit_is_not_started_again_in_it() {
    let db = Db::new("cairn_t");
    let store = db.open();
    let op = submit(&store, 3, "u-ahead");
    let me = owner(1);
    claim(&store, op, &me, 100).unwrap();
    let whole = |task, n| whole(op, &me, (task, n), 200, succeeded());
    let batches = vec![whole(0, 1), whole(1, 1), whole(0, 2), whole(2, 1)];
    let (results, refused) = together(&store, batches);
    assert_eq!(refused, [2], "{results:?}");
    assert!(
        results[2]
            .as_ref()
            .is_err_and(|e| e.to_string().contains("must not run again")),
        "{results:?}"
    );
    assert_eq!(
        db.count("SELECT count(*) FROM attempts WHERE task_no = 0"),
        1
    );
    assert_eq!(
        db.count("SELECT count(*) FROM tasks WHERE status = 'succeeded'"),
        3
    );
}

/// A database with an op of `tasks` tasks, claimed by `owner(1)`.
fn claimed(tasks: u32, uuid: &str) -> (Db, Store, OpId, ProcessId) {
    let db = Db::new("cairn_t");
    let store = db.open();
    let op = submit(&store, tasks, uuid);
    let me = owner(1);
    claim(&store, op, &me, 100).unwrap();
    (db, store, op, me)
}

/// Sets a task's status behind the writer's back.
fn set_status(sql: &mut postgres::Client, op: OpId, task: i64, status: &str) {
    sql.execute(
        "UPDATE tasks SET status = $3 WHERE op_id = $1 AND task_no = $2",
        &[&op.0, &task, &status],
    )
    .unwrap();
}

/// A step alone takes the rows earlier transactions read as read (the op's owner row, its next
/// tasks) and sends a guard for each: a row changed behind the writer's back aborts the
/// transaction, which runs again reading and decides on what is there. Nothing is recorded on a
/// stale row, and no refusal is given on one.
#[test]
fn a_row_taken_as_read_that_changed_is_read_again_before_anything_is_decided() {
    let (db, store, op, me) = claimed(8, "u-taken");
    let sql = &mut db.connect();
    let set = |sql: &mut postgres::Client, task, status| set_status(sql, op, task, status);
    let step = |who: &ProcessId, task: u32| {
        store.apply_blocking(whole(
            op,
            who,
            (task, 1),
            200 + i64::from(task),
            succeeded(),
        ))
    };
    let attempts = |task: i64| {
        db.count(&format!(
            "SELECT count(*) FROM attempts WHERE op_id = {} AND task_no = {task}",
            op.0
        ))
    };
    // Task 2 looks done when task 0's step reads the op's next tasks along with its own; it is
    // pending again (marked for a rerun) when its turn comes: it runs, not refused.
    set(sql, 2, "succeeded");
    step(&me, 0).unwrap();
    set(sql, 2, "pending");
    step(&me, 2).unwrap();
    assert_eq!(attempts(2), 1);
    // Task 3, known pending from task 1's step, ended meanwhile: refused as the rules refuse what
    // they read, and nothing recorded.
    step(&me, 1).unwrap();
    set(sql, 3, "succeeded");
    let ended = step(&me, 3);
    assert!(
        ended
            .as_ref()
            .is_err_and(|e| e.to_string().contains("must not run again")),
        "{ended:?}"
    );
    assert_eq!(attempts(3), 0);
    // The op, known owned by this writer from task 4's step, was taken over: fenced off.
    step(&me, 4).unwrap();
    sql.execute("UPDATE ops SET owner_pid = 2 WHERE id = $1", &[&op.0])
        .unwrap();
    let err = step(&me, 5).unwrap_err();
    assert!(matches!(err, Error::Owned { .. }), "{err}");
    assert_eq!(attempts(5), 0);
    // The new owner's steps: read, then taken as read.
    step(&owner(2), 6).unwrap();
    step(&owner(2), 7).unwrap();
    let ran = db.count(&format!(
        "SELECT count(*) FROM events WHERE op_id = {} AND task IN ('s0', 's1', 's2', 's4', 's6', 's7')",
        op.0
    ));
    assert_eq!(ran, 12);
    assert_eq!(
        db.count("SELECT count(*) FROM attempts WHERE task_no IN (3, 5)"),
        0
    );
}

/// A refusal decided on a row taken as read is given only once the row's guard has answered:
/// when a write sent before the guard failed, the guard never ran, and the transaction runs again
/// reading, for its own answer.
#[test]
fn a_refusal_is_not_given_on_a_row_whose_guard_never_ran() {
    let (db, store, op, me) = claimed(8, "u-unguarded");
    let sql = &mut db.connect();
    let set = |sql: &mut postgres::Client, task, status| set_status(sql, op, task, status);
    let start = |task| Change::StartAttempt {
        op,
        owner: me.clone(),
        task: TaskNo(task),
        n: 1,
        retry_from: 0,
        at: 300,
    };
    // Task 2 is known done from task 0's step; a start of task 5 prepares every statement.
    set(sql, 2, "succeeded");
    store
        .apply_blocking(whole(op, &me, (0, 1), 200, succeeded()))
        .unwrap();
    store.apply_blocking(vec![start(5)]).unwrap();
    // Behind the writer's back task 2 is pending again, and task 1's first attempt exists.
    set(sql, 2, "pending");
    sql.execute(
        "INSERT INTO attempts (op_id, task_no, n, status, started_at) VALUES ($1, 1, 1, 'running', 1)",
        &[&op.0],
    )
    .unwrap();
    let mut batch = vec![start(1)];
    batch.extend(whole(op, &me, (2, 1), 400, succeeded()));
    let err = store.apply_blocking(batch).unwrap_err();
    assert!(err.to_string().contains("attempts_pkey"), "{err}");
    assert_eq!(
        db.count("SELECT count(*) FROM attempts WHERE task_no = 2"),
        0
    );
}

/// The attempts, tasks and events of a group go as one statement each: each task ends with its
/// own attempt's outcome, and each op's events are numbered on from its last, without gaps, in the
/// order the changes came.
#[test]
fn a_group_commits_its_rows_together_and_numbers_each_ops_events_in_order() {
    let db = Db::new("cairn_t");
    let store = db.open();
    let me = owner(1);
    let (a, b) = (submit(&store, 40, "u-a"), submit(&store, 40, "u-b"));
    claim(&store, a, &me, 100).unwrap();
    claim(&store, b, &me, 100).unwrap();
    let before = |op: OpId| {
        db.count(&format!(
            "SELECT max(seq) FROM events WHERE op_id = {}",
            op.0
        ))
    };
    let (a_before, b_before) = (before(a), before(b));
    let whole = |op, task: u32| {
        let outcome = if task.is_multiple_of(3) {
            failed(i32::try_from(task).unwrap(), false)
        } else {
            succeeded()
        };
        whole(op, &me, (task, 1), 1000 + i64::from(task), outcome)
    };
    let batches = (0..40).flat_map(|t| [whole(a, t), whole(b, t)]).collect();
    let (results, refused) = together(&store, batches);
    assert!(refused.is_empty(), "{results:?}");
    let sql = &mut db.connect();
    for (op, first) in [(a, a_before), (b, b_before)] {
        let seqs: Vec<i64> = sql
            .query(
                "SELECT seq FROM events WHERE op_id = $1 AND seq > $2 ORDER BY seq",
                &[&op.0, &first],
            )
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        assert_eq!(seqs, ((first + 1)..=(first + 80)).collect::<Vec<_>>());
        // In the order the changes came: each task's start, then its end, task after task.
        let tasks: Vec<String> = sql
            .query(
                "SELECT e.task FROM events e WHERE e.op_id = $1 AND e.seq > $2 ORDER BY e.seq",
                &[&op.0, &first],
            )
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        let names: Vec<String> = sql
            .query(
                "SELECT name FROM tasks WHERE op_id = $1 ORDER BY task_no",
                &[&op.0],
            )
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        let expected: Vec<String> = names.iter().flat_map(|n| [n.clone(), n.clone()]).collect();
        assert_eq!(tasks, expected);
        let ended: Vec<(i64, String, Option<i64>, i64)> = sql
            .query(
                "SELECT t.task_no, t.status, t.exit_code, a.ended_at FROM tasks t \
                 JOIN attempts a ON a.op_id = t.op_id AND a.task_no = t.task_no WHERE t.op_id = $1 \
                 ORDER BY t.task_no",
                &[&op.0],
            )
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
            .collect();
        assert_eq!(ended.len(), 40);
        for (task, status, code, at) in ended {
            let failed = task % 3 == 0;
            assert_eq!(
                status,
                if failed { "failed" } else { "succeeded" },
                "task {task}"
            );
            assert_eq!(code, Some(if failed { task } else { 0 }), "task {task}");
            assert_eq!(at, 1000 + task, "task {task}");
        }
    }
}

/// A batch the server refuses inside a group's gathered statements (its attempt's key exists)
/// leaves nothing of itself, and the others commit.
#[test]
fn a_batch_the_server_refuses_in_a_gathered_group_leaves_nothing_and_the_others_commit() {
    let db = Db::new("cairn_t");
    let store = db.open();
    let me = owner(1);
    let op = submit(&store, 3, "u-refused");
    claim(&store, op, &me, 100).unwrap();
    let whole = |task, at, outcome| whole(op, &me, (task, 1), at, outcome);
    // Task 0's first attempt failed and it waits to be tried again: a second attempt numbered 1
    // is refused by the attempts' key, not by the rules.
    let retry = failed(1, true);
    store.apply_blocking(whole(0, 200, retry)).unwrap();
    let events = db.count(&format!(
        "SELECT count(*) FROM events WHERE op_id = {}",
        op.0
    ));
    let batches = vec![
        whole(1, 300, succeeded()),
        whole(0, 300, succeeded()),
        whole(2, 300, succeeded()),
    ];
    let (results, refused) = together(&store, batches);
    assert_eq!(refused, [1], "{results:?}");
    assert_eq!(
        db.count(&format!(
            "SELECT count(*) FROM events WHERE op_id = {}",
            op.0
        )),
        events + 4
    );
    assert_eq!(
        db.count("SELECT count(*) FROM attempts WHERE task_no = 0"),
        1
    );
    assert_eq!(
        db.count("SELECT count(*) FROM tasks WHERE task_no = 0 AND status = 'pending' AND ended_at IS NULL"),
        1
    );
    assert_eq!(
        db.count("SELECT count(*) FROM tasks WHERE task_no IN (1, 2) AND status = 'succeeded'"),
        2
    );
}

// --- Opening ---

#[test]
fn nodes_opening_a_new_database_together_migrate_it_once() {
    let db = Db::new("cairn_t");
    let handles: Vec<_> = (0..4)
        .map(|_| {
            let location = db.location();
            std::thread::spawn(move || store::open(&location).map(drop))
        })
        .collect();
    for h in handles {
        h.join().unwrap().unwrap();
    }
    let sql = &mut db.connect();
    let meta: Vec<(String, String)> = sql
        .query("SELECT key, value FROM cairn_meta ORDER BY key", &[])
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        meta,
        [
            ("application".to_owned(), "cairn".to_owned()),
            ("schema_version".to_owned(), "10".to_owned())
        ]
    );
    // A reader of a database that holds nothing yet finds nothing, and writes nothing.
    let empty = Db::new("cairn_t");
    assert!(store::open_reader(&empty.location()).unwrap().is_none());
    assert_eq!(
        empty.count("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'"),
        0
    );
    assert!(store::open_reader(&db.location()).unwrap().is_some());
}

#[test]
fn a_database_from_a_newer_cairn_is_refused() {
    let db = Db::new("cairn_t");
    drop(db.open());
    db.connect()
        .batch_execute("UPDATE cairn_meta SET value = '99' WHERE key = 'schema_version'")
        .unwrap();
    for err in [
        store::open(&db.location()).unwrap_err(),
        store::open_reader(&db.location()).unwrap_err(),
    ] {
        assert_eq!(err.kind(), ErrorKind::Unusable);
        let text = err.to_string();
        assert!(text.contains("newer cairn (schema version 99"), "{text}");
        assert!(text.contains("127.0.0.1:5432"), "{text}");
        assert!(text.contains(&db.name), "{text}");
    }
}

#[test]
fn a_database_that_is_not_cairns_is_refused_and_left_alone() {
    let db = Db::new("cairn_t");
    db.connect()
        .batch_execute("CREATE TABLE orders (id BIGINT)")
        .unwrap();
    let err = store::open(&db.location()).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unusable);
    assert!(err.to_string().contains("not cairn's"), "{err}");
    let err = store::open_reader(&db.location()).unwrap_err();
    assert!(err.to_string().contains("not cairn's"), "{err}");
    assert_eq!(
        db.count("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'"),
        1
    );
}

#[test]
fn connect_errors_name_the_server_and_database_and_hide_the_password() {
    let db = Db::new("cairn_t");
    // Nothing listens on port 1.
    let refused = Location::parse("postgres://postgres:s3cret@127.0.0.1:1/somedb");
    // No such database on the real server.
    let missing = Location::parse("postgres://postgres:s3cret@127.0.0.1:5432/cairn_t_no_such_db");
    // No such role: the server refuses the login.
    let login = Location::parse(&format!(
        "postgres://cairn_no_such_role:s3cret@127.0.0.1:5432/{}",
        db.name
    ));
    for (location, host, database, why) in [
        (&refused, "127.0.0.1:1", "somedb", "refused"),
        (
            &missing,
            "127.0.0.1:5432",
            "cairn_t_no_such_db",
            "no database",
        ),
        (
            &login,
            "127.0.0.1:5432",
            db.name.as_str(),
            "refused the login",
        ),
    ] {
        for err in [
            store::open(location).unwrap_err(),
            store::open_reader(location).unwrap_err(),
        ] {
            assert_eq!(err.kind(), ErrorKind::Unusable);
            let text = err.to_string();
            assert!(text.contains(host), "{text}");
            assert!(text.contains(database), "{text}");
            assert!(text.contains(why), "{text}");
            assert!(!text.contains("s3cret"), "{text}");
            assert!(!format!("{err:?}").contains("s3cret"), "{err:?}");
        }
    }
    let tls = Location::parse(&format!("{}?sslmode=require", db.url()));
    let err = store::open(&tls).unwrap_err();
    assert!(err.to_string().contains("TLS"), "{err}");
}

// --- A writer whose connection breaks ---

#[test]
fn a_commit_after_the_writers_connection_was_killed_lands_once() {
    let db = Db::new("cairn_t");
    let store = db.open();
    let op = submit(&store, 1, "u-killed");
    let sql = &mut db.connect();
    let killed: i64 = sql
        .query_one(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
             WHERE datname = $1 AND application_name = 'cairn'",
            &[&db.name],
        )
        .unwrap()
        .get(0);
    assert_eq!(killed, 1, "the writer's connection, and only it");
    let again = submit(&store, 1, "u-after");
    assert_ne!(op, again);
    assert_eq!(
        db.count("SELECT count(*) FROM ops WHERE uuid = 'u-after'"),
        1
    );
    assert_eq!(
        db.count(&format!(
            "SELECT count(*) FROM events WHERE op_id = {}",
            again.0
        )),
        db.count(&format!(
            "SELECT count(*) FROM events WHERE op_id = {}",
            op.0
        ))
    );
}
