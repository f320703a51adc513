//! `cinecut-infer merge OUT SHARD...`: the outputs of a sharded job as one JSONL in the original
//! input order. Each line of a shard carries `index` (its position in the whole input), `of` (the
//! input's length) and `job` (a name of the whole input); the merged lines drop them and keep every
//! other value exactly as written.
//!
//! OUT is written whole or not at all (`outfile::write_whole`): a regular file (or a new one) is replaced by a temporary file
//! created beside it (exclusively, never through a link, under an unpredictable name) and renamed
//! over it, while OUT's lock is held (the lock `--output` takes, so a run writing OUT is never
//! clobbered). A symlink OUT stands for the file it points to, which is replaced; the link stays.
//! A special file (a terminal, a pipe, `/dev/stdout`, `/dev/null`) is written in place.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::cli::MergeArgs;
use crate::exit::{Exit, Failure, Outcome};
use crate::line::RawLine;
use crate::outfile::{same_file, write_whole};

/// What a merge found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Merged {
    /// Lines written.
    pub written: usize,
    /// The input's length, as the shards give it.
    pub total: usize,
    /// How many positions no shard has a line for, and the first ten of them.
    pub missing: usize,
    pub first_missing: Vec<usize>,
    /// Positions that lines of more than one shard answered (the successful line is kept, else the
    /// first).
    pub duplicates: Vec<usize>,
    /// Lines that are error lines, and the first ten of their positions.
    pub failed: usize,
    pub first_failed: Vec<usize>,
    /// Lines that could not be read, by shard and line number.
    pub unreadable: Vec<String>,
}

/// `merge`: reads the shards, writes OUT, reports on stderr; exit 1 when any item is missing or
/// ended in an error line (the job is not done: its shards run again with `--resume`).
pub fn command(args: MergeArgs) -> Outcome {
    let stop = crate::signals::stop_on_signals();
    let merged = merge_into(&args.out, &args.shards, &stop)?;
    for line in &merged.unreadable {
        eprintln!("cinecut-infer: skipped {line}");
    }
    eprintln!(
        "cinecut-infer: merged {} of {} items into {} ({} of them error lines)",
        merged.written,
        merged.total,
        args.out.display(),
        merged.failed
    );
    if !merged.duplicates.is_empty() {
        eprintln!(
            "cinecut-infer: {} item(s) were in more than one shard (kept once, a success first): {}",
            merged.duplicates.len(),
            list(&merged.duplicates, merged.duplicates.len())
        );
    }
    if merged.missing == 0 && merged.failed == 0 {
        return Ok(Exit::Done);
    }
    if merged.missing > 0 {
        eprintln!(
            "cinecut-infer: {} item(s) missing — run their shards again with --resume: {}",
            merged.missing,
            list(&merged.first_missing, merged.missing)
        );
    }
    if merged.failed > 0 {
        eprintln!(
            "cinecut-infer: {} item(s) ended in an error line — run their shards again with \
             --resume (it tries failed items again): {}",
            merged.failed,
            list(&merged.first_failed, merged.failed)
        );
    }
    Ok(Exit::Incomplete)
}

/// Input positions: the first ten of `count`.
fn list(positions: &[usize], count: usize) -> String {
    let shown: Vec<String> = positions.iter().take(10).map(usize::to_string).collect();
    let more = count.saturating_sub(shown.len());
    if more > 0 {
        format!("positions {} and {more} more", shown.join(", "))
    } else {
        format!("positions {}", shown.join(", "))
    }
}

/// A line kept for a position: its text without `index`/`of`/`job`, whether it is an error, and
/// the shard it came from.
struct Kept {
    line: RawLine,
    error: bool,
    shard: usize,
}

/// Reads `shards`, writes the merged lines to `out`, and says what was missing or doubled. An
/// unreadable shard, a line without `index` and `of`, shards of different inputs, or shards with no
/// line at all are errors that name the file and line.
pub fn merge_into(
    out: &Path,
    shards: &[PathBuf],
    stop: &engine_core::CancellationToken,
) -> Result<Merged, Failure> {
    let (merged, text) = gather(out, shards)?;
    write_whole(out, &text, stop)?;
    Ok(merged)
}

/// The merged lines of `shards` as the text to write, and what was missing or doubled.
fn gather(out: &Path, shards: &[PathBuf]) -> Result<(Merged, Vec<u8>), String> {
    let mut lines: BTreeMap<usize, Kept> = BTreeMap::new();
    let mut merged = Merged::default();
    let mut total: Option<(usize, String)> = None;
    let mut job: Option<(String, String)> = None;
    for (s, shard) in shards.iter().enumerate() {
        if same_file(shard, out) {
            return Err(format!(
                "the output {} is one of the shards: choose another file",
                out.display()
            ));
        }
        let bytes = std::fs::read(shard)
            .map_err(|e| format!("cannot read shard {}: {e}", shard.display()))?;
        let count = bytes.split_inclusive(|b| *b == b'\n').count();
        for (n, text) in bytes.split_inclusive(|b| *b == b'\n').enumerate() {
            let at = || format!("{} line {}", shard.display(), n + 1);
            if text.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let Some(line) = RawLine::parse(text) else {
                merged
                    .unreadable
                    .push(if n + 1 == count && !text.ends_with(b"\n") {
                        format!("{}: a torn last line (an interrupted shard)", at())
                    } else {
                        format!("{}: not a JSON object", at())
                    });
                continue;
            };
            let (Some(index), Some(of)) = (line.get::<usize>("index"), line.get::<usize>("of"))
            else {
                return Err(format!(
                    "{} has no \"index\" and \"of\": merge reads outputs written with --shard",
                    at()
                ));
            };
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
            let name = line.get::<String>("job").unwrap_or_default();
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
            let error = line.has("error");
            let line = line.without(&["index", "of", "job"]);
            match lines.get(&index) {
                Some(kept) => {
                    // A resumed shard answers an item again after its error line: not a double.
                    if kept.shard != s {
                        merged.duplicates.push(index);
                    }
                    if !error && kept.error {
                        lines.insert(
                            index,
                            Kept {
                                line,
                                error,
                                shard: s,
                            },
                        );
                    }
                }
                None => {
                    lines.insert(
                        index,
                        Kept {
                            line,
                            error,
                            shard: s,
                        },
                    );
                }
            }
        }
    }
    let Some((total, _)) = total else {
        return Err(format!(
            "the shards hold no line to merge ({}) — give the shards' output files",
            shards
                .iter()
                .map(|s| s.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ));
    };
    merged.total = total;
    merged.missing = total - lines.len();
    // The first gaps, found among the lines present: never a walk over a claimed length.
    let mut expected = 0;
    for &index in lines.keys() {
        while expected < index && merged.first_missing.len() < 10 {
            merged.first_missing.push(expected);
            expected += 1;
        }
        expected = index + 1;
    }
    while expected < total && merged.first_missing.len() < 10 {
        merged.first_missing.push(expected);
        expected += 1;
    }
    merged.duplicates.sort_unstable();
    merged.duplicates.dedup();
    let failed: Vec<usize> = lines
        .iter()
        .filter(|(_, kept)| kept.error)
        .map(|(&index, _)| index)
        .collect();
    merged.failed = failed.len();
    merged.first_failed = failed.into_iter().take(10).collect();
    merged.written = lines.len();
    let mut text = Vec::new();
    for kept in lines.values() {
        serde_json::to_writer(&mut text, &kept.line).map_err(|e| e.to_string())?;
        text.push(b'\n');
    }
    Ok((merged, text))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// [`merge_into`] without a signal, its failure as its message.
    fn merge(out: &Path, shards: &[PathBuf]) -> Result<Merged, String> {
        merge_into(out, shards, &engine_core::CancellationToken::new()).map_err(|f| f.message)
    }
    use serde_json::{Value, json};

    use crate::outfile::open_locked;
    use crate::records::tests::write as shard;

    fn read(path: &Path) -> Vec<Value> {
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

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
        assert_eq!(
            (merged.missing, merged.first_missing.clone()),
            (2, vec![3, 4])
        );
        assert_eq!(merged.duplicates, [0]);
        assert_eq!((merged.written, merged.failed, merged.total), (3, 0, 5));
        let lines = read(&out);
        assert_eq!(lines[0], json!({"id": "x0", "result": {"retried": true}}));
        assert_eq!(lines[1]["id"], "x1");
        assert_eq!(lines[2]["id"], "x2");
    }

    #[test]
    fn a_resumed_shards_retry_is_not_a_double_and_corrupt_lines_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.jsonl");
        let text = "{\"id\":123456789012345678901234567890,\"index\":0,\"of\":3,\"job\":\"j\",\"error\":\"x\"}\n\
                    not json\n\
                    {\"id\":123456789012345678901234567890,\"index\":0,\"of\":3,\"job\":\"j\",\"result\":{\"a\":1e0}}\n\
                    {\"id\":\"c\",\"index\":2,\"of\":3,\"job\":\"j\",\"res";
        std::fs::write(&path, text).unwrap();
        let out = dir.path().join("out.jsonl");
        let merged = merge(&out, &[path]).unwrap();
        assert!(merged.duplicates.is_empty(), "{merged:?}");
        assert_eq!(merged.unreadable.len(), 2, "{merged:?}");
        assert!(merged.unreadable[0].contains("line 2: not a JSON object"));
        assert!(merged.unreadable[1].contains("line 4: a torn last line"));
        assert_eq!((merged.missing, merged.written), (2, 1));
        // Values kept exactly as written.
        assert_eq!(
            std::fs::read_to_string(&out).unwrap(),
            "{\"id\":123456789012345678901234567890,\"result\":{\"a\":1e0}}\n"
        );
    }

    #[test]
    fn a_huge_claimed_length_is_counted_not_walked_and_no_lines_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let a = shard(
            dir.path(),
            "a.jsonl",
            &[json!({"id": 1, "index": 5, "of": 1_000_000_000_000u64, "job": "j", "result": {}})],
        );
        let merged = merge(&dir.path().join("o.jsonl"), &[a]).unwrap();
        assert_eq!(merged.missing, 999_999_999_999);
        assert_eq!(merged.first_missing, [0, 1, 2, 3, 4, 6, 7, 8, 9, 10]);
        let empty = shard(dir.path(), "e.jsonl", &[]);
        let err = merge(&dir.path().join("o2.jsonl"), &[empty]).unwrap_err();
        assert!(err.contains("no line to merge"), "{err}");
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

    #[test]
    fn a_planted_link_is_never_written_through_and_a_locked_out_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let a = shard(
            dir.path(),
            "a.jsonl",
            &[json!({"id": 1, "index": 0, "of": 1, "job": "j", "result": {}})],
        );
        // The old, predictable temporary name, planted as a link to a file of someone else's.
        let victim = dir.path().join("victim");
        std::fs::write(&victim, "precious").unwrap();
        let out = dir.path().join("out.jsonl");
        std::os::unix::fs::symlink(&victim, dir.path().join(".out.jsonl.writing")).unwrap();
        merge(&out, std::slice::from_ref(&a)).unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
        assert_eq!(read(&out), [json!({"id": 1, "result": {}})]);
        // A symlink OUT: its target is replaced, the link stays.
        let link = dir.path().join("latest.jsonl");
        let target = dir.path().join("run-42.jsonl");
        std::fs::write(&target, "old\n").unwrap();
        std::os::unix::fs::symlink(&target, &link).unwrap();
        merge(&link, std::slice::from_ref(&a)).unwrap();
        assert!(
            std::fs::symlink_metadata(&link)
                .unwrap()
                .file_type()
                .is_symlink()
        );
        assert_eq!(read(&target), [json!({"id": 1, "result": {}})]);
        // OUT locked by a run writing it: refused, OUT untouched.
        let busy = dir.path().join("busy.jsonl");
        std::fs::write(&busy, "{\"run\":1}\n").unwrap();
        let _writer = open_locked(&busy).unwrap();
        let err = merge(&busy, &[a]).unwrap_err();
        assert!(err.contains("being written by another"), "{err}");
        assert_eq!(std::fs::read_to_string(&busy).unwrap(), "{\"run\":1}\n");
        // No temporary file is left behind.
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().contains(".writing-"))
            .collect();
        assert!(left.is_empty());
    }
}
