//! `cairn graph`: every format draws every example, and Graphviz accepts the `dot` output.

use std::io::Write;
use std::process::{Command, Stdio};

use crate::support::{cairn_in, root, stderr, stdout};

#[test]
fn dot_output_is_accepted_by_graphviz() {
    let dir = root().join("examples");
    for plan in [
        "rebuild-follower.yaml",
        "backup-metadata.yaml",
        "refresh-metadata.yaml",
    ] {
        let out = cairn_in(&dir, &["graph", plan, "--format", "dot"]);
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
        let mut dot = Command::new("dot")
            .arg("-Tsvg")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect(
                "Graphviz `dot` is installed (.ci/run installs it; `apt-get install graphviz`)",
            );
        dot.stdin.take().unwrap().write_all(&out.stdout).unwrap();
        let result = dot.wait_with_output().unwrap();
        assert!(
            result.status.success(),
            "dot rejected the graph of {plan}: {}",
            String::from_utf8_lossy(&result.stderr)
        );
        let svg = String::from_utf8_lossy(&result.stdout).replace("&#45;", "-");
        assert!(svg.contains("<svg"), "dot drew no SVG for {plan}");
        // Every step is drawn.
        let text = std::fs::read_to_string(dir.join(plan)).unwrap();
        for line in text.lines().filter_map(|l| l.trim().strip_prefix("- id: ")) {
            assert!(
                svg.contains(line.trim()),
                "{plan}: step {line} missing from the drawing"
            );
        }
    }
}

#[test]
fn text_and_mermaid_mark_conditions_and_fan_outs() {
    let dir = root().join("examples");
    let text = cairn_in(&dir, &["graph", "rebuild-follower.yaml"]);
    assert_eq!(text.status.code(), Some(0));
    insta::assert_snapshot!("graph_text", stdout(&text));
    let mermaid = cairn_in(
        &dir,
        &["graph", "rebuild-follower.yaml", "--format", "mermaid"],
    );
    assert_eq!(mermaid.status.code(), Some(0));
    insta::assert_snapshot!("graph_mermaid", stdout(&mermaid));
}

#[test]
fn an_invalid_plan_is_not_drawn() {
    let dir = root().join("tests/plans/invalid");
    let out = cairn_in(&dir, &["graph", "11-three-step-cycle.yaml"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stdout(&out).is_empty());
    assert!(
        stderr(&out).contains("dependency cycle: `a -> c -> b -> a`"),
        "{}",
        stderr(&out)
    );
}
