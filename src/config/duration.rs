//! Durations in the config file: human text ("30s", "5m", "2h") parsed into a `Duration`
//! and held to the range each key accepts.

use std::time::Duration;

/// The durations a key accepts, both ends included, and how the range is shown.
///
/// Every duration has an upper bound: leases and retry times become PostgreSQL intervals, and
/// a mistyped unit ("100000000y") should be refused by `check`, not by the server at run time
/// ("interval out of range"). Lower bounds keep a zero out of waits and timeouts.
#[derive(Debug, Clone, Copy)]
pub(super) struct Range {
    min: Duration,
    max: Duration,
    shown: &'static str,
}

const MINUTE: u64 = 60;
const HOUR: u64 = 60 * MINUTE;
const DAY: u64 = 24 * HOUR;

/// Timeouts (`connect_timeout`, `timeout`): a zero would fail every attempt at once.
pub(super) const TIMEOUT: Range = Range {
    min: Duration::from_millis(100),
    max: Duration::from_secs(HOUR),
    shown: "100ms to 1h",
};
/// `claim_lease`: the 2s floor was there before the upper bound; a lease is renewed every
/// third of it, so a shorter one would be renewed all the time.
pub(super) const CLAIM_LEASE: Range = Range {
    min: Duration::from_secs(2),
    max: Duration::from_secs(DAY),
    shown: "2s to 24h",
};
/// A mapping's `interval`: how long an idle mapping waits before polling again.
pub(super) const INTERVAL: Range = Range {
    min: Duration::from_millis(100),
    max: Duration::from_secs(DAY),
    shown: "100ms to 24h",
};
/// Waits before a retry (`backoff_*`, `retry_schedule`, `retry_after_max`): a zero wait would
/// send to an API that is down in a tight loop.
pub(super) const RETRY_WAIT: Range = Range {
    min: Duration::from_millis(50),
    max: Duration::from_secs(30 * DAY),
    shown: "50ms to 30 days",
};

/// Parses an optional human duration (`"30s"`, `"5m"`, `"1h 30m"`), falling back to `default`,
/// and refuses one outside `range`.
pub(super) fn duration(
    label: &str,
    value: Option<String>,
    default: &str,
    range: Range,
    problems: &mut Vec<String>,
) -> Option<Duration> {
    let text = value.unwrap_or_else(|| default.to_string());
    let parsed = match humantime::parse_duration(text.trim()) {
        Ok(d) => d,
        Err(e) => {
            problems.push(format!(
                "{label}: '{text}' is not a duration like \"30s\", \"5m\" or \"2h\" ({e})"
            ));
            return None;
        }
    };
    if parsed < range.min || parsed > range.max {
        problems.push(format!(
            "{label}: '{text}' is out of range ({})",
            range.shown
        ));
        return None;
    }
    Some(parsed)
}
