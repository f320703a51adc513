//! What `run` answers: `.jsonl` files of records `{"id", "text", "images", "source"}`, each a
//! request (text and images optional, at least one present). Image paths are relative to the file.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::Value;

/// One input line of `run`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Record {
    /// Names the record in the output: a string or a number.
    pub id: Value,
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
        let text = std::fs::read_to_string(file)
            .map_err(|e| format!("cannot read {}: {e}", file.display()))?;
        let folder = file.parent().unwrap_or(Path::new(""));
        for (n, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let at = format!("{} line {}", file.display(), n + 1);
            let mut record: Record = serde_json::from_str(line).map_err(|e| {
                format!(
                    "{at}: not a record ({e}); expected {{\"id\": ..., \"text\": \"...\", \"images\": [\"path\", ...]}}"
                )
            })?;
            if !(record.id.is_string() || record.id.is_number()) {
                return Err(format!(
                    "{at}: id {} must be a string or a number",
                    record.id
                ));
            }
            if record.text.as_deref().is_none_or(str::is_empty) && record.images.is_empty() {
                return Err(format!(
                    "{at}: record {} has neither text nor images — give at least one",
                    record.id
                ));
            }
            if let Some(first) = seen.insert(key(&record.id), at.clone()) {
                return Err(format!(
                    "{at}: id {} was already used at {first} — ids must be unique",
                    record.id
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

/// The resume key of an id: its JSON text (`"7"` and `7` are different ids).
pub fn key(id: &Value) -> String {
    id.to_string()
}

/// The resume key of an earlier output line of `run`.
pub fn key_of_line(line: &Value) -> Option<String> {
    line.get("id").map(key)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use serde_json::json;

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
        assert_eq!(records[0].id, json!("b"));
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
}
