//! The Resonance side: one POST per event, and what its answer means.
//!
//! [`Sink::send`] makes exactly one attempt and classifies it; it never retries and never
//! touches the database. The decision table lives in [`classify`], a pure function.

use std::time::{Duration, Instant, SystemTime};

use reqwest::header::{HeaderMap, HeaderValue, AUTHORIZATION, CONTENT_TYPE, RETRY_AFTER};
use reqwest::StatusCode;

use crate::config::ResonanceConfig;
use crate::mapping::OutgoingEvent;
use crate::retry::parse_retry_after;
use crate::secret::Secret;

/// The header that lets the API recognise a re-sent event.
pub const IDEMPOTENCY_HEADER: &str = "Idempotency-Key";
/// How much of a rejecting response body is kept for the dead-letter record.
const BODY_KEEP: usize = 2_048;

/// The meaning of one attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// 2xx: the event is delivered.
    Delivered { status: u16 },
    /// Worth trying again later: network error, timeout, 408, 429 or 5xx.
    Retry {
        status: Option<u16>,
        retry_after: Option<Duration>,
        error: String,
    },
    /// The API refused this event for good (any other 4xx).
    Rejected { status: u16, body: String },
    /// The API refused the key or the brand (401, 403) or the endpoint is wrong (3xx): nothing
    /// is wrong with the row, and no row should be charged with it.
    Refused { status: u16, body: String },
}

/// Classifies an HTTP answer.
pub fn classify(status: StatusCode, retry_after: Option<Duration>, body: String) -> Outcome {
    let code = status.as_u16();
    match code {
        200..=299 => Outcome::Delivered { status: code },
        401 | 403 => Outcome::Refused { status: code, body },
        300..=399 => Outcome::Refused { status: code, body },
        408 | 429 | 500..=599 => Outcome::Retry {
            status: Some(code),
            retry_after,
            error: format!("HTTP {code}{}", summary(&body)),
        },
        _ => Outcome::Rejected { status: code, body },
    }
}

fn summary(body: &str) -> String {
    let trimmed = body.trim();
    if trimmed.is_empty() {
        String::new()
    } else {
        format!(": {}", truncate(trimmed, 200))
    }
}

/// Cuts `text` to at most `max` bytes on a character boundary.
pub fn truncate(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// What is kept of a refusal's body: the key scrubbed, control characters escaped (a NUL
/// could not be stored), at most [`BODY_KEEP`] bytes, and never part of the key.
fn kept_body(body: &str, api_key: &Secret) -> String {
    let key = api_key.expose();
    let mut end = truncate(body, BODY_KEEP).len();
    if key.len() >= 4 {
        if let Some(cut) = body
            .match_indices(key)
            .map(|(at, _)| at)
            .find(|&at| at < end && at + key.len() > end)
        {
            end = cut;
        }
    }
    let clean = crate::output::printable(&api_key.scrub(&body[..end])).into_owned();
    truncate(&clean, BODY_KEEP).to_string()
}

/// Reads at most `limit` bytes of a response body and drops the rest unread: a proxy's error
/// page can be large, and only [`BODY_KEEP`] bytes are kept.
async fn read_prefix(
    mut response: reqwest::Response,
    limit: usize,
) -> Result<Vec<u8>, reqwest::Error> {
    let mut kept = Vec::new();
    while kept.len() < limit {
        let Some(chunk) = response.chunk().await? else {
            break;
        };
        kept.extend_from_slice(&chunk[..chunk.len().min(limit - kept.len())]);
    }
    Ok(kept)
}

/// The HTTP client, shared by every mapping.
#[derive(Debug, Clone)]
pub struct Sink {
    client: reqwest::Client,
    endpoint: reqwest::Url,
    api_key: Secret,
    /// `Bearer <key>`, built once and marked sensitive.
    authorization: HeaderValue,
}

/// An attempt's outcome and how long it took.
#[derive(Debug, Clone)]
pub struct Attempt {
    pub outcome: Outcome,
    pub elapsed: Duration,
}

impl Sink {
    /// Builds the client: kept-alive connections, a total timeout per request, no redirects
    /// (a POST must not silently turn into a GET somewhere else).
    pub fn new(config: &ResonanceConfig, api_key: Secret) -> Result<Sink, String> {
        let client = reqwest::Client::builder()
            .timeout(config.timeout)
            .connect_timeout(config.connect_timeout)
            .pool_max_idle_per_host(config.concurrency)
            .pool_idle_timeout(Duration::from_secs(60))
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("resonance-sync/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| format!("cannot build the HTTP client: {e}"))?;
        // Config validation refuses such a key already, with the same words; the key itself
        // is never shown.
        let mut authorization = HeaderValue::from_str(&format!("Bearer {}", api_key.expose()))
            .map_err(|_| {
                "the API key holds characters that cannot go in an HTTP header".to_string()
            })?;
        authorization.set_sensitive(true);
        Ok(Sink {
            client,
            endpoint: config.endpoint.clone(),
            api_key,
            authorization,
        })
    }

    /// Sends one event once.
    pub async fn send(&self, event: &OutgoingEvent) -> Attempt {
        let started = Instant::now();
        let outcome = self.attempt(event).await;
        Attempt {
            outcome,
            elapsed: started.elapsed(),
        }
    }

    async fn attempt(&self, event: &OutgoingEvent) -> Outcome {
        let mut headers = HeaderMap::with_capacity(3);
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        headers.insert(AUTHORIZATION, self.authorization.clone());
        if let Ok(value) = HeaderValue::from_str(&event.idempotency_key) {
            headers.insert(IDEMPOTENCY_HEADER, value);
        }
        let request = self
            .client
            .post(self.endpoint.clone())
            .headers(headers)
            .body(event.body.clone());
        let response = match request.send().await {
            Ok(response) => response,
            Err(error) => return self.transport_failure(&error),
        };
        let status = response.status();
        let retry_after = response
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| parse_retry_after(v, SystemTime::now()));
        if status.is_success() {
            // The body of a 2xx is not needed; dropping it early frees the connection.
            return Outcome::Delivered {
                status: status.as_u16(),
            };
        }
        // A key the API echoes is read whole, so that it is scrubbed rather than cut in two.
        let body = match read_prefix(response, BODY_KEEP + self.api_key.len()).await {
            Ok(bytes) => kept_body(&String::from_utf8_lossy(&bytes), &self.api_key),
            Err(error) => format!("(body unreadable: {})", self.describe(&error)),
        };
        classify(status, retry_after, body)
    }

    fn transport_failure(&self, error: &reqwest::Error) -> Outcome {
        let kind = if error.is_timeout() {
            "timed out (the API may have received the event; the retry carries the same \
             Idempotency-Key)"
        } else if error.is_connect() {
            "connection failed"
        } else {
            "request failed"
        };
        Outcome::Retry {
            status: None,
            retry_after: None,
            error: format!("{kind}: {}", self.describe(error)),
        }
    }

    /// The error with its causes, and never the key.
    fn describe(&self, error: &reqwest::Error) -> String {
        self.api_key.scrub(&crate::error::with_causes(error))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(code: u16) -> StatusCode {
        StatusCode::from_u16(code).unwrap()
    }

    #[test]
    fn success_is_any_2xx() {
        for code in [200, 201, 202, 204] {
            assert_eq!(
                classify(status(code), None, String::new()),
                Outcome::Delivered { status: code }
            );
        }
    }

    #[test]
    fn transient_codes_are_retried() {
        for code in [408, 429, 500, 502, 503, 504] {
            assert!(
                matches!(classify(status(code), None, String::new()), Outcome::Retry { status: Some(c), .. } if c == code),
                "{code} must be retried"
            );
        }
        let wait = Some(Duration::from_secs(3));
        assert!(matches!(
            classify(status(429), wait, String::new()),
            Outcome::Retry { retry_after, .. } if retry_after == wait
        ));
    }

    #[test]
    fn other_client_errors_are_permanent() {
        for code in [400, 404, 409, 410, 413, 422] {
            assert_eq!(
                classify(status(code), None, "no".to_string()),
                Outcome::Rejected {
                    status: code,
                    body: "no".to_string()
                }
            );
        }
    }

    #[test]
    fn auth_failures_and_redirects_blame_the_config_not_the_row() {
        for code in [401, 403, 301, 302, 307, 308] {
            assert!(matches!(
                classify(status(code), None, String::new()),
                Outcome::Refused { status: c, .. } if c == code
            ));
        }
    }

    #[test]
    fn a_kept_body_is_short_printable_and_never_holds_the_key() {
        let key = Secret::new("sk_trialsecret_XYZ123");
        assert_eq!(kept_body("bad\0row\n", &key), "bad\\u{0}row\\n");
        // An echoed key is scrubbed, wherever it is.
        let echoed = format!("{}Authorization: Bearer {}", "x".repeat(100), key.expose());
        assert_eq!(
            kept_body(&echoed, &key),
            format!("{}Authorization: Bearer [redacted]", "x".repeat(100))
        );
        // A key before the cut is scrubbed; one across it is left out whole, not kept in part.
        let before = format!("{}{}", "x".repeat(BODY_KEEP - 30), key.expose());
        assert!(kept_body(&before, &key).ends_with("x[redacted]"));
        for at in [BODY_KEEP - 5, BODY_KEEP - 1] {
            let body = format!("{}{}{}", "x".repeat(at), key.expose(), "y".repeat(50));
            let kept = kept_body(&body, &key);
            assert!(
                kept == "x".repeat(at),
                "{at}: ...{}",
                &kept[kept.len() - 40..]
            );
        }
        let long = "é".repeat(BODY_KEEP);
        assert!(kept_body(&long, &key).len() <= BODY_KEEP);
    }

    #[test]
    fn truncate_respects_characters() {
        assert_eq!(truncate("héllo", 2), "h");
        assert_eq!(truncate("abc", 10), "abc");
    }
}
