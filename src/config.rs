//! The configuration file: strict TOML parsed once into typed values.
//!
//! Parsing collects every problem (unknown keys, bad durations, missing values) and reports them
//! together, each naming its section or mapping. Secrets come from the environment or a file,
//! never from the TOML itself, and are held as [`Secret`]s.

use std::collections::HashSet;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::retry::RetryPolicy;
use crate::secret::Secret;
use duration::{duration, CLAIM_LEASE, INTERVAL, TIMEOUT};
use raw::{bracket_slips, locate, unknown_keys, RawConfig, RawDatabase, RawMapping, RawResonance};
pub use raw::{DATABASE_KEYS, MAPPING_KEYS, RESONANCE_KEYS};

/// The default production endpoint of the Resonance API.
pub const DEFAULT_ENDPOINT: &str = "https://api.rsnc.network/resonance-api/manual-event";
/// Where the config is read from when neither `--config` nor `RESONANCE_SYNC_CONFIG` says.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/resonance-sync/config.toml";
/// The credential name looked up in `$CREDENTIALS_DIRECTORY` (systemd `LoadCredential=`).
pub const CREDENTIAL_NAME: &str = "resonance-api-key";

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub database: DatabaseConfig,
    pub resonance: ResonanceConfig,
    pub mappings: Vec<MappingConfig>,
    pub metrics: Option<MetricsConfig>,
}

/// Where the rows live and how the daemon holds them.
#[derive(Debug, Clone)]
pub struct DatabaseConfig {
    /// The libpq-style URL; it may hold a password, hence a secret.
    pub url: Secret,
    pub pool_size: usize,
    pub connect_timeout: Duration,
    /// How long a claim on a row lasts without being renewed: a crashed instance's rows come
    /// back after at most this long.
    pub claim_lease: Duration,
    /// The zone that `timestamp without time zone` values are wall-clock times in.
    pub timestamp_zone: chrono_tz::Tz,
}

/// Where events go and how hard to try.
#[derive(Debug, Clone)]
pub struct ResonanceConfig {
    pub endpoint: reqwest::Url,
    pub brand_id: String,
    /// `None` when no key was supplied; `run` and `backfill` refuse to start without one.
    pub api_key: Option<Secret>,
    pub concurrency: usize,
    pub timeout: Duration,
    pub connect_timeout: Duration,
    /// The durable schedule `run` follows; a row that exhausts it becomes a dead letter.
    pub run_retry: RetryPolicy,
    /// The in-run schedule `backfill` follows before it reports a row as left.
    pub backfill_retry: RetryPolicy,
    /// The longest wait a `Retry-After` header can impose.
    pub retry_after_max: Duration,
}

/// One SQL mapping: which rows to read and how they become events.
#[derive(Debug, Clone)]
pub struct MappingConfig {
    pub name: String,
    pub event_type: String,
    pub interval: Duration,
    pub batch_size: usize,
    pub key: String,
    pub email: String,
    pub email_fallback: Option<String>,
    pub query: String,
    pub mark_synced: String,
    /// JSON field name → column name, in file order; `None` means every column but the email.
    pub metadata: Option<Vec<(String, String)>>,
    pub notify_channel: Option<String>,
    /// A column of integer minor units (cents) sent as major units of the `currency` column.
    pub amount_minor_units: Option<String>,
    /// The column holding the ISO 4217 code of `amount_minor_units`.
    pub currency: Option<String>,
    /// From `[database] timestamp_zone`.
    pub timestamp_zone: chrono_tz::Tz,
}

/// The optional Prometheus and health endpoint.
#[derive(Debug, Clone)]
pub struct MetricsConfig {
    pub listen: std::net::SocketAddr,
}

/// Values from the environment that take precedence over the file.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub database_url: Option<String>,
    pub brand_id: Option<String>,
    pub endpoint: Option<String>,
    pub api_key: Option<String>,
    pub credentials_directory: Option<PathBuf>,
}

impl Overrides {
    /// Reads `DATABASE_URL`, `RESONANCE_BRAND_ID`, `RESONANCE_ENDPOINT`, `RESONANCE_API_KEY`
    /// and `CREDENTIALS_DIRECTORY`; empty values count as unset.
    pub fn from_env() -> Self {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
        Overrides {
            database_url: var("DATABASE_URL"),
            brand_id: var("RESONANCE_BRAND_ID"),
            endpoint: var("RESONANCE_ENDPOINT"),
            api_key: var("RESONANCE_API_KEY"),
            credentials_directory: var("CREDENTIALS_DIRECTORY").map(PathBuf::from),
        }
    }
}

/// Every problem found in a config file, one per line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub path: PathBuf,
    pub problems: Vec<String>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid configuration in {}:", self.path.display())?;
        for problem in &self.problems {
            write!(f, "\n  - {problem}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

/// Reads and validates the config file at `path`.
pub fn load(path: &Path, overrides: &Overrides) -> Result<Config, ConfigError> {
    let fail = |problem: String| ConfigError {
        path: path.to_path_buf(),
        problems: vec![problem],
    };
    let text =
        std::fs::read_to_string(path).map_err(|e| fail(format!("cannot read the file: {e}")))?;
    for warning in crate::secret::exposed_secret_warnings(path, &text) {
        tracing::warn!("{warning}");
    }
    parse(&text, overrides).map_err(|problems| ConfigError {
        path: path.to_path_buf(),
        problems,
    })
}

/// Parses and validates config text; on failure, every problem found.
pub fn parse(text: &str, overrides: &Overrides) -> Result<Config, Vec<String>> {
    let table: toml::Table =
        toml::from_str(text).map_err(|e| vec![format!("not valid TOML: {}", locate(text, &e))])?;
    let mut problems = bracket_slips(&table);
    problems.extend(unknown_keys(&table));
    if !problems.is_empty() {
        return Err(problems);
    }
    // Parsed from the text again (not from the table) so that type errors keep their line.
    let raw: RawConfig = toml::from_str(text).map_err(|e| vec![locate(text, &e)])?;
    let config = validate(raw, overrides, &mut problems);
    match config {
        Some(config) if problems.is_empty() => Ok(config),
        _ => Err(problems),
    }
}

fn validate(raw: RawConfig, overrides: &Overrides, problems: &mut Vec<String>) -> Option<Config> {
    let database = validate_database(raw.database, overrides, problems);
    let resonance = resonance::validate_resonance(raw.resonance, overrides, problems);
    if raw.mapping.is_empty() {
        problems.push("no [[mapping]] defined: add at least one".to_string());
    }
    let mut names = HashSet::new();
    let mut mappings = Vec::new();
    for (index, mapping) in raw.mapping.into_iter().enumerate() {
        if let Some(mut mapping) = validate_mapping(index, mapping, problems) {
            if let Some(database) = &database {
                mapping.timestamp_zone = database.timestamp_zone;
            }
            if !names.insert(mapping.name.clone()) {
                problems.push(format!(
                    "mapping '{}': the name is used twice; names must be unique",
                    mapping.name
                ));
            }
            mappings.push(mapping);
        }
    }
    let metrics = raw.metrics.and_then(|m| match m.listen.parse() {
        Ok(listen) => Some(MetricsConfig { listen }),
        Err(_) => {
            problems.push(format!(
                "[metrics] listen: '{}' is not an address like 127.0.0.1:9464",
                m.listen
            ));
            None
        }
    });
    Some(Config {
        database: database?,
        resonance: resonance?,
        mappings,
        metrics,
    })
}

fn validate_database(
    raw: RawDatabase,
    overrides: &Overrides,
    problems: &mut Vec<String>,
) -> Option<DatabaseConfig> {
    let from = match overrides.database_url {
        Some(_) => "DATABASE_URL",
        None => "[database] url",
    };
    let url = overrides.database_url.clone().or(raw.url);
    let pool_size = raw.pool_size.unwrap_or(8);
    if !(1..=256).contains(&pool_size) {
        problems.push(format!(
            "[database] pool_size: {pool_size} is out of range (1 to 256)"
        ));
    }
    let connect_timeout = duration(
        "[database] connect_timeout",
        raw.connect_timeout.clone(),
        "5s",
        TIMEOUT,
        problems,
    );
    let claim_lease = duration(
        "[database] claim_lease",
        raw.claim_lease,
        "30s",
        CLAIM_LEASE,
        problems,
    );
    let timestamp_zone = timestamp_zone(raw.timestamp_zone.as_deref(), problems);
    let Some(url) = url.filter(|u| !u.trim().is_empty()) else {
        problems
            .push("[database] url: not set (set it in the file or in DATABASE_URL)".to_string());
        return None;
    };
    if let Err(problem) = crate::db::parse_url(&url) {
        // The URL is not quoted: it may hold a password.
        problems.push(format!(
            "{from} is not a valid connection string: {problem}"
        ));
    }
    Some(DatabaseConfig {
        url: Secret::new(url),
        pool_size,
        connect_timeout: connect_timeout?,
        claim_lease: claim_lease?,
        timestamp_zone: timestamp_zone?,
    })
}

fn validate_mapping(
    index: usize,
    raw: RawMapping,
    problems: &mut Vec<String>,
) -> Option<MappingConfig> {
    let label = match &raw.name {
        Some(name) => format!("mapping '{name}'"),
        None => format!("mapping #{}", index + 1),
    };
    let before = problems.len();
    let mut required = |field: &str, value: Option<String>| -> String {
        match value.filter(|v| !v.trim().is_empty()) {
            Some(v) => v,
            None => {
                problems.push(format!("{label}: '{field}' is required"));
                String::new()
            }
        }
    };
    let name = required("name", raw.name);
    let event_type = required("event_type", raw.event_type);
    let key = required("key", raw.key);
    let email = required("email", raw.email);
    let query = required("query", raw.query);
    let mark_synced = required("mark_synced", raw.mark_synced);
    if !name.is_empty()
        && !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        problems.push(format!(
            "{label}: the name may hold only letters, digits, '_' and '-'"
        ));
    }
    if !mark_synced.is_empty() && !mark_synced.contains("$1") {
        problems.push(format!(
            "{label}: mark_synced must use $1, the array of delivered keys (e.g. WHERE id = ANY($1))"
        ));
    }
    let interval = duration(
        &format!("{label}: interval"),
        raw.interval,
        "30s",
        INTERVAL,
        problems,
    );
    let batch_size = raw.batch_size.unwrap_or(500);
    if !(1..=10_000).contains(&batch_size) {
        problems.push(format!(
            "{label}: batch_size {batch_size} is out of range (1 to 10000)"
        ));
    }
    let metadata = raw.metadata.map(|table| {
        table
            .into_iter()
            .filter_map(|(field, column)| match column {
                toml::Value::String(column) if !column.trim().is_empty() => Some((field, column)),
                _ => {
                    problems.push(format!(
                        "{label}: metadata.{field} must name a column of the query, as a string"
                    ));
                    None
                }
            })
            .collect::<Vec<_>>()
    });
    let (amount_minor_units, currency) =
        amount_columns(&label, raw.amount_minor_units, raw.currency, problems);
    let notify_channel = notify_channel(&label, raw.notify_channel, problems);
    if problems.len() > before {
        return None;
    }
    Some(MappingConfig {
        name,
        event_type,
        interval: interval?,
        batch_size,
        key,
        email,
        email_fallback: raw.email_fallback.filter(|c| !c.trim().is_empty()),
        query,
        mark_synced,
        metadata,
        notify_channel,
        amount_minor_units,
        currency,
        timestamp_zone: chrono_tz::Tz::UTC,
    })
}

/// `amount_minor_units` and `currency` go together: minor units mean nothing without the
/// currency that says where the decimal point goes.
fn amount_columns(
    label: &str,
    amount: Option<String>,
    currency: Option<String>,
    problems: &mut Vec<String>,
) -> (Option<String>, Option<String>) {
    let amount = amount.filter(|c| !c.trim().is_empty());
    let currency = currency.filter(|c| !c.trim().is_empty());
    match (&amount, &currency) {
        (Some(_), None) => problems.push(format!(
            "{label}: amount_minor_units needs currency = \"<column>\", the column holding \
             each row's ISO 4217 code"
        )),
        (None, Some(_)) => problems.push(format!(
            "{label}: currency is only used with amount_minor_units; remove it, or name the \
             column of minor units in amount_minor_units"
        )),
        _ => {}
    }
    (amount, currency)
}

/// The longest channel name PostgreSQL keeps (NAMEDATALEN - 1 bytes).
const MAX_CHANNEL_BYTES: usize = 63;

/// `notify_channel`, refused when empty or too long: LISTEN would silently truncate a long one
/// while the CRM's `pg_notify()` with the full name fails ("channel name too long"), so nothing
/// would arrive; an empty one can never be notified.
fn notify_channel(
    label: &str,
    channel: Option<String>,
    problems: &mut Vec<String>,
) -> Option<String> {
    let channel = channel?;
    if channel.trim().is_empty() {
        problems.push(format!(
            "{label}: notify_channel is empty; PostgreSQL has no such channel (pg_notify('') \
             fails): name the channel, or leave the key out to rely on polling"
        ));
        return None;
    }
    if channel.len() > MAX_CHANNEL_BYTES {
        problems.push(format!(
            "{label}: notify_channel is {} bytes long; PostgreSQL channel names are at most \
             {MAX_CHANNEL_BYTES} bytes (LISTEN would cut it short, and pg_notify() with the full \
             name fails): choose a shorter name",
            channel.len()
        ));
    }
    Some(channel)
}

/// Parses `[database] timestamp_zone`, an IANA zone name; UTC when not set.
fn timestamp_zone(name: Option<&str>, problems: &mut Vec<String>) -> Option<chrono_tz::Tz> {
    let Some(name) = name else {
        return Some(chrono_tz::Tz::UTC);
    };
    match name.trim().parse() {
        Ok(zone) => Some(zone),
        Err(_) => {
            problems.push(format!(
                "[database] timestamp_zone: '{name}' is not an IANA time zone name like \
                 \"UTC\" or \"Europe/Berlin\""
            ));
            None
        }
    }
}

mod duration;
mod raw;
mod resonance;

#[cfg(test)]
#[path = "config_tests.rs"]
mod tests;
