//! `cairn graph`: draw a plan's DAG.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::ValueEnum;
use plans::graph::Format;

use crate::cmd::validate::load;
use crate::exit::Failure;
use crate::output::Output;

/// Draw a plan's DAG; conditions (`when`) and fan-outs (`for_each`) are marked.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The plan file.
    plan: PathBuf,
    /// How to draw it: `text` for a terminal, `dot` for Graphviz, `mermaid` for Markdown.
    #[arg(long, short, value_enum, default_value = "text")]
    format: GraphFormat,
    /// Print the steps (`nodes`: id, kind, needs) and their dependencies (`edges`: from, to) as
    /// JSON instead.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum GraphFormat {
    Text,
    Dot,
    Mermaid,
}

pub fn run(args: &Args, out: &Output) -> Result<(), Failure> {
    let plan = match load(&args.plan) {
        Ok(plan) => plan,
        Err(problems) => {
            crate::output::diagnostic(&problems.render(out.color));
            return Err(Failure::Reported);
        }
    };
    if args.json {
        let mut text = serde_json::to_string_pretty(&graph_json(&plan)).context("cannot encode")?;
        text.push('\n');
        crate::output::data(&text).context("cannot write the graph")?;
        return Ok(());
    }
    let format = match args.format {
        GraphFormat::Text => Format::Text,
        GraphFormat::Dot => Format::Dot,
        GraphFormat::Mermaid => Format::Mermaid,
    };
    crate::output::data(&plans::graph::render(&plan, format)).context("cannot write the graph")?;
    Ok(())
}

/// The plan's DAG as JSON: each step with its kind and needs, and one edge per need.
fn graph_json(plan: &plans::model::Plan) -> serde_json::Value {
    let id = |i: &usize| plan.steps[*i].id.clone();
    let nodes: Vec<serde_json::Value> = plan
        .steps
        .iter()
        .map(|s| {
            serde_json::json!({
                "id": s.id,
                "kind": s.action.kind(),
                "needs": s.needs.iter().map(id).collect::<Vec<_>>(),
                "for_each": s.for_each.is_some(),
            })
        })
        .collect();
    let edges: Vec<serde_json::Value> = plan
        .steps
        .iter()
        .flat_map(|s| {
            s.needs
                .iter()
                .map(move |n| serde_json::json!({"from": id(n), "to": s.id}))
        })
        .collect();
    serde_json::json!({"plan": plan.name, "nodes": nodes, "edges": edges})
}
