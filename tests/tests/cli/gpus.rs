//! The CLI at scale, end to end against the fake server and the shim: `--gpus` (a pool of servers),
//! `--shard` and `merge` (many hosts), and `--vram-probe` (NVML, with nvidia-smi as the fallback).

use engine_core::Wait;
use std::path::{Path, PathBuf};
use std::process::Output;

use serde_json::Value;
use tests::Harness;

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn lines(text: &str) -> Vec<Value> {
    tests::json_lines(text)
}

/// Two GPU indices no other test uses, with the first harness's files.
fn two_gpus() -> (Harness, Harness) {
    (Harness::new(), Harness::new())
}

fn frame_paths(lines: &[Value]) -> Vec<String> {
    lines
        .iter()
        .map(|l| l["frame_path"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn gpus_share_the_frames_and_lines_stay_in_input_order() {
    let (h, other) = two_gpus();
    let dir = h.frames(16);
    let gpus = format!("{},{}", h.gpu, other.gpu);
    let out = h
        .infer_command("describe", &h.gpu.to_string(), &[])
        .arg("--model")
        .arg(&h.model)
        .arg("--mmproj")
        .arg(&h.mmproj)
        .args(["--gpus", &gpus, "--slots", "2"])
        .arg(&dir)
        .output()
        .unwrap();
    // --gpu and --gpus together are refused by the argument parser; --gpus alone makes a pool.
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("cannot be used with"),
        "{}",
        stderr(&out)
    );
    // A GPU named twice (by index and by UUID) would wait for its own lock: refused up front.
    let twice = format!("{},{}", h.gpu, tests::shim_uuid(h.gpu));
    let out = pool_command(&h, &twice).arg(&dir).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("twice"), "{}", stderr(&out));
    let out = pool_command(&h, &gpus).arg(&dir).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let written = lines(&String::from_utf8_lossy(&out.stdout));
    let mut sorted = frame_paths(&written);
    sorted.sort();
    assert_eq!(frame_paths(&written), sorted, "input order");
    assert_eq!(written.len(), 16);
    let err = stderr(&out);
    for gpu in [h.gpu, other.gpu] {
        assert!(
            err.contains(&format!("GPU {gpu} ready (2 slots); serving")),
            "{err}"
        );
    }
    assert!(err.contains("answered per GPU"), "{err}");
    h.assert_clean();
    tests::assert_lock_free(other.gpu);
}

#[test]
fn the_pool_serves_on_the_first_gpu_ready_and_gives_up_a_start_it_no_longer_needs() {
    let (h, other) = two_gpus();
    let dir = h.frames(8);
    let summary = h.dir.path().join("summary.json");
    // The second GPU's server would take a minute to load: the first does all the work meanwhile,
    // and the second's start is given up (its server stopped, its lock released) once it is done.
    let slow = format!("20000@{}", tests::shim_uuid(other.gpu));
    let out = pool_command(&h, &format!("{},{}", h.gpu, other.gpu))
        .env("FAKE_LLAMA_LOAD_MS", &slow)
        .arg("--summary")
        .arg(&summary)
        .arg(&dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(lines(&String::from_utf8_lossy(&out.stdout)).len(), 8);
    let err = stderr(&out);
    assert!(
        err.contains(&format!(
            "{} left out: not needed: every item was done before its server was ready",
            other.gpu
        )),
        "{err}"
    );
    let summary: Value = serde_json::from_str(&std::fs::read_to_string(&summary).unwrap()).unwrap();
    assert_eq!(summary["answered"], 8, "{summary}");
    let gpus: Vec<u64> = summary["gpus"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["gpu"].as_u64().unwrap())
        .collect();
    assert_eq!(gpus, [u64::from(h.gpu)], "{summary}");
    h.assert_clean();
    tests::assert_lock_free(h.gpu);
    tests::assert_lock_free(other.gpu);
}

/// `cinecut-infer describe --gpus LIST` for the harness (no `--gpu`).
fn pool_command(h: &Harness, gpus: &str) -> std::process::Command {
    let log = h.shim_log();
    let mut cmd = std::process::Command::new(tests::cinecut_infer());
    cmd.arg("describe")
        .arg("--model")
        .arg(&h.model)
        .arg("--mmproj")
        .arg(&h.mmproj)
        .args(["--gpus", gpus, "--slots", "2"])
        .env("LLAMA_SERVER", tests::fake_server())
        .env(
            "NVIDIA_SMI",
            h.shim(&[("NVSMI_LOG", log.to_str().unwrap())]),
        )
        .env("FAKE_LLAMA_EVENTS", &h.events);
    cmd
}

#[test]
fn gpus_all_leaves_out_a_locked_gpu_and_a_dying_server_hands_over_its_frames() {
    let (h, other) = two_gpus();
    let dir = h.frames(12);
    let visible = format!(
        "{},{}",
        tests::shim_uuid(h.gpu),
        tests::shim_uuid(other.gpu)
    );
    let holder = engine_core::gpu_lock(other.gpu, Wait::Forever).unwrap();
    let out = pool_command(&h, "all")
        .env("CUDA_VISIBLE_DEVICES", &visible)
        .arg(&dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains(&format!(
            "GPU {} left out: GPU {} is locked by",
            other.gpu, other.gpu
        )),
        "{err}"
    );
    assert_eq!(lines(&String::from_utf8_lossy(&out.stdout)).len(), 12);
    drop(holder);

    // Both GPUs, and the first one's server crashes on its third request; the other's answers
    // wait for that crash, so it cannot take every frame first.
    let crash = format!("2@{}", tests::shim_uuid(h.gpu));
    let hold = format!("20000@{}", tests::shim_uuid(other.gpu));
    let out = pool_command(&h, "all")
        .env("CUDA_VISIBLE_DEVICES", &visible)
        .env("FAKE_LLAMA_CRASH_AFTER", &crash)
        .env("FAKE_LLAMA_CRASH_CLAIM", h.dir.path().join("crash-claim"))
        .env("FAKE_LLAMA_HOLD_UNTIL_CRASH_MS", &hold)
        .arg(&dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let written = lines(&String::from_utf8_lossy(&out.stdout));
    assert!(written.iter().all(|l| l.get("scene").is_some()));
    let err = stderr(&out);
    assert!(
        err.contains(&format!("GPU {}'s server died", h.gpu))
            && err.contains("the other GPUs took"),
        "{err}"
    );
    h.assert_clean();
    tests::assert_lock_free(other.gpu);
}

#[test]
fn a_pool_of_one_gpu_takes_a_free_port_so_jobs_on_one_node_do_not_collide() {
    // A Slurm node runs several `--gpus all` tasks at once, each shown one GPU: the port they were
    // all given (here held by someone else) must not be the one they all try.
    let h = Harness::new();
    let dir = h.frames(4);
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = held.local_addr().unwrap().port().to_string();
    let out = pool_command(&h, "all")
        .env("CUDA_VISIBLE_DEVICES", tests::shim_uuid(h.gpu))
        .args(["--port", &port])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(lines(&String::from_utf8_lossy(&out.stdout)).len(), 4);
    let events = std::fs::read_to_string(&h.events).unwrap();
    let spawned: Vec<Value> = lines(&events)
        .into_iter()
        .filter(|e| e["event"] == "spawned")
        .collect();
    assert_eq!(spawned.len(), 1, "{events}");
    let args: Vec<&str> = spawned[0]["args"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    let given = args
        .iter()
        .position(|a| *a == "--port")
        .map(|i| args[i + 1]);
    assert!(given.is_some_and(|p| p != port && p != "0"), "{args:?}");
    drop(held);
    h.assert_clean();
}

fn run_shard(h: &Harness, dir: &Path, shard: &str, output: &Path) -> Output {
    h.describe_command(&[])
        .args(["--shard", shard, "--output"])
        .arg(output)
        .arg(dir)
        .output()
        .unwrap()
}

#[test]
fn shards_cover_the_input_and_merge_restores_its_order() {
    let h = Harness::new();
    let dir = h.frames(10);
    let whole = h.describe_command(&[]).arg(&dir).output().unwrap();
    let expected = frame_paths(&lines(&String::from_utf8_lossy(&whole.stdout)));
    let shards: Vec<PathBuf> = (0..3)
        .map(|i| h.dir.path().join(format!("scenes.{i}.jsonl")))
        .collect();
    let mut sizes = Vec::new();
    for (i, output) in shards.iter().enumerate() {
        let out = run_shard(&h, &dir, &format!("{i}/3"), output);
        assert!(out.status.success(), "{}", stderr(&out));
        let written = lines(&std::fs::read_to_string(output).unwrap());
        assert!(written.iter().all(|l| l["of"] == 10 && l["index"].is_u64()));
        sizes.push(written.len());
    }
    assert_eq!(sizes.iter().sum::<usize>(), 10);
    assert!(
        sizes.iter().max().unwrap() - sizes.iter().min().unwrap() <= 1,
        "{sizes:?}"
    );
    let merged = h.dir.path().join("scenes.jsonl");
    let merge = || {
        std::process::Command::new(tests::cinecut_infer())
            .arg("merge")
            .arg(&merged)
            .args(&shards)
            .output()
            .unwrap()
    };
    let out = merge();
    assert!(out.status.success(), "{}", stderr(&out));
    let merged_lines = lines(&std::fs::read_to_string(&merged).unwrap());
    assert_eq!(frame_paths(&merged_lines), expected);
    assert!(merged_lines.iter().all(|l| l.get("index").is_none()));

    // A shard that lost a line: the merge says which item is missing and exits 1.
    let text = std::fs::read_to_string(&shards[1]).unwrap();
    let kept: Vec<&str> = text.lines().skip(1).collect();
    std::fs::write(&shards[1], kept.join("\n") + "\n").unwrap();
    let out = merge();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("1 item(s) missing"),
        "{}",
        stderr(&out)
    );
    h.assert_clean();
}

#[test]
fn the_shard_comes_from_kubernetes_or_slurm() {
    let h = Harness::new();
    let dir = h.frames(6);
    for (i, env) in [
        vec![("JOB_COMPLETION_INDEX", "1")],
        vec![
            ("SLURM_ARRAY_TASK_ID", "1"),
            ("SLURM_ARRAY_TASK_COUNT", "2"),
        ],
    ]
    .into_iter()
    .enumerate()
    {
        let output = h.dir.path().join(format!("out-{i}.jsonl"));
        let mut cmd = h.describe_command(&env);
        if i == 0 {
            cmd.args(["--shards", "2"]);
        }
        let out = cmd.arg("--output").arg(&output).arg(&dir).output().unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
        assert!(
            stderr(&out).contains("shard 1/2: 3 of 6 items"),
            "{}",
            stderr(&out)
        );
    }
    // An Indexed Job without the count is refused before anything starts.
    let out = h
        .describe_command(&[("JOB_COMPLETION_INDEX", "0")])
        .arg(&dir)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("--shards N"), "{}", stderr(&out));
    h.assert_clean();
}

#[test]
fn nvml_is_named_when_missing_and_nvidia_smi_is_the_fallback() {
    let h = Harness::new();
    let shim = h.shim(&[]);
    // Where the driver's library is missing (CI), asking for NVML says so and what to do.
    let out = std::process::Command::new(tests::cinecut_infer())
        .args(["check", "--vram-probe", "nvml", "--gpu", &h.gpu.to_string()])
        .env_remove("NVIDIA_SMI")
        .output()
        .unwrap();
    if !out.status.success() {
        let err = stderr(&out);
        assert!(
            err.contains("NVML is not available") && err.contains("libnvidia-ml.so.1"),
            "{err}"
        );
        assert!(
            err.contains("use nvidia-smi instead (--vram-probe)"),
            "{err}"
        );
        // auto falls back to the nvidia-smi on PATH.
        let bin = h.dir.path().join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        std::os::unix::fs::symlink(&shim, bin.join("nvidia-smi")).unwrap();
        let path = format!(
            "{}:{}",
            bin.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let out = std::process::Command::new(tests::cinecut_infer())
            .args(["check", "--gpu", &h.gpu.to_string()])
            .env_remove("NVIDIA_SMI")
            .env("PATH", path)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("would start"),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
}

/// `--servers-per-gpu N`: each GPU runs N servers under its one lock, the GPU's slots split over
/// them; lines stay in input order; the summary's row of each GPU says how many servers ran and
/// what each did.
#[test]
fn several_servers_per_gpu_share_each_gpus_slots_and_say_what_each_did() {
    let (h, other) = two_gpus();
    let dir = h.frames(20);
    let summary = h.dir.path().join("summary.json");
    let gpus = format!("{},{}", h.gpu, other.gpu);
    let out = pool_command(&h, &gpus)
        .args(["--servers-per-gpu", "2", "--summary"])
        .arg(&summary)
        .arg(&dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let written = lines(&String::from_utf8_lossy(&out.stdout));
    let mut sorted = frame_paths(&written);
    sorted.sort();
    assert_eq!(frame_paths(&written), sorted, "input order");
    let err = stderr(&out);
    for gpu in [h.gpu, other.gpu] {
        let ready = format!("GPU {gpu} ready (2 servers × 1 slot (2 in all)); serving");
        assert!(err.contains(&ready), "{err}");
    }
    // Four servers, each told `-np 1`: pool_command's two slots per GPU, split.
    let spawned = h.events_named("spawned");
    assert_eq!(spawned.len(), 4);
    for event in &spawned {
        let args: Vec<&str> = event["args"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap())
            .collect();
        let np = args.iter().position(|a| *a == "-np").unwrap();
        assert_eq!(args[np + 1], "1", "{args:?}");
    }
    let s: Value = serde_json::from_str(&std::fs::read_to_string(&summary).unwrap()).unwrap();
    assert_eq!(s["answered"], 20);
    for row in s["gpus"].as_array().unwrap() {
        assert_eq!(row["servers"], 2, "{row}");
        let each = row["each"].as_array().unwrap();
        assert_eq!(each.len(), 2);
        let answered: u64 = each.iter().map(|e| e["answered"].as_u64().unwrap()).sum();
        assert_eq!(row["answered"], answered);
    }
    h.assert_clean();
    tests::assert_lock_free(other.gpu);
}

/// A SIGKILLed CLI leaves none of a GPU's several servers behind: each server's keeper takes its
/// tree down, and the GPU's lock is free only once they are all gone.
#[test]
fn a_sigkilled_run_leaves_none_of_a_gpus_servers_behind() {
    let h = Harness::new();
    let dir = h.frames(40);
    let mut child = h
        .describe_command(&[("FAKE_LLAMA_LATENCY_MS", "200")])
        .args(["--servers-per-gpu", "3", "--slots", "3"])
        .arg(&dir)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Every server serving: three answers under way.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while h.events_named("request_start").len() < 3 {
        assert!(
            std::time::Instant::now() < deadline,
            "the servers never served"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let servers = h.spawned_pids();
    assert_eq!(servers.len(), 3);
    child.kill().unwrap();
    child.wait().unwrap();
    tests::wait_lock_free(h.gpu);
    for pid in servers {
        assert!(
            !tests::running(pid),
            "server {pid} outlived the SIGKILLed run and its lock"
        );
    }
}

/// `--servers-per-gpu auto`: the count from the host's cores, the slots and the free VRAM, said
/// with the numbers; a GPU whose memory cannot hold one copy is refused with them.
#[test]
fn servers_per_gpu_auto_says_its_choice_and_refuses_what_cannot_fit() {
    let h = Harness::new();
    tests::write_llava_7b_header(&h.model);
    let dir = h.frames(4);
    let cores = std::thread::available_parallelism().unwrap().get() as u32;
    // 16 slots, enough memory: as many servers as the cores run, four slots each at least.
    let out = h
        .describe_command(&[])
        .args(["--servers-per-gpu", "auto", "--slots", "16"])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let servers = (cores / 2).clamp(1, 4);
    let err = stderr(&out);
    assert!(
        err.contains(&format!("--servers-per-gpu auto: GPU {}: ", h.gpu))
            && err.contains(&format!("{cores} cores run at most")),
        "{err}"
    );
    assert_eq!(h.spawned_pids().len() as u32, servers, "{err}");
    // Without a grammar one server takes every slot, and says why.
    std::fs::remove_file(&h.events).unwrap();
    let out = h
        .describe_command(&[])
        .args([
            "--servers-per-gpu",
            "auto",
            "--slots",
            "16",
            "--grammar",
            "off",
        ])
        .arg(&dir)
        .output()
        .unwrap();
    let err = stderr(&out);
    assert!(out.status.code().is_some_and(|c| c <= 1), "{err}");
    assert!(
        err.contains("1 server × (")
            && err.contains("without a grammar one server's loop keeps up"),
        "{err}"
    );
    assert_eq!(h.spawned_pids().len(), 1, "{err}");
    // 2000 MiB free cannot hold one server's weights, margin and slots: refused before any start.
    std::fs::remove_file(&h.events).unwrap();
    let out = h
        .describe_command(&[("NVSMI_GPUS", "2000")])
        .args([
            "--servers-per-gpu",
            "auto",
            "--slots",
            "auto",
            "--min-vram",
            "1000",
        ])
        .arg(&dir)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("its servers need") && stderr(&out).contains("not even this fits"),
        "{}",
        stderr(&out)
    );
    assert!(h.spawned_pids().is_empty());
    h.assert_clean();
}
