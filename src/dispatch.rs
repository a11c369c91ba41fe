//! Sending one claimed batch: each fetched row becomes an event and is sent as soon as a permit
//! (one of `concurrency` requests in flight) is free; its outcome goes to the recorder. Rows
//! that cannot be sent (no email, a repeated key, ...) go to the recorder unsent, and claims
//! whose turn never came are released. Nothing here writes to the database.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::sync::{mpsc, OwnedSemaphorePermit};

use crate::lane::Lane;
use crate::mapping::{OutgoingEvent, Unsendable};
use crate::recorder::{judge, log_transition, Record};
use crate::store::Claim;
use crate::sync::Shared;

/// Starts a send for each fetched row, as permits allow; rows not sent are released.
pub async fn dispatch(
    shared: &Arc<Shared>,
    lane: &Arc<Lane>,
    records: &mpsc::Sender<Record>,
    claims: Vec<Claim>,
    rows: Vec<tokio_postgres::Row>,
) {
    let mut by_key: HashMap<String, Claim> =
        claims.into_iter().map(|c| (c.key.clone(), c)).collect();
    let rows_per_key = rows_per_key(&rows);
    for row in &rows {
        let event = lane.source.shape.event(&lane.context, row);
        let key = match &event {
            Ok(event) => event.key.clone(),
            Err(unsendable) => unsendable.key.clone(),
        };
        // A key the query returns for several rows is none of them: `mark_synced` would mark
        // them all after one 2xx. The key is dead-lettered once, and no row of it is sent.
        let count = rows_per_key.get(key.as_str()).copied().unwrap_or(1);
        let Some(claim) = by_key.remove(&key) else {
            continue;
        };
        if count > 1 {
            let _ = records.send(duplicate_key(claim, count)).await;
            continue;
        }
        let event = match event {
            Ok(event) => event,
            Err(unsendable) => {
                let _ = records.send(Record::Unsendable(unsendable)).await;
                continue;
            }
        };
        let permit = tokio::select! {
            permit = shared.permits.clone().acquire_owned() => permit,
            _ = shared.stop.cancelled() => {
                by_key.insert(claim.key.clone(), claim);
                break;
            }
        };
        let Ok(permit) = permit else { break };
        // When the API turns out to be down (or refuses the key) half-way through a batch, the
        // rest is released and waits for the gate's probe instead of failing at full rate. When
        // the database is down, the rest waits too: a 2xx that cannot be marked means a resend.
        if shared.gate.is_paused() || shared.database_down.load(Ordering::Acquire) {
            by_key.insert(claim.key.clone(), claim);
            break;
        }
        let request = Request {
            claim,
            event,
            permit,
        };
        let mapping = lane.name().to_string();
        tokio::spawn(send(shared.clone(), records.clone(), mapping, request));
    }
    // Rows whose turn never came (shutdown), and claims the fetch no longer returned (synced or
    // deleted meanwhile).
    let leftover: Vec<String> = by_key.into_keys().collect();
    if !leftover.is_empty() {
        let _ = records.send(Record::Release(leftover)).await;
    }
}

/// How many of the fetched rows carry each key.
fn rows_per_key(rows: &[tokio_postgres::Row]) -> HashMap<&str, usize> {
    let mut counts: HashMap<&str, usize> = HashMap::with_capacity(rows.len());
    for row in rows {
        if let Ok(key) = row.try_get::<_, &str>(0) {
            *counts.entry(key).or_default() += 1;
        }
    }
    counts
}

/// A key the query returned for `count` rows: one dead letter, and none of the rows is sent.
fn duplicate_key(claim: Claim, count: usize) -> Record {
    Record::Unsendable(Unsendable {
        key: claim.key,
        reason: "duplicate_key".to_string(),
        detail: format!(
            "the query returned {count} rows with this key; none is sent, since mark_synced \
             would mark them all after one 2xx (make the key unique, e.g. fix the join)"
        ),
    })
}

/// A row on its way: its claim, its event, and the permit it holds while in flight.
struct Request {
    claim: Claim,
    event: OutgoingEvent,
    permit: OwnedSemaphorePermit,
}

/// One request, holding its permit until the answer is in; the outcome goes to the recorder.
async fn send(
    shared: Arc<Shared>,
    records: mpsc::Sender<Record>,
    mapping: String,
    request: Request,
) {
    let Request {
        claim,
        event,
        permit,
    } = request;
    tracing::trace!(mapping, key = %event.key, "sending");
    let attempt = shared.sink.send(&event).await;
    // The gate hears of the answer before the next send can start.
    log_transition(&mapping, judge(&shared.gate, &attempt.outcome));
    drop(permit);
    let _ = records
        .send(Record::Attempted {
            claim,
            masked_email: event.masked_email,
            attempt,
        })
        .await;
}
