//! One module per subcommand.

pub mod approve;
pub mod cancel;
pub mod completions;
pub mod db;
pub mod graph;
pub mod locks;
pub mod logs;
pub mod mark;
pub mod nodes;
pub mod pause;
pub mod resume;
pub mod run;
pub mod schedule;
pub mod schema;
pub mod serve;
pub mod show;
pub mod status;
pub mod submit;
pub mod token;
pub mod validate;
