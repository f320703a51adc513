//! The command line as clap reads it: every command's arguments, checked for shape only. What the
//! values mean is for the commands (`describe.rs`, `run.rs`, ...) and `settings.rs` to say.

use std::ffi::OsString;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use engine_core::config::Count;
use engine_core::gpu::ProbeChoice;
use engine_core::launch::Gpus;
use engine_core::{GpuId, VRAM_MINIMUM_MIB};

use crate::exit::EXIT_CODES;

/// `--version`: the crate's version and the commit it was built from.
pub const VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), " (", env!("CINECUT_COMMIT"), ")");

#[derive(Debug, Parser)]
#[command(
    name = "cinecut-infer",
    version = VERSION,
    about = "Describe film keyframes, or answer any JSON schema, with a local llama-server",
    after_help = EXIT_CODES
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Describe frames into JSON lines: {"frame_path","timestamp_s","source"?,"scene"} or {...,"error"}.
    Describe(DescribeArgs),
    /// Answer records (JSONL of {"id","text","images"}) under any JSON schema, with a text or vision
    /// model: {"id","source"?,"result"} or {"id","source"?,"error"} per record, in input order.
    Run(RunArgs),
    /// Run only the VRAM check: print each GPU's free memory and whether the engine would start.
    Check(CheckArgs),
    /// Merge the outputs of a sharded job (--shard) into one JSONL in the original input order;
    /// missing and doubled items are reported (exit 1 when any is missing).
    Merge(MergeArgs),
    /// Write a contact sheet of a run: one self-contained HTML file with every frame's thumbnail
    /// beside its description or error (run: each answer's JSON), the counts, throughput and
    /// latency charts, a filter for failed items and a search. Opens with no network.
    Report(ReportArgs),
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
pub const DEFAULT_MODEL: &str = "ggml-model-q4_k.gguf";
pub const DEFAULT_MMPROJ: &str = "mmproj-model-f16.gguf";

#[derive(Debug, Args)]
pub struct DescribeArgs {
    /// The language model GGUF [default: $CINECUT_MODELS_DIR/ggml-model-q4_k.gguf, else
    /// ~/models/ggml-model-q4_k.gguf].
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// The vision projector GGUF [default: $CINECUT_MODELS_DIR/mmproj-model-f16.gguf, else
    /// ~/models/mmproj-model-f16.gguf].
    #[arg(long)]
    pub mmproj: Option<PathBuf>,
    #[command(flatten)]
    pub ask: AskArgs,
    #[command(flatten)]
    pub server: ServerArgs,
    #[command(flatten)]
    pub out: OutputArgs,
    /// Image files, folders of images (*.jpg, *.jpeg, *.png, by name), or .jsonl KeyframeRecords.
    #[arg(required = true, value_name = "FRAMES")]
    pub frames: Vec<PathBuf>,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// The language model GGUF.
    #[arg(long)]
    pub model: PathBuf,
    /// The vision projector GGUF; without it the model runs text-only (records carry no images).
    #[arg(long)]
    pub mmproj: Option<PathBuf>,
    /// The JSON schema every answer must match (a file; its name is sent with it).
    #[arg(long, value_name = "SCHEMA.json")]
    pub schema: PathBuf,
    /// The system message.
    #[arg(long)]
    pub system: Option<String>,
    #[command(flatten)]
    pub ask: AskArgs,
    #[command(flatten)]
    pub server: ServerArgs,
    #[command(flatten)]
    pub out: OutputArgs,
    /// JSONL files of records {"id", "text", "images": [paths relative to the file], "source"}.
    #[arg(required = true, value_name = "INPUT.jsonl")]
    pub inputs: Vec<PathBuf>,
}

/// What each request asks.
#[derive(Debug, Args)]
pub struct AskArgs {
    /// The instruction (describe: replaces the built-in one; run: sent before each record's text).
    #[arg(long, conflicts_with = "prompt_file")]
    pub prompt: Option<String>,
    /// Read the instruction from a file.
    #[arg(long, value_name = "FILE")]
    pub prompt_file: Option<PathBuf>,
    /// Upper bound on generated tokens per answer [default: describe 512, run 128].
    #[arg(long)]
    pub max_tokens: Option<u32>,
    /// Sampling temperature, 0 to 2.
    #[arg(long, default_value_t = 0.1)]
    pub temperature: f32,
    /// Further tries after an invalid answer (not JSON, off-schema, cut off).
    #[arg(long, default_value_t = 2)]
    pub retries: u32,
    /// How each answer is held to the schema: gbnf (the engine's own grammar of the schema: the
    /// server returns the text as generated, with no output parse that can fail it), llguidance (only
    /// a server built with LLGuidance: one without refuses the request, or aborts, as 9093 does),
    /// response-format (the server converts the schema and parses
    /// the output), off (nothing; the answers are still validated).
    #[arg(
        long,
        default_value = "gbnf",
        value_name = "gbnf|llguidance|response-format|off"
    )]
    pub grammar: engine_core::request::Constraint,
}

/// How the server runs.
#[derive(Debug, Args)]
pub struct ServerArgs {
    /// The llama-server program (else $LLAMA_SERVER, else llama-server on PATH).
    #[arg(long)]
    pub server_bin: Option<PathBuf>,
    /// Port on 127.0.0.1 for `--gpu`'s one server; 0 picks a free one. Under `--gpus`, or with
    /// several servers per GPU, each server takes a free port.
    #[arg(long, default_value_t = engine_core::config::DEFAULT_PORT)]
    pub port: u16,
    /// Requests in flight on each GPU, split evenly over its servers (each gets the whole context
    /// per slot); auto: as many as the GPU's free VRAM holds beside the servers' weights, from the
    /// model's own KV numbers (at most 16; the choice and why on stderr).
    #[arg(long, default_value = "1", value_name = "N|auto")]
    pub slots: Count,
    /// llama-servers on each GPU, started as one unit under its lock, sharing its slots (one
    /// server's main loop applies the grammar to every slot on one thread, and cannot keep a large
    /// GPU busy); auto: under a grammar, as many as the host's cores, the free VRAM (a copy of the
    /// weights each) and the slots (at least 4 each) make worthwhile; with `--grammar off`, one
    /// (the choice and why on stderr). Each takes a free port.
    #[arg(long, default_value = "1", value_name = "N|auto")]
    pub servers_per_gpu: Count,
    /// Context per slot in tokens (the server gets ctx-size × slots).
    #[arg(long, default_value_t = 2048)]
    pub ctx_size: u32,
    /// Layers offloaded to the GPU (-ngl).
    #[arg(long, default_value_t = 99)]
    pub gpu_layers: u32,
    /// One more argument for llama-server, passed through as given (repeat for several:
    /// --server-arg=--flash-attn --server-arg=on).
    #[arg(long, value_name = "ARG", allow_hyphen_values = true)]
    pub server_arg: Vec<OsString>,
    /// Minimum free VRAM in MiB.
    #[arg(long, default_value_t = VRAM_MINIMUM_MIB)]
    pub min_vram: u64,
    /// GPU: an index among the GPUs this process may use (CUDA_VISIBLE_DEVICES), or a UUID.
    #[arg(long, default_value = "0")]
    pub gpu: GpuId,
    /// Several GPUs, one server each, the work going to whichever has a free slot: a list of
    /// indices or UUIDs (0,1: each waited for while another process holds it), or `all` (every GPU
    /// this process may use; one that is locked or lacks the VRAM is left out). Servers get free ports.
    #[arg(long, value_name = "LIST|all", conflicts_with = "gpu")]
    pub gpus: Option<GpuList>,
    /// How free VRAM is read: auto (nvidia-smi when NVIDIA_SMI is set, else NVML if the driver's
    /// library loads, else nvidia-smi), nvml, nvidia-smi.
    #[arg(long, default_value = "auto", value_name = "auto|nvml|nvidia-smi")]
    pub vram_probe: ProbeChoice,
    /// Startup timeout in seconds.
    #[arg(long, default_value_t = 120.0)]
    pub timeout: f64,
    /// Per-request timeout in seconds.
    #[arg(long, default_value_t = 120.0)]
    pub request_timeout: f64,
    /// Write the server's whole log to llama-server.log beside the model.
    #[arg(long)]
    pub debug: bool,
    /// CPU threads of each server (-t) [default: the server's own; with --gpus, each server's share
    /// of this host's cores].
    #[arg(long)]
    pub threads: Option<u32>,
    /// How frames reach the server: auto (a file:// reference where the server offers
    /// --media-path, else base64), base64.
    #[arg(long, value_enum, default_value_t = Transport::Auto)]
    pub image_transport: Transport,
}

/// `--progress`: how progress is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Style {
    /// A bar on a terminal, a line every 5 s otherwise.
    Auto,
    /// One JSON line per finished item: {"done","total","failed","frame_path" or "id","ok"}.
    Json,
    /// Nothing.
    Off,
}

/// `--image-transport`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Transport {
    /// A file:// reference where the server offers --media-path, else base64.
    Auto,
    /// Always a base64 data URI.
    Base64,
}

impl From<Transport> for engine_core::config::ImageTransport {
    fn from(transport: Transport) -> Self {
        match transport {
            Transport::Auto => engine_core::config::ImageTransport::Auto,
            Transport::Base64 => engine_core::config::ImageTransport::Base64,
        }
    }
}

/// Where the lines go and how progress shows.
#[derive(Debug, Args)]
pub struct OutputArgs {
    /// Write JSON lines to FILE instead of stdout (locked against a second writer).
    #[arg(long, value_name = "FILE")]
    pub output: Option<PathBuf>,
    /// Skip items already answered in --output (items that failed are tried again).
    #[arg(long, requires = "output")]
    pub resume: bool,
    /// Progress on stderr: auto (a bar on a terminal, a line every 5 s otherwise), json (one JSON
    /// line per finished item), off.
    #[arg(long, value_enum, default_value_t = Style::Auto)]
    pub progress: Style,
    /// Take part I (from 0) of N of the input (sorted by frame path or id, dealt out in turn); lines
    /// carry "index" and "of" for `merge`. Without it: JOB_COMPLETION_INDEX with --shards N
    /// (Kubernetes), or SLURM_ARRAY_TASK_ID and SLURM_ARRAY_TASK_COUNT (Slurm).
    #[arg(long, value_name = "I/N")]
    pub shard: Option<String>,
    /// The number of shards, where the index comes from JOB_COMPLETION_INDEX.
    #[arg(long, value_name = "N")]
    pub shards: Option<usize>,
    /// At the end, write what the run did to FILE as one JSON object: items, answered, failed,
    /// not_attempted, retries, wall_s, items_per_s, latency_ms, tokens, gpus, and its moments.
    #[arg(long, value_name = "FILE")]
    pub summary: Option<PathBuf>,
    /// Add each answer's cost to its line: "timings" {latency_ms, finished_s (from the run's
    /// start), attempts, prompt_tokens, generated_tokens, server (the server's own timings)}.
    #[arg(long)]
    pub timings: bool,
}

/// `--gpus`: every usable GPU, or a list.
#[derive(Debug, Clone)]
pub struct GpuList(pub Gpus);

impl std::str::FromStr for GpuList {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        if text == "all" {
            return Ok(GpuList(Gpus::All));
        }
        let gpus = text
            .split(',')
            .map(|g| g.trim().parse::<GpuId>().map_err(|e| e.to_string()))
            .collect::<Result<Vec<_>, _>>()?;
        if gpus.is_empty() {
            return Err("name at least one GPU, or all".into());
        }
        Ok(GpuList(Gpus::List(gpus)))
    }
}

impl ServerArgs {
    /// The GPUs: `--gpus`, else `--gpu`'s own.
    pub fn gpus(&self) -> Gpus {
        self.gpus.clone().map_or(Gpus::Configured, |list| list.0)
    }
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// GPU to decide for: an index among the GPUs this process may use, or a UUID.
    #[arg(long, default_value = "0")]
    pub gpu: GpuId,
    /// How free VRAM is read: auto, nvml, nvidia-smi (as for describe).
    #[arg(long, default_value = "auto", value_name = "auto|nvml|nvidia-smi")]
    pub vram_probe: ProbeChoice,
    /// Minimum free VRAM in MiB.
    #[arg(long, default_value_t = VRAM_MINIMUM_MIB)]
    pub min_vram: u64,
}

/// `report RESULTS.jsonl`.
#[derive(Debug, Args)]
pub struct ReportArgs {
    /// The lines of describe or run (a sharded job's merged file, not a shard).
    #[arg(value_name = "RESULTS.jsonl")]
    pub results: PathBuf,
    /// The run's --summary file, for its numbers at the top.
    #[arg(long, value_name = "SUMMARY.json")]
    pub summary: Option<PathBuf>,
    /// The HTML file to write.
    #[arg(long, default_value = "report.html", value_name = "FILE")]
    pub output: PathBuf,
}

/// `merge OUT SHARD...`.
#[derive(Debug, Args)]
pub struct MergeArgs {
    /// The merged output (a file, or /dev/stdout; locked as --output is).
    pub out: PathBuf,
    /// The shards' outputs.
    #[arg(required = true)]
    pub shards: Vec<PathBuf>,
}
