//! A running server and its stop; the GPU held for one or more servers ([`Hold`]) and its release;
//! how a stop went ([`ShutdownReport`]).

use std::time::Duration;

use crate::gpu::{GpuGuard, VramProbe, VramReading, VramRecovery, wait_for_recovery};
use crate::process::{ChildExit, Escalation, Leftover, Stopped};
use crate::server::Server;

/// The GPU held for one or more servers (shared by the servers of one GPU): its lock, and the
/// reading VRAM must come back to before the lock goes. The servers of a GPU stop before their
/// hold is released (each holds it), so the wait for VRAM comes once, after the last of them:
/// a wait after each would wait for memory its siblings still use.
#[derive(Debug)]
pub(crate) struct Hold {
    guard: Option<GpuGuard>,
    /// Taken under the lock, before any server started.
    pub(crate) baseline: VramReading,
    pub(crate) probe: VramProbe,
    recovery_timeout: Duration,
}

impl Hold {
    pub(crate) fn new(
        guard: GpuGuard,
        baseline: VramReading,
        probe: VramProbe,
        recovery_timeout: Duration,
    ) -> Hold {
        Hold {
            guard: Some(guard),
            baseline,
            probe,
            recovery_timeout,
        }
    }

    /// The GPU held (nvidia-smi index).
    pub(crate) fn gpu(&self) -> u32 {
        self.baseline.gpu
    }

    /// The lock file's descriptor, for each server's keeper to hold until that server's tree is
    /// gone.
    pub(crate) fn raw_fd(&self) -> Option<std::os::fd::RawFd> {
        self.guard.as_ref().and_then(GpuGuard::raw_fd)
    }

    /// Waits for VRAM to come back (every server of the GPU is gone), then releases the lock.
    pub(crate) fn release(mut self) -> VramRecovery {
        self.release_now()
    }

    /// Keeps the lock and gives it to the caller (a swap hands it to the next model's start).
    pub(crate) fn into_guard(mut self) -> GpuGuard {
        self.guard
            .take()
            .expect("a hold keeps its guard until released")
    }

    /// Waits for free VRAM to come back to the baseline (once every server of the GPU is gone).
    pub(crate) fn recover(&self) -> VramRecovery {
        wait_for_recovery(&self.probe, &self.baseline, self.recovery_timeout)
    }

    fn release_now(&mut self) -> VramRecovery {
        let Some(guard) = self.guard.take() else {
            return VramRecovery::Skipped;
        };
        let recovery = self.recover();
        drop(guard);
        recovery
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        self.release_now();
    }
}

/// A server and its stop. Dropping it stops the server (its hold is released after, by the last
/// holder).
#[derive(Debug)]
pub(crate) struct Running {
    pub(crate) server: Server,
    pub(crate) stop_grace: Duration,
    /// Set by the first stop; drop does nothing after it.
    pub(crate) stopped: bool,
}

impl Running {
    /// Stops the server's tree and reaps it.
    pub(crate) fn stop(&mut self) -> Stopped {
        self.stopped = true;
        self.server.stop(self.stop_grace)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if !self.stopped {
            self.stop();
        }
    }
}

/// How one stop of the server went.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ShutdownReport {
    /// The server's pid (as [`Engine::pid`](crate::Engine::pid) gave it).
    pub pid: u32,
    /// Its exit code or signal; `None` if even SIGKILL did not end it (see `left_running`).
    pub status: Option<ChildExit>,
    /// How far the stop had to escalate.
    pub escalation: Escalation,
    /// Processes of the server's tree that SIGKILL and the bounded wait after it did not end.
    pub left_running: Vec<Leftover>,
    /// From the first signal to reaped.
    pub took: Duration,
    /// Whether free VRAM came back before the GPU lock was released
    /// ([`VramRecovery::Shared`] while other servers of the GPU still ran).
    pub vram: VramRecovery,
}
