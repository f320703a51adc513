//! From the command line to the engine: the server flags as an `EngineConfig`, the model files'
//! defaults, the instruction, and the engine's messages in this CLI's words (each setting the
//! library names, as the flag that sets it).

use std::path::{Path, PathBuf};

use engine_core::config::Count;
use engine_core::request::check_sampling;
use engine_core::setting::{Setting, Zero, seconds};
use engine_core::{DescribeOptions, EngineConfig};

use crate::cli::{AskArgs, ServerArgs};

/// How this CLI names what the library calls `setting`.
pub fn flag(setting: Setting) -> String {
    match setting {
        Setting::Model => "--model",
        Setting::Mmproj => "--mmproj",
        Setting::Port => "--port",
        Setting::ServerBin => "--server-bin (or LLAMA_SERVER)",
        Setting::NvidiaSmi => "NVIDIA_SMI",
        Setting::VramProbe => "--vram-probe",
        Setting::MinVramMib => "--min-vram",
        Setting::Gpu => "--gpu",
        Setting::Gpus => "--gpus",
        Setting::CtxSize => "--ctx-size",
        Setting::GpuLayers => "--gpu-layers",
        Setting::Slots => "--slots",
        Setting::ServersPerGpu => "--servers-per-gpu",
        Setting::StartupTimeout => "--timeout",
        Setting::RequestTimeout => "--request-timeout",
        Setting::Args => "--server-arg",
        Setting::Threads => "--threads",
        Setting::Debug => "--debug",
        Setting::ImageTransport => "--image-transport",
        Setting::Prompt => "--prompt",
        Setting::Temperature => "--temperature",
        Setting::MaxTokens => "--max-tokens",
        Setting::Retries => "--retries",
        Setting::Grammar => "--grammar",
        // Settings this CLI leaves at the library's defaults.
        Setting::StopGrace => "the stop grace period",
        Setting::VramQueryTimeout => "the nvidia-smi timeout",
        Setting::HealthPollInterval => "the readiness poll",
        Setting::VramRecoveryTimeout => "the VRAM recovery wait",
        Setting::MaxFrameBytes => "the frame size limit",
    }
    .to_string()
}

/// An engine message in this CLI's words.
pub fn say(message: impl std::fmt::Display) -> String {
    Setting::reword(&message.to_string(), flag)
}

/// A number of seconds from `setting`'s flag.
fn duration(setting: Setting, value: f64) -> Result<std::time::Duration, String> {
    seconds(setting, value, Zero::Refused).map_err(say)
}

/// The engine's configuration for `model` (and `mmproj`, for a vision model) from the server flags,
/// every value checked by the engine's own rules. Errors are in this CLI's words.
pub fn config(
    model: &Path,
    mmproj: Option<&Path>,
    server: &ServerArgs,
    options: DescribeOptions,
) -> Result<EngineConfig, String> {
    let startup = duration(Setting::StartupTimeout, server.timeout)?;
    let request = duration(Setting::RequestTimeout, server.request_timeout)?;
    let mut builder = EngineConfig::text(model)
        .port(server.port)
        // auto: decided by the launch's plan, once the GPU's free VRAM is read.
        .slots(match server.slots {
            Count::Fixed(n) => n,
            Count::Auto => 1,
        })
        .ctx_size(server.ctx_size)
        .gpu_layers(server.gpu_layers)
        .min_vram_mib(server.min_vram)
        .gpu(server.gpu.clone())
        .vram_probe(server.vram_probe)
        .startup_timeout(startup)
        .debug(server.debug)
        .describe_options(options.request_timeout(request));
    if let Some(mmproj) = mmproj {
        builder = builder.mmproj(mmproj);
    }
    if let Some(bin) = &server.server_bin {
        builder = builder.server_bin(bin);
    }
    if let Some(threads) = server.threads {
        builder = builder.threads(threads);
    }
    builder = builder.image_transport(server.image_transport.into());
    for arg in &server.server_arg {
        builder = builder.arg(arg);
    }
    builder.build().map_err(say)
}

/// The sampling flags, checked by the engine's rule before anything starts.
pub fn sampling(ask: &AskArgs, default_max_tokens: u32) -> Result<(f32, u32), String> {
    let max_tokens = ask.max_tokens.unwrap_or(default_max_tokens);
    check_sampling(ask.temperature, max_tokens).map_err(say)?;
    Ok((ask.temperature, max_tokens))
}

/// A model file: the flag's value, else `file` in `$CINECUT_MODELS_DIR` (else `~/models`), which
/// must exist.
pub fn model_path(given: Option<PathBuf>, file: &str, flag: &str) -> Result<PathBuf, String> {
    if let Some(path) = given {
        return Ok(path);
    }
    let home = std::env::var_os("HOME").filter(|h| !h.is_empty());
    let (dir, why) = match std::env::var_os("CINECUT_MODELS_DIR").filter(|d| !d.is_empty()) {
        Some(dir) => (PathBuf::from(dir), "from CINECUT_MODELS_DIR"),
        None => match home {
            Some(home) => (
                PathBuf::from(home).join("models"),
                "~/models, as CINECUT_MODELS_DIR is unset or empty",
            ),
            None => (
                PathBuf::from("models"),
                "./models, as neither CINECUT_MODELS_DIR nor HOME is set",
            ),
        },
    };
    let path = dir.join(file);
    if path.is_file() {
        Ok(path)
    } else {
        Err(format!(
            "no {flag} given, and the default {} ({why}) does not exist — pass {flag}, or set \
             CINECUT_MODELS_DIR to the folder that holds {file}",
            path.display()
        ))
    }
}

/// The instruction: `--prompt`, the contents of `--prompt-file`, or `None`.
pub fn instruction(ask: &AskArgs) -> Result<Option<String>, String> {
    match (&ask.prompt, &ask.prompt_file) {
        (Some(text), _) => Ok(Some(text.clone())),
        (None, Some(file)) => std::fs::read_to_string(file)
            .map(|text| Some(text.trim_end().to_string()))
            .map_err(|e| format!("cannot read --prompt-file {}: {e}", file.display())),
        (None, None) => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_setting_has_a_word_and_no_backticks_survive() {
        for setting in Setting::ALL {
            assert!(!flag(setting).is_empty());
            let message = say(format!("use {setting}"));
            assert!(!message.contains('`'), "{message}");
        }
        assert_eq!(say("lower `min_vram_mib`"), "lower --min-vram");
    }
}
