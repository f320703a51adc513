//! The engine's error types. Every message names what failed, with which value, and what to do.

use std::path::PathBuf;
use std::time::Duration;

use crate::process::ChildExit;
use crate::prompt::Subject;
use crate::vram::{GpuId, Visible};

/// A configuration value the engine cannot run with; built by [`crate::EngineConfigBuilder::build`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid engine configuration: {0}")]
pub struct ConfigError(pub(crate) String);

/// The free-VRAM pre-check failed: nvidia-smi could not be read, or the GPU has too little free memory.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum VramError {
    /// The nvidia-smi program does not exist.
    #[error(
        "nvidia-smi not found at `{program}` — install the NVIDIA driver utilities, or set NVIDIA_SMI \
         (EngineConfigBuilder::nvidia_smi in the library) to its path"
    )]
    NotInstalled {
        /// The program that was looked for.
        program: PathBuf,
    },
    /// nvidia-smi could not be started for another reason (permissions, ...).
    #[error("could not run `{program}`: {source} — check that it is an executable nvidia-smi")]
    Spawn {
        /// The program that was run.
        program: PathBuf,
        /// Why it could not start.
        #[source]
        source: std::io::Error,
    },
    /// nvidia-smi ran but exited unsuccessfully.
    #[error(
        "`{program}` failed with {status}: {message:?} — check that the NVIDIA driver is loaded \
         (exit code 9 means nvidia-smi could not communicate with the driver)"
    )]
    Failed {
        /// The program that was run.
        program: PathBuf,
        /// Its exit code or signal.
        status: ChildExit,
        /// What it printed (stdout and stderr, trimmed and truncated).
        message: String,
    },
    /// nvidia-smi did not finish within the timeout; it was killed and reaped.
    #[error(
        "`{program}` did not answer within {timeout:?} and was killed — the driver or GPU may be hung; \
         check `nvidia-smi` by hand"
    )]
    Timeout {
        /// The program that was run.
        program: PathBuf,
        /// The timeout that expired.
        timeout: Duration,
    },
    /// nvidia-smi's output could not be read as free MiB per GPU.
    #[error("could not read free VRAM from nvidia-smi output {text:?}: {reason}")]
    Unparsable {
        /// The offending text (truncated).
        text: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The configured GPU is not among the GPUs this process may use.
    #[error(
        "GPU {gpu} not found: nvidia-smi reported {count} GPU(s) and this process may use {visible} — \
         choose an index or UUID from `cinecut-infer check` (an index counts the GPUs in \
         CUDA_VISIBLE_DEVICES when it is set)"
    )]
    NoSuchGpu {
        /// The configured GPU.
        gpu: GpuId,
        /// How many GPUs nvidia-smi reported.
        count: usize,
        /// What `CUDA_VISIBLE_DEVICES` allows.
        visible: Visible,
    },
    /// The GPU has less free memory than the configured minimum.
    #[error(
        "Only {free_mib} MiB free VRAM, need at least {min_mib} MiB (GPU {gpu}) — close other GPU \
         programs or lower the minimum (--min-vram, min_vram_mib)"
    )]
    Insufficient {
        /// The GPU (nvidia-smi index) that was checked.
        gpu: u32,
        /// Its free memory.
        free_mib: u64,
        /// The configured minimum.
        min_mib: u64,
    },
    /// NVML was asked for (`--vram-probe nvml`) but cannot be used.
    #[error(
        "NVML is not available ({reason}) — install the NVIDIA driver, or use nvidia-smi \
         (--vram-probe nvidia-smi, ProbeChoice::NvidiaSmi)"
    )]
    NvmlUnavailable {
        /// Why.
        reason: String,
    },
    /// Free VRAM stayed below the minimum for the whole bounded wait (the previous model's memory
    /// did not come back, or another program holds it).
    #[error(
        "GPU {gpu} still has only {free_mib} MiB free after waiting {waited:?}, need at least \
         {min_mib} MiB — check `nvidia-smi` for what holds the memory, or wait longer"
    )]
    NotFreed {
        /// The GPU (nvidia-smi index).
        gpu: u32,
        /// Free memory at the last reading.
        free_mib: u64,
        /// The configured minimum.
        min_mib: u64,
        /// How long we waited.
        waited: Duration,
    },
}

/// Raised by [`crate::Engine::check_vram_within`] and [`crate::Engine::swap`] when free VRAM did not
/// reach the minimum before the deadline.
pub(crate) fn not_freed(gpu: u32, free_mib: u64, min_mib: u64, waited: Duration) -> VramError {
    VramError::NotFreed {
        gpu,
        free_mib,
        min_mib,
        waited,
    }
}

/// The GPU lock could not be taken.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another holder (in this process or another) kept the lock past the timeout (zero: a
    /// try-lock that found it held).
    #[error(
        "GPU {gpu} is {} by another engine or GPU job (lock file {path}) — wait for it to finish or \
         use another GPU",
        held_for(.waited)
    )]
    Timeout {
        /// The GPU index.
        gpu: u32,
        /// How long we waited.
        waited: Duration,
        /// The lock file.
        path: PathBuf,
    },
    /// The wait for the lock was cancelled (Ctrl-C, say) before the lock came free.
    #[error("gave up waiting for the GPU {gpu} lock after {waited:?}: cancelled")]
    Cancelled {
        /// The GPU index.
        gpu: u32,
        /// How long we waited.
        waited: Duration,
    },
    /// The lock file or its folder could not be used.
    #[error(
        "cannot use the GPU lock file {path}: {source} — check the folder, or set CINECUT_LOCK_DIR to \
         a folder every GPU user on this machine can write"
    )]
    File {
        /// The lock file or folder.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The lock folder is not safe to meet in (a symlink, or shared but not sticky, or private but
    /// someone else's).
    #[error("refusing the GPU lock folder {path}: {reason} — {fix}")]
    UnsafeDir {
        /// The folder.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
        /// What to do.
        fix: String,
    },
    /// The GPU lock was taken, but the VRAM check made under it failed (the GPU filled up while we
    /// waited for the lock, say); the lock was released again.
    #[error("after taking the GPU lock: {0}")]
    VramUnderLock(#[source] VramError),
}

/// Starting, talking to or stopping llama-server failed, or a frame could not be described.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum InferenceError {
    /// The port could not be listened on for another reason than being taken.
    #[error(
        "cannot listen on 127.0.0.1:{port}: {source} — choose another port (0 picks a free one)"
    )]
    Listen {
        /// The port.
        port: u16,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The model or mmproj file does not exist.
    #[error(
        "{what} file not found: {path} — check the path (it is passed to llama-server as given)"
    )]
    ModelNotFound {
        /// "model" or "mmproj".
        what: &'static str,
        /// The missing path.
        path: PathBuf,
    },
    /// The model or mmproj file is not what llama-server can load in that role (not GGUF, a
    /// projector given as the model, an mmproj without `clip.projector_type`, ...).
    #[error("{what} file {path}: {reason}")]
    BadModel {
        /// "model" or "mmproj".
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// What is wrong with it, and what to do.
        reason: String,
    },
    /// The llama-server program does not exist.
    #[error(
        "llama-server not found at `{program}` — install llama.cpp's llama-server, put it on PATH, or \
         set LLAMA_SERVER (--server-bin, EngineConfigBuilder::server_bin) to its path"
    )]
    ServerNotFound {
        /// The program that was looked for.
        program: PathBuf,
    },
    /// The llama-server program could not be started.
    #[error("could not start `{program}`: {source}")]
    Spawn {
        /// The program.
        program: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The port is taken, or the server answering on it is not our child.
    #[error(
        "port {port} is served by another process ({detail}) — stop it or choose another port (0 picks a free one)"
    )]
    PortInUse {
        /// The port.
        port: u16,
        /// How we found out.
        detail: String,
    },
    /// The child exited before it became healthy.
    #[error("llama-server exited during startup ({status}) — check model path and VRAM{}", tail_suffix(.output_tail))]
    ExitedDuringStartup {
        /// Exit code or signal.
        status: ChildExit,
        /// The last lines the server printed.
        output_tail: String,
    },
    /// The start was cancelled (Ctrl-C, say) while the server loaded; it was stopped and reaped.
    #[error("llama-server's start was cancelled; the server was stopped")]
    StartCancelled,
    /// The child did not become healthy in time; it was terminated and reaped.
    #[error(
        "llama-server did not become healthy within {timeout:?} (last health answer: {last_health}); it \
         was stopped — raise the startup timeout for large models{}", tail_suffix(.output_tail)
    )]
    StartupTimeout {
        /// The startup timeout.
        timeout: Duration,
        /// What /health said last.
        last_health: String,
        /// The last lines the server printed.
        output_tail: String,
    },
    /// The server process died while the engine was running.
    #[error(
        "llama-server died ({status}){} — the engine is unusable; start a new one{}",
        during.as_ref().map(|s| format!(" while answering {s}")).unwrap_or_default(),
        tail_suffix(.output_tail)
    )]
    ServerDied {
        /// The frame or request being answered when the death was found, if any.
        during: Option<Subject>,
        /// Exit code or signal.
        status: ChildExit,
        /// The last lines the server printed.
        output_tail: String,
    },
    /// An image (a keyframe) was refused before contacting the server.
    #[error("frame {path}: {reason}")]
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
    /// The server answered a request with an HTTP error.
    #[error("{subject}: llama-server answered HTTP {status}: {body}")]
    Http {
        /// The frame or request.
        subject: Subject,
        /// The HTTP status.
        status: u16,
        /// The body (truncated).
        body: String,
    },
    /// The request did not complete within the per-request timeout.
    #[error(
        "{subject}: no answer from llama-server within {timeout:?} — raise the request timeout"
    )]
    RequestTimeout {
        /// The frame or request.
        subject: Subject,
        /// The per-request timeout.
        timeout: Duration,
    },
    /// The request failed at the transport level.
    #[error("{subject}: request to llama-server failed: {detail}")]
    Transport {
        /// The frame or request.
        subject: Subject,
        /// What went wrong.
        detail: String,
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
        "{subject}: {detail} — raise the context per slot (ctx_size, `--ctx-size`; the server gets \
         ctx_size × slots), or lower max_tokens"
    )]
    ContextExhausted {
        /// The frame or request.
        subject: Subject,
        /// What the server said.
        detail: String,
    },
    /// Every server of an [`crate::EnginePool`] died before this item was answered.
    #[error("{subject}: not answered — every server of the pool died (the last: {last_death})")]
    PoolExhausted {
        /// The frame or request.
        subject: Subject,
        /// The last server's death, in words.
        last_death: String,
    },
    /// The frame or request was not attempted because the caller stopped the batch.
    #[error("{subject}: not attempted — the batch was stopped before it")]
    Cancelled {
        /// The frame or request.
        subject: Subject,
    },
    /// The log file (debug mode) could not be opened.
    #[error(
        "could not open the llama-server log {path}: {source} — it must be a regular file (never a \
         symlink) in a folder you can write"
    )]
    LogFile {
        /// The log path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

impl InferenceError {
    /// Names `subject` in a [`InferenceError::ServerDied`] that names none yet.
    pub(crate) fn during(self, subject: &Subject) -> Self {
        match self {
            InferenceError::ServerDied {
                during: None,
                status,
                output_tail,
            } => InferenceError::ServerDied {
                during: Some(subject.clone()),
                status,
                output_tail,
            },
            other => other,
        }
    }
}

fn held_for(waited: &Duration) -> String {
    if waited.is_zero() {
        "locked".into()
    } else {
        format!("still locked after {waited:?}")
    }
}

fn tail_suffix(tail: &str) -> String {
    if tail.trim().is_empty() {
        String::new()
    } else {
        format!("; last output:\n{tail}")
    }
}

/// Any error of the engine's lifecycle, for callers that run all steps at once ([`crate::Engine::launch`]).
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
    /// Starting or using the server failed.
    #[error(transparent)]
    Inference(#[from] InferenceError),
}
