//! `cairn`: the command line of the cairn workflow engine.
//!
//! One file per subcommand under `cmd/`; this file parses the arguments, picks the output style and
//! maps outcomes to exit codes (see [`exit`]).

mod cmd;
mod exit;
mod output;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// A durable workflow engine for database operations: plans of idempotent steps, checkpointed so
/// that any failed, canceled or killed op resumes exactly where it stopped.
#[derive(Debug, Parser)]
#[command(name = "cairn", version, about, max_term_width = 100)]
struct Cli {
    #[command(flatten)]
    global: output::Global,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    Validate(cmd::validate::Args),
    Graph(cmd::graph::Args),
    Schema(cmd::schema::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let out = output::Output::new(&cli.global);
    let result = match cli.command {
        Command::Validate(args) => cmd::validate::run(&args, &out),
        Command::Graph(args) => cmd::graph::run(&args, &out),
        Command::Schema(args) => cmd::schema::run(&args, &out),
    };
    exit::code(result)
}
