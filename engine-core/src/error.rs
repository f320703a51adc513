//! Every error the engine can return, in one place: each room keeps its own error type beside the
//! code that fails with it ([`StartError`] in the server room, [`RequestError`] in the request room,
//! [`VramError`] and [`LockError`] in the GPU room, ...), and [`EngineError`] is any of them.
//! Every message names what failed, with which value, and what to do; a setting that fixes it is
//! named in backticks (`` `ctx_size` ``), which each front end words in its own terms
//! ([`crate::setting::Setting::reword`]).

pub use crate::gguf::ModelRole;
pub use crate::gpu::{LockError, VramError};
pub use crate::request::{RequestError, SchemaError, SchemaViolation};
pub use crate::server::{ServerDeath, StartError};
pub use crate::setting::ConfigError;
pub use crate::shard::ShardError;

pub use crate::engine::{EngineError, PoolError, SwapError};
