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
    let format = match args.format {
        GraphFormat::Text => Format::Text,
        GraphFormat::Dot => Format::Dot,
        GraphFormat::Mermaid => Format::Mermaid,
    };
    crate::output::data(&plans::graph::render(&plan, format)).context("cannot write the graph")?;
    Ok(())
}
