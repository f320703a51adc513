//! The GPU lock's files, the protocol every GPU user on the machine meets on.
//!
//! One lock per GPU for all GPU work, in-process and across every process of every user on the
//! machine: an exclusive `flock(2)` on `cinecut-gpu-<index>.lock` (`index`: the nvidia-smi index,
//! as [`crate::gpu_lock`] takes it) in the lock folder, held for the whole GPU job. The kernel drops
//! a `flock` when its holder dies, so a crashed process never leaves a GPU locked; an engine's
//! server keeper holds it until the server's tree is gone, even when the engine was SIGKILLed.
//!
//! - The folder ([`lock_dir`]): `$CINECUT_LOCK_DIR` if set (created `0700` if missing), else the
//!   first of `/run/lock`, `/var/lock`, `/tmp` that exists: sticky, world-writable and owned by
//!   root, so any user may add a lock file and nobody may remove another's.
//! - Refused, with the fix in the error: a symlink; a folder others can write that is not sticky,
//!   or is owned by another user than root or us (a sticky folder's owner may remove any file in
//!   it); a private folder of another user; a lock file that is not a regular file or has hard
//!   links.
//! - Lock files are created `0644`: anyone can open them read-only, which is all `flock` needs. The
//!   holder writes its pid into the file when it can ([`lock_holder`]). A lock taken on a file that
//!   was removed or replaced meanwhile is taken again on the new one.
//!
//! From a shell: `flock /run/lock/cinecut-gpu-0.lock ffmpeg ...` waits while an engine holds GPU 0.

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Read, Seek, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::error::LockError;

/// Writes our pid into the lock file, for people who wonder who holds a GPU.
pub(crate) fn record_holder(mut file: &File) {
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
pub(crate) fn still_at(file: &File, path: &Path) -> bool {
    match (file.metadata(), fs::symlink_metadata(path)) {
        (Ok(ours), Ok(there)) => (ours.dev(), ours.ino()) == (there.dev(), there.ino()),
        _ => false,
    }
}

/// Opens (creating `0644`) a lock file: never through a symlink, never blocking (a FIFO in its
/// place would hang `open`), and only if it is a regular file with one link (the holder truncates
/// it to write its pid: a hard link would truncate some other file). Another user's lock file opens
/// read-only, which is all `flock` needs. Returns the file and whether it is writable.
pub(crate) fn open_lock_file(path: &Path) -> Result<(File, bool), LockError> {
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
}
