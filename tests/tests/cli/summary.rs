//! A run you can read: `--summary FILE` (one JSON object at the end, its counts the lines' counts)
//! and `--timings` (each answer's cost on its line), end to end against the fake server.

use std::process::Output;

use serde_json::Value;
use tests::Harness;

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn read_json(path: &std::path::Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn the_summary_adds_up_to_the_lines_and_each_line_carries_its_cost() {
    let h = Harness::new();
    let dir = h.frames(6);
    std::fs::write(dir.join("broken.jpg"), b"not a jpeg").unwrap();
    let summary = h.dir.path().join("summary.json");
    // The first answer is not JSON (one retry), then every answer is valid.
    let out = h
        .describe_command(&[("FAKE_LLAMA_RESPONSE", "not-json,valid")])
        .args(["--slots", "1", "--timings", "--summary"])
        .arg(&summary)
        .arg(&dir)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let lines = tests::json_lines(&String::from_utf8_lossy(&out.stdout));
    assert_eq!(lines.len(), 7);
    let s = read_json(&summary);
    let answered: Vec<&Value> = lines.iter().filter(|l| l.get("scene").is_some()).collect();
    assert_eq!(
        (
            &s["items"],
            &s["answered"],
            &s["failed"],
            &s["not_attempted"]
        ),
        (&7.into(), &answered.len().into(), &1.into(), &0.into()),
        "{s}"
    );
    assert_eq!(s["retries"], 1, "{s}");
    // Every answer's line has its cost; the summary's tokens are theirs, added up.
    let sum = |key: &str| -> u64 {
        answered
            .iter()
            .map(|l| l["timings"][key].as_u64().unwrap())
            .sum()
    };
    assert_eq!(s["tokens"]["prompt"], sum("prompt_tokens"), "{s}");
    assert_eq!(s["tokens"]["generated"], sum("generated_tokens"), "{s}");
    assert!(sum("generated_tokens") > 0);
    for line in &answered {
        let t = &line["timings"];
        assert!(t["server"]["predicted_n"].is_u64(), "{line}");
        assert!(t["latency_ms"].as_f64().unwrap() > 0.0, "{line}");
    }
    let attempts: Vec<u64> = answered
        .iter()
        .map(|l| l["timings"]["attempts"].as_u64().unwrap())
        .collect();
    assert_eq!(attempts.iter().sum::<u64>(), answered.len() as u64 + 1);
    // The error line of the broken frame carries no cost.
    assert!(
        lines
            .iter()
            .any(|l| l.get("error").is_some() && l.get("timings").is_none())
    );
    let latency = &s["latency_ms"];
    let max_line = answered
        .iter()
        .map(|l| l["timings"]["latency_ms"].as_f64().unwrap())
        .fold(0.0, f64::max);
    assert_eq!(latency["max"].as_f64().unwrap(), max_line, "{s}");
    assert!(latency["p50"].as_f64().unwrap() <= latency["p95"].as_f64().unwrap());
    // Its moments are in order, and its rates use them.
    let at = |k: &str| s[k].as_f64().unwrap();
    assert!(at("started_at_unix_s") <= at("ready_at_unix_s"));
    assert!(at("ready_at_unix_s") <= at("finished_at_unix_s"));
    let wall = s["wall_s"].as_f64().unwrap();
    assert!((wall - (at("finished_at_unix_s") - at("started_at_unix_s"))).abs() < 1e-3);
    let rate = s["items_per_s"].as_f64().unwrap();
    assert!((rate - answered.len() as f64 / wall).abs() < 1e-6, "{s}");
    assert!(s["started_at"].as_str().unwrap().ends_with('Z'));
    let gpus = s["gpus"].as_array().unwrap();
    assert_eq!(gpus.len(), 1);
    assert_eq!(gpus[0]["gpu"], h.gpu);
    assert_eq!(gpus[0]["uuid"], tests::shim_uuid(h.gpu));
    assert_eq!(gpus[0]["died"], Value::Null);
    h.assert_clean();
}

#[test]
fn a_summary_never_takes_the_place_of_the_output_or_an_input() {
    let h = Harness::new();
    let dir = h.frames(2);
    let output = h.dir.path().join("scenes.jsonl");
    let refused = |summary: &std::path::Path, needle: &str| {
        let out = h
            .describe_command(&[])
            .arg("--output")
            .arg(&output)
            .arg("--summary")
            .arg(summary)
            .arg(&dir)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
        assert!(stderr(&out).contains(needle), "{}", stderr(&out));
    };
    refused(&output, "is the --output file");
    refused(&dir.join("shot_000.00s.jpg"), "which this run reads");
    refused(&h.model, "which this run reads");
    assert!(h.spawned_pids().is_empty(), "no server starts");
}

#[test]
fn slots_auto_fills_the_free_vram_and_says_why() {
    let h = Harness::new();
    tests::write_llava_7b_header(&h.model);
    let dir = h.frames(2);
    // 12000 MiB free, about 1 MiB of weights, the 1536 MiB margin: 10 slots of 1024 MiB.
    let out = h
        .describe_command(&[("NVSMI_GPUS", "12000")])
        .args(["--slots", "auto"])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains(&format!(
            "--slots auto: GPU {}: 10 slots — 12000 MiB free: 1 server × (",
            h.gpu
        )) && err.contains("10 slots × 1024 MiB of KV cache")
            && err.contains("32 layers × 32 KV heads × (128 + 128) × f16/f16"),
        "{err}"
    );
    let args = &h.spawned_args()[0];
    let after = |flag: &str| {
        let at = args.iter().position(|a| a == flag).unwrap();
        args[at + 1].clone()
    };
    assert_eq!((after("-np"), after("-c")), ("10".into(), "20480".into()));
    // q8_0 caches are about half the size: 41 would fit, 16 is the most auto picks.
    let out = h
        .describe_command(&[("NVSMI_GPUS", "24000")])
        .args([
            "--slots",
            "auto",
            "--server-arg=-ctk",
            "--server-arg=q8_0",
            "--server-arg=--cache-type-v",
            "--server-arg=q8_0",
        ])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("16 slots") && stderr(&out).contains("at most 16"),
        "{}",
        stderr(&out)
    );
    h.assert_clean();
}

#[test]
fn slots_auto_on_a_model_without_its_numbers_asks_for_a_number() {
    let h = Harness::new();
    let dir = h.frames(1);
    let out = h
        .describe_command(&[])
        .args(["--slots", "auto"])
        .arg(&dir)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("--slots auto reads the model's shape")
            && err.contains("llama.block_count")
            && err.contains("give a number of slots instead"),
        "{err}"
    );
    assert!(h.spawned_args().is_empty(), "no server starts");
}

#[test]
fn a_summary_to_the_shells_stdout_appends_where_the_shell_points() {
    let h = Harness::new();
    let dir = h.frames(2);
    let log = h.dir.path().join("log.txt");
    std::fs::write(&log, "before\n").unwrap();
    let appending = std::fs::OpenOptions::new().append(true).open(&log).unwrap();
    let out = h
        .describe_command(&[])
        .args(["--output"])
        .arg(h.dir.path().join("scenes.jsonl"))
        .args(["--summary", "/dev/stdout"])
        .arg(&dir)
        .stdout(appending)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.starts_with("before\n"), "the log was replaced: {text}");
    let summary: Value = serde_json::from_str(&text["before\n".len()..]).unwrap();
    assert_eq!(summary["answered"], 2);
    h.assert_clean();
}

#[test]
fn a_summary_that_cannot_be_written_is_refused_before_anything_starts() {
    let h = Harness::new();
    let dir = h.frames(1);
    let folder = h.dir.path().join("a-folder");
    std::fs::create_dir(&folder).unwrap();
    let dangling = h.dir.path().join("dangling.json");
    std::os::unix::fs::symlink(h.dir.path().join("nowhere.json"), &dangling).unwrap();
    for (summary, needle) in [
        (h.dir.path().join("no-such-folder/s.json"), "does not exist"),
        (folder, "is a folder"),
        (dangling, "a symlink to a file that does not exist"),
    ] {
        let out = h
            .describe_command(&[])
            .arg("--summary")
            .arg(&summary)
            .arg(&dir)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
        assert!(stderr(&out).contains(needle), "{}", stderr(&out));
    }
    assert!(h.spawned_args().is_empty(), "no server starts");
}

#[test]
fn a_full_disk_leaves_whole_lines_and_the_summary_counts_only_them() {
    let h = Harness::new();
    let dir = h.frames(20);
    let output = h.dir.path().join("scenes.jsonl");
    let summary = h.dir.path().join("summary.json");
    let mut command = h.describe_command(&[]);
    command
        .arg("--output")
        .arg(&output)
        .arg("--summary")
        .arg(&summary)
        .arg("--timings")
        .arg(&dir);
    // Files it writes may not grow past 2,000 bytes: a disk that fills up mid-run.
    tests::limit_file_size(&mut command, 2000);
    let out = command.output().unwrap();
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    let text = std::fs::read_to_string(&output).unwrap();
    assert!(text.ends_with('\n'), "a line was cut: {text:?}");
    let lines = tests::json_lines(&text);
    assert!(
        !lines.is_empty() && lines.len() < 20,
        "{} lines",
        lines.len()
    );
    let s = read_json(&summary);
    assert_eq!(s["answered"], lines.len(), "{s}");
    assert_eq!(s["items"], 20);
    // The answer whose line the full disk cut is not written; the items never sent after it are
    // not attempted; the counts add up.
    let count = |key: &str| s[key].as_u64().unwrap() as usize;
    assert!(count("not_written") >= 1, "{s}");
    assert_eq!(
        count("answered") + count("failed") + count("not_attempted") + count("not_written"),
        20,
        "{s}"
    );
    // The tokens are the written lines' own, the cut line's left out.
    let generated: u64 = lines
        .iter()
        .map(|l| l["timings"]["generated_tokens"].as_u64().unwrap())
        .sum();
    assert_eq!(s["tokens"]["generated"], generated, "{s}");
    h.assert_clean();
}

#[test]
fn slots_auto_leaves_out_a_gpu_whose_memory_cannot_be_read() {
    let (h, other) = (Harness::new(), Harness::new());
    tests::write_llava_7b_header(&h.model);
    let dir = h.frames(3);
    // 200 GPUs (the harness's count): the other GPU's memory reads [N/A].
    let free: Vec<String> = (0..200)
        .map(|g| {
            if g == other.gpu {
                "[N/A]".into()
            } else {
                "12000".into()
            }
        })
        .collect();
    let shim = h.shim(&[("NVSMI_GPUS", &free.join(","))]);
    let visible = format!(
        "{},{}",
        tests::shim_uuid(h.gpu),
        tests::shim_uuid(other.gpu)
    );
    let out = std::process::Command::new(tests::cinecut_infer())
        .args(["describe", "--model"])
        .arg(&h.model)
        .arg("--mmproj")
        .arg(&h.mmproj)
        .args(["--slots", "auto", "--gpus", "all", "--port", "0"])
        .arg(&dir)
        .env("LLAMA_SERVER", tests::fake_server())
        .env("NVIDIA_SMI", &shim)
        .env("FAKE_LLAMA_EVENTS", &h.events)
        .env("CUDA_VISIBLE_DEVICES", &visible)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains(&format!("GPU {}: 10 slots", h.gpu)), "{err}");
    assert!(err.contains("left out"), "{err}");
    assert_eq!(
        tests::json_lines(&String::from_utf8_lossy(&out.stdout)).len(),
        3
    );
    h.assert_clean();
    tests::assert_lock_free(other.gpu);
}

#[test]
fn a_resume_with_nothing_left_still_writes_its_summary() {
    let h = Harness::new();
    let dir = h.frames(3);
    let output = h.dir.path().join("scenes.jsonl");
    let summary = h.dir.path().join("summary.json");
    let run = |resume: bool| {
        let mut command = h.describe_command(&[]);
        command
            .arg("--output")
            .arg(&output)
            .arg("--summary")
            .arg(&summary);
        if resume {
            command.arg("--resume");
        }
        command.arg(&dir).output().unwrap()
    };
    assert!(run(false).status.success());
    std::fs::write(&summary, "stale").unwrap();
    let out = run(true);
    assert!(out.status.success(), "{}", stderr(&out));
    let s = read_json(&summary);
    assert_eq!(
        (&s["items"], &s["skipped"], &s["answered"]),
        (&0.into(), &3.into(), &0.into()),
        "{s}"
    );
    h.assert_clean();
}
