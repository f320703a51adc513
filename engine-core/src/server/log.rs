//! The debug log file: the server's whole output, beside the model.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use super::error::StartError;

/// Opens the debug log: a regular file only (never through a symlink, which could point the
/// server's output anywhere), readable by its owner only (the log may show prompts and paths).
pub(crate) fn open_log(path: &Path) -> Result<File, StartError> {
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
        .open(path)
        .map_err(|source| StartError::LogFile {
            path: path.to_path_buf(),
            source,
        })?;
    let meta = file.metadata().map_err(|source| StartError::LogFile {
        path: path.to_path_buf(),
        source,
    })?;
    // An existing log keeps its old mode through open(2): narrow it.
    use std::os::unix::fs::PermissionsExt;
    let _ = file.set_permissions(std::fs::Permissions::from_mode(0o600));
    if !meta.is_file() {
        return Err(StartError::LogFile {
            path: path.to_path_buf(),
            source: std::io::Error::other("not a regular file"),
        });
    }
    Ok(file)
}
