//! The naive pattern, for `scripts/bench.sh` only: select every unsynced order, POST them one by
//! one, and UPDATE each row after its POST. It is what a first integration script looks like and
//! the baseline resonance-sync is measured against; it is not used by the daemon.
//!
//! It is not a strawman: it keeps one HTTP connection alive and prepares its UPDATE once. What it
//! lacks is concurrency, batching, and a bound on memory (it holds the whole backlog).
//!
//! Usage: `naive DATABASE_URL ENDPOINT [MAX_ROWS]` with `RESONANCE_API_KEY` set. It selects every
//! unsynced row, sends the first MAX_ROWS (all by default), and prints one line, `naive: delivered
//! N of M selected, failed N, select S s, sending S s, rate R rows/s`. The rate leaves out the
//! initial SELECT, which favours the naive pattern a little.

use std::time::Instant;

use serde_json::json;
use tokio_postgres::NoTls;

#[path = "common/mod.rs"]
mod common;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let (Some(database_url), Some(endpoint)) = (args.next(), args.next()) else {
        return Err(
            "usage: naive DATABASE_URL ENDPOINT [MAX_ROWS] (with RESONANCE_API_KEY set)".into(),
        );
    };
    let max_rows: usize = match args.next() {
        Some(max) => max.parse()?,
        None => usize::MAX,
    };
    let api_key = std::env::var("RESONANCE_API_KEY")?;
    let (db, connection) = tokio_postgres::connect(&database_url, NoTls).await?;
    tokio::spawn(connection);
    let http = reqwest::Client::new();

    let started = Instant::now();
    let rows = db
        .query(
            "SELECT id, user_email, order_value::text, currency \
               FROM orders WHERE NOT synced_to_resonance",
            &[],
        )
        .await?;
    let mark = db
        .prepare("UPDATE orders SET synced_to_resonance = true WHERE id = $1")
        .await?;
    let selected = started.elapsed().as_secs_f64();
    let sending = Instant::now();
    let (mut delivered, mut failed) = (0u64, 0u64);
    for row in rows.iter().take(max_rows) {
        let id: i64 = row.get(0);
        let email: String = row.get(1);
        let value: String = row.get(2);
        let currency: String = row.get(3);
        let body = json!({
            "brandId": "brand_bench",
            "eventType": "purchase",
            "userEmail": email,
            "metadata": { "order_id": id, "order_value": value, "currency": currency },
        });
        let key = format!("naive-orders-{id}");
        let ok =
            common::post_event(&http, &endpoint, &api_key, key, serde_json::to_vec(&body)?).await;
        if ok {
            db.execute(&mark, &[&id]).await?;
            delivered += 1;
        } else {
            failed += 1;
        }
    }
    let seconds = sending.elapsed().as_secs_f64();
    println!(
        "naive: delivered {delivered} of {} selected, failed {failed}, select {selected:.1}s, \
         sending {seconds:.1}s, rate {:.1} rows/s",
        rows.len(),
        delivered as f64 / seconds.max(0.001)
    );
    Ok(())
}
