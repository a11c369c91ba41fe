//! A backfill's progress on stderr, and its summary on stdout.
//!
//! On a terminal: a bar with rate and ETA (indicatif). Anywhere else (journald, CI, a pipe): a
//! plain line every few seconds, since a redrawn bar would be noise there. The total is the
//! backlog counted at the start; rows that appear meanwhile stretch it. The summary's last line
//! is an interface scripts read: `backfill: delivered N, rejected N, left N, elapsed Xs, rate Y
//! rows/s`.

use std::io::{IsTerminal, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressState, ProgressStyle};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::app::MappingReport;
use crate::error::DbError;
use crate::sync::Lane;

/// How often a progress line is written when stderr is not a terminal.
pub const LINE_EVERY: Duration = Duration::from_secs(5);
/// How often the bar is updated on a terminal.
const BAR_EVERY: Duration = Duration::from_millis(100);

/// Rows settled so far, over every mapping.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Settled {
    pub delivered: u64,
    pub rejected: u64,
}

impl Settled {
    fn rows(&self) -> u64 {
        self.delivered + self.rejected
    }
}

/// A running progress display; [`Progress::finish`] ends it before the summary is printed.
pub struct Progress {
    task: JoinHandle<()>,
    done: CancellationToken,
}

impl Progress {
    /// Starts showing the progress of `lanes` towards `total` rows.
    pub fn start(lanes: Vec<Arc<Lane>>, total: u64) -> Progress {
        let done = CancellationToken::new();
        let settled = move || settled(&lanes);
        let task = if std::io::stderr().is_terminal() {
            tokio::spawn(show_bar(settled, total, done.clone()))
        } else {
            let stop = done.clone();
            tokio::spawn(async move {
                write_lines(settled, total, LINE_EVERY, std::io::stderr(), stop).await;
            })
        };
        Progress { task, done }
    }

    pub async fn finish(self) {
        self.done.cancel();
        let _ = self.task.await;
    }
}

/// The rows a backfill starts with: every mapping's backlog, counted once.
pub async fn backlog(pool: &deadpool_postgres::Pool, lanes: &[Arc<Lane>]) -> Result<u64, DbError> {
    let client = pool.get().await?;
    let mut total = 0;
    for lane in lanes {
        total += lane.source.backlog(&client).await?.max(0) as u64;
    }
    Ok(total)
}

fn settled(lanes: &[Arc<Lane>]) -> Settled {
    lanes.iter().fold(Settled::default(), |sum, lane| {
        let stats = lane.stats.snapshot();
        Settled {
            delivered: sum.delivered + stats.delivered,
            rejected: sum.rejected + stats.dead_lettered,
        }
    })
}

async fn show_bar(settled: impl Fn() -> Settled, total: u64, done: CancellationToken) {
    let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
    let style = ProgressStyle::with_template(
        "{spinner} [{elapsed_precise}] [{wide_bar}] {human_pos}/{human_len} rows, {rate}, ETA {eta} {msg}",
    )
    .map(|style| {
        style
            .progress_chars("=> ")
            .with_key("rate", |state: &ProgressState, out: &mut dyn std::fmt::Write| {
                let _ = write!(out, "{:.1} rows/s", state.per_sec());
            })
    })
    .unwrap_or_else(|_| ProgressStyle::default_bar());
    bar.set_style(style);
    let mut ticker = tokio::time::interval(BAR_EVERY);
    loop {
        let now = settled();
        if now.rows() > bar.length().unwrap_or(0) {
            bar.set_length(now.rows());
        }
        bar.set_position(now.rows());
        bar.set_message(format!(
            "(delivered {}, rejected {})",
            now.delivered, now.rejected
        ));
        tokio::select! {
            _ = done.cancelled() => break,
            _ = ticker.tick() => {}
        }
    }
    bar.finish_and_clear();
}

/// Writes a start line at once, then a progress line every `every` until `done`.
pub async fn write_lines(
    settled: impl Fn() -> Settled,
    total: u64,
    every: Duration,
    mut out: impl Write,
    done: CancellationToken,
) {
    let started = Instant::now();
    let _ = writeln!(out, "backfill: {total} row(s) to send");
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    loop {
        tokio::select! {
            _ = done.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let _ = writeln!(
            out,
            "{}",
            progress_line(settled(), total, started.elapsed())
        );
        let _ = out.flush();
    }
}

/// `backfill progress: 1200/5000 rows (24%), delivered 1150, rejected 50, 350.2 rows/s, ETA 11s`
pub fn progress_line(now: Settled, total: u64, elapsed: Duration) -> String {
    let rows = now.rows();
    let total = total.max(rows);
    let percent = (rows * 100).checked_div(total).unwrap_or(100);
    let rate = rows as f64 / elapsed.as_secs_f64().max(0.001);
    let eta = if rows >= total {
        "0s".to_string()
    } else if rate > 0.0 {
        let seconds = ((total - rows) as f64 / rate).ceil() as u64;
        humantime::format_duration(Duration::from_secs(seconds)).to_string()
    } else {
        "unknown".to_string()
    };
    format!(
        "backfill progress: {rows}/{total} rows ({percent}%), delivered {}, rejected {}, {rate:.1} rows/s, ETA {eta}",
        now.delivered, now.rejected
    )
}

/// The table per mapping, then the one-line summary as the last line.
pub fn summary(reports: &[MappingReport], elapsed: Duration) -> String {
    let delivered: u64 = reports.iter().map(|r| r.delivered).sum();
    let rejected: u64 = reports.iter().map(|r| r.rejected).sum();
    let left: i64 = reports.iter().map(|r| r.left).sum();
    let width = reports
        .iter()
        .map(|r| r.mapping.len())
        .max()
        .unwrap_or(0)
        .max("MAPPING".len());
    let mut text = format!(
        "{:<width$}  {:>10}  {:>10}  {:>10}\n",
        "MAPPING", "DELIVERED", "REJECTED", "LEFT"
    );
    for r in reports {
        text.push_str(&format!(
            "{:<width$}  {:>10}  {:>10}  {:>10}\n",
            r.mapping, r.delivered, r.rejected, r.left
        ));
    }
    let seconds = elapsed.as_secs_f64();
    text.push_str(&format!(
        "backfill: delivered {delivered}, rejected {rejected}, left {left}, elapsed {seconds:.1}s, rate {:.1} rows/s",
        delivered as f64 / seconds.max(0.001)
    ));
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(mapping: &str, delivered: u64, rejected: u64, left: i64) -> MappingReport {
        MappingReport {
            mapping: mapping.into(),
            delivered,
            rejected,
            left,
        }
    }

    #[test]
    fn the_summary_is_a_table_then_the_one_line_summary() {
        let text = summary(
            &[report("invoices", 400, 2, 1), report("signups", 12, 0, 0)],
            Duration::from_secs(4),
        );
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines,
            [
                "MAPPING    DELIVERED    REJECTED        LEFT",
                "invoices         400           2           1",
                "signups           12           0           0",
                "backfill: delivered 412, rejected 2, left 1, elapsed 4.0s, rate 103.0 rows/s",
            ]
        );
    }

    #[test]
    fn a_progress_line_has_the_rate_and_eta() {
        let now = Settled {
            delivered: 1150,
            rejected: 50,
        };
        assert_eq!(
            progress_line(now, 5000, Duration::from_secs(4)),
            "backfill progress: 1200/5000 rows (24%), delivered 1150, rejected 50, 300.0 rows/s, ETA 13s"
        );
    }

    #[test]
    fn rows_beyond_the_first_count_stretch_the_total() {
        let now = Settled {
            delivered: 12,
            rejected: 0,
        };
        assert_eq!(
            progress_line(now, 10, Duration::from_secs(1)),
            "backfill progress: 12/12 rows (100%), delivered 12, rejected 0, 12.0 rows/s, ETA 0s"
        );
        assert!(
            progress_line(Settled::default(), 10, Duration::from_secs(1)).ends_with("ETA unknown")
        );
    }

    #[tokio::test(start_paused = true)]
    async fn without_a_terminal_a_line_is_written_every_interval() {
        let out = std::sync::Arc::new(std::sync::Mutex::new(Vec::<u8>::new()));
        struct Shared(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);
        impl Write for Shared {
            fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(bytes);
                Ok(bytes.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let done = CancellationToken::new();
        let counter = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let seen = counter.clone();
        let settled = move || Settled {
            delivered: seen.load(std::sync::atomic::Ordering::Relaxed),
            rejected: 0,
        };
        let task = tokio::spawn(write_lines(
            settled,
            100,
            Duration::from_secs(5),
            Shared(out.clone()),
            done.clone(),
        ));
        counter.store(40, std::sync::atomic::Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(5_100)).await;
        counter.store(70, std::sync::atomic::Ordering::Relaxed);
        tokio::time::sleep(Duration::from_secs(5)).await;
        done.cancel();
        task.await.unwrap();
        let text = String::from_utf8(out.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert_eq!(lines[0], "backfill: 100 row(s) to send");
        assert!(
            lines[1].starts_with("backfill progress: 40/100 rows (40%)"),
            "{text}"
        );
        assert!(
            lines[2].starts_with("backfill progress: 70/100 rows (70%)"),
            "{text}"
        );
    }
}
