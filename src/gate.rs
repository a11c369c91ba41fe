//! The API's health as seen from here: whether to send at full rate, probe, or wait.
//!
//! When every request fails (the API is down) or the API refuses the key, sending at full rate
//! only burns attempts. The gate opens after a run of failures, lets one probe through after each
//! pause (pauses double up to a cap), and closes again at the first answer that shows the API is
//! back. Mappings share one gate because they share one API.

use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Why the gate is open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trouble {
    /// Requests keep failing with network errors, timeouts, 408, 429 or 5xx.
    Outage,
    /// The API answered 401/403 (or a redirect): the key, brand or endpoint is wrong.
    Refused { status: u16 },
}

/// What a worker may do now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Send as much as there is.
    Full,
    /// Send one event to find out whether the API is back.
    Probe,
    /// Stopping.
    Stopped,
}

/// Settings of the gate.
#[derive(Debug, Clone)]
pub struct GateSettings {
    /// Consecutive retryable failures, with no success between, that open the gate.
    pub failure_threshold: u32,
    /// The first pause after an outage; doubles with each failed probe.
    pub outage_pause: Duration,
    /// The first pause after the API refused the key.
    pub refused_pause: Duration,
    /// The longest pause.
    pub max_pause: Duration,
}

#[derive(Debug, Default)]
struct State {
    consecutive_failures: u32,
    trouble: Option<Trouble>,
    open_until: Option<Instant>,
    /// Pauses in a row since the API last answered well.
    pauses: u32,
}

/// The shared API health.
#[derive(Debug)]
pub struct Gate {
    settings: GateSettings,
    state: Mutex<State>,
    changed: Notify,
}

/// A change worth a log line, returned so the caller logs with its own context.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transition {
    Opened {
        trouble: Trouble,
        pause: Duration,
        pauses: u32,
    },
    Closed {
        after_pauses: u32,
    },
}

impl Gate {
    pub fn new(settings: GateSettings) -> Gate {
        Gate {
            settings,
            state: Mutex::new(State::default()),
            changed: Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A poisoned lock only means another thread panicked mid-update of plain counters.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The API answered (2xx or a 4xx about the row): it is up.
    pub fn answered(&self) -> Option<Transition> {
        let mut state = self.lock();
        state.consecutive_failures = 0;
        let was_open = state.trouble.take().is_some();
        state.open_until = None;
        let pauses = std::mem::take(&mut state.pauses);
        drop(state);
        if was_open {
            self.changed.notify_waiters();
            return Some(Transition::Closed {
                after_pauses: pauses,
            });
        }
        None
    }

    /// A retryable failure.
    pub fn failed(&self) -> Option<Transition> {
        let mut state = self.lock();
        state.consecutive_failures = state.consecutive_failures.saturating_add(1);
        let probing = state.trouble.is_some() && state.open_until.is_none();
        let tripped = state.trouble.is_none()
            && state.consecutive_failures >= self.settings.failure_threshold;
        if probing || tripped {
            return Some(self.open(&mut state, Trouble::Outage));
        }
        None
    }

    /// The API refused the key or the endpoint.
    pub fn refused(&self, status: u16) -> Option<Transition> {
        let mut state = self.lock();
        let waiting = state.open_until.is_some_and(|until| until > Instant::now());
        if waiting && state.trouble == Some(Trouble::Refused { status }) {
            return None;
        }
        Some(self.open(&mut state, Trouble::Refused { status }))
    }

    fn open(&self, state: &mut State, trouble: Trouble) -> Transition {
        // A refused key is never retried faster than `refused_pause`, however short the cap.
        let (base, cap) = match trouble {
            Trouble::Outage => (self.settings.outage_pause, self.settings.max_pause),
            Trouble::Refused { .. } => (
                self.settings.refused_pause,
                self.settings.max_pause.max(self.settings.refused_pause),
            ),
        };
        let factor = 2u32.saturating_pow(state.pauses.min(20));
        let pause = base.saturating_mul(factor).min(cap);
        state.pauses += 1;
        state.trouble = Some(trouble);
        state.open_until = Some(Instant::now() + pause);
        Transition::Opened {
            trouble,
            pause,
            pauses: state.pauses,
        }
    }

    /// The current trouble, if any.
    pub fn trouble(&self) -> Option<Trouble> {
        self.lock().trouble
    }

    /// Whether sending is paused right now (not while a probe may go out).
    pub fn is_paused(&self) -> bool {
        self.lock()
            .open_until
            .is_some_and(|until| until > Instant::now())
    }

    /// Pauses in a row since the API last answered well.
    pub fn pauses(&self) -> u32 {
        self.lock().pauses
    }

    /// Waits while the gate is open; then says whether to send fully or to probe.
    pub async fn admit(&self, stop: &CancellationToken) -> Admission {
        loop {
            let (until, trouble) = {
                let state = self.lock();
                (state.open_until, state.trouble)
            };
            match (trouble, until) {
                (None, _) => return Admission::Full,
                (Some(_), Some(until)) if until > Instant::now() => {
                    tokio::select! {
                        _ = stop.cancelled() => return Admission::Stopped,
                        _ = tokio::time::sleep_until(until) => {}
                        _ = self.changed.notified() => {}
                    }
                }
                (Some(_), _) => {
                    // The pause is over: the next request is a probe.
                    self.lock().open_until = None;
                    return Admission::Probe;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gate() -> Gate {
        Gate::new(GateSettings {
            failure_threshold: 3,
            outage_pause: Duration::from_secs(1),
            refused_pause: Duration::from_secs(30),
            max_pause: Duration::from_secs(4),
        })
    }

    #[test]
    fn opens_after_a_run_of_failures_and_closes_on_an_answer() {
        let gate = gate();
        assert_eq!(gate.failed(), None);
        assert_eq!(gate.failed(), None);
        assert!(matches!(
            gate.failed(),
            Some(Transition::Opened { trouble: Trouble::Outage, pause, pauses: 1 }) if pause == Duration::from_secs(1)
        ));
        assert_eq!(gate.trouble(), Some(Trouble::Outage));
        assert!(gate.is_paused());
        assert_eq!(
            gate.answered(),
            Some(Transition::Closed { after_pauses: 1 })
        );
        assert_eq!(gate.trouble(), None);
    }

    #[test]
    fn a_success_resets_the_count() {
        let gate = gate();
        gate.failed();
        gate.failed();
        assert_eq!(gate.answered(), None);
        assert_eq!(gate.failed(), None);
    }

    #[tokio::test(start_paused = true)]
    async fn failed_probes_double_the_pause_up_to_the_cap() {
        let gate = gate();
        let stop = CancellationToken::new();
        for _ in 0..3 {
            gate.failed();
        }
        let mut pauses = vec![];
        for _ in 0..4 {
            assert_eq!(gate.admit(&stop).await, Admission::Probe);
            match gate.failed() {
                Some(Transition::Opened { pause, .. }) => pauses.push(pause.as_secs()),
                other => panic!("expected the gate to reopen, got {other:?}"),
            }
        }
        assert_eq!(pauses, vec![2, 4, 4, 4]);
    }

    #[test]
    fn a_refused_key_pauses_at_least_the_refused_pause_under_a_shorter_cap() {
        let gate = gate();
        assert!(matches!(
            gate.refused(401),
            Some(Transition::Opened { trouble: Trouble::Refused { status: 401 }, pause, .. })
                if pause == Duration::from_secs(30)
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn admit_returns_when_stopped() {
        let gate = gate();
        gate.refused(401);
        let stop = CancellationToken::new();
        stop.cancel();
        assert_eq!(gate.admit(&stop).await, Admission::Stopped);
    }
}
