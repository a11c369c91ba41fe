//! The per-mapping loop: claim a batch, fetch its rows, send them with bounded concurrency,
//! and hand every outcome to the recorder. `run` polls for ever; `backfill` drains and returns.
//!
//! Cancellation is checked before claiming and while waiting, never between a 2xx and its
//! mark: a request in flight always finishes and is recorded.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use deadpool_postgres::Pool;
use tokio::sync::{mpsc, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::db::Outage;
use crate::error::DbError;
use crate::gate::{Admission, Gate};
use crate::recorder::{record, Record};
use crate::retry::RetryPolicy;
use crate::sink::Sink;
use crate::store;

pub use crate::lane::Lane;

/// Batches a mapping may hold claimed before claiming another. Rows count until their outcome is
/// written down, and delivered rows wait up to the recorder's mark delay for that: with one
/// batch, the senders would idle while each batch's marks commit. With two, a fast API empties
/// the batch being sent (500 rows in about 25 ms) before the last one's mark has committed and
/// the next one is claimed and fetched, and the senders stall whenever the database is a little
/// slow; four keep the senders fed through a slow commit. Memory stays bounded: a few thousand
/// rows at most.
const CLAIM_AHEAD: usize = 4;

/// Polls in a row whose statement the server refuses before a backfill gives a mapping up (a
/// deadlock or a serialization failure passes on retry; a broken query does not).
const BACKFILL_STATEMENT_TRIES: u32 = 3;

/// Claimed rows between two vacuums of the daemon's table.
const VACUUM_EVERY: usize = 10_000;

/// How often an idle mapping recounts its backlog (rows retried or purged by hand change it).
const IDLE_RECOUNT: Duration = Duration::from_secs(300);

/// Poll for ever, or drain once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Run,
    Backfill,
}

/// The knobs of a sync, taken from the config.
#[derive(Debug, Clone)]
pub struct Settings {
    pub brand_id: String,
    pub concurrency: usize,
    pub claim_lease: Duration,
    pub run_retry: RetryPolicy,
    pub backfill_retry: RetryPolicy,
    pub retry_after_max: Duration,
}

/// What every mapping's loop shares.
#[derive(Debug)]
pub struct Shared {
    pub pool: Pool,
    /// The pool's connection settings, for connections kept outside it (LISTEN).
    pub database: crate::db::DirectConfig,
    pub sink: Sink,
    pub settings: Settings,
    pub mode: Mode,
    pub gate: Gate,
    /// Identifies this process's claims.
    pub instance: uuid::Uuid,
    /// Requests in flight across all mappings.
    pub permits: Arc<Semaphore>,
    /// Cancelled on shutdown, or when a backfill must stop.
    pub stop: CancellationToken,
    /// Why a backfill stopped early.
    pub fatal: Mutex<Option<String>>,
    /// When this backfill began: rows whose wait was set before then are due now.
    pub started: SystemTime,
    /// A mark failed because the database could not be reached, and no poll has reached it
    /// since. Claimed rows are not sent meanwhile: their 2xx could not be written down, so each
    /// would be sent again later.
    pub database_down: AtomicBool,
    /// Mappings a backfill stopped reading because the server refuses their statements.
    pub broken: Mutex<Vec<String>>,
}

impl Shared {
    /// Stops a backfill for a reason that no row can fix.
    pub fn fail(&self, message: String) {
        if let Ok(mut fatal) = self.fatal.lock() {
            fatal.get_or_insert(message);
        }
        self.stop.cancel();
    }

    /// The reason a backfill stopped early, if it did.
    pub fn fatal(&self) -> Option<String> {
        self.fatal.lock().ok().and_then(|f| f.clone())
    }

    /// Mappings this backfill gave up on, each with the server's error.
    pub fn broken(&self) -> Vec<String> {
        self.broken.lock().map(|b| b.clone()).unwrap_or_default()
    }

    /// Holds back sending after a mark found the database unreachable.
    pub fn note_database_down(&self) {
        self.database_down.store(true, Ordering::Release);
    }

    fn backfill_started(&self) -> Option<SystemTime> {
        (self.mode == Mode::Backfill).then_some(self.started)
    }
}

/// Runs every lane until `shared.stop` is cancelled (run) or the work is drained (backfill).
pub async fn sync_all(shared: Arc<Shared>, lanes: Vec<Arc<Lane>>) {
    let renewer = tokio::spawn(renew_leases(shared.clone(), lanes.clone()));
    let listeners = match shared.mode {
        Mode::Run => crate::listen::spawn_listeners(&shared.database, &lanes, &shared.stop),
        Mode::Backfill => Vec::new(),
    };
    let mut workers = Vec::new();
    for lane in lanes {
        workers.push(tokio::spawn(sync_lane(shared.clone(), lane)));
    }
    for worker in workers {
        if let Err(error) = worker.await {
            tracing::error!(%error, "a mapping loop ended abnormally");
        }
    }
    renewer.abort();
    for listener in listeners {
        listener.abort();
    }
}

/// Keeps this process's claims alive while it works on them; idle, it sends nothing.
async fn renew_leases(shared: Arc<Shared>, lanes: Vec<Arc<Lane>>) {
    let every = shared.settings.claim_lease / 3;
    loop {
        tokio::time::sleep(every).await;
        if lanes.iter().all(|lane| lane.inflight() == 0) {
            continue;
        }
        let result = match shared.pool.get().await {
            Ok(client) => {
                store::renew_leases(&client, shared.instance, shared.settings.claim_lease)
                    .await
                    .map(|_| ())
            }
            Err(error) => Err(error.into()),
        };
        if let Err(error) = result {
            tracing::warn!(%error, "renewing claims failed; will try again");
        }
    }
}

/// One mapping: its loop and its recorder.
async fn sync_lane(shared: Arc<Shared>, lane: Arc<Lane>) {
    // Every record settles a claimed row, so a channel this large never makes a sender wait.
    let capacity = lane.source.config.batch_size * CLAIM_AHEAD + shared.settings.concurrency;
    let (records, receiver) = mpsc::channel(capacity);
    let recorder = tokio::spawn(record(shared.clone(), lane.clone(), receiver));
    poll(&shared, &lane, &records).await;
    // Requests in flight finish and are recorded; nothing new is claimed.
    drop(records);
    if let Err(error) = recorder.await {
        tracing::error!(mapping = %lane.name(), %error, "the recorder ended abnormally");
    }
}

/// What one poll found.
struct Polled {
    /// Candidate keys seen: as many as asked means there is probably more.
    candidates: usize,
    claimed: usize,
}

async fn poll(shared: &Arc<Shared>, lane: &Arc<Lane>, records: &mpsc::Sender<Record>) {
    let config = &lane.source.config;
    let mut outage = Outage::default();
    loop {
        if shared.stop.is_cancelled() {
            return;
        }
        lane.heartbeat.beat();
        let limit = match lane.heartbeat.idle(shared.gate.admit(&shared.stop)).await {
            Admission::Stopped => return,
            Admission::Probe if outage_outlasts_backfill(shared) => {
                tracing::warn!(mapping = %config.name, pauses = shared.gate.pauses(), "the API kept failing through every probe; the backfill stops and leaves the rest for a later run");
                return;
            }
            Admission::Probe => 1,
            Admission::Full => config.batch_size,
        };
        // Claimed rows stay bounded: a new batch is claimed only while fewer than
        // CLAIM_AHEAD batches are claimed and not yet written down.
        while lane.inflight() >= CLAIM_AHEAD * config.batch_size {
            tokio::select! {
                _ = shared.stop.cancelled() => return,
                _ = lane.wake.notified() => {}
            }
        }
        let polled = match poll_once(shared, lane, records, limit).await {
            Ok(polled) => {
                if let Some((failures, down)) = outage.end() {
                    tracing::info!(mapping = %config.name, failures, down_s = down.as_secs(), "the database answers the poll again");
                }
                polled
            }
            Err(error) => {
                let Some(wait) = poll_failed(shared, lane, &mut outage, &error) else {
                    return;
                };
                if !lane.heartbeat.idle(sleep_or_stop(&shared.stop, wait)).await {
                    return;
                }
                continue;
            }
        };
        let pause = lane.mark_pause();
        if !pause.is_zero()
            && !lane
                .heartbeat
                .idle(sleep_or_stop(&shared.stop, pause))
                .await
        {
            return;
        }
        if limit == 1 {
            // A probe: its outcome decides whether the gate closes; wait until it is written
            // down (a wake-up left over from earlier rows must not start a second probe).
            if polled.claimed > 0 {
                while lane.inflight() > 0 {
                    tokio::select! {
                        _ = shared.stop.cancelled() => return,
                        _ = lane.wake.notified() => {}
                    }
                }
                continue;
            }
        } else if polled.candidates >= limit {
            continue;
        }
        if shared.mode == Mode::Backfill && backfill_done(lane, &polled) && lane.inflight() == 0 {
            // Rows another instance (a `run` service) is sending are not left over: wait until
            // it marks them, or until their lease runs out and they can be claimed here.
            if !claimed_elsewhere(shared, lane).await {
                return;
            }
            let wait = config.interval.min(Duration::from_millis(500));
            if !lane.heartbeat.idle(sleep_or_stop(&shared.stop, wait)).await {
                return;
            }
            continue;
        }
        lane.heartbeat.idle(wait_for_more(shared, lane)).await;
    }
}

/// Says that a poll failed (a long outage at growing intervals); returns the wait before the
/// next poll, or None when this mapping is given up: a backfill whose statement the database
/// keeps refusing.
fn poll_failed(
    shared: &Shared,
    lane: &Lane,
    outage: &mut Outage,
    error: &DbError,
) -> Option<Duration> {
    let config = &lane.source.config;
    let tell = outage.fail();
    let failures = outage.failures();
    let wait = db_wait(failures, config.interval);
    let retry_in_s = wait.as_secs_f64();
    if error.is_unavailable() {
        if tell {
            let down_s = outage.length().as_secs();
            tracing::warn!(mapping = %config.name, %error, failures, down_s, retry_in_s, "database unavailable; will retry");
        }
        lane.stats.set_error(format!("database: {error}"));
        return Some(wait);
    }
    // The server answered and refused a statement: the mapping's query fails when run (on some
    // row's value), or a permission is missing. Waiting does not fix that, so a backfill gives
    // this mapping up after a few tries; `run` goes on trying, with backoff, and says so.
    if tell {
        tracing::error!(mapping = %config.name, %error, failures, retry_in_s, "the database refuses this mapping's statement (its query fails when run, or a permission is missing): fix it; `resonance-sync check` runs the query over every row and shows the error");
    }
    lane.stats
        .set_error(format!("the database refuses a statement: {error}"));
    if shared.mode == Mode::Backfill && failures >= BACKFILL_STATEMENT_TRIES {
        if let Ok(mut broken) = shared.broken.lock() {
            broken.push(format!("mapping '{}': {error}", config.name));
        }
        return None;
    }
    Some(wait)
}

/// A backfill gives up on a down API after as many failed pauses as a row gets attempts, rather
/// than spending each row's attempts one probe at a time.
fn outage_outlasts_backfill(shared: &Shared) -> bool {
    shared.mode == Mode::Backfill
        && shared.gate.pauses() >= shared.settings.backfill_retry.max_attempts
}

/// Whether other instances hold live claims on this mapping's rows (false when unsure).
async fn claimed_elsewhere(shared: &Shared, lane: &Lane) -> bool {
    match shared.pool.get().await {
        Ok(client) => store::claimed_by_others(&client, lane.name(), shared.instance)
            .await
            .is_ok_and(|rows| rows > 0),
        Err(_) => false,
    }
}

fn backfill_done(lane: &Lane, polled: &Polled) -> bool {
    polled.claimed == 0 && lane.next_retry(Duration::from_secs(2)).is_none()
}

/// Sleeps until the interval passes, a retry falls due, an outcome is recorded (backfill) or
/// a notification arrives; returns early on stop.
async fn wait_for_more(shared: &Shared, lane: &Lane) {
    let interval = lane.source.config.interval;
    let mut until = Instant::now() + interval;
    if let Some(retry) = lane.next_retry(Duration::ZERO) {
        until = until.min(retry);
    }
    let woken = async {
        if shared.mode == Mode::Backfill || lane.source.config.notify_channel.is_some() {
            lane.wake.notified().await
        } else {
            std::future::pending().await
        }
    };
    tokio::select! {
        _ = shared.stop.cancelled() => {}
        _ = tokio::time::sleep_until(until) => {}
        _ = woken => {}
    }
}

/// Claims, fetches and dispatches one batch.
async fn poll_once(
    shared: &Arc<Shared>,
    lane: &Arc<Lane>,
    records: &mpsc::Sender<Record>,
    limit: usize,
) -> Result<Polled, crate::error::DbError> {
    let name = lane.name();
    let mut client = shared.pool.get().await?;
    let stranded = lane.take_stranded();
    if !stranded.is_empty() {
        // Given back before looking for candidates, so that these rows are among them.
        if let Err(error) = store::release(&client, name, &stranded, shared.instance).await {
            lane.strand(stranded);
            return Err(error);
        }
        tracing::info!(mapping = %name, rows = stranded.len(), "gave back claims whose outcome could not be written down; their rows are tried again");
    }
    let given_up = lane.given_up();
    // Candidates are found with sequential scans discouraged. With statistics that lag behind
    // (autovacuum busy, or off), the planner takes nearly every row for unsynced and reads the
    // table from its start, past every row already synced, rather than the partial index, so
    // each poll of a drain costs more than the last. Without such an index it still scans.
    let transaction = client.transaction().await?;
    transaction
        .batch_execute("SET LOCAL enable_seqscan = off")
        .await?;
    let keys = lane
        .source
        .candidates(&transaction, limit, shared.backfill_started(), &given_up)
        .await?;
    shared.database_down.store(false, Ordering::Release);
    let claims = if keys.is_empty() {
        Vec::new()
    } else {
        store::claim(
            &transaction,
            name,
            &keys,
            shared.instance,
            shared.settings.claim_lease,
            shared.backfill_started(),
        )
        .await?
    };
    transaction.commit().await?;
    if backlog_count_due(lane, keys.len()) {
        refresh_backlog(&client, lane).await;
    }
    if keys.is_empty() {
        return Ok(Polled {
            candidates: 0,
            claimed: 0,
        });
    }
    lane.inflight.fetch_add(claims.len(), Ordering::AcqRel);
    let claimed: Vec<String> = claims.iter().map(|c| c.key.clone()).collect();
    let rows = match lane.source.fetch(&client, &claimed).await {
        Ok(rows) => rows,
        Err(error) => {
            // Give the claims back before reporting: they would otherwise wait for their lease.
            let _ = records.send(Record::Release(claimed)).await;
            return Err(error);
        }
    };
    drop(client);
    let polled = Polled {
        candidates: keys.len(),
        claimed: claims.len(),
    };
    if lane.note_claimed(claims.len(), VACUUM_EVERY) {
        tokio::spawn(vacuum(shared.clone()));
    }
    // Dispatched by a task of its own, so that the loop claims and fetches the next batch while
    // this one waits for permits: the senders never wait for the database between batches.
    let (shared, lane, records) = (shared.clone(), lane.clone(), records.clone());
    tokio::spawn(
        async move { crate::dispatch::dispatch(&shared, &lane, &records, claims, rows).await },
    );
    Ok(polled)
}

/// Counting reads the whole backlog, so it is done once per interval while rows flow, soon
/// after they stop (at most once a second while the last claims settle), and then rarely: an
/// idle poll is the one candidate query.
fn backlog_count_due(lane: &Lane, found: usize) -> bool {
    let interval = lane.source.config.interval;
    let every = if found > 0 {
        interval
    } else if lane.stats.backlog.load(Ordering::Relaxed) != 0 {
        interval.min(Duration::from_secs(1))
    } else {
        IDLE_RECOUNT
    };
    lane.stats.backlog_due(every)
}

/// Every delivered row's claim is inserted and deleted again, so a large drain leaves dead rows
/// in `resonance_sync.deliveries` far faster than autovacuum visits it (once a minute at best),
/// and every candidate query and mark would read them. Reclaiming them keeps a poll's cost flat.
async fn vacuum(shared: Arc<Shared>) {
    let result = match shared.pool.get().await {
        Ok(client) => store::vacuum(&client).await,
        Err(error) => Err(error.into()),
    };
    if let Err(error) = result {
        tracing::debug!(%error, "vacuuming resonance_sync.deliveries failed");
    }
}

async fn refresh_backlog(client: &deadpool_postgres::Client, lane: &Lane) {
    match lane.source.backlog(client).await {
        Ok(rows) => {
            lane.stats.set_backlog(rows);
            crate::telemetry::set_backlog(lane.name(), rows);
        }
        Err(error) => {
            tracing::debug!(mapping = %lane.name(), %error, "counting the backlog failed")
        }
    }
    match store::dead_letter_count(client, lane.name()).await {
        Ok(rows) => crate::telemetry::set_dead_letters(lane.name(), rows),
        Err(error) => {
            tracing::debug!(mapping = %lane.name(), %error, "counting dead letters failed")
        }
    }
}

fn db_wait(failures: u32, interval: Duration) -> Duration {
    let cap = interval.clamp(Duration::from_secs(1), Duration::from_secs(30));
    Duration::from_millis(250u64.saturating_mul(2u64.saturating_pow(failures.min(10)))).min(cap)
}

/// Sleeps for `wait`; false when stopped first.
pub async fn sleep_or_stop(stop: &CancellationToken, wait: Duration) -> bool {
    tokio::select! {
        _ = stop.cancelled() => false,
        _ = tokio::time::sleep(wait) => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_waits_grow_but_stay_within_the_interval() {
        let interval = Duration::from_secs(5);
        let waits: Vec<u64> = (1..=6)
            .map(|n| db_wait(n, interval).as_millis() as u64)
            .collect();
        assert_eq!(waits, vec![500, 1000, 2000, 4000, 5000, 5000]);
        assert_eq!(
            db_wait(50, Duration::from_secs(3600)),
            Duration::from_secs(30)
        );
    }
}
