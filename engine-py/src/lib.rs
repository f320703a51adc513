//! `cinecut_engine._engine`: the engine's calls for the Python package. Every call runs
//! engine-core; the Python side (`python/cinecut_engine`) gives them the seed's names and types.
//!
//! Long calls run on a helper thread while the calling thread waits with the GIL released, checking
//! for signals every 20 ms: Ctrl-C raises `KeyboardInterrupt` at once, and the helper gives up (a
//! lock wait or a start is cancelled; a request in flight is left to finish on its own, its answer
//! dropped), releasing what it holds.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{RecvTimeoutError, channel};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use engine_core::config::EngineConfigBuilder;
use engine_core::gpu::{GpuGuard, LockError, ProbeChoice, VramProbe};
use engine_core::typestate::Healthy;
use engine_core::{DescribeOptions, EngineConfig, KeyframeRecord, Prompt, Schema, Wait};
use pyo3::exceptions::{PyException, PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyDict;

pyo3::create_exception!(
    _engine,
    EngineFailure,
    PyException,
    "The base of the engine's errors."
);
pyo3::create_exception!(
    _engine,
    VramError,
    EngineFailure,
    "Free VRAM could not be read, or is below the minimum."
);
pyo3::create_exception!(
    _engine,
    InferenceError,
    EngineFailure,
    "Starting, using or stopping llama-server failed, or an answer was unusable."
);

/// How often a waiting call checks for Ctrl-C.
const SIGNAL_POLL: Duration = Duration::from_millis(20);
/// How long a call that was interrupted waits for its helper to give up before raising anyway.
const GIVE_UP_WAIT: Duration = Duration::from_millis(300);

fn vram_error(e: impl std::fmt::Display) -> PyErr {
    VramError::new_err(e.to_string())
}

fn inference_error(e: impl std::fmt::Display) -> PyErr {
    InferenceError::new_err(e.to_string())
}

/// Runs `work` on a helper thread and waits for it with the GIL released, checking for signals;
/// `deadline` ends the wait with `None`. On a signal: `cancel` is set, the helper gets a moment to
/// give up, and the signal's exception is raised. The helper drops its result if nobody takes it.
fn wait_for<T: Send + 'static>(
    py: Python<'_>,
    cancel: &Arc<AtomicBool>,
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
            cancel.store(true, Ordering::Release);
            let _ = py.detach(|| receive(GIVE_UP_WAIT));
            return Err(signal);
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            cancel.store(true, Ordering::Release);
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

/// Locks `m`, taking the data as it is if a holder panicked (engine-core's `sync::lock`, which is
/// private to that crate): a panic in one Python thread must not turn every later call into another.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The VRAM probe the engine would use (`NVIDIA_SMI` honoured), for the module-level checks.
fn probe() -> PyResult<VramProbe> {
    VramProbe::from_env(ProbeChoice::Auto).map_err(vram_error)
}

/// Free VRAM of `gpu` in MiB; raises `VramError` when it cannot be read or is below `min_mib`.
#[pyfunction]
#[pyo3(signature = (gpu = 0, min_mib = 0))]
fn vram_free_mib(py: Python<'_>, gpu: u32, min_mib: u64) -> PyResult<u64> {
    let probe = probe()?;
    py.detach(|| engine_core::assert_vram_available(&probe, gpu, min_mib))
        .map(|reading| reading.free_mib)
        .map_err(vram_error)
}

/// The violations of `value_json` against the SceneDescription schema (empty: valid).
#[pyfunction]
fn scene_violations(value_json: &str) -> PyResult<Vec<String>> {
    let value: serde_json::Value =
        serde_json::from_str(value_json).map_err(|e| PyValueError::new_err(e.to_string()))?;
    Ok(match engine_core::validate_scene_description(&value) {
        Ok(_) => Vec::new(),
        Err(violation) => violation.violations,
    })
}

/// The SceneDescription schema, as JSON text.
#[pyfunction]
fn scene_schema_json() -> String {
    engine_core::SCENE_DESCRIPTION_SCHEMA.to_string()
}

/// The engine's per-GPU, machine-wide lock, with `threading.Lock`'s methods.
#[pyclass(module = "cinecut_engine._engine")]
struct GpuLock {
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
            let cancel = Arc::new(AtomicBool::new(false));
            let flag = Arc::clone(&cancel);
            match wait_for(py, &cancel, deadline, move || {
                engine_core::gpu_lock(gpu, Wait::Until(&flag))
            })? {
                Some(Ok(guard)) => Some(guard),
                Some(Err(LockError::Cancelled { .. })) | None => None,
                Some(Err(e)) => return Err(PyRuntimeError::new_err(e.to_string())),
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
        Err(e) => Err(PyRuntimeError::new_err(e.to_string())),
    }
}

/// One engine: the configuration, then (once started) the running server.
#[pyclass(module = "cinecut_engine._engine")]
struct Engine {
    config: EngineConfig,
    running: Mutex<Option<Arc<engine_core::Engine<Healthy>>>>,
}

/// A `**options` value read as `$type`, or a `ValueError` naming the option.
macro_rules! option {
    ($options:expr, $name:literal, $type:ty) => {
        match $options.map(|o| o.get_item($name)).transpose()?.flatten() {
            None => None,
            Some(value) => Some(
                value
                    .extract::<$type>()
                    .map_err(|e| PyValueError::new_err(format!("option {}: {e}", $name)))?,
            ),
        }
    };
}

/// The longest duration an option takes (a year): more is surely a mistake.
const MAX_SECONDS: f64 = engine_core::config::MAX_DURATION.as_secs_f64();

/// `value` seconds as a duration: positive (or zero, where `zero_ok`), finite, at most a year.
fn duration(value: f64, name: &str, zero_ok: bool) -> PyResult<Duration> {
    let ok =
        value.is_finite() && value <= MAX_SECONDS && (value > 0.0 || (zero_ok && value == 0.0));
    if !ok {
        let what = if zero_ok {
            "zero or more"
        } else {
            "more than zero"
        };
        return Err(PyValueError::new_err(format!(
            "{name} is {value}: it must be a number of seconds, {what} and at most a year"
        )));
    }
    Ok(Duration::from_secs_f64(value))
}

fn seconds(value: f64, name: &str) -> PyResult<Duration> {
    duration(value, name, false)
}

const OPTIONS: [&str; 16] = [
    "slots",
    "ctx_size",
    "gpu",
    "gpu_layers",
    "min_vram_mib",
    "startup_timeout_s",
    "request_timeout_s",
    "retries",
    "server_bin",
    "nvidia_smi",
    "prompt",
    "max_tokens",
    "temperature",
    "server_args",
    "vram_recovery_timeout_s",
    "stop_grace_s",
];

fn configure(
    model: PathBuf,
    mmproj: Option<PathBuf>,
    port: u16,
    debug: bool,
    options: Option<&Bound<'_, PyDict>>,
) -> PyResult<EngineConfig> {
    if let Some(options) = options {
        for key in options.keys() {
            let key: String = key.extract()?;
            if !OPTIONS.contains(&key.as_str()) {
                return Err(PyValueError::new_err(format!(
                    "unknown option {key:?}: the options are {}",
                    OPTIONS.join(", ")
                )));
            }
        }
    }
    let mut builder: EngineConfigBuilder = match mmproj {
        Some(mmproj) => EngineConfig::builder(model, mmproj),
        None => EngineConfig::text(model),
    };
    builder = builder.port(port).debug(debug);
    if let Some(v) = option!(options, "slots", u32) {
        builder = builder.slots(v);
    }
    if let Some(v) = option!(options, "ctx_size", u32) {
        builder = builder.ctx_size(v);
    }
    // An index (an int) or a UUID (a str).
    if let Some(v) = option!(options, "gpu", Bound<'_, PyAny>) {
        let gpu: engine_core::GpuId = match v.extract::<u32>() {
            Ok(index) => index.into(),
            Err(_) => v
                .extract::<String>()
                .map_err(|_| PyValueError::new_err("option gpu: an index or a UUID"))?
                .parse()
                .map_err(|e: String| PyValueError::new_err(format!("option gpu: {e}")))?,
        };
        builder = builder.gpu(gpu);
    }
    if let Some(v) = option!(options, "gpu_layers", u32) {
        builder = builder.gpu_layers(v);
    }
    if let Some(v) = option!(options, "min_vram_mib", u64) {
        builder = builder.min_vram_mib(v);
    }
    if let Some(v) = option!(options, "startup_timeout_s", f64) {
        builder = builder.startup_timeout(seconds(v, "startup_timeout_s")?);
    }
    if let Some(v) = option!(options, "stop_grace_s", f64) {
        builder = builder.stop_grace(duration(v, "stop_grace_s", true)?);
    }
    if let Some(v) = option!(options, "vram_recovery_timeout_s", f64) {
        builder = builder.vram_recovery_timeout(duration(v, "vram_recovery_timeout_s", true)?);
    }
    if let Some(v) = option!(options, "server_bin", PathBuf) {
        builder = builder.server_bin(v);
    }
    if let Some(v) = option!(options, "nvidia_smi", PathBuf) {
        builder = builder.nvidia_smi(v);
    }
    for arg in option!(options, "server_args", Vec<String>).unwrap_or_default() {
        builder = builder.arg(arg);
    }
    // The seed's request: 60 s a frame.
    let mut describe = DescribeOptions::default().request_timeout(Duration::from_secs(60));
    if let Some(v) = option!(options, "request_timeout_s", f64) {
        describe = describe.request_timeout(seconds(v, "request_timeout_s")?);
    }
    if let Some(v) = option!(options, "retries", u32) {
        describe = describe.retries(v);
    }
    if let Some(v) = option!(options, "prompt", String) {
        describe = describe.prompt(v);
    }
    if let Some(v) = option!(options, "max_tokens", u32) {
        describe = describe.max_tokens(v);
    }
    if let Some(v) = option!(options, "temperature", f32) {
        describe = describe.temperature(v);
    }
    builder
        .describe_options(describe)
        .build()
        .map_err(|e| PyValueError::new_err(e.to_string()))
}

impl Engine {
    fn healthy(&self) -> PyResult<Arc<engine_core::Engine<Healthy>>> {
        lock(&self.running).clone().ok_or_else(|| {
            PyRuntimeError::new_err("the engine is not running: use it inside its `with` block")
        })
    }
}

#[pymethods]
impl Engine {
    #[new]
    #[pyo3(signature = (model, mmproj = None, port = engine_core::config::DEFAULT_PORT, debug = false, options = None))]
    fn new(
        model: PathBuf,
        mmproj: Option<PathBuf>,
        port: u16,
        debug: bool,
        options: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<Self> {
        Ok(Engine {
            config: configure(model, mmproj, port, debug, options)?,
            running: Mutex::new(None),
        })
    }

    /// Checks VRAM, takes the GPU lock, starts the server; Ctrl-C gives up at once (cleaning up).
    fn start(&self, py: Python<'_>) -> PyResult<()> {
        if lock(&self.running).is_some() {
            return Err(InferenceError::new_err("the engine is already running"));
        }
        let config = self.config.clone();
        let cancel = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&cancel);
        let started = wait_for(py, &cancel, None, move || {
            let checked = engine_core::Engine::new(config)
                .check_vram(Wait::Until(&flag))
                .map_err(vram_error_text)?;
            let locked = checked.lock_gpu(Wait::Until(&flag)).map_err(|e| match e {
                LockError::VramUnderLock(v) => Failure::Vram(v.to_string()),
                other => Failure::Inference(other.to_string()),
            })?;
            locked
                .start(Wait::Until(&flag))
                .map_err(|e| Failure::Inference(e.to_string()))
        })?
        .expect("no deadline");
        let engine = started.map_err(Failure::into_py)?;
        *lock(&self.running) = Some(Arc::new(engine));
        Ok(())
    }

    /// Stops the server, waits for VRAM, releases the lock. A request still in flight (after a
    /// Ctrl-C) ends with its server. Raises `InferenceError` if the server had died.
    fn stop(&self, py: Python<'_>) -> PyResult<()> {
        let Some(mut engine) = lock(&self.running).take() else {
            return Ok(());
        };
        let stopped = py.detach(move || {
            let started = Instant::now();
            let mut aborted = false;
            loop {
                match Arc::try_unwrap(engine) {
                    Ok(engine) => return engine.shutdown().map(|_| ()).map_err(|e| e.to_string()),
                    Err(shared) => engine = shared,
                }
                // A helper still holds the engine: a request whose caller was interrupted. The
                // engine's abort ends the server's whole tree (safe against pid reuse), and with it
                // the request; the helper then lets go, and the shutdown reaps and releases.
                // (A helper that just answered lets go within microseconds: it gets a moment.)
                if !aborted && started.elapsed() > Duration::from_millis(100) {
                    engine.abort();
                    aborted = true;
                }
                std::thread::sleep(Duration::from_millis(2));
            }
        });
        stopped.map_err(InferenceError::new_err)
    }

    /// Whether the server is running.
    #[getter]
    fn running(&self) -> bool {
        lock(&self.running).is_some()
    }

    /// `http://127.0.0.1:PORT` of the running server.
    #[getter]
    fn base_url(&self) -> PyResult<String> {
        Ok(self.healthy()?.base_url().to_string())
    }

    /// The port of the running server.
    #[getter]
    fn port(&self) -> PyResult<u16> {
        Ok(self.healthy()?.port())
    }

    /// The server's pid.
    #[getter]
    fn pid(&self) -> PyResult<u32> {
        Ok(self.healthy()?.pid())
    }

    /// The server's API key.
    #[getter]
    fn api_key(&self) -> PyResult<String> {
        Ok(self.healthy()?.api_key().to_string())
    }

    /// Describes one frame; the SceneDescription as JSON text. Raises `InferenceError`, also when
    /// no answer came within `timeout_s`.
    #[pyo3(signature = (frame_path, timeout_s = 60.0))]
    fn describe(&self, py: Python<'_>, frame_path: PathBuf, timeout_s: f64) -> PyResult<String> {
        let engine = self.healthy()?;
        let deadline = Instant::now() + seconds(timeout_s, "timeout_s")?;
        let cancel = Arc::new(AtomicBool::new(false));
        let shown = frame_path.display().to_string();
        let answer = wait_for(py, &cancel, Some(deadline), move || {
            let record = KeyframeRecord::new(frame_path, 0.0, "python");
            engine
                .describe(&record)
                .map(|scene| serde_json::to_string(&scene).expect("a scene serialises"))
                .map_err(|e| e.to_string())
        })?;
        match answer {
            Some(answer) => answer.map_err(InferenceError::new_err),
            None => Err(InferenceError::new_err(format!(
                "frame {shown}: no answer within {timeout_s} s"
            ))),
        }
    }

    /// Describes many frames, `concurrency` at once, in input order: for each, (JSON, None) or
    /// (None, error). `progress(done, total)` runs after each frame.
    #[pyo3(signature = (frame_paths, concurrency = 1, progress = None))]
    fn describe_many(
        &self,
        py: Python<'_>,
        frame_paths: Vec<PathBuf>,
        concurrency: usize,
        progress: Option<Py<PyAny>>,
    ) -> PyResult<Vec<(Option<String>, Option<String>)>> {
        let engine = self.healthy()?;
        let cancel = Arc::new(AtomicBool::new(false));
        let stop = Arc::clone(&cancel);
        let results = wait_for(py, &cancel, None, move || {
            let records: Vec<KeyframeRecord> = frame_paths
                .into_iter()
                .map(|p| KeyframeRecord::new(p, 0.0, "python"))
                .collect();
            let total = records.len();
            let done = std::sync::atomic::AtomicUsize::new(0);
            let callback_error: Mutex<Option<PyErr>> = Mutex::new(None);
            let results = engine.describe_many(&records, concurrency, |_, _| {
                let n = done.fetch_add(1, Ordering::AcqRel) + 1;
                if let Some(progress) = &progress {
                    let called = Python::attach(|py| progress.call1(py, (n, total)).map(|_| ()));
                    if let Err(e) = called {
                        lock(&callback_error).get_or_insert(e);
                        return std::ops::ControlFlow::Break(());
                    }
                }
                if stop.load(Ordering::Acquire) {
                    std::ops::ControlFlow::Break(())
                } else {
                    std::ops::ControlFlow::Continue(())
                }
            });
            let pairs: Vec<(Option<String>, Option<String>)> = results
                .results
                .into_iter()
                .map(|r| match r {
                    Ok(scene) => (
                        Some(serde_json::to_string(&scene).expect("serialises")),
                        None,
                    ),
                    Err(e) => (None, Some(e.to_string())),
                })
                .collect();
            (
                pairs,
                callback_error
                    .into_inner()
                    .unwrap_or_else(|p| p.into_inner()),
            )
        })?
        .expect("no deadline");
        match results {
            (_, Some(error)) => Err(error),
            (pairs, None) => Ok(pairs),
        }
    }

    /// For benchmarks: describes `frame_path` `n` times in a Rust loop (no Python between the
    /// calls) and returns the seconds per call, to set against the same call made from Python.
    fn time_describe(&self, py: Python<'_>, frame_path: PathBuf, n: u32) -> PyResult<f64> {
        let engine = self.healthy()?;
        let record = KeyframeRecord::new(frame_path, 0.0, "bench");
        py.detach(|| -> Result<f64, String> {
            let started = Instant::now();
            for _ in 0..n.max(1) {
                engine.describe(&record).map_err(|e| e.to_string())?;
            }
            Ok(started.elapsed().as_secs_f64() / f64::from(n.max(1)))
        })
        .map_err(InferenceError::new_err)
    }

    /// One schema-constrained answer as JSON text (any schema, given as JSON text); raises
    /// `InferenceError`.
    #[pyo3(signature = (schema_json, text, system = None, max_tokens = 128, temperature = 0.1, images = Vec::new(), timeout_s = 60.0))]
    #[allow(clippy::too_many_arguments)]
    fn complete(
        &self,
        py: Python<'_>,
        schema_json: &str,
        text: String,
        system: Option<String>,
        max_tokens: u32,
        temperature: f32,
        images: Vec<PathBuf>,
        timeout_s: f64,
    ) -> PyResult<String> {
        let engine = self.healthy()?;
        // Bad arguments are the caller's mistake, not a failed answer.
        if !(0.0..=2.0).contains(&temperature) {
            return Err(PyValueError::new_err(format!(
                "temperature is {temperature}: it must be between 0 and 2"
            )));
        }
        if max_tokens == 0 {
            return Err(PyValueError::new_err(
                "max_tokens is 0: it must be at least 1",
            ));
        }
        let value: serde_json::Value = serde_json::from_str(schema_json)
            .map_err(|e| PyValueError::new_err(format!("the schema is not JSON: {e}")))?;
        let schema =
            Schema::new("schema", value).map_err(|e| PyValueError::new_err(e.to_string()))?;
        let mut prompt = Prompt::new(&schema, text)
            .max_tokens(max_tokens)
            .temperature(temperature);
        if let Some(system) = system {
            prompt = prompt.system(system);
        }
        for image in images {
            prompt = prompt.image(image);
        }
        let deadline = Instant::now() + seconds(timeout_s, "timeout_s")?;
        let cancel = Arc::new(AtomicBool::new(false));
        let answer = wait_for(py, &cancel, Some(deadline), move || {
            engine
                .complete::<serde_json::Value>(&prompt)
                .map(|v| v.to_string())
                .map_err(|e| e.to_string())
        })?;
        match answer {
            Some(answer) => answer.map_err(InferenceError::new_err),
            None => Err(InferenceError::new_err(format!(
                "no answer within {timeout_s} s"
            ))),
        }
    }
}

/// Why a start failed, kept apart so Python gets the right exception.
enum Failure {
    Vram(String),
    Inference(String),
}

fn vram_error_text(e: engine_core::VramError) -> Failure {
    Failure::Vram(e.to_string())
}

impl Failure {
    fn into_py(self) -> PyErr {
        match self {
            Failure::Vram(message) => VramError::new_err(message),
            Failure::Inference(message) => inference_error(message),
        }
    }
}

/// The extension module.
#[pymodule]
fn _engine(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("EngineFailure", py.get_type::<EngineFailure>())?;
    m.add("VramError", py.get_type::<VramError>())?;
    m.add("InferenceError", py.get_type::<InferenceError>())?;
    m.add("VRAM_MINIMUM_MIB", engine_core::VRAM_MINIMUM_MIB)?;
    m.add("DEFAULT_PORT", engine_core::config::DEFAULT_PORT)?;
    m.add_function(wrap_pyfunction!(vram_free_mib, m)?)?;
    m.add_function(wrap_pyfunction!(scene_violations, m)?)?;
    m.add_function(wrap_pyfunction!(scene_schema_json, m)?)?;
    m.add_class::<GpuLock>()?;
    m.add_class::<Engine>()?;
    Ok(())
}
