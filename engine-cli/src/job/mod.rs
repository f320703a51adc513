//! What `describe` and `run` share past their inputs: the shard, the GPUs, the plan (every input
//! error before any wait), the engines, one line per item, and the summary with its exit code.

mod engines;
mod lines;
pub mod plan;
pub mod progress;
mod shard;
mod slots;
pub mod summary;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::time::SystemTime;

use engine_core::batch::{RunTimes, Summary as RunSummary};
use engine_core::gpu::{Visible, distinct};
use engine_core::pool::WhenLocked;
use engine_core::{EngineConfig, GpuId, Wait};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::cli::{GpuList, OutputArgs};
use crate::line::RawLine;
use crate::settings::say;
use engines::{Show, StartFailed};
use plan::Item;
use summary::{EXIT_INTERRUPTED, Kind};

/// A job of `describe` or `run`, as planned from its command line.
pub struct Job<'a> {
    pub inputs: &'a [PathBuf],
    pub out: &'a OutputArgs,
    pub gpus: Option<GpuList>,
    /// Files besides the models and the server that the output must never be.
    pub extra_protected: Vec<PathBuf>,
    pub key_of: fn(&RawLine) -> Option<String>,
    pub kind: Kind,
    /// `--slots auto`: each GPU's slots from its free VRAM.
    pub auto_slots: bool,
}

/// Plans the job (every input error before any wait), starts the engines, answers every item as a
/// `T`, and ends with the summary and its exit code.
pub fn execute<T>(config: EngineConfig, items: Vec<Item>, job: Job, stop: &AtomicBool) -> ExitCode
where
    T: Serialize + DeserializeOwned + Send,
{
    let started = SystemTime::now();
    if let Err(e) = config.check_model_files() {
        return crate::fail(say(e));
    }
    let mut protected = vec![config.model().to_path_buf(), config.server_bin()];
    protected.extend(config.mmproj().map(Path::to_path_buf));
    protected.extend(job.extra_protected);
    let (noun, done) = (job.kind.noun(), job.kind.done());
    let items = match shard::take(items, job.out.shard.as_deref(), job.out.shards) {
        Ok(items) => items,
        Err(e) => return crate::fail(e),
    };
    let (configs, when_locked) = match configs_per_gpu(&config, job.gpus.as_ref(), stop) {
        Ok(pool) => pool,
        Err(e) => return crate::fail(e),
    };
    let configs = if job.auto_slots {
        match slots::resolve(configs, stop) {
            Ok(configs) => configs,
            Err(e) => return crate::fail(e),
        }
    } else {
        configs
    };
    let request = plan::Request {
        items,
        inputs: job.inputs,
        output: job.out.output.as_deref(),
        resume: job.out.resume,
        protected: &protected,
        key_of: job.key_of,
        summary: job.out.summary.as_deref(),
    };
    let plan = match plan::plan(request) {
        Ok(plan) => plan,
        Err(e) => return crate::fail(e),
    };
    if job.out.resume {
        eprintln!(
            "cinecut-infer: resuming: {} of {} {noun} already {done}",
            plan.skipped,
            plan.skipped + plan.items.len()
        );
    }
    let skipped = plan.skipped;
    let unsent = |not_attempted: usize| {
        let now = SystemTime::now();
        let mut run = RunSummary::unsent(
            not_attempted,
            RunTimes {
                started,
                ready: now,
                finished: now,
            },
        );
        (run.failed, run.not_attempted) = (0, not_attempted);
        run
    };
    if plan.items.is_empty() {
        eprintln!("cinecut-infer: nothing left to do");
        return write_summary(job.out.summary.as_deref(), &unsent(0), skipped, 0)
            .unwrap_or(ExitCode::SUCCESS);
    }
    let total = plan.items.len();
    let show = Show {
        kind: job.kind,
        progress: job.out.progress,
        timings: job.out.timings,
    };
    let served = if plan.items.iter().all(|item| item.prompt.is_err()) {
        // Nothing the engine could send: no GPU, no server, just the error lines.
        engines::write_unsendable(plan, show, started)
    } else {
        match engines::serve::<T>(configs, when_locked, plan, stop, show, started) {
            Ok(served) => served,
            Err(failed) => {
                // No line was written: the summary says so (every item not attempted).
                let code = match failed {
                    StartFailed::Interrupted => {
                        eprintln!("cinecut-infer: interrupted before any of the {noun} was {done}");
                        ExitCode::from(EXIT_INTERRUPTED)
                    }
                    StartFailed::Failed(e) => crate::fail(e),
                };
                let summary_path = job.out.summary.as_deref();
                return write_summary(summary_path, &unsent(total), skipped, 0).unwrap_or(code);
            }
        }
    };
    let summary = served.summary;
    eprintln!("cinecut-infer: {}", summary.line());
    let not_written = summary.unwritten();
    if let Some(failed) = write_summary(
        job.out.summary.as_deref(),
        &served.run,
        skipped,
        not_written,
    ) {
        return failed;
    }
    if let Some(e) = &summary.write_error {
        eprintln!("cinecut-infer: error: writing the output failed: {e}");
    }
    if summary.unfinished() {
        eprintln!("cinecut-infer: interrupted; run again with --resume to finish");
    }
    summary.exit_code()
}

/// `--summary`'s file: the run's summary, and what the lines do not show of it: the items an earlier
/// run answered (`--resume`) and the items answered but whose lines could not be written.
#[derive(Serialize)]
struct SummaryFile<'a> {
    #[serde(flatten)]
    run: &'a RunSummary,
    skipped: usize,
    not_written: usize,
}

/// Writes `--summary`'s file, if asked for; the exit code to end with when it cannot be written.
fn write_summary(
    path: Option<&Path>,
    run: &RunSummary,
    skipped: usize,
    not_written: usize,
) -> Option<ExitCode> {
    let path = path?;
    let file = SummaryFile {
        run,
        skipped,
        not_written,
    };
    let json = serde_json::to_string_pretty(&file).expect("a summary serialises");
    let written = crate::outfile::write_whole(path, format!("{json}\n").as_bytes());
    written.err().map(|e| {
        eprintln!("cinecut-infer: error: --summary: {e}");
        ExitCode::from(summary::EXIT_FRAMES_FAILED)
    })
}

/// One configuration per GPU of `--gpus` (each on a free port), or just `config`; and whether a
/// locked GPU is waited for (named GPUs) or left out (`all`). A GPU named twice is refused here
/// (the engine's own rule, [`distinct`]); one reading resolves every name.
fn configs_per_gpu(
    config: &EngineConfig,
    gpus: Option<&GpuList>,
    stop: &AtomicBool,
) -> Result<(Vec<EngineConfig>, WhenLocked), String> {
    let Some(gpus) = gpus else {
        return Ok((vec![config.clone()], WhenLocked::Wait));
    };
    let probe = config.vram_probe().map_err(say)?;
    let rows = probe.query(Wait::Until(stop)).map_err(say)?;
    let visible = Visible::from_env();
    let (ids, when_locked) = match gpus {
        GpuList::List(ids) => {
            let (first, again) = distinct(&rows, ids, &visible);
            if let Some((_, twice)) = again.first() {
                return Err(format!("--gpus: {twice}"));
            }
            if let Some((at, Err(e))) = first.iter().find(|(_, r)| r.is_err()) {
                return Err(format!("--gpus {}: {}", ids[*at], say(e)));
            }
            (ids.clone(), WhenLocked::Wait)
        }
        GpuList::All => {
            let ids: Vec<GpuId> = visible
                .rows(&rows)
                .into_iter()
                .map(|row| GpuId::Uuid(row.uuid.clone()))
                .collect();
            if ids.is_empty() {
                return Err(format!(
                    "--gpus all: {} lists no GPU this process may use (check CUDA_VISIBLE_DEVICES)",
                    probe.name()
                ));
            }
            (ids, WhenLocked::Skip)
        }
    };
    let configs = ids
        .into_iter()
        .map(|gpu| config.to_builder().gpu(gpu).port(0).build())
        .collect::<Result<Vec<_>, _>>()
        .map_err(say)?;
    Ok((configs, when_locked))
}
