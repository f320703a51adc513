//! `cinecut-infer` in the shapes users run it in: Ctrl-C at every stage, outputs that are inputs or
//! shared or full, file names that are not UTF-8, durations out of range, a scheduler's
//! `CUDA_VISIBLE_DEVICES`, records with relative paths. Each test failed before its fix.

use engine_core::Wait;
use std::os::unix::ffi::OsStrExt;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use rustix::process::{Pid, Signal};
use serde_json::json;
use tests::{Harness, json_lines};

fn signal(child: &Child, signal: Signal) {
    rustix::process::kill_process(Pid::from_child(child), signal).unwrap();
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Runs `cmd` and asserts that it exits with `code` and says `needle` on stderr.
fn fails_with(cmd: &mut std::process::Command, code: i32, needle: &str) {
    let out = cmd.output().unwrap();
    assert_eq!(out.status.code(), Some(code), "{}", stderr(&out));
    assert!(stderr(&out).contains(needle), "{}", stderr(&out));
}

#[test]
fn ctrl_c_while_waiting_for_the_gpu_lock_exits_130_and_starts_nothing() {
    let h = Harness::new();
    let dir = h.frames(1);
    let holder = engine_core::gpu_lock(h.gpu, Wait::Forever).unwrap();
    let said = h.dir.path().join("stderr.txt");
    let mut child = h
        .describe_command(&[])
        .arg(&dir)
        .stderr(std::fs::File::create(&said).unwrap())
        .spawn()
        .unwrap();
    // The CLI has checked VRAM and now waits for the lock we hold, saying who holds it.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !std::fs::read_to_string(&said)
        .unwrap()
        .contains("waiting for GPU")
    {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(5));
    }
    signal(&child, Signal::INT);
    assert_eq!(child.wait().unwrap().code(), Some(130));
    let text = std::fs::read_to_string(&said).unwrap();
    assert!(
        text.contains(&format!("is held by pid {}", std::process::id())),
        "{text}"
    );
    assert!(h.spawned_pids().is_empty(), "no server was started");
    drop(holder);
    h.assert_clean();
}

/// Starts a describe whose server takes a minute to load, and returns once the server listens.
fn describe_while_loading(h: &Harness, knobs: &[(&str, &str)]) -> Child {
    let dir = h.frames(1);
    let child = h
        .describe_command(&[("FAKE_LLAMA_LOAD_MS", "60000")])
        .envs(knobs.iter().copied())
        .arg(&dir)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    h.wait_for_event("listening");
    child
}

#[test]
fn ctrl_c_while_the_model_loads_stops_the_server_and_exits_130() {
    let h = Harness::new();
    let child = describe_while_loading(&h, &[]);
    signal(&child, Signal::TERM);
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(130), "{}", stderr(&out));
    // Before, the handlers came after the load: the CLI died by the signal and left the server to
    // PR_SET_PDEATHSIG, without a stop or a VRAM wait.
    assert!(stderr(&out).contains("interrupted"), "{}", stderr(&out));
    h.assert_clean();
}

#[test]
fn a_second_ctrl_c_also_exits_130() {
    let h = Harness::new();
    let child = describe_while_loading(&h, &[("FAKE_LLAMA_SIGTERM", "ignore")]);
    signal(&child, Signal::INT);
    signal(&child, Signal::INT);
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(130), "{}", stderr(&out));
    for pid in h.spawned_pids() {
        tests::wait_not_running(pid);
    }
    // The keeper holds the lock until it has reaped the tree, a moment after the server is gone.
    tests::wait_lock_free(h.gpu);
}

#[test]
fn an_output_that_is_an_input_is_refused_and_left_intact() {
    let h = Harness::new();
    let dir = h.frames(2);
    let records = h.dir.path().join("keyframes.jsonl");
    let record =
        json!({"timestamp_s": 1.0, "frame_path": "frames/shot_000.00s.jpg", "source": "cut"});
    std::fs::write(&records, format!("{record}\n")).unwrap();
    let image = dir.join("shot_001.10s.jpg");
    let image_bytes = std::fs::read(&image).unwrap();
    for (output, input) in [(&records, &records), (&image, &dir)] {
        let out = h
            .describe_command(&[])
            .arg("--output")
            .arg(output)
            .arg(input)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
        assert!(
            stderr(&out).contains("would destroy it"),
            "{}",
            stderr(&out)
        );
    }
    assert_eq!(
        std::fs::read_to_string(&records).unwrap(),
        format!("{record}\n")
    );
    assert_eq!(std::fs::read(&image).unwrap(), image_bytes);
    // Nor the model the run needs.
    let model_bytes = std::fs::read(&h.model).unwrap();
    fails_with(
        h.describe_command(&[])
            .arg("--output")
            .arg(&h.model)
            .arg(&dir),
        2,
        "would destroy it",
    );
    assert_eq!(std::fs::read(&h.model).unwrap(), model_bytes);
    assert!(h.spawned_pids().is_empty());
    h.assert_clean();
}

#[test]
fn a_second_writer_of_one_output_is_refused() {
    let h = Harness::new();
    let other = Harness::new();
    let dir = h.frames(6);
    let output = h.dir.path().join("out.jsonl");
    let first = h
        .describe_command(&[("FAKE_LLAMA_LATENCY_MS", "200")])
        .arg("--output")
        .arg(&output)
        .arg(&dir)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    tests::wait_for_lines(&output, 1);
    // Another run (on another GPU) names the same output while the first writes it.
    let out = other
        .describe_command(&[])
        .arg("--output")
        .arg(&output)
        .arg(&dir)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("being written by another cinecut-infer"));
    let status = first.wait_with_output().unwrap().status;
    assert!(status.success());
    let lines = json_lines(&std::fs::read_to_string(&output).unwrap());
    assert_eq!(lines.len(), 6, "the first run's output is whole");
    h.assert_clean();
    other.assert_clean();
}

#[test]
fn a_file_name_that_is_not_utf8_is_an_error_line_not_a_panic() {
    let h = Harness::new();
    let dir = h.frames(1);
    let odd = dir.join(std::ffi::OsStr::from_bytes(b"shot_\xff.jpg"));
    std::fs::copy(dir.join("shot_000.00s.jpg"), &odd).unwrap();
    let output = h.dir.path().join("out.jsonl");
    for resume in [false, true] {
        let mut cmd = h.describe_command(&[]);
        if resume {
            cmd.arg("--resume");
        }
        let out = cmd.arg("--output").arg(&output).arg(&dir).output().unwrap();
        assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
        assert!(!stderr(&out).contains("panicked"), "{}", stderr(&out));
    }
    let lines = json_lines(&std::fs::read_to_string(&output).unwrap());
    let odd_line = lines.iter().find(|l| l.get("error").is_some()).unwrap();
    assert!(odd_line["error"].as_str().unwrap().contains("not UTF-8"));
    assert_eq!(lines.iter().filter(|l| l["scene"].is_object()).count(), 1);
    h.assert_clean();
}

#[test]
fn durations_out_of_range_are_refused_by_name() {
    let h = Harness::new();
    let dir = h.frames(1);
    for flag in ["--timeout", "--request-timeout"] {
        for value in ["1e19", "0", "-1", "NaN"] {
            fails_with(
                h.describe_command(&[])
                    .arg(format!("{flag}={value}"))
                    .arg(&dir),
                2,
                &format!("{flag} is"),
            );
        }
    }
    assert!(h.spawned_pids().is_empty());
    h.assert_clean();
}

#[test]
fn a_full_output_device_is_an_error_and_nothing_is_claimed_described() {
    let h = Harness::new();
    let dir = h.frames(1);
    let out = h
        .describe_command(&[])
        .args(["--output", "/dev/full"])
        .arg(&dir)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    let text = stderr(&out);
    assert!(text.contains("0 described"), "{text}");
    assert!(text.contains("1 answered but not written"), "{text}");
    assert!(text.contains("writing the output failed"), "{text}");
    h.assert_clean();
}

#[test]
fn a_schedulers_cuda_visible_devices_chooses_the_gpu() {
    let h = Harness::new();
    let dir = h.frames(1);
    // The scheduler gave this job one GPU, named by UUID; `--gpu 0` is the first (only) one it may use.
    let out = h
        .describe_command_on("0", &[("CUDA_VISIBLE_DEVICES", &tests::shim_uuid(h.gpu))])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let spawned = &h.server_events()[0];
    assert_eq!(spawned["cuda_visible_devices"], tests::shim_uuid(h.gpu));
    // A GPU outside the list is not this job's.
    fails_with(
        h.describe_command_on("1", &[("CUDA_VISIBLE_DEVICES", &h.gpu.to_string())])
            .arg(&dir),
        2,
        "CUDA_VISIBLE_DEVICES=",
    );
    h.assert_clean();
}

#[test]
fn record_paths_are_relative_to_their_file_and_resume_knows_both_spellings() {
    let h = Harness::new();
    h.frames(2);
    let records = h.dir.path().join("keyframes.jsonl");
    let text: String = ["frames/shot_000.00s.jpg", "./frames//shot_001.10s.jpg"]
        .iter()
        .enumerate()
        .map(|(i, p)| {
            format!(
                "{}\n",
                json!({"timestamp_s": i as f64, "frame_path": p, "source": "cut"})
            )
        })
        .collect();
    std::fs::write(&records, text).unwrap();
    let output = h.dir.path().join("out.jsonl");
    // Run from somewhere else: the paths still resolve against the records' folder.
    let elsewhere = tempfile::tempdir().unwrap();
    let out = h
        .describe_command(&[])
        .current_dir(elsewhere.path())
        .arg("--output")
        .arg(&output)
        .arg(&records)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    // The same frames named through the folder instead: nothing left to do.
    let out = h
        .describe_command(&[])
        .current_dir(h.dir.path())
        .args(["--resume", "--output"])
        .arg(&output)
        .arg("./frames/")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("2 of 2 frames already described"),
        "{}",
        stderr(&out)
    );
    h.assert_clean();
}

#[test]
fn the_old_output_is_kept_until_the_first_new_line() {
    let h = Harness::new();
    let dir = h.frames(1);
    let output = h.dir.path().join("out.jsonl");
    let old = format!(
        "{}\n",
        json!({"frame_path": "/old.jpg", "error": "an earlier run"})
    );
    std::fs::write(&output, &old).unwrap();
    // A start that fails before any frame (too little VRAM) leaves it as it was.
    let out = h
        .describe_command(&[])
        .env("NVIDIA_SMI", h.shim(&[("NVSMI_GPUS", "100")]))
        .arg("--output")
        .arg(&output)
        .arg(&dir)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert_eq!(std::fs::read_to_string(&output).unwrap(), old);
    // A run that writes replaces it.
    let out = h
        .describe_command(&[])
        .arg("--output")
        .arg(&output)
        .arg(&dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let lines = json_lines(&std::fs::read_to_string(&output).unwrap());
    assert_eq!(lines.len(), 1);
    assert!(lines[0]["scene"].is_object());
    h.assert_clean();
}

#[test]
fn output_to_our_own_stdout_appends_and_resume_needs_a_regular_file() {
    let h = Harness::new();
    let dir = h.frames(1);
    let log = h.dir.path().join("log.jsonl");
    std::fs::write(&log, "PREVIOUS LINE\n").unwrap();
    let appended = std::fs::OpenOptions::new().append(true).open(&log).unwrap();
    let out = h
        .describe_command(&[])
        .args(["--output", "/dev/stdout"])
        .arg(&dir)
        .stdout(appended)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.starts_with("PREVIOUS LINE\n"), "{text}");
    assert_eq!(text.lines().count(), 2);
    fails_with(
        h.describe_command(&[])
            .args(["--resume", "--output", "/dev/null"])
            .arg(&dir),
        2,
        "not a regular file",
    );
    h.assert_clean();
}

#[test]
fn nothing_sendable_starts_no_server() {
    let h = Harness::new();
    let dir = h.dir.path().join("odd");
    std::fs::create_dir(&dir).unwrap();
    let frame = h.jpeg("plain.jpg", 16, 16, [1, 2, 3]);
    std::fs::copy(&frame, dir.join(std::ffi::OsStr::from_bytes(b"\xfe.jpg"))).unwrap();
    let out = h.describe_command(&[]).arg(&dir).output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        h.spawned_pids().is_empty(),
        "no server for frames that cannot be sent"
    );
    assert!(h.shim_pids().is_empty(), "not even a VRAM check");
    h.assert_clean();
}
