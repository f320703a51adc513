//! [`EnginePool`]: one engine per GPU of a host, started in parallel, with the work shared out by
//! whichever GPU has a free slot (the one scheduler, over every engine's slots).

use std::ops::ControlFlow;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use serde::de::DeserializeOwned;

use super::running::ShutdownReport;
use super::schedule::{self, Batch, Lanes, Opener};
use super::summary::RunTimes;
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

/// What happens to a pool as it starts ([`EnginePool::launch_answering`]'s `events`).
#[derive(Debug)]
#[non_exhaustive]
pub enum Event<'a> {
    /// The engine of this GPU (nvidia-smi index) is about to take its lock (which another process
    /// may hold: say so before the wait).
    Locking {
        /// The GPU.
        gpu: u32,
    },
    /// This GPU's server is ready and takes work.
    Ready {
        /// The GPU.
        gpu: u32,
        /// Requests it serves at once.
        slots: u32,
    },
    /// This GPU did not start, and why.
    LeftOut(&'a LeftOut),
}

/// What [`EnginePool::launch_answering`] did: the pool of the GPUs that started, the batch, and
/// when the run began and its first GPU was ready.
#[derive(Debug)]
#[non_exhaustive]
pub struct Served<T> {
    /// The GPUs that started (shut them down, or run more on them).
    pub pool: EnginePool,
    /// Every prompt's outcome, and what each started GPU did.
    pub batch: Batch<Answer<T>>,
    /// When the launch began.
    pub started: SystemTime,
    /// When the first GPU was ready.
    pub first_ready: SystemTime,
}

impl<T> Served<T> {
    /// The run's moments, for [`Batch::summary`]: its start, its first GPU ready, and `finished`.
    pub fn times(&self, finished: SystemTime) -> RunTimes {
        RunTimes {
            started: self.started,
            ready: self.first_ready,
            finished,
        }
    }
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
        let (unique, mut left_out) = name_each_gpu_once(configs, wait);
        let unique = share_the_cores(unique);
        let outcomes: Vec<(GpuId, Result<Engine<Healthy>, EngineError>)> =
            std::thread::scope(|scope| {
                let starts: Vec<_> = unique
                    .into_iter()
                    .map(|config| {
                        let gpu = config.gpu().clone();
                        let start = move || start(config, when_locked, wait, &|_| {});
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

    /// Starts the pool as [`EnginePool::launch`] does and answers `prompts` on it at the same
    /// time: each GPU takes work as soon as its server is ready, so a GPU that loads (or waits for
    /// its lock) longer holds nobody back. The batch is as [`EnginePool::answer_many`]'s, under the
    /// scheduler's contract; a GPU whose start is still under way when the work is done is left out
    /// (its start given up, everything cleaned up; under [`Wait::For`] the start runs to its
    /// deadline instead, which bounds it anyway). `events` hears of each GPU's lock, readiness
    /// and failure as they happen. With no GPU started, no item is told of and the error names
    /// every GPU's failure.
    ///
    /// ```no_run
    /// use engine_core::{EngineConfig, EnginePool, Prompt, Wait};
    /// use engine_core::pool::{Event, WhenLocked};
    ///
    /// let base = EngineConfig::builder("llava.gguf", "mmproj.gguf").port(0).slots(4);
    /// let configs = (0..2).map(|gpu| base.clone().gpu(gpu).build()).collect::<Result<Vec<_>, _>>()?;
    /// let prompts: Vec<Prompt> = Vec::new();
    /// let say = |event: Event| if let Event::Ready { gpu, .. } = event { eprintln!("GPU {gpu} ready") };
    /// let served = EnginePool::launch_answering::<serde_json::Value, _>(
    ///     configs, WhenLocked::Wait, Wait::Forever, &say, &prompts, |_, _| std::ops::ControlFlow::Continue(()),
    /// )?;
    /// println!("{:?}", served.batch.summary(served.times(std::time::SystemTime::now())));
    /// served.pool.shutdown();
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn launch_answering<T, F>(
        configs: Vec<EngineConfig>,
        when_locked: WhenLocked,
        wait: Wait,
        events: &(dyn Fn(Event) + Sync),
        prompts: &[Prompt],
        on_done: F,
    ) -> Result<Served<T>, PoolError>
    where
        T: DeserializeOwned + Send,
        F: Fn(usize, &Result<Answer<T>, RequestError>) -> ControlFlow<()> + Sync,
    {
        let started_at = SystemTime::now();
        let (unique, left) = name_each_gpu_once(configs, wait);
        for left in &left {
            events(Event::LeftOut(left));
        }
        let unique = share_the_cores(unique);
        let lanes: Vec<Lanes> = unique
            .iter()
            .map(|c| Lanes {
                gpu: 0,
                uuid: String::new(),
                slots: c.slots() as usize,
            })
            .collect();
        let engines: Vec<OnceLock<Engine<Healthy>>> =
            unique.iter().map(|_| OnceLock::new()).collect();
        let failures: Vec<OnceLock<LeftOut>> = unique.iter().map(|_| OnceLock::new()).collect();
        let first_ready: OnceLock<SystemTime> = OnceLock::new();
        // Starts end on the caller's flag, and once the work is done (a bounded wait ends by itself).
        let give_up = AtomicBool::new(false);
        let start_wait = match wait {
            Wait::For(_) => wait,
            Wait::Forever | Wait::Until(_) => Wait::Until(&give_up),
        };
        let caller_flag = match wait {
            Wait::Until(flag) => Some(flag),
            _ => None,
        };
        let stopped = || caller_flag.is_some_and(|f| f.load(Ordering::Acquire));
        let starts = |opener: &Opener<Answer<T>>| {
            std::thread::scope(|scope| {
                if caller_flag.is_some() {
                    // The caller's flag, passed on to the starts (which also end on the work's end).
                    scope.spawn(|| {
                        while !give_up.load(Ordering::Acquire) {
                            if stopped() {
                                give_up.store(true, Ordering::Release);
                            }
                            std::thread::sleep(crate::wait::FLAG_CHECK);
                        }
                    });
                }
                for (server, config) in unique.into_iter().enumerate() {
                    let (engines, failures, first_ready) = (&engines, &failures, &first_ready);
                    let gpu = config.gpu().clone();
                    let before_lock = |gpu| events(Event::Locking { gpu });
                    scope.spawn(move || {
                        match start(config, when_locked, start_wait, &before_lock) {
                            Ok(engine) => {
                                let _ = first_ready.set(SystemTime::now());
                                let (gpu, uuid) = (engine.gpu(), engine.vram().uuid.clone());
                                events(Event::Ready {
                                    gpu,
                                    slots: engine.config().slots(),
                                });
                                let _ = engines[server].set(engine);
                                opener.ready(server, gpu, &uuid);
                            }
                            Err(error) => {
                                tracing::warn!(%gpu, %error, "GPU left out of the pool");
                                let left = failures[server].get_or_init(|| LeftOut { gpu, error });
                                events(Event::LeftOut(left));
                                opener.open(server, false);
                            }
                        }
                    });
                }
            });
        };
        let mut batch = schedule::run_opening(
            &lanes,
            prompts,
            |server, prompt| {
                if stopped() {
                    return Err(RequestError::Cancelled {
                        subject: prompt.subject(),
                    });
                }
                let engine = engines[server]
                    .get()
                    .expect("a lane works only once its server is open");
                engine.answer(prompt)
            },
            Prompt::subject,
            on_done,
            starts,
            || give_up.store(true, Ordering::Release),
        );
        let mut left_out = left;
        let mut started = Vec::new();
        let mut servers = Vec::new();
        for ((engine, failure), run) in engines.into_iter().zip(failures).zip(batch.servers) {
            if let Some(engine) = engine.into_inner() {
                started.push(engine);
                servers.push(run);
            }
            left_out.extend(failure.into_inner());
        }
        batch.servers = servers;
        let Some(first_ready) = first_ready.into_inner() else {
            return Err(PoolError { failures: left_out });
        };
        Ok(Served {
            pool: EnginePool {
                engines: started,
                left_out,
            },
            batch,
            started: started_at,
            first_ready,
        })
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
