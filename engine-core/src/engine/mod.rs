//! The engine room: the lifecycle typestate ([`Engine`]), what a running engine does, the one
//! scheduler every batch runs on ([`Batch`]), the plan of a launch over a host's GPUs ([`Launch`],
//! [`Plan`]) and the pool it starts ([`EnginePool`]).

mod error;
mod healthy;
pub use error::{EngineError, LeftOut, PoolError};
pub use healthy::SwapError;
pub(crate) mod plan;
pub(crate) mod pool;
mod running;
pub(crate) mod schedule;
mod summary;
mod typestate;

pub use plan::{GpuPlan, Gpus, Launch, Plan, WhenLocked};
pub use pool::EnginePool;
pub use running::ShutdownReport;
pub use schedule::{Batch, ServerRun};
pub use summary::{Delivery, GpuSummary, Latency, RunTimes, ServerSummary, Summary, Tokens};
pub use typestate::{Engine, Healthy, Locked, State, Unchecked, VramOk};
