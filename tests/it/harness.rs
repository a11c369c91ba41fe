//! The shared test harness: a fresh PostgreSQL database per test, a scriptable receiver on
//! `127.0.0.1:0` that records every request, configs built from the real parser, and
//! `wait_until` instead of sleeps.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use resonance_sync::config::{self, Config, Overrides};
use serde_json::Value;
use tokio_postgres::NoTls;
use tokio_util::sync::CancellationToken;

/// The API key every test config uses.
pub const API_KEY: &str = "sk_test_harness_0123456789";
/// The brand every test config uses.
pub const BRAND: &str = "brand_test_01";

/// The server tests create their databases on: `RESONANCE_TEST_DATABASE_URL`, else the local
/// PostgreSQL as user postgres.
pub fn server_url() -> String {
    std::env::var("RESONANCE_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".to_string())
}

/// A database of its own for one test, dropped when the test ends.
pub struct TestDb {
    pub name: String,
    pub url: String,
    pub client: tokio_postgres::Client,
}

impl TestDb {
    /// Creates `rs_test_<random>` and connects to it.
    pub async fn new() -> TestDb {
        TestDb::with_options("").await
    }

    /// Creates `rs_test_<random>` with `CREATE DATABASE` options (a locale, say).
    pub async fn with_options(options: &str) -> TestDb {
        let name = format!("rs_test_{}", uuid::Uuid::new_v4().simple());
        let admin = connect(&format!("{}/postgres", server_url())).await;
        admin
            .batch_execute(&format!("CREATE DATABASE {name} {options}"))
            .await
            .expect("create the test database");
        let url = format!("{}/{name}", server_url());
        let client = connect(&url).await;
        TestDb { name, url, client }
    }

    /// A database holding the baseline `orders` table of the field cases.
    pub async fn with_orders() -> TestDb {
        let db = TestDb::new().await;
        db.client
            .batch_execute(ORDERS_TABLE)
            .await
            .expect("create orders");
        db
    }

    /// Runs SQL, panicking with the server's message on error.
    pub async fn exec(&self, sql: &str) {
        if let Err(e) = self.client.batch_execute(sql).await {
            panic!("{sql}: {}", resonance_sync::error::DbError::describe(&e));
        }
    }

    /// The single value of a query (e.g. a count).
    pub async fn scalar<T: for<'a> tokio_postgres::types::FromSql<'a>>(&self, sql: &str) -> T {
        match self.client.query_one(sql, &[]).await {
            Ok(row) => row.get(0),
            Err(e) => panic!("{sql}: {}", resonance_sync::error::DbError::describe(&e)),
        }
    }

    /// Text of the first column of every row.
    pub async fn column(&self, sql: &str) -> Vec<String> {
        let rows = self.client.query(sql, &[]).await.expect(sql);
        rows.iter().map(|r| r.get::<_, String>(0)).collect()
    }

    /// Inserts baseline orders `(email, value, currency)`; returns their ids.
    pub async fn insert_orders(&self, rows: &[(Option<&str>, &str, &str)]) -> Vec<i64> {
        let mut ids = Vec::new();
        for (email, value, currency) in rows {
            let row = self
                .client
                .query_one(
                    "INSERT INTO orders (user_email, order_value, currency) \
                     VALUES ($1, $2::text::numeric, $3) RETURNING id",
                    &[email, value, currency],
                )
                .await
                .expect("insert order");
            ids.push(row.get(0));
        }
        ids
    }

    /// Orders marked synced, by id.
    pub async fn synced_ids(&self) -> Vec<i64> {
        let rows = self
            .client
            .query(
                "SELECT id FROM orders WHERE synced_to_resonance ORDER BY id",
                &[],
            )
            .await
            .expect("synced ids");
        rows.iter().map(|r| r.get(0)).collect()
    }

    /// Dead letters as (key, reason).
    pub async fn dead_letters(&self) -> Vec<(String, String)> {
        let rows = self
            .client
            .query(
                "SELECT row_key, coalesce(reason, '') FROM resonance_sync.deliveries \
                 WHERE dead_at IS NOT NULL ORDER BY row_key",
                &[],
            )
            .await
            .unwrap_or_default();
        rows.iter().map(|r| (r.get(0), r.get(1))).collect()
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let name = self.name.clone();
        let admin_url = format!("{}/postgres", server_url());
        // Drop runs outside async code: a short-lived thread with its own runtime.
        let _ = std::thread::spawn(move || {
            let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            runtime.block_on(async move {
                if let Ok((client, connection)) = tokio_postgres::connect(&admin_url, NoTls).await {
                    tokio::spawn(connection);
                    let _ = client
                        .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                        .await;
                }
            });
        })
        .join();
    }
}

/// Connects, panicking with a helpful message when the server is not there.
pub async fn connect(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, NoTls).await.unwrap_or_else(|e| {
        panic!(
            "cannot connect to {url}: {e}. The tests need a PostgreSQL server: run ./scripts/test.sh, \
             which starts one, or set RESONANCE_TEST_DATABASE_URL"
        )
    });
    tokio::spawn(connection);
    client
}

/// The baseline table of the field cases.
pub const ORDERS_TABLE: &str = "
CREATE TABLE orders (
  id                  bigserial PRIMARY KEY,
  user_email          text,
  order_value         numeric(12,2),
  currency            char(3)     NOT NULL DEFAULT 'USD',
  created_at          timestamptz NOT NULL DEFAULT now(),
  synced_to_resonance boolean     NOT NULL DEFAULT false
);";

/// The mapping of the baseline table, as TOML.
pub fn orders_mapping(table: &str) -> String {
    format!(
        r#"
[[mapping]]
name = "orders"
event_type = "purchase"
interval = "200ms"
batch_size = 50
key = "id"
email = "user_email"
query = "SELECT id, user_email, order_value, currency FROM {table} WHERE NOT synced_to_resonance"
mark_synced = "UPDATE {table} SET synced_to_resonance = true WHERE id = ANY($1)"
[mapping.metadata]
order_id = "id"
order_value = "order_value"
currency = "currency"
"#
    )
}

/// Builds a config through the real parser. `resonance_extra` is added to `[resonance]` and
/// `mappings` after it.
pub fn config(db_url: &str, endpoint: &str, resonance_extra: &str, mappings: &str) -> Config {
    let text = config_text(db_url, endpoint, resonance_extra, mappings);
    let overrides = Overrides {
        api_key: Some(API_KEY.to_string()),
        ..Overrides::default()
    };
    match config::parse(&text, &overrides) {
        Ok(config) => config,
        Err(problems) => panic!("test config is invalid: {problems:#?}\n{text}"),
    }
}

/// The TOML of [`config`], for tests that run the binary.
pub fn config_text(db_url: &str, endpoint: &str, resonance_extra: &str, mappings: &str) -> String {
    format!(
        r#"
[database]
url = "{db_url}"
claim_lease = "5s"
[resonance]
endpoint = "{endpoint}"
brand_id = "{BRAND}"
concurrency = 8
timeout = "2s"
connect_timeout = "1s"
max_attempts = 4
backoff_initial = "50ms"
backoff_max = "400ms"
{resonance_extra}
{mappings}
"#
    )
}

/// One request the receiver saw.
#[derive(Debug, Clone)]
pub struct Seen {
    pub at: Instant,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// The body parsed with exact numbers (`Null` when it is not JSON).
    pub json: Value,
    /// How many earlier requests carried the same `Idempotency-Key`.
    pub earlier: usize,
}

impl Seen {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn idempotency_key(&self) -> Option<String> {
        self.headers
            .get("idempotency-key")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    }

    /// `metadata.order_id` as text (exact digits), or "" when absent.
    pub fn order_id(&self) -> String {
        self.json
            .pointer("/metadata/order_id")
            .map(|v| v.to_string())
            .unwrap_or_default()
    }

    pub fn email(&self) -> String {
        self.json
            .get("userEmail")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string()
    }
}

/// What the receiver answers.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub delay: Duration,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Reply {
    pub fn status(status: u16) -> Reply {
        Reply {
            status,
            delay: Duration::ZERO,
            headers: vec![],
            body: String::new(),
        }
    }

    pub fn ok() -> Reply {
        Reply::status(200)
    }

    pub fn with_header(mut self, name: &str, value: &str) -> Reply {
        self.headers.push((name.to_string(), value.to_string()));
        self
    }

    pub fn with_body(mut self, body: &str) -> Reply {
        self.body = body.to_string();
        self
    }

    pub fn after(mut self, delay: Duration) -> Reply {
        self.delay = delay;
        self
    }
}

type Script = dyn Fn(&Seen) -> Reply + Send + Sync;
type Shared = (Arc<Mutex<Vec<Seen>>>, Arc<Mutex<Arc<Script>>>);

/// A receiver that records every request and answers from a script.
pub struct Receiver {
    pub addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    script: Arc<Mutex<Arc<Script>>>,
    shutdown: CancellationToken,
}

impl Receiver {
    /// Starts a receiver that answers 200 to everything.
    pub async fn start() -> Receiver {
        Receiver::scripted(|_| Reply::ok()).await
    }

    /// Starts a receiver answering from `script`.
    pub async fn scripted(script: impl Fn(&Seen) -> Reply + Send + Sync + 'static) -> Receiver {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind receiver");
        let addr = listener.local_addr().expect("receiver address");
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let script: Arc<Mutex<Arc<Script>>> = Arc::new(Mutex::new(Arc::new(script)));
        let shutdown = CancellationToken::new();
        let state = (seen.clone(), script.clone());
        let app = axum::Router::new()
            .fallback(move |headers: HeaderMap, body: Bytes| handle(state.clone(), headers, body));
        let stop = shutdown.clone();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async move { stop.cancelled().await })
                .await;
        });
        Receiver {
            addr,
            seen,
            script,
            shutdown,
        }
    }

    /// Replaces the script (e.g. flips every answer to 200 once an outage is over).
    pub fn set_script(&self, script: impl Fn(&Seen) -> Reply + Send + Sync + 'static) {
        *self.script.lock().unwrap() = Arc::new(script);
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}/resonance-api/manual-event", self.addr)
    }

    /// Every request so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// Requests whose `metadata.order_id` is `id`.
    pub fn for_order(&self, id: impl ToString) -> Vec<Seen> {
        let id = id.to_string();
        self.seen()
            .into_iter()
            .filter(|s| s.order_id() == id)
            .collect()
    }

    pub fn count(&self) -> usize {
        self.seen.lock().unwrap().len()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

async fn handle((seen, script): Shared, headers: HeaderMap, body: Bytes) -> Response {
    let json: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let entry = {
        let mut seen = seen.lock().unwrap();
        let key = headers.get("idempotency-key").cloned();
        let earlier = seen
            .iter()
            .filter(|s| key.is_some() && s.headers.get("idempotency-key") == key.as_ref())
            .count();
        let entry = Seen {
            at: Instant::now(),
            headers,
            body,
            json,
            earlier,
        };
        seen.push(entry.clone());
        entry
    };
    let script = script.lock().unwrap().clone();
    let reply = script(&entry);
    if !reply.delay.is_zero() {
        tokio::time::sleep(reply.delay).await;
    }
    let status = StatusCode::from_u16(reply.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = (status, reply.body).into_response();
    for (name, value) in reply.headers {
        if let (Ok(name), Ok(value)) = (
            axum::http::HeaderName::from_bytes(name.as_bytes()),
            axum::http::HeaderValue::from_str(&value),
        ) {
            response.headers_mut().insert(name, value);
        }
    }
    response
}

/// Polls `condition` every 20 ms until it holds or `timeout` passes; panics with `what` then.
pub async fn wait_until<F, Fut>(timeout: Duration, what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if condition().await {
            return;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A `run` daemon inside the test process, stopped (gracefully) on drop or by `stop`.
pub struct Daemon {
    pub shutdown: CancellationToken,
    handle: Option<tokio::task::JoinHandle<Result<(), resonance_sync::app::AppError>>>,
}

impl Daemon {
    pub fn start(config: Config) -> Daemon {
        let shutdown = CancellationToken::new();
        let token = shutdown.clone();
        let handle = tokio::spawn(async move { resonance_sync::app::run(&config, token).await });
        Daemon {
            shutdown,
            handle: Some(handle),
        }
    }

    /// Stops like SIGTERM and returns the result of `run`.
    pub async fn stop(mut self) -> Result<(), resonance_sync::app::AppError> {
        self.shutdown.cancel();
        let handle = self.handle.take().expect("daemon handle");
        tokio::time::timeout(Duration::from_secs(20), handle)
            .await
            .expect("the daemon stops within 20 s")
            .expect("the daemon task does not panic")
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Runs `backfill` in-process.
pub async fn backfill(
    config: &Config,
) -> Result<Vec<resonance_sync::app::MappingReport>, resonance_sync::app::AppError> {
    resonance_sync::app::backfill(config, CancellationToken::new()).await
}

/// Counts of requests per order id.
pub fn per_order(seen: &[Seen]) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for s in seen {
        *counts.entry(s.order_id()).or_insert(0) += 1;
    }
    counts
}

/// Loads the Chinook sample shipped in `data/chinook` into `db`, and adds the sync flag.
pub async fn load_chinook(db: &TestDb) {
    let sql = include_str!("../../data/chinook/chinook.sql");
    let start = sql
        .find("\\c chinook;")
        .map(|i| i + "\\c chinook;".len())
        .unwrap_or(0);
    db.exec(&sql[start..]).await;
    db.exec(
        "ALTER TABLE invoice ADD COLUMN synced_to_resonance boolean NOT NULL DEFAULT false;
         CREATE INDEX invoice_unsynced ON invoice (invoice_id) WHERE NOT synced_to_resonance;",
    )
    .await;
}

/// Initialises logging once, so failing tests show the daemon's log (`RUST_LOG` filters it).
pub fn logs() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let filter = tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_test_writer()
            .try_init();
    });
}

/// The daemon's record of one row in `resonance_sync.deliveries`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryState {
    pub attempts: i32,
    pub last_status: Option<i32>,
    pub last_error: Option<String>,
    pub reason: Option<String>,
    pub dead: bool,
    /// A claim is held (or was left behind).
    pub leased: bool,
}

impl TestDb {
    /// The daemon's state for `key` of mapping `orders`; `None` when it keeps none (never tried,
    /// or delivered and forgotten).
    pub async fn delivery(&self, key: impl ToString) -> Option<DeliveryState> {
        let key = key.to_string();
        let row = match self
            .client
            .query_opt(
                "SELECT attempts, last_status, last_error, reason, dead_at IS NOT NULL, \
                        lease_until IS NOT NULL \
                   FROM resonance_sync.deliveries WHERE mapping = 'orders' AND row_key = $1",
                &[&key],
            )
            .await
        {
            Ok(row) => row?,
            // Before the daemon's first start there is no schema, hence no state.
            Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE) => {
                return None
            }
            Err(e) => panic!("read the delivery state: {e}"),
        };
        Some(DeliveryState {
            attempts: row.get(0),
            last_status: row.get(1),
            last_error: row.get(2),
            reason: row.get(3),
            dead: row.get(4),
            leased: row.get(5),
        })
    }

    /// Logs every UPDATE that sets `table.synced_to_resonance` to true, so a test can tell how
    /// often each row was marked (see [`TestDb::marks`]).
    pub async fn track_marks(&self, table: &str) {
        self.exec(&format!(
            "CREATE TABLE IF NOT EXISTS mark_log (id bigint NOT NULL);
             CREATE OR REPLACE FUNCTION log_mark() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN INSERT INTO mark_log VALUES (NEW.id); RETURN NEW; END $$;
             CREATE TRIGGER log_mark AFTER UPDATE OF synced_to_resonance ON {table}
               FOR EACH ROW WHEN (NEW.synced_to_resonance) EXECUTE FUNCTION log_mark();"
        ))
        .await;
    }

    /// How many times each row was marked synced, by id (needs [`TestDb::track_marks`]).
    pub async fn marks(&self) -> HashMap<i64, i64> {
        let rows = self
            .client
            .query("SELECT id, count(*) FROM mark_log GROUP BY id", &[])
            .await
            .expect("read mark_log");
        rows.iter().map(|r| (r.get(0), r.get(1))).collect()
    }
}

/// The raw JSON text of `field` in a body (e.g. `4.81` for `"order_value":4.81`), exactly as
/// sent: the check that digits never went through a float.
pub fn raw_field<'a>(body: &'a str, field: &str) -> Option<&'a str> {
    let start = body.find(&format!("\"{field}\":"))? + field.len() + 3;
    let rest = &body[start..];
    let end = rest.find([',', '}']).unwrap_or(rest.len());
    Some(rest[..end].trim())
}

/// The raw `order_value` text of every request for order `id`.
pub fn raw_values(receiver: &Receiver, id: impl ToString) -> Vec<String> {
    receiver
        .for_order(id)
        .iter()
        .map(|s| {
            raw_field(&s.text(), "order_value")
                .unwrap_or("")
                .to_string()
        })
        .collect()
}

/// The config of the baseline `orders` mapping, sending to `receiver`.
pub fn orders_config(db: &TestDb, receiver: &Receiver) -> Config {
    config(&db.url, &receiver.endpoint(), "", &orders_mapping("orders"))
}

impl TestDb {
    /// Inserts baseline orders with explicit ids `(id, email, value)`, currency USD.
    pub async fn insert_orders_with_ids(&self, rows: &[(i64, &str, &str)]) {
        for (id, email, value) in rows {
            self.client
                .execute(
                    "INSERT INTO orders (id, user_email, order_value, currency) \
                     VALUES ($1, $2, $3::text::numeric, 'USD')",
                    &[id, email, value],
                )
                .await
                .expect("insert order");
        }
    }
}
