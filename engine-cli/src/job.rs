//! Running a planned `describe` job: the engine's lifecycle, every frame in order into the output,
//! Ctrl-C and SIGTERM honoured from the first moment (while waiting for the GPU lock and while the
//! model loads too), and the counts for the summary.

use std::ops::ControlFlow;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use engine_core::typestate::Healthy;
use engine_core::{
    Engine, EngineConfig, EngineError, InferenceError, KeyframeRecord, LockError, SceneDescription,
};
use serde::Serialize;

use crate::output::OrderedLines;
use crate::plan::{Item, Plan};
use crate::progress::Progress;
use crate::summary::Summary;

/// One output line: `{"frame_path","timestamp_s","scene"}` or `{"frame_path","timestamp_s","error"}`.
#[derive(Serialize)]
struct Line<'a> {
    frame_path: &'a str,
    /// From the record, or from a `_<seconds>s` file name; null when unknown.
    timestamp_s: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    scene: Option<&'a SceneDescription>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

impl Line<'_> {
    fn json(&self) -> String {
        serde_json::to_string(self).expect("a line of strings and numbers serialises")
    }
}

/// How the engine could not be brought up.
pub enum StartError {
    /// A signal arrived first; everything was cleaned up.
    Interrupted,
    Failed(EngineError),
}

/// Brings the engine up, giving up (cleanly) as soon as `stop` is set.
pub fn start(config: EngineConfig, stop: &AtomicBool) -> Result<Engine<Healthy>, StartError> {
    let checked = Engine::new(config)
        .check_vram()
        .map_err(|e| StartError::Failed(e.into()))?;
    let gpu = checked.vram().gpu;
    if let Some(holder) = engine_core::lock::lock_holder(gpu) {
        eprintln!("cinecut-infer: waiting for GPU {gpu}: its lock is held by pid {holder}");
    }
    let locked = match checked.lock_cancellable(stop) {
        Ok(locked) => locked,
        Err(LockError::Cancelled { .. }) => return Err(StartError::Interrupted),
        Err(e) => return Err(StartError::Failed(e.into())),
    };
    match locked.start_cancellable(stop) {
        Ok(engine) => Ok(engine),
        Err(InferenceError::StartCancelled) => Err(StartError::Interrupted),
        Err(e) => Err(StartError::Failed(e.into())),
    }
}

/// Describes every item of `plan` with up to `concurrency` in flight, writes the lines in input order,
/// stops dispatching when `stop` is set, and shuts the engine down.
pub fn run(engine: Engine<Healthy>, plan: Plan, concurrency: usize, stop: &AtomicBool) -> Summary {
    let Plan { items, out, .. } = plan;
    let writer = Writer::new(out, items.len(), stop);
    // Frames whose names JSON cannot hold get their error line without being described.
    let todo = writer.unsendable(&items);
    let records: Vec<KeyframeRecord> = todo
        .iter()
        .map(|&i| {
            let frame = &items[i].frame;
            // The engine never reads a record's timestamp; the line takes it from the frame, where
            // "unknown" stays `None`.
            KeyframeRecord::new(
                &frame.path,
                frame.timestamp_s.unwrap_or_default(),
                frame.source.clone(),
            )
        })
        .collect();
    let results = engine.describe_many(&records, concurrency, |k, result| {
        let item = &items[todo[k]];
        let name = item.name.as_deref().unwrap_or_default();
        let line = Line {
            frame_path: name,
            timestamp_s: item.frame.timestamp_s,
            scene: result.as_ref().ok(),
            error: result.as_ref().err().map(|e| e.to_string()),
        };
        writer.put(todo[k], line.json(), result.is_ok())
    });
    writer.progress.finish();
    let dead = results
        .iter()
        .any(|r| matches!(r, Err(InferenceError::ServerDied { .. })));
    match engine.shutdown() {
        Err(e) if !dead => eprintln!("cinecut-infer: {e}"),
        Ok(report) if !report.left_running.is_empty() => {
            let left: Vec<String> = report.left_running.iter().map(|l| l.to_string()).collect();
            eprintln!(
                "cinecut-infer: warning: processes of the server could not be stopped: {}",
                left.join(", ")
            );
        }
        _ => {}
    }
    let not_attempted = results
        .iter()
        .filter(|r| matches!(r, Err(InferenceError::Cancelled { .. })))
        .count();
    writer.summary(items.len(), not_attempted)
}

/// Writes only the error lines of a plan none of whose frames can be sent (no engine is started).
pub fn write_unsendable(plan: Plan) -> Summary {
    let never = AtomicBool::new(false);
    let writer = Writer::new(plan.out, plan.items.len(), &never);
    writer.unsendable(&plan.items);
    writer.progress.finish();
    writer.summary(plan.items.len(), 0)
}

/// The output side of a run: lines in order, progress, the first write error.
struct Writer<'a> {
    lines: OrderedLines<Box<dyn std::io::Write + Send>>,
    progress: Progress,
    finished: AtomicUsize,
    failed: AtomicUsize,
    write_error: Mutex<Option<String>>,
    stop: &'a AtomicBool,
}

impl<'a> Writer<'a> {
    fn new(out: Box<dyn std::io::Write + Send>, total: usize, stop: &'a AtomicBool) -> Self {
        Writer {
            lines: OrderedLines::new(out),
            progress: Progress::new(total),
            finished: AtomicUsize::new(0),
            failed: AtomicUsize::new(0),
            write_error: Mutex::new(None),
            stop,
        }
    }

    /// Queues line `index`; says whether the batch should go on.
    fn put(&self, index: usize, line: String, ok: bool) -> ControlFlow<()> {
        if !ok {
            self.failed.fetch_add(1, Ordering::Relaxed);
        }
        if let Err(e) = self.lines.put(index, line, ok) {
            let mut first = self.write_error.lock().unwrap_or_else(|p| p.into_inner());
            first.get_or_insert_with(|| e.to_string());
            return ControlFlow::Break(());
        }
        let n = self.finished.fetch_add(1, Ordering::Relaxed) + 1;
        self.progress.tick(n, self.failed.load(Ordering::Relaxed));
        if self.stop.load(Ordering::Relaxed) {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    }

    /// Writes the error line of every item whose name JSON cannot hold; returns the other indices.
    fn unsendable(&self, items: &[Item]) -> Vec<usize> {
        let mut todo = Vec::new();
        for (index, item) in items.iter().enumerate() {
            match &item.name {
                Ok(_) => todo.push(index),
                Err(reason) => {
                    let _ = self.put(index, error_line(item, reason.clone()), false);
                }
            }
        }
        todo
    }

    fn summary(self, total: usize, not_attempted: usize) -> Summary {
        let written = self.lines.written();
        Summary {
            total,
            described: written.ok,
            failed: written.failed,
            not_attempted,
            write_error: self
                .write_error
                .into_inner()
                .unwrap_or_else(|p| p.into_inner()),
            interrupted: self.stop.load(Ordering::Relaxed),
        }
    }
}

fn error_line(item: &Item, reason: String) -> String {
    Line {
        frame_path: &item.frame.path.to_string_lossy(),
        timestamp_s: item.frame.timestamp_s,
        scene: None,
        error: Some(reason),
    }
    .json()
}
