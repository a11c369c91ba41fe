//! The systemd notify protocol for `run` (`Type=notify`): `READY=1` once the config is valid and
//! the database answers, `WATCHDOG=1` only while every mapping loop is alive, a `STATUS=` line a
//! person can read in `systemctl status`, and `STOPPING=1` at shutdown.
//!
//! Silent when `NOTIFY_SOCKET` is unset. A notification is one datagram; a failed send is logged
//! and never stops the daemon.

use std::sync::Arc;
use std::time::Duration;

use sd_notify::NotifyState;
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

use crate::health::Liveness;
use crate::stats::Snapshot;
use crate::sync::Lane;

/// How often the status line is refreshed when no watchdog asks for more.
const STATUS_EVERY: Duration = Duration::from_secs(5);

/// A connection to the service manager, present only under `Type=notify`.
#[derive(Debug, Clone)]
pub struct Systemd {
    watchdog: Option<Duration>,
}

impl Systemd {
    /// The service manager named by `NOTIFY_SOCKET`, with its watchdog period (`WATCHDOG_USEC`,
    /// when `WATCHDOG_PID` is unset or names this process).
    pub fn from_env() -> Option<Systemd> {
        std::env::var_os("NOTIFY_SOCKET").filter(|socket| !socket.is_empty())?;
        Some(Systemd {
            watchdog: sd_notify::watchdog_enabled().filter(|period| !period.is_zero()),
        })
    }

    /// The watchdog period, when systemd enforces one (`WatchdogSec=`).
    pub fn watchdog(&self) -> Option<Duration> {
        self.watchdog
    }

    fn notify(&self, states: &[NotifyState]) {
        if let Err(error) = sd_notify::notify(states) {
            tracing::warn!(%error, "cannot notify systemd");
        }
    }

    /// Start-up is complete.
    pub fn ready(&self, status: &str) {
        self.notify(&[NotifyState::Ready, NotifyState::Status(status)]);
    }

    /// Shutdown has begun.
    fn stopping(&self) {
        self.notify(&[
            NotifyState::Stopping,
            NotifyState::Status("stopping: finishing the requests in flight"),
        ]);
    }
}

/// Until `finished`: pings the watchdog while the loops are alive, keeps the status line fresh,
/// and says `STOPPING=1` as soon as `shutdown` is cancelled.
pub async fn supervise(
    systemd: Systemd,
    liveness: Liveness,
    shutdown: CancellationToken,
    finished: CancellationToken,
) {
    // sd_watchdog_enabled(3): ping at half the period.
    let every = systemd
        .watchdog
        .map_or(STATUS_EVERY, |period| (period / 2).min(STATUS_EVERY));
    let mut ticker = tokio::time::interval(every);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut stopping = false;
    let mut withheld = false;
    let mut last_status = String::new();
    loop {
        tokio::select! {
            // Shutdown first: when the loops end at once, both are ready by the time this task
            // runs, and systemd must still hear STOPPING=1 before the process exits.
            biased;
            _ = shutdown.cancelled(), if !stopping => {
                stopping = true;
                systemd.stopping();
                continue;
            }
            _ = finished.cancelled() => {
                if !stopping {
                    systemd.stopping();
                }
                return;
            }
            _ = ticker.tick() => {}
        }
        if !stopping {
            let status = status_line(&snapshots(&liveness.lanes));
            if status != last_status {
                systemd.notify(&[NotifyState::Status(&status)]);
                last_status = status;
            }
        }
        if systemd.watchdog.is_none() {
            continue;
        }
        // While stopping, TimeoutStopSec bounds the drain; the loops end one by one.
        let stuck = if stopping { vec![] } else { liveness.stuck() };
        if stuck.is_empty() {
            systemd.notify(&[NotifyState::Watchdog]);
            if std::mem::take(&mut withheld) {
                tracing::info!("every mapping loop is alive again; watchdog pings resume");
            }
        } else if !std::mem::replace(&mut withheld, true) {
            for (mapping, stalled) in stuck {
                tracing::error!(
                    mapping, stalled_s = stalled.as_secs(),
                    "the mapping loop is stuck; withholding watchdog pings so that systemd restarts the service"
                );
            }
        }
    }
}

/// Every lane's counters, by mapping name.
pub fn snapshots(lanes: &[Arc<Lane>]) -> Vec<(String, Snapshot)> {
    lanes
        .iter()
        .map(|lane| (lane.name().to_string(), lane.stats.snapshot()))
        .collect()
}

/// The one-line status: totals over all mappings, the latest success, the last error seen.
pub fn status_line(mappings: &[(String, Snapshot)]) -> String {
    let delivered: u64 = mappings.iter().map(|(_, s)| s.delivered).sum();
    let counted: Vec<i64> = mappings.iter().filter_map(|(_, s)| s.backlog).collect();
    let backlog = if counted.len() == mappings.len() {
        counted.iter().sum::<i64>().to_string()
    } else {
        "not counted yet".to_string()
    };
    let last_success = mappings
        .iter()
        .filter_map(|(_, s)| s.last_success)
        .max()
        .and_then(|at| chrono::DateTime::from_timestamp(at, 0))
        .map_or("none yet".to_string(), |at| {
            at.format("%Y-%m-%dT%H:%M:%SZ").to_string()
        });
    let last_error = mappings
        .iter()
        .find_map(|(name, s)| {
            s.last_error.as_ref().map(|error| {
                let line = error.replace('\n', " ");
                let short: String = line.chars().take(160).collect();
                if mappings.len() > 1 {
                    format!("{name}: {short}")
                } else {
                    short
                }
            })
        })
        .unwrap_or_else(|| "none".to_string());
    format!(
        "delivered {delivered}, backlog {backlog}, last success {last_success}, last error: {last_error}"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot(delivered: u64, backlog: Option<i64>, last_success: Option<i64>) -> Snapshot {
        Snapshot {
            delivered,
            backlog,
            last_success,
            ..Snapshot::default()
        }
    }

    #[test]
    fn the_status_line_adds_up_the_mappings() {
        let mut orders = snapshot(400, Some(3), Some(1_700_000_000));
        orders.last_error = Some("HTTP 503\nfrom the API".into());
        let mappings = vec![
            ("orders".to_string(), orders),
            (
                "signups".to_string(),
                snapshot(12, Some(0), Some(1_700_000_060)),
            ),
        ];
        assert_eq!(
            status_line(&mappings),
            "delivered 412, backlog 3, last success 2023-11-14T22:14:20Z, \
             last error: orders: HTTP 503 from the API"
        );
    }

    #[test]
    fn the_status_line_says_what_is_not_known_yet() {
        let mappings = vec![("orders".to_string(), snapshot(0, None, None))];
        assert_eq!(
            status_line(&mappings),
            "delivered 0, backlog not counted yet, last success none yet, last error: none"
        );
    }
}
