//! Stopping on a signal: the first Ctrl-C, SIGTERM or SIGHUP asks a program to stop (the daemon
//! then finishes the uploads it owes, for a bounded time); a second one means now. Handlers are
//! installed when [`StopSignals::listen`] returns, so a signal that arrives while the program
//! starts up is never the default action (an instant exit).

use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio_util::sync::CancellationToken;

/// Ctrl-C, SIGTERM and SIGHUP (a closed terminal), listened for together.
pub struct StopSignals([Signal; 3]);

impl StopSignals {
    pub fn listen() -> std::io::Result<StopSignals> {
        let (int, term) = (signal(SignalKind::interrupt())?, signal(SignalKind::terminate())?);
        Ok(StopSignals([int, term, signal(SignalKind::hangup())?]))
    }

    /// Resolves at the next of them.
    pub async fn recv(&mut self) {
        let [int, term, hup] = &mut self.0;
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
            _ = hup.recv() => {}
        }
    }

    /// Cancels `stop` at the first signal and `now` at the second, in a task of its own.
    pub fn spawn(mut self, stop: CancellationToken, now: CancellationToken) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            self.recv().await;
            stop.cancel();
            self.recv().await;
            now.cancel();
        })
    }
}
