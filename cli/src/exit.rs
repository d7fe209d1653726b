//! Exit codes, one meaning each (the command-line contract):
//! `0` done (or the op succeeded), `1` the op failed, `2` bad input (usage, plan, params, unknown
//! op, unusable database), `3` the op was canceled, `4` the op was interrupted and can be resumed.

use std::process::ExitCode;

/// An outcome other than success, as the command reports it.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    /// Bad input, already explained to the user on stderr.
    #[error("bad input")]
    Reported,
    /// Bad input, explained by the error.
    #[error(transparent)]
    BadInput(#[from] anyhow::Error),
}

pub const BAD_INPUT: u8 = 2;

pub fn code(result: Result<(), Failure>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Reported) => ExitCode::from(BAD_INPUT),
        Err(Failure::BadInput(err)) => {
            // A closed pipe on stdout (`cairn ... | head`) is not an error.
            if err
                .downcast_ref::<std::io::Error>()
                .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
            {
                return ExitCode::SUCCESS;
            }
            crate::output::error(&err);
            ExitCode::from(BAD_INPUT)
        }
    }
}
