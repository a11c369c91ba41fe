//! Field cases of /work/shared/cases/CASES.md about values arriving exactly as PostgreSQL holds
//! them (C4, C5, C11, C13): decimals and big ids digit for digit, emails byte for byte.

use resonance_sync::app::AppError;

use crate::harness::*;

#[tokio::test]
async fn c4_numeric_beyond_28_fractional_digits_is_sent_with_its_exact_digits() {
    logs();
    let db = TestDb::with_orders().await;
    db.exec(
        "CREATE TABLE orders_precise (LIKE orders INCLUDING ALL);
         ALTER TABLE orders_precise ALTER COLUMN order_value TYPE numeric;
         INSERT INTO orders_precise (id, user_email, order_value, currency) VALUES
           (1, 'ana.lopez@example.com', 49.90, 'EUR'),
           (2, 'precise@example.com', 0.12345678901234567890123456789012, 'USD');",
    )
    .await;
    let receiver = Receiver::start().await;
    let config = config(
        &db.url,
        &receiver.endpoint(),
        "",
        &orders_mapping("orders_precise"),
    );

    let reports = backfill(&config).await.expect("both rows are delivered");

    assert_eq!(reports[0].delivered, 2);
    assert_eq!(raw_values(&receiver, 1), ["49.90"]);
    assert_eq!(
        raw_values(&receiver, 2),
        ["0.12345678901234567890123456789012"]
    );
    let synced: i64 = db
        .scalar("SELECT count(*) FROM orders_precise WHERE synced_to_resonance")
        .await;
    assert_eq!(synced, 2);
}
#[tokio::test]
async fn c5_decimals_are_sent_with_exact_digits_never_through_a_float() {
    logs();
    let db = TestDb::with_orders().await;
    db.exec(
        "CREATE TABLE orders_wide (LIKE orders INCLUDING ALL);
         ALTER TABLE orders_wide ALTER COLUMN order_value TYPE numeric(20,2);
         INSERT INTO orders_wide (id, user_email, order_value, currency) VALUES
           (1, 'd1@example.com', 4.81, 'USD'),
           (2, 'd2@example.com', 19.99, 'USD'),
           (3, 'd3@example.com', 0.10, 'USD'),
           (4, 'd4@example.com', 12345678901234567.89, 'USD');",
    )
    .await;
    let receiver = Receiver::start().await;
    let config = config(
        &db.url,
        &receiver.endpoint(),
        "",
        &orders_mapping("orders_wide"),
    );

    backfill(&config).await.expect("every row is delivered");

    let expected = ["4.81", "19.99", "0.10", "12345678901234567.89"];
    for (id, value) in (1..).zip(expected) {
        assert_eq!(raw_values(&receiver, id), [value], "order {id}");
    }
    for s in receiver.seen() {
        let text = s.text();
        assert!(
            !text.contains("4.8100000000000005") && !text.contains("12345678901234568"),
            "{text}"
        );
    }
}
#[tokio::test]
async fn c11_non_ascii_emails_arrive_unchanged_and_a_422_dead_letters_after_one_attempt() {
    logs();
    let db = TestDb::with_orders().await;
    let emails = [
        "dån@example.com",
        "josé.müller@exämple.de",
        "用户@例子.广告",
    ];
    let ids = db
        .insert_orders(&[
            (Some(emails[0]), "21.00", "SEK"),
            (Some(emails[1]), "22.00", "EUR"),
            (Some(emails[2]), "23.00", "CNY"),
        ])
        .await;
    let refused = emails[2];
    let receiver = Receiver::scripted(move |s| {
        if s.email() == refused {
            Reply::status(422).with_body("{\"error\":\"invalid email\"}")
        } else {
            Reply::ok()
        }
    })
    .await;

    let error = backfill(&orders_config(&db, &receiver))
        .await
        .expect_err("one row is rejected");

    assert!(matches!(error, AppError::RowsLeft(_)), "{error:?}");
    for (id, email) in ids.iter().zip(emails) {
        let seen = receiver.for_order(id);
        assert_eq!(seen.len(), 1, "order {id}: one attempt");
        assert!(std::str::from_utf8(&seen[0].body).is_ok(), "UTF-8 JSON");
        assert_eq!(seen[0].email().as_bytes(), email.as_bytes(), "byte-exact");
    }
    assert_eq!(db.synced_ids().await, ids[..2]);
    let state = db.delivery(ids[2]).await.expect("a dead letter");
    assert_eq!(
        (state.attempts, state.last_status, state.dead),
        (1, Some(422), true)
    );
    assert_eq!(
        state.last_error.as_deref(),
        Some("{\"error\":\"invalid email\"}")
    );
}
#[tokio::test]
async fn c13_bigint_ids_above_2_pow_53_are_sent_with_every_digit() {
    logs();
    let db = TestDb::with_orders().await;
    db.insert_orders_with_ids(&[
        (9_007_199_254_740_993, "big.id@example.com", "31.00"),
        (2_001_000_009_664_553_892, "bigger.id@example.com", "32.00"),
    ])
    .await;
    let receiver = Receiver::start().await;

    backfill(&orders_config(&db, &receiver))
        .await
        .expect("both rows are delivered");

    let mut ids: Vec<String> = receiver
        .seen()
        .iter()
        .map(|s| raw_field(&s.text(), "order_id").unwrap_or("").to_string())
        .collect();
    ids.sort();
    assert_eq!(ids, ["2001000009664553892", "9007199254740993"]);
    assert_eq!(
        db.synced_ids().await,
        vec![9_007_199_254_740_993, 2_001_000_009_664_553_892],
        "mark_synced receives the exact keys"
    );
}
