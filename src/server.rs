//! The optional operator endpoint (`[metrics] listen`): `/metrics` in the Prometheus text
//! format, `/healthz` (the process and its mapping loops are alive) and `/readyz` (the database
//! answers and the API accepts the key). Read-only: it never touches a row.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::health::{not_ready, Liveness};
use crate::sync::Shared;
use crate::telemetry::REQUEST_DURATION;

/// Buckets of `resonance_sync_request_duration_seconds`, in seconds: from a fast local API up
/// to the longest sensible request timeout.
pub const REQUEST_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// How often histograms and idle series are maintained.
const UPKEEP_EVERY: Duration = Duration::from_secs(5);

/// The Prometheus recorder's handle, installing the recorder on first use.
///
/// The `metrics` facade has exactly one global recorder per process, so this is the one piece of
/// global state: installed once, its handle shared by every `run` of the process (tests start
/// several).
pub fn recorder() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Full(REQUEST_DURATION.into()), REQUEST_BUCKETS)
                .unwrap_or_else(|error| {
                    tracing::warn!(%error, "histogram buckets refused; request durations are summaries");
                    PrometheusBuilder::new()
                });
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            if let Err(error) = metrics::set_global_recorder(recorder) {
                tracing::warn!(%error, "another metrics recorder is installed; /metrics stays empty");
            }
            crate::telemetry::describe();
            handle
        })
        .clone()
}

/// What the health checks look at.
#[derive(Debug, Clone)]
pub struct Probes {
    pub shared: Arc<Shared>,
    pub liveness: Liveness,
    /// The longest a readiness check waits for the database.
    pub db_timeout: Duration,
}

#[derive(Clone)]
struct AppState {
    metrics: PrometheusHandle,
    probes: Probes,
}

/// Serves the endpoint on `listener` until `stop` is cancelled.
pub async fn serve(
    listener: TcpListener,
    metrics: PrometheusHandle,
    probes: Probes,
    stop: CancellationToken,
) -> std::io::Result<()> {
    let upkeep = tokio::spawn(upkeep(metrics.clone(), stop.clone()));
    let app = Router::new()
        .route("/metrics", get(render_metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(AppState { metrics, probes });
    let result = axum::serve(listener, app)
        .with_graceful_shutdown(async move { stop.cancelled().await })
        .await;
    upkeep.abort();
    result
}

async fn upkeep(metrics: PrometheusHandle, stop: CancellationToken) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(UPKEEP_EVERY) => metrics.run_upkeep(),
        }
    }
}

async fn render_metrics(State(state): State<AppState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(),
    )
        .into_response()
}

async fn healthz(State(state): State<AppState>) -> Response {
    let stuck = state.probes.liveness.stuck();
    if stuck.is_empty() {
        return (StatusCode::OK, "ok\n").into_response();
    }
    let text: Vec<String> = stuck
        .iter()
        .map(|(mapping, stalled)| {
            format!("mapping '{mapping}': loop stuck for {}s", stalled.as_secs())
        })
        .collect();
    (
        StatusCode::SERVICE_UNAVAILABLE,
        format!("{}\n", text.join("\n")),
    )
        .into_response()
}

async fn readyz(State(state): State<AppState>) -> Response {
    let probes = &state.probes;
    match not_ready(&probes.shared, probes.db_timeout).await {
        None => (StatusCode::OK, "ready\n").into_response(),
        Some(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {reason}\n"),
        )
            .into_response(),
    }
}
