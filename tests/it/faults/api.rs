//! The API misbehaves: connections reset, requests hang past the timeout, 500s come in bursts,
//! 429/503 carry `Retry-After` (C15), an answer comes after the timeout (C18), and the API is
//! down for a while. Every row still ends synced exactly as it should, with the same key and body
//! on every attempt, and nothing is dead-lettered for a fault of the API.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use super::inject::*;
use super::support::*;
use crate::harness::*;

fn orders_config(
    db: &TestDb,
    endpoint: &str,
    changes: &[(&str, &str, Option<toml::Value>)],
) -> String {
    tune(
        &config_text(&db.url, endpoint, "", &orders_mapping("orders")),
        changes,
    )
}

#[tokio::test]
async fn connection_resets_and_hangs_past_the_timeout_are_retried_until_delivered() {
    let db = TestDb::with_orders().await;
    let ledger = Ledger::default();
    let receiver = Receiver::scripted(ledger.wrap(|_| Reply::ok())).await;
    let proxy = FaultProxy::start(receiver.addr, Fault::Reset).await;
    insert_many(&db.client, 20).await;
    let text = orders_config(
        &db,
        &proxy.endpoint(),
        &[
            ("resonance", "timeout", s("1s")),
            ("resonance", "max_attempts", n(100)),
            ("resonance", "retry_schedule", list(&["200ms"])),
        ],
    );
    let logs = LogCapture::start("resonance_sync=info");
    let daemon = Daemon::start(parse(&text));

    wait_until(
        Duration::from_secs(10),
        "attempts failed by resets are recorded",
        || async {
            proxy.accepted() >= 10
                && db
                    .scalar::<i64>(
                        "SELECT count(*) FROM resonance_sync.deliveries
                      WHERE attempts > 0 AND last_status IS NULL AND last_error <> ''",
                    )
                    .await
                    > 0
        },
    )
    .await;
    assert_eq!(receiver.count(), 0, "a reset connection delivers nothing");

    proxy.set(Fault::Hang);
    let hanging = Instant::now();
    wait_until(Duration::from_secs(10), "an attempt times out", || async {
        db.scalar::<i64>(
            "SELECT count(*) FROM resonance_sync.deliveries WHERE last_error LIKE 'timed out%'",
        )
        .await
            > 0
    })
    .await;
    assert!(since(hanging) >= 0.9, "the timeout (1 s) is waited for");
    assert!(
        db.synced_ids().await.is_empty(),
        "nothing is marked without a 2xx"
    );

    proxy.set(Fault::Forward);
    wait_until(
        Duration::from_secs(15),
        "every order is delivered",
        || async { unsynced(&db.client).await == 0 },
    )
    .await;
    daemon.stop().await.expect("run stops cleanly");

    let orders = ledger.by_order();
    assert_eq!(orders.len(), 20);
    for (order, answers) in &orders {
        assert_eq!(answers.len(), 1, "order {order} reached the API once");
    }
    assert!(
        db.dead_letters().await.is_empty(),
        "network faults are not the row's fault"
    );
    assert_eq!(
        db.scalar::<i64>("SELECT count(*) FROM resonance_sync.deliveries")
            .await,
        0,
        "delivered rows leave no state behind"
    );
    assert!(logs.count("attempt failed; will retry") >= 2);
}

#[tokio::test]
async fn bursts_of_500_are_retried_without_loss_or_dead_letters() {
    let db = TestDb::with_orders().await;
    log_mark_times(&db.client).await;
    insert_many(&db.client, 300).await;
    let ledger = Ledger::default();
    let count = AtomicUsize::new(0);
    let burst: Mutex<Option<Instant>> = Mutex::new(None);
    let receiver = Receiver::scripted(ledger.wrap(move |_| {
        let n = count.fetch_add(1, Ordering::SeqCst);
        let mut burst = burst.lock().unwrap();
        if n == 30 {
            *burst = Some(Instant::now());
        }
        match *burst {
            Some(start) if start.elapsed() < Duration::from_millis(1500) => {
                Reply::status(500).with_body("upstream down")
            }
            _ => Reply::ok().after(Duration::from_millis(2)),
        }
    }))
    .await;
    let text = orders_config(
        &db,
        &receiver.endpoint(),
        &[
            ("resonance", "max_attempts", n(30)),
            ("resonance", "retry_schedule", list(&["200ms"])),
        ],
    );
    let daemon = Daemon::start(parse(&text));
    wait_until(
        Duration::from_secs(30),
        "every order is delivered",
        || async { unsynced(&db.client).await == 0 },
    )
    .await;
    daemon.stop().await.expect("run stops cleanly");

    let answers = ledger.all();
    let failures = answers.iter().filter(|a| a.status == 500).count();
    assert!(failures >= 5, "the burst was hit ({failures} answers 500)");
    let orders = ledger.by_order();
    assert_eq!(orders.len(), 300);
    for (order, answers) in &orders {
        assert_same_key_and_body(order, answers);
        let delivered = answers.iter().filter(|a| a.ok()).count();
        assert_eq!(delivered, 1, "order {order}: one 2xx, then nothing more");
        assert!(
            answers.last().unwrap().ok(),
            "order {order}: its last answer was the 2xx"
        );
    }
    assert_marked_only_after_a_2xx(&db.client, &ledger).await;
    assert!(db.dead_letters().await.is_empty());
}

/// The wall-clock gap between the first two requests for `order`.
fn gap(orders: &HashMap<String, Vec<Answered>>, order: &str) -> f64 {
    let answers = &orders[order];
    assert_eq!(answers.len(), 2, "order {order}: one failure, then the 2xx");
    assert_same_key_and_body(order, answers);
    seconds_between(answers[0].arrived, answers[1].arrived)
}

/// C15: `Retry-After` in seconds and as an HTTP date is honoured, a huge one is capped at
/// `retry_after_max`, and a garbage one falls back to the normal backoff.
#[tokio::test]
async fn retry_after_is_honoured_capped_and_ignored_when_garbage() {
    let db = TestDb::with_orders().await;
    db.exec(
        "INSERT INTO orders (id, user_email, order_value, currency) VALUES
         (2101, 'ra.seconds@example.com', 1.00, 'USD'), (2102, 'ra.date@example.com', 2.00, 'USD'),
         (2103, 'ra.day@example.com', 3.00, 'USD'), (2104, 'ra.soon@example.com', 4.00, 'USD')",
    )
    .await;
    let ledger = Ledger::default();
    let receiver = Receiver::scripted(ledger.wrap(|seen| {
        if seen.earlier > 0 {
            return Reply::ok();
        }
        match seen.order_id().as_str() {
            "2101" => Reply::status(503).with_header("Retry-After", "3"),
            "2102" => {
                // Whole seconds, rounded up, so the date is at least 5 s from this request.
                let now = SystemTime::now()
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .unwrap();
                let date = SystemTime::UNIX_EPOCH + Duration::from_secs(now.as_secs() + 6);
                Reply::status(429).with_header("Retry-After", &httpdate::fmt_http_date(date))
            }
            "2103" => Reply::status(429).with_header("Retry-After", "86400"),
            "2104" => Reply::status(503).with_header("Retry-After", "soon"),
            _ => Reply::ok(),
        }
    }))
    .await;
    let text = orders_config(
        &db,
        &receiver.endpoint(),
        &[("resonance", "retry_after_max", s("6s"))],
    );
    let daemon = Daemon::start(parse(&text));
    wait_until(
        Duration::from_secs(20),
        "all four orders are delivered",
        || async { unsynced(&db.client).await == 0 },
    )
    .await;
    daemon.stop().await.expect("run stops cleanly");

    let orders = ledger.by_order();
    let seconds = gap(&orders, "2101");
    assert!(
        seconds >= 3.0,
        "2101 retried after {seconds:.2} s, before Retry-After: 3"
    );
    let date = gap(&orders, "2102");
    assert!(
        date >= 5.0,
        "2102 retried after {date:.2} s, before its HTTP date"
    );
    let capped = gap(&orders, "2103");
    assert!(
        (5.5..=7.5).contains(&capped),
        "2103 asked for a day; the wait is retry_after_max (6 s), was {capped:.2} s"
    );
    let garbage = gap(&orders, "2104");
    assert!(
        garbage < 1.0,
        "2104's 'soon' falls back to the backoff (50 ms), was {garbage:.2} s"
    );
    assert!(
        db.dead_letters().await.is_empty(),
        "a rate limit is not a reason to give up"
    );
}

/// C18: the API takes the event but answers after the timeout; the retry carries the same key
/// and bytes, the row is marked once, and the log calls the first attempt a timeout.
#[tokio::test]
async fn an_answer_after_the_timeout_is_resent_with_the_same_key_and_marked_once() {
    let db = TestDb::with_orders().await;
    log_mark_times(&db.client).await;
    db.exec(
        "INSERT INTO orders (id, user_email, order_value, currency)
         VALUES (2401, 'late.answer@example.com', 24.01, 'USD')",
    )
    .await;
    let ledger = Ledger::default();
    let receiver = Receiver::scripted(ledger.wrap(|seen| {
        if seen.earlier == 0 {
            Reply::ok().after(Duration::from_millis(2500))
        } else {
            Reply::ok()
        }
    }))
    .await;
    let text = orders_config(
        &db,
        &receiver.endpoint(),
        &[("resonance", "timeout", s("1s"))],
    );
    let logs = LogCapture::start("resonance_sync=info");
    let daemon = Daemon::start(parse(&text));
    wait_until(Duration::from_secs(10), "2401 is delivered", || async {
        db.synced_ids().await == vec![2401]
    })
    .await;
    // Let the late answer of the first attempt come and go before counting marks.
    let first = ledger.all()[0].arrived;
    while seconds_between(first, SystemTime::now()) < 3.0 {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    daemon.stop().await.expect("run stops cleanly");

    let answers = &ledger.by_order()["2401"];
    assert_eq!(answers.len(), 2, "the timed-out attempt, then the retry");
    assert_same_key_and_body("2401", answers);
    assert_eq!(mark_times(&db.client).await["2401"].len(), 1, "marked once");
    assert!(db.dead_letters().await.is_empty());
    let failed: Vec<String> = logs
        .lines()
        .into_iter()
        .filter(|l| l.contains("attempt failed"))
        .collect();
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert!(failed[0].contains("timed out"), "{}", failed[0]);
    assert!(
        !failed[0].contains("status=5"),
        "a timeout is not a 5xx: {}",
        failed[0]
    );
}

/// While every request fails, sending drops from full rate to one probe per pause, with one
/// warning per pause (not per row); when the API answers again, sending resumes by itself.
#[tokio::test]
async fn an_api_outage_pauses_sending_globally_and_resumes_by_itself() {
    let db = TestDb::with_orders().await;
    insert_many(&db.client, 200).await;
    let ledger = Ledger::default();
    let receiver = Receiver::scripted(ledger.wrap(|_| Reply::status(503))).await;
    let text = orders_config(
        &db,
        &receiver.endpoint(),
        &[
            ("resonance", "max_attempts", n(50)),
            ("resonance", "retry_schedule", list(&["300ms"])),
        ],
    );
    let logs = LogCapture::start("resonance_sync=info");
    let daemon = Daemon::start(parse(&text));
    let outage = Instant::now();
    // The outage itself is the fault: three seconds of 503s.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let answers = ledger.all();
    let failed = answers.len();
    let last_second = answers
        .iter()
        .filter(|a| seconds_between(a.arrived, SystemTime::now()) <= 1.0)
        .count();
    let pauses = logs.count("pausing sends");
    let warnings = logs.count(" WARN ");
    eprintln!("outage: {failed} requests, {last_second} in the last second, {pauses} pauses");
    // At full rate, 200 rows retried every 300 ms would be hundreds of requests a second.
    assert!(
        failed <= 40,
        "{failed} requests in {:.1} s of outage",
        since(outage)
    );
    assert!(
        last_second <= 5,
        "{last_second} requests in the last second of the outage"
    );
    assert!(pauses >= 2, "the pauses are logged ({pauses})");
    assert_eq!(warnings, pauses, "one warning per pause, none per row");
    assert!(db.synced_ids().await.is_empty());

    receiver.set_script(ledger.wrap(|_| Reply::ok()));
    wait_until(
        Duration::from_secs(10),
        "sending resumes and drains",
        || async { unsynced(&db.client).await == 0 },
    )
    .await;
    daemon.stop().await.expect("run stops cleanly");
    assert!(logs.count("answering again; resuming") >= 1);
    assert!(db.dead_letters().await.is_empty());
    let orders = ledger.by_order();
    for (order, answers) in &orders {
        assert_same_key_and_body(order, answers);
    }
}

/// A refusal's body is kept short, printable and without the key. A NUL in it (a proxy's binary
/// error page) once made PostgreSQL refuse the dead letter, and the row was sent again thousands
/// of times; a key the API echoed across the cut was kept in part; a huge body was read whole.
#[tokio::test]
async fn a_hostile_refusal_body_is_dead_lettered_once_printable_and_without_the_key() {
    let db = TestDb::with_orders().await;
    let ids = db
        .insert_orders(&[
            (Some("nul@example.com"), "1.00", "EUR"),
            (Some("echo@example.com"), "2.00", "EUR"),
            (Some("huge@example.com"), "3.00", "EUR"),
        ])
        .await;
    let receiver = Receiver::scripted(|seen| {
        let auth = seen
            .headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        match seen.email().as_str() {
            "nul@example.com" => Reply::status(422).with_body("bad\0row\n2026-12-04 ERROR forged"),
            // The key ends up across the 2,048 bytes kept.
            "echo@example.com" => {
                Reply::status(422).with_body(&format!("{}{auth}", "x".repeat(2_030)))
            }
            _ => Reply::status(400).with_body(&"y".repeat(20_000_000)),
        }
    })
    .await;
    let config = parse(&orders_config(&db, &receiver.endpoint(), &[]));
    let result = backfill(&config).await;
    assert!(
        matches!(result, Err(resonance_sync::app::AppError::RowsLeft(_))),
        "{result:?}"
    );
    assert_eq!(
        receiver.count(),
        3,
        "each row is sent once, then dead-lettered"
    );

    let mut letters = Vec::new();
    for id in &ids {
        letters.push(db.delivery(id).await.expect("a dead letter"));
    }
    for letter in &letters {
        assert!(letter.dead, "{letter:?}");
        assert_eq!(letter.reason.as_deref(), Some("rejected_by_api"));
    }
    let error = |i: usize| letters[i].last_error.clone().unwrap_or_default();
    assert!(
        error(0).contains("bad\\u{0}row\\n2026-12-04 ERROR forged"),
        "{}",
        error(0)
    );
    assert!(
        !error(1).contains(&API_KEY[..8]) && error(1).ends_with("xxBearer "),
        "...{}",
        &error(1)[error(1).len().saturating_sub(60)..]
    );
    assert!(error(2).len() <= 2_100, "{} bytes kept", error(2).len());
}
