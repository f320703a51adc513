//! `cinecut-infer` end to end, against the fake server and the shim: the process a user runs.

use std::process::{Command, Stdio};

use assert_cmd::prelude::*;
use serde_json::{Value, json};
use tests::{Harness, SHIM_GPUS};

fn describe(h: &Harness, knobs: &[(&str, &str)]) -> Command {
    h.describe_command(knobs)
}

fn lines(text: &str) -> Vec<Value> {
    tests::json_lines(text)
}

fn frames(h: &Harness, n: usize) -> std::path::PathBuf {
    h.frames(n)
}

#[test]
fn a_folder_is_described_in_order_and_everything_is_cleaned_up() {
    let h = Harness::new();
    let dir = frames(&h, 4);
    let out = describe(&h, &[]).arg(&dir).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines = lines(&String::from_utf8(out.stdout).unwrap());
    assert_eq!(lines.len(), 4);
    for (i, line) in lines.iter().enumerate() {
        let path = line["frame_path"].as_str().unwrap();
        assert!(
            path.ends_with(&format!("shot_{i:03}.{}0s.jpg", i % 10)),
            "{path}"
        );
        assert_eq!(
            line["timestamp_s"].as_f64().unwrap(),
            i as f64 + (i % 10) as f64 / 10.0
        );
        let scene = &line["scene"];
        assert!(
            scene["visual_content"]
                .as_str()
                .unwrap()
                .contains(&format!("{}x24", 32 + i))
        );
        for field in ["mood", "action", "setting"] {
            assert!(scene[field].is_string());
        }
    }
    assert!(String::from_utf8_lossy(&out.stderr).contains("4 described, 0 failed"));
    h.assert_clean();
}

#[test]
fn a_bad_frame_gets_an_error_line_and_the_rest_succeed() {
    let h = Harness::new();
    let dir = frames(&h, 2);
    std::fs::write(dir.join("shot_000b.jpg"), b"not a picture").unwrap();
    let out = describe(&h, &[]).arg(&dir).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let lines = lines(&String::from_utf8(out.stdout).unwrap());
    assert_eq!(lines.len(), 3);
    assert!(lines[0]["scene"].is_object());
    assert!(
        lines[1]["error"]
            .as_str()
            .unwrap()
            .contains("not a JPEG or PNG"),
        "{}",
        lines[1]
    );
    assert!(lines[1].get("scene").is_none());
    assert!(lines[2]["scene"].is_object());
    assert!(String::from_utf8_lossy(&out.stderr).contains("2 described, 1 failed"));
    h.assert_clean();
}

#[test]
fn low_vram_is_a_clear_error_and_no_server_starts() {
    let h = Harness::new();
    let dir = frames(&h, 1);
    let low = h.shim(&[
        ("NVSMI_GPUS", "1000"),
        ("NVSMI_GPU_COUNT", &SHIM_GPUS.to_string()),
    ]);
    let out = describe(&h, &[])
        .env("NVIDIA_SMI", low)
        .arg(&dir)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("Only 1000 MiB free VRAM, need at least 6144 MiB"),
        "{stderr}"
    );
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(out.stdout.is_empty());
    assert!(h.spawned_pids().is_empty());
    h.assert_clean();
}

#[test]
fn bad_input_is_one_line_and_starts_nothing() {
    let h = Harness::new();
    let dir = frames(&h, 1);
    let empty = h.dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let cases: Vec<(Command, &str)> = vec![
        (
            {
                let mut c = describe(&h, &[]);
                c.arg(&empty);
                c
            },
            "has no .jpg, .jpeg or .png files",
        ),
        (
            {
                let mut c = describe(&h, &[]);
                c.arg(h.dir.path().join("nowhere"));
                c
            },
            "cannot read",
        ),
        (
            {
                let mut c = describe(&h, &[]);
                c.args(["--output", "/nonexistent-dir/out.jsonl"]).arg(&dir);
                c
            },
            "cannot write /nonexistent-dir/out.jsonl",
        ),
        (
            {
                let mut c = Command::new(tests::cinecut_infer());
                c.args(["describe", "--model", "/no/model.gguf", "--mmproj"])
                    .arg(&h.mmproj)
                    .arg(&dir);
                c
            },
            "model file not found: /no/model.gguf",
        ),
    ];
    for (mut cmd, needle) in cases {
        let out = cmd.output().unwrap();
        assert_eq!(out.status.code(), Some(2));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(needle), "{stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    }
    assert!(h.spawned_pids().is_empty());
    h.assert_clean();
}

#[test]
fn sigint_stops_cleanly_and_resume_finishes_the_job() {
    let h = Harness::new();
    let dir = frames(&h, 12);
    let output = h.dir.path().join("out.jsonl");
    let child = describe(&h, &[("FAKE_LLAMA_LATENCY_MS", "200")])
        .arg("--output")
        .arg(&output)
        .arg(&dir)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Interrupt once real work is under way (two frames written), as a user's Ctrl-C would.
    tests::wait_for_lines(&output, 2);
    let pid = rustix::process::Pid::from_child(&child);
    rustix::process::kill_process(pid, rustix::process::Signal::INT).unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(130),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("--resume"));
    let text = std::fs::read_to_string(&output).unwrap();
    assert!(text.ends_with('\n'), "only whole lines");
    // Every frame has its line: described, or not attempted because of the Ctrl-C.
    let first = lines(&text);
    assert_eq!(first.len(), 12);
    let described = first.iter().filter(|l| l["scene"].is_object()).count();
    assert!((2..12).contains(&described), "{described} described");
    for line in first.iter().filter(|l| !l["scene"].is_object()) {
        let error = line["error"].as_str().unwrap();
        assert!(error.contains("not attempted"), "{error}");
    }
    h.assert_clean();

    // --resume describes only what is missing, and the file ends up complete and in order.
    let out = describe(&h, &[])
        .args(["--resume", "--output"])
        .arg(&output)
        .arg(&dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let all = lines(&std::fs::read_to_string(&output).unwrap());
    assert_eq!(all.len(), 12);
    let mut paths: Vec<&str> = all
        .iter()
        .map(|l| l["frame_path"].as_str().unwrap())
        .collect();
    paths.dedup();
    assert_eq!(paths.len(), 12, "no frame described twice");
    assert!(paths.windows(2).all(|w| w[0] < w[1]), "input order kept");
    h.assert_clean();
}

#[test]
fn resume_retries_failed_frames_and_drops_a_torn_last_line() {
    let h = Harness::new();
    let dir = frames(&h, 3);
    let output = h.dir.path().join("out.jsonl");
    let first = dir.join("shot_000.00s.jpg");
    let second = dir.join("shot_001.10s.jpg");
    let scene = json!({"visual_content": "v", "mood": "m", "action": "a", "setting": "s"});
    let earlier = [
        json!({"frame_path": first, "timestamp_s": 0.0, "scene": scene}),
        json!({"frame_path": second, "error": "earlier failure"}),
    ];
    let text: String = earlier.iter().map(|l| format!("{l}\n")).collect();
    std::fs::write(&output, text + "{\"frame_pa").unwrap();
    let out = describe(&h, &[])
        .args(["--resume", "--output"])
        .arg(&output)
        .arg(&dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("1 of 3 frames already described"));
    // One line per frame: the earlier answer, then the two described now (the old error line and
    // the torn line are gone).
    let all = lines(&std::fs::read_to_string(&output).unwrap());
    assert_eq!(all.len(), 3, "{all:?}");
    assert!(all.iter().all(|l| l["scene"].is_object()), "{all:?}");
    assert_eq!(all[1]["frame_path"], second.display().to_string());
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("dropped 1 error line(s) and 1 unreadable line(s)")
    );
    h.assert_clean();
}

#[test]
fn check_prints_every_gpu_and_decides_for_the_chosen_one() {
    let h = Harness::new();
    let shim = h.shim(&[("NVSMI_GPUS", "79000,1000,[N/A]")]);
    let check = |gpu: &str| {
        Command::new(tests::cinecut_infer())
            .args(["check", "--gpu", gpu])
            .env("NVIDIA_SMI", &shim)
            .output()
            .unwrap()
    };
    let out = check("0");
    assert!(out.status.success());
    let stdout = String::from_utf8(out.stdout).unwrap();
    let uuid = tests::shim_uuid;
    assert!(
        stdout.contains(&format!(
            "GPU 0 {} (chosen): 79000 MiB free, 6144 MiB required: would start",
            uuid(0)
        )),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!(
            "GPU 1 {}: 1000 MiB free, 6144 MiB required: too little free VRAM",
            uuid(1)
        )),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!(
            "GPU 2 {}: cannot read free VRAM: nvidia-smi printed [N/A]",
            uuid(2)
        )),
        "{stdout}"
    );
    // The verdict is the engine's own, message and all; exit 3 says the GPU cannot take it.
    let out = check("1");
    assert_eq!(out.status.code(), Some(3));
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("Only 1000 MiB free VRAM, need at least 6144 MiB (GPU 1)")
    );
    check(&uuid(0)).assert().code(0);
    check("2").assert().code(3);
    let out = check("3");
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stderr).contains("GPU 3 not found"));

    let broken = h.shim(&[("NVSMI_EXIT", "9")]);
    let out = Command::new(tests::cinecut_infer())
        .arg("check")
        .env("NVIDIA_SMI", broken)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("couldn't communicate with the NVIDIA driver")
    );
    h.assert_clean();
}

#[test]
fn version_names_the_commit_and_completions_come_from_the_help() {
    let out = Command::new(tests::cinecut_infer())
        .arg("--version")
        .output()
        .unwrap();
    assert!(out.status.success());
    let version = String::from_utf8(out.stdout).unwrap();
    let commit = version
        .trim()
        .strip_prefix(&format!("cinecut-infer {} (", env!("CARGO_PKG_VERSION")))
        .and_then(|rest| rest.strip_suffix(')'))
        .unwrap_or_else(|| panic!("{version}"));
    assert!(
        commit == "unknown"
            || (commit.len() == 12 && commit.bytes().all(|b| b.is_ascii_hexdigit())),
        "{version}"
    );
    for (shell, needle) in [
        ("bash", "--min-vram"),
        ("zsh", "#compdef cinecut-infer"),
        ("fish", "ctx-size"),
    ] {
        let out = Command::new(tests::cinecut_infer())
            .args(["completions", shell])
            .output()
            .unwrap();
        assert!(out.status.success());
        assert!(
            String::from_utf8_lossy(&out.stdout).contains(needle),
            "{shell}"
        );
    }
}
