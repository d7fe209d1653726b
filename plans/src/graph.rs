//! Drawing a plan's DAG: plain text for terminals, Graphviz `dot`, and Mermaid.
//! Conditions (`when`) and fan-outs (`for_each`) are marked on their steps.

use std::fmt::Write as _;

use crate::model::{ForEach, Plan, Step};

/// The formats `cairn graph` draws.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Text,
    Dot,
    Mermaid,
}

/// Draws the plan's DAG.
#[must_use]
pub fn render(plan: &Plan, format: Format) -> String {
    match format {
        Format::Text => text(plan),
        Format::Dot => dot(plan),
        Format::Mermaid => mermaid(plan),
    }
}

/// What marks a step: `run`, `[for_each]`, `when: ...`.
fn marks(step: &Step) -> Vec<String> {
    let mut out = vec![step.action.kind().to_owned()];
    if let Some(for_each) = &step.for_each {
        out.push(match for_each {
            ForEach::Expr(e) => format!("for each in {}", e.source().trim()),
            ForEach::Items(items) => format!("for each of {} items", items.len()),
        });
    }
    if let Some(when) = &step.when {
        out.push(format!("when {}", when.source().trim()));
    }
    out
}

/// Steps in topological order, each with what it needs.
fn text(plan: &Plan) -> String {
    let mut out = String::new();
    for &i in plan.dag.order() {
        let step = &plan.steps[i];
        let name = if step.for_each.is_some() {
            format!("{}[*]", step.id)
        } else {
            step.id.clone()
        };
        write!(out, "{name}  ({})", marks(step).join("; ")).ok();
        if !step.needs.is_empty() {
            let needs: Vec<&str> = step
                .needs
                .iter()
                .map(|&n| plan.steps[n].id.as_str())
                .collect();
            write!(out, "  <- {}", needs.join(", ")).ok();
        }
        out.push('\n');
    }
    out
}

fn dot_quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn dot(plan: &Plan) -> String {
    let mut out = format!(
        "digraph {} {{\n  rankdir=TB;\n  node [shape=box];\n",
        dot_quote(&plan.name)
    );
    for step in &plan.steps {
        let mut attrs = vec![format!(
            "label={}",
            dot_quote(&format!("{}\n{}", step.id, marks(step).join("\n")))
        )];
        if step.for_each.is_some() {
            attrs.push("peripheries=2".into());
        }
        if step.when.is_some() {
            attrs.push("style=dashed".into());
        }
        if matches!(step.action, crate::model::Action::Approve { .. }) {
            attrs.push("shape=diamond".into());
        }
        writeln!(out, "  {} [{}];", dot_quote(&step.id), attrs.join(", ")).ok();
    }
    for step in &plan.steps {
        for &need in &step.needs {
            writeln!(
                out,
                "  {} -> {};",
                dot_quote(&plan.steps[need].id),
                dot_quote(&step.id)
            )
            .ok();
        }
    }
    out.push_str("}\n");
    out
}

fn mermaid(plan: &Plan) -> String {
    let mut out = String::from("flowchart TD\n");
    let label = |step: &Step| {
        format!("{}<br/>{}", step.id, marks(step).join("<br/>")).replace('"', "#quot;")
    };
    for (i, step) in plan.steps.iter().enumerate() {
        let text = label(step);
        let node = if matches!(step.action, crate::model::Action::Approve { .. }) {
            format!("{{\"{text}\"}}")
        } else if step.for_each.is_some() {
            format!("[[\"{text}\"]]")
        } else {
            format!("[\"{text}\"]")
        };
        writeln!(out, "  s{i}{node}").ok();
    }
    for (i, step) in plan.steps.iter().enumerate() {
        for &need in &step.needs {
            let arrow = if step.when.is_some() { "-.->" } else { "-->" };
            writeln!(out, "  s{need} {arrow} s{i}").ok();
        }
    }
    out
}
