//! The cairn plan format: a YAML file of parameters, steps and their dependencies, hooks and a lock.
//! This crate is pure: it reads text it is given and knows nothing of databases or processes.
//!
//! - [`raw`]: the file as written, with source spans. [`bundle`]: a plan with its sub-plans.
//! - [`validate`]: raw → [`Plan`], collecting every problem ([`parse`] is the entry point).
//! - [`model`]: the validated plan the engine runs.
//! - [`template`]: `{{ }}` templates with strict names and shell quoting; `when` expressions.
//! - [`dag`]: topological order, cycles, upstream queries.
//! - [`diag`]: problems with `file:line:col`, rendered for people or as JSON.
//! - [`params`]: the values an op is given, read as their params' types.
//! - [`limits`]: how large a plan or params file may be.
//! - [`graph`]: the DAG as text, dot or mermaid. [`schema`]: the JSON Schema. [`units`]: durations
//!   and sizes. [`cron`]: crontab expressions.

pub mod bundle;
pub mod cron;
pub mod dag;
pub mod diag;
pub mod drift;
pub mod graph;
pub mod limits;
pub mod model;
pub mod params;
pub mod raw;
pub mod schema;
pub mod template;
pub mod units;
pub mod validate;

pub use diag::{Problem, Problems};
pub use model::{Action, Param, ParamType, Plan, Step};
pub use validate::{parse, parse_bytes, suggest};
