//! What a task needs from the machine, checked before its first step: the programs and Python
//! modules its steps run. As root on a Debian-like system the missing ones are installed (saying
//! what and why); otherwise the task stops at once with the exact command to run. A task never
//! finds out after ten minutes that cmake is missing.

use std::process::Command;

/// Something a step needs.
#[derive(Debug, Clone, Copy)]
pub struct Need {
    /// What it is, for people.
    pub what: &'static str,
    /// Why the task needs it.
    pub why: &'static str,
    pub check: Check,
    /// How it is installed.
    pub install: Install,
}

/// How to tell whether a need is met.
#[derive(Debug, Clone, Copy)]
pub enum Check {
    /// One of these programs is on PATH.
    Program(&'static [&'static str]),
    /// `python3 -c CODE` succeeds.
    Python(&'static str),
    /// `cargo SUBCOMMAND --version` succeeds.
    Cargo(&'static str),
}

/// Where a need comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Install {
    /// Debian packages.
    Apt(&'static [&'static str]),
    /// A rustup component.
    Rustup(&'static str),
}

impl Need {
    pub(crate) const fn program(
        what: &'static str,
        why: &'static str,
        names: &'static [&'static str],
        packages: &'static [&'static str],
    ) -> Need {
        Need {
            what,
            why,
            check: Check::Program(names),
            install: Install::Apt(packages),
        }
    }
}

pub const CMAKE: Need = Need::program(
    "cmake",
    "to build the real llama-server",
    &["cmake"],
    &["cmake"],
);
pub const CXX: Need = Need::program(
    "a C++ compiler",
    "to build the real llama-server",
    &["c++", "g++", "clang++"],
    &["g++"],
);
pub const CHROMIUM: Need = Need::program(
    "Chromium",
    "the report's test opens it in a real browser",
    &["chromium", "chromium-browser", "google-chrome"],
    &["chromium"],
);
pub const TAR: Need = Need::program("tar", "to unpack llama.cpp's source", &["tar"], &["tar"]);
pub const SH: Need = Need::program("sh", "the tests run /bin/sh wrappers", &["sh"], &["dash"]);
pub const SETPRIV: Need = Need::program(
    "setpriv",
    "a test holds a lock as another user",
    &["setpriv"],
    &["util-linux"],
);
pub const FLOCK: Need = Need::program(
    "flock",
    "a test holds a GPU-index claim from another process",
    &["flock"],
    &["util-linux"],
);
pub const PYTHON: Need = Need::program(
    "python3",
    "the Python package and the llama.cpp download",
    &["python3"],
    &["python3"],
);
pub const VENV: Need = Need {
    what: "Python's venv with pip (ensurepip)",
    why: "the Python package is built and tested in a virtual environment",
    check: Check::Python("import venv, ensurepip"),
    install: Install::Apt(&["python3-venv"]),
};
pub const PIP: Need = Need {
    what: "pip for python3",
    why: "llama.cpp's source comes from PyPI",
    check: Check::Python("import pip"),
    install: Install::Apt(&["python3-pip"]),
};
pub const RUSTFMT: Need = Need {
    what: "rustfmt",
    why: "the fmt step",
    check: Check::Cargo("fmt"),
    install: Install::Rustup("rustfmt"),
};
pub const CLIPPY: Need = Need {
    what: "clippy",
    why: "the clippy step",
    check: Check::Cargo("clippy"),
    install: Install::Rustup("clippy"),
};

/// What building the real llama-server needs.
pub const REAL_SERVER: &[Need] = &[CMAKE, CXX, TAR, PYTHON, PIP];

/// What building it from a source package at hand needs (no download, so no pip).
pub const REAL_SERVER_FROM_SOURCE: &[Need] = &[CMAKE, CXX, TAR];

fn met(need: &Need) -> bool {
    match need.check {
        Check::Program(names) => names.iter().any(|name| on_path(name)),
        Check::Python(code) => quiet(Command::new("python3").args(["-c", code])),
        Check::Cargo(sub) => quiet(Command::new(crate::steps::cargo()).args([sub, "--version"])),
    }
}

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|path| {
        std::env::split_paths(&path).any(|dir| {
            let candidate = dir.join(program);
            std::fs::metadata(&candidate).is_ok_and(|m| {
                use std::os::unix::fs::PermissionsExt;
                m.is_file() && m.permissions().mode() & 0o111 != 0
            })
        })
    })
}

fn quiet(command: &mut Command) -> bool {
    command
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// What to do about the needs that are missing.
#[derive(Debug, PartialEq, Eq)]
pub enum Action {
    /// Nothing is missing.
    Nothing,
    /// Install these (as root, through apt-get and rustup).
    Install {
        apt: Vec<&'static str>,
        rustup: Vec<&'static str>,
    },
    /// Stop with this message: the exact commands to run.
    Stop(String),
}

/// The one decision: given what is missing, whether we are root, and whether apt-get and rustup
/// are there.
pub fn decide(missing: &[Need], root: bool, apt: bool, rustup: bool) -> Action {
    if missing.is_empty() {
        return Action::Nothing;
    }
    let mut apt_packages: Vec<&'static str> = Vec::new();
    let mut components: Vec<&'static str> = Vec::new();
    for need in missing {
        match need.install {
            Install::Apt(packages) => apt_packages.extend(packages),
            Install::Rustup(component) => components.push(component),
        }
    }
    apt_packages.sort_unstable();
    apt_packages.dedup();
    let can_apt = apt_packages.is_empty() || (root && apt);
    let can_rustup = components.is_empty() || rustup;
    if can_apt && can_rustup {
        return Action::Install {
            apt: apt_packages,
            rustup: components,
        };
    }
    let list: Vec<String> = missing
        .iter()
        .map(|n| format!("{} ({})", n.what, n.why))
        .collect();
    let mut commands = Vec::new();
    if !apt_packages.is_empty() {
        let sudo = if root { "" } else { "sudo " };
        commands.push(format!(
            "{sudo}apt-get install -y {}",
            apt_packages.join(" ")
        ));
    }
    if !components.is_empty() {
        commands.push(format!("rustup component add {}", components.join(" ")));
    }
    Action::Stop(format!(
        "this machine lacks {} — install first:\n    {}\n(the Debian/Ubuntu packages; elsewhere, your system's packages for the same programs)",
        list.join(", "),
        commands.join("\n    ")
    ))
}

/// Checks `needs`, installs what is missing where it can, and says in one line what it did; an
/// error (to stop the task at once) where it cannot.
pub fn ensure(needs: &[Need]) -> Result<(), String> {
    let missing: Vec<Need> = needs.iter().copied().filter(|n| !met(n)).collect();
    let root = rustix::process::geteuid().is_root();
    match decide(&missing, root, on_path("apt-get"), on_path("rustup")) {
        Action::Nothing => Ok(()),
        Action::Stop(message) => Err(message),
        Action::Install { apt, rustup } => {
            let why: Vec<String> = missing
                .iter()
                .map(|n| format!("{} {}", n.what, n.why))
                .collect();
            if !apt.is_empty() {
                eprintln!(
                    "xtask: installing {} with apt-get: {}",
                    apt.join(" "),
                    why.join("; ")
                );
                let installed = quiet(Command::new("apt-get").args(["update", "-qq"]))
                    && Command::new("apt-get")
                        .args(["install", "-y", "-qq"])
                        .args(&apt)
                        .env("DEBIAN_FRONTEND", "noninteractive")
                        .status()
                        .is_ok_and(|s| s.success());
                if !installed {
                    return Err(format!("apt-get could not install {}", apt.join(" ")));
                }
            }
            if !rustup.is_empty() {
                eprintln!("xtask: adding the rustup components {}", rustup.join(" "));
                if !quiet(
                    Command::new("rustup")
                        .args(["component", "add"])
                        .args(&rustup),
                ) {
                    return Err(format!("rustup could not add {}", rustup.join(" ")));
                }
            }
            match missing.iter().find(|n| !met(n)) {
                None => Ok(()),
                Some(need) => Err(format!("{} is still missing after the install", need.what)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_installs_and_anyone_else_is_told_the_exact_command() {
        assert_eq!(decide(&[], false, false, false), Action::Nothing);
        let missing = [CMAKE, CXX, VENV, RUSTFMT];
        assert_eq!(
            decide(&missing, true, true, true),
            Action::Install {
                apt: vec!["cmake", "g++", "python3-venv"],
                rustup: vec!["rustfmt"],
            }
        );
        let Action::Stop(message) = decide(&missing, false, true, true) else {
            panic!("a user who is not root cannot install");
        };
        assert!(
            message.contains("sudo apt-get install -y cmake g++ python3-venv"),
            "{message}"
        );
        assert!(
            message.contains("rustup component add rustfmt"),
            "{message}"
        );
        assert!(
            message.contains("cmake (to build the real llama-server)"),
            "{message}"
        );
        // Root without apt-get (another distribution): told, not guessed at.
        let Action::Stop(message) = decide(&[CMAKE], true, false, true) else {
            panic!("no apt-get");
        };
        assert!(
            message.contains("apt-get install -y cmake") && message.contains("elsewhere"),
            "{message}"
        );
    }
}
