//! The Python package (`engine-py`) as users get it: a wheel built by maturin into `target/dist`
//! (abi3, manylinux_2_17 through zig: glibc 2.17 and later), installed into a fresh virtual
//! environment with no cargo or rustc on its PATH, and tested there (pytest, and `mypy --strict` on
//! a script that uses every public name); and its benchmark.

use std::path::{Path, PathBuf};

use xshell::{Shell, cmd};

use crate::steps::{Steps, root, target_dir};

/// The oldest glibc the wheel supports: manylinux2014 (`manylinux_2_17`), which zig can link for
/// from any host (Rust itself needs glibc 2.17).
const COMPATIBILITY: &str = "manylinux2014";

const PIP: [&str; 5] = [
    "-m",
    "pip",
    "install",
    "--quiet",
    "--disable-pip-version-check",
];

/// The build environment's Python (maturin, zig, mypy, and the benchmark's `requests`); `None`
/// after a failed step.
pub fn tools(steps: &mut Steps, sh: &Shell) -> Option<PathBuf> {
    let venv = target_dir().join("py-venv");
    let python = venv.join("bin").join("python");
    if !python.is_file() && !steps.cmd("python-venv", cmd!(sh, "python3 -m venv {venv}")) {
        return None;
    }
    steps
        .cmd(
            "python-deps",
            cmd!(
                sh,
                "{python} {PIP...} maturin>=1.7,<2 ziglang pytest requests mypy"
            ),
        )
        .then_some(python)
}

/// Builds the wheel into `target/dist` with the tools of `python`, and returns its path.
pub fn wheel(steps: &mut Steps, sh: &Shell, python: &Path) -> Option<PathBuf> {
    let dist = target_dir().join("dist");
    let manifest = root().join("engine-py").join("Cargo.toml");
    let bin = python.parent().expect("a venv's bin folder");
    // maturin finds zig through the Python it runs beside.
    let path = std::env::join_paths(std::iter::once(bin.to_path_buf()).chain(
        std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()),
    ))
    .ok()?;
    for old in wheels(&dist) {
        let _ = std::fs::remove_file(old);
    }
    let built = steps.cmd(
        "python-wheel",
        cmd!(sh, "{bin}/maturin build --release --strip --zig --compatibility {COMPATIBILITY} -m {manifest} -o {dist}")
            .env("PATH", path),
    );
    let found = wheels(&dist);
    match (built, found.as_slice()) {
        (true, [wheel]) => Some(wheel.clone()),
        (true, other) => {
            eprintln!(
                "xtask: expected one wheel in {}, found {other:?}",
                dist.display()
            );
            None
        }
        (false, _) => None,
    }
}

fn wheels(dist: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dist)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "whl"))
        .collect()
}

/// A fresh virtual environment with `wheel` installed (a binary only: nothing is built) and the
/// test tools from PyPI; its Python.
pub fn install(steps: &mut Steps, sh: &Shell, wheel: &Path) -> Option<PathBuf> {
    let venv = target_dir().join("py-wheel-venv");
    let _ = std::fs::remove_dir_all(&venv);
    let python = venv.join("bin").join("python");
    let dist = wheel.parent().expect("a wheel in a folder");
    let made = steps.cmd("python-install", cmd!(sh, "python3 -m venv {venv}"))
        && steps.cmd(
            "python-install",
            cmd!(
                sh,
                "{python} {PIP...} --only-binary :all: --find-links {dist} cinecut-engine pytest mypy requests"
            ),
        );
    made.then_some(python)
}

/// PATH without any folder that holds cargo or rustc: the installed wheel must need neither.
fn path_without_rust() -> std::ffi::OsString {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let kept = std::env::split_paths(&path)
        .filter(|dir| !dir.join("cargo").exists() && !dir.join("rustc").exists());
    std::env::join_paths(kept).unwrap_or_default()
}

/// The pytest suite, with the Python of the wheel's environment, against the fake server, the shim
/// and the CLI of `profile` (`debug`, `release`), with no Rust toolchain on PATH; then `mypy
/// --strict` on the typed example against the installed package, and on the package's source.
pub fn test(steps: &mut Steps, sh: &Shell, python: &Path, tools: &Path, profile: &str) -> bool {
    let package = root().join("engine-py");
    let tests = package.join("tests");
    let example = package.join("examples").join("typed_usage.py");
    let source = package.join("python").join("cinecut_engine");
    let bin = target_dir().join(profile);
    steps.cmd(
        "pytest",
        cmd!(sh, "{python} -m pytest -q -p no:cacheprovider {tests}")
            .env("PATH", path_without_rust())
            .env("FAKE_SERVER", bin.join("fake-llama-server"))
            .env("NVSMI_SHIM", bin.join("nvsmi-shim"))
            .env("CINECUT_INFER", bin.join("cinecut-infer"))
            .env("CINECUT_EXPECT_INSTALLED", "1"),
    ) && steps.cmd(
        "mypy",
        cmd!(sh, "{python} -m mypy --strict --no-incremental {example}")
            .env("PATH", path_without_rust()),
    ) && steps.cmd(
        "mypy-source",
        cmd!(sh, "{tools} -m mypy --strict --no-incremental {source}"),
    )
}

/// The Python benchmark on the release fakes, with the installed wheel; writes its Markdown section
/// to `out`.
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

/// Tools, wheel and its environment in one: the installed environment's Python and the tools'.
pub fn installed(steps: &mut Steps, sh: &Shell) -> Option<(PathBuf, PathBuf)> {
    let tools = tools(steps, sh)?;
    let wheel = wheel(steps, sh, &tools)?;
    let python = install(steps, sh, &wheel)?;
    Some((python, tools))
}
