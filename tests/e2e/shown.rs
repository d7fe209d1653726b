//! Data shown to people never drives their terminal: control characters in titles, params and
//! lock keys are written visibly (`\e`, `\r`, `\x07`); `--json` keeps the exact value.

use serde_json::Value;

use crate::support::{Sandbox, code, stderr, stdout};

/// Moves the cursor up, returns, clears the line and rings the bell: on a terminal it rewrites
/// the line above; then shows what follows right to left (`ko` reads `ok`).
const RAW: &str = "\x1b[1A\r\x1b[2K\x07ok\u{202e}ko";
const SHOWN: &str = "\\e[1A\\r\\e[2K\\x07ok\\u{202e}ko";

const PLAN: &str = r#"name: escapes
params:
  t: {}
title: "{{ params.t }}"
lock: "key-{{ params.t }}"
steps:
  - id: out
    run: echo "o=$T" >> "$CAIRN_OUTPUT"
    env: { T: "{{ params.t }}" }
  - id: a
    needs: [out]
    run: exit 1
"#;

fn assert_shown(what: &str, text: &str) {
    for raw in ['\x1b', '\r', '\x07', '\u{202e}'] {
        assert!(!text.contains(raw), "{what} printed {raw:?} raw:\n{text:?}");
    }
    assert!(
        text.contains(SHOWN),
        "{what} did not show `{SHOWN}`:\n{text}"
    );
}

#[test]
fn control_characters_in_data_are_escaped_for_people_and_exact_in_json() {
    let dir = Sandbox::new();
    dir.write("plan.yaml", PLAN);
    let run = dir.cairn(&["run", "plan.yaml", "-p", &format!("t={RAW}")]);
    assert_eq!(code(&run), Some(1), "{}", stderr(&run));
    // Progress lines name the title; the failure names the lock the op keeps.
    assert_shown("run's progress", &stderr(&run));
    let op = dir.json(&["status", "--json"])[0]["id"].to_string();
    for args in [vec!["status"], vec!["show", &op], vec!["locks"]] {
        let out = dir.cairn(&args);
        assert_eq!(code(&out), Some(0), "{args:?}: {}", stderr(&out));
        assert_shown(&format!("{args:?}"), &stdout(&out));
    }
    let show = dir.json(&["show", &op, "--json"]);
    assert_eq!(show["name"], RAW);
    assert_eq!(show["params"]["t"], RAW);
    assert_eq!(
        show["tasks"][0]["outputs"]["o"], RAW,
        "{:#}",
        show["tasks"][0]
    );
    let locks = dir.json(&["locks", "--json"]);
    assert_eq!(locks["locks"][0]["key"], Value::from(format!("key-{RAW}")));
    assert_eq!(dir.json(&["status", "--json"])[0]["name"], RAW);
}
