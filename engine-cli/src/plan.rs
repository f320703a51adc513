//! Planning a `describe` or `run` job: every input error is found here, before any server starts.
//! The plan holds the items still to answer (after `--resume`), the output (locked against a second
//! writer), and the items that cannot be sent (a non-UTF-8 file name).

use std::collections::HashSet;
use std::fs::{File, OpenOptions, TryLockError};
use std::io::{self, Read, Seek, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use engine_core::Prompt;
use serde::Serialize;
use serde_json::Value;

/// How an output line names its item: the fields before `scene`/`result`/`error`.
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum Head {
    /// `describe`: the frame.
    Frame {
        frame_path: String,
        /// From the record, or from the file name; null when unknown.
        timestamp_s: Option<f64>,
        #[serde(skip_serializing_if = "Option::is_none")]
        source: Option<String>,
    },
    /// `run`: the record.
    Record {
        id: Value,
        #[serde(skip_serializing_if = "Option::is_none")]
        source: Option<String>,
    },
}

/// One item of this run: its output line's head, its resume key, and what to send.
#[derive(Debug)]
pub struct Item {
    pub head: Head,
    /// The key `--resume` finds it by in an earlier output (see [`Request::key_of`]).
    pub key: String,
    /// The request; `Err` says why it cannot be sent (a non-UTF-8 file name).
    pub prompt: Result<Prompt, String>,
    /// The files it reads: never the output.
    pub files: Vec<PathBuf>,
    /// Under `--shard`: where it is in the whole input (`index`, `of`, `job`).
    pub position: Option<Place>,
}

/// An item's place in a sharded job's whole input.
#[derive(Debug, Clone)]
pub struct Place {
    pub index: usize,
    pub of: usize,
    /// Names the whole input (a hash of its sorted keys): every shard of one job has the same, so
    /// `merge` can refuse shards of different inputs.
    pub job: std::sync::Arc<str>,
}

impl Item {
    /// What `--shard` sorts by: the frame path as the output writes it, or the record id.
    pub fn shard_key(&self) -> String {
        match &self.head {
            Head::Frame { frame_path, .. } => frame_path.clone(),
            Head::Record { id, .. } => crate::records::key(id),
        }
    }
}

/// A planned job.
pub struct Plan {
    /// The items to answer this run, in input order.
    pub items: Vec<Item>,
    /// Items an earlier run already answered (`--resume`).
    pub skipped: usize,
    pub out: Box<dyn Write + Send>,
}

/// What the command line asked for, as planning needs it.
pub struct Request<'a> {
    /// Every item of the input, in order.
    pub items: Vec<Item>,
    /// The input arguments (files and folders): never the output.
    pub inputs: &'a [PathBuf],
    pub output: Option<&'a Path>,
    pub resume: bool,
    /// Files the output must never be (the model, the mmproj, the server program, the schema).
    pub protected: &'a [PathBuf],
    /// The resume key of an earlier output line (the same as [`Item::key`] of its item).
    pub key_of: fn(&Value) -> Option<String>,
}

pub fn plan(request: Request) -> Result<Plan, String> {
    let (out, done): (Box<dyn Write + Send>, HashSet<String>) = match request.output {
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
            let files = request.items.iter().flat_map(|item| &item.files);
            let protected = request.inputs.iter().chain(request.protected).chain(files);
            refuse_input_as_output(path, protected)?;
            let (file, done) = open_output(path, request.resume, request.key_of)?;
            (Box::new(file), done)
        }
    };
    let total = request.items.len();
    let items: Vec<Item> = request
        .items
        .into_iter()
        .filter(|item| !done.contains(&item.key))
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
) -> Result<(), String> {
    match inputs.into_iter().find(|input| same_file(input, output)) {
        Some(input) => Err(format!(
            "--output {} is the input {}: writing it would destroy it — choose another output file",
            output.display(),
            input.display()
        )),
        None => Ok(()),
    }
}

/// Whether two paths name one file (the same device and inode: links and `..` included); a path
/// that does not exist names no file.
pub(crate) fn same_file(a: &Path, b: &Path) -> bool {
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(a), Ok(b)) => (a.dev(), a.ino()) == (b.dev(), b.ino()),
        _ => false,
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
fn open_output(
    path: &Path,
    resume: bool,
    key_of: fn(&Value) -> Option<String>,
) -> Result<(Output, HashSet<String>), String> {
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
    Ok((output, already_answered(&bytes[..whole], key_of)))
}

/// The keys (by `key_of`) of the items an earlier run's output answers successfully. Lines that are
/// not JSON, or not UTF-8, are skipped: those items are tried again.
pub fn already_answered(output: &[u8], key_of: fn(&Value) -> Option<String>) -> HashSet<String> {
    output
        .split(|b| *b == b'\n')
        .filter_map(|line| serde_json::from_slice::<Value>(line).ok())
        .filter(|v| v.get("scene").is_some() || v.get("result").is_some())
        .filter_map(|v| key_of(&v))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frames;
    use serde_json::json;

    #[test]
    fn resume_skips_only_successful_frames_whatever_their_spelling() {
        let output = [
            json!({"frame_path": "frames/a.jpg", "scene": {}}).to_string(),
            json!({"frame_path": "/b.jpg", "error": "x"}).to_string(),
            "{\"frame_pa".to_string(),
        ]
        .join("\n");
        let done = already_answered(output.as_bytes(), frames::key_of_line);
        assert!(done.contains(&frames::key(Path::new("./frames/a.jpg"))));
        assert!(!done.contains(&frames::key(Path::new("/b.jpg"))));
        assert_eq!(done.len(), 1);
        let run = json!({"id": 7, "result": {}}).to_string();
        let done = already_answered(run.as_bytes(), crate::records::key_of_line);
        assert!(done.contains(&crate::records::key(&json!(7))));
        assert!(!done.contains(&crate::records::key(&json!("7"))));
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
        let (_file, done) = open_output(&path, true, frames::key_of_line).unwrap();
        assert_eq!(done.len(), 1);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), whole);
    }

    #[test]
    fn a_second_writer_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.jsonl");
        let (_first, _) = open_output(&path, false, frames::key_of_line).unwrap();
        let err = open_output(&path, false, frames::key_of_line)
            .err()
            .unwrap();
        assert!(err.contains("being written by another"), "{err}");
    }
}
