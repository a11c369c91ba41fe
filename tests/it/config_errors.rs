//! Config mistakes found by a user trial, as the operator meets them: the built binary, its exit
//! code (2: a configuration error, not 3: the database cannot be reached), a message that says
//! what is wrong, and no secret in anything it prints. None of these needs a database: the
//! config is refused before any connection is tried.

use std::time::Duration;

use crate::harness::*;
use crate::process::{Process, Scratch};

/// A database password that must appear in nothing the binary prints.
const PASSWORD: &str = "pw_trial_never_shown_7";

/// Runs `resonance-sync <command>` on a config whose URL is `url` with `env` added; returns
/// the exit code and everything printed.
async fn run_with(url: &str, command: &str, env: &[(&str, &str)], extra: &str) -> (i32, String) {
    let scratch = Scratch::new();
    let text = config_text(
        url,
        "http://127.0.0.1:1/e",
        extra,
        &orders_mapping("orders"),
    );
    let config = scratch.write("config.toml", &text);
    let mut process = Process::spawn(&scratch.0, &config, &[command], env);
    let status = process.exit(Duration::from_secs(20)).await;
    let printed = [process.stdout(), process.stderr()].concat().join("\n");
    (status.code().unwrap_or(-1), printed)
}

#[tokio::test]
async fn a_connection_string_the_driver_cannot_use_exits_2_saying_why_without_the_password() {
    let cases = [
        (
            format!("postgres://postgres:{PASSWORD}@127.0.0.1:5432/db?port=5999"),
            "DATABASE_URL is not a valid connection string: it gives 2 ports for 1 host(s)",
        ),
        (
            format!("postgres://postgres:{PASSWORD}@127.0.0.1:99999/db"),
            "DATABASE_URL is not a valid connection string: invalid value for option `port` (a \
             port is a number from 1 to 65535)",
        ),
        (
            format!("postgres://postgres:{PASSWORD}@127.0.0.1:5432/db?connect_timeout=abc"),
            "DATABASE_URL is not a valid connection string: invalid value for option \
             `connect_timeout`",
        ),
    ];
    for (url, wanted) in &cases {
        // Every command loads the config first, so each one says the same.
        for command in ["check", "status", "backfill", "run"] {
            let env = [("DATABASE_URL", url.as_str())];
            let (code, printed) =
                run_with("postgres://x@127.0.0.1/unused", command, &env, "").await;
            assert_eq!(code, 2, "{command} with {wanted}: {printed}");
            assert!(printed.contains(wanted), "{command}: {printed}");
            assert!(!printed.contains(PASSWORD), "{command}: {printed}");
        }
    }
}

#[tokio::test]
async fn a_bad_connection_string_in_the_file_is_named_as_the_files() {
    let url = format!("postgres://postgres:{PASSWORD}@127.0.0.1:5432/db?port=5999");
    let (code, printed) = run_with(&url, "check", &[], "").await;
    assert_eq!(code, 2, "{printed}");
    assert!(
        printed.contains("[database] url is not a valid connection string: it gives 2 ports"),
        "{printed}"
    );
    assert!(!printed.contains(PASSWORD), "{printed}");
}

#[tokio::test]
async fn an_api_key_pasted_into_api_key_file_is_never_printed() {
    // An empty RESONANCE_API_KEY counts as unset, so the file is what is read.
    let env = [("RESONANCE_API_KEY", "")];
    let extra = "api_key_file = \"sk_inline_TRIAL_SECRET\"";
    let (code, printed) = run_with("postgres://x@127.0.0.1/db", "check", &env, extra).await;
    assert_eq!(code, 2, "{printed}");
    assert!(
        printed.contains("[resonance] api_key_file: the file it names cannot be read"),
        "{printed}"
    );
    assert!(!printed.contains("TRIAL_SECRET"), "{printed}");
}
