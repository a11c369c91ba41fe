//! `check`: validates the config, connects, prepares every mapping's SQL, and says what a run
//! would meet: the backlog, rows it could never send (no key, a repeated key), a poll that
//! would read a large table whole, what `mark_synced` does to one row, and one sample event.
//! It sends nothing, and what it tries on the database is rolled back.

use crate::app::{connect_and_prepare, AppError};
use crate::config::Config;
use crate::error::DbError;
use crate::mapping::EventContext;

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
    for source in &sources {
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
        let backlog = source.backlog(&client).await.map_err(in_mapping)?;
        crate::say!("\nmapping '{name}': {backlog} unsynced row(s) to deliver");
        let without_key = source.rows_without_key(&client).await.map_err(in_mapping)?;
        if without_key > 0 {
            crate::say!(
                "  warning: {without_key} row(s) have no key ({} is NULL): they are never sent, \
                 marked or dead-lettered; give them a key or leave them out of the query",
                source.config.key
            );
        }
        let (repeated, examples) = source.repeated_keys(&client).await.map_err(in_mapping)?;
        if repeated > 0 {
            let quoted: Vec<String> = examples.iter().map(|k| format!("'{k}'")).collect();
            crate::say!(
                "  warning: {repeated} key(s) are returned for more than one row (e.g. {}): \
                 such rows are never sent, each key becomes a dead letter duplicate_key; \
                 {} must be unique among the query's rows",
                quoted.join(", "),
                source.config.key
            );
        }
        match crate::explain::full_scans(&mut client, source).await {
            Ok(scans) => scans
                .iter()
                .for_each(|scan| crate::say!("{}", scan.warning())),
            Err(error) => {
                crate::say!("  note: could not read the query's plan to check indexes: {error}")
            }
        }
        let keys = source
            .candidates(&client, 1, None, &[])
            .await
            .map_err(in_mapping)?;
        let rows = source.fetch(&client, &keys).await.map_err(in_mapping)?;
        let Some(row) = rows.first() else {
            crate::say!("  no unsynced row to show a sample from");
            continue;
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
    }
    Ok(())
}
