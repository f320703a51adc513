//! Taking a GPU's lock ([`gpu_lock`]): one lock per GPU for all GPU work, within this process and
//! across every process of every user on the machine. The files and their protocol are in
//! [`super::lockfile`].
//!
//! Within the process a GPU is held by at most one [`GpuGuard`] at a time (CineCut's `GPU_LOCK`,
//! made per GPU), so that only one thread per GPU ever waits on the file. Across processes the
//! holder keeps an exclusive `flock(2)` on the GPU's lock file.

use std::collections::BTreeSet;
use std::fs::{File, TryLockError};
use std::path::{Path, PathBuf};
use std::sync::{Condvar, LazyLock, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use super::error::LockError;
use super::lockfile::{lock_file_path, open_lock_file, record_holder, still_at};
use crate::util::unpoisoned;
use crate::wait::{Deadline, Wait};

/// The GPU indices held in this process, and a signal for each release.
static HELD: LazyLock<(Mutex<BTreeSet<u32>>, Condvar)> =
    LazyLock::new(|| (Mutex::new(BTreeSet::new()), Condvar::new()));

fn held() -> MutexGuard<'static, BTreeSet<u32>> {
    unpoisoned(&HELD.0)
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

    /// The lock file's descriptor, for the server's keeper to hold until the server's tree is gone.
    pub(crate) fn raw_fd(&self) -> Option<std::os::fd::RawFd> {
        use std::os::fd::AsRawFd;
        self.file.as_ref().map(|f| f.as_raw_fd())
    }
}

impl Drop for GpuGuard {
    fn drop(&mut self) {
        if let Some(file) = self.file.take() {
            // Clearing the holder needs write access, which only the file's creator may have.
            let _ = file.set_len(0);
            let _ = file.unlock();
        }
        held().remove(&self.gpu);
        HELD.1.notify_all();
        tracing::debug!(gpu = self.gpu, "GPU lock released");
    }
}

/// Takes the lock for GPU `gpu` (the nvidia-smi index), waiting as `wait` says: as long as it
/// takes, at most a while (zero: try once), or until a flag is set (then [`LockError::Cancelled`],
/// within about 20 ms).
///
/// Other GPU stages of CineCut (the FFmpeg conform, say) take the same lock around their GPU work:
///
/// ```
/// # let dir = tempfile::tempdir().unwrap();
/// # unsafe { std::env::set_var("CINECUT_LOCK_DIR", dir.path()) };
/// use std::time::Duration;
/// use engine_core::{Wait, gpu_lock};
///
/// let guard = gpu_lock(7, Wait::Forever)?;
/// // ... GPU work; nobody else in this process or on this machine uses GPU 7 meanwhile ...
/// assert!(gpu_lock(7, Wait::For(Duration::from_millis(10))).is_err());
/// drop(guard);
/// assert!(gpu_lock(7, Wait::For(Duration::ZERO)).is_ok());
/// # Ok::<(), engine_core::gpu::LockError>(())
/// ```
pub fn gpu_lock(gpu: u32, wait: Wait) -> Result<GpuGuard, LockError> {
    let started = Instant::now();
    let deadline = wait.deadline();
    let path = lock_file_path(gpu);
    let gave_up = |path: PathBuf| match deadline {
        Deadline::Flag(_) => LockError::Cancelled {
            gpu,
            waited: started.elapsed(),
        },
        _ => LockError::Timeout {
            gpu,
            waited: started.elapsed(),
            path,
        },
    };

    // First the in-process slot, so that only one thread per GPU ever waits on the file.
    {
        let mut set = held();
        while set.contains(&gpu) {
            set = match deadline.slice(Duration::MAX) {
                None => return Err(gave_up(path.unwrap_or_default())),
                Some(Duration::MAX) => HELD.1.wait(set).unwrap_or_else(PoisonError::into_inner),
                Some(slice) => {
                    HELD.1
                        .wait_timeout(set, slice)
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
    let (file, writable) = loop {
        let (file, writable) = open_lock_file(&path)?;
        if let Deadline::Never = deadline {
            file.lock().map_err(|source| LockError::File {
                path: path.clone(),
                source,
            })?;
        } else {
            let mut pause = Duration::from_micros(200);
            loop {
                match file.try_lock() {
                    Ok(()) => break,
                    Err(TryLockError::WouldBlock) => {}
                    Err(TryLockError::Error(source)) => {
                        return Err(LockError::File { path, source });
                    }
                }
                let Some(slice) = deadline.slice(pause) else {
                    return Err(gave_up(path));
                };
                // Another process holds it; flock has no timed wait, so retry with a capped backoff.
                std::thread::sleep(slice);
                pause = (pause * 2).min(Duration::from_millis(20));
            }
        }
        // The file we locked must still be the one at the path: if it was removed or replaced
        // meanwhile (a cleaner of old files, say), another process may lock the new one. Start over.
        if still_at(&file, &path) {
            break (file, writable);
        }
    };
    if writable {
        record_holder(&file);
    }
    guard.file = Some(file);
    tracing::debug!(gpu, path = %guard.path.display(), "GPU lock taken");
    Ok(guard)
}

#[cfg(test)]
mod tests {
    /// The guard may be moved to (and dropped on) another thread, as the engine's users need.
    #[test]
    fn the_guard_is_send() {
        fn assert_send<T: Send>() {}
        assert_send::<super::GpuGuard>();
        assert_send::<crate::Engine<crate::typestate::Healthy>>();
    }
}
