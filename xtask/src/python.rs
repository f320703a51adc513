//! The Python package (`engine-py`): a virtual environment under `target/`, the wheel built and
//! installed from the checkout (`pip install ./engine-py`, as a user would), its pytest suite, and
//! its benchmark.

use std::path::{Path, PathBuf};

use xshell::{Shell, cmd};

use crate::steps::{Steps, root, target_dir};

/// The virtual environment's Python, with maturin, pytest and requests (for the benchmark's plain-Python
/// engine) installed and the package built from this checkout; `None` after a failed step.
pub fn environment(steps: &mut Steps, sh: &Shell) -> Option<PathBuf> {
    let venv = target_dir().join("py-venv");
    let python = venv.join("bin").join("python");
    if !python.is_file() && !steps.cmd("python-venv", cmd!(sh, "python3 -m venv {venv}")) {
        return None;
    }
    let pip = [
        "-m",
        "pip",
        "install",
        "--quiet",
        "--disable-pip-version-check",
    ];
    if !steps.cmd(
        "python-deps",
        cmd!(sh, "{python} {pip...} maturin>=1.7,<2 pytest requests"),
    ) {
        return None;
    }
    let package = root().join("engine-py");
    // --force-reinstall: the version does not change between commits, the code does.
    if !steps.cmd(
        "python-wheel",
        cmd!(
            sh,
            "{python} {pip...} --force-reinstall --no-deps {package}"
        ),
    ) {
        return None;
    }
    Some(python)
}

/// The pytest suite against the fake server, the shim and the CLI of `profile` (`debug`, `release`).
pub fn test(steps: &mut Steps, sh: &Shell, python: &Path, profile: &str) -> bool {
    let tests = root().join("engine-py").join("tests");
    let bin = target_dir().join(profile);
    steps.cmd(
        "pytest",
        cmd!(sh, "{python} -m pytest -q {tests}")
            .env("FAKE_SERVER", bin.join("fake-llama-server"))
            .env("NVSMI_SHIM", bin.join("nvsmi-shim"))
            .env("CINECUT_INFER", bin.join("cinecut-infer")),
    )
}

/// The Python benchmark on the release fakes; writes its Markdown section to `out`.
pub fn bench(steps: &mut Steps, sh: &Shell, python: &Path, out: &Path) -> bool {
    let bin = target_dir().join("release");
    let script = root().join("engine-py").join("bench").join("bench.py");
    steps.cmd(
        "python-bench",
        cmd!(sh, "{python} {script} {out}")
            .env("LLAMA_SERVER", bin.join("fake-llama-server"))
            .env("NVIDIA_SMI", bin.join("nvsmi-shim"))
            .env("FAKE_SERVER", bin.join("fake-llama-server"))
            .env("NVSMI_SHIM", bin.join("nvsmi-shim"))
            .env("CINECUT_INFER", bin.join("cinecut-infer")),
    )
}
