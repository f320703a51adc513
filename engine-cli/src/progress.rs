//! Progress on stderr: a bar with count, rate and ETA on a terminal, plain periodic lines otherwise.

use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

/// How often plain progress lines are printed.
const PLAIN_EVERY: Duration = Duration::from_secs(5);

#[derive(Debug)]
pub enum Progress {
    Bar(ProgressBar),
    Plain {
        total: usize,
        started: Instant,
        last: Mutex<Instant>,
    },
}

impl Progress {
    pub fn new(total: usize) -> Progress {
        if std::io::stderr().is_terminal() {
            let bar = ProgressBar::new(total as u64);
            bar.set_style(
                ProgressStyle::with_template(
                    "{bar:40} {pos}/{len} frames  {per_sec}  ETA {eta}  {msg}",
                )
                .expect("a valid template"),
            );
            Progress::Bar(bar)
        } else {
            let now = Instant::now();
            Progress::Plain {
                total,
                started: now,
                last: Mutex::new(now),
            }
        }
    }

    /// One more frame finished; `done` in all, `failed` of them failed.
    pub fn tick(&self, done: usize, failed: usize) {
        match self {
            Progress::Bar(bar) => {
                bar.set_position(done as u64);
                if failed > 0 {
                    bar.set_message(format!("{failed} failed"));
                }
            }
            Progress::Plain {
                total,
                started,
                last,
            } => {
                let mut last = last.lock().unwrap_or_else(|p| p.into_inner());
                if last.elapsed() < PLAIN_EVERY && done < *total {
                    return;
                }
                *last = Instant::now();
                let elapsed = started.elapsed().as_secs_f64();
                let rate = done as f64 / elapsed.max(1e-9);
                let eta = (*total - done) as f64 / rate.max(1e-9);
                eprintln!(
                    "progress: {done}/{total} frames, {failed} failed, {rate:.1} frames/s, ETA {eta:.0}s"
                );
            }
        }
    }

    pub fn finish(&self) {
        if let Progress::Bar(bar) = self {
            bar.finish();
        }
    }
}
