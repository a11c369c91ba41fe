//! What `run` adds around the mapping loops when it runs as a service: the operator endpoint
//! (`[metrics] listen`), the systemd notifications and watchdog, and a SIGHUP that explains
//! rather than kills. None of it touches rows; if it fails to start, nothing has been claimed.

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::app::{AppError, Engine};
use crate::config::Config;
use crate::health::{Liveness, DEFAULT_STALE_AFTER};
use crate::server::{self, Probes};
use crate::systemd::{self, Systemd};

/// The service extras of a running `run`; [`Service::finish`] ends them after the loops.
pub struct Service {
    tasks: Vec<JoinHandle<()>>,
    finished: CancellationToken,
}

/// Starts the endpoint (when configured) and tells systemd (when present) that `run` is ready:
/// the config is valid and the database answered while the engine was built.
pub async fn start(
    config: &Config,
    engine: &Engine,
    shutdown: &CancellationToken,
) -> Result<Service, AppError> {
    let systemd = Systemd::from_env();
    let liveness = Liveness {
        lanes: engine.lanes.clone(),
        stale_after: systemd
            .as_ref()
            .and_then(Systemd::watchdog)
            .unwrap_or(DEFAULT_STALE_AFTER),
    };
    let finished = CancellationToken::new();
    let mut tasks = Vec::new();
    if let Some(metrics) = &config.metrics {
        let probes = Probes {
            shared: engine.shared.clone(),
            liveness: liveness.clone(),
            db_timeout: config.database.connect_timeout,
        };
        tasks.push(start_endpoint(metrics.listen, engine, probes, finished.clone()).await?);
    }
    if let Some(systemd) = systemd {
        systemd.ready(&systemd::status_line(&systemd::snapshots(&engine.lanes)));
        tracing::info!(
            watchdog_s = systemd.watchdog().map(|w| w.as_secs_f64()),
            "told systemd the service is ready"
        );
        tasks.push(tokio::spawn(systemd::supervise(
            systemd,
            liveness,
            shutdown.clone(),
            finished.clone(),
        )));
    }
    Ok(Service { tasks, finished })
}

/// Binds `[metrics] listen` (a failure is a config error: nothing has been claimed yet) and
/// serves the endpoint until `finished`.
async fn start_endpoint(
    listen: std::net::SocketAddr,
    engine: &Engine,
    probes: Probes,
    finished: CancellationToken,
) -> Result<JoinHandle<()>, AppError> {
    let listener = tokio::net::TcpListener::bind(listen).await.map_err(|e| {
        AppError::Config(format!("[metrics] listen: cannot listen on {listen}: {e}"))
    })?;
    let handle = server::recorder();
    for lane in &engine.lanes {
        crate::telemetry::register_mapping(lane.name());
    }
    let address = listener.local_addr().map_or(listen, |a| a);
    tracing::info!(%address, "serving /metrics, /healthz and /readyz");
    Ok(tokio::spawn(async move {
        if let Err(error) = server::serve(listener, handle, probes, finished).await {
            tracing::error!(%error, "the metrics endpoint stopped");
        }
    }))
}

impl Service {
    /// Ends the endpoint and the notifications; called once the loops have returned.
    pub async fn finish(self) {
        self.finished.cancel();
        for task in self.tasks {
            let _ = task.await;
        }
    }
}

/// Until `shutdown`: answers SIGHUP with a log line instead of the default action, which would
/// kill the daemon. The config is not reloaded: a restart is graceful and re-reads everything.
pub fn explain_hangups(shutdown: &CancellationToken) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let Ok(mut hangups) = signal(SignalKind::hangup()) else {
            tracing::warn!("cannot handle SIGHUP; it would stop the daemon");
            return;
        };
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    received = hangups.recv() => {
                        if received.is_none() {
                            return;
                        }
                        tracing::warn!(
                            "SIGHUP received: the configuration is not reloaded; to apply a \
                             changed config, restart the service (systemctl restart \
                             resonance-sync), which finishes the requests in flight first"
                        );
                    }
                }
            }
        });
    }
    #[cfg(not(unix))]
    let _ = shutdown;
}
