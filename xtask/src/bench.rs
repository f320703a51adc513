//! `cargo xtask bench`: criterion for the in-process parts, the Python package's benchmark, then the
//! process-level harness (release build) that compares side by side and writes BENCHMARKS.md.

use std::path::PathBuf;
use std::process::ExitCode;

use xshell::cmd;

use crate::steps::{Steps, cargo, root, shell, target_dir};
use crate::{prereq, python};

/// Runs the benchmarks and writes BENCHMARKS.md: criterion for the in-process parts, then the
/// process-level harness (release build) that compares side by side and adds the criterion numbers.
pub fn run(quick: bool) -> ExitCode {
    if let Err(e) = prereq::ensure(&[prereq::PYTHON, prereq::VENV]) {
        eprintln!("xtask: {e}");
        return ExitCode::FAILURE;
    }
    let sh = shell();
    let cargo = cargo();
    let times: &[&str] = if quick {
        &["--warm-up-time", "0.5", "--measurement-time", "1"]
    } else {
        &["--warm-up-time", "1", "--measurement-time", "3"]
    };
    let mut steps = Steps::new();
    if !steps.cmd(
        "criterion",
        cmd!(
            sh,
            "{cargo} bench -p engine-core --bench in_process -- {times...}"
        ),
    ) {
        return steps.report();
    }
    // GPU sections written by `gpu-smoke` runs (one per card), in name order.
    let mut gpu_sections: Vec<PathBuf> = std::fs::read_dir(root().join("docs"))
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("gpu-results") && n.ends_with(".md"))
        })
        .collect();
    gpu_sections.sort();
    let gpu_args: Vec<String> = gpu_sections
        .iter()
        .flat_map(|p| ["--gpu".to_string(), p.display().to_string()])
        .collect();
    let quick_arg: &[&str] = if quick { &["--quick"] } else { &[] };
    // The Python package's section, on the release fakes.
    let python_section = target_dir().join("python-bench.md");
    let _ = std::fs::remove_file(&python_section);
    // The selection the harness builds its binaries with (tests/src/lib.rs), so both share one
    // release build of the dependencies.
    if steps.cmd(
        "release-fakes",
        cmd!(sh, "{cargo} build --release --workspace --bins"),
    ) && let Some((python, _)) = python::installed(&mut steps, &sh)
    {
        python::bench(&mut steps, &sh, &python, &python_section);
    }
    let python_arg: Vec<String> = if python_section.is_file() {
        vec!["--gpu".into(), python_section.display().to_string()]
    } else {
        Vec::new()
    };
    let out = root().join("BENCHMARKS.md");
    let criterion = target_dir().join("criterion");
    steps.cmd("harness", cmd!(sh, "{cargo} run --release -p tests --example bench -- --out {out} --criterion {criterion} {python_arg...} {gpu_args...} {quick_arg...}"));
    steps.report()
}
