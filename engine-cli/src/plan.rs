//! Planning a `describe` job: every input error is found here, before any server starts. The plan
//! holds the frames still to describe (after `--resume`), the output (locked against a second
//! writer), and the frames whose names cannot be written as JSON.

use std::collections::HashSet;
use std::fs::{File, OpenOptions, TryLockError};
use std::io::{self, Read, Seek, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::frames::{self, Frame};

/// One frame of this run and the name its output line carries.
#[derive(Debug)]
pub struct Item {
    pub frame: Frame,
    /// The path as JSON can hold it; `Err` says why it cannot (a non-UTF-8 file name).
    pub name: Result<String, String>,
}

/// A planned `describe` job.
pub struct Plan {
    /// The frames to describe this run, in input order.
    pub items: Vec<Item>,
    /// Frames an earlier run already described (`--resume`).
    pub skipped: usize,
    pub out: Box<dyn Write + Send>,
}

/// What the command line asked for, as planning needs it.
pub struct Request<'a> {
    pub inputs: &'a [PathBuf],
    pub output: Option<&'a Path>,
    pub resume: bool,
    /// Files the output must never be (the model, the mmproj, the server program).
    pub protected: &'a [PathBuf],
}

pub fn plan(request: &Request) -> Result<Plan, String> {
    let frames = frames::collect(request.inputs)?;
    let (out, done): (Box<dyn Write + Send>, HashSet<PathBuf>) = match request.output {
        None => (Box::new(io::stdout()), HashSet::new()),
        Some(path) if is_our_stdout(path) => {
            // `--output /dev/stdout >> log.jsonl`: write where the shell pointed us, emptying nothing.
            if request.resume {
                return Err(format!(
                    "--resume reads --output back, and {} is this program's own stdout — name the file itself",
                    path.display()
                ));
            }
            (Box::new(io::stdout()), HashSet::new())
        }
        Some(path) => {
            let protected = request.inputs.iter().chain(request.protected);
            refuse_input_as_output(path, protected, &frames)?;
            let (file, done) = open_output(path, request.resume)?;
            (Box::new(file), done)
        }
    };
    let total = frames.len();
    let items: Vec<Item> = frames
        .into_iter()
        .filter(|f| !done.contains(&frames::same_frame_key(&f.path)))
        .map(|frame| {
            let name = frame.path.to_str().map(str::to_owned).ok_or_else(|| {
                format!(
                    "file name {:?} is not UTF-8, which a JSON line cannot hold — rename the file",
                    frame.path
                )
            });
            Item { frame, name }
        })
        .collect();
    Ok(Plan {
        skipped: total - items.len(),
        items,
        out,
    })
}

/// Refuses an `--output` that is one of the inputs (a `.jsonl` of records, or a frame): writing it
/// would destroy what is being read.
fn refuse_input_as_output<'a>(
    output: &Path,
    inputs: impl Iterator<Item = &'a PathBuf>,
    frames: &'a [Frame],
) -> Result<(), String> {
    let Ok(out) = std::fs::metadata(output) else {
        return Ok(()); // A new file cannot be an input.
    };
    let id = (out.dev(), out.ino());
    let named = inputs
        .chain(frames.iter().map(|f| &f.path))
        .find(|p| std::fs::metadata(p).is_ok_and(|m| (m.dev(), m.ino()) == id));
    match named {
        Some(input) => Err(format!(
            "--output {} is the input {}: writing it would destroy it — choose another output file",
            output.display(),
            input.display()
        )),
        None => Ok(()),
    }
}

/// Whether `path` is the file our stdout already writes to (`/dev/stdout`, `/proc/self/fd/1`, or the
/// file itself).
fn is_our_stdout(path: &Path) -> bool {
    let Ok(stdout) = rustix::fs::fstat(rustix::stdio::stdout()) else {
        return false;
    };
    std::fs::metadata(path).is_ok_and(|m| (m.dev(), m.ino()) == (stdout.st_dev, stdout.st_ino))
}

/// The output file, emptied only when the first line is written: a run that fails before any frame
/// (too little VRAM, Ctrl-C while waiting for the GPU) leaves the old output as it was.
struct Output {
    file: File,
    empty_first: bool,
}

impl Write for Output {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        if self.empty_first {
            self.file.set_len(0)?;
            self.file.seek(io::SeekFrom::Start(0))?;
            self.empty_first = false;
        }
        self.file.write(bytes)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

/// Opens the output, exclusively: a second writer gets an error instead of interleaving lines.
/// Without `--resume` it starts empty (from its first line on); with it, the frames already described
/// are returned and a torn last line (a run killed mid-write, even inside a multi-byte character) is
/// dropped. Only a regular file can be read back to resume.
fn open_output(path: &Path, resume: bool) -> Result<(Output, HashSet<PathBuf>), String> {
    let shown = path.display();
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(|e| format!("cannot write output {shown}: {e}"))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(TryLockError::WouldBlock) => {
            return Err(format!(
                "output {shown} is being written by another cinecut-infer — wait for it to finish, \
                 or choose another --output"
            ));
        }
        Err(TryLockError::Error(e)) => return Err(format!("cannot lock output {shown}: {e}")),
    }
    // A device such as /dev/null has nothing to empty or read back.
    let regular = file.metadata().is_ok_and(|m| m.is_file());
    if !resume {
        let output = Output {
            file,
            empty_first: regular,
        };
        return Ok((output, HashSet::new()));
    }
    if !regular {
        return Err(format!(
            "--resume reads --output back, and {shown} is not a regular file — name a file"
        ));
    }
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)
        .map_err(|e| format!("cannot read output {shown} to resume: {e}"))?;
    let whole = bytes.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
    file.set_len(whole as u64)
        .and_then(|()| file.seek(io::SeekFrom::End(0)).map(|_| ()))
        .map_err(|e| format!("cannot prepare output {shown}: {e}"))?;
    let output = Output {
        file,
        empty_first: false,
    };
    Ok((output, already_described(&bytes[..whole])))
}

/// The frames an earlier run's output describes successfully (keys of [`frames::same_frame_key`]).
/// Lines that are not JSON, or not UTF-8, are skipped: those frames are tried again.
pub fn already_described(output: &[u8]) -> HashSet<PathBuf> {
    output
        .split(|b| *b == b'\n')
        .filter_map(|line| serde_json::from_slice::<serde_json::Value>(line).ok())
        .filter(|v| v.get("scene").is_some() || v.get("result").is_some())
        .filter_map(|v| {
            v["frame_path"]
                .as_str()
                .map(|p| frames::same_frame_key(Path::new(p)))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn resume_skips_only_successful_frames_whatever_their_spelling() {
        let output = [
            json!({"frame_path": "frames/a.jpg", "scene": {}}).to_string(),
            json!({"frame_path": "/b.jpg", "error": "x"}).to_string(),
            "{\"frame_pa".to_string(),
        ]
        .join("\n");
        let done = already_described(output.as_bytes());
        assert!(done.contains(&frames::same_frame_key(Path::new("./frames/a.jpg"))));
        assert!(!done.contains(&frames::same_frame_key(Path::new("/b.jpg"))));
        assert_eq!(done.len(), 1);
    }

    #[test]
    fn a_line_torn_inside_a_multibyte_character_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.jsonl");
        let whole = format!("{}\n", json!({"frame_path": "/é.jpg", "scene": {}}));
        let torn = json!({"frame_path": "/è.jpg", "scene": {}}).to_string();
        let cut = torn.find('è').unwrap() + 1; // inside the two bytes of 'è'
        let mut bytes = whole.clone().into_bytes();
        bytes.extend_from_slice(&torn.as_bytes()[..cut]);
        std::fs::write(&path, bytes).unwrap();
        let (_file, done) = open_output(&path, true).unwrap();
        assert_eq!(done.len(), 1);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), whole);
    }

    #[test]
    fn a_second_writer_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.jsonl");
        let (_first, _) = open_output(&path, false).unwrap();
        let err = open_output(&path, false).err().unwrap();
        assert!(err.contains("being written by another"), "{err}");
    }
}
