//! The files this CLI writes (`--output`, `merge`'s OUT): opened without truncating and locked with
//! `flock`, so that two writers of one file never meet — the second gets an error and changes
//! nothing.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

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

/// Writes `text` to `out` whole or not at all: our own stdout (`/dev/stdout`, `/proc/self/fd/1`, or
/// the file the shell points it at) through stdout, where the shell put it (`>> log` appends);
/// another path under `/dev` or `/proc` (a terminal, a pipe, `/dev/null`, `/dev/stderr`) and any
/// special file in place, appending; a regular file (or a new one, or an existing symlink's target)
/// through an exclusive temporary file beside it, renamed over it under its lock (the lock
/// `--output` takes, so a run writing it is never clobbered). `merge`'s OUT, `--summary` and
/// `report`'s output are written so.
pub fn write_whole(out: &Path, text: &[u8]) -> Result<(), String> {
    write_streamed(out, |file| file.write_all(text))
}

/// [`write_whole`] for output made as it is written (a report of thousands of frames): `write`
/// streams it into the temporary file (or the special file), never all of it in memory.
pub fn write_streamed(
    out: &Path,
    write: impl FnOnce(&mut dyn Write) -> std::io::Result<()>,
) -> Result<(), String> {
    let shown = out.display();
    let cannot = |e: std::io::Error| format!("cannot write {shown}: {e}");
    if is_our_stdout(out) {
        let mut stdout = std::io::BufWriter::new(std::io::stdout().lock());
        return write(&mut stdout)
            .and_then(|()| stdout.flush())
            .map_err(cannot);
    }
    let in_place = out.starts_with("/dev") || out.starts_with("/proc");
    match std::fs::metadata(out) {
        Ok(meta) if in_place || (!meta.is_file() && !meta.is_dir()) => {
            let mut special = OpenOptions::new().append(true).open(out).map_err(cannot)?;
            let mut buffered = std::io::BufWriter::new(&mut special);
            return write(&mut buffered)
                .and_then(|()| buffered.flush())
                .map_err(cannot);
        }
        Ok(meta) if meta.is_dir() => return Err(format!("{shown} is a folder: name a file")),
        Err(_) if std::fs::symlink_metadata(out).is_ok() => {
            return Err(format!(
                "{shown} is a symlink to a file that does not exist — this program writes through a link \
                 only to an existing file: name the file itself"
            ));
        }
        _ => {}
    }
    // The file itself, through any links: its folder holds the temporary file.
    let real = match std::fs::canonicalize(out) {
        Ok(real) => real,
        Err(_) => out.to_path_buf(),
    };
    let _lock = open_locked(&real)?;
    let folder = real
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = real
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "output".into());
    let mode = std::fs::metadata(&real).map_or(0o644, |m| m.permissions().mode() & 0o777);
    let (temporary, mut file) = create_temporary(folder, &name).map_err(cannot)?;
    let written = (|| {
        let mut buffered = std::io::BufWriter::new(&mut file);
        write(&mut buffered)?;
        buffered.flush()?;
        drop(buffered);
        file.set_permissions(std::fs::Permissions::from_mode(mode))?;
        file.sync_all()?;
        std::fs::rename(&temporary, &real)
    })();
    written.map_err(|e| {
        let _ = std::fs::remove_file(&temporary);
        cannot(e)
    })
}

/// Whether [`write_whole`] can write `out`, asked before a run that ends by writing it: not a folder,
/// not a link to nothing, in a folder that exists and that we may write in.
pub fn check_writable(out: &Path) -> Result<(), String> {
    let shown = out.display();
    if is_our_stdout(out) || out.starts_with("/dev") || out.starts_with("/proc") {
        return Ok(());
    }
    match std::fs::metadata(out) {
        Ok(meta) if meta.is_dir() => return Err(format!("{shown} is a folder: name a file")),
        Ok(_) => {}
        Err(_) if std::fs::symlink_metadata(out).is_ok() => {
            return Err(format!(
                "{shown} is a symlink to a file that does not exist: name the file itself"
            ));
        }
        Err(_) => {}
    }
    let real = std::fs::canonicalize(out).unwrap_or_else(|_| out.to_path_buf());
    let folder = real
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if !folder.is_dir() {
        return Err(format!(
            "{shown}: the folder {} does not exist — create it first",
            folder.display()
        ));
    }
    rustix::fs::access(folder, rustix::fs::Access::WRITE_OK).map_err(|e| {
        format!(
            "{shown}: cannot write in the folder {} ({e})",
            folder.display()
        )
    })
}

/// Creates `.{name}.writing-{random}` in `folder`: exclusively (`O_EXCL`: never a file that is
/// there, so never one planted in advance) and never through a symlink (`O_NOFOLLOW`).
fn create_temporary(folder: &Path, name: &str) -> std::io::Result<(PathBuf, std::fs::File)> {
    loop {
        let mut random = [0u8; 8];
        rustix::rand::getrandom(&mut random, rustix::rand::GetRandomFlags::empty())?;
        let suffix: String = random.iter().map(|b| format!("{b:02x}")).collect();
        let path = folder.join(format!(".{name}.writing-{suffix}"));
        let created = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
            .open(&path);
        match created {
            Ok(file) => return Ok((path, file)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
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
