//! One module per subcommand.

pub mod graph;
pub mod logs;
pub mod resume;
pub mod run;
pub mod schema;
pub mod show;
pub mod status;
pub mod validate;
