//! A local stand-in for the Resonance API (`resonance-sync sandbox`), for demos, tests and benchmarks.
//!
//! It checks each event the way the real API is expected to (bearer key, exact body shape, brand),
//! honours `Idempotency-Key`, can inject failures and latency, and prints every accepted event as
//! one JSON line with its numbers exactly as received. It never logs the API key, and never prints
//! an event twice for the same idempotency key.

use std::collections::{BTreeMap, HashSet};
use std::io::{self, BufWriter, Write};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::header::{AUTHORIZATION, CONTENT_TYPE};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use bytes::Bytes;
use serde_json::value::RawValue;
use serde_json::{json, Value};
use tokio::sync::mpsc::{self, error::TryRecvError};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info};

use crate::secret::Secret;

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

/// Why a request was not accepted; each variant decides the status and the counter.
#[derive(Debug, thiserror::Error)]
enum Rejection {
    #[error("{0}")]
    Unauthorized(&'static str),
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("no such endpoint")]
    NotFound,
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error("injected failure")]
    Injected,
    #[error("could not record the event: sandbox output failed")]
    OutputFailed,
}

impl Rejection {
    fn status(&self) -> StatusCode {
        match self {
            Rejection::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Rejection::BadRequest(_) => StatusCode::BAD_REQUEST,
            Rejection::Forbidden(_) => StatusCode::FORBIDDEN,
            Rejection::NotFound => StatusCode::NOT_FOUND,
            Rejection::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Rejection::Injected | Rejection::OutputFailed => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn count(&self, stats: &mut SandboxStats) {
        match self {
            Rejection::Unauthorized(_) => stats.unauthorized += 1,
            Rejection::Injected => stats.injected_failures += 1,
            Rejection::OutputFailed => {}
            _ => stats.rejected += 1,
        }
    }
}

impl IntoResponse for Rejection {
    fn into_response(self) -> Response {
        (self.status(), Json(json!({ "error": self.to_string() }))).into_response()
    }
}

fn bad(message: impl Into<String>) -> Rejection {
    Rejection::BadRequest(message.into())
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

fn check_auth(expected: Option<&Secret>, headers: &HeaderMap) -> Result<(), Rejection> {
    let header = headers
        .get(AUTHORIZATION)
        .ok_or(Rejection::Unauthorized("missing Authorization header"))?;
    let token = header
        .to_str()
        .ok()
        .and_then(bearer_token)
        .ok_or(Rejection::Unauthorized(
            "Authorization header must be `Bearer <key>`",
        ))?;
    match expected {
        Some(key) if !keys_match(key.expose().as_bytes(), token.as_bytes()) => {
            Err(Rejection::Unauthorized("invalid API key"))
        }
        _ => Ok(()),
    }
}

/// The token of a `Bearer <token>` header value; the scheme is case-insensitive (RFC 9110).
fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// Compares without stopping at the first differing byte, so timing does not reveal the key
/// a byte at a time. The length may leak; that is acceptable for a local sandbox.
fn keys_match(expected: &[u8], given: &[u8]) -> bool {
    expected.len() == given.len()
        && expected
            .iter()
            .zip(given)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

fn check_content_type(headers: &HeaderMap) -> Result<(), Rejection> {
    let is_json = headers
        .get(CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.split(';').next())
        .is_some_and(|media| media.trim().eq_ignore_ascii_case("application/json"));
    is_json
        .then_some(())
        .ok_or_else(|| bad("Content-Type must be application/json"))
}

fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, Rejection> {
    let read = |value: &HeaderValue| {
        let key = value.to_str().map(str::trim).unwrap_or_default();
        let message = "Idempotency-Key header must be non-empty visible ASCII";
        (!key.is_empty())
            .then(|| key.to_string())
            .ok_or_else(|| bad(message))
    };
    headers.get("idempotency-key").map(read).transpose()
}

/// The fields of an event the sandbox looks at; the rest of the body is only checked.
struct Event {
    brand_id: String,
    event_type: String,
}

/// Checks the body's shape without building a tree of it: each field is kept as raw JSON text
/// and only the strings are decoded. (The printed line re-reads the body, numbers exact.)
fn parse_event(body: &[u8]) -> Result<Event, Rejection> {
    // One pass reads a valid event; only a body it refuses is read again, to say whether it is
    // not JSON at all or JSON of another shape.
    let fields: BTreeMap<String, &RawValue> = serde_json::from_slice(body).map_err(|refused| {
        match serde_json::from_slice::<&RawValue>(body) {
            Ok(raw) if !raw.get().starts_with('{') => bad("body must be a JSON object"),
            Ok(_) => bad(format!("body is not valid JSON: {refused}")),
            Err(e) => bad(format!("body is not valid JSON: {e}")),
        }
    })?;
    if let Some(extra) = fields
        .keys()
        .find(|name| !EVENT_FIELDS.contains(&name.as_str()))
    {
        return Err(bad(format!("unexpected field {extra:?}")));
    }
    let brand_id = required_string(&fields, "brandId")?;
    let event_type = required_string(&fields, "eventType")?;
    if !required_string(&fields, "userEmail")?.contains('@') {
        return Err(bad("field \"userEmail\" must contain '@'"));
    }
    match fields.get("metadata") {
        Some(metadata) if metadata.get().starts_with('{') => Ok(Event {
            brand_id,
            event_type,
        }),
        Some(_) => Err(bad("field \"metadata\" must be an object")),
        None => Err(bad("missing field \"metadata\"")),
    }
}

fn required_string(fields: &BTreeMap<String, &RawValue>, name: &str) -> Result<String, Rejection> {
    let raw = fields
        .get(name)
        .ok_or_else(|| bad(format!("missing field {name:?}")))?;
    match serde_json::from_str::<String>(raw.get()) {
        Ok(text) if !text.trim().is_empty() => Ok(text),
        _ => Err(bad(format!("field {name:?} must be a non-empty string"))),
    }
}

fn check_brand(expected: Option<&str>, event: &Event) -> Result<(), Rejection> {
    match expected {
        Some(expected) if expected != event.brand_id => Err(Rejection::Forbidden(format!(
            "brandId {:?} is not the sandbox's brand",
            event.brand_id
        ))),
        _ => Ok(()),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_scheme_is_case_insensitive_and_needs_a_token() {
        assert_eq!(bearer_token("Bearer abc"), Some("abc"));
        assert_eq!(bearer_token("bearer  abc "), Some("abc"));
        assert_eq!(bearer_token("Bearer "), None);
        assert_eq!(bearer_token("Basic abc"), None);
        assert_eq!(bearer_token("abc"), None);
    }

    #[test]
    fn keys_match_only_when_identical() {
        assert!(keys_match(b"sk_test", b"sk_test"));
        assert!(!keys_match(b"sk_test", b"sk_tesT"));
        assert!(!keys_match(b"sk_test", b"sk_test2"));
    }
}
