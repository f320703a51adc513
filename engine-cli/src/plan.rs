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
}

pub fn plan(request: &Request) -> Result<Plan, String> {
    let frames = frames::collect(request.inputs)?;
    let (out, done): (Box<dyn Write + Send>, HashSet<PathBuf>) = match request.output {
        None => (Box::new(io::stdout()), HashSet::new()),
        Some(path) => {
            refuse_input_as_output(path, request.inputs, &frames)?;
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
fn refuse_input_as_output(
    output: &Path,
    inputs: &[PathBuf],
    frames: &[Frame],
) -> Result<(), String> {
    let Ok(out) = std::fs::metadata(output) else {
        return Ok(()); // A new file cannot be an input.
    };
    let id = (out.dev(), out.ino());
    let named = inputs
        .iter()
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

/// Opens the output, exclusively: a second writer gets an error instead of interleaving lines.
/// Without `--resume` it starts empty; with it, the frames already described are returned and a torn
/// last line (a run killed mid-write, even inside a multi-byte character) is dropped.
fn open_output(path: &Path, resume: bool) -> Result<(File, HashSet<PathBuf>), String> {
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
    // Only now, with the lock held, may the old content go (a device such as /dev/null has none).
    let regular = file.metadata().is_ok_and(|m| m.is_file());
    if !resume {
        if regular {
            file.set_len(0)
                .map_err(|e| format!("cannot empty output {shown}: {e}"))?;
        }
        return Ok((file, HashSet::new()));
    }
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)
        .map_err(|e| format!("cannot read output {shown} to resume: {e}"))?;
    let whole = bytes.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
    if regular {
        file.set_len(whole as u64)
            .and_then(|()| file.seek(io::SeekFrom::End(0)).map(|_| ()))
            .map_err(|e| format!("cannot prepare output {shown}: {e}"))?;
    }
    Ok((file, already_described(&bytes[..whole])))
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
