//! Which frames to describe: files, folders (their `*.jpg`, `*.jpeg`, `*.png`, sorted by name), and
//! `.jsonl` files of `KeyframeRecord`s (what CineCut's keyframe stage writes).

use std::path::{Path, PathBuf};

const IMAGE_EXTENSIONS: [&str; 3] = ["jpg", "jpeg", "png"];

/// One frame to describe, as given: its timestamp is known from a record or a file name, or not.
#[derive(Debug, Clone, PartialEq)]
pub struct Frame {
    pub path: PathBuf,
    pub timestamp_s: Option<f64>,
    /// The record's `source`; `None` for frames named on the command line or found in a folder.
    pub source: Option<String>,
}

fn is_image(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

/// The timestamp a file name carries: CineCut's keyframe names, `frame_<milliseconds, 10 digits>`
/// (`frame_0000012500.jpg` is 12.5 s), or a `<seconds>s` ending (`shot_83.25s.jpg`).
pub fn timestamp_from_name(path: &Path) -> Option<f64> {
    let stem = path.file_stem()?.to_str()?;
    if let Some(ms) = stem.strip_prefix("frame_")
        && ms.len() == 10
        && ms.bytes().all(|b| b.is_ascii_digit())
    {
        return ms.parse::<u64>().ok().map(|ms| ms as f64 / 1000.0);
    }
    // `<seconds>s` after an underscore, or as the whole name: digits and at most one point.
    let number = stem.strip_suffix('s')?;
    let number = number.rsplit_once('_').map_or(number, |(_, n)| n);
    let plain = !number.is_empty()
        && number.bytes().all(|b| b.is_ascii_digit() || b == b'.')
        && number.bytes().filter(|&b| b == b'.').count() <= 1;
    if !plain {
        return None;
    }
    number.parse().ok().filter(|t: &f64| t.is_finite())
}

/// Expands the command line's FRAMES into frames, in order. Errors name the argument.
pub fn collect(args: &[PathBuf]) -> Result<Vec<Frame>, String> {
    let mut frames = Vec::new();
    for arg in args {
        let meta =
            std::fs::metadata(arg).map_err(|e| format!("cannot read {}: {e}", arg.display()))?;
        if meta.is_dir() {
            let mut images: Vec<PathBuf> = std::fs::read_dir(arg)
                .map_err(|e| format!("cannot list folder {}: {e}", arg.display()))?
                .filter_map(|entry| entry.ok().map(|e| e.path()))
                .filter(|p| p.is_file() && is_image(p))
                .collect();
            if images.is_empty() {
                return Err(format!(
                    "folder {} has no .jpg, .jpeg or .png files",
                    arg.display()
                ));
            }
            images.sort();
            frames.extend(images.into_iter().map(from_name));
        } else if arg.extension().is_some_and(|e| e == "jsonl") {
            frames.extend(read_records(arg)?);
        } else {
            frames.push(from_name(arg.clone()));
        }
    }
    if frames.is_empty() {
        return Err(
            "no frames given: name image files, folders of images, or .jsonl records".into(),
        );
    }
    Ok(frames)
}

fn from_name(path: PathBuf) -> Frame {
    Frame {
        timestamp_s: timestamp_from_name(&path),
        path,
        source: None,
    }
}

/// Reads a `.jsonl` of KeyframeRecords. A relative `frame_path` is relative to the file's folder
/// (where the keyframe stage wrote both), not to wherever the CLI runs.
fn read_records(path: &Path) -> Result<Vec<Frame>, String> {
    let folder = path.parent().unwrap_or(Path::new(""));
    crate::jsonl::lines(path)?
        .into_iter()
        .map(|(n, line)| {
            let record: engine_core::KeyframeRecord = serde_json::from_str(&line).map_err(|e| {
                format!(
                    "{} line {n}: not a KeyframeRecord ({e}); expected {{\"timestamp_s\":..,\"frame_path\":..,\"source\":..}}",
                    path.display(),
                )
            })?;
            Ok(Frame {
                path: folder.join(&record.frame_path),
                timestamp_s: Some(record.timestamp_s).filter(|t| t.is_finite()),
                source: Some(record.source),
            })
        })
        .collect()
}

/// The key under which `--resume` finds a frame: its canonical path (else absolute, else as given),
/// so that `frames/a.jpg`, `./frames//a.jpg` and a path through a symlink are one frame.
pub fn key(path: &Path) -> String {
    std::fs::canonicalize(path)
        .or_else(|_| std::path::absolute(path))
        .unwrap_or_else(|_| path.to_path_buf())
        .to_string_lossy()
        .into_owned()
}

/// The resume key of an earlier output line of `describe`.
pub fn key_of_line(line: &crate::line::RawLine) -> Option<String> {
    line.get::<String>("frame_path").map(|p| key(Path::new(&p)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_come_from_names_that_carry_them() {
        assert_eq!(
            timestamp_from_name(Path::new("shot_83.25s.jpg")),
            Some(83.25)
        );
        assert_eq!(timestamp_from_name(Path::new("/a/12s.png")), Some(12.0));
        assert_eq!(timestamp_from_name(Path::new("frame_0001.jpg")), None);
        assert_eq!(
            timestamp_from_name(Path::new("/kf/frame_0000012500.jpg")),
            Some(12.5)
        );
        assert_eq!(
            timestamp_from_name(Path::new("frame_0005025250.png")),
            Some(5025.25)
        );
        assert_eq!(
            timestamp_from_name(Path::new("frame_00000125000.jpg")),
            None
        );
        assert_eq!(timestamp_from_name(Path::new("cuts.jpg")), None);
        for unclear in [
            "shot_-1s.jpg",
            "shot_1e3s.jpg",
            "scene-12s.jpg",
            "take12s.jpg",
            "a_.s.jpg",
        ] {
            assert_eq!(timestamp_from_name(Path::new(unclear)), None, "{unclear}");
        }
    }

    #[test]
    fn folders_give_their_images_sorted_by_name() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["b.jpg", "a.PNG", "c.jpeg", "notes.txt"] {
            std::fs::write(dir.path().join(name), b"x").unwrap();
        }
        let frames = collect(&[dir.path().to_path_buf()]).unwrap();
        let names: Vec<String> = frames
            .iter()
            .map(|f| f.path.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["a.PNG", "b.jpg", "c.jpeg"]);
        assert!(frames.iter().all(|f| f.timestamp_s.is_none()));
    }

    #[test]
    fn empty_folders_and_missing_paths_are_errors_naming_them() {
        let dir = tempfile::tempdir().unwrap();
        let err = collect(&[dir.path().to_path_buf()]).unwrap_err();
        assert!(err.contains("has no .jpg"), "{err}");
        let missing = dir.path().join("nope");
        let err = collect(std::slice::from_ref(&missing)).unwrap_err();
        assert!(err.contains(&missing.display().to_string()), "{err}");
        assert!(collect(&[]).is_err());
    }

    #[test]
    fn relative_record_paths_are_relative_to_the_records_file() {
        let dir = tempfile::tempdir().unwrap();
        let records = dir.path().join("keyframes.jsonl");
        let lines = [
            serde_json::json!({"timestamp_s": 1.5, "frame_path": "frames/a.jpg", "source": "cut"}),
            serde_json::json!({"timestamp_s": 2.0, "frame_path": "/abs/b.jpg", "source": "sub"}),
        ];
        let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
        std::fs::write(&records, text).unwrap();
        let frames = collect(&[records]).unwrap();
        assert_eq!(frames[0].path, dir.path().join("frames/a.jpg"));
        assert_eq!(frames[0].timestamp_s, Some(1.5));
        assert_eq!(frames[1].path, Path::new("/abs/b.jpg"));
        assert_eq!(frames[1].source.as_deref(), Some("sub"));
    }

    #[test]
    fn every_spelling_of_a_frame_is_one_key() {
        assert_eq!(
            key(Path::new("frames/a.jpg")),
            key(Path::new("./frames//a.jpg"))
        );
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("frames")).unwrap();
        std::fs::write(dir.path().join("frames/a.jpg"), b"x").unwrap();
        std::os::unix::fs::symlink(dir.path().join("frames"), dir.path().join("link")).unwrap();
        let canonical = key(&dir.path().join("frames/a.jpg"));
        assert_eq!(key(&dir.path().join("frames/../frames/a.jpg")), canonical);
        assert_eq!(key(&dir.path().join("link/a.jpg")), canonical);
    }
}
