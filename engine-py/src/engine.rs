//! `Engine`: one configuration and its launch, and (once started) its running servers — the
//! engine's pool, one server on one GPU or several on several — used as one. Every call runs
//! engine-core: the launch plan (GPUs, `auto` slots and servers), the lifecycle, the one scheduler
//! for batches, the swap that keeps the GPU, and the abort that ends a server's whole tree. What
//! crosses back is Python objects: `SceneDescription`s, the answers' dicts, typed exceptions.

use std::cell::Cell;
use std::ops::ControlFlow;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use engine_core::batch::{Batch, RunTimes};
use engine_core::launch::Gpus;
use engine_core::request::{Answer, check_sampling};
use engine_core::setting::{Setting, Zero};
use engine_core::{
    CancellationToken, EngineError, EnginePool, KeyframeRecord, Prompt, RequestError, Schema, Wait,
};
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};

use crate::options::{Setup, configure, duration, port};
use crate::wait::{cancellable, lock, wait_for};
use crate::{convert, errors};

thread_local! {
    /// Set while this thread runs a batch's `progress_callback`: stopping or swapping the engine
    /// from there would wait for the batch the callback is part of, for ever.
    static IN_PROGRESS_CALLBACK: Cell<bool> = const { Cell::new(false) };
}

/// Refuses `what` from inside a batch's own progress callback.
fn outside_callbacks(what: &str) -> PyResult<()> {
    if IN_PROGRESS_CALLBACK.with(Cell::get) {
        return Err(PyRuntimeError::new_err(format!(
            "{what} from inside describe_frames' progress_callback would wait for the batch the \
             callback belongs to, for ever — return from the callback (raise to stop the batch), \
             then {what} once describe_frames has returned"
        )));
    }
    Ok(())
}

/// One engine: its setup, then (once started) its running servers.
#[pyclass(module = "cinecut_engine._engine")]
#[derive(Debug)]
pub struct Engine {
    setup: Setup,
    running: Mutex<Option<Arc<EnginePool>>>,
    /// GPUs left out at the start, each with why (for Python to log).
    left_out: Mutex<Vec<(String, String)>>,
}

impl Engine {
    fn live(&self) -> PyResult<Arc<EnginePool>> {
        lock(&self.running).clone().ok_or_else(|| {
            PyRuntimeError::new_err("the engine is not running: use it inside its `with` block")
        })
    }
}

/// One answer from the pool: straight from its only server, else as a batch of one (to whichever
/// server has a free slot).
fn answer_one<T>(pool: &EnginePool, prompt: &Prompt) -> Result<Answer<T>, RequestError>
where
    T: serde::de::DeserializeOwned + Send,
{
    match pool.engines() {
        [only] => only.answer(prompt),
        _ => pool
            .answer_many(std::slice::from_ref(prompt), |_, _| {
                ControlFlow::Continue(())
            })
            .results
            .into_iter()
            .next()
            .expect("a batch of one item has one outcome"),
    }
}

#[pymethods]
impl Engine {
    #[new]
    #[pyo3(signature = (model, mmproj = None, port = None, debug = false, options = None))]
    fn new(
        model: PathBuf,
        mmproj: Option<PathBuf>,
        port: Option<&Bound<'_, PyAny>>,
        debug: bool,
        options: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<Self> {
        let port = match port {
            Some(given) => self::port(given)?,
            None => engine_core::config::DEFAULT_PORT,
        };
        Ok(Engine {
            setup: configure(model, mmproj, port, debug, options)?,
            running: Mutex::new(None),
            left_out: Mutex::new(Vec::new()),
        })
    }

    /// Plans the launch (one VRAM reading: the GPUs, `auto` slots and servers), then starts every
    /// GPU's servers (its VRAM checked again under its lock); Ctrl-C gives up at once, cleaning up.
    /// `held`: the GPUs whose lock the calling thread holds (`with GPU_LOCK:`): a named GPU among
    /// them is refused at once (it would be waited for, for ever); with `gpus="all"` they are left
    /// out.
    #[pyo3(signature = (held = Vec::new()))]
    fn start(&self, py: Python<'_>, held: Vec<u32>) -> PyResult<()> {
        if lock(&self.running).is_some() {
            return Err(PyRuntimeError::new_err("the engine is already running"));
        }
        let launch = self.setup.launch();
        let every_gpu = self.setup.gpus == Gpus::All;
        let started = cancellable(py, move |cancel| -> Result<_, EngineError> {
            let mut plan = launch.plan(cancel)?;
            let mine: Vec<u32> = plan
                .gpus()
                .iter()
                .map(|g| g.gpu)
                .filter(|gpu| held.contains(gpu))
                .collect();
            if let Some(&gpu) = mine.first() {
                if !every_gpu {
                    return Ok(Err(gpu));
                }
                for gpu in mine {
                    let why = format!(
                        "leaves out GPU {gpu}: this thread holds its lock (`with GPU_LOCK:` or \
                         gpu_lock({gpu}))"
                    );
                    plan.leave_out(gpu, why)?;
                }
            }
            let left_out: Vec<(String, String)> = plan
                .left_out()
                .iter()
                .map(|l| (l.gpu.to_string(), errors::say(&l.error)))
                .collect();
            let pool = plan.start(cancel, &|_| {})?;
            let mut left = left_out;
            left.extend(
                pool.left_out()
                    .iter()
                    .skip(left.len())
                    .map(|l| (l.gpu.to_string(), errors::say(&l.error))),
            );
            Ok(Ok((pool, left)))
        })?;
        match started.map_err(|e| errors::engine(py, &e))? {
            Err(gpu) => Err(PyRuntimeError::new_err(format!(
                "this thread holds GPU {gpu}'s lock (`with GPU_LOCK:` or gpu_lock({gpu})): the \
                 engine would wait for it for ever — release it first, or start the engine on \
                 another thread"
            ))),
            Ok((pool, left_out)) => {
                *lock(&self.left_out) = left_out;
                *lock(&self.running) = Some(Arc::new(pool));
                Ok(())
            }
        }
    }

    /// Stops every server, waits for VRAM, releases the locks. A request still in flight (after a
    /// Ctrl-C) is ended by the engine's abort of the server's whole tree. Raises `RequestError`
    /// if a single server had died; refused from inside a batch's progress callback.
    fn stop(&self, py: Python<'_>) -> PyResult<()> {
        outside_callbacks("stopping the engine")?;
        let Some(mut running) = lock(&self.running).take() else {
            return Ok(());
        };
        let stopped = py.detach(move || {
            let started = Instant::now();
            let mut aborted = false;
            loop {
                match Arc::try_unwrap(running) {
                    Ok(pool) => return shut_down(pool),
                    Err(shared) => running = shared,
                }
                // A helper still holds the engine: a request whose caller was interrupted (a helper
                // that just answered lets go within microseconds: it gets a moment). The abort ends
                // the servers' whole trees, safe against pid reuse, and with them the request; the
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
    /// throughout (engine-core's swap, which checks `next` before it stops anything): then this
    /// engine is stopped and `next` runs. A failed swap raises; if it failed after the stop,
    /// neither runs and the lock is released.
    fn swap(&self, py: Python<'_>, next: PyRef<'_, Engine>) -> PyResult<()> {
        outside_callbacks("swapping the engine")?;
        if !self.setup.single() || !next.setup.single() {
            return Err(PyValueError::new_err(
                "swap keeps one server on one GPU: it needs engines without the gpus and \
                 servers_per_gpu options",
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
        let pool = match Arc::try_unwrap(running) {
            Ok(pool) => pool,
            Err(shared) => {
                *lock(&self.running) = Some(shared);
                return Err(PyRuntimeError::new_err(
                    "a request of this engine is still in flight: swap once it has answered",
                ));
            }
        };
        let engine = pool
            .into_engines()
            .pop()
            .expect("a started engine has its server");
        let config = next.setup.config.clone();
        let swapped = cancellable(py, move |cancel| engine.swap(config, Wait::Until(cancel)))?;
        match swapped {
            Ok(engine) => {
                *lock(&next.running) = Some(Arc::new(EnginePool::from(engine)));
                Ok(())
            }
            Err(failed) => {
                // Checked before the stop (another GPU, a missing program): still running.
                if let Some(engine) = failed.still_running {
                    *lock(&self.running) = Some(Arc::new(EnginePool::from(*engine)));
                }
                Err(errors::engine(py, &failed.error))
            }
        }
    }

    /// Whether the servers are running.
    #[getter]
    fn running(&self) -> bool {
        lock(&self.running).is_some()
    }

    /// `http://127.0.0.1:PORT` of the first server.
    #[getter]
    fn base_url(&self) -> PyResult<String> {
        Ok(self.live()?.engines()[0].base_url().to_string())
    }

    /// The port of the first server.
    #[getter]
    fn port(&self) -> PyResult<u16> {
        Ok(self.live()?.engines()[0].port())
    }

    /// The first server's pid.
    #[getter]
    fn pid(&self) -> PyResult<u32> {
        Ok(self.live()?.engines()[0].pid())
    }

    /// Every server's pid.
    #[getter]
    fn pids(&self) -> PyResult<Vec<u32>> {
        Ok(self.live()?.engines().iter().map(|e| e.pid()).collect())
    }

    /// The GPUs (nvidia-smi indices) the servers run on, one per server.
    #[getter]
    fn gpus(&self) -> PyResult<Vec<u32>> {
        Ok(self.live()?.engines().iter().map(|e| e.gpu()).collect())
    }

    /// Requests the servers serve at once, over all of them.
    #[getter]
    fn slots(&self) -> PyResult<usize> {
        Ok(self.live()?.slots())
    }

    /// The first server's API key.
    #[getter]
    fn api_key(&self) -> PyResult<String> {
        Ok(self.live()?.engines()[0].api_key().to_string())
    }

    /// The GPUs left out at the start, each with why.
    #[getter]
    fn left_out(&self) -> Vec<(String, String)> {
        lock(&self.left_out).clone()
    }

    /// Describes one frame as a `SceneDescription`. Raises `RequestError`, also when no answer came
    /// within `timeout_s` (every attempt included; the request is abandoned then, and the server
    /// stops generating for it).
    #[pyo3(signature = (frame_path, timeout_s = 60.0))]
    fn describe<'py>(
        &self,
        py: Python<'py>,
        frame_path: PathBuf,
        timeout_s: f64,
    ) -> PyResult<Bound<'py, PyAny>> {
        let running = self.live()?;
        let limit = duration(Setting::RequestTimeout, timeout_s, Zero::Refused)?;
        let options = running.engines()[0].config().describe_options();
        let prompt = options.frame_prompt(&frame_path).timeout(limit);
        let cancel = CancellationToken::new();
        let answer = wait_for(py, &cancel, None, move || {
            answer_one::<engine_core::SceneDescription>(&running, &prompt)
        })?
        .expect("no deadline");
        let scene = answer.map_err(|e| errors::request(py, &e))?;
        convert::scene(py, &scene.value)
    }

    /// Describes many frames with the slots busy, in input order: for each, its
    /// `SceneDescription` or the `RequestError` it ended with. `progress(done, total)` runs after
    /// each frame (an exception it raises stops the batch and is raised here). Also returns the
    /// servers that died (GPU, how, frames they handed over) and the batch's summary (a dict, as the
    /// CLI's `--summary` writes it). `concurrency`: requests in flight (default: every server's
    /// slots).
    #[pyo3(signature = (frame_paths, concurrency = None, progress = None))]
    #[allow(clippy::type_complexity)]
    fn describe_many<'py>(
        &self,
        py: Python<'py>,
        frame_paths: Vec<PathBuf>,
        concurrency: Option<i64>,
        progress: Option<Py<PyAny>>,
    ) -> PyResult<(
        Bound<'py, PyList>,
        Vec<(u32, String, usize)>,
        Bound<'py, PyAny>,
    )> {
        let running = self.live()?;
        let concurrency = match concurrency {
            None => running.slots(),
            Some(n) => usize::try_from(n).ok().filter(|n| *n >= 1).ok_or_else(|| {
                PyValueError::new_err(format!(
                    "concurrency is {n}: it must be at least 1 (or None: every server's slots)"
                ))
            })?,
        };
        let cancel = CancellationToken::new();
        let stop = cancel.clone();
        let done = wait_for(py, &cancel, None, move || {
            let records: Vec<KeyframeRecord> = frame_paths
                .into_iter()
                .map(|p| KeyframeRecord::new(p, 0.0, "python"))
                .collect();
            let total = records.len();
            let started = SystemTime::now();
            let finished = AtomicUsize::new(0);
            let callback_error: Mutex<Option<PyErr>> = Mutex::new(None);
            let batch = describe_batch(&running, &records, concurrency, |_, _| {
                let n = finished.fetch_add(1, Ordering::AcqRel) + 1;
                if let Some(progress) = &progress {
                    let called = Python::attach(|py| {
                        IN_PROGRESS_CALLBACK.with(|c| c.set(true));
                        let called = progress.call1(py, (n, total)).map(|_| ());
                        IN_PROGRESS_CALLBACK.with(|c| c.set(false));
                        called
                    });
                    if let Err(e) = called {
                        lock(&callback_error).get_or_insert(e);
                        return ControlFlow::Break(());
                    }
                }
                if stop.is_cancelled() {
                    ControlFlow::Break(())
                } else {
                    ControlFlow::Continue(())
                }
            });
            let error = callback_error
                .into_inner()
                .unwrap_or_else(|p| p.into_inner());
            (batch, started, error)
        })?
        .expect("no deadline");
        let (batch, started, callback_error) = done;
        if let Some(error) = callback_error {
            return Err(error);
        }
        let summary = batch.summary(RunTimes {
            started,
            ready: started,
            finished: SystemTime::now(),
        });
        let deaths: Vec<(u32, String, usize)> = batch
            .servers
            .iter()
            .filter_map(|s| {
                let died = s.died.as_ref()?;
                Some((s.gpu, died.status.to_string(), s.handed_over))
            })
            .collect();
        let results = PyList::empty(py);
        for result in batch.results {
            match result {
                Ok(answer) => results.append(convert::scene(py, &answer.value)?)?,
                Err(e) => results.append(errors::request(py, &e).into_value(py))?,
            }
        }
        Ok((results, deaths, convert::to_python(py, &summary)?))
    }

    /// For benchmarks: describes `frame_path` `n` times in a Rust loop (no Python between the
    /// calls) and returns the seconds per call, to set against the same call made from Python.
    fn time_describe(&self, py: Python<'_>, frame_path: PathBuf, n: u32) -> PyResult<f64> {
        let running = self.live()?;
        let options = running.engines()[0].config().describe_options();
        let prompt = options.frame_prompt(&frame_path);
        py.detach(|| -> Result<f64, RequestError> {
            let started = Instant::now();
            for _ in 0..n.max(1) {
                answer_one::<engine_core::SceneDescription>(&running, &prompt)?;
            }
            Ok(started.elapsed().as_secs_f64() / f64::from(n.max(1)))
        })
        .map_err(|e| errors::request(py, &e))
    }

    /// One schema-constrained answer (any schema, given as a dict), as Python objects; raises
    /// `RequestError`, also when no answer came within `timeout_s` (every attempt included). Bad
    /// arguments (the engine's sampling rule, a schema that is not one) are a `ValueError`.
    #[pyo3(signature = (schema, text, system = None, max_tokens = 128, temperature = 0.1, images = Vec::new(), timeout_s = 60.0))]
    #[allow(clippy::too_many_arguments)]
    fn complete<'py>(
        &self,
        py: Python<'py>,
        schema: &Bound<'py, PyAny>,
        text: String,
        system: Option<String>,
        max_tokens: u32,
        temperature: f32,
        images: Vec<PathBuf>,
        timeout_s: f64,
    ) -> PyResult<Bound<'py, PyAny>> {
        let running = self.live()?;
        check_sampling(temperature, max_tokens).map_err(errors::config)?;
        let limit = duration(Setting::RequestTimeout, timeout_s, Zero::Refused)?;
        let schema = Schema::new("schema", convert::from_python(schema)?)
            .map_err(|e| PyValueError::new_err(e.to_string()))?;
        let mut prompt = Prompt::new(&schema, text)
            .max_tokens(max_tokens)
            .temperature(temperature)
            .timeout(limit);
        if let Some(system) = system {
            prompt = prompt.system(system);
        }
        for image in images {
            prompt = prompt.image(image);
        }
        let cancel = CancellationToken::new();
        let answer = wait_for(py, &cancel, None, move || {
            answer_one::<serde_json::Value>(&running, &prompt)
        })?
        .expect("no deadline");
        let answer = answer.map_err(|e| errors::request(py, &e))?;
        convert::to_python(py, &answer.value)
    }
}

/// Describes `frames` with the servers' slots busy (`concurrency` at once for one server; every
/// server's slots for several), under the scheduler's contract, each answer with its cost.
fn describe_batch(
    pool: &EnginePool,
    frames: &[KeyframeRecord],
    concurrency: usize,
    on_done: impl Fn(
        usize,
        &Result<Answer<engine_core::SceneDescription>, RequestError>,
    ) -> ControlFlow<()>
    + Sync,
) -> Batch<Answer<engine_core::SceneDescription>> {
    let options = pool.engines()[0].config().describe_options();
    let prompts: Vec<Prompt> = frames
        .iter()
        .map(|frame| options.frame_prompt(&frame.frame_path))
        .collect();
    match pool.engines() {
        [only] => only.answer_many(&prompts, concurrency, on_done),
        _ => pool.answer_many(&prompts, on_done),
    }
}

/// Stops every server of `pool`; a single server's death found at the stop, if any (a pool's
/// deaths were told as they happened).
fn shut_down(pool: EnginePool) -> Result<(), RequestError> {
    let single = pool.engines().len() == 1;
    let mut stops = pool.shutdown().into_iter().map(|(_, stopped)| stopped);
    match (single, stops.next()) {
        (true, Some(Err(e))) => Err(e),
        _ => Ok(()),
    }
}
