//! The validated plan: what the engine runs. A [`Plan`] can only be built by [`crate::parse`], so
//! holding one means every check of `validate` passed: ids are unique, `needs` name real steps, the
//! graph has no cycle, every template compiles and names only what it may.

use std::time::Duration;

use serde_json::Value;

use crate::dag::Dag;
use crate::template::{Expr, Template};

/// The default of the plan-level `max_parallel`.
pub const DEFAULT_MAX_PARALLEL: u32 = 8;
/// The default of `log_limit`: how much of each attempt's stdout and stderr is kept.
pub const DEFAULT_LOG_LIMIT: u64 = 1 << 20;
/// The default timeout of a hook.
pub const DEFAULT_HOOK_TIMEOUT: Duration = Duration::from_secs(300);

/// A plan that passed validation.
/// What an op that fails does with its lock key (`lock.on_failure`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum OnFailure {
    /// Holds it until the op is resumed to success or canceled: its target is half-done.
    #[default]
    Keep,
    /// Frees it, so that the next op on the key (the next scheduled backup) may run; a resume
    /// takes it again.
    Release,
}

#[derive(Debug, Clone)]
pub struct Plan {
    pub name: String,
    pub description: Option<String>,
    pub params: Vec<Param>,
    /// The op's NAME column.
    pub title: Option<Template>,
    /// The lock key: ops with equal rendered keys never run at once.
    pub lock: Option<Template>,
    /// What a failing op does with its lock.
    pub lock_on_failure: OnFailure,
    /// With [`OnFailure::Release`]: the step (by index) from whose start a failing op keeps its
    /// lock anyway.
    pub lock_keep_from: Option<usize>,
    pub cooldown: Option<Duration>,
    pub max_parallel: u32,
    pub timeout: Option<Duration>,
    pub auto_resume: bool,
    pub env: Vec<EnvVar>,
    pub log_limit: u64,
    pub schedule: Option<Schedule>,
    /// In file order; a step's position is its index everywhere (`needs`, templates, the DAG).
    pub steps: Vec<Step>,
    pub hooks: Hooks,
    pub dag: Dag,
    /// The `env.*` names its templates use: what an op captures from the environment at submit.
    pub env_names: Vec<String>,
    /// The plan's text, as submitted.
    pub text: String,
    /// `sha256:<hex>` of [`Plan::text`].
    pub hash: String,
}

impl Plan {
    /// The index of the step with this id.
    #[must_use]
    pub fn step_index(&self, id: &str) -> Option<usize> {
        self.steps.iter().position(|s| s.id == id)
    }

    #[must_use]
    pub fn param(&self, name: &str) -> Option<&Param> {
        self.params.iter().find(|p| p.name == name)
    }

    /// Sub-plan paths as written, relative to the plan file's directory, with their step index.
    pub fn sub_plans(&self) -> impl Iterator<Item = (usize, &str)> {
        self.steps
            .iter()
            .enumerate()
            .filter_map(|(i, s)| match &s.action {
                Action::Plan { path, .. } => Some((i, path.as_str())),
                _ => None,
            })
    }
}

/// A parameter's type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParamType {
    String,
    Int,
    Bool,
    List,
    Map,
}

impl ParamType {
    pub const ALL: [(&'static str, Self); 5] = [
        ("string", Self::String),
        ("int", Self::Int),
        ("bool", Self::Bool),
        ("list", Self::List),
        ("map", Self::Map),
    ];

    #[must_use]
    pub fn name(self) -> &'static str {
        Self::ALL
            .iter()
            .find(|(_, t)| *t == self)
            .map_or("string", |(n, _)| n)
    }

    /// Whether `value` has this type.
    #[must_use]
    pub fn admits(self, value: &Value) -> bool {
        match self {
            Self::String => value.is_string(),
            Self::Int => value.is_i64() || value.is_u64(),
            Self::Bool => value.is_boolean(),
            Self::List => value.is_array(),
            Self::Map => value.is_object(),
        }
    }
}

/// A parameter of the plan.
#[derive(Debug, Clone, PartialEq)]
pub struct Param {
    pub name: String,
    pub ty: ParamType,
    pub required: bool,
    pub default: Option<Value>,
    /// The only values allowed, when given.
    pub choices: Option<Vec<Value>>,
    pub description: Option<String>,
    pub secret: bool,
}

/// An environment variable whose value is a template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvVar {
    pub name: String,
    pub value: Template,
}

/// The plan's default schedule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Schedule {
    /// A crontab expression, checked to parse.
    pub cron: String,
    /// An IANA time zone name, checked to exist; `UTC` when the plan names none.
    pub timezone: String,
}

/// The shell that runs `run` scripts and `check` probes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Shell {
    /// `bash -e -o pipefail -c SCRIPT`
    Bash,
    /// `sh -e -c SCRIPT`
    Sh,
    /// `PROGRAM -c SCRIPT`
    Program(String),
}

impl Shell {
    #[must_use]
    pub fn from_name(name: &str) -> Self {
        match name {
            "bash" => Self::Bash,
            "sh" => Self::Sh,
            other => Self::Program(other.to_owned()),
        }
    }

    /// The command line that runs `script`.
    #[must_use]
    pub fn command_line(&self, script: &str) -> Vec<String> {
        let mut argv: Vec<String> = match self {
            Self::Bash => vec!["bash".into(), "-e".into(), "-o".into(), "pipefail".into()],
            Self::Sh => vec!["sh".into(), "-e".into()],
            Self::Program(program) => vec![program.clone()],
        };
        argv.push("-c".into());
        argv.push(script.to_owned());
        argv
    }
}

/// What a step does.
#[derive(Debug, Clone)]
pub enum Action {
    /// A shell script; inserted values are shell-quoted.
    Run {
        script: Template,
        shell: Shell,
    },
    /// A program and its arguments, without a shell.
    Exec {
        argv: Vec<Template>,
    },
    Noop,
    Sleep(Duration),
    /// A manual gate.
    Approve {
        prompt: Template,
    },
    /// Another plan, run as a child op.
    Plan {
        path: String,
        with: Vec<(String, Arg)>,
    },
    /// SQL statements on a database server.
    Sql(Box<Sql>),
}

/// A `sql` step: statements run in order on one connection, their values bound as parameters.
#[derive(Debug, Clone)]
pub struct Sql {
    /// The server's URL (`postgres://`, `postgresql://`, `mysql://`, `mariadb://`).
    pub url: Template,
    pub statements: Vec<Statement>,
    /// All statements in one transaction.
    pub transaction: bool,
    /// Output key and the column of the last statement's single row it is read from.
    pub outputs: Vec<(String, String)>,
    /// The output key that receives the last statement's row count.
    pub row_count: Option<String>,
    /// Run first: when it returns a row, the work is done.
    pub check: Option<Statement>,
}

impl Sql {
    /// The output keys the step publishes.
    pub fn output_keys(&self) -> impl Iterator<Item = &str> {
        self.outputs
            .iter()
            .map(|(k, _)| k.as_str())
            .chain(self.row_count.as_deref())
    }
}

/// One SQL statement and its parameters' values.
#[derive(Debug, Clone)]
pub struct Statement {
    pub query: String,
    pub params: Vec<Template>,
}

impl Action {
    /// Whether running it renders a template (a command, a prompt, a sub-plan's params): a `noop`
    /// and a `sleep` render none.
    #[must_use]
    pub fn renders(&self) -> bool {
        !matches!(self, Self::Noop | Self::Sleep(_))
    }

    /// The plan key that names this kind of step.
    #[must_use]
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Run { .. } => "run",
            Self::Exec { .. } => "exec",
            Self::Noop => "noop",
            Self::Sleep(_) => "sleep",
            Self::Approve { .. } => "approve",
            Self::Plan { .. } => "plan",
            Self::Sql(_) => "sql",
        }
    }
}

/// A value passed to a sub-plan: strings are templates, other values pass as they are.
#[derive(Debug, Clone, PartialEq)]
pub enum Arg {
    Template(Template),
    Value(Value),
}

/// How a step fans out.
#[derive(Debug, Clone, PartialEq)]
pub enum ForEach {
    /// An expression giving a list (or a JSON array, or lines of text).
    Expr(Expr),
    /// A list written in the plan.
    Items(Vec<Value>),
}

/// How the wait between attempts grows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backoff {
    Constant,
    Exponential,
}

/// How failed attempts of a step are retried.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Retry {
    /// Attempts in all, the first included; 1 means no retry.
    pub attempts: u32,
    pub backoff: Backoff,
    pub delay: Duration,
    pub max_delay: Option<Duration>,
    /// Retry only on these exit codes; empty means on any failure.
    pub on_exit_codes: Vec<i32>,
}

impl Default for Retry {
    fn default() -> Self {
        Self {
            attempts: 1,
            backoff: Backoff::Constant,
            delay: Duration::from_secs(1),
            max_delay: None,
            on_exit_codes: Vec::new(),
        }
    }
}

impl Retry {
    /// The wait before attempt `attempt` (2 for the first retry); zero for the first attempt.
    #[must_use]
    pub fn delay_before(&self, attempt: u32) -> Duration {
        if attempt <= 1 {
            return Duration::ZERO;
        }
        let delay = match self.backoff {
            Backoff::Constant => self.delay,
            Backoff::Exponential => {
                let factor = 2u32.saturating_pow(attempt - 2);
                self.delay.saturating_mul(factor)
            }
        };
        self.max_delay.map_or(delay, |max| delay.min(max))
    }

    /// Whether a failure with this exit code is worth another attempt, given attempts so far.
    #[must_use]
    pub fn retries(&self, attempts_so_far: u32, exit_code: Option<i32>) -> bool {
        attempts_so_far < self.attempts
            && (self.on_exit_codes.is_empty()
                || exit_code.is_some_and(|c| self.on_exit_codes.contains(&c)))
    }
}

/// A step's `until`: its command run again, every `every`, until it exits 0, for at most
/// `timeout`; with a `probe`, the command runs once and the probe is what runs again.
#[derive(Debug, Clone)]
pub struct Until {
    pub every: Duration,
    pub timeout: Duration,
    /// A shell script run with the step's shell.
    pub probe: Option<Template>,
}

/// The pause between two runs of an `until` wait when the plan names none.
pub const DEFAULT_UNTIL_EVERY: Duration = Duration::from_secs(5);

/// One step of a plan.
#[derive(Debug, Clone)]
pub struct Step {
    pub id: String,
    pub description: Option<String>,
    /// Indexes of the steps this one needs, in the order written.
    pub needs: Vec<usize>,
    pub when: Option<Expr>,
    pub action: Action,
    pub env: Vec<EnvVar>,
    pub cwd: Option<Template>,
    /// The SSH destination its processes run on; `None`: this host.
    pub on: Option<Template>,
    pub timeout: Option<Duration>,
    pub retry: Retry,
    /// The idempotency probe: a shell script run with the step's shell.
    pub check: Option<Template>,
    /// A wait for a state: the command (or the probe) run again until it exits 0.
    pub until: Option<Until>,
    pub for_each: Option<ForEach>,
    /// With `for_each`: items at once.
    pub max_parallel: Option<u32>,
    pub continue_on_error: bool,
    /// The output keys the step promises, when declared.
    pub outputs: Option<Vec<String>>,
    pub log_limit: u64,
    /// The steps whose outputs this step's templates use (all upstream of it).
    pub uses: Vec<usize>,
    /// The params this step's templates use (`params.<name>`), sorted.
    pub params: Vec<String>,
    /// `daemon: true`: what the command leaves running outlives the step (it has an
    /// `until.probe`).
    pub daemon: bool,
    /// `adopt` (default: a step with `on`, without `until`): its command runs under a supervisor
    /// whose result a resume collects after cairn died.
    pub adopt: bool,
}

/// A hook: a command run around the op.
#[derive(Debug, Clone)]
pub struct Hook {
    /// `pre[1]`, or the name the plan gives.
    pub name: String,
    pub action: Action,
    pub env: Vec<EnvVar>,
    pub cwd: Option<Template>,
    /// The SSH destination it runs on; `None`: this host.
    pub on: Option<Template>,
    pub timeout: Duration,
}

/// The op's hooks, by phase.
#[derive(Debug, Clone, Default)]
pub struct Hooks {
    pub pre: Vec<Hook>,
    pub on_success: Vec<Hook>,
    pub on_failure: Vec<Hook>,
    pub on_cancel: Vec<Hook>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exponential_backoff_doubles_up_to_the_cap() {
        let retry = Retry {
            attempts: 6,
            backoff: Backoff::Exponential,
            delay: Duration::from_secs(5),
            max_delay: Some(Duration::from_secs(30)),
            on_exit_codes: vec![],
        };
        let delays: Vec<u64> = (1..=6).map(|a| retry.delay_before(a).as_secs()).collect();
        assert_eq!(delays, vec![0, 5, 10, 20, 30, 30]);
    }

    #[test]
    fn retry_only_listed_exit_codes() {
        let retry = Retry {
            attempts: 3,
            on_exit_codes: vec![75],
            ..Retry::default()
        };
        assert!(retry.retries(1, Some(75)));
        assert!(!retry.retries(1, Some(1)));
        assert!(!retry.retries(3, Some(75)));
    }
}
