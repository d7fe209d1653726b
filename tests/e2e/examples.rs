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
