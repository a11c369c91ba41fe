//! The connection pool: verified recycling (a connection that died with a server restart is
//! replaced, not reused), bounded waits, and a start-up wait for a database that is not up yet.

use std::str::FromStr;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio::time::Instant;
use tokio_postgres::tls::MakeTlsConnect;
use tokio_postgres::{Client, Connection, Socket};
use tokio_postgres_rustls::MakeRustlsConnect;
use tokio_util::sync::CancellationToken;

use crate::config::DatabaseConfig;
use crate::error::DbError;
use crate::secret::{redact_database_url, Secret};
use crate::tls;

/// The `application_name` the daemon's sessions carry, unless the URL sets one.
pub const APPLICATION_NAME: &str = "resonance-sync";

/// The connection settings of the pool, also used by connections kept outside it (LISTEN).
/// libpq's `sslmode` and `sslrootcert` are taken out of the URL first (see [`tls`]): the
/// driver does not know `verify-ca`, `verify-full` or `sslrootcert`.
pub fn pg_config(config: &DatabaseConfig) -> Result<tokio_postgres::Config, DbError> {
    let url = config.url.expose();
    let (mut pg, tls) = parse_url(url).map_err(|problem| {
        DbError::Other(format!(
            "[database] url '{}' is not valid: {problem}",
            redact_database_url(url)
        ))
    })?;
    pg.ssl_mode(tls.mode.driver_mode());
    if pg.get_application_name().is_none() {
        pg.application_name(APPLICATION_NAME);
    }
    pg.connect_timeout(config.connect_timeout);
    Ok(pg)
}

/// Parses a database URL (`postgres://...` or libpq `key=value`) as every connection will use
/// it: the driver's settings and the TLS options, or what is wrong with it. The problem never
/// quotes the URL (it may hold a password); config validation calls this, so that a bad URL is
/// a configuration error (exit 2) for every command, not a failure to connect.
pub fn parse_url(url: &str) -> Result<(tokio_postgres::Config, tls::TlsOptions), String> {
    let scrub = |problem: String| Secret::new(url).scrub(&problem);
    let (driver_url, tls) = tls::split_url(url).map_err(scrub)?;
    let pg = tokio_postgres::Config::from_str(&driver_url)
        .map_err(|e| scrub(describe_parse_error(&e)))?;
    check_hosts_and_ports(&pg)?;
    Ok((pg, tls))
}

/// The driver says only "invalid connection string"; its cause says which option.
fn describe_parse_error(error: &tokio_postgres::Error) -> String {
    let text = crate::error::with_causes(error);
    let text = text
        .strip_prefix("invalid connection string: ")
        .unwrap_or(&text)
        .to_string();
    let hint = if text.contains("option `port`") {
        " (a port is a number from 1 to 65535)"
    } else if text.contains("option `connect_timeout`") {
        " (a whole number of seconds; or leave it out: [database] connect_timeout applies)"
    } else {
        ""
    };
    text + hint
}

/// What the driver would refuse only when it connects, checked now: it needs a host, and one
/// port for all hosts or one per host.
fn check_hosts_and_ports(pg: &tokio_postgres::Config) -> Result<(), String> {
    let (hosts, hostaddrs) = (pg.get_hosts().len(), pg.get_hostaddrs().len());
    if hosts == 0 && hostaddrs == 0 {
        return Err(
            "it names no host: write postgres://HOST/DB or host=HOST (e.g. 127.0.0.1)".to_string(),
        );
    }
    if hosts > 0 && hostaddrs > 0 && hosts != hostaddrs {
        return Err(format!(
            "it names {hosts} host(s) but {hostaddrs} hostaddr(s): give one hostaddr per host"
        ));
    }
    let (ports, hosts) = (pg.get_ports().len(), hosts.max(hostaddrs));
    if ports > 1 && ports != hosts {
        return Err(format!(
            "it gives {ports} ports for {hosts} host(s): give one, or one per host; in a \
             postgres:// URL write it after the host (HOST:PORT), not in ?port=, which the \
             driver adds to the host's port (5432 when none is written)"
        ));
    }
    Ok(())
}

/// The TLS connector for the URL's `sslmode` and `sslrootcert`, for every connection made.
pub fn tls_connector(config: &DatabaseConfig) -> Result<MakeRustlsConnect, DbError> {
    let url = config.url.expose();
    let (_, options) = tls::split_url(url).map_err(DbError::Other)?;
    tls::connector(&options).map_err(|e| DbError::Other(format!("[database] url: {e}")))
}

/// Settings for a connection outside the pool (LISTEN): the pool's driver settings, which it
/// derefs to, and the same TLS. Open one with [`DirectConfig::connect_direct`].
#[derive(Clone)]
pub struct DirectConfig {
    config: tokio_postgres::Config,
    tls: MakeRustlsConnect,
}

/// The stream of a connection opened by [`DirectConfig::connect_direct`].
pub type DirectStream = <MakeRustlsConnect as MakeTlsConnect<Socket>>::Stream;

impl DirectConfig {
    /// Connects with the URL's `sslmode` and `sslrootcert`, as the pool does.
    pub async fn connect_direct(
        &self,
    ) -> Result<(Client, Connection<Socket, DirectStream>), tokio_postgres::Error> {
        self.config.connect(self.tls.clone()).await
    }
}

impl std::ops::Deref for DirectConfig {
    type Target = tokio_postgres::Config;
    fn deref(&self) -> &Self::Target {
        &self.config
    }
}

impl std::ops::DerefMut for DirectConfig {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.config
    }
}

impl std::fmt::Debug for DirectConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // tokio-postgres's own Debug redacts the password.
        self.config.fmt(f)
    }
}

/// The [`DirectConfig`] of the database.
pub fn direct_config(config: &DatabaseConfig) -> Result<DirectConfig, DbError> {
    Ok(DirectConfig {
        config: pg_config(config)?,
        tls: tls_connector(config)?,
    })
}

/// Builds the pool; no connection is made yet.
pub fn pool(config: &DatabaseConfig) -> Result<Pool, DbError> {
    let pg = pg_config(config)?;
    let manager = Manager::from_config(
        pg,
        tls_connector(config)?,
        ManagerConfig {
            recycling_method: RecyclingMethod::Verified,
        },
    );
    Pool::builder(manager)
        .max_size(config.pool_size)
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(config.connect_timeout))
        .create_timeout(Some(config.connect_timeout))
        .recycle_timeout(Some(config.connect_timeout))
        .build()
        .map_err(|e| DbError::Other(format!("cannot build the connection pool: {e}")))
}

/// Gets a connection, waiting with backoff (and saying so) while the database is down.
/// Returns `None` when stopped first.
pub async fn wait_for_database(
    pool: &Pool,
    stop: &CancellationToken,
) -> Option<deadpool_postgres::Client> {
    let mut wait = Duration::from_millis(500);
    let mut outage = Outage::default();
    loop {
        match pool.get().await {
            Ok(client) => {
                if let Some((failures, down)) = outage.end() {
                    tracing::info!(
                        failures,
                        down_s = down.as_secs(),
                        "the database answers again"
                    );
                }
                return Some(client);
            }
            Err(error) => {
                if outage.fail() {
                    let error = DbError::from(error);
                    tracing::warn!(%error, failures = outage.failures(), retry_in_s = wait.as_secs_f64(), "database unavailable; waiting for it");
                }
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return None,
            _ = tokio::time::sleep(wait) => {}
        }
        wait = (wait * 2).min(Duration::from_secs(30));
    }
}

/// Failed attempts in a row to reach the database, and when to say so: the 1st, 2nd, 4th, 8th
/// and so on, and at least every ten minutes, so that a long outage does not flood the log.
#[derive(Debug, Default)]
pub struct Outage {
    failures: u32,
    since: Option<Instant>,
    told: Option<Instant>,
}

impl Outage {
    /// Counts a failed attempt; true when it is worth a log line.
    pub fn fail(&mut self) -> bool {
        let now = Instant::now();
        self.failures += 1;
        let since = *self.since.get_or_insert(now);
        let told = self.told.unwrap_or(since);
        let tell = worth_telling(self.failures, now - told);
        if tell {
            self.told = Some(now);
        }
        tell
    }

    /// Failed attempts in a row so far.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// How long the database has been failing (zero when it is not).
    pub fn length(&self) -> Duration {
        self.since.map_or(Duration::ZERO, |since| since.elapsed())
    }

    /// An attempt worked: the failures and the length of the outage it ends, if there was one.
    pub fn end(&mut self) -> Option<(u32, Duration)> {
        let ended = (self.failures > 0).then(|| (self.failures, self.length()));
        *self = Outage::default();
        ended
    }
}

fn worth_telling(failures: u32, since_told: Duration) -> bool {
    failures.is_power_of_two() || since_told >= Duration::from_secs(600)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_long_outage_is_told_at_growing_intervals() {
        let soon = Duration::from_secs(1);
        let told: Vec<u32> = (1..=100).filter(|&n| worth_telling(n, soon)).collect();
        assert_eq!(told, vec![1, 2, 4, 8, 16, 32, 64]);
        assert!(worth_telling(1000, Duration::from_secs(600)));
        assert!(!worth_telling(1000, Duration::from_secs(599)));
    }

    #[test]
    fn an_outage_counts_its_failures_and_tells_its_end() {
        let mut outage = Outage::default();
        assert_eq!(outage.end(), None, "no outage, nothing to tell");
        let told: Vec<bool> = (0..5).map(|_| outage.fail()).collect();
        assert_eq!(told, [true, true, false, true, false]);
        assert_eq!(outage.failures(), 5);
        assert_eq!(outage.end().map(|(failures, _)| failures), Some(5));
        assert_eq!(outage.failures(), 0);
        assert!(outage.fail(), "a new outage is told from its first failure");
    }
}
