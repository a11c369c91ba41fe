//! A string that must never be printed: the API key and the database password.
//!
//! `Debug` and `Display` show `[redacted]`; the only way to the value is [`Secret::expose`], which
//! is called where the value is handed to the HTTP client or the database driver and nowhere else.

use std::fmt;

/// A secret value whose formatting never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a value.
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The value itself, for the one place that has to send it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Removes every occurrence of the secret from `text`, for messages that quote foreign errors.
    pub fn scrub(&self, text: &str) -> String {
        if self.0.len() < 4 {
            return text.to_string();
        }
        text.replace(&self.0, "[redacted]")
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

/// Replaces the password in a `postgres://user:password@host/db` URL (or a `password=` keyword)
/// with `[redacted]`, so a database URL can appear in a message.
pub fn redact_database_url(url: &str) -> String {
    if let Some(scheme_end) = url.find("://") {
        let rest = &url[scheme_end + 3..];
        let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
        if let Some(at) = rest[..authority_end].rfind('@') {
            let userinfo = &rest[..at];
            if let Some(colon) = userinfo.find(':') {
                return format!(
                    "{}://{}:[redacted]{}",
                    &url[..scheme_end],
                    &userinfo[..colon],
                    &rest[at..]
                );
            }
        }
        return redact_password_param(url);
    }
    redact_password_param(url)
}

fn redact_password_param(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(pos) = rest.find("password=") {
        let value_start = pos + "password=".len();
        out.push_str(&rest[..value_start]);
        out.push_str("[redacted]");
        let value_end = rest[value_start..]
            .find(['&', ' '])
            .map(|i| value_start + i)
            .unwrap_or(rest.len());
        rest = &rest[value_end..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formatting_never_shows_the_value() {
        let secret = Secret::new("sk_live_abcdef");
        assert_eq!(format!("{secret}"), "[redacted]");
        assert_eq!(format!("{secret:?}"), "[redacted]");
        assert_eq!(secret.expose(), "sk_live_abcdef");
    }

    #[test]
    fn scrub_removes_every_occurrence() {
        let secret = Secret::new("sk_live_abcdef");
        assert_eq!(
            secret.scrub("bad key sk_live_abcdef (sk_live_abcdef)"),
            "bad key [redacted] ([redacted])"
        );
    }

    #[test]
    fn database_url_password_is_redacted() {
        assert_eq!(
            redact_database_url("postgres://crm:hunter2@db:5432/shop?sslmode=require"),
            "postgres://crm:[redacted]@db:5432/shop?sslmode=require"
        );
        assert_eq!(
            redact_database_url("postgres://crm@db/shop"),
            "postgres://crm@db/shop"
        );
        assert_eq!(
            redact_database_url("host=db user=crm password=hunter2 dbname=shop"),
            "host=db user=crm password=[redacted] dbname=shop"
        );
        assert_eq!(
            redact_database_url("postgres://db/shop?password=hunter2&sslmode=disable"),
            "postgres://db/shop?password=[redacted]&sslmode=disable"
        );
    }
}
