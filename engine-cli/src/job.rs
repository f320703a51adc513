//! Running a planned `describe` or `run` job: the engine's lifecycle, every item in order into the
//! output, Ctrl-C and SIGTERM honoured from the first moment (while waiting for the GPU lock and while
//! the model loads too), and the counts for the summary.

use std::ops::ControlFlow;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use engine_core::{
    EngineConfig, EngineError, EnginePool, InferenceError, LockError, Prompt, WhenLocked,
};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::output::OrderedLines;
use crate::plan::{Head, Item, Plan};
use crate::progress::{Progress, Style};
use crate::summary::{Kind, Summary};

/// One output line: the head, then the answer (`scene` for `describe`, `result` for `run`) or `error`;
/// under `--shard`, `index` and `of` too.
#[derive(Serialize)]
struct Line<'a, T> {
    #[serde(flatten)]
    head: &'a Head,
    #[serde(skip_serializing_if = "Option::is_none")]
    index: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    of: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    job: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    scene: Option<&'a T>,
    #[serde(skip_serializing_if = "Option::is_none")]
    result: Option<&'a T>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

impl<'a, T: Serialize> Line<'a, T> {
    fn new(kind: Kind, item: &'a Item, answer: Result<&'a T, String>) -> Self {
        let (ok, error) = match answer {
            Ok(answer) => (Some(answer), None),
            Err(e) => (None, Some(e)),
        };
        let (scene, result) = match kind {
            Kind::Frames => (ok, None),
            Kind::Records => (None, ok),
        };
        Line {
            head: &item.head,
            index: item.position.as_ref().map(|p| p.index),
            of: item.position.as_ref().map(|p| p.of),
            job: item.position.as_ref().map(|p| &*p.job),
            scene,
            result,
            error,
        }
    }

    fn json(&self) -> String {
        serde_json::to_string(self).expect("a line of strings, numbers and JSON serialises")
    }
}

/// How the engines could not be brought up.
pub enum StartError {
    /// A signal arrived first; everything was cleaned up.
    Interrupted,
    /// Why (each GPU's reason, for several).
    Failed(String),
}

fn cancelled(error: &EngineError) -> bool {
    matches!(
        error,
        EngineError::Lock(LockError::Cancelled { .. })
            | EngineError::Inference(InferenceError::StartCancelled)
    )
}

/// Brings one engine per configuration up (in parallel), giving up (cleanly) as soon as `stop` is
/// set. GPUs left out are reported on stderr.
pub fn start(
    configs: Vec<EngineConfig>,
    when_locked: WhenLocked,
    stop: &AtomicBool,
) -> Result<EnginePool, StartError> {
    let several = configs.len() > 1;
    let before_lock = |gpu: u32| {
        if when_locked == WhenLocked::Skip {
            return;
        }
        if let Some(holder) = engine_core::lock::lock_holder(gpu) {
            eprintln!("cinecut-infer: waiting for GPU {gpu}: its lock is held by pid {holder}");
        }
    };
    let pool = match EnginePool::launch_with(configs, when_locked, stop, &before_lock) {
        Ok(pool) => pool,
        Err(e) if e.failures.iter().all(|f| cancelled(&f.error)) => {
            return Err(StartError::Interrupted);
        }
        Err(e) if !several => {
            let only = e.failures.into_iter().next().expect("one failure per GPU");
            return Err(StartError::Failed(only.error.to_string()));
        }
        Err(e) => return Err(StartError::Failed(e.to_string())),
    };
    if stop.load(Ordering::Relaxed) {
        // Some GPUs started before the signal: they are stopped and released like the rest.
        drop(pool);
        return Err(StartError::Interrupted);
    }
    for left in pool.left_out() {
        // A UUID already says "GPU-…".
        let gpu = match &left.gpu {
            engine_core::GpuId::Index(i) => format!("GPU {i}"),
            uuid => uuid.to_string(),
        };
        eprintln!("cinecut-infer: {gpu} left out: {}", left.error);
    }
    if several {
        let gpus: Vec<String> = pool.engines().iter().map(|e| e.gpu().to_string()).collect();
        eprintln!(
            "cinecut-infer: running on GPU {} ({} slots in all)",
            gpus.join(", "),
            pool.slots()
        );
    }
    Ok(pool)
}

/// How a job shows itself: what its items are and how progress is drawn.
#[derive(Debug, Clone, Copy)]
pub struct Show {
    pub kind: Kind,
    pub progress: Style,
}

/// Answers every item of `plan` as a `T` on every engine of `pool` (each with its slots in flight),
/// writes the lines in input order, stops dispatching when `stop` is set, and shuts the engines down.
pub fn run<T>(pool: EnginePool, plan: Plan, stop: &AtomicBool, show: Show) -> Summary
where
    T: Serialize + DeserializeOwned + Send,
{
    let Plan { items, out, .. } = plan;
    let writer = Writer::new(out, items.len(), stop, show);
    // Items that cannot be sent (a file name JSON cannot hold) get their error line at once.
    let todo = writer.unsendable(&items);
    let prompts: Vec<Prompt> = todo
        .iter()
        .filter_map(|&i| items[i].prompt.as_ref().ok().cloned())
        .collect();
    let done = pool.complete_many::<T, _>(&prompts, |k, result| {
        let item = &items[todo[k]];
        let answer = result.as_ref().map_err(|e| e.to_string());
        let line = Line::new(show.kind, item, answer).json();
        writer.put(todo[k], &item.head, line, result.is_ok())
    });
    writer.progress.finish();
    for death in &done.deaths {
        eprintln!(
            "cinecut-infer: GPU {}'s server died ({}); the other GPUs took its {} item(s) in flight",
            death.gpu, death.error, death.handed_over
        );
    }
    if done.answered.len() > 1 {
        let per_gpu: Vec<String> = done
            .answered
            .iter()
            .map(|(gpu, n)| format!("GPU {gpu}: {n}"))
            .collect();
        eprintln!("cinecut-infer: answered per GPU: {}", per_gpu.join(", "));
    }
    let results = done.results;
    let died = |gpu: u32| done.deaths.iter().any(|d| d.gpu == gpu);
    for (gpu, stop) in pool.shutdown() {
        match stop {
            Err(e) if !died(gpu) && !matches!(e, InferenceError::ServerDied { .. }) => {
                eprintln!("cinecut-infer: {e}")
            }
            Ok(report) if !report.left_running.is_empty() => {
                let left: Vec<String> = report.left_running.iter().map(|l| l.to_string()).collect();
                eprintln!(
                    "cinecut-infer: warning: processes of GPU {gpu}'s server could not be \
                     stopped: {}",
                    left.join(", ")
                );
            }
            _ => {}
        }
    }
    let not_attempted = results
        .iter()
        .filter(|r| matches!(r, Err(InferenceError::Cancelled { .. })))
        .count();
    writer.summary(items.len(), not_attempted)
}

/// Writes only the error lines of a plan none of whose items can be sent (no engine is started).
pub fn write_unsendable(plan: Plan, show: Show) -> Summary {
    let never = AtomicBool::new(false);
    let writer = Writer::new(plan.out, plan.items.len(), &never, show);
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
    kind: Kind,
}

impl<'a> Writer<'a> {
    fn new(
        out: Box<dyn std::io::Write + Send>,
        total: usize,
        stop: &'a AtomicBool,
        show: Show,
    ) -> Self {
        Writer {
            lines: OrderedLines::new(out),
            progress: Progress::new(total, show.progress, show.kind.noun()),
            kind: show.kind,
            finished: AtomicUsize::new(0),
            failed: AtomicUsize::new(0),
            write_error: Mutex::new(None),
            stop,
        }
    }

    /// Queues line `index`; says whether the batch should go on.
    fn put(&self, index: usize, head: &Head, line: String, ok: bool) -> ControlFlow<()> {
        if !ok {
            self.failed.fetch_add(1, Ordering::Relaxed);
        }
        if let Err(e) = self.lines.put(index, line, ok) {
            let mut first = self.write_error.lock().unwrap_or_else(|p| p.into_inner());
            first.get_or_insert_with(|| e.to_string());
            return ControlFlow::Break(());
        }
        let n = self.finished.fetch_add(1, Ordering::Relaxed) + 1;
        self.progress
            .tick(n, self.failed.load(Ordering::Relaxed), head, ok);
        if self.stop.load(Ordering::Relaxed) {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    }

    /// Writes the error line of every item that cannot be sent; returns the other indices.
    fn unsendable(&self, items: &[Item]) -> Vec<usize> {
        let mut todo = Vec::new();
        for (index, item) in items.iter().enumerate() {
            match &item.prompt {
                Ok(_) => todo.push(index),
                Err(reason) => {
                    let line = Line::<()>::new(self.kind, item, Err(reason.clone())).json();
                    let _ = self.put(index, &item.head, line, false);
                }
            }
        }
        todo
    }

    fn summary(self, total: usize, not_attempted: usize) -> Summary {
        let written = self.lines.written();
        Summary {
            kind: self.kind,
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
