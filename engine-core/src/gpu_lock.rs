//! The GPU lock: one lock per GPU index for all GPU work, within this process and across processes.
//!
//! Within the process a GPU index is held by at most one [`GpuGuard`] at a time (the seed's
//! `GPU_LOCK`, made per GPU). Across processes the holder also keeps an advisory `flock` on
//! `gpu-<index>.lock` in a private folder: `$CINECUT_LOCK_DIR`, else `$XDG_RUNTIME_DIR/cinecut`,
//! else `<tmp>/cinecut-<uid>`. The folder is created 0700 and must be a real folder owned by us; the
//! file is created 0600 and never opened through a symlink. The kernel drops a `flock` when its holder
//! dies, so a crashed process never leaves a GPU locked.

use std::collections::BTreeSet;
use std::fs::{self, DirBuilder, File, OpenOptions, TryLockError};
use std::io::{self, Read, Seek, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Condvar, LazyLock, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use crate::error::LockError;

/// The GPU indices held in this process, and a signal for each release.
static HELD: LazyLock<(Mutex<BTreeSet<u32>>, Condvar)> =
    LazyLock::new(|| (Mutex::new(BTreeSet::new()), Condvar::new()));

fn held() -> MutexGuard<'static, BTreeSet<u32>> {
    HELD.0.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Proof that this thread's caller holds a GPU. Dropping it releases the GPU (file lock first, then
/// the in-process slot). It is `Send`: the lock may be released from another thread.
#[derive(Debug)]
pub struct GpuGuard {
    gpu: u32,
    file: Option<File>,
    path: PathBuf,
}

impl GpuGuard {
    /// The GPU index this guard holds.
    pub fn gpu(&self) -> u32 {
        self.gpu
    }

    /// The lock file this guard holds.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for GpuGuard {
    fn drop(&mut self) {
        if let Some(file) = self.file.take() {
            let _ = file.set_len(0);
            let _ = file.unlock();
        }
        held().remove(&self.gpu);
        HELD.1.notify_all();
        tracing::debug!(gpu = self.gpu, "GPU lock released");
    }
}

/// Takes the lock for GPU `gpu`, waiting as long as it takes.
///
/// Other GPU stages of CineCut (the FFmpeg conform, say) take the same lock around their GPU work:
///
/// ```no_run
/// let guard = engine_core::gpu_lock(0)?;
/// // ... run GPU work; nobody else in this process or on this machine uses GPU 0 meanwhile ...
/// drop(guard);
/// # Ok::<(), engine_core::LockError>(())
/// ```
pub fn gpu_lock(gpu: u32) -> Result<GpuGuard, LockError> {
    acquire(gpu, None)
}

/// Takes the lock for GPU `gpu`, waiting at most `timeout` (zero: try once).
///
/// ```
/// # let dir = tempfile::tempdir().unwrap();
/// # unsafe { std::env::set_var("CINECUT_LOCK_DIR", dir.path()) };
/// use std::time::Duration;
/// let first = engine_core::try_gpu_lock_for(7, Duration::ZERO)?;
/// assert!(engine_core::try_gpu_lock_for(7, Duration::from_millis(10)).is_err());
/// drop(first);
/// assert!(engine_core::try_gpu_lock_for(7, Duration::ZERO).is_ok());
/// # Ok::<(), engine_core::LockError>(())
/// ```
pub fn try_gpu_lock_for(gpu: u32, timeout: Duration) -> Result<GpuGuard, LockError> {
    acquire(gpu, Some(Instant::now() + timeout))
}

fn acquire(gpu: u32, deadline: Option<Instant>) -> Result<GpuGuard, LockError> {
    let started = Instant::now();
    let path = lock_dir().map(|dir| dir.join(format!("gpu-{gpu}.lock")));
    let timeout_error = |path: PathBuf| LockError::Timeout {
        gpu,
        waited: started.elapsed(),
        path,
    };

    // First the in-process slot, so that only one thread per GPU ever waits on the file.
    {
        let mut set = held();
        while set.contains(&gpu) {
            set = match deadline {
                None => HELD.1.wait(set).unwrap_or_else(PoisonError::into_inner),
                Some(deadline) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(timeout_error(path.unwrap_or_default()));
                    }
                    HELD.1
                        .wait_timeout(set, left)
                        .unwrap_or_else(PoisonError::into_inner)
                        .0
                }
            };
        }
        set.insert(gpu);
    }
    // From here on the slot is ours; a guard without a file releases it on every early return.
    let mut guard = GpuGuard {
        gpu,
        file: None,
        path: PathBuf::new(),
    };
    let path = path?;
    guard.path = path.clone();
    let file = open_lock_file(&path)?;
    match deadline {
        None => file.lock().map_err(|source| LockError::File {
            path: path.clone(),
            source,
        })?,
        Some(deadline) => {
            let mut pause = Duration::from_micros(200);
            loop {
                match file.try_lock() {
                    Ok(()) => break,
                    Err(TryLockError::WouldBlock) => {}
                    Err(TryLockError::Error(source)) => {
                        return Err(LockError::File { path, source });
                    }
                }
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(timeout_error(path));
                }
                // Another process holds it; flock has no timed wait, so retry with a capped backoff.
                std::thread::sleep(pause.min(left));
                pause = (pause * 2).min(Duration::from_millis(20));
            }
        }
    }
    record_holder(&file);
    guard.file = Some(file);
    tracing::debug!(gpu, path = %guard.path.display(), "GPU lock taken");
    Ok(guard)
}

/// Writes our pid into the lock file, for people who wonder who holds a GPU.
fn record_holder(mut file: &File) {
    let _ = file.set_len(0);
    let _ = file.rewind();
    let _ = write!(file, "{}", std::process::id());
}

/// The pid recorded in a lock file, if any (diagnostics only).
pub fn lock_holder(gpu: u32) -> Option<u32> {
    let path = lock_dir().ok()?.join(format!("gpu-{gpu}.lock"));
    let mut text = String::new();
    File::open(path).ok()?.read_to_string(&mut text).ok()?;
    text.trim().parse().ok()
}

fn open_lock_file(path: &Path) -> Result<File, LockError> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
        .open(path)
        .map_err(|source| LockError::File {
            path: path.to_path_buf(),
            source,
        })
}

/// The folder that holds the lock files, created private if missing.
pub fn lock_dir() -> Result<PathBuf, LockError> {
    let dir = if let Some(dir) = non_empty_env("CINECUT_LOCK_DIR") {
        dir
    } else if let Some(runtime) = non_empty_env("XDG_RUNTIME_DIR") {
        runtime.join("cinecut")
    } else {
        std::env::temp_dir().join(format!("cinecut-{}", rustix::process::getuid().as_raw()))
    };
    ensure_private_dir(&dir).map_err(|source| LockError::File {
        path: dir.clone(),
        source,
    })?;
    Ok(dir)
}

fn non_empty_env(name: &str) -> Option<PathBuf> {
    std::env::var_os(name)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

fn ensure_private_dir(dir: &Path) -> io::Result<()> {
    match DirBuilder::new().recursive(true).mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    let meta = fs::symlink_metadata(dir)?;
    if !meta.is_dir() {
        return Err(io::Error::other(
            "not a folder (a symlink or a file is in the way)",
        ));
    }
    if meta.uid() != rustix::process::geteuid().as_raw() {
        return Err(io::Error::other(format!(
            "owned by uid {}, not by us",
            meta.uid()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    /// The guard may be moved to (and dropped on) another thread, as the engine's users need.
    #[test]
    fn the_guard_is_send() {
        fn assert_send<T: Send>() {}
        assert_send::<super::GpuGuard>();
        assert_send::<crate::Engine<crate::Healthy>>();
    }
}
