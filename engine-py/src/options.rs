//! The engines' `**options`, read into the engine's configuration by the engine's own rules (the
//! durations by `setting::seconds`, every value by the builder): a mistake is a `ValueError` that
//! names the option.

use std::path::PathBuf;
use std::time::Duration;

use engine_core::config::{Count, EngineConfigBuilder, ImageTransport};
use engine_core::gpu::ProbeChoice;
use engine_core::launch::Gpus;
use engine_core::request::Constraint;
use engine_core::setting::{Setting, Zero, seconds};
use engine_core::{DescribeOptions, EngineConfig, GpuId, Launch};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::errors;

/// The options an engine takes, besides its model, port and debug (the engines' docstrings list
/// them from here: `options()`).
pub const OPTIONS: [&str; 22] = [
    "slots",
    "servers_per_gpu",
    "ctx_size",
    "gpu",
    "gpus",
    "gpu_layers",
    "min_vram_mib",
    "startup_timeout_s",
    "request_timeout_s",
    "retries",
    "server_bin",
    "nvidia_smi",
    "prompt",
    "max_tokens",
    "temperature",
    "server_args",
    "vram_recovery_timeout_s",
    "stop_grace_s",
    "threads",
    "image_transport",
    "vram_probe",
    "grammar",
];

/// A `**options` value read as `$type`, or a `ValueError` naming the option.
macro_rules! option {
    ($options:expr, $name:literal, $type:ty) => {
        match $options.map(|o| o.get_item($name)).transpose()?.flatten() {
            None => None,
            Some(value) => Some(
                value
                    .extract::<$type>()
                    .map_err(|e| PyValueError::new_err(format!("option {}: {e}", $name)))?,
            ),
        }
    };
}

/// `value` seconds for `setting`, by the engine's rule for durations.
pub fn duration(setting: Setting, value: f64, zero: Zero) -> PyResult<Duration> {
    seconds(setting, value, zero).map_err(errors::config)
}

/// A GPU given as an index (an int) or a UUID (a str).
fn gpu_id(value: &Bound<'_, PyAny>, name: &str) -> PyResult<GpuId> {
    if let Ok(index) = value.extract::<u32>() {
        return Ok(index.into());
    }
    value
        .extract::<String>()
        .map_err(|_| PyValueError::new_err(format!("option {name}: an index or a UUID")))?
        .parse()
        .map_err(|e: String| PyValueError::new_err(format!("option {name}: {e}")))
}

/// A port: 0 (a free one) to 65535; never a bool (`port=True` is a mistake, not port 1).
pub fn port(port: &Bound<'_, PyAny>) -> PyResult<u16> {
    let refuse = || {
        PyValueError::new_err(format!(
            "port is {port}: it must be a whole number, 0 (any free port) to 65535"
        ))
    };
    if port.is_instance_of::<pyo3::types::PyBool>() {
        return Err(refuse());
    }
    port.extract::<i64>()
        .ok()
        .and_then(|p| u16::try_from(p).ok())
        .ok_or_else(refuse)
}

/// A count: a whole number of at least 1, or `"auto"` (never a bool).
fn count(value: &Bound<'_, PyAny>, name: &str) -> PyResult<Count> {
    let refuse = |why: String| PyValueError::new_err(format!("option {name}: {why}"));
    if value.is_instance_of::<pyo3::types::PyBool>() {
        return Err(refuse(format!(
            "{value} — a whole number of at least 1, or \"auto\""
        )));
    }
    if let Ok(text) = value.extract::<String>() {
        return text.parse().map_err(refuse);
    }
    match value.extract::<i64>() {
        Ok(n) => u32::try_from(n)
            .ok()
            .filter(|n| *n >= 1)
            .map(Count::Fixed)
            .ok_or_else(|| refuse(format!("{n} — a whole number of at least 1, or \"auto\""))),
        Err(_) => Err(refuse(format!(
            "{value} — a whole number of at least 1, or \"auto\""
        ))),
    }
}

/// An engine's configuration and what its launch starts: the GPUs, and the slots and servers of
/// each.
#[derive(Debug, Clone)]
pub struct Setup {
    pub config: EngineConfig,
    pub gpus: Gpus,
    pub slots: Count,
    pub servers: Count,
}

impl Setup {
    /// The launch of this setup (planned at `start`).
    pub fn launch(&self) -> Launch {
        Launch::new(self.config.clone())
            .gpus(self.gpus.clone())
            .slots(self.slots)
            .servers_per_gpu(self.servers)
    }

    /// Whether it runs one server on one GPU (what a swap keeps).
    pub fn single(&self) -> bool {
        self.gpus == Gpus::Configured && self.servers == Count::Fixed(1)
    }
}

/// The configuration for `model` (and `mmproj`, a vision model), and what its launch starts.
pub fn configure(
    model: PathBuf,
    mmproj: Option<PathBuf>,
    port: u16,
    debug: bool,
    options: Option<&Bound<'_, PyDict>>,
) -> PyResult<Setup> {
    if let Some(options) = options {
        for key in options.keys() {
            let key: String = key.extract()?;
            if !OPTIONS.contains(&key.as_str()) {
                return Err(PyValueError::new_err(format!(
                    "unknown option {key:?}: the options are {}",
                    OPTIONS.join(", ")
                )));
            }
        }
    }
    let mut builder: EngineConfigBuilder = match mmproj {
        Some(mmproj) => EngineConfig::builder(model, mmproj),
        None => EngineConfig::text(model),
    };
    builder = builder.port(port).debug(debug);
    let slots = match option!(options, "slots", Bound<'_, PyAny>) {
        Some(v) => count(&v, "slots")?,
        None => Count::Fixed(1),
    };
    if let Count::Fixed(n) = slots {
        builder = builder.slots(n);
    }
    let servers = match option!(options, "servers_per_gpu", Bound<'_, PyAny>) {
        Some(v) => count(&v, "servers_per_gpu")?,
        None => Count::Fixed(1),
    };
    if let Some(v) = option!(options, "ctx_size", u32) {
        builder = builder.ctx_size(v);
    }
    let gpu = option!(options, "gpu", Bound<'_, PyAny>);
    let gpus = option!(options, "gpus", Bound<'_, PyAny>);
    if gpu.is_some() && gpus.is_some() {
        return Err(PyValueError::new_err(
            "options gpu and gpus name the GPUs twice: give gpu (one GPU) or gpus (several), not both",
        ));
    }
    if let Some(v) = gpu {
        builder = builder.gpu(gpu_id(&v, "gpu")?);
    }
    let gpus = match gpus {
        None => Gpus::Configured,
        Some(v) if v.extract::<String>().is_ok_and(|s| s == "all") => Gpus::All,
        Some(v) => {
            let list: Vec<Bound<'_, PyAny>> = v.extract().map_err(|_| {
                PyValueError::new_err("option gpus: a list of indices or UUIDs, or \"all\"")
            })?;
            if list.is_empty() {
                return Err(PyValueError::new_err(
                    "option gpus: name at least one GPU, or \"all\"",
                ));
            }
            Gpus::List(
                list.iter()
                    .map(|g| gpu_id(g, "gpus"))
                    .collect::<PyResult<_>>()?,
            )
        }
    };
    if let Some(v) = option!(options, "gpu_layers", u32) {
        builder = builder.gpu_layers(v);
    }
    if let Some(v) = option!(options, "min_vram_mib", u64) {
        builder = builder.min_vram_mib(v);
    }
    if let Some(v) = option!(options, "startup_timeout_s", f64) {
        builder = builder.startup_timeout(duration(Setting::StartupTimeout, v, Zero::Refused)?);
    }
    if let Some(v) = option!(options, "stop_grace_s", f64) {
        builder = builder.stop_grace(duration(Setting::StopGrace, v, Zero::Allowed)?);
    }
    if let Some(v) = option!(options, "vram_recovery_timeout_s", f64) {
        let timeout = duration(Setting::VramRecoveryTimeout, v, Zero::Allowed)?;
        builder = builder.vram_recovery_timeout(timeout);
    }
    if let Some(v) = option!(options, "server_bin", PathBuf) {
        builder = builder.server_bin(v);
    }
    if let Some(v) = option!(options, "nvidia_smi", PathBuf) {
        builder = builder.nvidia_smi(v);
    }
    if let Some(v) = option!(options, "threads", u32) {
        builder = builder.threads(v);
    }
    if let Some(v) = option!(options, "vram_probe", String) {
        let choice: ProbeChoice = v
            .parse()
            .map_err(|e| PyValueError::new_err(format!("option vram_probe: {e}")))?;
        builder = builder.vram_probe(choice);
    }
    if let Some(v) = option!(options, "image_transport", String) {
        builder = builder.image_transport(match v.as_str() {
            "auto" => ImageTransport::Auto,
            "base64" => ImageTransport::Base64,
            other => {
                return Err(PyValueError::new_err(format!(
                    "option image_transport: {other:?} — \"auto\" or \"base64\""
                )));
            }
        });
    }
    for arg in option!(options, "server_args", Vec<String>).unwrap_or_default() {
        builder = builder.arg(arg);
    }
    // CineCut's request: 60 s a frame.
    let mut describe = DescribeOptions::default().request_timeout(Duration::from_secs(60));
    if let Some(v) = option!(options, "request_timeout_s", f64) {
        describe = describe.request_timeout(duration(Setting::RequestTimeout, v, Zero::Refused)?);
    }
    if let Some(v) = option!(options, "retries", u32) {
        describe = describe.retries(v);
    }
    if let Some(v) = option!(options, "prompt", String) {
        describe = describe.prompt(v);
    }
    if let Some(v) = option!(options, "max_tokens", u32) {
        describe = describe.max_tokens(v);
    }
    if let Some(v) = option!(options, "temperature", f32) {
        describe = describe.temperature(v);
    }
    if let Some(v) = option!(options, "grammar", String) {
        let constraint: Constraint = v
            .parse()
            .map_err(|e| PyValueError::new_err(format!("option grammar: {e}")))?;
        describe = describe.constraint(constraint);
    }
    let config = builder
        .describe_options(describe)
        .build()
        .map_err(errors::config)?;
    Ok(Setup {
        config,
        gpus,
        slots,
        servers,
    })
}
