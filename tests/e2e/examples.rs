//! The plans shipped in `examples/` are valid.

use crate::support::{cairn_in, root, stderr};

#[test]
fn every_example_plan_is_valid() {
    let dir = root().join("examples");
    let mut plans: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| {
            std::path::Path::new(n)
                .extension()
                .is_some_and(|e| e == "yaml")
        })
        .collect();
    plans.sort();
    assert!(plans.len() >= 3);
    let mut args = vec!["validate"];
    args.extend(plans.iter().map(String::as_str));
    let out = cairn_in(&dir, &args);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    for plan in &plans {
        assert!(
            stderr(&out).contains(&format!("{plan}: ok")),
            "{plan} not reported ok"
        );
    }
}

#[test]
fn the_committed_schema_is_what_cairn_schema_prints() {
    let out = cairn_in(&root(), &["schema"]);
    assert_eq!(out.status.code(), Some(0));
    let committed = std::fs::read_to_string(root().join("docs/plan.schema.json")).unwrap();
    assert!(
        committed == crate::support::stdout(&out),
        "docs/plan.schema.json is stale: run `cargo run -- schema > docs/plan.schema.json`"
    );
    let schema: serde_json::Value = serde_json::from_str(&committed).unwrap();
    assert_eq!(schema["$schema"], "http://json-schema.org/draft-07/schema#");
    assert!(schema["properties"]["steps"].is_object());
}

/// The README's set-up command and quick start: the plan runs; pointed at a missing directory it
/// fails at `dump`; after the fix, `resume` finishes it without running `prepare` again.
#[test]
fn the_quick_start_fails_is_fixed_and_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("cairn.db");
    let plan = root().join("examples/quickstart.yaml");
    let backups = dir.path().join("backups");
    let cairn = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_cairn"))
            .args(args)
            .env("CAIRN_DB", &db)
            .env("NO_COLOR", "1")
            .output()
            .unwrap()
    };
    let workdir = format!("workdir={}", dir.path().join("work").display());
    let ok = cairn(&["run", plan.to_str().unwrap(), "-p", &workdir]);
    assert_eq!(
        ok.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let failing = cairn(&[
        "run",
        plan.to_str().unwrap(),
        "-p",
        &workdir,
        "-p",
        &format!("backups={}", backups.display()),
    ]);
    assert_eq!(failing.status.code(), Some(1));
    let err = String::from_utf8_lossy(&failing.stderr);
    assert!(
        err.contains("dump: failed: exit code 2") && err.contains("cairn resume 2"),
        "{err}"
    );
    std::fs::create_dir(&backups).unwrap();
    let resumed = cairn(&["resume", "2"]);
    assert_eq!(
        resumed.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&resumed.stderr)
    );
    let show: serde_json::Value =
        serde_json::from_slice(&cairn(&["show", "2", "--json"]).stdout).unwrap();
    let attempts = |id: &str| {
        show["tasks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["id"] == id)
            .unwrap()["attempts"]
            .clone()
    };
    assert_eq!(attempts("prepare"), 1);
    assert_eq!(attempts("dump"), 2);
    assert!(backups.join("demo-2.tgz").exists());
}

/// The metadata backup example runs as shipped: its lock, hooks and outputs.
#[test]
fn the_backup_example_runs() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cairn"))
        .args([
            "run",
            root()
                .join("examples/backup-metadata.yaml")
                .to_str()
                .unwrap(),
            "-p",
            "dataset=hbase",
        ])
        .arg("-p")
        .arg(format!("workdir={}", dir.path().display()))
        .env("CAIRN_DB", dir.path().join("cairn.db"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(err.contains("on_success[1]: succeeded"), "{err}");
    let backups: Vec<_> = std::fs::read_dir(dir.path().join("backups/hbase"))
        .unwrap()
        .collect();
    assert_eq!(backups.len(), 1);
}
