//! `cargo xtask contract [--real [--version V]]`: the server contract suite, against the fake or the
//! real llama-server (built and cached on first use) with the tiny model.

use std::path::PathBuf;
use std::process::ExitCode;

use xshell::{Shell, cmd};

use crate::steps::{Steps, cargo, shell, target_dir};
use crate::{frames, prereq, real_server, shaped_model, tiny_model};

/// The suite against the fake (`real`: `None`) or the real server of that version.
pub fn run(version: Option<&str>) -> ExitCode {
    let sh = shell();
    let mut steps = Steps::new();
    match version {
        Some(version) => {
            if let Err(e) = prereq::ensure(prereq::REAL_SERVER) {
                eprintln!("xtask: {e}");
                return ExitCode::FAILURE;
            }
            real(&mut steps, &sh, version);
        }
        None => {
            let cargo = cargo();
            steps.cmd(
                "contract",
                cmd!(sh, "{cargo} test --workspace --test contract"),
            );
        }
    }
    steps.report()
}

/// The real llama-server (built and cached on first use, in this process) and the tiny model pair's
/// folder.
pub fn real_server_and_model(
    steps: &mut Steps,
    sh: &Shell,
    cuda: bool,
    source: Option<PathBuf>,
    version: &str,
) -> Option<(PathBuf, PathBuf)> {
    let flavour = real_server::Flavour {
        cuda,
        llguidance: None,
    };
    let binary = real_server::ensure(steps, sh, &flavour, source, version)?;
    let models = target_dir().join("tiny-model");
    if let Err(e) = tiny_model::write(&models, 42) {
        eprintln!(
            "xtask: cannot write the tiny model into {}: {e}",
            models.display()
        );
        return None;
    }
    Some((binary, models))
}

/// The contract suite against the real CPU llama-server `version` and the tiny model.
pub fn real(steps: &mut Steps, sh: &Shell, version: &str) -> bool {
    let Some((binary, models)) = real_server_and_model(steps, sh, false, None, version) else {
        return false;
    };
    let cargo = cargo();
    steps.cmd(
        &format!("contract-real-{version}"),
        cmd!(sh, "{cargo} test --workspace --test contract")
            .env("CONTRACT_SERVER", &binary)
            .env("CONTRACT_MODEL", models.join("tiny-llava.gguf"))
            .env("CONTRACT_MMPROJ", models.join("tiny-mmproj.gguf")),
    ) && shaped(steps, sh, &binary, version)
}

/// The LLaVA-shaped model's layout (`shaped-model llava-mini`: the 7B pair's keys, tensor names
/// and quantisations at a few MB) loads in the real server and answers every frame through the CLI
/// under the benchmark's bounded schema: what the GPU benchmark relies on, proven on every CI run.
fn shaped(steps: &mut Steps, sh: &Shell, server: &std::path::Path, version: &str) -> bool {
    let dir = target_dir().join("shaped-mini");
    let made = shaped_model::write("llava-mini", &dir.join("model"))
        .and_then(|_| frames::write(4, 746, 420, &dir.join("frames")))
        .and_then(|()| {
            let records: String = (0..4)
                .map(|n| {
                    let frame = dir.join("frames").join(format!("frame_{n:05}.jpg"));
                    format!(
                        "{{\"id\": {n}, \"images\": [{:?}]}}\n",
                        frame.display().to_string()
                    )
                })
                .collect();
            std::fs::write(dir.join("records.jsonl"), records)
                .and_then(|()| {
                    std::fs::write(dir.join("schema.json"), shaped_model::BOUNDED_SCHEMA)
                })
                .map_err(|e| format!("cannot write into {}: {e}", dir.display()))
        });
    if let Err(e) = made {
        eprintln!("xtask: {e}");
        return false;
    }
    let (model, mmproj) = shaped_model::files(&dir.join("model"));
    let bin = target_dir().join("debug");
    let infer = bin.join("cinecut-infer");
    let (schema, records, out) = (
        dir.join("schema.json"),
        dir.join("records.jsonl"),
        dir.join("out.jsonl"),
    );
    steps.cmd(
        &format!("shaped-model-{version}"),
        cmd!(sh, "{infer} run --model {model} --mmproj {mmproj} --schema {schema} --prompt 'Describe this keyframe as JSON.' --max-tokens 256 --server-bin {server} --gpu-layers 0 --port 0 --slots 2 --progress off --output {out} {records}")
            .env("NVIDIA_SMI", bin.join("nvsmi-shim")),
    )
}
