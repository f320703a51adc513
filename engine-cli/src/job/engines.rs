//! Running a planned `describe` or `run` job on its engines: brought up (in parallel, one per GPU),
//! every item answered and its line written in input order, Ctrl-C and SIGTERM honoured from the
//! first moment (while reading VRAM, waiting for a GPU lock and while the model loads too), and the
//! counts for the summary.

use std::ops::ControlFlow;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Mutex, Once};
use std::time::SystemTime;

use engine_core::batch::{RunTimes, Summary as RunSummary};
use engine_core::error::{LockError, VramError};
use engine_core::pool::{Event, WhenLocked};
use engine_core::request::Answer;
use engine_core::{EngineConfig, EngineError, EnginePool, Prompt, RequestError, StartError, Wait};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::lines::{Ended, OrderedLines};
use super::plan::{Head, Item, Plan};
use super::progress::{Progress, Style};
use super::summary::{Kind, Summary};
use crate::settings::say;

/// One output line: the head, then the answer (`scene` for `describe`, `result` for `run`) or `error`;
/// under `--shard`, `index`, `of` and `job` too.
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
    #[serde(skip_serializing_if = "Option::is_none")]
    timings: Option<Cost<'a>>,
}

/// What an answer cost (`--timings`): the time from its first attempt, when it ended (seconds from
/// the run's start), the attempts, the tokens, and the server's own timings of the accepted attempt.
#[derive(Serialize)]
struct Cost<'a> {
    latency_ms: f64,
    finished_s: f64,
    attempts: u32,
    prompt_tokens: u64,
    generated_tokens: u64,
    server: Option<&'a serde_json::Value>,
}

impl<'a, T: Serialize> Line<'a, T> {
    fn new(
        show: Show,
        item: &'a Item,
        answer: Result<&'a Answer<T>, String>,
        finished_s: f64,
    ) -> Self {
        let (ok, error) = match answer {
            Ok(answer) => (Some(answer), None),
            Err(e) => (None, Some(e)),
        };
        let timings = ok.filter(|_| show.timings).map(|a| Cost {
            latency_ms: a.latency.as_secs_f64() * 1000.0,
            finished_s,
            attempts: a.attempts,
            prompt_tokens: a.usage.prompt_tokens,
            generated_tokens: a.usage.generated_tokens,
            server: a.timings.as_ref(),
        });
        let ok = ok.map(|a| &a.value);
        let (scene, result) = match show.kind {
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
            timings,
        }
    }

    fn json(&self) -> String {
        serde_json::to_string(self).expect("a line of strings, numbers and JSON serialises")
    }
}

/// How the engines could not be brought up.
pub enum StartFailed {
    /// A signal arrived first; everything was cleaned up.
    Interrupted,
    /// Why (each GPU's reason, for several).
    Failed(String),
}

fn cancelled(error: &EngineError) -> bool {
    matches!(
        error,
        EngineError::Vram(VramError::Cancelled)
            | EngineError::Lock(LockError::Cancelled { .. })
            | EngineError::Start(StartError::Cancelled)
    )
}

/// Says, before the wait, who holds a GPU's lock that this run is about to wait for: another engine
/// (by its pid, while that process lives) or another process (a `flock` of a GPU job); nothing if
/// the lock is free (a lock file left by a process that died holds nothing).
fn say_who_holds(gpu: u32) {
    if engine_core::gpu::lockfile::is_locked(gpu) != Some(true) {
        return;
    }
    let holder = engine_core::gpu::lockfile::lock_holder(gpu)
        .filter(|pid| std::path::Path::new(&format!("/proc/{pid}")).exists())
        .map_or_else(|| "another process".to_string(), |pid| format!("pid {pid}"));
    let file = engine_core::gpu::lockfile::lock_file_path(gpu)
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    eprintln!("cinecut-infer: waiting for GPU {gpu}: its lock ({file}) is held by {holder}");
}

/// How a job shows itself: what its items are, how progress is drawn, and whether lines carry
/// their cost.
#[derive(Debug, Clone, Copy)]
pub struct Show {
    pub kind: Kind,
    pub progress: Style,
    /// `--timings`: each answer's line gets its cost.
    pub timings: bool,
}

/// What a served job did: its lines' counts, and the run's summary (`--summary`).
pub struct Served {
    pub summary: Summary,
    pub run: RunSummary,
}

/// Brings one engine per configuration up (in parallel) and answers every item of `plan` as a `T`
/// on each as soon as it is ready (each with its slots in flight); writes one line per item in
/// input order, stops dispatching when `stop` is set (giving up starts still under way, cleanly),
/// and shuts the engines down. `started` is when the job began (for the summary's wall time).
pub fn serve<T>(
    configs: Vec<EngineConfig>,
    when_locked: WhenLocked,
    plan: Plan,
    stop: &AtomicBool,
    show: Show,
    started: SystemTime,
) -> Result<Served, StartFailed>
where
    T: Serialize + DeserializeOwned + Send,
{
    let several = configs.len() > 1;
    let Plan { items, out, .. } = plan;
    let writer = Writer::new(out, items.len(), stop, show);
    let todo: Vec<usize> = (0..items.len())
        .filter(|&i| items[i].prompt.is_ok())
        .collect();
    let prompts: Vec<Prompt> = todo
        .iter()
        .filter_map(|&i| items[i].prompt.as_ref().ok().cloned())
        .collect();
    // Items that cannot be sent get their error lines once a server is up (a run that never
    // starts leaves the output as it was).
    let unsendable_written = Once::new();
    let events = |event: Event| match event {
        Event::Locking { gpu } if when_locked == WhenLocked::Wait => say_who_holds(gpu),
        Event::Ready { gpu, slots } => {
            unsendable_written.call_once(|| {
                writer.unsendable(&items);
            });
            if several {
                eprintln!("cinecut-infer: GPU {gpu} ready ({slots} slots); serving");
            }
        }
        Event::LeftOut(left) if several && !stop.load(Ordering::Relaxed) => {
            let why = if cancelled(&left.error) {
                "not needed: every item was done before its server was ready".to_string()
            } else {
                say(&left.error)
            };
            eprintln!("cinecut-infer: {} left out: {why}", left.gpu);
        }
        _ => {}
    };
    let launched = EnginePool::launch_answering::<T, _>(
        configs,
        when_locked,
        Wait::Until(stop),
        &events,
        &prompts,
        |k, outcome| {
            let item = &items[todo[k]];
            let ended = match outcome {
                Ok(_) => Ended::Answered,
                Err(e) if e.not_attempted() => Ended::NotAttempted,
                Err(_) => Ended::Failed,
            };
            let answer = outcome.as_ref().map_err(say);
            let finished_s = started.elapsed().map_or(0.0, |d| d.as_secs_f64());
            let line = Line::new(show, item, answer, finished_s).json();
            writer.put(todo[k], &item.head, line, ended)
        },
    );
    let served = match launched {
        Ok(served) => served,
        Err(e) if e.failures.iter().all(|f| cancelled(&f.error)) => {
            return Err(StartFailed::Interrupted);
        }
        Err(e) if !several => {
            let only = e.failures.into_iter().next().expect("one failure per GPU");
            return Err(StartFailed::Failed(say(only.error)));
        }
        Err(e) => return Err(StartFailed::Failed(say(e))),
    };
    writer.progress.finish();
    let done = &served.batch;
    for server in done.servers.iter().filter(|s| s.died.is_some()) {
        let death = server.died.as_ref().expect("filtered on a death");
        eprintln!(
            "cinecut-infer: GPU {}'s server died ({}); {}",
            server.gpu,
            death.status,
            match server.handed_over {
                0 => "its items' lines say what became of them".to_string(),
                n => format!("the other GPUs took its {n} item(s) in flight"),
            }
        );
    }
    if done.servers.len() > 1 {
        let per_gpu: Vec<String> = done
            .servers
            .iter()
            .map(|s| format!("GPU {}: {}", s.gpu, s.answered))
            .collect();
        eprintln!("cinecut-infer: answered per GPU: {}", per_gpu.join(", "));
    }
    let mut run = done.summary(RunTimes {
        started,
        ready: served.first_ready,
        finished: SystemTime::now(),
    });
    // The items refused before sending are the run's too; and the counts are the lines' (an
    // answer whose line could not be written is not counted as answered).
    run.items = items.len();
    for (gpu, stopped) in served.pool.shutdown() {
        match stopped {
            Err(RequestError::ServerDied { .. }) => {}
            Err(e) => eprintln!("cinecut-infer: {}", say(e)),
            Ok(report) if !report.left_running.is_empty() => {
                let left: Vec<String> = report.left_running.iter().map(|l| l.to_string()).collect();
                eprintln!(
                    "cinecut-infer: warning: processes of GPU {gpu}'s server could not be \
                     stopped: {}",
                    left.join(", ")
                );
            }
            Ok(_) => {}
        }
    }
    let summary = writer.summary(items.len());
    let written = summary.written;
    (run.answered, run.failed, run.not_attempted) =
        (written.answered, written.failed, written.not_attempted);
    if run.wall_s > 0.0 {
        run.items_per_s = run.answered as f64 / run.wall_s;
    }
    Ok(Served { summary, run })
}

/// Writes only the error lines of a plan none of whose items can be sent (no engine is started).
pub fn write_unsendable(plan: Plan, show: Show, started: SystemTime) -> Served {
    let never = AtomicBool::new(false);
    let writer = Writer::new(plan.out, plan.items.len(), &never, show);
    writer.unsendable(&plan.items);
    writer.progress.finish();
    let now = SystemTime::now();
    let times = RunTimes {
        started,
        ready: now,
        finished: now,
    };
    Served {
        summary: writer.summary(plan.items.len()),
        run: RunSummary::unsent(plan.items.len(), times),
    }
}

/// The output side of a run: lines in order, progress, the first write error.
struct Writer<'a> {
    lines: OrderedLines<Box<dyn std::io::Write + Send>>,
    progress: Progress,
    finished: AtomicUsize,
    failed: AtomicUsize,
    write_error: Mutex<Option<String>>,
    stop: &'a AtomicBool,
    show: Show,
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
            show,
            finished: AtomicUsize::new(0),
            failed: AtomicUsize::new(0),
            write_error: Mutex::new(None),
            stop,
        }
    }

    /// Queues line `index`; says whether the batch should go on.
    fn put(&self, index: usize, head: &Head, line: String, ended: Ended) -> ControlFlow<()> {
        let ok = ended == Ended::Answered;
        if !ok {
            self.failed.fetch_add(1, Ordering::Relaxed);
        }
        if let Err(e) = self.lines.put(index, line, ended) {
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
                    let line = Line::<()>::new(self.show, item, Err(reason.clone()), 0.0).json();
                    let _ = self.put(index, &item.head, line, Ended::Failed);
                }
            }
        }
        todo
    }

    fn summary(self, total: usize) -> Summary {
        Summary {
            kind: self.show.kind,
            total,
            written: self.lines.written(),
            write_error: self
                .write_error
                .into_inner()
                .unwrap_or_else(|p| p.into_inner()),
            interrupted: self.stop.load(Ordering::Relaxed),
        }
    }
}
