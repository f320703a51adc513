//! How a GPU is named ([`GpuId`]), which GPUs this process may use ([`Visible`]), and what a probe
//! reads of each ([`GpuRow`], [`VramReading`]).

use std::fmt;
use std::str::FromStr;

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
/// // As a person names it: "GPU 1", or the UUID (which says "GPU-" already).
/// assert_eq!(GpuId::Index(1).to_string(), "GPU 1");
/// assert_eq!(GpuId::Uuid("GPU-5eed".into()).to_string(), "GPU-5eed");
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
            GpuId::Index(i) => write!(f, "GPU {i}"),
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
    /// use engine_core::gpu::Visible;
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
    /// entry that names no GPU (CUDA stops there too; an ambiguous UUID prefix names none). A GPU
    /// listed twice (`1,1`, or its index and its UUID) is one GPU, where it was first listed.
    pub fn rows<'a>(&self, rows: &'a [GpuRow]) -> Vec<&'a GpuRow> {
        match self {
            Visible::All => rows.iter().collect(),
            Visible::Listed(entries) => {
                let mut usable: Vec<&GpuRow> = Vec::new();
                for row in entries.iter().map_while(|entry| named(entry, rows)) {
                    if !usable.iter().any(|seen| seen.index == row.index) {
                        usable.push(row);
                    }
                }
                usable
            }
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
pub(crate) fn named<'a>(entry: &str, rows: &'a [GpuRow]) -> Option<&'a GpuRow> {
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
