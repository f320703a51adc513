//! `cargo xtask gpu-smoke`: on a machine with an NVIDIA GPU (sm_90), the CUDA llama-server (built
//! once, cached), the tiny model and the real nvidia-smi, through the gpu-smoke test.

use std::path::PathBuf;
use std::process::ExitCode;

use xshell::cmd;

use crate::steps::{Steps, cargo, root, shell};
use crate::{contract, prereq, real_server};

/// The real-GPU smoke test: the CUDA llama-server (built once, cached), the tiny model, the real
/// nvidia-smi. Writes the timings to docs/gpu-results.md, which `bench` adds to BENCHMARKS.md.
pub fn run(source: Option<PathBuf>) -> ExitCode {
    if let Err(e) = prereq::ensure(prereq::REAL_SERVER) {
        eprintln!("xtask: {e}");
        return ExitCode::FAILURE;
    }
    let sh = shell();
    let mut steps = Steps::new();
    let Some((binary, models)) =
        contract::real_server_and_model(&mut steps, &sh, true, source, real_server::LLAMA_VERSION)
    else {
        return steps.report();
    };
    let cargo = cargo();
    steps.cmd(
        "gpu-smoke",
        cmd!(
            sh,
            "{cargo} test --release -p tests --features gpu-smoke --test gpu_smoke -- --nocapture"
        )
        .env("GPU_SMOKE_SERVER", &binary)
        .env("GPU_SMOKE_MODEL", models.join("tiny-llava.gguf"))
        .env("GPU_SMOKE_MMPROJ", models.join("tiny-mmproj.gguf"))
        .env("GPU_SMOKE_OUT", root().join("docs").join("gpu-results.md")),
    );
    steps.report()
}
