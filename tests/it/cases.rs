//! Field cases of /work/shared/cases/CASES.md about what reaches the API and when (C1, C10,
//! C14, C16), each as a specification of the daemon against real PostgreSQL and a scripted
//! receiver. The cases about exact values are in `exact_values.rs`.

use std::time::{Duration, Instant};

use resonance_sync::app::AppError;

use crate::harness::*;

const WAIT: Duration = Duration::from_secs(15);

#[tokio::test]
async fn c1_a_row_that_commits_after_a_later_id_is_still_delivered_exactly_once() {
    logs();
    let db = TestDb::with_orders().await;
    let receiver = Receiver::start().await;
    // Session A takes id 1 and stays open; session B takes id 2 and commits.
    let session_a = connect(&db.url).await;
    session_a
        .batch_execute(
            "BEGIN; INSERT INTO orders (user_email, order_value, currency) \
             VALUES ('first.slow@example.com', 10.00, 'USD')",
        )
        .await
        .expect("open transaction A");
    let fast = db
        .insert_orders(&[(Some("second.fast@example.com"), "20.00", "USD")])
        .await[0];
    assert_eq!(fast, 2);

    let daemon = Daemon::start(orders_config(&db, &receiver));
    wait_until(WAIT, "order 2 is synced", || async {
        db.synced_ids().await == vec![2]
    })
    .await;
    // A row committed later still, delivered while A is open: polls went past id 2.
    let later = db
        .insert_orders(&[(Some("third@example.com"), "30.00", "USD")])
        .await[0];
    wait_until(WAIT, "the later order is synced", || async {
        db.synced_ids().await.contains(&later)
    })
    .await;
    assert!(
        receiver.for_order(1).is_empty(),
        "order 1 is not visible yet"
    );

    session_a.batch_execute("COMMIT").await.expect("commit A");
    wait_until(WAIT, "order 1 is synced", || async {
        db.synced_ids().await == vec![1, 2, later]
    })
    .await;
    daemon.stop().await.expect("run stops cleanly");

    assert_eq!(raw_values(&receiver, 1), ["10.00"]);
    assert_eq!(raw_values(&receiver, 2), ["20.00"]);
    assert_eq!(receiver.count(), 3, "each order exactly once");
}
fn poison_mapping() -> String {
    let mapping = orders_mapping("orders")
        .replace("batch_size = 50", "batch_size = 2")
        .replace("interval = \"200ms\"", "interval = \"30s\"");
    assert!(mapping.contains("batch_size = 2") && mapping.contains("\"30s\""));
    mapping
}

#[tokio::test]
async fn c10_blank_emails_are_dead_lettered_unsent_and_do_not_starve_the_queue() {
    logs();
    let db = TestDb::with_orders().await;
    let ids = db
        .insert_orders(&[
            (None, "10.00", "USD"),
            (Some(""), "11.00", "USD"),
            (Some("   "), "12.00", "USD"),
            (Some("valid.guest@example.com"), "13.00", "USD"),
        ])
        .await;
    let receiver = Receiver::start().await;
    let config = config(&db.url, &receiver.endpoint(), "", &poison_mapping());

    let daemon = Daemon::start(config);
    // The interval is 30 s: delivery well before it means the poison rows, two per batch, did
    // not hold the queue; full batches poll again at once.
    wait_until(
        Duration::from_secs(5),
        "the valid order is synced",
        || async { db.synced_ids().await == vec![ids[3]] },
    )
    .await;
    wait_until(WAIT, "three dead letters", || async {
        db.dead_letters().await.len() == 3
    })
    .await;
    daemon.stop().await.expect("run stops cleanly");

    let seen = receiver.seen();
    assert_eq!(seen.len(), 1, "only the valid row is sent");
    assert_eq!(seen[0].email(), "valid.guest@example.com");
    for id in &ids[..3] {
        let state = db.delivery(id).await.expect("a dead letter");
        assert_eq!(state.reason.as_deref(), Some("missing_email"), "order {id}");
        assert_eq!((state.attempts, state.dead), (0, true), "order {id}");
    }
}

#[tokio::test]
async fn c10_an_email_fallback_column_is_used_when_the_email_is_blank() {
    logs();
    let db = TestDb::with_orders().await;
    db.exec(
        "ALTER TABLE orders ADD COLUMN billing_email text;
         INSERT INTO orders (id, user_email, billing_email, order_value) VALUES
           (1, NULL, 'billing.guest@example.com', 10.00),
           (2, '  ', NULL, 11.00),
           (3, 'direct@example.com', 'unused@example.com', 12.00);",
    )
    .await;
    let mapping = orders_mapping("orders")
        .replace(
            "SELECT id, user_email,",
            "SELECT id, user_email, billing_email,",
        )
        .replace(
            "email = \"user_email\"",
            "email = \"user_email\"\nemail_fallback = \"billing_email\"",
        );
    assert!(mapping.contains("email_fallback") && mapping.contains(", billing_email,"));
    let receiver = Receiver::start().await;
    let config = config(&db.url, &receiver.endpoint(), "", &mapping);

    let error = backfill(&config).await.expect_err("one row is unsendable");

    assert!(matches!(error, AppError::RowsLeft(_)), "{error:?}");
    let emails: Vec<String> = [1, 3]
        .iter()
        .map(|id| receiver.for_order(id)[0].email())
        .collect();
    assert_eq!(emails, ["billing.guest@example.com", "direct@example.com"]);
    assert_eq!(receiver.count(), 2);
    assert_eq!(db.synced_ids().await, vec![1, 3]);
    assert_eq!(
        db.dead_letters().await,
        vec![("2".to_string(), "missing_email".to_string())]
    );
    assert!(
        !receiver.seen()[0].json["metadata"]
            .as_object()
            .unwrap()
            .contains_key("billing_email"),
        "the explicit metadata is kept"
    );
}
#[tokio::test]
async fn c14_429_and_408_are_retried_while_400_and_422_dead_letter_after_one_attempt() {
    logs();
    let db = TestDb::with_orders().await;
    let rows: Vec<(i64, &str, &str)> = (2001..=2004)
        .map(|id| (id, "status.case@example.com", "14.00"))
        .collect();
    db.insert_orders_with_ids(&rows).await;
    let receiver = Receiver::scripted(|s| match (s.order_id().as_str(), s.earlier) {
        ("2001", 0 | 1) => Reply::status(429).with_header("Retry-After", "1"),
        ("2002", 0) => Reply::status(408),
        ("2003", _) => Reply::status(400).with_body("{\"error\":\"bad payload\"}"),
        ("2004", _) => Reply::status(422),
        _ => Reply::ok(),
    })
    .await;

    let daemon = Daemon::start(orders_config(&db, &receiver));
    wait_until(WAIT, "2001 and 2002 are synced", || async {
        db.synced_ids().await == vec![2001, 2002]
    })
    .await;
    // A row inserted afterwards is delivered: later polls ran, and sent no dead letter again.
    db.insert_orders_with_ids(&[(2005, "later@example.com", "15.00")])
        .await;
    wait_until(WAIT, "2005 is synced", || async {
        db.synced_ids().await.contains(&2005)
    })
    .await;
    daemon.stop().await.expect("run stops cleanly");

    let first_2001 = receiver.for_order(2001);
    assert_eq!(first_2001.len(), 3, "2001: 429, 429, 200");
    let spread = first_2001[2].at - first_2001[0].at;
    assert!(
        spread >= Duration::from_secs(2),
        "Retry-After honoured twice: {spread:?}"
    );
    assert_eq!(receiver.for_order(2002).len(), 2, "2002: 408, 200");
    for (id, status, body) in [(2003, 400, "{\"error\":\"bad payload\"}"), (2004, 422, "")] {
        assert_eq!(receiver.for_order(id).len(), 1, "{id}: exactly one attempt");
        let state = db.delivery(id).await.expect("a dead letter");
        assert_eq!(
            (state.attempts, state.last_status, state.dead),
            (1, Some(status), true),
            "{id}"
        );
        assert_eq!(state.last_error.as_deref(), Some(body));
    }
}

#[tokio::test]
async fn c14_a_wrong_key_in_run_marks_and_dead_letters_nothing_and_pauses() {
    logs();
    for status in [401u16, 403] {
        let db = TestDb::with_orders().await;
        let rows: Vec<(i64, &str, &str)> = (2001..=2004)
            .map(|id| (id, "wrong.key@example.com", "14.00"))
            .collect();
        db.insert_orders_with_ids(&rows).await;
        let receiver = Receiver::scripted(move |_| Reply::status(status)).await;

        let daemon = Daemon::start(orders_config(&db, &receiver));
        wait_until(WAIT, "every order is tried", || async {
            receiver.count() >= rows.len()
        })
        .await;
        // Five poll intervals: a paused daemon sends nothing more.
        tokio::time::sleep(Duration::from_secs(1)).await;
        daemon.stop().await.expect("run stops cleanly");

        assert_eq!(
            receiver.count(),
            rows.len(),
            "{status}: each row once, then paused"
        );
        assert!(db.synced_ids().await.is_empty(), "{status}: nothing marked");
        assert!(db.dead_letters().await.is_empty(), "{status}: nothing dead");
        let charged: i64 = db
            .scalar("SELECT count(*) FROM resonance_sync.deliveries WHERE attempts > 0")
            .await;
        assert_eq!(charged, 0, "{status}: no row is charged an attempt");
    }
}
#[tokio::test]
async fn c16_a_receiver_that_never_answers_times_out_and_does_not_block_other_rows_or_shutdown() {
    logs();
    let db = TestDb::with_orders().await;
    let ids = db
        .insert_orders(&[
            (Some("hang@example.com"), "22.01", "USD"),
            (Some("ok.one@example.com"), "22.02", "USD"),
            (Some("ok.two@example.com"), "22.03", "USD"),
        ])
        .await;
    let hang = ids[0].to_string();
    let receiver = Receiver::scripted(move |s| {
        if s.order_id() == hang {
            Reply::ok().after(Duration::from_secs(600))
        } else {
            Reply::ok()
        }
    })
    .await;

    let daemon = Daemon::start(orders_config(&db, &receiver));
    wait_until(WAIT, "the other orders are synced", || async {
        db.synced_ids().await == ids[1..]
    })
    .await;
    assert_eq!(
        receiver.for_order(ids[0]).len(),
        1,
        "the others were delivered while the first attempt hung"
    );
    wait_until(WAIT, "a second attempt at the hanging order", || async {
        receiver.for_order(ids[0]).len() >= 2
    })
    .await;
    let attempts = receiver.for_order(ids[0]);
    let gap = attempts[1].at - attempts[0].at;
    assert!(
        gap >= Duration::from_secs(2) && gap <= Duration::from_secs(3),
        "the attempt ends at the 2 s timeout (±1 s), then retries: {gap:?}"
    );
    let state = db.delivery(ids[0]).await.expect("retry state");
    assert!(!state.dead, "a timeout is retryable");
    assert!(
        state
            .last_error
            .as_deref()
            .unwrap_or("")
            .contains("timed out"),
        "{state:?}"
    );

    // Stopped while the second attempt hangs: the attempt times out and the run returns.
    let stopping = Instant::now();
    daemon.stop().await.expect("run stops cleanly");
    let took = stopping.elapsed();
    assert!(
        took < Duration::from_secs(3),
        "stops within the timeout: {took:?}"
    );
    assert_eq!(
        db.synced_ids().await,
        ids[1..],
        "the hanging order stays unsynced"
    );
    let state = db.delivery(ids[0]).await.expect("retry state");
    assert_eq!(
        (state.attempts, state.dead, state.leased),
        (2, false, false)
    );
}
