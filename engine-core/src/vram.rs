//! The free-VRAM pre-check: ask nvidia-smi, parse one line per GPU, select the configured GPU.

use std::process::Command;
use std::time::{Duration, Instant};

use crate::config::EngineConfig;
use crate::error::{VramError, truncate};
use crate::process::{SupervisedChild, describe_status};

/// The least free VRAM (MiB) the engine starts with by default: LLaVA 1.5-7B Q4 plus its context.
pub const VRAM_MINIMUM_MIB: u64 = 6144;

/// The arguments the engine passes to nvidia-smi (the seed's query).
pub const NVIDIA_SMI_QUERY: [&str; 2] =
    ["--query-gpu=memory.free", "--format=csv,noheader,nounits"];

/// The largest free-memory value taken as real (16 TiB): anything above is a broken reading.
pub const MAX_PLAUSIBLE_MIB: u64 = 16 * 1024 * 1024;

/// A VRAM reading of one GPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VramReading {
    /// The GPU index (nvidia-smi order).
    pub gpu: u32,
    /// Free memory in MiB.
    pub free_mib: u64,
}

/// Parses one line of `memory.free` output (`nounits`): a plain decimal number of MiB.
///
/// ```
/// use engine_core::parse_free_mib_line;
/// assert_eq!(parse_free_mib_line(" 24564 "), Ok(24564));
/// assert!(parse_free_mib_line("[N/A]").unwrap_err().contains("N/A"));
/// ```
pub fn parse_free_mib_line(line: &str) -> Result<u64, String> {
    let value = line.trim();
    if value.is_empty() {
        return Err("empty value".into());
    }
    if value.starts_with('[') {
        let hint = match value {
            "[N/A]" => "this GPU does not report its memory (MIG or vGPU?)",
            "[Insufficient Permissions]" => "run as a user allowed to query the GPU",
            "[Not Supported]" => "this GPU does not support the memory query",
            _ => "nvidia-smi reported a condition instead of a number",
        };
        return Err(format!("nvidia-smi printed {value}: {hint}"));
    }
    if let Some(rest) = value.strip_prefix('-')
        && !rest.is_empty()
        && rest.bytes().all(|b| b.is_ascii_digit())
    {
        return Err(format!("negative value {value}"));
    }
    if !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("{value:?} is not a whole number of MiB"));
    }
    match value.parse::<u64>() {
        Ok(mib) if mib <= MAX_PLAUSIBLE_MIB => Ok(mib),
        _ => Err(format!(
            "{value} MiB is larger than any GPU ({MAX_PLAUSIBLE_MIB} MiB at most)"
        )),
    }
}

/// Parses nvidia-smi's whole output: one result per GPU line, in index order. Blank lines are
/// skipped; output with no GPU line at all is an error.
pub fn parse_free_mib(text: &str) -> Result<Vec<Result<u64, String>>, VramError> {
    let per_gpu: Vec<Result<u64, String>> = text
        .lines()
        .filter(|line| !line.trim().is_empty())
        .map(parse_free_mib_line)
        .collect();
    if per_gpu.is_empty() {
        return Err(VramError::Unparsable {
            text: truncate(text, 200),
            reason: "nvidia-smi printed no GPU line".into(),
        });
    }
    Ok(per_gpu)
}

/// Runs nvidia-smi (the configured program) with the seed's query and the configured timeout, and
/// returns one result per GPU. A hung nvidia-smi is killed and reaped.
pub fn query_free_mib(config: &EngineConfig) -> Result<Vec<Result<u64, String>>, VramError> {
    let program = config.resolved_nvidia_smi();
    let started = Instant::now();
    let mut command = Command::new(&program);
    command.args(NVIDIA_SMI_QUERY);
    let child = SupervisedChild::spawn(command, None).map_err(|source| {
        if source.kind() == std::io::ErrorKind::NotFound {
            VramError::NotInstalled {
                program: program.clone(),
            }
        } else {
            VramError::Spawn {
                program: program.clone(),
                source,
            }
        }
    })?;
    let Some(status) = child.wait_timeout(config.vram_query_timeout) else {
        child.kill_and_wait();
        return Err(VramError::Timeout {
            program,
            timeout: config.vram_query_timeout,
        });
    };
    // The drains finish right after the exit; a grandchild holding the pipe must not stall us.
    child.output().wait_closed(config.vram_query_timeout);
    let stdout = crate::process::lock(&child.output().stdout);
    tracing::debug!(elapsed = ?started.elapsed(), %status, "nvidia-smi answered");
    if !status.success() {
        let stderr = crate::process::lock(&child.output().stderr).text();
        let message = format!("{} {}", stdout.text().trim(), stderr.trim());
        return Err(VramError::Failed {
            program,
            status: describe_status(status),
            message: truncate(message.trim(), 500),
        });
    }
    if stdout.truncated() {
        return Err(VramError::Unparsable {
            text: truncate(&stdout.text(), 200),
            reason: "output larger than 64 KiB".into(),
        });
    }
    parse_free_mib(&stdout.text())
}

/// Free VRAM of the configured GPU, in MiB (the seed's `check_vram_free_mib`).
pub fn check_vram_free_mib(config: &EngineConfig) -> Result<u64, VramError> {
    let per_gpu = query_free_mib(config)?;
    let count = per_gpu.len();
    match per_gpu.into_iter().nth(config.gpu as usize) {
        None => Err(VramError::NoSuchGpu {
            gpu: config.gpu,
            count,
        }),
        Some(Ok(mib)) => Ok(mib),
        Some(Err(reason)) => Err(VramError::Unparsable {
            text: format!("line {} of nvidia-smi output", config.gpu + 1),
            reason,
        }),
    }
}

/// Checks that the configured GPU has at least the configured minimum free (the seed's
/// `assert_vram_available`), returning the reading.
pub fn assert_vram_available(config: &EngineConfig) -> Result<VramReading, VramError> {
    let free_mib = check_vram_free_mib(config)?;
    if free_mib < config.min_vram_mib {
        return Err(VramError::Insufficient {
            gpu: config.gpu,
            free_mib,
            min_mib: config.min_vram_mib,
        });
    }
    Ok(VramReading {
        gpu: config.gpu,
        free_mib,
    })
}

/// Whether free VRAM came back after the server stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum VramRecovery {
    /// Free VRAM was back within 5 % of the reading before start after `waited`.
    Recovered {
        /// The last reading.
        free_mib: u64,
        /// How long it took after the server was reaped.
        waited: Duration,
    },
    /// It was still lower when the recovery timeout ran out.
    NotRecovered {
        /// The reading before start.
        before_mib: u64,
        /// The last reading.
        free_mib: u64,
    },
    /// nvidia-smi could not be read after the stop.
    Unknown(String),
    /// The wait is switched off (`vram_recovery_timeout` zero).
    Skipped,
}

/// Polls free VRAM until it is back within 5 % of `before` or `config.vram_recovery_timeout` ends.
pub(crate) fn wait_for_recovery(config: &EngineConfig, before: VramReading) -> VramRecovery {
    if config.vram_recovery_timeout.is_zero() {
        return VramRecovery::Skipped;
    }
    let started = Instant::now();
    let target = before.free_mib - before.free_mib / 20;
    loop {
        let free_mib = match check_vram_free_mib(config) {
            Ok(free) => free,
            Err(e) => return VramRecovery::Unknown(e.to_string()),
        };
        if free_mib >= target {
            return VramRecovery::Recovered {
                free_mib,
                waited: started.elapsed(),
            };
        }
        if started.elapsed() >= config.vram_recovery_timeout {
            tracing::warn!(
                gpu = before.gpu,
                before_mib = before.free_mib,
                free_mib,
                "free VRAM did not come back after llama-server stopped"
            );
            return VramRecovery::NotRecovered {
                before_mib: before.free_mib,
                free_mib,
            };
        }
        std::thread::sleep(Duration::from_millis(50).min(config.vram_recovery_timeout));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn each_failure_line_has_its_reason() {
        for (line, needle) in [
            ("[N/A]", "MIG"),
            ("[Insufficient Permissions]", "allowed"),
            ("", "empty"),
            ("   ", "empty"),
            ("-5", "negative"),
            ("99999999999999999999999", "larger"),
            ("17179869185", "larger"),
            ("12.5", "whole number"),
            ("abc", "whole number"),
        ] {
            let err = parse_free_mib_line(line).unwrap_err();
            assert!(err.contains(needle), "{line:?} gave {err:?}");
        }
    }

    #[test]
    fn several_gpus_give_one_value_each_in_order() {
        let per_gpu = parse_free_mib("80000\n[N/A]\n 12 \n").unwrap();
        assert_eq!(per_gpu.len(), 3);
        assert_eq!(per_gpu[0], Ok(80000));
        assert!(per_gpu[1].is_err());
        assert_eq!(per_gpu[2], Ok(12));
    }

    #[test]
    fn no_gpu_line_is_an_error() {
        for text in ["", "\n", "  \n \n"] {
            assert!(matches!(
                parse_free_mib(text),
                Err(VramError::Unparsable { .. })
            ));
        }
    }

    proptest! {
        #[test]
        fn parser_never_panics(text in any::<String>()) {
            let _ = parse_free_mib(&text);
        }

        #[test]
        fn parser_never_panics_on_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = parse_free_mib(&String::from_utf8_lossy(&bytes));
        }

        #[test]
        fn every_valid_line_is_accepted(values in proptest::collection::vec(0..=MAX_PLAUSIBLE_MIB, 1..9),
                                        pad in "[ \t]{0,3}", crlf in any::<bool>()) {
            let eol = if crlf { "\r\n" } else { "\n" };
            let text: String = values.iter().map(|v| format!("{pad}{v}{pad}{eol}")).collect();
            let parsed = parse_free_mib(&text).unwrap();
            let expected: Vec<Result<u64, String>> = values.iter().map(|v| Ok(*v)).collect();
            prop_assert_eq!(parsed, expected);
        }
    }
}
