//! Which frames to describe: files, folders (their `*.jpg`, `*.jpeg`, `*.png`, sorted by name), and
//! `.jsonl` files of `KeyframeRecord`s (what CineCut's keyframe stage writes).

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use engine_core::KeyframeRecord;

const IMAGE_EXTENSIONS: [&str; 3] = ["jpg", "jpeg", "png"];

fn is_image(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

/// A timestamp written into a file name as `..._<seconds>s.jpg` (e.g. `shot_83.25s.jpg`).
pub fn timestamp_from_name(path: &Path) -> Option<f64> {
    let stem = path.file_stem()?.to_str()?;
    let number = stem.strip_suffix('s')?;
    let start = number
        .rfind(|c: char| !(c.is_ascii_digit() || c == '.'))
        .map_or(0, |i| i + 1);
    number[start..].parse().ok().filter(|t: &f64| t.is_finite())
}

/// Expands the command line's FRAMES into records, in order. Errors name the argument.
pub fn collect(args: &[PathBuf]) -> Result<Vec<KeyframeRecord>, String> {
    let mut records = Vec::new();
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
            records.extend(images.into_iter().map(record));
        } else if arg.extension().is_some_and(|e| e == "jsonl") {
            records.extend(read_records(arg)?);
        } else {
            records.push(record(arg.clone()));
        }
    }
    if records.is_empty() {
        return Err(
            "no frames given: name image files, folders of images, or .jsonl records".into(),
        );
    }
    Ok(records)
}

fn record(path: PathBuf) -> KeyframeRecord {
    let timestamp = timestamp_from_name(&path).unwrap_or(f64::NAN);
    KeyframeRecord::new(path, timestamp, "cinecut-infer")
}

fn read_records(path: &Path) -> Result<Vec<KeyframeRecord>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    text.lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(n, line)| {
            serde_json::from_str::<KeyframeRecord>(line).map_err(|e| {
                format!(
                    "{} line {}: not a KeyframeRecord ({e}); expected {{\"timestamp_s\":..,\"frame_path\":..,\"source\":..}}",
                    path.display(),
                    n + 1
                )
            })
        })
        .collect()
}

/// Frame paths already described successfully in an earlier run's output (for `--resume`).
pub fn already_described(output: &str) -> HashSet<PathBuf> {
    output
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|v| v.get("scene").is_some())
        .filter_map(|v| v["frame_path"].as_str().map(PathBuf::from))
        .collect()
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
        assert_eq!(timestamp_from_name(Path::new("cuts.jpg")), None);
    }

    #[test]
    fn folders_give_their_images_sorted_by_name() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["b.jpg", "a.PNG", "c.jpeg", "notes.txt"] {
            std::fs::write(dir.path().join(name), b"x").unwrap();
        }
        let records = collect(&[dir.path().to_path_buf()]).unwrap();
        let names: Vec<String> = records
            .iter()
            .map(|r| {
                r.frame_path
                    .file_name()
                    .unwrap()
                    .to_string_lossy()
                    .into_owned()
            })
            .collect();
        assert_eq!(names, ["a.PNG", "b.jpg", "c.jpeg"]);
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
    fn resume_skips_only_successful_frames() {
        let output = "{\"frame_path\":\"/a.jpg\",\"scene\":{}}\n{\"frame_path\":\"/b.jpg\",\"error\":\"x\"}\n{\"frame_pa";
        let done = already_described(output);
        assert!(done.contains(Path::new("/a.jpg")));
        assert!(!done.contains(Path::new("/b.jpg")));
        assert_eq!(done.len(), 1);
    }
}
