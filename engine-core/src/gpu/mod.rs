//! The GPU room: which GPU ([`GpuId`], [`Visible`], [`select`]), how much of its memory is free
//! ([`VramProbe`]: NVML or nvidia-smi), the waits on that memory, and the GPU's lock
//! ([`gpu_lock`], and the files every process meets on: [`lockfile`]).

mod error;
mod id;
mod lock;
pub mod lockfile;
mod nvml;
mod probe;
mod select;
mod waits;

pub use error::{LockError, VramError};
pub use id::{GpuId, GpuRow, Visible, VramReading};
pub use lock::{GpuGuard, gpu_lock};
pub use probe::{
    MAX_PLAUSIBLE_MIB, NVIDIA_SMI_QUERY, NvidiaSmi, ProbeChoice, VramProbe, parse_free_mib,
    parse_rows,
};
pub use select::{Distinct, NamedTwice, distinct, select};
pub use waits::{
    FreeVram, VRAM_MINIMUM_MIB, VramRecovery, assert_vram_available, check_vram_free_mib,
    wait_for_free, wait_for_recovery,
};

pub(crate) use probe::named_nvidia_smi;
