//! [`EngineError`]: any error of the lifecycle, a launch's and a swap's included: each room's own
//! error, or a pool none of whose GPUs started ([`PoolError`], each GPU [`LeftOut`] with why).

use crate::gpu::{GpuId, LockError, VramError};
use crate::request::RequestError;
use crate::server::StartError;
use crate::setting::ConfigError;

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
    /// No GPU of a launch over several started: each GPU's reason.
    #[error(transparent)]
    Pool(#[from] PoolError),
}

impl EngineError {
    /// Whether the caller's cancellation ended it (a VRAM reading, a lock wait or a start given
    /// up, on every GPU of a pool), rather than a failure.
    pub fn is_cancelled(&self) -> bool {
        match self {
            EngineError::Vram(VramError::Cancelled)
            | EngineError::Lock(LockError::Cancelled { .. })
            | EngineError::Start(StartError::Cancelled) => true,
            EngineError::Pool(pool) => pool.failures.iter().all(|f| f.error.is_cancelled()),
            _ => false,
        }
    }
}

/// A GPU that was asked for but did not start, and why.
#[derive(Debug)]
#[non_exhaustive]
pub struct LeftOut {
    /// The GPU as it was named.
    pub gpu: GpuId,
    /// Why it was left out.
    pub error: EngineError,
}

/// No GPU of the pool started: each GPU and why.
#[derive(Debug, thiserror::Error)]
#[error("no GPU of the pool started: {}", failures.iter().map(|f| format!("{}: {}", f.gpu, f.error)).collect::<Vec<_>>().join("; "))]
#[non_exhaustive]
pub struct PoolError {
    /// Each GPU and why it did not start.
    pub failures: Vec<LeftOut>,
}

/// The error of a launch none of whose GPUs started: a single GPU's own error, or every GPU's.
pub(crate) fn none_started(mut failures: Vec<LeftOut>) -> EngineError {
    if failures.len() == 1 {
        return failures.pop().expect("one failure").error;
    }
    EngineError::Pool(PoolError { failures })
}
