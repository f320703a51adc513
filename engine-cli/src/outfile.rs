//! The files this CLI writes (`--output`, `merge`'s OUT, `--summary`, `report`'s page): opened
//! without truncating and locked with `flock`, so that two writers of one file never meet — the
//! second gets an error and changes nothing; written by what the file is (a regular file replaced
//! whole, a device or pipe in place), never by where its name points.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use engine_core::CancellationToken;

use crate::exit::Failure;

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

/// Where a path an output is written to leads, by the file's type (never by its name: a regular
/// file under `/dev/shm` is a file like any other).
enum Target {
    /// Our own stdout (`/dev/stdout`, `/proc/self/fd/1`, or the file the shell points it at).
    Stdout,
    /// A character device, a FIFO or a socket (a terminal, a pipe, `/dev/null`): written in place.
    Stream,
    /// A regular file (or a new one, or an existing symlink's target): replaced whole.
    File,
}

/// What `out` is as an output, or why it cannot be one.
fn target(out: &Path) -> Result<Target, String> {
    use std::os::unix::fs::FileTypeExt;
    let shown = out.display();
    if is_our_stdout(out) {
        return Ok(Target::Stdout);
    }
    match std::fs::metadata(out) {
        Ok(meta) if meta.is_dir() => Err(format!("{shown} is a folder: name a file")),
        Ok(meta) if meta.file_type().is_block_device() => {
            Err(format!("{shown} is a block device: name a file"))
        }
        Ok(meta) if meta.is_file() => Ok(Target::File),
        Ok(_) => Ok(Target::Stream),
        Err(_) if std::fs::symlink_metadata(out).is_ok() => Err(format!(
            "{shown} is a symlink to a file that does not exist — this program writes through a \
             link only to an existing file: name the file itself"
        )),
        Err(_) => Ok(Target::File),
    }
}

/// Writes `text` to `out` whole or not at all (see [`write_streamed`]). `merge`'s OUT and
/// `--summary` are written so.
pub fn write_whole(out: &Path, text: &[u8], stop: &CancellationToken) -> Result<(), Failure> {
    write_streamed(out, stop, |file| file.write_all(text))
}

/// Writes `out` whole or not at all, by what it is: our own stdout through stdout, where the shell
/// put it (`>> log` appends); a character device, FIFO or socket in place; a regular file (or a new
/// one, or an existing symlink's target) through an exclusive temporary file beside it, renamed
/// over it under its lock (the lock `--output` takes, so a run writing it is never clobbered).
/// `write` streams the contents (a report of thousands of frames is never all in memory). A
/// failure, or `stop` cancelled by the time the contents are written, leaves the file as it was: no
/// temporary file, and no empty file where there was none.
pub fn write_streamed(
    out: &Path,
    stop: &CancellationToken,
    write: impl FnOnce(&mut dyn Write) -> std::io::Result<()>,
) -> Result<(), Failure> {
    let shown = out.display();
    let cannot = |e: std::io::Error| Failure::write(format!("cannot write {shown}: {e}"));
    match target(out).map_err(Failure::refused)? {
        Target::Stdout => in_place(std::io::stdout().lock(), write).map_err(cannot),
        Target::Stream => {
            let special = OpenOptions::new().append(true).open(out).map_err(cannot)?;
            in_place(special, write).map_err(cannot)
        }
        Target::File => replace(out, stop, write),
    }
}

/// [`write_streamed`] for what is written in place (our stdout, a device, a pipe): buffered, then
/// flushed.
fn in_place(
    sink: impl Write,
    write: impl FnOnce(&mut dyn Write) -> std::io::Result<()>,
) -> std::io::Result<()> {
    let mut buffered = std::io::BufWriter::new(sink);
    write(&mut buffered)?;
    buffered.flush()
}

/// [`write_streamed`] for a regular file: a temporary file beside it, renamed over it.
fn replace(
    out: &Path,
    stop: &CancellationToken,
    write: impl FnOnce(&mut dyn Write) -> std::io::Result<()>,
) -> Result<(), Failure> {
    let shown = out.display();
    let cannot = |e: std::io::Error| Failure::write(format!("cannot write {shown}: {e}"));
    // The file itself, through any links: its folder holds the temporary file.
    let real = std::fs::canonicalize(out).unwrap_or_else(|_| out.to_path_buf());
    let existed = real.exists();
    let lock = open_locked(&real).map_err(Failure::refused)?;
    // Taking the lock made the file where there was none: gone again if nothing replaces it.
    let undo = |lock: File| {
        if !existed && lock.metadata().is_ok_and(|m| m.len() == 0) {
            let _ = std::fs::remove_file(&real);
        }
    };
    let folder = real
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = real
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "output".into());
    let mode = std::fs::metadata(&real).map_or(0o644, |m| m.permissions().mode() & 0o777);
    let (temporary, mut file) = match create_temporary(folder, &name) {
        Ok(created) => created,
        Err(e) => {
            undo(lock);
            return Err(cannot(e));
        }
    };
    let written = (|| {
        let mut buffered = std::io::BufWriter::new(&mut file);
        write(&mut buffered)?;
        buffered.flush()?;
        drop(buffered);
        file.set_permissions(std::fs::Permissions::from_mode(mode))?;
        file.sync_all()
    })();
    let outcome = match written {
        _ if stop.is_cancelled() => Err(Failure::interrupted(format!(
            "interrupted; {shown} not written"
        ))),
        Err(e) => Err(cannot(e)),
        Ok(()) => std::fs::rename(&temporary, &real).map_err(cannot),
    };
    if outcome.is_err() {
        let _ = std::fs::remove_file(&temporary);
        undo(lock);
    }
    outcome
}

/// Whether [`write_whole`] can write `out`, asked before a run that ends by writing it: not a folder
/// nor a block device, not a link to nothing, in a folder that exists and that we may write in.
pub fn check_writable(out: &Path) -> Result<(), String> {
    let shown = out.display();
    match target(out)? {
        Target::Stdout | Target::Stream => return Ok(()),
        Target::File => {}
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
