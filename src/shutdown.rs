//! Turns SIGTERM and SIGINT into a cancellation token; a second signal exits at once.

use tokio_util::sync::CancellationToken;

/// A token cancelled at the first SIGTERM or SIGINT.
pub fn on_signal() -> CancellationToken {
    on_signal_saying(
        "stopping: no new rows are claimed; requests in flight finish and are marked",
        "second signal: exiting now; unfinished claims expire with their lease",
    )
}

/// As [`on_signal`], with what the process says at the first and the second signal.
pub fn on_signal_saying(stopping: &'static str, exiting: &'static str) -> CancellationToken {
    let token = CancellationToken::new();
    let cancel = token.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("{stopping}");
        cancel.cancel();
        wait_for_signal().await;
        tracing::warn!("{exiting}");
        std::process::exit(130);
    });
    token
}

#[cfg(unix)]
async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        // Without signal handlers the process still stops on the default action.
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

#[cfg(not(unix))]
async fn wait_for_signal() {
    let _ = tokio::signal::ctrl_c().await;
}
