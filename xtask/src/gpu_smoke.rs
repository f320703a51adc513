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
    // gpu_pool needs two GPUs: it runs only where nvidia-smi lists them.
    let which: &[&str] = if gpus_listed() >= 2 {
        &["--include-ignored"]
    } else {
        eprintln!("xtask: one GPU: gpu_pool (2 GPUs or more) does not run");
        &[]
    };
    steps.cmd(
        "gpu-smoke",
        cmd!(
            sh,
            "{cargo} test --release -p tests --features gpu-smoke --test gpu_smoke -- --nocapture {which...}"
        )
        .env("GPU_SMOKE_SERVER", &binary)
        .env("GPU_SMOKE_MODEL", models.join("tiny-llava.gguf"))
        .env("GPU_SMOKE_MMPROJ", models.join("tiny-mmproj.gguf"))
        .env("GPU_SMOKE_OUT", root().join("docs").join("gpu-results.md")),
    );
    steps.report()
}

/// The GPUs `nvidia-smi -L` lists (0 where it cannot run).
fn gpus_listed() -> usize {
    let smi = std::env::var_os("NVIDIA_SMI").unwrap_or_else(|| "nvidia-smi".into());
    std::process::Command::new(smi)
        .arg("-L")
        .output()
        .map_or(0, |out| {
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter(|l| l.starts_with("GPU "))
                .count()
        })
}
