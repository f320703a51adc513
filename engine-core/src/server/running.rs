//! Our llama-server child: spawn it with CineCut's flags, prove it is ready *and ours*, stop it.
//! Nothing else: the order of stop, VRAM wait and lock release belongs to the engine.

use std::os::fd::RawFd;
use std::process::Command;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use super::client::Client;
use super::command::{ServerSpec, check_model_files};
use super::error::{ServerDeath, StartError};
use super::log::open_log;
use super::offers::offers;
use super::port::free_port;
use super::ready::{StartFailure, Starting};
use crate::process::{Scope, Stopped, SupervisedChild};
use crate::util::{hex128, unpoisoned};
use crate::wait::Wait;

/// How many lines of the server's output an error carries.
const TAIL_LINES: usize = 20;

/// How the server's log ends the line it writes right after it turns ready: 11434's `0.00.035.951 I
/// srv  llama_server: model loaded`, 9093's `main: model loaded` (docs/real-server.md; the contract
/// suite checks that the real servers still write it, once ready). Readiness wakes on it instead of
/// waiting for the next poll; the wake is confirmed by `/health`, so a line that came early costs
/// one request, and a build that writes no such line is found by the poll.
const READY_LINE: &str = ": model loaded";

/// A running llama-server that answered ready and proved it is ours.
pub(crate) struct Server {
    child: SupervisedChild,
    client: Client,
    port: u16,
    api_key: String,
    /// Set once the child is found dead while we still needed it.
    died: Mutex<Option<ServerDeath>>,
    /// Set by `abort`: a death that follows was asked for.
    aborted: AtomicBool,
    /// Whether it reads local frames itself (`--media-path /`): they are sent as `file://`.
    reads_files: bool,
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
    /// holding `lock_fd` (the GPU lock) until the tree is gone, and waits until it is ready (as long
    /// as `wait` allows). On any failure the child's tree is stopped and reaped before the error,
    /// complete with the server's last output lines, is returned.
    pub(crate) fn start(
        spec: &ServerSpec,
        visible_gpu: &str,
        lock_fd: Option<RawFd>,
        wait: Wait,
    ) -> Result<Server, StartError> {
        check_model_files(&spec.model, spec.mmproj.as_deref())?;
        let port = free_port(spec.port)?;
        let program = spec.program.clone();
        let api_key = hex128().map_err(|source| StartError::Spawn {
            program: program.clone(),
            source,
        })?;
        let log = match &spec.debug_log {
            Some(path) => Some(open_log(path)?),
            None => None,
        };
        // A vision server that offers --media-path reads local frames itself: no encode, no copy
        // through HTTP. The folder is the root: the server runs as us and can read our files
        // anyway, and only a holder of this engine's API key can ask it to.
        let offered = offers(&program);
        let reads_files = spec.mmproj.is_some() && spec.offer_files && offered.media_path;
        let mut command = Command::new(&program);
        command.args(spec.args(port));
        if reads_files {
            command.args(["--media-path", "/"]);
        }
        // The prompt cache keeps a slot's KV in host memory for a later prompt that starts the
        // same way. Every frame is a new image, so nothing is taken back from it (a retry's slot
        // still holds its own KV); but the server copies the KV of the slot a request takes out of
        // VRAM into it (about 400 MiB for a 7B frame) in its one main loop, and evicts to stay
        // under 8 GiB, while every other slot waits. Off unless the caller sizes it.
        if offered.cache_ram && !spec.sets_cache_ram() {
            command.args(["--cache-ram", "0"]);
        }
        command
            .envs(spec.env.iter().map(|(k, v)| (k, v)))
            // The server sees only the GPU we locked (llama-server spreads over every GPU it sees).
            .env("CUDA_VISIBLE_DEVICES", visible_gpu)
            // The key goes through the environment, never argv (argv is world-readable in /proc).
            .env("LLAMA_API_KEY", &api_key);
        let scope = Scope::Tree {
            keep_fd: lock_fd,
            ready_line: Some(READY_LINE),
        };
        let child = SupervisedChild::spawn(command, log, scope).map_err(|source| {
            if source.kind() == std::io::ErrorKind::NotFound {
                StartError::ServerNotFound {
                    program: program.clone(),
                }
            } else {
                StartError::Spawn {
                    program: program.clone(),
                    source,
                }
            }
        })?;
        tracing::info!(pid = child.command_pid(), keeper = child.pid(), port, program = %program.display(), "llama-server spawned");
        let server = Server {
            child,
            client: Client::new(port, &api_key, spec.slots),
            port,
            api_key,
            died: Mutex::new(None),
            aborted: AtomicBool::new(false),
            reads_files,
        };
        let starting = Starting {
            child: &server.child,
            client: &server.client,
            port,
            model: &spec.model,
        };
        let ready = starting.wait_ready(spec.health_poll_interval, spec.startup_timeout, wait);
        let failure = match ready {
            Ok(()) => return Ok(server),
            Err(failure) => failure,
        };
        let stopped = server.child.stop(spec.stop_grace);
        server
            .child
            .output()
            .wait_closed(Duration::from_millis(500));
        let output_tail = server.child.output().tail(TAIL_LINES);
        let error = match failure {
            StartFailure::Exited(status) => StartError::ExitedDuringStartup {
                status,
                output_tail,
            },
            StartFailure::Timeout {
                timeout,
                last_health,
            } => StartError::Timeout {
                timeout,
                last_health,
                output_tail,
            },
            StartFailure::Cancelled => StartError::Cancelled,
            StartFailure::Error(e) => e,
        };
        tracing::warn!(exit = ?stopped.exit, error = %error, "llama-server failed to start");
        Err(error)
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

    /// If the child has exited (waiting up to `wait` for an exit under way), how it died;
    /// remembered, so that every later call fails the same way at once.
    pub(crate) fn death(&self, wait: Duration) -> Option<ServerDeath> {
        let mut died = unpoisoned(&self.died);
        if died.is_none() {
            let status = self.child.wait_timeout(wait)?;
            self.child.output().wait_closed(Duration::from_millis(200));
            let output_tail = self.child.output().tail(TAIL_LINES);
            tracing::error!(pid = self.child.pid(), %status, "llama-server died");
            *died = Some(ServerDeath::new(status, output_tail));
        }
        died.clone()
    }

    /// Starts killing the server's tree and returns at once: requests in flight end with it. The
    /// stop that follows (or drop) reaps it.
    pub(crate) fn abort(&self) {
        tracing::warn!(pid = self.child.pid(), "llama-server aborted");
        self.aborted.store(true, Ordering::Release);
        self.child.start_kill();
    }

    /// Whether the server reads local frames itself (they go as `file://` references).
    pub(crate) fn reads_files(&self) -> bool {
        self.reads_files
    }

    /// Whether [`Server::abort`] was called.
    pub(crate) fn aborted(&self) -> bool {
        self.aborted.load(Ordering::Acquire)
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
