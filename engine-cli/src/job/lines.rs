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
    /// Lines waiting for an earlier one, with how each item ended.
    pending: BTreeMap<usize, (String, Ended)>,
    written: Written,
}

/// How an item ended, as its line says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    Answered,
    Failed,
    /// Never sent (the run was stopped, or every server died first).
    NotAttempted,
}

/// How many lines reached the output, by how their items ended.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Written {
    pub answered: usize,
    pub failed: usize,
    pub not_attempted: usize,
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

    /// Queues line `index` (its item `ended` so) and writes every line that is now in order. A line
    /// is written with its newline in one call and flushed, so an interrupted run leaves only whole
    /// lines.
    pub fn put(&self, index: usize, line: String, ended: Ended) -> io::Result<()> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.pending.insert(index, (line, ended));
        loop {
            let next = state.next;
            let Some((line, ended)) = state.pending.remove(&next) else {
                break;
            };
            let mut bytes = line.into_bytes();
            bytes.push(b'\n');
            state.out.write_all(&bytes)?;
            state.out.flush()?;
            state.next += 1;
            let count = match ended {
                Ended::Answered => &mut state.written.answered,
                Ended::Failed => &mut state.written.failed,
                Ended::NotAttempted => &mut state.written.not_attempted,
            };
            *count += 1;
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
        lines.put(2, "c".into(), Ended::NotAttempted).unwrap();
        lines.put(1, "b".into(), Ended::Failed).unwrap();
        assert!(lines.state.lock().unwrap().out.is_empty());
        assert_eq!(lines.written(), Written::default());
        lines.put(0, "a".into(), Ended::Answered).unwrap();
        let written = Written {
            answered: 1,
            failed: 1,
            not_attempted: 1,
        };
        assert_eq!(lines.written(), written);
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
        assert!(lines.put(0, "a".into(), Ended::Answered).is_err());
        assert_eq!(lines.written(), Written::default());
    }
}
