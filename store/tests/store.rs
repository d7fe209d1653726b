//! The store's tests. The durable rules (ownership, fencing, the guard that a finished task never
//! starts again, batches, logs) run against every backend through [`fresh_stores`]; then the
//! SQLite files (creation, refusal of files that are not cairn's, migrations); then the
//! interface's own pieces (locations, error kinds, the fault-injecting backend).

#[allow(dead_code, reason = "each test file uses a part of it")]
mod pg;

use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use store::testing::Faulty;
use store::{
    Applied, AttemptStatus, Change, Error, ErrorKind, EventKind, Interruption, Location, NewOp,
    NewTask, OpFilter, OpId, OpStatus, Outcome, ProcessId, Reader, Snapshot, Store, TaskNo,
    TaskStatus,
};

fn owner(pid: u32) -> ProcessId {
    ProcessId {
        host: "h".into(),
        boot_id: "b".into(),
        pid,
        start: 7,
    }
}

fn new_op(tasks: u32) -> NewOp {
    NewOp {
        uuid: format!("uuid-{tasks}-{}", std::process::id()),
        snapshot: Snapshot {
            hash: "sha256:x".into(),
            name: "p".into(),
            text: "name: p".into(),
            files: vec![],
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

fn submit(store: &Store, tasks: u32) -> OpId {
    match store
        .apply_blocking(vec![Change::Submit(new_op(tasks))])
        .unwrap()
        .pop()
    {
        Some(Applied::Submitted { id, .. }) => id,
        other => panic!("{other:?}"),
    }
}

fn claim(
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

/// A fresh, empty store of one backend, and what keeps it alive.
struct Fresh {
    backend: &'static str,
    store: Store,
    _keep: Box<dyn std::any::Any>,
}

/// The switch point: every backend the rule tests below run against, each fresh. A new backend
/// adds itself here.
fn fresh_stores() -> Vec<Fresh> {
    let sqlite = || {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("c.db")).unwrap();
        (store, dir)
    };
    let (store, dir) = sqlite();
    let (inner, faulty_dir) = sqlite();
    let pg = pg::Db::new("cairn_rules");
    vec![
        Fresh {
            backend: "sqlite",
            store,
            _keep: Box::new(dir),
        },
        // The fault-injecting wrapper, told nothing: it must change nothing.
        Fresh {
            backend: "sqlite through testing::Faulty",
            store: Faulty::new(inner).store(),
            _keep: Box::new(faulty_dir),
        },
        Fresh {
            backend: "postgres",
            store: store::open(&pg.location()).unwrap(),
            _keep: Box::new(pg),
        },
    ]
}

// --- The durable rules, on every backend ---

/// `moves` names the ops that recorded events after a cursor, each once, in the order they first
/// moved; asked with no cursor, or with one it cannot answer for, it says it does not know.
#[test]
fn moves_name_the_ops_that_recorded_events_after_a_cursor() {
    for fresh in fresh_stores() {
        eprintln!("backend: {}", fresh.backend);
        let store = fresh.store.clone();
        let reader = store.reader().unwrap();
        let (a, b) = (submit(&store, 1), submit(&store, 2));
        let first = reader.moves(None).unwrap();
        assert_eq!(first.ops, None);
        // PostgreSQL knows what moved once its listener listens (the first ask starts it).
        let listening = Instant::now();
        let mut cursor = first.cursor;
        loop {
            let now = reader.moves(Some(cursor)).unwrap();
            if now.ops.is_some() {
                assert_eq!(now.ops, Some(vec![]), "nothing moved yet");
                break;
            }
            cursor = now.cursor;
            assert!(
                listening.elapsed() < Duration::from_secs(10),
                "never listened"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let note = |op: OpId| Change::Event {
            op,
            owner: None,
            at: 1,
            kind: EventKind::Note,
            task: None,
            message: "a note".into(),
        };
        store.apply_blocking(vec![note(b)]).unwrap();
        store.apply_blocking(vec![note(a), note(b)]).unwrap();
        store.apply_blocking(vec![note(b)]).unwrap();
        let waited = Instant::now();
        loop {
            let moved = reader.moves(Some(cursor)).unwrap();
            if moved.ops.as_ref().is_some_and(|ops| ops.len() == 2) {
                break;
            }
            assert!(waited.elapsed() < Duration::from_secs(10), "{moved:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
        // The last note's notification may follow the others.
        std::thread::sleep(Duration::from_millis(300));
        let moved = reader.moves(Some(cursor)).unwrap();
        assert_eq!(moved.ops, Some(vec![b, a]));
        assert!(moved.cursor > cursor);
        // Asked from where it stands: nothing more; from a cursor it never gave: not known.
        assert_eq!(reader.moves(Some(moved.cursor)).unwrap().ops, Some(vec![]));
        assert_eq!(reader.moves(Some(moved.cursor + 1000)).unwrap().ops, None);
    }
}

/// `any_sealed` tells whether a secret key was ever used: false until an op's params hold a
/// sealed value, whatever else they hold.
#[test]
fn any_sealed_sees_a_sealed_param_only() {
    for fresh in fresh_stores() {
        eprintln!("backend: {}", fresh.backend);
        let store = fresh.store.clone();
        assert!(!store.reader().unwrap().any_sealed().unwrap());
        submit(&store, 1);
        let mut op = new_op(1);
        op.uuid.push_str("-plain");
        op.params = serde_json::json!({"note": "secret", "path": "$secret"});
        store.apply_blocking(vec![Change::Submit(op)]).unwrap();
        assert!(!store.reader().unwrap().any_sealed().unwrap());
        let mut op = new_op(1);
        op.uuid.push_str("-sealed");
        op.params = serde_json::json!({"pw": {"$secret": "v1:00:00"}});
        store.apply_blocking(vec![Change::Submit(op)]).unwrap();
        assert!(store.reader().unwrap().any_sealed().unwrap());
    }
}

#[test]
fn only_one_live_owner_and_stale_owners_are_fenced() {
    for fresh in fresh_stores() {
        eprintln!("backend: {}", fresh.backend);
        let store = fresh.store.clone();
        let op = submit(&store, 2);
        let (a, b) = (owner(1), owner(2));
        claim(&store, op, &a, 100, None).unwrap();
        // b cannot take it while a's lease holds and a is not known dead...
        assert!(matches!(
            claim(&store, op, &b, 200, None),
            Err(Error::Owned { .. })
        ));
        // ...but can once a is known dead.
        claim(&store, op, &b, 200, Some(a.clone())).unwrap();
        // a, still running somewhere, can no longer write.
        let err = store
            .apply_blocking(vec![Change::StartAttempt {
                op,
                owner: a.clone(),
                task: TaskNo(0),
                n: 1,
                retry_from: 0,
                at: 300,
            }])
            .unwrap_err();
        assert!(matches!(err, Error::Owned { .. }), "{err}");
        // An expired lease also lets another take over.
        claim(&store, op, &a, 5000, None).unwrap();
    }
}

#[test]
fn an_interruption_is_kept_with_the_status_and_a_cancel_keeps_its_first_grace() {
    for fresh in fresh_stores() {
        eprintln!("backend: {}", fresh.backend);
        let store = fresh.store.clone();
        let reader = store.reader().unwrap();
        let op = submit(&store, 1);
        let me = owner(1);
        claim(&store, op, &me, 100, None).unwrap();
        let set = |status, by| Change::SetOp {
            op,
            owner: Some(me.clone()),
            status,
            at: 200,
            error: None,
            release: true,
            interrupted_by: by,
            kind: EventKind::op_ended(status),
            message: "test".into(),
        };
        store
            .apply_blocking(vec![set(OpStatus::Interrupted, Some(Interruption::Signal))])
            .unwrap();
        assert_eq!(
            reader.op(op).unwrap().interrupted_by,
            Some(Interruption::Signal)
        );
        // Taking the op again clears it; an owner's death is never stored (it is derived).
        claim(&store, op, &me, 300, None).unwrap();
        assert_eq!(reader.op(op).unwrap().interrupted_by, None);
        store
            .apply_blocking(vec![set(
                OpStatus::Interrupted,
                Some(Interruption::OwnerDied),
            )])
            .unwrap();
        assert_eq!(reader.op(op).unwrap().interrupted_by, None);
        claim(&store, op, &me, 400, None).unwrap();
        store
            .apply_blocking(vec![set(
                OpStatus::Interrupted,
                Some(Interruption::Shutdown),
            )])
            .unwrap();
        assert_eq!(
            reader.op(op).unwrap().interrupted_by,
            Some(Interruption::Shutdown)
        );

        // The first cancel request is kept, with its grace.
        let request = |by: &str, grace_ms| Change::RequestCancel {
            op,
            request: store::Request {
                by: by.into(),
                at: 500,
                reason: None,
            },
            grace_ms,
        };
        store
            .apply_blocking(vec![request("ann", Some(1500))])
            .unwrap();
        store
            .apply_blocking(vec![request("bob", Some(9000))])
            .unwrap();
        let row = reader.op(op).unwrap();
        assert_eq!(row.cancel.map(|r| r.by).as_deref(), Some("ann"));
        assert_eq!(row.cancel_grace_ms, Some(1500));
        let events = reader.events(op).unwrap();
        assert!(
            events.iter().any(|e| e.kind == "cancel-requested"
                && e.message
                    .contains("its running steps get 1500ms between TERM and KILL")),
            "{events:?}"
        );
    }
}

#[test]
fn a_succeeded_task_is_never_started_again() {
    for fresh in fresh_stores() {
        eprintln!("backend: {}", fresh.backend);
        let store = fresh.store.clone();
        let op = submit(&store, 1);
        let me = owner(1);
        claim(&store, op, &me, 1, None).unwrap();
        let start = Change::StartAttempt {
            op,
            owner: me.clone(),
            task: TaskNo(0),
            n: 1,
            retry_from: 0,
            at: 2,
        };
        store.apply_blocking(vec![start.clone()]).unwrap();
        store
            .apply_blocking(vec![Change::FinishAttempt {
                op,
                owner: me.clone(),
                task: TaskNo(0),
                n: 1,
                at: 3,
                outcome: Outcome {
                    task: TaskStatus::Succeeded,
                    attempt: AttemptStatus::Succeeded,
                    exit_code: Some(0),
                    error: None,
                    outputs: Some(serde_json::Map::from_iter([(
                        "k".to_owned(),
                        serde_json::json!("v"),
                    )])),
                    by_check: false,
                },
            }])
            .unwrap();
        let again = Change::StartAttempt {
            op,
            owner: me,
            task: TaskNo(0),
            n: 2,
            retry_from: 0,
            at: 4,
        };
        let err = store.apply_blocking(vec![again]).unwrap_err();
        assert!(err.to_string().contains("must not run again"), "{err}");
        let reader = store.reader().unwrap();
        let task = &reader.tasks(op).unwrap()[0];
        assert_eq!(task.status, TaskStatus::Succeeded);
        assert_eq!(task.outputs.as_ref().unwrap()["k"], "v");
        assert_eq!(reader.attempts(op).unwrap().len(), 1);
    }
}

/// A gate set waiting by `who`.
fn gate_waits(store: &Store, op: OpId, who: &ProcessId, task: u32, at: i64) {
    store
        .apply_blocking(vec![Change::SetTask {
            op,
            owner: who.clone(),
            task: TaskNo(task),
            status: TaskStatus::Waiting,
            at,
            message: "waiting".into(),
        }])
        .unwrap();
}

fn answer(store: &Store, op: OpId, task: u32, approve: bool) -> store::Result<Vec<Applied>> {
    store.apply_blocking(vec![Change::Approve {
        op,
        task: TaskNo(task),
        approve,
        request: store::Request {
            by: "someone".into(),
            at: 9,
            reason: None,
        },
    }])
}

/// Parking gives the op up (`waiting`, no owner) only while its gates all wait; an answer to a
/// parked op's gate queues it again; a gate ended by its owner keeps an answer that came first,
/// and a gate that no longer waits refuses an answer.
#[test]
fn a_parked_op_is_queued_by_an_answer_and_an_ended_gate_refuses_one() {
    for fresh in fresh_stores() {
        eprintln!("backend: {}", fresh.backend);
        let store = fresh.store.clone();
        let op = submit(&store, 2);
        let me = owner(1);
        claim(&store, op, &me, 1, None).unwrap();
        gate_waits(&store, op, &me, 0, 2);
        assert_eq!(
            store.reader().unwrap().tasks(op).unwrap()[0].started_at,
            Some(2)
        );
        let park = |gates: Vec<u32>| Change::Park {
            op,
            owner: me.clone(),
            gates: gates.into_iter().map(TaskNo).collect(),
            at: 3,
            message: "parked".into(),
        };
        // Task 1 does not wait: refused, nothing changes.
        let err = store.apply_blocking(vec![park(vec![0, 1])]).unwrap_err();
        assert!(matches!(err, Error::Conflict { .. }), "{err}");
        assert_eq!(
            store.reader().unwrap().op(op).unwrap().owner,
            Some(me.clone())
        );
        store.apply_blocking(vec![park(vec![0])]).unwrap();
        let row = store.reader().unwrap().op(op).unwrap();
        assert_eq!((row.status, row.owner), (OpStatus::Waiting, None));
        // The answer queues it again, for a server to go on.
        answer(&store, op, 0, true).unwrap();
        let row = store.reader().unwrap().op(op).unwrap();
        assert_eq!(row.status, OpStatus::Queued);
        assert!(row.started_at.is_some());
        let kinds: Vec<String> = store
            .reader()
            .unwrap()
            .events(op)
            .unwrap()
            .into_iter()
            .map(|e| e.kind)
            .collect();
        assert!(kinds.iter().any(|k| k == "op-parked"), "{kinds:?}");
        assert!(kinds.iter().any(|k| k == "op-woken"), "{kinds:?}");

        // An owned op's gate: the answer does not touch the op; ending the gate afterwards keeps
        // the answer; a gate ended first refuses the answer.
        let op = submit(&store, 3);
        claim(&store, op, &me, 1, None).unwrap();
        gate_waits(&store, op, &me, 0, 2);
        gate_waits(&store, op, &me, 1, 2);
        answer(&store, op, 0, false).unwrap();
        let end = |task: u32| Change::EndGate {
            op,
            owner: me.clone(),
            task: TaskNo(task),
            status: TaskStatus::Canceled,
            at: 10,
            error: "no answer: the op failed".into(),
            message: "no answer before the op failed".into(),
        };
        store.apply_blocking(vec![end(0), end(1)]).unwrap();
        let tasks = store.reader().unwrap().tasks(op).unwrap();
        assert_eq!(tasks[0].status, TaskStatus::Failed);
        assert!(tasks[0].error.as_deref().unwrap().contains("rejected"));
        assert_eq!(tasks[1].status, TaskStatus::Canceled);
        assert_eq!(tasks[1].error.as_deref(), Some("no answer: the op failed"));
        assert_eq!(
            store.reader().unwrap().op(op).unwrap().status,
            OpStatus::Running
        );
        let err = answer(&store, op, 1, true).unwrap_err();
        assert!(
            err.to_string().contains("not waiting for an answer"),
            "{err}"
        );
    }
}

#[test]
fn a_whole_attempt_is_recorded_final_and_a_refused_lone_batch_leaves_nothing() {
    for fresh in fresh_stores() {
        eprintln!("backend: {}", fresh.backend);
        let store = fresh.store.clone();
        let op = submit(&store, 2);
        let me = owner(1);
        claim(&store, op, &me, 1, None).unwrap();
        let whole = |task: u32, n: u32, at: i64| Change::WholeAttempt {
            op,
            owner: me.clone(),
            task: TaskNo(task),
            n,
            retry_from: n - 1,
            at,
            outcome: Outcome {
                task: TaskStatus::Succeeded,
                attempt: AttemptStatus::Succeeded,
                exit_code: None,
                error: None,
                outputs: Some(serde_json::Map::new()),
                by_check: false,
            },
        };
        store.apply_blocking(vec![whole(0, 1, 2)]).unwrap();
        let reader = store.reader().unwrap();
        let task = &reader.tasks(op).unwrap()[0];
        assert_eq!(task.status, TaskStatus::Succeeded);
        assert_eq!(task.attempts, 1);
        let attempts = reader.attempts(op).unwrap();
        assert_eq!(attempts.len(), 1);
        assert_eq!(attempts[0].status, AttemptStatus::Succeeded);
        assert_eq!(attempts[0].ended_at, Some(2));
        let kinds = |reader: &store::Reader| {
            reader
                .events(op)
                .unwrap()
                .into_iter()
                .map(|e| e.kind)
                .collect::<Vec<_>>()
        };
        let before = kinds(&reader);
        assert_eq!(
            before[before.len() - 2..],
            ["task-started", "task-succeeded"]
        );

        // One batch alone in its commit, whose second change is refused: its first is undone too.
        let err = store
            .apply_blocking(vec![whole(1, 1, 3), whole(0, 2, 3)])
            .unwrap_err();
        assert!(err.to_string().contains("must not run again"), "{err}");
        assert_eq!(reader.tasks(op).unwrap()[1].status, TaskStatus::Pending);
        assert_eq!(reader.attempts(op).unwrap().len(), 1);
        assert_eq!(kinds(&reader), before);
    }
}

#[test]
fn a_refused_batch_does_not_undo_others_in_the_same_commit() {
    for fresh in fresh_stores() {
        eprintln!("backend: {}", fresh.backend);
        let store = fresh.store.clone();
        let op = submit(&store, 1);
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let mut handles = Vec::new();
            for i in 0..50 {
                let store = store.clone();
                handles.push(tokio::spawn(async move {
                    if i == 25 {
                        // Refused: no such op.
                        store
                            .apply(vec![
                                Change::CurrentTask {
                                    op: OpId(999),
                                    owner: None,
                                    text: None,
                                },
                                Change::Event {
                                    op: OpId(999),
                                    owner: None,
                                    at: 1,
                                    kind: EventKind::Note,
                                    task: None,
                                    message: String::new(),
                                },
                            ])
                            .await
                    } else {
                        store
                            .apply(vec![Change::Event {
                                op,
                                owner: None,
                                at: i,
                                kind: EventKind::Note,
                                task: None,
                                message: format!("{i}"),
                            }])
                            .await
                    }
                }));
            }
            let mut failures = 0;
            for h in handles {
                if h.await.unwrap().is_err() {
                    failures += 1;
                }
            }
            assert_eq!(failures, 1);
        });
        let events = store.reader().unwrap().events(op).unwrap();
        assert_eq!(events.iter().filter(|e| e.kind == "note").count(), 49);
        // Sequence numbers have no gaps.
        for (i, e) in events.iter().enumerate() {
            assert_eq!(e.seq, i64::try_from(i).unwrap() + 1);
        }
    }
}

/// A log over its limit keeps its head (the first eighth) and its tail, and a note between them
/// (`stream` 0) of how much was cut; one write larger than the tail's part is cut in its middle.
#[test]
fn logs_keep_the_head_and_the_tail_within_the_limit_and_a_note_of_the_cut() {
    for fresh in fresh_stores() {
        eprintln!("backend: {}", fresh.backend);
        let store = fresh.store.clone();
        let op = submit(&store, 1);
        let log = |attempt: u32, data: Vec<u8>| Change::Log {
            op,
            owner: None,
            task: TaskNo(0),
            attempt,
            stream: 1,
            at: 1,
            data,
            limit: 800,
        };
        for i in 0..10u8 {
            store
                .apply_blocking(vec![log(1, vec![b'a' + i; 100])])
                .unwrap();
        }
        store
            .apply_blocking(vec![log(2, vec![b'x'; 1000])])
            .unwrap();
        let chunks = store.reader().unwrap().logs(op, None, None).unwrap();
        let of = |attempt: u32| -> Vec<(u8, String)> {
            chunks
                .iter()
                .filter(|c| c.attempt == attempt)
                .map(|c| (c.stream, String::from_utf8(c.data.clone()).unwrap()))
                .collect()
        };
        let note =
            "[cairn: 200 bytes cut here; the log keeps its first 100 bytes and last 700 bytes]\n";
        let mut expected = vec![(1, "a".repeat(100)), (0, note.to_owned())];
        expected.extend((3..10u8).map(|i| (1, char::from(b'a' + i).to_string().repeat(100))));
        assert_eq!(of(1), expected);
        assert_eq!(
            of(2),
            [
                (1, "x".repeat(100)),
                (0, note.to_owned()),
                (1, "x".repeat(700))
            ]
        );
    }
}

/// In one commit, an attempt's changes after another of the same writer skip the owner read; a
/// change that may move ownership between them (here the owner lets the op go) makes the next
/// one read it again, and be refused.
#[test]
fn active_tasks_are_the_running_and_waiting_ones_and_a_claim_clears_the_note() {
    for fresh in fresh_stores() {
        eprintln!("backend: {}", fresh.backend);
        let store = fresh.store.clone();
        let op = submit(&store, 4);
        store
            .apply_blocking(vec![Change::CurrentTask {
                op,
                owner: None,
                text: Some("waiting for lock k held by op 9".into()),
            }])
            .unwrap();
        let reader = store.reader().unwrap();
        assert!(reader.op(op).unwrap().current_task.is_some());
        let me = owner(1);
        claim(&store, op, &me, 1, None).unwrap();
        assert_eq!(
            reader.op(op).unwrap().current_task,
            None,
            "the wait is over"
        );
        assert!(reader.active_tasks(op).unwrap().is_empty());
        let start = |task: u32| Change::StartAttempt {
            op,
            owner: me.clone(),
            task: TaskNo(task),
            n: 1,
            retry_from: 0,
            at: 2,
        };
        store
            .apply_blocking(vec![
                start(3),
                start(1),
                Change::SetTask {
                    op,
                    owner: me.clone(),
                    task: TaskNo(2),
                    status: TaskStatus::Waiting,
                    at: 2,
                    message: "waiting for approval".into(),
                },
            ])
            .unwrap();
        let active: Vec<(u32, TaskStatus)> = reader
            .active_tasks(op)
            .unwrap()
            .iter()
            .map(|t| (t.task_no.0, t.status))
            .collect();
        assert_eq!(
            active,
            [
                (1, TaskStatus::Running),
                (2, TaskStatus::Waiting),
                (3, TaskStatus::Running)
            ]
        );
        let gate = reader.tasks(op).unwrap()[2].name.clone();
        let waiting = reader
            .last_event(op, &gate, EventKind::TaskWaiting)
            .unwrap()
            .unwrap();
        assert_eq!(waiting.message, "waiting for approval");
        assert_eq!(
            reader.last_event(op, &gate, EventKind::TaskFailed).unwrap(),
            None
        );
    }
}

#[test]
fn one_commit_reads_the_owner_again_after_a_change_that_may_move_it() {
    for fresh in fresh_stores() {
        eprintln!("backend: {}", fresh.backend);
        let store = fresh.store.clone();
        let op = submit(&store, 3);
        let me = owner(1);
        claim(&store, op, &me, 1, None).unwrap();
        let start = |task: u32| {
            vec![Change::StartAttempt {
                op,
                owner: me.clone(),
                task: TaskNo(task),
                n: 1,
                retry_from: 0,
                at: 2,
            }]
        };
        let release = vec![Change::SetOp {
            op,
            owner: Some(me.clone()),
            status: OpStatus::Interrupted,
            at: 3,
            error: None,
            release: true,
            interrupted_by: None,
            kind: EventKind::OpInterrupted,
            message: "test".into(),
        }];
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let results =
            runtime.block_on(store.apply_together(vec![start(0), start(1), release, start(2)]));
        let outcome: Vec<bool> = results.iter().map(Result::is_ok).collect();
        assert_eq!(outcome, [true, true, true, false], "{results:?}");
        assert!(
            matches!(results[3], Err(Error::Fenced { .. })),
            "{:?}",
            results[3]
        );
        let reader = store.reader().unwrap();
        let started: Vec<TaskStatus> = reader.tasks(op).unwrap().iter().map(|t| t.status).collect();
        assert_eq!(
            started,
            [
                TaskStatus::Running,
                TaskStatus::Running,
                TaskStatus::Pending
            ]
        );
    }
}

#[test]
fn a_firing_is_used_up_once_and_a_failure_to_fire_it_leaves_it_to_others() {
    for fresh in fresh_stores() {
        eprintln!("backend: {}", fresh.backend);
        let store = fresh.store.clone();
        store
            .apply_blocking(vec![Change::AddSchedule(store::NewSchedule {
                name: "s".into(),
                plan: "/p.yaml".into(),
                params: serde_json::Map::new(),
                cron: "* * * * *".into(),
                timezone: "UTC".into(),
                catch_up: true,
                created_at: 0,
            })])
            .unwrap();
        let note = |due: i64, text: &str, handled: bool| {
            store
                .apply_blocking(vec![Change::ScheduleNote {
                    name: "s".into(),
                    due,
                    note: text.into(),
                    handled,
                }])
                .unwrap();
        };
        let tries = std::cell::Cell::new(0);
        let fire = |due: i64| {
            tries.set(tries.get() + 1);
            let mut new = new_op(1);
            new.uuid = format!("{}-{}", new.uuid, tries.get());
            new.fired_by = Some(("s".into(), due));
            store.apply_blocking(vec![Change::Submit(new)])
        };
        let row = || {
            let s = store.reader().unwrap().schedules().unwrap().remove(0);
            (s.last_fire, s.last_op, s.note.unwrap_or_default())
        };
        // A process that cannot fire the firing due at 100 says why, and leaves it to another.
        note(100, "cannot fire: no file", false);
        assert_eq!(row(), (None, None, "cannot fire: no file".into()));
        let op = match fire(100).unwrap().pop() {
            Some(Applied::Submitted { id, .. }) => id,
            other => panic!("{other:?}"),
        };
        let fired = (Some(100), Some(op), format!("fired: op {op}"));
        assert_eq!(row(), fired);
        // Its failure said late, or an earlier firing's, does not cover that success; nor can the
        // firing be taken twice.
        note(100, "cannot fire: no file", false);
        note(40, "cannot fire: no file", false);
        assert_eq!(row(), fired);
        assert!(matches!(fire(100), Err(Error::Conflict { .. })));
        // A handled note uses a firing up (a skip): it keeps the last op, and none may fire it.
        note(160, "skipped", true);
        assert_eq!(row(), (Some(160), Some(op), "skipped".into()));
        assert!(matches!(fire(160), Err(Error::Conflict { .. })));
        note(100, "skipped", true);
        assert_eq!(row(), (Some(160), Some(op), "skipped".into()));
    }
}

// --- SQLite files: creation, refusal, migrations ---

#[test]
fn creates_a_private_file_in_a_private_directory() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state/cairn/cairn.db");
    let store = Store::open(&path).unwrap();
    submit(&store, 1);
    assert_eq!(
        std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert_eq!(
        std::fs::metadata(path.parent().unwrap())
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o700
    );
}

#[test]
fn a_second_handle_sees_what_the_first_committed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.db");
    let a = Store::open(&path).unwrap();
    let b = Store::open(&path).unwrap();
    let op = submit(&a, 3);
    let op2 = submit(&b, 2);
    assert_ne!(op, op2);
    let reader = Reader::open(&path).unwrap().unwrap();
    let ops = reader.list_ops(&OpFilter::default()).unwrap();
    assert_eq!(ops.iter().map(|o| o.id).collect::<Vec<_>>(), vec![op2, op]);
    assert_eq!(reader.tasks(op).unwrap().len(), 3);
    assert_eq!(reader.events(op).unwrap()[0].kind, "submitted");
}

#[test]
fn handles_opened_together_on_a_new_file_all_open() {
    // Each handle switches the new file to WAL; SQLite refuses a racing switch without waiting.
    for round in 0..100 {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.db");
        let start = std::sync::Barrier::new(4);
        std::thread::scope(|scope| {
            let opening: Vec<_> = (0..4)
                .map(|_| {
                    scope.spawn(|| {
                        start.wait();
                        Store::open(&path).map(|_| ())
                    })
                })
                .collect();
            for handle in opening {
                let opened = handle.join().unwrap();
                assert!(opened.is_ok(), "round {round}: {opened:?}");
            }
        });
    }
}

#[test]
fn reading_a_missing_file_creates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("none.db");
    assert!(Reader::open(&path).unwrap().is_none());
    assert!(!path.exists());
}

#[test]
fn refuses_files_that_are_not_cairn_databases_and_leaves_them_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let text = dir.path().join("notes.txt");
    std::fs::write(
        &text,
        "just some text that is long enough to have a header of sorts, really\n".repeat(20),
    )
    .unwrap();
    let other = dir.path().join("other.db");
    rusqlite_free_sqlite(&other);
    for path in [&text, &other] {
        let before = std::fs::read(path).unwrap();
        let err = Store::open(path).unwrap_err();
        assert!(matches!(err, Error::Unusable { .. }), "{err}");
        let err = Reader::open(path).unwrap_err();
        assert!(matches!(err, Error::Unusable { .. }), "{err}");
        assert_eq!(
            std::fs::read(path).unwrap(),
            before,
            "{} was modified",
            path.display()
        );
    }
}

/// Runs SQL with the `sqlite3` shell, as a user poking at the file would.
fn sqlite3(path: &std::path::Path, sql: &str) {
    let status = std::process::Command::new("sqlite3")
        .args(["-cmd", ".timeout 5000"])
        .arg(path)
        .arg(sql)
        .status()
        .expect("the sqlite3 shell is installed (.ci/run installs it; apt-get install sqlite3)");
    assert!(status.success());
}

/// A SQLite database made by another program.
fn rusqlite_free_sqlite(path: &std::path::Path) {
    sqlite3(path, "CREATE TABLE t (x); INSERT INTO t VALUES (1);");
}

#[test]
fn refuses_a_database_from_a_newer_cairn() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.db");
    drop(Store::open(&path).unwrap());
    sqlite3(&path, "PRAGMA user_version = 99;");
    let err = Store::open(&path).unwrap_err();
    assert!(err.to_string().contains("newer cairn"), "{err}");
}

/// A cairn of schema version 3, still running when a newer one migrated the file, numbers its
/// next event by `ops.event_seq + 1`; that write is refused with a message, and changes nothing.
#[test]
fn an_older_cairn_still_running_is_refused_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.db");
    let store = Store::open(&path).unwrap();
    let op = submit(&store, 1);
    let events = || {
        Reader::open(&path)
            .unwrap()
            .unwrap()
            .events(op)
            .unwrap()
            .len()
    };
    let before = events();
    assert!(before >= 1);
    drop(store);
    // Exactly what the older cairn ran for every event.
    let out = std::process::Command::new("sqlite3")
        .args(["-cmd", ".timeout 5000"])
        .arg(&path)
        .arg(format!(
            "UPDATE ops SET event_seq = event_seq + 1 WHERE id = {} RETURNING event_seq;",
            op.0
        ))
        .output()
        .expect("the sqlite3 shell is installed (.ci/run installs it; apt-get install sqlite3)");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("upgraded by a newer cairn") && stderr.contains("cairn resume"),
        "{stderr}"
    );
    assert_eq!(events(), before);
    // The newer cairn itself still records events.
    let store = Store::open(&path).unwrap();
    claim(&store, op, &owner(1), 5, None).unwrap();
    assert!(events() > before);
}

/// The status checks hold (a status no state machine has is refused in every table) and are
/// compared, not looked up in a table SQLite builds for each row written.
#[test]
fn status_checks_refuse_unknown_statuses_without_building_a_table() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.db");
    let store = Store::open(&path).unwrap();
    let op = submit(&store, 1);
    drop(store);
    let conn = rusqlite::Connection::open(&path).unwrap();
    for (table, sql) in [
        (
            "ops",
            format!("UPDATE ops SET status = 'bogus' WHERE id = {}", op.0),
        ),
        (
            "tasks",
            format!("UPDATE tasks SET status = 'bogus' WHERE op_id = {}", op.0),
        ),
        (
            "attempts",
            format!(
                "INSERT INTO attempts (op_id, task_no, n, status, started_at) VALUES ({}, 0, 1, 'bogus', 1)",
                op.0
            ),
        ),
    ] {
        let err = conn.execute(&sql, []).unwrap_err().to_string();
        assert!(err.contains("CHECK constraint failed"), "{table}: {err}");
        let plan: Vec<String> = conn
            .prepare(&format!("EXPLAIN {sql}"))
            .unwrap()
            .query_map([], |r| r.get(1))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert!(
            !plan.iter().any(|opcode| opcode == "OpenEphemeral"),
            "{table}: {plan:?}"
        );
    }
    let ok = format!("UPDATE tasks SET status = 'skipped' WHERE op_id = {}", op.0);
    assert_eq!(conn.execute(&ok, []).unwrap(), 1);
}

/// A file of schema version 5 (made by the migrations of that cairn, holding an op) is brought to
/// the current version: its rows are kept and its status checks rewritten.
#[test]
fn a_version_5_file_is_migrated_and_keeps_its_rows() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.db");
    {
        let conn = rusqlite::Connection::open(&path).unwrap();
        for file in [
            "0001_initial.sql",
            "0002_children.sql",
            "0003_schedules.sql",
            "0004_owner_index.sql",
            "0005_older_writers.sql",
        ] {
            let sql = std::fs::read_to_string(
                std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("migrations")
                    .join(file),
            )
            .unwrap();
            conn.execute_batch(&sql).unwrap();
        }
        conn.execute_batch(&format!(
            "PRAGMA user_version = 5; PRAGMA application_id = {};
             INSERT INTO plan_snapshots (id, hash, name, text) VALUES (1, 'sha256:x', 'p', 'name: p');
             INSERT INTO ops (id, uuid, plan, snapshot_id, title, status, params, workdir, env, created_at)
                 VALUES (1, 'u', 'p', 1, 't', 'succeeded', '{{}}', '/', '{{}}', 1);
             INSERT INTO tasks (op_id, task_no, step, name, status) VALUES (1, 0, 's', 's', 'succeeded');",
            store::APPLICATION_ID
        ))
        .unwrap();
    }
    drop(Store::open(&path).unwrap());
    let conn = rusqlite::Connection::open(&path).unwrap();
    let version: i32 = conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .unwrap();
    assert_eq!(version, store::SCHEMA_VERSION);
    let lists: i64 = conn
        .query_row(
            "SELECT count(*) FROM sqlite_schema WHERE sql LIKE '%status IN%'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(lists, 0);
    let ok: String = conn
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(ok, "ok");
    let task: String = conn
        .query_row("SELECT status FROM tasks WHERE op_id = 1", [], |r| r.get(0))
        .unwrap();
    assert_eq!(task, "succeeded");
    let reader = Reader::open(&path).unwrap().unwrap();
    assert_eq!(reader.op(OpId(1)).unwrap().status, OpStatus::Succeeded);
}

// --- The interface's own pieces: locations, error kinds, the fault-injecting backend ---

#[test]
fn a_location_is_a_file_path_unless_it_is_a_postgres_url() {
    assert_eq!(
        Location::parse("state/cairn.db"),
        Location::Sqlite("state/cairn.db".into())
    );
    assert_eq!(
        Location::parse("/tmp/postgres/x.db"),
        Location::Sqlite("/tmp/postgres/x.db".into())
    );
    for url in [
        "postgres://me:pw@cairn-no-such-host.invalid/cairn",
        "postgresql://cairn-no-such-host.invalid/cairn",
        "POSTGRES://cairn-no-such-host.invalid",
    ] {
        let location = Location::parse(url);
        assert!(matches!(location, Location::Postgres { .. }), "{url}");
        assert!(!location.to_string().contains("pw"), "{location}");
        assert!(location.is_shared());
        // A server's URL goes to PostgreSQL (here, a host that does not exist: refused, named).
        for err in [
            store::open(&location).unwrap_err(),
            store::open_reader(&location).unwrap_err(),
        ] {
            assert_eq!(err.kind(), ErrorKind::Unusable);
            let text = err.to_string();
            assert!(text.contains("no such host"), "{text}");
            assert!(text.contains("cairn-no-such-host.invalid"), "{text}");
            assert!(!text.contains("pw"), "{text}");
        }
    }
    assert!(!Location::parse("state/cairn.db").is_shared());
}

#[test]
fn opening_by_location_is_opening_by_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.db");
    let location = Location::parse(path.to_str().unwrap());
    assert!(store::open_reader(&location).unwrap().is_none());
    let store = store::open(&location).unwrap();
    assert_eq!(store.path(), path);
    assert_eq!(store.location(), &location);
    assert_eq!(store.secret_key_file(), dir.path().join("c.db.key"));
    let op = submit(&store, 1);
    let reader = store::open_reader(&location).unwrap().unwrap();
    assert_eq!(reader.op(op).unwrap().id, op);
}

#[test]
fn errors_are_grouped_by_what_the_caller_can_do() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("c.db")).unwrap();
    let op = submit(&store, 1);
    let (a, b) = (owner(1), owner(2));
    claim(&store, op, &a, 100, None).unwrap();
    let owned = claim(&store, op, &b, 200, None).unwrap_err();
    assert_eq!(owned.kind(), ErrorKind::Conflict);
    let missing = store.reader().unwrap().op(OpId(99)).unwrap_err();
    assert_eq!(missing.kind(), ErrorKind::NotFound);
    let locked = Error::Locked {
        path: "c.db".into(),
        waited_ms: 5,
        holder: None,
    };
    assert_eq!(locked.kind(), ErrorKind::Busy);
    assert!(locked.is_transient() && !owned.is_transient());
    assert_eq!(Error::Closed.kind(), ErrorKind::Closed);
}

#[test]
fn a_faulty_backend_fails_the_commits_it_is_told_to_and_they_write_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let faulty = Faulty::new(Store::open(&dir.path().join("c.db")).unwrap());
    let store = faulty.store();
    let op = submit(&store, 1);
    let note = |i: i64| {
        vec![Change::Event {
            op,
            owner: None,
            at: i,
            kind: EventKind::Note,
            task: None,
            message: format!("{i}"),
        }]
    };
    faulty.fail_commit(3);
    store.apply_blocking(note(2)).unwrap();
    let err = store.apply_blocking(note(3)).unwrap_err();
    assert!(matches!(err, Error::Write { .. }), "{err}");
    assert_eq!(err.kind(), ErrorKind::Write);
    store.apply_blocking(note(4)).unwrap();
    faulty.fail_after(4);
    assert!(store.apply_blocking(note(5)).is_err());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let results = runtime.block_on(store.apply_together(vec![note(6), note(7)]));
    assert!(results.iter().all(Result::is_err), "{results:?}");
    assert!(runtime.block_on(store.apply_solo(vec![note(8)]))[0].is_err());
    faulty.heal();
    assert!(runtime.block_on(store.apply_solo(vec![note(9)]))[0].is_ok());
    assert_eq!(faulty.commits(), 8);
    let notes: Vec<String> = store
        .reader()
        .unwrap()
        .events(op)
        .unwrap()
        .into_iter()
        .filter(|e| e.kind == "note")
        .map(|e| e.message)
        .collect();
    assert_eq!(notes, ["2", "4", "9"]);
}

#[test]
fn a_faulty_backend_delays_commits_when_told() {
    let dir = tempfile::tempdir().unwrap();
    let faulty = Faulty::new(Store::open(&dir.path().join("c.db")).unwrap());
    let store = faulty.store();
    faulty.delay(std::time::Duration::from_millis(200));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let started = std::time::Instant::now();
    runtime
        .block_on(store.apply(vec![Change::Unpause {
            scope: store::PauseScope::default(),
        }]))
        .unwrap();
    assert!(started.elapsed() >= std::time::Duration::from_millis(200));
    assert_eq!(faulty.commits(), 1);
}

/// `running_attempts` gives the op's attempts still `running` and no other: what a take-over
/// sweeps, read without the op's ended attempts.
#[test]
fn running_attempts_are_read_without_the_ended_ones() {
    for fresh in fresh_stores() {
        eprintln!("backend: {}", fresh.backend);
        let store = fresh.store.clone();
        let op = submit(&store, 3);
        let me = owner(1);
        claim(&store, op, &me, 1, None).unwrap();
        for task in 0..3 {
            store
                .apply_blocking(vec![Change::StartAttempt {
                    op,
                    owner: me.clone(),
                    task: TaskNo(task),
                    n: 1,
                    retry_from: 0,
                    at: 2,
                }])
                .unwrap();
        }
        store
            .apply_blocking(vec![Change::FinishAttempt {
                op,
                owner: me.clone(),
                task: TaskNo(1),
                n: 1,
                at: 3,
                outcome: Outcome {
                    task: TaskStatus::Succeeded,
                    attempt: AttemptStatus::Succeeded,
                    exit_code: Some(0),
                    error: None,
                    outputs: None,
                    by_check: false,
                },
            }])
            .unwrap();
        let reader = store.reader().unwrap();
        let running: Vec<(u32, u32)> = reader
            .running_attempts(op)
            .unwrap()
            .iter()
            .map(|a| (a.task_no.0, a.n))
            .collect();
        assert_eq!(running, vec![(0, 1), (2, 1)]);
        assert!(
            reader
                .running_attempts(op)
                .unwrap()
                .iter()
                .all(|a| a.status == AttemptStatus::Running)
        );
        assert_eq!(reader.attempts(op).unwrap().len(), 3);
    }
}
