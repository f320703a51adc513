//! Long calls run on a helper thread while the calling thread waits with the GIL released,
//! checking for signals every 20 ms: Ctrl-C raises `KeyboardInterrupt` at once, and the helper gives
//! up (a VRAM reading, a lock wait or a start is cancelled through its `Wait`; a request in flight is
//! left to finish, or to the engine's abort), releasing what it holds.

use std::sync::mpsc::{RecvTimeoutError, channel};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use engine_core::CancellationToken;
use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;

/// How often a waiting call checks for Ctrl-C.
const SIGNAL_POLL: Duration = Duration::from_millis(20);
/// How long a call that was interrupted waits for its helper to give up before raising anyway.
const GIVE_UP_WAIT: Duration = Duration::from_millis(300);

/// Locks `m`, taking the data as it is if a holder panicked (engine-core's own helper is private
/// to that crate): a panic in one Python thread must not turn every later call into another.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Runs `work` on a helper thread and waits for it with the GIL released, checking for signals;
/// `deadline` ends the wait with `None` (and cancels `cancel`). On a signal: `cancel` is
/// cancelled, the helper gets a moment to give up, and the signal's exception is raised. The helper
/// drops its result if nobody takes it.
pub fn wait_for<T: Send + 'static>(
    py: Python<'_>,
    cancel: &CancellationToken,
    deadline: Option<Instant>,
    work: impl FnOnce() -> T + Send + 'static,
) -> PyResult<Option<T>> {
    let (tx, rx) = channel();
    helpers::run(Box::new(move || {
        let _ = tx.send(work());
    }));
    // Waited on with the GIL released, so from a closure that must be Sync.
    let rx = Mutex::new(rx);
    let receive = |step: Duration| lock(&rx).recv_timeout(step);
    loop {
        let step = deadline.map_or(SIGNAL_POLL, |d| {
            SIGNAL_POLL.min(d.saturating_duration_since(Instant::now()))
        });
        match py.detach(|| receive(step)) {
            Ok(value) => return Ok(Some(value)),
            Err(RecvTimeoutError::Disconnected) => {
                return Err(PyRuntimeError::new_err(
                    "the engine's helper thread panicked",
                ));
            }
            Err(RecvTimeoutError::Timeout) => {}
        }
        if let Err(signal) = py.check_signals() {
            cancel.cancel();
            let _ = py.detach(|| receive(GIVE_UP_WAIT));
            return Err(signal);
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            cancel.cancel();
            return Ok(None);
        }
    }
}

/// Helper threads, kept for the next call once idle: a thread start costs more than the rest of the
/// Python layer's per-frame work together (BENCHMARKS.md, "From Python").
mod helpers {
    use super::lock;
    use std::sync::Mutex;
    use std::sync::mpsc::{Sender, channel};

    type Job = Box<dyn FnOnce() + Send>;

    /// Idle helpers, each waiting on its own channel.
    static IDLE: Mutex<Vec<Sender<Job>>> = Mutex::new(Vec::new());

    /// Runs `job` on an idle helper, or on a new one.
    pub(crate) fn run(job: Job) {
        let idle = lock(&IDLE).pop();
        let job = match idle {
            Some(helper) => match helper.send(job) {
                Ok(()) => return,
                Err(returned) => returned.0,
            },
            None => job,
        };
        let (tx, rx) = channel::<Job>();
        std::thread::spawn(move || {
            let mut next = Some(job);
            while let Some(job) = next.take() {
                job();
                lock(&IDLE).push(tx.clone());
                next = rx.recv().ok();
            }
        });
    }
}

/// `work(cancel)` on a helper, waited for without a deadline; the token is cancelled on Ctrl-C.
pub fn cancellable<T: Send + 'static>(
    py: Python<'_>,
    work: impl FnOnce(&CancellationToken) -> T + Send + 'static,
) -> PyResult<T> {
    let cancel = CancellationToken::new();
    let token = cancel.clone();
    let done = wait_for(py, &cancel, None, move || work(&token))?;
    Ok(done.expect("no deadline"))
}
