//! `cairn completions SHELL` and `cairn man`: what a shell and `man` need, generated from the
//! command line's own definition, so they cannot drift from it.

use anyhow::Context as _;

use crate::exit::Failure;

/// Print the completion script for a shell.
///
/// bash: `cairn completions bash > /etc/bash_completion.d/cairn`; zsh: into a directory of your
/// `$fpath` as `_cairn`; fish: `~/.config/fish/completions/cairn.fish`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The shell.
    #[arg(value_enum)]
    shell: clap_complete::Shell,
}

/// Print cairn's man page (roff).
///
/// For `man`: `cairn man > /usr/local/share/man/man1/cairn.1`, or read it now with
/// `cairn man | man -l -`.
#[derive(Debug, clap::Args)]
pub struct ManArgs {}

pub fn completions(args: &Args, mut command: clap::Command) -> Result<(), Failure> {
    let mut script = Vec::new();
    clap_complete::generate(args.shell, &mut command, "cairn", &mut script);
    crate::output::data(&String::from_utf8_lossy(&script)).context("cannot write the script")?;
    Ok(())
}

pub fn man(_args: &ManArgs, command: clap::Command) -> Result<(), Failure> {
    let mut page = Vec::new();
    clap_mangen::Man::new(command)
        .render(&mut page)
        .context("cannot render the man page")?;
    crate::output::data(&String::from_utf8_lossy(&page)).context("cannot write the man page")?;
    Ok(())
}
