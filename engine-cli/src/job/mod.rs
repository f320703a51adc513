//! What `describe` and `run` share past their inputs: the shard, the plan of the output (every
//! input error before any wait), the engine's launch plan (the GPUs, and the servers and slots of
//! each, from one VRAM reading), serving every item as the GPUs turn ready, one line per item, and
//! the summary with its exit code. The engine does the work; this room translates flags into its
//! [`Launch`] and its results into lines.

mod engines;
mod lines;
pub mod plan;
pub mod progress;
mod shard;
pub mod summary;

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use engine_core::batch::{RunTimes, Summary as RunSummary};
use engine_core::config::Count;
use engine_core::launch::Gpus;
use engine_core::{CancellationToken, EngineConfig, Launch};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::cli::OutputArgs;
use crate::exit::{Exit, Failure, Outcome};
use crate::line::RawLine;
use crate::settings::say;
use engines::Show;
use plan::Item;
use summary::Kind;

/// A job of `describe` or `run`, as planned from its command line.
pub struct Job<'a> {
    pub inputs: &'a [PathBuf],
    pub out: &'a OutputArgs,
    pub gpus: Gpus,
    /// Requests in flight on each GPU, or `auto`.
    pub slots: Count,
    /// Servers on each GPU, or `auto`.
    pub servers: Count,
    /// Files besides the models and the server that the output must never be.
    pub extra_protected: Vec<PathBuf>,
    pub key_of: fn(&RawLine) -> Option<String>,
    pub kind: Kind,
}

/// Plans the job (every input error before any wait), plans the launch (one VRAM reading), starts
/// the engines, answers every item as a `T`, and ends with the summary and its exit code.
pub fn execute<T>(
    config: EngineConfig,
    items: Vec<Item>,
    job: Job,
    stop: &CancellationToken,
) -> Outcome
where
    T: Serialize + DeserializeOwned + Send,
{
    let started = SystemTime::now();
    config.check_model_files().map_err(say)?;
    let mut protected = vec![config.model().to_path_buf(), config.server_bin()];
    protected.extend(config.mmproj().map(Path::to_path_buf));
    protected.extend(job.extra_protected);
    let (noun, done) = (job.kind.noun(), job.kind.done());
    let items = shard::take(items, job.out.shard.as_deref(), job.out.shards)?;
    let request = plan::Request {
        items,
        inputs: job.inputs,
        output: job.out.output.as_deref(),
        resume: job.out.resume,
        protected: &protected,
        key_of: job.key_of,
        summary: job.out.summary.as_deref(),
    };
    let plan = plan::plan(request)?;
    if job.out.resume {
        eprintln!(
            "cinecut-infer: resuming: {} of {} {noun} already {done}",
            plan.skipped,
            plan.skipped + plan.items.len()
        );
    }
    let summary_file = SummaryFile {
        path: job.out.summary.as_deref(),
        skipped: plan.skipped,
    };
    let times = |ready| RunTimes {
        started,
        ready,
        finished: SystemTime::now(),
    };
    if plan.items.is_empty() {
        eprintln!("cinecut-infer: nothing left to do");
        let now = SystemTime::now();
        summary_file.write(&RunSummary::nothing_sent(times(now), 0, 0))?;
        return Ok(Exit::Done);
    }
    let show = Show {
        kind: job.kind,
        progress: job.out.progress,
        timings: job.out.timings,
    };
    if plan.items.iter().all(|item| item.prompt.is_err()) {
        // Nothing the engine could send: no GPU, no server, just the error lines.
        let served = engines::write_unsendable(plan, show, started);
        return finish(served, &summary_file, job.kind);
    }
    let total = plan.items.len();
    let launch = Launch::new(config)
        .began(started)
        .gpus(job.gpus.clone())
        .slots(job.slots)
        .servers_per_gpu(job.servers);
    let not_started = |error: engine_core::EngineError| {
        // No line was written: the summary says so (every item not attempted).
        let now = SystemTime::now();
        let written = summary_file.write(&RunSummary::nothing_sent(times(now), 0, total));
        let failure = if error.is_cancelled() || stop.is_cancelled() {
            Failure::interrupted(format!("interrupted before any of the {noun} was {done}"))
        } else {
            Failure::refused(say(error))
        };
        Err(written.err().unwrap_or(failure))
    };
    let launch = match launch.plan(stop) {
        Ok(launch) => launch,
        Err(error) => return not_started(error),
    };
    let auto = match (job.slots, job.servers) {
        (Count::Auto, Count::Auto) => "--slots auto --servers-per-gpu auto",
        (Count::Auto, _) => "--slots auto",
        _ => "--servers-per-gpu auto",
    };
    engines::say_the_plan(&launch, auto);
    match engines::serve::<T>(launch, plan, stop, show) {
        Ok(served) => finish(served, &summary_file, job.kind),
        Err(error) => not_started(error),
    }
}

/// The end of a run that got past planning: the summary line on stderr, `--summary`'s file, and
/// the exit code.
fn finish(served: engines::Served, file: &SummaryFile, kind: Kind) -> Outcome {
    let run = &served.run;
    eprintln!("cinecut-infer: {}", summary::line(kind, run));
    file.write(run)?;
    if let Some(e) = &served.write_error {
        return Err(Failure::write(format!("writing the output failed: {e}")));
    }
    let exit = summary::exit(run, served.interrupted);
    if exit == Exit::Interrupted {
        eprintln!("cinecut-infer: interrupted; run again with --resume to finish");
    }
    Ok(exit)
}

/// `--summary`'s file, if asked for: the run's summary and the items an earlier run answered
/// (`--resume`), which the run's own counts do not hold.
struct SummaryFile<'a> {
    path: Option<&'a Path>,
    skipped: usize,
}

impl SummaryFile<'_> {
    fn write(&self, run: &RunSummary) -> Result<(), Failure> {
        #[derive(Serialize)]
        struct Contents<'a> {
            #[serde(flatten)]
            run: &'a RunSummary,
            skipped: usize,
        }
        let Some(path) = self.path else {
            return Ok(());
        };
        let contents = Contents {
            run,
            skipped: self.skipped,
        };
        let json = serde_json::to_string_pretty(&contents).expect("a summary serialises");
        // Written also after a Ctrl-C: the summary of an interrupted run is still its summary.
        let never = CancellationToken::new();
        crate::outfile::write_whole(path, format!("{json}\n").as_bytes(), &never).map_err(|e| {
            Failure {
                exit: e.exit,
                message: format!("--summary: {}", e.message),
            }
        })
    }
}
