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
