//! Plan drift: how an edited plan differs from the one an op was submitted with, step by step,
//! and within each changed step, field by field.

use std::collections::BTreeMap;
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
    /// What changed in each changed step, by step id.
    pub step_fields: BTreeMap<String, Vec<FieldChange>>,
    /// What changed under each changed plan-level key, by key.
    pub setting_fields: BTreeMap<String, Vec<FieldChange>>,
}

/// One field that differs: its dotted path in the step (`run`, `retry.attempts`, `with.who`) or
/// in the plan (`params.mode.default`), and its value before and after (`None`: not there).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldChange {
    pub path: String,
    pub old: Option<Value>,
    pub new: Option<Value>,
}

/// The longest value shown on one line as `old → new`; a longer one gets a line diff.
const INLINE: usize = 60;
/// Unchanged lines shown around a changed one in a line diff.
const CONTEXT: usize = 2;

impl Drift {
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.added.is_empty()
            && self.removed.is_empty()
            && self.changed.is_empty()
            && self.settings.is_empty()
    }

    /// One line per difference: `+ step`, `- step`, `~ step`, ``~ plan `key` ``, each changed one
    /// followed by its fields: `field: old → new`, or a line diff for a script or a long value.
    #[must_use]
    pub fn render(&self) -> String {
        self.lines(true)
    }

    /// One line per difference, without the fields (for the op's events).
    #[must_use]
    pub fn summary(&self) -> String {
        self.lines(false)
    }

    fn lines(&self, fields: bool) -> String {
        let mut out = String::new();
        let none = BTreeMap::new();
        for (mark, list, details) in [
            ("+", &self.added, &none),
            ("-", &self.removed, &none),
            ("~", &self.changed, &self.step_fields),
        ] {
            for id in list {
                let _ = writeln!(out, "  {mark} step {id}");
                if fields {
                    render_fields(&mut out, details.get(id));
                }
            }
        }
        for key in &self.settings {
            let _ = writeln!(out, "  ~ plan `{key}`");
            if fields {
                render_fields(&mut out, self.setting_fields.get(key));
            }
        }
        if out.is_empty() {
            out.push_str("  (no change)\n");
        }
        out
    }
}

fn render_fields(out: &mut String, changes: Option<&Vec<FieldChange>>) {
    for change in changes.into_iter().flatten() {
        change.render(out);
    }
}

impl FieldChange {
    /// `    path: old → new`, or `    path:` and a line diff (`-`, `+`, and a little context).
    fn render(&self, out: &mut String) {
        let path = &self.path;
        let old = self.old.as_ref();
        let new = self.new.as_ref();
        let short = |v: Option<&Value>| v.map_or(Some("(none)".to_owned()), inline);
        if old == new {
            // Both hidden: a secret's default.
            let _ = writeln!(out, "      {path}: changed (a secret: not shown)");
            return;
        }
        if let (Some(mut before), Some(mut after)) = (short(old), short(new)) {
            if before == after {
                // Only the type differs (`10` and `"10"`): show them as JSON.
                before = old.map_or("(none)".to_owned(), Value::to_string);
                after = new.map_or("(none)".to_owned(), Value::to_string);
            }
            let _ = writeln!(out, "      {path}: {before} → {after}");
            return;
        }
        let (before, after) = (block(old), block(new));
        if before == after {
            let _ = writeln!(out, "      {path}: only its final newlines differ");
            return;
        }
        let _ = writeln!(out, "      {path}:");
        let diff = similar::TextDiff::from_lines(&before, &after);
        for group in diff.grouped_ops(CONTEXT) {
            let (first, last) = (&group[0], &group[group.len() - 1]);
            let (old_at, new_at) = (first.old_range().start, first.new_range().start);
            let old_len = last.old_range().end - old_at;
            let new_len = last.new_range().end - new_at;
            let _ = writeln!(
                out,
                "        @@ -{},{old_len} +{},{new_len} @@",
                old_at + 1,
                new_at + 1
            );
            for op in &group {
                for change in diff.iter_changes(op) {
                    let mark = match change.tag() {
                        similar::ChangeTag::Delete => '-',
                        similar::ChangeTag::Insert => '+',
                        similar::ChangeTag::Equal => ' ',
                    };
                    let line = change.value().trim_end_matches(['\n', '\r']);
                    if line.is_empty() {
                        // No trailing blanks after an empty line's mark.
                        let _ = writeln!(out, "{}", format!("        {mark}").trim_end());
                    } else {
                        let _ = writeln!(out, "        {mark}{line}");
                    }
                }
            }
        }
    }
}

/// A value on one short line, as YAML's flow style writes it, or `None` when it does not fit.
fn inline(value: &Value) -> Option<String> {
    let text = match value {
        Value::String(s) if s.contains('\n') => return None,
        Value::String(s) if s.is_empty() || s.trim() != s => Value::to_string(value),
        Value::String(s) => s.clone(),
        _ => flow(value),
    };
    (text.chars().count() <= INLINE).then_some(text)
}

fn flow(value: &Value) -> String {
    match value {
        Value::String(s) => {
            let plain = !s.is_empty()
                && s.trim() == s
                && !s.contains([',', '[', ']', '{', '}', ':', '#', '"', '\'', '\n']);
            if plain { s.clone() } else { value.to_string() }
        }
        Value::Array(items) => {
            let items: Vec<String> = items.iter().map(flow).collect();
            format!("[{}]", items.join(", "))
        }
        Value::Object(map) => {
            let pairs: Vec<String> = map
                .iter()
                .map(|(k, v)| format!("{}: {}", flow(&Value::String(k.clone())), flow(v)))
                .collect();
            format!("{{{}}}", pairs.join(", "))
        }
        _ => value.to_string(),
    }
}

/// A value as lines to compare: a string's own lines, anything else as YAML; ends with a newline.
fn block(value: Option<&Value>) -> String {
    let mut text = match value {
        None => String::new(),
        Some(Value::String(s)) => s.clone(),
        Some(v) => serde_saphyr::to_string(v)
            .unwrap_or_else(|_| serde_json::to_string_pretty(v).unwrap_or_default()),
    };
    let trimmed = text.trim_end_matches(['\n', '\r']).len();
    text.truncate(trimmed);
    if !text.is_empty() {
        text.push('\n');
    }
    text
}

/// The fields under `path` that differ between `old` and `new`: maps are compared key by key
/// (`retry.attempts`, `with.who`); anything else is one field.
fn field_changes(path: &str, old: Option<&Value>, new: Option<&Value>, out: &mut Vec<FieldChange>) {
    if old == new {
        return;
    }
    if let (Some(Value::Object(before)), Some(Value::Object(after))) = (old, new) {
        let keys = after
            .keys()
            .chain(before.keys().filter(|k| !after.contains_key(*k)));
        for key in keys {
            let sub = if path.is_empty() {
                key.clone()
            } else {
                format!("{path}.{key}")
            };
            field_changes(&sub, before.get(key), after.get(key), out);
        }
        return;
    }
    out.push(FieldChange {
        path: path.to_owned(),
        old: old.cloned(),
        new: new.cloned(),
    });
}

/// Whether `params.NAME` is a secret in either version of the plan.
fn secret(name: &str, tops: [&serde_json::Map<String, Value>; 2]) -> bool {
    tops.iter().any(|top| {
        top.get("params")
            .and_then(|p| p.get(name))
            .and_then(|p| p.get("secret"))
            == Some(&Value::Bool(true))
    })
}

/// The secret params (in either version) and their defaults, before and after.
fn secret_defaults<'a>(
    old: &'a serde_json::Map<String, Value>,
    new: &'a serde_json::Map<String, Value>,
) -> Vec<(&'a String, Option<&'a Value>, Option<&'a Value>)> {
    let default = |top: &'a serde_json::Map<String, Value>, name: &str| {
        top.get("params")
            .and_then(|p| p.get(name))
            .and_then(|p| p.get("default"))
    };
    let mut names: Vec<&String> = [old, new]
        .into_iter()
        .filter_map(|top| top.get("params").and_then(Value::as_object))
        .flat_map(serde_json::Map::keys)
        .filter(|name| secret(name, [old, new]))
        .collect();
    names.sort();
    names.dedup();
    names
        .into_iter()
        .map(|name| (name, default(old, name), default(new, name)))
        .collect()
}

/// The plan's top-level keys with the defaults of secret params (in either version) left out.
fn masked(
    top: &serde_json::Map<String, Value>,
    other: &serde_json::Map<String, Value>,
) -> serde_json::Map<String, Value> {
    let mut top = top.clone();
    if let Some(Value::Object(params)) = top.get_mut("params") {
        for (name, param) in params.iter_mut() {
            if (secret(name, [other, other]) || param.get("secret") == Some(&Value::Bool(true)))
                && let Some(param) = param.as_object_mut()
            {
                param.remove("default");
            }
        }
    }
    top
}

/// The plan's text as a generic document: steps by id, and the other top-level keys.
fn document(plan: &Plan) -> (Vec<(String, Value)>, serde_json::Map<String, Value>) {
    let options = serde_saphyr::options! { budget: Some(crate::limits::budget()) };
    let mut top: serde_json::Map<String, Value> =
        serde_saphyr::from_str_with_options::<Value>(&plan.text, options)
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
            Some(before) if &before != step => {
                let mut fields = Vec::new();
                field_changes("", Some(&before), Some(step), &mut fields);
                drift.changed.push(id.clone());
                drift.step_fields.insert(id.clone(), fields);
            }
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
            let mut fields = Vec::new();
            let (before, after) = (masked(&old_top, &new_top), masked(&new_top, &old_top));
            field_changes(key, before.get(key), after.get(key), &mut fields);
            // A secret's default is not shown, only that it changed.
            if key == "params" {
                for (name, before, after) in secret_defaults(&old_top, &new_top) {
                    if before != after {
                        let hidden = Value::String("***".to_owned());
                        fields.push(FieldChange {
                            path: format!("params.{name}.default"),
                            old: before.map(|_| hidden.clone()),
                            new: after.map(|_| hidden.clone()),
                        });
                    }
                }
            }
            drift.settings.push(key.clone());
            drift.setting_fields.insert(key.clone(), fields);
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

    #[test]
    fn a_changed_step_shows_its_fields_and_a_line_diff_of_its_script() {
        let old = plan(
            "name: p\nparams:\n  go: { type: bool, default: true }\nsteps:\n  - id: a\n    run: echo a\n  - id: report\n    needs: [a]\n    timeout: 10s\n    retry: { attempts: 2, delay: 1s }\n    run: |\n      echo one\n      echo two\n      echo three\n      echo four\n      echo five\n      echo six\n      echo seven\n      echo eight\n",
        );
        let new = plan(
            "name: p\nparams:\n  go: { type: bool, default: true }\nsteps:\n  - id: a\n    run: echo a\n  - id: b\n    run: echo b\n  - id: report\n    needs: [a, b]\n    timeout: 20s\n    retry: { attempts: 3, delay: 1s }\n    when: \"{{ params.go }}\"\n    run: |\n      echo one\n      echo TWO\n      echo three\n      echo four\n      echo five\n      echo six\n      echo seven\n      echo eight\n      echo nine\n",
        );
        let drift = diff(&old, &new);
        assert_eq!(drift.changed, vec!["report"]);
        let paths: Vec<&str> = drift.step_fields["report"]
            .iter()
            .map(|f| f.path.as_str())
            .collect();
        assert_eq!(
            paths,
            vec!["needs", "retry.attempts", "run", "timeout", "when"]
        );
        assert_eq!(
            drift.render(),
            "  + step b
  ~ step report
      needs: [a] → [a, b]
      retry.attempts: 2 → 3
      run:
        @@ -1,4 +1,4 @@
         echo one
        -echo two
        +echo TWO
         echo three
         echo four
        @@ -7,2 +7,3 @@
         echo seven
         echo eight
        +echo nine
      timeout: 10s → 20s
      when: (none) → {{ params.go }}
"
        );
        assert_eq!(drift.summary(), "  + step b\n  ~ step report\n");
    }

    #[test]
    fn a_long_line_gets_a_line_diff_and_a_type_change_shows_as_json() {
        let long = "x".repeat(70);
        let before = Value::String(format!("echo {long}"));
        let after = Value::String(format!("echo {long}y"));
        let mut out = String::new();
        FieldChange {
            path: "run".into(),
            old: Some(before),
            new: Some(after),
        }
        .render(&mut out);
        assert_eq!(
            out,
            format!(
                "      run:\n        @@ -1,1 +1,1 @@\n        -echo {long}\n        +echo {long}y\n"
            )
        );
        let mut out = String::new();
        FieldChange {
            path: "retry.attempts".into(),
            old: Some(Value::from(3)),
            new: Some(Value::from("3")),
        }
        .render(&mut out);
        assert_eq!(out, "      retry.attempts: 3 → \"3\"\n");
    }

    #[test]
    fn plan_keys_show_their_fields_and_never_a_secrets_default() {
        let old = plan(
            "name: p\nparams:\n  mode: { default: fast }\n  token: { type: string, secret: true, default: hunter2 }\nsteps:\n  - id: a\n    run: echo a\n",
        );
        let new = plan(
            "name: p\nmax_parallel: 2\nparams:\n  mode: { default: slow }\n  token: { type: string, secret: true, default: swordfish }\nsteps:\n  - id: a\n    run: echo a\n",
        );
        let text = diff(&old, &new).render();
        assert_eq!(
            text,
            "  ~ plan `max_parallel`
      max_parallel: (none) → 2
  ~ plan `params`
      params.mode.default: fast → slow
      params.token.default: changed (a secret: not shown)
"
        );
        assert!(!text.contains("hunter2") && !text.contains("swordfish"));
    }

    #[test]
    fn a_long_list_or_map_gets_a_line_diff_of_its_yaml() {
        let old = plan(
            "name: p\nsteps:\n  - id: a\n    run: echo a\nhooks:\n  on_failure:\n    - run: echo failed >> hooks\n",
        );
        let new = plan(
            "name: p\nsteps:\n  - id: a\n    run: echo a\nhooks:\n  on_failure:\n    - run: echo failed >> hooks\n    - run: |\n        echo page someone\n        echo twice\n",
        );
        assert_eq!(
            diff(&old, &new).render(),
            "  ~ plan `hooks`
      hooks.on_failure:
        @@ -1,1 +1,4 @@
         - run: echo failed >> hooks
        +- run: |
        +    echo page someone
        +    echo twice
"
        );
    }

    #[test]
    fn a_line_diff_keeps_a_lines_trailing_blanks_and_adds_none() {
        let mut out = String::new();
        FieldChange {
            path: "run".into(),
            old: Some(Value::from("echo a\n\necho b\n")),
            new: Some(Value::from("echo a\n\necho b  \n")),
        }
        .render(&mut out);
        assert_eq!(
            out,
            "      run:\n        @@ -1,3 +1,3 @@\n         echo a\n\n        -echo b\n        +echo b  \n"
        );
    }
}
