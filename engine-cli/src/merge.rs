//! `cinecut-infer merge OUT SHARD...`: the outputs of a sharded job as one JSONL in the original
//! input order. Each line of a shard carries `index` (its position in the whole input), `of` (the
//! input's length) and `job` (a name of the whole input); the merged lines drop them.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde_json::Value;

/// What a merge found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Merged {
    /// Lines written.
    pub written: usize,
    /// The input's length, as the shards give it.
    pub total: usize,
    /// Positions no shard has a line for.
    pub missing: Vec<usize>,
    /// Positions more than one shard line answered (the successful line is kept, else the first).
    pub duplicates: Vec<usize>,
    /// Lines that are error lines.
    pub failed: usize,
}

/// Reads `shards`, writes the merged lines to `out` (through a temporary file beside it, renamed
/// into place), and says what was missing or doubled. An unreadable shard, a line without `index`
/// and `of`, or shards of different inputs are errors that name the file and line.
pub fn merge(out: &Path, shards: &[PathBuf]) -> Result<Merged, String> {
    let mut lines: BTreeMap<usize, Value> = BTreeMap::new();
    let mut merged = Merged::default();
    let mut total: Option<(usize, String)> = None;
    let mut job: Option<(String, String)> = None;
    for shard in shards {
        if crate::plan::same_file(shard, out) {
            return Err(format!(
                "the output {} is one of the shards: choose another file",
                out.display()
            ));
        }
        let text = std::fs::read_to_string(shard)
            .map_err(|e| format!("cannot read shard {}: {e}", shard.display()))?;
        for (n, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let at = || format!("{} line {}", shard.display(), n + 1);
            let Ok(mut value) = serde_json::from_str::<Value>(line) else {
                // A torn last line of an interrupted shard: that item is missing, as it is.
                continue;
            };
            let (Some(index), Some(of)) = (value["index"].as_u64(), value["of"].as_u64()) else {
                return Err(format!(
                    "{} has no \"index\" and \"of\": merge reads outputs written with --shard",
                    at()
                ));
            };
            let (index, of) = (index as usize, of as usize);
            match &total {
                None => total = Some((of, at())),
                Some((first, where_first)) if *first != of => {
                    return Err(format!(
                        "{} is from an input of {of} items, but {where_first} from one of {first}: \
                         these shards are not of one job",
                        at()
                    ));
                }
                Some(_) => {}
            }
            let name = value["job"].as_str().unwrap_or_default().to_string();
            match &job {
                None => job = Some((name, at())),
                Some((first, where_first)) if *first != name => {
                    return Err(format!(
                        "{} is from another input than {where_first} (job {name} against \
                         {first}): these shards are not of one job",
                        at()
                    ));
                }
                Some(_) => {}
            }
            if index >= of {
                return Err(format!("{}: index {index} is not below of {of}", at()));
            }
            if let Some(map) = value.as_object_mut() {
                for key in ["index", "of", "job"] {
                    map.remove(key);
                }
            }
            let ok = value.get("error").is_none();
            match lines.get(&index) {
                Some(kept) => {
                    merged.duplicates.push(index);
                    if ok && kept.get("error").is_some() {
                        lines.insert(index, value);
                    }
                }
                None => {
                    lines.insert(index, value);
                }
            }
        }
    }
    let total = total.map_or(0, |(of, _)| of);
    merged.total = total;
    merged.missing = (0..total).filter(|i| !lines.contains_key(i)).collect();
    merged.duplicates.sort_unstable();
    merged.duplicates.dedup();
    merged.failed = lines.values().filter(|v| v.get("error").is_some()).count();
    merged.written = lines.len();
    write_atomically(out, lines.values())?;
    Ok(merged)
}

fn write_atomically<'a>(out: &Path, lines: impl Iterator<Item = &'a Value>) -> Result<(), String> {
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "merged".into());
    let temporary = out.with_file_name(format!(".{name}.merging"));
    let write = || -> std::io::Result<()> {
        let mut file = std::io::BufWriter::new(std::fs::File::create(&temporary)?);
        for line in lines {
            serde_json::to_writer(&mut file, line)?;
            file.write_all(b"\n")?;
        }
        file.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        std::fs::rename(&temporary, out)
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&temporary);
        format!("cannot write {}: {e}", out.display())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    use crate::records::tests::write as shard;

    #[test]
    fn shards_merge_in_input_order_with_gaps_and_doubles_reported() {
        let dir = tempfile::tempdir().unwrap();
        let a = shard(
            dir.path(),
            "a.jsonl",
            &[
                json!({"id": "x2", "index": 2, "of": 5, "job": "j", "result": {}}),
                json!({"id": "x0", "index": 0, "of": 5, "job": "j", "error": "boom"}),
            ],
        );
        let b = shard(
            dir.path(),
            "b.jsonl",
            &[
                json!({"id": "x1", "index": 1, "of": 5, "job": "j", "result": {}}),
                json!({"id": "x0", "index": 0, "of": 5, "job": "j", "result": {"retried": true}}),
            ],
        );
        let out = dir.path().join("all.jsonl");
        let merged = merge(&out, &[a, b]).unwrap();
        assert_eq!(merged.missing, [3, 4]);
        assert_eq!(merged.duplicates, [0]);
        assert_eq!((merged.written, merged.failed, merged.total), (3, 0, 5));
        let lines: Vec<Value> = std::fs::read_to_string(&out)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines[0], json!({"id": "x0", "result": {"retried": true}}));
        assert_eq!(lines[1]["id"], "x1");
        assert_eq!(lines[2]["id"], "x2");
    }

    #[test]
    fn shards_of_different_jobs_and_unsharded_outputs_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let a = shard(
            dir.path(),
            "a.jsonl",
            &[json!({"id": 1, "index": 0, "of": 2, "result": {}})],
        );
        let b = shard(
            dir.path(),
            "b.jsonl",
            &[json!({"id": 2, "index": 0, "of": 3, "result": {}})],
        );
        let plain = shard(dir.path(), "c.jsonl", &[json!({"id": 3, "result": {}})]);
        let out = dir.path().join("out.jsonl");
        let err = merge(&out, &[a.clone(), b]).unwrap_err();
        assert!(err.contains("not of one job"), "{err}");
        // The same length, another input.
        let c = shard(
            dir.path(),
            "c2.jsonl",
            &[json!({"id": 9, "index": 1, "of": 2, "job": "other", "result": {}})],
        );
        let a_job = shard(
            dir.path(),
            "a2.jsonl",
            &[json!({"id": 1, "index": 0, "of": 2, "job": "mine", "result": {}})],
        );
        let err = merge(&out, &[a_job, c]).unwrap_err();
        assert!(
            err.contains("another input") && err.contains("not of one job"),
            "{err}"
        );
        let err = merge(&out, &[plain]).unwrap_err();
        assert!(
            err.contains("c.jsonl line 1") && err.contains("--shard"),
            "{err}"
        );
        let err = merge(&a, std::slice::from_ref(&a)).unwrap_err();
        assert!(err.contains("is one of the shards"), "{err}");
    }
}
