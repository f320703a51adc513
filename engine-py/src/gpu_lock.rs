//! `GpuLock`: the engine's per-GPU, machine-wide lock, with `threading.Lock`'s methods.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use engine_core::gpu::{GpuGuard, LockError};
use engine_core::{CancellationToken, Wait};
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;

use crate::errors;
use crate::wait::{lock, wait_for};

/// The engine's per-GPU, machine-wide lock, with `threading.Lock`'s methods.
#[pyclass(module = "cinecut_engine._engine")]
#[derive(Debug)]
pub struct GpuLock {
    gpu: u32,
    guard: Mutex<Option<GpuGuard>>,
}

#[pymethods]
impl GpuLock {
    #[new]
    fn new(gpu: u32) -> Self {
        GpuLock {
            gpu,
            guard: Mutex::new(None),
        }
    }

    /// The GPU (nvidia-smi index).
    #[getter]
    fn gpu(&self) -> u32 {
        self.gpu
    }

    /// Takes the lock: waits (`blocking`, at most `timeout` seconds unless it is -1) or tries once.
    /// True when taken.
    #[pyo3(signature = (blocking = None, timeout = -1.0))]
    fn acquire(
        &self,
        py: Python<'_>,
        blocking: Option<&Bound<'_, PyAny>>,
        timeout: f64,
    ) -> PyResult<bool> {
        // As threading.Lock: any truth value (blocking unless told); a timeout only for a
        // blocking call.
        let blocking = blocking.map_or(Ok(true), |b| b.is_truthy())?;
        if !blocking && timeout != -1.0 {
            return Err(PyValueError::new_err(
                "can't specify a timeout for a non-blocking call",
            ));
        }
        if blocking && (timeout.is_nan() || (timeout < 0.0 && timeout != -1.0)) {
            return Err(PyValueError::new_err(
                "timeout value must be a non-negative number, or -1 to wait forever",
            ));
        }
        let gpu = self.gpu;
        // Free now: taken at once, whatever the timeout (0 included).
        let taken = if let Some(guard) = try_now(gpu)? {
            Some(guard)
        } else if !blocking || timeout == 0.0 {
            None
        } else {
            let deadline = (timeout >= 0.0)
                .then(|| Instant::now() + Duration::from_secs_f64(timeout.min(1e9)));
            let cancel = CancellationToken::new();
            let token = cancel.clone();
            match wait_for(py, &cancel, deadline, move || {
                engine_core::gpu_lock(gpu, Wait::Until(&token))
            })? {
                Some(Ok(guard)) => Some(guard),
                Some(Err(LockError::Cancelled { .. })) | None => None,
                Some(Err(e)) => return Err(errors::lock(py, &e)),
            }
        };
        let Some(guard) = taken else {
            return Ok(false);
        };
        *lock(&self.guard) = Some(guard);
        Ok(true)
    }

    /// Releases the lock; a `RuntimeError` if this object does not hold it.
    fn release(&self) -> PyResult<()> {
        match lock(&self.guard).take() {
            Some(guard) => {
                drop(guard);
                Ok(())
            }
            None => Err(PyRuntimeError::new_err("release unlocked lock")),
        }
    }

    /// Whether anyone (this object, another engine, another process) holds the GPU's lock: read
    /// from `/proc/locks`, never by taking it (which would make someone else's try fail).
    fn locked(&self) -> PyResult<bool> {
        if lock(&self.guard).is_some() {
            return Ok(true);
        }
        match engine_core::gpu::lockfile::is_locked(self.gpu) {
            Some(locked) => Ok(locked),
            None => Ok(try_now(self.gpu)?.is_none()),
        }
    }
}

/// Takes `gpu`'s lock if it is free now.
fn try_now(gpu: u32) -> PyResult<Option<GpuGuard>> {
    match engine_core::gpu_lock(gpu, Wait::For(Duration::ZERO)) {
        Ok(guard) => Ok(Some(guard)),
        Err(LockError::Timeout { .. }) => Ok(None),
        Err(e) => Python::attach(|py| Err(errors::lock(py, &e))),
    }
}
