//! Waiting on free VRAM: after a server stopped, until it comes back ([`wait_for_recovery`]), and
//! before a start, until enough is free ([`wait_for_free`]); and CineCut's own two checks.

use std::time::{Duration, Instant};

use super::error::VramError;
use super::id::{GpuId, Visible, VramReading};
use super::probe::VramProbe;
use crate::wait::Wait;

/// The least free VRAM (MiB) the engine starts with by default: LLaVA 1.5-7B Q4 plus its context.
pub const VRAM_MINIMUM_MIB: u64 = 6144;

/// Free VRAM of GPU `gpu` in MiB (CineCut's `check_vram_free_mib`).
pub fn check_vram_free_mib(probe: &VramProbe, gpu: impl Into<GpuId>) -> Result<u64, VramError> {
    probe
        .read(&gpu.into(), &Visible::from_env(), 0, Wait::Forever)
        .map(|r| r.free_mib)
}

/// Checks that GPU `gpu` has at least `min_mib` free (CineCut's `assert_vram_available`).
pub fn assert_vram_available(
    probe: &VramProbe,
    gpu: impl Into<GpuId>,
    min_mib: u64,
) -> Result<VramReading, VramError> {
    probe.read(&gpu.into(), &Visible::from_env(), min_mib, Wait::Forever)
}

/// Whether free VRAM came back after the server stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum VramRecovery {
    /// Free VRAM was back within 5 % of the baseline after `waited`.
    Recovered {
        /// The last reading.
        free_mib: u64,
        /// How long it took after the server was reaped.
        waited: Duration,
    },
    /// It was still lower when the recovery timeout ran out.
    NotRecovered {
        /// The baseline: the reading taken under the lock, before start.
        before_mib: u64,
        /// The last reading.
        free_mib: u64,
    },
    /// nvidia-smi could not be read after the stop.
    Unknown(String),
    /// The wait is switched off (`vram_recovery_timeout` zero).
    Skipped,
    /// Other servers on the GPU still ran: VRAM is waited for once the last of them stops, before
    /// the GPU's lock goes.
    Shared,
}

/// Polls `probe` until GPU `before.gpu` has its free VRAM back within 5 % of `before`, or `timeout`
/// ends (zero: no wait).
pub fn wait_for_recovery(
    probe: &VramProbe,
    before: &VramReading,
    timeout: Duration,
) -> VramRecovery {
    if timeout.is_zero() {
        return VramRecovery::Skipped;
    }
    let started = Instant::now();
    let target = before.free_mib - before.free_mib / 20;
    let gpu = GpuId::Index(before.gpu);
    loop {
        let free_mib = match probe.read(&gpu, &Visible::All, 0, Wait::Forever) {
            Ok(reading) => reading.free_mib,
            Err(e) => return VramRecovery::Unknown(e.to_string()),
        };
        if free_mib >= target {
            return VramRecovery::Recovered {
                free_mib,
                waited: started.elapsed(),
            };
        }
        if started.elapsed() >= timeout {
            tracing::warn!(
                gpu = before.gpu,
                before_mib = before.free_mib,
                free_mib,
                "free VRAM did not come back after llama-server stopped"
            );
            return VramRecovery::NotRecovered {
                before_mib: before.free_mib,
                free_mib,
            };
        }
        std::thread::sleep(POLL_INTERVAL.min(timeout));
    }
}

/// What [`wait_for_free`] waits for: `min_mib` free on a GPU, asking every `poll`, for at most
/// `timeout` ([`VramError::NotFreed`] after it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FreeVram {
    /// The memory needed, in MiB.
    pub min_mib: u64,
    /// How long to wait for it.
    pub timeout: Duration,
    /// How often to ask.
    pub poll: Duration,
}

impl FreeVram {
    /// `min_mib` within `timeout`, asking every 50 ms (nvidia-smi itself takes about 25 ms).
    pub fn within(min_mib: u64, timeout: Duration) -> Self {
        FreeVram {
            min_mib,
            timeout,
            poll: POLL_INTERVAL,
        }
    }
}

/// Polls `probe` until `gpu` has `need.min_mib` free, or `need.timeout` ends: for the moment right
/// after another model stopped, while its memory is still being freed. Errors other than too little
/// memory (nvidia-smi failing, no such GPU) end the wait at once, and so does `wait` (a Ctrl-C:
/// [`VramError::Cancelled`]).
///
/// ```no_run
/// use std::time::Duration;
/// use engine_core::{GpuId, Wait};
/// use engine_core::gpu::{FreeVram, Visible, VramProbe, ProbeChoice, wait_for_free};
/// // CineCut's wait before its text stage: 6144 MiB within 60 s.
/// let probe = VramProbe::from_env(ProbeChoice::Auto)?;
/// let need = FreeVram::within(6144, Duration::from_secs(60));
/// let reading = wait_for_free(&probe, &GpuId::Index(0), &Visible::from_env(), need, Wait::Forever)?;
/// println!("{} MiB free", reading.free_mib);
/// # Ok::<(), engine_core::VramError>(())
/// ```
pub fn wait_for_free(
    probe: &VramProbe,
    gpu: &GpuId,
    visible: &Visible,
    need: FreeVram,
    wait: Wait,
) -> Result<VramReading, VramError> {
    let started = Instant::now();
    let deadline = wait.deadline();
    loop {
        let (gpu, free_mib) = match probe.read(gpu, visible, need.min_mib, wait) {
            Err(VramError::Insufficient { gpu, free_mib, .. }) => (gpu, free_mib),
            other => return other,
        };
        let not_freed = || VramError::NotFreed {
            gpu,
            free_mib,
            min_mib: need.min_mib,
            waited: started.elapsed(),
        };
        let left = need.timeout.saturating_sub(started.elapsed());
        if left.is_zero() {
            return Err(not_freed());
        }
        if !deadline.sleep(need.poll.min(left)) {
            return Err(if deadline.is_flag() {
                VramError::Cancelled
            } else {
                not_freed()
            });
        }
    }
}

/// How often the VRAM waits ask again: nvidia-smi itself takes about 25 ms.
const POLL_INTERVAL: Duration = Duration::from_millis(50);
