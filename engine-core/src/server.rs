//! Our llama-server child: spawn it with the seed's flags, prove it is ready *and ours*, stop it.
//! Nothing else: the order of stop, VRAM wait and lock release belongs to the engine.

use std::fs::{File, OpenOptions};
use std::net::TcpListener;
use std::os::fd::RawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::process::Command;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::client::{Client, Health};
use crate::config::EngineConfig;
use crate::error::InferenceError;
use crate::process::{ChildExit, Stopped, SupervisedChild};
use crate::sync::lock;
use crate::text::truncate;

/// How many lines of the server's output an error carries.
const TAIL_LINES: usize = 20;

/// Why a start failed, before the server's output is added to make the error complete.
enum StartFailure {
    Exited(ChildExit),
    Cancelled,
    Timeout { last_health: String },
    Error(InferenceError),
}

/// What a healthy `/health` answer turned out to be.
enum Ownership {
    /// Our child answered: authenticated `/props` names our model, and unauthenticated is refused.
    Ours,
    /// Not sure yet (the answer raced our child's exit, `/props` still loading, …): poll again.
    NotYet(String),
}

/// How our server died, remembered so every later call fails the same way.
#[derive(Debug, Clone)]
struct Death {
    status: ChildExit,
    output_tail: String,
}

/// A running llama-server that answered healthy and proved it is ours.
pub(crate) struct Server {
    child: SupervisedChild,
    client: Client,
    port: u16,
    api_key: String,
    /// Set once the child is found dead while we still needed it.
    died: Mutex<Option<Death>>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the API key: a Debug print ends up in logs.
        f.debug_struct("Server")
            .field("pid", &self.child.pid())
            .field("port", &self.port)
            .field("api_key", &"<redacted>")
            .finish_non_exhaustive()
    }
}

impl Server {
    /// Spawns the server, showing it only GPU `visible_gpu` (`CUDA_VISIBLE_DEVICES`), its keeper
    /// holding `lock_fd` (the GPU lock) until the tree is gone, and waits until it is ready. On any failure the child's tree is stopped and reaped before the error, complete
    /// with the server's last output lines, is returned.
    pub(crate) fn start(
        config: &EngineConfig,
        visible_gpu: &str,
        lock_fd: Option<RawFd>,
        cancel: Option<&AtomicBool>,
    ) -> Result<Server, InferenceError> {
        config.check_model_files()?;
        let port = reserve_port(config.port())?;
        let program = config.server_bin();
        let api_key = crate::random::hex128().map_err(|source| InferenceError::Spawn {
            program: program.clone(),
            source,
        })?;
        let log = if config.debug() {
            Some(open_log(&config.debug_log_path())?)
        } else {
            None
        };
        let mut command = Command::new(&program);
        command
            .args(config.server_args(port))
            .envs(config.env().iter().map(|(k, v)| (k, v)))
            // The server sees only the GPU we locked (llama-server spreads over every GPU it sees).
            .env("CUDA_VISIBLE_DEVICES", visible_gpu)
            // The key goes through the environment, never argv (argv is world-readable in /proc).
            .env("LLAMA_API_KEY", &api_key);
        let child =
            SupervisedChild::spawn_tree_keeping(command, log, lock_fd).map_err(|source| {
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
        tracing::info!(pid = child.command_pid(), keeper = child.pid(), port, program = %program.display(), "llama-server spawned");
        let server = Server {
            child,
            client: Client::new(port, &api_key, config.slots()),
            port,
            api_key,
            died: Mutex::new(None),
        };
        let failure = match server.wait_ready(config, cancel) {
            Ok(()) => return Ok(server),
            Err(failure) => failure,
        };
        let stopped = server.child.stop(config.stop_grace());
        server
            .child
            .output()
            .wait_closed(Duration::from_millis(500));
        let output_tail = server.child.output().tail(TAIL_LINES);
        let error = match failure {
            StartFailure::Exited(status) => InferenceError::ExitedDuringStartup {
                status,
                output_tail,
            },
            StartFailure::Timeout { last_health } => InferenceError::StartupTimeout {
                timeout: config.startup_timeout(),
                last_health,
                output_tail,
            },
            StartFailure::Cancelled => InferenceError::StartCancelled,
            StartFailure::Error(e) => e,
        };
        tracing::warn!(exit = ?stopped.exit, error = %error, "llama-server failed to start");
        Err(error)
    }

    /// Polls `/health` every `health_poll_interval` until 200 `{"status":"ok"}`, then proves the answer
    /// came from our child. The child's exit ends the wait at once.
    fn wait_ready(
        &self,
        config: &EngineConfig,
        cancel: Option<&AtomicBool>,
    ) -> Result<(), StartFailure> {
        let started = Instant::now();
        let deadline = started + config.startup_timeout();
        // The last answer /health gave says more than the last connection error, so keep both.
        let mut last_answer: Option<String> = None;
        let mut last_failure = String::from("no answer yet");
        loop {
            if let Some(status) = self.child.status() {
                return Err(StartFailure::Exited(status));
            }
            if cancel.is_some_and(|c| c.load(Ordering::Acquire)) {
                return Err(StartFailure::Cancelled);
            }
            let poll_timeout = deadline
                .saturating_duration_since(Instant::now())
                .clamp(Duration::from_millis(1), Duration::from_millis(500));
            match self.client.health(poll_timeout) {
                Health::Ready => match self.ownership(config.model(), poll_timeout) {
                    Ok(Ownership::Ours) => {
                        tracing::info!(pid = self.child.pid(), port = self.port, elapsed = ?started.elapsed(), "llama-server healthy");
                        return Ok(());
                    }
                    Ok(Ownership::NotYet(why)) => last_answer = Some(why),
                    Err(stranger) => return Err(StartFailure::Error(stranger)),
                },
                Health::NotReady(why) => last_answer = Some(why),
                Health::Unreachable(why) => last_failure = why,
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(StartFailure::Timeout {
                    last_health: last_answer.unwrap_or(last_failure),
                });
            }
            // Sleeps until the next poll, or wakes the moment the child exits.
            self.child
                .wait_timeout(config.health_poll_interval().min(left));
        }
    }

    /// Whether the server that answered healthy is our child: still alive, its authenticated
    /// `/props` names our model, and it refuses a request without our key (a squatter that enforces
    /// no key could otherwise pass by naming our model).
    fn ownership(&self, model: &Path, timeout: Duration) -> Result<Ownership, InferenceError> {
        let reply = match self.client.get("/props", timeout) {
            Ok(reply) => reply,
            Err(e) => return Ok(Ownership::NotYet(format!("/props: {e}"))),
        };
        if self.child.status().is_some() {
            return Ok(Ownership::NotYet(
                "our server exited while another answered".into(),
            ));
        }
        let stranger = |detail: String| InferenceError::PortInUse {
            port: self.port,
            detail,
        };
        match reply.status {
            200 => {}
            401 | 403 => return Err(stranger("it refused this engine's API key".into())),
            status => {
                return Ok(Ownership::NotYet(format!(
                    "/props answered HTTP {status} {}",
                    truncate(reply.body.trim(), 200)
                )));
            }
        }
        let props: serde_json::Value = serde_json::from_str(&reply.body).unwrap_or_default();
        let ours = model.to_string_lossy();
        match props.get("model_path").and_then(|v| v.as_str()) {
            Some(path) if path == ours => {}
            Some(path) => return Err(stranger(format!("it serves model {path}, not {ours}"))),
            None => {
                return Err(stranger(format!(
                    "its /props has no model_path: {}",
                    truncate(&reply.body, 200)
                )));
            }
        }
        match self.client.get_without_key("/props", timeout) {
            Ok(reply) if reply.status == 401 => Ok(Ownership::Ours),
            Ok(reply) => Err(stranger(format!(
                "it answered /props without an API key (HTTP {}), so it does not hold the key this \
                 engine gave its server",
                reply.status
            ))),
            Err(e) => Ok(Ownership::NotYet(format!("/props without a key: {e}"))),
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

    /// The server's pid (the keeper's child).
    pub(crate) fn pid(&self) -> u32 {
        self.child.command_pid()
    }

    /// If the child has exited (waiting up to `wait` for an exit under way), the error that says so;
    /// remembered, so that every later call fails the same way at once.
    pub(crate) fn death(&self, wait: Duration) -> Option<InferenceError> {
        let mut died = lock(&self.died);
        if died.is_none() {
            let status = self.child.wait_timeout(wait)?;
            self.child.output().wait_closed(Duration::from_millis(200));
            let output_tail = self.child.output().tail(TAIL_LINES);
            tracing::error!(pid = self.child.pid(), %status, "llama-server died");
            *died = Some(Death {
                status,
                output_tail,
            });
        }
        died.as_ref().map(|death| InferenceError::ServerDied {
            during: None,
            status: death.status,
            output_tail: death.output_tail.clone(),
        })
    }

    /// Stops the server and its process tree (TERM, TERM, KILL within `grace`, then a bounded wait)
    /// and reaps it. Pooled connections are closed first, so the server has no client to wait for.
    pub(crate) fn stop(&mut self, grace: Duration) -> Stopped {
        self.client.close_connections();
        let stopped = self.child.stop(grace);
        tracing::info!(pid = self.child.pid(), exit = ?stopped.exit, escalation = ?stopped.escalation, "llama-server stopped");
        stopped
    }
}

/// Opens the debug log: a regular file only (never through a symlink, which could point the
/// server's output anywhere), readable by its owner only (the log may show prompts and paths).
fn open_log(path: &Path) -> Result<File, InferenceError> {
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
        .open(path)
        .map_err(|source| InferenceError::LogFile {
            path: path.to_path_buf(),
            source,
        })?;
    let meta = file.metadata().map_err(|source| InferenceError::LogFile {
        path: path.to_path_buf(),
        source,
    })?;
    // An existing log keeps its old mode through open(2): narrow it.
    use std::os::unix::fs::PermissionsExt;
    let _ = file.set_permissions(std::fs::Permissions::from_mode(0o600));
    if !meta.is_file() {
        return Err(InferenceError::LogFile {
            path: path.to_path_buf(),
            source: std::io::Error::other("not a regular file"),
        });
    }
    Ok(file)
}

/// Checks that `port` is free on 127.0.0.1 (0: picks a free one) and returns it.
fn reserve_port(port: u16) -> Result<u16, InferenceError> {
    match TcpListener::bind(("127.0.0.1", port)) {
        Ok(listener) => listener
            .local_addr()
            .map(|a| a.port())
            .map_err(|source| InferenceError::Listen { port, source }),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => Err(InferenceError::PortInUse {
            port,
            detail: "another program is listening on it".into(),
        }),
        Err(source) => Err(InferenceError::Listen { port, source }),
    }
}
