//! Firing schedules (`engine::schedule::fire_due`) when the plan cannot be read: on one machine's
//! store the firing is used up; on a shared one it stays for a node that can fire it, the failure
//! is noted once per firing, and a firing nobody fired is caught up or skipped like any missed
//! one. The store is a SQLite file either way: the rule, not the backend, decides.

use engine::owner::Rule;
use engine::schedule::{Misfires, fire_due};
use store::{Change, Millis, ScheduleRow, Store};

/// A firing is on time within a minute and a poll, as `serve` counts it.
const WINDOW: Millis = 61_000;

/// `2030-01-01T<hh:mm:ss>Z` in milliseconds.
fn at(time: &str) -> Millis {
    format!("2030-01-01T{time}Z")
        .parse::<jiff::Timestamp>()
        .unwrap()
        .as_millisecond()
}

/// A store on a temporary file; the directory lives as long as the returned guard.
fn store() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("cairn.db")).unwrap();
    (dir, store)
}

/// Adds a schedule firing daily at 02:00, made at midnight, of the plan at `plan`.
async fn add(store: &Store, name: &str, plan: &std::path::Path, catch_up: bool) {
    store
        .apply(vec![Change::AddSchedule(store::NewSchedule {
            name: name.into(),
            plan: plan.display().to_string(),
            params: serde_json::Map::new(),
            cron: "0 2 * * *".into(),
            timezone: "UTC".into(),
            catch_up,
            created_at: at("00:00:00"),
        })])
        .await
        .unwrap();
}

fn schedule(store: &Store, name: &str) -> ScheduleRow {
    store
        .reader()
        .unwrap()
        .schedules()
        .unwrap()
        .into_iter()
        .find(|s| s.name == name)
        .unwrap()
}

/// The plan's directory, missing until [`make_plan`] makes it.
fn plan_path(dir: &std::path::Path) -> std::path::PathBuf {
    dir.join("plans").join("nightly.yaml")
}

fn make_plan(dir: &std::path::Path) {
    std::fs::create_dir(dir.join("plans")).unwrap();
    std::fs::write(
        plan_path(dir),
        "name: nightly\nsteps:\n  - id: a\n    noop: true\n",
    )
    .unwrap();
}

#[tokio::test]
async fn on_one_machine_s_store_a_firing_that_cannot_be_fired_is_used_up() {
    let (dir, store) = store();
    add(&store, "nightly", &plan_path(dir.path()), true).await;
    let mut misfires = Misfires::default();
    let fired = fire_due(&store, Rule::Local, at("02:00:10"), WINDOW, &mut misfires).await;
    assert_eq!(fired.unwrap(), []);
    let s = schedule(&store, "nightly");
    assert_eq!(s.last_fire, Some(at("02:00:00")));
    let note = s.note.unwrap();
    assert!(note.starts_with("cannot fire: cannot read `"), "{note}");
    // Once the file is there, that firing is not fired after all.
    make_plan(dir.path());
    let fired = fire_due(&store, Rule::Local, at("02:00:20"), WINDOW, &mut misfires).await;
    assert_eq!(fired.unwrap(), []);
}

#[tokio::test]
async fn on_a_shared_store_a_firing_that_cannot_be_fired_is_noted_once_and_left_to_others() {
    let (dir, store) = store();
    add(&store, "nightly", &plan_path(dir.path()), true).await;
    let mut misfires = Misfires::default();
    let poll = async |now: &str, misfires: &mut Misfires| {
        fire_due(&store, Rule::Shared, at(now), WINDOW, misfires)
            .await
            .unwrap()
    };
    assert_eq!(poll("02:00:10", &mut misfires).await, []);
    let s = schedule(&store, "nightly");
    assert_eq!(s.last_fire, None, "the firing is not used up");
    assert!(s.note.unwrap().starts_with("cannot fire: cannot read `"));
    // Another node's note of the same firing: the next polls of this one leave it.
    store
        .apply(vec![Change::ScheduleNote {
            name: "nightly".into(),
            due: at("02:00:00"),
            note: "cannot fire: elsewhere".into(),
            handled: false,
        }])
        .await
        .unwrap();
    for now in ["02:00:11", "02:00:12", "02:00:30"] {
        assert_eq!(poll(now, &mut misfires).await, []);
    }
    let s = schedule(&store, "nightly");
    assert_eq!(
        (s.last_fire, s.note.as_deref()),
        (None, Some("cannot fire: elsewhere"))
    );
    // It tries at each poll all the same: once it can read the plan, it fires.
    make_plan(dir.path());
    let fired = poll("02:00:40", &mut misfires).await;
    assert_eq!(fired.len(), 1);
    let s = schedule(&store, "nightly");
    assert_eq!(
        (s.last_fire, s.last_op),
        (Some(at("02:00:00")), Some(fired[0]))
    );
}

#[tokio::test]
async fn on_a_shared_store_a_firing_nobody_fired_is_then_caught_up_or_skipped() {
    let (dir, store) = store();
    let path = plan_path(dir.path());
    add(&store, "catch-up", &path, true).await;
    add(&store, "skip", &path, false).await;
    let mut misfires = Misfires::default();
    let poll = async |now: &str, misfires: &mut Misfires| {
        fire_due(&store, Rule::Shared, at(now), WINDOW, misfires)
            .await
            .unwrap()
    };
    assert_eq!(poll("02:00:10", &mut misfires).await, []);
    for name in ["catch-up", "skip"] {
        assert_eq!(schedule(&store, name).last_fire, None, "{name}");
    }
    // Hours later the firing is missed: skipped by the one schedule, for good; the other keeps
    // it for whoever can fire it, as it would for a firing no serve was there for.
    assert_eq!(poll("05:00:00", &mut misfires).await, []);
    let skip = schedule(&store, "skip");
    assert_eq!(skip.last_fire, Some(at("02:00:00")));
    assert_eq!(
        skip.note.as_deref(),
        Some(
            "skipped 1 missed firing (no node fired it in time), the last at 2030-01-01T02:00:00Z"
        )
    );
    assert_eq!(schedule(&store, "catch-up").last_fire, None);
    make_plan(dir.path());
    let fired = poll("05:00:10", &mut misfires).await;
    assert_eq!(
        fired.len(),
        1,
        "caught up once; the skipped one stays skipped"
    );
    let caught_up = schedule(&store, "catch-up");
    assert_eq!(
        (caught_up.last_fire, caught_up.last_op),
        (Some(at("02:00:00")), Some(fired[0]))
    );
}
