//! The `resonance-sync` binary: parse the command line, set up logging, load the config,
//! dispatch, and turn errors into exit codes. Nothing else.

use std::process::ExitCode;

use clap::Parser;
use resonance_sync::app::{self, AppError};
use resonance_sync::cli::{Cli, Command};
use resonance_sync::config::{self, Overrides};
use resonance_sync::{admin, output, shutdown, telemetry};

/// mimalloc instead of the system allocator: the hot path allocates a little per request
/// (headers, bodies, futures), and glibc's malloc showed up at about a tenth of the CPU.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    telemetry::init_logging(cli.log_format);
    let runtime = match runtime(&cli.command) {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return ExitCode::from(70);
        }
    };
    let result = runtime.block_on(dispatch(cli));
    if let Some(failure) = output::failure() {
        eprintln!("error: cannot write to standard output: {failure}");
    }
    match result {
        Ok(()) if output::failure().is_some() => ExitCode::from(output::EXIT_OUTPUT),
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::from(error.exit_code() as u8)
        }
    }
}

/// The sandbox runs on as many threads as asked (`--threads`, 0 for one per core); everything
/// else on one per core.
fn runtime(command: &Command) -> std::io::Result<tokio::runtime::Runtime> {
    match command {
        Command::Sandbox(args) if args.threads == 1 => {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
        }
        Command::Sandbox(args) if args.threads > 1 => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(args.threads)
            .enable_all()
            .build(),
        _ => tokio::runtime::Runtime::new(),
    }
}

async fn dispatch(cli: Cli) -> Result<(), AppError> {
    if let Command::Sandbox(args) = cli.command {
        return app::sandbox(args).await;
    }
    let mut config = config::load(&cli.config, &Overrides::from_env())
        .map_err(|e| AppError::Config(e.to_string()))?;
    match cli.command {
        Command::Run => app::run(&config, shutdown::on_signal()).await,
        Command::Backfill(args) => {
            app::select_mappings(&mut config, args.mapping.as_deref())?;
            app::backfill(&config, shutdown::on_signal())
                .await
                .map(|_| ())
        }
        Command::Check => app::check(&config).await,
        Command::Status => admin::status(&config).await,
        Command::DeadLetters(command) => admin::dead_letters(&config, command).await,
        Command::Sandbox(_) => Ok(()),
    }
}
