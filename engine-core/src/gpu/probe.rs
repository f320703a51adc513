//! Reading free VRAM: the nvidia-smi program ([`NvidiaSmi`]) and its parser, NVML, and the choice
//! between them ([`VramProbe`]). Nothing here knows the engine's configuration: the probe is a value
//! holding only the program and its timeout.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::str::FromStr;
use std::time::{Duration, Instant};

use super::error::VramError;
use super::id::{GpuId, GpuRow, Visible, VramReading};
use super::select::select;
use crate::process::{Scope, SupervisedChild};
use crate::util::{truncate, unpoisoned};
use crate::wait::Wait;

/// The arguments the engine passes to nvidia-smi: CineCut's `memory.free` query, with each GPU's
/// index and UUID so that a GPU can be named either way and `CUDA_VISIBLE_DEVICES` can be mapped.
pub const NVIDIA_SMI_QUERY: [&str; 2] = [
    "--query-gpu=index,uuid,memory.free",
    "--format=csv,noheader,nounits",
];

/// The largest free-memory value taken as real (16 TiB): anything above is a broken reading.
pub const MAX_PLAUSIBLE_MIB: u64 = 16 * 1024 * 1024;

/// The nvidia-smi program and how long it may take: the VRAM probe.
///
/// ```no_run
/// use engine_core::Wait;
/// use engine_core::gpu::NvidiaSmi;
/// for row in NvidiaSmi::from_env().query(Wait::Forever)? {
///     println!("GPU {} ({}): {:?} MiB free", row.index, row.uuid, row.free_mib);
/// }
/// # Ok::<(), engine_core::VramError>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NvidiaSmi {
    program: PathBuf,
    timeout: Duration,
}

impl NvidiaSmi {
    /// CineCut's timeout for one query.
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

    /// A probe that runs `program`, killing it after `timeout`.
    pub fn new(program: impl Into<PathBuf>, timeout: Duration) -> Self {
        NvidiaSmi {
            program: program.into(),
            timeout,
        }
    }

    /// `$NVIDIA_SMI` if set, else `nvidia-smi` on PATH, with CineCut's 10 s timeout.
    pub fn from_env() -> Self {
        let program = named_nvidia_smi().unwrap_or_else(|| "nvidia-smi".into());
        NvidiaSmi::new(program, Self::DEFAULT_TIMEOUT)
    }

    /// The program run.
    pub fn program(&self) -> &Path {
        &self.program
    }

    /// How long one query may take.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Runs nvidia-smi with [`NVIDIA_SMI_QUERY`] and returns one row per GPU. A hung nvidia-smi is
    /// killed and reaped when its timeout ends, or as soon as `wait` does
    /// ([`VramError::Cancelled`]).
    pub fn query(&self, wait: Wait) -> Result<Vec<GpuRow>, VramError> {
        let program = &self.program;
        let started = Instant::now();
        let mut command = Command::new(program);
        command.args(NVIDIA_SMI_QUERY);
        let child = SupervisedChild::spawn(command, None, Scope::Leader).map_err(|source| {
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
        let deadline = wait.deadline();
        let give_up = started + self.timeout;
        let status = loop {
            let left = give_up.saturating_duration_since(Instant::now());
            let Some(slice) = deadline.slice(left) else {
                child.kill_and_wait(self.timeout);
                return Err(if deadline.is_flag() {
                    VramError::Cancelled
                } else {
                    VramError::Timeout {
                        program: program.clone(),
                        timeout: started.elapsed(),
                    }
                });
            };
            if let Some(status) = child.wait_timeout(slice) {
                break status;
            }
            if Instant::now() >= give_up {
                child.kill_and_wait(self.timeout);
                return Err(VramError::Timeout {
                    program: program.clone(),
                    timeout: self.timeout,
                });
            }
        };
        // The drains finish right after the exit; a grandchild holding the pipe must not stall us.
        child.output().wait_closed(self.timeout);
        let stdout = unpoisoned(&child.output().stdout);
        tracing::debug!(elapsed = ?started.elapsed(), %status, "nvidia-smi answered");
        if !status.success() {
            let stderr = unpoisoned(&child.output().stderr).text();
            let message = format!("{} {}", stdout.text().trim(), stderr.trim());
            return Err(VramError::Failed {
                program: program.clone(),
                status,
                message: truncate(message.trim(), 500),
            });
        }
        if stdout.truncated() {
            return Err(VramError::Unparsable {
                text: truncate(&stdout.text(), 200),
                reason: "output larger than 64 KiB".into(),
            });
        }
        parse_rows(&stdout.text())
    }
}

/// Which VRAM probe to use ([`crate::config::EngineConfigBuilder::vram_probe`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ProbeChoice {
    /// nvidia-smi when one is named (`NVIDIA_SMI`, or a configured program: tests and users who
    /// point at a particular one), else NVML when the driver's library loads, else nvidia-smi.
    #[default]
    Auto,
    /// NVML, or an error saying why it cannot load.
    Nvml,
    /// The nvidia-smi program (CineCut's original probe).
    NvidiaSmi,
}

impl FromStr for ProbeChoice {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "auto" => Ok(ProbeChoice::Auto),
            "nvml" => Ok(ProbeChoice::Nvml),
            "nvidia-smi" => Ok(ProbeChoice::NvidiaSmi),
            other => Err(format!(
                "unknown VRAM probe {other:?}: choose auto, nvml or nvidia-smi"
            )),
        }
    }
}

/// Where free VRAM is read from: NVML in this process (about 9 µs a query once loaded), or the
/// nvidia-smi program (about 25 ms a query: a process start). Both give the same rows.
///
/// ```no_run
/// use engine_core::Wait;
/// use engine_core::gpu::{ProbeChoice, VramProbe};
/// let probe = VramProbe::from_env(ProbeChoice::Auto)?;
/// println!("{} sees {} GPU(s)", probe.name(), probe.query(Wait::Forever)?.len());
/// # Ok::<(), engine_core::VramError>(())
/// ```
#[derive(Debug, Clone)]
pub enum VramProbe {
    /// NVML, loaded once per process.
    Nvml,
    /// The nvidia-smi program.
    NvidiaSmi(NvidiaSmi),
}

impl From<NvidiaSmi> for VramProbe {
    fn from(program: NvidiaSmi) -> Self {
        VramProbe::NvidiaSmi(program)
    }
}

/// The nvidia-smi that `$NVIDIA_SMI` names, if it names one.
pub(crate) fn named_nvidia_smi() -> Option<PathBuf> {
    std::env::var_os("NVIDIA_SMI")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

impl VramProbe {
    /// The probe for `choice` from the environment alone: [`NvidiaSmi::from_env`], which `Auto`
    /// prefers to NVML when `$NVIDIA_SMI` names it.
    pub fn from_env(choice: ProbeChoice) -> Result<VramProbe, VramError> {
        let named = named_nvidia_smi().map(|p| NvidiaSmi::new(p, NvidiaSmi::DEFAULT_TIMEOUT));
        VramProbe::choose(choice, named, NvidiaSmi::DEFAULT_TIMEOUT)
    }

    /// The probe for `choice`. `named` is an nvidia-smi named on purpose (a setting, or
    /// `$NVIDIA_SMI`), which `Auto` then prefers to NVML; without one, nvidia-smi is `nvidia-smi` on
    /// PATH with `timeout`.
    pub fn choose(
        choice: ProbeChoice,
        named: Option<NvidiaSmi>,
        timeout: Duration,
    ) -> Result<VramProbe, VramError> {
        let program = |named: Option<NvidiaSmi>| {
            VramProbe::NvidiaSmi(named.unwrap_or_else(|| NvidiaSmi::new("nvidia-smi", timeout)))
        };
        match (choice, named) {
            (ProbeChoice::NvidiaSmi, named) => Ok(program(named)),
            (ProbeChoice::Nvml, _) => super::nvml::nvml().map(|_| VramProbe::Nvml),
            (ProbeChoice::Auto, Some(named)) => Ok(program(Some(named))),
            (ProbeChoice::Auto, None) => Ok(match super::nvml::nvml() {
                Ok(_) => VramProbe::Nvml,
                Err(e) => {
                    tracing::debug!(error = %e, "NVML not available: using nvidia-smi");
                    program(None)
                }
            }),
        }
    }

    /// `NVML`, or the nvidia-smi program's path.
    pub fn name(&self) -> String {
        match self {
            VramProbe::Nvml => "NVML".into(),
            VramProbe::NvidiaSmi(program) => program.program().display().to_string(),
        }
    }

    /// One row per GPU: index (nvidia-smi's numbering), UUID, free MiB. `wait` can abandon a
    /// slow nvidia-smi (NVML answers in microseconds).
    pub fn query(&self, wait: Wait) -> Result<Vec<GpuRow>, VramError> {
        match self {
            VramProbe::Nvml => super::nvml::query(super::nvml::nvml()?),
            VramProbe::NvidiaSmi(program) => program.query(wait),
        }
    }

    /// Queries, then [`select`]s `gpu` among the `visible` GPUs with at least `min_mib` free.
    pub fn read(
        &self,
        gpu: &GpuId,
        visible: &Visible,
        min_mib: u64,
        wait: Wait,
    ) -> Result<VramReading, VramError> {
        select(&self.query(wait)?, gpu, visible, min_mib)
    }
}

/// Parses one `memory.free` value (`nounits`): a plain decimal number of MiB.
///
/// ```
/// use engine_core::gpu::parse_free_mib;
/// assert_eq!(parse_free_mib(" 24564 "), Ok(24564));
/// assert!(parse_free_mib("[N/A]").unwrap_err().contains("N/A"));
/// ```
pub fn parse_free_mib(value: &str) -> Result<u64, String> {
    let value = value.trim();
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

/// Parses nvidia-smi's answer to [`NVIDIA_SMI_QUERY`]: one `index, uuid, free` line per GPU, in index
/// order. Blank lines are skipped; a line of another shape is kept as a row whose `free_mib` says
/// what is wrong (it matters only if that GPU is chosen); no GPU line at all is an error.
pub fn parse_rows(text: &str) -> Result<Vec<GpuRow>, VramError> {
    let rows: Vec<GpuRow> = text
        .lines()
        .filter(|line| !line.trim().is_empty())
        .enumerate()
        .map(|(position, line)| parse_row(position as u32, line))
        .collect();
    if rows.is_empty() {
        return Err(VramError::Unparsable {
            text: truncate(text, 200),
            reason: "nvidia-smi printed no GPU line".into(),
        });
    }
    Ok(rows)
}

fn parse_row(position: u32, line: &str) -> GpuRow {
    let fields: Vec<&str> = line.split(',').map(str::trim).collect();
    match fields[..] {
        [index, uuid, free] => GpuRow {
            index: index.parse().unwrap_or(position),
            uuid: uuid.to_string(),
            free_mib: parse_free_mib(free),
        },
        _ => GpuRow {
            index: position,
            uuid: String::new(),
            free_mib: Err(format!(
                "line {:?} is not `index, uuid, memory.free`",
                truncate(line.trim(), 120)
            )),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::select::tests::row;
    use proptest::prelude::*;

    #[test]
    fn each_failure_value_has_its_reason() {
        for (value, needle) in [
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
            let err = parse_free_mib(value).unwrap_err();
            assert!(err.contains(needle), "{value:?} gave {err:?}");
        }
    }

    #[test]
    fn several_gpus_give_one_row_each_in_order() {
        let rows = parse_rows("0, GPU-a, 80000\n1, GPU-b, [N/A]\n2, GPU-c,  12 \n").unwrap();
        assert_eq!(rows.len(), 3);
        assert_eq!(rows[0], row(0, "GPU-a", 80000));
        assert!(rows[1].free_mib.is_err());
        assert_eq!(rows[2], row(2, "GPU-c", 12));
    }

    #[test]
    fn a_line_of_another_shape_is_a_row_that_says_so() {
        let rows = parse_rows("Segmentation fault\n").unwrap();
        assert!(
            rows[0]
                .free_mib
                .as_ref()
                .unwrap_err()
                .contains("Segmentation fault")
        );
        for text in ["", "\n", "  \n \n"] {
            assert!(matches!(
                parse_rows(text),
                Err(VramError::Unparsable { .. })
            ));
        }
    }

    proptest! {
        #[test]
        fn parser_never_panics(text in any::<String>()) {
            let _ = parse_rows(&text);
        }

        #[test]
        fn every_valid_line_is_accepted(values in proptest::collection::vec(0..=MAX_PLAUSIBLE_MIB, 1..9),
                                        pad in "[ \t]{0,3}", crlf in any::<bool>()) {
            let eol = if crlf { "\r\n" } else { "\n" };
            let text: String = values
                .iter()
                .enumerate()
                .map(|(i, v)| format!("{pad}{i},{pad}GPU-{i}{pad},{pad}{v}{pad}{eol}"))
                .collect();
            let rows = parse_rows(&text).unwrap();
            let expected: Vec<GpuRow> = values
                .iter()
                .enumerate()
                .map(|(i, v)| row(i as u32, &format!("GPU-{i}"), *v))
                .collect();
            prop_assert_eq!(rows, expected);
        }
    }
}
