//! Ctrl-C, SIGTERM and SIGHUP stop a run cleanly: running steps are ended and the op is left
//! `interrupted`, ready to resume. (SIGHUP too: a closed terminal or a dropped ssh session must not
//! kill cairn while its steps run on.) A second one ends the steps at once (KILL, no more grace),
//! and the stop is still recorded. Should recording it not finish soon after (the database does
//! not answer), or at a third signal, cairn leaves as a killed process would, which loses nothing
//! already recorded. Which signal it was is recorded with the op (`interrupted_by`: `signal`).

use std::time::Duration;

use tokio::signal::unix::{SignalKind, signal};

/// How long after a second signal cairn waits for the stop to be recorded before it leaves:
/// the steps are killed in milliseconds, and a store that answers records the stop in less.
const RECORD_AFTER_SECOND: Duration = Duration::from_secs(5);

/// Turns the first stop signal into a stop request on `stop`, the second into ending the steps
/// now, and the third (or a stop not recorded in time after the second) into leaving now.
pub fn watch(stop: engine::StopHandle) -> std::io::Result<()> {
    let mut int = signal(SignalKind::interrupt())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut hup = signal(SignalKind::hangup())?;
    tokio::spawn(async move {
        for asked in 0.. {
            let how = tokio::select! {
                _ = int.recv() => "Ctrl-C (SIGINT) from the terminal",
                _ = term.recv() => "SIGTERM",
                _ = hup.recv() => "SIGHUP (its terminal closed)",
            };
            match asked {
                // Recorded with the op: a person's (or a supervisor's) stop, which `cairn serve`
                // does not undo by resuming the op; a serving process records its own drain.
                0 => stop.stop_by(store::Interruption::Signal, how),
                1 => {
                    crate::output::diagnostic("second interrupt: ending the steps now\n");
                    stop.hurry();
                    tokio::spawn(async {
                        tokio::time::sleep(RECORD_AFTER_SECOND).await;
                        leave();
                    });
                }
                _ => leave(),
            }
        }
    });
    Ok(())
}

/// Leaves at once, without waiting for the stop to be recorded.
fn leave() -> ! {
    crate::output::diagnostic(
        "stopping now, without waiting for the stop to be recorded: nothing recorded is lost; the op shows `interrupted` once its owner is known gone, and `cairn resume` ends what its steps left running\n",
    );
    std::process::exit(4);
}
