//! `cargo xtask ci`: every check, as named and timed steps: the rooms, fmt, clippy, build, the packaged crates
//! built on their own, the tests, the soak, the docs, the Python package, the man pages, and the
//! contract suite against the real llama-server (two versions).

use std::path::PathBuf;
use std::process::ExitCode;

use xshell::cmd;

use crate::prereq::{self, Need};
use crate::steps::{Steps, cargo, fresh_dir, shell, target_dir};
use crate::{contract, dist, python, real_server, rooms, scale_out};

/// What CI's steps need from the machine, checked (and installed, as root) before the first step.
const NEEDS: &[Need] = &[
    prereq::RUSTFMT,
    prereq::CLIPPY,
    prereq::SH,
    prereq::SETPRIV,
    prereq::FLOCK,
    prereq::CMAKE,
    prereq::CXX,
    prereq::TAR,
    prereq::PYTHON,
    prereq::VENV,
    prereq::PIP,
    prereq::CHROMIUM,
];

pub fn run() -> ExitCode {
    if let Err(e) = prereq::ensure(NEEDS).and_then(|()| scale_out::check()) {
        eprintln!("xtask: {e}");
        return ExitCode::FAILURE;
    }
    let sh = shell();
    let cargo = cargo();
    // The tests' GPU locks live in this clone, so a second checkout testing at the same time (a CI
    // run beside a developer's) never contends for them; the machine-wide default has its own test.
    sh.set_var("CINECUT_LOCK_DIR", target_dir().join("test-locks"));
    let mut steps = Steps::new();
    forget_unpacked_own_crates();
    let package_check = fresh_dir(&target_dir().join("package-check"));
    let commands = [
        ("fmt", cmd!(sh, "{cargo} fmt --all -- --check")),
        (
            "clippy",
            cmd!(
                sh,
                "{cargo} clippy --workspace --all-targets --all-features -- -D warnings"
            ),
        ),
        ("build", cmd!(sh, "{cargo} build --workspace --all-targets")),
        // The publishable crates, packaged and built on their own (outside the workspace), in a
        // target folder of their own that starts empty: cargo takes a registry crate of the same
        // version as unchanged, so an old build of the packaged engine-core would hide a new one.
        (
            "package",
            cmd!(
                sh,
                "{cargo} package -p engine-core -p engine-cli --allow-dirty"
            )
            .env("CARGO_TARGET_DIR", &package_check),
        ),
        ("test", cmd!(sh, "{cargo} test --workspace")),
        // The steps below pick one test binary with `--workspace --test NAME`, not `-p tests`: the
        // same package selection as the test step, so the same features and nothing compiled again
        // (`-p tests` resolved other features and rebuilt for 160 s on 2 cores).
        // The tests that need root (CI runs as root: see prereq), ignored in a plain test run.
        (
            "as-root",
            cmd!(
                sh,
                "{cargo} test --workspace --test engine -- --ignored as_root_"
            ),
        ),
        (
            "soak",
            cmd!(
                sh,
                "{cargo} test --workspace --test soak -- --ignored --nocapture"
            ),
        ),
        (
            "report-browser",
            cmd!(sh, "{cargo} test --workspace --test browser -- --ignored"),
        ),
        (
            "doc",
            cmd!(sh, "{cargo} doc --workspace --no-deps").env("RUSTDOCFLAGS", "-D warnings"),
        ),
    ];
    let rooms = steps.run("rooms", || {
        rooms::check(rooms::CRATES).map(|summary| eprintln!("xtask: {summary}"))
    });
    let ok = rooms
        && commands.into_iter().all(|(name, command)| {
            let ok = steps.cmd(name, command);
            if name == "package" {
                // A second dependency tree (a gigabyte) that nothing after this step reads: a fresh
                // CI machine's disk is not always large enough to keep it.
                let _ = std::fs::remove_dir_all(&package_check);
            }
            ok
        });
    let ok = ok
        && python::installed(&mut steps, &sh).is_some_and(|(python, tools)| {
            python::test(&mut steps, &sh, &python, &tools, "debug")
                && scale_out::all(&mut steps, &sh, &python, None)
        });
    if ok
        && steps.run("dist", || {
            dist::write(&target_dir().join("debug").join("cinecut-infer"))
        })
    {
        // The version CI targets, then the oldest on PyPI (CineCut pins an old build).
        for version in [real_server::LLAMA_VERSION, real_server::OLDEST_VERSION] {
            contract::real(&mut steps, &sh, version);
        }
    }
    steps.report()
}

/// Removes cargo's unpacked copies of our own packaged crates (`$CARGO_HOME/registry/src/*/NAME-*`):
/// cargo unpacks the just-packaged `engine-core` there to verify `engine-cli` against it, and reuses an
/// existing folder of the same version, so a copy from an earlier run would stand in for today's code.
fn forget_unpacked_own_crates() {
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cargo")));
    let Some(src) = cargo_home.map(|home| home.join("registry").join("src")) else {
        return;
    };
    let registries = std::fs::read_dir(src).into_iter().flatten().flatten();
    for registry in registries {
        let crates = std::fs::read_dir(registry.path())
            .into_iter()
            .flatten()
            .flatten();
        for krate in crates {
            let name = krate.file_name().to_string_lossy().into_owned();
            if ["engine-core-", "engine-cli-"]
                .iter()
                .any(|own| name.starts_with(own))
            {
                let _ = std::fs::remove_dir_all(krate.path());
            }
        }
    }
}
