//! The config file as written: the sections and keys it may have, each as an optional value of
//! the type TOML gives it, before any validation. Unknown keys are refused by name, and a TOML or
//! type error is reported with its line.

use std::path::PathBuf;

use serde::Deserialize;

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    #[serde(default)]
    pub(super) database: RawDatabase,
    #[serde(default)]
    pub(super) resonance: RawResonance,
    #[serde(default)]
    pub(super) mapping: Vec<RawMapping>,
    pub(super) metrics: Option<RawMetrics>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDatabase {
    pub(super) url: Option<String>,
    pub(super) pool_size: Option<usize>,
    pub(super) connect_timeout: Option<String>,
    pub(super) claim_lease: Option<String>,
    pub(super) timestamp_zone: Option<String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawResonance {
    pub(super) endpoint: Option<String>,
    pub(super) brand_id: Option<String>,
    pub(super) api_key_file: Option<PathBuf>,
    pub(super) concurrency: Option<usize>,
    pub(super) timeout: Option<String>,
    pub(super) connect_timeout: Option<String>,
    pub(super) max_attempts: Option<u32>,
    pub(super) backoff_initial: Option<String>,
    pub(super) backoff_max: Option<String>,
    pub(super) retry_schedule: Option<Vec<String>>,
    pub(super) retry_after_max: Option<String>,
    pub(super) allow_insecure_http: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawMapping {
    pub(super) name: Option<String>,
    pub(super) event_type: Option<String>,
    pub(super) interval: Option<String>,
    pub(super) batch_size: Option<usize>,
    pub(super) key: Option<String>,
    pub(super) email: Option<String>,
    pub(super) email_fallback: Option<String>,
    pub(super) query: Option<String>,
    pub(super) mark_synced: Option<String>,
    pub(super) metadata: Option<toml::Table>,
    pub(super) notify_channel: Option<String>,
    pub(super) amount_minor_units: Option<String>,
    pub(super) currency: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawMetrics {
    pub(super) listen: String,
}

pub(super) const TOP_KEYS: &[&str] = &["database", "resonance", "mapping", "metrics"];
/// The keys each section accepts; anything else is refused by name.
pub const DATABASE_KEYS: &[&str] = &[
    "url",
    "pool_size",
    "connect_timeout",
    "claim_lease",
    "timestamp_zone",
];
pub const RESONANCE_KEYS: &[&str] = &[
    "endpoint",
    "brand_id",
    "api_key_file",
    "concurrency",
    "timeout",
    "connect_timeout",
    "max_attempts",
    "backoff_initial",
    "backoff_max",
    "retry_schedule",
    "retry_after_max",
    "allow_insecure_http",
];
pub const MAPPING_KEYS: &[&str] = &[
    "name",
    "event_type",
    "interval",
    "batch_size",
    "key",
    "email",
    "email_fallback",
    "query",
    "mark_synced",
    "metadata",
    "notify_channel",
    "amount_minor_units",
    "currency",
];
pub(super) const METRICS_KEYS: &[&str] = &["listen"];

/// A TOML error as one line: where it is, the line itself, and what is wrong.
pub(super) fn locate(text: &str, error: &toml::de::Error) -> String {
    let message = plain_types(&error.message().trim().replace('\n', " "));
    let Some(span) = error.span() else {
        return message;
    };
    let start = span.start.min(text.len());
    let line_number = text[..start].matches('\n').count() + 1;
    let line = text.lines().nth(line_number - 1).unwrap_or("").trim();
    format!("line {line_number} (`{line}`): {message}")
}

/// serde names the Rust type it expected ("expected usize", "expected struct RawDatabase");
/// say what to write instead.
fn plain_types(message: &str) -> String {
    let mut message = message.to_string();
    for (rust, plain) in [
        ("expected usize", "expected a whole number, 0 or more"),
        ("expected u64", "expected a whole number, 0 or more"),
        ("expected u32", "expected a whole number, 0 to 4294967295"),
        ("expected u16", "expected a whole number, 0 to 65535"),
        ("expected f64", "expected a number"),
        ("invalid type: map", "invalid type: table"),
        ("invalid type: sequence", "invalid type: list"),
        ("expected a boolean", "expected true or false"),
        (
            "expected a string",
            "expected a string in quotes (durations too: \"30s\")",
        ),
        // retry_schedule is the only list of the file once [[mapping]] is checked.
        (
            "expected a sequence",
            "expected a list in brackets, like [\"5s\", \"5m\"]",
        ),
        (
            "expected a map",
            "expected a table, like [mapping.metadata] or { field = \"column\" }",
        ),
        (
            "expected struct RawDatabase",
            "expected a table: [database]",
        ),
        (
            "expected struct RawResonance",
            "expected a table: [resonance]",
        ),
        ("expected struct RawMetrics", "expected a table: [metrics]"),
        (
            "expected struct RawMapping",
            "expected a table: a [[mapping]] section",
        ),
    ] {
        if let Some(at) = message.find(rust) {
            let end = at + rust.len();
            // Whole words only: "expected u32" is not "expected u320".
            if !message[end..].starts_with(|c: char| c.is_alphanumeric()) {
                message.replace_range(at..end, plain);
            }
        }
    }
    message
}

/// Sections written with the wrong number of brackets: `[mapping]` for `[[mapping]]` (a typical
/// slip, which serde would report as "expected a sequence"), or `[[database]]` for `[database]`.
pub(super) fn bracket_slips(table: &toml::Table) -> Vec<String> {
    let mut problems = Vec::new();
    match table.get("mapping") {
        None | Some(toml::Value::Array(_)) => {}
        Some(toml::Value::Table(_)) => problems.push(
            "[mapping] needs two brackets: write [[mapping]], once before each mapping".to_string(),
        ),
        Some(_) => problems.push(
            "mapping: each mapping is a [[mapping]] section (two brackets), one per mapping"
                .to_string(),
        ),
    }
    for section in ["database", "resonance", "metrics"] {
        if let Some(toml::Value::Array(_)) = table.get(section) {
            problems.push(format!(
                "[[{section}]] has two brackets, which make a list of sections: write \
                 [{section}], once"
            ));
        }
    }
    problems
}

pub(super) fn unknown_keys(table: &toml::Table) -> Vec<String> {
    let mut problems = Vec::new();
    check_keys("top level", table, TOP_KEYS, &mut problems);
    for (section, keys) in [
        ("database", DATABASE_KEYS),
        ("resonance", RESONANCE_KEYS),
        ("metrics", METRICS_KEYS),
    ] {
        if let Some(toml::Value::Table(inner)) = table.get(section) {
            check_keys(&format!("[{section}]"), inner, keys, &mut problems);
        }
    }
    if let Some(toml::Value::Array(mappings)) = table.get("mapping") {
        for (index, mapping) in mappings.iter().enumerate() {
            if let toml::Value::Table(inner) = mapping {
                let label = match inner.get("name").and_then(|v| v.as_str()) {
                    Some(name) => format!("mapping '{name}'"),
                    None => format!("mapping #{}", index + 1),
                };
                check_keys(&label, inner, MAPPING_KEYS, &mut problems);
            }
        }
    }
    problems
}

fn check_keys(label: &str, table: &toml::Table, known: &[&str], problems: &mut Vec<String>) {
    for key in table.keys() {
        if !known.contains(&key.as_str()) {
            problems.push(format!(
                "{label}: unknown key '{key}' (known keys: {})",
                known.join(", ")
            ));
        }
    }
}
