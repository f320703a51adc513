//! What starting a server can fail with ([`StartError`]) and how a server died ([`ServerDeath`]).
//! Every message names what failed, with which value, and what to do.

use std::path::PathBuf;
use std::time::Duration;

use crate::gguf::ModelRole;
use crate::process::ChildExit;
use crate::util::tail_suffix;

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
        "llama-server not found at {} — install llama.cpp's llama-server and put it on PATH, or set \
         `server_bin` to its path", program.display()
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
    /// The port is taken, or the server answering on it is not this engine's child (another
    /// program's, or another engine's, perhaps of this very program).
    #[error(
        "port {port} is taken: {detail} — stop what holds it, or choose another `port` (0 picks a free one)"
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
