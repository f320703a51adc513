//! Every line accounted for: each shape a new user met that lost answers, clobbered a file, or
//! started work on bad input, as `cinecut-infer` runs it against the fake server and the shim. Each
//! test failed before its fix.

use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use rustix::process::{Pid, Signal};
use serde_json::json;
use tests::{Harness, json_lines};

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn write(h: &Harness, name: &str, text: &str) -> PathBuf {
    let path = h.dir.path().join(name);
    std::fs::write(&path, text).unwrap();
    path
}

const SCHEMA: &str = r#"{"type": "object", "properties": {"t": {"type": "integer", "minimum": 0, "maximum": 9}},
  "required": ["t"], "additionalProperties": false}"#;

/// `run --port 0` for the harness, its schema and prompt, text-only.
fn run(h: &Harness, knobs: &[(&str, &str)]) -> std::process::Command {
    let schema = write(h, "schema.json", SCHEMA);
    let mut cmd = h.run_command(knobs);
    cmd.arg("--schema")
        .arg(&schema)
        .args(["--prompt", "Say t."]);
    cmd
}

/// `cinecut-infer SUBCOMMAND` with the fakes and `--gpus GPUS` (no `--gpu`), the model, and, for
/// `describe`, the mmproj.
fn on_gpus(
    h: &Harness,
    subcommand: &str,
    gpus: &str,
    knobs: &[(&str, &str)],
) -> std::process::Command {
    let mut cmd = std::process::Command::new(tests::cinecut_infer());
    cmd.arg(subcommand)
        .arg("--model")
        .arg(&h.model)
        .args(["--gpus", gpus])
        .env("LLAMA_SERVER", tests::fake_server())
        .env("NVIDIA_SMI", h.shim(&[]))
        .env("FAKE_LLAMA_EVENTS", &h.events)
        .env_remove("CUDA_VISIBLE_DEVICES")
        .envs(knobs.iter().copied());
    if subcommand == "describe" {
        cmd.arg("--mmproj").arg(&h.mmproj);
    } else {
        let schema = write(h, "schema.json", SCHEMA);
        cmd.arg("--schema")
            .arg(&schema)
            .args(["--prompt", "Say t."]);
    }
    cmd
}

/// `n` text records with ids 0..n, as written by `id`.
fn records(h: &Harness, name: &str, ids: impl Iterator<Item = String>) -> PathBuf {
    let text: String = ids
        .map(|id| {
            format!(
                "{{\"id\": {id}, \"text\": \"record {}\"}}\n",
                id.replace('"', "")
            )
        })
        .collect();
    write(h, name, &text)
}

/// The counts in the summary line: described/answered, failed, not attempted, of N.
fn counts(err: &str) -> (usize, usize, usize, usize) {
    let line = err
        .lines()
        .find(|l| l.contains("not attempted, of"))
        .unwrap_or_else(|| panic!("no summary in {err}"));
    let numbers: Vec<usize> = line
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|n| n.parse().ok())
        .collect();
    (numbers[0], numbers[1], numbers[2], numbers[3])
}

#[test]
fn a_server_that_dies_mid_run_leaves_one_line_per_frame_and_counts_that_add_up() {
    let h = Harness::new();
    let dir = h.frames(20);
    let output = h.dir.path().join("d.jsonl");
    let out = h
        .describe_command(&[
            ("FAKE_LLAMA_LATENCY_MS", "100"),
            ("FAKE_LLAMA_CRASH_AFTER", "5"),
        ])
        .args(["--slots", "3", "--progress", "json", "--output"])
        .arg(&output)
        .arg(&dir)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let lines = json_lines(&std::fs::read_to_string(&output).unwrap());
    assert_eq!(lines.len(), 20, "every frame has its line");
    let described = lines.iter().filter(|l| l["scene"].is_object()).count();
    let died = lines
        .iter()
        .filter(|l| {
            l["error"]
                .as_str()
                .is_some_and(|e| e.contains("died (signal 6"))
        })
        .count();
    let never = lines
        .iter()
        .filter(|l| {
            l["error"]
                .as_str()
                .is_some_and(|e| e.contains("not attempted — every server died"))
        })
        .count();
    // Three slots: the first three answers, then the crash takes the requests in flight with it.
    assert!(described >= 3 && died >= 1 && never >= 1, "{lines:?}");
    assert_eq!(described + died + never, 20, "{lines:?}");
    let err = stderr(&out);
    assert_eq!(counts(&err), (described, died, never, 20), "{err}");
    // Progress said as much, once per frame.
    let progress = err.lines().filter(|l| l.starts_with("{\"done\"")).count();
    assert_eq!(progress, 20, "{err}");
    h.assert_clean();
}

#[test]
fn when_every_server_of_a_pool_dies_every_record_still_gets_its_line() {
    let (h, other) = (Harness::new(), Harness::new());
    let input = records(&h, "in.jsonl", (0..40).map(|i| i.to_string()));
    let gpus = format!("{},{}", h.gpu, other.gpu);
    let knobs = [
        ("FAKE_LLAMA_CRASH_AFTER", "2"),
        ("FAKE_LLAMA_LATENCY_MS", "20"),
    ];
    let out = on_gpus(&h, "run", &gpus, &knobs)
        .args(["--slots", "2"])
        .arg(&input)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let lines = json_lines(&String::from_utf8_lossy(&out.stdout));
    let ids: Vec<u64> = lines.iter().map(|l| l["id"].as_u64().unwrap()).collect();
    assert_eq!(ids, (0..40).collect::<Vec<_>>(), "every id, in input order");
    // Each server answers at most two before it dies (a request in flight when it dies may go
    // with it); every other record has its error line.
    let answered = lines.iter().filter(|l| l["result"].is_object()).count();
    assert!((1..=4).contains(&answered), "{}", stderr(&out));
    let errors = lines.iter().filter(|l| l["error"].is_string()).count();
    assert_eq!(answered + errors, 40);
    let err = stderr(&out);
    let (a, f, n, total) = counts(&err);
    assert_eq!((a, a + f + n, total), (answered, 40, 40), "{err}");
    h.assert_clean();
    tests::assert_lock_free(other.gpu);
}

#[test]
fn run_refuses_bad_sampling_at_planning_and_leaves_the_old_output() {
    let h = Harness::new();
    let input = records(&h, "in.jsonl", (0..3).map(|i| i.to_string()));
    let output = write(&h, "old.jsonl", "{\"id\": 0, \"result\": {\"t\": 1}}\n");
    for flags in [
        &["--temperature", "7"][..],
        &["--temperature", "inf"],
        &["--temperature", "NaN"],
        &["--max-tokens", "0"],
    ] {
        let out = run(&h, &[])
            .args(flags)
            .arg("--output")
            .arg(&output)
            .arg(&input)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{flags:?}: {}", stderr(&out));
        let flag = flags[0];
        assert!(stderr(&out).contains(flag), "{flags:?}: {}", stderr(&out));
    }
    assert_eq!(
        std::fs::read_to_string(&output).unwrap(),
        "{\"id\": 0, \"result\": {\"t\": 1}}\n"
    );
    assert!(h.spawned_pids().is_empty(), "no server was started");
    h.assert_clean();
}

#[test]
fn ids_come_back_exactly_as_written_and_resume_by_that_text() {
    let h = Harness::new();
    let ids = [
        "123456789012345678901234567890",
        "123456789012345678901234567891",
        "1e0",
        "1",
        "-0",
        "0",
        "\"0\"",
    ];
    let input = records(&h, "in.jsonl", ids.iter().map(|s| s.to_string()));
    let output = h.dir.path().join("out.jsonl");
    let out = run(&h, &[])
        .arg("--output")
        .arg(&output)
        .arg(&input)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let text = std::fs::read_to_string(&output).unwrap();
    let written: Vec<String> = text
        .lines()
        .map(|l| {
            let start = l.find("\"id\":").unwrap() + 5;
            let end = l[start..].find(",\"").unwrap() + start;
            l[start..end].to_string()
        })
        .collect();
    assert_eq!(written, ids, "{text}");
    // Resumed by the same text: nothing left to do.
    let out = run(&h, &[])
        .args(["--resume", "--output"])
        .arg(&output)
        .arg(&input)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("7 of 7 records already answered"),
        "{}",
        stderr(&out)
    );
    h.assert_clean();
}

#[test]
fn resuming_a_shard_over_a_changed_input_is_refused_with_the_fix() {
    let h = Harness::new();
    let ten = records(&h, "ten.jsonl", (0..10).map(|i| i.to_string()));
    let output = h.dir.path().join("shard0.jsonl");
    let out = run(&h, &[])
        .args(["--shard", "0/2", "--output"])
        .arg(&output)
        .arg(&ten)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let before = std::fs::read_to_string(&output).unwrap();
    let eleven = records(&h, "eleven.jsonl", (0..11).map(|i| i.to_string()));
    let out = run(&h, &[])
        .args(["--shard", "0/2", "--resume", "--output"])
        .arg(&output)
        .arg(&eleven)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("another job's") && err.contains("without --resume"),
        "{err}"
    );
    assert_eq!(std::fs::read_to_string(&output).unwrap(), before);
    // An unsharded output resumed over another input: refused too.
    let plain = h.dir.path().join("plain.jsonl");
    let out = run(&h, &[])
        .arg("--output")
        .arg(&plain)
        .arg(&ten)
        .output()
        .unwrap();
    assert!(out.status.success());
    let other = records(&h, "other.jsonl", (100..103).map(|i| i.to_string()));
    let out = run(&h, &[])
        .args(["--resume", "--output"])
        .arg(&plain)
        .arg(&other)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("not in this input"),
        "{}",
        stderr(&out)
    );
    h.assert_clean();
}

#[test]
fn server_args_that_undo_the_engines_guarantees_are_refused_by_name() {
    let h = Harness::new();
    let dir = h.frames(1);
    for (args, needle) in [
        (
            &["--server-arg=--host", "--server-arg=0.0.0.0"][..],
            "127.0.0.1 only",
        ),
        (
            &["--server-arg=--api-key", "--server-arg=k"],
            "fresh random key",
        ),
        (&["--server-arg=--port", "--server-arg=9"], "use --port"),
        (&["--server-arg=-np", "--server-arg=4"], "use --slots"),
        (&["--server-arg=--ctx-size=99"], "use --ctx-size"),
        (
            &["--server-arg=--log-disable"],
            "reads the server's log: use --debug for a file",
        ),
    ] {
        let out = h
            .describe_command(&[])
            .args(args)
            .arg(&dir)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        assert!(stderr(&out).contains(needle), "{args:?}: {}", stderr(&out));
        assert!(stderr(&out).contains("--server-arg"), "{}", stderr(&out));
    }
    assert!(h.spawned_pids().is_empty());
    h.assert_clean();
}

/// A missing nvidia-smi is named with the CLI's own fix: the variable that points at it.
#[test]
fn a_missing_nvidia_smi_names_the_variable_that_points_at_it() {
    let h = Harness::new();
    let missing = h.dir.path().join("no-such-nvidia-smi");
    let out = std::process::Command::new(tests::cinecut_infer())
        .args(["check", "--gpu", "0"])
        .env("NVIDIA_SMI", &missing)
        .output()
        .unwrap();
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(
        err.contains(&format!("nvidia-smi not found at {}", missing.display()))
            && err.contains("or set NVIDIA_SMI to its path")
            && !err.contains("(NVIDIA_SMI)"),
        "{err}"
    );
    h.assert_clean();
}

#[test]
fn inputs_with_a_byte_order_mark_are_read_and_binary_names_its_line() {
    let h = Harness::new();
    let bom = write(&h, "bom.jsonl", "\u{feff}{\"id\": 1, \"text\": \"x\"}\n");
    let out = run(&h, &[]).arg(&bom).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(json_lines(&String::from_utf8_lossy(&out.stdout)).len(), 1);
    let binary = h.dir.path().join("frames.jsonl");
    std::fs::write(
        &binary,
        b"{\"id\": 1, \"text\": \"x\"}\n\x89PNG\r\n\x1a\n\0\0",
    )
    .unwrap();
    let out = run(&h, &[]).arg(&binary).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("frames.jsonl line 2: not UTF-8"),
        "{}",
        stderr(&out)
    );
    h.assert_clean();
}

/// A shim that answers after `ms`, logging each call.
fn slow_shim(h: &Harness, knob: (&str, &str)) -> PathBuf {
    let log = h.shim_log();
    h.shim(&[knob, ("NVSMI_LOG", log.to_str().unwrap())])
}

#[test]
fn ctrl_c_while_nvidia_smi_hangs_exits_130_at_once_and_queries_no_more() {
    let h = Harness::new();
    let dir = h.frames(1);
    // The one VRAM reading of the plan, whatever asked for it: the GPU's check, `auto` servers or
    // slots.
    let flags: [&[&str]; 3] = [&[], &["--servers-per-gpu", "auto"], &["--slots", "auto"]];
    let knobs = [("NVSMI_HANG", "1"), ("NVSMI_DELAY_MS", "1500")];
    for (knob, extra) in knobs
        .iter()
        .flat_map(|k| flags.iter().map(move |f| (*k, *f)))
    {
        let _ = std::fs::remove_file(h.shim_log());
        let child = h
            .describe_command(&[])
            .env("NVIDIA_SMI", slow_shim(&h, knob))
            .args(extra)
            .arg(&dir)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while h.shim_pids().is_empty() {
            assert!(Instant::now() < deadline);
            std::thread::sleep(Duration::from_millis(5));
        }
        let asked = h.shim_pids().len();
        let started = Instant::now();
        rustix::process::kill_process(Pid::from_child(&child), Signal::INT).unwrap();
        let out = child.wait_with_output().unwrap();
        assert_eq!(
            out.status.code(),
            Some(130),
            "{knob:?} {extra:?}: {}",
            stderr(&out)
        );
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{knob:?}: took {:?}",
            started.elapsed()
        );
        assert_eq!(
            h.shim_pids().len(),
            asked,
            "{knob:?}: no query after the Ctrl-C"
        );
        assert!(h.spawned_pids().is_empty());
    }
    h.assert_clean();
}

#[test]
fn a_signal_after_the_last_line_is_written_does_not_ask_for_a_resume() {
    let h = Harness::new();
    let dir = h.frames(3);
    let output = h.dir.path().join("out.jsonl");
    let child = h
        // The server ignores SIGTERM: the stop takes its grace period, after every line is written.
        .describe_command(&[("FAKE_LLAMA_SIGTERM", "ignore")])
        .arg("--output")
        .arg(&output)
        .arg(&dir)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    tests::wait_for_lines(&output, 3);
    h.wait_for_event("sigterm");
    rustix::process::kill_process(Pid::from_child(&child), Signal::INT).unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(!stderr(&out).contains("--resume"), "{}", stderr(&out));
    h.assert_clean();
}

#[test]
fn a_free_lock_is_not_called_held_and_a_foreign_flock_is_named() {
    let (h, other) = (Harness::new(), Harness::new());
    let dir = h.frames(1);
    // A lock file left by a process that died: its pid is there, the lock is free.
    let path = engine_core::gpu::lockfile::lock_file_path(h.gpu).unwrap();
    std::fs::write(&path, "999999999").unwrap();
    let out = h.describe_command(&[]).arg(&dir).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(!stderr(&out).contains("held"), "{}", stderr(&out));
    // A GPU job that holds the lock with flock(1), writing nothing into the file.
    let path = engine_core::gpu::lockfile::lock_file_path(other.gpu).unwrap();
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .unwrap();
    file.lock().unwrap();
    let said = h.dir.path().join("stderr.txt");
    let mut child = on_gpus(&h, "describe", &format!("{},{}", h.gpu, other.gpu), &[])
        .args(["--port", "0"])
        .arg(&dir)
        .stderr(std::fs::File::create(&said).unwrap())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let expected = format!("waiting for GPU {}: its lock", other.gpu);
    while !std::fs::read_to_string(&said).unwrap().contains(&expected) {
        assert!(
            Instant::now() < deadline,
            "{}",
            std::fs::read_to_string(&said).unwrap()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(
        std::fs::read_to_string(&said)
            .unwrap()
            .contains("held by another process"),
        "{}",
        std::fs::read_to_string(&said).unwrap()
    );
    drop(file);
    assert!(child.wait().unwrap().success());
    h.assert_clean();
    tests::assert_lock_free(other.gpu);
}

#[test]
fn merge_writes_special_files_in_place_and_never_clobbers_through_links() {
    let h = Harness::new();
    let shard = write(
        &h,
        "s.jsonl",
        "{\"id\":1,\"index\":0,\"of\":1,\"job\":\"j\",\"result\":{}}\n",
    );
    let merge = |out: &Path| {
        std::process::Command::new(tests::cinecut_infer())
            .arg("merge")
            .arg(out)
            .arg(&shard)
            .output()
            .unwrap()
    };
    // /dev/stdout: the lines go to stdout, and /dev/stdout stays what it was (as root too).
    let before = std::fs::symlink_metadata("/dev/stdout")
        .unwrap()
        .file_type();
    let out = merge(Path::new("/dev/stdout"));
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        json_lines(&String::from_utf8_lossy(&out.stdout)),
        [json!({"id": 1, "result": {}})]
    );
    assert_eq!(
        std::fs::symlink_metadata("/dev/stdout")
            .unwrap()
            .file_type(),
        before
    );
    // A run writing OUT holds its lock: merge refuses and changes nothing.
    let busy = h.dir.path().join("busy.jsonl");
    let child = h
        .describe_command(&[("FAKE_LLAMA_LOAD_MS", "60000")])
        .arg("--output")
        .arg(&busy)
        .arg(h.frames(1))
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    h.wait_for_event("spawned");
    let out = merge(&busy);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("being written by another"),
        "{}",
        stderr(&out)
    );
    rustix::process::kill_process(Pid::from_child(&child), Signal::INT).unwrap();
    let _ = child.wait_with_output();
    // Nothing merged means nothing to merge: an error, not "merged 0 of 0".
    let empty = write(&h, "empty.jsonl", "");
    let out = std::process::Command::new(tests::cinecut_infer())
        .arg("merge")
        .arg(h.dir.path().join("none.jsonl"))
        .arg(&empty)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    h.assert_clean();
}
