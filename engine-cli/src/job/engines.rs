//! Running a planned `describe` or `run` job on the engine's launch plan: its GPUs started, every
//! item answered as they turn ready and its line written in input order, Ctrl-C and SIGTERM
//! honoured from the first moment (while waiting for a GPU lock and while the model loads too),
//! and the run's summary from the engine, with what became of each line.

use std::ops::ControlFlow;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, Once};
use std::time::SystemTime;

use engine_core::batch::{Delivery, RunTimes, Summary as RunSummary};
use engine_core::config::counted;
use engine_core::launch::Plan as LaunchPlan;
use engine_core::pool::{Event, WhenLocked};
use engine_core::request::Answer;
use engine_core::{CancellationToken, EngineError, Prompt, RequestError};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::lines::OrderedLines;
use super::plan::{Head, Item, Plan};
use super::progress::Progress;
use super::summary::Kind;
use crate::cli::Style;
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

/// A GPU's servers and slots in words: `4 slots`, `4 servers × 4 slots (16 in all)`, or
/// `2 servers sharing 5 slots` where the split is uneven (the slots are the GPU's, split over its
/// servers).
fn servers_and_slots(servers: u32, slots: u32) -> String {
    if servers == 1 {
        counted(slots, "slot")
    } else if !slots.is_multiple_of(servers) {
        format!(
            "{} sharing {}",
            counted(servers, "server"),
            counted(slots, "slot")
        )
    } else {
        format!(
            "{} × {} ({} in all)",
            counted(servers, "server"),
            counted(slots / servers, "slot"),
            slots
        )
    }
}

/// Says what the launch will start where `auto` chose (the choice and the numbers behind it), and
/// the GPUs it left out while planning.
pub fn say_the_plan(plan: &LaunchPlan, auto: &str) {
    for gpu in plan.gpus() {
        let layout = &gpu.layout;
        if !layout.why.is_empty() {
            eprintln!(
                "cinecut-infer: {auto}: GPU {}: {} — {}",
                gpu.gpu,
                servers_and_slots(layout.servers, layout.slots),
                layout.why
            );
        }
    }
    for left in plan.left_out() {
        eprintln!("cinecut-infer: {} left out: {}", left.gpu, say(&left.error));
    }
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

/// What a served job did: the run's summary (the engine's, with what became of each line), the
/// first write error, and whether a signal came.
pub struct Served {
    pub run: RunSummary,
    pub write_error: Option<String>,
    pub interrupted: bool,
}

/// Starts the launch's GPUs and answers every item of `plan` as a `T` on each as soon as it is
/// ready; writes one line per item in input order, stops dispatching when `stop` is cancelled
/// (giving up starts still under way, cleanly), and shuts the engines down. With no GPU started,
/// the engine's error (no line was written).
pub fn serve<T>(
    launch: LaunchPlan,
    plan: Plan,
    stop: &CancellationToken,
    show: Show,
) -> Result<Served, EngineError>
where
    T: Serialize + DeserializeOwned + Send,
{
    let several = launch.gpus().len() > 1;
    let waits = launch.when_locked() == WhenLocked::Wait;
    let started = launch.began();
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
        Event::Locking { gpu } if waits => say_who_holds(gpu),
        Event::Ready {
            gpu,
            servers,
            slots,
        } => {
            unsendable_written.call_once(|| writer.unsendable(&items));
            if several || servers > 1 {
                let layout = servers_and_slots(servers, slots);
                eprintln!("cinecut-infer: GPU {gpu} ready ({layout}); serving");
            }
        }
        Event::LeftOut(left) if several && !stop.is_cancelled() => {
            let why = if left.error.is_cancelled() {
                "not needed: every item was done before its server was ready".to_string()
            } else {
                say(&left.error)
            };
            eprintln!("cinecut-infer: {} left out: {why}", left.gpu);
        }
        _ => {}
    };
    let served = launch.serve::<T, _>(&prompts, stop, &events, |k, outcome| {
        let item = &items[todo[k]];
        let answer = outcome.as_ref().map_err(say);
        let finished_s = started.elapsed().map_or(0.0, |d| d.as_secs_f64());
        let line = Line::new(show, item, answer, finished_s).json();
        writer.put(todo[k], &item.head, line, outcome.is_ok())
    })?;
    writer.progress.finish();
    let done = &served.batch;
    for server in done.servers.iter().filter(|s| s.died.is_some()) {
        let death = server.died.as_ref().expect("filtered on a death");
        let siblings = done.servers.iter().filter(|s| s.gpu == server.gpu).count();
        let (which, others) = match siblings {
            1 => (format!("GPU {}'s server", server.gpu), "GPUs"),
            n => (
                format!("one of GPU {}'s {n} servers", server.gpu),
                "servers",
            ),
        };
        eprintln!(
            "cinecut-infer: {which} died ({}); {}",
            death.status,
            match server.handed_over {
                0 => "its items' lines say what became of them".to_string(),
                n => format!("the other {others} took its {n} item(s) in flight"),
            }
        );
    }
    let finished = SystemTime::now();
    // An answer whose line did not reach the output is not written; refused items are failed.
    let kept = |k: usize| writer.lines.kept(todo[k]);
    let delivery = Delivery {
        refused: items.len() - todo.len(),
        kept: &kept,
    };
    let run = done.summary_delivered(served.times(finished), delivery);
    if run.gpus.len() > 1 || run.gpus.iter().any(|g| g.servers > 1) {
        let per_gpu: Vec<String> = run
            .gpus
            .iter()
            .map(|g| match g.servers {
                1 => format!("GPU {}: {}", g.gpu, g.answered),
                n => format!("GPU {}: {} ({n} servers)", g.gpu, g.answered),
            })
            .collect();
        eprintln!("cinecut-infer: answered per GPU: {}", per_gpu.join(", "));
    }
    for (gpu, stopped) in served.pool.shutdown() {
        match stopped {
            Err(RequestError::ServerDied { .. }) => {}
            Err(e) => eprintln!("cinecut-infer: {}", say(e)),
            Ok(report) if !report.left_running.is_empty() => {
                let left: Vec<String> = report.left_running.iter().map(|l| l.to_string()).collect();
                eprintln!(
                    "cinecut-infer: warning: processes of a server of GPU {gpu} could not be \
                     stopped: {}",
                    left.join(", ")
                );
            }
            Ok(_) => {}
        }
    }
    Ok(writer.into_served(run))
}

/// Writes only the error lines of a plan none of whose items can be sent (no engine is started).
pub fn write_unsendable(plan: Plan, show: Show, started: SystemTime) -> Served {
    let never = CancellationToken::new();
    let writer = Writer::new(plan.out, plan.items.len(), &never, show);
    writer.unsendable(&plan.items);
    writer.progress.finish();
    let now = SystemTime::now();
    let times = RunTimes {
        started,
        ready: now,
        finished: now,
    };
    writer.into_served(RunSummary::nothing_sent(times, plan.items.len(), 0))
}

/// The output side of a run: lines in order, progress, the first write error.
struct Writer<'a> {
    lines: OrderedLines<Box<dyn std::io::Write + Send>>,
    progress: Progress,
    finished: AtomicUsize,
    failed: AtomicUsize,
    write_error: Mutex<Option<String>>,
    stop: &'a CancellationToken,
    show: Show,
}

impl<'a> Writer<'a> {
    fn new(
        out: Box<dyn std::io::Write + Send>,
        total: usize,
        stop: &'a CancellationToken,
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

    /// Queues line `index`; says whether the batch should go on (not after a failed write: the
    /// items not yet sent are then not attempted).
    fn put(&self, index: usize, head: &Head, line: String, ok: bool) -> ControlFlow<()> {
        if !ok {
            self.failed.fetch_add(1, Ordering::Relaxed);
        }
        if let Err(e) = self.lines.put(index, line) {
            let mut first = self.write_error.lock().unwrap_or_else(|p| p.into_inner());
            first.get_or_insert_with(|| e.to_string());
            return ControlFlow::Break(());
        }
        let n = self.finished.fetch_add(1, Ordering::Relaxed) + 1;
        self.progress
            .tick(n, self.failed.load(Ordering::Relaxed), head, ok);
        if self.stop.is_cancelled() {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    }

    /// Writes the error line of every item that cannot be sent.
    fn unsendable(&self, items: &[Item]) {
        for (index, item) in items.iter().enumerate() {
            if let Err(reason) = &item.prompt {
                let line = Line::<()>::new(self.show, item, Err(reason.clone()), 0.0).json();
                let _ = self.put(index, &item.head, line, false);
            }
        }
    }

    fn into_served(self, run: RunSummary) -> Served {
        Served {
            run,
            write_error: self
                .write_error
                .into_inner()
                .unwrap_or_else(|p| p.into_inner()),
            interrupted: self.stop.is_cancelled(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::servers_and_slots;

    #[test]
    fn an_uneven_split_is_not_shown_as_an_even_one() {
        assert_eq!(servers_and_slots(1, 5), "5 slots");
        assert_eq!(servers_and_slots(4, 16), "4 servers × 4 slots (16 in all)");
        assert_eq!(servers_and_slots(2, 5), "2 servers sharing 5 slots");
    }
}
