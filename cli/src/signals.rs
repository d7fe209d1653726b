//! Ctrl-C, SIGTERM and SIGHUP stop a run cleanly: running steps are ended and the op is left
//! `interrupted`, ready to resume. (SIGHUP too: a closed terminal or a dropped ssh session must not
//! kill cairn while its steps run on.) A second one leaves at once, as a killed process would,
//! which loses nothing already recorded: for a stop that cannot be recorded (the database does not
//! answer), or finishing hooks one will not wait for. Which signal it was is recorded with the op
//! (`interrupted_by`: `signal`).

use tokio::signal::unix::{SignalKind, signal};

/// Turns the first stop signal into a stop request on `stop`, and the second into leaving now.
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
            if asked == 0 {
                // Recorded with the op: a person's (or a supervisor's) stop, which `cairn serve`
                // does not undo by resuming the op; a serving process records its own drain.
                stop.stop_by(store::Interruption::Signal, how);
                continue;
            }
            crate::output::diagnostic(
                "stopping now, without waiting for the stop to be recorded: nothing recorded is lost; the op shows `interrupted` once its owner is known gone, and `cairn resume` ends what its steps left running\n",
            );
            std::process::exit(4);
        }
    });
    Ok(())
}
