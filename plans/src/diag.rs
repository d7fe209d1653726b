//! Problems found in a plan, each pointing into the plan's text.
//!
//! Every message is written in one voice: lowercase, names in backticks, what was found before what
//! was expected. A [`Problem`] carries a byte span into the source; [`Problems`] owns the source text
//! and the file name so that it can render `file:line:col`, the offending line and a caret (through
//! miette), or a JSON list for editors and CI.

use std::borrow::Cow;
use std::fmt::{self, Write as _};

use miette::{GraphicalReportHandler, GraphicalTheme, LabeledSpan, SourceSpan};
use serde::Serialize;

/// `text` as people are shown it: every control character (C0 — `\n`, `\r` and `\t` too —, DEL,
/// C1) and bidirectional formatting character written visibly, so that data (a title, a param, a
/// lock key, an error quoting them) can never move the cursor, rewrite a line, ring a bell or
/// show its characters in another order than they are. ESC is `\e`; `\n`, `\r`, `\t` as
/// written in code; any other below U+0080 `\x07`, above it `\u{85}`, `\u{202e}`. A backslash
/// stays as it is. JSON never goes through this: serde writes the exact value. One function for
/// every crate that prints (the `cairn` binary re-exports it as `output::shown`).
pub fn shown(text: &str) -> Cow<'_, str> {
    if !text.chars().any(hidden) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\x1b' => out.push_str("\\e"),
            c if c.is_ascii_control() => {
                write!(out, "\\x{:02x}", u32::from(c)).ok();
            }
            c if hidden(c) => {
                write!(out, "\\u{{{:x}}}", u32::from(c)).ok();
            }
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// A character [`shown`] writes as an escape: a control character, or one that reorders the text
/// around it (the bidirectional marks, embeddings, overrides and isolates).
#[must_use]
pub fn hidden(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{061c}' | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}'
        )
}

/// A byte range in a plan's source text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Span {
    pub offset: usize,
    pub len: usize,
}

impl Span {
    #[must_use]
    pub const fn new(offset: usize, len: usize) -> Self {
        Self { offset, len }
    }

    #[must_use]
    pub const fn end(self) -> usize {
        self.offset + self.len
    }

    /// The span of a value read by serde-saphyr; `None` where the parser did not know it.
    #[must_use]
    pub fn of(location: &serde_saphyr::Location) -> Option<Self> {
        let span = location.span();
        match (span.byte_offset(), span.byte_len()) {
            (Some(offset), Some(len)) if location.line() > 0 => {
                Some(Self::new(offset as usize, len as usize))
            }
            _ => None,
        }
    }
}

/// One problem in a plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// A stable, kebab-case identifier of the kind of problem (`unknown-key`, `cycle`, ...).
    pub code: &'static str,
    pub message: String,
    pub span: Option<Span>,
    /// A short note printed under the caret.
    pub label: Option<String>,
    /// What to do about it.
    pub help: Option<String>,
}

impl Problem {
    #[must_use]
    pub fn new(code: &'static str, span: Option<Span>, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            span,
            label: None,
            help: None,
        }
    }

    #[must_use]
    pub fn label(mut self, label: impl Into<String>) -> Self {
        self.label = Some(label.into());
        self
    }

    #[must_use]
    pub fn help(mut self, help: impl Into<String>) -> Self {
        self.help = Some(help.into());
        self
    }
}

/// A line and column, both 1-based; the column counts characters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct LineCol {
    pub line: usize,
    pub column: usize,
}

/// The line and column of a byte offset in `text`.
#[must_use]
pub fn line_col(text: &str, offset: usize) -> LineCol {
    let offset = floor_char_boundary(text, offset.min(text.len()));
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    LineCol {
        line,
        column: before[line_start..].chars().count() + 1,
    }
}

/// The byte offset of a 1-based line and character column in `text`.
#[must_use]
pub fn offset_of(text: &str, line: usize, column: usize) -> Option<usize> {
    if line == 0 {
        return None;
    }
    let line_start = if line == 1 {
        0
    } else {
        text.match_indices('\n').nth(line - 2).map(|(i, _)| i + 1)?
    };
    let rest = &text[line_start..];
    let within = rest
        .char_indices()
        .nth(column.saturating_sub(1))
        .map_or(rest.len(), |(i, _)| i);
    Some(line_start + within)
}

fn floor_char_boundary(text: &str, mut offset: usize) -> usize {
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    offset
}

/// All the problems of one plan file, with the text they point into.
#[derive(Debug, Clone)]
pub struct Problems {
    pub file: String,
    pub source: String,
    pub list: Vec<Problem>,
}

/// One problem as `cairn validate --json` prints it.
#[derive(Debug, Serialize)]
pub struct JsonProblem<'a> {
    pub file: &'a str,
    pub line: Option<usize>,
    pub column: Option<usize>,
    pub code: &'static str,
    pub message: &'a str,
    pub label: Option<&'a str>,
    pub help: Option<&'a str>,
}

impl Problems {
    /// The problems with every span inside the source and on character boundaries (a parser may
    /// point one past the end of the file, where it ran out of text).
    #[must_use]
    pub fn clamped(mut self) -> Self {
        let len = self.source.len();
        for problem in &mut self.list {
            if let Some(span) = &mut problem.span {
                let mut offset = span.offset.min(len);
                while !self.source.is_char_boundary(offset) {
                    offset -= 1;
                }
                let mut end = span.end().clamp(offset, len);
                while !self.source.is_char_boundary(end) {
                    end += 1;
                }
                *span = Span::new(offset, end - offset);
            }
        }
        self
    }

    /// The problems in the order a reader meets them in the file; those without a place come last.
    /// Repeats of one problem at one place are reported once.
    pub fn sort(&mut self) {
        self.list
            .sort_by_key(|p| p.span.map_or((usize::MAX, 0), |s| (s.offset, s.len)));
        self.list
            .dedup_by(|a, b| a.code == b.code && a.span == b.span && a.message == b.message);
    }

    #[must_use]
    pub fn json(&self) -> Vec<JsonProblem<'_>> {
        self.list
            .iter()
            .map(|p| {
                let at = p.span.map(|s| line_col(&self.source, s.offset));
                JsonProblem {
                    file: &self.file,
                    line: at.map(|a| a.line),
                    column: at.map(|a| a.column),
                    code: p.code,
                    message: &p.message,
                    label: p.label.as_deref(),
                    help: p.help.as_deref(),
                }
            })
            .collect()
    }

    /// Renders every problem: `file:line:col`, the offending line with a caret, the label and the help.
    /// `color` picks ANSI styling; the layout is the same either way.
    #[must_use]
    pub fn render(&self, color: bool) -> String {
        let theme = if color {
            GraphicalTheme::unicode()
        } else {
            GraphicalTheme::unicode_nocolor()
        };
        let handler = GraphicalReportHandler::new_themed(theme)
            .with_context_lines(1)
            .with_width(100)
            .with_links(false);
        let mut out = String::new();
        // Where each line starts, once: each problem is drawn from the lines around it, so a
        // file with thousands of problems renders in linear time.
        let starts: Vec<usize> = std::iter::once(0)
            .chain(self.source.match_indices('\n').map(|(i, _)| i + 1))
            .collect();
        for problem in &self.list {
            if problem.span.is_none() {
                writeln!(
                    out,
                    "  × {}: {}",
                    shown(&self.file),
                    shown(&problem.message)
                )
                .ok();
                if let Some(help) = &problem.help {
                    writeln!(out, "  help: {}", shown(help)).ok();
                }
                out.push('\n');
                continue;
            }
            let report = Report {
                problem,
                source: Excerpt::around(&self.file, &self.source, &starts, problem.span),
            };
            if handler.render_report(&mut out, &report).is_err() {
                out.push_str(&shown(&problem.message));
                out.push('\n');
            }
            out.push('\n');
        }
        out
    }
}

impl fmt::Display for Problems {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.render(false))
    }
}

/// A [`Problem`] together with its source, as miette wants it.
struct Report<'a> {
    problem: &'a Problem,
    source: Excerpt,
}

/// The lines of a source around a span, that miette reads as if they were the whole file: spans
/// and line numbers are those of the whole file.
struct Excerpt {
    name: String,
    text: String,
    /// Where `text` starts in the whole source, in bytes and in lines (from 0).
    offset: usize,
    first_line: usize,
}

impl Excerpt {
    fn around(name: &str, source: &str, starts: &[usize], span: Option<Span>) -> Self {
        let span = span.unwrap_or(Span::new(0, 0));
        let line_of = |at: usize| starts.partition_point(|&s| s <= at).saturating_sub(1);
        let first_line = line_of(span.offset).saturating_sub(2);
        let last_line = line_of(span.end()) + 2;
        let offset = starts[first_line];
        let end = starts.get(last_line + 1).copied().unwrap_or(source.len());
        Self {
            name: shown(name).into_owned(),
            text: placeholders(&source[offset..end]),
            offset,
            first_line,
        }
    }
}

/// `text` with each control character but a tab and a line break (and each bidirectional
/// formatting character) replaced by as many `?` as it has bytes: the snippet under a problem can never drive the terminal, and every span still
/// points where it did.
fn placeholders(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        let kept = matches!(c, '\t' | '\n') || (c == '\r' && chars.peek() == Some(&'\n'));
        if hidden(c) && !kept {
            out.extend(std::iter::repeat_n('?', c.len_utf8()));
        } else {
            out.push(c);
        }
    }
    out
}

impl miette::SourceCode for Excerpt {
    fn read_span<'a>(
        &'a self,
        span: &SourceSpan,
        before: usize,
        after: usize,
    ) -> Result<Box<dyn miette::SpanContents<'a> + 'a>, miette::MietteError> {
        let local = SourceSpan::new(span.offset().saturating_sub(self.offset).into(), span.len());
        let contents = self.text.read_span(&local, before, after)?;
        Ok(Box::new(miette::MietteSpanContents::new_named(
            self.name.clone(),
            contents.data(),
            SourceSpan::new(
                (contents.span().offset() + self.offset).into(),
                contents.span().len(),
            ),
            contents.line() + self.first_line,
            contents.column(),
            contents.line_count(),
        )))
    }
}

impl fmt::Debug for Report<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.problem, f)
    }
}

impl fmt::Display for Report<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&shown(&self.problem.message))
    }
}

impl std::error::Error for Report<'_> {}

impl miette::Diagnostic for Report<'_> {
    fn help<'b>(&'b self) -> Option<Box<dyn fmt::Display + 'b>> {
        self.problem
            .help
            .as_ref()
            .map(|h| Box::new(shown(h)) as Box<dyn fmt::Display>)
    }

    fn source_code(&self) -> Option<&dyn miette::SourceCode> {
        self.problem.span.map(|_| &self.source as _)
    }

    fn labels(&self) -> Option<Box<dyn Iterator<Item = LabeledSpan> + '_>> {
        let span = self.problem.span?;
        // miette needs at least one byte to draw a caret under; an empty span marks its first byte.
        let span = SourceSpan::new(span.offset.into(), span.len.max(1));
        Some(Box::new(std::iter::once(LabeledSpan::new_with_span(
            self.problem.label.as_deref().map(|l| shown(l).into_owned()),
            span,
        ))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_reorders_or_drives_the_terminal_is_shown_escaped() {
        assert_eq!(shown("plain é text"), "plain é text");
        assert_eq!(shown("a\u{1b}[2Kb\r"), "a\\e[2Kb\\r");
        assert_eq!(shown("x\u{85}y"), "x\\u{85}y");
        assert_eq!(shown("ok\u{202e}ko\u{2066}"), "ok\\u{202e}ko\\u{2066}");
    }

    #[test]
    fn line_col_counts_characters_not_bytes() {
        let text = "a: é\nbb: x\n";
        assert_eq!(line_col(text, 0), LineCol { line: 1, column: 1 });
        assert_eq!(line_col(text, 6), LineCol { line: 2, column: 1 });
        // `x` is the 5th character of line 2.
        assert_eq!(line_col(text, 10), LineCol { line: 2, column: 5 });
        // After `é` (2 bytes) comes the newline: column 5 of line 1.
        assert_eq!(line_col(text, 5), LineCol { line: 1, column: 5 });
    }
}
