//! JSON lines written in input order as results arrive out of order, each line whole and flushed,
//! and counted only once written.

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
    next: usize,
    /// Lines waiting for an earlier one, with whether each is a success.
    pending: BTreeMap<usize, (String, bool)>,
    written: Written,
}

/// How many lines reached the output, by outcome.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Written {
    pub ok: usize,
    pub failed: usize,
}

impl<W: Write> OrderedLines<W> {
    pub fn new(out: W) -> Self {
        OrderedLines {
            state: Mutex::new(State {
                out,
                next: 0,
                pending: BTreeMap::new(),
                written: Written::default(),
            }),
        }
    }

    /// Queues line `index` (a success or not) and writes every line that is now in order. A line is
    /// written with its newline in one call and flushed, so an interrupted run leaves only whole lines.
    pub fn put(&self, index: usize, line: String, ok: bool) -> io::Result<()> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.pending.insert(index, (line, ok));
        loop {
            let next = state.next;
            let Some((line, ok)) = state.pending.remove(&next) else {
                break;
            };
            let mut bytes = line.into_bytes();
            bytes.push(b'\n');
            state.out.write_all(&bytes)?;
            state.out.flush()?;
            state.next += 1;
            if ok {
                state.written.ok += 1;
            } else {
                state.written.failed += 1;
            }
        }
        Ok(())
    }

    /// The lines written so far.
    pub fn written(&self) -> Written {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).written
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_come_out_in_input_order() {
        let lines = OrderedLines::new(Vec::new());
        lines.put(2, "c".into(), true).unwrap();
        lines.put(1, "b".into(), false).unwrap();
        assert!(lines.state.lock().unwrap().out.is_empty());
        assert_eq!(lines.written(), Written::default());
        lines.put(0, "a".into(), true).unwrap();
        assert_eq!(lines.written(), Written { ok: 2, failed: 1 });
        let out = lines.state.into_inner().unwrap().out;
        assert_eq!(String::from_utf8(out).unwrap(), "a\nb\nc\n");
    }

    #[test]
    fn a_line_that_could_not_be_written_is_not_counted() {
        let full = std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/full")
            .unwrap();
        let lines = OrderedLines::new(full);
        assert!(lines.put(0, "a".into(), true).is_err());
        assert_eq!(lines.written(), Written::default());
    }
}
