//! Free VRAM: the nvidia-smi probe ([`NvidiaSmi`]), its parsed rows ([`GpuRow`]), the choice of GPU
//! ([`select`], a pure function that honours `CUDA_VISIBLE_DEVICES`), and the wait for VRAM to come
//! back after a server stopped ([`wait_for_recovery`]).
//!
//! Nothing here knows the engine's configuration: the probe is a value holding only the program and
//! its timeout, and everything else is a function over its rows.

use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::str::FromStr;
use std::time::{Duration, Instant};

use crate::error::VramError;
use crate::process::SupervisedChild;
use crate::sync::lock;
use crate::text::truncate;

/// The least free VRAM (MiB) the engine starts with by default: LLaVA 1.5-7B Q4 plus its context.
pub const VRAM_MINIMUM_MIB: u64 = 6144;

/// The arguments the engine passes to nvidia-smi: the seed's `memory.free` query, with each GPU's
/// index and UUID so that a GPU can be named either way and `CUDA_VISIBLE_DEVICES` can be mapped.
pub const NVIDIA_SMI_QUERY: [&str; 2] = [
    "--query-gpu=index,uuid,memory.free",
    "--format=csv,noheader,nounits",
];

/// The largest free-memory value taken as real (16 TiB): anything above is a broken reading.
pub const MAX_PLAUSIBLE_MIB: u64 = 16 * 1024 * 1024;

/// How a GPU is named: an index or a UUID (`GPU-…`, as nvidia-smi and `CUDA_VISIBLE_DEVICES` write it).
///
/// An index counts the GPUs this process may use: with `CUDA_VISIBLE_DEVICES` set (by a scheduler,
/// say), index 0 is the first GPU it lists, as for every CUDA program; without it, the nvidia-smi index.
///
/// ```
/// use engine_core::GpuId;
/// assert_eq!("1".parse::<GpuId>().unwrap(), GpuId::Index(1));
/// assert_eq!("GPU-5eed".parse::<GpuId>().unwrap(), GpuId::Uuid("GPU-5eed".into()));
/// assert!("first".parse::<GpuId>().is_err());
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum GpuId {
    /// The n-th GPU this process may use.
    Index(u32),
    /// The GPU with this UUID.
    Uuid(String),
}

impl From<u32> for GpuId {
    fn from(index: u32) -> Self {
        GpuId::Index(index)
    }
}

impl FromStr for GpuId {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let text = text.trim();
        if let Ok(index) = text.parse::<u32>() {
            return Ok(GpuId::Index(index));
        }
        if text.starts_with("GPU-") || text.starts_with("MIG-") {
            return Ok(GpuId::Uuid(text.to_string()));
        }
        Err(format!(
            "{text:?} is not a GPU: give an index (0, 1, …) or a UUID (GPU-…, see `nvidia-smi -L`)"
        ))
    }
}

impl fmt::Display for GpuId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GpuId::Index(i) => write!(f, "{i}"),
            GpuId::Uuid(u) => f.write_str(u),
        }
    }
}

/// One GPU line of nvidia-smi's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuRow {
    /// The nvidia-smi index (the line's position when the line is unreadable).
    pub index: u32,
    /// The GPU's UUID (empty when the line is unreadable).
    pub uuid: String,
    /// Free memory in MiB, or why it could not be read.
    pub free_mib: Result<u64, String>,
}

/// A chosen GPU and its free VRAM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VramReading {
    /// The nvidia-smi index: the GPU lock is taken on it.
    pub gpu: u32,
    /// The UUID: the server is shown only this GPU (`CUDA_VISIBLE_DEVICES`).
    pub uuid: String,
    /// Free memory in MiB.
    pub free_mib: u64,
}

/// The nvidia-smi program and how long it may take: the VRAM probe.
///
/// ```no_run
/// use engine_core::vram::NvidiaSmi;
/// for row in NvidiaSmi::from_env().query()? {
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
    /// The seed's timeout for one query.
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

    /// A probe that runs `program`, killing it after `timeout`.
    pub fn new(program: impl Into<PathBuf>, timeout: Duration) -> Self {
        NvidiaSmi {
            program: program.into(),
            timeout,
        }
    }

    /// `$NVIDIA_SMI` if set, else `nvidia-smi` on PATH, with the seed's 10 s timeout.
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
    /// killed and reaped when the timeout ends.
    pub fn query(&self) -> Result<Vec<GpuRow>, VramError> {
        let program = &self.program;
        let started = Instant::now();
        let mut command = Command::new(program);
        command.args(NVIDIA_SMI_QUERY);
        let child = SupervisedChild::spawn(command, None, false).map_err(|source| {
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
        let Some(status) = child.wait_timeout(self.timeout) else {
            child.kill_and_wait(self.timeout);
            return Err(VramError::Timeout {
                program: program.clone(),
                timeout: self.timeout,
            });
        };
        // The drains finish right after the exit; a grandchild holding the pipe must not stall us.
        child.output().wait_closed(self.timeout);
        let stdout = lock(&child.output().stdout);
        tracing::debug!(elapsed = ?started.elapsed(), %status, "nvidia-smi answered");
        if !status.success() {
            let stderr = lock(&child.output().stderr).text();
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

/// Which VRAM probe to use (`--vram-probe`, [`crate::EngineConfigBuilder::vram_probe`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ProbeChoice {
    /// nvidia-smi when one is named (`NVIDIA_SMI`, or a configured program: tests and users who
    /// point at a particular one), else NVML when the driver's library loads, else nvidia-smi.
    #[default]
    Auto,
    /// NVML, or an error saying why it cannot load.
    Nvml,
    /// The nvidia-smi program (the seed's probe).
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
/// use engine_core::vram::{ProbeChoice, VramProbe};
/// let probe = VramProbe::from_env(ProbeChoice::Auto)?;
/// println!("{} sees {} GPU(s)", probe.name(), probe.query()?.len());
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
        VramProbe::choose(choice, NvidiaSmi::from_env(), named_nvidia_smi().is_some())
    }

    /// The probe for `choice`; `nvidia_smi` is the program to run (or fall back to), and
    /// `smi_named` says that it was named on purpose (which `Auto` then honours).
    pub fn choose(
        choice: ProbeChoice,
        nvidia_smi: NvidiaSmi,
        smi_named: bool,
    ) -> Result<VramProbe, VramError> {
        match choice {
            ProbeChoice::NvidiaSmi => Ok(nvidia_smi.into()),
            ProbeChoice::Nvml => crate::nvml::nvml().map(|_| VramProbe::Nvml),
            ProbeChoice::Auto if smi_named => Ok(nvidia_smi.into()),
            ProbeChoice::Auto => Ok(match crate::nvml::nvml() {
                Ok(_) => VramProbe::Nvml,
                Err(e) => {
                    tracing::debug!(error = %e, "NVML not available: using nvidia-smi");
                    nvidia_smi.into()
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

    /// One row per GPU: index (nvidia-smi's numbering), UUID, free MiB.
    pub fn query(&self) -> Result<Vec<GpuRow>, VramError> {
        match self {
            VramProbe::Nvml => crate::nvml::query(crate::nvml::nvml()?),
            VramProbe::NvidiaSmi(program) => program.query(),
        }
    }

    /// Queries, then [`select`]s `gpu` among the `visible` GPUs with at least `min_mib` free.
    pub fn read(
        &self,
        gpu: &GpuId,
        visible: &Visible,
        min_mib: u64,
    ) -> Result<VramReading, VramError> {
        select(&self.query()?, gpu, visible, min_mib)
    }
}

/// Parses one `memory.free` value (`nounits`): a plain decimal number of MiB.
///
/// ```
/// use engine_core::vram::parse_free_mib;
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

/// The GPUs this process may use: `CUDA_VISIBLE_DEVICES` as CUDA reads it, or all of them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Visible {
    /// `CUDA_VISIBLE_DEVICES` is not set: every GPU nvidia-smi lists, by nvidia-smi index.
    All,
    /// `CUDA_VISIBLE_DEVICES` lists these entries (indices or UUIDs, in order), up to the first one
    /// that is not a device, as CUDA stops there too.
    Listed(Vec<String>),
}

impl Visible {
    /// This process's `CUDA_VISIBLE_DEVICES`.
    pub fn from_env() -> Visible {
        Visible::parse(std::env::var("CUDA_VISIBLE_DEVICES").ok().as_deref())
    }

    /// Reads a `CUDA_VISIBLE_DEVICES` value (`None`: unset).
    ///
    /// ```
    /// use engine_core::vram::Visible;
    /// assert_eq!(Visible::parse(None), Visible::All);
    /// assert_eq!(Visible::parse(Some("2, GPU-ab,-1,3")), Visible::Listed(vec!["2".into(), "GPU-ab".into()]));
    /// ```
    pub fn parse(value: Option<&str>) -> Visible {
        let Some(value) = value else {
            return Visible::All;
        };
        let entries = value
            .split(',')
            .map(str::trim)
            .take_while(|e| {
                e.parse::<u32>().is_ok() || e.starts_with("GPU-") || e.starts_with("MIG-")
            })
            .map(String::from)
            .collect();
        Visible::Listed(entries)
    }
}

impl Visible {
    /// The rows this process may use, in CUDA's order: every row, or the listed ones up to the first
    /// entry that names no GPU (CUDA stops there too; an ambiguous UUID prefix names none).
    pub fn rows<'a>(&self, rows: &'a [GpuRow]) -> Vec<&'a GpuRow> {
        match self {
            Visible::All => rows.iter().collect(),
            Visible::Listed(entries) => entries
                .iter()
                .map_while(|entry| named(entry, rows))
                .collect(),
        }
    }
}

impl fmt::Display for Visible {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Visible::All => f.write_str("all GPUs"),
            Visible::Listed(list) if list.is_empty() => f.write_str(
                "no GPU (CUDA_VISIBLE_DEVICES hides them all: unset it, or list a GPU's index or UUID)",
            ),
            Visible::Listed(list) => write!(f, "CUDA_VISIBLE_DEVICES={}", list.join(",")),
        }
    }
}

/// The row a `CUDA_VISIBLE_DEVICES` entry or a configured UUID names: an index, or a UUID or a
/// prefix of one that only one GPU has (as CUDA accepts). MIG instances are not rows of their own.
fn named<'a>(entry: &str, rows: &'a [GpuRow]) -> Option<&'a GpuRow> {
    if let Ok(index) = entry.parse::<u32>() {
        return rows.iter().find(|r| r.index == index);
    }
    let mut matching = rows
        .iter()
        .filter(|r| !r.uuid.is_empty() && r.uuid.starts_with(entry));
    match (matching.next(), matching.next()) {
        (Some(row), None) => Some(row),
        _ => None,
    }
}

/// Chooses GPU `gpu` among nvidia-smi's `rows` as this process may see them (`visible`), and checks
/// that it has at least `min_mib` free. The engine and `cinecut-infer check` both decide with it.
///
/// ```
/// use engine_core::vram::{GpuRow, Visible, select};
/// use engine_core::GpuId;
/// let rows = vec![
///     GpuRow { index: 0, uuid: "GPU-a".into(), free_mib: Ok(500) },
///     GpuRow { index: 1, uuid: "GPU-b".into(), free_mib: Ok(70000) },
/// ];
/// assert_eq!(select(&rows, &GpuId::Index(1), &Visible::All, 6144).unwrap().uuid, "GPU-b");
/// // A scheduler gave this process GPU 1 only: index 0 is that GPU.
/// let given = Visible::parse(Some("1"));
/// assert_eq!(select(&rows, &GpuId::Index(0), &given, 6144).unwrap().gpu, 1);
/// assert!(select(&rows, &GpuId::Index(0), &Visible::All, 6144).is_err()); // only 500 MiB free
/// ```
pub fn select(
    rows: &[GpuRow],
    gpu: &GpuId,
    visible: &Visible,
    min_mib: u64,
) -> Result<VramReading, VramError> {
    let row = find(rows, gpu, visible)?;
    let free_mib = row
        .free_mib
        .clone()
        .map_err(|reason| VramError::Unparsable {
            text: format!("GPU {} in nvidia-smi's answer", row.index),
            reason,
        })?;
    if free_mib < min_mib {
        return Err(VramError::Insufficient {
            gpu: row.index,
            free_mib,
            min_mib,
        });
    }
    Ok(VramReading {
        gpu: row.index,
        uuid: row.uuid.clone(),
        free_mib,
    })
}

fn find<'a>(rows: &'a [GpuRow], gpu: &GpuId, visible: &Visible) -> Result<&'a GpuRow, VramError> {
    let no_such = || VramError::NoSuchGpu {
        gpu: gpu.clone(),
        count: rows.len(),
        visible: visible.clone(),
    };
    let usable = visible.rows(rows);
    match gpu {
        // Without CUDA_VISIBLE_DEVICES an index is nvidia-smi's; with it, a position in its list.
        GpuId::Index(i) => match visible {
            Visible::All => rows.iter().find(|r| r.index == *i),
            Visible::Listed(_) => usable.get(*i as usize).copied(),
        },
        GpuId::Uuid(uuid) => {
            named(uuid, rows).filter(|row| usable.iter().any(|u| u.index == row.index))
        }
    }
    .ok_or_else(no_such)
}

/// Free VRAM of GPU `gpu` in MiB (the seed's `check_vram_free_mib`).
pub fn check_vram_free_mib(probe: &VramProbe, gpu: impl Into<GpuId>) -> Result<u64, VramError> {
    probe
        .read(&gpu.into(), &Visible::from_env(), 0)
        .map(|r| r.free_mib)
}

/// Checks that GPU `gpu` has at least `min_mib` free (the seed's `assert_vram_available`).
pub fn assert_vram_available(
    probe: &VramProbe,
    gpu: impl Into<GpuId>,
    min_mib: u64,
) -> Result<VramReading, VramError> {
    probe.read(&gpu.into(), &Visible::from_env(), min_mib)
}

/// Whether free VRAM came back after the server stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum VramRecovery {
    /// Free VRAM was back within 5 % of the baseline after `waited`.
    Recovered {
        /// The last reading.
        free_mib: u64,
        /// How long it took after the server was reaped.
        waited: Duration,
    },
    /// It was still lower when the recovery timeout ran out.
    NotRecovered {
        /// The baseline: the reading taken under the lock, before start.
        before_mib: u64,
        /// The last reading.
        free_mib: u64,
    },
    /// nvidia-smi could not be read after the stop.
    Unknown(String),
    /// The wait is switched off (`vram_recovery_timeout` zero).
    Skipped,
}

/// Polls `probe` until GPU `before.gpu` has its free VRAM back within 5 % of `before`, or `timeout`
/// ends (zero: no wait).
pub fn wait_for_recovery(
    probe: &VramProbe,
    before: &VramReading,
    timeout: Duration,
) -> VramRecovery {
    if timeout.is_zero() {
        return VramRecovery::Skipped;
    }
    let started = Instant::now();
    let target = before.free_mib - before.free_mib / 20;
    let gpu = GpuId::Index(before.gpu);
    loop {
        let free_mib = match probe.read(&gpu, &Visible::All, 0) {
            Ok(reading) => reading.free_mib,
            Err(e) => return VramRecovery::Unknown(e.to_string()),
        };
        if free_mib >= target {
            return VramRecovery::Recovered {
                free_mib,
                waited: started.elapsed(),
            };
        }
        if started.elapsed() >= timeout {
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
        std::thread::sleep(POLL_INTERVAL.min(timeout));
    }
}

/// Polls `probe` until `gpu` has `min_mib` free, or `timeout` ends: for the moment right after
/// another model stopped, while its memory is still being freed. Errors other than too little
/// memory (nvidia-smi failing, no such GPU) end the wait at once.
pub fn wait_for_free(
    probe: &VramProbe,
    gpu: &GpuId,
    visible: &Visible,
    min_mib: u64,
    timeout: Duration,
) -> Result<VramReading, VramError> {
    let started = Instant::now();
    loop {
        match probe.read(gpu, visible, min_mib) {
            Err(VramError::Insufficient { gpu, free_mib, .. }) => {
                if started.elapsed() >= timeout {
                    return Err(crate::error::not_freed(
                        gpu,
                        free_mib,
                        min_mib,
                        started.elapsed(),
                    ));
                }
            }
            other => return other,
        }
        std::thread::sleep(POLL_INTERVAL.min(timeout.saturating_sub(started.elapsed())));
    }
}

/// How often the VRAM waits ask again: nvidia-smi itself takes about 25 ms.
const POLL_INTERVAL: Duration = Duration::from_millis(50);

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn row(index: u32, uuid: &str, free: u64) -> GpuRow {
        GpuRow {
            index,
            uuid: uuid.into(),
            free_mib: Ok(free),
        }
    }

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

    #[test]
    fn visible_devices_choose_and_renumber_the_gpus() {
        let rows = vec![
            row(0, "GPU-aa", 1),
            row(1, "GPU-bb", 2),
            row(2, "GPU-cc", 3),
        ];
        let pick = |gpu: GpuId, visible: Option<&str>| {
            select(&rows, &gpu, &Visible::parse(visible), 0).map(|r| r.gpu)
        };
        assert_eq!(pick(GpuId::Index(2), None).unwrap(), 2);
        assert_eq!(pick(GpuId::Uuid("GPU-bb".into()), None).unwrap(), 1);
        assert_eq!(pick(GpuId::Index(0), Some("2,0")).unwrap(), 2);
        assert_eq!(pick(GpuId::Index(1), Some("2,0")).unwrap(), 0);
        assert_eq!(pick(GpuId::Index(0), Some("GPU-b")).unwrap(), 1);
        assert_eq!(pick(GpuId::Uuid("GPU-cc".into()), Some("2")).unwrap(), 2);
        for (gpu, visible) in [
            (GpuId::Index(3), None),
            (GpuId::Index(1), Some("2")),
            (GpuId::Index(0), Some("")),
            (GpuId::Index(0), Some("-1")),
            (GpuId::Index(0), Some("7")),
            // CUDA stops at the first entry that names no GPU: 0 is not visible after 7.
            (GpuId::Index(1), Some("7,0")),
            (GpuId::Uuid("GPU-aa".into()), Some("2")),
            (GpuId::Uuid("GPU-zz".into()), None),
            // A prefix two GPUs share names neither.
            (GpuId::Uuid("GPU-".into()), None),
            (GpuId::Index(0), Some("GPU-")),
        ] {
            let err = pick(gpu.clone(), visible).unwrap_err();
            assert!(
                matches!(err, VramError::NoSuchGpu { .. }),
                "{gpu} {visible:?}: {err}"
            );
            assert!(err.to_string().contains(&format!("GPU {gpu} ")), "{err}");
        }
        let hidden = select(&rows, &GpuId::Index(0), &Visible::parse(Some("-1")), 0).unwrap_err();
        assert!(hidden.to_string().contains("hides them all"), "{hidden}");
    }

    #[test]
    fn too_little_vram_names_the_reading_and_the_minimum() {
        let err = select(
            &[row(0, "GPU-a", 4000)],
            &GpuId::Index(0),
            &Visible::All,
            6144,
        )
        .unwrap_err();
        assert!(
            err.to_string()
                .starts_with("Only 4000 MiB free VRAM, need at least 6144 MiB"),
            "{err}"
        );
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
