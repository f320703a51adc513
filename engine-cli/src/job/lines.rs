//! JSON lines written in input order as results arrive out of order, each line whole and flushed;
//! which lines reached the output.

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::sync::Mutex;

/// Writes line `i` only after lines `0..i`, so the output is always a complete prefix of the input.
#[derive(Debug)]
pub struct OrderedLines<W: Write> {
    state: Mutex<State<W>>,
}

#[derive(Debug)]
struct State<W> {
    out: W,
    /// Lines `0..next` are written.
    next: usize,
    /// Lines waiting for an earlier one.
    pending: BTreeMap<usize, String>,
}

impl<W: Write> OrderedLines<W> {
    pub fn new(out: W) -> Self {
        OrderedLines {
            state: Mutex::new(State {
                out,
                next: 0,
                pending: BTreeMap::new(),
            }),
        }
    }

    /// Queues line `index` and writes every line that is now in order. A line is written with its
    /// newline in one call and flushed, so an interrupted run leaves only whole lines.
    pub fn put(&self, index: usize, line: String) -> io::Result<()> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.pending.insert(index, line);
        loop {
            let next = state.next;
            let Some(line) = state.pending.remove(&next) else {
                break;
            };
            let mut bytes = line.into_bytes();
            bytes.push(b'\n');
            state.out.write_all(&bytes)?;
            state.out.flush()?;
            state.next += 1;
        }
        Ok(())
    }

    /// Whether line `index` reached the output (lines are written in order, so those before the
    /// first one that did not).
    pub fn kept(&self, index: usize) -> bool {
        index < self.state.lock().unwrap_or_else(|p| p.into_inner()).next
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_come_out_in_input_order() {
        let lines = OrderedLines::new(Vec::new());
        lines.put(2, "c".into()).unwrap();
        lines.put(1, "b".into()).unwrap();
        assert!(lines.state.lock().unwrap().out.is_empty());
        assert!(!lines.kept(1));
        lines.put(0, "a".into()).unwrap();
        assert!((0..3).all(|i| lines.kept(i)));
        let out = lines.state.into_inner().unwrap().out;
        assert_eq!(String::from_utf8(out).unwrap(), "a\nb\nc\n");
    }

    #[test]
    fn a_line_that_could_not_be_written_is_not_kept() {
        let full = std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/full")
            .unwrap();
        let lines = OrderedLines::new(full);
        assert!(lines.put(0, "a".into()).is_err());
        assert!(!lines.kept(0));
    }
}
