//! What a running engine does: answer requests one at a time or in batches (through the one
//! scheduler), swap to the next model keeping the GPU, stop, and abort.

use std::ops::ControlFlow;
use std::time::Duration;

use serde::de::DeserializeOwned;

use super::running::ShutdownReport;
use super::schedule::{self, Batch, Lanes};
use super::typestate::{Engine, Healthy, start_server};
use crate::config::{ConfigError, EngineConfig, Setting};
use crate::error::{EngineError, RequestError};
use crate::gpu::{
    FreeVram, GpuId, Visible, VramError, VramProbe, VramReading, select, wait_for_free,
};
use crate::request::{
    Answer, KeyframeRecord, Modality, Prompt, SceneDescription, Subject, Transport, complete,
};
use crate::wait::Wait;

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
            return Err(died.during(&prompt.subject()));
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
            &|wait| server.death(wait),
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
    /// A failed swap leaves nothing running and releases the lock (the error says which step failed);
    /// a server that had died before is only logged, since it is replaced anyway.
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
    pub fn swap(self, next: EngineConfig, wait: Wait) -> Result<Engine<Healthy>, EngineError> {
        let Healthy { mut running, guard } = self.state;
        let gpu = guard.gpu();
        if let Some(died) = running.server.death(Duration::ZERO) {
            tracing::warn!(error = %died, "the server being swapped out had died");
        }
        let report = running.stop();
        drop(running);
        tracing::info!(gpu, took = ?report.took, vram = ?report.vram, "swap: server stopped");
        match reading_for_next(&next, gpu, wait) {
            Ok((probe, reading)) => Ok(start_server(next, probe, reading, guard, wait)?),
            Err(e) => {
                drop(guard);
                Err(e)
            }
        }
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
        let Healthy { mut running, guard } = self.state;
        let died = running.server.death(Duration::ZERO);
        let aborted = running.server.aborted();
        let report = running.stop();
        drop(running);
        let gpu = guard.gpu();
        drop(guard);
        tracing::info!(gpu, "engine shut down");
        match died {
            Some(e) if !aborted => Err(e),
            _ => Ok(report),
        }
    }
}

/// The reading `next` starts from on the held `gpu`: one query finds which GPU `next` names (it
/// must be `gpu`) and, usually, that its minimum is free; else the bounded wait for it.
fn reading_for_next(
    next: &EngineConfig,
    gpu: u32,
    wait: Wait,
) -> Result<(VramProbe, VramReading), EngineError> {
    let probe = next.vram_probe()?;
    let rows = probe.query(wait)?;
    let target = select(&rows, next.gpu(), &Visible::from_env(), 0)?;
    if target.gpu != gpu {
        return Err(ConfigError::new(
            Setting::Gpu,
            format!(
                "names GPU {}, but a swap keeps the GPU it holds (GPU {gpu}) — give the next \
                 configuration the same GPU, or shut down and launch a new engine",
                target.gpu
            ),
        )
        .into());
    }
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
