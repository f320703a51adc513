//! What starting a server ([`StartError`]) and answering a request ([`RequestError`]) can fail
//! with, how a server died ([`ServerDeath`]), and [`EngineError`], any error of the lifecycle.
//! Every message names what failed, with which value, and what to do; a setting that fixes it is
//! named in backticks (`` `ctx_size` ``), which each front end words in its own terms
//! ([`crate::config::Setting::reword`]).

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use crate::process::ChildExit;
use crate::request::Subject;

pub use crate::config::ConfigError;
pub use crate::gpu::{LockError, VramError};
pub use crate::request::{SchemaError, SchemaViolation};
pub use crate::shard::ShardError;

/// Which of the two model files a message is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelRole {
    /// The language model (`-m`).
    Model,
    /// The vision projector (`--mmproj`).
    Mmproj,
}

impl fmt::Display for ModelRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ModelRole::Model => "model",
            ModelRole::Mmproj => "mmproj",
        })
    }
}

/// How the server died: its exit and its last output lines.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("llama-server died ({status}){}", tail_suffix(.output_tail))]
#[non_exhaustive]
pub struct ServerDeath {
    /// Its exit code or signal.
    pub status: ChildExit,
    /// The last lines it printed.
    pub output_tail: String,
}

impl ServerDeath {
    pub(crate) fn new(status: ChildExit, output_tail: String) -> Self {
        ServerDeath {
            status,
            output_tail,
        }
    }
}

/// Starting llama-server failed. Whatever was started was stopped and reaped first.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The port could not be listened on for another reason than being taken.
    #[error(
        "cannot listen on 127.0.0.1:{port}: {source} — choose another `port` (0 picks a free one)"
    )]
    Listen {
        /// The port.
        port: u16,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The model or mmproj file does not exist.
    #[error("{role} file not found: {} — check the path (it is passed to llama-server as given)", path.display())]
    ModelNotFound {
        /// Which file.
        role: ModelRole,
        /// The missing path.
        path: PathBuf,
    },
    /// The model or mmproj file is not what llama-server can load in that role (not GGUF, a
    /// projector given as the model, an mmproj without `clip.projector_type`, ...).
    #[error("{role} file {}: {reason}", path.display())]
    BadModel {
        /// Which file.
        role: ModelRole,
        /// The file.
        path: PathBuf,
        /// What is wrong with it, and what to do.
        reason: String,
    },
    /// The llama-server program does not exist.
    #[error(
        "llama-server not found at {} — install llama.cpp's llama-server, put it on PATH, or set \
         LLAMA_SERVER (`server_bin`) to its path", program.display()
    )]
    ServerNotFound {
        /// The program that was looked for.
        program: PathBuf,
    },
    /// The llama-server program could not be started.
    #[error("could not start {}: {source}", program.display())]
    Spawn {
        /// The program.
        program: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The port is taken, or the server answering on it is not our child.
    #[error(
        "port {port} is served by another process ({detail}) — stop it or choose another `port` (0 picks a free one)"
    )]
    PortInUse {
        /// The port.
        port: u16,
        /// How we found out.
        detail: String,
    },
    /// The child exited before it became ready.
    #[error("llama-server exited during startup ({status}) — check model path and VRAM{}", tail_suffix(.output_tail))]
    ExitedDuringStartup {
        /// Exit code or signal.
        status: ChildExit,
        /// The last lines the server printed.
        output_tail: String,
    },
    /// The caller gave up waiting (its [`crate::Wait`] ended) while the server loaded; the server
    /// was stopped and reaped.
    #[error("llama-server's start was cancelled; the server was stopped")]
    Cancelled,
    /// The child did not become ready in time; it was stopped and reaped.
    #[error(
        "llama-server did not become ready within {timeout:?} (last health answer: {last_health}); it \
         was stopped — raise `startup_timeout` for large models{}", tail_suffix(.output_tail)
    )]
    Timeout {
        /// How long it was given.
        timeout: Duration,
        /// What /health said last.
        last_health: String,
        /// The last lines the server printed.
        output_tail: String,
    },
    /// The log file (debug mode) could not be opened.
    #[error(
        "could not open the llama-server log {}: {source} — it must be a regular file (never a \
         symlink) in a folder you can write", path.display()
    )]
    LogFile {
        /// The log path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// A request could not be answered. One failed request leaves the engine usable, unless the
/// server died ([`RequestError::ServerDied`]).
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// The server died; every later request of this engine fails the same way at once.
    #[error(
        "llama-server died ({}){} — the engine is unusable; start a new one{}",
        death.status,
        during.as_ref().map(|s| format!(" while answering {s}")).unwrap_or_default(),
        tail_suffix(&death.output_tail)
    )]
    ServerDied {
        /// The frame or request being answered when the death was found, if any.
        during: Option<Subject>,
        /// How it died.
        death: ServerDeath,
    },
    /// An image (a keyframe) was refused before contacting the server.
    #[error("frame {}: {reason}", path.display())]
    BadImage {
        /// The image's path.
        path: PathBuf,
        /// What is wrong and what to do.
        reason: String,
    },
    /// A request was refused before contacting the server: a sampling value out of range, images
    /// for a text-only model, nothing to send.
    #[error("{subject}: {reason}")]
    InvalidPrompt {
        /// The request.
        subject: Subject,
        /// What is wrong and what to do.
        reason: String,
    },
    /// The server answered with an HTTP error.
    #[error("{subject}: llama-server answered HTTP {status}: {body}")]
    Http {
        /// The frame or request.
        subject: Subject,
        /// The HTTP status.
        status: u16,
        /// The body (truncated).
        body: String,
    },
    /// No answer within the per-request timeout.
    #[error("{subject}: no answer from llama-server within {timeout:?} — raise `request_timeout`")]
    Timeout {
        /// The frame or request.
        subject: Subject,
        /// The per-request timeout.
        timeout: Duration,
    },
    /// The request failed at the transport level (the server alive).
    #[error("{subject}: request to llama-server failed: {source}")]
    Transport {
        /// The frame or request.
        subject: Subject,
        /// The transport's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// Every attempt returned output that does not match the schema.
    #[error(
        "{subject}: no valid {schema} after {} attempt(s): {}",
        attempts.len(),
        attempts.join("; ")
    )]
    InvalidOutput {
        /// The frame or request.
        subject: Subject,
        /// The schema's name.
        schema: String,
        /// Each attempt's reason, with the raw text (truncated).
        attempts: Vec<String>,
    },
    /// The request does not fit the slot's context: the same request would fail the same way, so it
    /// is not retried.
    #[error(
        "{subject}: {detail} — raise the context per slot (`ctx_size`; the server gets ctx_size × \
         slots), or lower `max_tokens`"
    )]
    ContextExhausted {
        /// The frame or request.
        subject: Subject,
        /// What the server said.
        detail: String,
    },
    /// The item was never sent: every server died before it (the batch's last death is named).
    #[error(
        "{subject}: not attempted — every server died before it (the last with {})",
        last_death.status
    )]
    NoServerLeft {
        /// The frame or request.
        subject: Subject,
        /// The last server's death.
        last_death: ServerDeath,
    },
    /// The item was never sent: the caller stopped the batch before it.
    #[error("{subject}: not attempted — the batch was stopped before it")]
    Cancelled {
        /// The frame or request.
        subject: Subject,
    },
}

impl RequestError {
    /// Names `subject` in a [`RequestError::ServerDied`] that names none yet.
    pub(crate) fn during(self, subject: &Subject) -> Self {
        match self {
            RequestError::ServerDied {
                during: None,
                death,
            } => RequestError::ServerDied {
                during: Some(subject.clone()),
                death,
            },
            other => other,
        }
    }

    /// Whether the item was never sent to a server (the batch stopped, or no server was left).
    pub fn not_attempted(&self) -> bool {
        matches!(
            self,
            RequestError::Cancelled { .. } | RequestError::NoServerLeft { .. }
        )
    }
}

pub(crate) fn tail_suffix(tail: &str) -> String {
    if tail.trim().is_empty() {
        String::new()
    } else {
        format!("; last output:\n{tail}")
    }
}

/// Any error of the engine's lifecycle, for callers that run all steps at once
/// ([`crate::Engine::launch`]).
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The configuration is unusable.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The VRAM pre-check failed.
    #[error(transparent)]
    Vram(#[from] VramError),
    /// The GPU lock could not be taken.
    #[error(transparent)]
    Lock(#[from] LockError),
    /// The server did not start.
    #[error(transparent)]
    Start(#[from] StartError),
    /// A request failed.
    #[error(transparent)]
    Request(#[from] RequestError),
}
