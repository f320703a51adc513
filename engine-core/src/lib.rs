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
//! [`typestate`] (the lifecycle states), [`vram`] (the nvidia-smi probe, its parser, the choice of
//! GPU), [`lock`] (where the GPU lock files are), [`describe`] (the request and answer parsing),
//! [`process`] (how a child ended and how its stop went).

mod client;
mod config;
pub mod describe;
mod engine;
mod error;
mod gpu_lock;
mod keeper;
pub mod process;
mod random;
mod scene;
mod server;
mod sync;
mod text;
pub mod vram;

pub use config::{DEFAULT_PORT, EngineConfig, EngineConfigBuilder};
pub use describe::DescribeOptions;
pub use engine::{Engine, ShutdownReport};
pub use error::{ConfigError, EngineError, InferenceError, LockError, VramError};
pub use gpu_lock::{GpuGuard, gpu_lock, gpu_lock_cancellable, try_gpu_lock_for};
pub use scene::{
    KeyframeRecord, SCENE_DESCRIPTION_SCHEMA, SceneDescription, SchemaViolation,
    validate_scene_description,
};
pub use vram::{GpuId, VRAM_MINIMUM_MIB, assert_vram_available, check_vram_free_mib};

/// The lifecycle states of [`Engine`], in order: [`Unchecked`](typestate::Unchecked) →
/// [`VramOk`](typestate::VramOk) → [`Locked`](typestate::Locked) → [`Healthy`](typestate::Healthy).
pub mod typestate {
    pub use crate::engine::{Healthy, Locked, State, Unchecked, VramOk};
}

/// Where the GPU lock files are, and who holds one: for people and scripts that meet the engine
/// on the same lock (see [`crate::gpu_lock`] for the protocol).
pub mod lock {
    pub use crate::gpu_lock::{lock_dir, lock_holder};
}
