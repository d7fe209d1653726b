//! `cairn token`: the tokens of the HTTP API (`cairn serve --http`).

use anyhow::Context as _;

use crate::db::DbArgs;
use crate::exit::Failure;
use crate::output::{Output, shown};

/// Tokens of the HTTP API: every request needs one (`Authorization: Bearer TOKEN`). Only a
/// token's SHA-256 is stored; the token itself is printed once, when it is made.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Make a token and print it, alone on stdout, once: it cannot be shown again.
    Create {
        /// The token's name, recorded in the events of the ops it acts on ("canceled by token
        /// NAME"): letters, digits, `.`, `_`, `-`.
        name: String,
        /// `viewer` reads; `operator` also submits, resumes, cancels, approves and rejects.
        #[arg(long, value_parser = ["viewer", "operator"])]
        role: String,
        #[command(flatten)]
        db: DbArgs,
    },
    /// The tokens: name, role, when and by whom made (never the tokens themselves).
    List {
        /// Print them as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        db: DbArgs,
    },
    /// Delete a token: requests with it are refused from now on.
    Revoke {
        name: String,
        #[command(flatten)]
        db: DbArgs,
    },
}

pub fn run(args: &Args, _out: &Output) -> Result<(), Failure> {
    match &args.command {
        Command::Create { name, role, db } => {
            web::token::check_name(name).map_err(|e| anyhow::anyhow!(e))?;
            let token = web::token::generate().context("cannot make a random token")?;
            let store = db.store()?;
            store.apply_blocking(vec![store::Change::AddToken(store::TokenRow {
                name: name.clone(),
                role: role.clone(),
                hash: web::token::hash(&token),
                created_at: engine::owner::now(),
                created_by: engine::op::whoami(),
            })])?;
            crate::output::data(&format!("{token}\n")).context("cannot write")?;
            crate::output::diagnostic(&format!(
                "token `{name}` ({role}) made; it is shown only this once\n"
            ));
        }
        Command::List { json, db } => {
            let tokens = db.reader()?.tokens()?;
            let text = if *json {
                let list: Vec<serde_json::Value> = tokens
                    .iter()
                    .map(|t| {
                        serde_json::json!({
                            "name": t.name,
                            "role": t.role,
                            "created_at": engine::time::rfc3339(t.created_at),
                            "created_by": t.created_by,
                        })
                    })
                    .collect();
                let mut text = serde_json::to_string_pretty(&list).context("cannot encode")?;
                text.push('\n');
                text
            } else {
                let mut table = crate::output::plain_table();
                table.set_header(["NAME", "ROLE", "CREATED", "BY"]);
                for t in &tokens {
                    table.add_row([
                        shown(&t.name).into_owned(),
                        t.role.clone(),
                        engine::time::local(t.created_at),
                        shown(&t.created_by).into_owned(),
                    ]);
                }
                crate::output::render_table(&table, "(no tokens)")
            };
            crate::output::data(&text).context("cannot write")?;
        }
        Command::Revoke { name, db } => {
            let store = db.store()?;
            store.apply_blocking(vec![store::Change::RevokeToken { name: name.clone() }])?;
            crate::output::diagnostic(&format!("token `{}` revoked\n", shown(name)));
        }
    }
    Ok(())
}
