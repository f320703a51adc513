//! Reading free VRAM through NVML (`libnvidia-ml.so.1`, loaded at run time by `nvml-wrapper`, so
//! nothing links against it): about 9 µs a query after a ~19 ms load, against ~25 ms for each
//! nvidia-smi process. Loaded once per process.

use std::ffi::OsStr;
use std::sync::OnceLock;

use nvml_wrapper::Nvml;
use nvml_wrapper::error::NvmlError;

use super::error::VramError;
use super::id::GpuRow;

/// The driver's library: the versioned name, which every driver install has (the unversioned
/// `libnvidia-ml.so` comes only with development packages).
const LIBRARY: &str = "libnvidia-ml.so.1";

static NVML: OnceLock<Result<Nvml, String>> = OnceLock::new();

/// The process's NVML, loaded on first use; the error says why it could not be.
pub(crate) fn nvml() -> Result<&'static Nvml, VramError> {
    NVML.get_or_init(|| {
        Nvml::builder()
            .lib_path(OsStr::new(LIBRARY))
            .init()
            .map_err(|e| match e {
                NvmlError::LibloadingError(e) => format!("{LIBRARY} could not be loaded: {e}"),
                other => other.to_string(),
            })
    })
    .as_ref()
    .map_err(|reason| VramError::NvmlUnavailable {
        reason: reason.clone(),
    })
}

/// Every GPU's index, UUID and free memory, as nvidia-smi's query gives them. A GPU whose memory
/// cannot be read (MIG, a fallen-off GPU) gets its reason instead, as nvidia-smi's `[N/A]` does.
pub(crate) fn query(nvml: &Nvml) -> Result<Vec<GpuRow>, VramError> {
    let failed = |what: &str, e: NvmlError| VramError::NvmlUnavailable {
        reason: format!("{what}: {e}"),
    };
    let count = nvml
        .device_count()
        .map_err(|e| failed("counting the GPUs", e))?;
    (0..count)
        .map(|index| {
            let device = nvml
                .device_by_index(index)
                .map_err(|e| failed(&format!("opening GPU {index}"), e))?;
            let uuid = device
                .uuid()
                .map_err(|e| failed(&format!("reading GPU {index}'s UUID"), e))?;
            let free_mib = device
                .memory_info()
                .map(|memory| memory.free / (1024 * 1024))
                .map_err(|e| format!("NVML could not read its memory: {e}"));
            Ok(GpuRow {
                index,
                uuid,
                free_mib,
            })
        })
        .collect()
}
