//! The fault injectors: the real binary as a child process (SIGKILL, SIGTERM, several
//! instances), and a raw TCP front that resets or hangs connections before the receiver.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;

use crate::harness::API_KEY;

/// A temporary directory holding a config file and the logs of the processes run on it.
pub struct Workdir {
    dir: tempfile::TempDir,
}

impl Workdir {
    pub fn new(config_text: &str) -> Workdir {
        let dir = tempfile::Builder::new()
            .prefix("rs_faults_")
            .tempdir()
            .expect("create a work directory");
        std::fs::write(dir.path().join("config.toml"), config_text).expect("write the config");
        Workdir { dir }
    }

    pub fn config(&self) -> PathBuf {
        self.dir.path().join("config.toml")
    }

    /// Starts `resonance-sync --config <config> <args>` with the test API key; its output goes
    /// to `<name>.log` here.
    pub fn spawn(&self, name: &str, args: &[&str]) -> Binary {
        self.spawn_with(name, args, &[])
    }

    /// [`Workdir::spawn`] with extra environment variables.
    pub fn spawn_with(&self, name: &str, args: &[&str], env: &[(&str, &str)]) -> Binary {
        let log = self.dir.path().join(format!("{name}.log"));
        let out = std::fs::File::create(&log).expect("create the process log");
        let err = out.try_clone().expect("clone the log handle");
        let child = binary_command(&self.config(), args)
            .envs(env.iter().copied())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .kill_on_drop(true)
            .spawn()
            .expect("start resonance-sync");
        Binary {
            pid: child.id().expect("a running child has a pid"),
            child,
            log,
        }
    }

    /// Runs `resonance-sync --config <config> <args>` to the end: (exit code, stdout+stderr).
    pub async fn run(&self, args: &[&str]) -> (i32, String) {
        let output = tokio::time::timeout(
            Duration::from_secs(60),
            binary_command(&self.config(), args).output(),
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
}

fn binary_command(config: &Path, args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_resonance-sync"));
    command
        .arg("--config")
        .arg(config)
        .args(args)
        .env("RESONANCE_API_KEY", API_KEY)
        .env("RUST_LOG", "resonance_sync=info")
        .env_remove("DATABASE_URL")
        .env_remove("RESONANCE_ENDPOINT")
        .env_remove("RESONANCE_BRAND_ID")
        .env_remove("CREDENTIALS_DIRECTORY")
        .stdin(Stdio::null());
    command
}

/// The real binary running as a child process.
pub struct Binary {
    pub pid: u32,
    child: Child,
    log: PathBuf,
}

impl Binary {
    /// `kill -9`: no chance to finish anything.
    pub async fn kill9(&mut self) {
        self.child.start_kill().expect("SIGKILL the daemon");
        let _ = self.child.wait().await;
    }

    /// `kill -TERM`, as `systemctl stop` does.
    pub async fn sigterm(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.pid.to_string()])
            .status()
            .await
            .expect("run kill");
        assert!(status.success(), "kill -TERM {}", self.pid);
    }

    /// The exit code, waiting up to `timeout`; `None` when it is still running then.
    pub async fn exit_code(&mut self, timeout: Duration) -> Option<i32> {
        match tokio::time::timeout(timeout, self.child.wait()).await {
            Ok(status) => Some(status.expect("wait for the daemon").code().unwrap_or(-1)),
            Err(_) => None,
        }
    }

    /// What it printed so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// What the TCP front does with a new connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Accept, then close with a TCP reset before answering.
    Reset,
    /// Accept, read the request, and never answer.
    Hang,
    /// Pass the connection through to the receiver.
    Forward,
}

/// A raw TCP listener in front of a receiver that resets, hangs or forwards connections.
pub struct FaultProxy {
    pub addr: SocketAddr,
    fault: Arc<Mutex<Fault>>,
    accepted: Arc<AtomicUsize>,
    stop: CancellationToken,
}

impl FaultProxy {
    pub async fn start(target: SocketAddr, fault: Fault) -> FaultProxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the fault proxy");
        let proxy = FaultProxy {
            addr: listener.local_addr().expect("proxy address"),
            fault: Arc::new(Mutex::new(fault)),
            accepted: Arc::default(),
            stop: CancellationToken::new(),
        };
        let (mode, accepted, stop) = (
            proxy.fault.clone(),
            proxy.accepted.clone(),
            proxy.stop.clone(),
        );
        tokio::spawn(async move {
            loop {
                let stream = tokio::select! {
                    _ = stop.cancelled() => return,
                    accepted = listener.accept() => match accepted {
                        Ok((stream, _)) => stream,
                        Err(_) => continue,
                    },
                };
                accepted.fetch_add(1, Ordering::SeqCst);
                let fault = *mode.lock().unwrap();
                tokio::spawn(serve(stream, fault, target, stop.clone()));
            }
        });
        proxy
    }

    pub fn set(&self, fault: Fault) {
        *self.fault.lock().unwrap() = fault;
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}/resonance-api/manual-event", self.addr)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn serve(
    mut stream: tokio::net::TcpStream,
    fault: Fault,
    target: SocketAddr,
    stop: CancellationToken,
) {
    use tokio::io::AsyncReadExt;
    match fault {
        Fault::Reset => {
            let _ = stream.set_zero_linger();
            drop(stream);
        }
        Fault::Hang => {
            let mut sink = vec![0u8; 16 * 1024];
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    read = stream.read(&mut sink) => if matches!(read, Ok(0) | Err(_)) { return },
                }
            }
        }
        Fault::Forward => {
            if let Ok(mut upstream) = tokio::net::TcpStream::connect(target).await {
                tokio::select! {
                    _ = stop.cancelled() => {}
                    _ = tokio::io::copy_bidirectional(&mut stream, &mut upstream) => {}
                }
            }
        }
    }
}
