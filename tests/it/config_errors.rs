//! Config mistakes found by a user trial, as the operator meets them: the built binary, its exit
//! code (2: a configuration error, not 3: the database cannot be reached), a message that says
//! what is wrong, and no secret in anything it prints. None of these needs a database: the
//! config is refused before any connection is tried. Last, a URL whose host the server's
//! certificate does not name, under verify-full: the refusal names hosts as they are written.

use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};

use crate::cluster::{ClusterOptions, PrivateCluster};
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

/// A CA's certificate (PEM) and a server certificate and key (PEM) it signed for `localhost`.
fn ca_and_localhost_cert() -> (String, String, String) {
    let ca_key = KeyPair::generate().expect("CA key");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).expect("self-sign the CA");
    let key = KeyPair::generate().expect("server key");
    let cert = CertificateParams::new(vec!["localhost".to_string()])
        .expect("server params")
        .signed_by(&key, &ca, &ca_key)
        .expect("sign the server certificate");
    (ca.pem(), cert.pem(), key.serialize_pem())
}

#[tokio::test]
async fn verify_full_to_a_host_the_certificate_does_not_name_says_which_hosts_it_names() {
    let (ca, cert, key) = ca_and_localhost_cert();
    let cluster = PrivateCluster::start(ClusterOptions {
        conf: vec![
            "ssl = on".to_string(),
            "ssl_cert_file = 'server.crt'".to_string(),
            "ssl_key_file = 'server.key'".to_string(),
        ],
        files: vec![
            ("server.crt".to_string(), cert.into_bytes()),
            ("server.key".to_string(), key.into_bytes()),
        ],
        hba: None,
    })
    .await;
    let dir = tempfile::tempdir().expect("certificate directory");
    let ca_file = dir.path().join("ca.crt");
    std::fs::write(&ca_file, ca).expect("write the CA");
    let url = format!(
        "postgres://postgres@127.0.0.1:{}/postgres?sslmode=verify-full&sslrootcert={}",
        cluster.port(),
        ca_file.display()
    );
    let config = config(
        &url,
        "http://127.0.0.1:9/unused",
        "",
        &orders_mapping("orders"),
    );
    let pool = resonance_sync::db::pool(&config.database).expect("a pool");
    let error = match pool.get().await {
        Ok(_) => panic!("verify-full accepted a certificate for another host"),
        Err(error) => resonance_sync::error::DbError::from(error).to_string(),
    };
    assert!(
        error.contains(
            "not valid for the host '127.0.0.1' (sslmode=verify-full checks the name; verify-ca \
             does not): it is valid only for localhost"
        ),
        "{error}"
    );
    assert!(!error.contains("DnsName"), "{error}");
}
