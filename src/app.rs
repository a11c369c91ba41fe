//! The commands `run`, `backfill` and `check`: set-up, the sync itself, and what is printed.

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::error::DbError;
use crate::gate::{Gate, GateSettings};
use crate::retry::Schedule;
use crate::sink::Sink;
use crate::source::{MappingProblems, Source};
use crate::stats::MappingStats;
use crate::sync::{sync_all, Lane, Mode, Settings, Shared};
use crate::{db, store};

/// Why a command failed; each kind has its exit code.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// The config or a mapping's SQL is wrong (exit 2).
    #[error("{0}")]
    Config(String),
    /// The database cannot be reached or refused a statement (exit 3).
    #[error("database: {0}")]
    Database(#[from] DbError),
    /// The API refused the key, the brand or the endpoint (exit 4).
    #[error("{0}")]
    Refused(String),
    /// A backfill ended with rows not delivered (exit 1).
    #[error("{0}")]
    RowsLeft(String),
    /// `dead-letters retry|purge --key K` found no such dead letter (exit 1).
    #[error("{0}")]
    NoSuchDeadLetter(String),
}

impl AppError {
    /// The process exit code for this error (documented in the README).
    pub fn exit_code(&self) -> i32 {
        match self {
            AppError::RowsLeft(_) | AppError::NoSuchDeadLetter(_) => 1,
            AppError::Config(_) => 2,
            AppError::Database(_) => 3,
            AppError::Refused(_) => 4,
        }
    }
}

/// Refuses a mapping name the config does not define.
pub fn known_mapping(config: &Config, name: &str) -> Result<(), AppError> {
    if config.mappings.iter().any(|m| m.name == name) {
        return Ok(());
    }
    let names: Vec<&str> = config.mappings.iter().map(|m| m.name.as_str()).collect();
    Err(AppError::Config(format!(
        "no mapping named '{name}' (the config has: {})",
        names.join(", ")
    )))
}

/// The mappings a command works on: all, or the one named.
pub fn select_mappings(config: &mut Config, only: Option<&str>) -> Result<(), AppError> {
    if let Some(name) = only {
        known_mapping(config, name)?;
        config.mappings.retain(|m| m.name == name);
    }
    Ok(())
}

/// Connects (waiting for the database when `wait` is set), creates the daemon's schema and
/// prepares every mapping, reporting all mapping problems at once.
pub async fn connect_and_prepare(
    config: &Config,
    wait: Option<&CancellationToken>,
) -> Result<(deadpool_postgres::Pool, Vec<Source>), AppError> {
    let (pool, client) = connect(config, wait).await?;
    let mut sources = Vec::new();
    let mut problems: Vec<MappingProblems> = Vec::new();
    for mapping in &config.mappings {
        match Source::prepare(&client, mapping).await {
            Ok(source) => sources.push(source),
            Err(found) => problems.push(found),
        }
    }
    if !problems.is_empty() {
        return Err(AppError::Config(format!(
            "the mappings cannot be used:\n  - {}",
            problem_lines(&problems).join("\n  - ")
        )));
    }
    Ok((pool, sources))
}

/// One line per problem; the same SQL error met by several statements is said once.
pub fn problem_lines(problems: &[MappingProblems]) -> Vec<String> {
    let mut lines: Vec<String> = Vec::new();
    for found in problems {
        for problem in &found.problems {
            let line = format!("mapping '{}': {problem}", found.mapping);
            if !lines.contains(&line) {
                lines.push(line);
            }
        }
    }
    lines
}

/// The pool and one connection from it, with the daemon's schema in place; with `wait`, waits
/// for a database that is down instead of failing.
pub async fn connect(
    config: &Config,
    wait: Option<&CancellationToken>,
) -> Result<(deadpool_postgres::Pool, deadpool_postgres::Client), AppError> {
    let pool = db::pool(&config.database).map_err(|e| AppError::Config(e.to_string()))?;
    let mut client = match wait {
        Some(stop) => match db::wait_for_database(&pool, stop).await {
            Some(client) => client,
            None => {
                return Err(AppError::Database(DbError::Other(
                    "stopped while waiting for the database".into(),
                )))
            }
        },
        None => pool.get().await.map_err(|e| {
            // Say which server: "connection refused" alone does not tell a wrong port apart.
            let url = crate::secret::redact_database_url(config.database.url.expose());
            DbError::Other(format!("{} (connecting to {url})", DbError::from(e)))
        })?,
    };
    store::ensure_schema(&mut client).await?;
    Ok((pool, client))
}

/// Everything a sync needs, built from the config.
pub struct Engine {
    pub shared: Arc<Shared>,
    pub lanes: Vec<Arc<Lane>>,
}

/// Builds the engine for `run` or `backfill`.
pub async fn build_engine(
    config: &Config,
    mode: Mode,
    shutdown: &CancellationToken,
) -> Result<Engine, AppError> {
    let api_key = config.resonance.api_key.clone().ok_or_else(|| {
        AppError::Config(
            "no API key: set RESONANCE_API_KEY, or [resonance] api_key_file, or a systemd credential named resonance-api-key".into(),
        )
    })?;
    let sink = Sink::new(&config.resonance, api_key).map_err(AppError::Config)?;
    let wait = (mode == Mode::Run).then_some(shutdown);
    let (pool, sources) = connect_and_prepare(config, wait).await?;
    let resonance = &config.resonance;
    let (outage_pause, max_pause) = match &resonance.backfill_retry.schedule {
        Schedule::Exponential { initial, max } => (*initial, *max),
        Schedule::Fixed(_) => (
            std::time::Duration::from_secs(1),
            std::time::Duration::from_secs(300),
        ),
    };
    let shared = Arc::new(Shared {
        pool,
        database: db::direct_config(&config.database)?,
        sink,
        settings: Settings {
            brand_id: resonance.brand_id.clone(),
            concurrency: resonance.concurrency,
            claim_lease: config.database.claim_lease,
            run_retry: resonance.run_retry.clone(),
            backfill_retry: resonance.backfill_retry.clone(),
            retry_after_max: resonance.retry_after_max,
        },
        mode,
        gate: Gate::new(GateSettings {
            failure_threshold: (resonance.concurrency as u32).clamp(5, 20),
            outage_pause,
            refused_pause: std::time::Duration::from_secs(10),
            max_pause,
        }),
        instance: uuid::Uuid::new_v4(),
        permits: Arc::new(Semaphore::new(resonance.concurrency)),
        stop: shutdown.child_token(),
        fatal: Mutex::new(None),
        started: SystemTime::now(),
        database_down: AtomicBool::new(false),
        broken: Mutex::new(Vec::new()),
    });
    let lanes = sources
        .into_iter()
        .map(|source| {
            Arc::new(Lane::new(
                source,
                Arc::new(MappingStats::new()),
                &resonance.brand_id,
            ))
        })
        .collect();
    Ok(Engine { shared, lanes })
}

/// `run`: polls until the shutdown token is cancelled, then drains and returns.
pub async fn run(config: &Config, shutdown: CancellationToken) -> Result<(), AppError> {
    crate::service::explain_hangups(&shutdown);
    let engine = build_engine(config, Mode::Run, &shutdown).await?;
    let service = crate::service::start(config, &engine, &shutdown).await?;
    tracing::info!(
        mappings = engine.lanes.len(), endpoint = %config.resonance.endpoint,
        instance = %engine.shared.instance, "running"
    );
    sync_all(engine.shared.clone(), engine.lanes.clone()).await;
    service.finish().await;
    tracing::info!("stopped");
    Ok(())
}

/// One mapping's result of a backfill.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MappingReport {
    pub mapping: String,
    pub delivered: u64,
    pub rejected: u64,
    pub left: i64,
}

/// `backfill`: drains every selected mapping once. `Ok` only when nothing is left.
pub async fn backfill(
    config: &Config,
    shutdown: CancellationToken,
) -> Result<Vec<MappingReport>, AppError> {
    let started = Instant::now();
    let engine = build_engine(config, Mode::Backfill, &shutdown).await?;
    let total = crate::progress::backlog(&engine.shared.pool, &engine.lanes).await?;
    let progress = crate::progress::Progress::start(engine.lanes.clone(), total);
    sync_all(engine.shared.clone(), engine.lanes.clone()).await;
    progress.finish().await;
    let client = engine.shared.pool.get().await.map_err(DbError::from)?;
    let mut reports = Vec::new();
    for lane in &engine.lanes {
        let stats = lane.stats.snapshot();
        let left = lane.source.backlog(&client).await?;
        reports.push(MappingReport {
            mapping: lane.name().to_string(),
            delivered: stats.delivered,
            rejected: stats.dead_lettered,
            left,
        });
    }
    crate::say!("{}", crate::progress::summary(&reports, started.elapsed()));
    if let Some(fatal) = engine.shared.fatal() {
        return Err(AppError::Refused(format!("backfill stopped: {fatal}")));
    }
    let broken = engine.shared.broken();
    if !broken.is_empty() {
        return Err(AppError::Database(DbError::Other(format!(
            "the server refuses a statement, and the backfill gave up on {}: fix it, then run the backfill again (`resonance-sync check` shows the error)",
            broken.join("; ")
        ))));
    }
    let rejected: u64 = reports.iter().map(|r| r.rejected).sum();
    let left: i64 = reports.iter().map(|r| r.left).sum();
    if rejected > 0 || left > 0 {
        return Err(AppError::RowsLeft(format!(
            "backfill finished with {rejected} rejected and {left} left; rejected rows are in `resonance-sync dead-letters list`, rows left are tried again by the next backfill at once, or by `run` when their next retry is due (`resonance-sync status` shows when)"
        )));
    }
    Ok(reports)
}

pub use crate::check::check;

/// `sandbox`: serves the local stand-in for the API until SIGTERM or SIGINT.
pub async fn sandbox(args: crate::cli::SandboxArgs) -> Result<(), AppError> {
    use crate::sandbox::{serve, SandboxSettings};
    let api_key = std::env::var("RESONANCE_API_KEY")
        .ok()
        .filter(|k| !k.trim().is_empty())
        .map(|k| crate::secret::Secret::new(k.trim()));
    if api_key.is_none() {
        tracing::warn!("RESONANCE_API_KEY is not set: the sandbox accepts any bearer token");
    }
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|e| AppError::Config(format!("cannot listen on {}: {e}", args.listen)))?;
    let address = listener
        .local_addr()
        .map_err(|e| AppError::Config(e.to_string()))?;
    tracing::info!(%address, fail_rate = args.fail_rate, latency_ms = args.latency.as_millis() as u64, "sandbox listening; POST events to http://{address}/resonance-api/manual-event");
    let settings = SandboxSettings {
        api_key,
        brand_id: args.brand_id,
        fail_rate: args.fail_rate,
        latency: args.latency,
        quiet: args.quiet,
    };
    let stats = serve(
        listener,
        settings,
        std::io::stdout(),
        crate::shutdown::on_signal_saying(
            "sandbox stopping: answering the requests in flight",
            "second signal: sandbox exiting now",
        ),
    )
    .await
    .map_err(|e| AppError::Config(format!("sandbox failed: {e}")))?;
    tracing::info!(
        accepted = stats.accepted,
        duplicates = stats.duplicates,
        rejected = stats.rejected,
        unauthorized = stats.unauthorized,
        injected_failures = stats.injected_failures,
        "sandbox stopped"
    );
    Ok(())
}
