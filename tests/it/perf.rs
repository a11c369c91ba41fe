//! Cost and latency, as behaviour: a NOTIFY delivers a row at once despite a long interval, an
//! idle daemon runs one indexed query per interval, and `check` warns about a poll that would
//! read a large table whole. (How fast a backlog drains is measured by scripts/bench.sh.)

use std::time::{Duration, Instant};

use resonance_sync::app::connect_and_prepare;
use resonance_sync::explain::full_scans;

use crate::harness::*;

/// The trigger the README asks users to install for `notify_channel = "resonance_orders"`.
const NOTIFY_TRIGGER: &str = "
CREATE FUNCTION notify_resonance_orders() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  PERFORM pg_notify('resonance_orders', '');
  RETURN NULL;
END $$;
CREATE TRIGGER orders_notify_resonance AFTER INSERT ON orders
  FOR EACH STATEMENT EXECUTE FUNCTION notify_resonance_orders();";

const PARTIAL_INDEX: &str =
    "CREATE INDEX orders_unsynced ON orders (id) WHERE NOT synced_to_resonance;";

fn notified_mapping(interval: &str) -> String {
    orders_mapping("orders").replace(
        "interval = \"200ms\"",
        &format!("interval = \"{interval}\"\nnotify_channel = \"resonance_orders\""),
    )
}

/// The backend LISTENing on the channel, once there is one.
async fn listener_pid(db: &TestDb) -> Option<i32> {
    db.client
        .query_opt(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() \
             AND query = 'LISTEN \"resonance_orders\"'",
            &[],
        )
        .await
        .expect("read pg_stat_activity")
        .map(|row| row.get(0))
}

/// Inserts one order and returns when its transaction committed.
async fn insert_committed(db: &TestDb, email: &str) -> (i64, Instant) {
    let id = db.insert_orders(&[(Some(email), "10.00", "USD")]).await[0];
    (id, Instant::now())
}

/// How long after `committed` the receiver first saw order `id`.
async fn delivery_delay(receiver: &Receiver, id: i64, committed: Instant) -> Duration {
    wait_until(
        Duration::from_secs(10),
        "the order is delivered",
        || async { !receiver.for_order(id).is_empty() },
    )
    .await;
    receiver.for_order(id)[0]
        .at
        .saturating_duration_since(committed)
}

#[tokio::test]
async fn a_notification_delivers_a_new_row_within_a_second_despite_a_long_interval() {
    logs();
    let db = TestDb::with_orders().await;
    db.exec(PARTIAL_INDEX).await;
    db.exec(NOTIFY_TRIGGER).await;
    let receiver = Receiver::start().await;
    let config = config(&db.url, &receiver.endpoint(), "", &notified_mapping("60s"));
    let daemon = Daemon::start(config);
    wait_until(Duration::from_secs(10), "the daemon listens", || async {
        listener_pid(&db).await.is_some()
    })
    .await;

    for n in 0..3 {
        let (id, committed) = insert_committed(&db, &format!("n{n}@example.com")).await;
        let delay = delivery_delay(&receiver, id, committed).await;
        assert!(delay < Duration::from_secs(1), "order {id} took {delay:?}");
        wait_until(Duration::from_secs(5), "the order is marked", || async {
            db.synced_ids().await.contains(&id)
        })
        .await;
    }
    assert_eq!(receiver.count(), 3);
    daemon.stop().await.expect("the daemon stops cleanly");
}

#[tokio::test]
async fn the_listener_comes_back_after_its_connection_is_killed() {
    logs();
    let db = TestDb::with_orders().await;
    db.exec(NOTIFY_TRIGGER).await;
    let receiver = Receiver::start().await;
    let config = config(&db.url, &receiver.endpoint(), "", &notified_mapping("60s"));
    let daemon = Daemon::start(config);
    wait_until(Duration::from_secs(10), "the daemon listens", || async {
        listener_pid(&db).await.is_some()
    })
    .await;
    let first = listener_pid(&db).await;
    db.exec(&format!("SELECT pg_terminate_backend({})", first.unwrap()))
        .await;
    wait_until(
        Duration::from_secs(10),
        "a new LISTEN connection",
        || async {
            listener_pid(&db)
                .await
                .is_some_and(|pid| Some(pid) != first)
        },
    )
    .await;

    let (id, committed) = insert_committed(&db, "back@example.com").await;
    let delay = delivery_delay(&receiver, id, committed).await;
    assert!(
        delay < Duration::from_secs(1),
        "took {delay:?} after the reconnect"
    );
    daemon.stop().await.expect("the daemon stops cleanly");
}

#[tokio::test]
async fn polling_still_finds_a_row_whose_notification_never_came() {
    logs();
    let db = TestDb::with_orders().await;
    // No trigger: nothing is ever notified on the channel.
    let receiver = Receiver::start().await;
    let config = config(
        &db.url,
        &receiver.endpoint(),
        "",
        &notified_mapping("300ms"),
    );
    let daemon = Daemon::start(config);
    wait_until(Duration::from_secs(10), "the daemon listens", || async {
        listener_pid(&db).await.is_some()
    })
    .await;
    let ids = db
        .insert_orders(&[(Some("quiet@example.com"), "1.00", "USD")])
        .await;
    wait_until(Duration::from_secs(10), "the order is marked", || async {
        db.synced_ids().await == ids
    })
    .await;
    daemon.stop().await.expect("the daemon stops cleanly");
}

/// Backends of the daemon still connected to the test database.
async fn daemon_backends(db: &TestDb) -> i64 {
    db.scalar(
        "SELECT count(*) FROM pg_stat_activity \
         WHERE datname = current_database() AND pid <> pg_backend_pid()",
    )
    .await
}

/// Runs `sql` through a connection that is closed before counting starts, so that its own
/// statistics are flushed by then.
async fn set_up(db: &TestDb, sql: &str) {
    connect(&db.url)
        .await
        .batch_execute(sql)
        .await
        .expect("set up");
    disconnected(db, "the set-up connection closes").await;
}

/// Waits until no other backend is connected to the test database (`what` says whose).
async fn disconnected(db: &TestDb, what: &str) {
    wait_until(Duration::from_secs(10), what, || async {
        daemon_backends(db).await == 0
    })
    .await;
}

/// (sequential scans, index scans) of `orders`, and transactions in the database, as flushed
/// by backends that have exited.
async fn scan_counts(db: &TestDb) -> (i64, i64, i64) {
    db.exec("SELECT pg_stat_clear_snapshot()").await;
    let row = db
        .client
        .query_one(
            "SELECT t.seq_scan, coalesce(t.idx_scan, 0), d.xact_commit + d.xact_rollback \
               FROM pg_stat_user_tables t, pg_stat_database d \
              WHERE t.relname = 'orders' AND d.datname = current_database()",
            &[],
        )
        .await
        .expect("read statistics");
    (row.get(0), row.get(1), row.get(2))
}

/// Statistics that lag behind the table (autovacuum busy, or off) make the planner take nearly
/// every row for unsynced, and read the table from its start, past every row already synced,
/// on every poll. The polls find their rows through the partial index all the same.
#[tokio::test]
async fn polls_use_the_partial_index_even_when_statistics_lag_behind() {
    logs();
    let db = TestDb::new().await;
    let rows = 20_000;
    set_up(
        &db,
        &format!(
            "{ORDERS_TABLE} {PARTIAL_INDEX}
                 INSERT INTO orders (user_email, order_value)
                   SELECT 'o' || g || '@example.com', 1 FROM generate_series(1, {rows}) g;
                 ANALYZE orders;
                 UPDATE orders SET synced_to_resonance = true WHERE id <= {rows} - 1000;"
        ),
    )
    .await;
    let before = scan_counts(&db).await;
    let receiver = Receiver::start().await;
    // 20 polls of 50 rows; the backlog is counted at the start, the end and once an interval.
    let mapping = orders_mapping("orders").replace("interval = \"200ms\"", "interval = \"30s\"");
    let config = config(&db.url, &receiver.endpoint(), "", &mapping);
    backfill(&config)
        .await
        .expect("the backfill drains the rows");
    assert_eq!(receiver.count(), 1000);
    disconnected(&db, "the backfill disconnects").await;
    // Counting the backlog reads the table, a few times; each of the 20 polls must not.
    let after = scan_counts(&db).await;
    let (scans, by_index) = (after.0 - before.0, after.1 - before.1);
    eprintln!("{scans} sequential scans and {by_index} index scans of orders");
    assert!(
        scans <= 8,
        "{scans} sequential scans of orders: the polls read the table"
    );
    assert!(by_index >= 20, "{by_index} index scans of orders");
}

#[tokio::test]
async fn an_idle_daemon_runs_one_indexed_query_per_interval() {
    logs();
    let db = TestDb::new().await;
    set_up(
        &db,
        &format!(
            "{ORDERS_TABLE} {PARTIAL_INDEX}
                 CREATE SEQUENCE polls;
                 INSERT INTO orders (user_email, order_value, synced_to_resonance)
                   SELECT 'o' || g || '@example.com', 1, true FROM generate_series(1, 5000) g;
                 ANALYZE orders;"
        ),
    )
    .await;
    let before = scan_counts(&db).await;

    // Each execution of the mapping's query (candidates, backlog count, fetch) takes a number.
    let counted = orders_mapping("orders").replace(
        "WHERE NOT synced_to_resonance\"",
        "WHERE NOT synced_to_resonance AND (SELECT nextval('polls')) > 0\"",
    );
    let receiver = Receiver::start().await;
    let config = config(&db.url, &receiver.endpoint(), "", &counted);
    let interval = Duration::from_millis(200);
    let daemon = Daemon::start(config);
    wait_until(Duration::from_secs(10), "the first poll", || async {
        db.scalar::<bool>("SELECT is_called FROM polls").await
    })
    .await;
    let first: i64 = db.scalar("SELECT last_value FROM polls").await;
    let window = Duration::from_millis(2000);
    tokio::time::sleep(window).await; // the measurement window, not a synchronisation
    let last: i64 = db.scalar("SELECT last_value FROM polls").await;
    daemon.stop().await.expect("the daemon stops cleanly");
    disconnected(&db, "the daemon disconnects").await;
    let after = scan_counts(&db).await;

    let intervals = (window.as_millis() / interval.as_millis()) as i64;
    let queries = last - first;
    assert!(
        (intervals / 2..=intervals + 2).contains(&queries),
        "{queries} executions of the mapping's query in {intervals} intervals"
    );
    assert_eq!(after.0 - before.0, 0, "no sequential scan of orders");
    assert!(after.1 - before.1 >= queries, "the polls use the index");
    let transactions = after.2 - before.2;
    assert!(
        transactions < 4 * intervals + 60,
        "{transactions} transactions in all: start-up, {queries} polls and shutdown"
    );
    assert_eq!(receiver.count(), 0);
}

#[tokio::test]
async fn check_warns_about_a_large_table_without_an_index_and_shows_the_fix() {
    logs();
    let db = TestDb::with_orders().await;
    let fill = |rows: i64| {
        format!(
            "INSERT INTO orders (user_email, order_value, synced_to_resonance)
               SELECT 'o' || g || '@example.com', 1, g % 10 <> 0 FROM generate_series(1, {rows}) g;
             ANALYZE orders;"
        )
    };
    let config = config(
        &db.url,
        "http://127.0.0.1:9/e",
        "",
        &orders_mapping("orders"),
    );
    let (pool, sources) = connect_and_prepare(&config, None).await.expect("prepare");
    let mut client = pool.get().await.expect("a connection");

    db.exec(&fill(2_000)).await;
    let small = full_scans(&mut client, &sources[0]).await.expect("explain");
    assert_eq!(small, vec![], "a small table needs no index");

    db.exec(&fill(30_000)).await;
    let large = full_scans(&mut client, &sources[0]).await.expect("explain");
    assert_eq!(large.len(), 1, "{large:?}");
    assert_eq!(large[0].table, "public.orders");
    assert!(large[0].rows > 30_000.0, "{large:?}");
    assert_eq!(
        large[0].fix,
        "CREATE INDEX ON public.orders (id) WHERE (NOT synced_to_resonance);"
    );

    // `check` prints it.
    let dir = std::env::temp_dir().join(format!("rs-perf-{}", db.name));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("config.toml");
    let text = config_text(
        &db.url,
        "http://127.0.0.1:9/e",
        "",
        &orders_mapping("orders"),
    );
    std::fs::write(&path, text).unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_resonance-sync"))
        .arg("--config")
        .arg(&path)
        .arg("check")
        .env("RESONANCE_API_KEY", API_KEY)
        .output()
        .expect("run check");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}");
    assert!(
        stdout.contains("warning: every poll reads all of public.orders")
            && stdout.contains(&large[0].fix),
        "{stdout}"
    );

    // The suggested index is valid SQL, and it is the fix.
    db.exec(&large[0].fix).await;
    db.exec("ANALYZE orders").await;
    let fixed = full_scans(&mut client, &sources[0]).await.expect("explain");
    assert_eq!(fixed, vec![]);
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn the_suggested_index_quotes_a_table_named_like_a_keyword() {
    logs();
    let db = TestDb::new().await;
    db.exec(&ORDERS_TABLE.replace("CREATE TABLE orders", "CREATE TABLE \"order\""))
        .await;
    db.exec(
        "INSERT INTO \"order\" (user_email, order_value)
           SELECT 'o' || g || '@example.com', 1 FROM generate_series(1, 20000) g;
         ANALYZE \"order\";",
    )
    .await;
    let mapping = orders_mapping("\\\"order\\\"");
    let config = config(&db.url, "http://127.0.0.1:9/e", "", &mapping);
    let (pool, sources) = connect_and_prepare(&config, None).await.expect("prepare");
    let mut client = pool.get().await.expect("a connection");

    let found = full_scans(&mut client, &sources[0]).await.expect("explain");
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0].table, "public.\"order\"");
    assert_eq!(
        found[0].fix,
        "CREATE INDEX ON public.\"order\" (id) WHERE (NOT synced_to_resonance);"
    );
    db.exec(&found[0].fix).await;
    db.exec("ANALYZE \"order\"").await;
    let fixed = full_scans(&mut client, &sources[0]).await.expect("explain");
    assert_eq!(fixed, vec![]);
}

/// Keys are compared as bytes in the daemon's table, whatever the database's collation: on a
/// database whose default collation follows a language, comparing them by its rules took 15 to
/// 20% of PostgreSQL's CPU in a drain. Text keys that such a collation would order or
/// compare differently (case, accents) are each claimed, delivered and marked once.
#[tokio::test]
async fn keys_compare_as_bytes_on_a_database_with_a_language_collation() {
    let db = TestDb::with_options(
        "TEMPLATE template0 LOCALE_PROVIDER icu ICU_LOCALE 'en-US' LOCALE 'C.UTF-8'",
    )
    .await;
    db.exec(
        "CREATE TABLE signups (code text PRIMARY KEY, email text NOT NULL,
                               synced boolean NOT NULL DEFAULT false);
         INSERT INTO signups (code, email) VALUES
           ('a', 'a@example.com'), ('A', 'upper@example.com'), ('é', 'e1@example.com'),
           ('e', 'e2@example.com'), ('E\u{301}', 'e3@example.com'), ('b-2', 'b@example.com');",
    )
    .await;
    let receiver = Receiver::start().await;
    let mapping = r#"
[[mapping]]
name = "signups"
event_type = "signup"
interval = "200ms"
key = "code"
email = "email"
query = "SELECT code, email FROM signups WHERE NOT synced"
mark_synced = "UPDATE signups SET synced = true WHERE code = ANY($1)"
"#;
    let config = config(&db.url, &receiver.endpoint(), "", mapping);
    backfill(&config).await.expect("backfill");

    let collations = db
        .column(
            "SELECT a.attname || ' ' || c.collname FROM pg_attribute a
               JOIN pg_collation c ON c.oid = a.attcollation
              WHERE a.attrelid = 'resonance_sync.deliveries'::regclass
                AND a.attname IN ('mapping', 'row_key') ORDER BY a.attname",
        )
        .await;
    assert_eq!(collations, vec!["mapping C", "row_key C"]);
    assert_eq!(
        db.scalar::<i64>("SELECT count(*) FROM signups WHERE NOT synced")
            .await,
        0,
        "every row is marked"
    );
    let mut keys: Vec<String> = receiver
        .seen()
        .iter()
        .map(|seen| {
            seen.headers["idempotency-key"]
                .to_str()
                .unwrap()
                .to_string()
        })
        .collect();
    keys.sort();
    keys.dedup();
    assert_eq!(keys.len(), 6, "one request per row, each with its own key");
    assert_eq!(receiver.seen().len(), 6, "no row is sent twice");
}
