//! [`EnginePool`]: one engine per GPU of a host, started in parallel, with the work shared out by
//! whichever GPU has a free slot.

use std::collections::VecDeque;
use std::ops::ControlFlow;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::Duration;

use serde::de::DeserializeOwned;

use crate::config::EngineConfig;
use crate::engine::{Engine, Healthy, ShutdownReport};
use crate::error::{ConfigError, EngineError, InferenceError, LockError};
use crate::prompt::{Prompt, Subject};
use crate::scene::{KeyframeRecord, SceneDescription};
use crate::sync::lock;
use crate::vram::{GpuId, Visible};

/// What a pool does with a GPU whose lock another process holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WhenLocked {
    /// Leave it out (`--gpus all`: use the GPUs that are free now).
    Skip,
    /// Wait for it (GPUs named one by one).
    Wait,
}

/// A GPU that was asked for but did not start, and why.
#[derive(Debug)]
pub struct LeftOut {
    /// The GPU as configured.
    pub gpu: GpuId,
    /// Why it was left out.
    pub error: EngineError,
}

/// A server that died during a batch: its GPU, what it died of, and how many items it was working
/// on or would have taken, which the other GPUs answered instead.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Death {
    /// The GPU (nvidia-smi index).
    pub gpu: u32,
    /// The `ServerDied` error, in words.
    pub error: String,
    /// Items that were in flight on it when it died, handed to the other GPUs.
    pub handed_over: usize,
}

/// The results of a batch over a pool, in input order, and the servers that died during it.
#[derive(Debug)]
pub struct PoolResults<T> {
    /// One result per input, in input order.
    pub results: Vec<Result<T, InferenceError>>,
    /// Servers that died during the batch (their items went to the others).
    pub deaths: Vec<Death>,
    /// Items answered per GPU (nvidia-smi index), in the pool's order.
    pub answered: Vec<(u32, usize)>,
}

/// Engines on several GPUs of one host, each with its own VRAM check, GPU lock and server (which sees
/// only its GPU), used as one: work goes to whichever GPU has a free slot.
///
/// ```no_run
/// use std::sync::atomic::AtomicBool;
/// use engine_core::{EngineConfig, EnginePool, KeyframeRecord, WhenLocked};
///
/// let base = EngineConfig::builder("llava.gguf", "mmproj.gguf").port(0).slots(4);
/// let configs = (0..2).map(|gpu| base.clone().gpu(gpu).build()).collect::<Result<Vec<_>, _>>()?;
/// let pool = EnginePool::launch(configs, WhenLocked::Wait, &AtomicBool::new(false))?;
/// let frames = vec![KeyframeRecord::new("frame_0000012500.jpg", 12.5, "cut")];
/// let done = pool.describe_many(&frames, |_, _| std::ops::ControlFlow::Continue(()));
/// println!("{:?}", done.results[0]);
/// pool.shutdown();
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct EnginePool {
    engines: Vec<Engine<Healthy>>,
    left_out: Vec<LeftOut>,
}

/// No GPU of the pool started.
#[derive(Debug, thiserror::Error)]
#[error("no GPU of the pool started: {}", failures.iter().map(|f| format!("GPU {}: {}", f.gpu, f.error)).collect::<Vec<_>>().join("; "))]
pub struct PoolError {
    /// Each GPU and why it did not start.
    pub failures: Vec<LeftOut>,
}

impl EnginePool {
    /// Starts one engine per configuration, all at once (each: VRAM check, lock, start). A GPU that
    /// fails is left out (see [`EnginePool::left_out`]) if another started; a GPU locked by another
    /// process is left out at once under [`WhenLocked::Skip`], waited for under [`WhenLocked::Wait`].
    /// Setting `cancel` gives up every wait and start (each then cleaned up as usual).
    pub fn launch(
        configs: Vec<EngineConfig>,
        when_locked: WhenLocked,
        cancel: &AtomicBool,
    ) -> Result<EnginePool, PoolError> {
        Self::launch_with(configs, when_locked, cancel, &|_| {})
    }

    /// As [`EnginePool::launch`], calling `before_lock(gpu)` (the nvidia-smi index) just before each
    /// engine takes its GPU's lock: where the CLI says who holds a lock it is about to wait for.
    pub fn launch_with(
        configs: Vec<EngineConfig>,
        when_locked: WhenLocked,
        cancel: &AtomicBool,
        before_lock: &(dyn Fn(u32) + Sync),
    ) -> Result<EnginePool, PoolError> {
        // One engine per GPU: a GPU named twice (by index and by UUID, say) would wait for its own
        // lock for ever, so the second is left out.
        let mut left_out = Vec::new();
        let mut seen = std::collections::BTreeSet::new();
        let mut unique = Vec::new();
        for config in configs {
            let gpu = config.gpu().clone();
            let index = config
                .vram_probe()
                .and_then(|probe| probe.read(config.gpu(), &Visible::from_env(), 0))
                .map(|reading| reading.gpu);
            match index {
                Ok(index) if !seen.insert(index) => left_out.push(LeftOut {
                    gpu,
                    error: ConfigError(format!(
                        "GPU {index} is already in this pool: name each GPU once"
                    ))
                    .into(),
                }),
                Ok(_) => unique.push(config),
                Err(e) => left_out.push(LeftOut {
                    gpu,
                    error: e.into(),
                }),
            }
        }
        let outcomes: Vec<(GpuId, Result<Engine<Healthy>, EngineError>)> =
            std::thread::scope(|scope| {
                let starts: Vec<_> = unique
                    .into_iter()
                    .map(|config| {
                        let gpu = config.gpu().clone();
                        let start = move || start(config, when_locked, cancel, before_lock);
                        (gpu, scope.spawn(start))
                    })
                    .collect();
                starts
                    .into_iter()
                    .map(|(gpu, start)| (gpu, start.join().expect("a start does not panic")))
                    .collect()
            });
        let mut engines = Vec::new();
        for (gpu, outcome) in outcomes {
            match outcome {
                Ok(engine) => engines.push(engine),
                Err(error) => {
                    tracing::warn!(%gpu, %error, "GPU left out of the pool");
                    left_out.push(LeftOut { gpu, error });
                }
            }
        }
        if engines.is_empty() {
            return Err(PoolError { failures: left_out });
        }
        Ok(EnginePool { engines, left_out })
    }

    /// The engines, one per GPU that started.
    pub fn engines(&self) -> &[Engine<Healthy>] {
        &self.engines
    }

    /// The GPUs that did not start, and why.
    pub fn left_out(&self) -> &[LeftOut] {
        &self.left_out
    }

    /// Requests the pool serves at once: every engine's slots.
    pub fn slots(&self) -> usize {
        self.engines
            .iter()
            .map(|e| e.config().slots() as usize)
            .sum()
    }

    /// [`Engine::describe`] over the pool; see [`EnginePool::complete_many`].
    pub fn describe_many<F>(
        &self,
        frames: &[KeyframeRecord],
        on_done: F,
    ) -> PoolResults<SceneDescription>
    where
        F: Fn(usize, &Result<SceneDescription, InferenceError>) -> ControlFlow<()> + Sync,
    {
        self.run(
            frames,
            |engine, frame| engine.describe(frame),
            |frame| Subject::Frame(frame.frame_path.clone()),
            on_done,
        )
    }

    /// [`Engine::complete`] over the pool: each engine runs as many requests at once as it has slots,
    /// taking the next item as one finishes (no static split), and results come back in input order.
    /// `on_done(index, &result)` runs as each finishes; `Break` stops dispatch (items not started come
    /// back as [`InferenceError::Cancelled`]). When a server dies, its items in flight go back to the
    /// queue for the others ([`PoolResults::deaths`] says so); only when every server has died do the
    /// remaining items fail, with the last death.
    pub fn complete_many<T, F>(&self, prompts: &[Prompt], on_done: F) -> PoolResults<T>
    where
        T: DeserializeOwned + Send,
        F: Fn(usize, &Result<T, InferenceError>) -> ControlFlow<()> + Sync,
    {
        self.run(
            prompts,
            |engine, prompt| engine.complete(prompt),
            Prompt::subject,
            on_done,
        )
    }

    fn run<I, R, F>(
        &self,
        items: &[I],
        work: impl Fn(&Engine<Healthy>, &I) -> Result<R, InferenceError> + Sync,
        subject: impl Fn(&I) -> Subject,
        on_done: F,
    ) -> PoolResults<R>
    where
        I: Sync,
        R: Send,
        F: Fn(usize, &Result<R, InferenceError>) -> ControlFlow<()> + Sync,
    {
        let queue = Queue::new(items.len(), self.engines.len());
        let answered: Vec<Mutex<usize>> = self.engines.iter().map(|_| Mutex::new(0)).collect();
        let dead: Vec<AtomicBool> = self
            .engines
            .iter()
            .map(|_| AtomicBool::new(false))
            .collect();
        std::thread::scope(|scope| {
            for (e, engine) in self.engines.iter().enumerate() {
                let (queue, work, on_done, answered) = (&queue, &work, &on_done, &answered);
                let dead = &dead[e];
                for _ in 0..engine.config().slots().max(1) {
                    scope.spawn(move || {
                        while let Some(i) = queue.next() {
                            if dead.load(Ordering::Acquire) {
                                queue.hand_back(i);
                                break;
                            }
                            let result = work(engine, &items[i]);
                            if let Err(died @ InferenceError::ServerDied { .. }) = &result {
                                let first = !dead.swap(true, Ordering::AcqRel);
                                queue.died(i, engine.gpu(), died.to_string(), first);
                                break;
                            }
                            *lock(&answered[e]) += usize::from(result.is_ok());
                            let flow = on_done(i, &result);
                            queue.finish(i, result, flow.is_break());
                        }
                    });
                }
            }
        });
        let (results, deaths) = queue.into_results(|i| subject(&items[i]));
        PoolResults {
            results,
            deaths,
            answered: self
                .engines
                .iter()
                .zip(answered)
                .map(|(engine, n)| {
                    (
                        engine.gpu(),
                        n.into_inner().unwrap_or_else(|p| p.into_inner()),
                    )
                })
                .collect(),
        }
    }

    /// Stops every server at once (each as [`Engine::shutdown`]); one result per GPU, in the pool's
    /// order.
    pub fn shutdown(self) -> Vec<(u32, Result<ShutdownReport, InferenceError>)> {
        std::thread::scope(|scope| {
            let stops: Vec<_> = self
                .engines
                .into_iter()
                .map(|engine| {
                    let gpu = engine.gpu();
                    (gpu, scope.spawn(move || engine.shutdown()))
                })
                .collect();
            stops
                .into_iter()
                .map(|(gpu, stop)| (gpu, stop.join().expect("a shutdown does not panic")))
                .collect()
        })
    }
}

/// One engine's start for the pool.
fn start(
    config: EngineConfig,
    when_locked: WhenLocked,
    cancel: &AtomicBool,
    before_lock: &(dyn Fn(u32) + Sync),
) -> Result<Engine<Healthy>, EngineError> {
    let checked = Engine::new(config).check_vram()?;
    before_lock(checked.vram().gpu);
    let locked = match when_locked {
        WhenLocked::Skip => checked.try_lock_for(Duration::ZERO),
        WhenLocked::Wait => checked.lock_cancellable(cancel),
    };
    let locked = locked.map_err(|e| match e {
        LockError::Timeout { gpu, path, .. } => LockError::Timeout {
            gpu,
            waited: Duration::ZERO,
            path,
        },
        other => other,
    })?;
    Ok(locked.start_cancellable(cancel)?)
}

/// The shared work queue: the next fresh item, the items handed back by dead servers, and the
/// results so far.
struct Queue<R> {
    state: Mutex<QueueState<R>>,
    changed: Condvar,
}

struct QueueState<R> {
    next: usize,
    total: usize,
    handed_back: VecDeque<usize>,
    /// Items taken and not yet finished or handed back.
    in_flight: usize,
    results: Vec<Option<Result<R, InferenceError>>>,
    deaths: Vec<Death>,
    alive: usize,
    stopped: bool,
    last_death: Option<String>,
}

impl<R> Queue<R> {
    fn new(total: usize, engines: usize) -> Self {
        Queue {
            state: Mutex::new(QueueState {
                next: 0,
                total,
                handed_back: VecDeque::new(),
                in_flight: 0,
                results: (0..total).map(|_| None).collect(),
                deaths: Vec::new(),
                alive: engines,
                stopped: false,
                last_death: None,
            }),
            changed: Condvar::new(),
        }
    }

    /// The next item to answer, waiting while none is free but some in flight may yet come back;
    /// `None` when there is nothing left (or dispatch was stopped).
    fn next(&self) -> Option<usize> {
        let mut state = lock(&self.state);
        loop {
            if state.stopped {
                return None;
            }
            if let Some(i) = state.handed_back.pop_front() {
                state.in_flight += 1;
                return Some(i);
            }
            if state.next < state.total {
                state.next += 1;
                state.in_flight += 1;
                return Some(state.next - 1);
            }
            if state.in_flight == 0 {
                return None;
            }
            state = self.changed.wait(state).unwrap_or_else(|p| p.into_inner());
        }
    }

    fn finish(&self, i: usize, result: Result<R, InferenceError>, stop: bool) {
        let mut state = lock(&self.state);
        state.results[i] = Some(result);
        state.in_flight -= 1;
        state.stopped |= stop;
        self.changed.notify_all();
    }

    /// Puts `i` back for another engine (its own engine is dead).
    fn hand_back(&self, i: usize) {
        let mut state = lock(&self.state);
        state.in_flight -= 1;
        state.handed_back.push_back(i);
        self.changed.notify_all();
    }

    /// `gpu`'s server died while answering `i`: `i` goes back to the queue; `first` for the first
    /// worker of that engine to notice.
    fn died(&self, i: usize, gpu: u32, error: String, first: bool) {
        let mut state = lock(&self.state);
        state.in_flight -= 1;
        state.handed_back.push_back(i);
        if first {
            state.alive -= 1;
            tracing::warn!(gpu, %error, "a server of the pool died; the others take its items");
            state.deaths.push(Death {
                gpu,
                error: error.clone(),
                handed_over: 0,
            });
            state.last_death = Some(error);
        }
        if let Some(death) = state.deaths.iter_mut().rev().find(|d| d.gpu == gpu) {
            death.handed_over += 1;
        }
        if state.alive == 0 {
            // Nobody is left to answer: what remains fails with the last death.
            state.stopped = true;
        }
        self.changed.notify_all();
    }

    fn into_results(
        self,
        subject: impl Fn(usize) -> Subject,
    ) -> (Vec<Result<R, InferenceError>>, Vec<Death>) {
        let state = self.state.into_inner().unwrap_or_else(|p| p.into_inner());
        let all_dead = state.alive == 0;
        let last_death = state.last_death;
        let results = state
            .results
            .into_iter()
            .enumerate()
            .map(|(i, result)| {
                result.unwrap_or_else(|| match (&last_death, all_dead) {
                    (Some(death), true) => Err(InferenceError::PoolExhausted {
                        subject: subject(i),
                        last_death: death.clone(),
                    }),
                    _ => Err(InferenceError::Cancelled {
                        subject: subject(i),
                    }),
                })
            })
            .collect();
        (results, state.deaths)
    }
}
