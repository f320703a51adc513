//! [`EnginePool`]: one engine per GPU of a host, started in parallel, with the work shared out by
//! whichever GPU has a free slot (the one scheduler, over every engine's slots).

use std::ops::ControlFlow;
use std::time::Duration;

use serde::de::DeserializeOwned;

use super::running::ShutdownReport;
use super::schedule::{self, Batch, Lanes};
use super::typestate::{Engine, Healthy};
use crate::config::{ConfigError, EngineConfig, Setting};
use crate::error::{EngineError, RequestError};
use crate::gpu::{GpuId, LockError, Visible, distinct};
use crate::request::{Answer, KeyframeRecord, Prompt, SceneDescription, Subject};
use crate::wait::Wait;

/// What a pool does with a GPU whose lock another process holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WhenLocked {
    /// Leave it out (`--gpus all`: use the GPUs that are free now).
    Skip,
    /// Wait for it (GPUs named one by one), as long as the launch's [`Wait`] allows.
    Wait,
}

/// A GPU that was asked for but did not start, and why.
#[derive(Debug)]
#[non_exhaustive]
pub struct LeftOut {
    /// The GPU as it was named.
    pub gpu: GpuId,
    /// Why it was left out.
    pub error: EngineError,
}

/// Engines on several GPUs of one host, each with its own VRAM check, GPU lock and server (which sees
/// only its GPU), used as one: work goes to whichever GPU has a free slot.
///
/// ```no_run
/// use engine_core::{EngineConfig, EnginePool, KeyframeRecord, Wait};
/// use engine_core::pool::WhenLocked;
///
/// let base = EngineConfig::builder("llava.gguf", "mmproj.gguf").port(0).slots(4);
/// let configs = (0..2).map(|gpu| base.clone().gpu(gpu).build()).collect::<Result<Vec<_>, _>>()?;
/// let pool = EnginePool::launch(configs, WhenLocked::Wait, Wait::Forever)?;
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
#[error("no GPU of the pool started: {}", failures.iter().map(|f| format!("{}: {}", f.gpu, f.error)).collect::<Vec<_>>().join("; "))]
#[non_exhaustive]
pub struct PoolError {
    /// Each GPU and why it did not start.
    pub failures: Vec<LeftOut>,
}

impl EnginePool {
    /// Starts one engine per configuration, all at once (each: VRAM check, lock, start). A GPU that
    /// fails is left out (see [`EnginePool::left_out`]) if another started, and so is a GPU named
    /// twice (by its index and its UUID, say, which would wait for its own lock); a GPU locked by
    /// another process is left out at once under [`WhenLocked::Skip`], waited for under
    /// [`WhenLocked::Wait`]. `wait` bounds every step of every start (a flag gives them all up,
    /// each cleaned up as usual).
    pub fn launch(
        configs: Vec<EngineConfig>,
        when_locked: WhenLocked,
        wait: Wait,
    ) -> Result<EnginePool, PoolError> {
        Self::launch_with(configs, when_locked, wait, &|_| {})
    }

    /// As [`EnginePool::launch`], calling `before_lock(gpu)` (the nvidia-smi index) just before each
    /// engine takes its GPU's lock: where a front end says who holds a lock it is about to wait for.
    pub fn launch_with(
        configs: Vec<EngineConfig>,
        when_locked: WhenLocked,
        wait: Wait,
        before_lock: &(dyn Fn(u32) + Sync),
    ) -> Result<EnginePool, PoolError> {
        let (unique, mut left_out) = name_each_gpu_once(configs, wait);
        let unique = share_the_cores(unique);
        let outcomes: Vec<(GpuId, Result<Engine<Healthy>, EngineError>)> =
            std::thread::scope(|scope| {
                let starts: Vec<_> = unique
                    .into_iter()
                    .map(|config| {
                        let gpu = config.gpu().clone();
                        let start = move || start(config, when_locked, wait, before_lock);
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
    pub fn describe_many<F>(&self, frames: &[KeyframeRecord], on_done: F) -> Batch<SceneDescription>
    where
        F: Fn(usize, &Result<SceneDescription, RequestError>) -> ControlFlow<()> + Sync,
    {
        schedule::run(
            &self.lanes(),
            frames,
            |e, frame| self.engines[e].describe(frame),
            |frame| Subject::Frame(frame.frame_path.clone()),
            on_done,
        )
    }

    /// [`Engine::complete`] over the pool, under the scheduler's contract (every item gets exactly
    /// one outcome, once): each engine runs as many requests at once as it has slots, taking the
    /// next item as one finishes (no static split), and results come back in input order.
    /// `on_done(index, &outcome)` runs as each ends; `Break` stops dispatch (items not started end as
    /// [`RequestError::Cancelled`]). When a server dies, its items in flight go back to the queue for
    /// the others ([`Batch::servers`] says so); only when every server has died do the remaining
    /// items end, those in flight with the death and the others as [`RequestError::NoServerLeft`].
    pub fn complete_many<T, F>(&self, prompts: &[Prompt], on_done: F) -> Batch<T>
    where
        T: DeserializeOwned + Send,
        F: Fn(usize, &Result<T, RequestError>) -> ControlFlow<()> + Sync,
    {
        schedule::run(
            &self.lanes(),
            prompts,
            |e, prompt| self.engines[e].complete(prompt),
            Prompt::subject,
            on_done,
        )
    }

    /// [`EnginePool::complete_many`], each outcome with what it cost: what a run's
    /// [`crate::batch::Summary`] is made from.
    pub fn answer_many<T, F>(&self, prompts: &[Prompt], on_done: F) -> Batch<Answer<T>>
    where
        T: DeserializeOwned + Send,
        F: Fn(usize, &Result<Answer<T>, RequestError>) -> ControlFlow<()> + Sync,
    {
        schedule::run(
            &self.lanes(),
            prompts,
            |e, prompt| self.engines[e].answer(prompt),
            Prompt::subject,
            on_done,
        )
    }

    fn lanes(&self) -> Vec<Lanes> {
        self.engines
            .iter()
            .map(|e| e.lanes(e.config().slots() as usize))
            .collect()
    }

    /// Starts killing every server's tree and returns at once (see [`Engine::abort`]).
    pub fn abort(&self) {
        for engine in &self.engines {
            engine.abort();
        }
    }

    /// Stops every server at once (each as [`Engine::shutdown`]); one result per GPU, in the pool's
    /// order.
    pub fn shutdown(self) -> Vec<(u32, Result<ShutdownReport, RequestError>)> {
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

/// The configurations to start, one per GPU, and those left out: a GPU named twice, or one that
/// names no GPU. One reading resolves every name.
fn name_each_gpu_once(configs: Vec<EngineConfig>, wait: Wait) -> (Vec<EngineConfig>, Vec<LeftOut>) {
    let gpus: Vec<GpuId> = configs.iter().map(|c| c.gpu().clone()).collect();
    let rows = match configs
        .first()
        .map(|c| c.vram_probe().and_then(|p| p.query(wait)))
    {
        Some(Ok(rows)) => rows,
        // No reading: each start reads for itself, and fails with the reason.
        _ => return (configs, Vec::new()),
    };
    let (first, again) = distinct(&rows, &gpus, &Visible::from_env());
    let mut left_out: Vec<LeftOut> = again
        .into_iter()
        .map(|(at, twice)| LeftOut {
            gpu: gpus[at].clone(),
            error: ConfigError::new(Setting::Gpu, twice.to_string()).into(),
        })
        .collect();
    let mut given: Vec<Option<EngineConfig>> = configs.into_iter().map(Some).collect();
    let mut unique = Vec::new();
    for (at, reading) in first {
        let Some(config) = given[at].take() else {
            continue;
        };
        match reading {
            Ok(_) => unique.push(config),
            Err(e) => left_out.push(LeftOut {
                gpu: gpus[at].clone(),
                error: e.into(),
            }),
        }
    }
    (unique, left_out)
}

/// Each server's share of this host's cores, for the configurations that set no `threads`: several
/// servers that each take every core (llama-server's default) slow each other down on the CPU side
/// of every request (measured on 2×H200: `-t 4` per server gave the steadier throughput).
fn share_the_cores(configs: Vec<EngineConfig>) -> Vec<EngineConfig> {
    if configs.len() < 2 {
        return configs;
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let share = u32::try_from((cores / configs.len()).max(1)).unwrap_or(1);
    configs
        .into_iter()
        .map(|config| match config.threads() {
            Some(_) => config,
            None => config
                .to_builder()
                .threads(share)
                .build()
                .expect("a checked configuration with a thread count of at least 1"),
        })
        .collect()
}

/// One engine's start for the pool.
fn start(
    config: EngineConfig,
    when_locked: WhenLocked,
    wait: Wait,
    before_lock: &(dyn Fn(u32) + Sync),
) -> Result<Engine<Healthy>, EngineError> {
    let checked = Engine::new(config).check_vram(wait)?;
    before_lock(checked.vram().gpu);
    let locked = match when_locked {
        WhenLocked::Skip => checked.lock_gpu(Wait::For(Duration::ZERO)),
        WhenLocked::Wait => checked.lock_gpu(wait),
    };
    let locked = locked.map_err(|e| match e {
        LockError::Timeout { gpu, path, .. } => LockError::Timeout {
            gpu,
            waited: Duration::ZERO,
            path,
        },
        other => other,
    })?;
    Ok(locked.start(wait)?)
}
