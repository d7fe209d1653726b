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
    /// The op ended other than succeeded; already reported.
    #[error("op ended with code {0}")]
    Op(u8),
}

pub const OP_FAILED: u8 = 1;
pub const BAD_INPUT: u8 = 2;
pub const OP_CANCELED: u8 = 3;
pub const OP_INTERRUPTED: u8 = 4;

impl From<engine::Error> for Failure {
    fn from(e: engine::Error) -> Self {
        Self::BadInput(e.into())
    }
}

impl From<store::Error> for Failure {
    fn from(e: store::Error) -> Self {
        Self::BadInput(e.into())
    }
}

pub fn code(result: Result<(), Failure>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Reported) => ExitCode::from(BAD_INPUT),
        Err(Failure::Op(code)) => ExitCode::from(code),
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

/// The lock key op `op` holds once it failed (a failed op keeps its lock), if any.
pub fn held_lock(store: &store::Store, op: store::OpId, end: &engine::RunEnd) -> Option<String> {
    if !matches!(end, engine::RunEnd::Failed(_)) {
        return None;
    }
    let locks = store.reader().ok()?.locks().ok()?;
    locks.into_iter().find(|l| l.op == op).map(|l| l.key)
}

/// The exit code of a run of op `op` that ended as `end`; `lock` is the key the op holds, if any.
pub fn of_run(end: &engine::RunEnd, op: store::OpId, lock: Option<&str>) -> Result<(), Failure> {
    match end {
        engine::RunEnd::Succeeded => Ok(()),
        engine::RunEnd::Failed(_) => {
            // A failed op keeps its lock (its target is half-done): say so, and how to let go.
            let keeps = lock.map_or(String::new(), |key| {
                let key = crate::output::shown(key);
                format!(
                    "; until then it keeps its lock `{key}`, which `cairn cancel {op}` releases"
                )
            });
            crate::output::diagnostic(&format!(
                "op {op} failed; after fixing the cause, continue it with `cairn resume {op}`{keeps}\n"
            ));
            Err(Failure::Op(OP_FAILED))
        }
        engine::RunEnd::Canceled(why) => {
            let why = crate::output::shown(why);
            crate::output::diagnostic(&format!("op {op} canceled ({why})\n"));
            Err(Failure::Op(OP_CANCELED))
        }
        engine::RunEnd::Interrupted => {
            crate::output::diagnostic(&format!(
                "op {op} interrupted; continue it with `cairn resume {op}`\n"
            ));
            Err(Failure::Op(OP_INTERRUPTED))
        }
        // Only `cairn serve` parks an op; it is not an end.
        engine::RunEnd::Parked => {
            crate::output::diagnostic(&format!(
                "op {op} waits for approval; `cairn serve` goes on with it once answered\n"
            ));
            Err(Failure::Op(OP_INTERRUPTED))
        }
        engine::RunEnd::LostOwnership(why) => {
            let why = crate::output::shown(why);
            crate::output::diagnostic(&format!(
                "op {op}: stopped running it and wrote nothing more: {why}\n"
            ));
            Err(Failure::Op(OP_INTERRUPTED))
        }
        engine::RunEnd::StoreFailed(why) => {
            let why = crate::output::shown(why);
            crate::output::diagnostic(&format!(
                "op {op}: cannot record progress any more ({why}); its steps were stopped. Once the cause is fixed, `cairn resume {op}` continues it\n"
            ));
            Err(Failure::Op(OP_INTERRUPTED))
        }
    }
}
