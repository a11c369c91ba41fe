//! Counters of what each mapping did, shared by the summary, the progress display, the
//! systemd status line and the metrics exporter. Plain atomics: nothing here blocks.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// One mapping's counters since the process started.
#[derive(Debug, Default)]
pub struct MappingStats {
    pub delivered: AtomicU64,
    pub retried: AtomicU64,
    pub dead_lettered: AtomicU64,
    /// Unix seconds of the last 2xx, 0 when none yet.
    pub last_success: AtomicI64,
    /// Unsynced rows not dead-lettered, as of the last count (-1 before the first).
    pub backlog: AtomicI64,
    pub last_error: Mutex<Option<String>>,
    /// When the backlog was last counted.
    backlog_counted: Mutex<Option<Instant>>,
}

/// A point-in-time copy of one mapping's counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub delivered: u64,
    pub retried: u64,
    pub dead_lettered: u64,
    pub last_success: Option<i64>,
    pub backlog: Option<i64>,
    pub last_error: Option<String>,
}

impl MappingStats {
    pub fn new() -> MappingStats {
        MappingStats {
            backlog: AtomicI64::new(-1),
            ..MappingStats::default()
        }
    }

    pub fn add_delivered(&self, count: u64) {
        self.delivered.fetch_add(count, Ordering::Relaxed);
        self.last_success
            .store(chrono::Utc::now().timestamp(), Ordering::Relaxed);
    }

    pub fn add_retried(&self) {
        self.retried.fetch_add(1, Ordering::Relaxed);
    }

    pub fn add_dead_lettered(&self) {
        self.dead_lettered.fetch_add(1, Ordering::Relaxed);
    }

    pub fn set_backlog(&self, rows: i64) {
        self.backlog.store(rows, Ordering::Relaxed);
        if let Ok(mut at) = self.backlog_counted.lock() {
            *at = Some(Instant::now());
        }
    }

    /// Whether the backlog was never counted, or not within `every`: counting is a query over
    /// the whole mapping, so a mapping sending full batches back to back counts once per interval.
    pub fn backlog_due(&self, every: Duration) -> bool {
        match self.backlog_counted.lock() {
            Ok(at) => at.is_none_or(|at| at.elapsed() >= every),
            Err(_) => true,
        }
    }

    pub fn set_error(&self, error: impl Into<String>) {
        if let Ok(mut slot) = self.last_error.lock() {
            *slot = Some(error.into());
        }
    }

    pub fn snapshot(&self) -> Snapshot {
        let last_success = self.last_success.load(Ordering::Relaxed);
        let backlog = self.backlog.load(Ordering::Relaxed);
        Snapshot {
            delivered: self.delivered.load(Ordering::Relaxed),
            retried: self.retried.load(Ordering::Relaxed),
            dead_lettered: self.dead_lettered.load(Ordering::Relaxed),
            last_success: (last_success > 0).then_some(last_success),
            backlog: (backlog >= 0).then_some(backlog),
            last_error: self.last_error.lock().ok().and_then(|e| e.clone()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_backlog_is_due_at_first_then_once_per_interval() {
        let stats = MappingStats::new();
        assert!(stats.backlog_due(Duration::from_secs(30)));
        stats.set_backlog(7);
        assert!(!stats.backlog_due(Duration::from_secs(30)));
        assert!(stats.backlog_due(Duration::ZERO));
        assert_eq!(stats.snapshot().backlog, Some(7));
    }
}
