//! `cinecut-infer`: describes keyframes, or answers records under any JSON schema, through the
//! engine's full lifecycle; merges the shards of a many-host job; checks a GPU's VRAM.
//! `cinecut-infer --help` for usage.
//!
//! As ripgrep's `main`: parse, run the command, print why it failed and map its outcome to the exit
//! code (`exit.rs`: each code means one thing). Each command has its file and returns its outcome;
//! `job/` is what `describe` and `run` share.

mod check;
mod cli;
mod describe;
mod exit;
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
use exit::{Exit, Failure, Outcome};

fn main() -> ExitCode {
    match run(Cli::parse().command) {
        Ok(exit) => exit.into(),
        Err(Failure { exit, message }) => {
            match exit {
                Exit::Interrupted => eprintln!("cinecut-infer: {message}"),
                _ => eprintln!("cinecut-infer: error: {message}"),
            }
            exit.into()
        }
    }
}

/// Runs one command: how it ended, or why it ended early.
fn run(command: Command) -> Outcome {
    match command {
        Command::Describe(args) => describe::describe(args),
        Command::Run(args) => run::run(args),
        Command::Check(args) => check::check(args),
        Command::Merge(args) => merge::command(args),
        Command::Report(args) => report::command(args),
        Command::Completions { shell } => {
            let mut out = std::io::stdout();
            clap_complete::generate(shell, &mut Cli::command(), "cinecut-infer", &mut out);
            Ok(Exit::Done)
        }
        Command::Manpages { dir } => clap_mangen::generate_to(Cli::command(), &dir)
            .map(|()| Exit::Done)
            .map_err(|e| {
                Failure::write(format!(
                    "cannot write the man pages into {}: {e}",
                    dir.display()
                ))
            }),
    }
}
