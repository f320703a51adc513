//! The GPU lock: one lock per GPU for all GPU work, within this process and across every process of
//! every user on the machine. The protocol is documented on the public [`crate::lock`] module.
//!
//! Within the process a GPU is held by at most one [`GpuGuard`] at a time (the seed's `GPU_LOCK`, made
//! per GPU), so that only one thread per GPU ever waits on the file. Across processes the holder keeps
//! an exclusive `flock(2)` on the GPU's lock file.

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
    let path = lock_file_path(gpu);
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
    let (file, writable) = loop {
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

/// Writes our pid into the lock file, for people who wonder who holds a GPU.
fn record_holder(mut file: &File) {
    let _ = file.set_len(0);
    let _ = file.rewind();
    let _ = write!(file, "{}", std::process::id());
}

/// The pid recorded in a lock file, if any (diagnostics only).
pub fn lock_holder(gpu: u32) -> Option<u32> {
    let mut text = String::new();
    File::open(lock_file_path(gpu).ok()?)
        .ok()?
        .read_to_string(&mut text)
        .ok()?;
    text.trim().parse().ok()
}

/// Whether GPU `gpu`'s lock is held now, by anyone, read from `/proc/locks` without taking it (a
/// try-lock would itself hold the lock for a moment, and another process's try-lock could fail on
/// it). A missing lock file is a free lock; `None` when `/proc/locks` cannot be read.
pub fn is_locked(gpu: u32) -> Option<bool> {
    let path = lock_file_path(gpu).ok()?;
    let meta = match fs::symlink_metadata(&path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Some(false),
        Err(_) => return None,
    };
    let locks = fs::read_to_string("/proc/locks").ok()?;
    Some(locks_name(&locks, meta.dev(), meta.ino()))
}

/// Whether `/proc/locks` (`1: FLOCK  ADVISORY  WRITE 4242 00:2f:1234 0 EOF`: the device as hex
/// major:minor, the inode in decimal) holds a flock on device `dev`, inode `ino`.
fn locks_name(locks: &str, dev: u64, ino: u64) -> bool {
    let wanted = format!(
        "{:02x}:{:02x}:{ino}",
        rustix::fs::major(dev),
        rustix::fs::minor(dev)
    );
    locks.lines().any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        // A blocked waiter's line starts "1: -> FLOCK": it does not hold the lock.
        fields.get(1) == Some(&"FLOCK") && fields.get(5) == Some(&wanted.as_str())
    })
}

/// `cinecut-gpu-<index>.lock` in the lock folder: the file every GPU user on the machine meets on.
pub fn lock_file_path(gpu: u32) -> Result<PathBuf, LockError> {
    lock_dir().map(|dir| dir.join(format!("cinecut-gpu-{gpu}.lock")))
}

/// Whether `file` is still the file at `path` (same device and inode).
fn still_at(file: &File, path: &Path) -> bool {
    match (file.metadata(), fs::symlink_metadata(path)) {
        (Ok(ours), Ok(there)) => (ours.dev(), ours.ino()) == (there.dev(), there.ino()),
        _ => false,
    }
}

/// Opens (creating `0644`) a lock file: never through a symlink, never blocking (a FIFO in its
/// place would hang `open`), and only if it is a regular file with one link (the holder truncates
/// it to write its pid: a hard link would truncate some other file). Another user's lock file opens
/// read-only, which is all `flock` needs. Returns the file and whether it is writable.
fn open_lock_file(path: &Path) -> Result<(File, bool), LockError> {
    let open = |write: bool| {
        OpenOptions::new()
            .read(true)
            .write(write)
            .create(write)
            .truncate(false)
            .mode(0o644)
            .custom_flags(
                (rustix::fs::OFlags::NOFOLLOW | rustix::fs::OFlags::NONBLOCK).bits() as i32,
            )
            .open(path)
    };
    let error = |source| LockError::File {
        path: path.to_path_buf(),
        source,
    };
    let (file, writable) = match open(true) {
        Ok(file) => (file, true),
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
            (open(false).map_err(error)?, false)
        }
        Err(e) => return Err(error(e)),
    };
    let meta = file.metadata().map_err(error)?;
    if !meta.is_file() || meta.nlink() != 1 {
        return Err(LockError::UnsafeDir {
            path: path.to_path_buf(),
            reason: if meta.is_file() {
                format!("the lock file has {} hard links", meta.nlink())
            } else {
                "the lock file is not a regular file".into()
            },
            fix: format!("remove {} (it is recreated as needed)", path.display()),
        });
    }
    // A umask of 077 would leave it 0600, and other users could not open it.
    if writable && meta.uid() == euid() {
        let _ = file.set_permissions(fs::Permissions::from_mode(0o644));
    }
    Ok((file, writable))
}

fn euid() -> u32 {
    rustix::process::geteuid().as_raw()
}

/// The folder that holds the lock files: `$CINECUT_LOCK_DIR` (created `0700` if missing), else the
/// first of `/run/lock`, `/var/lock`, `/tmp` that exists. Refused if unsafe to meet in.
pub fn lock_dir() -> Result<PathBuf, LockError> {
    let dir = match std::env::var_os("CINECUT_LOCK_DIR").filter(|v| !v.is_empty()) {
        Some(dir) => {
            let dir = PathBuf::from(dir);
            // A folder of the user's choosing that does not exist yet is theirs alone.
            create_dir(&dir)?;
            dir
        }
        None => ["/run/lock", "/var/lock", "/tmp"]
            .into_iter()
            .map(PathBuf::from)
            .find(|p| p.is_dir())
            .unwrap_or_else(|| PathBuf::from("/tmp")),
    };
    check_dir(&dir)?;
    Ok(dir)
}

/// Creates `dir` (and its parents) private (`0700`) if it is missing.
fn create_dir(dir: &Path) -> Result<(), LockError> {
    match DirBuilder::new().recursive(true).mode(0o700).create(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(source) => Err(LockError::File {
            path: dir.to_path_buf(),
            source,
        }),
    }
}

/// Refuses a lock folder that is not safe to meet in. A shared folder (writable by group or others)
/// must be sticky, so that nobody can remove another's lock file, and owned by root or by us, since
/// a sticky folder's owner may remove any file in it.
fn check_dir(dir: &Path) -> Result<(), LockError> {
    let unsafe_dir = |reason: String, fix: String| LockError::UnsafeDir {
        path: dir.to_path_buf(),
        reason,
        fix,
    };
    let meta = fs::symlink_metadata(dir).map_err(|source| LockError::File {
        path: dir.to_path_buf(),
        source,
    })?;
    if meta.file_type().is_symlink() {
        return Err(unsafe_dir(
            "it is a symlink, which could lead anywhere".into(),
            "point CINECUT_LOCK_DIR at the real folder".into(),
        ));
    }
    if !meta.is_dir() {
        return Err(unsafe_dir(
            "it is not a folder".into(),
            "remove what is in the way, or set CINECUT_LOCK_DIR to a folder".into(),
        ));
    }
    let mode = meta.mode();
    let owner = meta.uid();
    let trusted_owner = owner == 0 || owner == euid();
    if mode & 0o022 != 0 {
        if mode & 0o1000 == 0 {
            return Err(unsafe_dir(
                format!(
                    "others can write to it but it is not sticky (mode {:o})",
                    mode & 0o7777
                ),
                format!(
                    "run `chmod +t {}` so nobody can remove another's lock files",
                    dir.display()
                ),
            ));
        }
        if !trusted_owner {
            return Err(unsafe_dir(
                format!(
                    "it is shared but owned by uid {owner}, who could remove anyone's lock files"
                ),
                "use a shared folder owned by root (as /run/lock and /tmp are), or one of your own"
                    .into(),
            ));
        }
    } else if !trusted_owner {
        return Err(unsafe_dir(
            format!("it is private to uid {owner}, not to us (uid {})", euid()),
            "use a folder of your own, or a shared sticky one owned by root".into(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_locks_lines_name_the_file_they_hold() {
        let dev = rustix::fs::makedev(0, 0x2f);
        let locks = "1: FLOCK  ADVISORY  WRITE 4242 00:2f:1234 0 EOF\n\
                     1: -> FLOCK  ADVISORY  WRITE 4343 00:2f:5678 0 EOF\n\
                     2: POSIX  ADVISORY  WRITE 77 00:2f:9999 0 EOF\n";
        assert!(locks_name(locks, dev, 1234));
        assert!(!locks_name(locks, dev, 5678), "a waiter holds nothing");
        assert!(!locks_name(locks, dev, 9999), "a POSIX lock is not a flock");
        assert!(!locks_name(locks, rustix::fs::makedev(0, 0x30), 1234));
    }

    /// The guard may be moved to (and dropped on) another thread, as the engine's users need.
    #[test]
    fn the_guard_is_send() {
        fn assert_send<T: Send>() {}
        assert_send::<super::GpuGuard>();
        assert_send::<crate::Engine<crate::typestate::Healthy>>();
    }
}
