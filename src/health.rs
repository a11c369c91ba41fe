//! Liveness and readiness of `run`, for the systemd watchdog, `/healthz` and `/readyz`.
//!
//! Each mapping loop owns a [`Heartbeat`]: it beats at every turn of the loop and is marked idle
//! while the loop waits on purpose (the poll interval, a pause while the API is down, a wait for
//! the database). A loop that is neither idle nor has beaten recently is stuck, typically in a
//! statement that never returns. Nothing here blocks a loop; a down database is not a liveness
//! failure, only a readiness one.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::gate::Trouble;
use crate::sync::{Lane, Shared};

/// How long a loop may go without a beat when no watchdog period says otherwise.
pub const DEFAULT_STALE_AFTER: Duration = Duration::from_secs(120);

/// One loop's sign of life.
#[derive(Debug)]
pub struct Heartbeat {
    origin: Instant,
    /// Milliseconds after `origin` of the last beat.
    last: AtomicU64,
    /// Waits in progress that are deliberate (nested waits count once each).
    idle: AtomicUsize,
}

impl Default for Heartbeat {
    fn default() -> Self {
        Heartbeat {
            origin: Instant::now(),
            last: AtomicU64::new(0),
            idle: AtomicUsize::new(0),
        }
    }
}

impl Heartbeat {
    /// The loop made progress.
    pub fn beat(&self) {
        let now = self.origin.elapsed().as_millis() as u64;
        self.last.store(now, Ordering::Relaxed);
    }

    /// Runs a deliberate wait: the loop counts as alive for as long as it lasts, and beats when
    /// it ends (also when the wait is cancelled).
    pub async fn idle<F: std::future::Future>(&self, wait: F) -> F::Output {
        let _guard = IdleGuard::enter(self);
        wait.await
    }

    /// Time since the last beat, or `None` while the loop waits on purpose.
    pub fn stalled_for(&self) -> Option<Duration> {
        if self.idle.load(Ordering::Relaxed) > 0 {
            return None;
        }
        let last = Duration::from_millis(self.last.load(Ordering::Relaxed));
        Some(self.origin.elapsed().saturating_sub(last))
    }
}

struct IdleGuard<'a>(&'a Heartbeat);

impl<'a> IdleGuard<'a> {
    fn enter(heartbeat: &'a Heartbeat) -> IdleGuard<'a> {
        heartbeat.idle.fetch_add(1, Ordering::Relaxed);
        IdleGuard(heartbeat)
    }
}

impl Drop for IdleGuard<'_> {
    fn drop(&mut self) {
        self.0.beat();
        self.0.idle.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Whether every mapping loop is alive.
#[derive(Debug, Clone)]
pub struct Liveness {
    pub lanes: Vec<Arc<Lane>>,
    /// A loop without a beat for this long (and not waiting on purpose) is stuck.
    pub stale_after: Duration,
}

impl Liveness {
    /// The mappings whose loop is stuck, with how long it has been; empty when all are alive.
    pub fn stuck(&self) -> Vec<(String, Duration)> {
        self.lanes
            .iter()
            .filter_map(|lane| match lane.heartbeat.stalled_for() {
                Some(stalled) if stalled >= self.stale_after => {
                    Some((lane.name().to_string(), stalled))
                }
                _ => None,
            })
            .collect()
    }

    pub fn alive(&self) -> bool {
        self.stuck().is_empty()
    }
}

/// Why the daemon is not ready, if it is not.
pub async fn not_ready(shared: &Shared, timeout: Duration) -> Option<String> {
    if let Some(Trouble::Refused { status }) = shared.gate.trouble() {
        return Some(format!(
            "the API refuses this daemon's requests (HTTP {status})"
        ));
    }
    let answer = tokio::time::timeout(timeout, async {
        let client = shared.pool.get().await.map_err(|e| e.to_string())?;
        client
            .simple_query("SELECT 1")
            .await
            .map(|_| ())
            .map_err(|e| crate::error::DbError::describe(&e))
    })
    .await;
    match answer {
        Ok(Ok(())) => None,
        Ok(Err(error)) => Some(format!("the database does not answer: {error}")),
        Err(_) => Some("the database does not answer in time".to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_waiting_loop_is_alive_and_beats_when_the_wait_ends() {
        let heartbeat = Heartbeat::default();
        assert!(heartbeat.stalled_for().is_some());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let wait = heartbeat.idle(rx);
        tokio::pin!(wait);
        // Polled once: the wait has begun.
        assert!(futures::poll!(&mut wait).is_pending());
        assert_eq!(heartbeat.stalled_for(), None);
        tx.send(()).unwrap();
        wait.await.unwrap();
        let stalled = heartbeat.stalled_for().expect("no longer idle");
        assert!(stalled < Duration::from_secs(1), "{stalled:?}");
    }

    #[tokio::test]
    async fn a_cancelled_wait_is_no_longer_idle() {
        let heartbeat = Heartbeat::default();
        let never = heartbeat.idle(std::future::pending::<()>());
        let timed = tokio::time::timeout(Duration::from_millis(10), never).await;
        assert!(timed.is_err());
        assert!(heartbeat.stalled_for().is_some());
    }

    #[test]
    fn a_loop_without_beats_stalls() {
        let heartbeat = Heartbeat::default();
        std::thread::sleep(Duration::from_millis(30));
        assert!(heartbeat.stalled_for().unwrap() >= Duration::from_millis(30));
        heartbeat.beat();
        assert!(heartbeat.stalled_for().unwrap() < Duration::from_millis(30));
    }
}
