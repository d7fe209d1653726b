//! Plan drift: how an edited plan differs from the one an op was submitted with, step by step.

use std::fmt::Write as _;

use serde_json::Value;

use crate::model::Plan;

/// The differences between two versions of a plan.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Drift {
    /// Step ids, in the new plan's order.
    pub added: Vec<String>,
    /// Step ids, in the old plan's order.
    pub removed: Vec<String>,
    /// Steps whose definition changed, in the new plan's order.
    pub changed: Vec<String>,
    /// Plan-level keys that changed (`params`, `hooks`, `lock`...).
    pub settings: Vec<String>,
}

impl Drift {
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.added.is_empty()
            && self.removed.is_empty()
            && self.changed.is_empty()
            && self.settings.is_empty()
    }

    /// One line per difference: `+ step`, `- step`, `~ step`, `~ (plan) key`.
    #[must_use]
    pub fn render(&self) -> String {
        let mut out = String::new();
        for (mark, list) in [
            ("+", &self.added),
            ("-", &self.removed),
            ("~", &self.changed),
        ] {
            for id in list {
                let _ = writeln!(out, "  {mark} step {id}");
            }
        }
        for key in &self.settings {
            let _ = writeln!(out, "  ~ plan `{key}`");
        }
        if out.is_empty() {
            out.push_str("  (no change)\n");
        }
        out
    }
}

/// The plan's text as a generic document: steps by id, and the other top-level keys.
fn document(plan: &Plan) -> (Vec<(String, Value)>, serde_json::Map<String, Value>) {
    let mut top: serde_json::Map<String, Value> = serde_saphyr::from_str::<Value>(&plan.text)
        .ok()
        .and_then(|v| v.as_object().cloned())
        .unwrap_or_default();
    let steps = match top.remove("steps") {
        Some(Value::Array(steps)) => steps
            .into_iter()
            .map(|s| (s["id"].as_str().unwrap_or_default().to_owned(), s))
            .collect(),
        _ => Vec::new(),
    };
    for key in ["name", "description"] {
        top.remove(key);
    }
    (steps, top)
}

/// Compares two valid plans step by step. Only what a step says counts: moving it in the file,
/// or editing comments and layout, is no change.
#[must_use]
pub fn diff(old: &Plan, new: &Plan) -> Drift {
    let (old_steps, old_top) = document(old);
    let (new_steps, new_top) = document(new);
    let find = |steps: &[(String, Value)], id: &str| {
        steps.iter().find(|(i, _)| i == id).map(|(_, v)| v.clone())
    };
    let mut drift = Drift::default();
    for (id, step) in &new_steps {
        match find(&old_steps, id) {
            None => drift.added.push(id.clone()),
            Some(before) if &before != step => drift.changed.push(id.clone()),
            Some(_) => {}
        }
    }
    for (id, _) in &old_steps {
        if find(&new_steps, id).is_none() {
            drift.removed.push(id.clone());
        }
    }
    let mut keys: Vec<&String> = old_top.keys().chain(new_top.keys()).collect();
    keys.sort();
    keys.dedup();
    for key in keys {
        if old_top.get(key) != new_top.get(key) {
            drift.settings.push(key.clone());
        }
    }
    drift
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(text: &str) -> Plan {
        crate::parse("p.yaml", text).expect("valid")
    }

    #[test]
    fn steps_added_removed_changed_and_settings() {
        let old = plan(
            "name: p\nsteps:\n  - id: a\n    run: echo a\n  - id: b\n    run: echo b\n  - id: c\n    noop: true\n",
        );
        let new = plan(
            "name: p\nmax_parallel: 2\nsteps:\n  # a comment\n  - id: a\n    run:   echo a\n  - id: b\n    run: echo B\n  - id: d\n    noop: true\n",
        );
        let drift = diff(&old, &new);
        assert_eq!(drift.added, vec!["d"]);
        assert_eq!(drift.removed, vec!["c"]);
        assert_eq!(drift.changed, vec!["b"]);
        assert_eq!(drift.settings, vec!["max_parallel"]);
        assert!(diff(&old, &old).is_empty());
    }
}
