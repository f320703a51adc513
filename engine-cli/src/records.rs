//! What `run` answers: `.jsonl` files of records `{"id", "text", "images", "source"}`, each a
//! request (text and images optional, at least one present). Image paths are relative to the file.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::value::RawValue;

use crate::line::RawLine;

/// One input line of `run`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Record {
    /// Names the record in the output: a string or a number, kept exactly as written.
    pub id: Box<RawValue>,
    /// Sent after the prompt.
    #[serde(default)]
    pub text: Option<String>,
    /// JPEG or PNG files, sent in order (a vision model only).
    #[serde(default)]
    pub images: Vec<PathBuf>,
    /// Copied to the output line.
    #[serde(default)]
    pub source: Option<String>,
}

/// Reads every record of `files`, in order. Errors name the file, the line and the fix; an id that
/// appears twice is an error (the output and `--resume` name records by id).
pub fn collect(files: &[PathBuf]) -> Result<Vec<Record>, String> {
    let mut records = Vec::new();
    let mut seen: HashMap<String, String> = HashMap::new();
    for file in files {
        let folder = file.parent().unwrap_or(Path::new(""));
        for (n, line) in crate::jsonl::lines(file)? {
            let at = format!("{} line {n}", file.display());
            let mut record: Record = serde_json::from_str(&line).map_err(|e| {
                format!(
                    "{at}: not a record ({e}); expected {{\"id\": ..., \"text\": \"...\", \"images\": [\"path\", ...]}}"
                )
            })?;
            let id = record.id.get();
            if !(id.starts_with('"')
                || id.starts_with('-')
                || id.starts_with(|c: char| c.is_ascii_digit()))
            {
                return Err(format!("{at}: id {id} must be a string or a number"));
            }
            if record.text.as_deref().is_none_or(str::is_empty) && record.images.is_empty() {
                return Err(format!(
                    "{at}: record {} has neither text nor images — give at least one",
                    record.id.get()
                ));
            }
            if let Some(first) = seen.insert(key(&record.id), at.clone()) {
                return Err(format!(
                    "{at}: id {} was already used at {first} — ids must be unique",
                    record.id.get()
                ));
            }
            record.images = record.images.iter().map(|p| folder.join(p)).collect();
            records.push(record);
        }
    }
    if records.is_empty() {
        return Err("no records given: name .jsonl files of {\"id\", \"text\", \"images\"}".into());
    }
    Ok(records)
}

/// The key of an id: its JSON text exactly as written (`"7"` and `7`, `1` and `1.0`, are different
/// ids; a number is never rounded).
pub fn key(id: &RawValue) -> String {
    id.get().to_string()
}

/// The resume key of an earlier output line of `run`.
pub fn key_of_line(line: &RawLine) -> Option<String> {
    line.raw("id").map(key)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use serde_json::{Value, json};

    /// Writes `lines` as the JSONL file `dir/name` (the merge tests write their shards with it).
    pub(crate) fn write(dir: &Path, name: &str, lines: &[Value]) -> PathBuf {
        let path = dir.join(name);
        let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn records_keep_their_order_and_images_are_relative_to_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = write(
            dir.path(),
            "in.jsonl",
            &[
                json!({"id": "b", "text": "second"}),
                json!({"id": 1, "images": ["kf/a.jpg", "/abs.png"], "source": "cut"}),
            ],
        );
        let records = collect(&[file]).unwrap();
        assert_eq!(records[0].id.get(), "\"b\"");
        assert_eq!(records[1].images[0], dir.path().join("kf/a.jpg"));
        assert_eq!(records[1].images[1], Path::new("/abs.png"));
        assert_eq!(records[1].source.as_deref(), Some("cut"));
    }

    #[test]
    fn each_bad_record_is_named_with_its_line() {
        let dir = tempfile::tempdir().unwrap();
        for (lines, needle) in [
            (
                vec![json!({"id": 1})],
                "line 1: record 1 has neither text nor images",
            ),
            (
                vec![json!({"id": [1], "text": "x"})],
                "must be a string or a number",
            ),
            (
                vec![json!({"id": 1, "text": "x", "image": "a.jpg"})],
                "unknown field `image`",
            ),
            (
                vec![json!({"id": 1, "text": "x"}), json!({"id": 1, "text": "y"})],
                "line 2: id 1 was already used at",
            ),
            (vec![], "no records given"),
        ] {
            let file = write(dir.path(), "bad.jsonl", &lines);
            let err = collect(&[file]).unwrap_err();
            assert!(err.contains(needle), "{err}");
        }
    }

    #[test]
    fn ids_are_kept_and_told_apart_exactly_as_written() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("ids.jsonl");
        let ids = [
            "123456789012345678901234567890",
            "123456789012345678901234567891",
            "1e0",
            "1",
            "1.0",
            "-0",
            "0",
            "\"1\"",
        ];
        let text: String = ids
            .iter()
            .map(|id| format!("{{\"id\": {id}, \"text\": \"x\"}}\n"))
            .collect();
        std::fs::write(&file, text).unwrap();
        let records = collect(&[file]).unwrap();
        let read: Vec<&str> = records.iter().map(|r| r.id.get()).collect();
        assert_eq!(read, ids);
    }
}
