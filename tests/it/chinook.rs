//! The main job on real sample data: the Chinook invoices delivered to a receiver, exactly.

use std::str::FromStr;

use crate::harness::*;

const INVOICES: &str = r#"
[[mapping]]
name = "invoices"
event_type = "purchase"
interval = "200ms"
batch_size = 100
key = "invoice_id"
email = "email"
query = """
SELECT i.invoice_id, c.email, i.total, 'USD' AS currency, i.invoice_date
  FROM invoice i JOIN customer c USING (customer_id)
 WHERE NOT i.synced_to_resonance
"""
mark_synced = "UPDATE invoice SET synced_to_resonance = true WHERE invoice_id = ANY($1)"
[mapping.metadata]
order_id = "invoice_id"
order_value = "total"
currency = "currency"
purchased_at = "invoice_date"
"#;

/// Sums decimal texts exactly, in cents.
fn cents(text: &str) -> i64 {
    let (units, fraction) = text.split_once('.').unwrap_or((text, "0"));
    let fraction = format!("{fraction:0<2}");
    i64::from_str(units).unwrap() * 100 + i64::from_str(&fraction[..2]).unwrap()
}

#[tokio::test]
async fn backfill_delivers_every_chinook_invoice_with_exact_totals() {
    logs();
    let db = TestDb::new().await;
    load_chinook(&db).await;
    let receiver = Receiver::start().await;
    let config = config(&db.url, &receiver.endpoint(), "", INVOICES);

    let reports = backfill(&config).await.expect("the backfill succeeds");
    assert_eq!(reports[0].delivered, 412);
    assert_eq!(reports[0].left, 0);

    let seen = receiver.seen();
    assert_eq!(seen.len(), 412, "one request per invoice");
    let total: i64 = seen
        .iter()
        .map(|s| cents(&s.json.pointer("/metadata/order_value").unwrap().to_string()))
        .sum();
    assert_eq!(total, 232_860, "the invoices total 2328.60");
    let orders: std::collections::HashSet<String> = seen.iter().map(|s| s.order_id()).collect();
    assert_eq!(orders.len(), 412, "no invoice twice");
    assert_eq!(
        db.scalar::<i64>("SELECT count(*) FROM invoice WHERE synced_to_resonance")
            .await,
        412
    );

    // Every body has exactly the documented shape, headers included.
    let first = &seen[0];
    let fields: Vec<&String> = first.json.as_object().unwrap().keys().collect();
    assert_eq!(fields, ["brandId", "eventType", "userEmail", "metadata"]);
    assert_eq!(first.json["brandId"], BRAND);
    assert_eq!(first.json["eventType"], "purchase");
    assert_eq!(
        first.headers["authorization"].to_str().unwrap(),
        format!("Bearer {API_KEY}")
    );
    assert_eq!(first.headers["content-type"], "application/json");
    assert_eq!(first.idempotency_key().unwrap().len(), 36);
    // Timestamps without a zone are sent as RFC 3339 UTC.
    let at = first
        .json
        .pointer("/metadata/purchased_at")
        .unwrap()
        .as_str()
        .unwrap();
    assert!(at.ends_with('Z') && at.contains('T'), "{at}");
}

#[tokio::test]
async fn a_second_backfill_after_a_completed_one_sends_nothing() {
    logs();
    let db = TestDb::new().await;
    load_chinook(&db).await;
    let receiver = Receiver::start().await;
    let config = config(&db.url, &receiver.endpoint(), "", INVOICES);
    backfill(&config).await.expect("first backfill");
    assert_eq!(receiver.count(), 412);

    let reports = backfill(&config).await.expect("second backfill");
    assert_eq!(reports[0].delivered, 0);
    assert_eq!(receiver.count(), 412, "nothing is sent again");

    // And a `run` started afterwards sends nothing either.
    let daemon = Daemon::start(config.clone());
    tokio::time::sleep(std::time::Duration::from_millis(600)).await;
    daemon.stop().await.expect("run stops cleanly");
    assert_eq!(
        receiver.count(),
        412,
        "run sends nothing after a completed backfill"
    );
}
