//! The command line: subcommands and their flags. Parsing only; `app` does the work.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::config::DEFAULT_CONFIG_PATH;
use crate::telemetry::LogFormat;

/// Forwards unsynced PostgreSQL rows to the Resonance rewards API, marking each row synced only
/// after a confirmed 2xx.
#[derive(Debug, Parser)]
#[command(name = "resonance-sync", version, about, long_about = None)]
pub struct Cli {
    /// The config file.
    #[arg(long, global = true, env = "RESONANCE_SYNC_CONFIG", default_value = DEFAULT_CONFIG_PATH)]
    pub config: PathBuf,
    /// How log lines on stderr are written; filter them with RUST_LOG.
    #[arg(long, global = true, value_enum, default_value = "text")]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

/// What to do.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Poll every mapping on its interval until SIGTERM or SIGINT.
    Run,
    /// Drain every unsynced row once, then exit: 0 when all were delivered.
    Backfill(BackfillArgs),
    /// Validate the config, connect, prepare every mapping and print one sample event each,
    /// without sending or marking anything.
    Check,
    /// Per mapping: backlog, rows retrying, dead letters, oldest unsynced row, last success.
    Status,
    /// List, retry or purge the rows that could not be delivered.
    #[command(subcommand)]
    DeadLetters(DeadLetterCommand),
    /// A local stand-in for the Resonance API, for trying the daemon before production.
    Sandbox(SandboxArgs),
}

/// Flags of `backfill`.
#[derive(Debug, Args)]
pub struct BackfillArgs {
    /// Only this mapping.
    #[arg(long)]
    pub mapping: Option<String>,
}

/// The `dead-letters` subcommands.
#[derive(Debug, Subcommand)]
pub enum DeadLetterCommand {
    /// One line per dead letter: mapping, key, attempts, last status, reason, when.
    List {
        /// Only this mapping's dead letters.
        #[arg(long)]
        mapping: Option<String>,
        /// Also show purged dead letters.
        #[arg(long)]
        purged: bool,
    },
    /// Put dead letters back in line: the next run or backfill sends them.
    Retry(Selection),
    /// Forget dead letters: the rows stay unsynced and excluded until retried by key.
    Purge(Selection),
}

/// Which dead letters a command acts on.
#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
pub struct Selection {
    /// Every dead letter.
    #[arg(long)]
    pub all: bool,
    /// Every dead letter of this mapping.
    #[arg(long)]
    pub mapping: Option<String>,
    /// The dead letter with this row key (in every mapping that has it).
    #[arg(long)]
    pub key: Option<String>,
}

/// Flags of `sandbox`.
#[derive(Debug, Args)]
pub struct SandboxArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Refuse events whose brandId differs (403).
    #[arg(long, env = "RESONANCE_BRAND_ID")]
    pub brand_id: Option<String>,
    /// Share of valid requests answered 500, from 0 to 1.
    #[arg(long, default_value_t = 0.0, value_parser = parse_share)]
    pub fail_rate: f64,
    /// Delay before each answer, e.g. 20ms.
    #[arg(long, default_value = "0s", value_parser = parse_latency)]
    pub latency: Duration,
    /// Do not print accepted events.
    #[arg(long)]
    pub quiet: bool,
    /// Threads that answer requests; 0 (the default) uses one per core. One thread answers tens
    /// of thousands of requests a second and takes less CPU from a daemon and a database on the
    /// same machine, but answers a burst of delayed requests (--latency) more slowly.
    #[arg(long, default_value_t = 0, value_parser = parse_threads)]
    pub threads: usize,
}

/// The most threads `--threads` takes: more than a test stand-in can use, few enough that a typo
/// does not start a hundred thousand of them.
const MAX_THREADS: usize = 256;

fn parse_threads(text: &str) -> Result<usize, String> {
    match text.parse::<usize>() {
        Ok(threads) if threads <= MAX_THREADS => Ok(threads),
        _ => Err(format!(
            "'{text}' is not a number of threads from 0 (one per core) to {MAX_THREADS}"
        )),
    }
}

/// The longest `--latency`: a stand-in API slower than this is not one a test can wait for.
const MAX_LATENCY: Duration = Duration::from_secs(3600);

fn parse_latency(text: &str) -> Result<Duration, String> {
    match humantime::parse_duration(text) {
        Ok(latency) if latency <= MAX_LATENCY => Ok(latency),
        Ok(_) => Err(format!("'{text}' is longer than the longest latency, 1h")),
        Err(error) => Err(format!("'{text}' is not a duration such as 20ms: {error}")),
    }
}

fn parse_share(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(share) if (0.0..=1.0).contains(&share) => Ok(share),
        _ => Err(format!("'{text}' is not a share between 0 and 1")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sandbox(args: &[&str]) -> Result<SandboxArgs, String> {
        let argv = ["resonance-sync", "sandbox"].iter().chain(args);
        match Cli::try_parse_from(argv)
            .map_err(|e| e.to_string())?
            .command
        {
            Command::Sandbox(args) => Ok(args),
            other => Err(format!("parsed as {other:?}")),
        }
    }

    #[test]
    fn sandbox_threads_default_to_one_per_core_and_take_a_bounded_count() {
        assert_eq!(sandbox(&[]).unwrap().threads, 0);
        assert_eq!(sandbox(&["--threads", "1"]).unwrap().threads, 1);
        assert_eq!(sandbox(&["--threads", "256"]).unwrap().threads, 256);
        for bad in ["257", "100000", "-1", "two"] {
            let error = sandbox(&[&format!("--threads={bad}")]).unwrap_err();
            assert!(
                error.contains(&format!("'{bad}' is not a number of threads from 0")),
                "--threads {bad}: {error}"
            );
        }
    }

    #[test]
    fn sandbox_latency_is_a_duration_up_to_an_hour() {
        assert_eq!(
            sandbox(&["--latency", "20ms"]).unwrap().latency,
            Duration::from_millis(20)
        );
        assert_eq!(sandbox(&["--latency", "1h"]).unwrap().latency, MAX_LATENCY);
        let error = sandbox(&["--latency", "99999999999999h"]).unwrap_err();
        assert!(
            error.contains("is longer than the longest latency, 1h"),
            "{error}"
        );
        let error = sandbox(&["--latency", "5"]).unwrap_err();
        assert!(
            error.contains("'5' is not a duration such as 20ms"),
            "{error}"
        );
    }

    #[test]
    fn sandbox_fail_rate_is_a_share() {
        assert_eq!(sandbox(&["--fail-rate", "0.25"]).unwrap().fail_rate, 0.25);
        let error = sandbox(&["--fail-rate", "1.5"]).unwrap_err();
        assert!(
            error.contains("'1.5' is not a share between 0 and 1"),
            "{error}"
        );
    }
}
