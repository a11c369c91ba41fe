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

    /// The secret's length in bytes.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether the secret is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
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

/// Whether users other than the owner and group may read the file (mode `o+r`).
pub fn readable_by_others(path: &std::path::Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.permissions().mode() & 0o004 != 0)
}

/// Warnings for secrets that every user of the machine can read: a config file whose
/// `[database] url` holds a password, and an `api_key_file`. `text` is the config file's.
pub fn exposed_secret_warnings(config_path: &std::path::Path, text: &str) -> Vec<String> {
    let Ok(table) = text.parse::<toml::Table>() else {
        return Vec::new();
    };
    let mut warnings = Vec::new();
    let url = table
        .get("database")
        .and_then(|d| d.get("url"))
        .and_then(|u| u.as_str());
    if url.is_some_and(|u| redact_database_url(u) != u) && readable_by_others(config_path) {
        warnings.push(format!(
            "{} holds the database password in [database] url and every user of this machine \
             can read it: chmod o-r it, or move the password to DATABASE_URL or ~/.pgpass",
            config_path.display()
        ));
    }
    let key_file = table
        .get("resonance")
        .and_then(|r| r.get("api_key_file"))
        .and_then(|f| f.as_str())
        .map(std::path::Path::new);
    if let Some(key_file) = key_file.filter(|f| readable_by_others(f)) {
        warnings.push(format!(
            "api_key_file {} holds the API key and every user of this machine can read it: \
             chmod o-r it",
            key_file.display()
        ));
    }
    warnings
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_others_can_read_draw_warnings() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let key_file = dir.path().join("api-key");
        std::fs::write(&key_file, "sk_live_abcdef").unwrap();
        let config = dir.path().join("config.toml");
        let text = format!(
            "[database]\nurl = \"postgres://crm:hunter2@db/shop\"\n[resonance]\napi_key_file = \"{}\"\n",
            key_file.display()
        );
        std::fs::write(&config, &text).unwrap();
        let mode = |path: &std::path::Path, mode: u32| {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap()
        };
        mode(&config, 0o644);
        mode(&key_file, 0o644);
        let warnings = exposed_secret_warnings(&config, &text);
        assert_eq!(warnings.len(), 2, "{warnings:?}");
        assert!(warnings[0].contains("database password"));
        assert!(warnings[1].contains("API key"));
        assert!(warnings.iter().all(|w| !w.contains("hunter2")));
        mode(&config, 0o640);
        mode(&key_file, 0o600);
        assert!(exposed_secret_warnings(&config, &text).is_empty());
        // A URL without a password is no secret, whoever can read it.
        mode(&config, 0o644);
        let text = "[database]\nurl = \"postgres://crm@db/shop\"\n";
        assert!(exposed_secret_warnings(&config, text).is_empty());
    }

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
