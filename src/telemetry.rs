//! Logs and metrics: the tracing subscriber, and the metric names this program publishes.
//!
//! Metrics go through the `metrics` facade, so that recording costs nothing when no exporter
//! is installed. Customer emails never become labels; labels are mapping names and outcomes.

use std::time::Duration;

use tracing_subscriber::EnvFilter;

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, with structured fields.
    Json,
}

/// Installs the global subscriber: stderr, `RUST_LOG`-style filter (default `info`).
pub fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let result = match format {
        // Colours only on a terminal: journald and log files get plain text.
        LogFormat::Text => builder
            .with_target(false)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    // A subscriber already installed (tests) is fine.
    drop(result);
}

/// The request-duration histogram's name (its buckets are set where the exporter is built).
pub const REQUEST_DURATION: &str = "resonance_sync_request_duration_seconds";

/// The outcomes `resonance_sync_events_total` counts.
pub const OUTCOMES: [&str; 3] = ["delivered", "retried", "dead_lettered"];

/// Gives every metric its help text; called once, when an exporter is installed.
pub fn describe() {
    metrics::describe_counter!(
        "resonance_sync_events_total",
        "Events by mapping and outcome: delivered (2xx, marked synced), retried, dead_lettered"
    );
    metrics::describe_gauge!(
        "resonance_sync_backlog_rows",
        "Unsynced rows still to send, dead letters excluded, as of the last count"
    );
    metrics::describe_gauge!("resonance_sync_dead_letters", "Dead letters not purged");
    metrics::describe_histogram!(
        REQUEST_DURATION,
        metrics::Unit::Seconds,
        "Duration of one request to the Resonance API"
    );
    metrics::describe_gauge!(
        "resonance_sync_last_success_timestamp_seconds",
        "Unix time of the last delivered event"
    );
}

/// Makes a mapping's event counters visible at 0 before its first event.
pub fn register_mapping(mapping: &str) {
    for outcome in OUTCOMES {
        count_event(mapping, outcome, 0);
    }
}

/// Counts events by mapping and outcome (`delivered`, `retried`, `dead_lettered`).
pub fn count_event(mapping: &str, outcome: &'static str, count: u64) {
    metrics::counter!(
        "resonance_sync_events_total",
        "mapping" => mapping.to_string(),
        "outcome" => outcome
    )
    .increment(count);
    if outcome == "delivered" && count > 0 {
        metrics::gauge!(
            "resonance_sync_last_success_timestamp_seconds",
            "mapping" => mapping.to_string()
        )
        .set(chrono::Utc::now().timestamp() as f64);
    }
}

/// Records how long one request took.
pub fn observe_request(mapping: &str, elapsed: Duration) {
    metrics::histogram!(
        REQUEST_DURATION,
        "mapping" => mapping.to_string()
    )
    .record(elapsed.as_secs_f64());
}

/// Publishes the unsynced rows still to send (dead letters excluded).
pub fn set_backlog(mapping: &str, rows: i64) {
    metrics::gauge!("resonance_sync_backlog_rows", "mapping" => mapping.to_string())
        .set(rows as f64);
}

/// Publishes the number of dead letters.
pub fn set_dead_letters(mapping: &str, rows: i64) {
    metrics::gauge!("resonance_sync_dead_letters", "mapping" => mapping.to_string())
        .set(rows as f64);
}
