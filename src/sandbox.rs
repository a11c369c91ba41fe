//! A local stand-in for the Resonance API (`resonance-sync sandbox`), for demos, tests and benchmarks.
//!
//! It checks each event the way the real API is expected to (bearer key, exact body shape, brand),
//! honours `Idempotency-Key`, can inject failures and latency, and prints every accepted event as
//! one JSON line with its numbers exactly as received. It never logs the API key, and never prints
//! an event twice for the same idempotency key.

use std::collections::HashSet;
use std::io::{self, BufWriter, Write};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use bytes::Bytes;
use serde_json::{json, Value};
use tokio::sync::mpsc::{self, error::TryRecvError};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info};

use crate::secret::Secret;
use request::{
    check_auth, check_brand, check_content_type, idempotency_key, parse_event, Event, Rejection,
};

/// Settings from the command line.
#[derive(Debug, Clone)]
pub struct SandboxSettings {
    /// The key every request must carry as `Authorization: Bearer <key>`; None accepts any non-empty bearer token.
    pub api_key: Option<Secret>,
    /// When set, events for another brandId are refused with 403.
    pub brand_id: Option<String>,
    /// Share (0.0..=1.0) of otherwise valid requests answered 500, to exercise retries.
    pub fail_rate: f64,
    /// Added before each answer.
    pub latency: Duration,
    /// Do not print accepted events (for benchmarks).
    pub quiet: bool,
}

/// Counts since the sandbox started.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct SandboxStats {
    /// Events answered 200 with a new event id.
    pub accepted: u64,
    /// Events answered 200 because their idempotency key was already accepted.
    pub duplicates: u64,
    /// Requests refused with 400, 403, 404 or 405.
    pub rejected: u64,
    /// Requests refused with 401.
    pub unauthorized: u64,
    /// Valid requests answered 500 on purpose.
    pub injected_failures: u64,
}

/// Lines waiting for the output thread; when full, handlers wait instead of growing memory.
const OUTPUT_QUEUE: usize = 4096;
/// The longest an accepted event may sit in the output buffer under sustained load.
const FLUSH_INTERVAL: Duration = Duration::from_millis(100);
/// The fields an event must have, and the only ones it may have.
const EVENT_FIELDS: [&str; 4] = ["brandId", "eventType", "userEmail", "metadata"];

/// Serves until `shutdown` is cancelled; each accepted event is written to `out` as one JSON line.
///
/// On cancellation it stops accepting connections, finishes the requests in flight, flushes `out`
/// and returns the counts. Fails at once if `fail_rate` is outside `0.0..=1.0`, and at the end if
/// `out` could not be written.
pub async fn serve<W: Write + Send + 'static>(
    listener: tokio::net::TcpListener,
    settings: SandboxSettings,
    out: W,
    shutdown: CancellationToken,
) -> io::Result<SandboxStats> {
    if !(0.0..=1.0).contains(&settings.fail_rate) {
        let message = "the fail rate must be between 0 and 1";
        return Err(io::Error::new(io::ErrorKind::InvalidInput, message));
    }
    let address = listener.local_addr()?;
    // A dedicated thread owns `out`, so a slow terminal delays only the queue, never the runtime.
    let (lines, queue) = mpsc::channel(OUTPUT_QUEUE);
    let writer = std::thread::Builder::new()
        .name("sandbox-output".into())
        .spawn(move || write_lines(queue, out))?;
    let sandbox = Arc::new(Sandbox {
        settings,
        ledger: Mutex::default(),
        lines,
    });
    let app = Router::new()
        .route("/stats", get(stats))
        .route("/healthz", get(|| async { StatusCode::OK }))
        .fallback(dispatch)
        .with_state(Arc::clone(&sandbox));
    debug!(%address, "sandbox listening");
    let served = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await;
    // Ignored on error: the writer is then already gone and its own error is reported below.
    let _ = sandbox.lines.send(OutputMessage::Finish).await;
    let written = tokio::task::spawn_blocking(move || writer.join())
        .await
        .map_err(io::Error::other)?
        .map_err(|_| io::Error::other("sandbox output thread panicked"))?;
    served?;
    written?;
    let stats = sandbox.ledger().stats.clone();
    debug!(?stats, "sandbox stopped");
    Ok(stats)
}

/// What the handlers share.
struct Sandbox {
    settings: SandboxSettings,
    ledger: Mutex<Ledger>,
    lines: mpsc::Sender<OutputMessage>,
}

/// The counts and the accepted idempotency keys, under one lock so a key is checked and counted
/// together. The key set grows for the sandbox's lifetime, which is fine for a test receiver.
#[derive(Default)]
struct Ledger {
    stats: SandboxStats,
    accepted_keys: HashSet<String>,
}

/// What the output thread receives.
enum OutputMessage {
    /// One serialized event, newline included.
    Line(Vec<u8>),
    /// Flush and stop: the server has finished.
    Finish,
}

async fn stats(State(sandbox): State<Arc<Sandbox>>) -> Json<SandboxStats> {
    Json(sandbox.ledger().stats.clone())
}

/// Every path but `/stats` and `/healthz` lands here, so the latency applies to all of them.
async fn dispatch(
    State(sandbox): State<Arc<Sandbox>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if !sandbox.settings.latency.is_zero() {
        tokio::time::sleep(sandbox.settings.latency).await;
    }
    let path = uri.path();
    let result = if path != "/" && !path.ends_with("/manual-event") {
        Err(Rejection::NotFound)
    } else if method != Method::POST {
        Err(Rejection::MethodNotAllowed)
    } else {
        sandbox.receive(&headers, &body).await
    };
    match result {
        Ok(answer) => answer.into_response(),
        Err(rejection) => {
            rejection.count(&mut sandbox.ledger().stats);
            let status = rejection.status().as_u16();
            if let Rejection::OutputFailed = rejection {
                error!(status, path, reason = %rejection, "request failed");
            } else {
                info!(status, path, reason = %rejection, "request rejected");
            }
            rejection.into_response()
        }
    }
}

impl Sandbox {
    /// Checks one event request in the order the real API does, then records it.
    async fn receive(&self, headers: &HeaderMap, body: &[u8]) -> Result<Json<Value>, Rejection> {
        check_auth(self.settings.api_key.as_ref(), headers)?;
        check_content_type(headers)?;
        let key = idempotency_key(headers)?;
        let event = parse_event(body)?;
        check_brand(self.settings.brand_id.as_deref(), &event)?;
        if self.settings.fail_rate > 0.0 && rand::random_bool(self.settings.fail_rate) {
            return Err(Rejection::Injected);
        }
        self.record(key, &event, body).await
    }

    /// Claims the idempotency key before printing, so concurrent repeats print the event once.
    async fn record(
        &self,
        key: Option<String>,
        event: &Event,
        body: &[u8],
    ) -> Result<Json<Value>, Rejection> {
        if let Some(key) = &key {
            let mut ledger = self.ledger();
            if !ledger.accepted_keys.insert(key.clone()) {
                ledger.stats.duplicates += 1;
                debug!(key, "duplicate event");
                return Ok(Json(json!({ "success": true, "duplicate": true })));
            }
        }
        if !self.settings.quiet {
            let line = output_line(key.as_deref(), body);
            if self.lines.send(OutputMessage::Line(line)).await.is_err() {
                if let Some(key) = &key {
                    self.ledger().accepted_keys.remove(key);
                }
                return Err(Rejection::OutputFailed);
            }
        }
        self.ledger().stats.accepted += 1;
        let event_id = uuid::Uuid::new_v4().to_string();
        debug!(key, event_id, event.event_type, "event accepted");
        Ok(Json(json!({ "success": true, "eventId": event_id })))
    }

    fn ledger(&self) -> MutexGuard<'_, Ledger> {
        // Every update is a single insert or increment, so a poisoned ledger is still consistent.
        self.ledger.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// One output line: `{"received_at", "idempotency_key", "event"}` and a newline.
fn output_line(key: Option<&str>, body: &[u8]) -> Vec<u8> {
    // The body was checked already; it is read again in full only to be printed.
    let event: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let received_at = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let mut line = json!({ "received_at": received_at, "idempotency_key": key, "event": event })
        .to_string()
        .into_bytes();
    line.push(b'\n');
    line
}

/// The output thread: writes lines as they come, flushing whenever the queue runs dry and at
/// least every [`FLUSH_INTERVAL`] while it does not, so bursts share one write.
fn write_lines<W: Write>(mut queue: mpsc::Receiver<OutputMessage>, out: W) -> io::Result<()> {
    let mut out = BufWriter::with_capacity(64 * 1024, out);
    let mut last_flush = Instant::now();
    loop {
        let message = match queue.try_recv() {
            Ok(message) => message,
            Err(TryRecvError::Empty) => {
                out.flush().inspect_err(log_output_error)?;
                last_flush = Instant::now();
                match queue.blocking_recv() {
                    Some(message) => message,
                    None => break,
                }
            }
            Err(TryRecvError::Disconnected) => break,
        };
        let OutputMessage::Line(line) = message else {
            break;
        };
        out.write_all(&line).inspect_err(log_output_error)?;
        if last_flush.elapsed() >= FLUSH_INTERVAL {
            out.flush().inspect_err(log_output_error)?;
            last_flush = Instant::now();
        }
    }
    out.flush().inspect_err(log_output_error)
}

fn log_output_error(error: &io::Error) {
    error!(%error, "cannot write accepted events; further events are refused with 500");
}

mod request;
