//! `cinecut_engine._engine`: the engine's calls for the Python package. Every call runs
//! engine-core; the Python side (`python/cinecut_engine`) gives them CineCut's names and types.
//!
//! One file per concern: values to and from Python objects (`convert`), the exceptions (`errors`),
//! the waits that Ctrl-C can end (`wait`), the options (`options`), the GPU lock (`gpu_lock`), the
//! engines (`engine`).

mod convert;
mod engine;
mod errors;
mod gpu_lock;
mod options;
mod wait;

use std::time::Duration;

use engine_core::gpu::{FreeVram, ProbeChoice, Visible, VramProbe, wait_for_free};
use engine_core::setting::{Zero, duration_of};
use engine_core::{GpuId, Wait};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

/// The VRAM probe the engine would use (`NVIDIA_SMI` honoured), for the module-level checks.
fn probe(py: Python<'_>) -> PyResult<VramProbe> {
    VramProbe::from_env(ProbeChoice::Auto).map_err(|e| errors::vram(py, &e))
}

/// Free VRAM of `gpu` in MiB; raises `VramError` when it cannot be read or is below `min_mib`.
#[pyfunction]
#[pyo3(signature = (gpu = 0, min_mib = 0))]
fn vram_free_mib(py: Python<'_>, gpu: u32, min_mib: u64) -> PyResult<u64> {
    let probe = probe(py)?;
    py.detach(|| engine_core::assert_vram_available(&probe, gpu, min_mib))
        .map(|reading| reading.free_mib)
        .map_err(|e| errors::vram(py, &e))
}

/// `value` seconds, for an argument `name` (a call's own, not a setting), by the engine's rule for
/// durations.
pub fn seconds_argument(name: &str, value: f64, zero: Zero) -> PyResult<Duration> {
    duration_of(value, zero).map_err(|reason| PyValueError::new_err(format!("{name} {reason}")))
}

/// Waits until `gpu` has `min_free_mib` free, asking every `poll_interval_s`, for at most
/// `timeout_s` (the engine's `wait_for_free`); Ctrl-C ends the wait at once. Returns the free MiB.
#[pyfunction]
#[pyo3(signature = (min_free_mib, poll_interval_s, timeout_s, gpu = 0))]
fn wait_for_vram(
    py: Python<'_>,
    min_free_mib: u64,
    poll_interval_s: f64,
    timeout_s: f64,
    gpu: u32,
) -> PyResult<u64> {
    let probe = probe(py)?;
    let need = FreeVram {
        min_mib: min_free_mib,
        timeout: seconds_argument("timeout_s", timeout_s, Zero::Allowed)?,
        poll: seconds_argument("poll_interval_s", poll_interval_s, Zero::Refused)?,
    };
    let visible = Visible::from_env();
    let reading = wait::cancellable(py, move |cancel| {
        wait_for_free(
            &probe,
            &GpuId::Index(gpu),
            &visible,
            need,
            Wait::Until(cancel),
        )
    })?;
    reading
        .map(|r| r.free_mib)
        .map_err(|e| errors::vram(py, &e))
}

/// The violations of `value` (any JSON-like object) against the SceneDescription schema (empty:
/// valid); a `ValueError` for a value JSON cannot hold.
#[pyfunction]
fn scene_violations(value: &Bound<'_, PyAny>) -> PyResult<Vec<String>> {
    let value: serde_json::Value = convert::from_python(value)?;
    Ok(match engine_core::validate_scene_description(&value) {
        Ok(_) => Vec::new(),
        Err(violation) => violation.violations,
    })
}

/// The SceneDescription schema, as a dict.
#[pyfunction]
fn scene_schema(py: Python<'_>) -> PyResult<Bound<'_, PyAny>> {
    convert::to_python(py, &*engine_core::SCENE_DESCRIPTION_SCHEMA)
}

/// The extension module.
#[pymodule]
fn _engine(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("VRAM_MINIMUM_MIB", engine_core::VRAM_MINIMUM_MIB)?;
    m.add("DEFAULT_PORT", engine_core::config::DEFAULT_PORT)?;
    m.add("OPTIONS", options::OPTIONS.to_vec())?;
    m.add_function(wrap_pyfunction!(vram_free_mib, m)?)?;
    m.add_function(wrap_pyfunction!(wait_for_vram, m)?)?;
    m.add_function(wrap_pyfunction!(scene_violations, m)?)?;
    m.add_function(wrap_pyfunction!(scene_schema, m)?)?;
    m.add_class::<gpu_lock::GpuLock>()?;
    m.add_class::<engine::Engine>()?;
    Ok(())
}
