//! Reading a JSONL input file as a person hands it over: a UTF-8 byte order mark at the start is
//! skipped (editors on other systems write one), blank lines are skipped, and a line that is not
//! UTF-8, or longer than [`MAX_LINE`] (`/dev/zero` has no end of line), is an error that names its
//! line.

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;

/// The longest line read: far beyond any line this program writes or takes (a record's text, a
/// frame's line with its timings), and a bound on the memory one line can take.
pub const MAX_LINE: u64 = 16 << 20;

/// The non-blank lines of the JSONL file `path`, each with its line number (from 1).
pub fn lines(path: &Path) -> Result<Vec<(usize, String)>, String> {
    let mut lines = Vec::new();
    each_line(path, |n, text, _| {
        lines.push((n, text.to_string()));
        Ok(())
    })?;
    Ok(lines)
}

/// Calls `each(number, text, ended)` for every non-blank line of `path` in turn (`ended`: the line
/// ends with a newline, so it is no torn last line), reading the file as it goes (never all of it
/// at once); stops at the first error, `each`'s or the file's.
pub fn each_line(
    path: &Path,
    mut each: impl FnMut(usize, &str, bool) -> Result<(), String>,
) -> Result<(), String> {
    let cannot = |e: std::io::Error| format!("cannot read {}: {e}", path.display());
    let mut reader = BufReader::new(File::open(path).map_err(cannot)?);
    let mut line = Vec::new();
    let mut n = 0;
    loop {
        line.clear();
        let read = (&mut reader)
            .take(MAX_LINE + 1)
            .read_until(b'\n', &mut line)
            .map_err(cannot)?;
        if read == 0 {
            return Ok(());
        }
        n += 1;
        let ended = line.ends_with(b"\n");
        if !ended && line.len() as u64 > MAX_LINE {
            return Err(format!(
                "{} line {n} is longer than {} MiB: not a line of JSON this program reads",
                path.display(),
                MAX_LINE >> 20
            ));
        }
        let mut bytes = line.strip_suffix(b"\n").unwrap_or(&line);
        bytes = bytes.strip_suffix(b"\r").unwrap_or(bytes);
        if n == 1 {
            bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
        }
        let text = std::str::from_utf8(bytes).map_err(|e| {
            format!(
                "{} line {n}: not UTF-8 text (byte {} is not part of a character) — is this a \
                 JSONL file?",
                path.display(),
                e.valid_up_to() + 1
            )
        })?;
        if !text.trim().is_empty() {
            each(n, text, ended)?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_byte_order_mark_is_skipped_and_binary_names_its_line() {
        let dir = tempfile::tempdir().unwrap();
        let bom = dir.path().join("bom.jsonl");
        std::fs::write(&bom, b"\xEF\xBB\xBF{\"id\":1}\r\n\n{\"id\":2}\n").unwrap();
        let read = lines(&bom).unwrap();
        assert_eq!(read, [(1, "{\"id\":1}".into()), (3, "{\"id\":2}".into())]);
        let binary = dir.path().join("bin.jsonl");
        std::fs::write(&binary, b"{\"id\":1}\n\x89PNG\r\n\x1a\n").unwrap();
        let err = lines(&binary).unwrap_err();
        assert!(err.contains("bin.jsonl line 2: not UTF-8"), "{err}");
    }

    #[test]
    fn a_line_without_end_is_refused_at_its_bound() {
        let err = lines(Path::new("/dev/zero")).unwrap_err();
        assert!(err.contains("line 1 is longer than 16 MiB"), "{err}");
    }
}
