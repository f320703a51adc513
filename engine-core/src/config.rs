//! [`EngineConfig`]: everything the engine needs to know, with the seed's defaults.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::vram::VRAM_MINIMUM_MIB;

/// The port llama-server listens on unless configured otherwise.
pub const DEFAULT_PORT: u16 = 8089;

/// The engine's configuration. Start from [`EngineConfig::new`] and chain the setters.
///
/// ```
/// use std::time::Duration;
/// use engine_core::EngineConfig;
///
/// let config = EngineConfig::new("models/llava.gguf", "models/mmproj.gguf")
///     .port(0) // pick a free port
///     .gpu(1)
///     .startup_timeout(Duration::from_secs(300));
/// assert_eq!(config.port, 0);
/// assert_eq!(config.min_vram_mib, 6144);
/// ```
#[non_exhaustive]
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// The text model GGUF (`-m`).
    pub model: PathBuf,
    /// The vision projector GGUF (`--mmproj`).
    pub mmproj: PathBuf,
    /// TCP port on 127.0.0.1; 0 picks a free one.
    pub port: u16,
    /// The llama-server program; `None` means the env var `LLAMA_SERVER`, else `llama-server` on PATH.
    pub server_bin: Option<PathBuf>,
    /// The nvidia-smi program; `None` means the env var `NVIDIA_SMI`, else `nvidia-smi` on PATH.
    pub nvidia_smi: Option<PathBuf>,
    /// Minimum free VRAM in MiB for `check_vram` to pass.
    pub min_vram_mib: u64,
    /// Which GPU (nvidia-smi index) to check and lock.
    pub gpu: u32,
    /// Context size (`-c`).
    pub ctx_size: u32,
    /// Layers to offload to the GPU (`-ngl`).
    pub gpu_layers: u32,
    /// Parallel slots (`-np`): how many requests the server serves at once.
    pub slots: u32,
    /// How long the server may take to become healthy.
    pub startup_timeout: Duration,
    /// How long a stopping server gets between SIGTERM and SIGKILL.
    pub stop_grace: Duration,
    /// How long nvidia-smi may take before it is killed.
    pub vram_query_timeout: Duration,
    /// The interval between `/health` polls (at most 10 ms).
    pub health_poll_interval: Duration,
    /// After the server is reaped, how long to wait for free VRAM to come back to within 5 % of the
    /// reading taken before start (polled through nvidia-smi) before the GPU lock is released. Zero
    /// skips the wait.
    pub vram_recovery_timeout: Duration,
    /// Write the server's stdout and stderr to `llama-server.log` beside the model.
    pub debug: bool,
    /// Pass `--log-disable` (the seed's flag). Off by default: the engine drains the server's output
    /// into a bounded buffer, so logging costs nothing and failures can name their cause.
    pub log_disable: bool,
    /// Extra arguments appended to the server's command line.
    pub extra_args: Vec<OsString>,
    /// Extra environment variables for the server.
    pub env: Vec<(OsString, OsString)>,
    /// How the engine asks for descriptions (prompt, retries, limits).
    pub describe: crate::describe::DescribeOptions,
}

impl EngineConfig {
    /// A configuration with the seed's defaults for the given model and mmproj.
    pub fn new(model: impl Into<PathBuf>, mmproj: impl Into<PathBuf>) -> Self {
        EngineConfig {
            model: model.into(),
            mmproj: mmproj.into(),
            port: DEFAULT_PORT,
            server_bin: None,
            nvidia_smi: None,
            min_vram_mib: VRAM_MINIMUM_MIB,
            gpu: 0,
            ctx_size: 2048,
            gpu_layers: 99,
            slots: 1,
            startup_timeout: Duration::from_secs(120),
            stop_grace: Duration::from_secs(10),
            vram_query_timeout: Duration::from_secs(10),
            health_poll_interval: Duration::from_millis(5),
            vram_recovery_timeout: Duration::from_secs(5),
            debug: false,
            log_disable: false,
            extra_args: Vec::new(),
            env: Vec::new(),
            describe: crate::describe::DescribeOptions::default(),
        }
    }

    /// Sets the port (0 picks a free one).
    pub fn port(mut self, port: u16) -> Self {
        self.port = port;
        self
    }
    /// Sets the llama-server program.
    pub fn server_bin(mut self, program: impl Into<PathBuf>) -> Self {
        self.server_bin = Some(program.into());
        self
    }
    /// Sets the nvidia-smi program.
    pub fn nvidia_smi(mut self, program: impl Into<PathBuf>) -> Self {
        self.nvidia_smi = Some(program.into());
        self
    }
    /// Sets the minimum free VRAM in MiB.
    pub fn min_vram_mib(mut self, mib: u64) -> Self {
        self.min_vram_mib = mib;
        self
    }
    /// Sets the GPU index.
    pub fn gpu(mut self, index: u32) -> Self {
        self.gpu = index;
        self
    }
    /// Sets the context size.
    pub fn ctx_size(mut self, tokens: u32) -> Self {
        self.ctx_size = tokens;
        self
    }
    /// Sets the number of layers offloaded to the GPU.
    pub fn gpu_layers(mut self, layers: u32) -> Self {
        self.gpu_layers = layers;
        self
    }
    /// Sets the number of parallel slots.
    pub fn slots(mut self, slots: u32) -> Self {
        self.slots = slots;
        self
    }
    /// Sets the startup timeout.
    pub fn startup_timeout(mut self, timeout: Duration) -> Self {
        self.startup_timeout = timeout;
        self
    }
    /// Sets the grace period between SIGTERM and SIGKILL.
    pub fn stop_grace(mut self, grace: Duration) -> Self {
        self.stop_grace = grace;
        self
    }
    /// Sets the nvidia-smi timeout.
    pub fn vram_query_timeout(mut self, timeout: Duration) -> Self {
        self.vram_query_timeout = timeout;
        self
    }
    /// Sets the interval between health polls (capped at 10 ms by validation).
    pub fn health_poll_interval(mut self, interval: Duration) -> Self {
        self.health_poll_interval = interval;
        self
    }
    /// Sets how long shutdown waits for VRAM to come back (zero: no wait).
    pub fn vram_recovery_timeout(mut self, timeout: Duration) -> Self {
        self.vram_recovery_timeout = timeout;
        self
    }
    /// Turns debug mode (a full log file beside the model) on or off.
    pub fn debug(mut self, on: bool) -> Self {
        self.debug = on;
        self
    }
    /// Passes the seed's `--log-disable` to the server.
    pub fn log_disable(mut self, on: bool) -> Self {
        self.log_disable = on;
        self
    }
    /// Appends one argument to the server's command line.
    pub fn arg(mut self, arg: impl Into<OsString>) -> Self {
        self.extra_args.push(arg.into());
        self
    }
    /// Adds an environment variable for the server.
    pub fn env(mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }
    /// Sets how descriptions are requested.
    pub fn describe_options(mut self, options: crate::describe::DescribeOptions) -> Self {
        self.describe = options;
        self
    }

    /// The llama-server program to run: the configured one, else `$LLAMA_SERVER`, else `llama-server`.
    pub fn resolved_server_bin(&self) -> PathBuf {
        resolve(&self.server_bin, "LLAMA_SERVER", "llama-server")
    }

    /// The nvidia-smi program to run: the configured one, else `$NVIDIA_SMI`, else `nvidia-smi`.
    pub fn resolved_nvidia_smi(&self) -> PathBuf {
        resolve(&self.nvidia_smi, "NVIDIA_SMI", "nvidia-smi")
    }

    /// Where debug mode writes the server's output: `llama-server.log` beside the model.
    pub fn debug_log_path(&self) -> PathBuf {
        self.model
            .parent()
            .unwrap_or(Path::new("."))
            .join("llama-server.log")
    }

    /// The server's command line (without the program) for `port`: the seed's flags, then
    /// [`EngineConfig::extra_args`].
    ///
    /// ```
    /// let config = engine_core::EngineConfig::new("m.gguf", "p.gguf").log_disable(true);
    /// let args: Vec<String> = config.server_args(8089).iter().map(|a| a.to_string_lossy().into_owned()).collect();
    /// assert_eq!(args.join(" "), "-m m.gguf --mmproj p.gguf --port 8089 --host 127.0.0.1 -ngl 99 -c 2048 -np 1 --log-disable");
    /// ```
    pub fn server_args(&self, port: u16) -> Vec<OsString> {
        let mut args: Vec<OsString> = vec![
            "-m".into(),
            self.model.clone().into(),
            "--mmproj".into(),
            self.mmproj.clone().into(),
            "--port".into(),
            port.to_string().into(),
            "--host".into(),
            "127.0.0.1".into(),
            "-ngl".into(),
            self.gpu_layers.to_string().into(),
            "-c".into(),
            self.ctx_size.to_string().into(),
            "-np".into(),
            self.slots.to_string().into(),
        ];
        if self.log_disable {
            args.push("--log-disable".into());
        }
        args.extend(self.extra_args.iter().cloned());
        args
    }

    /// Checks the values that would make the server or the engine misbehave.
    pub(crate) fn validate(&self) -> Result<(), String> {
        if self.slots == 0 {
            return Err("slots must be at least 1".into());
        }
        if self.ctx_size == 0 {
            return Err("ctx_size must be at least 1".into());
        }
        if self.health_poll_interval.is_zero()
            || self.health_poll_interval > Duration::from_millis(10)
        {
            return Err(format!(
                "health_poll_interval is {:?}; it must be between 1 µs and 10 ms",
                self.health_poll_interval
            ));
        }
        if self.startup_timeout.is_zero() {
            return Err("startup_timeout must be more than zero".into());
        }
        self.describe.validate()
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
