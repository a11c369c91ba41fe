//! The real binary as a process: killed with SIGKILL at random moments, stopped with SIGTERM in
//! the middle of a slow request (C20), and run as several instances on one table (C21).

use std::time::{Duration, Instant, SystemTime};

use super::inject::*;
use super::support::*;
use crate::harness::*;

fn ms(millis: u64) -> Duration {
    Duration::from_millis(millis)
}

fn process_config(
    db: &TestDb,
    endpoint: &str,
    changes: &[(&str, &str, Option<toml::Value>)],
) -> String {
    let mut all = vec![
        ("database", "claim_lease", s("2s")),
        ("database", "pool_size", n(4)),
    ];
    all.extend_from_slice(changes);
    tune(
        &config_text(&db.url, endpoint, "", &orders_mapping("orders")),
        &all,
    )
}

#[tokio::test]
async fn sigkill_at_random_moments_loses_no_row_and_resends_only_what_was_in_flight() {
    let db = TestDb::with_orders().await;
    log_mark_times(&db.client).await;
    insert_many(&db.client, 3000).await;
    let ledger = Ledger::default();
    let receiver = Receiver::scripted(ledger.wrap(|seen| {
        let id: u64 = seen.order_id().parse().unwrap_or(0);
        // One order in 17 fails its first attempt, so a mark without a 2xx would show.
        if id % 17 == 0 && seen.earlier == 0 {
            return Reply::status(503).after(ms(2));
        }
        Reply::ok().after(ms(2 + id * 7919 % 9))
    }))
    .await;
    let work = Workdir::new(&process_config(&db, &receiver.endpoint(), &[]));

    // Each kill is a window: requests answered before its end may be in flight at the kill.
    let mut kills: Vec<(SystemTime, SystemTime)> = Vec::new();
    for round in 0..5 {
        let mut daemon = work.spawn(&format!("run{round}"), &["run"]);
        let before = ledger.count();
        wait_until(Duration::from_secs(20), "the daemon is sending", || async {
            ledger.count() >= before + 20
        })
        .await;
        let extra = rand::random_range(0..500u64);
        tokio::time::sleep(ms(extra)).await;
        let started = SystemTime::now();
        daemon.kill9().await;
        kills.push((started, SystemTime::now()));
        let left = unsynced(&db.client).await;
        eprintln!("kill {round}: {extra} ms after the 20th request, {left} rows left");
        assert!(left > 0, "the kill must land before the backlog is done");
    }
    let mut last = work.spawn("final", &["run"]);
    wait_until(Duration::from_secs(60), "every row is synced", || async {
        unsynced(&db.client).await == 0
    })
    .await;
    last.sigterm().await;
    assert_eq!(
        last.exit_code(Duration::from_secs(10)).await,
        Some(0),
        "{}",
        last.log()
    );

    assert_eq!(db.synced_ids().await.len(), 3000);
    let orders = ledger.by_order();
    assert_eq!(orders.len(), 3000, "every order reached the API");
    for (order, answers) in &orders {
        assert_same_key_and_body(order, answers);
    }
    assert_marked_only_after_a_2xx(&db.client, &ledger).await;
    let resent = duplicates(&ledger);
    for (ok, again) in &resent {
        let in_flight_at_a_kill = kills.iter().any(|(from, to)| {
            ok.arrived <= *to
                && ok.replied() + Duration::from_secs(1) >= *from
                && again.arrived >= *from
        });
        assert!(
            in_flight_at_a_kill,
            "order {} was sent again after a 2xx with no kill in between",
            ok.order
        );
    }
    eprintln!("{} duplicates over {} kills", resent.len(), kills.len());
    assert!(db.dead_letters().await.is_empty());
    assert_eq!(live_leases(&db.client).await, 0);
    assert_eq!(
        db.scalar::<i64>("SELECT count(*) FROM resonance_sync.deliveries")
            .await,
        0,
        "no state is left behind"
    );
}

/// Orders 2601..2605; the first request the receiver sees is answered after 5 s.
async fn slow_first_request(db: &TestDb) -> (Receiver, Ledger) {
    db.exec(
        "INSERT INTO orders (id, user_email, order_value, currency)
         SELECT g, 'stop' || g || '@example.com', 26.00, 'USD' FROM generate_series(2601, 2605) g",
    )
    .await;
    let ledger = Ledger::default();
    let first = std::sync::atomic::AtomicBool::new(true);
    let receiver = Receiver::scripted(ledger.wrap(move |_| {
        if first.swap(false, std::sync::atomic::Ordering::SeqCst) {
            Reply::ok().after(Duration::from_secs(5))
        } else {
            Reply::ok()
        }
    }))
    .await;
    (receiver, ledger)
}

/// C20 with SIGTERM: the request in flight finishes and is marked, nothing new starts, the
/// other claims are released, and the process exits 0 within the time left on that request.
#[tokio::test]
async fn sigterm_finishes_and_marks_the_request_in_flight_releases_claims_and_exits_0() {
    let db = TestDb::with_orders().await;
    let (receiver, ledger) = slow_first_request(&db).await;
    let config = process_config(
        &db,
        &receiver.endpoint(),
        &[
            ("resonance", "concurrency", n(1)),
            ("resonance", "timeout", s("8s")),
        ],
    );
    let work = Workdir::new(&config);
    let mut daemon = work.spawn("run", &["run"]);
    wait_until(
        Duration::from_secs(10),
        "the slow request is in flight",
        || async { ledger.count() == 1 },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(live_leases(&db.client).await >= 1, "the rows are claimed");
    let stopping = Instant::now();
    daemon.sigterm().await;
    let code = daemon.exit_code(Duration::from_secs(10)).await;
    assert_eq!(code, Some(0), "{}", daemon.log());
    assert!(
        since(stopping) < 6.0,
        "exited {:.1} s after SIGTERM",
        since(stopping)
    );

    let answers = ledger.all();
    assert_eq!(answers.len(), 1, "no new row is started after SIGTERM");
    let slow: i64 = answers[0].order.parse().unwrap();
    assert_eq!(
        db.synced_ids().await,
        vec![slow],
        "the request in flight is marked"
    );
    assert_eq!(
        live_leases(&db.client).await,
        0,
        "the other claims are released"
    );
    assert_eq!(
        db.scalar::<i64>("SELECT count(*) FROM resonance_sync.deliveries")
            .await,
        0,
        "rows never tried leave no state"
    );
}

/// C20 with `kill -9`: after a restart, the killed request is sent again (same key and body)
/// and the other rows come back when their leases run out.
#[tokio::test]
async fn sigkill_during_a_slow_request_is_recovered_after_restart_by_lease_expiry() {
    let db = TestDb::with_orders().await;
    let (receiver, ledger) = slow_first_request(&db).await;
    let config = process_config(
        &db,
        &receiver.endpoint(),
        &[("resonance", "concurrency", n(1))],
    );
    let work = Workdir::new(&config);
    let mut daemon = work.spawn("run", &["run"]);
    wait_until(
        Duration::from_secs(10),
        "the slow request is in flight",
        || async { ledger.count() == 1 },
    )
    .await;
    tokio::time::sleep(ms(500)).await;
    daemon.kill9().await;
    assert_eq!(
        live_leases(&db.client).await,
        5,
        "the killed process's claims are left"
    );

    let restarted = Instant::now();
    let mut daemon = work.spawn("restarted", &["run"]);
    wait_until(
        Duration::from_secs(15),
        "all five rows are synced",
        || async { unsynced(&db.client).await == 0 },
    )
    .await;
    assert!(
        since(restarted) < 6.0,
        "stale claims expire with their 2 s lease"
    );
    daemon.sigterm().await;
    assert_eq!(daemon.exit_code(Duration::from_secs(10)).await, Some(0));

    let orders = ledger.by_order();
    let slow = &ledger.all()[0].order;
    for (order, answers) in &orders {
        let expected = if order == slow { 2 } else { 1 };
        assert_eq!(answers.len(), expected, "order {order}");
        assert_same_key_and_body(order, answers);
    }
    assert_eq!(orders.len(), 5);
}

/// C21: a `run` and a `backfill` started together share the rows: one request per order.
#[tokio::test]
async fn run_and_backfill_started_together_send_each_row_exactly_once() {
    let db = TestDb::with_orders().await;
    insert_many(&db.client, 200).await;
    let ledger = Ledger::default();
    let receiver = Receiver::scripted(ledger.wrap(|_| Reply::ok().after(ms(50)))).await;
    let work = Workdir::new(&process_config(&db, &receiver.endpoint(), &[]));
    // A faster backfill runs out of rows while `run` still holds a batch: those are not "left".
    let fast = Workdir::new(&process_config(
        &db,
        &receiver.endpoint(),
        &[("resonance", "concurrency", n(32))],
    ));
    let mut run = work.spawn("run", &["run"]);
    let mut backfill = fast.spawn("backfill", &["backfill"]);
    let code = backfill.exit_code(Duration::from_secs(30)).await;
    wait_until(Duration::from_secs(20), "every row is synced", || async {
        unsynced(&db.client).await == 0
    })
    .await;
    run.sigterm().await;
    assert_eq!(run.exit_code(Duration::from_secs(10)).await, Some(0));
    assert_eq!(code, Some(0), "backfill: {}", backfill.log());

    assert_eq!(ledger.count(), 200, "exactly 200 requests");
    let orders = ledger.by_order();
    assert_eq!(orders.len(), 200, "one per order");
    assert_eq!(db.synced_ids().await.len(), 200);
}

/// Four instances on one table deliver every row exactly once.
#[tokio::test]
async fn four_instances_on_one_table_deliver_every_row_exactly_once() {
    let db = TestDb::with_orders().await;
    // Which instance marked each row: each names its sessions through its database URL.
    db.exec(
        "CREATE TABLE marked_by (id bigint NOT NULL, instance text NOT NULL);
         CREATE FUNCTION log_marked_by() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN INSERT INTO marked_by VALUES (NEW.id, current_setting('application_name'));
               RETURN NEW; END $$;
         CREATE TRIGGER log_marked_by AFTER UPDATE OF synced_to_resonance ON orders
           FOR EACH ROW WHEN (NEW.synced_to_resonance) EXECUTE FUNCTION log_marked_by();",
    )
    .await;
    insert_many(&db.client, 2000).await;
    let ledger = Ledger::default();
    let receiver = Receiver::scripted(ledger.wrap(|_| Reply::ok().after(ms(5)))).await;
    let work = Workdir::new(&process_config(&db, &receiver.endpoint(), &[]));
    let mut instances: Vec<Binary> = (0..4)
        .map(|i| {
            let url = format!("{}?application_name=instance{i}", db.url);
            work.spawn_with(&format!("run{i}"), &["run"], &[("DATABASE_URL", &url)])
        })
        .collect();
    wait_until(Duration::from_secs(60), "every row is synced", || async {
        unsynced(&db.client).await == 0
    })
    .await;
    for instance in &instances {
        instance.sigterm().await;
    }
    for instance in &mut instances {
        assert_eq!(instance.exit_code(Duration::from_secs(10)).await, Some(0));
    }

    assert_eq!(ledger.count(), 2000, "exactly one request per row");
    assert_eq!(ledger.by_order().len(), 2000);
    assert_eq!(
        db.scalar::<i64>("SELECT count(*) FROM marked_by").await,
        2000,
        "each row marked once"
    );
    let working = db
        .column("SELECT DISTINCT instance FROM marked_by ORDER BY 1")
        .await;
    assert_eq!(
        working.len(),
        4,
        "all four instances shared the work: {working:?}"
    );
}
