//! Project automation. `cargo xtask ci` runs every hermetic check as named, timed steps.
//! `cargo xtask --help` lists the tasks.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

const HELP: &str = "\
cargo xtask <task>

Tasks:
  ci      every hermetic check: fmt, clippy (-D warnings), build, tests (trybuild included),
          the 1000-cycle soak, docs
  demo    the main job on the fake server: describe sample frames through the full lifecycle
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
            eprintln!("  {name:<10} {:>8.1}s  {mark}", took.as_secs_f64());
        }
        eprintln!("  {:<10} {:>8.1}s", "total", total.as_secs_f64());
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
    for (name, command) in [
        ("fmt", fmt),
        ("clippy", clippy),
        ("build", build),
        ("test", test),
        ("soak", soak),
        ("doc", doc),
    ] {
        if !steps.run(name, command) {
            break;
        }
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

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("ci") => ci(),
        Some("demo") => demo(&args[1..]),
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
