//! What an operator reads: JSON logs, a backfill's progress and summary (on a terminal and
//! without one), and `status`. Each test runs the built binary.

use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

use crate::harness::*;
use crate::process::*;

#[tokio::test]
async fn json_logs_are_one_object_per_line_with_structured_fields() {
    let setup = Setup::new("").await;
    let ids = setup.insert(2).await;
    let first = ids[0].to_string();
    setup.receiver.set_script(move |seen| {
        if seen.order_id() == first && seen.earlier == 0 {
            Reply::status(500)
        } else {
            Reply::ok()
        }
    });
    let mut daemon = setup.spawn(
        &["--log-format", "json", "run"],
        &[("RUST_LOG", "resonance_sync=debug")],
    );
    setup.wait_synced(2).await;
    let status = daemon.stop().await;
    assert!(status.success(), "exit {status:?}");

    let lines = json_lines(&daemon);
    assert!(lines.iter().all(Value::is_object));
    let with = |message: &str| -> Vec<&Value> {
        lines.iter().filter(|l| l["message"] == message).collect()
    };
    let retry = with("attempt failed; will retry");
    assert_eq!(retry.len(), 1, "{lines:#?}");
    assert_eq!(retry[0]["mapping"], "orders");
    assert_eq!(retry[0]["key"], ids[0].to_string());
    assert_eq!(retry[0]["attempt"], 1);
    assert_eq!(retry[0]["status"], 500);
    assert!(retry[0]["duration_ms"].is_u64());
    assert_eq!(retry[0]["level"], "INFO");
    let delivered = with("delivered");
    assert_eq!(delivered.len(), 2, "{lines:#?}");
    for line in delivered {
        assert_eq!(line["mapping"], "orders");
        assert_eq!(line["status"], 200);
        assert!(line["duration_ms"].is_u64());
        assert!(line["timestamp"].is_string());
    }
    // Customer emails are masked above debug level.
    assert!(!lines
        .iter()
        .filter(|l| l["level"] != "DEBUG" && l["level"] != "TRACE")
        .any(|l| l.to_string().contains("ada@example.com")));
}

#[tokio::test]
async fn backfill_without_a_terminal_prints_progress_lines_and_a_summary_table() {
    let setup = Setup::new("").await;
    setup.insert(5).await;
    setup.db.insert_orders(&[(None, "1.00", "EUR")]).await;
    let mut backfill = setup.spawn(&["backfill"], &[]);
    let status = backfill.exit(Duration::from_secs(30)).await;
    assert_eq!(status.code(), Some(1), "a rejected row: exit 1");

    assert!(backfill.stderr_has("backfill: 6 row(s) to send"));
    let stdout = backfill.stdout();
    let table: Vec<Vec<&str>> = stdout
        .iter()
        .map(|line| line.split_whitespace().collect())
        .collect();
    assert_eq!(table.len(), 3, "{stdout:#?}");
    assert_eq!(table[0], ["MAPPING", "DELIVERED", "REJECTED", "LEFT"]);
    assert_eq!(table[1], ["orders", "5", "1", "0"]);
    let last = &stdout[2];
    let rest = last
        .strip_prefix("backfill: delivered 5, rejected 1, left 0, elapsed ")
        .unwrap_or_else(|| panic!("the last line: {last}"));
    let (elapsed, rate) = rest.split_once("s, rate ").expect("elapsed and rate");
    assert!(elapsed.parse::<f64>().is_ok(), "{last}");
    let rate = rate.strip_suffix(" rows/s").expect("rows/s");
    assert!(rate.parse::<f64>().unwrap() > 0.0, "{last}");
}

#[tokio::test]
async fn backfill_on_a_terminal_draws_a_bar_with_rate_and_eta() {
    let setup = Setup::new("").await;
    setup.insert(40).await;
    // Slow enough for the bar to be drawn a few times.
    setup
        .receiver
        .set_script(|_| Reply::ok().after(Duration::from_millis(60)));
    let command = format!("{BIN} --config {} backfill", setup.config.to_string_lossy());
    // script(1) gives the child a terminal; it is in util-linux, on every Debian system.
    let mut process = Process {
        child: Command::new("script")
            .args(["-q", "-e", "-c", &command, "/dev/null"])
            .current_dir(&setup.scratch.0)
            .env("RESONANCE_API_KEY", API_KEY)
            .env("COLUMNS", "120")
            .env_remove("RESONANCE_SYNC_CONFIG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run script(1)"),
        stdout: Arc::default(),
        stderr: Arc::default(),
    };
    let out = process.child.stdout.take().expect("stdout");
    process.stdout = collect(out);
    let status = process.exit(Duration::from_secs(30)).await;
    assert!(status.success(), "exit {status:?}: {:#?}", process.stdout());
    let screen = process.stdout().join("\n");
    assert!(screen.contains("rows/s"), "{screen}");
    assert!(screen.contains("ETA"), "{screen}");
    assert!(screen.contains("/40 rows"), "{screen}");
    assert!(
        !screen.contains("backfill progress:"),
        "no plain progress lines on a terminal"
    );
    assert!(screen.contains("backfill: delivered 40, rejected 0, left 0"));
}

#[tokio::test]
async fn status_shows_the_last_success_and_the_oldest_failing_row() {
    let setup = Setup::new("").await;
    let ids = setup.insert(3).await;
    let failing = ids[2].to_string();
    let key = failing.clone();
    // The API asks to come back in an hour (capped at retry_after_max, 5 minutes).
    setup.receiver.set_script(move |seen| {
        if seen.order_id() == failing {
            Reply::status(503).with_header("Retry-After", "3600")
        } else {
            Reply::ok()
        }
    });
    let mut daemon = setup.spawn(&["run"], &[]);
    setup.wait_synced(2).await;
    wait_until(
        Duration::from_secs(10),
        "the failed attempt is recorded",
        || async {
            setup
                .db
                .delivery(&key)
                .await
                .is_some_and(|d| d.attempts == 1 && !d.leased)
        },
    )
    .await;
    assert!(daemon.stop().await.success());
    setup
        .db
        .exec("UPDATE resonance_sync.deliveries SET first_attempt_at = now() - interval '2 hours'")
        .await;

    let mut status = setup.spawn(&["status"], &[]);
    assert!(status.exit(Duration::from_secs(15)).await.success());
    let lines: HashMap<String, String> = status
        .stdout()
        .iter()
        .filter_map(|line| {
            let (label, value) = line.split_once(':')?;
            Some((label.trim().to_string(), value.trim().to_string()))
        })
        .collect();
    assert_eq!(lines["backlog (unsynced, not dead-lettered)"], "1");
    assert_eq!(lines["retrying"], "1");
    // Retry-After 3600 is capped at retry_after_max (5 minutes).
    let next = &lines["next retry due"];
    assert!(
        (next.contains("(in 4m") || next.contains("(in 5m"))
            && next.ends_with("; `backfill` tries them now)"),
        "{next}"
    );
    assert_eq!(lines["dead letters"], "0");
    assert!(
        lines["oldest unsynced row's age"].starts_with("2h "),
        "{lines:#?}"
    );
    let today = chrono::Utc::now().format("%Y-%m-%dT").to_string();
    let last = &lines["last success"];
    assert!(last.starts_with(&today), "{last}");
    assert!(last.ends_with("ago; 2 delivered in all)"), "{last}");
}

/// The binary with `args` and stdout sent to `stdout`: its exit code and its stderr.
fn run_with_stdout(setup: &Setup, args: &[&str], stdout: Stdio) -> (Option<i32>, String) {
    let output = Command::new(BIN)
        .current_dir(&setup.scratch.0)
        .arg("--config")
        .arg(&setup.config)
        .args(args)
        .env("RESONANCE_API_KEY", API_KEY)
        .env("RUST_LOG", "warn")
        .env_remove("RESONANCE_ENDPOINT")
        .env_remove("DATABASE_URL")
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(Stdio::piped())
        .output()
        .expect("run the binary");
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// `status | head -1`, `check > /dev/full`: a reader that goes away is not an error, a stdout
/// that cannot be written is one (exit 74, said on stderr), and neither is a panic. (Two
/// workers: the receiver answers while a worker waits for the binary.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_or_full_stdout_is_reported_without_a_panic() {
    let setup = Setup::new("").await;
    setup.insert(3).await;
    let commands: [&[&str]; 3] = [&["status"], &["check"], &["dead-letters", "list"]];
    for args in commands {
        let (reader, writer) = std::io::pipe().expect("a pipe");
        drop(reader);
        let (code, stderr) = run_with_stdout(&setup, args, Stdio::from(writer));
        assert!(
            !stderr.contains("panicked"),
            "{args:?} | (closed): {stderr}"
        );
        assert_eq!(code, Some(0), "{args:?} | (closed): {stderr}");

        let full = std::fs::File::create("/dev/full").expect("/dev/full");
        let (code, stderr) = run_with_stdout(&setup, args, Stdio::from(full));
        assert!(
            !stderr.contains("panicked"),
            "{args:?} > /dev/full: {stderr}"
        );
        assert_eq!(code, Some(74), "{args:?} > /dev/full: {stderr}");
        assert!(
            stderr.contains("error: cannot write to standard output: No space left on device"),
            "{args:?} > /dev/full: {stderr}"
        );
    }

    // A backfill delivers its rows before it prints its summary: the rows are marked, and the
    // lost summary is still an error.
    setup.receiver.set_script(|_| Reply::ok());
    let full = std::fs::File::create("/dev/full").expect("/dev/full");
    let (code, stderr) = run_with_stdout(&setup, &["backfill"], Stdio::from(full));
    assert_eq!(code, Some(74), "backfill > /dev/full: {stderr}");
    assert_eq!(setup.db.synced_ids().await.len(), 3);
}
