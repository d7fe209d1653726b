//! Ctrl-C, SIGTERM and SIGHUP stop a run cleanly: running steps are ended and the op is left
//! `interrupted`, ready to resume. (SIGHUP too: a closed terminal or a dropped ssh session must not
//! kill cairn while its steps run on.)

use tokio::signal::unix::{SignalKind, signal};

/// Turns the first stop signal into a stop request on `stop`.
pub fn watch(stop: engine::StopHandle) -> std::io::Result<()> {
    let mut int = signal(SignalKind::interrupt())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut hup = signal(SignalKind::hangup())?;
    tokio::spawn(async move {
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
            _ = hup.recv() => {}
        }
        stop.stop();
    });
    Ok(())
}
