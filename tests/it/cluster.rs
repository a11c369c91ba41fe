//! A private PostgreSQL 15 cluster for the tests that stop, restart or reconfigure the server:
//! `initdb` into a temporary directory, a free port on 127.0.0.1, the unix socket inside that
//! directory, trust authentication and `fsync = off`. The shared server every other test uses is
//! never touched. The cluster is stopped and its directory removed on drop.
//!
//! Extra `postgresql.conf` lines, extra files in the data directory (certificates, keys) and a
//! replacement `pg_hba.conf` make it usable for TLS and authentication tests too.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command as StdCommand, Stdio};
use std::time::Duration;

use tokio::process::Command;

/// Where the PostgreSQL 15 programs live (`RESONANCE_TEST_PG_BIN` overrides).
pub fn pg_bin() -> PathBuf {
    std::env::var_os("RESONANCE_TEST_PG_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/lib/postgresql/15/bin"))
}

/// How to set up a private cluster beyond the defaults.
#[derive(Debug, Clone, Default)]
pub struct ClusterOptions {
    /// Lines appended to `postgresql.conf` (later lines win), e.g. `ssl = on`.
    pub conf: Vec<String>,
    /// Files written into the data directory before the first start, by path relative to it,
    /// owned by the server's user with mode 0600 (as PostgreSQL wants a private key).
    pub files: Vec<(String, Vec<u8>)>,
    /// The whole `pg_hba.conf`, replacing the default trust-everything one.
    pub hba: Option<String>,
}

/// A PostgreSQL server of one test's own.
pub struct PrivateCluster {
    dir: tempfile::TempDir,
    port: u16,
    /// Root runs the server programs as the `postgres` user, which PostgreSQL requires.
    run_as_postgres: bool,
}

impl PrivateCluster {
    /// Creates the cluster and starts it; panics (with the server log) when it cannot.
    pub async fn start(options: ClusterOptions) -> PrivateCluster {
        let run_as_postgres = is_root();
        let dir = tempfile::Builder::new()
            .prefix("rs_cluster_")
            .tempdir()
            .expect("create the cluster's directory");
        let mut cluster = PrivateCluster {
            dir,
            port: 0,
            run_as_postgres,
        };
        if run_as_postgres {
            chown_to_postgres(cluster.dir.path());
        }
        std::fs::create_dir(cluster.socket_dir()).expect("create the socket directory");
        if run_as_postgres {
            chown_to_postgres(&cluster.socket_dir());
        }
        cluster
            .pg(
                "initdb",
                &[
                    "-D",
                    path_str(&cluster.data_dir()),
                    "-U",
                    "postgres",
                    "-A",
                    "trust",
                    "-E",
                    "UTF8",
                    "--locale=C",
                    "--no-sync",
                    "--no-instructions",
                ],
            )
            .await;
        cluster.configure(&options);
        // The port is free when picked but may be taken before the server binds it: try again.
        for _ in 0..5 {
            cluster.port = free_port();
            if cluster.try_start().await {
                return cluster;
            }
        }
        panic!("the private cluster did not start:\n{}", cluster.log());
    }

    fn configure(&self, options: &ClusterOptions) {
        let data = self.data_dir();
        let mut conf = vec![
            "listen_addresses = '127.0.0.1'".to_string(),
            format!(
                "unix_socket_directories = '{}'",
                path_str(&self.socket_dir())
            ),
            "fsync = off".to_string(),
            "synchronous_commit = off".to_string(),
            "full_page_writes = off".to_string(),
            "shared_buffers = 16MB".to_string(),
            "max_connections = 50".to_string(),
        ];
        conf.extend(options.conf.iter().cloned());
        append(&data.join("postgresql.conf"), &conf.join("\n"));
        if let Some(hba) = &options.hba {
            self.write_private(&data.join("pg_hba.conf"), hba.as_bytes());
        }
        for (name, bytes) in &options.files {
            self.write_private(&data.join(name), bytes);
        }
    }

    fn write_private(&self, path: &Path, bytes: &[u8]) {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).expect("create a directory in the data directory");
        }
        std::fs::write(path, bytes).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .expect("make the file private");
        if self.run_as_postgres {
            chown_to_postgres(path);
        }
    }

    /// The server's URL without a database name: `postgres://postgres@127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}", self.port)
    }

    /// The URL of database `name` on this server.
    pub fn database_url(&self, name: &str) -> String {
        format!("{}/{name}", self.url())
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn socket_dir(&self) -> PathBuf {
        self.dir.path().join("sock")
    }

    /// Creates database `name` and returns its URL.
    pub async fn create_database(&self, name: &str) -> String {
        let admin = crate::harness::connect(&self.database_url("postgres")).await;
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .unwrap_or_else(|e| panic!("create database {name}: {e}"));
        self.database_url(name)
    }

    /// Stops the server the way `systemctl stop` does (fast shutdown: sessions are ended).
    pub async fn stop(&self) {
        let data = self.data_dir();
        self.pg(
            "pg_ctl",
            &[
                "-D",
                path_str(&data),
                "-m",
                "fast",
                "-w",
                "-t",
                "30",
                "stop",
            ],
        )
        .await;
    }

    /// Starts the stopped server again on the same port.
    pub async fn start_again(&self) {
        if !self.try_start().await {
            panic!("the private cluster did not start again:\n{}", self.log());
        }
    }

    /// Stops and starts the server.
    pub async fn restart(&self) {
        self.stop().await;
        self.start_again().await;
    }

    /// The server's log so far, for failure messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    async fn try_start(&self) -> bool {
        let data = self.data_dir();
        let log = self.dir.path().join("server.log");
        let port = format!("-p {}", self.port);
        let status = self
            .command(
                "pg_ctl",
                &[
                    "-D",
                    path_str(&data),
                    "-l",
                    path_str(&log),
                    "-o",
                    &port,
                    "-w",
                    "-t",
                    "30",
                    "start",
                ],
            )
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .await
            .expect("run pg_ctl");
        status.success()
    }

    /// Runs a server program, panicking with its output when it fails.
    async fn pg(&self, program: &str, args: &[&str]) {
        let output = self
            .command(program, args)
            .output()
            .await
            .unwrap_or_else(|e| panic!("run {program}: {e}"));
        if !output.status.success() {
            panic!(
                "{program} {args:?} failed: {}{}\n{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr),
                self.log()
            );
        }
    }

    fn command(&self, program: &str, args: &[&str]) -> Command {
        Command::from(self.std_command(program, args))
    }

    fn std_command(&self, program: &str, args: &[&str]) -> StdCommand {
        let program = pg_bin().join(program);
        let mut command = if self.run_as_postgres {
            let mut command = StdCommand::new("runuser");
            command.args(["-u", "postgres", "--"]).arg(program);
            command
        } else {
            StdCommand::new(program)
        };
        // The postgres user may not be allowed into the test's working directory.
        command.args(args).current_dir(self.dir.path());
        command
    }
}

impl Drop for PrivateCluster {
    fn drop(&mut self) {
        let data = self.data_dir();
        let _ = self
            .std_command(
                "pg_ctl",
                &["-D", path_str(&data), "-m", "immediate", "-w", "stop"],
            )
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        // The TempDir removes the directory after this.
    }
}

fn is_root() -> bool {
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

fn chown_to_postgres(path: &Path) {
    let id = |flag: &str| -> u32 {
        let output = StdCommand::new("id")
            .args([flag, "postgres"])
            .output()
            .expect("run id");
        String::from_utf8_lossy(&output.stdout)
            .trim()
            .parse()
            .expect("the postgres user exists")
    };
    std::os::unix::fs::chown(path, Some(id("-u")), Some(id("-g")))
        .unwrap_or_else(|e| panic!("chown {}: {e}", path.display()));
}

fn append(path: &Path, text: &str) {
    use std::io::Write;
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    writeln!(file, "\n# private test cluster\n{text}").expect("write postgresql.conf");
}

fn path_str(path: &Path) -> &str {
    path.to_str().expect("temporary paths are UTF-8")
}

/// A port nothing listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("find a free port")
}

/// Waits until the server at `url` accepts a query, up to `timeout`.
pub async fn wait_for_server(url: &str, timeout: Duration) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    while std::time::Instant::now() < deadline {
        if let Ok((client, connection)) = tokio_postgres::connect(url, tokio_postgres::NoTls).await
        {
            tokio::spawn(connection);
            if client.simple_query("SELECT 1").await.is_ok() {
                return true;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

#[tokio::test]
async fn a_private_cluster_starts_stops_and_restarts_on_its_port() {
    let cluster = PrivateCluster::start(ClusterOptions {
        conf: vec!["application_name = 'from_conf'".to_string()],
        ..ClusterOptions::default()
    })
    .await;
    let url = cluster.create_database("probe").await;
    let client = crate::harness::connect(&url).await;
    let fsync: String = client.query_one("SHOW fsync", &[]).await.unwrap().get(0);
    assert_eq!(fsync, "off");
    let name: String = client
        .query_one("SHOW application_name", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(name, "from_conf", "extra conf lines are applied");

    cluster.stop().await;
    assert!(
        client.simple_query("SELECT 1").await.is_err(),
        "a stopped server ends its sessions"
    );
    assert!(tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .is_err());
    cluster.start_again().await;
    assert!(wait_for_server(&url, Duration::from_secs(5)).await);
    cluster.restart().await;
    assert!(wait_for_server(&url, Duration::from_secs(5)).await);
    let data = cluster.data_dir();
    drop(cluster);
    assert!(!data.exists(), "the cluster's directory is removed");
}
