//! Running it as a service: each test runs the built binary in a fresh directory, against its own
//! database and receiver, and checks what systemd and a monitoring system see: notifications and
//! the watchdog, SIGHUP, and the metrics and health endpoint.

use std::time::{Duration, Instant};

use crate::harness::*;
use crate::process::*;

#[tokio::test]
async fn systemd_hears_ready_status_watchdog_pings_and_stopping() {
    let setup = Setup::new("").await;
    setup.insert(3).await;
    let notify = NotifySocket::bind(&setup.scratch.0);
    let socket = notify.path.to_string_lossy().into_owned();
    let mut daemon = setup.spawn(
        &["run"],
        &[("NOTIFY_SOCKET", &socket), ("WATCHDOG_USEC", "1000000")],
    );

    wait_until(Duration::from_secs(15), "READY=1", || async {
        notify.position("READY=1").is_some()
    })
    .await;
    setup.wait_synced(3).await;
    wait_until(
        Duration::from_secs(10),
        "a status line with the delivered rows",
        || async {
            notify.lines().iter().any(|l| {
                l.starts_with("STATUS=delivered 3, backlog 0, last success 20")
                    && l.ends_with("last error: none")
            })
        },
    )
    .await;
    let since = Instant::now();
    wait_until(
        Duration::from_secs(5),
        "two watchdog pings (every 0.5 s)",
        || async { notify.pings_since(since) >= 2 },
    )
    .await;
    assert!(notify.position("READY=1") < notify.position("WATCHDOG=1"));

    let status = daemon.stop().await;
    assert!(status.success(), "exit {status:?}");
    // The datagram was sent before the exit, but this test's reader may not have run since.
    wait_until(Duration::from_secs(2), "STOPPING=1", || async {
        notify.position("STOPPING=1").is_some()
    })
    .await;
    let stopping = notify.position("STOPPING=1").expect("STOPPING=1 was sent");
    assert!(stopping > notify.position("READY=1").unwrap());
}

#[tokio::test]
async fn a_stuck_mapping_loop_stops_the_watchdog_pings() {
    let setup = Setup::new("").await;
    let notify = NotifySocket::bind(&setup.scratch.0);
    let socket = notify.path.to_string_lossy().into_owned();
    let mut daemon = setup.spawn(
        &["run"],
        &[("NOTIFY_SOCKET", &socket), ("WATCHDOG_USEC", "1000000")],
    );
    let since = Instant::now();
    wait_until(Duration::from_secs(15), "pings while idle", || async {
        notify.pings_since(since) >= 3
    })
    .await;

    // A lock the poll must wait for: the loop hangs in a statement that never returns.
    setup
        .db
        .exec("BEGIN; LOCK TABLE orders IN ACCESS EXCLUSIVE MODE")
        .await;
    wait_until(Duration::from_secs(10), "the pings to stop", || async {
        notify
            .last_ping()
            .is_some_and(|last| last.elapsed() > Duration::from_millis(1500))
    })
    .await;
    assert!(daemon.stderr_has("the mapping loop is stuck"));
    assert!(daemon.running(), "a stuck loop does not exit by itself");

    setup.db.exec("ROLLBACK").await;
    let released = Instant::now();
    wait_until(Duration::from_secs(10), "the pings to resume", || async {
        notify.pings_since(released) >= 1
    })
    .await;
    let status = daemon.stop().await;
    assert!(status.success(), "exit {status:?}");
}

#[tokio::test]
async fn sighup_is_explained_in_the_log_and_the_daemon_keeps_delivering() {
    let setup = Setup::new("").await;
    let mut daemon = setup.spawn(&["run"], &[]);
    wait_until(Duration::from_secs(15), "the daemon runs", || async {
        daemon.stderr_has("running")
    })
    .await;

    daemon.signal("HUP");
    wait_until(Duration::from_secs(5), "SIGHUP is logged", || async {
        daemon.stderr_has("SIGHUP received: the configuration is not reloaded")
    })
    .await;
    assert!(daemon.running(), "SIGHUP does not kill the daemon");
    setup.insert(2).await;
    setup.wait_synced(2).await;

    let status = daemon.stop().await;
    assert!(status.success(), "exit {status:?}");
}

/// The value of the sample `name{labels...}` in a Prometheus text exposition.
fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines().find_map(|line| {
        let (series, value) = line.rsplit_once(' ')?;
        let (series_name, series_labels) = match series.split_once('{') {
            Some((n, rest)) => (n, rest.trim_end_matches('}')),
            None => (series, ""),
        };
        let wanted = series_name == name
            && labels.len() == series_labels.split(',').filter(|l| !l.is_empty()).count()
            && labels.iter().all(|(k, v)| {
                series_labels
                    .split(',')
                    .any(|l| l == format!("{k}=\"{v}\""))
            });
        wanted.then(|| value.parse().ok()).flatten()
    })
}

async fn get(url: &str) -> (u16, String) {
    let response = reqwest::get(url).await.expect("request to the endpoint");
    let status = response.status().as_u16();
    (status, response.text().await.expect("body"))
}

#[tokio::test]
async fn metrics_and_health_checks_tell_what_the_daemon_did() {
    let setup = Setup::new("[metrics]\nlisten = \"127.0.0.1:0\"\n").await;
    let started = chrono::Utc::now().timestamp();
    let ids = setup.insert(3).await;
    setup.db.insert_orders(&[(None, "1.00", "EUR")]).await;
    // The first attempt at the first order fails once: one retry.
    let first = ids[0].to_string();
    setup.receiver.set_script(move |seen| {
        if seen.order_id() == first && seen.earlier == 0 {
            Reply::status(503)
        } else {
            Reply::ok()
        }
    });
    let mut daemon = setup.spawn(&["--log-format", "json", "run"], &[]);
    wait_until(Duration::from_secs(15), "the endpoint is up", || async {
        endpoint_address(&daemon).is_some()
    })
    .await;
    let base = format!("http://{}", endpoint_address(&daemon).unwrap());
    setup.wait_synced(3).await;

    let orders = [("mapping", "orders")];
    let metrics = || async { get(&format!("{base}/metrics")).await.1 };
    wait_until(
        Duration::from_secs(10),
        "the backlog gauge drops to 0 and the dead letter is counted",
        || async {
            let text = metrics().await;
            sample(&text, "resonance_sync_backlog_rows", &orders) == Some(0.0)
                && sample(&text, "resonance_sync_dead_letters", &orders) == Some(1.0)
        },
    )
    .await;
    let text = metrics().await;
    let events = |outcome| {
        sample(
            &text,
            "resonance_sync_events_total",
            &[("mapping", "orders"), ("outcome", outcome)],
        )
    };
    assert_eq!(events("delivered"), Some(3.0), "{text}");
    assert_eq!(events("retried"), Some(1.0), "{text}");
    assert_eq!(events("dead_lettered"), Some(1.0), "{text}");
    let duration = "resonance_sync_request_duration_seconds";
    assert_eq!(
        sample(&text, &format!("{duration}_count"), &orders),
        Some(4.0),
        "three deliveries and one failed attempt: {text}"
    );
    assert_eq!(
        sample(
            &text,
            &format!("{duration}_bucket"),
            &[("mapping", "orders"), ("le", "+Inf")]
        ),
        Some(4.0),
        "{text}"
    );
    assert!(
        sample(
            &text,
            &format!("{duration}_bucket"),
            &[("mapping", "orders"), ("le", "0.5")]
        )
        .is_some(),
        "the histogram has buckets: {text}"
    );
    let last_success = sample(
        &text,
        "resonance_sync_last_success_timestamp_seconds",
        &orders,
    )
    .expect("last success");
    let now = chrono::Utc::now().timestamp() as f64;
    assert!(
        (started as f64..=now).contains(&last_success),
        "{last_success}"
    );

    assert_eq!(get(&format!("{base}/healthz")).await.0, 200);
    assert_eq!(get(&format!("{base}/readyz")).await.0, 200);

    // The database refuses connections: not ready, but alive.
    let admin = connect(&format!("{}/postgres", server_url())).await;
    let name = &setup.db.name;
    admin
        .batch_execute(&format!(
            "ALTER DATABASE {name} ALLOW_CONNECTIONS false; \
             SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
              WHERE datname = '{name}' AND application_name = 'resonance-sync'"
        ))
        .await
        .expect("close the database");
    wait_until(
        Duration::from_secs(10),
        "readyz says the database is down",
        || async {
            let (status, body) = get(&format!("{base}/readyz")).await;
            status == 503 && body.contains("the database does not answer")
        },
    )
    .await;
    assert_eq!(get(&format!("{base}/healthz")).await.0, 200);
    admin
        .batch_execute(&format!("ALTER DATABASE {name} ALLOW_CONNECTIONS true"))
        .await
        .expect("reopen the database");
    wait_until(Duration::from_secs(10), "ready again", || async {
        get(&format!("{base}/readyz")).await.0 == 200
    })
    .await;

    // The API refuses the key: not ready either.
    setup.receiver.set_script(|_| Reply::status(401));
    setup.insert(1).await;
    wait_until(
        Duration::from_secs(10),
        "readyz flips to 503 on a 401",
        || async {
            let (status, body) = get(&format!("{base}/readyz")).await;
            status == 503 && body.contains("refuses") && body.contains("401")
        },
    )
    .await;
    assert_eq!(
        get(&format!("{base}/healthz")).await,
        (200, "ok\n".to_string())
    );

    let status = daemon.stop().await;
    assert!(status.success(), "exit {status:?}");
}
