//! A child's output, drained into bounded buffers: a full pipe can never block the child, and an
//! error can still quote its last lines.

use std::collections::VecDeque;
use std::fmt;
use std::fs::File;
use std::io::{self, Read, Write};
use std::sync::{Condvar, Mutex, PoisonError};
use std::time::Duration;

use crate::util::unpoisoned;

/// How many bytes of each output stream are kept for error messages.
pub(crate) const OUTPUT_RING_BYTES: usize = 64 * 1024;

/// A bounded byte buffer that keeps the newest bytes.
#[derive(Default)]
pub(crate) struct Ring {
    bytes: VecDeque<u8>,
    dropped: u64,
}

impl fmt::Debug for Ring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Ring({} bytes kept, {} dropped)",
            self.bytes.len(),
            self.dropped
        )
    }
}

impl Ring {
    fn push(&mut self, data: &[u8]) {
        self.bytes.extend(data);
        let excess = self.bytes.len().saturating_sub(OUTPUT_RING_BYTES);
        if excess > 0 {
            self.bytes.drain(..excess);
            self.dropped += excess as u64;
        }
    }

    /// Whether older bytes were dropped to stay within the bound.
    pub(crate) fn truncated(&self) -> bool {
        self.dropped > 0
    }

    /// The kept bytes as (lossy) UTF-8.
    pub(crate) fn text(&self) -> String {
        let (a, b) = self.bytes.as_slices();
        let mut all = Vec::with_capacity(a.len() + b.len());
        all.extend_from_slice(a);
        all.extend_from_slice(b);
        String::from_utf8_lossy(&all).into_owned()
    }
}

/// The child's stdout and stderr, each kept to its newest [`OUTPUT_RING_BYTES`]; and, for a child
/// that says when it is ready, whether it has said so.
#[derive(Debug, Default)]
pub(crate) struct Output {
    pub(crate) stdout: Mutex<Ring>,
    pub(crate) stderr: Mutex<Ring>,
    /// How many of the two streams reached EOF, and a signal for each that does.
    closed: (Mutex<u8>, Condvar),
    /// The end of the line that says the child is ready, if it writes one.
    ready_line: Option<&'static str>,
    /// Whether that line was seen (or the child exited), and a signal for either.
    said: (Mutex<Said>, Condvar),
}

/// What the child has said, as far as its owner waits on it.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Said {
    /// The ready line was seen.
    pub(crate) ready: bool,
    /// The child exited.
    pub(crate) exited: bool,
}

impl Output {
    /// Output rings for a child that writes a line ending in `ready_line` when it is ready.
    pub(crate) fn watching(ready_line: Option<&'static str>) -> Output {
        Output {
            ready_line,
            ..Output::default()
        }
    }

    /// Notes that the child exited: a wait on its lines ends.
    pub(crate) fn mark_exited(&self) {
        unpoisoned(&self.said.0).exited = true;
        self.said.1.notify_all();
    }

    /// Waits up to `timeout` for the ready line (or the child's exit); returns what was said.
    pub(crate) fn wait_said(&self, timeout: Duration) -> Said {
        let guard = unpoisoned(&self.said.0);
        let (guard, _) = self
            .said
            .1
            .wait_timeout_while(guard, timeout, |said| !said.ready && !said.exited)
            .unwrap_or_else(PoisonError::into_inner);
        *guard
    }

    /// Whether `line` (without its newline) is the ready line.
    fn check_line(&self, line: &[u8]) {
        let Some(ready) = self.ready_line else {
            return;
        };
        let line = String::from_utf8_lossy(line);
        if line.trim_end().ends_with(ready) {
            unpoisoned(&self.said.0).ready = true;
            self.said.1.notify_all();
        }
    }

    fn mark_closed(&self) {
        *unpoisoned(&self.closed.0) += 1;
        self.closed.1.notify_all();
    }

    /// Waits up to `timeout` for both streams to reach EOF, so that the rings hold all the output of a
    /// child that has exited. Returns whether they did.
    pub(crate) fn wait_closed(&self, timeout: Duration) -> bool {
        let guard = unpoisoned(&self.closed.0);
        let (guard, _) = self
            .closed
            .1
            .wait_timeout_while(guard, timeout, |n| *n < 2)
            .unwrap_or_else(PoisonError::into_inner);
        *guard >= 2
    }

    /// The last `lines` lines of stderr, then of stdout (llama-server logs to stderr).
    pub(crate) fn tail(&self, lines: usize) -> String {
        let mut parts = Vec::new();
        for ring in [&self.stderr, &self.stdout] {
            let text = unpoisoned(ring).text();
            let kept: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
            let start = kept.len().saturating_sub(lines);
            if start < kept.len() {
                parts.push(kept[start..].join("\n"));
            }
        }
        parts.join("\n")
    }
}

/// One of a child's two output streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stream {
    Stdout,
    Stderr,
}

/// Reads `reader` (the child's `stream`) to its end into `output`, copying to `log` when given.
pub(crate) fn drain(
    mut reader: Box<dyn Read + Send>,
    output: &Output,
    stream: Stream,
    log: Option<&Mutex<File>>,
) {
    let ring = match stream {
        Stream::Stdout => &output.stdout,
        Stream::Stderr => &output.stderr,
    };
    let mut buf = [0u8; 16 * 1024];
    // The line being read, for the ready line (a long line is cut: the ready line is short).
    let mut line: Vec<u8> = Vec::new();
    loop {
        match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                unpoisoned(ring).push(&buf[..n]);
                if output.ready_line.is_some() {
                    for piece in buf[..n].split_inclusive(|b| *b == b'\n') {
                        let body = piece.strip_suffix(b"\n");
                        let text = body.unwrap_or(piece);
                        let room = 256usize.saturating_sub(line.len());
                        line.extend_from_slice(&text[..text.len().min(room)]);
                        if body.is_some() {
                            output.check_line(&line);
                            line.clear();
                        }
                    }
                }
                if let Some(log) = log {
                    // A full disk must not stop the drain (the child would block): drop log bytes.
                    let _ = unpoisoned(log).write_all(&buf[..n]);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        }
    }
    output.mark_closed();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ready_line_is_seen_across_reads_and_nothing_else_is() {
        let output = Output::watching(Some("main: model loaded"));
        let (reader, mut writer) = std::io::pipe().unwrap();
        std::thread::scope(|scope| {
            scope.spawn(|| drain(Box::new(reader), &output, Stream::Stderr, None));
            writer
                .write_all(b"srv  load_model: loading model\nsrv     ")
                .unwrap();
            assert_eq!(output.wait_said(Duration::from_millis(50)), Said::default());
            writer
                .write_all(b"     main: model loaded\nsrv  main: listening")
                .unwrap();
            assert!(output.wait_said(Duration::from_secs(10)).ready);
            drop(writer);
        });
    }

    #[test]
    fn ring_keeps_the_newest_bytes() {
        let mut ring = Ring::default();
        ring.push(&vec![b'a'; OUTPUT_RING_BYTES]);
        ring.push(b"tail");
        assert!(ring.truncated());
        let text = ring.text();
        assert_eq!(text.len(), OUTPUT_RING_BYTES);
        assert!(text.ends_with("tail"));
    }
}
