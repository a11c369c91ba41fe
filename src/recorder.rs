//! What happens after an attempt: mark, retry later, dead-letter or release.
//!
//! This is the one place where a row is marked synced, and it is only ever asked to for a row
//! whose attempt came back 2xx. Marks are batched (one transaction marks the CRM rows and
//! forgets their state) but flushed within milliseconds, never at the end of a long run.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::gate::{Gate, Transition, Trouble};
use crate::mapping::Unsendable;
use crate::output::printable;
use crate::retry::next_wait;
use crate::sink::{truncate, Attempt, Outcome};
use crate::store::{self, Claim, Failure};
use crate::sync::{Lane, Mode, Shared};

/// Most keys marked in one statement.
const MARK_BATCH: usize = 500;
/// Longest a delivered row waits for its mark while other rows are still being sent.
const MARK_DELAY: Duration = Duration::from_millis(25);

/// One thing the recorder must write down.
#[derive(Debug)]
pub enum Record {
    /// An attempt was made.
    Attempted {
        claim: Claim,
        masked_email: String,
        attempt: Attempt,
    },
    /// The row cannot be sent.
    Unsendable(Unsendable),
    /// Claimed rows that were not attempted (shutdown, a paused API, synced meanwhile).
    Release(Vec<String>),
}

impl Record {
    /// The keys of the claimed rows this record settles.
    fn keys(&self) -> Vec<String> {
        match self {
            Record::Attempted { claim, .. } => vec![claim.key.clone()],
            Record::Unsendable(row) => vec![row.key.clone()],
            Record::Release(keys) => keys.clone(),
        }
    }

    /// How many claimed rows this record settles.
    fn rows(&self) -> usize {
        match self {
            Record::Release(keys) => keys.len(),
            _ => 1,
        }
    }
}

/// Writes the outcomes of one mapping until every sender is gone.
pub async fn record(shared: Arc<Shared>, lane: Arc<Lane>, mut records: mpsc::Receiver<Record>) {
    let mut delivered: Vec<String> = Vec::new();
    let mut deadline: Option<Instant> = None;
    loop {
        let flush_due = async {
            match deadline {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            received = records.recv() => match received {
                Some(Record::Attempted { claim, attempt, .. })
                    if matches!(attempt.outcome, Outcome::Delivered { .. }) =>
                {
                    note_answer(&lane, &attempt, &claim.key);
                    delivered.push(claim.key);
                    deadline.get_or_insert_with(|| Instant::now() + MARK_DELAY);
                    // Nothing else claimed is still on its way (the last rows of a backfill, a
                    // single new order): waiting for more to share the statement gains nothing.
                    if delivered.len() >= MARK_BATCH || delivered.len() >= lane.inflight() {
                        flush(&shared, &lane, &mut delivered).await;
                        deadline = None;
                    }
                }
                Some(other) => {
                    let rows = other.rows();
                    settle(&shared, &lane, other).await;
                    lane.finish(rows);
                }
                None => break,
            },
            _ = flush_due => {
                flush(&shared, &lane, &mut delivered).await;
                deadline = None;
            }
        }
    }
    flush(&shared, &lane, &mut delivered).await;
}

fn note_answer(lane: &Lane, attempt: &Attempt, key: &str) {
    tracing::debug!(
        mapping = %lane.name(), key, status = status_of(&attempt.outcome),
        duration_ms = attempt.elapsed.as_millis() as u64, "delivered"
    );
    crate::telemetry::observe_request(lane.name(), attempt.elapsed);
}

/// Marks delivered rows synced and forgets their state, in one transaction.
async fn flush(shared: &Shared, lane: &Lane, delivered: &mut Vec<String>) {
    if delivered.is_empty() {
        return;
    }
    let keys = std::mem::take(delivered);
    let count = keys.len();
    match mark(shared, lane, &keys).await {
        Ok(unmarked) => {
            lane.mark_succeeded();
            let marked = (count - unmarked.len()) as u64;
            lane.stats.add_delivered(marked);
            crate::telemetry::count_event(lane.name(), "delivered", marked);
            if !unmarked.is_empty() {
                for _ in &unmarked {
                    lane.stats.add_dead_lettered();
                }
                crate::telemetry::count_event(lane.name(), "dead_lettered", unmarked.len() as u64);
                tracing::error!(
                    mapping = %lane.name(), rows = unmarked.len(), keys = ?unmarked,
                    "mark_synced did not mark rows that the API accepted; they are dead-lettered \
                     (reason not_marked) instead of being sent again and again: fix mark_synced, \
                     then `dead-letters retry`"
                );
                lane.stats
                    .set_error("mark_synced did not mark delivered rows".to_string());
            }
        }
        Err(error) => {
            // Only a statement the server refused pauses the mapping; a database outage is
            // waited out by the poll loop, and pausing on it would delay the recovery.
            let pause = if error.is_unavailable() {
                shared.note_database_down();
                Duration::ZERO
            } else {
                lane.mark_failed()
            };
            tracing::error!(
                mapping = %lane.name(), rows = count, %error, pause_s = pause.as_secs(),
                "marking delivered rows synced failed; they stay unsynced and will be sent \
                 again with the same Idempotency-Key"
            );
            lane.stats.set_error(format!("mark_synced failed: {error}"));
            if let Err(error) = release(shared, lane, &keys).await {
                tracing::warn!(mapping = %lane.name(), %error, "releasing claims failed; they are released once the database is reached again");
                lane.strand(keys);
            }
        }
    }
    lane.finish(count);
}

/// Marks `keys` synced and forgets their state, in one transaction. Returns the keys that
/// `mark_synced` left unsynced (the query still returns them): those are parked as dead letters,
/// since sending them again would only repeat the same outcome.
async fn mark(
    shared: &Shared,
    lane: &Lane,
    keys: &[String],
) -> Result<Vec<String>, crate::error::DbError> {
    let mut client = shared.pool.get().await?;
    let transaction = client.transaction().await?;
    let updated = lane.source.mark_synced(&transaction, keys).await?;
    let mut unmarked = Vec::new();
    if updated < keys.len() as u64 {
        // Rows deleted meanwhile are not returned; rows mark_synced missed are.
        for row in lane.source.fetch(&transaction, keys).await? {
            if let Ok(key) = row.try_get::<_, String>(0) {
                unmarked.push(key);
            }
        }
    }
    let marked: Vec<String> = keys
        .iter()
        .filter(|k| !unmarked.contains(k))
        .cloned()
        .collect();
    store::forget(&transaction, lane.name(), &marked).await?;
    store::park_unmarked(&transaction, lane.name(), &unmarked).await?;
    store::note_delivered(&transaction, lane.name(), marked.len() as u64).await?;
    transaction.commit().await?;
    Ok(unmarked)
}

async fn release(
    shared: &Shared,
    lane: &Lane,
    keys: &[String],
) -> Result<(), crate::error::DbError> {
    let client = shared.pool.get().await?;
    store::release(&client, lane.name(), keys, shared.instance).await
}

/// Writes down everything but a delivery.
async fn settle(shared: &Shared, lane: &Lane, record: Record) {
    let keys = record.keys();
    let result = match record {
        Record::Release(keys) => release(shared, lane, &keys).await,
        Record::Unsendable(row) => {
            tracing::warn!(mapping = %lane.name(), key = %printable(&row.key), reason = %row.reason, detail = %printable(&row.detail), "row cannot be sent; dead-lettered");
            let failure = Failure {
                key: row.key,
                attempts: 0,
                status: None,
                error: row.detail,
            };
            dead_letter(shared, lane, &failure, &row.reason).await
        }
        Record::Attempted {
            claim,
            masked_email,
            attempt,
        } => {
            crate::telemetry::observe_request(lane.name(), attempt.elapsed);
            attempted(shared, lane, claim, &masked_email, attempt).await
        }
    };
    if let Err(error) = result {
        if error.is_unavailable() {
            tracing::warn!(mapping = %lane.name(), %error, rows = keys.len(), "recording an outcome failed; the claim is given back once the database is reached again, and the row is tried again");
        } else {
            tracing::error!(mapping = %lane.name(), %error, rows = keys.len(), "the database refused to record an outcome; the claim is given back by the next poll, and the row is tried again");
        }
        lane.strand(keys);
    }
}

async fn attempted(
    shared: &Shared,
    lane: &Lane,
    claim: Claim,
    email: &str,
    attempt: Attempt,
) -> Result<(), crate::error::DbError> {
    let attempts = claim.attempts + 1;
    let duration_ms = attempt.elapsed.as_millis() as u64;
    match attempt.outcome {
        // Deliveries are batched by `record` and never reach `settle`.
        Outcome::Delivered { .. } => Ok(()),
        Outcome::Rejected { status, body } => {
            tracing::warn!(mapping = %lane.name(), key = %printable(&claim.key), email, attempt = attempts, status, duration_ms, body = %truncate(&body, 300), "the API rejected the event; dead-lettered");
            let failure = Failure {
                key: claim.key,
                attempts,
                status: Some(status),
                error: body,
            };
            dead_letter(shared, lane, &failure, "rejected_by_api").await
        }
        Outcome::Refused { status, body } => {
            let message = refused_message(status, &body);
            if shared.mode == Mode::Backfill {
                shared.fail(message.clone());
            }
            lane.stats.set_error(message);
            release(shared, lane, &[claim.key]).await
        }
        Outcome::Retry {
            status,
            retry_after,
            error,
        } => {
            lane.stats.set_error(error.clone());
            let failure = Failure {
                key: claim.key,
                attempts,
                status,
                error,
            };
            retry_or_give_up(shared, lane, failure, retry_after, email, duration_ms).await
        }
    }
}

async fn retry_or_give_up(
    shared: &Shared,
    lane: &Lane,
    failure: Failure,
    retry_after: Option<Duration>,
    email: &str,
    duration_ms: u64,
) -> Result<(), crate::error::DbError> {
    let settings = &shared.settings;
    // Only `run` dead-letters a row for its durable attempts; a backfill leaves it for later.
    if shared.mode == Mode::Run && !settings.run_retry.allows_another(failure.attempts) {
        tracing::warn!(mapping = %lane.name(), key = %printable(&failure.key), email, attempt = failure.attempts, status = failure.status, error = %failure.error, "attempts exhausted; dead-lettered");
        return dead_letter(shared, lane, &failure, "attempts_exhausted").await;
    }
    let unit = rand::random::<f64>();
    let wait_for = |policy: &crate::retry::RetryPolicy, attempts: u32| {
        next_wait(
            policy,
            attempts,
            retry_after,
            settings.retry_after_max,
            unit,
        )
    };
    let (wait, in_run) = match shared.mode {
        Mode::Run => (wait_for(&settings.run_retry, failure.attempts), true),
        Mode::Backfill => {
            let tries = lane.count_run_attempt(&failure.key);
            if settings.backfill_retry.allows_another(tries) {
                (wait_for(&settings.backfill_retry, tries), true)
            } else {
                // This backfill is done with the row; the durable schedule takes over.
                lane.give_up(&failure.key);
                (wait_for(&settings.run_retry, failure.attempts), false)
            }
        }
    };
    tracing::info!(mapping = %lane.name(), key = %printable(&failure.key), email, attempt = failure.attempts, status = failure.status, duration_ms, retry_in_ms = wait.as_millis() as u64, error = %failure.error, "attempt failed; will retry");
    lane.stats.add_retried();
    crate::telemetry::count_event(lane.name(), "retried", 1);
    let client = shared.pool.get().await?;
    store::schedule_retry(&client, lane.name(), shared.instance, &failure, wait).await?;
    if in_run {
        lane.expect_retry(Instant::now() + wait);
    }
    Ok(())
}

async fn dead_letter(
    shared: &Shared,
    lane: &Lane,
    failure: &Failure,
    reason: &str,
) -> Result<(), crate::error::DbError> {
    lane.stats.add_dead_lettered();
    crate::telemetry::count_event(lane.name(), "dead_lettered", 1);
    let client = shared.pool.get().await?;
    store::dead_letter(&client, lane.name(), shared.instance, failure, reason).await
}

fn refused_message(status: u16, body: &str) -> String {
    let what = match status {
        401 => "the API refused the API key (HTTP 401): check RESONANCE_API_KEY",
        403 => "the API refused access (HTTP 403): check the API key and brand_id",
        300..=399 => {
            "the endpoint answered with a redirect: set [resonance] endpoint to the final URL"
        }
        _ => "the API refused the request",
    };
    if body.trim().is_empty() {
        what.to_string()
    } else {
        format!("{what} (response: {})", truncate(body.trim(), 200))
    }
}

fn status_of(outcome: &Outcome) -> Option<u16> {
    match outcome {
        Outcome::Delivered { status }
        | Outcome::Rejected { status, .. }
        | Outcome::Refused { status, .. } => Some(*status),
        Outcome::Retry { status, .. } => *status,
    }
}

/// Tells the gate what an attempt showed about the API, as soon as the answer is in (the
/// recorder may lag behind while it writes), so that a batch stops when the API is down.
pub fn judge(gate: &Gate, outcome: &Outcome) -> Option<Transition> {
    match outcome {
        Outcome::Delivered { .. } | Outcome::Rejected { .. } => gate.answered(),
        Outcome::Refused { status, .. } => gate.refused(*status),
        Outcome::Retry { .. } => gate.failed(),
    }
}

/// Logs a change of the gate: one line per pause, not one per row.
pub fn log_transition(mapping: &str, transition: Option<Transition>) {
    match transition {
        Some(Transition::Opened { trouble: Trouble::Outage, pause, pauses }) => tracing::warn!(
            mapping, pause_s = pause.as_secs_f64(), pauses,
            "the API keeps failing; pausing sends, then probing with one event"
        ),
        Some(Transition::Opened { trouble: Trouble::Refused { status }, pause, .. }) => tracing::error!(
            mapping, status, pause_s = pause.as_secs_f64(),
            "the API refuses this daemon's requests; nothing is marked or dead-lettered; `run` tries again slowly, `backfill` stops"
        ),
        Some(Transition::Closed { after_pauses }) => tracing::info!(mapping, after_pauses, "the API is answering again; resuming"),
        None => {}
    }
}
