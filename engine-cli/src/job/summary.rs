//! The end of a run: what happened to each frame, said in one line, and the exit code that goes with it.

use std::process::ExitCode;

use super::lines::Written;

/// Exit code for bad input or a setup failure (nothing described).
pub const EXIT_SETUP: u8 = 2;
/// Exit code when some frames failed (or were not attempted, or their lines not written).
pub const EXIT_FRAMES_FAILED: u8 = 1;
/// Exit code after SIGINT/SIGTERM (128 + SIGINT, as shells report it).
pub const EXIT_INTERRUPTED: u8 = 130;

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

/// The counts of one run: every item's line, by how its item ended. Only lines actually written
/// count; the counts and the lines not written add up to the input.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Summary {
    pub kind: Kind,
    pub total: usize,
    pub written: Written,
    /// The first write error, if the output could not be written.
    pub write_error: Option<String>,
    /// A signal arrived during the run.
    pub interrupted: bool,
}

impl Summary {
    /// Items whose line was not written (a failed write).
    pub fn unwritten(&self) -> usize {
        let w = self.written;
        self.total - w.answered - w.failed - w.not_attempted
    }

    /// Whether the run left items undone that `--resume` would do: a signal stopped it before
    /// every item had its answer or error.
    pub fn unfinished(&self) -> bool {
        self.interrupted && (self.written.not_attempted > 0 || self.unwritten() > 0)
    }

    /// The summary line for stderr.
    pub fn line(&self) -> String {
        let unwritten = self.unwritten();
        let mut line = format!(
            "{} {}, {} failed, {} not attempted, of {} {}",
            self.written.answered,
            self.kind.done(),
            self.written.failed,
            self.written.not_attempted,
            self.total,
            self.kind.noun()
        );
        if unwritten > 0 {
            line.push_str(&format!(" ({unwritten} finished but not written)"));
        }
        line
    }

    /// 130 when a signal stopped the run before it finished; 1 when any item failed, was not
    /// attempted, or its line not written; else 0. A signal that came once every line was written
    /// changes nothing: the job is done.
    pub fn exit_code(&self) -> ExitCode {
        if self.unfinished() {
            ExitCode::from(EXIT_INTERRUPTED)
        } else if self.write_error.is_some() || self.written.answered < self.total {
            ExitCode::from(EXIT_FRAMES_FAILED)
        } else {
            ExitCode::SUCCESS
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_frame_whose_line_was_not_written_is_not_described() {
        let summary = Summary {
            total: 1,
            write_error: Some("No space left on device".into()),
            ..Summary::default()
        };
        assert_eq!(
            summary.line(),
            "0 described, 0 failed, 0 not attempted, of 1 frames (1 finished but not written)"
        );
        assert_eq!(summary.exit_code(), ExitCode::from(EXIT_FRAMES_FAILED));
    }

    #[test]
    fn all_described_is_success() {
        let summary = Summary {
            total: 2,
            written: Written {
                answered: 2,
                ..Written::default()
            },
            ..Summary::default()
        };
        assert_eq!(summary.exit_code(), ExitCode::SUCCESS);
        // A signal after the last line: the job is done, nothing to resume.
        let late = Summary {
            interrupted: true,
            ..summary.clone()
        };
        assert!(!late.unfinished());
        assert_eq!(late.exit_code(), ExitCode::SUCCESS);
        let early = Summary {
            interrupted: true,
            total: 3,
            written: Written {
                answered: 2,
                not_attempted: 1,
                ..Written::default()
            },
            ..Summary::default()
        };
        assert_eq!(early.exit_code(), ExitCode::from(EXIT_INTERRUPTED));
    }
}
