//! Where output goes and how it looks: data on stdout, diagnostics on stderr, colour only on a
//! terminal (or when asked), never when `NO_COLOR` is set.

use std::borrow::Cow;
use std::fmt::Write as _;
use std::io::{IsTerminal, Write};

use clap::ValueEnum;
pub use plans::diag::shown;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Color {
    Auto,
    Always,
    Never,
}

/// Options every command takes.
#[derive(Debug, clap::Args)]
pub struct Global {
    /// When to colour diagnostics.
    #[arg(
        long,
        global = true,
        value_enum,
        env = "CAIRN_COLOR",
        default_value = "auto"
    )]
    pub color: Color,
    /// Print more: whole error messages in progress lines, not only their first line.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// Print only errors.
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    pub quiet: bool,
}

#[derive(Debug)]
pub struct Output {
    pub color: bool,
    pub quiet: bool,
    pub verbose: bool,
}

impl Output {
    pub fn new(global: &Global) -> Self {
        let color = match global.color {
            Color::Always => true,
            Color::Never => false,
            Color::Auto => {
                std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
                    && std::io::stderr().is_terminal()
            }
        };
        Self {
            color,
            quiet: global.quiet,
            verbose: global.verbose > 0,
        }
    }

    /// Writes a note to stderr unless `--quiet`.
    pub fn note(&self, text: &str) {
        if !self.quiet {
            diagnostic(text);
        }
    }
}

/// Text of several lines as people are shown it: each line through [`shown`], the line breaks
/// kept (a message that is meant to span lines, such as an error with its causes).
pub fn shown_lines(text: &str) -> Cow<'_, str> {
    if !text.chars().any(|c| plans::diag::hidden(c) && c != '\n') {
        return Cow::Borrowed(text);
    }
    Cow::Owned(text.split('\n').map(shown).collect::<Vec<_>>().join("\n"))
}

/// Reports an error on stderr: its message, then its causes, each shown through [`shown_lines`]
/// (errors quote titles, params, lock keys and paths as given).
pub fn error(err: &anyhow::Error) {
    let mut text = format!("error: {}\n", shown_lines(&err.to_string()));
    for cause in err.chain().skip(1) {
        writeln!(text, "  caused by: {}", shown_lines(&cause.to_string())).ok();
    }
    diagnostic(&text);
}

/// Writes data to stdout.
pub fn data(text: &str) -> std::io::Result<()> {
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(text.as_bytes())?;
    stdout.flush()
}

/// Writes a diagnostic to stderr. A closed stderr leaves nobody to tell.
pub fn diagnostic(text: &str) {
    let _ = std::io::stderr().lock().write_all(text.as_bytes());
}

/// A table as the listing commands print it: no borders, columns two spaces apart.
pub fn plain_table() -> comfy_table::Table {
    let mut table = comfy_table::Table::new();
    table.load_style(comfy_table::presets::NOTHING);
    table
}

/// `table` with every cell through [`shown`]: a cell is one line, whatever its data holds.
pub fn shown_cells(table: &comfy_table::Table) -> comfy_table::Table {
    let mut shown_table = plain_table();
    if let Some(header) = table.header() {
        shown_table.set_header(header.cell_iter().map(comfy_table::Cell::content));
    }
    for row in table.row_iter() {
        shown_table.add_row(row.cell_iter().map(|c| shown(&c.content()).into_owned()));
    }
    shown_table
}

/// `table` as text, one line per row without trailing spaces, its cells [`shown`]; `empty` (a
/// line of its own) when it has no rows.
pub fn render_table(table: &comfy_table::Table, empty: &str) -> String {
    let mut table = shown_cells(table);
    for column in table.column_iter_mut() {
        column.set_padding((0, 2));
    }
    let rows = table.row_count();
    let mut text: String = table
        .lines()
        .map(|l| l.trim_end().to_owned() + "\n")
        .collect();
    if rows == 0 {
        text.push_str(empty);
        text.push('\n');
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_shown_visibly() {
        assert_eq!(shown("plain \\ text"), "plain \\ text");
        assert_eq!(
            shown("a\x1b[1A\r\x1b[2K\x07\t\n\x7f\u{85}b"),
            "a\\e[1A\\r\\e[2K\\x07\\t\\n\\x7f\\u{85}b"
        );
        assert_eq!(shown_lines("one\x1b\ntwo"), "one\\e\ntwo");
    }
}
