//! Secrets and personal data stay out of what the program prints: the API key and the database
//! password at every log level, emails masked at info, and a warning for a secret file that
//! other users can read. These run the real binary and read everything it wrote.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::process::Command;

use crate::cluster::{ClusterOptions, PrivateCluster};
use crate::harness::*;

/// A key that the tests look for in everything the binary prints.
const SECRET_KEY: &str = "sk_live_5ecret_never_printed_42";
/// A database password likewise.
const SECRET_PASSWORD: &str = "pw_5ecret_never_printed_42";

/// A config file in a directory of its own.
struct ConfigFile {
    _dir: tempfile::TempDir,
    path: PathBuf,
}

impl ConfigFile {
    fn new(text: &str, mode: u32) -> ConfigFile {
        let dir = tempfile::tempdir().expect("config directory");
        let path = dir.path().join("config.toml");
        std::fs::write(&path, text).expect("write the config");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).expect("chmod");
        ConfigFile { _dir: dir, path }
    }
}

fn command(config: &Path, rust_log: &str, args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_resonance-sync"));
    command
        .arg("--config")
        .arg(config)
        .args(args)
        .env("RESONANCE_API_KEY", SECRET_KEY)
        .env("RUST_LOG", rust_log)
        .env("RUST_BACKTRACE", "1")
        .env_remove("DATABASE_URL")
        .env_remove("RESONANCE_ENDPOINT")
        .env_remove("RESONANCE_BRAND_ID")
        .env_remove("CREDENTIALS_DIRECTORY")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    command
}

/// Runs the binary to the end: (exit code, stdout and stderr).
async fn run(config: &Path, rust_log: &str, args: &[&str]) -> (i32, String) {
    let output = tokio::time::timeout(
        Duration::from_secs(60),
        command(config, rust_log, args).output(),
    )
    .await
    .expect("the command ends within 60 s")
    .expect("run resonance-sync");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.code().unwrap_or(-1), text)
}

/// The receiver's answer, with the request's Authorization header echoed into the body, as a
/// careless API might do.
fn echoing(status: u16) -> impl Fn(&Seen) -> Reply + Send + Sync + 'static {
    move |seen: &Seen| {
        let authorization = seen
            .headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        Reply::status(status).with_body(&format!(
            "{{\"error\":\"bad\",\"got\":\"{authorization}\"}}"
        ))
    }
}

#[tokio::test]
async fn the_api_key_never_appears_in_output_at_trace_level() {
    let db = TestDb::with_orders().await;
    db.insert_orders(&[(Some("ana.lopez@example.com"), "49.90", "EUR")])
        .await;
    let receiver = Receiver::scripted(echoing(401)).await;
    let text = config_text(&db.url, &receiver.endpoint(), "", &orders_mapping("orders"));
    let config = ConfigFile::new(&text, 0o600);

    let (code, refused) = run(&config.path, "trace", &["backfill"]).await;
    assert_eq!(code, 4, "{refused}");
    receiver.set_script(echoing(500));
    let (code, failing) = run(&config.path, "trace", &["backfill"]).await;
    assert_eq!(code, 1, "{failing}");
    let (code, checked) = run(&config.path, "trace", &["check"]).await;
    assert_eq!(code, 0, "{checked}");

    // The key was really sent, so it was there to leak.
    let sent = receiver.seen();
    assert!(sent.len() >= 2);
    assert_eq!(
        sent[0].headers["authorization"].to_str().unwrap(),
        format!("Bearer {SECRET_KEY}")
    );
    for (what, output) in [("401", &refused), ("500", &failing), ("check", &checked)] {
        assert!(output.contains("TRACE"), "{what}: trace logging was on");
        assert!(
            !output.contains(SECRET_KEY) && !output.contains("5ecret"),
            "{what}: the key leaked:\n{output}"
        );
    }
    assert!(refused.contains("401"), "{refused}");
}

#[tokio::test]
async fn emails_are_masked_in_logs_at_info_level() {
    let db = TestDb::with_orders().await;
    db.insert_orders(&[(Some("ana.lopez@example.com"), "49.90", "EUR")])
        .await;
    let receiver = Receiver::scripted(|seen: &Seen| match seen.earlier {
        0 => Reply::status(500),
        _ => Reply::status(422).with_body("{\"error\":\"no\"}"),
    })
    .await;
    let text = config_text(&db.url, &receiver.endpoint(), "", &orders_mapping("orders"));
    let config = ConfigFile::new(&text, 0o600);
    let (code, output) = run(&config.path, "info", &["backfill"]).await;
    assert_eq!(code, 1, "{output}");
    assert_eq!(receiver.count(), 2);
    assert!(output.contains("a***@example.com"), "{output}");
    assert!(
        !output.contains("ana.lopez"),
        "a full email at info:\n{output}"
    );
}

#[tokio::test]
async fn the_database_password_never_appears_in_output_even_when_it_is_wrong() {
    let cluster = PrivateCluster::start(ClusterOptions {
        hba: Some(
            "local all all trust\nhost all postgres 127.0.0.1/32 trust\n\
             host all crm 127.0.0.1/32 scram-sha-256\n"
                .to_string(),
        ),
        ..ClusterOptions::default()
    })
    .await;
    let url = cluster.create_database("crm").await;
    let admin = connect(&url).await;
    admin
        .batch_execute(&format!(
            "CREATE ROLE crm LOGIN PASSWORD '{SECRET_PASSWORD}'; {ORDERS_TABLE}
             GRANT ALL ON orders, orders_id_seq TO crm; GRANT CREATE ON DATABASE crm TO crm;"
        ))
        .await
        .expect("create the role");
    let receiver = Receiver::start().await;
    let at = |password: &str| format!("postgres://crm:{password}@127.0.0.1:{}/crm", cluster.port());

    // The right password works (and `check` shows nothing of it).
    let text = config_text(
        &at(SECRET_PASSWORD),
        &receiver.endpoint(),
        "",
        &orders_mapping("orders"),
    );
    let config = ConfigFile::new(&text, 0o600);
    let (code, output) = run(&config.path, "trace", &["check"]).await;
    assert_eq!(code, 0, "{output}");
    assert!(!output.contains(SECRET_PASSWORD), "{output}");

    // A wrong one: refused, and neither password is printed.
    let wrong = "pw_wrong_5ecret_43";
    let text = config_text(
        &at(wrong),
        &receiver.endpoint(),
        "",
        &orders_mapping("orders"),
    );
    let config = ConfigFile::new(&text, 0o600);
    let (code, output) = run(&config.path, "trace", &["check"]).await;
    assert_eq!(code, 3, "{output}");
    assert!(
        output.contains("password authentication failed"),
        "{output}"
    );
    assert!(
        !output.contains(wrong) && !output.contains("5ecret"),
        "{output}"
    );

    // `run` waits for the database, logging why it cannot connect: no password either.
    let mut child = command(&config.path, "trace", &["run"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start run");
    let mut stderr = child.stderr.take().expect("stderr");
    let mut seen = String::new();
    let read = async {
        use tokio::io::AsyncReadExt;
        let mut buffer = [0u8; 4096];
        while !seen.contains("database unavailable") {
            let n = stderr.read(&mut buffer).await.expect("read stderr");
            if n == 0 {
                break;
            }
            seen.push_str(&String::from_utf8_lossy(&buffer[..n]));
        }
    };
    tokio::time::timeout(Duration::from_secs(20), read)
        .await
        .expect("run reports the unavailable database");
    child.start_kill().expect("stop run");
    let _ = child.wait().await;
    assert!(seen.contains("password authentication failed"), "{seen}");
    assert!(!seen.contains(wrong) && !seen.contains("5ecret"), "{seen}");
}

#[tokio::test]
async fn a_config_file_with_a_password_that_others_can_read_draws_a_warning() {
    let db = TestDb::with_orders().await;
    let receiver = Receiver::start().await;
    // The shared server trusts every connection, so the password is simply not needed.
    let url = db
        .url
        .replacen("postgres@", &format!("postgres:{SECRET_PASSWORD}@"), 1);
    let text = config_text(&url, &receiver.endpoint(), "", &orders_mapping("orders"));

    let config = ConfigFile::new(&text, 0o644);
    let (code, output) = run(&config.path, "info", &["check"]).await;
    assert_eq!(code, 0, "{output}");
    assert!(
        output.contains("holds the database password in [database] url and every user"),
        "{output}"
    );
    assert!(!output.contains(SECRET_PASSWORD), "{output}");

    let config = ConfigFile::new(&text, 0o640);
    let (code, output) = run(&config.path, "info", &["check"]).await;
    assert_eq!(code, 0, "{output}");
    assert!(!output.contains("every user"), "{output}");
}
