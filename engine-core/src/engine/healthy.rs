//! What a running engine does: answer requests one at a time or in batches (through the one
//! scheduler), swap to the next model keeping the GPU, stop, and abort.

use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;

use super::error::EngineError;
use super::running::{Hold, ShutdownReport};
use super::schedule::{self, Batch, Lanes};
use super::typestate::{Engine, Healthy, start_server};
use crate::config::EngineConfig;
use crate::gpu::{
    FreeVram, GpuId, Visible, VramError, VramProbe, VramReading, VramRecovery, select,
    wait_for_free,
};
use crate::request::RequestError;
use crate::request::{
    Answer, KeyframeRecord, Modality, Prompt, SceneDescription, Subject, Transport, complete,
};
use crate::server::find_program;
use crate::setting::{ConfigError, Setting};
use crate::wait::Wait;

impl Engine<Healthy> {
    /// The VRAM reading taken under the lock, before the server started.
    pub fn vram(&self) -> &VramReading {
        &self.state.hold.baseline
    }

    /// The GPU held (nvidia-smi index).
    pub fn gpu(&self) -> u32 {
        self.state.hold.gpu()
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
    /// For reading only: to stop the server, use [`Engine::shutdown`] or [`Engine::abort`], which
    /// never signal a pid that may have been reused.
    pub fn pid(&self) -> u32 {
        self.state.running.server.pid()
    }

    /// Describes one keyframe: [`Engine::complete`] with the scene preset
    /// ([`crate::DescribeOptions`]'s prompt and sampling, [`crate::SCENE_DESCRIPTION_SCHEMA`], the
    /// frame as the image). The frame is checked before anything is sent; invalid answers are
    /// retried up to `retries` more times. Safe to call from several threads at once.
    pub fn describe(&self, frame: &KeyframeRecord) -> Result<SceneDescription, RequestError> {
        self.complete(
            &self
                .config
                .describe_options()
                .frame_prompt(&frame.frame_path),
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
    pub fn complete<T: DeserializeOwned>(&self, prompt: &Prompt) -> Result<T, RequestError> {
        self.answer(prompt).map(|answer| answer.value)
    }

    /// [`Engine::complete`], with what the answer cost: the server's token counts and timings, the
    /// attempts made and the latency.
    pub fn answer<T: DeserializeOwned>(&self, prompt: &Prompt) -> Result<Answer<T>, RequestError> {
        let server = &self.state.running.server;
        if let Some(died) = server.death(Duration::ZERO) {
            return Err(RequestError::from(died).during(&prompt.subject()));
        }
        let modality = match (self.config.mmproj(), server.reads_files()) {
            (None, _) => Modality::Text,
            (Some(_), true) => Modality::Vision(Transport::Files),
            (Some(_), false) => Modality::Vision(Transport::Inline),
        };
        complete(
            server.client(),
            self.config.describe_options(),
            modality,
            prompt,
            &|wait| server.death(wait).map(RequestError::from),
        )
    }

    /// Describes many frames with up to `concurrency` requests in flight (set `slots` to match),
    /// under the scheduler's contract: every frame gets exactly one outcome, once, in input order.
    /// `on_done(index, &outcome)` runs as each frame ends (from the worker that ended it; the
    /// outcomes of frames never sent come last); returning `ControlFlow::Break(())` stops the batch:
    /// frames not yet started end as [`RequestError::Cancelled`], frames in flight finish. If the
    /// server dies, the frames in flight end with its death and the rest as
    /// [`RequestError::NoServerLeft`].
    ///
    /// ```no_run
    /// # use std::ops::ControlFlow;
    /// # fn demo(engine: &engine_core::Engine<engine_core::typestate::Healthy>, frames: &[engine_core::KeyframeRecord]) {
    /// let batch = engine.describe_many(frames, 4, |i, outcome| {
    ///     eprintln!("frame {i}: {}", if outcome.is_ok() { "ok" } else { "failed" });
    ///     ControlFlow::Continue(())
    /// });
    /// assert_eq!(batch.results.len(), frames.len());
    /// # }
    /// ```
    pub fn describe_many<F>(
        &self,
        frames: &[KeyframeRecord],
        concurrency: usize,
        on_done: F,
    ) -> Batch<SceneDescription>
    where
        F: Fn(usize, &Result<SceneDescription, RequestError>) -> ControlFlow<()> + Sync,
    {
        schedule::run(
            &[self.lanes(concurrency)],
            frames,
            |_, frame| self.describe(frame),
            |frame| Subject::Frame(frame.frame_path.clone()),
            on_done,
        )
    }

    /// [`Engine::complete`] for many prompts, with up to `concurrency` in flight; as
    /// [`Engine::describe_many`].
    pub fn complete_many<T, F>(
        &self,
        prompts: &[Prompt],
        concurrency: usize,
        on_done: F,
    ) -> Batch<T>
    where
        T: DeserializeOwned + Send,
        F: Fn(usize, &Result<T, RequestError>) -> ControlFlow<()> + Sync,
    {
        schedule::run(
            &[self.lanes(concurrency)],
            prompts,
            |_, prompt| self.complete(prompt),
            Prompt::subject,
            on_done,
        )
    }

    /// [`Engine::complete_many`], each outcome with what it cost ([`Engine::answer`]): what a
    /// run's [`crate::batch::Summary`] is made from.
    pub fn answer_many<T, F>(
        &self,
        prompts: &[Prompt],
        concurrency: usize,
        on_done: F,
    ) -> Batch<Answer<T>>
    where
        T: DeserializeOwned + Send,
        F: Fn(usize, &Result<Answer<T>, RequestError>) -> ControlFlow<()> + Sync,
    {
        schedule::run(
            &[self.lanes(concurrency)],
            prompts,
            |_, prompt| self.answer(prompt),
            Prompt::subject,
            on_done,
        )
    }

    /// This engine's share of a batch: `slots` requests at once on its GPU.
    pub(super) fn lanes(&self, slots: usize) -> Lanes {
        Lanes {
            gpu: self.gpu(),
            uuid: self.vram().uuid.clone(),
            slots,
        }
    }

    /// Stops this model's server and starts `next` on the same GPU without letting go of the GPU
    /// lock, so that no other process can take the GPU between the two models: stop (as
    /// [`Engine::shutdown`], VRAM waited for), wait up to `next`'s `vram_recovery_timeout` for its
    /// `min_vram_mib` to be free, start `next`'s server (as long as `wait` allows, as
    /// [`Engine::start`]). `next` must name the same GPU.
    ///
    /// It checks `next` before it stops anything (its GPU, its model files, its server program): a
    /// swap that fails there hands this engine back, still running ([`SwapError::still_running`]).
    /// A swap that fails later leaves nothing running and releases the lock (the error says which
    /// step failed); a server that had died before is only logged, since it is replaced anyway.
    ///
    /// ```no_run
    /// # use engine_core::{Engine, EngineConfig};
    /// let vision = Engine::launch(EngineConfig::builder("llava.gguf", "mmproj.gguf").build()?)?;
    /// // ... describe the keyframes ...
    /// let next = EngineConfig::text("mistral.gguf").port(8090).ctx_size(8192).build()?;
    /// let text = vision.swap(next, engine_core::Wait::Forever)?;
    /// // ... read the subtitles; the GPU was never unlocked ...
    /// text.shutdown()?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn swap(self, next: EngineConfig, wait: Wait) -> Result<Engine<Healthy>, SwapError> {
        // Checked before anything stops: a swap that cannot work leaves this engine running.
        if let Err(error) = self.can_swap_to(&next, wait) {
            return Err(SwapError {
                error,
                still_running: Some(Box::new(self)),
            });
        }
        let Healthy { mut running, hold } = self.state;
        let hold = Arc::into_inner(hold).expect("a swap's engine is the only one of its GPU");
        let gpu = hold.gpu();
        if let Some(died) = running.server.death(Duration::ZERO) {
            tracing::warn!(error = %died, "the server being swapped out had died");
        }
        let stopped = running.stop();
        drop(running);
        let recovery = hold.recover();
        tracing::info!(gpu, exit = ?stopped.exit, vram = ?recovery, "swap: server stopped");
        let guard = hold.into_guard();
        let failed = |error: EngineError| SwapError {
            error,
            still_running: None,
        };
        match reading_for_next(&next, gpu, wait) {
            Ok((probe, reading)) => {
                let recovery = next.vram_recovery_timeout();
                let hold = Arc::new(Hold::new(guard, reading, probe, recovery));
                start_server(next, hold, wait).map_err(|e| failed(e.into()))
            }
            Err(e) => {
                drop(guard);
                Err(failed(e))
            }
        }
    }

    /// What a swap to `next` checks before it stops this engine: this is the only server of its
    /// GPU, `next`'s model files and server program are there, and `next` names this GPU.
    fn can_swap_to(&self, next: &EngineConfig, wait: Wait) -> Result<(), EngineError> {
        if Arc::strong_count(&self.state.hold) > 1 {
            // Other servers of this GPU still run: the GPU is theirs too.
            return Err(ConfigError::new(
                Setting::ServersPerGpu,
                "a swap replaces the only server of a GPU, and this one has siblings — stop the \
                 pool and launch the next model",
            )
            .into());
        }
        next.check_model_files()?;
        find_program(&next.server_bin())?;
        let rows = next.vram_probe()?.query(wait)?;
        let target = select(&rows, next.gpu(), &Visible::from_env(), 0)?;
        if target.gpu != self.gpu() {
            return Err(ConfigError::new(
                Setting::Gpu,
                format!(
                    "names GPU {}, but a swap keeps the GPU it holds (GPU {}) — give the next \
                     configuration the same GPU, or shut down and launch a new engine",
                    target.gpu,
                    self.gpu()
                ),
            )
            .into());
        }
        Ok(())
    }

    /// Starts killing the server's whole tree and returns at once (tokio's `start_kill`): requests
    /// in flight end with it (each with [`RequestError::ServerDied`]), and every later request fails
    /// the same way. The signals go through the server's supervisor, under its state lock, so never
    /// to a process that took a reaped pid. Safe while other threads use the engine; the
    /// [`Engine::shutdown`] (or drop) that follows reaps the tree, waits for VRAM and releases the
    /// lock. For a front end that must stop at once (a Ctrl-C with requests in flight).
    pub fn abort(&self) {
        self.state.running.server.abort();
    }

    /// Stops the server's tree (SIGTERM; a second SIGTERM at half the grace period; SIGKILL at its
    /// end, then a bounded wait), reaps it, waits for VRAM to come back, then releases the GPU lock.
    /// No request of this engine can be in flight here: they all borrow the engine. Fails with
    /// [`RequestError::ServerDied`] if the server had died before (not by [`Engine::abort`]).
    pub fn shutdown(self) -> Result<ShutdownReport, RequestError> {
        let Healthy { mut running, hold } = self.state;
        let died = running.server.death(Duration::ZERO).map(RequestError::from);
        let aborted = running.server.aborted();
        let started = Instant::now();
        let stopped = running.stop();
        let took = started.elapsed();
        let pid = running.server.pid();
        drop(running);
        let gpu = hold.gpu();
        // The last server of the GPU waits for its VRAM and releases the lock.
        let vram = Arc::into_inner(hold).map_or(VramRecovery::Shared, Hold::release);
        tracing::info!(gpu, "engine shut down");
        let report = ShutdownReport {
            pid,
            status: stopped.exit,
            escalation: stopped.escalation,
            left_running: stopped.left_running,
            took,
            vram,
        };
        match died {
            Some(e) if !aborted => Err(e),
            _ => Ok(report),
        }
    }
}

/// A swap that failed: why, and the engine it started from when the failure came before the stop
/// (a swap checks the next configuration first: its GPU, its model files, its program), which then
/// still runs, as it was.
#[derive(Debug)]
#[non_exhaustive]
pub struct SwapError {
    /// Why.
    pub error: EngineError,
    /// The engine swapped from, when nothing was stopped.
    pub still_running: Option<Box<Engine<Healthy>>>,
}

impl std::fmt::Display for SwapError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.still_running {
            Some(_) => write!(
                f,
                "{} (nothing was stopped: the engine still runs)",
                self.error
            ),
            None => write!(f, "{}", self.error),
        }
    }
}

impl std::error::Error for SwapError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.error)
    }
}

impl From<SwapError> for EngineError {
    /// The reason alone (an engine still running is dropped: stopped, its lock released).
    fn from(failed: SwapError) -> Self {
        failed.error
    }
}

/// The reading `next` starts from on the held `gpu` (which a swap checked `next` names): usually
/// one query that finds its minimum free; else the bounded wait for it.
fn reading_for_next(
    next: &EngineConfig,
    gpu: u32,
    wait: Wait,
) -> Result<(VramProbe, VramReading), EngineError> {
    let probe = next.vram_probe()?;
    let rows = probe.query(wait)?;
    let held = GpuId::Index(gpu);
    let reading = match select(&rows, &held, &Visible::All, next.min_vram_mib()) {
        Err(VramError::Insufficient { .. }) => wait_for_free(
            &probe,
            &held,
            &Visible::All,
            FreeVram::within(next.min_vram_mib(), next.vram_recovery_timeout()),
            wait.without_limit(),
        )?,
        other => other?,
    };
    Ok((probe, reading))
}
