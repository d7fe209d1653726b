//! Runs plans through the real engine (`engine::op::run`) on a store in a temporary file.

use std::collections::BTreeMap;
use std::sync::Arc;

use engine::op::Overrides;
use engine::{NewRun, Options, RunEnd, StopHandle};
use store::{AttemptRow, OpId, Store, TaskRow};

/// A store on a temporary file; the directory lives as long as the returned guard.
pub fn store() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let store = Store::open(&dir.path().join("cairn.db")).expect("a new store");
    (dir, store)
}

/// Runs `yaml` to its end as `cairn run` would (in `dir`, with this process's `PATH`).
pub async fn run(
    store: &Store,
    dir: &std::path::Path,
    yaml: &str,
    options: Options,
) -> (OpId, RunEnd) {
    let plan = plans::parse("plan.yaml", yaml).unwrap_or_else(|p| panic!("{}", p.render(false)));
    let params = plans::params::resolve(&plan, &[], None).expect("the params resolve");
    let env: BTreeMap<String, String> = std::env::vars().filter(|(k, _)| k == "PATH").collect();
    let new = NewRun {
        plan,
        params,
        workdir: dir.to_path_buf(),
        env,
        files: Vec::new(),
        parent: None,
    };
    let progress: engine::progress::Sink = Arc::new(|_| {});
    engine::op::run(
        store,
        new,
        options,
        Overrides::default(),
        progress,
        StopHandle::new(),
    )
    .await
    .expect("the op starts")
}

/// The op's task named `name`.
pub fn task(store: &Store, op: OpId, name: &str) -> TaskRow {
    let reader = store.reader().expect("a reader");
    reader
        .tasks(op)
        .expect("the op's tasks")
        .into_iter()
        .find(|t| t.name == name)
        .unwrap_or_else(|| panic!("no task `{name}`"))
}

/// The attempts of the op's task named `name`, in order.
pub fn attempts(store: &Store, op: OpId, name: &str) -> Vec<AttemptRow> {
    let no = task(store, op, name).task_no;
    let reader = store.reader().expect("a reader");
    reader
        .attempts(op)
        .expect("the op's attempts")
        .into_iter()
        .filter(|a| a.task_no == no)
        .collect()
}
