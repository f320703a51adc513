//! Test support: builds and finds the fake binaries, lays out a scratch folder with a model, an mmproj,
//! frames and an nvidia-smi shim, and checks that nothing is left behind.
//!
//! Each [`Harness`] gets its own GPU index, so tests running at once never contend for one GPU lock
//! (the shim reports enough GPUs for all of them): not in parallel threads, nor in other processes
//! (`cargo nextest` runs each test in its own; two test binaries may run side by side).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use engine_core::config::EngineConfigBuilder;
use engine_core::gguf::{Gguf, Value};
use engine_core::{EngineConfig, Wait};

/// How many GPUs the default shim reports; harnesses take indices 1 to `SHIM_GPUS - 1`.
pub const SHIM_GPUS: u32 = 200;

static NEXT_GPU: AtomicU32 = AtomicU32::new(0);

/// Takes a GPU index that no other live harness holds, in this process or any other, and the claim
/// that keeps it: an exclusive `flock` on a file per index, released when the harness drops. The
/// index names the GPU lock file the engine takes, so two harnesses on one index would wait on each
/// other's lock; a counter alone is per process and every process would start at the same index.
/// Indices run from 1, wrapping: 0 is left to what uses the default GPU (`--gpu 0`, the pytests).
fn claim_gpu() -> (u32, std::fs::File) {
    use rustix::fs::{FlockOperation, flock};
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let dir = claims_dir();
    for _ in 0..2 * SHIM_GPUS {
        let gpu = claim_index(NEXT_GPU.fetch_add(1, Ordering::Relaxed));
        let path = dir.join(gpu.to_string());
        // Another user's claim file opens for reading only, which is all `flock` needs.
        let file = std::fs::OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .mode(0o666)
            .open(&path)
            .inspect(|_| {
                let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666));
            })
            .or_else(|_| std::fs::File::open(&path))
            .unwrap_or_else(|e| panic!("cannot open the claim file {}: {e}", path.display()));
        if flock(&file, FlockOperation::NonBlockingLockExclusive).is_ok() {
            return (gpu, file);
        }
    }
    panic!(
        "every one of the shim's {} usable GPU indices is claimed by a running test: run fewer at once",
        SHIM_GPUS - 1
    );
}

/// The GPU index a count of claims maps to: 1 to `SHIM_GPUS - 1`, wrapping (0 is left out).
fn claim_index(count: u32) -> u32 {
    1 + count % (SHIM_GPUS - 1)
}

/// The folder of the GPU-index claims, created if missing. Beside the GPU locks the claims guard: the
/// same scope (`CINECUT_LOCK_DIR` where set). Open to every user, as the machine-wide lock folder
/// is: whoever runs the tests first creates it.
fn claims_dir() -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let dir = engine_core::gpu::lockfile::lock_dir()
        .expect("the GPU lock folder")
        .join("cinecut-test-gpu-claims");
    if std::fs::create_dir(&dir).is_ok() {
        let _ = std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o1777));
    }
    dir
}

/// The workspace's three binaries, built once per test process by one nested cargo build.
struct Binaries {
    fake_server: PathBuf,
    nvsmi_shim: PathBuf,
    cinecut_infer: PathBuf,
}

/// Builds the binaries with the same target selection as the command that built the tests, so cargo
/// finds every dependency already compiled: a `cargo build -p engine-cli` of its own would resolve
/// other features (no dev-dependencies) and compile a second copy of the dependency tree, which
/// cost CI minutes and gigabytes of disk. A test build is `--all-targets` (what `cargo xtask ci`
/// and `cargo test --workspace` build); a release build (the benchmark) only needs the bins.
fn binaries() -> &'static Binaries {
    static BINARIES: OnceLock<Binaries> = OnceLock::new();
    BINARIES.get_or_init(|| {
        let targets = if cfg!(debug_assertions) {
            "--all-targets"
        } else {
            "--bins"
        };
        let messages = escargot::CargoBuild::new()
            .arg("--workspace")
            .arg(targets)
            .current_release()
            .exec()
            .unwrap_or_else(|e| panic!("building the workspace's binaries failed: {e}"));
        let mut executables = std::collections::HashMap::new();
        for message in messages {
            let message = message.unwrap_or_else(|e| panic!("cargo build failed: {e}"));
            let decoded = message
                .decode()
                .unwrap_or_else(|e| panic!("reading cargo's output failed: {e}"));
            if let escargot::format::Message::CompilerArtifact(artifact) = decoded
                && artifact.target.kind.iter().any(|kind| kind == "bin")
                // Not the bin's own unit-test harness, which `--all-targets` builds too.
                && !artifact.profile.test
                && let Some(path) = artifact.executable
            {
                executables.insert(artifact.target.name.to_string(), path.into_owned());
            }
        }
        let mut take = |name: &str| {
            executables
                .remove(name)
                .unwrap_or_else(|| panic!("cargo built no `{name}` binary"))
        };
        Binaries {
            fake_server: take("fake-llama-server"),
            nvsmi_shim: take("nvsmi-shim"),
            cinecut_infer: take("cinecut-infer"),
        }
    })
}

/// The fake llama-server binary (built on first use).
pub fn fake_server() -> &'static Path {
    &binaries().fake_server
}

/// The nvidia-smi shim binary (built on first use).
pub fn nvsmi_shim() -> &'static Path {
    &binaries().nvsmi_shim
}

/// The `cinecut-infer` CLI binary (built on first use).
pub fn cinecut_infer() -> &'static Path {
    &binaries().cinecut_infer
}

/// Writes a GGUF file of string metadata keys and no tensors: all the engine's model check reads,
/// and all the fake server needs.
pub fn write_gguf(path: &Path, keys: &[(&str, &str)]) {
    let mut file = Gguf::default();
    for (key, value) in keys {
        file.kv(key, Value::Str(value.to_string()));
    }
    file.write(&mut std::fs::File::create(path).unwrap())
        .unwrap();
}

/// Writes the header of a LLaVA-1.5-7B-shaped model (32 layers, 32 KV heads of 128) with no
/// tensors: 1 GiB of f16 KV cache per slot of 2048 tokens, what `--slots auto` and `--servers-per-gpu auto` read to size the KV cache.
pub fn write_llava_7b_header(path: &Path) {
    let mut file = Gguf::default();
    file.kv("general.architecture", Value::Str("llama".into()))
        .kv("llama.block_count", Value::U32(32))
        .kv("llama.embedding_length", Value::U32(4096))
        .kv("llama.attention.head_count", Value::U32(32))
        .kv("llama.attention.head_count_kv", Value::U32(32));
    file.write(&mut std::fs::File::create(path).unwrap())
        .unwrap();
}

/// Makes `command`'s child unable to grow a file past `bytes` (a disk that fills up): its writes
/// beyond fail with EFBIG, as with ENOSPC, instead of SIGXFSZ killing it.
pub fn limit_file_size(command: &mut std::process::Command, bytes: u64) {
    use std::os::unix::process::CommandExt;
    // SAFETY: between fork and exec only setrlimit and signal, both async-signal-safe.
    unsafe {
        command.pre_exec(move || {
            let limit = libc::rlimit {
                rlim_cur: bytes,
                rlim_max: bytes,
            };
            if libc::setrlimit(libc::RLIMIT_FSIZE, &limit) != 0
                || libc::signal(libc::SIGXFSZ, libc::SIG_IGN) == libc::SIG_ERR
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// A scratch folder with a model, an mmproj, and helpers to make frames and shims.
#[derive(Debug)]
pub struct Harness {
    pub dir: tempfile::TempDir,
    pub model: PathBuf,
    pub mmproj: PathBuf,
    /// This harness's GPU index, claimed against every other live harness (see `claim_gpu`).
    pub gpu: u32,
    pub events: PathBuf,
    /// Holds [`Harness::gpu`] against other harnesses until this one drops.
    _gpu_claim: std::fs::File,
}

impl Default for Harness {
    fn default() -> Self {
        Self::new()
    }
}

impl Harness {
    pub fn new() -> Harness {
        let dir = tempfile::tempdir().expect("temp dir");
        let model = dir.path().join("tiny-llava.gguf");
        let mmproj = dir.path().join("tiny-mmproj.gguf");
        write_gguf(&model, &[("general.architecture", "llama")]);
        write_gguf(
            &mmproj,
            &[
                ("general.architecture", "clip"),
                ("clip.projector_type", "mlp"),
            ],
        );
        let events = dir.path().join("server-events.jsonl");
        let (gpu, gpu_claim) = claim_gpu();
        Harness {
            gpu,
            _gpu_claim: gpu_claim,
            model,
            mmproj,
            events,
            dir,
        }
    }

    /// Writes an executable wrapper that runs the shim with `knobs` set, and returns its path. The
    /// shim reports [`SHIM_GPUS`] GPUs (so this harness's index exists) unless the knobs say how many
    /// (`NVSMI_GPU_COUNT`, or a list in `NVSMI_GPUS`).
    pub fn shim(&self, knobs: &[(&str, &str)]) -> PathBuf {
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!("nvidia-smi-{}", N.fetch_add(1, Ordering::Relaxed));
        let counted = knobs
            .iter()
            .any(|(k, v)| *k == "NVSMI_GPU_COUNT" || (*k == "NVSMI_GPUS" && v.contains(',')));
        let count = SHIM_GPUS.to_string();
        let mut all = knobs.to_vec();
        if !counted {
            all.push(("NVSMI_GPU_COUNT", &count));
        }
        self.wrapper(&name, nvsmi_shim(), &all)
    }

    /// Writes an executable `/bin/sh` script `name` in the harness folder: `body` after the
    /// `#!/bin/sh` line.
    pub fn script(&self, name: &str, body: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        std::fs::write(&path, format!("#!/bin/sh\n{body}")).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path
    }

    /// Writes an executable wrapper that runs `program` with `knobs` set in its environment.
    pub fn wrapper(&self, name: &str, program: &Path, knobs: &[(&str, &str)]) -> PathBuf {
        let mut body = String::new();
        for (k, v) in knobs {
            body.push_str(&format!("export {k}='{}'\n", v.replace('\'', "'\\''")));
        }
        body.push_str(&format!("exec '{}' \"$@\"\n", program.display()));
        self.script(name, &body)
    }

    /// `cinecut-infer describe` for this harness: the fake server, a healthy shim, this harness's GPU,
    /// port 0, the fake's events file; `knobs` go into its environment.
    pub fn describe_command(&self, knobs: &[(&str, &str)]) -> std::process::Command {
        self.describe_command_on(&self.gpu.to_string(), knobs)
    }

    /// As [`Harness::describe_command`], with `--gpu gpu`.
    pub fn describe_command_on(&self, gpu: &str, knobs: &[(&str, &str)]) -> std::process::Command {
        let mut cmd = self.infer_command("describe", gpu, knobs);
        cmd.arg("--model")
            .arg(&self.model)
            .arg("--mmproj")
            .arg(&self.mmproj);
        cmd
    }

    /// `cinecut-infer run` for this harness with its model, text-only (no `--mmproj`); otherwise as
    /// [`Harness::describe_command`].
    pub fn run_command(&self, knobs: &[(&str, &str)]) -> std::process::Command {
        let mut cmd = self.infer_command("run", &self.gpu.to_string(), knobs);
        cmd.arg("--model").arg(&self.model);
        cmd
    }

    /// `cinecut-infer SUBCOMMAND --port 0 --gpu GPU` with the fake server, a healthy shim and the
    /// fake's events file; `knobs` go into its environment.
    pub fn infer_command(
        &self,
        subcommand: &str,
        gpu: &str,
        knobs: &[(&str, &str)],
    ) -> std::process::Command {
        let log = self.shim_log();
        let mut cmd = std::process::Command::new(cinecut_infer());
        cmd.arg(subcommand)
            .args(["--port", "0", "--gpu", gpu])
            .env("LLAMA_SERVER", fake_server())
            .env(
                "NVIDIA_SMI",
                self.shim(&[("NVSMI_LOG", log.to_str().unwrap())]),
            )
            .env("FAKE_LLAMA_EVENTS", &self.events)
            .envs(knobs.iter().copied());
        cmd
    }

    /// Writes `n` JPEGs named `shot_<i>.<i % 10>0s.jpg` into `frames/` and returns the folder.
    pub fn frames(&self, n: usize) -> PathBuf {
        let dir = self.dir.path().join("frames");
        std::fs::create_dir_all(&dir).unwrap();
        for i in 0..n {
            let path = format!("frames/shot_{:03}.{}0s.jpg", i, i % 10);
            self.jpeg(&path, 32 + i as u32, 24, [40, 40, 200]);
        }
        dir
    }

    /// A `/bin/sh` wrapper that runs the fake server *without* `exec` (as package managers' and
    /// users' scripts often do): the server is then the shell's child, not ours.
    pub fn wrapper_without_exec(&self) -> PathBuf {
        let body = format!("'{}' \"$@\"\n", fake_server().display());
        self.script("llama-server-wrapper", &body)
    }

    /// The shim's call log (knob NVSMI_LOG) path.
    pub fn shim_log(&self) -> PathBuf {
        self.dir.path().join("nvsmi.log")
    }

    /// A config for the fake server and a healthy shim, on this harness's GPU, port 0, with short
    /// timeouts so failures show quickly, and the fake's events file on.
    pub fn config(&self) -> EngineConfigBuilder {
        let log = self.shim_log();
        let shim = self.shim(&[
            ("NVSMI_GPUS", "79000"),
            ("NVSMI_LOG", log.to_str().unwrap()),
        ]);
        EngineConfig::builder(&self.model, &self.mmproj)
            .port(0)
            .server_bin(fake_server())
            .nvidia_smi(shim)
            .gpu(self.gpu)
            .startup_timeout(Duration::from_secs(20))
            .stop_grace(Duration::from_secs(5))
            .env("FAKE_LLAMA_EVENTS", &self.events)
    }

    /// Writes a `width`×`height` JPEG of one colour (creating its folder) and returns its path.
    pub fn jpeg(&self, name: &str, width: u32, height: u32, rgb: [u8; 3]) -> PathBuf {
        let path = self.dir.path().join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        image::RgbImage::from_pixel(width, height, image::Rgb(rgb))
            .save_with_format(&path, image::ImageFormat::Jpeg)
            .unwrap();
        path
    }

    /// Writes a PNG.
    pub fn png(&self, name: &str, width: u32, height: u32, rgb: [u8; 3]) -> PathBuf {
        let path = self.dir.path().join(name);
        image::RgbImage::from_pixel(width, height, image::Rgb(rgb))
            .save_with_format(&path, image::ImageFormat::Png)
            .unwrap();
        path
    }

    /// The events the fake server wrote (one JSON object per line).
    pub fn server_events(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.events)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Waits (at most 30 s) until a fake server of this harness wrote `event` to the events file.
    pub fn wait_for_event(&self, event: &str) {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while !self.server_events().iter().any(|e| e["event"] == event) {
            assert!(
                std::time::Instant::now() < deadline,
                "the server never reported {event}"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// The events named `name` that this harness's fake servers wrote, in order.
    pub fn events_named(&self, name: &str) -> Vec<serde_json::Value> {
        self.server_events()
            .into_iter()
            .filter(|e| e["event"] == name)
            .collect()
    }

    /// The command line (without the program) of each fake server this harness spawned.
    pub fn spawned_args(&self) -> Vec<Vec<String>> {
        self.events_named("spawned")
            .iter()
            .map(|e| serde_json::from_value(e["args"].clone()).unwrap_or_default())
            .collect()
    }

    /// The pids of every fake server this harness spawned.
    pub fn spawned_pids(&self) -> Vec<u32> {
        self.server_events()
            .iter()
            .filter(|e| e["event"] == "spawned")
            .filter_map(|e| e["pid"].as_u64())
            .map(|p| p as u32)
            .collect()
    }

    /// The pids of every shim run this harness logged.
    pub fn shim_pids(&self) -> Vec<u32> {
        std::fs::read_to_string(self.shim_log())
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.strip_prefix("pid=")?.split(' ').next()?.parse().ok())
            .collect()
    }

    /// Asserts that no process this harness started is alive and that its GPU lock is free.
    pub fn assert_clean(&self) {
        for pid in self.spawned_pids().into_iter().chain(self.shim_pids()) {
            assert_gone(pid);
        }
        assert_lock_free(self.gpu);
    }
}

/// The UUID the shim reports for GPU `index` (as nvidia-smi's `uuid` field).
pub fn shim_uuid(index: u32) -> String {
    format!(
        "GPU-{:08x}-5eed-4c1e-8a11-{:012x}",
        0xc1ec0000u32 + index,
        index
    )
}

/// Parses JSON lines, failing on any line that is not JSON.
pub fn json_lines(text: &str) -> Vec<serde_json::Value> {
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line {l:?}: {e}")))
        .collect()
}

/// Waits (at most 30 s, looking every 10 ms) until the file at `path` holds `n` lines.
pub fn wait_for_lines(path: &Path, n: usize) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if text.lines().count() >= n {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{} never reached {n} lines",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Whether `pid` names a process, zombies included: the engine reaps its children, so a zombie child
/// is a leak too.
pub fn alive(pid: u32) -> bool {
    rustix::process::Pid::from_raw(pid as i32)
        .is_some_and(|pid| rustix::process::test_kill_process(pid).is_ok())
}

/// Whether `pid` is running: a zombie (dead, waiting for its parent to collect it) holds nothing.
pub fn running(pid: u32) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    stat.rsplit_once(')')
        .is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z'))
}

/// Waits (at most 5 s) until `pid` no longer runs. For processes that are not our children (a
/// server under a wrapper): once dead, their zombie is their parent's or init's to collect.
pub fn wait_not_running(pid: u32) {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while running(pid) {
        assert!(
            std::time::Instant::now() < deadline,
            "process {pid} is still running"
        );
        std::thread::yield_now();
    }
}

/// Asserts that `pid` is gone.
pub fn assert_gone(pid: u32) {
    assert!(!alive(pid), "process {pid} is still running");
}

/// Waits (at most 5 s) until GPU `gpu`'s lock can be taken: for a holder that died, whose server's
/// keeper lets go only once the server's tree is gone.
pub fn wait_lock_free(gpu: u32) {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while engine_core::gpu_lock(gpu, Wait::For(Duration::ZERO)).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "the GPU {gpu} lock was never released"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Asserts that GPU `gpu`'s lock can be taken at once.
pub fn assert_lock_free(gpu: u32) {
    let guard = engine_core::gpu_lock(gpu, Wait::For(Duration::ZERO));
    assert!(guard.is_ok(), "GPU {gpu} lock is still held: {guard:?}");
}

/// One HTTP/1.1 request to 127.0.0.1:`port` with `Connection: close` (optionally with a bearer
/// key and a JSON body), read to the end within `timeout`: (status, body), a chunked body joined.
/// `None` if nothing answered.
pub fn http_request(
    port: u16,
    method: &str,
    path: &str,
    bearer: Option<&str>,
    body: &str,
    timeout: Duration,
) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(timeout)).ok()?;
    let auth = bearer
        .map(|k| format!("Authorization: Bearer {k}\r\n"))
        .unwrap_or_default();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).ok()?;
    stream.write_all(body.as_bytes()).ok()?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).ok()?;
    let text = String::from_utf8_lossy(&raw);
    let status = text.split(' ').nth(1)?.parse().ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    let chunked = head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    Some((
        status,
        if chunked {
            dechunk(body)
        } else {
            body.to_string()
        },
    ))
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// A GET that must be answered (10 s): (status, body).
pub fn http_get(port: u16, path: &str, bearer: Option<&str>) -> (u16, String) {
    http_request(port, "GET", path, bearer, "", Duration::from_secs(10))
        .unwrap_or_else(|| panic!("no answer to GET {path} on port {port}"))
}

/// CineCut's text-stage schema (docs/design.md §6): where the story begins, escalates and peaks, in
/// seconds; three required numbers, nothing else.
pub fn anchors_schema() -> engine_core::Schema {
    engine_core::Schema::new(
        "structural_anchors",
        serde_json::json!({
            "type": "object",
            "properties": {
                "begin_t": {"type": "number"},
                "escalation_t": {"type": "number"},
                "climax_t": {"type": "number"},
            },
            "required": ["begin_t", "escalation_t", "climax_t"],
            "additionalProperties": false,
        }),
    )
    .expect("a valid schema")
}

#[cfg(test)]
mod claims {
    use super::*;
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};

    /// Another process (util-linux `flock`) holds index `held`'s claim; this process's counter is
    /// then set to offer `held` next, as a second test binary's counter would. The claim must skip
    /// it: without the claim files both processes would take the same index, and so the same GPU
    /// lock.
    #[test]
    fn an_index_another_process_holds_is_never_taken() {
        let dir = claims_dir();
        // The first index from this process's id that no other process holds now (`-n`: a claim
        // held by another test run is skipped, not waited for).
        let first = std::process::id() % SHIM_GPUS;
        let (held, mut holder) = (0..SHIM_GPUS - 1)
            .map(|step| claim_index(first + step))
            .find_map(|index| {
                let mut holder = Command::new("flock")
                    .arg("-n")
                    .arg(dir.join(index.to_string()))
                    .args(["-c", "echo held; cat >/dev/null"])
                    .stdin(Stdio::piped())
                    .stdout(Stdio::piped())
                    .spawn()
                    .expect("util-linux flock runs");
                let mut line = String::new();
                BufReader::new(holder.stdout.take().unwrap())
                    .read_line(&mut line)
                    .unwrap();
                if line == "held\n" {
                    return Some((index, holder));
                }
                // `flock -n` found it held and exited without a line.
                drop(holder.stdin.take());
                holder.wait().unwrap();
                None
            })
            .expect("some claim index is free");

        // The count that `claim_index` maps to `held`.
        NEXT_GPU.store(held - 1, Ordering::Relaxed);
        let (gpu, _claim) = claim_gpu();

        drop(holder.stdin.take());
        let status = holder.wait().unwrap();
        assert!(status.success(), "{status}");
        assert_ne!(gpu, held, "took the index another process holds");
    }
}
