//! CineCut's inference engine: it owns the GPU and the `llama-server` child process from the VRAM
//! check to the last byte of cleanup, and turns keyframes into [`SceneDescription`]s.
//!
//! The lifecycle is a typestate ([`Engine`]): `Unchecked → VramOk → Locked → Healthy`. Each step
//! consumes the engine, so steps cannot run out of order, and dropping an engine in any state releases
//! everything it holds (server stopped and reaped, then the GPU lock).
//!
//! ```no_run
//! use engine_core::{Engine, EngineConfig, KeyframeRecord};
//!
//! let engine = Engine::launch(EngineConfig::new("llava.gguf", "mmproj.gguf"))?;
//! let scene = engine.describe(&KeyframeRecord::new("frame.jpg", 3.0, "scene-cut"))?;
//! println!("{scene:?}");
//! # Ok::<(), engine_core::EngineError>(())
//! ```

mod client;
mod config;
mod describe;
#[cfg(test)]
mod describe_http_tests;
mod engine;
mod error;
mod gpu_lock;
mod process;
mod scene;
mod server;
mod vram;

pub use config::{DEFAULT_PORT, EngineConfig};
pub use describe::{DEFAULT_PROMPT, DescribeOptions, parse_chat_response, strip_code_fence};
pub use engine::{Engine, Healthy, Locked, State, Unchecked, VramOk};
pub use error::{EngineError, InferenceError, LockError, VramError};
pub use gpu_lock::{GpuGuard, gpu_lock, lock_dir, lock_holder, try_gpu_lock_for};
pub use process::Escalation;
pub use scene::{
    KeyframeRecord, SCENE_DESCRIPTION_SCHEMA, SceneDescription, SchemaViolation,
    validate_scene_description,
};
pub use server::ShutdownReport;
pub use vram::{
    MAX_PLAUSIBLE_MIB, NVIDIA_SMI_QUERY, VRAM_MINIMUM_MIB, VramReading, VramRecovery,
    assert_vram_available, check_vram_free_mib, parse_free_mib, parse_free_mib_line,
    query_free_mib,
};
