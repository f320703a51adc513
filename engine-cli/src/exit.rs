//! How a command ends: its exit code, each meaning one thing, and the failure that ends it early.
//! Commands return one of these; `main` prints the failure and maps the code.

use std::process::ExitCode;

/// The exit codes, each with one meaning (README "Exit codes"; `--help` lists them too).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// 0: done: every item answered (`describe`, `run`, `merge`), the GPU can take the engine
    /// (`check`), the page written (`report`).
    Done,
    /// 1: the job ran, but some items have no answer: they failed, were not attempted, or are
    /// missing from the shards (`merge`).
    Incomplete,
    /// 2: refused: nothing was done (bad input or flags, a server that did not start, a GPU that
    /// could not be used).
    Refused,
    /// 3: `check`: the GPU cannot take the engine (too little free VRAM, or unreadable).
    GpuUnusable,
    /// 4: an output could not be written (a full disk): the output keeps whole lines only.
    WriteFailed,
    /// 130: interrupted by Ctrl-C or SIGTERM (128 + SIGINT, as shells report it).
    Interrupted,
}

impl Exit {
    /// The process's exit code.
    pub fn code(self) -> u8 {
        match self {
            Exit::Done => 0,
            Exit::Incomplete => 1,
            Exit::Refused => 2,
            Exit::GpuUnusable => 3,
            Exit::WriteFailed => 4,
            Exit::Interrupted => 130,
        }
    }
}

impl From<Exit> for ExitCode {
    fn from(exit: Exit) -> Self {
        ExitCode::from(exit.code())
    }
}

/// `--help`'s list of the exit codes.
pub const EXIT_CODES: &str = "Exit codes: 0 done (every item answered); 1 incomplete (some items \
failed, were not attempted, or are missing); 2 refused (bad input or a failed start: nothing was \
done); 3 check: the GPU cannot take the engine; 4 an output could not be written; 130 interrupted.";

/// Why a command ended early, in this CLI's words, and the code it ends with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub exit: Exit,
    pub message: String,
}

impl Failure {
    /// Nothing was done: bad input, or a start that failed.
    pub fn refused(message: impl Into<String>) -> Failure {
        Failure {
            exit: Exit::Refused,
            message: message.into(),
        }
    }

    /// An output could not be written.
    pub fn write(message: impl Into<String>) -> Failure {
        Failure {
            exit: Exit::WriteFailed,
            message: message.into(),
        }
    }

    /// A signal stopped the command.
    pub fn interrupted(message: impl Into<String>) -> Failure {
        Failure {
            exit: Exit::Interrupted,
            message: message.into(),
        }
    }
}

impl From<String> for Failure {
    /// A message alone: bad input.
    fn from(message: String) -> Self {
        Failure::refused(message)
    }
}

/// What a command returns: how it ended, or why it ended early.
pub type Outcome = Result<Exit, Failure>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_code_is_distinct_and_listed_in_the_help() {
        let all = [
            Exit::Done,
            Exit::Incomplete,
            Exit::Refused,
            Exit::GpuUnusable,
            Exit::WriteFailed,
            Exit::Interrupted,
        ];
        let codes: std::collections::HashSet<u8> = all.iter().map(|e| e.code()).collect();
        assert_eq!(codes.len(), all.len());
        for exit in all {
            assert!(
                EXIT_CODES.contains(&format!("{} ", exit.code())),
                "{exit:?}"
            );
        }
    }
}
