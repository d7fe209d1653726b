//! The plan file as written: serde structs that mirror the YAML, with a source span on every value a
//! later check may need to point at. Nothing here is validated beyond its YAML shape; `validate` turns
//! a [`RawPlan`] into a [`crate::Plan`]. The doc comments double as the JSON Schema's descriptions.
//!
//! Step kinds are optional fields of one struct, not an enum: serde loses spans inside untagged and
//! internally tagged enums, and "exactly one action" is a check with a better message than serde's.

use std::fmt;

use schemars::JsonSchema;
use serde::Deserialize;
use serde::de::{self, Deserializer, MapAccess, Visitor};

use crate::diag::Span;

/// A string with the place it was written.
pub type Text = Spanned<String>;

/// A value with the place it was written: the bytes of its text in the file, when the parser knew
/// them. Read through serde-saphyr's `Spanned`, of which it keeps only what problems point at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spanned<T> {
    pub value: T,
    offset: u32,
    len: u32,
}

/// `offset` of a value whose place is not known.
const UNKNOWN: u32 = u32::MAX;

impl<T> Spanned<T> {
    /// `value` at the place of `at`.
    pub fn at<U>(value: U, at: &Spanned<T>) -> Spanned<U> {
        Spanned {
            value,
            offset: at.offset,
            len: at.len,
        }
    }

    /// The value's bytes in the file; `None` where the parser did not know them.
    #[must_use]
    pub fn span(&self) -> Option<Span> {
        (self.offset != UNKNOWN).then(|| Span::new(self.offset as usize, self.len as usize))
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Spanned<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let read = serde_saphyr::Spanned::<T>::deserialize(deserializer)?;
        let place = Span::of(&read.referenced)
            .and_then(|s| Some((u32::try_from(s.offset).ok()?, u32::try_from(s.len).ok()?)))
            .filter(|&(offset, _)| offset != UNKNOWN);
        let (offset, len) = place.unwrap_or((UNKNOWN, 0));
        Ok(Self {
            value: read.value,
            offset,
            len,
        })
    }
}

/// A cairn plan: parameters, steps and their dependencies, hooks, lock.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(title = "cairn plan")]
pub struct RawPlan {
    /// The plan's name: the op's TYPE column. Letters, digits, `-`, `_` and `.`, starting with a letter or digit.
    #[schemars(with = "String")]
    pub name: Text,
    /// What the plan does, for people.
    pub description: Option<String>,
    /// The parameters an op of this plan takes, by name.
    #[schemars(with = "Option<std::collections::BTreeMap<String, RawParam>>")]
    pub params: Option<Pairs<Spanned<RawParam>>>,
    /// Template for the op's NAME column, e.g. `"{{ params.xstore }}/{{ params.target }}"`.
    #[schemars(with = "Option<String>")]
    pub title: Option<Text>,
    /// Template for the lock key (ops whose rendered keys are equal never run at once), or `{key, on_failure}`.
    #[schemars(with = "Option<RawLockSchema>")]
    pub lock: Option<Spanned<RawLock>>,
    /// After an op on the lock key ends, a new op on that key is refused for this long unless acknowledged.
    #[schemars(with = "Option<Scalar>")]
    pub cooldown: Option<Spanned<Scalar>>,
    /// How many tasks of one op may run at once (default 8).
    #[schemars(with = "Option<u32>")]
    pub max_parallel: Option<Spanned<u32>>,
    /// The longest the whole op may run, e.g. `2h`.
    #[schemars(with = "Option<Scalar>")]
    pub timeout: Option<Spanned<Scalar>>,
    /// Whether `cairn serve` resumes an interrupted op of this plan by itself (default true).
    pub auto_resume: Option<bool>,
    /// The shell for `run` scripts and `check` probes: `bash` (default, with errexit and pipefail), `sh`, or a path.
    #[schemars(with = "Option<String>")]
    pub shell: Option<Text>,
    /// Environment variables for every step and hook; values are templates.
    #[schemars(with = "Option<std::collections::BTreeMap<String, Scalar>>")]
    pub env: Option<Pairs<Spanned<Scalar>>>,
    /// How much of each attempt's stdout and stderr is kept (its start and its end), e.g. `1MiB` (default 1MiB).
    #[schemars(with = "Option<Scalar>")]
    pub log_limit: Option<Spanned<Scalar>>,
    /// The plan's default schedule, used by `cairn schedule add` when no `--cron` is given.
    #[schemars(with = "Option<RawSchedule>")]
    pub schedule: Option<Spanned<RawSchedule>>,
    /// The steps, in any order; `needs` decides the order they run in.
    #[schemars(with = "Vec<RawStep>")]
    pub steps: Spanned<Vec<Spanned<RawStep>>>,
    /// Commands run before the first step and after the op ends.
    pub hooks: Option<RawHooks>,
}

/// A parameter of the plan.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawParam {
    /// `string` (default), `int`, `bool`, `list` or `map`.
    #[serde(rename = "type")]
    #[schemars(with = "Option<String>")]
    pub ty: Option<Text>,
    /// Whether an op must be given a value (default false).
    pub required: Option<bool>,
    /// The value when none is given; must have the param's type.
    #[schemars(with = "Option<serde_json::Value>")]
    pub default: Option<Spanned<serde_json::Value>>,
    /// The only values allowed.
    #[serde(rename = "enum")]
    #[schemars(with = "Option<Vec<serde_json::Value>>")]
    pub choices: Option<Spanned<Vec<Spanned<serde_json::Value>>>>,
    /// What the parameter means, for people.
    pub description: Option<String>,
    /// Never shown in status, logs or events; reaches steps only through `env`.
    pub secret: Option<bool>,
}

/// One step of the plan: an action and the fields that say when and how it runs.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawStep {
    /// The step's name, unique in the plan: letters, digits, `-` and `_`.
    #[schemars(with = "String")]
    pub id: Text,
    /// What the step does, for people.
    pub description: Option<String>,
    /// Steps that must succeed (or be skipped) before this one starts.
    #[schemars(with = "Option<Vec<String>>")]
    pub needs: Option<Spanned<Vec<Text>>>,
    /// An expression; when false the step is skipped, e.g. `params.role == "follower"`.
    #[schemars(with = "Option<String>")]
    pub when: Option<Text>,
    /// A shell script (template; every inserted value is shell-quoted).
    #[schemars(with = "Option<String>")]
    pub run: Option<Text>,
    /// A program and its arguments, run without a shell (each element a template).
    #[schemars(with = "Option<Vec<Scalar>>")]
    pub exec: Option<Spanned<Vec<Spanned<Scalar>>>>,
    /// `true`: a step that does nothing (a join point).
    #[schemars(with = "Option<bool>")]
    pub noop: Option<Spanned<bool>>,
    /// Wait this long, e.g. `30s`.
    #[schemars(with = "Option<Scalar>")]
    pub sleep: Option<Spanned<Scalar>>,
    /// A manual gate: the prompt shown until someone runs `cairn approve`.
    #[schemars(with = "Option<String>")]
    pub approve: Option<Text>,
    /// Run another plan (a path relative to this file) as a child op.
    #[schemars(with = "Option<String>")]
    pub plan: Option<Text>,
    /// SQL statements run on a PostgreSQL, MySQL or MariaDB server, their values bound as parameters.
    #[schemars(with = "Option<RawSql>")]
    pub sql: Option<Box<Spanned<RawSql>>>,
    /// The child plan's parameters (values are templates).
    #[schemars(with = "Option<std::collections::BTreeMap<String, serde_json::Value>>")]
    pub with: Option<Spanned<Pairs<Spanned<serde_json::Value>>>>,
    /// The shell for this step's `run` and `check`, overriding the plan's.
    #[schemars(with = "Option<String>")]
    pub shell: Option<Text>,
    /// Environment variables for this step; values are templates.
    #[schemars(with = "Option<std::collections::BTreeMap<String, Scalar>>")]
    pub env: Option<Pairs<Spanned<Scalar>>>,
    /// The working directory (template).
    #[schemars(with = "Option<String>")]
    pub cwd: Option<Text>,
    /// The host the step's `run` or `exec` (and its `check`) runs on, over SSH: a destination as
    /// `ssh` takes it, a `~/.ssh/config` alias or `user@host` (template). Absent: this host.
    #[schemars(with = "Option<String>")]
    pub on: Option<Text>,
    /// The longest one attempt may run, e.g. `10m`; on an `approve` step, how long the gate waits
    /// for an answer.
    #[schemars(with = "Option<Scalar>")]
    pub timeout: Option<Spanned<Scalar>>,
    /// How failed attempts are retried.
    #[schemars(with = "Option<RawRetry>")]
    pub retry: Option<Box<Spanned<RawRetry>>>,
    /// An idempotency probe (shell script): exit 0 means the work is already done and the step is not run.
    #[schemars(with = "Option<String>")]
    pub check: Option<Text>,
    /// Wait for a state: run the step's command (or, with `probe`, the command once and then the probe) every `every` until it exits 0, up to `timeout`.
    #[schemars(with = "Option<RawUntil>")]
    pub until: Option<Box<Spanned<RawUntil>>>,
    /// The step starts a server that outlives it: when its command exits 0, what it left running is kept (not ended), and the step succeeds once `until.probe` does. Needs `until` with a `probe`.
    #[schemars(with = "Option<bool>")]
    pub daemon: Option<Spanned<bool>>,
    /// The step's process outlives cairn: it runs under a small supervisor that records its pid and exit code, so that a resume after cairn died collects its result (or waits for it) instead of running it again. Default: true for a step with `on`, false otherwise. Not with `until` or `daemon`.
    #[schemars(with = "Option<bool>")]
    pub adopt: Option<Spanned<bool>>,
    /// Run the step once per item: an expression giving a list, or a list.
    #[schemars(with = "Option<RawForEach>")]
    pub for_each: Option<Spanned<RawForEach>>,
    /// With `for_each`: how many items may run at once.
    #[schemars(with = "Option<u32>")]
    pub max_parallel: Option<Spanned<u32>>,
    /// Let dependents run even when this step fails.
    pub continue_on_error: Option<bool>,
    /// The output keys the step promises to write; when given, templates may use only these.
    #[schemars(with = "Option<Vec<String>>")]
    pub outputs: Option<Vec<Text>>,
    /// How much of each attempt's stdout and stderr is kept, overriding the plan's.
    #[schemars(with = "Option<Scalar>")]
    pub log_limit: Option<Spanned<Scalar>>,
}

/// A `sql` step: statements run in order on one connection.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawSql {
    /// The server (template; secrets allowed, never shown): `postgres://USER:PASSWORD@HOST:PORT/DB` (or `postgresql://`), `mysql://...` or `mariadb://...`.
    #[schemars(with = "String")]
    pub url: Text,
    /// One statement (instead of `statements`); `$1`, `$2` (PostgreSQL) or `?` (MySQL, MariaDB) mark its parameters.
    #[schemars(with = "Option<String>")]
    pub query: Option<Text>,
    /// With `query`: the values of its parameters, in order (templates), bound, never inserted into the text.
    #[schemars(with = "Option<Vec<Scalar>>")]
    pub params: Option<Spanned<Vec<Spanned<Scalar>>>>,
    /// Statements run in order (instead of `query`), each with its own `params`.
    #[schemars(with = "Option<Vec<RawStatement>>")]
    pub statements: Option<Spanned<Vec<Spanned<RawStatement>>>>,
    /// Whether the statements run in one transaction: all of them or none (default false: each commits on its own).
    #[schemars(with = "Option<bool>")]
    pub transaction: Option<Spanned<bool>>,
    /// Outputs from the last statement's result, which must be exactly one row: output key to column name, e.g. `{gtid: gtid_current_pos}`.
    #[schemars(with = "Option<std::collections::BTreeMap<String, String>>")]
    pub outputs: Option<Spanned<Pairs<Text>>>,
    /// An output key that receives the number of rows the last statement returned or changed.
    #[schemars(with = "Option<String>")]
    pub row_count: Option<Text>,
    /// An idempotency probe run first on the same connection: when it returns a row the work is done and the statements do not run (the outputs are then read from its result).
    #[schemars(with = "Option<RawStatement>")]
    pub check: Option<Spanned<RawStatement>>,
}

/// One SQL statement and the values of its parameters.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawStatement {
    /// The statement; `$1`, `$2` (PostgreSQL) or `?` (MySQL, MariaDB) mark its parameters.
    #[schemars(with = "String")]
    pub query: Text,
    /// The values of its parameters, in order (templates), bound, never inserted into the text.
    #[schemars(with = "Option<Vec<Scalar>>")]
    pub params: Option<Spanned<Vec<Spanned<Scalar>>>>,
}

/// A wait for a state (`until`): a command run again until it exits 0.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawUntil {
    /// How long to wait between two runs, e.g. `5s` (default 5s).
    #[schemars(with = "Option<Scalar>")]
    pub every: Option<Spanned<Scalar>>,
    /// The longest the wait may last, e.g. `10m`; then the attempt fails.
    #[schemars(with = "Scalar")]
    pub timeout: Spanned<Scalar>,
    /// A shell script run in place of the step's command after the command ran once (exit 0: the state is reached).
    #[schemars(with = "Option<String>")]
    pub probe: Option<Text>,
}

/// How a step's failed attempts are retried.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawRetry {
    /// How many attempts in all, the first included (at least 1).
    #[schemars(with = "u32")]
    pub attempts: Spanned<u32>,
    /// `constant` (default) or `exponential`.
    #[schemars(with = "Option<String>")]
    pub backoff: Option<Text>,
    /// The wait before the second attempt (default `1s`).
    #[schemars(with = "Option<Scalar>")]
    pub delay: Option<Spanned<Scalar>>,
    /// The longest wait between attempts.
    #[schemars(with = "Option<Scalar>")]
    pub max_delay: Option<Spanned<Scalar>>,
    /// Retry only when the exit code is one of these.
    #[schemars(with = "Option<Vec<i32>>")]
    pub on_exit_codes: Option<Vec<Spanned<i32>>>,
}

/// A fan-out source: an expression that gives a list, or the list itself.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum RawForEach {
    Expression(String),
    Items(Vec<serde_json::Value>),
}

/// The plan's `lock`: a key template, or a key and what a failing op does with it. Read by hand
/// (not an untagged enum), so that the mapping's values keep their places.
#[derive(Debug)]
pub enum RawLock {
    Key(String),
    Policy {
        key: Text,
        on_failure: Option<Text>,
        keep_from: Option<Text>,
    },
}

/// A lock key's template, or the key and what a failing op does with it.
#[derive(JsonSchema)]
#[serde(untagged)]
#[expect(dead_code, reason = "a schema only")]
enum RawLockSchema {
    /// The lock key's template.
    Key(String),
    Policy(RawLockPolicySchema),
}

/// The lock key and what a failing op does with it.
#[derive(JsonSchema)]
#[serde(deny_unknown_fields)]
#[expect(dead_code, reason = "a schema only")]
struct RawLockPolicySchema {
    /// The lock key's template.
    key: String,
    /// `keep` (default: a failed op holds its key until it is resumed to success or canceled) or `release` (the key is freed when the op fails, and a resume takes it again).
    on_failure: Option<OnFailureSchema>,
    /// With `on_failure: release`: the step from which on a failed op keeps its key anyway (what it changes from there on is half-done): once a task of it was launched, in any run, or it was skipped. Before that, the key is freed.
    keep_from: Option<String>,
}

#[derive(JsonSchema)]
#[serde(rename_all = "lowercase")]
#[expect(dead_code, reason = "a schema only")]
enum OnFailureSchema {
    Keep,
    Release,
}

impl<'de> Deserialize<'de> for RawLock {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct LockVisitor;
        impl<'de> Visitor<'de> for LockVisitor {
            type Value = RawLock;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a lock key, or a mapping with `key`, `on_failure` and `keep_from`")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<RawLock, E> {
                Ok(RawLock::Key(v.to_owned()))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<RawLock, E> {
                Ok(RawLock::Key(v))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawLock, A::Error> {
                // The parser refuses a key given twice.
                let (mut key, mut on_failure, mut keep_from) = (None, None, None);
                while let Some(name) = map.next_key::<String>()? {
                    match name.as_str() {
                        "key" => key = Some(map.next_value()?),
                        "on_failure" => on_failure = Some(map.next_value()?),
                        "keep_from" => keep_from = Some(map.next_value()?),
                        other => {
                            return Err(de::Error::unknown_field(
                                other,
                                &["key", "on_failure", "keep_from"],
                            ));
                        }
                    }
                }
                let key = key.ok_or_else(|| de::Error::missing_field("key"))?;
                Ok(RawLock::Policy {
                    key,
                    on_failure,
                    keep_from,
                })
            }
        }
        deserializer.deserialize_any(LockVisitor)
    }
}

/// The plan's default schedule.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawSchedule {
    /// A 5-field crontab expression, or `@hourly`, `@daily`, `@weekly`, `@monthly`, `@yearly`.
    #[schemars(with = "String")]
    pub cron: Text,
    /// The time zone the expression is read in (default UTC), e.g. `Europe/Paris`.
    #[schemars(with = "Option<String>")]
    pub timezone: Option<Text>,
}

/// Commands run around the op.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawHooks {
    /// Before the first step, in order; any failure ends the op `failed` before a step runs.
    #[schemars(with = "Option<Vec<RawHook>>")]
    pub pre: Option<Vec<Spanned<RawHook>>>,
    /// After the op succeeded.
    #[schemars(with = "Option<Vec<RawHook>>")]
    pub on_success: Option<Vec<Spanned<RawHook>>>,
    /// After the op failed.
    #[schemars(with = "Option<Vec<RawHook>>")]
    pub on_failure: Option<Vec<Spanned<RawHook>>>,
    /// After the op was canceled.
    #[schemars(with = "Option<Vec<RawHook>>")]
    pub on_cancel: Option<Vec<Spanned<RawHook>>>,
}

/// One hook: a `run` script or an `exec` command.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawHook {
    /// A name for status and logs (default: the hook's phase and position, `pre[1]`).
    pub name: Option<String>,
    /// A shell script (template).
    #[schemars(with = "Option<String>")]
    pub run: Option<Text>,
    /// A program and its arguments (each a template).
    #[schemars(with = "Option<Vec<Scalar>>")]
    pub exec: Option<Spanned<Vec<Spanned<Scalar>>>>,
    /// The shell for `run`.
    #[schemars(with = "Option<String>")]
    pub shell: Option<Text>,
    /// Environment variables (templates).
    #[schemars(with = "Option<std::collections::BTreeMap<String, Scalar>>")]
    pub env: Option<Pairs<Spanned<Scalar>>>,
    /// The working directory (template).
    #[schemars(with = "Option<String>")]
    pub cwd: Option<Text>,
    /// The host the hook runs on, over SSH (template): as a step's `on`.
    #[schemars(with = "Option<String>")]
    pub on: Option<Text>,
    /// The longest the hook may run (default 5m).
    #[schemars(with = "Option<Scalar>")]
    pub timeout: Option<Spanned<Scalar>>,
}

/// A YAML scalar read as text: `30`, `30s`, `true` and `"x"` all arrive as strings, so that the
/// check that interprets them (a duration, a size, an environment value) can say what was wrong.
#[derive(Debug, Clone, PartialEq, Eq, JsonSchema)]
#[schemars(with = "serde_json::Value")]
pub struct Scalar(pub String);

impl<'de> Deserialize<'de> for Scalar {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ScalarVisitor;
        impl Visitor<'_> for ScalarVisitor {
            type Value = Scalar;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string, number or boolean")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Scalar, E> {
                Ok(Scalar(v.to_owned()))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Scalar, E> {
                Ok(Scalar(v))
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }
        }
        deserializer.deserialize_any(ScalarVisitor)
    }
}

/// A YAML mapping kept in file order, with each key's place. Duplicate keys are rejected by the parser.
#[derive(Debug)]
pub struct Pairs<V>(pub Vec<(Text, V)>);

impl<'de, V: Deserialize<'de>> Deserialize<'de> for Pairs<V> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct PairsVisitor<V>(std::marker::PhantomData<V>);
        impl<'de, V: Deserialize<'de>> Visitor<'de> for PairsVisitor<V> {
            type Value = Pairs<V>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a mapping")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Pairs<V>, A::Error> {
                let mut pairs = Vec::new();
                while let Some(key) = map.next_key::<Text>()? {
                    pairs.push((key, map.next_value()?));
                }
                Ok(Pairs(pairs))
            }
        }
        deserializer.deserialize_map(PairsVisitor(std::marker::PhantomData))
    }
}
