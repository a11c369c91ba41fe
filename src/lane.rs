//! One mapping's lane: the state its poll loop and its recorder share (rows in flight, retries
//! due, backfill bookkeeping, the mark-failure pause, the watchdog heartbeat). No I/O here.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use crate::mapping::EventContext;
use crate::source::Source;
use crate::stats::MappingStats;

/// One mapping's lane: its source, counters, and the state its loop and recorder share.
#[derive(Debug)]
pub struct Lane {
    pub source: Source,
    pub stats: Arc<MappingStats>,
    pub context: EventContext,
    /// Claimed rows whose outcome is not yet written down.
    pub(crate) inflight: AtomicUsize,
    /// Woken when an outcome is written, or a notification arrives.
    pub wake: Notify,
    /// When retries this process scheduled fall due.
    pub(crate) retry_due: Mutex<Vec<Instant>>,
    /// Backfill: attempts per key within this run, and keys given up on.
    pub(crate) run_attempts: Mutex<HashMap<String, u32>>,
    pub(crate) given_up: Mutex<Vec<String>>,
    pub(crate) mark_failures: AtomicU32,
    /// Claims this process holds but no longer works on, which it could not give back because
    /// the database was unreachable: given back by the next poll that reaches it. Left alone,
    /// their leases would be renewed with the rest, and the rows not sent while work goes on.
    pub(crate) stranded: Mutex<Vec<String>>,
    /// Rows claimed since start, to pace [`vacuum`].
    pub(crate) claimed_rows: AtomicUsize,
    /// Shows the watchdog and `/healthz` that this lane's loop is alive.
    pub heartbeat: crate::health::Heartbeat,
}

impl Lane {
    pub fn new(source: Source, stats: Arc<MappingStats>, brand_id: &str) -> Lane {
        let context = EventContext {
            brand_id: brand_id.to_string(),
            event_type: source.config.event_type.clone(),
            mapping: source.config.name.clone(),
        };
        Lane {
            source,
            stats,
            context,
            inflight: AtomicUsize::new(0),
            wake: Notify::new(),
            retry_due: Mutex::new(Vec::new()),
            run_attempts: Mutex::new(HashMap::new()),
            given_up: Mutex::new(Vec::new()),
            stranded: Mutex::new(Vec::new()),
            mark_failures: AtomicU32::new(0),
            claimed_rows: AtomicUsize::new(0),
            heartbeat: crate::health::Heartbeat::default(),
        }
    }

    pub fn name(&self) -> &str {
        &self.source.config.name
    }

    /// `rows` claimed rows are settled.
    pub fn finish(&self, rows: usize) {
        self.inflight.fetch_sub(rows, Ordering::AcqRel);
        self.wake.notify_one();
    }

    pub(crate) fn inflight(&self) -> usize {
        self.inflight.load(Ordering::Acquire)
    }

    /// A retry of a row falls due at `at`: poll then.
    pub fn expect_retry(&self, at: Instant) {
        if let Ok(mut due) = self.retry_due.lock() {
            due.push(at);
        }
    }

    /// The earliest retry still to come, and whether any is due within `grace` of now or later.
    pub(crate) fn next_retry(&self, grace: Duration) -> Option<Instant> {
        let mut due = self.retry_due.lock().ok()?;
        let now = Instant::now();
        due.retain(|at| *at + grace > now);
        due.iter().min().copied()
    }

    /// Counts an attempt made on `key` in this backfill; returns the count.
    pub fn count_run_attempt(&self, key: &str) -> u32 {
        let Ok(mut attempts) = self.run_attempts.lock() else {
            return u32::MAX;
        };
        let count = attempts.entry(key.to_string()).or_insert(0);
        *count += 1;
        *count
    }

    /// This backfill will not try `key` again.
    pub fn give_up(&self, key: &str) {
        if let Ok(mut keys) = self.given_up.lock() {
            keys.push(key.to_string());
        }
    }

    pub(crate) fn given_up(&self) -> Vec<String> {
        self.given_up.lock().map(|k| k.clone()).unwrap_or_default()
    }

    /// Claims on `keys` could not be given back; the next poll that reaches the database does.
    pub fn strand(&self, keys: impl IntoIterator<Item = String>) {
        if let Ok(mut stranded) = self.stranded.lock() {
            stranded.extend(keys);
        }
    }

    /// The stranded claims, to be given back now.
    pub(crate) fn take_stranded(&self) -> Vec<String> {
        self.stranded
            .lock()
            .map(|mut k| std::mem::take(&mut *k))
            .unwrap_or_default()
    }

    /// Counts claimed rows; true each time another `every` of them have been claimed.
    pub(crate) fn note_claimed(&self, rows: usize, every: usize) -> bool {
        let before = self.claimed_rows.fetch_add(rows, Ordering::Relaxed);
        before / every != (before + rows) / every
    }

    /// A mark succeeded: the mapping runs freely.
    pub fn mark_succeeded(&self) {
        self.mark_failures.store(0, Ordering::Relaxed);
    }

    /// A mark failed: returns how long the mapping pauses before claiming again, so that a
    /// broken `mark_synced` cannot turn into re-sending the table in a loop.
    pub fn mark_failed(&self) -> Duration {
        let failures = self.mark_failures.fetch_add(1, Ordering::Relaxed) + 1;
        mark_pause(failures)
    }

    pub(crate) fn mark_pause(&self) -> Duration {
        mark_pause(self.mark_failures.load(Ordering::Relaxed))
    }
}

fn mark_pause(failures: u32) -> Duration {
    if failures <= 1 {
        return Duration::ZERO;
    }
    Duration::from_secs(2u64.saturating_pow(failures.min(9))).min(Duration::from_secs(300))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    pub(crate) fn a_first_mark_failure_does_not_pause() {
        assert_eq!(mark_pause(1), Duration::ZERO);
        assert_eq!(mark_pause(2), Duration::from_secs(4));
        assert_eq!(mark_pause(30), Duration::from_secs(300));
    }
}
