//! `cairn schema`: the JSON Schema of the plan format.

use anyhow::Context as _;

use crate::exit::Failure;
use crate::output::Output;

/// Print the JSON Schema (draft-07) of the plan format, for editors.
///
/// With yaml-language-server, put `# yaml-language-server: $schema=PATH` on a plan's first line.
#[derive(Debug, clap::Args)]
pub struct Args {}

pub fn run(_args: &Args, _out: &Output) -> Result<(), Failure> {
    let mut schema = plans::schema::json_schema();
    schema.push('\n');
    crate::output::data(&schema).context("cannot write the schema")?;
    Ok(())
}
