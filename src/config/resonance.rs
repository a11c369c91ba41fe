//! The `[resonance]` section: the endpoint (https unless loopback), the brand, the API key from
//! the environment, a file or a systemd credential, and the retry policies of `run` and
//! `backfill`.

use std::path::Path;
use std::time::Duration;

use super::duration::{duration, RETRY_WAIT, TIMEOUT};
use super::{Overrides, RawResonance, ResonanceConfig, CREDENTIAL_NAME, DEFAULT_ENDPOINT};
use crate::retry::{default_run_schedule, RetryPolicy, Schedule};
use crate::secret::Secret;

pub(super) fn validate_resonance(
    raw: RawResonance,
    overrides: &Overrides,
    problems: &mut Vec<String>,
) -> Option<ResonanceConfig> {
    let retry = validate_retry(&raw, problems);
    let endpoint = validate_endpoint(
        overrides
            .endpoint
            .as_deref()
            .or(raw.endpoint.as_deref())
            .unwrap_or(DEFAULT_ENDPOINT),
        raw.allow_insecure_http.unwrap_or(false),
        problems,
    );
    let brand_id = overrides.brand_id.clone().or(raw.brand_id);
    let brand_id = match brand_id.filter(|b| !b.trim().is_empty()) {
        Some(brand) => Some(brand.trim().to_string()),
        None => {
            problems.push(
                "[resonance] brand_id: not set (set it in the file or in RESONANCE_BRAND_ID)"
                    .to_string(),
            );
            None
        }
    };
    let api_key = load_api_key(overrides, raw.api_key_file.as_deref(), problems);
    if api_key.as_ref().is_some_and(|key| {
        reqwest::header::HeaderValue::from_str(&format!("Bearer {}", key.expose())).is_err()
    }) {
        // The key itself is not shown, not even in part.
        problems.push(
            "the API key holds characters that cannot go in an HTTP header (a line break or another \
             control character): check RESONANCE_API_KEY, api_key_file or \
             the resonance-api-key credential"
                .to_string(),
        );
    }
    let concurrency = raw.concurrency.unwrap_or(16);
    if !(1..=1024).contains(&concurrency) {
        problems.push(format!(
            "[resonance] concurrency: {concurrency} is out of range (1 to 1024)"
        ));
    }
    let timeout = duration(
        "[resonance] timeout",
        raw.timeout.clone(),
        "10s",
        TIMEOUT,
        problems,
    );
    let connect_timeout = duration(
        "[resonance] connect_timeout",
        raw.connect_timeout.clone(),
        "5s",
        TIMEOUT,
        problems,
    );
    Some(ResonanceConfig {
        endpoint: endpoint?,
        brand_id: brand_id?,
        api_key,
        concurrency,
        timeout: timeout?,
        connect_timeout: connect_timeout?,
        run_retry: retry.as_ref()?.0.clone(),
        backfill_retry: retry.as_ref()?.1.clone(),
        retry_after_max: retry?.2,
    })
}

/// Builds the `run` and `backfill` policies and the `Retry-After` cap.
///
/// `backfill` always uses the exponential `backoff_initial`/`backoff_max`/`max_attempts`
/// schedule. `run` uses `retry_schedule` when given; else, when any of the three exponential
/// keys is set, the same exponential schedule; else the default schedule of hours.
fn validate_retry(
    raw: &RawResonance,
    problems: &mut Vec<String>,
) -> Option<(RetryPolicy, RetryPolicy, Duration)> {
    let initial = duration(
        "[resonance] backoff_initial",
        raw.backoff_initial.clone(),
        "1s",
        RETRY_WAIT,
        problems,
    );
    let max = duration(
        "[resonance] backoff_max",
        raw.backoff_max.clone(),
        "5m",
        RETRY_WAIT,
        problems,
    );
    let retry_after_max = duration(
        "[resonance] retry_after_max",
        raw.retry_after_max.clone(),
        "5m",
        RETRY_WAIT,
        problems,
    );
    let max_attempts = raw.max_attempts.unwrap_or(5);
    if max_attempts == 0 || max_attempts > 1000 {
        problems.push(format!(
            "[resonance] max_attempts: {max_attempts} is out of range (1 to 1000)"
        ));
    }
    let schedule = raw.retry_schedule.as_ref().map(|entries| {
        entries
            .iter()
            .enumerate()
            .filter_map(|(i, entry)| {
                duration(
                    &format!("[resonance] retry_schedule[{i}]"),
                    Some(entry.clone()),
                    "",
                    RETRY_WAIT,
                    problems,
                )
            })
            .collect::<Vec<_>>()
    });
    if raw.retry_schedule.as_ref().is_some_and(Vec::is_empty) {
        problems.push(
            "[resonance] retry_schedule is empty: list at least one wait (\"5s\", \"5m\", ...), or \
             leave the key out for the default"
                .to_string(),
        );
    }
    let (initial, max) = (initial?, max?);
    if initial > max {
        problems.push(format!(
            "[resonance] backoff_initial ({}) is longer than backoff_max ({})",
            humantime::format_duration(initial),
            humantime::format_duration(max)
        ));
    }
    let exponential = RetryPolicy {
        max_attempts,
        schedule: Schedule::Exponential { initial, max },
    };
    let exponential_set =
        raw.max_attempts.is_some() || raw.backoff_initial.is_some() || raw.backoff_max.is_some();
    let run = match schedule {
        Some(waits) if waits.is_empty() => exponential.clone(),
        Some(waits) => RetryPolicy {
            max_attempts: raw.max_attempts.unwrap_or(waits.len() as u32 + 1),
            schedule: Schedule::Fixed(waits),
        },
        None if exponential_set => exponential.clone(),
        None => {
            let waits = default_run_schedule();
            RetryPolicy {
                max_attempts: waits.len() as u32 + 1,
                schedule: Schedule::Fixed(waits),
            }
        }
    };
    Some((run, exponential, retry_after_max?))
}

fn validate_endpoint(
    text: &str,
    allow_insecure_http: bool,
    problems: &mut Vec<String>,
) -> Option<reqwest::Url> {
    let url = match reqwest::Url::parse(text) {
        Ok(url) => url,
        Err(e) => {
            problems.push(format!(
                "[resonance] endpoint: '{text}' is not a valid URL ({e})"
            ));
            return None;
        }
    };
    if !url.username().is_empty() || url.password().is_some() {
        problems.push(
            "[resonance] endpoint: must not hold a user name or password; the API key comes \
             from RESONANCE_API_KEY, api_key_file or the resonance-api-key credential"
                .to_string(),
        );
        return None;
    }
    match url.scheme() {
        "https" => Some(url),
        "http" if allow_insecure_http || is_loopback_host(&url) => Some(url),
        "http" => {
            problems.push(format!(
                "[resonance] endpoint: '{text}' uses plain http to a non-loopback host, which \
                 would send the API key and customer emails unencrypted; use https, or set \
                 allow_insecure_http = true if a TLS proxy sits in between"
            ));
            None
        }
        other => {
            problems.push(format!(
                "[resonance] endpoint: scheme '{other}' is not supported (use https)"
            ));
            None
        }
    }
}

fn is_loopback_host(url: &reqwest::Url) -> bool {
    match url.host() {
        Some(url::Host::Domain(domain)) => domain.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    }
}

fn load_api_key(
    overrides: &Overrides,
    api_key_file: Option<&Path>,
    problems: &mut Vec<String>,
) -> Option<Secret> {
    if let Some(key) = &overrides.api_key {
        return Some(Secret::new(key.trim()));
    }
    let credential = overrides
        .credentials_directory
        .as_ref()
        .map(|dir| dir.join(CREDENTIAL_NAME))
        .filter(|path| path.exists());
    let path = api_key_file.map(Path::to_path_buf).or(credential)?;
    match std::fs::read_to_string(&path) {
        Ok(text) if !text.trim().is_empty() => Some(Secret::new(text.trim())),
        Ok(_) => {
            problems.push(format!(
                "[resonance] api_key_file: {} is empty",
                shown_key_file(&path)
            ));
            None
        }
        Err(e) if looks_like_a_path(&path) => {
            problems.push(format!(
                "[resonance] api_key_file: cannot read {}: {e}",
                path.display()
            ));
            None
        }
        Err(e) => {
            problems.push(format!(
                "[resonance] api_key_file: the file it names cannot be read ({e}); the name is \
                 not shown, as it looks like it may be the API key itself. The key belongs in \
                 that file or in RESONANCE_API_KEY, never in the config"
            ));
            None
        }
    }
}

/// Whether `api_key_file` looks like a file name rather than a key pasted where the name
/// belongs: a key has no '/' and no '.', a path almost always has one of them.
fn looks_like_a_path(path: &Path) -> bool {
    let text = path.as_os_str().to_string_lossy();
    text.contains('/') || text.contains('.')
}

/// The api_key_file for a message: its name when it looks like a path (that helps find it),
/// else a placeholder, as the value may be the key itself.
fn shown_key_file(path: &Path) -> String {
    match looks_like_a_path(path) {
        true => path.display().to_string(),
        false => "the file it names".to_string(),
    }
}
