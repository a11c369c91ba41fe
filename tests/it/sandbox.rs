//! Specification of `resonance-sync sandbox`, the local stand-in for the Resonance API: each test
//! starts a real sandbox on `127.0.0.1:0`, talks HTTP to it, then shuts it down and reads what it
//! printed. Output is read only after shutdown, which flushes it, so no test waits on a timer.

use std::io::{self, Write};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use resonance_sync::sandbox::{serve, SandboxSettings, SandboxStats};
use resonance_sync::secret::Secret;
use serde_json::{json, Value};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const KEY: &str = "sk_test_sandbox";
const ENDPOINT: &str = "/resonance-api/manual-event";
const JSON: &str = "application/json";
const EVENT: &str = r#"{"brandId":"acme","eventType":"purchase","userEmail":"ada@example.com","metadata":{"order_value":49.90,"big":12345678901234567.89,"sku":"A-1"}}"#;

type Request = reqwest::RequestBuilder;

/// `out` for the sandbox: a buffer the test can read after shutdown.
#[derive(Clone, Default)]
struct SharedBuffer(Arc<Mutex<Vec<u8>>>);

impl Write for SharedBuffer {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        self.0.lock().expect("buffer lock").extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A running sandbox and a client for it.
struct Harness {
    base: String,
    client: reqwest::Client,
    shutdown: CancellationToken,
    server: JoinHandle<io::Result<SandboxStats>>,
    out: SharedBuffer,
}

/// A status and the JSON body (`Null` when the body is not JSON).
struct Answer {
    status: u16,
    body: Value,
}

/// Settings that accept [`EVENT`] sent with [`KEY`].
fn settings() -> SandboxSettings {
    SandboxSettings {
        api_key: Some(Secret::new(KEY)),
        brand_id: None,
        fail_rate: 0.0,
        latency: Duration::ZERO,
        quiet: false,
    }
}

impl Harness {
    /// A sandbox with [`settings`] changed by `edit`.
    async fn start(edit: impl FnOnce(&mut SandboxSettings)) -> Harness {
        let mut settings = settings();
        edit(&mut settings);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let base = format!("http://{}", listener.local_addr().expect("address"));
        let out = SharedBuffer::default();
        let shutdown = CancellationToken::new();
        let server = tokio::spawn(serve(listener, settings, out.clone(), shutdown.clone()));
        let client = reqwest::Client::new();
        Harness {
            base,
            client,
            shutdown,
            server,
            out,
        }
    }

    /// A POST of `body` to `path` with the given `Authorization` (if any) and `Content-Type`.
    fn post(
        &self,
        path: &str,
        authorization: Option<&str>,
        content_type: &str,
        body: &str,
    ) -> Request {
        let request = self.client.post(format!("{}{path}", self.base));
        let request = match authorization {
            Some(value) => request.header("authorization", value),
            None => request,
        };
        request
            .header("content-type", content_type)
            .body(body.to_string())
    }

    /// Posts `body` to the usual endpoint with the right key and content type.
    async fn post_event(&self, body: &str, idempotency_key: Option<&str>) -> Answer {
        let request = self.post(ENDPOINT, Some(&format!("Bearer {KEY}")), JSON, body);
        match idempotency_key {
            Some(key) => answer(request.header("idempotency-key", key)).await,
            None => answer(request).await,
        }
    }

    async fn get(&self, path: &str) -> Answer {
        answer(self.client.get(format!("{}{path}", self.base))).await
    }

    /// Stops the sandbox and returns its final counts and the lines it printed.
    async fn finish(self) -> (SandboxStats, Vec<String>) {
        self.shutdown.cancel();
        let stats = self.server.await.expect("join").expect("serve");
        let printed = String::from_utf8(self.out.0.lock().expect("lock").clone()).expect("utf-8");
        (stats, printed.lines().map(str::to_string).collect())
    }
}

async fn answer(request: Request) -> Answer {
    let response = request.send().await.expect("send");
    let status = response.status().as_u16();
    let text = response.text().await.expect("body");
    let body = serde_json::from_str(&text).unwrap_or(Value::Null);
    Answer { status, body }
}

fn error_of(answer: &Answer) -> &str {
    answer.body["error"].as_str().unwrap_or("")
}

/// [`EVENT`] with `field` set to the JSON text `value`, or removed when `value` is None.
fn event_with(field: &str, value: Option<&str>) -> String {
    let mut event: serde_json::Map<String, Value> = serde_json::from_str(EVENT).expect("EVENT");
    match value {
        Some(value) => event.insert(field.into(), serde_json::from_str(value).expect("value")),
        None => event.remove(field),
    };
    Value::Object(event).to_string()
}

#[tokio::test]
async fn an_accepted_event_is_printed_once_with_its_numbers_exact() {
    let sandbox = Harness::start(|_| {}).await;

    let answer = sandbox.post_event(EVENT, Some("orders:1")).await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.body["success"], true);
    assert!(answer.body["eventId"]
        .as_str()
        .is_some_and(|id| !id.is_empty()));

    let (stats, lines) = sandbox.finish().await;
    assert_eq!(lines.len(), 1);
    assert!(
        lines[0].contains(r#""order_value":49.90,"big":12345678901234567.89"#),
        "{}",
        lines[0]
    );
    let line: Value = serde_json::from_str(&lines[0]).expect("line is JSON");
    assert_eq!(line["idempotency_key"], "orders:1");
    assert_eq!(line["event"]["userEmail"], "ada@example.com");
    let received_at = line["received_at"].as_str().expect("received_at");
    assert!(
        chrono::DateTime::parse_from_rfc3339(received_at).is_ok(),
        "{received_at}"
    );
    assert_eq!(stats.accepted, 1);
}

#[tokio::test]
async fn a_repeated_idempotency_key_is_answered_as_a_duplicate_and_not_printed_again() {
    let sandbox = Harness::start(|_| {}).await;

    let first = sandbox.post_event(EVENT, Some("orders:7")).await;
    let second = sandbox.post_event(EVENT, Some("orders:7")).await;
    assert_eq!(first.status, 200);
    assert_eq!(second.status, 200);
    assert_eq!(second.body, json!({"success": true, "duplicate": true}));

    let (stats, lines) = sandbox.finish().await;
    assert_eq!(lines.len(), 1);
    assert_eq!((stats.accepted, stats.duplicates), (1, 1));
}

#[tokio::test]
async fn concurrent_repeats_of_one_key_are_printed_once() {
    let sandbox = Harness::start(|_| {}).await;

    let repeats = (0..16).map(|_| sandbox.post_event(EVENT, Some("race")));
    let answers = futures::future::join_all(repeats).await;
    assert!(answers.iter().all(|answer| answer.status == 200));

    let (stats, lines) = sandbox.finish().await;
    assert_eq!(lines.len(), 1);
    assert_eq!((stats.accepted, stats.duplicates), (1, 15));
}

#[tokio::test]
async fn events_without_an_idempotency_key_are_never_deduplicated() {
    let sandbox = Harness::start(|_| {}).await;

    assert_eq!(sandbox.post_event(EVENT, None).await.status, 200);
    assert_eq!(sandbox.post_event(EVENT, None).await.status, 200);

    let (stats, lines) = sandbox.finish().await;
    assert_eq!(lines.len(), 2);
    let line: Value = serde_json::from_str(&lines[0]).expect("line is JSON");
    assert_eq!(line["idempotency_key"], Value::Null);
    assert_eq!((stats.accepted, stats.duplicates), (2, 0));
}

#[tokio::test]
async fn a_missing_malformed_or_wrong_key_is_401() {
    let sandbox = Harness::start(|_| {}).await;
    let cases = [
        (None, "missing Authorization"),
        (Some("Basic abc"), "Bearer"),
        (Some("Bearer "), "Bearer"),
        (Some("Bearer sk_test_sandboz"), "invalid API key"),
        (Some("Bearer sk_wrong"), "invalid API key"),
    ];

    for (authorization, expected) in cases {
        let answer = answer(sandbox.post(ENDPOINT, authorization, JSON, EVENT)).await;
        let error = error_of(&answer);
        assert_eq!(answer.status, 401, "{authorization:?}");
        assert!(
            error.contains(expected) && !error.contains(KEY),
            "{authorization:?}: {error}"
        );
    }

    let (stats, lines) = sandbox.finish().await;
    assert!(lines.is_empty());
    assert_eq!(
        (stats.unauthorized, stats.accepted),
        (cases.len() as u64, 0)
    );
}

#[tokio::test]
async fn without_a_configured_key_any_bearer_token_is_accepted() {
    let sandbox = Harness::start(|settings| settings.api_key = None).await;

    let answer = answer(sandbox.post(ENDPOINT, Some("Bearer anything"), JSON, EVENT)).await;

    assert_eq!(answer.status, 200);
    sandbox.finish().await;
}

#[tokio::test]
async fn each_bad_shape_is_400_naming_the_problem() {
    let sandbox = Harness::start(|_| {}).await;
    let cases = [
        (event_with("metadata", None), r#"missing field "metadata""#),
        (event_with("brandId", None), r#"missing field "brandId""#),
        (
            event_with("points", Some("5")),
            r#"unexpected field "points""#,
        ),
        (
            event_with("metadata", Some("[1]")),
            r#""metadata" must be an object"#,
        ),
        (
            event_with("metadata", Some("null")),
            r#""metadata" must be an object"#,
        ),
        (
            event_with("userEmail", Some(r#""ada.example.com""#)),
            r#""userEmail" must contain '@'"#,
        ),
        (
            event_with("brandId", Some(r#""""#)),
            r#""brandId" must be a non-empty string"#,
        ),
        (
            event_with("eventType", Some("7")),
            r#""eventType" must be a non-empty string"#,
        ),
        (r#"{"brandId":"acme","#.to_string(), "not valid JSON"),
        (r#"["acme"]"#.to_string(), "must be a JSON object"),
    ];

    for (body, expected) in &cases {
        let answer = sandbox.post_event(body, None).await;
        let error = error_of(&answer);
        assert_eq!(answer.status, 400, "{body}");
        assert!(error.contains(expected), "{body}: {error}");
    }

    let (stats, lines) = sandbox.finish().await;
    assert!(lines.is_empty());
    assert_eq!(stats.rejected, cases.len() as u64);
}

#[tokio::test]
async fn a_body_not_declared_as_json_is_400() {
    let sandbox = Harness::start(|_| {}).await;

    let request = sandbox.post(
        ENDPOINT,
        Some(&format!("Bearer {KEY}")),
        "text/plain",
        EVENT,
    );
    let answer = answer(request).await;

    assert_eq!(answer.status, 400);
    assert!(
        error_of(&answer).contains("Content-Type"),
        "{}",
        error_of(&answer)
    );
    sandbox.finish().await;
}

#[tokio::test]
async fn an_event_for_another_brand_is_403() {
    let sandbox = Harness::start(|settings| settings.brand_id = Some("globex".into())).await;

    let answer = sandbox.post_event(EVENT, Some("orders:1")).await;

    assert_eq!(answer.status, 403);
    assert!(error_of(&answer).contains("acme"), "{}", error_of(&answer));
    let (stats, lines) = sandbox.finish().await;
    assert!(lines.is_empty());
    assert_eq!(stats.rejected, 1);
}

#[tokio::test]
async fn an_injected_failure_is_500_and_does_not_consume_the_key() {
    let failing = Harness::start(|settings| settings.fail_rate = 1.0).await;
    let answer = failing.post_event(EVENT, Some("orders:9")).await;
    assert_eq!(answer.status, 500);
    assert_eq!(answer.body, json!({"error": "injected failure"}));
    // Not recorded: the same request on the same sandbox fails again rather than being a duplicate.
    assert_eq!(
        failing.post_event(EVENT, Some("orders:9")).await.status,
        500
    );
    let (stats, lines) = failing.finish().await;
    assert!(lines.is_empty());
    assert_eq!(
        (stats.injected_failures, stats.accepted, stats.duplicates),
        (2, 0, 0)
    );

    let healthy = Harness::start(|_| {}).await;
    let retry = healthy.post_event(EVENT, Some("orders:9")).await;
    assert_eq!(retry.status, 200);
    assert_eq!(retry.body["duplicate"], Value::Null);
    let (_, lines) = healthy.finish().await;
    assert_eq!(lines.len(), 1);
}

#[tokio::test]
async fn the_configured_latency_delays_every_answer() {
    let latency = Duration::from_millis(150);
    let sandbox = Harness::start(|settings| settings.latency = latency).await;

    let started = Instant::now();
    assert_eq!(sandbox.post_event(EVENT, None).await.status, 200);
    assert!(
        started.elapsed() >= latency,
        "accepted after {:?}",
        started.elapsed()
    );

    let started = Instant::now();
    assert_eq!(sandbox.post_event("{}", None).await.status, 400);
    assert!(
        started.elapsed() >= latency,
        "rejected after {:?}",
        started.elapsed()
    );
    sandbox.finish().await;
}

#[tokio::test]
async fn stats_count_every_outcome_and_health_is_ok() {
    let sandbox = Harness::start(|_| {}).await;
    sandbox.post_event(EVENT, Some("a")).await;
    sandbox.post_event(EVENT, Some("a")).await;
    sandbox.post_event("{}", None).await;
    answer(sandbox.post("/", None, JSON, EVENT)).await;

    let stats = sandbox.get("/stats").await;
    let health = sandbox.get("/healthz").await;

    let expected = SandboxStats {
        accepted: 1,
        duplicates: 1,
        rejected: 1,
        unauthorized: 1,
        injected_failures: 0,
    };
    assert_eq!(stats.status, 200);
    assert_eq!(
        stats.body,
        serde_json::to_value(&expected).expect("stats JSON")
    );
    assert_eq!(stats.body["injected_failures"], 0);
    assert_eq!(health.status, 200);
    assert_eq!(sandbox.finish().await.0, expected);
}

#[tokio::test]
async fn events_are_taken_at_the_root_and_at_any_manual_event_path_only() {
    let sandbox = Harness::start(|_| {}).await;
    let authorization = format!("Bearer {KEY}");
    let post = |path| answer(sandbox.post(path, Some(&authorization), JSON, EVENT));

    assert_eq!(post("/").await.status, 200);
    assert_eq!(post("/v2/manual-event").await.status, 200);
    assert_eq!(post("/events").await.status, 404);
    assert_eq!(sandbox.get(ENDPOINT).await.status, 405);

    let (stats, lines) = sandbox.finish().await;
    assert_eq!(lines.len(), 2);
    assert_eq!((stats.accepted, stats.rejected), (2, 2));
}

#[tokio::test]
async fn quiet_mode_accepts_events_without_printing_them() {
    let sandbox = Harness::start(|settings| settings.quiet = true).await;

    assert_eq!(sandbox.post_event(EVENT, Some("q")).await.status, 200);
    assert_eq!(
        sandbox.post_event(EVENT, Some("q")).await.body["duplicate"],
        true
    );

    let (stats, lines) = sandbox.finish().await;
    assert!(lines.is_empty());
    assert_eq!((stats.accepted, stats.duplicates), (1, 1));
}

#[tokio::test]
async fn a_fail_rate_outside_zero_to_one_is_refused_at_start() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let mut settings = settings();
    settings.fail_rate = 1.5;

    let result = serve(
        listener,
        settings,
        SharedBuffer::default(),
        CancellationToken::new(),
    )
    .await;

    assert_eq!(
        result.expect_err("refused").kind(),
        io::ErrorKind::InvalidInput
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_finishes_requests_in_flight_and_prints_them() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let sandbox = Harness::start(|settings| settings.latency = Duration::from_millis(300)).await;
    let address = sandbox.base.trim_start_matches("http://").to_string();
    let mut in_flight = tokio::net::TcpStream::connect(&address)
        .await
        .expect("connect");
    let request = format!(
        "POST {ENDPOINT} HTTP/1.1\r\nHost: {address}\r\nAuthorization: Bearer {KEY}\r\n\
         Content-Type: {JSON}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{EVENT}",
        EVENT.len()
    );
    in_flight
        .write_all(request.as_bytes())
        .await
        .expect("write");
    // Connections are accepted in order, so once a later one is answered the sandbox holds ours
    // (sleeping its latency), and the shutdown must let it finish.
    assert_eq!(sandbox.get("/healthz").await.status, 200);

    let (stats, lines) = sandbox.finish().await;
    let mut response = String::new();
    in_flight.read_to_string(&mut response).await.expect("read");

    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert_eq!((stats.accepted, lines.len()), (1, 1));
}

/// `resonance-sync sandbox --threads N`, the binary itself: one thread, one per core (0, the
/// default) or a set number each answer concurrent events, print each once and stop on SIGTERM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_serves_concurrent_events_on_any_number_of_threads() {
    use crate::process::{json_lines, Process, Scratch};
    let scratch = Scratch::new();
    let config = scratch.0.join("unused.toml");
    for threads in ["1", "0", "3"] {
        let mut sandbox = Process::spawn(
            &scratch.0,
            &config,
            &[
                "--log-format",
                "json",
                "sandbox",
                "--listen",
                "127.0.0.1:0",
                "--threads",
                threads,
                "--latency",
                "5ms",
            ],
            &[("RESONANCE_API_KEY", KEY)],
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        let address = loop {
            let found = json_lines(&sandbox).iter().find_map(|line| {
                line["address"]
                    .as_str()
                    .filter(|_| {
                        line["message"]
                            .as_str()
                            .is_some_and(|m| m.starts_with("sandbox listening"))
                    })
                    .map(str::to_string)
            });
            if let Some(address) = found {
                break address;
            }
            assert!(
                sandbox.running(),
                "--threads {threads}: the sandbox exited: {:?}",
                sandbox.stderr()
            );
            assert!(
                Instant::now() < deadline,
                "--threads {threads}: the sandbox never listened"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let client = reqwest::Client::new();
        let url = format!("http://{address}{ENDPOINT}");
        let sends = (0..40).map(|n| {
            client
                .post(&url)
                .bearer_auth(KEY)
                .header("content-type", JSON)
                .header("idempotency-key", format!("threads-{threads}-{n}"))
                .body(EVENT)
                .send()
        });
        let statuses: Vec<u16> = futures::future::join_all(sends)
            .await
            .into_iter()
            .map(|answer| answer.expect("an answer").status().as_u16())
            .collect();
        assert_eq!(statuses, vec![200; 40], "--threads {threads}");

        assert!(
            sandbox.stop().await.success(),
            "--threads {threads}: {:?}",
            sandbox.stderr()
        );
        let printed = sandbox.stdout().len();
        assert_eq!(printed, 40, "--threads {threads}: every event printed once");
    }
}
