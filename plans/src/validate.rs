//! From text to a [`Plan`]: YAML into [`crate::raw`] structs, then every check, collecting all the
//! problems of the file rather than stopping at the first.

use std::collections::HashMap;
use std::time::Duration;

use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::dag::Dag;
use crate::diag::{Problem, Problems, Span};
use crate::model::{
    Action, Arg, Backoff, DEFAULT_HOOK_TIMEOUT, DEFAULT_LOG_LIMIT, DEFAULT_MAX_PARALLEL,
    DEFAULT_UNTIL_EVERY, EnvVar, ForEach, Hook, Hooks, OnFailure, Param, ParamType, Plan, Retry,
    Schedule, Shell, Step, Until,
};
use crate::raw::{self, Pairs, RawForEach, RawHook, RawPlan, RawStep, Scalar, Spanned, Text};
use crate::template::{Expr, Name, Quoting, Template, unsafe_insertions};
use crate::units::{parse_bytes as parse_size, parse_duration};

/// Parses and validates a plan from bytes, which must be UTF-8.
pub fn parse_bytes(file: &str, bytes: &[u8]) -> Result<Plan, Problems> {
    match std::str::from_utf8(bytes) {
        Ok(text) => parse(file, text),
        Err(err) => {
            let text = String::from_utf8_lossy(bytes).into_owned();
            // The lossy text has the same bytes up to the first bad one.
            let at = err.valid_up_to();
            Err(Problems {
                file: file.to_owned(),
                list: vec![
                    Problem::new(
                        "not-utf8",
                        Some(Span::new(at, 1)),
                        "the plan is not valid UTF-8",
                    )
                    .label("this byte")
                    .help("save the file as UTF-8"),
                ],
                source: text,
            })
        }
    }
}

/// Parses and validates a plan. `file` is the name problems are reported under.
pub fn parse(file: &str, text: &str) -> Result<Plan, Problems> {
    parse_unclamped(file, text).map_err(Problems::clamped)
}

fn parse_unclamped(file: &str, text: &str) -> Result<Plan, Problems> {
    let fail = |list: Vec<Problem>| Problems {
        file: file.to_owned(),
        source: text.to_owned(),
        list,
    };
    if text
        .lines()
        .all(|l| l.trim().is_empty() || l.trim_start().starts_with('#'))
    {
        return Err(fail(vec![
            Problem::new("empty", None, "the plan is empty")
                .help("a plan needs at least `name` and `steps`"),
        ]));
    }
    let options = serde_saphyr::options! {
        strict_booleans: true,
        budget: Some(crate::limits::budget()),
    };
    let raw: RawPlan = match serde_saphyr::from_str_with_options(text, options) {
        Ok(raw) => raw,
        Err(err) => return Err(fail(vec![yaml_problem(&err, text)])),
    };
    let mut checker = Checker {
        text,
        problems: Vec::new(),
        env_names: std::collections::BTreeSet::new(),
        uses: std::collections::BTreeSet::new(),
        uses_params: std::collections::BTreeSet::new(),
        compiled: crate::template::Compiled::default(),
    };
    let plan = checker.plan(raw);
    match plan {
        Some(plan) if checker.problems.is_empty() => return Ok(plan),
        None if checker.problems.is_empty() => {
            // Every path that rejects a plan reports why; this is the net under that rule.
            checker.report(Problem::new(
                "internal",
                None,
                "the plan was rejected without a reason; please report this",
            ));
        }
        _ => {}
    }
    let mut problems = fail(checker.problems);
    problems.sort();
    Err(problems)
}

/// Turns a YAML or shape error into a problem in cairn's voice.
fn yaml_problem(err: &serde_saphyr::Error, text: &str) -> Problem {
    use serde_saphyr::Error as E;
    if let Some(breach) = crate::limits::breached(err) {
        return Problem::new(
            "too-large",
            None,
            format!("the plan is too large: {}", crate::limits::breach(breach)),
        )
        .help("split it into sub-plans (`plan:` steps) or fan out over a list (`for_each`)");
    }
    let mut err = err;
    while let E::WithSnippet { error, .. } | E::AliasError { error, .. } = err {
        err = error;
    }
    let span = err.location().as_ref().and_then(|l| {
        Span::of(l).or_else(|| {
            crate::diag::offset_of(text, l.line() as usize, l.column() as usize)
                .map(|o| Span::new(o, 1))
        })
    });
    match err {
        E::SerdeUnknownField {
            field, expected, ..
        } => {
            let problem = Problem::new(
                "unknown-key",
                span,
                format!("unknown key `{field}` {}", key_context(expected)),
            );
            match suggest(field, expected.iter().copied()) {
                Some(s) => problem.label(format!("did you mean `{s}`?")),
                None => problem.help(format!("expected one of {}", list(expected.iter()))),
            }
        }
        E::SerdeMissingField { field, .. } => {
            let what = if *field == "id" {
                "this step"
            } else {
                "this mapping"
            };
            Problem::new(
                "missing-key",
                span.map(|s| mapping_start(text, s)),
                format!("missing key `{field}`"),
            )
            .label(format!("{what} needs `{field}`"))
        }
        E::Unexpected { expected, .. } => {
            let expected = expected
                .replace("sequence start", "a list")
                .replace("mapping start", "a mapping")
                .replace("string scalar", "a string");
            let problem = Problem::new(
                "wrong-type",
                span,
                format!("expected {} here", plain_expected(&expected)),
            );
            if span
                .and_then(|s| text.get(s.offset..))
                .is_some_and(|t| t.starts_with('{'))
            {
                problem.help("a value that starts with `{` is read as a YAML mapping; quote it: `run: \"{{ ... }}\"`")
            } else {
                problem
            }
        }
        E::InvalidScalar { ty, .. } => {
            let found = span.and_then(|s| text.get(s.offset..)).map(|t| {
                t.split(['\n', ',', '}', ']', '#'])
                    .next()
                    .unwrap_or_default()
                    .trim()
                    .to_owned()
            });
            let expected = match *ty {
                "bool" => "`true` or `false`",
                "f32" | "f64" => "a number",
                t if t.starts_with('u') => "a whole number, 0 or more",
                t if t.starts_with('i') => "a whole number",
                _ => "a value of another type",
            };
            Problem::new(
                "wrong-type",
                span,
                match found {
                    Some(found) if !found.is_empty() => {
                        format!("found `{found}`, expected {expected}")
                    }
                    _ => format!("expected {expected}"),
                },
            )
        }
        E::SerdeInvalidType {
            unexpected,
            expected,
            ..
        } => Problem::new(
            "wrong-type",
            span,
            format!("found {unexpected}, expected {}", plain_expected(expected)),
        ),
        E::SerdeInvalidValue {
            unexpected,
            expected,
            ..
        } => Problem::new(
            "wrong-value",
            span,
            format!("found {unexpected}, expected {}", plain_expected(expected)),
        ),
        E::DuplicateMappingKey { key, .. } => Problem::new(
            "duplicate-key",
            span,
            match key {
                Some(key) => format!("duplicate key `{key}`"),
                None => "duplicate key".to_owned(),
            },
        ),
        E::InvalidBooleanStrict { .. } => Problem::new(
            "wrong-type",
            span,
            "found a word that YAML 1.1 read as a boolean, expected `true` or `false`",
        ),
        other => {
            let message = other.without_snippet().to_string();
            let message = strip_position(message.lines().next().unwrap_or_default())
                .trim_end_matches('.')
                .to_owned();
            if message.contains("untagged enum RawForEach") {
                return Problem::new(
                    "wrong-type",
                    span,
                    "`for_each` must be an expression that gives a list, or a list",
                );
            }
            let mut problem = Problem::new("yaml", span, lowercase_first(&message));
            if message.contains("mapping values are not allowed") {
                problem = problem.help("a plain value cannot contain `: `; quote it (`run: \"echo a: b\"`) or use a block (`run: |` and the script on the next lines)");
            }
            match span.and_then(|s| unclosed_bracket(text, s.offset)) {
                Some((bracket, line)) => {
                    problem.help(format!("is the `{bracket}` on line {line} closed?"))
                }
                None => problem,
            }
        }
    }
}

/// For a key reported missing (serde points at the last key it read): the first key of the
/// block mapping that lacks it, e.g. the line `- run: ...` of a step with no `id`.
fn mapping_start(text: &str, at: Span) -> Span {
    let line_start = text[..at.offset.min(text.len())]
        .rfind('\n')
        .map_or(0, |i| i + 1);
    let indent = at.offset - line_start;
    let mut start = line_start;
    loop {
        let line = &text[start..text[start..].find('\n').map_or(text.len(), |n| start + n)];
        let trimmed = line.trim_start();
        let col = line.len() - trimmed.len();
        if let Some(rest) = trimmed.strip_prefix("- ")
            && col + 2 == indent
        {
            let key = col + 2 + (rest.len() - rest.trim_start().len());
            return Span::new(
                start + key,
                rest.trim_start().split(':').next().unwrap_or("").len(),
            );
        }
        if start == 0 || (col < indent && !trimmed.is_empty() && !trimmed.starts_with('#')) {
            return at;
        }
        start = text[..start - 1].rfind('\n').map_or(0, |i| i + 1);
    }
}

/// The last `[` or `{` before `offset`, on an earlier line, that no bracket closes: what a YAML
/// error far below an unclosed flow collection is really about.
fn unclosed_bracket(text: &str, offset: usize) -> Option<(char, usize)> {
    let before = text.get(..offset)?;
    let mut open: Vec<(char, usize)> = Vec::new();
    let (mut quote, mut comment) = (None, false);
    for (i, c) in before.char_indices() {
        match (quote, c) {
            (_, '\n') => comment = false,
            (Some(q), c) if !comment && c == q => quote = None,
            _ if comment || quote.is_some() => {}
            (None, '\'' | '"') => quote = Some(c),
            (None, '#') => comment = true,
            (None, '[' | '{') => open.push((c, i)),
            (None, ']' | '}') => {
                open.pop();
            }
            _ => {}
        }
    }
    let (bracket, at) = *open.last()?;
    let line = crate::diag::line_col(text, at).line;
    (line < crate::diag::line_col(text, offset).line).then_some((bracket, line))
}

/// `line 4 column 16: mapping values ...` → `mapping values ...`: the position is shown anyway.
fn strip_position(message: &str) -> &str {
    let message = message.strip_prefix("error: ").unwrap_or(message);
    if message.starts_with("line ")
        && let Some((_, rest)) = message.split_once(": ")
    {
        return rest;
    }
    message.split(" at line ").next().unwrap_or(message)
}

fn lowercase_first(s: &str) -> String {
    let mut chars = s.chars();
    chars
        .next()
        .map_or_else(String::new, |c| c.to_lowercase().chain(chars).collect())
}

/// serde says `a sequence` and `struct RawStep`; cairn's users write lists and steps.
fn plain_expected(expected: &str) -> String {
    expected
        .replace("a sequence", "a list")
        .replace("sequence", "list")
        .replace(
            "struct RawPlan",
            "a plan (a mapping with `name` and `steps`)",
        )
        .replace(
            "struct RawStep",
            "a step (a mapping with `id` and an action)",
        )
        .replace(
            "struct RawParam",
            "a param (a mapping with `type`, `default`, ...)",
        )
        .replace(
            "struct RawRetry",
            "a retry mapping (`attempts`, `backoff`, `delay`)",
        )
        .replace("struct RawHooks", "a mapping of hook phases")
        .replace("struct RawHook", "a hook (a mapping with `run` or `exec`)")
        .replace("struct RawSchedule", "a schedule (a mapping with `cron`)")
        .replace("a string, number or boolean", "a scalar")
}

/// Where an unknown key was found, told from the keys that were expected there.
fn key_context(expected: &[&str]) -> &'static str {
    let has = |k| expected.contains(&k);
    if has("steps") {
        "in the plan"
    } else if has("needs") {
        "in a step"
    } else if has("secret") {
        "in a param"
    } else if has("attempts") {
        "in `retry`"
    } else if has("on_success") {
        "in `hooks`"
    } else if has("cron") {
        "in `schedule`"
    } else if has("run") {
        "in a hook"
    } else {
        "here"
    }
}

fn list<'a>(items: impl Iterator<Item = &'a &'a str>) -> String {
    items
        .map(|k| format!("`{k}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The candidate closest to `word`, if it is close enough to be a likely typo.
pub fn suggest<'a>(word: &str, candidates: impl Iterator<Item = &'a str>) -> Option<&'a str> {
    let limit = (word.chars().count() / 3).max(1);
    let candidates: Vec<&str> = candidates.collect();
    // `integer` for `int`, `str` for `string`: a prefix is a likely meaning, whatever the distance.
    if let Some(prefix) = candidates
        .iter()
        .find(|c| c.len() >= 3 && word.len() >= 3 && (word.starts_with(**c) || c.starts_with(word)))
    {
        return Some(prefix);
    }
    candidates
        .into_iter()
        .map(|c| (strsim::damerau_levenshtein(word, c), c))
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

fn is_identifier(s: &str) -> bool {
    let mut bytes = s.bytes();
    bytes
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// A result column's name as `sql.outputs` may name it: `gtid`, `@@gtid_current_pos`, `count`.
fn is_column_name(s: &str) -> bool {
    !s.is_empty()
        && !s.starts_with(|c: char| c.is_ascii_digit())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'$' | b'@'))
}

/// Whether a SQL query holds what reads as a template tag (`{{ params.x }}`, `{% if %}`), not an
/// array literal such as `'{{1,2},{3,4}}'`.
fn looks_templated(query: &str) -> bool {
    query.contains("{%")
        || query.split("{{").skip(1).any(|tag| {
            let inner = tag.trim_start();
            ["params", "steps", "item", "op.", "env."]
                .iter()
                .any(|root| inner.starts_with(root))
        })
}

/// The output keys a `sql` step publishes, as written.
fn sql_output_keys(sql: &raw::RawSql) -> Vec<String> {
    sql.outputs
        .iter()
        .flat_map(|o| &o.value.0)
        .map(|(k, _)| k.value.clone())
        .chain(sql.row_count.as_ref().map(|r| r.value.clone()))
        .collect()
}

fn is_step_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        && !s.starts_with('-')
}

fn span<T>(s: &Spanned<T>) -> Option<Span> {
    s.span()
}

/// What a template may name, where it stands.
#[derive(Clone, Copy)]
struct Scope<'a> {
    /// What the template is, for messages: "`run` of step `a`".
    what: Where<'a>,
    steps: StepsAccess,
    /// `item` is defined (inside a `for_each` step).
    item: bool,
    /// `op.status`, `op.error` and `op.failed_task` are defined (hooks after the op ended).
    outcome: bool,
    /// Whether a secret param may be inserted: only where the value stays out of argv and text
    /// that cairn stores or shows (environment values, `when` tests).
    secrets: bool,
}

#[derive(Clone, Copy)]
enum StepsAccess {
    None,
    /// Only steps upstream of this one.
    Upstream(usize),
    Any,
}

#[derive(Clone, Copy)]
enum Where<'a> {
    Plan(&'static str),
    Step(&'static str, &'a str),
    Hook(&'static str, usize),
}

const OP_FIELDS: &[&str] = &["id", "uuid", "name", "plan"];
const OUTCOME_FIELDS: &[&str] = &["status", "error", "failed_task"];

struct Checker<'t> {
    text: &'t str,
    problems: Vec<Problem>,
    /// Every `env.<name>` a template uses.
    env_names: std::collections::BTreeSet<String>,
    /// The steps whose outputs the step being checked uses.
    uses: std::collections::BTreeSet<usize>,
    /// The params the step being checked uses.
    uses_params: std::collections::BTreeSet<String>,
    compiled: crate::template::Compiled,
}

/// What the checks of templates need to know of the plan.
struct Known<'p> {
    params: &'p [Param],
    ids: Vec<String>,
    index: HashMap<String, usize>,
    dag: Option<&'p Dag>,
    outputs: Vec<Option<Vec<String>>>,
}

impl Known<'_> {
    fn lookup(&self) -> impl Fn(&str) -> Option<usize> + '_ {
        |id| self.index.get(id).copied()
    }
}

impl Checker<'_> {
    fn report(&mut self, problem: Problem) {
        self.problems.push(problem);
    }

    fn duration(&mut self, value: Option<&Spanned<Scalar>>, key: &str) -> Option<Duration> {
        let value = value?;
        match parse_duration(&value.value.0) {
            Ok(d) if d.is_zero() => {
                self.report(Problem::new(
                    "bad-duration",
                    span(value),
                    format!("`{key}` must be longer than zero"),
                ));
                None
            }
            Ok(d) => Some(d),
            Err(e) => {
                self.report(Problem::new(
                    "bad-duration",
                    span(value),
                    format!("bad `{key}`: {e}"),
                ));
                None
            }
        }
    }

    fn bytes(&mut self, value: Option<&Spanned<Scalar>>, key: &str) -> Option<u64> {
        let value = value?;
        match parse_size(&value.value.0) {
            Ok(0) => {
                self.report(Problem::new(
                    "bad-size",
                    span(value),
                    format!("`{key}` must be more than zero"),
                ));
                None
            }
            Ok(n) => Some(n),
            Err(e) => {
                self.report(Problem::new(
                    "bad-size",
                    span(value),
                    format!("bad `{key}`: {e}"),
                ));
                None
            }
        }
    }

    fn positive(&mut self, value: Option<&Spanned<u32>>, key: &str) -> Option<u32> {
        let value = value?;
        if value.value == 0 {
            self.report(Problem::new(
                "bad-number",
                span(value),
                format!("`{key}` must be at least 1"),
            ));
            return None;
        }
        Some(value.value)
    }

    #[expect(
        clippy::too_many_lines,
        reason = "one pass over the plan's top-level keys, in file order; split, each part would take the whole checker"
    )]
    fn plan(&mut self, raw: RawPlan) -> Option<Plan> {
        let name_ok = !raw.name.value.is_empty()
            && raw.name.value.len() <= 128
            && raw
                .name
                .value
                .starts_with(|c: char| c.is_ascii_alphanumeric())
            && raw
                .name
                .value
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
        if !name_ok {
            self.report(
                Problem::new(
                    "bad-name",
                    span(&raw.name),
                    format!("`{}` is not a valid plan name", raw.name.value),
                )
                .help("use letters, digits, `-`, `_` and `.`, starting with a letter or digit"),
            );
        }
        let params = self.params(raw.params.as_ref());
        let (ids, index) = self.step_ids(&raw.steps.value);
        if raw.steps.value.is_empty() {
            self.report(Problem::new(
                "no-steps",
                span(&raw.steps),
                "the plan has no steps",
            ));
        }
        let needs = self.needs(&raw.steps.value, &index);
        let dag = match Dag::new(needs) {
            Ok(dag) => Some(dag),
            Err(cycles) => {
                for cycle in cycles {
                    let first = cycle.0[0];
                    let names: Vec<&str> = cycle.0.iter().map(|&i| ids[i].as_str()).collect();
                    let problem = if cycle.0.len() == 2 {
                        Problem::new(
                            "self-dependency",
                            Self::needs_span(&raw.steps.value[first], &ids[first]),
                            format!("step `{}` needs itself", ids[first]),
                        )
                    } else {
                        Problem::new(
                            "cycle",
                            span(&raw.steps.value[first].value.id),
                            format!("dependency cycle: `{}`", names.join(" -> ")),
                        )
                        .label("this step is part of the cycle")
                        .help("each step in the cycle needs the next; remove one of these `needs`")
                    };
                    self.report(problem);
                }
                None
            }
        };
        let known = Known {
            params: &params,
            ids: ids.clone(),
            index,
            dag: dag.as_ref(),
            outputs: raw
                .steps
                .value
                .iter()
                .map(|s| {
                    s.value
                        .outputs
                        .as_ref()
                        .map(|o| o.iter().map(|k| k.value.clone()).collect())
                        .or_else(|| s.value.sql.as_deref().map(|q| sql_output_keys(&q.value)))
                })
                .collect(),
        };
        let plan_shell = raw.shell.as_ref().map(|s| self.shell(s));
        let log_limit = self
            .bytes(raw.log_limit.as_ref(), "log_limit")
            .unwrap_or(DEFAULT_LOG_LIMIT);
        let header_scope = Scope {
            what: Where::Plan("title"),
            steps: StepsAccess::None,
            item: false,
            outcome: false,
            secrets: false,
        };
        let title = raw.title.as_ref().and_then(|t| {
            self.template(
                t,
                Quoting::Plain,
                &known,
                Scope {
                    what: Where::Plan("title"),
                    ..header_scope
                },
            )
        });
        let (lock_key, lock_on_failure, keep_from) = self.lock(raw.lock.as_ref());
        let lock_keep_from = keep_from.and_then(|k| self.keep_from(&k, &raw.steps.value));
        let lock = lock_key.as_ref().and_then(|t| {
            self.template(
                t,
                Quoting::Plain,
                &known,
                Scope {
                    what: Where::Plan("lock"),
                    ..header_scope
                },
            )
        });
        let env = self.env(
            raw.env.as_ref(),
            &known,
            Scope {
                what: Where::Plan("env"),
                secrets: true,
                ..header_scope
            },
        );
        let cooldown = self.duration(raw.cooldown.as_ref(), "cooldown");
        if cooldown.is_some() && lock.is_none() {
            self.report(
                Problem::new(
                    "cooldown-without-lock",
                    raw.cooldown.as_ref().and_then(span),
                    "`cooldown` needs a `lock`: the cooldown is kept per lock key",
                )
                .help("add `lock:` with a key such as `cluster/{{ params.cluster }}`"),
            );
        }
        let timeout = self.duration(raw.timeout.as_ref(), "timeout");
        let max_parallel = self
            .positive(raw.max_parallel.as_ref(), "max_parallel")
            .unwrap_or(DEFAULT_MAX_PARALLEL);
        let schedule = raw.schedule.as_ref().and_then(|s| self.schedule(s));

        let mut steps = Vec::with_capacity(raw.steps.value.len());
        for (index, step) in raw.steps.value.iter().enumerate() {
            let step_shell = step.value.shell.as_ref().map(|s| self.shell(s));
            let shell = step_shell
                .or_else(|| plan_shell.clone())
                .unwrap_or(Shell::Bash);
            steps.push(self.step(index, &step.value, &known, &shell, log_limit));
        }
        let hooks = raw.hooks.as_ref().map_or_else(
            || Some(Hooks::default()),
            |h| self.hooks(h, &known, plan_shell.as_ref()),
        );

        let dag = dag?;
        let steps: Option<Vec<Step>> = steps.into_iter().collect();
        Some(Plan {
            name: raw.name.value,
            description: raw.description,
            params,
            title,
            lock,
            lock_on_failure,
            lock_keep_from,
            cooldown,
            max_parallel,
            timeout,
            auto_resume: raw.auto_resume.unwrap_or(true),
            env,
            log_limit,
            schedule,
            steps: steps?,
            hooks: hooks?,
            dag,
            env_names: std::mem::take(&mut self.env_names).into_iter().collect(),
            text: self.text.to_owned(),
            hash: format!("sha256:{:x}", Sha256::digest(self.text.as_bytes())),
        })
    }

    fn shell(&mut self, shell: &raw::Text) -> Shell {
        if shell.value.trim().is_empty() || shell.value.contains(char::is_whitespace) {
            self.report(
                Problem::new("bad-shell", span(shell), format!("`{}` is not a shell", shell.value))
                    .help("name one program, such as `bash`, `sh` or `/usr/bin/zsh`; cairn runs it as `PROGRAM -c SCRIPT`"),
            );
        }
        Shell::from_name(&shell.value)
    }

    fn params(&mut self, raw: Option<&Pairs<Spanned<raw::RawParam>>>) -> Vec<Param> {
        let Some(raw) = raw else { return Vec::new() };
        let mut out = Vec::with_capacity(raw.0.len());
        for (name, spec) in &raw.0 {
            if !is_identifier(&name.value) {
                self.report(
                    Problem::new(
                        "bad-param-name",
                        span(name),
                        format!("`{}` is not a valid param name", name.value),
                    )
                    .help("use letters, digits and `_`, not starting with a digit: params are template names and environment variables"),
                );
            }
            let spec = &spec.value;
            let ty = match &spec.ty {
                None => ParamType::String,
                Some(ty) => {
                    if let Some((_, t)) = ParamType::ALL.iter().find(|(n, _)| *n == ty.value) {
                        *t
                    } else {
                        let names: Vec<&str> = ParamType::ALL.iter().map(|(n, _)| *n).collect();
                        let problem = Problem::new(
                            "bad-param-type",
                            span(ty),
                            format!("unknown param type `{}`", ty.value),
                        );
                        self.report(match suggest(&ty.value, names.iter().copied()) {
                            Some(s) => problem.label(format!("did you mean `{s}`?")),
                            None => problem.help(format!("expected one of {}", list(names.iter()))),
                        });
                        ParamType::String
                    }
                }
            };
            let type_ok = spec
                .ty
                .as_ref()
                .is_none_or(|t| ParamType::ALL.iter().any(|(n, _)| *n == t.value));
            let choices = spec.choices.as_ref().map(|choices| {
                if choices.value.is_empty() {
                    self.report(Problem::new(
                        "empty-enum",
                        span(choices),
                        "`enum` lists no values",
                    ));
                }
                for choice in &choices.value {
                    if type_ok && !ty.admits(&choice.value) {
                        self.report(Problem::new(
                            "bad-enum",
                            span(choice),
                            format!(
                                "`enum` value {} is not of the param's type `{}`",
                                show(&choice.value),
                                ty.name()
                            ),
                        ));
                    }
                }
                choices
                    .value
                    .iter()
                    .map(|c| c.value.clone())
                    .collect::<Vec<_>>()
            });
            if let Some(default) = &spec.default {
                if type_ok && !ty.admits(&default.value) {
                    self.report(Problem::new(
                        "bad-default",
                        span(default),
                        format!(
                            "default {} of param `{}` is not of its type `{}`",
                            shown_default(&default.value, spec.secret),
                            name.value,
                            ty.name()
                        ),
                    ));
                } else if let Some(choices) = &choices
                    && !choices.contains(&default.value)
                {
                    self.report(
                        Problem::new(
                            "default-not-in-enum",
                            span(default),
                            format!(
                                "default {} of param `{}` is not one of its `enum` values",
                                shown_default(&default.value, spec.secret),
                                name.value
                            ),
                        )
                        .help(format!(
                            "allowed: {}",
                            choices.iter().map(show).collect::<Vec<_>>().join(", ")
                        )),
                    );
                }
                if spec.required == Some(true) {
                    self.report(
                        Problem::new(
                            "required-with-default",
                            span(default),
                            format!("param `{}` is required and has a default", name.value),
                        )
                        .help("a param with a default is never missing: drop `required` or the default"),
                    );
                }
            }
            out.push(Param {
                name: name.value.clone(),
                ty,
                required: spec.required.unwrap_or(false),
                default: spec.default.as_ref().map(|d| d.value.clone()),
                choices,
                description: spec.description.clone(),
                secret: spec.secret.unwrap_or(false),
            });
        }
        out
    }

    fn step_ids(&mut self, steps: &[Spanned<RawStep>]) -> (Vec<String>, HashMap<String, usize>) {
        let mut index: HashMap<String, usize> = HashMap::with_capacity(steps.len());
        let mut ids = Vec::with_capacity(steps.len());
        for (i, step) in steps.iter().enumerate() {
            let id = &step.value.id;
            if !is_step_id(&id.value) {
                self.report(
                    Problem::new(
                        "bad-step-id",
                        span(id),
                        format!("`{}` is not a valid step id", id.value),
                    )
                    .help("use letters, digits, `-` and `_`, not starting with `-`"),
                );
            }
            if let Some(&first) = index.get(&id.value) {
                let first_line = span(&steps[first].value.id)
                    .map(|s| crate::diag::line_col(self.text, s.offset).line);
                let mut problem = Problem::new(
                    "duplicate-id",
                    span(id),
                    format!("duplicate step id `{}`", id.value),
                );
                if let Some(line) = first_line {
                    problem = problem.label(format!("first used on line {line}"));
                }
                self.report(problem);
            } else {
                index.insert(id.value.clone(), i);
            }
            ids.push(id.value.clone());
        }
        (ids, index)
    }

    fn needs(
        &mut self,
        steps: &[Spanned<RawStep>],
        index: &HashMap<String, usize>,
    ) -> Vec<Vec<usize>> {
        steps
            .iter()
            .map(|step| {
                let mut out: Vec<usize> = Vec::new();
                for need in step.value.needs.iter().flat_map(|n| &n.value) {
                    match index.get(&need.value) {
                        Some(&i) if out.contains(&i) => self.report(Problem::new(
                            "duplicate-need",
                            span(need),
                            format!("`{}` is listed twice in `needs`", need.value),
                        )),
                        Some(&i) => out.push(i),
                        None => {
                            let problem = Problem::new(
                                "unknown-need",
                                span(need),
                                format!(
                                    "step `{}` needs `{}`, which is not a step of this plan",
                                    step.value.id.value, need.value
                                ),
                            );
                            self.report(
                                match suggest(&need.value, index.keys().map(String::as_str)) {
                                    Some(s) => problem.label(format!("did you mean `{s}`?")),
                                    None => problem.label("no step has this id"),
                                },
                            );
                        }
                    }
                }
                out
            })
            .collect()
    }

    /// Where a step lists itself in `needs`.
    fn needs_span(step: &Spanned<RawStep>, id: &str) -> Option<Span> {
        step.value
            .needs
            .iter()
            .flat_map(|n| &n.value)
            .find(|n| n.value == id)
            .and_then(span)
            .or_else(|| span(&step.value.id))
    }

    /// The lock key's template as written, what a failing op does with the lock, and the step
    /// named by `keep_from` (checked against the steps by [`Self::keep_from`]).
    fn lock(
        &mut self,
        lock: Option<&Spanned<raw::RawLock>>,
    ) -> (Option<Text>, OnFailure, Option<Text>) {
        let Some(lock) = lock else {
            return (None, OnFailure::Keep, None);
        };
        match &lock.value {
            raw::RawLock::Key(key) => (Some(Spanned::at(key.clone(), lock)), OnFailure::Keep, None),
            raw::RawLock::Policy {
                key,
                on_failure,
                keep_from,
            } => {
                let policy = match on_failure.as_ref().map(|p| (p, p.value.as_str())) {
                    None | Some((_, "keep")) => OnFailure::Keep,
                    Some((_, "release")) => OnFailure::Release,
                    Some((p, other)) => {
                        self.report(
                            Problem::new(
                                "bad-lock-policy",
                                span(p),
                                format!("unknown `on_failure` `{other}`"),
                            )
                            .help("use `keep` (a failed op holds its lock until it is resumed or canceled) or `release`"),
                        );
                        OnFailure::Keep
                    }
                };
                if let Some(k) = keep_from
                    && policy != OnFailure::Release
                {
                    self.report(
                        Problem::new(
                            "keep-from-without-release",
                            span(k),
                            "`keep_from` says from which step a failed op keeps a lock it would otherwise free; this lock is never freed on failure",
                        )
                        .help("add `on_failure: release`, or drop `keep_from`"),
                    );
                }
                (Some(key.clone()), policy, keep_from.clone())
            }
        }
    }

    /// The index of the step `lock.keep_from` names.
    fn keep_from(&mut self, keep_from: &Text, steps: &[Spanned<RawStep>]) -> Option<usize> {
        let found = steps
            .iter()
            .position(|s| s.value.id.value == keep_from.value);
        if found.is_none() {
            let problem = Problem::new(
                "unknown-keep-from",
                span(keep_from),
                format!(
                    "`keep_from` names `{}`, which is not a step of this plan",
                    keep_from.value
                ),
            );
            self.report(
                match suggest(
                    &keep_from.value,
                    steps.iter().map(|s| s.value.id.value.as_str()),
                ) {
                    Some(s) => problem.label(format!("did you mean `{s}`?")),
                    None => problem.label("no step has this id"),
                },
            );
        }
        found
    }

    fn schedule(&mut self, schedule: &Spanned<raw::RawSchedule>) -> Option<Schedule> {
        let s = &schedule.value;
        let cron_ok = match crate::cron::parse(&s.cron.value) {
            Ok(_) => true,
            Err(e) => {
                self.report(
                    Problem::new("bad-cron", span(&s.cron), format!("bad cron expression `{}`: {e}", s.cron.value))
                        .help("use 5 fields, `minute hour day-of-month month day-of-week`, e.g. `30 2 * * *`, or `@daily`"),
                );
                false
            }
        };
        let timezone = s
            .timezone
            .as_ref()
            .map_or_else(|| "UTC".to_owned(), |t| t.value.clone());
        if let Some(tz) = &s.timezone
            && jiff::tz::TimeZone::get(&tz.value).is_err()
        {
            self.report(
                Problem::new(
                    "bad-timezone",
                    span(tz),
                    format!("unknown time zone `{}`", tz.value),
                )
                .help("use an IANA name such as `UTC` or `Europe/Paris`"),
            );
            return None;
        }
        cron_ok.then(|| Schedule {
            cron: s.cron.value.clone(),
            timezone,
        })
    }

    fn env(
        &mut self,
        env: Option<&Pairs<Spanned<Scalar>>>,
        known: &Known,
        scope: Scope,
    ) -> Vec<EnvVar> {
        let Some(env) = env else { return Vec::new() };
        let mut out = Vec::with_capacity(env.0.len());
        for (name, value) in &env.0 {
            let valid = !name.value.is_empty()
                && !name.value.starts_with(|c: char| c.is_ascii_digit())
                && name
                    .value
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_');
            if !valid {
                self.report(Problem::new(
                    "bad-env-name",
                    span(name),
                    format!("`{}` is not a valid environment variable name", name.value),
                ));
            }
            if name.value.starts_with("CAIRN_") {
                self.report(Problem::new(
                    "reserved-env-name",
                    span(name),
                    format!(
                        "`{}` is reserved: cairn sets the `CAIRN_` variables itself",
                        name.value
                    ),
                ));
            }
            let text = Spanned::at(value.value.0.clone(), value);
            if let Some(template) = self.template(&text, Quoting::Plain, known, scope) {
                out.push(EnvVar {
                    name: name.value.clone(),
                    value: template,
                });
            }
        }
        out
    }

    /// Compiles a template and checks every name it uses.
    fn template(
        &mut self,
        text: &raw::Text,
        quoting: Quoting,
        known: &Known,
        scope: Scope,
    ) -> Option<Template> {
        match Template::compile_with(&text.value, quoting, &known.lookup(), &mut self.compiled) {
            Ok((template, names)) => {
                let before = self.problems.len();
                self.names(&names, text, known, scope);
                if quoting == Quoting::Shell {
                    self.shell_places(text, scope);
                }
                (self.problems.len() == before).then_some(template)
            }
            Err(e) => {
                self.report(self.syntax_problem(text, &e, scope));
                None
            }
        }
    }

    fn expr(&mut self, text: &raw::Text, known: &Known, scope: Scope) -> Option<Expr> {
        match Expr::compile_with(&text.value, &known.lookup(), &mut self.compiled) {
            Ok((expr, names)) => {
                let before = self.problems.len();
                self.names(&names, text, known, scope);
                (self.problems.len() == before).then_some(expr)
            }
            Err(e) => {
                self.report(self.syntax_problem(text, &e, scope));
                None
            }
        }
    }

    fn syntax_problem(
        &self,
        text: &raw::Text,
        e: &crate::template::SyntaxError,
        scope: Scope,
    ) -> Problem {
        let mut at = span(text);
        if let (Some(s), Some(line)) = (at, e.line)
            && line > 1
        {
            // Point at the line of the template that failed, when the text keeps its lines.
            let wanted = text.value.lines().nth(line - 1).unwrap_or_default().trim();
            if !wanted.is_empty()
                && let Some(found) = self.text.get(s.offset..).and_then(|t| t.find(wanted))
            {
                at = Some(Span::new(s.offset + found, wanted.len()));
            }
        }
        let problem = Problem::new(
            "bad-template",
            at,
            format!("{} does not parse: {}", scope.what.describe(), e.message),
        );
        // `{#` opens a template comment, so bash's `${#VAR}` (a length) leaves one open until the
        // end: point at it rather than at the last line, and say how to write it.
        if e.message.contains("end of comment") && text.value.contains("{#") {
            let mut problem = problem.help(
                "`{#` starts a template comment: write bash's `${#VAR}` as `{% raw %}${#VAR}{% endraw %}`",
            );
            problem.span = self.span_in(text, "{#").or(problem.span);
            return problem;
        }
        problem
    }

    /// The span of `needle` inside the value `text`, or of the value itself.
    fn span_in(&self, text: &raw::Text, needle: &str) -> Option<Span> {
        let whole = span(text)?;
        let end = whole.end().min(self.text.len());
        let start = whole.offset.min(end);
        let found = self
            .text
            .get(start..end)
            .and_then(|t| t.find(needle))
            .or_else(|| {
                // Block scalars: the span may cover only their first line; look a little further.
                let limit = (start + text.value.len() * 2 + 64).min(self.text.len());
                self.text.get(start..limit).and_then(|t| t.find(needle))
            });
        Some(found.map_or(whole, |f| Span::new(start + f, needle.len())))
    }

    #[expect(
        clippy::too_many_lines,
        reason = "one match arm per kind of template name, each a short rule"
    )]
    fn names(&mut self, names: &[Name], text: &raw::Text, known: &Known, scope: Scope) {
        let what = scope.what;
        for name in names {
            match name {
                Name::Env(Some(var)) => {
                    self.env_names.insert(var.clone());
                }
                Name::Step { index, .. } => {
                    self.uses.insert(*index);
                }
                Name::Param(param) => {
                    self.uses_params.insert(param.clone());
                }
                _ => {}
            }
            match name {
                Name::Param(param) => match known.params.iter().find(|p| &p.name == param) {
                    None => {
                        let problem = Problem::new(
                            "unknown-param",
                            self.span_in(text, &format!("params.{param}")),
                            format!(
                                "{what} uses `params.{param}`, which is not a param of this plan"
                            ),
                        );
                        self.report(
                            match suggest(param, known.params.iter().map(|p| p.name.as_str())) {
                                Some(s) => problem.label(format!("did you mean `params.{s}`?")),
                                None => problem.help("declare it under `params:`"),
                            },
                        );
                    }
                    Some(p) if p.secret && !scope.secrets => {
                        let help = if matches!(scope.what, Where::Plan(_)) {
                            "the title and the lock key are shown by `cairn status` and stored in clear; build them from params that are not secret".to_owned()
                        } else {
                            let var = param.to_uppercase();
                            format!(
                                "a command line is visible to every user in the process list; pass the secret in `env:` instead (`env: {{ {var}: \"{{{{ params.{param} }}}}\" }}`) and read `${var}`"
                            )
                        };
                        self.report(
                            Problem::new(
                                "secret-in-template",
                                self.span_in(text, &format!("params.{param}")),
                                format!("{what} inserts the secret param `{param}`"),
                            )
                            .help(help),
                        );
                    }
                    Some(_) => {}
                },
                Name::Step { index, rest } => self.step_name(*index, rest, text, known, scope),
                Name::UnknownStep(id) => {
                    let problem = Problem::new(
                        "unknown-step",
                        self.span_in(text, &format!("steps.{id}")),
                        format!("{what} uses `steps.{id}`, which is not a step of this plan"),
                    );
                    self.report(match suggest(id, known.ids.iter().map(String::as_str)) {
                        Some(s) => problem.label(format!("did you mean `{s}`?")),
                        None => problem,
                    });
                }
                Name::Op(Some(field))
                    if (field == "name" || field == "id")
                        && matches!(scope.what, Where::Plan("title")) =>
                {
                    let (code, message) = if field == "name" {
                        (
                            "title-uses-itself",
                            "the plan's `title` uses `op.name`, which is the title itself",
                        )
                    } else {
                        (
                            "title-uses-op-id",
                            "the plan's `title` uses `op.id`, which does not exist yet when the title is set",
                        )
                    };
                    self.report(
                        Problem::new(code, self.span_in(text, &format!("op.{field}")), message)
                            .help("build the title from params, `op.uuid` or `op.plan`; `cairn status` shows the op's id in its own column"),
                    );
                }
                Name::Op(field) => {
                    let allowed = |f: &str| {
                        OP_FIELDS.contains(&f) || (scope.outcome && OUTCOME_FIELDS.contains(&f))
                    };
                    match field {
                        Some(f) if allowed(f) => {}
                        Some(f) => {
                            let fields: Vec<&str> = OP_FIELDS
                                .iter()
                                .chain(if scope.outcome { OUTCOME_FIELDS } else { &[] })
                                .copied()
                                .collect();
                            let mut problem = Problem::new(
                                "unknown-op-field",
                                self.span_in(text, &format!("op.{f}")),
                                format!("{what} uses `op.{f}`, which is not defined here"),
                            );
                            problem = if OUTCOME_FIELDS.contains(&f.as_str()) {
                                problem.help("the op's outcome is known only in `on_success`, `on_failure` and `on_cancel` hooks")
                            } else if let Some(s) = suggest(f, fields.iter().copied()) {
                                problem.label(format!("did you mean `op.{s}`?"))
                            } else {
                                problem.help(format!("defined here: {}", list(fields.iter())))
                            };
                            self.report(problem);
                        }
                        None => self.report(Problem::new(
                            "bare-name",
                            self.span_in(text, "op"),
                            format!("{what} uses `op` alone; name a field such as `op.id`"),
                        )),
                    }
                }
                Name::Item if !scope.item => {
                    let per_step = matches!(scope.what, Where::Step(key, _) if key == "`when`" || key == "`for_each`");
                    let problem = if per_step {
                        Problem::new(
                            "item-outside-for-each",
                            self.span_in(text, "item"),
                            format!("{what} uses `item`, but it is evaluated once for the whole step, before its items exist"),
                        )
                        .help("to skip some items, filter the list in `for_each` (e.g. `params.shards | reject(\"equalto\", \"s3\")`)")
                    } else {
                        Problem::new(
                            "item-outside-for-each",
                            self.span_in(text, "item"),
                            format!("{what} uses `item` outside a `for_each` step"),
                        )
                        .help("`item` is the current element of a step's `for_each` list")
                    };
                    self.report(problem);
                }
                Name::Item | Name::Env(Some(_)) => {}
                Name::Env(None) => self.report(Problem::new(
                    "bare-name",
                    self.span_in(text, "env"),
                    format!("{what} uses `env` alone; name a variable such as `env.HOME`"),
                )),
                Name::Bare(root) => self.report(Problem::new(
                    "bare-name",
                    self.span_in(text, root),
                    format!(
                        "{what} uses `{root}` alone; write `{}`",
                        if root == "params" {
                            "params.<name>"
                        } else {
                            "steps.<id>.outputs.<key>"
                        }
                    ),
                )),
                Name::Unknown(unknown) => {
                    let root = unknown.split('.').next().unwrap_or(unknown);
                    let mut problem = Problem::new(
                        "unknown-name",
                        self.span_in(text, root),
                        format!("{what} uses `{unknown}`, which is not defined"),
                    );
                    problem = if known.params.iter().any(|p| p.name == root) {
                        problem.label(format!("did you mean `params.{root}`?"))
                    } else if known.index.contains_key(root) {
                        problem.label(format!("did you mean `steps.{root}.outputs.<key>`?"))
                    } else if let Some(s) =
                        suggest(root, ["params", "steps", "op", "item", "env"].into_iter())
                    {
                        problem.label(format!("did you mean `{s}`?"))
                    } else {
                        problem.help("templates may use `params.*`, `steps.<id>.outputs.*`, `op.*`, `item` and `env.*`")
                    };
                    self.report(problem);
                }
            }
        }
    }

    fn step_name(
        &mut self,
        index: usize,
        rest: &[String],
        text: &raw::Text,
        known: &Known,
        scope: Scope,
    ) {
        let what = scope.what.describe();
        let id = &known.ids[index];
        let at = self.span_in(text, &format!("steps.{id}"));
        match scope.steps {
            StepsAccess::None => {
                self.report(Problem::new(
                    "steps-not-here",
                    at,
                    format!("{what} cannot use `steps.{id}`: no step has run when it is rendered"),
                ));
                return;
            }
            StepsAccess::Upstream(me) if me == index => {
                self.report(Problem::new(
                    "own-outputs",
                    at,
                    format!(
                        "{what} uses its own step's outputs, which do not exist before it runs"
                    ),
                ));
                return;
            }
            StepsAccess::Upstream(me) => {
                if let Some(dag) = known.dag
                    && !dag.is_upstream(index, me)
                {
                    self.report(
                        Problem::new(
                            "not-upstream",
                            at,
                            format!("{what} uses `steps.{id}`, but `{id}` is not upstream of `{}`", known.ids[me]),
                        )
                        .help(format!("add `{id}` to the `needs` of `{}`, so that its outputs exist when this runs", known.ids[me])),
                    );
                    return;
                }
            }
            StepsAccess::Any => {}
        }
        match rest.first().map(String::as_str) {
            Some("outputs") => {
                if let (Some(key), Some(declared)) = (rest.get(1), &known.outputs[index])
                    && !declared.contains(key)
                {
                    let problem = Problem::new(
                        "unknown-output",
                        self.span_in(text, &format!("outputs.{key}")),
                        format!(
                            "{what} uses output `{key}` of step `{id}`, which does not declare it"
                        ),
                    );
                    self.report(match suggest(key, declared.iter().map(String::as_str)) {
                        Some(s) => problem.label(format!("did you mean `{s}`?")),
                        None => problem.help(format!(
                            "`{id}` declares: {}",
                            declared
                                .iter()
                                .map(|k| format!("`{k}`"))
                                .collect::<Vec<_>>()
                                .join(", ")
                        )),
                    });
                }
            }
            _ => self.report(Problem::new(
                "bad-step-reference",
                at,
                format!(
                    "{what} uses `steps.{id}` without `.outputs`; write `steps.{id}.outputs.<key>`"
                ),
            )),
        }
    }

    fn shell_places(&mut self, text: &raw::Text, scope: Scope) {
        for (offset, place) in unsafe_insertions(&text.value) {
            // Find the same `{{ ... }}` in the file.
            let tag_end = text.value[offset..]
                .find("}}")
                .map_or(text.value.len(), |e| offset + e + 2);
            let tag = &text.value[offset..tag_end];
            let before = text.value[..offset].matches(tag).count();
            let at = span(text).and_then(|s| {
                let from = s.offset.min(self.text.len());
                self.text[from..]
                    .match_indices(tag)
                    .nth(before)
                    .map(|(f, _)| Span::new(from + f, tag.len()))
            });
            self.report(
                Problem::new(
                    "quoted-template",
                    at.or_else(|| span(text)),
                    format!("{} inserts a value {}", scope.what.describe(), place.describe()),
                )
                .label("cairn already shell-quotes this value")
                .help(match place {
                    crate::template::ShellPlace::SingleQuotes | crate::template::ShellPlace::DoubleQuotes => {
                        "remove the quotes around it: `echo {{ params.x }}` receives the value as one word whatever it holds; to build a longer word, write `prefix-{{ params.x }}`, or pass the value in `env:` and write `\"...$NAME...\"`"
                    }
                    crate::template::ShellPlace::Comment => "remove it from the comment: a value with a newline would end the comment",
                    crate::template::ShellPlace::HereDocument => {
                        "in a here-document a value is not a shell word: an unquoted one runs any `$(...)` in it, a quoted one keeps cairn's quotes as text; pass the value in `env:` and write `$NAME` in an unquoted here-document"
                    }
                }),
            );
        }
    }

    #[expect(
        clippy::too_many_lines,
        reason = "one pass over a step's keys, in file order, as `plan` does for the plan's"
    )]
    fn step<'s>(
        &mut self,
        index: usize,
        step: &'s RawStep,
        known: &Known,
        shell: &Shell,
        plan_log_limit: u64,
    ) -> Option<Step> {
        let before = self.problems.len();
        self.uses.clear();
        self.uses_params.clear();
        let has_for_each = step.for_each.is_some();
        let scope = |what: &'static str, item: bool| -> Scope<'s> {
            Scope {
                what: Where::Step(what, &step.id.value),
                steps: StepsAccess::Upstream(index),
                item: item && has_for_each,
                outcome: false,
                secrets: false,
            }
        };
        let actions: Vec<(&str, Option<Span>)> = [
            ("run", step.run.as_ref().and_then(span)),
            ("exec", step.exec.as_ref().and_then(span)),
            ("noop", step.noop.as_ref().and_then(span)),
            ("sleep", step.sleep.as_ref().and_then(span)),
            ("approve", step.approve.as_ref().and_then(span)),
            ("plan", step.plan.as_ref().and_then(span)),
            ("sql", step.sql.as_deref().and_then(span)),
        ]
        .into_iter()
        .zip([
            step.run.is_some(),
            step.exec.is_some(),
            step.noop.is_some(),
            step.sleep.is_some(),
            step.approve.is_some(),
            step.plan.is_some(),
            step.sql.is_some(),
        ])
        .filter(|(_, present)| *present)
        .map(|(a, _)| a)
        .collect();
        let action = match actions.as_slice() {
            [] => {
                self.report(
                    Problem::new(
                        "no-action",
                        span(&step.id),
                        format!("step `{}` has no action", step.id.value),
                    )
                    .help(
                        "give it one of `run`, `exec`, `noop`, `sleep`, `approve`, `plan`, `sql`",
                    ),
                );
                None
            }
            [_] => self.action(step, known, scope, shell.clone()),
            [(first, _), (second, at), ..] => {
                self.report(
                    Problem::new(
                        "two-actions",
                        *at,
                        format!("step `{}` has both `{first}` and `{second}`", step.id.value),
                    )
                    .help("a step does one thing; split it into two steps"),
                );
                None
            }
        };
        if step.with.is_some() && step.plan.is_none() {
            self.report(Problem::new(
                "with-without-plan",
                step.with.as_ref().and_then(span),
                "`with` passes params to a sub-plan; this step has no `plan`",
            ));
        }
        if let Some(shell_key) = &step.shell
            && step.run.is_none()
            && step.check.is_none()
        {
            self.report(Problem::new(
                "shell-without-script",
                span(shell_key),
                "`shell` applies to `run` and `check`; this step has neither",
            ));
        }
        let when = step.when.as_ref().and_then(|w| {
            self.expr(
                w,
                known,
                Scope {
                    secrets: true,
                    ..scope("`when`", false)
                },
            )
        });
        let env = self.env(
            step.env.as_ref(),
            known,
            Scope {
                secrets: true,
                ..scope("`env`", true)
            },
        );
        let cwd = step
            .cwd
            .as_ref()
            .and_then(|c| self.template(c, Quoting::Plain, known, scope("`cwd`", true)));
        let on = self.on(
            step.on.as_ref(),
            step.run.is_some() || step.exec.is_some(),
            known,
            scope("`on`", true),
        );
        let check = step
            .check
            .as_ref()
            .and_then(|c| self.template(c, Quoting::Shell, known, scope("`check`", true)));
        let until = step
            .until
            .as_deref()
            .and_then(|u| self.until(u, step, known, scope("`until.probe`", true)));
        let daemon = self.daemon(step);
        let adopt = self.adopt(step);
        let timeout = self.duration(step.timeout.as_ref(), "timeout");
        let retry = step
            .retry
            .as_deref()
            .map_or_else(|| Some(Retry::default()), |r| self.retry(r));
        let for_each = step.for_each.as_ref().and_then(|f| match &f.value {
            RawForEach::Items(items) => Some(ForEach::Items(items.clone())),
            RawForEach::Expression(e) => {
                let text = Spanned::at(e.clone(), f);
                self.expr(&text, known, scope("`for_each`", false))
                    .map(ForEach::Expr)
            }
        });
        let max_parallel = self.positive(step.max_parallel.as_ref(), "max_parallel");
        if let Some(mp) = &step.max_parallel
            && !has_for_each
        {
            self.report(
                Problem::new("max-parallel-without-for-each", span(mp), "a step's `max_parallel` limits its `for_each` items; this step has no `for_each`")
                    .help("to limit the whole op, set `max_parallel` at the top of the plan"),
            );
        }
        if let Some(outputs) = &step.outputs {
            for key in outputs {
                if !is_identifier(&key.value) {
                    self.report(
                        Problem::new(
                            "bad-output-name",
                            span(key),
                            format!("`{}` is not a valid output key", key.value),
                        )
                        .help("use letters, digits and `_`, not starting with a digit"),
                    );
                }
            }
        }
        let log_limit = self
            .bytes(step.log_limit.as_ref(), "log_limit")
            .unwrap_or(plan_log_limit);
        if self.problems.len() != before {
            return None;
        }
        Some(Step {
            id: step.id.value.clone(),
            description: step.description.clone(),
            needs: known
                .dag
                .map(|d| d.needs(index).to_vec())
                .unwrap_or_default(),
            when,
            action: action?,
            env,
            cwd,
            on,
            timeout,
            retry: retry?,
            check,
            until,
            for_each,
            max_parallel,
            continue_on_error: step.continue_on_error.unwrap_or(false),
            outputs: step
                .outputs
                .as_ref()
                .map(|o| o.iter().map(|k| k.value.clone()).collect())
                .or_else(|| step.sql.as_deref().map(|q| sql_output_keys(&q.value))),
            log_limit,
            uses: std::mem::take(&mut self.uses).into_iter().collect(),
            params: std::mem::take(&mut self.uses_params).into_iter().collect(),
            daemon,
            adopt,
        })
    }

    fn action<'s>(
        &mut self,
        step: &'s RawStep,
        known: &Known,
        scope: impl Fn(&'static str, bool) -> Scope<'s>,
        shell: Shell,
    ) -> Option<Action> {
        if let Some(run) = &step.run {
            if run.value.trim().is_empty() {
                self.report(Problem::new("empty-run", span(run), "`run` is empty"));
                return None;
            }
            return self
                .template(run, Quoting::Shell, known, scope("`run`", true))
                .map(|script| Action::Run { script, shell });
        }
        if let Some(exec) = &step.exec {
            return self.exec(exec, known, scope("`exec`", true));
        }
        if let Some(noop) = &step.noop {
            if !noop.value {
                self.report(
                    Problem::new("noop-false", span(noop), "`noop: false` is not an action")
                        .help("write `noop: true`, or give the step another action"),
                );
                return None;
            }
            return Some(Action::Noop);
        }
        if let Some(sleep) = &step.sleep {
            return self.duration(Some(sleep), "sleep").map(Action::Sleep);
        }
        if let Some(prompt) = &step.approve {
            return self
                .template(prompt, Quoting::Plain, known, scope("`approve`", true))
                .map(|prompt| Action::Approve { prompt });
        }
        if let Some(sql) = &step.sql {
            let secrets = |what| Scope {
                secrets: true,
                ..scope(what, true)
            };
            return self
                .sql(sql, step, known, secrets)
                .map(|sql| Action::Sql(Box::new(sql)));
        }
        let path = step.plan.as_ref()?;
        if path.value.trim().is_empty() {
            self.report(Problem::new(
                "empty-plan-path",
                span(path),
                "`plan` names no file",
            ));
            return None;
        }
        let mut with = Vec::new();
        for (name, value) in step.with.iter().flat_map(|w| &w.value.0) {
            let arg = match &value.value {
                Value::String(s) => {
                    let text = Spanned::at(s.clone(), value);
                    Arg::Template(self.template(
                        &text,
                        Quoting::Plain,
                        known,
                        Scope {
                            secrets: true,
                            ..scope("`with`", true)
                        },
                    )?)
                }
                other => Arg::Value(other.clone()),
            };
            with.push((name.value.clone(), arg));
        }
        Some(Action::Plan {
            path: path.value.clone(),
            with,
        })
    }

    fn exec(
        &mut self,
        exec: &Spanned<Vec<Spanned<Scalar>>>,
        known: &Known,
        scope: Scope,
    ) -> Option<Action> {
        if exec.value.is_empty() {
            self.report(Problem::new(
                "empty-exec",
                span(exec),
                "`exec` names no program",
            ));
            return None;
        }
        let mut argv = Vec::with_capacity(exec.value.len());
        let mut ok = true;
        for arg in &exec.value {
            let text = Spanned::at(arg.value.0.clone(), arg);
            match self.template(&text, Quoting::Plain, known, scope) {
                Some(t) => argv.push(t),
                None => ok = false,
            }
        }
        ok.then_some(Action::Exec { argv })
    }

    /// A `sql` step's keys: a URL of a known scheme, `query` or `statements`, output keys and
    /// plain column names; its step has no `outputs` or `check` of its own.
    fn sql<'s>(
        &mut self,
        sql: &Spanned<raw::RawSql>,
        step: &RawStep,
        known: &Known,
        scope: impl Fn(&'static str) -> Scope<'s>,
    ) -> Option<crate::model::Sql> {
        let before = self.problems.len();
        let q = &sql.value;
        if let Some(outputs) = &step.outputs {
            self.report(
                Problem::new(
                    "sql-step-outputs",
                    outputs.first().and_then(span).or_else(|| span(sql)),
                    "a `sql` step's outputs are named in `sql.outputs` and `sql.row_count`, not in the step's `outputs`",
                )
                .help("remove the step's `outputs`; write `sql: { ..., outputs: { key: column } }`"),
            );
        }
        if let Some(check) = &step.check {
            self.report(
                Problem::new(
                    "sql-step-check",
                    span(check),
                    "a `sql` step's idempotency probe is a query: `sql.check`",
                )
                .help("write `sql: { ..., check: { query: \"SELECT 1 FROM t WHERE id = $1\", params: [...] } }`"),
            );
        }
        if let Some(codes) = step
            .retry
            .as_deref()
            .and_then(|r| r.value.on_exit_codes.as_ref())
        {
            self.report(
                Problem::new(
                    "sql-on-exit-codes",
                    codes.first().and_then(span).or_else(|| step.retry.as_deref().and_then(span)),
                    "`retry.on_exit_codes` would never match: a `sql` attempt runs no process and has no exit code",
                )
                .help("remove `on_exit_codes`: a failed `sql` attempt is retried whatever its error"),
            );
        }
        let unused = [
            ("cwd", step.cwd.as_ref().and_then(span)),
            (
                "env",
                step.env
                    .as_ref()
                    .and_then(|e| e.0.first())
                    .and_then(|(k, _)| span(k)),
            ),
        ];
        for (key, at) in unused {
            if at.is_some() {
                self.report(
                    Problem::new(
                        "not-for-sql",
                        at,
                        format!("`{key}` applies to a process; a `sql` step runs none"),
                    )
                    .help("remove it; values reach a statement through `params`"),
                );
            }
        }
        let url_text = q.url.value.trim_start();
        let schemes = ["postgres://", "postgresql://", "mysql://", "mariadb://"];
        if !url_text.starts_with("{{") && !schemes.iter().any(|s| url_text.starts_with(s)) {
            self.report(
                Problem::new(
                    "bad-sql-url",
                    span(&q.url),
                    "`sql.url` names no server cairn can reach",
                )
                .help("write `postgres://USER:PASSWORD@HOST:PORT/DATABASE`, or `mysql://...` (also for MariaDB)"),
            );
        }
        let url = self.template(&q.url, Quoting::Plain, known, scope("`sql.url`"));
        let statements = self.sql_statements(sql, known, &scope);
        let check = q.check.as_ref().and_then(|c| {
            self.sql_statement(
                &c.value.query,
                c.value.params.as_ref(),
                known,
                scope("`sql.check`"),
            )
        });
        let outputs = self.sql_outputs(q);
        if self.problems.len() != before {
            return None;
        }
        Some(crate::model::Sql {
            url: url?,
            statements: statements?,
            transaction: q.transaction.as_ref().is_some_and(|t| t.value),
            outputs,
            row_count: q.row_count.as_ref().map(|r| r.value.clone()),
            check,
        })
    }

    /// `sql.query` (with `sql.params`) or `sql.statements`: exactly one of them.
    fn sql_statements<'s>(
        &mut self,
        sql: &Spanned<raw::RawSql>,
        known: &Known,
        scope: &impl Fn(&'static str) -> Scope<'s>,
    ) -> Option<Vec<crate::model::Statement>> {
        let q = &sql.value;
        match (&q.query, &q.statements) {
            (Some(query), None) => self
                .sql_statement(query, q.params.as_ref(), known, scope("`sql.params`"))
                .map(|s| vec![s]),
            (None, Some(statements)) => {
                if let Some(params) = &q.params {
                    self.report(
                        Problem::new(
                            "sql-params-without-query",
                            span(params),
                            "`sql.params` go with `sql.query`; with `statements`, each statement has its own `params`",
                        ),
                    );
                }
                if statements.value.is_empty() {
                    self.report(Problem::new(
                        "empty-sql",
                        span(statements),
                        "`sql.statements` is empty",
                    ));
                    return None;
                }
                let mut out = Vec::new();
                for statement in &statements.value {
                    let s = &statement.value;
                    out.push(self.sql_statement(
                        &s.query,
                        s.params.as_ref(),
                        known,
                        scope("`sql.statements`"),
                    ));
                }
                out.into_iter().collect()
            }
            (Some(_), Some(statements)) => {
                self.report(
                    Problem::new(
                        "sql-query-and-statements",
                        span(statements),
                        "`sql` has both `query` and `statements`",
                    )
                    .help("put the query first in `statements`"),
                );
                None
            }
            (None, None) => {
                self.report(
                    Problem::new(
                        "empty-sql",
                        span(sql),
                        "`sql` has no `query` or `statements`",
                    )
                    .help("write `sql: { url: ..., query: \"...\" }`"),
                );
                None
            }
        }
    }

    fn sql_statement(
        &mut self,
        query: &Text,
        params: Option<&Spanned<Vec<Spanned<Scalar>>>>,
        known: &Known,
        scope: Scope,
    ) -> Option<crate::model::Statement> {
        if query.value.trim().is_empty() {
            self.report(Problem::new(
                "empty-sql",
                span(query),
                "the SQL query is empty",
            ));
            return None;
        }
        if looks_templated(&query.value) {
            self.report(
                Problem::new(
                    "sql-query-template",
                    span(query),
                    "a SQL query is not a template: values go in `params`, bound by the server",
                )
                .help("write `$1` (PostgreSQL) or `?` (MySQL, MariaDB) in the query and the value in `params: [\"{{ ... }}\"]`"),
            );
            return None;
        }
        let mut values = Vec::new();
        let mut ok = true;
        for param in params.map(|p| p.value.as_slice()).unwrap_or_default() {
            let text = Spanned::at(param.value.0.clone(), param);
            match self.template(&text, Quoting::Plain, known, scope) {
                Some(t) => values.push(t),
                None => ok = false,
            }
        }
        ok.then(|| crate::model::Statement {
            query: query.value.clone(),
            params: values,
        })
    }

    /// `sql.outputs` and `sql.row_count`: output keys that are identifiers, each once; columns
    /// that are plain names.
    fn sql_outputs(&mut self, q: &raw::RawSql) -> Vec<(String, String)> {
        let mut seen: Vec<&str> = Vec::new();
        let mut outputs = Vec::new();
        let pairs = q.outputs.iter().flat_map(|o| &o.value.0);
        let keys = pairs.clone().map(|(k, _)| k).chain(q.row_count.as_ref());
        for key in keys {
            if !is_identifier(&key.value) {
                self.report(
                    Problem::new(
                        "bad-output-name",
                        span(key),
                        format!("`{}` is not a valid output key", key.value),
                    )
                    .help("use letters, digits and `_`, not starting with a digit"),
                );
            } else if seen.contains(&key.value.as_str()) {
                self.report(Problem::new(
                    "duplicate-output",
                    span(key),
                    format!("the output `{}` is named twice", key.value),
                ));
            }
            seen.push(&key.value);
        }
        for (key, column) in pairs {
            if !is_column_name(&column.value) {
                self.report(
                    Problem::new(
                        "bad-sql-column",
                        span(column),
                        format!("`{}` is not a column name", column.value),
                    )
                    .help("name a column of the result as the server names it (letters, digits, `_`, `$`, `@`); give an expression a name in the query: `SELECT @@gtid_current_pos AS gtid`"),
                );
            }
            outputs.push((key.value.clone(), column.value.clone()));
        }
        outputs
    }

    /// A step's `daemon`: only with an `until` that has a `probe` (what says the server is ready).
    fn daemon(&mut self, step: &RawStep) -> bool {
        let Some(daemon) = step.daemon.as_ref().filter(|d| d.value) else {
            return false;
        };
        let probe = step
            .until
            .as_deref()
            .is_some_and(|u| u.value.probe.is_some());
        if !probe {
            self.report(
                Problem::new(
                    "daemon-without-probe",
                    span(daemon),
                    "a `daemon` step needs `until` with a `probe`: what says that the server it starts is ready",
                )
                .help("add e.g. `until: { probe: \"curl -fs http://127.0.0.1:8080/\", every: 1s, timeout: 2m }`"),
            );
        }
        if let Some(on) = &step.on {
            self.report(
                Problem::new(
                    "daemon-on-host",
                    span(on),
                    "a `daemon` step runs on cairn's own host: a server kept on another host is not supported yet",
                )
                .help("start the server with a step on its host that detaches it itself (`setsid`), and wait for it with `until`"),
            );
            return false;
        }
        probe
    }

    /// A step's `adopt`: only on a `run` or `exec` step, without `until` or `daemon` (their
    /// command runs again by design). Default: true for a step with `on`.
    fn adopt(&mut self, step: &RawStep) -> bool {
        let command = step.run.is_some() || step.exec.is_some();
        let Some(adopt) = step.adopt.as_ref() else {
            return command && step.on.is_some() && step.until.is_none();
        };
        if !adopt.value {
            return false;
        }
        if !command {
            self.report(
                Problem::new(
                    "adopt-without-command",
                    span(adopt),
                    "`adopt` keeps a step's process running when cairn dies; this step has no `run` or `exec`",
                )
                .help("remove `adopt`"),
            );
            return false;
        }
        if step.until.is_some() || step.daemon.as_ref().is_some_and(|d| d.value) {
            self.report(
                Problem::new(
                    "adopt-with-until",
                    span(adopt),
                    "`adopt` collects the one run of a step's command; a step with `until` or `daemon` runs it again by design",
                )
                .help("remove `adopt`, or `until`"),
            );
            return false;
        }
        true
    }

    /// A step's `until`: only on a `run` or `exec` step; `every` shorter than `timeout`.
    fn until(
        &mut self,
        until: &Spanned<raw::RawUntil>,
        step: &RawStep,
        known: &Known,
        scope: Scope,
    ) -> Option<Until> {
        if step.run.is_none() && step.exec.is_none() {
            self.report(
                Problem::new(
                    "until-without-command",
                    span(until),
                    "`until` runs the step's command again until it succeeds; this step has no `run` or `exec`",
                )
                .help("to wait a fixed time, use `sleep`"),
            );
            return None;
        }
        let u = &until.value;
        let timeout = self.duration(Some(&u.timeout), "until.timeout")?;
        let every = match &u.every {
            Some(e) => self.duration(Some(e), "until.every")?,
            None => DEFAULT_UNTIL_EVERY,
        };
        if every >= timeout {
            self.report(Problem::new(
                "until-every-too-long",
                u.every.as_ref().and_then(span).or_else(|| span(&u.timeout)),
                format!(
                    "`until.every` ({}) is not shorter than `until.timeout` ({}): the command would run once",
                    crate::units::format_duration(every),
                    crate::units::format_duration(timeout)
                ),
            ));
            return None;
        }
        let probe = match &u.probe {
            Some(p) => Some(self.template(p, Quoting::Shell, known, scope)?),
            None => None,
        };
        Some(Until {
            every,
            timeout,
            probe,
        })
    }

    fn retry(&mut self, retry: &Spanned<raw::RawRetry>) -> Option<Retry> {
        let r = &retry.value;
        let before = self.problems.len();
        let attempts = self.positive(Some(&r.attempts), "attempts").unwrap_or(1);
        let backoff = match r.backoff.as_ref().map(|b| b.value.as_str()) {
            None | Some("constant") => Backoff::Constant,
            Some("exponential") => Backoff::Exponential,
            Some(other) => {
                let problem = Problem::new(
                    "bad-backoff",
                    r.backoff.as_ref().and_then(span),
                    format!("unknown backoff `{other}`"),
                );
                self.report(
                    match suggest(other, ["constant", "exponential"].into_iter()) {
                        Some(s) => problem.label(format!("did you mean `{s}`?")),
                        None => problem.help("expected `constant` or `exponential`"),
                    },
                );
                Backoff::Constant
            }
        };
        let delay = self
            .duration(r.delay.as_ref(), "delay")
            .unwrap_or(Duration::from_secs(1));
        let max_delay = self.duration(r.max_delay.as_ref(), "max_delay");
        if let Some(max) = max_delay
            && max < delay
        {
            self.report(Problem::new(
                "max-delay-below-delay",
                r.max_delay.as_ref().and_then(span),
                "`max_delay` is shorter than `delay`",
            ));
        }
        (self.problems.len() == before).then(|| Retry {
            attempts,
            backoff,
            delay,
            max_delay,
            on_exit_codes: r.on_exit_codes.iter().flatten().map(|c| c.value).collect(),
        })
    }

    fn hooks(
        &mut self,
        hooks: &raw::RawHooks,
        known: &Known,
        plan_shell: Option<&Shell>,
    ) -> Option<Hooks> {
        let before = self.problems.len();
        let phase = |this: &mut Self,
                     phase: &'static str,
                     list: Option<&Vec<Spanned<RawHook>>>|
         -> Vec<Hook> {
            let scope = Scope {
                what: Where::Hook(phase, 0),
                steps: if phase == "pre" {
                    StepsAccess::None
                } else {
                    StepsAccess::Any
                },
                item: false,
                outcome: phase != "pre",
                secrets: false,
            };
            list.iter()
                .flat_map(|l| l.iter())
                .enumerate()
                .filter_map(|(i, hook)| {
                    let scope = Scope {
                        what: Where::Hook(phase, i),
                        ..scope
                    };
                    this.hook(phase, i, &hook.value, span(hook), known, scope, plan_shell)
                })
                .collect()
        };
        let pre = phase(self, "pre", hooks.pre.as_ref());
        let on_success = phase(self, "on_success", hooks.on_success.as_ref());
        let on_failure = phase(self, "on_failure", hooks.on_failure.as_ref());
        let on_cancel = phase(self, "on_cancel", hooks.on_cancel.as_ref());
        (self.problems.len() == before).then_some(Hooks {
            pre,
            on_success,
            on_failure,
            on_cancel,
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn hook(
        &mut self,
        phase: &'static str,
        position: usize,
        hook: &RawHook,
        at: Option<Span>,
        known: &Known,
        scope: Scope,
        plan_shell: Option<&Shell>,
    ) -> Option<Hook> {
        let shell = hook
            .shell
            .as_ref()
            .map(|s| self.shell(s))
            .or_else(|| plan_shell.cloned())
            .unwrap_or(Shell::Bash);
        let action = match (&hook.run, &hook.exec) {
            (Some(run), None) => self
                .template(run, Quoting::Shell, known, scope)
                .map(|script| Action::Run { script, shell }),
            (None, Some(exec)) => {
                if let Some(shell) = &hook.shell {
                    self.report(Problem::new(
                        "shell-without-script",
                        span(shell),
                        "`shell` applies to `run`; this hook uses `exec`",
                    ));
                }
                self.exec(exec, known, scope)
            }
            (Some(_), Some(exec)) => {
                self.report(Problem::new(
                    "two-actions",
                    span(exec),
                    "a hook has both `run` and `exec`",
                ));
                None
            }
            (None, None) => {
                self.report(Problem::new(
                    "no-action",
                    at,
                    "a hook needs `run` or `exec`",
                ));
                None
            }
        };
        let env = self.env(
            hook.env.as_ref(),
            known,
            Scope {
                secrets: true,
                ..scope
            },
        );
        let cwd = hook
            .cwd
            .as_ref()
            .and_then(|c| self.template(c, Quoting::Plain, known, scope));
        let on = self.on(hook.on.as_ref(), true, known, scope);
        let timeout = self
            .duration(hook.timeout.as_ref(), "timeout")
            .unwrap_or(DEFAULT_HOOK_TIMEOUT);
        Some(Hook {
            name: hook
                .name
                .clone()
                .unwrap_or_else(|| format!("{phase}[{}]", position + 1)),
            action: action?,
            env,
            cwd,
            on,
            timeout,
        })
    }

    /// An `on` key: a template (no secret: a destination is on `ssh`'s command line and shown),
    /// only where a process runs.
    fn on(
        &mut self,
        on: Option<&raw::Text>,
        process: bool,
        known: &Known,
        scope: Scope,
    ) -> Option<Template> {
        let on = on?;
        if !process {
            self.report(
                Problem::new(
                    "on-without-process",
                    span(on),
                    "`on` names the host a process runs on; this step has no `run` or `exec`",
                )
                .help("remove `on`, or give the step a `run` or `exec`"),
            );
            return None;
        }
        if on.value.trim().is_empty() {
            self.report(Problem::new(
                "empty-on",
                span(on),
                "`on` is empty: give an SSH destination (a `~/.ssh/config` alias or `user@host`)",
            ));
            return None;
        }
        self.template(on, Quoting::Plain, known, scope)
    }
}

impl Where<'_> {
    fn describe(self) -> String {
        self.to_string()
    }
}

impl std::fmt::Display for Where<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Plan(key) => write!(f, "the plan's `{key}`"),
            Self::Step(key, id) => write!(f, "{key} of step `{id}`"),
            Self::Hook(phase, position) => write!(f, "hook `{phase}[{}]`", position + 1),
        }
    }
}

/// A JSON value as it would be written in YAML, for messages.
/// A param's default as a message quotes it: a secret's is never shown.
fn shown_default(value: &Value, secret: Option<bool>) -> String {
    if secret == Some(true) {
        "(secret, not shown)".to_owned()
    } else {
        show(value)
    }
}

fn show(value: &Value) -> String {
    match value {
        // A string that YAML would read as another type is shown quoted, so `"5432"` is not `5432`.
        Value::String(s)
            if s.parse::<f64>().is_ok() || matches!(s.as_str(), "true" | "false" | "null") =>
        {
            format!("`\"{s}\"`")
        }
        Value::String(s) => format!("`{s}`"),
        other => format!("`{other}`"),
    }
}

/// Where a step's `key` is written in the plan's text: the first `key:` after the step's `id`.
fn step_key_span(plan: &Plan, step: usize, key: &str) -> Option<Span> {
    let id = &plan.steps[step].id;
    let text = &plan.text;
    let id_at = [
        format!("id: {id}"),
        format!("id: \"{id}\""),
        format!("id: '{id}'"),
    ]
    .iter()
    .filter_map(|needle| {
        text.match_indices(needle.as_str())
            .find(|(at, n)| {
                !text[at + n.len()..]
                    .starts_with(|c: char| c.is_alphanumeric() || c == '-' || c == '_')
            })
            .map(|(at, _)| at)
    })
    .min()?;
    let key_at = text[id_at..].find(&format!("{key}:")).map(|k| id_at + k)?;
    Some(Span::new(key_at, key.len()))
}

/// A `plan:` step names a file that cannot be read.
#[must_use]
pub fn missing_sub_plan(plan: &Plan, step: usize, reason: &str) -> Problem {
    let path = match &plan.steps[step].action {
        Action::Plan { path, .. } => path.as_str(),
        _ => "",
    };
    Problem::new(
        "missing-sub-plan",
        step_key_span(plan, step, "plan"),
        format!(
            "step `{}` runs sub-plan `{path}`: {reason}",
            plan.steps[step].id
        ),
    )
    .help("the path is relative to this plan's directory")
}

/// Checks what a `plan:` step passes in `with:` against the params of the sub-plan it names.
#[must_use]
pub fn sub_plan_problems(plan: &Plan, step: usize, child: &Plan) -> Vec<Problem> {
    let Action::Plan { with, .. } = &plan.steps[step].action else {
        return Vec::new();
    };
    let id = &plan.steps[step].id;
    let mut out = Vec::new();
    for (name, arg) in with {
        match child.param(name) {
            None => {
                let problem = Problem::new(
                    "unknown-sub-plan-param",
                    step_key_span(plan, step, name).or_else(|| step_key_span(plan, step, "with")),
                    format!(
                        "step `{id}` passes `{name}`, which is not a param of sub-plan `{}`",
                        child.name
                    ),
                );
                out.push(
                    match suggest(name, child.params.iter().map(|p| p.name.as_str())) {
                        Some(s) => problem.label(format!("did you mean `{s}`?")),
                        None => problem,
                    },
                );
            }
            Some(param) => {
                // A secret must stay one: a child param that is not secret is stored in clear.
                if let Arg::Template(t) = arg
                    && !param.secret
                    && let Ok((_, names)) = crate::template::Template::compile(
                        t.source(),
                        crate::template::Quoting::Plain,
                        &|id| plan.step_index(id),
                    )
                    && let Some(secret) = names.iter().find_map(|n| match n {
                        crate::template::Name::Param(p)
                            if plan.param(p).is_some_and(|p| p.secret) =>
                        {
                            Some(p.clone())
                        }
                        _ => None,
                    })
                {
                    out.push(
                        Problem::new(
                            "secret-to-plain-sub-plan-param",
                            step_key_span(plan, step, name),
                            format!(
                                "step `{id}` passes the secret param `{secret}` as `{name}`, which sub-plan `{}` does not mark `secret`",
                                child.name
                            ),
                        )
                        .help(format!(
                            "mark `{name}` `secret: true` in the sub-plan, so that its op seals and masks it"
                        )),
                    );
                }
                if let Arg::Value(value) = arg
                    && !param.ty.admits(value)
                {
                    out.push(Problem::new(
                        "wrong-sub-plan-param-type",
                        step_key_span(plan, step, name),
                        format!(
                            "step `{id}` passes {} as `{name}`, but sub-plan `{}` takes a `{}`",
                            show(value),
                            child.name,
                            param.ty.name()
                        ),
                    ));
                }
            }
        }
    }
    for param in &child.params {
        if param.required && !with.iter().any(|(n, _)| n == &param.name) {
            out.push(
                Problem::new(
                    "missing-sub-plan-param",
                    step_key_span(plan, step, "plan"),
                    format!(
                        "sub-plan `{}` requires param `{}`, which step `{id}` does not pass",
                        child.name, param.name
                    ),
                )
                .help(format!(
                    "add it to `with:`, e.g. `with: {{ {}: ... }}`",
                    param.name
                )),
            );
        }
    }
    out
}
