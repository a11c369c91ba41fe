//! The daemon's own state, in schema `resonance_sync` of the same database.
//!
//! One row per CRM row that is claimed, waiting for a retry, or dead-lettered; a delivered row's
//! state is deleted in the same transaction that marks it synced, so the table stays small.
//! Claims are leases: a crashed instance's rows come back by themselves when the lease runs out,
//! and the CRM's own tables are never locked.

use std::time::{Duration, SystemTime};

use deadpool_postgres::GenericClient;
use tokio_postgres::types::ToSql;

use crate::error::DbError;

/// The schema that holds the daemon's state.
pub const SCHEMA: &str = "resonance_sync";

/// The key columns compare bytes (`COLLATE "C"`): keys are identifiers, and on a database whose
/// default collation follows a language (ICU or libc `en_US`), comparing them by its rules took
/// 15 to 20% of PostgreSQL's CPU in a drain.
const SCHEMA_SQL: &str = "
CREATE SCHEMA IF NOT EXISTS resonance_sync;
CREATE TABLE IF NOT EXISTS resonance_sync.deliveries (
    mapping          text COLLATE \"C\" NOT NULL,
    row_key          text COLLATE \"C\" NOT NULL,
    attempts         integer     NOT NULL DEFAULT 0,
    lease_until      timestamptz,
    claimed_by       uuid,
    next_attempt_at  timestamptz,
    last_status      integer,
    last_error       text,
    reason           text,
    dead_at          timestamptz,
    purged_at        timestamptz,
    first_attempt_at timestamptz,
    updated_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (mapping, row_key)
);
CREATE INDEX IF NOT EXISTS deliveries_claimed_by
    ON resonance_sync.deliveries (claimed_by) WHERE lease_until IS NOT NULL;
CREATE INDEX IF NOT EXISTS deliveries_dead
    ON resonance_sync.deliveries (mapping, dead_at) WHERE dead_at IS NOT NULL;
CREATE TABLE IF NOT EXISTS resonance_sync.mapping_state (
    mapping          text        PRIMARY KEY,
    last_success_at  timestamptz NOT NULL,
    delivered_total  bigint      NOT NULL DEFAULT 0
);
";

/// A lock id only this program takes, so that instances starting together create the schema once.
const SCHEMA_LOCK: i64 = 0x7265_736f_6e61_6e63;

/// Creates the schema and tables if they are missing. Safe to run from many instances at once.
pub async fn ensure_schema(client: &mut deadpool_postgres::Client) -> Result<(), DbError> {
    // When everything exists, issue no DDL: a role without CREATE on the database can then run
    // against a schema an administrator created for it.
    let present: bool = client
        .query_one(
            "SELECT to_regclass('resonance_sync.deliveries') IS NOT NULL
                AND to_regclass('resonance_sync.mapping_state') IS NOT NULL",
            &[],
        )
        .await?
        .get(0);
    if present {
        return Ok(());
    }
    let transaction = client.transaction().await?;
    transaction
        .execute("SELECT pg_advisory_xact_lock($1)", &[&SCHEMA_LOCK])
        .await?;
    // "already exists, skipping" notices are noise on every start.
    transaction
        .batch_execute("SET LOCAL client_min_messages = warning")
        .await?;
    transaction.batch_execute(SCHEMA_SQL).await?;
    transaction.commit().await?;
    Ok(())
}

/// A claimed row: its key and the attempts it had before this claim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    pub key: String,
    pub attempts: u32,
}

fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

/// Claims those of `keys` that are free, for `lease`. Returns the ones this instance now holds.
/// Atomic against other instances: a key is returned to at most one claimer at a time.
pub async fn claim(
    client: &impl GenericClient,
    mapping: &str,
    keys: &[String],
    instance: uuid::Uuid,
    lease: Duration,
    backfill_started: Option<SystemTime>,
) -> Result<Vec<Claim>, DbError> {
    // Keys are sorted so that instances claiming overlapping sets lock them in the same order.
    let statement = client
        .prepare_cached(
            "INSERT INTO resonance_sync.deliveries AS d (mapping, row_key, lease_until, claimed_by)
             SELECT $1, k, now() + $3::bigint * interval '1 millisecond', $4
               FROM (SELECT DISTINCT unnest($2::text[]) COLLATE \"C\" AS k) AS keys ORDER BY k
             ON CONFLICT (mapping, row_key) DO UPDATE
                SET lease_until = EXCLUDED.lease_until, claimed_by = EXCLUDED.claimed_by
              WHERE d.dead_at IS NULL
                AND (d.lease_until IS NULL OR d.lease_until <= now())
                AND (d.next_attempt_at IS NULL OR d.next_attempt_at <= now()
                     OR ($5::timestamptz IS NOT NULL AND d.updated_at < $5))
             RETURNING d.row_key, d.attempts",
        )
        .await?;
    let params: [&(dyn ToSql + Sync); 5] = [
        &mapping,
        &keys,
        &millis(lease),
        &instance,
        &backfill_started,
    ];
    let rows = client.query(&statement, &params).await?;
    Ok(rows
        .iter()
        .map(|row| Claim {
            key: row.get(0),
            attempts: u32::try_from(row.get::<_, i32>(1)).unwrap_or(0),
        })
        .collect())
}

/// Renews every lease this instance holds. Called periodically while work is in hand.
///
/// Claims locked by another transaction are skipped, not waited for: they are being marked or
/// released right now (their lease ends anyway), and a renewal that waited for them, locking
/// claims in its own order meanwhile, could deadlock with a mark locking them in another.
pub async fn renew_leases(
    client: &impl GenericClient,
    instance: uuid::Uuid,
    lease: Duration,
) -> Result<u64, DbError> {
    let statement = client
        .prepare_cached(
            "UPDATE resonance_sync.deliveries AS d
                SET lease_until = now() + $2::bigint * interval '1 millisecond'
               FROM (SELECT mapping, row_key FROM resonance_sync.deliveries
                      WHERE claimed_by = $1 AND lease_until IS NOT NULL
                      FOR UPDATE SKIP LOCKED) AS mine
              WHERE d.mapping = mine.mapping AND d.row_key = mine.row_key
                AND d.claimed_by = $1",
        )
        .await?;
    Ok(client
        .execute(&statement, &[&instance, &millis(lease)])
        .await?)
}

/// Rows of `mapping` that other instances hold a live claim on.
pub async fn claimed_by_others(
    client: &impl GenericClient,
    mapping: &str,
    instance: uuid::Uuid,
) -> Result<i64, DbError> {
    let statement = client
        .prepare_cached(
            "SELECT count(*) FROM resonance_sync.deliveries
              WHERE mapping = $1 AND lease_until > now() AND claimed_by <> $2",
        )
        .await?;
    Ok(client
        .query_one(&statement, &[&mapping, &instance])
        .await?
        .get(0))
}

/// Gives back claims without an attempt having been made (shutdown, a paused API): rows never
/// tried are forgotten, rows with earlier attempts keep their history.
pub async fn release(
    client: &impl GenericClient,
    mapping: &str,
    keys: &[String],
    instance: uuid::Uuid,
) -> Result<(), DbError> {
    if keys.is_empty() {
        return Ok(());
    }
    let delete = client
        .prepare_cached(
            "DELETE FROM resonance_sync.deliveries
              WHERE mapping = $1 AND row_key = ANY($2) AND claimed_by = $3
                AND attempts = 0 AND dead_at IS NULL",
        )
        .await?;
    client
        .execute(&delete, &[&mapping, &keys, &instance])
        .await?;
    let update = client
        .prepare_cached(
            "UPDATE resonance_sync.deliveries SET lease_until = NULL
              WHERE mapping = $1 AND row_key = ANY($2) AND claimed_by = $3",
        )
        .await?;
    client
        .execute(&update, &[&mapping, &keys, &instance])
        .await?;
    Ok(())
}

/// Reclaims the space of forgotten claims. Another instance's vacuum in progress is enough, so
/// a locked table is skipped rather than waited for.
pub async fn vacuum(client: &deadpool_postgres::Client) -> Result<(), DbError> {
    client
        .batch_execute("VACUUM (SKIP_LOCKED) resonance_sync.deliveries")
        .await?;
    Ok(())
}

/// Forgets the state of delivered rows; run in the transaction that marks them synced.
pub async fn forget(
    client: &impl GenericClient,
    mapping: &str,
    keys: &[String],
) -> Result<(), DbError> {
    // A join rather than `row_key = ANY($2)`: planned once for a table that looked empty, the
    // latter can filter every claim of the mapping against every key (claims x keys compares).
    let statement = client
        .prepare_cached(
            "DELETE FROM resonance_sync.deliveries AS d USING unnest($2::text[]) AS k(row_key)
              WHERE d.mapping = $1 AND d.row_key = k.row_key",
        )
        .await?;
    client.execute(&statement, &[&mapping, &keys]).await?;
    Ok(())
}

/// Dead-letters rows that the API accepted but `mark_synced` did not mark, so that they are not
/// sent again in a loop; run in the marking transaction.
pub async fn park_unmarked(
    client: &impl GenericClient,
    mapping: &str,
    keys: &[String],
) -> Result<(), DbError> {
    if keys.is_empty() {
        return Ok(());
    }
    let statement = client
        .prepare_cached(
            "UPDATE resonance_sync.deliveries
                SET attempts = attempts + 1, lease_until = NULL, next_attempt_at = NULL,
                    last_status = NULL, reason = 'not_marked', dead_at = now(),
                    purged_at = NULL, updated_at = now(),
                    last_error = 'the API accepted the event (2xx) but mark_synced left the row \
unsynced; fix mark_synced, then dead-letters retry (the re-send carries the same Idempotency-Key)'
              WHERE mapping = $1 AND row_key = ANY($2)",
        )
        .await?;
    client.execute(&statement, &[&mapping, &keys]).await?;
    Ok(())
}

/// What happened to one attempt that did not deliver.
#[derive(Debug, Clone)]
pub struct Failure {
    pub key: String,
    /// Attempts made on this row, this one included (0 for a row never sent).
    pub attempts: u32,
    pub status: Option<u16>,
    pub error: String,
}

/// Records a failed attempt and when to try again.
pub async fn schedule_retry(
    client: &impl GenericClient,
    mapping: &str,
    instance: uuid::Uuid,
    failure: &Failure,
    wait: Duration,
) -> Result<(), DbError> {
    let statement = client
        .prepare_cached(
            "UPDATE resonance_sync.deliveries
                SET attempts = $4, lease_until = NULL,
                    next_attempt_at = now() + $5::bigint * interval '1 millisecond',
                    last_status = $6, last_error = $7,
                    first_attempt_at = coalesce(first_attempt_at, now()), updated_at = now()
              WHERE mapping = $1 AND row_key = $2 AND claimed_by = $3",
        )
        .await?;
    let params: [&(dyn ToSql + Sync); 7] = [
        &mapping,
        &failure.key,
        &instance,
        &(failure.attempts as i32),
        &millis(wait),
        &failure.status.map(i32::from),
        &failure.error,
    ];
    client.execute(&statement, &params).await?;
    Ok(())
}

/// Makes a row a dead letter: it stays unsynced and is not sent again until retried by hand.
pub async fn dead_letter(
    client: &impl GenericClient,
    mapping: &str,
    instance: uuid::Uuid,
    failure: &Failure,
    reason: &str,
) -> Result<(), DbError> {
    let statement = client
        .prepare_cached(
            "UPDATE resonance_sync.deliveries
                SET attempts = $4, lease_until = NULL, next_attempt_at = NULL,
                    last_status = $5, last_error = $6, reason = $7,
                    dead_at = now(), purged_at = NULL, updated_at = now(),
                    first_attempt_at = CASE WHEN $4 > 0
                        THEN coalesce(first_attempt_at, now()) END
              WHERE mapping = $1 AND row_key = $2 AND claimed_by = $3",
        )
        .await?;
    let params: [&(dyn ToSql + Sync); 7] = [
        &mapping,
        &failure.key,
        &instance,
        &(failure.attempts as i32),
        &failure.status.map(i32::from),
        &failure.error,
        &reason,
    ];
    client.execute(&statement, &params).await?;
    Ok(())
}

/// Notes that `count` rows of `mapping` were delivered and marked; run in the transaction that
/// marks them, so that `status` can tell when the mapping last succeeded.
pub async fn note_delivered(
    client: &impl GenericClient,
    mapping: &str,
    count: u64,
) -> Result<(), DbError> {
    let statement = client
        .prepare_cached(
            "INSERT INTO resonance_sync.mapping_state AS s (mapping, last_success_at, delivered_total)
             VALUES ($1, now(), $2)
             ON CONFLICT (mapping) DO UPDATE
                SET last_success_at = now(), delivered_total = s.delivered_total + $2",
        )
        .await?;
    let count = i64::try_from(count).unwrap_or(i64::MAX);
    client.execute(&statement, &[&mapping, &count]).await?;
    Ok(())
}

/// Dead letters of `mapping` that are not purged.
pub async fn dead_letter_count(client: &impl GenericClient, mapping: &str) -> Result<i64, DbError> {
    let statement = client
        .prepare_cached(
            "SELECT count(*) FROM resonance_sync.deliveries
              WHERE mapping = $1 AND dead_at IS NOT NULL AND purged_at IS NULL",
        )
        .await?;
    Ok(client.query_one(&statement, &[&mapping]).await?.get(0))
}
