//! `cinecut-infer`: describes keyframes into JSON lines through the engine's full lifecycle, and checks
//! whether a GPU has the VRAM to start. `cinecut-infer --help` for usage.

mod frames;
mod output;
mod progress;

use std::fs::OpenOptions;
use std::io::{self, Read, Seek, Write};
use std::ops::ControlFlow;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use engine_core::{Engine, EngineConfig, InferenceError, VRAM_MINIMUM_MIB, query_free_mib};
use serde::Serialize;

use output::OrderedLines;
use progress::Progress;

/// Exit code for bad input or a setup failure (nothing described).
const EXIT_SETUP: u8 = 2;
/// Exit code when some frames failed.
const EXIT_FRAMES_FAILED: u8 = 1;
/// Exit code after SIGINT/SIGTERM (128 + SIGINT, as shells report it).
const EXIT_INTERRUPTED: u8 = 130;

#[derive(Debug, Parser)]
#[command(
    name = "cinecut-infer",
    version,
    about = "Describe film keyframes with a local LLaVA llama-server"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Describe frames into JSON lines: {"frame_path","timestamp_s","scene"} or {"frame_path","error"}.
    Describe(DescribeArgs),
    /// Run only the VRAM check: print each GPU's free memory and whether the engine would start.
    Check(CheckArgs),
}

#[derive(Debug, Args)]
struct DescribeArgs {
    /// The text model GGUF.
    #[arg(long)]
    model: PathBuf,
    /// The vision projector GGUF.
    #[arg(long)]
    mmproj: PathBuf,
    /// The llama-server program (else $LLAMA_SERVER, else llama-server on PATH).
    #[arg(long)]
    server_bin: Option<PathBuf>,
    /// Port on 127.0.0.1; 0 picks a free one.
    #[arg(long, default_value_t = engine_core::DEFAULT_PORT)]
    port: u16,
    /// Parallel slots: requests served at once.
    #[arg(long, default_value_t = 1)]
    slots: u32,
    /// Minimum free VRAM in MiB.
    #[arg(long, default_value_t = VRAM_MINIMUM_MIB)]
    min_vram: u64,
    /// GPU index (nvidia-smi order).
    #[arg(long, default_value_t = 0)]
    gpu: u32,
    /// Startup timeout in seconds.
    #[arg(long, default_value_t = 120.0)]
    timeout: f64,
    /// Per-request timeout in seconds.
    #[arg(long, default_value_t = 120.0)]
    request_timeout: f64,
    /// Write the server's whole log to llama-server.log beside the model.
    #[arg(long)]
    debug: bool,
    /// Write JSON lines to FILE instead of stdout.
    #[arg(long, value_name = "FILE")]
    output: Option<PathBuf>,
    /// Skip frames already described in --output (frames that failed are tried again).
    #[arg(long, requires = "output")]
    resume: bool,
    /// Image files, folders of images (*.jpg, *.jpeg, *.png, by name), or .jsonl KeyframeRecords.
    #[arg(required = true, value_name = "FRAMES")]
    frames: Vec<PathBuf>,
}

#[derive(Debug, Args)]
struct CheckArgs {
    /// GPU index to decide for.
    #[arg(long, default_value_t = 0)]
    gpu: u32,
    /// Minimum free VRAM in MiB.
    #[arg(long, default_value_t = VRAM_MINIMUM_MIB)]
    min_vram: u64,
}

/// One output line: `{"frame_path","timestamp_s","scene"}` or `{"frame_path","timestamp_s","error"}`.
#[derive(Serialize)]
struct Line<'a> {
    frame_path: &'a std::path::Path,
    /// From the record, or from a `_<seconds>s` file name; null when unknown.
    timestamp_s: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    scene: Option<&'a engine_core::SceneDescription>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

fn fail(message: impl std::fmt::Display) -> ExitCode {
    eprintln!("cinecut-infer: error: {message}");
    ExitCode::from(EXIT_SETUP)
}

fn seconds(value: f64, what: &str) -> Result<Duration, String> {
    Duration::try_from_secs_f64(value)
        .ok()
        .filter(|d| !d.is_zero())
        .ok_or_else(|| format!("{what} must be a positive number of seconds, not {value}"))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Describe(args) => describe(args),
        Command::Check(args) => check(args),
    }
}

fn check(args: CheckArgs) -> ExitCode {
    let config = EngineConfig::new("", "")
        .gpu(args.gpu)
        .min_vram_mib(args.min_vram);
    let per_gpu = match query_free_mib(&config) {
        Ok(per_gpu) => per_gpu,
        Err(e) => {
            eprintln!("cinecut-infer: cannot read VRAM: {e}");
            return ExitCode::from(EXIT_FRAMES_FAILED);
        }
    };
    for (index, reading) in per_gpu.iter().enumerate() {
        let chosen = if index == args.gpu as usize {
            " (chosen)"
        } else {
            ""
        };
        match reading {
            Ok(free) => {
                let verdict = if *free >= args.min_vram {
                    "would start"
                } else {
                    "too little free VRAM"
                };
                println!(
                    "GPU {index}{chosen}: {free} MiB free, {} MiB required: {verdict}",
                    args.min_vram
                );
            }
            Err(reason) => println!("GPU {index}{chosen}: cannot read free VRAM: {reason}"),
        }
    }
    match per_gpu.get(args.gpu as usize) {
        Some(Ok(free)) if *free >= args.min_vram => ExitCode::SUCCESS,
        Some(Ok(free)) => {
            eprintln!(
                "cinecut-infer: GPU {}: Only {free} MiB free VRAM, need at least {} MiB",
                args.gpu, args.min_vram
            );
            ExitCode::from(EXIT_FRAMES_FAILED)
        }
        Some(Err(reason)) => {
            eprintln!("cinecut-infer: GPU {}: {reason}", args.gpu);
            ExitCode::from(EXIT_FRAMES_FAILED)
        }
        None => {
            eprintln!(
                "cinecut-infer: GPU {} not found: nvidia-smi reported {} GPU(s)",
                args.gpu,
                per_gpu.len()
            );
            ExitCode::from(EXIT_FRAMES_FAILED)
        }
    }
}

/// Opens the output (file or stdout). With `--resume`, returns the frames already described and
/// drops a torn last line left by a run that was killed mid-write.
fn open_output(args: &DescribeArgs) -> Result<(Box<dyn Write + Send>, Vec<PathBuf>), String> {
    let Some(path) = &args.output else {
        return Ok((Box::new(io::stdout()), Vec::new()));
    };
    let shown = path.display();
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(!args.resume)
        .open(path)
        .map_err(|e| format!("cannot write output {shown}: {e}"))?;
    if !args.resume {
        return Ok((Box::new(file), Vec::new()));
    }
    let mut text = String::new();
    file.read_to_string(&mut text)
        .map_err(|e| format!("cannot read output {shown} to resume: {e}"))?;
    let whole = text.rfind('\n').map_or(0, |i| i + 1);
    file.set_len(whole as u64)
        .and_then(|()| file.seek(io::SeekFrom::End(0)).map(|_| ()))
        .map_err(|e| format!("cannot prepare output {shown}: {e}"))?;
    let done = frames::already_described(&text[..whole])
        .into_iter()
        .collect();
    Ok((Box::new(file), done))
}

fn describe(args: DescribeArgs) -> ExitCode {
    let mut records = match frames::collect(&args.frames) {
        Ok(records) => records,
        Err(e) => return fail(e),
    };
    for (what, path) in [("model", &args.model), ("mmproj", &args.mmproj)] {
        if !path.is_file() {
            return fail(format!("{what} file not found: {}", path.display()));
        }
    }
    let (startup, request) = match (
        seconds(args.timeout, "--timeout"),
        seconds(args.request_timeout, "--request-timeout"),
    ) {
        (Ok(s), Ok(r)) => (s, r),
        (Err(e), _) | (_, Err(e)) => return fail(e),
    };
    let (out, done) = match open_output(&args) {
        Ok(opened) => opened,
        Err(e) => return fail(e),
    };
    let before = records.len();
    records.retain(|r| !done.contains(&r.frame_path));
    if args.resume {
        eprintln!(
            "cinecut-infer: resuming: {} of {before} frames already described",
            before - records.len()
        );
    }
    if records.is_empty() {
        eprintln!("cinecut-infer: nothing left to describe");
        return ExitCode::SUCCESS;
    }

    let mut config = EngineConfig::new(&args.model, &args.mmproj)
        .port(args.port)
        .slots(args.slots)
        .min_vram_mib(args.min_vram)
        .gpu(args.gpu)
        .startup_timeout(startup)
        .debug(args.debug);
    config.describe = config.describe.clone().request_timeout(request);
    if let Some(bin) = &args.server_bin {
        config = config.server_bin(bin);
    }
    let engine = match Engine::launch(config) {
        Ok(engine) => engine,
        Err(e) => return fail(e),
    };

    // From here on the engine must be shut down cleanly: SIGINT/SIGTERM set a flag that stops the
    // batch; a second one exits at once (the server then dies with us, through PR_SET_PDEATHSIG).
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        let _ = signal_hook::flag::register_conditional_shutdown(signal, 1, Arc::clone(&stop));
        let _ = signal_hook::flag::register(signal, Arc::clone(&stop));
    }

    let lines = OrderedLines::new(out);
    let progress = Progress::new(records.len());
    let finished = AtomicUsize::new(0);
    let failed = AtomicUsize::new(0);
    let write_error = std::sync::Mutex::new(None);
    let results = engine.describe_many(&records, args.slots as usize, |i, result| {
        let record = &records[i];
        let timestamp = Some(record.timestamp_s).filter(|t| t.is_finite());
        let line = Line {
            frame_path: &record.frame_path,
            timestamp_s: timestamp,
            scene: result.as_ref().ok(),
            error: result.as_ref().err().map(|e| e.to_string()),
        };
        if result.is_err() {
            failed.fetch_add(1, Ordering::Relaxed);
        }
        let line = serde_json::to_string(&line).expect("a line serialises");
        if let Err(e) = lines.put(i, line) {
            *write_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
            return ControlFlow::Break(());
        }
        let n = finished.fetch_add(1, Ordering::Relaxed) + 1;
        progress.tick(n, failed.load(Ordering::Relaxed));
        if stop.load(Ordering::Relaxed) {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    });
    progress.finish();
    let dead = results
        .iter()
        .any(|r| matches!(r, Err(InferenceError::ServerDied { .. })));
    let shutdown = engine.shutdown();
    if let Err(e) = &shutdown
        && !dead
    {
        eprintln!("cinecut-infer: {e}");
    }

    let not_attempted = results
        .iter()
        .filter(|r| matches!(r, Err(InferenceError::Cancelled { .. })))
        .count();
    let failed = failed.into_inner();
    let succeeded = results.len() - not_attempted - failed;
    eprintln!(
        "cinecut-infer: {succeeded} described, {failed} failed, {not_attempted} not attempted, of {} frames",
        results.len()
    );
    if let Some(e) = write_error.into_inner().unwrap_or_else(|p| p.into_inner()) {
        eprintln!("cinecut-infer: error: writing the output failed: {e}");
        return ExitCode::from(EXIT_FRAMES_FAILED);
    }
    if stop.load(Ordering::Relaxed) {
        eprintln!("cinecut-infer: interrupted; run again with --resume to finish");
        return ExitCode::from(EXIT_INTERRUPTED);
    }
    if failed > 0 || not_attempted > 0 {
        ExitCode::from(EXIT_FRAMES_FAILED)
    } else {
        ExitCode::SUCCESS
    }
}
