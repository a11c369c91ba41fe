//! How each kind of answer is handled, end to end against real PostgreSQL: retries after 5xx
//! and timeouts, `Retry-After`, permanent 4xx as dead letters, a refused key, an API that is
//! down, and a restart after a completed run.

use std::time::Duration;

use resonance_sync::app::AppError;

use crate::harness::*;

const WAIT: Duration = Duration::from_secs(15);

/// Asserts every request for `id` carried the same body and the same `Idempotency-Key`.
fn assert_identical_attempts(receiver: &Receiver, id: i64) {
    let seen = receiver.for_order(id);
    let first = &seen[0];
    for again in &seen[1..] {
        assert_eq!(
            again.body, first.body,
            "order {id}: a retry sends the same bytes"
        );
        assert_eq!(again.idempotency_key(), first.idempotency_key());
    }
}

/// Waits until `id` is synced, proving polls ran after everything before it.
async fn deliver_sentinel(db: &TestDb) -> i64 {
    let id = db
        .insert_orders(&[(Some("sentinel@example.com"), "1.00", "USD")])
        .await[0];
    wait_until(WAIT, "the sentinel order is synced", || async {
        db.synced_ids().await.contains(&id)
    })
    .await;
    id
}

#[tokio::test]
async fn a_row_is_retried_after_5xx_then_delivered_and_marked_once() {
    logs();
    let db = TestDb::with_orders().await;
    db.track_marks("orders").await;
    let ids = db
        .insert_orders(&[(Some("retry.me@example.com"), "49.90", "EUR")])
        .await;
    let receiver = Receiver::scripted(|s| match s.earlier {
        0 => Reply::status(500).with_body("boom"),
        1 => Reply::status(503),
        _ => Reply::ok(),
    })
    .await;

    let reports = backfill(&orders_config(&db, &receiver))
        .await
        .expect("the row is delivered in the end");

    assert_eq!(reports[0].delivered, 1);
    assert_eq!(
        receiver.for_order(ids[0]).len(),
        3,
        "two failures, then 200"
    );
    assert_identical_attempts(&receiver, ids[0]);
    assert_eq!(db.synced_ids().await, ids);
    assert_eq!(
        db.marks().await.get(&ids[0]),
        Some(&1),
        "marked exactly once"
    );
    assert_eq!(
        db.delivery(ids[0]).await,
        None,
        "a delivered row's state is forgotten"
    );
}

#[tokio::test]
async fn a_row_is_retried_after_a_timeout_then_delivered_and_marked_once() {
    logs();
    let db = TestDb::with_orders().await;
    db.track_marks("orders").await;
    let ids = db
        .insert_orders(&[
            (Some("slow.first@example.com"), "10.00", "USD"),
            (Some("fast@example.com"), "11.00", "USD"),
        ])
        .await;
    let slow = ids[0].to_string();
    // The first attempt at the slow order is answered only after the 2 s timeout.
    let receiver = Receiver::scripted(move |s| {
        if s.order_id() == slow && s.earlier == 0 {
            Reply::ok().after(Duration::from_millis(3_500))
        } else {
            Reply::ok()
        }
    })
    .await;

    let daemon = Daemon::start(orders_config(&db, &receiver));
    wait_until(WAIT, "both orders are synced", || async {
        db.synced_ids().await == ids
    })
    .await;
    daemon.stop().await.expect("run stops cleanly");

    let attempts = receiver.for_order(ids[0]);
    assert_eq!(attempts.len(), 2, "one timeout, one success");
    let gap = attempts[1].at - attempts[0].at;
    assert!(
        gap >= Duration::from_secs(2) && gap < Duration::from_secs(3),
        "the retry follows the 2 s timeout, got {gap:?}"
    );
    assert_identical_attempts(&receiver, ids[0]);
    assert_eq!(receiver.for_order(ids[1]).len(), 1);
    let marks = db.marks().await;
    assert_eq!(
        (marks.get(&ids[0]), marks.get(&ids[1])),
        (Some(&1), Some(&1))
    );
    assert!(db.dead_letters().await.is_empty());
}

#[tokio::test]
async fn retry_after_seconds_on_429_delays_the_next_attempt_at_least_that_long() {
    logs();
    let db = TestDb::with_orders().await;
    let ids = db
        .insert_orders(&[(Some("rate.limited@example.com"), "5.00", "USD")])
        .await;
    let receiver = Receiver::scripted(|s| match s.earlier {
        0 => Reply::status(429).with_header("Retry-After", "2"),
        _ => Reply::ok(),
    })
    .await;

    let daemon = Daemon::start(orders_config(&db, &receiver));
    wait_until(WAIT, "the order is synced", || async {
        db.synced_ids().await == ids
    })
    .await;
    daemon.stop().await.expect("run stops cleanly");

    let attempts = receiver.for_order(ids[0]);
    assert_eq!(attempts.len(), 2);
    let gap = attempts[1].at - attempts[0].at;
    // The backoff alone would retry within 0.5 s.
    assert!(
        gap >= Duration::from_secs(2) && gap < Duration::from_secs(3),
        "the second attempt waits for Retry-After: 2, got {gap:?}"
    );
    assert_identical_attempts(&receiver, ids[0]);
}

#[tokio::test]
async fn permanent_4xx_are_dead_lettered_after_one_attempt_and_never_sent_again() {
    logs();
    let db = TestDb::with_orders().await;
    let statuses = [400u16, 422, 404, 413];
    let rows: Vec<(Option<&str>, &str, &str)> = statuses
        .iter()
        .map(|_| (Some("refused.row@example.com"), "7.00", "USD"))
        .chain([(Some("fine@example.com"), "8.00", "USD")])
        .collect();
    let ids = db.insert_orders(&rows).await;
    let script: Vec<(String, u16)> = ids
        .iter()
        .zip(statuses)
        .map(|(id, status)| (id.to_string(), status))
        .collect();
    let receiver =
        Receiver::scripted(
            move |s| match script.iter().find(|(id, _)| *id == s.order_id()) {
                Some((_, status)) => {
                    Reply::status(*status).with_body(&format!("{{\"error\":\"no {status}\"}}"))
                }
                None => Reply::ok(),
            },
        )
        .await;
    let config = orders_config(&db, &receiver);

    let error = backfill(&config)
        .await
        .expect_err("rejected rows fail the backfill");
    assert!(matches!(error, AppError::RowsLeft(_)), "{error:?}");
    assert_eq!(error.exit_code(), 1);
    assert_eq!(db.synced_ids().await, vec![ids[4]]);
    for (id, status) in ids.iter().zip(statuses) {
        let state = db.delivery(id).await.expect("a dead letter is recorded");
        assert_eq!(
            state,
            DeliveryState {
                attempts: 1,
                last_status: Some(i32::from(status)),
                last_error: Some(format!("{{\"error\":\"no {status}\"}}")),
                reason: Some("rejected_by_api".to_string()),
                dead: true,
                leased: false,
            },
            "order {id}"
        );
    }

    // Neither a later backfill nor a run sends them again.
    let _ = backfill(&config).await;
    let daemon = Daemon::start(config);
    deliver_sentinel(&db).await;
    daemon.stop().await.expect("run stops cleanly");
    for id in &ids {
        assert_eq!(receiver.for_order(id).len(), 1, "order {id} was sent once");
    }
    assert_eq!(db.dead_letters().await.len(), 4);
}

#[tokio::test]
async fn a_refused_key_stops_backfill_with_exit_4_and_charges_no_row() {
    logs();
    for status in [401u16, 403] {
        let db = TestDb::with_orders().await;
        let ids = db
            .insert_orders(&[
                (Some("a@example.com"), "1.00", "USD"),
                (Some("b@example.com"), "2.00", "USD"),
                (Some("c@example.com"), "3.00", "USD"),
            ])
            .await;
        let receiver =
            Receiver::scripted(move |_| Reply::status(status).with_body("{\"error\":\"no\"}"))
                .await;

        let error = backfill(&orders_config(&db, &receiver))
            .await
            .expect_err("a refused key fails the backfill");

        assert!(matches!(error, AppError::Refused(_)), "{status}: {error:?}");
        assert_eq!(error.exit_code(), 4);
        let message = error.to_string();
        assert!(
            message.contains("API key") && message.contains(&status.to_string()),
            "the message names the key and the status: {message}"
        );
        assert!(!message.contains(API_KEY), "the key itself is never shown");
        assert!(receiver.count() <= ids.len(), "each row at most once");
        assert!(db.synced_ids().await.is_empty(), "{status}: nothing marked");
        assert!(db.dead_letters().await.is_empty(), "{status}: nothing dead");
        let charged: i64 = db
            .scalar(
                "SELECT count(*) FROM resonance_sync.deliveries \
                 WHERE attempts > 0 OR lease_until IS NOT NULL",
            )
            .await;
        assert_eq!(charged, 0, "{status}: no attempt counted, no claim kept");
    }
}

#[tokio::test]
async fn run_pauses_on_a_refused_key_and_delivers_once_the_key_is_accepted() {
    logs();
    let db = TestDb::with_orders().await;
    let ids = db
        .insert_orders(&[
            (Some("a@example.com"), "1.00", "USD"),
            (Some("b@example.com"), "2.00", "USD"),
            (Some("c@example.com"), "3.00", "USD"),
        ])
        .await;
    let receiver = Receiver::scripted(|_| Reply::status(401)).await;
    let daemon = Daemon::start(orders_config(&db, &receiver));

    wait_until(WAIT, "every order is tried once", || async {
        receiver.count() >= ids.len()
    })
    .await;
    // Over a window of seven poll intervals, the paused daemon sends nothing more.
    tokio::time::sleep(Duration::from_millis(1_400)).await;
    assert_eq!(receiver.count(), ids.len(), "no request while paused");
    assert!(db.synced_ids().await.is_empty());
    assert!(db.dead_letters().await.is_empty());

    receiver.set_script(|_| Reply::ok());
    wait_until(Duration::from_secs(30), "every order is synced", || async {
        db.synced_ids().await == ids
    })
    .await;
    daemon.stop().await.expect("run stops cleanly");
    for id in &ids {
        assert_eq!(
            receiver.for_order(id).len(),
            2,
            "order {id}: one 401, one 200"
        );
    }
    assert!(db.dead_letters().await.is_empty());
}

#[tokio::test]
async fn an_api_that_fails_everything_leaves_every_row_unsynced_and_is_not_hammered() {
    logs();
    let db = TestDb::with_orders().await;
    let rows: Vec<(Option<&str>, &str, &str)> = (0..20)
        .map(|_| (Some("down@example.com"), "9.99", "USD"))
        .collect();
    db.insert_orders(&rows).await;
    let receiver = Receiver::scripted(|_| Reply::status(500)).await;

    let started = std::time::Instant::now();
    let error = backfill(&orders_config(&db, &receiver))
        .await
        .expect_err("nothing could be delivered");
    let elapsed = started.elapsed();

    assert!(matches!(error, AppError::RowsLeft(_)), "{error:?}");
    assert_eq!(error.exit_code(), 1);
    assert!(db.synced_ids().await.is_empty());
    assert!(
        db.dead_letters().await.is_empty(),
        "a backfill leaves them for later"
    );
    let requests = receiver.count();
    // Without the gate every row would get max_attempts (4) tries: 80 requests.
    assert!(
        requests <= 20 * 2,
        "the gate bounds the requests: {requests} in {elapsed:?}"
    );
    assert!(
        elapsed < Duration::from_secs(30),
        "the backfill ends: {elapsed:?}"
    );
}

#[tokio::test]
async fn a_row_failing_every_attempt_of_a_backfill_is_left_for_later_not_dead_lettered() {
    logs();
    let db = TestDb::with_orders().await;
    let ids = db
        .insert_orders(&[
            (Some("broken@example.com"), "1.00", "USD"),
            (Some("fine@example.com"), "2.00", "USD"),
        ])
        .await;
    let broken = ids[0].to_string();
    let receiver = Receiver::scripted(move |s| {
        if s.order_id() == broken {
            Reply::status(502)
        } else {
            Reply::ok()
        }
    })
    .await;

    let error = backfill(&orders_config(&db, &receiver))
        .await
        .expect_err("a row is left");

    assert!(matches!(error, AppError::RowsLeft(_)), "{error:?}");
    assert_eq!(receiver.for_order(ids[0]).len(), 4, "max_attempts tries");
    assert_eq!(db.synced_ids().await, vec![ids[1]]);
    let state = db.delivery(ids[0]).await.expect("retry state");
    assert_eq!((state.attempts, state.dead), (4, false), "left, not dead");
    assert_eq!(state.last_status, Some(502));
}

#[tokio::test]
async fn a_second_run_after_a_completed_run_sends_nothing() {
    logs();
    let db = TestDb::with_orders().await;
    let rows: Vec<(Option<&str>, &str, &str)> = (0..30)
        .map(|_| (Some("once@example.com"), "3.30", "USD"))
        .collect();
    let ids = db.insert_orders(&rows).await;
    let receiver = Receiver::start().await;
    let config = orders_config(&db, &receiver);

    let first = Daemon::start(config.clone());
    wait_until(WAIT, "every order is synced", || async {
        db.synced_ids().await == ids
    })
    .await;
    first.stop().await.expect("the first run stops cleanly");
    assert_eq!(receiver.count(), ids.len());

    let second = Daemon::start(config);
    let sentinel = deliver_sentinel(&db).await;
    second.stop().await.expect("the second run stops cleanly");
    assert_eq!(
        receiver.count(),
        ids.len() + 1,
        "only the new order is sent"
    );
    assert_eq!(receiver.for_order(sentinel).len(), 1);
    assert!(
        receiver.seen().iter().all(|s| s.earlier == 0),
        "no key twice"
    );
}
