//! Retry arithmetic: the backoff schedule, jitter and `Retry-After` parsing.
//!
//! Everything here is pure (the clock and the random source come in as arguments) so that the
//! rules can be unit-tested exactly. Nothing here sleeps or talks to the network.

use std::time::{Duration, SystemTime};

/// How long to wait before each retry of a row, and when to give up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts a row gets in all, the first one included.
    pub max_attempts: u32,
    /// The waits between attempts.
    pub schedule: Schedule,
}

/// The waits between attempts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Schedule {
    /// `initial`, then doubling, never above `max`.
    Exponential { initial: Duration, max: Duration },
    /// The n-th retry waits the n-th entry; past the end, the last entry again.
    Fixed(Vec<Duration>),
}

/// The default durable schedule of `run`: a row keeps being retried for about a day and a
/// half, which outlasts any realistic outage of the API, before it becomes a dead letter.
pub fn default_run_schedule() -> Vec<Duration> {
    [5, 300, 1_800, 7_200, 18_000, 36_000, 36_000]
        .into_iter()
        .map(Duration::from_secs)
        .collect()
}

impl RetryPolicy {
    /// The wait before the next attempt, after `attempts_made` attempts (1 or more) failed.
    /// Without jitter; see [`jittered`].
    pub fn delay_after(&self, attempts_made: u32) -> Duration {
        let retry_index = attempts_made.saturating_sub(1);
        match &self.schedule {
            Schedule::Exponential { initial, max } => {
                let factor = 2u32.saturating_pow(retry_index.min(31));
                initial.saturating_mul(factor).min(*max)
            }
            Schedule::Fixed(waits) => match waits.get(retry_index as usize).or(waits.last()) {
                Some(wait) => *wait,
                None => Duration::ZERO,
            },
        }
    }

    /// Whether a row that has had `attempts_made` attempts may have another.
    pub fn allows_another(&self, attempts_made: u32) -> bool {
        attempts_made < self.max_attempts
    }
}

/// Spreads a wait over [75 %, 125 %] of itself so that rows that failed together do not all
/// come back in the same instant. `unit` is a random number in [0, 1).
pub fn jittered(wait: Duration, unit: f64) -> Duration {
    let factor = 0.75 + 0.5 * unit.clamp(0.0, 1.0);
    wait.mul_f64(factor)
}

/// Parses a `Retry-After` header: either delay-seconds or an HTTP-date (RFC 9110 §10.2.3).
///
/// A digit string is always seconds and never falls through to date parsing; a date in the
/// past means "now". Anything else is `None`, and the caller uses its normal backoff.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if value.is_empty() {
        return None;
    }
    if value.bytes().all(|b| b.is_ascii_digit()) {
        // An absurd number of seconds is still a request to wait a long time: saturate.
        return Some(Duration::from_secs(value.parse().unwrap_or(u64::MAX)));
    }
    let date = httpdate::parse_http_date(value).ok()?;
    Some(date.duration_since(now).unwrap_or(Duration::ZERO))
}

/// The wait before the next attempt: the server's `Retry-After` when it gave one (never above
/// `cap`, so a server asking for a day cannot stall a row), else the policy's backoff with
/// jitter.
pub fn next_wait(
    policy: &RetryPolicy,
    attempts_made: u32,
    retry_after: Option<Duration>,
    cap: Duration,
    unit: f64,
) -> Duration {
    match retry_after {
        Some(asked) => asked.min(cap),
        None => jittered(policy.delay_after(attempts_made), unit),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exponential(initial: u64, max: u64, attempts: u32) -> RetryPolicy {
        RetryPolicy {
            max_attempts: attempts,
            schedule: Schedule::Exponential {
                initial: Duration::from_secs(initial),
                max: Duration::from_secs(max),
            },
        }
    }

    #[test]
    fn exponential_doubles_and_caps() {
        let policy = exponential(1, 10, 10);
        let waits: Vec<u64> = (1..=6).map(|n| policy.delay_after(n).as_secs()).collect();
        assert_eq!(waits, vec![1, 2, 4, 8, 10, 10]);
        assert_eq!(policy.delay_after(1_000), Duration::from_secs(10));
    }

    #[test]
    fn fixed_schedule_repeats_its_last_entry() {
        let policy = RetryPolicy {
            max_attempts: 8,
            schedule: Schedule::Fixed(default_run_schedule()),
        };
        assert_eq!(policy.delay_after(1), Duration::from_secs(5));
        assert_eq!(policy.delay_after(2), Duration::from_secs(300));
        assert_eq!(policy.delay_after(7), Duration::from_secs(36_000));
        assert_eq!(policy.delay_after(9), Duration::from_secs(36_000));
    }

    #[test]
    fn attempts_are_bounded() {
        let policy = exponential(1, 1, 3);
        assert!(policy.allows_another(2));
        assert!(!policy.allows_another(3));
    }

    #[test]
    fn jitter_stays_within_a_quarter() {
        let wait = Duration::from_secs(100);
        assert_eq!(jittered(wait, 0.0), Duration::from_secs(75));
        assert_eq!(jittered(wait, 0.5), Duration::from_secs(100));
        assert!(jittered(wait, 0.999_999) <= Duration::from_secs(125));
    }

    #[test]
    fn retry_after_seconds() {
        let now = SystemTime::now();
        assert_eq!(parse_retry_after("3", now), Some(Duration::from_secs(3)));
        assert_eq!(
            parse_retry_after(" 120 ", now),
            Some(Duration::from_secs(120))
        );
        assert_eq!(
            parse_retry_after("99999999999999999999999", now),
            Some(Duration::from_secs(u64::MAX))
        );
    }

    #[test]
    fn retry_after_http_date() {
        let now = httpdate::parse_http_date("Wed, 21 Oct 2026 07:28:00 GMT").unwrap();
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2026 07:28:05 GMT", now),
            Some(Duration::from_secs(5))
        );
        // A date in the past means: retry now.
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2026 07:00:00 GMT", now),
            Some(Duration::ZERO)
        );
    }

    #[test]
    fn retry_after_garbage_is_ignored() {
        let now = SystemTime::now();
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(parse_retry_after("", now), None);
        assert_eq!(parse_retry_after("-5", now), None);
        assert_eq!(parse_retry_after("1.5", now), None);
    }

    #[test]
    fn retry_after_is_capped() {
        let policy = exponential(1, 300, 5);
        let cap = Duration::from_secs(300);
        let day = Some(Duration::from_secs(86_400));
        assert_eq!(next_wait(&policy, 1, day, cap, 0.5), cap);
        assert_eq!(
            next_wait(&policy, 1, Some(Duration::from_secs(3)), cap, 0.5),
            Duration::from_secs(3)
        );
        assert_eq!(
            next_wait(&policy, 2, None, cap, 0.5),
            Duration::from_secs(2)
        );
    }
}
