//! TLS to a real PostgreSQL with libpq's `sslmode` and `sslrootcert`: a private cluster that
//! accepts only encrypted connections, with a certificate authority and a server certificate
//! (for `localhost` only) that the test generates.

use std::path::PathBuf;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
use resonance_sync::db;

use crate::cluster::{ClusterOptions, PrivateCluster};
use crate::harness::*;

/// A CA: its certificate (PEM) and what is needed to sign with it.
struct Authority {
    cert: rcgen::Certificate,
    key: KeyPair,
}

impl Authority {
    fn new(name: &str) -> Authority {
        let key = KeyPair::generate().expect("CA key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = params.self_signed(&key).expect("self-sign the CA");
        Authority { cert, key }
    }

    /// A server certificate for `names`, signed by this CA: (certificate PEM, key PEM).
    fn issue(&self, names: &[&str]) -> (String, String) {
        let key = KeyPair::generate().expect("server key");
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let params = CertificateParams::new(names).expect("server params");
        let cert = params
            .signed_by(&key, &self.cert, &self.key)
            .expect("sign the server certificate");
        (cert.pem(), key.serialize_pem())
    }
}

/// A cluster that refuses unencrypted TCP connections, its CA's certificate in a file, and a
/// second CA's certificate that did not sign anything of it.
struct TlsServer {
    cluster: PrivateCluster,
    _dir: tempfile::TempDir,
    ca_file: PathBuf,
    other_ca_file: PathBuf,
}

impl TlsServer {
    async fn start() -> TlsServer {
        let ca = Authority::new("resonance test CA");
        let (cert, key) = ca.issue(&["localhost"]);
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
            hba: Some(
                "local all all trust\nhostssl all all 127.0.0.1/32 trust\n\
                 hostssl all all ::1/128 trust\n"
                    .to_string(),
            ),
        })
        .await;
        let dir = tempfile::tempdir().expect("certificate directory");
        let ca_file = dir.path().join("ca.crt");
        std::fs::write(&ca_file, ca.cert.pem()).expect("write the CA");
        let other_ca_file = dir.path().join("other-ca.crt");
        std::fs::write(&other_ca_file, Authority::new("another CA").cert.pem())
            .expect("write the other CA");
        TlsServer {
            cluster,
            _dir: dir,
            ca_file,
            other_ca_file,
        }
    }

    /// The URL of the `postgres` database on `host` with `params` added.
    fn url(&self, host: &str, params: &str) -> String {
        format!(
            "postgres://postgres@{host}:{}/postgres?{params}",
            self.cluster.port()
        )
    }
}

/// Connects the way the daemon does (its pool, its TLS) and says whether the session is
/// encrypted, or gives the error text.
async fn connect_as_daemon(url: &str) -> Result<bool, String> {
    let receiver_endpoint = "http://127.0.0.1:9/unused";
    let config = config(url, receiver_endpoint, "", &orders_mapping("orders"));
    let pool = db::pool(&config.database).map_err(|e| e.to_string())?;
    let client = pool
        .get()
        .await
        .map_err(|e| resonance_sync::error::DbError::from(e).to_string())?;
    let row = client
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .map_err(|e| e.to_string())?;
    Ok(row.get(0))
}

#[tokio::test]
async fn each_sslmode_encrypts_and_verifies_as_libpq_does() {
    let server = TlsServer::start().await;
    let ca = server.ca_file.display().to_string();

    // The server's certificate names localhost, not 127.0.0.1.
    for (host, params) in [
        ("127.0.0.1", "sslmode=require".to_string()),
        ("127.0.0.1", "sslmode=prefer".to_string()),
        ("127.0.0.1", String::new()),
        ("127.0.0.1", format!("sslmode=verify-ca&sslrootcert={ca}")),
        ("localhost", format!("sslmode=verify-full&sslrootcert={ca}")),
    ] {
        let url = server.url(host, &params);
        assert_eq!(
            connect_as_daemon(&url).await,
            Ok(true),
            "{host} {params}: connected over TLS"
        );
    }

    // disable: no TLS, and this server accepts no plain connection.
    let error = connect_as_daemon(&server.url("127.0.0.1", "sslmode=disable"))
        .await
        .unwrap_err();
    assert!(error.contains("no encryption"), "{error}");

    // verify-full checks the name: the certificate is not for 127.0.0.1.
    let error = connect_as_daemon(&server.url(
        "127.0.0.1",
        &format!("sslmode=verify-full&sslrootcert={ca}"),
    ))
    .await
    .unwrap_err();
    assert!(
        error.contains("not valid for the host '127.0.0.1'"),
        "{error}"
    );
}

#[tokio::test]
async fn a_certificate_the_ca_did_not_sign_is_refused_with_a_message_that_says_so() {
    let server = TlsServer::start().await;
    let other = server.other_ca_file.display().to_string();
    for mode in ["verify-ca", "verify-full", "require"] {
        let url = server.url("localhost", &format!("sslmode={mode}&sslrootcert={other}"));
        let error = connect_as_daemon(&url).await.unwrap_err();
        assert!(
            error.contains(&format!(
                "the server's certificate is not signed by a CA in sslrootcert {other}"
            )),
            "{mode}: {error}"
        );
    }
    // Without sslrootcert, verify-full trusts the system's roots, which did not sign it either.
    let error = connect_as_daemon(&server.url("localhost", "sslmode=verify-full"))
        .await
        .unwrap_err();
    assert!(
        error.contains("not signed by a CA in the system's root certificates")
            || error.contains("no system root certificates found"),
        "{error}"
    );
}

#[tokio::test]
async fn prefer_falls_back_to_plain_text_on_a_server_without_tls() {
    let cluster = PrivateCluster::start(ClusterOptions::default()).await;
    let url = cluster.database_url("postgres");
    assert_eq!(
        connect_as_daemon(&format!("{url}?sslmode=prefer")).await,
        Ok(false)
    );
    assert_eq!(
        connect_as_daemon(&url).await,
        Ok(false),
        "prefer is the default"
    );
    let error = connect_as_daemon(&format!("{url}?sslmode=require"))
        .await
        .unwrap_err();
    assert!(
        error.contains("TLS"),
        "require refuses a server without TLS: {error}"
    );
}

#[tokio::test]
async fn a_backfill_over_verify_full_delivers_the_rows() {
    logs();
    let server = TlsServer::start().await;
    let admin = server.cluster.socket_dir();
    let (client, connection) = tokio_postgres::connect(
        &format!(
            "host={} port={} user=postgres dbname=postgres",
            admin.display(),
            server.cluster.port()
        ),
        tokio_postgres::NoTls,
    )
    .await
    .expect("connect over the unix socket");
    tokio::spawn(connection);
    client.batch_execute(ORDERS_TABLE).await.expect("orders");
    client
        .batch_execute(
            "INSERT INTO orders (user_email, order_value) VALUES ('tls@example.com', 12.34)",
        )
        .await
        .expect("insert");
    let receiver = Receiver::start().await;
    let url = server.url(
        "localhost",
        &format!(
            "sslmode=verify-full&sslrootcert={}",
            server.ca_file.display()
        ),
    );
    let config = config(&url, &receiver.endpoint(), "", &orders_mapping("orders"));
    let reports = backfill(&config).await.expect("the backfill succeeds");
    assert_eq!(reports[0].delivered, 1);
    assert!(receiver.seen()[0].text().contains("\"order_value\":12.34"));
}

/// A verify-full refusal names the hosts the certificate is valid for, in plain words (it once
/// printed `DnsName("localhost")`).
#[tokio::test]
async fn verify_full_to_a_host_the_certificate_does_not_name_says_which_hosts_it_names() {
    let server = TlsServer::start().await;
    let url = server.url(
        "127.0.0.1",
        &format!(
            "sslmode=verify-full&sslrootcert={}",
            server.ca_file.display()
        ),
    );
    let error = connect_as_daemon(&url)
        .await
        .expect_err("verify-full accepted a certificate for another host");
    assert!(
        error.contains(
            "not valid for the host '127.0.0.1' (sslmode=verify-full checks the name; verify-ca \
             does not): it is valid only for localhost"
        ),
        "{error}"
    );
    assert!(!error.contains("DnsName"), "{error}");
}
