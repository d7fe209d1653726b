//! Templates (`{{ params.target }}`) and expressions (`when: params.role == "follower"`).
//!
//! Built on minijinja with three rules of cairn's own:
//! - **Strict names.** A name that is not in the context is an error, never an empty string; and
//!   [`names`] lists every name a template uses so that `validate` can reject unknown ones first.
//! - **Shell quoting.** In `run` and `check` scripts every inserted value is shell-quoted (a list
//!   becomes one quoted word per item); `{{ x | raw }}` opts out. Quoting is only sound where the
//!   value lands in plain shell context, so [`unsafe_insertions`] finds templates placed inside
//!   quotes, comments or here-documents, which `validate` rejects.
//! - **Step ids with dashes.** `steps.pick-source.outputs.x` would be a subtraction in Jinja, so
//!   every `steps.<id>` is rewritten to an index key (`steps.s3`) before compiling.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::sync::LazyLock;

use minijinja::value::Value;
use minijinja::{AutoEscape, Environment, UndefinedBehavior};

/// How values are inserted when a template is rendered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quoting {
    /// Shell-quoted: `run` and `check` scripts.
    Shell,
    /// As they are: `exec` arguments, `env` values, titles, lock keys, prompts.
    Plain,
}

impl Quoting {
    const fn template_name(self) -> &'static str {
        match self {
            Self::Shell => "shell",
            Self::Plain => "plain",
        }
    }
}

/// A template checked by `validate`: its text as written, and the text minijinja compiles.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    source: String,
    compiled: String,
    quoting: Quoting,
    steps: Vec<(usize, String)>,
}

/// An expression (`when`, `for_each`) checked by `validate`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expr {
    source: String,
    compiled: String,
    steps: Vec<(usize, String)>,
}

/// A template or expression could not be rendered with the values at hand.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct RenderError {
    pub message: String,
}

impl RenderError {
    /// `err` in cairn's words; an undefined name is named (`steps.dump.outputs.archive is not
    /// set`), found among `used` (the compiled code's dotted names) by looking each up in `context`.
    fn from_minijinja(
        err: &minijinja::Error,
        used: impl FnOnce() -> Vec<String>,
        context: &Context,
        steps: &[(usize, String)],
    ) -> Self {
        let message = if err.kind() == minijinja::ErrorKind::UndefinedError {
            match missing_name(used(), &context.value(), steps) {
                Some(name) => format!("`{name}` is not set"),
                None => "a name in the template has no value".to_owned(),
            }
        } else {
            err.detail()
                .map_or_else(|| err.kind().to_string(), ToOwned::to_owned)
        };
        Self { message }
    }
}

/// Of the dotted names a template uses, the first (in order) that `context` has no value for, up to
/// the part that is missing, with `steps.s<index>` said as the step's id again.
fn missing_name(
    mut used: Vec<String>,
    context: &Value,
    steps: &[(usize, String)],
) -> Option<String> {
    used.sort();
    used.iter().find_map(|dotted| {
        let mut value = context.clone();
        let mut path = Vec::new();
        for part in dotted.split('.') {
            path.push(part);
            value = value.get_attr(part).ok()?;
            if value.is_undefined() {
                let said: Vec<String> = path
                    .iter()
                    .enumerate()
                    .map(|(i, p)| {
                        let index = (i == 1 && path[0] == "steps")
                            .then(|| p.strip_prefix('s')?.parse::<usize>().ok())
                            .flatten();
                        index
                            .and_then(|n| steps.iter().find(|(i, _)| *i == n))
                            .map_or_else(|| (*p).to_owned(), |(_, id)| id.clone())
                    })
                    .collect();
                return Some(said.join("."));
            }
        }
        None
    })
}

static ENV: LazyLock<Environment<'static>> = LazyLock::new(|| {
    let mut env = Environment::new();
    env.set_undefined_behavior(UndefinedBehavior::Strict);
    env.set_auto_escape_callback(|name| match name {
        "shell" => AutoEscape::Custom("shell".into()),
        _ => AutoEscape::None,
    });
    env.set_formatter(|out, state, value| {
        if matches!(state.auto_escape(), AutoEscape::Custom(name) if name == "shell")
            && !value.is_safe()
        {
            let quoted = shell_words(value).map_err(|message| {
                minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, message)
            })?;
            out.write_str(&quoted).map_err(|e| {
                minijinja::Error::new(minijinja::ErrorKind::WriteFailure, e.to_string())
            })
        } else if value.is_safe() || value.is_undefined() {
            minijinja::escape_formatter(out, state, value)
        } else {
            // Plain text: strings as they are, everything else as JSON (`true`, not `True`).
            out.write_str(&scalar_text(value)).map_err(|e| {
                minijinja::Error::new(minijinja::ErrorKind::WriteFailure, e.to_string())
            })
        }
    });
    env.add_filter("raw", |value: Value| {
        Value::from_safe_string(value.to_string())
    });
    // A runaway loop in a template is a plan bug; stop it rather than hang the engine.
    env.set_fuel(Some(1_000_000));
    env
});

/// A value as shell words: a scalar is one quoted word, a list one quoted word per item, a map one
/// quoted JSON word.
fn shell_words(value: &Value) -> Result<String, String> {
    fn quote(text: &str) -> Result<String, String> {
        shlex::try_quote(text)
            .map(std::borrow::Cow::into_owned)
            .map_err(|_| "a value with a NUL byte cannot be passed to a shell".to_owned())
    }
    match value.kind() {
        minijinja::value::ValueKind::Seq | minijinja::value::ValueKind::Iterable => {
            let mut words = Vec::new();
            for item in value.try_iter().map_err(|e| e.to_string())? {
                words.push(quote(&scalar_text(&item))?);
            }
            Ok(words.join(" "))
        }
        _ => quote(&scalar_text(value)),
    }
}

/// A value as text: strings as they are, everything else as JSON (`true`, `null`, `[1,2]`).
fn scalar_text(value: &Value) -> String {
    match value.kind() {
        minijinja::value::ValueKind::String => value.as_str().unwrap_or_default().to_owned(),
        _ => serde_json::to_string(value).unwrap_or_else(|_| value.to_string()),
    }
}

/// Where a template's names point, as `validate` sees them after the rewrite.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Name {
    /// `params.<name>`
    Param(String),
    /// `steps.<id>...`: the step's index and the rest of the path (`outputs.key`).
    Step { index: usize, rest: Vec<String> },
    /// `steps.<id>` where no step has that id.
    UnknownStep(String),
    /// `op.<field>`
    Op(Option<String>),
    /// `item` or `item.<field>`
    Item,
    /// `env.<name>`
    Env(Option<String>),
    /// `params`, `steps` or another root used without the part after the dot.
    Bare(String),
    /// A name that is none of the above.
    Unknown(String),
}

/// A template or expression after the `steps.<id>` rewrite, with the ids it could not resolve.
struct Rewritten {
    text: String,
    unknown_steps: Vec<String>,
    /// The steps it names, by index: to say `steps.<id>` again in messages.
    known_steps: Vec<(usize, String)>,
}

const GLOBAL_FUNCTIONS: &[&str] = &["range", "dict", "namespace", "debug"];

fn is_ident_start(b: u8) -> bool {
    b.is_ascii_alphabetic() || b == b'_'
}

fn is_ident(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}

fn is_step_id_char(b: u8) -> bool {
    is_ident(b) || b == b'-'
}

/// Rewrites `steps.<id>` to `steps.s<index>` (or `steps.u<k>` for an id no step has) in the code
/// parts of `src`: everything when `expression`, else what stands between `{{ }}` and `{% %}`.
fn rewrite(src: &str, expression: bool, step_index: &dyn Fn(&str) -> Option<usize>) -> Rewritten {
    let mut out = Rewritten {
        text: String::with_capacity(src.len() + 8),
        unknown_steps: Vec::new(),
        known_steps: Vec::new(),
    };
    if expression {
        rewrite_code(src, 0, None, &mut out, step_index);
        return out;
    }
    let bytes = src.as_bytes();
    let mut i = 0;
    while let Some(found) = src[i..].find('{') {
        let open = i + found;
        let end = match bytes.get(open + 1) {
            Some(b'{') => "}}",
            Some(b'%') => "%}",
            Some(b'#') => "#}",
            _ => {
                out.text.push_str(&src[i..=open]);
                i = open + 1;
                continue;
            }
        };
        out.text.push_str(&src[i..open + 2]);
        if end == "#}" {
            let close = src[open + 2..]
                .find(end)
                .map_or(src.len(), |c| open + 2 + c + 2);
            out.text.push_str(&src[open + 2..close]);
            i = close;
        } else {
            i = rewrite_code(src, open + 2, Some(end), &mut out, step_index);
        }
    }
    out.text.push_str(&src[i..]);
    out
}

/// Copies code from `start` up to and including `end` (or to the end of `src`), rewriting step
/// references outside string literals. Returns where it stopped.
fn rewrite_code(
    src: &str,
    start: usize,
    end: Option<&str>,
    out: &mut Rewritten,
    step_index: &dyn Fn(&str) -> Option<usize>,
) -> usize {
    let bytes = src.as_bytes();
    let mut i = start;
    while i < bytes.len() {
        if let Some(end) = end
            && src[i..].starts_with(end)
        {
            out.text.push_str(end);
            return i + end.len();
        }
        let b = bytes[i];
        if b == b'"' || b == b'\'' {
            let mut j = i + 1;
            while j < bytes.len() && bytes[j] != b {
                j += if bytes[j] == b'\\' { 2 } else { 1 };
            }
            let j = (j + 1).min(bytes.len());
            out.text.push_str(&src[i..j]);
            i = j;
            continue;
        }
        let starts_word = i == 0 || !(is_ident(bytes[i - 1]) || bytes[i - 1] == b'.');
        if is_ident_start(b) && starts_word {
            let mut j = i;
            while j < bytes.len() && is_ident(bytes[j]) {
                j += 1;
            }
            if &src[i..j] == "steps" && bytes.get(j) == Some(&b'.') {
                let id_start = j + 1;
                let mut k = id_start;
                while k < bytes.len() && is_step_id_char(bytes[k]) {
                    k += 1;
                }
                // `{{ steps.a -}}`: a trailing dash belongs to the delimiter, not the id.
                while k > id_start && bytes[k - 1] == b'-' {
                    k -= 1;
                }
                if k > id_start {
                    let id = &src[id_start..k];
                    out.text.push_str("steps.");
                    if let Some(index) = step_index(id) {
                        write!(out.text, "s{index}").ok();
                        if !out.known_steps.iter().any(|(i, _)| *i == index) {
                            out.known_steps.push((index, id.to_owned()));
                        }
                    } else {
                        write!(out.text, "u{}", out.unknown_steps.len()).ok();
                        out.unknown_steps.push(id.to_owned());
                    }
                    i = k;
                    continue;
                }
            }
            out.text.push_str(&src[i..j]);
            i = j;
            continue;
        }
        let len = src[i..].chars().next().map_or(1, char::len_utf8);
        out.text.push_str(&src[i..i + len]);
        i += len;
    }
    i
}

/// Turns minijinja's dotted names back into cairn's names.
fn classify(names: impl IntoIterator<Item = String>, unknown_steps: &[String]) -> Vec<Name> {
    let mut out: Vec<Name> = names
        .into_iter()
        .filter_map(|dotted| {
            let mut parts = dotted.split('.').map(str::to_owned);
            let root = parts.next().unwrap_or_default();
            let first = parts.next();
            let rest: Vec<String> = parts.collect();
            Some(match (root.as_str(), first) {
                ("params", Some(name)) => Name::Param(name),
                ("steps", Some(key)) => {
                    if let Some(index) = key.strip_prefix('s').and_then(|n| n.parse().ok()) {
                        Name::Step { index, rest }
                    } else if let Some(k) =
                        key.strip_prefix('u').and_then(|n| n.parse::<usize>().ok())
                    {
                        Name::UnknownStep(unknown_steps.get(k).cloned().unwrap_or(key))
                    } else {
                        Name::UnknownStep(key)
                    }
                }
                ("op", field) => Name::Op(field),
                ("item", _) => Name::Item,
                ("env", field) => Name::Env(field),
                ("params" | "steps", None) => Name::Bare(root),
                (f, None) if GLOBAL_FUNCTIONS.contains(&f) => return None,
                (_, first) => Name::Unknown(match first {
                    Some(first) => format!("{root}.{first}"),
                    None => root,
                }),
            })
        })
        .collect();
    out.sort_by_key(|n| format!("{n:?}"));
    out.dedup();
    out
}

/// The names used by the templates (`Some(quoting)`) and expressions (`None`) compiled so far, by
/// the text minijinja compiles: the steps of a large plan often repeat one template.
#[derive(Debug, Default)]
pub struct Compiled {
    /// Shell templates, plain templates, expressions.
    seen: [HashMap<String, Result<Vec<String>, SyntaxError>>; 3],
}

impl Compiled {
    /// The most texts kept of each kind.
    const MAX: usize = 4096;

    fn names(
        &mut self,
        quoting: Option<Quoting>,
        text: &str,
        compile: impl FnOnce() -> Result<Vec<String>, SyntaxError>,
    ) -> Result<Vec<String>, SyntaxError> {
        let seen = &mut self.seen[match quoting {
            Some(Quoting::Shell) => 0,
            Some(Quoting::Plain) => 1,
            None => 2,
        }];
        if let Some(known) = seen.get(text) {
            return known.clone();
        }
        let names = compile();
        if seen.len() < Self::MAX {
            seen.insert(text.to_owned(), names.clone());
        }
        names
    }
}

/// A template or expression that does not compile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyntaxError {
    pub message: String,
    /// The 1-based line within the template, where minijinja knows it.
    pub line: Option<usize>,
}

fn syntax_error(err: &minijinja::Error) -> SyntaxError {
    SyntaxError {
        message: err
            .detail()
            .map_or_else(|| err.kind().to_string(), ToOwned::to_owned),
        line: err.line(),
    }
}

impl Template {
    /// Compiles `source`, resolving `steps.<id>` through `step_index`; returns the template and the
    /// names it uses.
    pub fn compile(
        source: &str,
        quoting: Quoting,
        step_index: &dyn Fn(&str) -> Option<usize>,
    ) -> Result<(Self, Vec<Name>), SyntaxError> {
        Self::compile_with(source, quoting, step_index, &mut Compiled::default())
    }

    /// [`Template::compile`], parsing a text `compiled` has seen before only once.
    pub fn compile_with(
        source: &str,
        quoting: Quoting,
        step_index: &dyn Fn(&str) -> Option<usize>,
        compiled: &mut Compiled,
    ) -> Result<(Self, Vec<Name>), SyntaxError> {
        let rewritten = rewrite(source, false, step_index);
        let used = compiled.names(Some(quoting), &rewritten.text, || {
            ENV.template_from_named_str(quoting.template_name(), &rewritten.text)
                .map(|t| t.undeclared_variables(true).into_iter().collect())
                .map_err(|e| syntax_error(&e))
        })?;
        let names = classify(used, &rewritten.unknown_steps);
        Ok((
            Self {
                source: source.to_owned(),
                compiled: rewritten.text,
                quoting,
                steps: rewritten.known_steps,
            },
            names,
        ))
    }

    /// The template as written in the plan.
    #[must_use]
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Whether the template inserts anything at all.
    #[must_use]
    pub fn is_literal(&self) -> bool {
        !self.source.contains("{{") && !self.source.contains("{%")
    }

    pub fn render(&self, context: &Context) -> Result<String, RenderError> {
        if self.is_literal() {
            return Ok(self.source.clone());
        }
        ENV.render_named_str(
            self.quoting.template_name(),
            &self.compiled,
            context.value(),
        )
        .map_err(|e| {
            let used = || {
                ENV.template_from_named_str(self.quoting.template_name(), &self.compiled)
                    .map(|t| t.undeclared_variables(true).into_iter().collect())
                    .unwrap_or_default()
            };
            RenderError::from_minijinja(&e, used, context, &self.steps)
        })
    }
}

impl Expr {
    /// Compiles an expression; `{{ ... }}` around the whole of it is accepted and removed.
    pub fn compile(
        source: &str,
        step_index: &dyn Fn(&str) -> Option<usize>,
    ) -> Result<(Self, Vec<Name>), SyntaxError> {
        Self::compile_with(source, step_index, &mut Compiled::default())
    }

    /// [`Expr::compile`], parsing a text `compiled` has seen before only once.
    pub fn compile_with(
        source: &str,
        step_index: &dyn Fn(&str) -> Option<usize>,
        compiled: &mut Compiled,
    ) -> Result<(Self, Vec<Name>), SyntaxError> {
        let inner = unwrap_braces(source);
        let rewritten = rewrite(inner, true, step_index);
        let used = compiled.names(None, &rewritten.text, || {
            ENV.compile_expression(&rewritten.text)
                .map(|e| e.undeclared_variables(true).into_iter().collect())
                .map_err(|e| syntax_error(&e))
        })?;
        let names = classify(used, &rewritten.unknown_steps);
        Ok((
            Self {
                source: source.to_owned(),
                compiled: rewritten.text,
                steps: rewritten.known_steps,
            },
            names,
        ))
    }

    #[must_use]
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Evaluates the expression to a JSON value.
    pub fn eval(&self, context: &Context) -> Result<serde_json::Value, RenderError> {
        let value = ENV
            .compile_expression(&self.compiled)
            .and_then(|e| e.eval(context.value()))
            .map_err(|e| self.error(&e, context))?;
        serde_json::to_value(&value).map_err(|e| RenderError {
            message: e.to_string(),
        })
    }

    /// Evaluates the expression for its truth (`when`).
    pub fn is_true(&self, context: &Context) -> Result<bool, RenderError> {
        ENV.compile_expression(&self.compiled)
            .and_then(|e| e.eval(context.value()))
            .map(|v| v.is_true())
            .map_err(|e| self.error(&e, context))
    }

    fn error(&self, err: &minijinja::Error, context: &Context) -> RenderError {
        let used = || {
            ENV.compile_expression(&self.compiled)
                .map(|e| e.undeclared_variables(true).into_iter().collect())
                .unwrap_or_default()
        };
        RenderError::from_minijinja(err, used, context, &self.steps)
    }
}

/// `{{ x }}` → `x`, when the braces hold the whole text.
fn unwrap_braces(source: &str) -> &str {
    let trimmed = source.trim();
    if let Some(inner) = trimmed
        .strip_prefix("{{")
        .and_then(|s| s.strip_suffix("}}"))
        && !inner.contains("{{")
        && !inner.contains("}}")
    {
        return inner.trim();
    }
    trimmed
}

/// A JSON value as minijinja sees it.
fn to_value(json: &serde_json::Value) -> Value {
    use serde::Deserialize;
    Value::deserialize(json).unwrap_or(Value::UNDEFINED)
}

/// The values a template is rendered with.
#[derive(Debug, Clone, Default)]
pub struct Context {
    params: BTreeMap<String, Value>,
    steps: BTreeMap<String, Value>,
    op: BTreeMap<String, Value>,
    env: BTreeMap<String, Value>,
    item: Option<Value>,
    /// `steps.<id>` as it reads with its outputs that hold a secret hidden, for each step whose
    /// outputs hold one (see [`Context::hiding`]).
    hidden: BTreeMap<String, Value>,
}

impl Context {
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets `params.<name>`.
    pub fn param(&mut self, name: &str, value: &serde_json::Value) -> &mut Self {
        self.params.insert(name.to_owned(), to_value(value));
        self
    }

    /// Sets `steps.<id>.outputs` for the step at `index` of the plan.
    pub fn outputs(&mut self, index: usize, outputs: &serde_json::Value) -> &mut Self {
        let step = BTreeMap::from([("outputs", to_value(outputs))]);
        self.steps.insert(format!("s{index}"), Value::from(step));
        self
    }

    /// Sets `steps.<id>.outputs` for the step at `index` of the plan as [`Context::hiding`] reads
    /// it: `outputs` with the values that hold a secret hidden (those set by
    /// [`Context::outputs`] are in clear).
    pub fn hidden_outputs(&mut self, index: usize, outputs: &serde_json::Value) -> &mut Self {
        let step = BTreeMap::from([("outputs", to_value(outputs))]);
        self.hidden.insert(format!("s{index}"), Value::from(step));
        self
    }

    /// Whether some step's outputs hold a secret ([`Context::hidden_outputs`]).
    #[must_use]
    pub fn holds_secrets(&self) -> bool {
        !self.hidden.is_empty()
    }

    /// This context with the outputs that hold a secret hidden: a template that renders otherwise
    /// with it inserts a secret.
    #[must_use]
    pub fn hiding(&self) -> Self {
        let mut hiding = self.clone();
        for (id, step) in std::mem::take(&mut hiding.hidden) {
            hiding.steps.insert(id, step);
        }
        hiding
    }

    /// Sets `op.<field>`.
    pub fn op(&mut self, field: &str, value: &serde_json::Value) -> &mut Self {
        self.op.insert(field.to_owned(), to_value(value));
        self
    }

    /// Sets `env.<name>`.
    pub fn env(&mut self, name: &str, value: &str) -> &mut Self {
        self.env.insert(name.to_owned(), Value::from(value));
        self
    }

    /// Sets `item`.
    pub fn item(&mut self, item: &serde_json::Value) -> &mut Self {
        self.item = Some(to_value(item));
        self
    }

    fn value(&self) -> Value {
        let mut root = BTreeMap::from([
            ("params", Value::from(self.params.clone())),
            ("steps", Value::from(self.steps.clone())),
            ("op", Value::from(self.op.clone())),
            ("env", Value::from(self.env.clone())),
        ]);
        if let Some(item) = &self.item {
            root.insert("item", item.clone());
        }
        Value::from(root)
    }
}

/// Where in a shell script a `{{ }}` sits in a place where quoting cannot protect it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShellPlace {
    SingleQuotes,
    DoubleQuotes,
    Comment,
    HereDocument,
}

impl ShellPlace {
    #[must_use]
    pub const fn describe(self) -> &'static str {
        match self {
            Self::SingleQuotes => "inside single quotes",
            Self::DoubleQuotes => "inside double quotes",
            Self::Comment => "inside a shell comment",
            Self::HereDocument => "inside a here-document",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shell {
    /// Plain code; `parens` counts `(` opened inside a `$(`.
    Code {
        substitution: bool,
        parens: u32,
    },
    Backticks,
    Single,
    AnsiC,
    Double,
}

/// Finds each `{{ }}` of a shell script template that sits inside quotes, a comment or a
/// here-document, where the quoting cairn adds would be wrong or unsafe (`"{{ x }}"` renders as
/// `"'$(...)'"`, and the shell runs the `$(...)`). Insertions that opt out with `| raw` are the
/// author's responsibility and are not reported. Returns byte offsets of the `{{` in `script`.
#[must_use]
#[expect(
    clippy::too_many_lines,
    reason = "a shell scanner: one state machine over the script's bytes reads best whole"
)]
pub fn unsafe_insertions(script: &str) -> Vec<(usize, ShellPlace)> {
    let bytes = script.as_bytes();
    let mut found = Vec::new();
    let mut stack = vec![Shell::Code {
        substitution: false,
        parens: 0,
    }];
    let mut pending_heredocs: Vec<(String, bool)> = Vec::new();
    let mut i = 0;
    let at_word_start = |i: usize| {
        i == 0
            || matches!(
                bytes[i - 1],
                b' ' | b'\t' | b'\n' | b';' | b'&' | b'|' | b'('
            )
    };
    while i < bytes.len() {
        // Template tags are opaque to the shell scan.
        if bytes[i] == b'{' && matches!(bytes.get(i + 1), Some(b'{' | b'%' | b'#')) {
            let end = match bytes[i + 1] {
                b'{' => "}}",
                b'%' => "%}",
                _ => "#}",
            };
            let close = script[i + 2..]
                .find(end)
                .map_or(script.len(), |c| i + 2 + c + 2);
            if bytes[i + 1] == b'{' && !opts_out(&script[i..close]) {
                let place = match stack.last() {
                    Some(Shell::Single | Shell::AnsiC) => Some(ShellPlace::SingleQuotes),
                    Some(Shell::Double) => Some(ShellPlace::DoubleQuotes),
                    _ => None,
                };
                if let Some(place) = place {
                    found.push((i, place));
                }
            }
            i = close;
            continue;
        }
        let top = *stack.last().unwrap_or(&Shell::Code {
            substitution: false,
            parens: 0,
        });
        match top {
            Shell::Single => {
                if bytes[i] == b'\'' {
                    stack.pop();
                }
            }
            Shell::AnsiC => match bytes[i] {
                b'\\' => i += 1,
                b'\'' => {
                    stack.pop();
                }
                _ => {}
            },
            Shell::Double => match bytes[i] {
                b'\\' => i += 1,
                b'"' => {
                    stack.pop();
                }
                b'`' => stack.push(Shell::Backticks),
                b'$' if bytes.get(i + 1) == Some(&b'(') => {
                    stack.push(Shell::Code {
                        substitution: true,
                        parens: 0,
                    });
                    i += 1;
                }
                _ => {}
            },
            Shell::Code { .. } | Shell::Backticks => match bytes[i] {
                b'\\' => i += 1,
                b'\'' => stack.push(Shell::Single),
                b'"' => stack.push(Shell::Double),
                b'$' if bytes.get(i + 1) == Some(&b'\'') => {
                    stack.push(Shell::AnsiC);
                    i += 1;
                }
                b'$' if bytes.get(i + 1) == Some(&b'(') => {
                    stack.push(Shell::Code {
                        substitution: true,
                        parens: 0,
                    });
                    i += 1;
                }
                b'`' if top == Shell::Backticks => {
                    stack.pop();
                }
                b'`' => stack.push(Shell::Backticks),
                b'(' => {
                    if let Some(Shell::Code { parens, .. }) = stack.last_mut() {
                        *parens += 1;
                    }
                }
                b')' => match stack.last_mut() {
                    Some(Shell::Code {
                        substitution: true,
                        parens: 0,
                    }) => {
                        stack.pop();
                    }
                    Some(Shell::Code { parens, .. }) if *parens > 0 => *parens -= 1,
                    _ => {}
                },
                b'#' if at_word_start(i) => {
                    let end = script[i..].find('\n').map_or(script.len(), |n| i + n);
                    found.extend(
                        template_starts(&script[i..end])
                            .into_iter()
                            .map(|o| (i + o, ShellPlace::Comment)),
                    );
                    i = end;
                    continue;
                }
                b'<' if bytes.get(i + 1) == Some(&b'<') && bytes.get(i + 2) != Some(&b'<') => {
                    let (delimiter, after) = heredoc_delimiter(script, i + 2);
                    if let Some(delimiter) = delimiter {
                        pending_heredocs.push(delimiter);
                    }
                    i = after;
                    continue;
                }
                b'\n' if !pending_heredocs.is_empty() => {
                    i += 1;
                    for (delimiter, strip_tabs) in std::mem::take(&mut pending_heredocs) {
                        let body_start = i;
                        let mut line_start = i;
                        loop {
                            let line_end = script[line_start..]
                                .find('\n')
                                .map_or(script.len(), |n| line_start + n);
                            let line = &script[line_start..line_end];
                            let line = if strip_tabs {
                                line.trim_start_matches('\t')
                            } else {
                                line
                            };
                            if line == delimiter || line_end >= script.len() {
                                found.extend(
                                    template_starts(&script[body_start..line_start])
                                        .into_iter()
                                        .map(|o| (body_start + o, ShellPlace::HereDocument)),
                                );
                                i = (line_end + 1).min(script.len());
                                break;
                            }
                            line_start = line_end + 1;
                        }
                    }
                    continue;
                }
                _ => {}
            },
        }
        i += 1;
    }
    found
}

/// `{{ x | raw }}` and `{{ x | safe }}` insert a value as it is, on purpose.
fn opts_out(tag: &str) -> bool {
    tag.split('|')
        .skip(1)
        .any(|filter| matches!(filter.trim().trim_end_matches('}').trim(), "raw" | "safe"))
}

/// The offsets of the `{{` that do not opt out, in `text`.
fn template_starts(text: &str) -> Vec<usize> {
    let mut out = Vec::new();
    let mut from = 0;
    while let Some(found) = text[from..].find("{{") {
        let start = from + found;
        let close = text[start..]
            .find("}}")
            .map_or(text.len(), |c| start + c + 2);
        if !opts_out(&text[start..close]) {
            out.push(start);
        }
        from = close;
    }
    out
}

/// Reads the delimiter after `<<`: `EOF`, `-EOF`, `'EOF'`, `"EOF"`. Returns it (with whether tabs
/// are stripped) and where the scan goes on.
fn heredoc_delimiter(script: &str, mut i: usize) -> (Option<(String, bool)>, usize) {
    let bytes = script.as_bytes();
    let strip_tabs = bytes.get(i) == Some(&b'-');
    if strip_tabs {
        i += 1;
    }
    while matches!(bytes.get(i), Some(b' ' | b'\t')) {
        i += 1;
    }
    let quote = match bytes.get(i) {
        Some(q @ (b'\'' | b'"')) => {
            i += 1;
            Some(*q)
        }
        _ => None,
    };
    let start = i;
    while i < bytes.len() && (is_ident(bytes[i]) || bytes[i] == b'-' || bytes[i] == b'.') {
        i += 1;
    }
    let word = script[start..i].to_owned();
    if quote.is_some() && bytes.get(i) == quote.as_ref() {
        i += 1;
    }
    if word.is_empty() {
        (None, i)
    } else {
        (Some((word, strip_tabs)), i)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn index_of(id: &str) -> Option<usize> {
        ["pick-source", "a"].iter().position(|s| *s == id)
    }

    #[test]
    fn a_name_without_a_value_is_named_as_the_plan_writes_it() {
        let (template, _) = Template::compile(
            "tar -tzf {{ steps.pick-source.outputs.archive }} {{ params.dir }}",
            Quoting::Shell,
            &index_of,
        )
        .unwrap();
        let mut context = Context::new();
        context
            .param("dir", &serde_json::json!("/srv"))
            .outputs(0, &serde_json::json!({"other": "x"}));
        let err = template.render(&context).unwrap_err();
        assert_eq!(
            err.message,
            "`steps.pick-source.outputs.archive` is not set"
        );
        let (when, _) = Expr::compile("params.missing == 1", &index_of).unwrap();
        assert_eq!(
            when.is_true(&context).unwrap_err().message,
            "`params.missing` is not set"
        );
    }

    #[test]
    fn rewrites_dashed_step_ids_in_code_only() {
        let r = rewrite(
            "steps.pick-source {{ steps.pick-source.outputs.x }} {{ 'steps.a' }} {{ steps.a -}}",
            false,
            &index_of,
        );
        assert_eq!(
            r.text,
            "steps.pick-source {{ steps.s0.outputs.x }} {{ 'steps.a' }} {{ steps.s1 -}}"
        );
        let r = rewrite("steps.nope.outputs.y == 'x'", true, &index_of);
        assert_eq!(r.text, "steps.u0.outputs.y == 'x'");
        assert_eq!(r.unknown_steps, vec!["nope".to_owned()]);
    }

    #[test]
    fn lists_names_in_cairn_terms() {
        let (_, names) = Template::compile(
            "{{ params.x }} {{ steps.pick-source.outputs.src | upper }} {% for i in range(3) %}{{ i }}{% endfor %}{{ steps.zz }} {{ item.name }} {{ env.HOME }} {{ op.id }} {{ bogus }}",
            Quoting::Shell,
            &index_of,
        )
        .unwrap();
        assert_eq!(
            names,
            vec![
                Name::Env(Some("HOME".into())),
                Name::Item,
                Name::Op(Some("id".into())),
                Name::Param("x".into()),
                Name::Step {
                    index: 0,
                    rest: vec!["outputs".into(), "src".into()]
                },
                Name::Unknown("bogus".into()),
                Name::UnknownStep("zz".into()),
            ]
        );
    }

    #[test]
    fn shell_quotes_values_and_lists() {
        let (t, _) = Template::compile(
            "echo {{ params.a }} {{ params.l }} {{ params.a | raw }}",
            Quoting::Shell,
            &index_of,
        )
        .unwrap();
        let mut ctx = Context::new();
        ctx.param("a", &serde_json::json!("x; rm -rf /"))
            .param("l", &serde_json::json!(["a b", "c"]));
        assert_eq!(
            t.render(&ctx).unwrap(),
            "echo 'x; rm -rf /' 'a b' c x; rm -rf /"
        );
    }

    #[test]
    fn plain_values_render_as_json_not_python() {
        let (t, _) = Template::compile(
            "{{ params.b }} {{ params.l }} {{ params.m }} {{ params.n }}",
            Quoting::Plain,
            &index_of,
        )
        .unwrap();
        let mut ctx = Context::new();
        ctx.param("b", &serde_json::json!(true))
            .param("l", &serde_json::json!(["a", "b c"]))
            .param("m", &serde_json::json!({"k": 1}))
            .param("n", &serde_json::json!(null));
        assert_eq!(t.render(&ctx).unwrap(), r#"true ["a","b c"] {"k":1} null"#);
    }

    #[test]
    fn missing_names_are_errors() {
        let (t, _) = Template::compile("echo {{ params.a }}", Quoting::Plain, &index_of).unwrap();
        assert!(t.render(&Context::new()).is_err());
    }

    #[test]
    fn finds_insertions_that_quoting_cannot_protect() {
        let script = "echo {{ a }}\necho \"{{ b }}\" '{{ c }}' \"$(echo {{ d }})\"\n# {{ e }}\ncat <<EOF\nx={{ f }}\nEOF\necho {{ g }} \"{{ h | raw }}\"";
        let places: Vec<_> = unsafe_insertions(script)
            .into_iter()
            .map(|(o, p)| (&script[o..o + 6], p))
            .collect();
        assert_eq!(
            places,
            vec![
                ("{{ b }", ShellPlace::DoubleQuotes),
                ("{{ c }", ShellPlace::SingleQuotes),
                ("{{ e }", ShellPlace::Comment),
                ("{{ f }", ShellPlace::HereDocument),
            ]
        );
    }
}
