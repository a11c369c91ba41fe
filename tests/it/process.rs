//! Running the built binary in tests: a scratch directory, a child process whose output is
//! collected line by line, a database and receiver with a config file for them, and a unix
//! datagram socket that receives systemd notifications.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::harness::*;

pub const BIN: &str = env!("CARGO_BIN_EXE_resonance-sync");

/// A scratch directory removed at the end of the test.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new() -> Scratch {
        let dir = std::env::temp_dir().join(format!("rs-ops-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).expect("create a scratch directory");
        Scratch(dir)
    }

    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, text).expect("write a scratch file");
        path
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The binary running as a child process; its output is collected line by line.
pub struct Process {
    pub child: Child,
    pub stdout: Arc<Mutex<Vec<String>>>,
    pub stderr: Arc<Mutex<Vec<String>>>,
}

pub fn collect(stream: impl std::io::Read + Send + 'static) -> Arc<Mutex<Vec<String>>> {
    let lines: Arc<Mutex<Vec<String>>> = Arc::default();
    let sink = lines.clone();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stream).lines() {
            match line {
                Ok(line) => sink.lock().unwrap().push(line),
                Err(_) => return,
            }
        }
    });
    lines
}

impl Process {
    /// Runs `resonance-sync --config <config> <args>` in `dir` with `env` on top of a clean
    /// environment for the daemon's own variables.
    pub fn spawn(dir: &Path, config: &Path, args: &[&str], env: &[(&str, &str)]) -> Process {
        let mut command = Command::new(BIN);
        command
            .current_dir(dir)
            .arg("--config")
            .arg(config)
            .args(args)
            .env("RESONANCE_API_KEY", API_KEY)
            .env("RUST_LOG", "info");
        for name in [
            "NOTIFY_SOCKET",
            "WATCHDOG_USEC",
            "WATCHDOG_PID",
            "DATABASE_URL",
            "RESONANCE_ENDPOINT",
            "RESONANCE_BRAND_ID",
            "CREDENTIALS_DIRECTORY",
            "RESONANCE_SYNC_CONFIG",
        ] {
            command.env_remove(name);
        }
        for (name, value) in env {
            command.env(name, value);
        }
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the binary");
        let stdout = collect(child.stdout.take().expect("stdout"));
        let stderr = collect(child.stderr.take().expect("stderr"));
        Process {
            child,
            stdout,
            stderr,
        }
    }

    pub fn stderr(&self) -> Vec<String> {
        self.stderr.lock().unwrap().clone()
    }

    pub fn stdout(&self) -> Vec<String> {
        self.stdout.lock().unwrap().clone()
    }

    pub fn stderr_has(&self, text: &str) -> bool {
        self.stderr().iter().any(|line| line.contains(text))
    }

    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args(["-s", name, &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -s {name} failed");
    }

    pub fn running(&mut self) -> bool {
        self.child.try_wait().expect("query the child").is_none()
    }

    /// Waits for the process to exit; panics with its stderr after `timeout`.
    pub async fn exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("query the child") {
                // Let the reader threads drain the pipes.
                tokio::time::sleep(Duration::from_millis(50)).await;
                return status;
            }
            if Instant::now() > deadline {
                panic!(
                    "the process did not exit within {timeout:?}; stderr:\n{}",
                    self.stderr().join("\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGTERM, then the exit status.
    pub async fn stop(&mut self) -> ExitStatus {
        self.signal("TERM");
        self.exit(Duration::from_secs(20)).await
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A database with orders, a receiver, and a config file for them.
pub struct Setup {
    pub db: TestDb,
    pub receiver: Receiver,
    pub scratch: Scratch,
    pub config: PathBuf,
}

impl Setup {
    pub async fn new(extra: &str) -> Setup {
        logs();
        let db = TestDb::with_orders().await;
        let receiver = Receiver::start().await;
        let scratch = Scratch::new();
        let text = format!(
            "{}\n{extra}",
            config_text(&db.url, &receiver.endpoint(), "", &orders_mapping("orders"))
        );
        let config = scratch.write("config.toml", &text);
        Setup {
            db,
            receiver,
            scratch,
            config,
        }
    }

    pub fn spawn(&self, args: &[&str], env: &[(&str, &str)]) -> Process {
        Process::spawn(&self.scratch.0, &self.config, args, env)
    }

    pub async fn insert(&self, count: usize) -> Vec<i64> {
        let rows: Vec<(Option<&str>, &str, &str)> = (0..count)
            .map(|_| (Some("ada@example.com"), "12.50", "EUR"))
            .collect();
        self.db.insert_orders(&rows).await
    }

    pub async fn wait_synced(&self, count: usize) {
        wait_until(
            Duration::from_secs(15),
            "the rows are marked synced",
            || async { self.db.synced_ids().await.len() == count },
        )
        .await;
    }
}

/// Notifications received on a unix datagram socket, as systemd would receive them.
pub struct NotifySocket {
    pub path: PathBuf,
    received: Arc<Mutex<Vec<(Instant, String)>>>,
    task: tokio::task::JoinHandle<()>,
}

impl NotifySocket {
    pub fn bind(dir: &Path) -> NotifySocket {
        let path = dir.join("notify.sock");
        let socket = tokio::net::UnixDatagram::bind(&path).expect("bind the notify socket");
        let received: Arc<Mutex<Vec<(Instant, String)>>> = Arc::default();
        let sink = received.clone();
        let task = tokio::spawn(async move {
            let mut buffer = vec![0u8; 4096];
            while let Ok(n) = socket.recv(&mut buffer).await {
                let text = String::from_utf8_lossy(&buffer[..n]).into_owned();
                let now = Instant::now();
                let mut sink = sink.lock().unwrap();
                for line in text.lines() {
                    sink.push((now, line.to_string()));
                }
            }
        });
        NotifySocket {
            path,
            received,
            task,
        }
    }

    pub fn lines(&self) -> Vec<String> {
        self.received
            .lock()
            .unwrap()
            .iter()
            .map(|(_, l)| l.clone())
            .collect()
    }

    pub fn position(&self, line: &str) -> Option<usize> {
        self.lines().iter().position(|l| l == line)
    }

    pub fn pings_since(&self, since: Instant) -> usize {
        self.received
            .lock()
            .unwrap()
            .iter()
            .filter(|(at, l)| *at >= since && l == "WATCHDOG=1")
            .count()
    }

    pub fn last_ping(&self) -> Option<Instant> {
        self.received
            .lock()
            .unwrap()
            .iter()
            .rev()
            .find(|(_, l)| l == "WATCHDOG=1")
            .map(|(at, _)| *at)
    }
}

impl Drop for NotifySocket {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The JSON log lines of a process.
pub fn json_lines(process: &Process) -> Vec<Value> {
    process
        .stderr()
        .iter()
        .map(|line| {
            serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("a log line that is not JSON ({e}): {line}"))
        })
        .collect()
}

pub fn endpoint_address(process: &Process) -> Option<String> {
    json_lines(process).iter().find_map(|line| {
        (line["message"] == "serving /metrics, /healthz and /readyz")
            .then(|| line["address"].as_str().map(str::to_string))
            .flatten()
    })
}
