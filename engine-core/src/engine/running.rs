//! A running server and what its stop needs; how a stop went ([`ShutdownReport`]).

use std::time::{Duration, Instant};

use crate::gpu::{VramProbe, VramReading, VramRecovery, wait_for_recovery};
use crate::process::{ChildExit, Escalation, Leftover};
use crate::server::Server;

/// The server and what its stop needs: the probe and the baseline to wait for VRAM against. Dropping
/// it stops the server and waits for VRAM, so the guard beside it is released only after that.
#[derive(Debug)]
pub(crate) struct Running {
    pub(crate) server: Server,
    pub(crate) baseline: VramReading,
    pub(crate) probe: VramProbe,
    pub(crate) stop_grace: Duration,
    pub(crate) recovery_timeout: Duration,
    /// Set by the first stop; drop does nothing after it.
    pub(crate) stopped: bool,
}

impl Running {
    pub(crate) fn stop(&mut self) -> ShutdownReport {
        self.stopped = true;
        let started = Instant::now();
        let stopped = self.server.stop(self.stop_grace);
        let took = started.elapsed();
        ShutdownReport {
            pid: self.server.pid(),
            status: stopped.exit,
            escalation: stopped.escalation,
            left_running: stopped.left_running,
            took,
            vram: wait_for_recovery(&self.probe, &self.baseline, self.recovery_timeout),
        }
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
    /// Whether free VRAM came back before the GPU lock was released.
    pub vram: VramRecovery,
}
