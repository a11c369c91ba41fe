//! What the sandbox checks in a request, in the order the real API is expected to: the bearer
//! key (compared in constant time, never logged), the content type, the `Idempotency-Key`, the
//! body's exact shape and the brand. Each refusal is a [`Rejection`] that decides the status.

use std::collections::BTreeMap;

use axum::http::header::{AUTHORIZATION, CONTENT_TYPE};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;
use serde_json::value::RawValue;

use super::{SandboxStats, EVENT_FIELDS};
use crate::secret::Secret;

/// Why a request was not accepted; each variant decides the status and the counter.
#[derive(Debug, thiserror::Error)]
pub(super) enum Rejection {
    #[error("{0}")]
    Unauthorized(&'static str),
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("no such endpoint")]
    NotFound,
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error("injected failure")]
    Injected,
    #[error("could not record the event: sandbox output failed")]
    OutputFailed,
}

impl Rejection {
    pub(super) fn status(&self) -> StatusCode {
        match self {
            Rejection::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Rejection::BadRequest(_) => StatusCode::BAD_REQUEST,
            Rejection::Forbidden(_) => StatusCode::FORBIDDEN,
            Rejection::NotFound => StatusCode::NOT_FOUND,
            Rejection::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Rejection::Injected | Rejection::OutputFailed => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub(super) fn count(&self, stats: &mut SandboxStats) {
        match self {
            Rejection::Unauthorized(_) => stats.unauthorized += 1,
            Rejection::Injected => stats.injected_failures += 1,
            Rejection::OutputFailed => {}
            _ => stats.rejected += 1,
        }
    }
}

impl IntoResponse for Rejection {
    fn into_response(self) -> Response {
        (self.status(), Json(json!({ "error": self.to_string() }))).into_response()
    }
}

fn bad(message: impl Into<String>) -> Rejection {
    Rejection::BadRequest(message.into())
}

pub(super) fn check_auth(expected: Option<&Secret>, headers: &HeaderMap) -> Result<(), Rejection> {
    let header = headers
        .get(AUTHORIZATION)
        .ok_or(Rejection::Unauthorized("missing Authorization header"))?;
    let token = header
        .to_str()
        .ok()
        .and_then(bearer_token)
        .ok_or(Rejection::Unauthorized(
            "Authorization header must be `Bearer <key>`",
        ))?;
    match expected {
        Some(key) if !keys_match(key.expose().as_bytes(), token.as_bytes()) => {
            Err(Rejection::Unauthorized("invalid API key"))
        }
        _ => Ok(()),
    }
}

/// The token of a `Bearer <token>` header value; the scheme is case-insensitive (RFC 9110).
fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// Compares without stopping at the first differing byte, so timing does not reveal the key
/// a byte at a time. The length may leak; that is acceptable for a local sandbox.
fn keys_match(expected: &[u8], given: &[u8]) -> bool {
    expected.len() == given.len()
        && expected
            .iter()
            .zip(given)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

pub(super) fn check_content_type(headers: &HeaderMap) -> Result<(), Rejection> {
    let is_json = headers
        .get(CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.split(';').next())
        .is_some_and(|media| media.trim().eq_ignore_ascii_case("application/json"));
    is_json
        .then_some(())
        .ok_or_else(|| bad("Content-Type must be application/json"))
}

pub(super) fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, Rejection> {
    let read = |value: &HeaderValue| {
        let key = value.to_str().map(str::trim).unwrap_or_default();
        let message = "Idempotency-Key header must be non-empty visible ASCII";
        (!key.is_empty())
            .then(|| key.to_string())
            .ok_or_else(|| bad(message))
    };
    headers.get("idempotency-key").map(read).transpose()
}

/// The fields of an event the sandbox looks at; the rest of the body is only checked.
pub(super) struct Event {
    brand_id: String,
    pub(super) event_type: String,
}

/// Checks the body's shape without building a tree of it: each field is kept as raw JSON text
/// and only the strings are decoded. (The printed line re-reads the body, numbers exact.)
pub(super) fn parse_event(body: &[u8]) -> Result<Event, Rejection> {
    // One pass reads a valid event; only a body it refuses is read again, to say whether it is
    // not JSON at all or JSON of another shape.
    let fields: BTreeMap<String, &RawValue> = serde_json::from_slice(body).map_err(|refused| {
        match serde_json::from_slice::<&RawValue>(body) {
            Ok(raw) if !raw.get().starts_with('{') => bad("body must be a JSON object"),
            Ok(_) => bad(format!("body is not valid JSON: {refused}")),
            Err(e) => bad(format!("body is not valid JSON: {e}")),
        }
    })?;
    if let Some(extra) = fields
        .keys()
        .find(|name| !EVENT_FIELDS.contains(&name.as_str()))
    {
        return Err(bad(format!("unexpected field {extra:?}")));
    }
    let brand_id = required_string(&fields, "brandId")?;
    let event_type = required_string(&fields, "eventType")?;
    if !required_string(&fields, "userEmail")?.contains('@') {
        return Err(bad("field \"userEmail\" must contain '@'"));
    }
    match fields.get("metadata") {
        Some(metadata) if metadata.get().starts_with('{') => Ok(Event {
            brand_id,
            event_type,
        }),
        Some(_) => Err(bad("field \"metadata\" must be an object")),
        None => Err(bad("missing field \"metadata\"")),
    }
}

fn required_string(fields: &BTreeMap<String, &RawValue>, name: &str) -> Result<String, Rejection> {
    let raw = fields
        .get(name)
        .ok_or_else(|| bad(format!("missing field {name:?}")))?;
    match serde_json::from_str::<String>(raw.get()) {
        Ok(text) if !text.trim().is_empty() => Ok(text),
        _ => Err(bad(format!("field {name:?} must be a non-empty string"))),
    }
}

pub(super) fn check_brand(expected: Option<&str>, event: &Event) -> Result<(), Rejection> {
    match expected {
        Some(expected) if expected != event.brand_id => Err(Rejection::Forbidden(format!(
            "brandId {:?} is not the sandbox's brand",
            event.brand_id
        ))),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_scheme_is_case_insensitive_and_needs_a_token() {
        assert_eq!(bearer_token("Bearer abc"), Some("abc"));
        assert_eq!(bearer_token("bearer  abc "), Some("abc"));
        assert_eq!(bearer_token("Bearer "), None);
        assert_eq!(bearer_token("Basic abc"), None);
        assert_eq!(bearer_token("abc"), None);
    }

    #[test]
    fn keys_match_only_when_identical() {
        assert!(keys_match(b"sk_test", b"sk_test"));
        assert!(!keys_match(b"sk_test", b"sk_tesT"));
        assert!(!keys_match(b"sk_test", b"sk_test2"));
    }
}
