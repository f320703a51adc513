//! The engine's settings by name ([`Setting`]), the error that names one ([`ConfigError`]), and the
//! rules every front end shares for the values it reads (durations).
//!
//! The library's messages name a setting by its builder name in backticks (`` `min_vram_mib` ``);
//! a front end words it in its own terms with [`Setting::reword`]: the CLI as a flag, Python as a
//! keyword argument.

use std::fmt;
use std::time::Duration;

/// A setting of [`crate::EngineConfig`] (or of its [`crate::DescribeOptions`]), by the name of its
/// builder method. Errors that a setting can fix name it, so that each front end can say how.
///
/// Deliberately not `#[non_exhaustive]`: a front end matches it exhaustively, so a new setting
/// cannot go without a word in the CLI and in Python.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Setting {
    /// The language model GGUF.
    Model,
    /// The vision projector GGUF.
    Mmproj,
    /// The server's port.
    Port,
    /// The llama-server program.
    ServerBin,
    /// The nvidia-smi program.
    NvidiaSmi,
    /// Which VRAM probe reads free memory.
    VramProbe,
    /// The least free VRAM the engine starts with.
    MinVramMib,
    /// Which GPU.
    Gpu,
    /// Which GPUs, for a launch over several.
    Gpus,
    /// Context per slot.
    CtxSize,
    /// Layers on the GPU.
    GpuLayers,
    /// Parallel slots (on each GPU).
    Slots,
    /// Servers on each GPU.
    ServersPerGpu,
    /// How long the server may take to become ready.
    StartupTimeout,
    /// SIGTERM to SIGKILL.
    StopGrace,
    /// How long one nvidia-smi query may take.
    VramQueryTimeout,
    /// The fallback readiness poll.
    HealthPollInterval,
    /// How long a stop waits for VRAM to come back.
    VramRecoveryTimeout,
    /// Extra server arguments.
    Args,
    /// CPU threads of the server.
    Threads,
    /// The server's whole log in a file.
    Debug,
    /// How images reach the server.
    ImageTransport,
    /// The instruction sent with every frame.
    Prompt,
    /// Sampling temperature.
    Temperature,
    /// The bound on generated tokens.
    MaxTokens,
    /// Further tries after an invalid answer.
    Retries,
    /// How a request holds the answer to its schema.
    Grammar,
    /// The time limit of one request.
    RequestTimeout,
    /// The largest image sent.
    MaxFrameBytes,
}

impl Setting {
    /// Every setting, in the builder's order.
    pub const ALL: [Setting; 29] = [
        Setting::Model,
        Setting::Mmproj,
        Setting::Port,
        Setting::ServerBin,
        Setting::NvidiaSmi,
        Setting::VramProbe,
        Setting::MinVramMib,
        Setting::Gpu,
        Setting::Gpus,
        Setting::CtxSize,
        Setting::GpuLayers,
        Setting::Slots,
        Setting::ServersPerGpu,
        Setting::StartupTimeout,
        Setting::StopGrace,
        Setting::VramQueryTimeout,
        Setting::HealthPollInterval,
        Setting::VramRecoveryTimeout,
        Setting::Args,
        Setting::Threads,
        Setting::Debug,
        Setting::ImageTransport,
        Setting::Prompt,
        Setting::Temperature,
        Setting::MaxTokens,
        Setting::Retries,
        Setting::Grammar,
        Setting::RequestTimeout,
        Setting::MaxFrameBytes,
    ];

    /// The builder method's name (`min_vram_mib`).
    pub fn name(self) -> &'static str {
        match self {
            Setting::Model => "model",
            Setting::Mmproj => "mmproj",
            Setting::Port => "port",
            Setting::ServerBin => "server_bin",
            Setting::NvidiaSmi => "nvidia_smi",
            Setting::VramProbe => "vram_probe",
            Setting::MinVramMib => "min_vram_mib",
            Setting::Gpu => "gpu",
            Setting::Gpus => "gpus",
            Setting::CtxSize => "ctx_size",
            Setting::GpuLayers => "gpu_layers",
            Setting::Slots => "slots",
            Setting::ServersPerGpu => "servers_per_gpu",
            Setting::StartupTimeout => "startup_timeout",
            Setting::StopGrace => "stop_grace",
            Setting::VramQueryTimeout => "vram_query_timeout",
            Setting::HealthPollInterval => "health_poll_interval",
            Setting::VramRecoveryTimeout => "vram_recovery_timeout",
            Setting::Args => "arg",
            Setting::Threads => "threads",
            Setting::Debug => "debug",
            Setting::ImageTransport => "image_transport",
            Setting::Prompt => "prompt",
            Setting::Temperature => "temperature",
            Setting::MaxTokens => "max_tokens",
            Setting::Retries => "retries",
            Setting::Grammar => "grammar",
            Setting::RequestTimeout => "request_timeout",
            Setting::MaxFrameBytes => "max_frame_bytes",
        }
    }

    /// `message` with every setting it names (`` `min_vram_mib` ``) in a front end's own words.
    ///
    /// ```
    /// use engine_core::setting::Setting;
    /// let cli = |s: Setting| match s {
    ///     Setting::MinVramMib => "--min-vram".to_string(),
    ///     other => format!("--{}", other.name().replace('_', "-")),
    /// };
    /// assert_eq!(Setting::reword("lower `min_vram_mib`", cli), "lower --min-vram");
    /// ```
    pub fn reword(message: &str, word: impl Fn(Setting) -> String) -> String {
        let mut out = message.to_string();
        for setting in Setting::ALL {
            let named = format!("`{}`", setting.name());
            if out.contains(&named) {
                out = out.replace(&named, &word(setting));
            }
        }
        out
    }
}

impl fmt::Display for Setting {
    /// The name in backticks, as messages write it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "`{}`", self.name())
    }
}

/// A configuration value the engine cannot run with: which setting, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid engine configuration: {setting} {reason}")]
#[non_exhaustive]
pub struct ConfigError {
    /// The setting to change.
    pub setting: Setting,
    /// What is wrong with its value, and what it must be.
    pub reason: String,
}

impl ConfigError {
    /// `setting` is wrong: `reason` says how.
    pub fn new(setting: Setting, reason: impl Into<String>) -> Self {
        ConfigError {
            setting,
            reason: reason.into(),
        }
    }
}

/// The longest duration a setting takes (a year): anything longer is a typo, and would overflow
/// `Instant`. Every front end holds its options to it through [`seconds`].
pub const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);

/// Whether zero is a meaningful value of a duration (a wait that is switched off).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Zero {
    /// Zero switches the wait off.
    Allowed,
    /// The value must be more than zero.
    Refused,
}

/// `value` seconds (as a front end reads them: a float) as a duration for `setting`: finite, at
/// most [`MAX_DURATION`], above zero unless `zero` allows it.
///
/// ```
/// use engine_core::setting::{Setting, Zero, seconds};
/// assert_eq!(seconds(Setting::RequestTimeout, 1.5, Zero::Refused).unwrap().as_millis(), 1500);
/// assert!(seconds(Setting::RequestTimeout, f64::NAN, Zero::Refused).is_err());
/// assert!(seconds(Setting::StopGrace, 0.0, Zero::Allowed).is_ok());
/// ```
pub fn seconds(setting: Setting, value: f64, zero: Zero) -> Result<Duration, ConfigError> {
    duration_of(value, zero).map_err(|reason| ConfigError::new(setting, reason))
}

/// The rule behind [`seconds`], for a value that is no setting (a call's own `timeout_s`): the
/// duration, or why not, worded to follow the value's name (`is nan s: it must be ...`).
pub fn duration_of(value: f64, zero: Zero) -> Result<Duration, String> {
    let max = MAX_DURATION.as_secs_f64();
    let ok = value.is_finite()
        && value <= max
        && (value > 0.0 || (zero == Zero::Allowed && value == 0.0));
    if !ok {
        let least = match zero {
            Zero::Allowed => "zero or more",
            Zero::Refused => "more than zero",
        };
        return Err(format!(
            "is {value} s: it must be a number of seconds, {least} and at most {max} (a year)"
        ));
    }
    Ok(Duration::from_secs_f64(value))
}

/// Checks a duration already made (by the library's own builder): at most [`MAX_DURATION`], and
/// more than zero unless `zero` allows it.
pub(crate) fn check_duration(
    setting: Setting,
    value: Duration,
    zero: Zero,
) -> Result<(), ConfigError> {
    if value.is_zero() && zero == Zero::Refused {
        return Err(ConfigError::new(
            setting,
            "is zero: it must be more than zero",
        ));
    }
    if value > MAX_DURATION {
        return Err(ConfigError::new(
            setting,
            format!(
                "is {value:?}: more than a year is surely a mistake (at most {MAX_DURATION:?})"
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_setting_is_listed_once_and_reworded() {
        let names: std::collections::HashSet<&str> =
            Setting::ALL.iter().map(|s| s.name()).collect();
        assert_eq!(names.len(), Setting::ALL.len());
        let all: String = Setting::ALL.iter().map(|s| format!("{s} ")).collect();
        let reworded = Setting::reword(&all, |s| format!("<{}>", s.name()));
        assert!(!reworded.contains('`'), "{reworded}");
    }
}
