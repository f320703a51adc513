//! `cinecut-infer`: describes keyframes into JSON lines through the engine's full lifecycle, and checks
//! whether a GPU has the VRAM to start. `cinecut-infer --help` for usage.
//!
//! `describe` plans the job (inputs, output, resume set: every input error before any server starts),
//! runs it, and ends with a summary whose exit code says how it went.

mod check;
mod frames;
mod job;
mod merge;
mod output;
mod plan;
mod progress;
mod records;
mod summary;

use std::ffi::OsString;
use std::io;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use clap::{Args, CommandFactory, Parser, Subcommand};
use engine_core::vram::{ProbeChoice, Visible};
use engine_core::{
    DescribeOptions, EngineConfig, GpuId, Prompt, SceneDescription, Schema, VRAM_MINIMUM_MIB,
    WhenLocked,
};
use serde::Serialize;
use serde::de::DeserializeOwned;

use plan::{Head, Item};
use progress::Style;
use summary::{EXIT_INTERRUPTED, EXIT_SETUP, Kind};

/// `--version`: the crate's version and the commit it was built from.
const VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), " (", env!("CINECUT_COMMIT"), ")");

#[derive(Debug, Parser)]
#[command(
    name = "cinecut-infer",
    version = VERSION,
    about = "Describe film keyframes, or answer any JSON schema, with a local llama-server"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Describe frames into JSON lines: {"frame_path","timestamp_s","source"?,"scene"} or {...,"error"}.
    Describe(DescribeArgs),
    /// Answer records (JSONL of {"id","text","images"}) under any JSON schema, with a text or vision
    /// model: {"id","source"?,"result"} or {"id","source"?,"error"} per record, in input order.
    Run(RunArgs),
    /// Run only the VRAM check: print each GPU's free memory and whether the engine would start.
    Check(CheckArgs),
    /// Merge the outputs of a sharded job (--shard) into one JSONL in the original input order;
    /// missing and doubled items are reported (exit 1 when any is missing).
    Merge {
        /// The merged output.
        out: PathBuf,
        /// The shards' outputs.
        #[arg(required = true)]
        shards: Vec<PathBuf>,
    },
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

/// CineCut's LLaVA file names in its models folder.
const DEFAULT_MODEL: &str = "ggml-model-q4_k.gguf";
const DEFAULT_MMPROJ: &str = "mmproj-model-f16.gguf";

#[derive(Debug, Args)]
struct DescribeArgs {
    /// The language model GGUF [default: $CINECUT_MODELS_DIR/ggml-model-q4_k.gguf, else
    /// ~/models/ggml-model-q4_k.gguf].
    #[arg(long)]
    model: Option<PathBuf>,
    /// The vision projector GGUF [default: $CINECUT_MODELS_DIR/mmproj-model-f16.gguf, else
    /// ~/models/mmproj-model-f16.gguf].
    #[arg(long)]
    mmproj: Option<PathBuf>,
    #[command(flatten)]
    ask: AskArgs,
    #[command(flatten)]
    server: ServerArgs,
    #[command(flatten)]
    out: OutputArgs,
    /// Image files, folders of images (*.jpg, *.jpeg, *.png, by name), or .jsonl KeyframeRecords.
    #[arg(required = true, value_name = "FRAMES")]
    frames: Vec<PathBuf>,
}

#[derive(Debug, Args)]
struct RunArgs {
    /// The language model GGUF.
    #[arg(long)]
    model: PathBuf,
    /// The vision projector GGUF; without it the model runs text-only (records carry no images).
    #[arg(long)]
    mmproj: Option<PathBuf>,
    /// The JSON schema every answer must match (a file; its name is sent with it).
    #[arg(long, value_name = "SCHEMA.json")]
    schema: PathBuf,
    /// The system message.
    #[arg(long)]
    system: Option<String>,
    #[command(flatten)]
    ask: AskArgs,
    #[command(flatten)]
    server: ServerArgs,
    #[command(flatten)]
    out: OutputArgs,
    /// JSONL files of records {"id", "text", "images": [paths relative to the file], "source"}.
    #[arg(required = true, value_name = "INPUT.jsonl")]
    inputs: Vec<PathBuf>,
}

/// What each request asks.
#[derive(Debug, Args)]
struct AskArgs {
    /// The instruction (describe: replaces the built-in one; run: sent before each record's text).
    #[arg(long, conflicts_with = "prompt_file")]
    prompt: Option<String>,
    /// Read the instruction from a file.
    #[arg(long, value_name = "FILE")]
    prompt_file: Option<PathBuf>,
    /// Upper bound on generated tokens per answer [default: describe 512, run 128].
    #[arg(long)]
    max_tokens: Option<u32>,
    /// Sampling temperature, 0 to 2.
    #[arg(long, default_value_t = 0.1)]
    temperature: f32,
    /// Further tries after an invalid answer (not JSON, off-schema, cut off).
    #[arg(long, default_value_t = 2)]
    retries: u32,
}

/// How the server runs.
#[derive(Debug, Args)]
struct ServerArgs {
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
    /// Layers offloaded to the GPU (-ngl).
    #[arg(long, default_value_t = 99)]
    gpu_layers: u32,
    /// One more argument for llama-server, passed through as given (repeat for several:
    /// --server-arg=--flash-attn --server-arg=on).
    #[arg(long, value_name = "ARG", allow_hyphen_values = true)]
    server_arg: Vec<OsString>,
    /// Minimum free VRAM in MiB.
    #[arg(long, default_value_t = VRAM_MINIMUM_MIB)]
    min_vram: u64,
    /// GPU: an index among the GPUs this process may use (CUDA_VISIBLE_DEVICES), or a UUID.
    #[arg(long, default_value = "0")]
    gpu: GpuId,
    /// Several GPUs, one server each, the work going to whichever has a free slot: a list of
    /// indices or UUIDs (0,1: each waited for while another process holds it), or `all` (every GPU
    /// this process may use; one that is locked or lacks the VRAM is left out). Servers get free ports.
    #[arg(long, value_name = "LIST|all", conflicts_with = "gpu")]
    gpus: Option<GpuList>,
    /// How free VRAM is read: auto (nvidia-smi when NVIDIA_SMI is set, else NVML if the driver's
    /// library loads, else nvidia-smi), nvml, nvidia-smi.
    #[arg(long, default_value = "auto", value_name = "auto|nvml|nvidia-smi")]
    vram_probe: ProbeChoice,
    /// Startup timeout in seconds.
    #[arg(long, default_value_t = 120.0)]
    timeout: f64,
    /// Per-request timeout in seconds.
    #[arg(long, default_value_t = 120.0)]
    request_timeout: f64,
    /// Write the server's whole log to llama-server.log beside the model.
    #[arg(long)]
    debug: bool,
}

/// Where the lines go and how progress shows.
#[derive(Debug, Args)]
struct OutputArgs {
    /// Write JSON lines to FILE instead of stdout (locked against a second writer).
    #[arg(long, value_name = "FILE")]
    output: Option<PathBuf>,
    /// Skip items already answered in --output (items that failed are tried again).
    #[arg(long, requires = "output")]
    resume: bool,
    /// Progress on stderr: auto (a bar on a terminal, a line every 5 s otherwise), json (one JSON
    /// line per finished item), off.
    #[arg(long, value_enum, default_value_t = Style::Auto)]
    progress: Style,
    /// Take part I (from 0) of N of the input (sorted by frame path or id, dealt out in turn); lines
    /// carry "index" and "of" for `merge`. Without it: JOB_COMPLETION_INDEX with --shards N
    /// (Kubernetes), or SLURM_ARRAY_TASK_ID and SLURM_ARRAY_TASK_COUNT (Slurm).
    #[arg(long, value_name = "I/N")]
    shard: Option<String>,
    /// The number of shards, where the index comes from JOB_COMPLETION_INDEX.
    #[arg(long, value_name = "N")]
    shards: Option<usize>,
}

/// `--gpus`: every usable GPU, or a list.
#[derive(Debug, Clone)]
enum GpuList {
    All,
    List(Vec<GpuId>),
}

impl std::str::FromStr for GpuList {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        if text == "all" {
            return Ok(GpuList::All);
        }
        let gpus = text
            .split(',')
            .map(|g| g.trim().parse::<GpuId>().map_err(|e| e.to_string()))
            .collect::<Result<Vec<_>, _>>()?;
        if gpus.is_empty() {
            return Err("name at least one GPU, or all".into());
        }
        Ok(GpuList::List(gpus))
    }
}

#[derive(Debug, Args)]
struct CheckArgs {
    /// GPU to decide for: an index among the GPUs this process may use, or a UUID.
    #[arg(long, default_value = "0")]
    gpu: GpuId,
    /// How free VRAM is read: auto, nvml, nvidia-smi (as for describe).
    #[arg(long, default_value = "auto", value_name = "auto|nvml|nvidia-smi")]
    vram_probe: ProbeChoice,
    /// Minimum free VRAM in MiB.
    #[arg(long, default_value_t = VRAM_MINIMUM_MIB)]
    min_vram: u64,
}

fn fail(message: impl std::fmt::Display) -> ExitCode {
    eprintln!("cinecut-infer: error: {message}");
    ExitCode::from(EXIT_SETUP)
}

/// The longest duration a flag takes (a year): more is surely a typo, and would overflow a clock.
const MAX_SECONDS: f64 = engine_core::MAX_DURATION.as_secs_f64();

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
        Command::Run(args) => run(args),
        Command::Check(args) => check::check(&args.gpu, args.min_vram, args.vram_probe),
        Command::Merge { out, shards } => merge(&out, &shards),
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

/// A model file: the flag's value, else `file` in `$CINECUT_MODELS_DIR` (else `~/models`), which
/// must exist.
fn model_path(given: Option<PathBuf>, file: &str, flag: &str) -> Result<PathBuf, String> {
    if let Some(path) = given {
        return Ok(path);
    }
    let home = std::env::var_os("HOME").filter(|h| !h.is_empty());
    let (dir, why) = match std::env::var_os("CINECUT_MODELS_DIR").filter(|d| !d.is_empty()) {
        Some(dir) => (PathBuf::from(dir), "from CINECUT_MODELS_DIR"),
        None => match home {
            Some(home) => (
                PathBuf::from(home).join("models"),
                "~/models, as CINECUT_MODELS_DIR is unset or empty",
            ),
            None => (
                PathBuf::from("models"),
                "./models, as neither CINECUT_MODELS_DIR nor HOME is set",
            ),
        },
    };
    let path = dir.join(file);
    if path.is_file() {
        Ok(path)
    } else {
        Err(format!(
            "no {flag} given, and the default {} ({why}) does not exist — pass {flag}, or set \
             CINECUT_MODELS_DIR to the folder that holds {file}",
            path.display()
        ))
    }
}

/// The instruction: `--prompt`, the contents of `--prompt-file`, or `None`.
fn instruction(ask: &AskArgs) -> Result<Option<String>, String> {
    match (&ask.prompt, &ask.prompt_file) {
        (Some(text), _) => Ok(Some(text.clone())),
        (None, Some(file)) => std::fs::read_to_string(file)
            .map(|text| Some(text.trim_end().to_string()))
            .map_err(|e| format!("cannot read --prompt-file {}: {e}", file.display())),
        (None, None) => Ok(None),
    }
}

fn config(
    model: &Path,
    mmproj: Option<&Path>,
    server: &ServerArgs,
    options: DescribeOptions,
) -> Result<EngineConfig, String> {
    let startup = seconds(server.timeout, "--timeout")?;
    let request = seconds(server.request_timeout, "--request-timeout")?;
    let mut builder = EngineConfig::text(model)
        .port(server.port)
        .slots(server.slots)
        .ctx_size(server.ctx_size)
        .gpu_layers(server.gpu_layers)
        .min_vram_mib(server.min_vram)
        .gpu(server.gpu.clone())
        .vram_probe(server.vram_probe)
        .startup_timeout(startup)
        .debug(server.debug)
        .describe_options(options.request_timeout(request));
    if let Some(mmproj) = mmproj {
        builder = builder.mmproj(mmproj);
    }
    if let Some(bin) = &server.server_bin {
        builder = builder.server_bin(bin);
    }
    for arg in &server.server_arg {
        builder = builder.arg(arg);
    }
    builder.build().map_err(|e| e.to_string())
}

fn describe(args: DescribeArgs) -> ExitCode {
    // From the first moment: a signal while waiting for the lock or the model still cleans up.
    let stop = stop_on_signals();
    let setup = || -> Result<(EngineConfig, Vec<Item>), String> {
        let model = model_path(args.model.clone(), DEFAULT_MODEL, "--model")?;
        let mmproj = model_path(args.mmproj.clone(), DEFAULT_MMPROJ, "--mmproj")?;
        let mut options = DescribeOptions::default()
            .temperature(args.ask.temperature)
            .retries(args.ask.retries)
            .max_tokens(args.ask.max_tokens.unwrap_or(512));
        if let Some(prompt) = instruction(&args.ask)? {
            options = options.prompt(prompt);
        }
        let config = config(&model, Some(&mmproj), &args.server, options)?;
        let items = frames::collect(&args.frames)?
            .into_iter()
            .map(|frame| frame_item(frame, config.describe_options()))
            .collect();
        Ok((config, items))
    };
    let (config, items) = match setup() {
        Ok(setup) => setup,
        Err(e) => return fail(e),
    };
    let job = Job {
        inputs: &args.frames,
        out: &args.out,
        gpus: args.server.gpus.clone(),
        extra_protected: args.ask.prompt_file.iter().cloned().collect(),
        key_of: frames::key_of_line,
        kind: Kind::Frames,
    };
    execute::<SceneDescription>(config, items, job, &stop)
}

/// A frame as an item: named by its path, resumed by its canonical path.
fn frame_item(frame: frames::Frame, options: &DescribeOptions) -> Item {
    let prompt = match frame.path.to_str() {
        Some(_) => Ok(options.frame_prompt(&frame.path)),
        None => Err(format!(
            "file name {:?} is not UTF-8, which a JSON line cannot hold — rename the file",
            frame.path
        )),
    };
    Item {
        key: frames::key(&frame.path),
        head: Head::Frame {
            frame_path: frame.path.to_string_lossy().into_owned(),
            timestamp_s: frame.timestamp_s,
            source: frame.source,
        },
        prompt,
        files: vec![frame.path],
        position: None,
    }
}

fn run(args: RunArgs) -> ExitCode {
    let stop = stop_on_signals();
    let setup = || -> Result<(EngineConfig, Vec<Item>), String> {
        let instruction = instruction(&args.ask)?
            .ok_or("run needs the instruction: give --prompt TEXT or --prompt-file FILE")?;
        let schema = Schema::from_file(&args.schema).map_err(|e| e.to_string())?;
        let options = DescribeOptions::default().retries(args.ask.retries);
        let config = config(&args.model, args.mmproj.as_deref(), &args.server, options)?;
        let ask = |record: &records::Record| {
            let text = match &record.text {
                Some(text) if !instruction.is_empty() => format!("{instruction}\n\n{text}"),
                Some(text) => text.clone(),
                None => instruction.clone(),
            };
            let id = match &record.id {
                serde_json::Value::String(id) => id.clone(),
                other => other.to_string(),
            };
            let mut prompt = Prompt::new(&schema, text)
                .id(id)
                .max_tokens(args.ask.max_tokens.unwrap_or(128))
                .temperature(args.ask.temperature);
            if let Some(system) = &args.system {
                prompt = prompt.system(system.clone());
            }
            record
                .images
                .iter()
                .fold(prompt, |prompt, image| prompt.image(image))
        };
        let records = records::collect(&args.inputs)?;
        if args.mmproj.is_none()
            && let Some(record) = records.iter().find(|r| !r.images.is_empty())
        {
            return Err(format!(
                "record {} has images, but the model runs text-only — give --mmproj (a vision \
                 model), or drop the images",
                record.id
            ));
        }
        let items = records
            .into_iter()
            .map(|record| Item {
                key: records::key(&record.id),
                prompt: Ok(ask(&record)),
                files: record.images.clone(),
                position: None,
                head: Head::Record {
                    id: record.id,
                    source: record.source,
                },
            })
            .collect();
        Ok((config, items))
    };
    let (config, items) = match setup() {
        Ok(setup) => setup,
        Err(e) => return fail(e),
    };
    let mut extra_protected = vec![args.schema.clone()];
    extra_protected.extend(args.ask.prompt_file.iter().cloned());
    let job = Job {
        inputs: &args.inputs,
        out: &args.out,
        gpus: args.server.gpus.clone(),
        extra_protected,
        key_of: records::key_of_line,
        kind: Kind::Records,
    };
    execute::<serde_json::Value>(config, items, job, &stop)
}

/// What `describe` and `run` share past their inputs.
struct Job<'a> {
    inputs: &'a [PathBuf],
    out: &'a OutputArgs,
    gpus: Option<GpuList>,
    /// Files besides the models and the server that the output must never be.
    extra_protected: Vec<PathBuf>,
    key_of: fn(&serde_json::Value) -> Option<String>,
    kind: Kind,
}

/// Plans the job (every input error before any wait), starts the engine, answers every item as a
/// `T`, and ends with the summary and its exit code.
fn execute<T>(config: EngineConfig, items: Vec<Item>, job: Job, stop: &Arc<AtomicBool>) -> ExitCode
where
    T: Serialize + DeserializeOwned + Send,
{
    if let Err(e) = config.check_model_files() {
        return fail(e);
    }
    let mut protected = vec![config.model().to_path_buf(), config.server_bin()];
    protected.extend(config.mmproj().map(Path::to_path_buf));
    protected.extend(job.extra_protected);
    let (noun, done) = (job.kind.noun(), job.kind.done());
    let items = match take_shard(items, job.out) {
        Ok(items) => items,
        Err(e) => return fail(e),
    };
    let (configs, when_locked) = match pool_configs(&config, job.gpus.as_ref()) {
        Ok(pool) => pool,
        Err(e) => return fail(e),
    };
    let request = plan::Request {
        items,
        inputs: job.inputs,
        output: job.out.output.as_deref(),
        resume: job.out.resume,
        protected: &protected,
        key_of: job.key_of,
    };
    let plan = match plan::plan(request) {
        Ok(plan) => plan,
        Err(e) => return fail(e),
    };
    if job.out.resume {
        eprintln!(
            "cinecut-infer: resuming: {} of {} {noun} already {done}",
            plan.skipped,
            plan.skipped + plan.items.len()
        );
    }
    if plan.items.is_empty() {
        eprintln!("cinecut-infer: nothing left to do");
        return ExitCode::SUCCESS;
    }
    let show = job::Show {
        kind: job.kind,
        progress: job.out.progress,
    };
    if plan.items.iter().all(|item| item.prompt.is_err()) {
        // Nothing the engine could send: no GPU, no server, just the error lines.
        let summary = job::write_unsendable(plan, show);
        eprintln!("cinecut-infer: {}", summary.line());
        return summary.exit_code();
    }
    let pool = match job::start(configs, when_locked, stop) {
        Ok(pool) => pool,
        Err(job::StartError::Interrupted) => {
            eprintln!("cinecut-infer: interrupted before any of the {noun} was {done}");
            return ExitCode::from(EXIT_INTERRUPTED);
        }
        Err(job::StartError::Failed(e)) => return fail(e),
    };
    let summary = job::run::<T>(pool, plan, stop, show);
    eprintln!("cinecut-infer: {}", summary.line());
    if let Some(e) = &summary.write_error {
        eprintln!("cinecut-infer: error: writing the output failed: {e}");
    }
    if summary.interrupted {
        eprintln!("cinecut-infer: interrupted; run again with --resume to finish");
    }
    summary.exit_code()
}

/// The items of this run's shard (`--shard`, or the scheduler's environment), each told its place
/// in the whole input; all of them when there is no shard.
fn take_shard(items: Vec<Item>, out: &OutputArgs) -> Result<Vec<Item>, String> {
    let env = |key: &str| std::env::var(key).ok().filter(|v| !v.is_empty());
    let Some(shard) = engine_core::shard::choose(out.shard.as_deref(), out.shards, &env)? else {
        return Ok(items);
    };
    let total = items.len();
    let keys: Vec<String> = items.iter().map(Item::shard_key).collect();
    let job: std::sync::Arc<str> = job_name(&keys).into();
    let mine: std::collections::HashSet<usize> = engine_core::shard::positions(&keys, shard)
        .into_iter()
        .collect();
    let items: Vec<Item> = items
        .into_iter()
        .enumerate()
        .filter(|(i, _)| mine.contains(i))
        .map(|(i, mut item)| {
            item.position = Some(plan::Place {
                index: i,
                of: total,
                job: job.clone(),
            });
            item
        })
        .collect();
    eprintln!(
        "cinecut-infer: shard {shard}: {} of {total} items",
        items.len()
    );
    Ok(items)
}

/// A name for the whole input of a sharded job: FNV-1a over its sorted keys, so every host of the
/// job computes the same one whatever its listing order.
fn job_name(keys: &[String]) -> String {
    let mut sorted: Vec<&String> = keys.iter().collect();
    sorted.sort();
    let hash = sorted.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, key| {
        key.bytes()
            .chain(std::iter::once(b'\n'))
            .fold(h, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
    });
    format!("{hash:016x}")
}

/// One configuration per GPU of `--gpus` (each on a free port), or just `config`; and whether a
/// locked GPU is waited for (named GPUs) or left out (`all`).
fn pool_configs(
    config: &EngineConfig,
    gpus: Option<&GpuList>,
) -> Result<(Vec<EngineConfig>, WhenLocked), String> {
    let (ids, when_locked) = match gpus {
        None => return Ok((vec![config.clone()], WhenLocked::Wait)),
        Some(GpuList::List(ids)) => {
            // A GPU named twice (0 and its UUID, say) would wait for its own lock.
            let probe = config.vram_probe().map_err(|e| e.to_string())?;
            let rows = probe.query().map_err(|e| e.to_string())?;
            let mut seen: Vec<(u32, &GpuId)> = Vec::new();
            for id in ids {
                let index = engine_core::vram::select(&rows, id, &Visible::from_env(), 0)
                    .map_err(|e| e.to_string())?
                    .gpu;
                if let Some((_, first)) = seen.iter().find(|(i, _)| *i == index) {
                    return Err(format!(
                        "--gpus names GPU {index} twice ({first} and {id}): name each GPU once"
                    ));
                }
                seen.push((index, id));
            }
            (ids.clone(), WhenLocked::Wait)
        }
        Some(GpuList::All) => {
            let probe = config.vram_probe().map_err(|e| e.to_string())?;
            let rows = probe.query().map_err(|e| e.to_string())?;
            let ids: Vec<GpuId> = Visible::from_env()
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
        .map_err(|e| e.to_string())?;
    Ok((configs, when_locked))
}

fn merge(out: &Path, shards: &[PathBuf]) -> ExitCode {
    let merged = match merge::merge(out, shards) {
        Ok(merged) => merged,
        Err(e) => return fail(e),
    };
    eprintln!(
        "cinecut-infer: merged {} of {} items into {} ({} of them error lines)",
        merged.written,
        merged.total,
        out.display(),
        merged.failed
    );
    if !merged.duplicates.is_empty() {
        eprintln!(
            "cinecut-infer: {} item(s) were in more than one shard (kept once, a success first): {}",
            merged.duplicates.len(),
            list(&merged.duplicates)
        );
    }
    if merged.missing.is_empty() {
        return ExitCode::SUCCESS;
    }
    eprintln!(
        "cinecut-infer: {} item(s) missing — run their shards again with --resume: {}",
        merged.missing.len(),
        list(&merged.missing)
    );
    ExitCode::from(summary::EXIT_FRAMES_FAILED)
}

/// Input positions, the first ten of them.
fn list(positions: &[usize]) -> String {
    let shown: Vec<String> = positions.iter().take(10).map(usize::to_string).collect();
    let more = positions.len().saturating_sub(10);
    if more > 0 {
        format!("positions {} and {more} more", shown.join(", "))
    } else {
        format!("positions {}", shown.join(", "))
    }
}
