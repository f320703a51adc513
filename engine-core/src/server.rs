//! Our llama-server child: spawn with the seed's flags, wait until it is ready *and ours*, stop it.

use std::fs::File;
use std::io::Read;
use std::net::TcpListener;
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::client::{Client, Health};
use crate::config::EngineConfig;
use crate::error::{InferenceError, truncate};
use crate::process::{Escalation, SupervisedChild, describe_status, lock};
use crate::vram::{VramReading, VramRecovery, wait_for_recovery};

/// How many lines of the server's output an error carries.
const TAIL_LINES: usize = 20;

/// How one stop of the server went.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ShutdownReport {
    /// The server's pid.
    pub pid: u32,
    /// Its exit code or signal, in words.
    pub status: String,
    /// How far the stop had to escalate.
    pub escalation: Escalation,
    /// From the first signal to reaped.
    pub took: Duration,
    /// Whether free VRAM came back before the GPU lock was released.
    pub vram: VramRecovery,
}

/// A running llama-server that answered healthy and proved it is ours.
#[derive(Debug)]
pub(crate) struct Server {
    child: SupervisedChild,
    client: Client,
    port: u16,
    api_key: String,
    /// For the VRAM recovery wait after stop.
    config: EngineConfig,
    before: VramReading,
    /// Set once the child is found dead while we still needed it.
    died: Mutex<Option<(String, String)>>,
}

impl Server {
    /// Spawns the server and waits until it is ready. On any failure the child is stopped and reaped
    /// before the error is returned.
    pub(crate) fn start(
        config: &EngineConfig,
        before: VramReading,
    ) -> Result<Server, InferenceError> {
        config.validate().map_err(InferenceError::Config)?;
        for (what, path) in [("model", &config.model), ("mmproj", &config.mmproj)] {
            if !path.is_file() {
                return Err(InferenceError::ModelNotFound {
                    what,
                    path: path.clone(),
                });
            }
        }
        let port = reserve_port(config.port)?;
        let api_key = random_key();
        let log = if config.debug {
            let path = config.debug_log_path();
            Some(File::create(&path).map_err(|source| InferenceError::LogFile { path, source })?)
        } else {
            None
        };
        let program = config.resolved_server_bin();
        let mut command = Command::new(&program);
        command
            .args(config.server_args(port))
            .envs(config.env.iter().map(|(k, v)| (k, v)))
            // The key goes through the environment, never argv (argv is world-readable in /proc).
            .env("LLAMA_API_KEY", &api_key);
        let child = SupervisedChild::spawn(command, log).map_err(|source| {
            if source.kind() == std::io::ErrorKind::NotFound {
                InferenceError::ServerNotFound {
                    program: program.clone(),
                }
            } else {
                InferenceError::Spawn {
                    program: program.clone(),
                    source,
                }
            }
        })?;
        tracing::info!(pid = child.pid(), port, program = %program.display(), "llama-server spawned");
        let server = Server {
            child,
            client: Client::new(port, &api_key, config.slots),
            port,
            api_key,
            config: config.clone(),
            before,
            died: Mutex::new(None),
        };
        match server.wait_ready(config) {
            Ok(()) => Ok(server),
            Err(e) => {
                let (status, _) = server.child.stop(config.stop_grace);
                // Reaped: Drop has nothing left to stop.
                tracing::warn!(status = %describe_status(status), error = %e, "llama-server failed to start");
                Err(server.with_tail(e))
            }
        }
    }

    /// Polls `/health` every `health_poll_interval` until 200 `{"status":"ok"}`, then proves the answer
    /// came from our child (alive, and its authenticated `/props` names our model). The child's exit
    /// ends the wait at once.
    fn wait_ready(&self, config: &EngineConfig) -> Result<(), InferenceError> {
        let started = Instant::now();
        let deadline = started + config.startup_timeout;
        // The last answer /health gave says more than the last connection error, so keep both.
        let mut last_answer: Option<String> = None;
        let mut last_failure = String::from("no answer yet");
        loop {
            if let Some(status) = self.child.status() {
                return Err(InferenceError::ExitedDuringStartup {
                    status: describe_status(status),
                    output_tail: String::new(),
                });
            }
            let poll_timeout = deadline
                .saturating_duration_since(Instant::now())
                .clamp(Duration::from_millis(1), Duration::from_millis(500));
            match self.client.health(poll_timeout) {
                Health::Ready => match self.check_ours(config, poll_timeout)? {
                    None => {
                        tracing::info!(pid = self.child.pid(), port = self.port, elapsed = ?started.elapsed(), "llama-server healthy");
                        return Ok(());
                    }
                    Some(why) => last_answer = Some(why),
                },
                Health::NotReady(why) => last_answer = Some(why),
                Health::Unreachable(why) => last_failure = why,
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(InferenceError::StartupTimeout {
                    timeout: config.startup_timeout,
                    last_health: last_answer.unwrap_or(last_failure),
                    output_tail: String::new(),
                });
            }
            // Sleeps until the next poll, or wakes the moment the child exits.
            self.child
                .wait_timeout(config.health_poll_interval.min(left));
        }
    }

    /// `Ok(None)`: the healthy answer is our child's. `Ok(Some(why))`: not sure yet, poll again.
    fn check_ours(
        &self,
        config: &EngineConfig,
        timeout: Duration,
    ) -> Result<Option<String>, InferenceError> {
        let reply = match self.client.get("/props", timeout) {
            Ok(reply) => reply,
            Err(e) => return Ok(Some(format!("/props: {e}"))),
        };
        if self.child.status().is_some() {
            return Ok(Some("our server exited while another answered".into()));
        }
        let stranger = |detail: String| InferenceError::PortInUse {
            port: self.port,
            detail,
        };
        match reply.status {
            200 => {
                let props: serde_json::Value =
                    serde_json::from_str(&reply.body).unwrap_or_default();
                let served = props.get("model_path").and_then(|v| v.as_str());
                let ours = config.model.to_string_lossy();
                match served {
                    Some(path) if path == ours => Ok(None),
                    Some(path) => Err(stranger(format!("it serves model {path}, not {ours}"))),
                    None => Err(stranger(format!(
                        "its /props has no model_path: {}",
                        truncate(&reply.body, 200)
                    ))),
                }
            }
            401 | 403 => Err(stranger("it refused this engine's API key".into())),
            status => Ok(Some(format!(
                "/props answered HTTP {status} {}",
                truncate(reply.body.trim(), 200)
            ))),
        }
    }

    /// Adds the server's last output lines to a startup error (waiting briefly for the pipes to close).
    fn with_tail(&self, error: InferenceError) -> InferenceError {
        self.child.output().wait_closed(Duration::from_millis(500));
        let tail = self.child.output().tail(TAIL_LINES);
        match error {
            InferenceError::ExitedDuringStartup { status, .. } => {
                InferenceError::ExitedDuringStartup {
                    status,
                    output_tail: tail,
                }
            }
            InferenceError::StartupTimeout {
                timeout,
                last_health,
                ..
            } => InferenceError::StartupTimeout {
                timeout,
                last_health,
                output_tail: tail,
            },
            other => other,
        }
    }

    pub(crate) fn client(&self) -> &Client {
        &self.client
    }

    pub(crate) fn port(&self) -> u16 {
        self.port
    }

    pub(crate) fn api_key(&self) -> &str {
        &self.api_key
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.pid()
    }

    /// If the child has exited (waiting up to `wait` for an exit under way), the error that says so;
    /// remembered, so that every later call fails the same way at once.
    pub(crate) fn death(&self, wait: Duration) -> Option<InferenceError> {
        let mut died = lock(&self.died);
        if died.is_none() {
            let status = self.child.wait_timeout(wait)?;
            self.child.output().wait_closed(Duration::from_millis(200));
            let tail = self.child.output().tail(TAIL_LINES);
            tracing::error!(pid = self.child.pid(), status = %describe_status(status), "llama-server died");
            *died = Some((describe_status(status), tail));
        }
        died.as_ref()
            .map(|(status, output_tail)| InferenceError::ServerDied {
                frame: None,
                status: status.clone(),
                output_tail: output_tail.clone(),
            })
    }

    /// Stops the server (TERM, TERM, KILL within the grace period), reaps it, and waits (bounded) for
    /// free VRAM to come back.
    pub(crate) fn stop(&mut self) -> ShutdownReport {
        self.client.close_connections();
        let started = Instant::now();
        let (status, escalation) = self.child.stop(self.config.stop_grace);
        let took = started.elapsed();
        tracing::info!(pid = self.child.pid(), status = %describe_status(status), ?escalation, ?took, "llama-server stopped");
        ShutdownReport {
            pid: self.child.pid(),
            status: describe_status(status),
            escalation,
            took,
            vram: wait_for_recovery(&self.config, self.before),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if self.child.status().is_none() {
            self.stop();
        }
    }
}

/// Checks that `port` is free on 127.0.0.1 (0: picks a free one) and returns it.
fn reserve_port(port: u16) -> Result<u16, InferenceError> {
    match TcpListener::bind(("127.0.0.1", port)) {
        Ok(listener) => listener
            .local_addr()
            .map(|a| a.port())
            .map_err(|e| InferenceError::Config(format!("cannot read the picked port: {e}"))),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => Err(InferenceError::PortInUse {
            port,
            detail: "another program is listening on it".into(),
        }),
        Err(e) => Err(InferenceError::Config(format!(
            "cannot listen on 127.0.0.1:{port}: {e} — choose another port (0 picks a free one)"
        ))),
    }
}

/// A fresh random API key (128 bits, hex).
fn random_key() -> String {
    let mut bytes = [0u8; 16];
    let read = File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut bytes));
    if read.is_err() {
        // No /dev/urandom (a strange chroot): fall back to time and pid, still unguessable enough
        // for a loopback-only server that lives for one run.
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default()
            ^ u128::from(std::process::id()) << 64;
        bytes = seed.to_le_bytes();
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
