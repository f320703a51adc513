//! Nothing a user hands the CLI can hurt them: a summary file that carries script, outputs that are
//! regular files under `/dev`, pipes and FIFOs given as results, the lines and summary sharing
//! stdout, a frame planted among a record's images, a torn last line, a full disk under a summary,
//! a GPU listed twice in `CUDA_VISIBLE_DEVICES`. Each refused or handled, with the cause named.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tests::Harness;

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn report(results: &Path, output: &Path, extra: &[&str]) -> Output {
    Command::new(tests::cinecut_infer())
        .arg("report")
        .arg(results)
        .arg("--output")
        .arg(output)
        .args(extra)
        .output()
        .unwrap()
}

/// Lines of a `describe` run, written by hand.
fn results(h: &Harness, name: &str, lines: &[Value]) -> PathBuf {
    let path = h.dir.path().join(name);
    let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
    std::fs::write(&path, text).unwrap();
    path
}

fn answered(frame: &str) -> Value {
    json!({"frame_path": frame, "timestamp_s": 1.0,
           "scene": {"visual_content": "v", "mood": "m", "action": "a", "setting": "s"}})
}

/// The files in `dir` whose names start with `prefix` (temporary files left behind).
fn named(dir: &Path, prefix: &str) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with(prefix))
        .collect()
}

#[test]
fn a_summary_file_that_carries_script_never_reaches_the_page() {
    let h = Harness::new();
    let lines = results(&h, "scenes.jsonl", &[answered("gone.jpg")]);
    let mut summary = json!({
        "items": 1, "items_per_s": 2.0, "wall_s": 0.5,
        "latency_ms": {"p50": 1.0, "p95": 2.0, "max": 3.0},
        "tokens": {"prompt": 100, "generated": "<script>alert(1)</script>"},
        "started_at": "2026-12-01T00:00:00.000Z",
    });
    let path = h.dir.path().join("summary.json");
    let html = h.dir.path().join("report.html");
    for (field, evil) in [
        ("/tokens/generated", json!("<script>alert(1)</script>")),
        ("/tokens/prompt", json!({"x": "</p><script>x()</script>"})),
        ("/started_at", json!("<img src=x onerror=alert(1)>")),
    ] {
        let mut bad = summary.clone();
        *bad.pointer_mut(field).unwrap() = evil;
        if field != "/tokens/generated" {
            *bad.pointer_mut("/tokens/generated").unwrap() = json!(10);
        }
        std::fs::write(&path, bad.to_string()).unwrap();
        let out = report(&lines, &html, &["--summary", path.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(2), "{field}: {}", stderr(&out));
        assert!(
            stderr(&out).contains("give the file --summary wrote"),
            "{}",
            stderr(&out)
        );
        assert!(!html.exists(), "{field}: nothing written");
    }
    // Numbers are shown as numbers.
    *summary.pointer_mut("/tokens/generated").unwrap() = json!(42);
    std::fs::write(&path, summary.to_string()).unwrap();
    let out = report(&lines, &html, &["--summary", path.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let page = std::fs::read_to_string(&html).unwrap();
    assert!(
        page.contains("100 prompt and 42 generated tokens"),
        "{page}"
    );
    assert_eq!(
        page.matches("<script>").count(),
        1,
        "only the page's own filter"
    );
}

#[test]
fn a_regular_file_under_dev_is_replaced_whole_as_any_file() {
    let shm = Path::new("/dev/shm");
    assert!(shm.is_dir(), "this test needs /dev/shm");
    let h = Harness::new();
    let shard = results(
        &h,
        "shard.jsonl",
        &[json!({"id": 1, "index": 0, "of": 1, "job": "j", "result": {}})],
    );
    let out = shm.join(format!("cinecut-test-{}.jsonl", std::process::id()));
    for _ in 0..2 {
        let merged = Command::new(tests::cinecut_infer())
            .arg("merge")
            .arg(&out)
            .arg(&shard)
            .output()
            .unwrap();
        assert!(merged.status.success(), "{}", stderr(&merged));
    }
    let text = std::fs::read_to_string(&out).unwrap();
    std::fs::remove_file(&out).unwrap();
    assert_eq!(text.lines().count(), 1, "merged twice, one line: {text}");
    // The same for --summary: one object, whatever ran before.
    let dir = h.frames(1);
    let summary = shm.join(format!("cinecut-test-{}.json", std::process::id()));
    for _ in 0..2 {
        let ran = h
            .describe_command(&[])
            .arg("--summary")
            .arg(&summary)
            .arg(&dir)
            .output()
            .unwrap();
        assert!(ran.status.success(), "{}", stderr(&ran));
    }
    let text = std::fs::read_to_string(&summary).unwrap();
    std::fs::remove_file(&summary).unwrap();
    let parsed: Value = serde_json::from_str(&text).expect("one JSON object");
    assert_eq!(parsed["items"], 1);
    h.assert_clean();
}

#[test]
fn the_summary_may_not_land_among_the_lines_on_stdout() {
    let h = Harness::new();
    let dir = h.frames(1);
    let out = h
        .describe_command(&[])
        .args(["--summary", "/dev/stdout"])
        .arg(&dir)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("where the lines go too"),
        "{}",
        stderr(&out)
    );
    assert!(out.stdout.is_empty());
    assert!(
        h.spawned_pids().is_empty(),
        "refused before anything started"
    );
    h.assert_clean();
}

#[test]
fn results_from_a_pipe_or_a_fifo_are_refused_at_once_and_leave_nothing() {
    let h = Harness::new();
    let html = h.dir.path().join("report.html");
    let fifo = h.dir.path().join("results.fifo");
    rustix::fs::mknodat(
        rustix::fs::CWD,
        &fifo,
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o644),
        0,
    )
    .unwrap();
    let started = Instant::now();
    let out = report(&fifo, &html, &[]);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "a FIFO never blocks it"
    );
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("not a regular file"),
        "{}",
        stderr(&out)
    );
    // A pipe as /dev/stdin.
    let mut child = Command::new(tests::cinecut_infer())
        .args(["report", "/dev/stdin", "--output"])
        .arg(&html)
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdin.take());
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(!html.exists());
    assert!(named(h.dir.path(), ".report.html").is_empty());
}

#[test]
fn report_never_writes_over_a_records_image_and_shows_what_a_torn_line_left() {
    let h = Harness::new();
    let image = h.jpeg("img.jpg", 8, 8, [1, 2, 3]);
    let record = json!({"id": "r1", "images": [image], "result": {"n": 1}});
    let lines = results(&h, "run.jsonl", &[record]);
    let out = report(&lines, &image, &[]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("an image of line 1"),
        "{}",
        stderr(&out)
    );
    assert_eq!(
        std::fs::read(&image).unwrap()[..2],
        [0xFF, 0xD8],
        "the image is intact"
    );
    // A torn last line (an interrupted run): the whole lines show, the torn one is named.
    let torn = h.dir.path().join("torn.jsonl");
    std::fs::write(
        &torn,
        format!(
            "{}\n{}\n{{\"frame_path\":\"c.jpg\",\"sce",
            answered("a.jpg"),
            answered("b.jpg")
        ),
    )
    .unwrap();
    let html = h.dir.path().join("torn.html");
    let out = report(&torn, &html, &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("line 3 is torn"), "{}", stderr(&out));
    let page = std::fs::read_to_string(&html).unwrap();
    assert_eq!(page.matches("<article class=\"card\">").count(), 2);
}

#[test]
fn a_summary_the_disk_cannot_take_leaves_no_file() {
    let h = Harness::new();
    let dir = h.frames(1);
    let summary = h.dir.path().join("summary.json");
    let mut command = h.describe_command(&[]);
    command.arg("--summary").arg(&summary).arg(&dir);
    // Files it writes may not grow past 100 bytes: the summary (several hundred) cannot be written.
    tests::limit_file_size(&mut command, 100);
    let out = command.output().unwrap();
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    assert!(stderr(&out).contains("--summary"), "{}", stderr(&out));
    assert!(!summary.exists(), "no empty summary left behind");
    assert!(named(h.dir.path(), ".summary.json").is_empty());
    h.assert_clean();
}

#[test]
fn a_gpu_listed_twice_by_the_scheduler_is_one_gpu() {
    let h = Harness::new();
    let dir = h.frames(2);
    let visible = format!("{0},{0}", h.gpu);
    let out = h
        .infer_command("describe", "0", &[])
        .arg("--model")
        .arg(&h.model)
        .arg("--mmproj")
        .arg(&h.mmproj)
        .env("CUDA_VISIBLE_DEVICES", &visible)
        .arg(&dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(!stderr(&out).contains("twice"), "{}", stderr(&out));
    h.assert_clean();
}

#[test]
fn an_interrupted_merge_leaves_no_temporary_file() {
    let h = Harness::new();
    // A shard large enough that a Ctrl-C can land while it is read.
    let mut text = String::new();
    for i in 0..200_000 {
        text.push_str(&format!(
            "{{\"id\":{i},\"index\":{i},\"of\":200000,\"job\":\"j\",\"result\":{{\"n\":{i}}}}}\n"
        ));
    }
    let shard = h.dir.path().join("big.jsonl");
    std::fs::write(&shard, text).unwrap();
    let out_path = h.dir.path().join("merged.jsonl");
    let child = Command::new(tests::cinecut_infer())
        .arg("merge")
        .arg(&out_path)
        .arg(&shard)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(30));
    rustix::process::kill_process(
        rustix::process::Pid::from_child(&child),
        rustix::process::Signal::INT,
    )
    .unwrap();
    let out = child.wait_with_output().unwrap();
    // Wherever the signal landed: no temporary file; and when it stopped the merge, no output.
    assert!(
        named(h.dir.path(), ".merged.jsonl").is_empty(),
        "{}",
        stderr(&out)
    );
    use std::os::unix::process::ExitStatusExt;
    match (out.status.code(), out.status.signal()) {
        // Stopped: before the handlers were installed (killed outright), or by them.
        (None, Some(2)) | (Some(130), _) => assert!(!out_path.exists(), "{}", stderr(&out)),
        (Some(0), _) => {
            let merged = std::fs::read_to_string(&out_path).unwrap();
            assert_eq!(merged.lines().count(), 200_000);
        }
        other => panic!("{other:?}: {}", stderr(&out)),
    }
}
