//! CineCut's inference engine: it owns the GPU and the `llama-server` child process from the VRAM
//! check to the last byte of cleanup, and turns keyframes into [`SceneDescription`]s.
//!
//! The lifecycle is a typestate ([`Engine`]): `Unchecked → VramOk → Locked → Healthy`. Each step
//! consumes the engine, so steps cannot run out of order, and dropping an engine in any state releases
//! everything it holds (server stopped and reaped, VRAM waited for, then the GPU lock).
//!
//! ```no_run
//! use engine_core::{Engine, EngineConfig, KeyframeRecord};
//!
//! let config = EngineConfig::builder("llava.gguf", "mmproj.gguf").build()?;
//! let engine = Engine::launch(config)?;
//! let scene = engine.describe(&KeyframeRecord::new("frame.jpg", 3.0, "scene-cut"))?;
//! println!("{scene:?}");
//! # Ok::<(), engine_core::EngineError>(())
//! ```
//!
//! The root holds what a user of the engine needs; the rest lives in named modules:
//! [`typestate`] (the lifecycle states), [`vram`] (the NVML and nvidia-smi probes, the parser, the choice of
//! GPU), [`lock`] (the GPU lock's protocol and files), [`describe`] (the request and answer parsing),
//! [`process`] (how a child ended and how its stop went), [`shard`] (splitting an input over many
//! hosts). [`EnginePool`] runs one engine per GPU of a host.

#![warn(missing_docs)]

mod client;
mod config;
pub mod describe;
mod engine;
mod error;
mod gguf;
mod gpu_lock;
mod keeper;
mod nvml;
mod pool;
pub mod process;
mod prompt;
mod random;
mod request;
mod scene;
mod schema;
mod server;
pub mod shard;
mod sync;
mod text;
pub mod vram;

pub use config::{DEFAULT_PORT, EngineConfig, EngineConfigBuilder, MAX_DURATION};
pub use describe::DescribeOptions;
pub use engine::{Engine, ShutdownReport};
pub use error::{ConfigError, EngineError, InferenceError, LockError, VramError};
pub use gpu_lock::{GpuGuard, gpu_lock, gpu_lock_cancellable, try_gpu_lock_for};
pub use pool::{Death, EnginePool, LeftOut, PoolError, PoolResults, WhenLocked};
pub use prompt::{Prompt, Subject};
pub use scene::{
    KeyframeRecord, SCENE_DESCRIPTION_SCHEMA, SceneDescription, validate_scene_description,
};
pub use schema::{Schema, SchemaError, SchemaViolation};
pub use vram::{GpuId, VRAM_MINIMUM_MIB, assert_vram_available, check_vram_free_mib};

/// The lifecycle states of [`Engine`], in order: [`Unchecked`](typestate::Unchecked) →
/// [`VramOk`](typestate::VramOk) → [`Locked`](typestate::Locked) → [`Healthy`](typestate::Healthy).
pub mod typestate {
    pub use crate::engine::{Healthy, Locked, State, Unchecked, VramOk};
}

/// The GPU lock's protocol, for people and programs that meet the engine on the same lock.
///
/// One lock per GPU for all GPU work, in-process and across every process of every user on the
/// machine: an exclusive `flock(2)` on `cinecut-gpu-<index>.lock` (`index`: the nvidia-smi index, as
/// [`crate::gpu_lock`] takes it) in the lock folder, held for the whole GPU job. The kernel drops a
/// `flock` when its holder dies, so a crashed process never leaves a GPU locked; an engine's server
/// keeper holds it until the server's tree is gone, even when the engine was SIGKILLed.
///
/// - The folder ([`lock_dir`](crate::lock::lock_dir)): `$CINECUT_LOCK_DIR` if set (created `0700` if missing), else the first
///   of `/run/lock`, `/var/lock`, `/tmp` that exists: sticky, world-writable and owned by root, so any
///   user may add a lock file and nobody may remove another's.
/// - Refused, with the fix in the error: a symlink; a folder others can write that is not sticky, or
///   is owned by another user than root or us (a sticky folder's owner may remove any file in it); a
///   private folder of another user; a lock file that is not a regular file or has hard links.
/// - Lock files are created `0644`: anyone can open them read-only, which is all `flock` needs. The
///   holder writes its pid into the file when it can ([`lock_holder`](crate::lock::lock_holder)). A lock taken on a file that
///   was removed or replaced meanwhile is taken again on the new one.
///
/// From a shell: `flock /run/lock/cinecut-gpu-0.lock ffmpeg ...` waits while an engine holds GPU 0.
pub mod lock {
    pub use crate::gpu_lock::{is_locked, lock_dir, lock_file_path, lock_holder};
}

/// The workspace README's Rust examples, compiled as doc tests so they stay true.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
struct WorkspaceReadme;
