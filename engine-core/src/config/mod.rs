//! [`EngineConfig`]: everything the engine needs to know, with CineCut's defaults, built and
//! checked once by [`EngineConfigBuilder`]; what one GPU offers and one server costs, from the
//! model's own numbers ([`EngineConfig::budget`]), and the servers and slots `auto` chooses from it
//! ([`choose_layout`]).

mod layout;
mod slots;

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use layout::{
    Budget, CORES_PER_SERVER, Count, Layout, MARGIN_MIB, MAX_AUTO_SLOTS, MIN_SLOTS_PER_SERVER,
    choose_layout, counted,
};
pub use slots::{CacheType, CacheTypes, KvShape};

/// How images reach the server ([`EngineConfigBuilder::image_transport`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ImageTransport {
    /// A `file://` reference where the server offers `--media-path` and the frame's path is one it
    /// takes; else a base64 data URI.
    #[default]
    Auto,
    /// Always a base64 data URI (the only way the server takes an image that is not a local file).
    Base64,
}

use crate::gpu::{GpuId, NvidiaSmi, ProbeChoice, VRAM_MINIMUM_MIB, VramProbe};
use crate::request::DescribeOptions;
use crate::server::{ServerSpec, StartError, check_extra_args, check_model_files};
use crate::setting::{ConfigError, Setting, Zero, check_duration};

/// The port llama-server listens on unless configured otherwise.
pub const DEFAULT_PORT: u16 = 8089;

/// The engine's configuration: checked, then read-only. Build it with [`EngineConfig::builder`].
///
/// ```
/// use std::time::Duration;
/// use engine_core::EngineConfig;
///
/// let config = EngineConfig::builder("models/llava.gguf", "models/mmproj.gguf")
///     .port(0) // pick a free one
///     .gpu(1)
///     .startup_timeout(Duration::from_secs(300))
///     .build()?;
/// assert_eq!(config.port(), 0);
/// assert_eq!(config.min_vram_mib(), 6144);
/// # Ok::<(), engine_core::setting::ConfigError>(())
/// ```
#[derive(Debug, Clone)]
pub struct EngineConfig {
    model: PathBuf,
    mmproj: Option<PathBuf>,
    port: u16,
    server_bin: Option<PathBuf>,
    nvidia_smi: Option<PathBuf>,
    vram_probe: ProbeChoice,
    min_vram_mib: u64,
    gpu: GpuId,
    ctx_size: u32,
    gpu_layers: u32,
    slots: u32,
    startup_timeout: Duration,
    stop_grace: Duration,
    vram_query_timeout: Duration,
    health_poll_interval: Duration,
    vram_recovery_timeout: Duration,
    debug: bool,
    log_disable: bool,
    image_transport: ImageTransport,
    threads: Option<u32>,
    extra_args: Vec<OsString>,
    env: Vec<(OsString, OsString)>,
    describe: DescribeOptions,
}

/// Sets up an [`EngineConfig`]: every setting has one setter here and one getter there.
#[derive(Debug, Clone)]
#[must_use = "a builder does nothing until `build()`"]
pub struct EngineConfigBuilder {
    config: EngineConfig,
}

impl EngineConfig {
    /// A builder with CineCut's defaults for a vision model: the language model and its projector.
    pub fn builder(model: impl Into<PathBuf>, mmproj: impl Into<PathBuf>) -> EngineConfigBuilder {
        EngineConfig::text(model).mmproj(mmproj)
    }

    /// A builder with CineCut's defaults for a text-only model (no `--mmproj`; prompts carry no
    /// images), such as CineCut's subtitle stage:
    ///
    /// ```
    /// let config = engine_core::EngineConfig::text("mistral-7b-instruct.gguf")
    ///     .port(8090)
    ///     .ctx_size(8192)
    ///     .build()?;
    /// assert!(config.mmproj().is_none());
    /// # Ok::<(), engine_core::setting::ConfigError>(())
    /// ```
    pub fn text(model: impl Into<PathBuf>) -> EngineConfigBuilder {
        EngineConfigBuilder {
            config: EngineConfig {
                model: model.into(),
                mmproj: None,
                port: DEFAULT_PORT,
                server_bin: None,
                nvidia_smi: None,
                vram_probe: ProbeChoice::Auto,
                min_vram_mib: VRAM_MINIMUM_MIB,
                gpu: GpuId::Index(0),
                ctx_size: 2048,
                gpu_layers: 99,
                slots: 1,
                startup_timeout: Duration::from_secs(120),
                stop_grace: Duration::from_secs(10),
                vram_query_timeout: NvidiaSmi::DEFAULT_TIMEOUT,
                health_poll_interval: Duration::from_millis(5),
                vram_recovery_timeout: Duration::from_secs(5),
                debug: false,
                log_disable: false,
                image_transport: ImageTransport::Auto,
                threads: None,
                extra_args: Vec::new(),
                env: Vec::new(),
                describe: DescribeOptions::default(),
            },
        }
    }

    /// A builder that starts from this configuration.
    pub fn to_builder(&self) -> EngineConfigBuilder {
        EngineConfigBuilder {
            config: self.clone(),
        }
    }

    /// The language model GGUF (`-m`).
    pub fn model(&self) -> &Path {
        &self.model
    }
    /// The vision projector GGUF (`--mmproj`); `None` for a text-only model.
    pub fn mmproj(&self) -> Option<&Path> {
        self.mmproj.as_deref()
    }
    /// TCP port on 127.0.0.1; 0 picks a free one.
    pub fn port(&self) -> u16 {
        self.port
    }
    /// The llama-server program: the configured one, else `$LLAMA_SERVER`, else `llama-server`.
    pub fn server_bin(&self) -> PathBuf {
        resolve(&self.server_bin, "LLAMA_SERVER", "llama-server")
    }
    /// The VRAM probe: the configured nvidia-smi, else `$NVIDIA_SMI`, else `nvidia-smi`, with the
    /// configured timeout.
    pub fn nvidia_smi(&self) -> NvidiaSmi {
        NvidiaSmi::new(
            resolve(&self.nvidia_smi, "NVIDIA_SMI", "nvidia-smi"),
            self.vram_query_timeout,
        )
    }
    /// Which VRAM probe to use.
    pub fn vram_probe_choice(&self) -> ProbeChoice {
        self.vram_probe
    }
    /// The VRAM probe: NVML or [`EngineConfig::nvidia_smi`], as [`EngineConfig::vram_probe_choice`]
    /// says (under `Auto`, a configured program or `$NVIDIA_SMI` means nvidia-smi).
    pub fn vram_probe(&self) -> Result<VramProbe, crate::VramError> {
        let named = (self.nvidia_smi.is_some() || crate::gpu::named_nvidia_smi().is_some())
            .then(|| self.nvidia_smi());
        VramProbe::choose(self.vram_probe, named, self.vram_query_timeout)
    }
    /// Minimum free VRAM in MiB for the checks to pass.
    pub fn min_vram_mib(&self) -> u64 {
        self.min_vram_mib
    }
    /// Which GPU to check, lock and show the server (an index among the visible GPUs, or a UUID).
    pub fn gpu(&self) -> &GpuId {
        &self.gpu
    }
    /// Context size per slot: the server gets `-c ctx_size × slots`.
    pub fn ctx_size(&self) -> u32 {
        self.ctx_size
    }
    /// Layers offloaded to the GPU (`-ngl`).
    pub fn gpu_layers(&self) -> u32 {
        self.gpu_layers
    }
    /// Parallel slots (`-np`): how many requests the server serves at once.
    pub fn slots(&self) -> u32 {
        self.slots
    }
    /// How long the server may take to become healthy.
    pub fn startup_timeout(&self) -> Duration {
        self.startup_timeout
    }
    /// How long a stopping server gets between the first SIGTERM and SIGKILL.
    pub fn stop_grace(&self) -> Duration {
        self.stop_grace
    }
    /// The interval between `/health` polls.
    pub fn health_poll_interval(&self) -> Duration {
        self.health_poll_interval
    }
    /// How long to wait for free VRAM to come back after the server stopped (zero: no wait).
    pub fn vram_recovery_timeout(&self) -> Duration {
        self.vram_recovery_timeout
    }
    /// Whether the server's whole output goes to `llama-server.log` beside the model.
    pub fn debug(&self) -> bool {
        self.debug
    }
    /// Whether CineCut's original `--log-disable` is passed.
    pub fn log_disable(&self) -> bool {
        self.log_disable
    }
    /// How images reach the server.
    pub fn image_transport(&self) -> ImageTransport {
        self.image_transport
    }
    /// CPU threads the server uses (`-t`); `None`: the server's own default.
    pub fn threads(&self) -> Option<u32> {
        self.threads
    }
    /// Arguments appended to the server's command line.
    pub fn extra_args(&self) -> &[OsString] {
        &self.extra_args
    }
    /// Environment variables added for the server.
    pub fn env(&self) -> &[(OsString, OsString)] {
        &self.env
    }
    /// How long one nvidia-smi query may take (part of [`EngineConfig::nvidia_smi`]).
    pub fn vram_query_timeout(&self) -> Duration {
        self.vram_query_timeout
    }
    /// How descriptions are requested.
    pub fn describe_options(&self) -> &DescribeOptions {
        &self.describe
    }

    /// Checks the model files as the engine does before it spawns anything, so that a caller can
    /// report a wrong file before it waits for VRAM or the GPU lock: each must exist and be GGUF
    /// (version 2 or 3); the model must not be a vision projector; the mmproj must be one
    /// (`general.architecture = clip`) with a `clip.projector_type`.
    pub fn check_model_files(&self) -> Result<(), StartError> {
        check_model_files(&self.model, self.mmproj.as_deref())
    }

    /// Where debug mode writes the server's output: `llama-server.log` beside the model.
    pub fn debug_log_path(&self) -> PathBuf {
        self.model
            .parent()
            .unwrap_or(Path::new("."))
            .join("llama-server.log")
    }

    /// The server's command line (without the program) for `port`: CineCut's flags, then
    /// [`EngineConfig::extra_args`]. `-c` is the context per slot times the slots, because
    /// llama-server divides `-c` among its slots.
    ///
    /// ```
    /// let config = engine_core::EngineConfig::builder("m.gguf", "p.gguf").log_disable(true).build()?;
    /// let args: Vec<String> = config.server_args(8089).iter().map(|a| a.to_string_lossy().into_owned()).collect();
    /// assert_eq!(args.join(" "), "-m m.gguf --mmproj p.gguf --port 8089 --host 127.0.0.1 -ngl 99 -c 2048 -np 1 --log-disable");
    /// # Ok::<(), engine_core::setting::ConfigError>(())
    /// ```
    pub fn server_args(&self, port: u16) -> Vec<OsString> {
        self.server_spec().args(port)
    }

    /// This configuration split over `servers` servers of one GPU: the slots divided evenly (the
    /// first servers get one more where they do not divide; never fewer than one each), and each on
    /// a free port when there are several.
    pub(crate) fn per_server(&self, servers: u32) -> Vec<EngineConfig> {
        let servers = servers.clamp(1, self.slots);
        (0..servers)
            .map(|k| {
                let mut config = self.clone();
                config.slots = self.slots / servers + u32::from(k < self.slots % servers);
                if servers > 1 {
                    config.port = 0;
                }
                config
            })
            .collect()
    }

    /// What this configuration's server is started with.
    pub(crate) fn server_spec(&self) -> ServerSpec {
        ServerSpec {
            program: self.server_bin(),
            model: self.model.clone(),
            mmproj: self.mmproj.clone(),
            port: self.port,
            gpu_layers: self.gpu_layers,
            ctx_size: self.ctx_size,
            slots: self.slots,
            threads: self.threads,
            log_disable: self.log_disable,
            extra_args: self.extra_args.clone(),
            env: self.env.clone(),
            debug_log: self.debug.then(|| self.debug_log_path()),
            offer_files: self.image_transport == ImageTransport::Auto,
            health_poll_interval: self.health_poll_interval,
            startup_timeout: self.startup_timeout,
            stop_grace: self.stop_grace,
        }
    }
}

impl EngineConfigBuilder {
    /// Sets the language model GGUF.
    pub fn model(mut self, path: impl Into<PathBuf>) -> Self {
        self.config.model = path.into();
        self
    }
    /// Sets the vision projector GGUF (a vision model).
    pub fn mmproj(mut self, path: impl Into<PathBuf>) -> Self {
        self.config.mmproj = Some(path.into());
        self
    }
    /// Drops the vision projector: a text-only model.
    pub fn text_only(mut self) -> Self {
        self.config.mmproj = None;
        self
    }
    /// Sets the port (0 picks a free one).
    pub fn port(mut self, port: u16) -> Self {
        self.config.port = port;
        self
    }
    /// Sets the llama-server program.
    pub fn server_bin(mut self, program: impl Into<PathBuf>) -> Self {
        self.config.server_bin = Some(program.into());
        self
    }
    /// Sets the nvidia-smi program.
    pub fn nvidia_smi(mut self, program: impl Into<PathBuf>) -> Self {
        self.config.nvidia_smi = Some(program.into());
        self
    }
    /// Sets which VRAM probe to use (NVML, nvidia-smi, or the automatic choice).
    pub fn vram_probe(mut self, choice: ProbeChoice) -> Self {
        self.config.vram_probe = choice;
        self
    }
    /// Sets the minimum free VRAM in MiB.
    pub fn min_vram_mib(mut self, mib: u64) -> Self {
        self.config.min_vram_mib = mib;
        self
    }
    /// Sets the GPU: an index (`1`) or a [`GpuId`] (a UUID).
    pub fn gpu(mut self, gpu: impl Into<GpuId>) -> Self {
        self.config.gpu = gpu.into();
        self
    }
    /// Sets the context size per slot (CineCut's 2048 tokens for each request).
    pub fn ctx_size(mut self, tokens: u32) -> Self {
        self.config.ctx_size = tokens;
        self
    }
    /// Sets the number of layers offloaded to the GPU.
    pub fn gpu_layers(mut self, layers: u32) -> Self {
        self.config.gpu_layers = layers;
        self
    }
    /// Sets the number of parallel slots.
    pub fn slots(mut self, slots: u32) -> Self {
        self.config.slots = slots;
        self
    }
    /// Sets the startup timeout.
    pub fn startup_timeout(mut self, timeout: Duration) -> Self {
        self.config.startup_timeout = timeout;
        self
    }
    /// Sets the grace period between the first SIGTERM and SIGKILL.
    pub fn stop_grace(mut self, grace: Duration) -> Self {
        self.config.stop_grace = grace;
        self
    }
    /// Sets the nvidia-smi timeout.
    pub fn vram_query_timeout(mut self, timeout: Duration) -> Self {
        self.config.vram_query_timeout = timeout;
        self
    }
    /// Sets the interval between health polls (1 µs to 10 ms).
    pub fn health_poll_interval(mut self, interval: Duration) -> Self {
        self.config.health_poll_interval = interval;
        self
    }
    /// Sets how long a stop waits for VRAM to come back (zero: no wait).
    pub fn vram_recovery_timeout(mut self, timeout: Duration) -> Self {
        self.config.vram_recovery_timeout = timeout;
        self
    }
    /// Turns debug mode (a full log file beside the model) on or off.
    pub fn debug(mut self, on: bool) -> Self {
        self.config.debug = on;
        self
    }
    /// Passes CineCut's original `--log-disable` to the server.
    pub fn log_disable(mut self, on: bool) -> Self {
        self.config.log_disable = on;
        self
    }
    /// Sets how images reach the server: `Auto` (the default) sends a local frame as a `file://`
    /// reference where the server offers `--media-path` (no encode, no copy through HTTP), else as
    /// a base64 data URI; `Base64` always inlines it.
    pub fn image_transport(mut self, transport: ImageTransport) -> Self {
        self.config.image_transport = transport;
        self
    }
    /// Sets the CPU threads the server uses (`-t`): a pool gives each server its share of the host's
    /// cores, where several servers would otherwise each take them all.
    pub fn threads(mut self, threads: u32) -> Self {
        self.config.threads = Some(threads);
        self
    }
    /// Appends one argument to the server's command line.
    pub fn arg(mut self, arg: impl Into<OsString>) -> Self {
        self.config.extra_args.push(arg.into());
        self
    }
    /// Adds an environment variable for the server.
    pub fn env(mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> Self {
        self.config.env.push((key.into(), value.into()));
        self
    }
    /// Sets how descriptions are requested.
    pub fn describe_options(mut self, options: DescribeOptions) -> Self {
        self.config.describe = options;
        self
    }

    /// Checks every value and returns the configuration, or an error naming the value and the fix.
    pub fn build(self) -> Result<EngineConfig, ConfigError> {
        let c = &self.config;
        let fail = |setting: Setting, reason: String| Err(ConfigError::new(setting, reason));
        if c.slots == 0 {
            return fail(Setting::Slots, "is 0: it must be at least 1".into());
        }
        if c.ctx_size == 0 {
            return fail(
                Setting::CtxSize,
                "is 0: it must be at least 1 token per slot".into(),
            );
        }
        if u64::from(c.ctx_size) * u64::from(c.slots) > u64::from(u32::MAX) {
            return fail(
                Setting::CtxSize,
                format!(
                    "{} × {} slots is more context than llama-server takes: lower it or `slots`",
                    c.ctx_size, c.slots
                ),
            );
        }
        if c.threads == Some(0) {
            return fail(Setting::Threads, "is 0: it must be at least 1".into());
        }
        if c.health_poll_interval.is_zero() || c.health_poll_interval > Duration::from_millis(10) {
            return fail(
                Setting::HealthPollInterval,
                format!(
                    "is {:?}: it must be between 1 µs and 10 ms",
                    c.health_poll_interval
                ),
            );
        }
        for (setting, value, zero) in [
            (Setting::StartupTimeout, c.startup_timeout, Zero::Refused),
            (
                Setting::VramQueryTimeout,
                c.vram_query_timeout,
                Zero::Refused,
            ),
            (Setting::StopGrace, c.stop_grace, Zero::Allowed),
            (
                Setting::VramRecoveryTimeout,
                c.vram_recovery_timeout,
                Zero::Allowed,
            ),
        ] {
            check_duration(setting, value, zero)?;
        }
        c.describe.validate()?;
        check_extra_args(&c.extra_args)?;
        Ok(self.config)
    }
}

fn resolve(configured: &Option<PathBuf>, env_var: &str, default: &str) -> PathBuf {
    if let Some(path) = configured {
        return path.clone();
    }
    match std::env::var_os(env_var) {
        Some(value) if !value.is_empty() => PathBuf::from(value),
        _ => PathBuf::from(default),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_bad_value_is_named() {
        let base = || EngineConfig::builder("m", "p");
        for (builder, needle) in [
            (base().slots(0), "`slots` is 0"),
            (base().ctx_size(0), "`ctx_size` is 0"),
            (base().ctx_size(u32::MAX).slots(2), "more context"),
            (
                base().health_poll_interval(Duration::from_secs(1)),
                "health_poll_interval",
            ),
            (
                base().startup_timeout(Duration::ZERO),
                "`startup_timeout` is zero",
            ),
            (
                base().stop_grace(Duration::from_secs(u64::MAX)),
                "stop_grace",
            ),
            (
                base().describe_options(
                    DescribeOptions::default().request_timeout(Duration::from_secs(1 << 60)),
                ),
                "request_timeout",
            ),
            (base().arg("--host").arg("0.0.0.0"), "127.0.0.1 only"),
            (base().arg("--port=9000"), "use `port`"),
            (base().arg("--api-key"), "random key"),
            (base().arg("-np"), "use `slots`"),
            // The server reads a long flag's `_` as `-`.
            (base().arg("--api_key").arg("k"), "random key"),
            (base().arg("--ctx_size=4096"), "context per slot"),
            (base().arg("--no-slots"), "task loop"),
        ] {
            let err = builder.build().unwrap_err().to_string();
            assert!(err.contains(needle), "{err}");
        }
    }

    #[test]
    fn every_slot_gets_the_context_per_slot() {
        let config = EngineConfig::builder("m", "p").slots(8).build().unwrap();
        let args: Vec<String> = config
            .server_args(1)
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let c = args.iter().position(|a| a == "-c").unwrap();
        assert_eq!((args[c + 1].as_str(), args[c + 3].as_str()), ("16384", "8"));
    }
}
