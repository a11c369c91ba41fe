//! The connection pool: verified recycling (a connection that died with a server restart is
//! replaced, not reused), bounded waits, and a start-up wait for a database that is not up yet.

use std::str::FromStr;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio_util::sync::CancellationToken;

use crate::config::DatabaseConfig;
use crate::error::DbError;
use crate::secret::redact_database_url;

/// The `application_name` the daemon's sessions carry, unless the URL sets one.
pub const APPLICATION_NAME: &str = "resonance-sync";

/// Builds the pool; no connection is made yet.
pub fn pool(config: &DatabaseConfig) -> Result<Pool, DbError> {
    let url = config.url.expose();
    let mut pg = tokio_postgres::Config::from_str(url).map_err(|e| {
        DbError::Other(format!(
            "[database] url '{}' is not valid: {}",
            redact_database_url(url),
            config.url.scrub(&e.to_string())
        ))
    })?;
    if pg.get_application_name().is_none() {
        pg.application_name(APPLICATION_NAME);
    }
    pg.connect_timeout(config.connect_timeout);
    let manager = Manager::from_config(
        pg,
        tokio_postgres::NoTls,
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
    loop {
        match pool.get().await {
            Ok(client) => return Some(client),
            Err(error) => {
                let error = DbError::from(error);
                tracing::warn!(%error, retry_in_s = wait.as_secs_f64(), "database unavailable; waiting for it");
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return None,
            _ = tokio::time::sleep(wait) => {}
        }
        wait = (wait * 2).min(Duration::from_secs(30));
    }
}
