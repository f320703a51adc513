//! How a child ended ([`ChildExit`]) and how its stop went ([`Escalation`], [`Leftover`]).

use std::fmt;
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;

/// How a child process ended: an exit code or a signal. Prints as "exit code 1" or
/// "signal 9 (SIGKILL)".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ChildExit {
    /// It exited with this code.
    Code(i32),
    /// A signal ended it.
    Signal(i32),
}

impl ChildExit {
    /// Whether it exited with code 0.
    pub fn success(self) -> bool {
        self == ChildExit::Code(0)
    }

    pub(crate) fn from_status(status: ExitStatus) -> ChildExit {
        match (status.code(), status.signal()) {
            (Some(code), _) => ChildExit::Code(code),
            (None, Some(signal)) => ChildExit::Signal(signal),
            (None, None) => ChildExit::Code(-1),
        }
    }
}

impl fmt::Display for ChildExit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            ChildExit::Code(code) => write!(f, "exit code {code}"),
            ChildExit::Signal(sig) => write!(f, "signal {sig} ({})", signal_name(sig)),
        }
    }
}

/// How far a stop had to go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Escalation {
    /// The process (and its tree) had already exited before the stop began.
    AlreadyExited,
    /// It exited after the first SIGTERM.
    Term,
    /// It needed a second SIGTERM (llama-server exits at once on the second, with exit code 1).
    /// The real server loses a SIGTERM sent after its handler is installed but before its task
    /// loop starts (the engine's readiness waits for the loop where `/slots` is on), and one
    /// with a request in flight, rarely.
    SecondTerm,
    /// It ignored both SIGTERMs and was SIGKILLed at the grace deadline.
    Kill,
}

/// A process of the tree that was still there after SIGKILL and the bounded wait that follows it
/// (uninterruptible sleep in a driver, say, or another user's process): reported, not waited for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leftover {
    /// Its pid.
    pub pid: u32,
    /// Its state letter from `/proc/PID/stat` (`D`: uninterruptible sleep, `T`: stopped, …).
    pub state: char,
}

impl fmt::Display for Leftover {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "pid {} (state {})", self.pid, self.state)
    }
}

/// How a stop went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Stopped {
    /// The leader's exit; `None` if even SIGKILL did not end it within the bounded wait.
    pub(crate) exit: Option<ChildExit>,
    pub(crate) escalation: Escalation,
    /// Processes of the tree still there at the end.
    pub(crate) left_running: Vec<Leftover>,
}

pub(crate) fn signal_name(sig: i32) -> &'static str {
    match sig {
        1 => "SIGHUP",
        2 => "SIGINT",
        4 => "SIGILL",
        6 => "SIGABRT",
        7 => "SIGBUS",
        8 => "SIGFPE",
        9 => "SIGKILL",
        11 => "SIGSEGV",
        13 => "SIGPIPE",
        15 => "SIGTERM",
        _ => "other signal",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exits_print_as_the_engine_always_wrote_them() {
        assert_eq!(ChildExit::Code(1).to_string(), "exit code 1");
        assert_eq!(ChildExit::Signal(6).to_string(), "signal 6 (SIGABRT)");
        assert!(ChildExit::Code(0).success());
        assert!(!ChildExit::Signal(15).success());
    }
}
