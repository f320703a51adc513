//! CineCut's inference engine: it owns the GPU and the `llama-server` child process from the VRAM
//! check to the last byte of cleanup, and turns keyframes into [`SceneDescription`]s (and prompts
//! into answers under any JSON [`Schema`]).
//!
//! The lifecycle is a typestate ([`Engine`]): `Unchecked → VramOk → Locked → Healthy`. Each step
//! consumes the engine, so steps cannot run out of order; each step that blocks takes a [`Wait`];
//! dropping an engine in any state releases everything it holds (server stopped and reaped, VRAM
//! waited for, then the GPU lock).
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
//! The root holds what a user of the engine needs; the rest lives in rooms, each behind a short
//! front door: [`config`] (the builder), [`setting`] (the settings by name), [`error`] (every error type),
//! [`gpu`] (GPU ids, the VRAM probes and waits, the GPU lock and its files), [`request`] (prompts,
//! schemas, answer parsing), [`typestate`] (the lifecycle states), [`batch`] (what a batch returns,
//! under the one scheduler's contract), [`pool`] (one engine per GPU of a host), [`process`] (how a
//! child ended and how its stop went), [`shard`] (splitting an input over many hosts), [`gguf`]
//! (model files).

#![warn(missing_docs)]

pub mod config;
mod engine;
pub mod error;
pub mod gguf;
pub mod gpu;
pub mod process;
pub mod request;
mod server;
pub mod setting;
pub mod shard;
mod util;
mod wait;

pub use config::EngineConfig;
pub use engine::{Engine, EnginePool, Launch};
pub use error::{EngineError, RequestError, StartError};
pub use gpu::{
    GpuId, VRAM_MINIMUM_MIB, VramError, assert_vram_available, check_vram_free_mib, gpu_lock,
};
pub use request::{
    DescribeOptions, KeyframeRecord, Prompt, SCENE_DESCRIPTION_SCHEMA, SceneDescription, Schema,
    validate_scene_description,
};
pub use wait::{CancellationToken, Wait};

/// The lifecycle states of [`Engine`], in order: [`Unchecked`](typestate::Unchecked) →
/// [`VramOk`](typestate::VramOk) → [`Locked`](typestate::Locked) → [`Healthy`](typestate::Healthy);
/// and how a stop went.
pub mod typestate {
    pub use crate::engine::{Healthy, Locked, ShutdownReport, State, Unchecked, VramOk};
}

/// What a batch returns ([`Engine::describe_many`], [`EnginePool::complete_many`], ...): the one
/// scheduler's contract is that every item gets exactly one outcome, exactly once, in every path;
/// and a run's [`Summary`](batch::Summary) ([`Batch::summary`](batch::Batch::summary) of an
/// [`answer_many`](crate::EnginePool::answer_many)).
pub mod batch {
    pub use crate::engine::{
        Batch, Delivery, GpuSummary, Latency, RunTimes, ServerRun, ServerSummary, Summary, Tokens,
    };
}

/// What to start and what it resolves to: [`Launch`] (the GPUs, and the slots and servers of
/// each, as numbers or `auto`) makes a [`Plan`](launch::Plan) from one VRAM reading, which starts
/// an [`EnginePool`] or serves a batch as its GPUs turn ready.
pub mod launch {
    pub use crate::engine::{GpuPlan, Gpus, Plan};
}

/// The servers of a host's GPUs used as one ([`EnginePool`]): how they start, what they do with a
/// GPU another process holds, and the GPUs left out.
pub mod pool {
    pub use crate::engine::pool::{Event, Served};
    pub use crate::engine::{LeftOut, PoolError, WhenLocked};
}

/// The workspace README's Rust examples, compiled as doc tests so they stay true.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
struct WorkspaceReadme;
