//! `Engine`: one configuration, and (once started) its running server — or one server per GPU (the
//! engine's pool), used as one. Every call runs engine-core: the lifecycle, the one scheduler for
//! batches, the swap that keeps the GPU, and the abort that ends a server's whole tree.

use std::ops::ControlFlow;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use engine_core::batch::{Batch, RunTimes};
use engine_core::config::{Setting, Zero};
use engine_core::gpu::{Visible, distinct};
use engine_core::pool::WhenLocked;
use engine_core::request::{Answer, check_sampling};
use engine_core::typestate::Healthy;
use engine_core::{
    EngineConfig, EngineError, EnginePool, GpuId, KeyframeRecord, Prompt, RequestError,
    SceneDescription, Schema, Wait,
};
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::errors;
use crate::options::{Gpus, configure, duration, port};
use crate::wait::{cancellable, lock, wait_for};

/// What runs: one engine, or a pool of one engine per GPU.
// One value per started engine, behind an Arc: its size does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
enum Running {
    One(engine_core::Engine<Healthy>),
    Pool(EnginePool),
}

impl Running {
    fn engines(&self) -> &[engine_core::Engine<Healthy>] {
        match self {
            Running::One(engine) => std::slice::from_ref(engine),
            Running::Pool(pool) => pool.engines(),
        }
    }

    /// Describes `frames` with the slots busy (`concurrency` at once for one engine; every engine's
    /// slots for a pool), under the scheduler's contract, each answer with its cost.
    fn describe_many(
        &self,
        frames: &[KeyframeRecord],
        concurrency: usize,
        on_done: impl Fn(usize, &Result<Answer<SceneDescription>, RequestError>) -> ControlFlow<()>
        + Sync,
    ) -> Batch<Answer<SceneDescription>> {
        let options = self.engines()[0].config().describe_options();
        let prompts: Vec<Prompt> = frames
            .iter()
            .map(|frame| options.frame_prompt(&frame.frame_path))
            .collect();
        match self {
            Running::One(engine) => engine.answer_many(&prompts, concurrency, on_done),
            Running::Pool(pool) => pool.answer_many(&prompts, on_done),
        }
    }

    fn describe(&self, frame: KeyframeRecord) -> Result<SceneDescription, RequestError> {
        match self {
            Running::One(engine) => engine.describe(&frame),
            Running::Pool(_) => {
                take_one(self.describe_many(&[frame], 1, |_, _| go_on())).map(|a| a.value)
            }
        }
    }

    fn complete(&self, prompt: Prompt) -> Result<serde_json::Value, RequestError> {
        match self {
            Running::One(engine) => engine.complete(&prompt),
            Running::Pool(pool) => take_one(pool.complete_many(&[prompt], |_, _| go_on())),
        }
    }

    fn abort(&self) {
        match self {
            Running::One(engine) => engine.abort(),
            Running::Pool(pool) => pool.abort(),
        }
    }

    /// Stops every server; the one death a single engine found before the stop, if any.
    fn shutdown(self) -> Result<(), RequestError> {
        match self {
            Running::One(engine) => engine.shutdown().map(|_| ()),
            // A pool's deaths were reported as they happened.
            Running::Pool(pool) => {
                pool.shutdown();
                Ok(())
            }
        }
    }
}

fn go_on<T>() -> ControlFlow<T> {
    ControlFlow::Continue(())
}

fn take_one<T>(batch: Batch<T>) -> Result<T, RequestError> {
    batch
        .results
        .into_iter()
        .next()
        .expect("a batch of one item has one outcome")
}

/// Why a start failed, kept apart until the error is made on Python's thread.
enum StartFailure {
    Engine(EngineError),
    Pool(String),
}

/// One engine: the configuration, then (once started) the running server or servers.
#[pyclass(module = "cinecut_engine._engine")]
#[derive(Debug)]
pub struct Engine {
    config: EngineConfig,
    gpus: Gpus,
    running: Mutex<Option<Arc<Running>>>,
    /// GPUs a pool left out at its start, each with why (for Python to log).
    left_out: Mutex<Vec<(String, String)>>,
}

impl Engine {
    fn live(&self) -> PyResult<Arc<Running>> {
        lock(&self.running).clone().ok_or_else(|| {
            PyRuntimeError::new_err("the engine is not running: use it inside its `with` block")
        })
    }

    /// One configuration per GPU: just this one, or one per GPU of the list (or of all those this
    /// process may use), each on a free port.
    fn configs(&self) -> Result<(Vec<EngineConfig>, WhenLocked), EngineError> {
        let ids: Vec<GpuId> = match &self.gpus {
            Gpus::One => return Ok((vec![self.config.clone()], WhenLocked::Wait)),
            Gpus::List(ids) => ids.clone(),
            Gpus::All => {
                let rows = self.config.vram_probe()?.query(Wait::Forever)?;
                Visible::from_env()
                    .rows(&rows)
                    .iter()
                    .map(|row| GpuId::Uuid(row.uuid.clone()))
                    .collect()
            }
        };
        let when_locked = match self.gpus {
            Gpus::All => WhenLocked::Skip,
            _ => WhenLocked::Wait,
        };
        let configs = ids
            .into_iter()
            .map(|gpu| self.config.to_builder().gpu(gpu).port(0).build())
            .collect::<Result<Vec<_>, _>>()?;
        Ok((configs, when_locked))
    }
}

/// The GPUs (nvidia-smi indices) `configs` name that the calling thread holds the lock of: taking
/// them would wait for ever.
fn held_here(configs: &[EngineConfig], held: &[u32]) -> Result<Vec<u32>, EngineError> {
    if held.is_empty() {
        return Ok(Vec::new());
    }
    let Some(first) = configs.first() else {
        return Ok(Vec::new());
    };
    let rows = first.vram_probe()?.query(Wait::Forever)?;
    let gpus: Vec<GpuId> = configs.iter().map(|c| c.gpu().clone()).collect();
    let (named, _) = distinct(&rows, &gpus, &Visible::from_env());
    Ok(named
        .into_iter()
        .filter_map(|(_, reading)| reading.ok().map(|r| r.gpu))
        .filter(|gpu| held.contains(gpu))
        .collect())
}

#[pymethods]
impl Engine {
    #[new]
    #[pyo3(signature = (model, mmproj = None, port = i64::from(engine_core::config::DEFAULT_PORT), debug = false, options = None))]
    fn new(
        model: PathBuf,
        mmproj: Option<PathBuf>,
        port: i64,
        debug: bool,
        options: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<Self> {
        let (config, gpus) = configure(model, mmproj, self::port(port)?, debug, options)?;
        Ok(Engine {
            config,
            gpus,
            running: Mutex::new(None),
            left_out: Mutex::new(Vec::new()),
        })
    }

    /// Checks VRAM, takes the GPU lock, starts the server (one per GPU for several); Ctrl-C gives
    /// up at once (cleaning up). `held`: the GPUs whose lock the calling thread holds (`with
    /// GPU_LOCK:`), refused at once instead of waited for.
    #[pyo3(signature = (held = Vec::new()))]
    fn start(&self, py: Python<'_>, held: Vec<u32>) -> PyResult<()> {
        if lock(&self.running).is_some() {
            return Err(PyRuntimeError::new_err("the engine is already running"));
        }
        let (configs, when_locked) = self.configs().map_err(|e| errors::engine(py, &e))?;
        let mine = held_here(&configs, &held).map_err(|e| errors::engine(py, &e))?;
        if let Some(gpu) = mine.first() {
            return Err(PyRuntimeError::new_err(format!(
                "this thread holds GPU {gpu}'s lock (`with GPU_LOCK:` or gpu_lock({gpu})): the \
                 engine would wait for it for ever — release it first, or start the engine on \
                 another thread"
            )));
        }
        let several = !matches!(self.gpus, Gpus::One);
        let started = cancellable(py, move |flag| {
            if several {
                EnginePool::launch(configs, when_locked, Wait::Until(flag))
                    .map(Running::Pool)
                    .map_err(|e| {
                        let message = e.to_string();
                        match <[_; 1]>::try_from(e.failures) {
                            Ok([only]) => StartFailure::Engine(only.error),
                            Err(_) => StartFailure::Pool(message),
                        }
                    })
            } else {
                let config = configs.into_iter().next().expect("one configuration");
                let wait = Wait::Until(flag);
                engine_core::Engine::new(config)
                    .check_vram(wait)
                    .map_err(EngineError::from)
                    .and_then(|e| e.lock_gpu(wait).map_err(EngineError::from))
                    .and_then(|e| e.start(wait).map_err(EngineError::from))
                    .map(Running::One)
                    .map_err(StartFailure::Engine)
            }
        })?;
        let running = started.map_err(|failure| match failure {
            StartFailure::Engine(e) => errors::engine(py, &e),
            StartFailure::Pool(message) => errors::StartError::new_err(errors::say(message)),
        })?;
        if let Running::Pool(pool) = &running {
            *lock(&self.left_out) = pool
                .left_out()
                .iter()
                .map(|l| (l.gpu.to_string(), errors::say(&l.error)))
                .collect();
        }
        *lock(&self.running) = Some(Arc::new(running));
        Ok(())
    }

    /// Stops the server (every server, for several), waits for VRAM, releases the lock. A request
    /// still in flight (after a Ctrl-C) is ended by the engine's abort of the server's whole tree.
    /// Raises `RequestError` if the server had died.
    fn stop(&self, py: Python<'_>) -> PyResult<()> {
        let Some(mut running) = lock(&self.running).take() else {
            return Ok(());
        };
        let stopped = py.detach(move || {
            let started = Instant::now();
            let mut aborted = false;
            loop {
                match Arc::try_unwrap(running) {
                    Ok(running) => return running.shutdown(),
                    Err(shared) => running = shared,
                }
                // A helper still holds the engine: a request whose caller was interrupted (a helper
                // that just answered lets go within microseconds: it gets a moment). The abort ends
                // the server's whole tree, safe against pid reuse, and with it the request; the
                // helper then lets go, and the shutdown reaps and releases.
                if !aborted && started.elapsed() > Duration::from_millis(100) {
                    running.abort();
                    aborted = true;
                }
                std::thread::sleep(Duration::from_millis(2));
            }
        });
        stopped.map_err(|e| errors::request(py, &e))
    }

    /// Stops this engine's server and starts `next`'s on the same GPU, keeping the GPU lock
    /// throughout (engine-core's swap): then this engine is stopped and `next` runs. A failed swap
    /// leaves neither running and the lock released, and raises.
    fn swap(&self, py: Python<'_>, next: PyRef<'_, Engine>) -> PyResult<()> {
        if !matches!(self.gpus, Gpus::One) || !matches!(next.gpus, Gpus::One) {
            return Err(PyValueError::new_err(
                "swap keeps one GPU: it needs engines without the gpus option",
            ));
        }
        if lock(&next.running).is_some() {
            return Err(PyRuntimeError::new_err(
                "the next engine is already running",
            ));
        }
        let running = lock(&self.running).take().ok_or_else(|| {
            PyRuntimeError::new_err("the engine is not running: swap from inside its `with` block")
        })?;
        let engine = match Arc::try_unwrap(running) {
            Ok(Running::One(engine)) => engine,
            Ok(other) => {
                *lock(&self.running) = Some(Arc::new(other));
                return Err(PyValueError::new_err("swap keeps one GPU"));
            }
            Err(shared) => {
                *lock(&self.running) = Some(shared);
                return Err(PyRuntimeError::new_err(
                    "a request of this engine is still in flight: swap once it has answered",
                ));
            }
        };
        let config = next.config.clone();
        let swapped = cancellable(py, move |flag| engine.swap(config, Wait::Until(flag)))?;
        let engine = swapped.map_err(|e| errors::engine(py, &e))?;
        *lock(&next.running) = Some(Arc::new(Running::One(engine)));
        Ok(())
    }

    /// Whether the server is running.
    #[getter]
    fn running(&self) -> bool {
        lock(&self.running).is_some()
    }

    /// `http://127.0.0.1:PORT` of the (first) running server.
    #[getter]
    fn base_url(&self) -> PyResult<String> {
        Ok(self.live()?.engines()[0].base_url().to_string())
    }

    /// The port of the (first) running server.
    #[getter]
    fn port(&self) -> PyResult<u16> {
        Ok(self.live()?.engines()[0].port())
    }

    /// The (first) server's pid.
    #[getter]
    fn pid(&self) -> PyResult<u32> {
        Ok(self.live()?.engines()[0].pid())
    }

    /// Every server's pid, one per GPU.
    #[getter]
    fn pids(&self) -> PyResult<Vec<u32>> {
        Ok(self.live()?.engines().iter().map(|e| e.pid()).collect())
    }

    /// The GPUs (nvidia-smi indices) the servers run on.
    #[getter]
    fn gpus(&self) -> PyResult<Vec<u32>> {
        Ok(self.live()?.engines().iter().map(|e| e.gpu()).collect())
    }

    /// The (first) server's API key.
    #[getter]
    fn api_key(&self) -> PyResult<String> {
        Ok(self.live()?.engines()[0].api_key().to_string())
    }

    /// The GPUs left out at the start, each with why.
    #[getter]
    fn left_out(&self) -> Vec<(String, String)> {
        lock(&self.left_out).clone()
    }

    /// Describes one frame; the SceneDescription as JSON text. Raises `RequestError`, also when no
    /// answer came within `timeout_s`.
    #[pyo3(signature = (frame_path, timeout_s = 60.0))]
    fn describe(&self, py: Python<'_>, frame_path: PathBuf, timeout_s: f64) -> PyResult<String> {
        let running = self.live()?;
        let limit = duration(Setting::RequestTimeout, timeout_s, Zero::Refused)?;
        let deadline = Instant::now() + limit;
        let cancel = Arc::new(AtomicBool::new(false));
        let shown = frame_path.display().to_string();
        let answer = wait_for(py, &cancel, Some(deadline), move || {
            running
                .describe(KeyframeRecord::new(frame_path, 0.0, "python"))
                .map(|scene| serde_json::to_string(&scene).expect("a scene serialises"))
        })?;
        match answer {
            Some(answer) => answer.map_err(|e| errors::request(py, &e)),
            None => Err(errors::RequestError::new_err(format!(
                "frame {shown}: no answer within {timeout_s} s"
            ))),
        }
    }

    /// Describes many frames with the slots busy, in input order: for each, (JSON, None) or (None,
    /// error). `progress(done, total)` runs after each frame. Also returns the servers that died:
    /// (GPU, how, frames they handed over), and the batch's summary as JSON (the CLI's
    /// `--summary`).
    #[pyo3(signature = (frame_paths, concurrency = 1, progress = None))]
    #[allow(clippy::type_complexity)]
    fn describe_many(
        &self,
        py: Python<'_>,
        frame_paths: Vec<PathBuf>,
        concurrency: usize,
        progress: Option<Py<PyAny>>,
    ) -> PyResult<(
        Vec<(Option<String>, Option<String>)>,
        Vec<(u32, String, usize)>,
        String,
    )> {
        let running = self.live()?;
        let cancel = Arc::new(AtomicBool::new(false));
        let stop = Arc::clone(&cancel);
        let results = wait_for(py, &cancel, None, move || {
            let records: Vec<KeyframeRecord> = frame_paths
                .into_iter()
                .map(|p| KeyframeRecord::new(p, 0.0, "python"))
                .collect();
            let total = records.len();
            let started = SystemTime::now();
            let done = AtomicUsize::new(0);
            let callback_error: Mutex<Option<PyErr>> = Mutex::new(None);
            let batch = running.describe_many(&records, concurrency, |_, _| {
                let n = done.fetch_add(1, Ordering::AcqRel) + 1;
                if let Some(progress) = &progress {
                    let called = Python::attach(|py| progress.call1(py, (n, total)).map(|_| ()));
                    if let Err(e) = called {
                        lock(&callback_error).get_or_insert(e);
                        return ControlFlow::Break(());
                    }
                }
                if stop.load(Ordering::Acquire) {
                    ControlFlow::Break(())
                } else {
                    ControlFlow::Continue(())
                }
            });
            let summary = batch.summary(RunTimes {
                started,
                ready: started,
                finished: SystemTime::now(),
            });
            let summary = serde_json::to_string(&summary).expect("a summary serialises");
            let pairs: Vec<(Option<String>, Option<String>)> = batch
                .results
                .into_iter()
                .map(|r| match r {
                    Ok(answer) => (
                        Some(serde_json::to_string(&answer.value).expect("serialises")),
                        None,
                    ),
                    Err(e) => (None, Some(errors::say(e))),
                })
                .collect();
            let deaths: Vec<(u32, String, usize)> = batch
                .servers
                .iter()
                .filter_map(|s| {
                    let died = s.died.as_ref()?;
                    Some((s.gpu, died.status.to_string(), s.handed_over))
                })
                .collect();
            (
                pairs,
                deaths,
                summary,
                callback_error
                    .into_inner()
                    .unwrap_or_else(|p| p.into_inner()),
            )
        })?
        .expect("no deadline");
        match results {
            (_, _, _, Some(error)) => Err(error),
            (pairs, deaths, summary, None) => Ok((pairs, deaths, summary)),
        }
    }

    /// For benchmarks: describes `frame_path` `n` times in a Rust loop (no Python between the
    /// calls) and returns the seconds per call, to set against the same call made from Python.
    fn time_describe(&self, py: Python<'_>, frame_path: PathBuf, n: u32) -> PyResult<f64> {
        let running = self.live()?;
        py.detach(|| -> Result<f64, RequestError> {
            let started = Instant::now();
            for _ in 0..n.max(1) {
                running.describe(KeyframeRecord::new(&frame_path, 0.0, "bench"))?;
            }
            Ok(started.elapsed().as_secs_f64() / f64::from(n.max(1)))
        })
        .map_err(|e| errors::request(py, &e))
    }

    /// One schema-constrained answer as JSON text (any schema, given as JSON text); raises
    /// `RequestError`. Bad arguments (the engine's sampling rule, a schema that is not one) are a
    /// `ValueError`.
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
        let running = self.live()?;
        check_sampling(temperature, max_tokens).map_err(errors::config)?;
        let limit = duration(Setting::RequestTimeout, timeout_s, Zero::Refused)?;
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
        let deadline = Instant::now() + limit;
        let cancel = Arc::new(AtomicBool::new(false));
        let answer = wait_for(py, &cancel, Some(deadline), move || {
            running.complete(prompt).map(|v| v.to_string())
        })?;
        match answer {
            Some(answer) => answer.map_err(|e| errors::request(py, &e)),
            None => Err(errors::RequestError::new_err(format!(
                "no answer within {timeout_s} s"
            ))),
        }
    }
}
