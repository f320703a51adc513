//! The engine's lifecycle as a typestate. Each step consumes the engine and returns it in the next
//! state, so a step out of order does not compile:
//!
//! 1. [`Unchecked`]: holds the configuration. [`Engine::check_vram`] →
//! 2. [`VramOk`]: + the VRAM reading. [`Engine::lock_gpu`] →
//! 3. [`Locked`]: + the GPU guard. [`Engine::start`] →
//! 4. [`Healthy`]: + the server child and its client. [`Engine::describe`], [`Engine::complete`],
//!    [`Engine::swap`] (to the next model, keeping the lock), [`Engine::shutdown`], [`Engine::abort`].
//!
//! Every step that blocks takes a [`Wait`]: how long its caller is willing to wait. Dropping an
//! engine releases what it holds in reverse order (server stopped and reaped, then the GPU lock),
//! also while unwinding from a panic and after a failed step.

use std::sync::Arc;
use std::time::Duration;

use super::error::EngineError;
use super::running::{Hold, Running};
use crate::config::EngineConfig;
use crate::gpu::{
    FreeVram, GpuGuard, GpuId, LockError, Visible, VramError, VramProbe, VramReading, gpu_lock,
    wait_for_free,
};
use crate::server::Server;
use crate::server::StartError;
use crate::wait::Wait;

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
/// (stopped), then its share of the GPU's hold (the last share waits for VRAM, then releases the
/// lock).
#[derive(Debug)]
pub struct Healthy {
    pub(super) running: Running,
    pub(super) hold: Arc<Hold>,
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
/// use engine_core::{Engine, EngineConfig, KeyframeRecord, Wait};
///
/// let config = EngineConfig::builder("llava.gguf", "mmproj.gguf").build()?;
/// let engine = Engine::new(config)
///     .check_vram(Wait::Forever)?   // Engine<VramOk>
///     .lock_gpu(Wait::Forever)?     // Engine<Locked>
///     .start(Wait::Forever)?;       // Engine<Healthy>
/// let scene = engine.describe(&KeyframeRecord::new("frame_0001.jpg", 12.5, "scene-cut"))?;
/// println!("{}", scene.mood);
/// engine.shutdown()?;  // or just drop it
/// # Ok::<(), engine_core::EngineError>(())
/// ```
#[derive(Debug)]
pub struct Engine<S: State> {
    pub(super) config: EngineConfig,
    pub(super) state: S,
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
    /// again once the lock is held). `wait` can abandon a slow nvidia-smi ([`VramError::Cancelled`]).
    pub fn check_vram(self, wait: Wait) -> Result<Engine<VramOk>, VramError> {
        let probe = self.config.vram_probe()?;
        let reading = probe.read(
            self.config.gpu(),
            &Visible::from_env(),
            self.config.min_vram_mib(),
            wait,
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

    /// [`Engine::check_vram`] against a reading already taken (a launch's plan reads every GPU
    /// once): `reading` must be of this configuration's GPU and show its `min_vram_mib` free.
    pub(crate) fn checked(
        self,
        probe: VramProbe,
        reading: VramReading,
    ) -> Result<Engine<VramOk>, VramError> {
        if reading.free_mib < self.config.min_vram_mib() {
            return Err(VramError::Insufficient {
                gpu: reading.gpu,
                free_mib: reading.free_mib,
                min_mib: self.config.min_vram_mib(),
            });
        }
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
        let need = FreeVram::within(self.config.min_vram_mib(), timeout);
        let reading = wait_for_free(
            &probe,
            self.config.gpu(),
            &Visible::from_env(),
            need,
            Wait::Forever,
        )?;
        Ok(Engine {
            config: self.config,
            state: VramOk { reading, probe },
        })
    }

    /// Runs every step, each waiting as long as it takes: check VRAM, take the GPU lock, start the
    /// server.
    pub fn launch(config: EngineConfig) -> Result<Engine<Healthy>, EngineError> {
        Ok(Engine::new(config)
            .check_vram(Wait::Forever)?
            .lock_gpu(Wait::Forever)?
            .start(Wait::Forever)?)
    }
}

impl Engine<VramOk> {
    /// The VRAM reading that passed the check.
    pub fn vram(&self) -> &VramReading {
        &self.state.reading
    }

    /// Takes the GPU's lock (see [`gpu_lock`]), waiting as `wait` says, then reads VRAM again: the
    /// GPU may have filled up while we waited. That reading is the baseline VRAM must come back to
    /// after the server stops.
    pub fn lock_gpu(self, wait: Wait) -> Result<Engine<Locked>, LockError> {
        let guard = gpu_lock(self.state.reading.gpu, wait)?;
        tracing::info!(gpu = guard.gpu(), "GPU lock held");
        // The same physical GPU as the first check, whatever CUDA_VISIBLE_DEVICES says now.
        let gpu = GpuId::Index(self.state.reading.gpu);
        // On error the guard drops here, releasing the lock.
        let probe = self.state.probe;
        let reading = probe
            .read(
                &gpu,
                &Visible::All,
                self.config.min_vram_mib(),
                wait.without_limit(),
            )
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

    /// Starts llama-server, showing it only the locked GPU, and waits until it is ready, within its
    /// `startup_timeout` and as long as `wait` allows ([`StartError::Cancelled`] when a flag ends
    /// it). On failure the server's tree is stopped and reaped, VRAM is waited for as after a normal
    /// stop, and the GPU lock released, before the error is returned.
    pub fn start(self, wait: Wait) -> Result<Engine<Healthy>, StartError> {
        let mut engines = self.start_servers(1, wait)?;
        Ok(engines.pop().expect("one server started"))
    }

    /// Starts `servers` llama-servers on the locked GPU as one unit, all at once (their loads
    /// overlap), under this one lock: the slots are split evenly over them (the first get one more
    /// where they do not divide), each listens on a free port when there are several, and each is
    /// shown only this GPU. The lock is released once the last of them has stopped and VRAM has
    /// come back. If any fails to start, the others are stopped too and the first failure is
    /// returned (everything cleaned up as after [`Engine::start`]'s failure).
    ///
    /// Why several: llama-server's one main loop samples every slot in turn on one CPU thread, so a
    /// GPU that one server keeps waiting is kept busy by a few (BENCHMARKS.md, "one H200").
    pub fn start_servers(
        self,
        servers: u32,
        wait: Wait,
    ) -> Result<Vec<Engine<Healthy>>, StartError> {
        let Locked {
            reading,
            guard,
            probe,
        } = self.state;
        let hold = Arc::new(Hold::new(
            guard,
            reading,
            probe,
            self.config.vram_recovery_timeout(),
        ));
        let configs = self.config.per_server(servers);
        let started: Vec<Result<Engine<Healthy>, StartError>> = std::thread::scope(|scope| {
            let starts: Vec<_> = configs
                .into_iter()
                .map(|config| {
                    let hold = Arc::clone(&hold);
                    scope.spawn(move || start_server(config, hold, wait))
                })
                .collect();
            starts
                .into_iter()
                .map(|start| start.join().expect("a server's start does not panic"))
                .collect()
        });
        drop(hold);
        let (engines, failures): (Vec<_>, Vec<_>) = started.into_iter().partition(Result::is_ok);
        // The failure that says most: a cancellation only if nothing else went wrong.
        let failure = failures
            .into_iter()
            .filter_map(Result::err)
            .min_by_key(|e| matches!(e, StartError::Cancelled));
        match failure {
            None => Ok(engines.into_iter().filter_map(Result::ok).collect()),
            Some(error) => {
                // The siblings stop here; the last one's hold waits for VRAM and releases the lock.
                drop(engines);
                Err(error)
            }
        }
    }
}

/// Starts `config`'s server on the GPU of `hold` (the locked GPU, and the baseline for the VRAM
/// wait after the last stop). On failure: the tree stopped and reaped; this share of the hold
/// dropped (the last share waits for VRAM and releases the lock).
pub(super) fn start_server(
    config: EngineConfig,
    hold: Arc<Hold>,
    wait: Wait,
) -> Result<Engine<Healthy>, StartError> {
    let visible = if hold.baseline.uuid.is_empty() {
        hold.baseline.gpu.to_string()
    } else {
        hold.baseline.uuid.clone()
    };
    let server = Server::start(&config.server_spec(), &visible, hold.raw_fd(), wait)?;
    let running = Running {
        server,
        stop_grace: config.stop_grace(),
        stopped: false,
    };
    Ok(Engine {
        config,
        state: Healthy { running, hold },
    })
}
