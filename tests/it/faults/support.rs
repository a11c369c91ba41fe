//! Tools the fault tests share: a ledger of what the receiver answered and when, a log of when
//! each row was marked, per-test log capture, and config tuning. The faults themselves are
//! injected with [`super::inject`].

use std::collections::HashMap;
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use axum::body::Bytes;
use resonance_sync::config::{self, Config, Overrides};

use crate::harness::{Reply, Seen, API_KEY};

/// One request the receiver answered: what came in, what went out, and when.
#[derive(Debug, Clone)]
pub struct Answered {
    pub order: String,
    pub key: String,
    pub body: Bytes,
    pub status: u16,
    pub arrived: SystemTime,
    pub delay: Duration,
}

impl Answered {
    /// When the answer left the receiver (the daemon cannot have it earlier).
    pub fn replied(&self) -> SystemTime {
        self.arrived + self.delay
    }

    pub fn ok(&self) -> bool {
        (200..300).contains(&self.status)
    }
}

/// Every answer a receiver gave, with wall-clock times comparable to PostgreSQL's clock.
#[derive(Clone, Default)]
pub struct Ledger(Arc<Mutex<Vec<Answered>>>);

impl Ledger {
    /// Wraps a receiver script so that each answer is written down.
    pub fn wrap(
        &self,
        script: impl Fn(&Seen) -> Reply + Send + Sync + 'static,
    ) -> impl Fn(&Seen) -> Reply + Send + Sync + 'static {
        let ledger = self.0.clone();
        move |seen: &Seen| {
            let arrived = SystemTime::now();
            let reply = script(seen);
            ledger.lock().unwrap().push(Answered {
                order: seen.order_id(),
                key: seen.idempotency_key().unwrap_or_default(),
                body: seen.body.clone(),
                status: reply.status,
                arrived,
                delay: reply.delay,
            });
            reply
        }
    }

    pub fn all(&self) -> Vec<Answered> {
        self.0.lock().unwrap().clone()
    }

    /// Answers by order id, each list in arrival order.
    pub fn by_order(&self) -> HashMap<String, Vec<Answered>> {
        let mut orders: HashMap<String, Vec<Answered>> = HashMap::new();
        for answer in self.all() {
            orders.entry(answer.order.clone()).or_default().push(answer);
        }
        for answers in orders.values_mut() {
            answers.sort_by_key(|a| a.arrived);
        }
        orders
    }

    pub fn count(&self) -> usize {
        self.0.lock().unwrap().len()
    }
}

/// Asserts that all requests for one order carry the same Idempotency-Key and the same bytes.
pub fn assert_same_key_and_body(order: &str, answers: &[Answered]) {
    let first = &answers[0];
    assert!(!first.key.is_empty(), "order {order}: no Idempotency-Key");
    for other in &answers[1..] {
        assert_eq!(
            other.key, first.key,
            "order {order}: the key changed between attempts"
        );
        assert_eq!(
            other.body, first.body,
            "order {order}: the body changed between attempts"
        );
    }
}

/// Records the time of every UPDATE that marks an order synced (PostgreSQL's wall clock, which
/// is this machine's), so a test can compare marks with the receiver's answers.
pub async fn log_mark_times(client: &tokio_postgres::Client) {
    client
        .batch_execute(
            "CREATE TABLE mark_times (id bigint NOT NULL, at timestamptz NOT NULL);
         CREATE FUNCTION log_mark_time() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN INSERT INTO mark_times VALUES (NEW.id, clock_timestamp()); RETURN NEW; END $$;
         CREATE TRIGGER log_mark_time AFTER UPDATE OF synced_to_resonance ON orders
           FOR EACH ROW WHEN (NEW.synced_to_resonance) EXECUTE FUNCTION log_mark_time();",
        )
        .await
        .expect("create the mark log");
}

/// The committed mark times of each order (needs [`log_mark_times`]).
pub async fn mark_times(client: &tokio_postgres::Client) -> HashMap<String, Vec<SystemTime>> {
    let rows = client
        .query("SELECT id::text, at FROM mark_times ORDER BY at", &[])
        .await
        .expect("read mark_times");
    let mut marks: HashMap<String, Vec<SystemTime>> = HashMap::new();
    for row in rows {
        marks.entry(row.get(0)).or_default().push(row.get(1));
    }
    marks
}

/// Every synced order was marked only after an answer 2xx had left the receiver.
pub async fn assert_marked_only_after_a_2xx(client: &tokio_postgres::Client, ledger: &Ledger) {
    let marks = mark_times(client).await;
    let answers = ledger.by_order();
    for (order, times) in &marks {
        let first_mark = times[0];
        let confirmed = answers.get(order).is_some_and(|a| {
            a.iter()
                .any(|a| a.ok() && a.replied() <= first_mark + Duration::from_millis(1))
        });
        assert!(
            confirmed,
            "order {order} was marked without a 2xx before it"
        );
    }
}

/// Requests sent again for an order after one of its requests had been answered 2xx: the
/// duplicates, each with the earlier answered request.
pub fn duplicates(ledger: &Ledger) -> Vec<(Answered, Answered)> {
    let mut found = Vec::new();
    for answers in ledger.by_order().into_values() {
        if let Some(first_ok) = answers.iter().position(Answered::ok) {
            for later in &answers[first_ok + 1..] {
                found.push((answers[first_ok].clone(), later.clone()));
            }
        }
    }
    found
}

/// Inserts `n` orders `load<i>@example.com`, `i + 0.50`.
pub async fn insert_many(client: &tokio_postgres::Client, n: i64) {
    client
        .execute(
            "INSERT INTO orders (user_email, order_value, currency)
             SELECT 'load' || g || '@example.com', g + 0.50, 'USD' FROM generate_series(1, $1::bigint) g",
            &[&n],
        )
        .await
        .expect("insert orders");
}

/// Unsynced orders.
pub async fn unsynced(client: &tokio_postgres::Client) -> i64 {
    client
        .query_one(
            "SELECT count(*) FROM orders WHERE NOT synced_to_resonance",
            &[],
        )
        .await
        .expect("count unsynced")
        .get(0)
}

/// Claims whose lease has not run out.
pub async fn live_leases(client: &tokio_postgres::Client) -> i64 {
    client
        .query_one(
            "SELECT count(*) FROM resonance_sync.deliveries WHERE lease_until > now()",
            &[],
        )
        .await
        .expect("count leases")
        .get(0)
}

/// Changes keys of a config text: `("resonance", "max_attempts", Some(20.into()))`; `None`
/// removes the key; section `mapping` changes every mapping.
pub fn tune(text: &str, changes: &[(&str, &str, Option<toml::Value>)]) -> String {
    let mut table: toml::Table = text.parse().expect("the config text is TOML");
    for (section, key, value) in changes {
        let tables: Vec<&mut toml::Table> = match table.get_mut(*section) {
            Some(toml::Value::Table(t)) => vec![t],
            Some(toml::Value::Array(items)) => {
                items.iter_mut().filter_map(|i| i.as_table_mut()).collect()
            }
            _ => panic!("no section [{section}] in the config"),
        };
        for t in tables {
            match value {
                Some(value) => t.insert(key.to_string(), value.clone()),
                None => t.remove(*key),
            };
        }
    }
    toml::to_string(&table).expect("serialise the config")
}

/// A TOML string value.
pub fn s(text: &str) -> Option<toml::Value> {
    Some(toml::Value::String(text.to_string()))
}

/// A TOML integer value.
pub fn n(value: i64) -> Option<toml::Value> {
    Some(toml::Value::Integer(value))
}

/// A TOML array of strings.
pub fn list(items: &[&str]) -> Option<toml::Value> {
    Some(toml::Value::Array(
        items
            .iter()
            .map(|i| toml::Value::String(i.to_string()))
            .collect(),
    ))
}

/// Parses a config text as the binary would, with the test API key.
pub fn parse(text: &str) -> Config {
    let overrides = Overrides {
        api_key: Some(API_KEY.to_string()),
        ..Overrides::default()
    };
    config::parse(text, &overrides)
        .unwrap_or_else(|problems| panic!("test config is invalid: {problems:#?}\n{text}"))
}

/// Captures the log lines of everything running on this thread (the daemon in a
/// current-thread test runtime) while alive; prints them if the test fails.
pub struct LogCapture {
    buffer: Arc<Mutex<Vec<u8>>>,
    _guard: tracing::subscriber::DefaultGuard,
}

#[derive(Clone)]
struct CaptureWriter(Arc<Mutex<Vec<u8>>>);

impl Write for CaptureWriter {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl LogCapture {
    /// Starts capturing with an `EnvFilter` directive such as `resonance_sync=info`.
    pub fn start(filter: &str) -> LogCapture {
        let buffer: Arc<Mutex<Vec<u8>>> = Arc::default();
        let writer = CaptureWriter(buffer.clone());
        let subscriber = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish();
        LogCapture {
            buffer,
            _guard: tracing::subscriber::set_default(subscriber),
        }
    }

    pub fn lines(&self) -> Vec<String> {
        String::from_utf8_lossy(&self.buffer.lock().unwrap())
            .lines()
            .map(str::to_string)
            .collect()
    }

    /// Lines containing `needle`.
    pub fn count(&self, needle: &str) -> usize {
        self.lines().iter().filter(|l| l.contains(needle)).count()
    }
}

impl Drop for LogCapture {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let lines = self.lines();
            let tail = &lines[lines.len().saturating_sub(400)..];
            eprintln!("--- daemon log (last {} lines) ---", tail.len());
            for line in tail {
                eprintln!("{line}");
            }
        }
    }
}

/// Seconds between two instants of the wall clock (negative when `b` is before `a`).
pub fn seconds_between(a: SystemTime, b: SystemTime) -> f64 {
    match b.duration_since(a) {
        Ok(d) => d.as_secs_f64(),
        Err(e) => -e.duration().as_secs_f64(),
    }
}

/// How long since `start`, in seconds.
pub fn since(start: Instant) -> f64 {
    start.elapsed().as_secs_f64()
}
