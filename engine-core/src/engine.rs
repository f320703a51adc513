//! The engine's lifecycle as a typestate. Each step consumes the engine and returns it in the next
//! state, so a step out of order does not compile:
//!
//! 1. [`Unchecked`]: holds the configuration. [`Engine::check_vram`] →
//! 2. [`VramOk`]: + the VRAM reading. [`Engine::lock`] / [`Engine::try_lock_for`] →
//! 3. [`Locked`]: + the GPU guard. [`Engine::start`] →
//! 4. [`Healthy`]: + the server child and its client. [`Engine::describe`], [`Engine::shutdown`].
//!
//! Dropping an engine releases what it holds in reverse order (server stopped and reaped, then the GPU
//! lock), also while unwinding from a panic and after a failed step.

use std::ops::ControlFlow;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use crate::config::EngineConfig;
use crate::describe::describe_frame;
use crate::error::{EngineError, InferenceError, LockError, VramError};
use crate::gpu_lock::{GpuGuard, gpu_lock, try_gpu_lock_for};
use crate::scene::{KeyframeRecord, SceneDescription};
use crate::server::{Server, ShutdownReport};
use crate::vram::{VramReading, assert_vram_available};

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
}

/// The GPU lock is held.
#[derive(Debug)]
pub struct Locked {
    reading: VramReading,
    guard: GpuGuard,
}

/// llama-server is running, healthy and proven ours. Field order is drop order: server, then lock.
#[derive(Debug)]
pub struct Healthy {
    server: Server,
    reading: VramReading,
    guard: GpuGuard,
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
/// let config = EngineConfig::new("llava.gguf", "mmproj.gguf");
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

    /// Checks that the configured GPU has at least `min_vram_mib` free.
    pub fn check_vram(self) -> Result<Engine<VramOk>, VramError> {
        let reading = assert_vram_available(&self.config)?;
        tracing::info!(
            gpu = reading.gpu,
            free_mib = reading.free_mib,
            "VRAM check passed"
        );
        Ok(Engine {
            config: self.config,
            state: VramOk { reading },
        })
    }

    /// Runs every step: check VRAM, take the GPU lock (waiting for it), start the server.
    pub fn launch(config: EngineConfig) -> Result<Engine<Healthy>, EngineError> {
        Ok(Engine::new(config).check_vram()?.lock()?.start()?)
    }
}

impl Engine<VramOk> {
    /// The VRAM reading that passed the check.
    pub fn vram(&self) -> VramReading {
        self.state.reading
    }

    /// Takes the GPU lock, waiting as long as another holder keeps it.
    pub fn lock(self) -> Result<Engine<Locked>, LockError> {
        let guard = gpu_lock(self.config.gpu)?;
        Ok(self.locked(guard))
    }

    /// Takes the GPU lock, waiting at most `timeout`.
    pub fn try_lock_for(self, timeout: Duration) -> Result<Engine<Locked>, LockError> {
        let guard = try_gpu_lock_for(self.config.gpu, timeout)?;
        Ok(self.locked(guard))
    }

    fn locked(self, guard: GpuGuard) -> Engine<Locked> {
        tracing::info!(gpu = guard.gpu(), "GPU lock held");
        Engine {
            config: self.config,
            state: Locked {
                reading: self.state.reading,
                guard,
            },
        }
    }
}

impl Engine<Locked> {
    /// The VRAM reading taken before the lock.
    pub fn vram(&self) -> VramReading {
        self.state.reading
    }

    /// Starts llama-server and waits until it is healthy. On failure the child is stopped and reaped,
    /// and the GPU lock released, before the error is returned.
    pub fn start(self) -> Result<Engine<Healthy>, InferenceError> {
        let server = Server::start(&self.config, self.state.reading)?;
        Ok(Engine {
            config: self.config,
            state: Healthy {
                server,
                reading: self.state.reading,
                guard: self.state.guard,
            },
        })
    }
}

impl Engine<Healthy> {
    /// The VRAM reading taken before the server started.
    pub fn vram(&self) -> VramReading {
        self.state.reading
    }

    /// The GPU index held.
    pub fn gpu(&self) -> u32 {
        self.state.guard.gpu()
    }

    /// The port the server listens on (127.0.0.1).
    pub fn port(&self) -> u16 {
        self.state.server.port()
    }

    /// `http://127.0.0.1:PORT`.
    pub fn base_url(&self) -> &str {
        self.state.server.client().base_url()
    }

    /// The server's API key (random per engine). Every endpoint but `/health` needs it as
    /// `Authorization: Bearer KEY`; for callers who talk to their server directly (`/metrics`, say).
    pub fn api_key(&self) -> &str {
        self.state.server.api_key()
    }

    /// The server's pid.
    pub fn pid(&self) -> u32 {
        self.state.server.pid()
    }

    /// Describes one keyframe. The frame is checked before anything is sent; invalid answers are
    /// retried up to `describe.retries` more times. Safe to call from several threads at once.
    pub fn describe(&self, frame: &KeyframeRecord) -> Result<SceneDescription, InferenceError> {
        let server = &self.state.server;
        if let Some(died) = server.death(Duration::ZERO) {
            return Err(died.for_frame(&frame.frame_path));
        }
        describe_frame(server.client(), &self.config.describe, frame, &|wait| {
            server.death(wait)
        })
    }

    /// Describes many frames with up to `concurrency` requests in flight (set `slots` to match), and
    /// returns the results in input order. `on_done(index, &result)` runs as each frame finishes, from
    /// the worker that finished it; returning `ControlFlow::Break(())` stops the batch: frames not yet
    /// started come back as [`InferenceError::Cancelled`], frames in flight finish.
    ///
    /// ```no_run
    /// # use std::ops::ControlFlow;
    /// # fn demo(engine: &engine_core::Engine<engine_core::Healthy>, frames: &[engine_core::KeyframeRecord]) {
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
        let next = AtomicUsize::new(0);
        let stop = AtomicBool::new(false);
        let slots: Vec<Mutex<Option<Result<SceneDescription, InferenceError>>>> =
            frames.iter().map(|_| Mutex::new(None)).collect();
        let workers = concurrency.clamp(1, frames.len().max(1));
        std::thread::scope(|scope| {
            for _ in 0..workers {
                scope.spawn(|| {
                    while !stop.load(Ordering::Acquire) {
                        let i = next.fetch_add(1, Ordering::AcqRel);
                        let Some(frame) = frames.get(i) else { break };
                        let result = self.describe(frame);
                        if on_done(i, &result).is_break() {
                            stop.store(true, Ordering::Release);
                        }
                        *slots[i].lock().unwrap_or_else(|p| p.into_inner()) = Some(result);
                    }
                });
            }
        });
        slots
            .into_iter()
            .zip(frames)
            .map(|(slot, frame)| {
                slot.into_inner()
                    .unwrap_or_else(|p| p.into_inner())
                    .unwrap_or_else(|| {
                        Err(InferenceError::Cancelled {
                            path: frame.frame_path.clone(),
                        })
                    })
            })
            .collect()
    }

    /// Stops the server (SIGTERM; a second SIGTERM at half the grace period; SIGKILL at its end),
    /// reaps it, then releases the GPU lock. No request of this engine can be in flight here: they all
    /// borrow the engine. Fails with [`InferenceError::ServerDied`] if the server had died before.
    pub fn shutdown(self) -> Result<ShutdownReport, InferenceError> {
        let died = self.state.server.death(Duration::ZERO);
        let mut server = self.state.server;
        let report = server.stop();
        drop(server);
        drop(self.state.guard);
        tracing::info!(gpu = self.state.reading.gpu, "engine shut down");
        match died {
            Some(e) => Err(e),
            None => Ok(report),
        }
    }
}
