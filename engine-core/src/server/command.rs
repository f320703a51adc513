//! The server's command line: CineCut's flags from what a server is started with ([`ServerSpec`]),
//! the flags the engine owns (an extra argument may not override one), and the model files'
//! check that comes before any spawn.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::error::StartError;
use crate::gguf::{ModelRole, check_role};
use crate::setting::{ConfigError, Setting};

/// Everything a server is started with, as the engine's configuration decided it.
#[derive(Debug, Clone)]
pub(crate) struct ServerSpec {
    /// The llama-server program.
    pub(crate) program: PathBuf,
    /// `-m`.
    pub(crate) model: PathBuf,
    /// `--mmproj`, for a vision model.
    pub(crate) mmproj: Option<PathBuf>,
    /// The port asked for (0: a free one).
    pub(crate) port: u16,
    /// `-ngl`.
    pub(crate) gpu_layers: u32,
    /// Tokens per slot (the server gets `-c ctx_size × slots`).
    pub(crate) ctx_size: u32,
    /// `-np`.
    pub(crate) slots: u32,
    /// `-t`, where set.
    pub(crate) threads: Option<u32>,
    /// CineCut's original `--log-disable`.
    pub(crate) log_disable: bool,
    /// Arguments appended as given (checked by [`check_extra_args`]).
    pub(crate) extra_args: Vec<OsString>,
    /// Environment variables added for the server.
    pub(crate) env: Vec<(OsString, OsString)>,
    /// Debug mode's log file, where the server's whole output goes.
    pub(crate) debug_log: Option<PathBuf>,
    /// Whether frames may go as `file://` references where the server offers `--media-path`.
    pub(crate) offer_files: bool,
    /// The fallback readiness poll.
    pub(crate) health_poll_interval: Duration,
    /// How long the server may take to become ready.
    pub(crate) startup_timeout: Duration,
    /// SIGTERM to SIGKILL when a failed start is stopped.
    pub(crate) stop_grace: Duration,
}

impl ServerSpec {
    /// The command line (without the program) for `port`: CineCut's flags, then the extra
    /// arguments. `-c` is the context per slot times the slots, because llama-server divides `-c`
    /// among its slots.
    pub(crate) fn args(&self, port: u16) -> Vec<OsString> {
        let total_ctx = u64::from(self.ctx_size) * u64::from(self.slots);
        let mut args: Vec<OsString> = vec!["-m".into(), self.model.clone().into()];
        if let Some(mmproj) = &self.mmproj {
            args.extend(["--mmproj".into(), mmproj.clone().into()]);
        }
        args.extend([
            "--port".into(),
            port.to_string().into(),
            "--host".into(),
            "127.0.0.1".into(),
            "-ngl".into(),
            self.gpu_layers.to_string().into(),
            "-c".into(),
            total_ctx.to_string().into(),
            "-np".into(),
            self.slots.to_string().into(),
        ]);
        if self.log_disable {
            args.push("--log-disable".into());
        }
        if let Some(threads) = self.threads {
            args.extend(["-t".into(), threads.to_string().into()]);
        }
        args.extend(self.extra_args.iter().cloned());
        args
    }

    /// Whether the caller sizes the prompt cache: an extra argument (`-cram`, `--cache-ram`, or
    /// `--cache_ram`, which the server reads the same) or `LLAMA_ARG_CACHE_RAM` in the server's
    /// environment (set for it, or inherited), which a `--cache-ram` on the command line would
    /// override.
    pub(crate) fn sets_cache_ram(&self) -> bool {
        const VAR: &str = "LLAMA_ARG_CACHE_RAM";
        let flag_given = self
            .extra_args
            .iter()
            .any(|arg| matches!(flag_name(arg).as_deref(), Some("-cram" | "--cache-ram")));
        flag_given || self.env.iter().any(|(key, _)| key == VAR) || std::env::var_os(VAR).is_some()
    }
}

/// The server flags the engine owns, and the setting that sets each: an extra argument that
/// overrode one would undo a guarantee (`--host 0.0.0.0` listens on every interface; a second
/// `--port` or `--api-key` makes the server one the engine cannot prove its own; a `--log-disable`
/// hides why a start failed).
const OWNED_FLAGS: &[(&[&str], &str)] = &[
    (&["--host"], "the engine listens on 127.0.0.1 only"),
    (&["--port"], "use `port` (0 picks a free one)"),
    (
        &["--api-key", "--api-key-file"],
        "the engine gives its server a fresh random key",
    ),
    (
        &[
            "-m",
            "--model",
            "-mu",
            "--model-url",
            "-hf",
            "-hfr",
            "--hf-repo",
        ],
        "use `model`",
    ),
    (
        &["-mm", "--mmproj", "-mmu", "--mmproj-url", "--no-mmproj"],
        "use `mmproj`",
    ),
    (&["-np", "--parallel"], "use `slots`"),
    (
        &["-c", "--ctx-size"],
        "use `ctx_size` (the context per slot)",
    ),
    (
        &["-ngl", "--gpu-layers", "--n-gpu-layers"],
        "use `gpu_layers`",
    ),
    (
        &["--log-disable", "--log-file"],
        "the engine reads the server's log: use `debug` for a file",
    ),
    (&["--path"], "the engine serves no files"),
    (
        &["--media-path"],
        "the engine sets it when it sends frames as files: use `image_transport`",
    ),
    (&["-t", "--threads"], "use `threads`"),
    (
        &["--no-slots"],
        "the engine's readiness asks `/slots` whether the task loop runs",
    ),
];

/// Refuses an extra argument that overrides a flag the engine owns, naming the setting to use.
pub(crate) fn check_extra_args(args: &[OsString]) -> Result<(), ConfigError> {
    for flag in args.iter().filter_map(flag_name) {
        let flag = flag.as_str();
        if let Some((_, instead)) = OWNED_FLAGS.iter().find(|(flags, _)| flags.contains(&flag)) {
            return Err(ConfigError::new(
                Setting::Args,
                format!("{flag:?} sets what the engine owns: {instead}"),
            ));
        }
    }
    Ok(())
}

/// The flag an argument names, as llama-server reads it: the part before a `=` (`--port=9000`), and
/// a long flag's `_` as `-` (the server takes `--api_key` for `--api-key`). `None` for an argument
/// that is not UTF-8 (no flag of the server's is).
fn flag_name(arg: &OsString) -> Option<String> {
    let text = arg.to_str()?;
    let flag = text.split_once('=').map_or(text, |(flag, _)| flag);
    Some(match flag.strip_prefix("--") {
        Some(long) => format!("--{}", long.replace('_', "-")),
        None => flag.to_string(),
    })
}

/// The server program, found as the spawn would find it (a path as given; a bare name on `PATH`),
/// or [`StartError::ServerNotFound`]: what a swap checks before it stops the running model.
pub(crate) fn find_program(program: &Path) -> Result<PathBuf, StartError> {
    use std::os::unix::fs::PermissionsExt;
    let runnable = |path: &Path| {
        std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    let found = if program.components().count() > 1 {
        runnable(program).then(|| program.to_path_buf())
    } else {
        std::env::var_os("PATH").and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join(program))
                .find(|path| runnable(path))
        })
    };
    found.ok_or_else(|| StartError::ServerNotFound {
        program: program.to_path_buf(),
    })
}

/// Checks the model files as llama-server would load them: each must exist and be GGUF (version 2
/// or 3); the model must not be a vision projector; the mmproj must be one
/// (`general.architecture = clip`) with a `clip.projector_type`.
pub(crate) fn check_model_files(model: &Path, mmproj: Option<&Path>) -> Result<(), StartError> {
    let files =
        std::iter::once((ModelRole::Model, model)).chain(mmproj.map(|p| (ModelRole::Mmproj, p)));
    for (role, path) in files {
        if !path.is_file() {
            return Err(StartError::ModelNotFound {
                role,
                path: path.to_path_buf(),
            });
        }
        check_role(role, path).map_err(|reason| StartError::BadModel {
            role,
            path: path.to_path_buf(),
            reason,
        })?;
    }
    Ok(())
}
