//! The files this CLI writes (`--output`, `merge`'s OUT): opened without truncating and locked with
//! `flock`, so that two writers of one file never meet — the second gets an error and changes
//! nothing.

use std::fs::{File, OpenOptions, TryLockError};
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// Opens `path` for reading and writing (creating it), without truncating, and takes its lock. A
/// symlink is followed: the file it points to is the one written and locked.
pub fn open_locked(path: &Path) -> Result<File, String> {
    let shown = path.display();
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(|e| format!("cannot write {shown}: {e}"))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(TryLockError::WouldBlock) => Err(format!(
            "{shown} is being written by another cinecut-infer — wait for it to finish, or choose \
             another file"
        )),
        Err(TryLockError::Error(e)) => Err(format!("cannot lock {shown}: {e}")),
    }
}

/// Whether two paths name one file (the same device and inode: links and `..` included); a path
/// that does not exist names no file.
pub fn same_file(a: &Path, b: &Path) -> bool {
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(a), Ok(b)) => (a.dev(), a.ino()) == (b.dev(), b.ino()),
        _ => false,
    }
}

/// Whether `path` is the file our stdout already writes to (`/dev/stdout`, `/proc/self/fd/1`, or the
/// file itself).
pub fn is_our_stdout(path: &Path) -> bool {
    let Ok(stdout) = rustix::fs::fstat(rustix::stdio::stdout()) else {
        return false;
    };
    std::fs::metadata(path).is_ok_and(|m| (m.dev(), m.ino()) == (stdout.st_dev, stdout.st_ino))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_writer_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.jsonl");
        let _first = open_locked(&path).unwrap();
        let err = open_locked(&path).unwrap_err();
        assert!(err.contains("being written by another"), "{err}");
    }
}
