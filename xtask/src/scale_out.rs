//! `cargo xtask scale-out [--keep DIR]`: docs/scale-out.md's recipes run on the engines themselves,
//! against the fake llama-server and the nvidia-smi shim (two GPUs), on 300 frames:
//!
//! - **Slurm**: a one-node cluster (Debian's slurmctld, slurmd and munge) configured under a
//!   temporary folder, its node offering two GPUs as generic resources (device nodes made there);
//!   the docs' own `describe-array.sbatch` and `merge.sbatch` submitted with `sbatch` as the docs
//!   say (paths from the documented environment variables); the merged file equal, as JSON, to a
//!   one-process run. Then one array task cancelled mid-run, the merge failing, the array and the
//!   merge resubmitted: `--resume` sends only what was left. Daemons stopped whatever happens.
//! - **Ray Data**: docs/scale-out/ray_describe.py on a local Ray with two GPUs: every frame once,
//!   both GPUs used.
//! - **Kubernetes**: the manifests validated against the API schema of the oldest version the docs
//!   claim (1.29), with `kubernetes-validate`.
//!
//! Each case ends with no server left running and both GPU locks free. `--keep DIR` leaves the
//! shards and the merged file in `DIR/slurm/`, the Ray output in `DIR/ray/scenes.jsonl`; without it,
//! a failed case keeps its files and logs in `target/scale-out`.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use engine_core::gguf::{Gguf, Value};
use serde_json::Value as Json;
use xshell::{Shell, cmd};

use crate::prereq::{self, Need};
use crate::steps::{Steps, root, shell, target_dir};
use crate::{frames, python};

/// Frames in the job.
const FRAMES: usize = 300;
/// The oldest Kubernetes the manifests claim (`backoffLimitPerIndex` is on by default from 1.29).
const KUBERNETES: &str = "1.29.0";

/// What the Slurm case needs: the daemons, the client commands, munge.
pub const SLURM: &[Need] = &[
    Need::program(
        "slurmctld",
        "the Slurm case runs a one-node cluster",
        &["slurmctld"],
        &["slurmctld"],
    ),
    Need::program(
        "slurmd",
        "the Slurm case runs a one-node cluster",
        &["slurmd"],
        &["slurmd"],
    ),
    Need::program(
        "sbatch",
        "the Slurm case submits the docs' scripts",
        &["sbatch"],
        &["slurm-client"],
    ),
    Need::program("munged", "Slurm's authentication", &["munged"], &["munge"]),
];

pub fn run(keep: Option<PathBuf>) -> ExitCode {
    if let Err(e) = check() {
        eprintln!("xtask: {e}");
        return ExitCode::FAILURE;
    }
    let sh = shell();
    let mut steps = Steps::new();
    if let Some(python) = python::installed(&mut steps, &sh).map(|(python, _)| python) {
        all(&mut steps, &sh, &python, keep.as_deref());
    }
    steps.report()
}

/// What the task needs from the machine, before any step: root (the Slurm daemons, the device
/// nodes) and the packages.
pub fn check() -> Result<(), String> {
    if !rustix::process::geteuid().is_root() {
        return Err(
            "the scale-out case runs Slurm's daemons and makes device nodes for its GPUs, which \
             needs root: run it as root (sudo -E cargo xtask scale-out)"
                .into(),
        );
    }
    prereq::ensure(SLURM)
}

/// The three cases, each its own step; `python` is an environment with the wheel installed.
pub fn all(steps: &mut Steps, sh: &Shell, python: &Path, keep: Option<&Path>) -> bool {
    let work = match keep {
        Some(dir) => dir.to_path_buf(),
        None => target_dir().join("scale-out"),
    };
    let _ = std::fs::remove_dir_all(&work);
    let setup = match Setup::new(&work) {
        Ok(setup) => setup,
        Err(e) => {
            eprintln!("xtask: cannot prepare {}: {e}", work.display());
            return false;
        }
    };
    let bin = python.parent().expect("a venv's bin folder");
    let pip = cmd!(
        sh,
        "{python} -m pip install --quiet --disable-pip-version-check kubernetes-validate ray[data]>=2.9"
    );
    let ok = steps.cmd("scale-out-tools", pip)
        && steps.run("kubernetes", || kubernetes(sh, bin))
        && steps.run("slurm", || slurm(&setup))
        && steps.run("ray", || ray(&setup, python));
    // A failure's message points at the logs in `work`: they stay for it to be read.
    if keep.is_none() && ok {
        let _ = std::fs::remove_dir_all(&work);
    }
    ok
}

/// What every case shares: the models (placeholders the fake loads), the frames, the keyframes
/// file, a two-GPU shim, and the environment a user's job would have.
#[derive(Clone)]
struct Setup {
    work: PathBuf,
    env: Vec<(String, String)>,
    events: PathBuf,
    locks: PathBuf,
}

impl Setup {
    fn new(work: &Path) -> Result<Setup, String> {
        let io = |e: std::io::Error| e.to_string();
        let models = work.join("models");
        std::fs::create_dir_all(&models).map_err(io)?;
        for (name, keys) in [
            (
                "ggml-model-q4_k.gguf",
                vec![("general.architecture", "llama")],
            ),
            (
                "mmproj-model-f16.gguf",
                vec![
                    ("general.architecture", "clip"),
                    ("clip.projector_type", "mlp"),
                ],
            ),
        ] {
            let mut gguf = Gguf::default();
            for (key, value) in keys {
                gguf.kv(key, Value::Str(value.into()));
            }
            gguf.write(&mut std::fs::File::create(models.join(name)).map_err(io)?)
                .map_err(io)?;
        }
        frames::write(FRAMES, 64, 48, &work.join("film").join("frames"))?;
        let keyframes: String = (0..FRAMES)
            .map(|n| {
                format!(
                    "{{\"timestamp_s\": {}, \"frame_path\": \"frames/frame_{n:05}.jpg\", \"source\": \"cut\"}}\n",
                    n as f64 * 1.5
                )
            })
            .collect();
        std::fs::write(work.join("film").join("keyframes.jsonl"), keyframes).map_err(io)?;
        let shim = work.join("nvidia-smi");
        let real_shim = target_dir().join("debug").join("nvsmi-shim");
        std::fs::write(
            &shim,
            format!(
                "#!/bin/sh\nexport NVSMI_GPU_COUNT=2\nexec '{}' \"$@\"\n",
                real_shim.display()
            ),
        )
        .map_err(io)?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&shim, std::fs::Permissions::from_mode(0o755)).map_err(io)?;
        let bin = target_dir().join("debug");
        let path = format!(
            "{}:{}",
            bin.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let events = work.join("server-events.jsonl");
        let locks = work.join("locks");
        let env = vec![
            ("PATH".into(), path),
            (
                "LLAMA_SERVER".into(),
                bin.join("fake-llama-server").display().to_string(),
            ),
            ("NVIDIA_SMI".into(), shim.display().to_string()),
            ("CINECUT_LOCK_DIR".into(), locks.display().to_string()),
            ("CINECUT_MODELS_DIR".into(), models.display().to_string()),
            (
                "CINECUT_KEYFRAMES".into(),
                work.join("film")
                    .join("keyframes.jsonl")
                    .display()
                    .to_string(),
            ),
            ("FAKE_LLAMA_EVENTS".into(), events.display().to_string()),
        ];
        Ok(Setup {
            work: work.to_path_buf(),
            env,
            events,
            locks,
        })
    }

    /// The same, with one more variable in the environment.
    fn with(&self, key: &str, value: &str) -> Setup {
        let mut more = self.clone();
        more.env.push((key.into(), value.into()));
        more
    }

    fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut command = Command::new(program);
        command.envs(self.env.iter().map(|(k, v)| (k, v)));
        command
    }

    /// The fake servers' requests so far.
    fn requests(&self) -> usize {
        self.events_named("request_start").len()
    }

    fn events_named(&self, name: &str) -> Vec<Json> {
        std::fs::read_to_string(&self.events)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<Json>(l).ok())
            .filter(|e| e["event"] == name)
            .collect()
    }

    /// Every server this setup started is gone, and both GPU locks are free.
    fn assert_clean(&self) -> Result<(), String> {
        for event in self.events_named("listening") {
            let pid = event["pid"].as_u64().unwrap_or(0) as i32;
            if running(pid) {
                return Err(format!("a server (pid {pid}) is still running"));
            }
        }
        for gpu in 0..2 {
            let lock = self.locks.join(format!("cinecut-gpu-{gpu}.lock"));
            if let Ok(file) = std::fs::File::open(&lock)
                && file.try_lock().is_err()
            {
                return Err(format!(
                    "GPU {gpu}'s lock ({}) is still held",
                    lock.display()
                ));
            }
        }
        Ok(())
    }
}

/// Whether `pid` runs (a zombie waiting for its parent counts as gone).
fn running(pid: i32) -> bool {
    pid > 0
        && std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
            !stat
                .rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .starts_with('Z')
        })
}

fn lines(path: &Path) -> Result<Vec<Json>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    text.lines()
        .map(|l| serde_json::from_str(l).map_err(|e| format!("{}: {e}", path.display())))
        .collect()
}

fn kubernetes(sh: &Shell, bin: &Path) -> Result<(), String> {
    let validate = bin.join("kubernetes-validate");
    let manifests = root().join("docs").join("scale-out");
    let (describe, merge) = (
        manifests.join("describe-job.yaml"),
        manifests.join("merge-job.yaml"),
    );
    cmd!(sh, "{validate} --strict -k {KUBERNETES} {describe} {merge}")
        .run()
        .map_err(|e| e.to_string())
}

// ---- Slurm ------------------------------------------------------------------------------------

/// A one-node Slurm cluster under a folder: munged, slurmctld and slurmd, stopped when dropped.
struct Cluster {
    dir: PathBuf,
    conf: PathBuf,
}

impl Cluster {
    fn start(dir: &Path) -> Result<Cluster, String> {
        let io = |e: std::io::Error| e.to_string();
        for sub in ["state", "spool", "log", "dev", "munge"] {
            std::fs::create_dir_all(dir.join(sub)).map_err(io)?;
        }
        let cluster = Cluster {
            dir: dir.to_path_buf(),
            conf: dir.join("slurm.conf"),
        };
        // Two GPUs: device nodes (the null device's numbers) so that Slurm's gres/gpu plugin takes
        // them and sets CUDA_VISIBLE_DEVICES for each task, as on a GPU node.
        for gpu in 0..2 {
            let node = dir.join("dev").join(format!("nvidia{gpu}"));
            rustix::fs::mknodat(
                rustix::fs::CWD,
                &node,
                rustix::fs::FileType::CharacterDevice,
                rustix::fs::Mode::from_raw_mode(0o666),
                rustix::fs::makedev(1, 3),
            )
            .map_err(|e| format!("cannot make {}: {e}", node.display()))?;
        }
        let key: Vec<u8> = (0..1024u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        let key_file = dir.join("munge").join("munge.key");
        std::fs::write(&key_file, key).map_err(io)?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
        let host = hostname();
        let d = dir.display();
        let (ctld_port, d_port) = free_ports();
        std::fs::write(
            &cluster.conf,
            format!(
                "ClusterName=cinecut\nSlurmctldHost={host}\nSlurmUser=root\nSlurmdUser=root\n\
                 AuthType=auth/munge\nAuthInfo=socket={d}/munge/munge.socket\nCredType=cred/munge\n\
                 SlurmctldPort={ctld_port}\nSlurmdPort={d_port}\nStateSaveLocation={d}/state\n\
                 SlurmdSpoolDir={d}/spool\nSlurmctldPidFile={d}/slurmctld.pid\n\
                 SlurmdPidFile={d}/slurmd.pid\nSlurmctldLogFile={d}/log/slurmctld.log\n\
                 SlurmdLogFile={d}/log/slurmd.log\nProctrackType=proctrack/linuxproc\n\
                 TaskPlugin=task/none\nJobAcctGatherType=jobacct_gather/none\n\
                 SelectType=select/cons_tres\nSelectTypeParameters=CR_Core\nGresTypes=gpu\n\
                 SlurmdParameters=config_overrides\nReturnToService=2\nMpiDefault=none\n\
                 KillWait=5\nMinJobAge=600\n\
                 NodeName={host} CPUs=16 Gres=gpu:2 State=UNKNOWN\n\
                 PartitionName=gpu Nodes=ALL Default=YES MaxTime=INFINITE State=UP\n"
            ),
        )
        .map_err(io)?;
        std::fs::write(
            dir.join("gres.conf"),
            format!("NodeName={host} Name=gpu File={d}/dev/nvidia[0-1]\n"),
        )
        .map_err(io)?;
        let munge = dir.join("munge");
        let started = Command::new("munged")
            .arg(format!("--key-file={}", key_file.display()))
            .arg(format!("--socket={}", munge.join("munge.socket").display()))
            .arg(format!("--pid-file={}", munge.join("munged.pid").display()))
            .arg(format!("--log-file={}", munge.join("munged.log").display()))
            .arg(format!("--seed-file={}", munge.join("seed").display()))
            .arg("--force")
            .status()
            .map_err(|e| format!("cannot run munged: {e}"))?;
        if !started.success() {
            return Err(format!(
                "munged failed ({started}): see {}",
                munge.join("munged.log").display()
            ));
        }
        for daemon in ["slurmctld", "slurmd"] {
            let started = Command::new(daemon)
                .arg("-f")
                .arg(&cluster.conf)
                .status()
                .map_err(|e| format!("cannot run {daemon}: {e}"))?;
            if !started.success() {
                return Err(format!(
                    "{daemon} failed ({started}): see {d}/log/{daemon}.log"
                ));
            }
        }
        cluster.wait_idle()?;
        Ok(cluster)
    }

    /// A Slurm client command with this cluster's configuration.
    fn client(&self, program: &str) -> Command {
        let mut command = Command::new(program);
        command.env("SLURM_CONF", &self.conf);
        command
    }

    fn output(&self, program: &str, args: &[&str]) -> Result<String, String> {
        let out = self
            .client(program)
            .args(args)
            .output()
            .map_err(|e| format!("{program}: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "{program} {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn wait_idle(&self) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let state = self
                .output("sinfo", &["-h", "-o", "%t"])
                .unwrap_or_default();
            if state.trim() == "idle" {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "the node never became idle (sinfo says {:?}): see {}/log",
                    state.trim(),
                    self.dir.display()
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Submits `script` from `folder` with `env`; the job id.
    fn sbatch(
        &self,
        folder: &Path,
        script: &Path,
        extra: &[&str],
        setup: &Setup,
    ) -> Result<String, String> {
        let mut command = setup.command("sbatch");
        command
            .env("SLURM_CONF", &self.conf)
            .current_dir(folder)
            .arg("--parsable")
            .args(extra)
            .arg(script);
        let out = command.output().map_err(|e| format!("sbatch: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "sbatch {}: {}",
                script.display(),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// Waits until job `id` (every task of an array) has left the queue; its final state(s).
    fn wait_done(&self, id: &str, limit: Duration) -> Result<Vec<String>, String> {
        let deadline = Instant::now() + limit;
        loop {
            let queued = self
                .output("squeue", &["-h", "-j", id, "-o", "%i"])
                .unwrap_or_default();
            if queued.trim().is_empty() {
                break;
            }
            if Instant::now() > deadline {
                return Err(format!("job {id} still queued after {limit:?}: {queued}"));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let shown = self.output("scontrol", &["-o", "show", "job", id])?;
        Ok(shown
            .lines()
            .filter_map(|l| {
                l.split_whitespace()
                    .find_map(|f| f.strip_prefix("JobState="))
            })
            .map(str::to_string)
            .collect())
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = self.client("scancel").arg("--user=root").status();
        for pid_file in ["slurmd.pid", "slurmctld.pid", "munge/munged.pid"] {
            let pid = std::fs::read_to_string(self.dir.join(pid_file)).unwrap_or_default();
            if let Some(pid) = pid
                .trim()
                .parse()
                .ok()
                .and_then(rustix::process::Pid::from_raw)
            {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
                let deadline = Instant::now() + Duration::from_secs(10);
                while running(pid.as_raw_nonzero().get()) && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(20));
                }
                if running(pid.as_raw_nonzero().get()) {
                    let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
                }
            }
        }
    }
}

fn hostname() -> String {
    rustix::system::uname()
        .nodename()
        .to_string_lossy()
        .split('.')
        .next()
        .unwrap_or("localhost")
        .to_string()
}

/// Two ports free now, for slurmctld and slurmd (a machine's own Slurm may hold the defaults).
fn free_ports() -> (u16, u16) {
    let a = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
    let b = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
    (
        a.local_addr().expect("bound").port(),
        b.local_addr().expect("bound").port(),
    )
}

fn slurm(setup: &Setup) -> Result<(), String> {
    let slurm = setup.work.join("slurm");
    let cluster = Cluster::start(&setup.work.join("cluster"))?;
    let docs = root().join("docs").join("scale-out");
    let (array, merge) = (
        docs.join("describe-array.sbatch"),
        docs.join("merge.sbatch"),
    );
    let out = slurm.clone();
    std::fs::create_dir_all(slurm.join("logs")).map_err(|e| e.to_string())?;
    let keyframes = setup.work.join("film").join("keyframes.jsonl");
    let env_setup = setup.with("CINECUT_OUT", &out.display().to_string());

    // The one-process run the merged file must equal.
    let whole = setup.work.join("whole.jsonl");
    let done = setup
        .command("cinecut-infer")
        .args([
            "describe",
            "--gpu",
            "0",
            "--port",
            "0",
            "--progress",
            "off",
            "--output",
        ])
        .arg(&whole)
        .arg(&keyframes)
        .stderr(Stdio::inherit())
        .status()
        .map_err(|e| e.to_string())?;
    if !done.success() {
        return Err(format!("the one-process run failed: {done}"));
    }
    let expected = lines(&whole)?;

    // As the docs say: the array, then the merge after it.
    let submit_merge = |job: &str| -> Result<Vec<String>, String> {
        let after = format!("--dependency=afterany:{job}");
        let merged_job = cluster.sbatch(&slurm, &merge, &[&after], &env_setup)?;
        cluster.wait_done(&merged_job, Duration::from_secs(300))
    };
    let job = cluster.sbatch(&slurm, &array, &[], &env_setup)?;
    let states = submit_merge(&job)?;
    if states != ["COMPLETED"] {
        return Err(format!(
            "the merge job ended {states:?}: see {}/logs",
            slurm.display()
        ));
    }
    let array_states = cluster.wait_done(&job, Duration::from_secs(10))?;
    if array_states.len() != 8 || array_states.iter().any(|s| s != "COMPLETED") {
        return Err(format!("the array's tasks ended {array_states:?}"));
    }
    let merged = lines(&slurm.join("scenes.jsonl"))?;
    if merged != expected {
        return Err(format!(
            "the merged file ({} lines) differs from the one-process run ({} lines)",
            merged.len(),
            expected.len()
        ));
    }
    eprintln!(
        "xtask: slurm: 8 tasks on 2 GPUs, merged {} frames, equal to one process",
        merged.len()
    );
    setup.assert_clean()?;

    // A task cancelled mid-run: the merge fails; resubmitted, --resume sends only what was left.
    keep_aside(&slurm, "first-run")?;
    let slow = env_setup.with("FAKE_LLAMA_LATENCY_MS", "150");
    let job = cluster.sbatch(&slurm, &array, &[], &slow)?;
    let shard = slurm.join("scenes.3.jsonl");
    let deadline = Instant::now() + Duration::from_secs(120);
    while std::fs::read_to_string(&shard).map_or(0, |t| t.lines().count()) < 3 {
        if Instant::now() > deadline {
            return Err("task 3 never started writing".into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    cluster.output("scancel", &[&format!("{job}_3")])?;
    let states = submit_merge(&job)?;
    if states != ["FAILED"] {
        return Err(format!(
            "the merge after a cancelled task ended {states:?}, not FAILED"
        ));
    }
    let answered = |path: &Path| -> Result<usize, String> {
        Ok(lines(path)?
            .iter()
            .filter(|l| l.get("scene").is_some())
            .count())
    };
    let had = answered(&shard)?;
    let before = setup.requests();
    let job = cluster.sbatch(&slurm, &array, &[], &env_setup)?;
    let states = submit_merge(&job)?;
    if states != ["COMPLETED"] {
        return Err(format!("the merge after the resubmission ended {states:?}"));
    }
    let sent = setup.requests() - before;
    let shard_size = answered(&shard)?;
    if sent != shard_size - had {
        return Err(format!(
            "the resubmission sent {sent} requests; task 3 had {had} of its {shard_size} frames, so \
             only {} were left",
            shard_size - had
        ));
    }
    if lines(&slurm.join("scenes.jsonl"))? != expected {
        return Err(
            "after the resubmission, the merged file differs from the one-process run".into(),
        );
    }
    eprintln!(
        "xtask: slurm: task 3 cancelled after {had} of {shard_size} frames; the resubmitted array \
         sent the {sent} left, the merge then matched"
    );
    drop(cluster);
    setup.assert_clean()
}

/// Moves the first run's files into `slurm/NAME/` (for `--keep`), leaving the folder for the next.
fn keep_aside(slurm: &Path, name: &str) -> Result<(), String> {
    let aside = slurm.join(name);
    std::fs::create_dir_all(&aside).map_err(|e| e.to_string())?;
    for entry in std::fs::read_dir(slurm)
        .map_err(|e| e.to_string())?
        .flatten()
    {
        let file = entry.file_name().to_string_lossy().into_owned();
        if file.starts_with("scenes") && file.ends_with(".jsonl") {
            std::fs::rename(entry.path(), aside.join(&file)).map_err(|e| e.to_string())?;
        }
    }
    Ok(())
}

// ---- Ray --------------------------------------------------------------------------------------

fn ray(setup: &Setup, python: &Path) -> Result<(), String> {
    let folder = setup.work.join("ray");
    std::fs::create_dir_all(&folder).map_err(|e| e.to_string())?;
    let out = folder.join("scenes.jsonl");
    let script = root()
        .join("docs")
        .join("scale-out")
        .join("ray_describe.py");
    // The film's keyframes, and one whose frame does not exist.
    let film = setup.work.join("film");
    let keyframes = film.join("keyframes-and-a-missing-one.jsonl");
    let mut text =
        std::fs::read_to_string(film.join("keyframes.jsonl")).map_err(|e| e.to_string())?;
    text.push_str(
        "{\"timestamp_s\": 0.5, \"frame_path\": \"frames/missing.jpg\", \"source\": \"cut\"}\n",
    );
    std::fs::write(&keyframes, text).map_err(|e| e.to_string())?;
    let status = setup
        .command(python)
        .arg(&script)
        .arg(&keyframes)
        .arg(&out)
        .arg("--models")
        .arg(setup.work.join("models"))
        .args([
            "--actors",
            "2",
            "--slots",
            "2",
            "--batch-size",
            "16",
            "--local",
            "2",
        ])
        .env("RAY_DEDUP_LOGS", "0")
        .status()
        .map_err(|e| e.to_string())?;
    if !status.success() {
        return Err(format!("ray_describe.py failed: {status}"));
    }
    let mut rows = lines(&out)?;
    // The frame that does not exist comes back as an error row, not an exception.
    let missing: Vec<Json> = rows
        .iter()
        .filter(|r| {
            r["frame_path"]
                .as_str()
                .is_some_and(|p| p.ends_with("missing.jpg"))
        })
        .cloned()
        .collect();
    if missing.len() != 1 || !missing[0]["error"].is_string() || !missing[0]["scene"].is_null() {
        return Err(format!(
            "the missing frame's rows: {missing:?}; one error row expected"
        ));
    }
    rows.retain(|r| {
        !r["frame_path"]
            .as_str()
            .is_some_and(|p| p.ends_with("missing.jpg"))
    });
    let frames: BTreeSet<&str> = rows
        .iter()
        .filter_map(|r| r["frame_path"].as_str())
        .collect();
    let described = rows
        .iter()
        .filter(|r| r["scene"]["visual_content"].is_string() && r["error"].is_null())
        .count();
    let gpus: BTreeSet<u64> = rows.iter().filter_map(|r| r["gpu"].as_u64()).collect();
    if rows.len() != FRAMES || frames.len() != FRAMES || described != FRAMES {
        return Err(format!(
            "Ray wrote {} rows for {} distinct frames, {described} described; {FRAMES} expected once each",
            rows.len(),
            frames.len()
        ));
    }
    if gpus.len() != 2 {
        return Err(format!("Ray's actors used GPUs {gpus:?}, not both"));
    }
    eprintln!("xtask: ray: {FRAMES} frames described once each, on GPUs {gpus:?}");
    setup.assert_clean()
}
