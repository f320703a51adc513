//! Progress on stderr: a bar with count, rate and ETA on a terminal, plain periodic lines otherwise,
//! or (`--progress json`) one JSON line per finished item for programs that draw their own bar.

use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use serde_json::value::RawValue;

use super::plan::Head;
use crate::cli::Style;

/// How often plain progress lines are printed.
const PLAIN_EVERY: Duration = Duration::from_secs(5);

#[derive(Debug)]
pub enum Progress {
    Off,
    Json {
        total: usize,
        /// One line at a time, whole.
        stderr: Mutex<()>,
    },
    Bar(ProgressBar),
    Plain {
        total: usize,
        started: Instant,
        last: Mutex<Instant>,
        noun: String,
    },
}

impl Progress {
    pub fn new(total: usize, style: Style, noun: &str) -> Progress {
        if style == Style::Off {
            Progress::Off
        } else if style == Style::Json {
            Progress::Json {
                total,
                stderr: Mutex::new(()),
            }
        } else if std::io::stderr().is_terminal() {
            let bar = ProgressBar::new(total as u64);
            bar.set_style(
                ProgressStyle::with_template(&format!(
                    "{{bar:40}} {{pos}}/{{len}} {noun}  {{per_sec}}  ETA {{eta}}  {{msg}}"
                ))
                .expect("a valid template"),
            );
            Progress::Bar(bar)
        } else {
            let now = Instant::now();
            Progress::Plain {
                total,
                started: now,
                last: Mutex::new(now),
                noun: noun.to_string(),
            }
        }
    }

    /// One more frame finished; `done` in all, `failed` of them failed.
    /// After item `head` finished (`ok` or not): `done` finished so far, `failed` of them failed.
    pub fn tick(&self, done: usize, failed: usize, head: &Head, ok: bool) {
        match self {
            Progress::Off => {}
            Progress::Json { total, stderr } => {
                let line = json_line(done, *total, failed, head, ok);
                let _one_at_a_time = stderr.lock().unwrap_or_else(|p| p.into_inner());
                eprintln!("{line}");
            }
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
                noun,
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
                    "progress: {done}/{total} {noun}, {failed} failed, {rate:.1} {noun}/s, ETA {eta:.0}s"
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

/// `{"done","total","failed","frame_path" or "id","ok"}`.
#[derive(Serialize)]
struct JsonLine<'a> {
    done: usize,
    total: usize,
    failed: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    frame_path: Option<&'a str>,
    /// The record's id exactly as written.
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a RawValue>,
    ok: bool,
}

fn json_line(done: usize, total: usize, failed: usize, head: &Head, ok: bool) -> String {
    let (frame_path, id) = match head {
        Head::Frame { frame_path, .. } => (Some(frame_path.as_str()), None),
        Head::Record { id, .. } => (None, Some(&**id)),
    };
    let line = JsonLine {
        done,
        total,
        failed,
        frame_path,
        id,
        ok,
    };
    serde_json::to_string(&line).expect("a progress line serialises")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    #[test]
    fn a_json_line_names_the_item_by_what_its_output_line_uses() {
        let frame = Head::Frame {
            frame_path: "kf/a.jpg".into(),
            timestamp_s: None,
            source: None,
        };
        let line: Value = serde_json::from_str(&json_line(3, 10, 1, &frame, false)).unwrap();
        assert_eq!(
            line,
            json!({"done": 3, "total": 10, "failed": 1, "frame_path": "kf/a.jpg", "ok": false})
        );
        let record = Head::Record {
            id: RawValue::from_string("1e0".into()).unwrap(),
            source: None,
        };
        assert!(json_line(1, 1, 0, &record, true).contains("\"id\":1e0"));
    }
}
