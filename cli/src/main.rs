//! `cairn`: the command line of the cairn workflow engine.
//!
//! One file per subcommand under `cmd/`; this file parses the arguments, picks the output style and
//! maps outcomes to exit codes (see [`exit`]).

mod cmd;
mod db;
mod exit;
mod output;
mod progress;
mod signals;

use std::process::ExitCode;

use clap::{CommandFactory as _, Parser, Subcommand};

/// A durable workflow engine for database operations: plans of idempotent steps, checkpointed so
/// that any failed, canceled or killed op resumes exactly where it stopped.
#[derive(Debug, Parser)]
#[command(name = "cairn", version, max_term_width = 100)]
struct Cli {
    #[command(flatten)]
    global: output::Global,
    /// `--db` before the subcommand; clap hands it down to the subcommand's own `DbArgs`.
    #[command(flatten)]
    _db: db::DbArgs,
    /// Print data as JSON, for the commands that print data (`status`, `show`, `validate`,
    /// `locks`, `nodes`, `schedule list`, `submit`, `run`, `resume`, `logs`, `graph`); also taken
    /// after the subcommand.
    #[arg(id = "json", long, global = true)]
    _json: bool,
    /// Without one, `cairn` prints its help.
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    Validate(cmd::validate::Args),
    Graph(cmd::graph::Args),
    Run(cmd::run::Args),
    Submit(cmd::submit::Args),
    Serve(cmd::serve::Args),
    Schedule(cmd::schedule::Args),
    Status(cmd::status::Args),
    Show(cmd::show::Args),
    Logs(cmd::logs::Args),
    Resume(cmd::resume::Args),
    Cancel(cmd::cancel::Args),
    Approve(cmd::approve::Args),
    Mark(cmd::mark::Args),
    Pause(cmd::pause::PauseArgs),
    Unpause(cmd::pause::UnpauseArgs),
    Locks(cmd::locks::Args),
    Nodes(cmd::nodes::Args),
    Ack(cmd::locks::AckArgs),
    Token(cmd::token::Args),
    Db(cmd::db::Args),
    Schema(cmd::schema::Args),
    Completions(cmd::completions::Args),
    Man(cmd::completions::ManArgs),
}

/// The async runtime for commands that run ops: one thread. The engine's work between two
/// commits is short; what costs is handing a step from thread to thread, and SQLite's writes run
/// on the store's own thread anyway.
fn runtime() -> Result<tokio::runtime::Runtime, exit::Failure> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| exit::Failure::BadInput(anyhow::anyhow!("cannot start the runtime: {e}")))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let out = output::Output::new(&cli.global);
    let Some(command) = cli.command else {
        // Asked for nothing: what can be asked for.
        let help = Cli::command().render_long_help().to_string();
        return exit::code(output::data(&help).map_err(|e| exit::Failure::BadInput(e.into())));
    };
    let result = match command {
        Command::Validate(args) => cmd::validate::run(&args, &out),
        Command::Graph(args) => cmd::graph::run(&args, &out),
        Command::Run(args) => cmd::run::run(&args, &out),
        Command::Submit(args) => cmd::submit::run(&args, &out),
        Command::Serve(args) => cmd::serve::run(&args, &out),
        Command::Schedule(args) => cmd::schedule::run(&args, &out),
        Command::Status(args) => cmd::status::run(&args, &out),
        Command::Show(args) => cmd::show::run(&args, &out),
        Command::Logs(args) => cmd::logs::run(&args, &out),
        Command::Resume(args) => cmd::resume::run(&args, &out),
        Command::Cancel(args) => cmd::cancel::run(&args, &out),
        Command::Approve(args) => cmd::approve::run(&args, &out),
        Command::Mark(args) => cmd::mark::run(&args, &out),
        Command::Pause(args) => cmd::pause::pause(&args, &out),
        Command::Unpause(args) => cmd::pause::unpause(&args, &out),
        Command::Locks(args) => cmd::locks::run(&args, &out),
        Command::Nodes(args) => cmd::nodes::run(&args, &out),
        Command::Ack(args) => cmd::locks::ack(&args, &out),
        Command::Token(args) => cmd::token::run(&args, &out),
        Command::Db(args) => cmd::db::run(&args, &out),
        Command::Schema(args) => cmd::schema::run(&args, &out),
        Command::Completions(args) => cmd::completions::completions(&args, Cli::command()),
        Command::Man(args) => cmd::completions::man(&args, Cli::command()),
    };
    exit::code(result)
}
