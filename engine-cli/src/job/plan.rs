//! Planning a `describe` or `run` job: every input error is found here, before any server starts.
//! The plan holds the items still to answer (after `--resume`), the output (locked against a second
//! writer), and the items that cannot be sent (a non-UTF-8 file name).

use std::collections::HashSet;
use std::fs::File;
use std::io::{self, Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use engine_core::Prompt;
use serde::Serialize;
use serde_json::value::RawValue;

use crate::line::RawLine;
use crate::outfile::{is_our_stdout, open_locked, same_file};

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
    /// `run`: the record, its id exactly as written.
    Record {
        id: Box<RawValue>,
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
    /// `merge` can refuse shards of different inputs, and `--resume` an output of another job.
    pub job: Arc<str>,
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
    /// Every item of the input (of this shard), in order.
    pub items: Vec<Item>,
    /// The input arguments (files and folders): never the output.
    pub inputs: &'a [PathBuf],
    pub output: Option<&'a Path>,
    pub resume: bool,
    /// Files the output must never be (the model, the mmproj, the server program, the schema).
    pub protected: &'a [PathBuf],
    /// The resume key of an earlier output line (the same as [`Item::key`] of its item).
    pub key_of: fn(&RawLine) -> Option<String>,
    /// `--summary`: never an input, a protected file, nor the output.
    pub summary: Option<&'a Path>,
}

pub fn plan(request: Request) -> Result<Plan, String> {
    let lines_to_stdout = request.output.is_none_or(is_our_stdout);
    if let Some(summary) = request.summary
        && lines_to_stdout
        && is_our_stdout(summary)
    {
        return Err(format!(
            "--summary {} is this program's stdout, where the lines go too: the summary would \
             land among them — give --output FILE for the lines, or another file for the summary",
            summary.display()
        ));
    }
    if let Some(summary) = request.summary {
        crate::outfile::check_writable(summary).map_err(|e| format!("--summary {e}"))?;
        let files = request.items.iter().flat_map(|item| &item.files);
        let mut taken = request.inputs.iter().chain(request.protected).chain(files);
        if let Some(input) = taken.find(|input| same_file(input, summary)) {
            return Err(format!(
                "--summary {} is {}, which this run reads: writing it would destroy it — choose \
                 another file",
                summary.display(),
                input.display()
            ));
        }
    }
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
            let (file, done) = open_output(path, request.resume, &request.items, request.key_of)?;
            (Box::new(file), done)
        }
    };
    // Checked once the output exists (it may be new): one file cannot be both.
    if let (Some(summary), Some(output)) = (request.summary, request.output)
        && same_file(output, summary)
    {
        return Err(format!(
            "--summary {} is the --output file: the summary would replace the lines — choose \
             another file",
            summary.display()
        ));
    }
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

/// The output file, emptied only when the first line is written: a run that fails before any frame
/// (too little VRAM, Ctrl-C while waiting for the GPU) leaves the old output as it was.
struct Output {
    file: File,
    empty_first: bool,
}

impl Write for Output {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        self.empty_once()?;
        self.file.write(bytes)
    }

    /// A line is written whole or not at all: a write that fails part way (a full disk) is cut
    /// back to where the line began, so the file keeps only whole lines.
    fn write_all(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.empty_once()?;
        let start = self.file.stream_position()?;
        self.file.write_all(bytes).inspect_err(|_| {
            let _ = self.file.set_len(start);
            let _ = self.file.seek(io::SeekFrom::Start(start));
        })
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

impl Output {
    fn empty_once(&mut self) -> io::Result<()> {
        if self.empty_first {
            self.file.set_len(0)?;
            self.file.seek(io::SeekFrom::Start(0))?;
            self.empty_first = false;
        }
        Ok(())
    }
}

/// Opens the output, exclusively: a second writer gets an error instead of interleaving lines.
/// Without `--resume` it starts empty (from its first line on); with it, see [`earlier`].
fn open_output(
    path: &Path,
    resume: bool,
    items: &[Item],
    key_of: fn(&RawLine) -> Option<String>,
) -> Result<(Output, HashSet<String>), String> {
    let shown = path.display();
    let mut file = open_locked(path)?;
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
    let earlier = earlier(&bytes, items, key_of).map_err(|e| format!("--resume {shown}: {e}"))?;
    if earlier.kept.len() != bytes.len() {
        // Only lines are dropped, so the kept ones move towards the start: written in one go from
        // offset 0, then the rest cut off.
        file.seek(io::SeekFrom::Start(0))
            .and_then(|_| file.write_all(&earlier.kept))
            .and_then(|()| file.set_len(earlier.kept.len() as u64))
            .map_err(|e| format!("cannot prepare output {shown}: {e}"))?;
    }
    file.seek(io::SeekFrom::End(0))
        .map_err(|e| format!("cannot prepare output {shown}: {e}"))?;
    if earlier.retried + earlier.unreadable > 0 {
        eprintln!(
            "cinecut-infer: resuming: dropped {} error line(s) and {} unreadable line(s) from {shown}; \
             their items are tried again",
            earlier.retried, earlier.unreadable
        );
    }
    let output = Output {
        file,
        empty_first: false,
    };
    Ok((output, earlier.done))
}

/// What an earlier output holds for this run.
#[derive(Debug, Default)]
struct Earlier {
    /// The keys of the items it answered.
    done: HashSet<String>,
    /// Its answered lines, whole, in their order: the output this run appends to.
    kept: Vec<u8>,
    /// Error lines dropped: their items are tried again.
    retried: usize,
    /// Lines that are not whole JSON objects (a torn last line, a corrupt one): dropped.
    unreadable: usize,
}

/// Reads an earlier output for `--resume`: every answered line of an item of this input is kept
/// once; error lines and unreadable lines are dropped (their items are tried again, and end with
/// one line each). An output of another job is refused: a line of an item not in this input, or
/// (for a shard) of another job, or of a sharded run where this one is not, or the other way round.
fn earlier(
    bytes: &[u8],
    items: &[Item],
    key_of: fn(&RawLine) -> Option<String>,
) -> Result<Earlier, String> {
    let ours: HashSet<&str> = items.iter().map(|item| item.key.as_str()).collect();
    let job = items
        .first()
        .and_then(|item| item.position.as_ref())
        .map(|p| &*p.job);
    let mut found = Earlier::default();
    for (n, line) in bytes.split_inclusive(|b| *b == b'\n').enumerate() {
        let at = n + 1;
        let Some(parsed) = RawLine::parse(line).filter(|_| line.ends_with(b"\n")) else {
            found.unreadable += 1;
            continue;
        };
        let Some(key) = key_of(&parsed) else {
            found.unreadable += 1;
            continue;
        };
        let theirs = parsed.get::<String>("job");
        match (job, theirs.as_deref()) {
            (Some(ours), Some(theirs)) if ours != theirs => {
                return Err(another_job(
                    at,
                    &format!("of job {theirs}, and this shard's input is job {ours}"),
                ));
            }
            (Some(_), None) => {
                return Err(another_job(
                    at,
                    "of an unsharded run, and this run is a shard",
                ));
            }
            (None, Some(theirs)) => {
                return Err(another_job(
                    at,
                    &format!("of a shard (job {theirs}), and this run is not sharded"),
                ));
            }
            _ => {}
        }
        if !ours.contains(key.as_str()) {
            return Err(another_job(at, "of an item that is not in this input"));
        }
        if parsed.has("error") {
            found.retried += 1;
        } else if found.done.insert(key) {
            found.kept.extend_from_slice(line);
        }
    }
    Ok(found)
}

fn another_job(line: usize, why: &str) -> String {
    format!(
        "line {line} is {why}: the output is another job's — resume with the input and shard that \
         wrote it, or run without --resume to start over"
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frames;
    use serde_json::json;

    fn frame_item(path: &str) -> Item {
        Item {
            head: Head::Frame {
                frame_path: path.into(),
                timestamp_s: None,
                source: None,
            },
            key: frames::key(Path::new(path)),
            prompt: Err(String::new()),
            files: Vec::new(),
            position: None,
        }
    }

    fn lines(values: &[serde_json::Value]) -> Vec<u8> {
        values
            .iter()
            .map(|v| format!("{v}\n"))
            .collect::<String>()
            .into_bytes()
    }

    #[test]
    fn resume_keeps_each_answer_once_and_drops_errors_and_corrupt_lines() {
        let items = [
            frame_item("frames/a.jpg"),
            frame_item("/b.jpg"),
            frame_item("/c.jpg"),
        ];
        let mut bytes = lines(&[
            json!({"frame_path": "/b.jpg", "error": "x"}),
            json!({"frame_path": "frames/a.jpg", "scene": {}}),
        ]);
        bytes.extend_from_slice(b"{\"frame_pa\n");
        bytes.extend_from_slice(&lines(&[
            json!({"frame_path": "./frames//a.jpg", "scene": {}}),
            json!({"frame_path": "/b.jpg", "scene": {}}),
        ]));
        bytes.extend_from_slice(b"{\"frame_path\": \"/c.jpg\", \"sce");
        let found = earlier(&bytes, &items, frames::key_of_line).unwrap();
        assert_eq!(found.done.len(), 2);
        assert!(found.done.contains(&frames::key(Path::new("/b.jpg"))));
        assert_eq!((found.retried, found.unreadable), (1, 2));
        let kept = String::from_utf8(found.kept).unwrap();
        assert_eq!(kept.lines().count(), 2, "{kept}");
        assert!(
            kept.starts_with("{\"frame_path\":\"frames/a.jpg\""),
            "{kept}"
        );
    }

    #[test]
    fn an_output_of_another_job_is_refused() {
        let mut shard = frame_item("/a.jpg");
        shard.position = Some(Place {
            index: 0,
            of: 2,
            job: "mine".into(),
        });
        let cases = [
            (
                vec![frame_item("/a.jpg")],
                json!({"frame_path": "/z.jpg", "scene": {}}),
                "not in this input",
            ),
            (
                vec![frame_item("/a.jpg")],
                json!({"frame_path": "/a.jpg", "job": "j", "scene": {}}),
                "this run is not sharded",
            ),
            (
                vec![shard],
                json!({"frame_path": "/a.jpg", "job": "theirs", "scene": {}}),
                "of job theirs",
            ),
        ];
        for (items, line, needle) in cases {
            let err = earlier(&lines(&[line]), &items, frames::key_of_line).unwrap_err();
            assert!(
                err.contains(needle) && err.contains("without --resume"),
                "{err}"
            );
        }
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
        let items = [frame_item("/é.jpg"), frame_item("/è.jpg")];
        let (_file, done) = open_output(&path, true, &items, frames::key_of_line).unwrap();
        assert_eq!(done.len(), 1);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), whole);
    }
}
