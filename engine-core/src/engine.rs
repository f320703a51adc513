//! The engine's lifecycle as a typestate. Each step consumes the engine and returns it in the next
//! state, so a step out of order does not compile:
//!
//! 1. [`Unchecked`]: holds the configuration. [`Engine::check_vram`] →
//! 2. [`VramOk`]: + the VRAM reading. [`Engine::lock`] / [`Engine::try_lock_for`] →
//! 3. [`Locked`]: + the GPU guard. [`Engine::start`] →
//! 4. [`Healthy`]: + the server child and its client. [`Engine::describe`], [`Engine::complete`],
//!    [`Engine::swap`] (to the next model, keeping the lock), [`Engine::shutdown`].
//!
//! Dropping an engine releases what it holds in reverse order (server stopped and reaped, then the GPU
//! lock), also while unwinding from a panic and after a failed step.

use std::ops::ControlFlow;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;

use crate::config::EngineConfig;
use crate::describe::describe_frame;
use crate::error::{ConfigError, EngineError, InferenceError, LockError, VramError};
use crate::gpu_lock::{GpuGuard, gpu_lock, gpu_lock_cancellable, try_gpu_lock_for};
use crate::process::{ChildExit, Escalation, Leftover};
use crate::prompt::{Prompt, Subject};
use crate::request::complete;
use crate::scene::{KeyframeRecord, SceneDescription};
use crate::server::Server;
use crate::sync::lock;
use crate::vram::{
    GpuId, Visible, VramProbe, VramReading, VramRecovery, assert_vram_available, select,
    wait_for_free, wait_for_recovery,
};

mod sealed {
    pub trait Sealed {}
}

/// A lifecycle state of [`Engine`]. Sealed: only this crate's four states implement it.
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not an engine state",
    note = "the states are Unchecked, VramOk, Locked and Healthy, reached through Engine's methods"
)]
pub trait State: sealed::Sealed {}

/// Configured, nothing checked or held yet.
#[derive(Debug)]
pub struct Unchecked {
    _private: (),
}

/// The GPU had enough free VRAM when checked.
#[derive(Debug)]
pub struct VramOk {
    reading: VramReading,
    probe: VramProbe,
}

/// The GPU lock is held, and the GPU still had enough free VRAM once it was.
#[derive(Debug)]
pub struct Locked {
    /// Taken under the lock: the baseline that VRAM must come back to after the server stops.
    reading: VramReading,
    guard: GpuGuard,
    probe: VramProbe,
}

/// llama-server is running, healthy and proven ours. Field order is drop order: the running server
/// (stopped, then VRAM waited for), then the lock.
#[derive(Debug)]
pub struct Healthy {
    running: Running,
    guard: GpuGuard,
}

/// The server and what its stop needs: the probe and the baseline to wait for VRAM against. Dropping
/// it stops the server and waits for VRAM, so the guard beside it is released only after that.
#[derive(Debug)]
struct Running {
    server: Server,
    baseline: VramReading,
    probe: VramProbe,
    stop_grace: Duration,
    recovery_timeout: Duration,
    /// Set by the first stop; drop does nothing after it.
    stopped: bool,
}

impl Running {
    fn stop(&mut self) -> ShutdownReport {
        self.stopped = true;
        let started = Instant::now();
        let stopped = self.server.stop(self.stop_grace);
        let took = started.elapsed();
        ShutdownReport {
            pid: self.server.pid(),
            status: stopped.exit,
            escalation: stopped.escalation,
            left_running: stopped.left_running,
            took,
            vram: wait_for_recovery(&self.probe, &self.baseline, self.recovery_timeout),
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if !self.stopped {
            self.stop();
        }
    }
}

/// How one stop of the server went.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ShutdownReport {
    /// The server's pid (as [`Engine::pid`] gave it).
    pub pid: u32,
    /// Its exit code or signal; `None` if even SIGKILL did not end it (see `left_running`).
    pub status: Option<ChildExit>,
    /// How far the stop had to escalate.
    pub escalation: Escalation,
    /// Processes of the server's tree that SIGKILL and the bounded wait after it did not end.
    pub left_running: Vec<Leftover>,
    /// From the first signal to reaped.
    pub took: Duration,
    /// Whether free VRAM came back before the GPU lock was released.
    pub vram: VramRecovery,
}

impl sealed::Sealed for Unchecked {}
impl sealed::Sealed for VramOk {}
impl sealed::Sealed for Locked {}
impl sealed::Sealed for Healthy {}
impl State for Unchecked {}
impl State for VramOk {}
impl State for Locked {}
impl State for Healthy {}

/// The inference engine in lifecycle state `S`.
///
/// ```no_run
/// use engine_core::{Engine, EngineConfig, KeyframeRecord};
///
/// let config = EngineConfig::builder("llava.gguf", "mmproj.gguf").build()?;
/// let engine = Engine::new(config)
///     .check_vram()?   // Engine<VramOk>
///     .lock()?         // Engine<Locked>
///     .start()?;       // Engine<Healthy>
/// let scene = engine.describe(&KeyframeRecord::new("frame_0001.jpg", 12.5, "scene-cut"))?;
/// println!("{}", scene.mood);
/// engine.shutdown()?;  // or just drop it
/// # Ok::<(), engine_core::EngineError>(())
/// ```
#[derive(Debug)]
pub struct Engine<S: State> {
    config: EngineConfig,
    state: S,
}

impl<S: State> Engine<S> {
    /// The configuration.
    pub fn config(&self) -> &EngineConfig {
        &self.config
    }
}

impl Engine<Unchecked> {
    /// A new engine; nothing is checked, held or started yet.
    pub fn new(config: EngineConfig) -> Self {
        Engine {
            config,
            state: Unchecked { _private: () },
        }
    }

    /// Checks that the configured GPU has at least `min_vram_mib` free (fail fast: it is checked
    /// again once the lock is held).
    pub fn check_vram(self) -> Result<Engine<VramOk>, VramError> {
        let probe = self.config.vram_probe()?;
        let reading = assert_vram_available(
            &probe,
            self.config.gpu().clone(),
            self.config.min_vram_mib(),
        )?;
        tracing::info!(
            gpu = reading.gpu,
            free_mib = reading.free_mib,
            "VRAM check passed"
        );
        Ok(Engine {
            config: self.config,
            state: VramOk { reading, probe },
        })
    }

    /// As [`Engine::check_vram`], but waits up to `timeout` for the memory to be free, polling at
    /// the probe's pace (about every 50 ms): for the moment right after another model stopped. The
    /// error names the last reading. Errors other than too little memory end the wait at once.
    pub fn check_vram_within(self, timeout: Duration) -> Result<Engine<VramOk>, VramError> {
        let probe = self.config.vram_probe()?;
        let reading = wait_for_free(
            &probe,
            self.config.gpu(),
            &Visible::from_env(),
            self.config.min_vram_mib(),
            timeout,
        )?;
        Ok(Engine {
            config: self.config,
            state: VramOk { reading, probe },
        })
    }

    /// Runs every step: check VRAM, take the GPU lock (waiting for it), start the server.
    pub fn launch(config: EngineConfig) -> Result<Engine<Healthy>, EngineError> {
        Ok(Engine::new(config).check_vram()?.lock()?.start()?)
    }
}

impl Engine<VramOk> {
    /// The VRAM reading that passed the check.
    pub fn vram(&self) -> &VramReading {
        &self.state.reading
    }

    /// Takes the GPU lock, waiting as long as another holder keeps it, then checks VRAM again: the
    /// GPU may have filled up while we waited. That reading is the baseline VRAM must come back to.
    pub fn lock(self) -> Result<Engine<Locked>, LockError> {
        let guard = gpu_lock(self.state.reading.gpu)?;
        self.locked(guard)
    }

    /// Takes the GPU lock, waiting at most `timeout`, then checks VRAM again (as [`Engine::lock`]).
    pub fn try_lock_for(self, timeout: Duration) -> Result<Engine<Locked>, LockError> {
        let guard = try_gpu_lock_for(self.state.reading.gpu, timeout)?;
        self.locked(guard)
    }

    /// Takes the GPU lock, waiting until it is free or `cancel` is set (then
    /// [`LockError::Cancelled`] within about 20 ms), then checks VRAM again (as [`Engine::lock`]).
    pub fn lock_cancellable(self, cancel: &AtomicBool) -> Result<Engine<Locked>, LockError> {
        let guard = gpu_lock_cancellable(self.state.reading.gpu, cancel)?;
        self.locked(guard)
    }

    fn locked(self, guard: GpuGuard) -> Result<Engine<Locked>, LockError> {
        tracing::info!(gpu = guard.gpu(), "GPU lock held");
        // The same physical GPU as the first check, whatever CUDA_VISIBLE_DEVICES says now.
        let gpu = GpuId::Index(self.state.reading.gpu);
        // On error the guard drops here, releasing the lock.
        let probe = self.state.probe;
        let reading = probe
            .read(&gpu, &Visible::All, self.config.min_vram_mib())
            .map_err(LockError::VramUnderLock)?;
        Ok(Engine {
            config: self.config,
            state: Locked {
                reading,
                guard,
                probe,
            },
        })
    }
}

impl Engine<Locked> {
    /// The VRAM reading taken under the lock.
    pub fn vram(&self) -> &VramReading {
        &self.state.reading
    }

    /// Starts llama-server, showing it only the locked GPU, and waits until it is healthy. On failure
    /// the server's tree is stopped and reaped, VRAM is waited for as after a normal stop, and the
    /// GPU lock released, before the error is returned.
    pub fn start(self) -> Result<Engine<Healthy>, InferenceError> {
        self.start_with(None)
    }

    /// As [`Engine::start`], but setting `cancel` while the server loads stops it and returns
    /// [`InferenceError::StartCancelled`] (checked at each health poll), with the same cleanup.
    pub fn start_cancellable(self, cancel: &AtomicBool) -> Result<Engine<Healthy>, InferenceError> {
        self.start_with(Some(cancel))
    }

    fn start_with(self, cancel: Option<&AtomicBool>) -> Result<Engine<Healthy>, InferenceError> {
        let Locked {
            reading,
            guard,
            probe,
        } = self.state;
        start_server(self.config, probe, reading, guard, cancel)
    }
}

/// The reading `next` starts from on the held `gpu`: one query finds which GPU `next` names (it
/// must be `gpu`) and, usually, that its minimum is free; else the bounded wait for it.
fn reading_for_next(
    next: &EngineConfig,
    gpu: u32,
) -> Result<(VramProbe, VramReading), EngineError> {
    let probe = next.vram_probe()?;
    let rows = probe.query()?;
    let target = select(&rows, next.gpu(), &Visible::from_env(), 0)?;
    if target.gpu != gpu {
        return Err(ConfigError(format!(
            "swap keeps the GPU it holds (GPU {gpu}), but the next configuration names GPU {} \
             — give it the same GPU, or shut down and launch a new engine",
            target.gpu
        ))
        .into());
    }
    let held = GpuId::Index(gpu);
    let reading = match select(&rows, &held, &Visible::All, next.min_vram_mib()) {
        Err(VramError::Insufficient { .. }) => wait_for_free(
            &probe,
            &held,
            &Visible::All,
            next.min_vram_mib(),
            next.vram_recovery_timeout(),
        )?,
        other => other?,
    };
    Ok((probe, reading))
}

/// Starts `config`'s server on the locked GPU of `reading` (the baseline for the VRAM wait after
/// its stop). On failure: the tree stopped and reaped, VRAM waited for, the lock released.
fn start_server(
    config: EngineConfig,
    probe: VramProbe,
    reading: VramReading,
    guard: GpuGuard,
    cancel: Option<&AtomicBool>,
) -> Result<Engine<Healthy>, InferenceError> {
    let visible = if reading.uuid.is_empty() {
        reading.gpu.to_string()
    } else {
        reading.uuid.clone()
    };
    let server = match Server::start(&config, &visible, guard.raw_fd(), cancel) {
        Ok(server) => server,
        Err(e) => {
            // A start that died of "CUDA error: out of memory" may still hold VRAM a moment.
            let recovery = wait_for_recovery(&probe, &reading, config.vram_recovery_timeout());
            tracing::debug!(?recovery, "VRAM after the failed start");
            drop(guard);
            return Err(e);
        }
    };
    let running = Running {
        server,
        baseline: reading,
        probe,
        stop_grace: config.stop_grace(),
        recovery_timeout: config.vram_recovery_timeout(),
        stopped: false,
    };
    Ok(Engine {
        config,
        state: Healthy { running, guard },
    })
}

impl Engine<Healthy> {
    /// The VRAM reading taken under the lock, before the server started.
    pub fn vram(&self) -> &VramReading {
        &self.state.running.baseline
    }

    /// The GPU held (nvidia-smi index).
    pub fn gpu(&self) -> u32 {
        self.state.guard.gpu()
    }

    /// The port the server listens on (127.0.0.1).
    pub fn port(&self) -> u16 {
        self.state.running.server.port()
    }

    /// `http://127.0.0.1:PORT`.
    pub fn base_url(&self) -> &str {
        self.state.running.server.client().base_url()
    }

    /// The server's API key (random per engine). Every endpoint but `/health` needs it as
    /// `Authorization: Bearer KEY`; for callers who talk to their server directly (`/metrics`, say).
    pub fn api_key(&self) -> &str {
        self.state.running.server.api_key()
    }

    /// The pid of the program the engine started as the server: llama-server itself, or the wrapper
    /// script that runs it. (Our direct child is the server's keeper; this is the keeper's child.)
    pub fn pid(&self) -> u32 {
        self.state.running.server.pid()
    }

    /// Describes one keyframe: [`Engine::complete`] with the scene preset ([`crate::DescribeOptions`]'s
    /// prompt and sampling, [`crate::SCENE_DESCRIPTION_SCHEMA`], the frame as the image). The frame
    /// is checked before anything is sent; invalid answers are retried up to `retries` more times.
    /// Safe to call from several threads at once.
    pub fn describe(&self, frame: &KeyframeRecord) -> Result<SceneDescription, InferenceError> {
        let server = &self.state.running.server;
        if let Some(died) = server.death(Duration::ZERO) {
            return Err(died.during(&Subject::Frame(frame.frame_path.clone())));
        }
        describe_frame(
            server.client(),
            self.config.describe_options(),
            frame,
            &|wait| server.death(wait),
        )
    }

    /// Sends one schema-constrained request and returns the answer as `T`: images checked before
    /// sending (and refused for a text-only model), the schema sent as llama-server expects it, a
    /// Markdown fence stripped, the answer validated against the prompt's [`crate::Schema`] and
    /// read into `T` (`serde_json::Value` for any answer), invalid answers retried up to `retries`
    /// more times ([`crate::DescribeOptions`] holds the retries, the request timeout and the image
    /// size limit). Safe to call from several threads at once.
    ///
    /// ```no_run
    /// use engine_core::{Engine, EngineConfig, Prompt, Schema};
    /// use serde_json::json;
    ///
    /// #[derive(serde::Deserialize)]
    /// struct Anchors { begin_t: f64, escalation_t: f64, climax_t: f64 }
    ///
    /// let schema = Schema::new("structural_anchors", json!({
    ///     "type": "object",
    ///     "properties": {"begin_t": {"type": "number"}, "escalation_t": {"type": "number"},
    ///                    "climax_t": {"type": "number"}},
    ///     "required": ["begin_t", "escalation_t", "climax_t"], "additionalProperties": false,
    /// }))?;
    /// let engine = Engine::launch(EngineConfig::text("mistral.gguf").port(8090).ctx_size(8192).build()?)?;
    /// let anchors: Anchors = engine.complete(&Prompt::new(&schema, "1\n00:00:01,000 --> ...").max_tokens(128))?;
    /// println!("climax at {} s", anchors.climax_t);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn complete<T: DeserializeOwned>(&self, prompt: &Prompt) -> Result<T, InferenceError> {
        let server = &self.state.running.server;
        if let Some(died) = server.death(Duration::ZERO) {
            return Err(died.during(&prompt.subject()));
        }
        complete(
            server.client(),
            self.config.describe_options(),
            self.config.mmproj().is_some(),
            prompt,
            &|wait| server.death(wait),
        )
    }

    /// [`Engine::complete`] for many prompts, with up to `concurrency` in flight, results in input
    /// order; `on_done` as for [`Engine::describe_many`].
    pub fn complete_many<T, F>(
        &self,
        prompts: &[Prompt],
        concurrency: usize,
        on_done: F,
    ) -> Vec<Result<T, InferenceError>>
    where
        T: DeserializeOwned + Send,
        F: Fn(usize, &Result<T, InferenceError>) -> ControlFlow<()> + Sync,
    {
        batch(
            prompts,
            concurrency,
            |prompt| self.complete(prompt),
            Prompt::subject,
            on_done,
        )
    }

    /// Stops this model's server and starts `next` on the same GPU without letting go of the GPU
    /// lock, so that no other process can take the GPU between the two models: stop (as
    /// [`Engine::shutdown`], VRAM waited for), wait up to `next`'s `vram_recovery_timeout` for its
    /// `min_vram_mib` to be free, start `next`'s server. `next` must name the same GPU.
    ///
    /// A failed swap leaves nothing running and releases the lock (the error says which step failed);
    /// a server that had died before is only logged, since it is replaced anyway.
    ///
    /// ```no_run
    /// # use engine_core::{Engine, EngineConfig};
    /// let vision = Engine::launch(EngineConfig::builder("llava.gguf", "mmproj.gguf").build()?)?;
    /// // ... describe the keyframes ...
    /// let text = vision.swap(EngineConfig::text("mistral.gguf").port(8090).ctx_size(8192).build()?)?;
    /// // ... read the subtitles; the GPU was never unlocked ...
    /// text.shutdown()?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn swap(self, next: EngineConfig) -> Result<Engine<Healthy>, EngineError> {
        let Healthy { mut running, guard } = self.state;
        let gpu = guard.gpu();
        if let Some(died) = running.server.death(Duration::ZERO) {
            tracing::warn!(error = %died, "the server being swapped out had died");
        }
        let report = running.stop();
        drop(running);
        tracing::info!(gpu, took = ?report.took, vram = ?report.vram, "swap: server stopped");
        match reading_for_next(&next, gpu) {
            Ok((probe, reading)) => Ok(start_server(next, probe, reading, guard, None)?),
            Err(e) => {
                drop(guard);
                Err(e)
            }
        }
    }

    /// Describes many frames with up to `concurrency` requests in flight (set `slots` to match), and
    /// returns the results in input order. `on_done(index, &result)` runs as each frame finishes, from
    /// the worker that finished it; returning `ControlFlow::Break(())` stops the batch: frames not yet
    /// started come back as [`InferenceError::Cancelled`], frames in flight finish.
    ///
    /// ```no_run
    /// # use std::ops::ControlFlow;
    /// # fn demo(engine: &engine_core::Engine<engine_core::typestate::Healthy>, frames: &[engine_core::KeyframeRecord]) {
    /// let results = engine.describe_many(frames, 4, |i, result| {
    ///     eprintln!("frame {i}: {}", if result.is_ok() { "ok" } else { "failed" });
    ///     ControlFlow::Continue(())
    /// });
    /// assert_eq!(results.len(), frames.len());
    /// # }
    /// ```
    pub fn describe_many<F>(
        &self,
        frames: &[KeyframeRecord],
        concurrency: usize,
        on_done: F,
    ) -> Vec<Result<SceneDescription, InferenceError>>
    where
        F: Fn(usize, &Result<SceneDescription, InferenceError>) -> ControlFlow<()> + Sync,
    {
        batch(
            frames,
            concurrency,
            |frame| self.describe(frame),
            |frame| Subject::Frame(frame.frame_path.clone()),
            on_done,
        )
    }

    /// Stops the server's tree (SIGTERM; a second SIGTERM at half the grace period; SIGKILL at its
    /// end, then a bounded wait), reaps it, waits for VRAM to come back, then releases the GPU lock.
    /// No request of this engine can be in flight here: they all borrow the engine. Fails with
    /// [`InferenceError::ServerDied`] if the server had died before.
    pub fn shutdown(self) -> Result<ShutdownReport, InferenceError> {
        let Healthy { mut running, guard } = self.state;
        let died = running.server.death(Duration::ZERO);
        let report = running.stop();
        drop(running);
        let gpu = guard.gpu();
        drop(guard);
        tracing::info!(gpu, "engine shut down");
        match died {
            Some(e) => Err(e),
            None => Ok(report),
        }
    }
}

/// Runs `work` over `items` with up to `concurrency` workers, results in input order; `on_done`
/// after each, from its worker; a `Break` stops dispatch (items not started come back as
/// [`InferenceError::Cancelled`], named by `subject`).
fn batch<I, R, F>(
    items: &[I],
    concurrency: usize,
    work: impl Fn(&I) -> Result<R, InferenceError> + Sync,
    subject: impl Fn(&I) -> Subject,
    on_done: F,
) -> Vec<Result<R, InferenceError>>
where
    I: Sync,
    R: Send,
    F: Fn(usize, &Result<R, InferenceError>) -> ControlFlow<()> + Sync,
{
    let next = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let slots: Vec<Mutex<Option<Result<R, InferenceError>>>> =
        items.iter().map(|_| Mutex::new(None)).collect();
    let workers = concurrency.clamp(1, items.len().max(1));
    std::thread::scope(|scope| {
        for _ in 0..workers {
            scope.spawn(|| {
                while !stop.load(Ordering::Acquire) {
                    let i = next.fetch_add(1, Ordering::AcqRel);
                    let Some(item) = items.get(i) else { break };
                    let result = work(item);
                    if on_done(i, &result).is_break() {
                        stop.store(true, Ordering::Release);
                    }
                    *lock(&slots[i]) = Some(result);
                }
            });
        }
    });
    slots
        .into_iter()
        .zip(items)
        .map(|(slot, item)| {
            slot.into_inner()
                .unwrap_or_else(|p| p.into_inner())
                .unwrap_or_else(|| {
                    Err(InferenceError::Cancelled {
                        subject: subject(item),
                    })
                })
        })
        .collect()
}
