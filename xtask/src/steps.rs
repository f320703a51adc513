//! Named, timed steps (as once_cell's and rust-analyzer's xtasks): each runs one command through
//! xshell, and the summary at the end says which failed. And the places every task needs: the
//! workspace root, the target folder, the cargo that runs us.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use xshell::Shell;

/// Named, timed steps; the summary at the end says which failed.
pub struct Steps {
    done: Vec<(String, Duration, bool)>,
}

impl Steps {
    pub fn new() -> Steps {
        Steps { done: Vec::new() }
    }

    /// Runs one step, timing it; returns whether it succeeded.
    pub fn run(&mut self, name: &str, step: impl FnOnce() -> Result<(), String>) -> bool {
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
    pub fn cmd(&mut self, name: &str, cmd: xshell::Cmd<'_>) -> bool {
        self.run(name, || done(cmd.run()))
    }

    pub fn report(&self) -> ExitCode {
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

/// A task that writes files ends so: what it wrote on stdout (for scripts to read), or why not.
pub fn printed(written: Result<String, String>) -> ExitCode {
    match written {
        Ok(what) => {
            println!("{what}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("xtask: {e}");
            ExitCode::FAILURE
        }
    }
}

/// A shell in the workspace root, with `$CARGO` (the cargo that runs us) as `cargo`.
pub fn shell() -> Shell {
    let sh = Shell::new().expect("a shell in the current folder");
    sh.change_dir(root());
    sh
}

pub fn cargo() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".into())
}

/// Runs an xshell command, turning its error into the step's message.
pub fn done(result: xshell::Result<()>) -> Result<(), String> {
    result.map_err(|e| e.to_string())
}

/// The workspace root (xtask lives one folder below it).
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask is inside the workspace")
        .to_path_buf()
}

pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target"))
}

/// `dir`, emptied (for a step that must build from nothing).
pub fn fresh_dir(dir: &Path) -> PathBuf {
    let _ = std::fs::remove_dir_all(dir);
    dir.to_path_buf()
}
