//! `cairn db`: the database itself: `migrate`, `check`, `recover` (`recover.rs`), `copy` (`copy.rs`).

use anyhow::Context as _;

use crate::db::DbArgs;
use crate::exit::Failure;
use crate::output::Output;

mod copy;
mod recover;

/// Work on the database itself.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    Migrate(MigrateArgs),
    Check(CheckArgs),
    Recover(recover::Args),
    Copy(copy::Args),
}

/// Bring the database's schema up to this cairn's (creating the database if there is none), and
/// print the schema version it is at.
///
/// Every command that writes migrates the database when it opens it; this does only that, for a
/// deployment step before the `serve` processes of a new cairn start. A database written by a
/// newer cairn is refused (exit 2).
#[derive(Debug, clap::Args)]
pub struct MigrateArgs {
    #[command(flatten)]
    db: DbArgs,
}

/// Check every page of a SQLite database for damage (`PRAGMA quick_check`); exit 2 if any.
///
/// Every command that writes checks the database first, within a third of a second: a large file
/// is checked as far as that goes. This checks all of it, however long it takes. Reads nothing
/// but the file; changes nothing.
#[derive(Debug, clap::Args)]
pub struct CheckArgs {
    #[command(flatten)]
    db: DbArgs,
}

pub fn run(args: &Args, out: &Output) -> Result<(), Failure> {
    match &args.command {
        Command::Migrate(args) => migrate(args, out),
        Command::Check(args) => check(args, out),
        Command::Recover(args) => recover::run(args, out),
        Command::Copy(args) => copy::run(args, out),
    }
}

fn migrate(args: &MigrateArgs, _out: &Output) -> Result<(), Failure> {
    // Opening a store for writing runs its migrations (once, whoever opens it first).
    let store = args.db.store()?;
    let text = format!(
        "{}: schema version {}\n",
        store.location(),
        store.location().schema_version()
    );
    crate::output::data(&text).context("cannot write")?;
    Ok(())
}

fn check(args: &CheckArgs, _out: &Output) -> Result<(), Failure> {
    let location = args.db.location()?;
    let store::Location::Sqlite(path) = &location else {
        return Err(anyhow::anyhow!(
            "`cairn db check` checks a SQLite file; `{location}` is a PostgreSQL server, which checks its own pages (`amcheck`, data checksums)"
        )
        .into());
    };
    if !path.exists() {
        return Err(anyhow::anyhow!("there is no database at `{}`", path.display()).into());
    }
    store::check_sqlite(path)?;
    crate::output::data(&format!("{}: no damage found\n", path.display()))
        .context("cannot write")?;
    Ok(())
}
