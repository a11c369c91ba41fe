//! `check`: validates the config, connects, prepares every mapping's SQL, and says what a run
//! would meet: the backlog, rows it could never send (no key, a repeated key), a poll that
//! would read a large table whole, what `mark_synced` does to one row, and one sample event.
//! It sends nothing, and what it tries on the database is rolled back.

use crate::app::{connect_and_prepare, AppError};
use crate::config::Config;
use crate::error::DbError;
use crate::mapping::EventContext;
use crate::source::Source;

/// `check`: validates, connects, prepares, and prints one sample event per mapping.
pub async fn check(config: &Config) -> Result<(), AppError> {
    let (pool, sources) = connect_and_prepare(config, None).await?;
    crate::say!(
        "config: ok ({} mapping{})",
        sources.len(),
        if sources.len() == 1 { "" } else { "s" }
    );
    crate::say!("endpoint: {}", config.resonance.endpoint);
    crate::say!("brand_id: {}", config.resonance.brand_id);
    match &config.resonance.api_key {
        Some(_) => crate::say!("api key: set"),
        None => {
            crate::say!(
                "api key: NOT SET (run and backfill need RESONANCE_API_KEY or api_key_file)"
            )
        }
    }
    let mut client = pool.get().await.map_err(DbError::from)?;
    // check reads every row of each query; if it is stopped (Ctrl-C) meanwhile, the server
    // notices the closed connection within a second and cancels the statement rather than
    // reading on (PostgreSQL 14 and later; older servers do not know the setting).
    let _ = client
        .batch_execute("SET client_connection_check_interval = '1s'")
        .await;
    for source in &sources {
        check_mapping(config, &mut client, source).await?;
    }
    Ok(())
}

/// One mapping's report; an error ends `check` with the mapping named.
async fn check_mapping(
    config: &Config,
    client: &mut deadpool_postgres::Client,
    source: &Source,
) -> Result<(), AppError> {
    let name = &source.config.name;
    // A query can prepare and still fail when it runs (a division by zero, a bad cast of
    // one row's value): say which mapping's. An outage stays a database error (exit 3).
    let in_mapping = |error: DbError| {
        if error.is_unavailable() {
            AppError::Database(error)
        } else {
            AppError::Config(format!(
                "mapping '{name}': query: it fails when run: {error}"
            ))
        }
    };
    let backlog = source.backlog(&*client).await.map_err(in_mapping)?;
    crate::say!("\nmapping '{name}': {backlog} unsynced row(s) to deliver");
    crate::say!(
        "  reading every row of the query once (rows without a key, repeated keys, errors)"
    );
    let census = source.key_census(&*client).await.map_err(in_mapping)?;
    if census.without_key > 0 {
        crate::say!(
            "  warning: {} row(s) have no key ({} is NULL): they are never sent, \
             marked or dead-lettered; give them a key or leave them out of the query",
            census.without_key,
            source.config.key
        );
    }
    if census.repeated > 0 {
        let quoted: Vec<String> = census.examples.iter().map(|k| format!("'{k}'")).collect();
        crate::say!(
            "  warning: {} key(s) are returned for more than one row (e.g. {}): \
             such rows are never sent, each key becomes a dead letter duplicate_key; \
             {} must be unique among the query's rows",
            census.repeated,
            quoted.join(", "),
            source.config.key
        );
    }
    match crate::explain::full_scans(client, source).await {
        Ok(scans) => scans
            .iter()
            .for_each(|scan| crate::say!("{}", scan.warning())),
        Err(error) => {
            crate::say!("  note: could not read the query's plan to check indexes: {error}")
        }
    }
    let keys = source
        .candidates(&*client, 1, None, &[])
        .await
        .map_err(in_mapping)?;
    let rows = source.fetch(&*client, &keys).await.map_err(in_mapping)?;
    let Some(row) = rows.first() else {
        crate::say!("  no unsynced row to show a sample from");
        return Ok(());
    };
    let context = EventContext {
        brand_id: config.resonance.brand_id.clone(),
        event_type: source.config.event_type.clone(),
        mapping: name.clone(),
    };
    match source.shape.event(&context, row) {
        Ok(event) => {
            crate::say!(
                "  sample (not sent): Idempotency-Key {}",
                event.idempotency_key
            );
            crate::say!("  {}", String::from_utf8_lossy(&event.body));
        }
        Err(row) => crate::say!(
            "  sample row {} cannot be sent ({}: {}); it would be dead-lettered",
            row.key,
            row.reason,
            row.detail
        ),
    }
    try_mark(client, source, &keys[0]).await?;
    Ok(())
}

/// Tries `mark_synced` on the sample row, rolled back: it must take that row, and only that
/// row, out of the query. One that takes more would hide rows that were never sent.
async fn try_mark(
    client: &mut deadpool_postgres::Client,
    source: &Source,
    key: &str,
) -> Result<(), AppError> {
    let name = &source.config.name;
    let column = crate::source::quote_ident(&source.config.key);
    match source.trial_mark(client, key).await {
        Ok(trial) if trial.others_changed => {
            let what = if trial.others_taken > 0 {
                format!(
                    "also took {} other row(s) out of the query",
                    trial.others_taken
                )
            } else {
                "changed which other rows the query returns (rows already synced came back)"
                    .to_string()
            };
            return Err(AppError::Config(format!(
                "mapping '{name}': mark_synced: given the one key '{key}', it {what} (tried, \
                 and rolled back): it marks rows it was not given, so rows would never be sent \
                 or would be sent again and again; make it change the key's rows only \
                 (... WHERE {column} = ANY($1))"
            )));
        }
        Ok(trial) if trial.left > 0 => crate::say!(
            "  warning: mark_synced leaves the sample row ({key}) in the query (tried, rolled \
             back): a delivered row would stay unsynced and become a dead letter not_marked; \
             make it set what the query filters on"
        ),
        Ok(trial) => {
            crate::say!(
                "  mark_synced takes the sample row ({key}) out of the query, and no other (tried, \
                 rolled back)"
            );
            if trial.updated > 1 {
                crate::say!(
                    "  note: it changed {} rows for that one key: right when the query sums \
                     several rows per key (order lines), wrong if it rewrites other rows",
                    trial.updated
                );
            }
        }
        Err(error) if error.is_unavailable() => return Err(AppError::Database(error)),
        // Another instance marking the same row at this moment: nothing wrong with the mark.
        Err(error) if error.is_serialization_failure() => crate::say!(
            "  note: could not try mark_synced on the sample row, which another instance is \
             marking now: {error}"
        ),
        Err(error) => {
            return Err(AppError::Config(format!(
                "mapping '{name}': mark_synced fails on the sample row {key} (tried, and rolled \
                 back): {error}; every delivered row would stay unsynced and be sent again"
            )))
        }
    }
    Ok(())
}
