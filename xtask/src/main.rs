//! Project automation. `cargo xtask ci` runs every hermetic check as named, timed steps.
//! `cargo xtask --help` lists the tasks.

use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

const HELP: &str = "\
cargo xtask <task>

Tasks:
  ci      every hermetic check: fmt, clippy (-D warnings), build, tests (trybuild included), docs
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
    let mut doc = cargo();
    doc.args(["doc", "--workspace", "--no-deps"])
        .env("RUSTDOCFLAGS", "-D warnings");
    for (name, command) in [
        ("fmt", fmt),
        ("clippy", clippy),
        ("build", build),
        ("test", test),
        ("doc", doc),
    ] {
        if !steps.run(name, command) {
            break;
        }
    }
    steps.report()
}

fn demo(args: &[String]) -> ExitCode {
    let mut steps = Steps { done: Vec::new() };
    let mut run = cargo();
    run.args([
        "run",
        "--quiet",
        "-p",
        "tests",
        "--example",
        "lifecycle",
        "--",
    ])
    .args(args);
    steps.run("demo", run);
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
