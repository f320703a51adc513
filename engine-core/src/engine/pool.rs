//! [`EnginePool`]: the servers of one or more GPUs of a host, used as one: work goes to whichever
//! server has a free slot (the one scheduler, over every server's slots). A [`Plan`] starts it, on
//! its own ([`Plan::start`]) or serving a batch as each GPU turns ready ([`Plan::serve`]).

use std::ops::ControlFlow;
use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use serde::de::DeserializeOwned;

use super::error::EngineError;
use super::error::{LeftOut, none_started};
use super::plan::{GpuPlan, Plan, WhenLocked};
use super::running::ShutdownReport;
use super::schedule::{self, Batch, Lanes, Opener};
use super::summary::RunTimes;
use super::typestate::{Engine, Healthy};
use crate::gpu::{GpuId, LockError, VramProbe};
use crate::request::RequestError;
use crate::request::{Answer, KeyframeRecord, Prompt, SceneDescription, Subject};
use crate::wait::{CancellationToken, Wait};

/// What happens to a pool as it starts ([`Plan::start`]'s and [`Plan::serve`]'s `events`).
#[derive(Debug)]
#[non_exhaustive]
pub enum Event<'a> {
    /// This GPU (nvidia-smi index) is about to take its lock (which another process may hold:
    /// say so before the wait).
    Locking {
        /// The GPU.
        gpu: u32,
    },
    /// This GPU's servers are ready and take work.
    Ready {
        /// The GPU.
        gpu: u32,
        /// Its servers.
        servers: u32,
        /// Requests it serves at once, over its servers.
        slots: u32,
    },
    /// This GPU did not start, and why.
    LeftOut(&'a LeftOut),
}

/// The servers of one or more GPUs, each GPU with its own VRAM check, lock and servers (which see
/// only their GPU), used as one: work goes to whichever server has a free slot.
///
/// ```no_run
/// use engine_core::{CancellationToken, EngineConfig, KeyframeRecord, Launch};
/// use engine_core::launch::Gpus;
///
/// let config = EngineConfig::builder("llava.gguf", "mmproj.gguf").slots(4).build()?;
/// let cancel = CancellationToken::new();
/// let pool = Launch::new(config).gpus(Gpus::List(vec![0.into(), 1.into()])).plan(&cancel)?.start(&cancel, &|_| {})?;
/// let frames = vec![KeyframeRecord::new("frame_0000012500.jpg", 12.5, "cut")];
/// let done = pool.describe_many(&frames, |_, _| std::ops::ControlFlow::Continue(()));
/// println!("{:?}", done.results[0]);
/// pool.shutdown();
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct EnginePool {
    /// Every server, a GPU's servers side by side.
    engines: Vec<Engine<Healthy>>,
    left_out: Vec<LeftOut>,
}

/// What [`Plan::serve`] did: the pool of the GPUs that started, the batch, and when the run began
/// and its first GPU was ready.
#[derive(Debug)]
#[non_exhaustive]
pub struct Served<T> {
    /// The GPUs that started (shut them down, or run more on them).
    pub pool: EnginePool,
    /// Every prompt's outcome, and what each started server did.
    pub batch: Batch<Answer<T>>,
    /// When the launch began (its plan).
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

impl From<Engine<Healthy>> for EnginePool {
    /// A pool of one running engine (after a swap, say).
    fn from(engine: Engine<Healthy>) -> Self {
        EnginePool {
            engines: vec![engine],
            left_out: Vec::new(),
        }
    }
}

impl Plan {
    /// Starts every GPU of the plan at once (each: its lock, waited for or skipped as the launch
    /// says, the VRAM read again under it, then its servers, all at once); a GPU that fails is
    /// left out ([`EnginePool::left_out`]) if another started. `cancel` gives up every start
    /// (each cleaned up as usual). `events` hears of each GPU's lock, readiness and failure as
    /// they happen. With no GPU started, the error is a single GPU's own, or
    /// [`EngineError::Pool`] naming every GPU's.
    pub fn start(
        self,
        cancel: &CancellationToken,
        events: &(dyn Fn(Event) + Sync),
    ) -> Result<EnginePool, EngineError> {
        let Plan {
            gpus,
            mut left_out,
            when_locked,
            probe,
            ..
        } = self;
        for left in &left_out {
            events(Event::LeftOut(left));
        }
        let started: Vec<Result<Vec<Engine<Healthy>>, LeftOut>> = std::thread::scope(|scope| {
            let starts: Vec<_> = gpus
                .into_iter()
                .map(|gpu| {
                    let probe = probe.clone();
                    scope.spawn(move || start_gpu(gpu, probe, when_locked, cancel, events))
                })
                .collect();
            starts
                .into_iter()
                .map(|start| start.join().expect("a GPU's start does not panic"))
                .collect()
        });
        let mut engines = Vec::new();
        for outcome in started {
            match outcome {
                Ok(servers) => engines.extend(servers),
                Err(left) => left_out.push(left),
            }
        }
        if engines.is_empty() {
            return Err(none_started(left_out));
        }
        Ok(EnginePool { engines, left_out })
    }

    /// Starts the plan as [`Plan::start`] does and answers `prompts` at the same time: each GPU
    /// takes work as soon as its servers are ready, so a GPU that loads (or waits for its lock)
    /// longer holds nobody back. The batch is as [`EnginePool::answer_many`]'s, under the
    /// scheduler's contract; a GPU whose start is still under way when the work is done is given up
    /// (everything cleaned up) and left out. With no GPU started, no item is told of, and the error
    /// is as [`Plan::start`]'s.
    ///
    /// ```no_run
    /// use engine_core::{CancellationToken, EngineConfig, Launch, Prompt};
    /// use engine_core::pool::Event;
    ///
    /// let config = EngineConfig::builder("llava.gguf", "mmproj.gguf").build()?;
    /// let cancel = CancellationToken::new();
    /// let prompts: Vec<Prompt> = Vec::new();
    /// let say = |event: Event| if let Event::Ready { gpu, .. } = event { eprintln!("GPU {gpu} ready") };
    /// let served = Launch::new(config).plan(&cancel)?.serve::<serde_json::Value, _>(
    ///     &prompts, &cancel, &say, |_, _| std::ops::ControlFlow::Continue(()),
    /// )?;
    /// println!("{:?}", served.batch.summary(served.times(std::time::SystemTime::now())));
    /// served.pool.shutdown();
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn serve<T, F>(
        self,
        prompts: &[Prompt],
        cancel: &CancellationToken,
        events: &(dyn Fn(Event) + Sync),
        on_done: F,
    ) -> Result<Served<T>, EngineError>
    where
        T: DeserializeOwned + Send,
        F: Fn(usize, &Result<Answer<T>, RequestError>) -> ControlFlow<()> + Sync,
    {
        let Plan {
            gpus,
            left_out: planned_out,
            when_locked,
            probe,
            began,
        } = self;
        for left in &planned_out {
            events(Event::LeftOut(left));
        }
        // One lane set per server; a GPU's servers side by side, from `first[g]`.
        let mut lanes = Vec::new();
        let mut first = Vec::new();
        for gpu in &gpus {
            first.push(lanes.len());
            for config in gpu.config.per_server(gpu.layout.servers) {
                lanes.push(Lanes {
                    gpu: gpu.gpu,
                    uuid: gpu.uuid.clone(),
                    slots: config.slots() as usize,
                });
            }
        }
        let engines: Vec<OnceLock<Engine<Healthy>>> =
            lanes.iter().map(|_| OnceLock::new()).collect();
        let failures: Vec<OnceLock<LeftOut>> = gpus.iter().map(|_| OnceLock::new()).collect();
        let first_ready: OnceLock<SystemTime> = OnceLock::new();
        // Starts end with the caller's token, and once the work is done.
        let give_up = cancel.child_token();
        let starts = |opener: &Opener<Answer<T>>| {
            std::thread::scope(|scope| {
                for (g, gpu) in gpus.into_iter().enumerate() {
                    let (engines, failures, first_ready) = (&engines, &failures, &first_ready);
                    let (give_up, probe) = (&give_up, probe.clone());
                    let lanes = first[g]..first[g] + gpu.layout.servers as usize;
                    scope.spawn(move || {
                        match start_gpu(gpu, probe, when_locked, give_up, events) {
                            Ok(servers) => {
                                let _ = first_ready.set(SystemTime::now());
                                for (lane, engine) in lanes.zip(servers) {
                                    let _ = engines[lane].set(engine);
                                    opener.open(lane, true);
                                }
                            }
                            Err(left) => {
                                let _ = failures[g].set(left);
                                lanes.for_each(|lane| opener.open(lane, false));
                            }
                        }
                    });
                }
            });
        };
        let mut batch = schedule::run_opening(
            &lanes,
            prompts,
            |lane, prompt| {
                if cancel.is_cancelled() {
                    return Err(RequestError::Cancelled {
                        subject: prompt.subject(),
                    });
                }
                let engine = engines[lane]
                    .get()
                    .expect("a lane works only once its server is open");
                engine.answer(prompt)
            },
            Prompt::subject,
            on_done,
            starts,
            || give_up.cancel(),
        );
        let mut left_out = planned_out;
        let mut started = Vec::new();
        let mut servers = Vec::new();
        for (engine, run) in engines.into_iter().zip(batch.servers) {
            if let Some(engine) = engine.into_inner() {
                started.push(engine);
                servers.push(run);
            }
        }
        left_out.extend(failures.into_iter().filter_map(OnceLock::into_inner));
        batch.servers = servers;
        let Some(first_ready) = first_ready.into_inner() else {
            return Err(none_started(left_out));
        };
        Ok(Served {
            pool: EnginePool {
                engines: started,
                left_out,
            },
            batch,
            started: began,
            first_ready,
        })
    }
}

/// One GPU's start: the plan's reading as its first VRAM check, its lock (skipped if held under
/// [`WhenLocked::Skip`]), the VRAM read again under the lock, then its servers. Told to `events`.
fn start_gpu(
    gpu: GpuPlan,
    probe: VramProbe,
    when_locked: WhenLocked,
    cancel: &CancellationToken,
    events: &(dyn Fn(Event) + Sync),
) -> Result<Vec<Engine<Healthy>>, LeftOut> {
    // Named by its nvidia-smi index, which the plan resolved.
    let name = GpuId::Index(gpu.gpu);
    let servers = gpu.layout.servers;
    let slots = gpu.layout.slots;
    let wait = Wait::Until(cancel);
    let started = (|| -> Result<Vec<Engine<Healthy>>, EngineError> {
        let checked = Engine::new(gpu.config).checked(probe, gpu.reading)?;
        events(Event::Locking { gpu: gpu.gpu });
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
        Ok(locked.start_servers(servers, wait)?)
    })();
    match started {
        Ok(engines) => {
            events(Event::Ready {
                gpu: gpu.gpu,
                servers,
                slots,
            });
            Ok(engines)
        }
        Err(error) => {
            tracing::warn!(gpu = %name, %error, "GPU left out of the pool");
            let left = LeftOut { gpu: name, error };
            events(Event::LeftOut(&left));
            Err(left)
        }
    }
}

impl EnginePool {
    /// The engines, one per server (a GPU's servers side by side).
    pub fn engines(&self) -> &[Engine<Healthy>] {
        &self.engines
    }

    /// The GPUs that did not start, and why.
    pub fn left_out(&self) -> &[LeftOut] {
        &self.left_out
    }

    /// The running engines, one per server, taken out of the pool (to [`Engine::swap`] the only
    /// one, say).
    pub fn into_engines(self) -> Vec<Engine<Healthy>> {
        self.engines
    }

    /// Requests the pool serves at once: every server's slots.
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

    /// Stops every server at once (each as [`Engine::shutdown`]; the last server of a GPU waits for
    /// its VRAM and releases its lock); one result per server, with its GPU, in the pool's order.
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
