//! [`Launch`]: what to start — the GPUs, the slots and the servers of each, as numbers or `auto` —
//! and [`Plan`], what it resolves to from one VRAM reading, before anything waits or starts. A plan
//! then starts its GPUs ([`Plan::start`]), or starts them and serves a batch as each turns ready
//! ([`Plan::serve`]). Both front ends (the CLI and Python) are this and nothing more.

use std::time::SystemTime;

use super::error::EngineError;
use super::error::{LeftOut, none_started};
use crate::config::{Budget, Count, EngineConfig, Layout, choose_layout};
use crate::gpu::{GpuId, GpuRow, Visible, VramError, VramProbe, VramReading, distinct, select};
use crate::setting::{ConfigError, Setting};
use crate::wait::{CancellationToken, Wait};

/// Which GPUs a launch uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Gpus {
    /// The configuration's own GPU ([`crate::config::EngineConfigBuilder::gpu`]).
    Configured,
    /// These GPUs, each named once (a GPU named twice is refused); one another process holds is
    /// waited for.
    List(Vec<GpuId>),
    /// Every GPU this process may use (`CUDA_VISIBLE_DEVICES`); one another process holds, or one
    /// short of VRAM, is left out.
    All,
}

/// What a pool does with a GPU whose lock another process holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WhenLocked {
    /// Leave it out (every GPU: use the GPUs that are free now).
    Skip,
    /// Wait for it (GPUs named one by one), until the launch is cancelled.
    Wait,
}

/// What to start: a configuration, on which GPUs, with how many slots and servers on each.
///
/// ```no_run
/// use engine_core::{CancellationToken, EngineConfig, Launch};
/// use engine_core::config::Count;
/// use engine_core::launch::Gpus;
///
/// let config = EngineConfig::builder("llava.gguf", "mmproj.gguf").build()?;
/// let cancel = CancellationToken::new();
/// let plan = Launch::new(config)
///     .gpus(Gpus::All)
///     .slots(Count::Auto)
///     .servers_per_gpu(Count::Auto)
///     .plan(&cancel)?;                  // one VRAM reading; nothing waits or starts yet
/// for gpu in plan.gpus() {
///     eprintln!("GPU {}: {} servers, {} slots — {}", gpu.gpu, gpu.layout.servers, gpu.layout.slots, gpu.layout.why);
/// }
/// let pool = plan.start(&cancel, &|_| {})?;
/// pool.shutdown();
/// # Ok::<(), engine_core::EngineError>(())
/// ```
#[derive(Debug, Clone)]
#[must_use = "a launch does nothing until `plan()`"]
pub struct Launch {
    config: EngineConfig,
    gpus: Gpus,
    slots: Count,
    servers: Count,
    began: Option<SystemTime>,
}

/// One GPU of a plan: which, what it had free, and its servers and slots.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct GpuPlan {
    /// The GPU (nvidia-smi index).
    pub gpu: u32,
    /// Its UUID.
    pub uuid: String,
    /// Its free VRAM at the plan's reading, in MiB.
    pub free_mib: u64,
    /// Its servers and slots, and why where `auto` chose.
    pub layout: Layout,
    /// The GPU's configuration (its slots are the GPU's, split over its servers at start).
    pub(crate) config: EngineConfig,
    pub(crate) reading: VramReading,
}

/// What a [`Launch`] resolved to: the GPUs to start, each with its servers and slots, and those
/// left out with why. Nothing has waited or started yet.
#[derive(Debug)]
#[must_use = "a plan does nothing until `start` or `serve`"]
pub struct Plan {
    pub(crate) gpus: Vec<GpuPlan>,
    pub(crate) left_out: Vec<LeftOut>,
    pub(crate) when_locked: WhenLocked,
    pub(crate) probe: VramProbe,
    /// When the launch began planning (a run's wall time counts from here).
    pub(crate) began: SystemTime,
}

impl Launch {
    /// The configuration on its own GPU, with its slots, one server.
    pub fn new(config: EngineConfig) -> Launch {
        let slots = Count::Fixed(config.slots());
        Launch {
            config,
            gpus: Gpus::Configured,
            slots,
            servers: Count::Fixed(1),
            began: None,
        }
    }

    /// Sets when the run began (a front end's own start, before it read its inputs): a run's wall
    /// time counts from here. By default, from the plan.
    pub fn began(mut self, at: SystemTime) -> Launch {
        self.began = Some(at);
        self
    }

    /// Sets the GPUs.
    pub fn gpus(mut self, gpus: Gpus) -> Launch {
        self.gpus = gpus;
        self
    }

    /// Sets the requests in flight on each GPU, split evenly over its servers; `auto`: the most
    /// that fit in its free VRAM (at most 16).
    pub fn slots(mut self, slots: Count) -> Launch {
        self.slots = slots;
        self
    }

    /// Sets the servers on each GPU; `auto`: where requests carry a grammar, as many as the host's
    /// cores, the free VRAM and the slots make worthwhile; otherwise one
    /// ([`crate::config::choose_layout`]).
    pub fn servers_per_gpu(mut self, servers: Count) -> Launch {
        self.servers = servers;
        self
    }

    /// Reads every GPU once and decides: which GPUs (a GPU named twice, or one no GPU answers to,
    /// is refused; under [`Gpus::All`], those short of VRAM are left out), and on each its servers
    /// and slots (`auto` resolved from that GPU's free VRAM, the model's numbers and the host's
    /// cores). The VRAM a GPU needs counts every copy of the weights and every slot's cache where
    /// several servers run or `auto` chose; a GPU without it is refused with the numbers (left out
    /// under [`Gpus::All`]). Servers take free ports under [`Gpus::List`] or [`Gpus::All`], and
    /// where a GPU has several (the configured port is for the configured GPU's one server); the
    /// host's cores are shared among all servers that set no `threads`. `cancel` ends a slow
    /// reading.
    pub fn plan(self, cancel: &CancellationToken) -> Result<Plan, EngineError> {
        let began = self.began.unwrap_or_else(SystemTime::now);
        let probe = self.config.vram_probe()?;
        let rows = probe.query(Wait::Until(cancel))?;
        let visible = Visible::from_env();
        let (named, when_locked) = self.named_gpus(&rows, &visible)?;
        let cores = host_cores() / u32::try_from(named.len().max(1)).unwrap_or(u32::MAX);
        let mut gpus = Vec::new();
        let mut left_out = Vec::new();
        for (gpu, reading) in named {
            match reading.and_then(|reading| self.gpu_plan(reading, cores.max(1))) {
                Ok(plan) => gpus.push(plan),
                Err(error) if self.gpus == Gpus::All => left_out.push(LeftOut { gpu, error }),
                Err(error) => return Err(error),
            }
        }
        if gpus.is_empty() {
            return Err(none_started(left_out));
        }
        share_the_cores(&mut gpus);
        Ok(Plan {
            gpus,
            left_out,
            when_locked,
            probe,
            began,
        })
    }

    /// The GPUs named, each with its reading (or why it has none), and what to do with one another
    /// process holds.
    #[allow(clippy::type_complexity)]
    fn named_gpus(
        &self,
        rows: &[GpuRow],
        visible: &Visible,
    ) -> Result<(Vec<(GpuId, Result<VramReading, EngineError>)>, WhenLocked), EngineError> {
        let reading = |gpu: &GpuId| select(rows, gpu, visible, 0).map_err(EngineError::from);
        match &self.gpus {
            Gpus::Configured => {
                let gpu = self.config.gpu().clone();
                let read = reading(&gpu);
                Ok((vec![(gpu, read)], WhenLocked::Wait))
            }
            Gpus::List(ids) => {
                let (first, again) = distinct(rows, ids, visible);
                if let Some((_, twice)) = again.into_iter().next() {
                    let reason = format!(
                        "names GPU {} twice ({} and {}): name each GPU once",
                        twice.index, twice.first, twice.second
                    );
                    return Err(ConfigError::new(Setting::Gpus, reason).into());
                }
                let named = first
                    .into_iter()
                    .map(|(at, read)| (ids[at].clone(), read.map_err(EngineError::from)))
                    .collect();
                Ok((named, WhenLocked::Wait))
            }
            Gpus::All => {
                let named: Vec<_> = visible
                    .rows(rows)
                    .into_iter()
                    .map(|row| {
                        // Read by its UUID (an index counts the visible GPUs); named by its index.
                        let read = reading(&GpuId::Uuid(row.uuid.clone()));
                        (GpuId::Index(row.index), read)
                    })
                    .collect();
                if named.is_empty() {
                    return Err(VramError::NoGpu {
                        probe: self.config.vram_probe()?.name(),
                    }
                    .into());
                }
                Ok((named, WhenLocked::Skip))
            }
        }
    }

    /// One GPU's plan from its reading: its layout, checked against its free VRAM.
    fn gpu_plan(&self, reading: VramReading, cores: u32) -> Result<GpuPlan, EngineError> {
        let min = self.config.min_vram_mib();
        if reading.free_mib < min {
            return Err(VramError::Insufficient {
                gpu: reading.gpu,
                free_mib: reading.free_mib,
                min_mib: min,
            }
            .into());
        }
        let layout = self.layout(&reading, cores)?;
        // Several servers, or auto's choice: the GPU must hold what they need, or a server would
        // run out of memory mid-run.
        let counted =
            layout.servers > 1 || self.slots == Count::Auto || self.servers == Count::Auto;
        if counted && !layout.fits {
            return Err(VramError::TooSmall {
                gpu: reading.gpu,
                free_mib: reading.free_mib,
                need_mib: layout.need_mib,
                detail: layout.why.clone(),
            }
            .into());
        }
        let mut config = self.config.to_builder().slots(layout.slots);
        if !matches!(self.gpus, Gpus::Configured) {
            // A pool names the GPU by its UUID, whatever numbering the list used. It takes free
            // ports, however many GPUs it found: a scheduler runs several jobs of `--gpus all` on
            // one node (a GPU each), and one fixed port would refuse all but one.
            config = config.gpu(GpuId::Uuid(reading.uuid.clone())).port(0);
        }
        Ok(GpuPlan {
            gpu: reading.gpu,
            uuid: reading.uuid.clone(),
            free_mib: reading.free_mib,
            layout,
            config: config.build()?,
            reading,
        })
    }

    fn layout(&self, reading: &VramReading, cores: u32) -> Result<Layout, EngineError> {
        let (budget, slot) = match self.config.budget(reading.free_mib, cores) {
            Ok(known) => known,
            Err(e) if self.slots == Count::Auto => return Err(e.into()),
            // Nothing auto to decide from the model: the fixed counts hold as given.
            Err(e) => (
                Budget {
                    free_mib: reading.free_mib,
                    weights_mib: 0,
                    slot_mib: None,
                    cores,
                    grammar: self.config.sends_grammar(),
                },
                Err(e.to_string()),
            ),
        };
        if let (Count::Auto, Err(why)) = (self.slots, &slot) {
            return Err(ConfigError::new(
                Setting::Slots,
                format!("auto reads the model's shape, and {why} — give a number of slots instead"),
            )
            .into());
        }
        let mut layout = choose_layout(&budget, self.servers, self.slots);
        if let (false, Ok(words)) = (layout.why.is_empty(), slot) {
            layout.why = format!("{}; one slot's cache: {words}", layout.why);
        }
        Ok(layout)
    }
}

/// The cores this process may use.
fn host_cores() -> u32 {
    std::thread::available_parallelism().map_or(1, |n| u32::try_from(n.get()).unwrap_or(u32::MAX))
}

/// Each server's share of this host's cores, for the configurations that set no `threads`: several
/// servers that each take every core (llama-server's default) slow each other down on the CPU side
/// of every request (measured on 2×H200: `-t 4` per server gave the steadier throughput).
fn share_the_cores(gpus: &mut [GpuPlan]) {
    let servers: u32 = gpus.iter().map(|g| g.layout.servers).sum();
    if servers < 2 {
        return;
    }
    let share = (host_cores() / servers).max(1);
    for gpu in gpus.iter_mut().filter(|g| g.config.threads().is_none()) {
        gpu.config = gpu
            .config
            .to_builder()
            .threads(share)
            .build()
            .expect("a checked configuration with a thread count of at least 1");
    }
}

impl Plan {
    /// The GPUs to start, in order, each with its servers and slots (and why, where `auto` chose).
    pub fn gpus(&self) -> &[GpuPlan] {
        &self.gpus
    }

    /// The GPUs left out while planning, and why.
    pub fn left_out(&self) -> &[LeftOut] {
        &self.left_out
    }

    /// Leaves `gpu` (nvidia-smi index) out of the start, for the caller's own reason (the calling
    /// thread holds its lock, say); `false` if the plan has no such GPU. Leaving every GPU out is
    /// refused: the error names each GPU's reason.
    pub fn leave_out(&mut self, gpu: u32, why: impl Into<String>) -> Result<bool, EngineError> {
        let Some(at) = self.gpus.iter().position(|g| g.gpu == gpu) else {
            return Ok(false);
        };
        let left = self.gpus.remove(at);
        self.left_out.push(LeftOut {
            gpu: GpuId::Index(left.gpu),
            error: ConfigError::new(Setting::Gpus, why.into()).into(),
        });
        if self.gpus.is_empty() {
            return Err(none_started(std::mem::take(&mut self.left_out)));
        }
        Ok(true)
    }

    /// The servers to start, over every GPU.
    pub fn servers(&self) -> u32 {
        self.gpus.iter().map(|g| g.layout.servers).sum()
    }

    /// What the start does with a GPU another process holds.
    pub fn when_locked(&self) -> WhenLocked {
        self.when_locked
    }

    /// When the run began (its wall time counts from here).
    pub fn began(&self) -> SystemTime {
        self.began
    }
}
