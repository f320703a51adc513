//! The engine room: the lifecycle typestate ([`Engine`]), what a running engine does, the one
//! scheduler every batch runs on ([`Batch`]), and the pool of engines over a host's GPUs
//! ([`EnginePool`]).

mod healthy;
pub(crate) mod pool;
mod running;
pub(crate) mod schedule;
mod summary;
mod typestate;

pub use pool::EnginePool;
pub use running::ShutdownReport;
pub use schedule::{Batch, ServerRun};
pub use summary::{GpuSummary, Latency, RunTimes, Summary, Tokens};
pub use typestate::{Engine, Healthy, Locked, State, Unchecked, VramOk};
