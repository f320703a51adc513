//! `cargo xtask contract [--real [--version V]]`: the server contract suite, against the fake or the
//! real llama-server (built and cached on first use) with the tiny model.

use std::path::PathBuf;
use std::process::ExitCode;

use xshell::{Shell, cmd};

use crate::steps::{Steps, cargo, shell, target_dir};
use crate::{prereq, real_server, tiny_model};

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
                cmd!(sh, "{cargo} test -p tests --test contract"),
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
    let binary = real_server::ensure(steps, sh, cuda, source, version)?;
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
        cmd!(sh, "{cargo} test -p tests --test contract")
            .env("CONTRACT_SERVER", &binary)
            .env("CONTRACT_MODEL", models.join("tiny-llava.gguf"))
            .env("CONTRACT_MMPROJ", models.join("tiny-mmproj.gguf")),
    )
}
