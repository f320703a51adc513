//! `cinecut-infer`: describes keyframes, or answers records under any JSON schema, through the
//! engine's full lifecycle; merges the shards of a many-host job; checks a GPU's VRAM.
//! `cinecut-infer --help` for usage.
//!
//! As ripgrep's `main`: parse, run the command, map its outcome to the exit code. Each command has
//! its file; `job/` is what `describe` and `run` share.

mod check;
mod cli;
mod describe;
mod frames;
mod job;
mod jsonl;
mod line;
mod merge;
mod outfile;
mod records;
mod report;
mod run;
mod settings;
mod signals;

use std::process::ExitCode;

use clap::{CommandFactory, Parser};

use cli::{Cli, Command};
use job::summary::EXIT_SETUP;

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Describe(args) => describe::describe(args),
        Command::Run(args) => run::run(args),
        Command::Check(args) => check::check(args),
        Command::Merge(args) => merge::command(args),
        Command::Report(args) => report::command(args),
        Command::Completions { shell } => {
            let mut out = std::io::stdout();
            clap_complete::generate(shell, &mut Cli::command(), "cinecut-infer", &mut out);
            ExitCode::SUCCESS
        }
        Command::Manpages { dir } => match clap_mangen::generate_to(Cli::command(), &dir) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(format!(
                "cannot write the man pages into {}: {e}",
                dir.display()
            )),
        },
    }
}

/// Bad input or a failed start: one line on stderr, exit 2.
fn fail(message: impl std::fmt::Display) -> ExitCode {
    eprintln!("cinecut-infer: error: {message}");
    ExitCode::from(EXIT_SETUP)
}
