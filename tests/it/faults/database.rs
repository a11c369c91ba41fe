//! PostgreSQL misbehaves: it restarts mid-run, is down when the daemon starts, kills the
//! daemon's sessions (C24), or fails the mark-synced UPDATE (C19). The same `run` recovers by
//! itself, without spinning, and no row is lost or marked without a 2xx.

use std::time::{Duration, Instant, SystemTime};

use super::support::*;
use crate::cluster::{ClusterOptions, PrivateCluster};
use crate::harness::*;

/// A private cluster with the baseline `orders` table in database `crm`.
async fn cluster_with_orders() -> (PrivateCluster, String) {
    let cluster = PrivateCluster::start(ClusterOptions::default()).await;
    let url = cluster.create_database("crm").await;
    connect(&url)
        .await
        .batch_execute(ORDERS_TABLE)
        .await
        .expect("create orders");
    (cluster, url)
}

fn run_config(url: &str, endpoint: &str) -> String {
    tune(
        &config_text(url, endpoint, "", &orders_mapping("orders")),
        &[("database", "claim_lease", s("2s"))],
    )
}

async fn insert_one(client: &tokio_postgres::Client, email: &str) -> i64 {
    client
        .query_one(
            "INSERT INTO orders (user_email, order_value, currency) VALUES ($1, 51.00, 'USD')
             RETURNING id",
            &[&email],
        )
        .await
        .expect("insert an order")
        .get(0)
}

async fn is_synced(client: &tokio_postgres::Client, id: i64) -> bool {
    client
        .query_one(
            "SELECT synced_to_resonance FROM orders WHERE id = $1",
            &[&id],
        )
        .await
        .map(|row| row.get(0))
        .unwrap_or(false)
}

/// Waits up to `within` for the whole backlog to be delivered, stops the same run cleanly, and
/// checks every order: marked only after a 2xx, and sent with one key and one body.
async fn drain_stop_and_check(
    client: &tokio_postgres::Client,
    daemon: Daemon,
    ledger: &Ledger,
    within: Duration,
) {
    wait_until(within, "the whole backlog is delivered", || async {
        unsynced(client).await == 0
    })
    .await;
    daemon.stop().await.expect("the same run stops cleanly");
    assert_marked_only_after_a_2xx(client, ledger).await;
    for (order, answers) in ledger.by_order() {
        assert_same_key_and_body(&order, &answers);
    }
}

/// C24a: PostgreSQL is restarted while a backlog is being delivered.
#[tokio::test]
async fn postgres_restarted_mid_run_recovers_within_a_couple_of_polls_without_spinning() {
    let (cluster, url) = cluster_with_orders().await;
    let client = connect(&url).await;
    log_mark_times(&client).await;
    insert_many(&client, 800).await;
    let ledger = Ledger::default();
    let receiver =
        Receiver::scripted(ledger.wrap(|_| Reply::ok().after(Duration::from_millis(20)))).await;
    let logs = LogCapture::start("resonance_sync=info");
    let daemon = Daemon::start(parse(&run_config(&url, &receiver.endpoint())));
    wait_until(
        Duration::from_secs(20),
        "part of the backlog is delivered",
        || async { unsynced(&client).await <= 700 },
    )
    .await;

    cluster.stop().await;
    let down = Instant::now();
    let down_at = SystemTime::now();
    let logged_before = logs.lines().len();
    // The outage is the fault under test: two seconds without a database.
    tokio::time::sleep(Duration::from_secs(2)).await;
    // Rows claimed before the outage (up to four batches, 200 here) are held back once a mark
    // fails: each 2xx sent now could not be written down and would mean a resend. Only
    // requests already on their way, and those started before the first mark failed (a mark
    // waits at most 25 ms), still go out: a few times `concurrency` (8) at most.
    let sent_while_down = ledger.all().iter().filter(|a| a.arrived > down_at).count();
    eprintln!("{sent_while_down} requests sent after PostgreSQL stopped");
    assert!(
        sent_while_down <= 40,
        "{sent_while_down} requests sent after PostgreSQL stopped: claimed rows were not held back"
    );
    let during: Vec<String> = logs.lines().split_off(logged_before);
    let said_so = during
        .iter()
        .filter(|l| l.contains("database unavailable"))
        .count();
    assert!(said_so >= 1, "the daemon says the database is unavailable");
    assert!(
        during.len() <= 30,
        "{} log lines in {:.1} s without a database: a spin\n{}",
        during.len(),
        since(down),
        during.join("\n")
    );

    cluster.start_again().await;
    let up = Instant::now();
    let up_at = SystemTime::now();
    let client = connect(&url).await;
    let after = insert_one(&client, "after.restart@example.com").await;
    wait_until(Duration::from_secs(10), "rows are marked again", || async {
        client
            .query_one("SELECT count(*) FROM mark_times WHERE at > $1", &[&up_at])
            .await
            .map(|r| r.get::<_, i64>(0) > 0)
            .unwrap_or(false)
    })
    .await;
    let recovered = since(up);
    eprintln!(
        "marking again {recovered:.2} s after PostgreSQL came back; {} log lines while down",
        during.len()
    );
    assert!(
        recovered <= 2.5,
        "recovered {recovered:.1} s after PostgreSQL came back"
    );
    wait_until(
        Duration::from_secs(20),
        "the row inserted after the restart is delivered",
        || is_synced(&client, after),
    )
    .await;
    drain_stop_and_check(&client, daemon, &ledger, Duration::from_secs(30)).await;
    // A duplicate is a row whose 2xx came back while its mark could not be written.
    for (ok, again) in duplicates(&ledger) {
        assert!(
            seconds_between(ok.replied(), again.arrived) > 0.0,
            "order {} sent again before its 2xx",
            ok.order
        );
    }
}

/// C24: PostgreSQL is down when `run` starts: it waits, says so, and delivers once it is up.
#[tokio::test]
async fn postgres_down_at_start_is_waited_for_and_rows_are_delivered_once_it_is_up() {
    let (cluster, url) = cluster_with_orders().await;
    insert_many(&connect(&url).await, 5).await;
    let receiver = Receiver::start().await;
    cluster.stop().await;
    let logs = LogCapture::start("resonance_sync=info");
    let daemon = Daemon::start(parse(&run_config(&url, &receiver.endpoint())));
    // The outage is the fault under test.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let waiting = logs.count("database unavailable");
    assert!(
        (1..=6).contains(&waiting),
        "the daemon says it waits, with backoff ({waiting} lines in 2.5 s)"
    );
    assert_eq!(receiver.count(), 0);

    cluster.start_again().await;
    let client = connect(&url).await;
    wait_until(
        Duration::from_secs(15),
        "the rows are delivered",
        || async { unsynced(&client).await == 0 },
    )
    .await;
    assert!(
        logs.count("the database answers") >= 1,
        "the end of the outage is told"
    );
    daemon.stop().await.expect("run stops cleanly");
    assert_eq!(receiver.count(), 5, "each row once");
}

/// C24b: the daemon's sessions are terminated; the next row is still delivered promptly.
#[tokio::test]
async fn terminated_database_sessions_are_replaced_and_the_next_row_is_delivered() {
    let db = TestDb::with_orders().await;
    db.insert_orders(&[(Some("before@example.com"), "1.00", "USD")])
        .await;
    let receiver = Receiver::start().await;
    let logs = LogCapture::start("resonance_sync=info");
    let daemon = Daemon::start(parse(&config_text(
        &db.url,
        &receiver.endpoint(),
        "",
        &orders_mapping("orders"),
    )));
    wait_until(
        Duration::from_secs(10),
        "the first row is delivered",
        || async { unsynced(&db.client).await == 0 },
    )
    .await;
    // Only this test's database: other tests' daemons use the same application_name.
    let terminated: i64 = db
        .scalar(
            "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity
              WHERE application_name = 'resonance-sync' AND datname = current_database()) t",
        )
        .await;
    assert!(terminated >= 1, "the daemon had sessions to terminate");
    let terminated_at = Instant::now();
    let id = db
        .insert_orders(&[(Some("after.terminate@example.com"), "2.00", "USD")])
        .await[0];
    wait_until(Duration::from_secs(10), "the next row is delivered", || {
        is_synced(&db.client, id)
    })
    .await;
    assert!(
        since(terminated_at) <= 2.0,
        "delivered {:.1} s after the sessions were terminated",
        since(terminated_at)
    );
    daemon.stop().await.expect("run stops cleanly");
    assert_eq!(receiver.count(), 2);
    assert!(logs.count("panicked") == 0);
}

/// C19: the first mark-synced UPDATE fails after the 2xx. The daemon survives, re-sends the row
/// with the same key and bytes, and marks it; no loss, no dead letter.
#[tokio::test]
async fn a_failed_mark_is_resent_with_the_same_key_and_body_and_ends_synced() {
    let db = TestDb::with_orders().await;
    db.exec(
        "CREATE SEQUENCE fault_seq;
         CREATE FUNCTION fail_first_mark() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
           IF nextval('fault_seq') = 1 THEN RAISE EXCEPTION 'injected mark-synced failure'; END IF;
           RETURN NEW;
         END $$;
         CREATE TRIGGER t_fail_first_mark BEFORE UPDATE OF synced_to_resonance ON orders
           FOR EACH ROW WHEN (NEW.synced_to_resonance) EXECUTE FUNCTION fail_first_mark();",
    )
    .await;
    db.track_marks("orders").await;
    let id = db
        .insert_orders(&[(Some("crash.window@example.com"), "41.00", "USD")])
        .await[0];
    let ledger = Ledger::default();
    let receiver = Receiver::scripted(ledger.wrap(|_| Reply::ok())).await;
    let logs = LogCapture::start("resonance_sync=info");
    let daemon = Daemon::start(parse(&config_text(
        &db.url,
        &receiver.endpoint(),
        "",
        &orders_mapping("orders"),
    )));
    wait_until(Duration::from_secs(10), "the row ends synced", || {
        is_synced(&db.client, id)
    })
    .await;
    daemon
        .stop()
        .await
        .expect("the daemon survived the failed mark");

    let answers = &ledger.by_order()[&id.to_string()];
    assert_eq!(answers.len(), 2, "sent, mark failed, sent again");
    assert_same_key_and_body(&id.to_string(), answers);
    assert_eq!(db.marks().await[&id], 1, "one committed mark");
    assert!(db.dead_letters().await.is_empty());
    assert!(
        logs.count("injected mark-synced failure") >= 1,
        "the failure is logged"
    );
}

/// A claim being marked (locked by the mark's transaction) is skipped by the lease renewal, not
/// waited for: a renewal that waited, holding other claims' locks meanwhile, could deadlock with
/// a mark that locks the same claims in another order (seen with two instances on one backlog).
#[tokio::test]
async fn renewing_leases_skips_a_claim_locked_by_a_mark_instead_of_waiting_for_it() {
    let db = TestDb::with_orders().await;
    let config = parse(&config_text(
        &db.url,
        "http://127.0.0.1:9/unused",
        "",
        &orders_mapping("orders"),
    ));
    let pool = resonance_sync::db::pool(&config.database).expect("a pool");
    let mut client = pool.get().await.expect("a connection");
    resonance_sync::store::ensure_schema(&mut client)
        .await
        .expect("the daemon's schema");
    let instance = uuid::Uuid::new_v4();
    db.client
        .execute(
            "INSERT INTO resonance_sync.deliveries (mapping, row_key, lease_until, claimed_by)
             SELECT 'orders', k::text, now() + interval '1 second', $1
               FROM generate_series(1, 3) k",
            &[&instance],
        )
        .await
        .expect("three claims");
    // Another session holds claim 2, as a mark's DELETE would until it commits.
    let mut marker = connect(&db.url).await;
    let mark = marker.transaction().await.expect("begin");
    mark.execute(
        "SELECT 1 FROM resonance_sync.deliveries WHERE row_key = '2' FOR UPDATE",
        &[],
    )
    .await
    .expect("lock claim 2");

    let renewed = tokio::time::timeout(
        Duration::from_secs(5),
        resonance_sync::store::renew_leases(&client, instance, Duration::from_secs(60)),
    )
    .await
    .expect("the renewal waited for a locked claim")
    .expect("the renewal succeeds");
    assert_eq!(renewed, 2, "claims 1 and 3 are renewed, claim 2 is skipped");
    mark.rollback().await.expect("rollback");
    let long: Vec<String> = db
        .column(
            "SELECT row_key FROM resonance_sync.deliveries
              WHERE lease_until > now() + interval '30 seconds' ORDER BY row_key",
        )
        .await;
    assert_eq!(long, ["1", "3"]);
}

/// C24: claims a mapping could not give back while PostgreSQL was down (rows held back, or
/// delivered but not marked) are given back by the first poll that reaches it again. They used
/// to be renewed with the claims in hand for as long as work went on, and their rows waited for
/// the whole backlog (or, under steady traffic, for ever).
#[tokio::test]
async fn claims_stranded_by_an_outage_are_given_back_while_the_backlog_is_still_draining() {
    let (cluster, url) = cluster_with_orders().await;
    let client = connect(&url).await;
    log_mark_times(&client).await;
    insert_many(&client, 4000).await;
    let ledger = Ledger::default();
    let receiver =
        Receiver::scripted(ledger.wrap(|_| Reply::ok().after(Duration::from_millis(20)))).await;
    // Leases renewed every 2 s: a stranded claim would outlive the 4 s allowed below.
    let config = tune(
        &config_text(&url, &receiver.endpoint(), "", &orders_mapping("orders")),
        &[("database", "claim_lease", s("6s"))],
    );
    let daemon = Daemon::start(parse(&config));
    wait_until(
        Duration::from_secs(20),
        "part of the backlog is delivered",
        || async { unsynced(&client).await <= 3800 },
    )
    .await;

    cluster.stop().await;
    let down_at = SystemTime::now();
    tokio::time::sleep(Duration::from_secs(2)).await;
    cluster.start_again().await;
    let client = connect(&url).await;
    // Claims made before the outage and still held: the claim rows inserted then.
    let held_from_before = || async {
        client
            .query_one(
                "SELECT count(*) FROM resonance_sync.deliveries
                  WHERE lease_until IS NOT NULL AND updated_at < $1",
                &[&down_at],
            )
            .await
            .map(|row| row.get::<_, i64>(0))
            .unwrap_or(i64::MAX)
    };
    wait_until(
        Duration::from_secs(4),
        "no claim from before the outage is still held",
        || async { held_from_before().await == 0 },
    )
    .await;
    let left = unsynced(&client).await;
    assert!(
        left > 400,
        "only {left} rows left when the stranded claims were given back: the backlog was not \
         still draining, and the test proves nothing"
    );

    drain_stop_and_check(&client, daemon, &ledger, Duration::from_secs(40)).await;
}
