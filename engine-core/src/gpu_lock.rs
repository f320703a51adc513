//! The GPU lock: one lock per GPU for all GPU work, within this process and across every process of
//! every user on the machine.
//!
//! Within the process a GPU is held by at most one [`GpuGuard`] at a time (the seed's `GPU_LOCK`, made
//! per GPU). Across processes the holder keeps an exclusive `flock(2)` on `gpu-<index>.lock` (the
//! nvidia-smi index) in one folder that everyone meets in: `$CINECUT_LOCK_DIR` if set, else the
//! first of `/run/lock`, `/var/lock`, `/tmp` that exists, with `cinecut/` below it, created sticky and
//! world-writable (`1777`, as `/tmp` is) so that any user can add a lock file and nobody can remove
//! another's. Lock files are `0644`: anyone can open them to `flock`. A shell stage takes the same
//! lock with `flock /run/lock/cinecut/gpu-0.lock CMD`. The kernel drops a `flock` when its holder
//! dies, so a crashed process never leaves a GPU locked.
//!
//! A folder that is not safe to meet in is refused: a symlink (it could lead anywhere), a shared
//! (world-writable) folder without the sticky bit (anyone could swap the lock files), or a private
//! folder owned by someone else.

use std::collections::BTreeSet;
use std::fs::{self, DirBuilder, File, OpenOptions, TryLockError};
use std::io::{self, Read, Seek, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, LazyLock, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use crate::error::LockError;
use crate::sync::lock;

/// The GPU indices held in this process, and a signal for each release.
static HELD: LazyLock<(Mutex<BTreeSet<u32>>, Condvar)> =
    LazyLock::new(|| (Mutex::new(BTreeSet::new()), Condvar::new()));

fn held() -> MutexGuard<'static, BTreeSet<u32>> {
    lock(&HELD.0)
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
            // Clearing the holder needs write access, which only the file's creator may have.
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
    acquire(gpu, Wait::Forever)
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
    acquire(gpu, Wait::Until(Instant::now() + timeout))
}

/// Takes the lock for GPU `gpu`, waiting until it is free or `cancel` is set (then
/// [`LockError::Cancelled`], within about 20 ms): for callers that must stay responsive to Ctrl-C.
pub fn gpu_lock_cancellable(gpu: u32, cancel: &AtomicBool) -> Result<GpuGuard, LockError> {
    acquire(gpu, Wait::Cancellable(cancel))
}

/// How long a lock request may wait.
#[derive(Clone, Copy)]
enum Wait<'a> {
    Forever,
    Until(Instant),
    Cancellable(&'a AtomicBool),
}

/// The longest a cancellable wait sleeps before it looks at its flag again.
const CANCEL_CHECK: Duration = Duration::from_millis(20);

impl Wait<'_> {
    /// How long to block before looking again; `None`: give up now (deadline passed, or cancelled).
    fn next_slice(self) -> Option<Duration> {
        match self {
            Wait::Forever => Some(Duration::MAX),
            Wait::Until(deadline) => {
                Some(deadline.saturating_duration_since(Instant::now())).filter(|d| !d.is_zero())
            }
            Wait::Cancellable(cancel) => (!cancel.load(Ordering::Acquire)).then_some(CANCEL_CHECK),
        }
    }
}

fn acquire(gpu: u32, wait: Wait<'_>) -> Result<GpuGuard, LockError> {
    let started = Instant::now();
    let path = lock_dir().map(|dir| dir.join(format!("gpu-{gpu}.lock")));
    let gave_up = |path: PathBuf| match wait {
        Wait::Cancellable(_) => LockError::Cancelled {
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
            set = match wait.next_slice() {
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
    let (file, writable) = open_lock_file(&path)?;
    if let Wait::Forever = wait {
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
            let Some(slice) = wait.next_slice() else {
                return Err(gave_up(path));
            };
            // Another process holds it; flock has no timed wait, so retry with a capped backoff.
            std::thread::sleep(pause.min(slice));
            pause = (pause * 2).min(Duration::from_millis(20));
        }
    }
    if writable {
        record_holder(&file);
    }
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

/// Opens (creating `0644`) a lock file, never through a symlink. Another user's lock file opens
/// read-only, which is all `flock` needs. Returns the file and whether it is writable.
fn open_lock_file(path: &Path) -> Result<(File, bool), LockError> {
    let open = |write: bool| {
        OpenOptions::new()
            .read(true)
            .write(write)
            .create(write)
            .truncate(false)
            .mode(0o644)
            .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
            .open(path)
    };
    let error = |source| LockError::File {
        path: path.to_path_buf(),
        source,
    };
    match open(true) {
        Ok(file) => {
            // A umask of 077 would leave it 0600, and other users could not flock it.
            if file.metadata().is_ok_and(|m| m.uid() == euid()) {
                let _ = file.set_permissions(fs::Permissions::from_mode(0o644));
            }
            Ok((file, true))
        }
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
            open(false).map(|f| (f, false)).map_err(error)
        }
        Err(e) => Err(error(e)),
    }
}

fn euid() -> u32 {
    rustix::process::geteuid().as_raw()
}

/// The folder that holds the lock files: `$CINECUT_LOCK_DIR`, else `cinecut/` in the first of
/// `/run/lock`, `/var/lock`, `/tmp` that exists (created `1777`). Refused if unsafe.
pub fn lock_dir() -> Result<PathBuf, LockError> {
    if let Some(dir) = std::env::var_os("CINECUT_LOCK_DIR").filter(|v| !v.is_empty()) {
        let dir = PathBuf::from(dir);
        // A folder of the user's choosing that does not exist yet is theirs alone.
        create_dir(&dir, 0o700)?;
        check_dir(&dir)?;
        return Ok(dir);
    }
    let base = ["/run/lock", "/var/lock", "/tmp"]
        .into_iter()
        .map(Path::new)
        .find(|p| p.is_dir())
        .unwrap_or(Path::new("/tmp"));
    let dir = base.join("cinecut");
    if create_dir(&dir, 0o777)? {
        // mkdir's mode passes through the umask; the sticky bit needs chmod anyway.
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o1777)).map_err(|source| {
            LockError::File {
                path: dir.clone(),
                source,
            }
        })?;
    }
    check_dir(&dir)?;
    Ok(dir)
}

/// Creates `dir` (and its parents) with `mode`; returns whether this call created it.
fn create_dir(dir: &Path, mode: u32) -> Result<bool, LockError> {
    match DirBuilder::new().mode(mode).create(dir) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) if e.kind() == io::ErrorKind::NotFound => DirBuilder::new()
            .recursive(true)
            .mode(mode)
            .create(dir)
            .map(|()| true)
            .map_err(|source| LockError::File {
                path: dir.to_path_buf(),
                source,
            }),
        Err(source) => Err(LockError::File {
            path: dir.to_path_buf(),
            source,
        }),
    }
}

/// Refuses a lock folder that is not safe to meet in.
fn check_dir(dir: &Path) -> Result<(), LockError> {
    let unsafe_dir = |reason: String, fix: &str| LockError::UnsafeDir {
        path: dir.to_path_buf(),
        reason,
        fix: fix.to_string(),
    };
    let meta = fs::symlink_metadata(dir).map_err(|source| LockError::File {
        path: dir.to_path_buf(),
        source,
    })?;
    if meta.file_type().is_symlink() {
        return Err(unsafe_dir(
            "it is a symlink, which could lead anywhere".into(),
            "point CINECUT_LOCK_DIR at the real folder",
        ));
    }
    if !meta.is_dir() {
        return Err(unsafe_dir(
            "it is not a folder".into(),
            "remove what is in the way, or set CINECUT_LOCK_DIR to a folder",
        ));
    }
    let mode = meta.mode();
    let shared = mode & 0o002 != 0;
    if shared && mode & 0o1000 == 0 {
        return Err(unsafe_dir(
            format!(
                "it is writable by everyone but not sticky (mode {:o})",
                mode & 0o7777
            ),
            &format!(
                "run `chmod +t {}` so nobody can remove another's lock files",
                dir.display()
            ),
        ));
    }
    if !shared && meta.uid() != euid() && meta.uid() != 0 {
        return Err(unsafe_dir(
            format!(
                "it is private to uid {}, not to us (uid {})",
                meta.uid(),
                euid()
            ),
            "use a folder of your own, or a shared sticky one (chmod 1777)",
        ));
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
        assert_send::<crate::Engine<crate::typestate::Healthy>>();
    }
}
