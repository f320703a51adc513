//! What reading free VRAM ([`VramError`]) and taking a GPU's lock ([`LockError`]) can fail with.

use std::path::PathBuf;
use std::time::Duration;

use super::id::{GpuId, Visible};
use crate::process::ChildExit;

/// Free VRAM could not be read, or the GPU has too little of it.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum VramError {
    /// The nvidia-smi program does not exist.
    #[error(
        "nvidia-smi not found at {} — install the NVIDIA driver utilities, or set \
         `nvidia_smi` to its path", program.display()
    )]
    NotInstalled {
        /// The program that was looked for.
        program: PathBuf,
    },
    /// nvidia-smi could not be started for another reason (permissions, ...).
    #[error("could not run {}: {source} — check that it is an executable nvidia-smi", program.display())]
    Spawn {
        /// The program that was run.
        program: PathBuf,
        /// Why it could not start.
        #[source]
        source: std::io::Error,
    },
    /// nvidia-smi ran but exited unsuccessfully.
    #[error(
        "{} failed with {status}: {message:?} — check that the NVIDIA driver is loaded (exit code 9 \
         means nvidia-smi could not communicate with the driver)", program.display()
    )]
    Failed {
        /// The program that was run.
        program: PathBuf,
        /// Its exit code or signal.
        status: ChildExit,
        /// What it printed (stdout and stderr, trimmed and truncated).
        message: String,
    },
    /// nvidia-smi did not finish within its timeout; it was killed and reaped.
    #[error(
        "{} did not answer within {timeout:?} and was killed — the driver or GPU may be hung; check \
         nvidia-smi by hand, or allow it longer (`vram_query_timeout`)", program.display()
    )]
    Timeout {
        /// The program that was run.
        program: PathBuf,
        /// How long it was given.
        timeout: Duration,
    },
    /// The caller gave up waiting (its [`crate::Wait`] ended); the probe was killed and reaped.
    #[error("the VRAM reading was cancelled")]
    Cancelled,
    /// nvidia-smi's output could not be read as free MiB per GPU.
    #[error("could not read free VRAM from nvidia-smi's output {text:?}: {reason}")]
    Unparsable {
        /// The offending text (truncated).
        text: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The chosen GPU's free memory could not be read (its line said `[N/A]`, say).
    #[error("could not read GPU {gpu}'s free VRAM: {reason}")]
    Unreadable {
        /// The GPU (nvidia-smi index).
        gpu: u32,
        /// Why.
        reason: String,
    },
    /// The configured GPU is not among the GPUs this process may use.
    #[error(
        "{gpu} not found: the probe reported {count} GPU(s) and this process may use {visible} — \
         choose an index or a UUID that `nvidia-smi -L` lists (an index counts the GPUs in \
         CUDA_VISIBLE_DEVICES when it is set)"
    )]
    NoSuchGpu {
        /// The configured GPU.
        gpu: GpuId,
        /// How many GPUs the probe reported.
        count: usize,
        /// What `CUDA_VISIBLE_DEVICES` allows.
        visible: Visible,
    },
    /// The GPU has less free memory than the configured minimum.
    #[error(
        "Only {free_mib} MiB free VRAM, need at least {min_mib} MiB (GPU {gpu}) — close other GPU \
         programs or lower the minimum (`min_vram_mib`)"
    )]
    Insufficient {
        /// The GPU (nvidia-smi index) that was checked.
        gpu: u32,
        /// Its free memory.
        free_mib: u64,
        /// The configured minimum.
        min_mib: u64,
    },
    /// The servers planned for the GPU need more than it has free: every copy of the weights and
    /// every slot's cache counted.
    #[error(
        "GPU {gpu} has {free_mib} MiB free, and its servers need {need_mib} MiB ({detail}) — \
         fewer servers (`servers_per_gpu`) or slots (`slots`), a smaller context (`ctx_size`), or \
         a GPU with more free memory"
    )]
    TooSmall {
        /// The GPU (nvidia-smi index).
        gpu: u32,
        /// Its free memory.
        free_mib: u64,
        /// What its servers need.
        need_mib: u64,
        /// How that adds up.
        detail: String,
    },
    /// Every GPU was asked for, and the probe lists none this process may use.
    #[error("{probe} lists no GPU this process may use — check CUDA_VISIBLE_DEVICES")]
    NoGpu {
        /// The probe (`NVML`, or the nvidia-smi program).
        probe: String,
    },
    /// NVML was asked for but cannot be used.
    #[error(
        "NVML is not available ({reason}) — install the NVIDIA driver, or use nvidia-smi instead \
         (`vram_probe`)"
    )]
    NvmlUnavailable {
        /// Why.
        reason: String,
    },
    /// Free VRAM stayed below the minimum for the whole bounded wait (the previous model's memory
    /// did not come back, or another program holds it).
    #[error(
        "GPU {gpu} still has only {free_mib} MiB free after waiting {waited:?}, need at least \
         {min_mib} MiB — check nvidia-smi for what holds the memory, or wait longer"
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

/// A GPU's lock could not be taken.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another holder (in this process or another) kept the lock past the wait (a try-lock: found
    /// it held).
    #[error(
        "GPU {gpu} is {} by another engine or GPU job (lock file {}) — wait for it to finish or \
         use another GPU",
        held_for(.waited), path.display()
    )]
    Timeout {
        /// The GPU index.
        gpu: u32,
        /// How long we waited.
        waited: Duration,
        /// The lock file.
        path: PathBuf,
    },
    /// The caller gave up waiting (its [`crate::Wait`]'s flag was set) before the lock came free.
    #[error("gave up waiting for GPU {gpu}'s lock after {waited:?}: cancelled")]
    Cancelled {
        /// The GPU index.
        gpu: u32,
        /// How long we waited.
        waited: Duration,
    },
    /// The lock file or its folder could not be used.
    #[error(
        "cannot use the GPU lock file {}: {source} — check the folder, or set CINECUT_LOCK_DIR to \
         a folder every GPU user on this machine can write", path.display()
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
    #[error("refusing the GPU lock folder {}: {reason} — {fix}", path.display())]
    UnsafeDir {
        /// The folder.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
        /// What to do.
        fix: String,
    },
    /// The lock was taken, but the VRAM reading made under it failed (the GPU filled up while we
    /// waited, say); the lock was released again.
    #[error("after taking the GPU lock: {0}")]
    VramUnderLock(#[source] VramError),
}

fn held_for(waited: &Duration) -> String {
    if waited.is_zero() {
        "locked".into()
    } else {
        format!("still locked after {waited:?}")
    }
}
