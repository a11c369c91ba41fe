//! A load generator for `scripts/bench.sh`: how fast the sandbox answers on its own, with the
//! same number of requests in flight as the daemon, so a reader can see that the sandbox is not
//! what limits the daemon's rate. Not used by the daemon.
//!
//! Usage: `loadgen ENDPOINT REQUESTS CONCURRENCY` with `RESONANCE_API_KEY` set; it prints one
//! line, `loadgen: N requests, failed N, concurrency C, elapsed S, rate R req/s`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

#[path = "common/mod.rs"]
mod common;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [endpoint, requests, concurrency] = args.as_slice() else {
        return Err("usage: loadgen ENDPOINT REQUESTS CONCURRENCY".into());
    };
    let requests: u64 = requests.parse()?;
    let concurrency: usize = concurrency.parse()?;
    let api_key = std::env::var("RESONANCE_API_KEY")?;
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(concurrency)
        .build()?;
    let next = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..concurrency {
        let (client, endpoint, api_key) = (client.clone(), endpoint.clone(), api_key.clone());
        let (next, failed) = (next.clone(), failed.clone());
        workers.push(tokio::spawn(async move {
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= requests {
                    return;
                }
                let body = format!(
                    r#"{{"brandId":"brand_bench","eventType":"purchase","userEmail":"load{n}@example.com","metadata":{{"order_id":{n},"order_value":"10.99","currency":"USD"}}}}"#
                );
                let key = format!("loadgen-{n}");
                let ok =
                    common::post_event(&client, &endpoint, &api_key, key, body.into_bytes()).await;
                if !ok {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    for worker in workers {
        worker.await?;
    }
    let seconds = started.elapsed().as_secs_f64();
    println!(
        "loadgen: {requests} requests, failed {}, concurrency {concurrency}, elapsed {seconds:.1}s, rate {:.1} req/s",
        failed.load(Ordering::Relaxed),
        requests as f64 / seconds.max(0.001)
    );
    Ok(())
}
