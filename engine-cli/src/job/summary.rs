//! The end of a run in this CLI's words: what happened to its items, said in one line, and the exit
//! code that goes with it, both read off the engine's summary of the run.

use engine_core::batch::Summary as RunSummary;

use crate::exit::Exit;

/// What a job's items are: frames (`describe`) or records (`run`).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    #[default]
    Frames,
    Records,
}

impl Kind {
    /// The items, in the plural.
    pub fn noun(self) -> &'static str {
        match self {
            Kind::Frames => "frames",
            Kind::Records => "records",
        }
    }

    /// What happened to an item that succeeded.
    pub fn done(self) -> &'static str {
        match self {
            Kind::Frames => "described",
            Kind::Records => "answered",
        }
    }
}

/// The summary line for stderr.
pub fn line(kind: Kind, run: &RunSummary) -> String {
    let mut line = format!(
        "{} {}, {} failed, {} not attempted, of {} {}",
        run.answered,
        kind.done(),
        run.failed,
        run.not_attempted,
        run.items,
        kind.noun()
    );
    if run.not_written > 0 {
        line.push_str(&format!(" ({} answered but not written)", run.not_written));
    }
    line
}

/// Whether a run that a signal stopped left items undone that `--resume` would do: some were never
/// sent, or their answers not written. A signal that came once every line was written changes
/// nothing: the job is done.
pub fn unfinished(run: &RunSummary, interrupted: bool) -> bool {
    interrupted && (run.not_attempted > 0 || run.not_written > 0)
}

/// The run's exit code (a failed write is told apart before this): interrupted when a signal left
/// items undone; incomplete when any item has no answer; else done.
pub fn exit(run: &RunSummary, interrupted: bool) -> Exit {
    if unfinished(run, interrupted) {
        Exit::Interrupted
    } else if run.answered < run.items {
        Exit::Incomplete
    } else {
        Exit::Done
    }
}
