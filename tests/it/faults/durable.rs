//! Retry state lives in `resonance_sync.deliveries`: a restart neither forgets a backoff nor
//! resets the attempts; a row that exhausts `retry_schedule` becomes a dead letter; `backfill`
//! keeps its own bound; and the `dead-letters` commands list, retry and purge.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::inject::*;
use super::support::*;
use crate::harness::*;

/// When the daemon will next try `key`.
async fn next_attempt_at(db: &TestDb, key: i64) -> SystemTime {
    db.client
        .query_one(
            "SELECT next_attempt_at FROM resonance_sync.deliveries WHERE row_key = $1",
            &[&key.to_string()],
        )
        .await
        .expect("read next_attempt_at")
        .get(0)
}

#[tokio::test]
async fn retry_state_survives_a_restart_and_an_exhausted_row_becomes_a_dead_letter() {
    let db = TestDb::with_orders().await;
    let ids = db
        .insert_orders(&[
            (Some("failing@example.com"), "1.00", "USD"),
            (Some("healthy@example.com"), "2.00", "USD"),
        ])
        .await;
    let (failing, healthy) = (ids[0], ids[1]);
    let ledger = Ledger::default();
    let failing_order = failing.to_string();
    let receiver = Receiver::scripted(ledger.wrap(move |seen| {
        if seen.order_id() == failing_order {
            Reply::status(503).with_body("down for this one")
        } else {
            Reply::ok()
        }
    }))
    .await;
    // Three attempts in all: 2 s after the first failure, 100 ms after the second.
    let text = tune(
        &config_text(&db.url, &receiver.endpoint(), "", &orders_mapping("orders")),
        &[
            ("resonance", "max_attempts", None),
            ("resonance", "retry_schedule", list(&["2s", "100ms"])),
        ],
    );
    let config = parse(&text);

    let first = Daemon::start(config.clone());
    wait_until(
        Duration::from_secs(10),
        "the first failure is recorded",
        || async { db.delivery(failing).await.is_some_and(|d| d.attempts == 1) },
    )
    .await;
    let state = db.delivery(failing).await.unwrap();
    assert_eq!(state.last_status, Some(503));
    assert!(state.last_error.unwrap().contains("503"));
    assert!(!state.dead && !state.leased);
    let due = next_attempt_at(&db, failing).await;
    let wait = seconds_between(SystemTime::now(), due);
    assert!(
        wait > 1.0,
        "the 2 s backoff (with jitter) is stored; {wait:.2} s left"
    );
    wait_until(
        Duration::from_secs(5),
        "the healthy row is not blocked",
        || async { db.synced_ids().await == vec![healthy] },
    )
    .await;
    first.stop().await.expect("first daemon stops");

    let second = Daemon::start(config);
    wait_until(
        Duration::from_secs(10),
        "the second attempt is recorded",
        || async { db.delivery(failing).await.is_some_and(|d| d.attempts >= 2) },
    )
    .await;
    let answers = &ledger.by_order()[&failing.to_string()];
    assert!(
        answers[1].arrived >= due,
        "the restarted daemon waited for next_attempt_at ({:.3} s early)",
        seconds_between(answers[1].arrived, due)
    );
    assert_eq!(
        db.delivery(failing).await.unwrap().attempts,
        2,
        "attempts are not reset by a restart"
    );
    wait_until(
        Duration::from_secs(5),
        "the row is dead-lettered",
        || async { db.delivery(failing).await.is_some_and(|d| d.dead) },
    )
    .await;
    let dead = db.delivery(failing).await.unwrap();
    assert_eq!(dead.attempts, 3);
    assert_eq!(dead.reason.as_deref(), Some("attempts_exhausted"));
    // A dead letter is not sent again by the running daemon: three poll intervals of silence.
    tokio::time::sleep(Duration::from_millis(700)).await;
    second.stop().await.expect("second daemon stops");
    let answers = &ledger.by_order()[&failing.to_string()];
    assert_eq!(answers.len(), 3, "three attempts, then nothing");
    assert_same_key_and_body(&failing.to_string(), answers);
    assert!(!db.synced_ids().await.contains(&failing));
}

#[tokio::test]
async fn backfill_gives_each_row_max_attempts_then_reports_it_left_without_dead_lettering() {
    let db = TestDb::with_orders().await;
    let ids = db
        .insert_orders(&[
            (Some("failing@example.com"), "1.00", "USD"),
            (Some("healthy@example.com"), "2.00", "USD"),
        ])
        .await;
    let ledger = Ledger::default();
    let failing_order = ids[0].to_string();
    let receiver = Receiver::scripted(ledger.wrap(move |seen| {
        if seen.order_id() == failing_order {
            Reply::status(500)
        } else {
            Reply::ok()
        }
    }))
    .await;
    // The harness config: max_attempts = 4, backoff 50 ms doubling to 400 ms.
    let config = config(&db.url, &receiver.endpoint(), "", &orders_mapping("orders"));
    let error = backfill(&config).await.expect_err("a row is left");
    assert_eq!(error.exit_code(), 1, "{error}");

    let by_order = ledger.by_order();
    assert_eq!(
        by_order[&ids[0].to_string()].len(),
        4,
        "max_attempts in the run"
    );
    assert_eq!(by_order[&ids[1].to_string()].len(), 1);
    assert_eq!(db.synced_ids().await, vec![ids[1]]);
    let state = db
        .delivery(ids[0])
        .await
        .expect("the failing row's state is kept");
    assert_eq!(state.attempts, 4);
    assert!(
        !state.dead,
        "a backfill leaves the row for later, it does not dead-letter it"
    );
    assert!(db.dead_letters().await.is_empty());
}

/// One line of `dead-letters list` for `key`, split on whitespace.
fn listed<'a>(list: &'a str, key: &str) -> Option<Vec<&'a str>> {
    list.lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|fields| fields.get(1) == Some(&key))
}

#[tokio::test]
async fn dead_letters_are_listed_retried_and_purged_from_the_cli_and_never_block_other_rows() {
    let db = TestDb::with_orders().await;
    let ids = db
        .insert_orders(&[
            (None, "1.00", "USD"),
            (Some("rejected.a@example.com"), "2.00", "USD"),
            (Some("rejected.b@example.com"), "3.00", "USD"),
            (Some("ok.1@example.com"), "4.00", "USD"),
            (Some("ok.2@example.com"), "5.00", "USD"),
            (Some("ok.3@example.com"), "6.00", "USD"),
        ])
        .await;
    let key = |i: usize| ids[i].to_string();
    let accept = Arc::new(AtomicBool::new(false));
    let ledger = Ledger::default();
    let accepting = accept.clone();
    let receiver = Receiver::scripted(ledger.wrap(move |seen| {
        if seen.email().starts_with("rejected") && !accepting.load(Ordering::SeqCst) {
            Reply::status(422).with_body(r#"{"error":"invalid"}"#)
        } else {
            Reply::ok()
        }
    }))
    .await;
    // Batches of two, so the dead letters fill the first batch.
    let text = tune(
        &config_text(&db.url, &receiver.endpoint(), "", &orders_mapping("orders")),
        &[("mapping", "batch_size", n(2))],
    );
    let work = Workdir::new(&text);

    let (code, out) = work.run(&["backfill"]).await;
    assert_eq!(code, 1, "rows were rejected: {out}");
    assert_eq!(
        db.synced_ids().await,
        ids[3..].to_vec(),
        "dead letters block nothing"
    );

    let (code, list) = work.run(&["dead-letters", "list"]).await;
    assert_eq!(code, 0, "{list}");
    assert!(list.contains("3 dead letter(s)"), "{list}");
    let missing = listed(&list, &key(0)).expect("the row without email is listed");
    assert_eq!(
        &missing[..5],
        ["orders", key(0).as_str(), "0", "-", "missing_email"]
    );
    let rejected = listed(&list, &key(1)).expect("the rejected row is listed");
    assert_eq!(
        &rejected[..5],
        ["orders", key(1).as_str(), "1", "422", "rejected_by_api"]
    );
    assert!(
        rejected[5].ends_with('Z') && rejected[5].contains('T'),
        "when: {}",
        rejected[5]
    );
    let (_, status) = work.run(&["status"]).await;
    assert!(
        status.contains("dead letters:                          3"),
        "{status}"
    );

    // retry --key: back in line, sent by the next backfill.
    accept.store(true, Ordering::SeqCst);
    let (code, out) = work.run(&["dead-letters", "retry", "--key", &key(1)]).await;
    assert_eq!(
        (code, out.contains("1 dead letter(s) put back")),
        (0, true),
        "{out}"
    );
    let (code, out) = work.run(&["backfill"]).await;
    assert_eq!(code, 0, "{out}");
    assert!(db.synced_ids().await.contains(&ids[1]));

    // purge: hidden from the list, and excluded from later runs.
    let (code, out) = work.run(&["dead-letters", "purge", "--key", &key(2)]).await;
    assert_eq!(
        (code, out.contains("1 dead letter(s) purged")),
        (0, true),
        "{out}"
    );
    let (_, list) = work.run(&["dead-letters", "list"]).await;
    assert!(listed(&list, &key(2)).is_none(), "{list}");
    let (_, purged) = work.run(&["dead-letters", "list", "--purged"]).await;
    assert!(
        purged.contains("(purged)") && listed(&purged, &key(2)).is_some(),
        "{purged}"
    );
    let sent = ledger.count();
    let (code, out) = work.run(&["backfill"]).await;
    assert_eq!(code, 0, "a purged row is not left over: {out}");
    assert_eq!(ledger.count(), sent, "a purged row is not sent");
    assert!(!db.synced_ids().await.contains(&ids[2]));

    // retry --all and --mapping reach unpurged letters only; --key reaches a purged one.
    let (_, out) = work.run(&["dead-letters", "retry", "--all"]).await;
    assert!(out.contains("1 dead letter(s) put back"), "{out}");
    db.exec(&format!(
        "UPDATE orders SET user_email = 'fixed@example.com' WHERE id = {}",
        ids[0]
    ))
    .await;
    let (_, out) = work
        .run(&["dead-letters", "retry", "--mapping", "orders"])
        .await;
    assert!(out.contains("0 dead letter(s) put back"), "{out}");
    let (_, out) = work.run(&["dead-letters", "retry", "--key", &key(2)]).await;
    assert!(out.contains("1 dead letter(s) put back"), "{out}");
    let (code, out) = work.run(&["backfill"]).await;
    assert_eq!(code, 0, "{out}");
    assert_eq!(
        db.synced_ids().await,
        ids,
        "everything is delivered in the end"
    );
    let (code, _) = work.run(&["dead-letters", "retry"]).await;
    assert_eq!(code, 2, "retry needs a selection");
    // A key that reaches no dead letter (mistyped, or already delivered) is not a success.
    for action in ["retry", "purge"] {
        let (code, out) = work.run(&["dead-letters", action, "--key", "NOSUCH"]).await;
        assert_eq!(code, 1, "{action} --key NOSUCH: {out}");
        assert!(
            out.contains("no dead letter") && out.contains("'NOSUCH'"),
            "{action}: {out}"
        );
    }
    let (code, out) = work.run(&["dead-letters", "retry", "--key", &key(1)]).await;
    assert_eq!(code, 1, "a delivered row's key is no dead letter: {out}");
    let (_, list) = work.run(&["dead-letters", "list"]).await;
    assert!(list.contains("no dead letters"), "{list}");
}
