//! `cinecut-infer`: describes keyframes into JSON lines through the engine's full lifecycle, and checks
//! whether a GPU has the VRAM to start. `cinecut-infer --help` for usage.
//!
//! `describe` plans the job (inputs, output, resume set: every input error before any server starts),
//! runs it, and ends with a summary whose exit code says how it went.

mod check;
mod frames;
mod job;
mod output;
mod plan;
mod progress;
mod summary;

use std::io;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use clap::{Args, CommandFactory, Parser, Subcommand};
use engine_core::{DescribeOptions, EngineConfig, GpuId, VRAM_MINIMUM_MIB};

use summary::{EXIT_INTERRUPTED, EXIT_SETUP};

/// `--version`: the crate's version and the commit it was built from.
const VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), " (", env!("CINECUT_COMMIT"), ")");

#[derive(Debug, Parser)]
#[command(
    name = "cinecut-infer",
    version = VERSION,
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
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell) to stdout.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Write the man pages (roff: this program's and each subcommand's) into DIR; `cargo xtask dist`
    /// runs it.
    #[command(hide = true)]
    Manpages {
        /// The folder to write `cinecut-infer.1`, `cinecut-infer-describe.1`, … into.
        dir: PathBuf,
    },
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
    /// Parallel slots: requests served at once (each gets the whole context per slot).
    #[arg(long, default_value_t = 1)]
    slots: u32,
    /// Context per slot in tokens (the server gets ctx-size × slots).
    #[arg(long, default_value_t = 2048)]
    ctx_size: u32,
    /// Minimum free VRAM in MiB.
    #[arg(long, default_value_t = VRAM_MINIMUM_MIB)]
    min_vram: u64,
    /// GPU: an index among the GPUs this process may use (CUDA_VISIBLE_DEVICES), or a UUID.
    #[arg(long, default_value = "0")]
    gpu: GpuId,
    /// Startup timeout in seconds.
    #[arg(long, default_value_t = 120.0)]
    timeout: f64,
    /// Per-request timeout in seconds.
    #[arg(long, default_value_t = 120.0)]
    request_timeout: f64,
    /// Write the server's whole log to llama-server.log beside the model.
    #[arg(long)]
    debug: bool,
    /// Write JSON lines to FILE instead of stdout (locked against a second writer).
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
    /// GPU to decide for: an index among the GPUs this process may use, or a UUID.
    #[arg(long, default_value = "0")]
    gpu: GpuId,
    /// Minimum free VRAM in MiB.
    #[arg(long, default_value_t = VRAM_MINIMUM_MIB)]
    min_vram: u64,
}

fn fail(message: impl std::fmt::Display) -> ExitCode {
    eprintln!("cinecut-infer: error: {message}");
    ExitCode::from(EXIT_SETUP)
}

/// The longest duration a flag takes (a year): more is surely a typo, and would overflow a clock.
const MAX_SECONDS: f64 = 365.0 * 24.0 * 3600.0;

fn seconds(value: f64, flag: &str) -> Result<Duration, String> {
    if !(value > 0.0 && value <= MAX_SECONDS) {
        return Err(format!(
            "{flag} must be a number of seconds above 0 and at most {MAX_SECONDS} (a year), not {value}"
        ));
    }
    Ok(Duration::from_secs_f64(value))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Describe(args) => describe(args),
        Command::Check(args) => check::check(&args.gpu, args.min_vram),
        Command::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "cinecut-infer",
                &mut io::stdout(),
            );
            ExitCode::SUCCESS
        }
        Command::Manpages { dir } => match clap_mangen::generate_to(Cli::command(), &dir) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(format!(
                "cannot write the man pages into {}: {e}",
                dir.display()
            )),
        },
    }
}

/// Installs SIGINT/SIGTERM handling: the first signal sets the returned flag (every wait of the
/// engine gives up on it, cleaning up); a second one exits at once with 130 (the server then dies
/// with us, through PR_SET_PDEATHSIG).
fn stop_on_signals() -> Arc<AtomicBool> {
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        let exit = i32::from(EXIT_INTERRUPTED);
        let _ = signal_hook::flag::register_conditional_shutdown(signal, exit, Arc::clone(&stop));
        let _ = signal_hook::flag::register(signal, Arc::clone(&stop));
    }
    stop
}

fn config(args: &DescribeArgs) -> Result<EngineConfig, String> {
    let startup = seconds(args.timeout, "--timeout")?;
    let request = seconds(args.request_timeout, "--request-timeout")?;
    let mut builder = EngineConfig::builder(&args.model, &args.mmproj)
        .port(args.port)
        .slots(args.slots)
        .ctx_size(args.ctx_size)
        .min_vram_mib(args.min_vram)
        .gpu(args.gpu.clone())
        .startup_timeout(startup)
        .debug(args.debug)
        .describe_options(DescribeOptions::default().request_timeout(request));
    if let Some(bin) = &args.server_bin {
        builder = builder.server_bin(bin);
    }
    builder.build().map_err(|e| e.to_string())
}

fn describe(args: DescribeArgs) -> ExitCode {
    // From the first moment: a signal while waiting for the lock or the model still cleans up.
    let stop = stop_on_signals();
    let config = match config(&args) {
        Ok(config) => config,
        Err(e) => return fail(e),
    };
    if let Err(e) = config.check_model_files() {
        return fail(e);
    }
    let protected = [
        config.model().to_path_buf(),
        config.mmproj().to_path_buf(),
        config.server_bin(),
    ];
    let request = plan::Request {
        inputs: &args.frames,
        output: args.output.as_deref(),
        resume: args.resume,
        protected: &protected,
    };
    let plan = match plan::plan(&request) {
        Ok(plan) => plan,
        Err(e) => return fail(e),
    };
    if args.resume {
        eprintln!(
            "cinecut-infer: resuming: {} of {} frames already described",
            plan.skipped,
            plan.skipped + plan.items.len()
        );
    }
    if plan.items.is_empty() {
        eprintln!("cinecut-infer: nothing left to describe");
        return ExitCode::SUCCESS;
    }
    if plan.items.iter().all(|item| item.name.is_err()) {
        // Nothing the engine could send: no GPU, no server, just the error lines.
        let summary = job::write_unsendable(plan);
        eprintln!("cinecut-infer: {}", summary.line());
        return summary.exit_code();
    }
    let engine = match job::start(config, &stop) {
        Ok(engine) => engine,
        Err(job::StartError::Interrupted) => {
            eprintln!("cinecut-infer: interrupted before any frame was described");
            return ExitCode::from(EXIT_INTERRUPTED);
        }
        Err(job::StartError::Failed(e)) => return fail(e),
    };
    let summary = job::run(engine, plan, args.slots as usize, &stop);
    eprintln!("cinecut-infer: {}", summary.line());
    if let Some(e) = &summary.write_error {
        eprintln!("cinecut-infer: error: writing the output failed: {e}");
    }
    if summary.interrupted {
        eprintln!("cinecut-infer: interrupted; run again with --resume to finish");
    }
    summary.exit_code()
}
