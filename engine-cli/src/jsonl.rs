//! Reading a JSONL input file as a person hands it over: a UTF-8 byte order mark at the start is
//! skipped (editors on other systems write one), blank lines are skipped, and a line that is not
//! UTF-8 is an error that names its line.

use std::path::Path;

/// The non-blank lines of the JSONL file `path`, each with its line number (from 1).
pub fn lines(path: &Path) -> Result<Vec<(usize, String)>, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(&bytes);
    let mut lines = Vec::new();
    for (n, line) in bytes.split(|b| *b == b'\n').enumerate() {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let text = std::str::from_utf8(line).map_err(|e| {
            format!(
                "{} line {}: not UTF-8 text (byte {} is not part of a character) — is this a \
                 JSONL file?",
                path.display(),
                n + 1,
                e.valid_up_to() + 1
            )
        })?;
        if !text.trim().is_empty() {
            lines.push((n + 1, text.to_string()));
        }
    }
    Ok(lines)
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
}
