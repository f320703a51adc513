//! `cinecut-infer report`: the contact sheet of a real run against the fake server — one card per
//! line in input order, failed and missing frames marked, thumbnails embedded (nothing fetched),
//! a shard refused with the fix. The browser's view is tests/report_browser.rs.

use std::path::Path;
use std::process::Output;

use tests::Harness;

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn report(results: &Path, output: &Path, extra: &[&str]) -> Output {
    std::process::Command::new(tests::cinecut_infer())
        .arg("report")
        .arg(results)
        .arg("--output")
        .arg(output)
        .args(extra)
        .output()
        .unwrap()
}

/// A describe run of 6 frames, one of them not a JPEG, with --timings and --summary; then a frame
/// removed from disk. Returns (results, summary).
fn run(h: &Harness) -> (std::path::PathBuf, std::path::PathBuf) {
    let dir = h.frames(6);
    std::fs::write(dir.join("shot_003.30s.jpg"), b"not a jpeg").unwrap();
    let results = h.dir.path().join("scenes.jsonl");
    let summary = h.dir.path().join("summary.json");
    let out = h
        .describe_command(&[])
        .args(["--timings", "--output"])
        .arg(&results)
        .arg("--summary")
        .arg(&summary)
        .arg(&dir)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    std::fs::remove_file(dir.join("shot_005.50s.jpg")).unwrap();
    (results, summary)
}

#[test]
fn the_contact_sheet_has_a_card_per_line_with_failures_and_missing_frames_marked() {
    let h = Harness::new();
    let (results, summary) = run(&h);
    let html_path = h.dir.path().join("report.html");
    let out = report(
        &results,
        &html_path,
        &["--summary", summary.to_str().unwrap()],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("6 cards: 5 answered, 1 failed, 0 not attempted"),
        "{}",
        stderr(&out)
    );
    let html = std::fs::read_to_string(&html_path).unwrap();
    assert_eq!(html.matches("<article class=\"card").count(), 6);
    assert_eq!(html.matches("<article class=\"card failed\">").count(), 1);
    assert!(
        html.contains("not a JPEG or PNG"),
        "the failed card shows its error"
    );
    assert_eq!(html.matches("frame missing on disk").count(), 1);
    // Four frames still on disk, each embedded as a thumbnail; nothing fetched from anywhere.
    assert_eq!(
        html.matches("<img src=\"data:image/jpeg;base64,").count(),
        4
    );
    for external in [
        "src=\"http",
        "href=\"http",
        "<link",
        "src=\"file:",
        "@import",
        "url(",
    ] {
        assert!(
            !html.contains(external),
            "the page fetches something: {external}"
        );
    }
    // In input order, with their clock times; the charts and the summary's numbers on top.
    let order: Vec<usize> = ["00:00:00.000", "00:00:01.100", "00:00:02.200"]
        .iter()
        .map(|t| html.find(t).unwrap())
        .collect();
    assert!(order.windows(2).all(|w| w[0] < w[1]), "{order:?}");
    assert!(
        html.contains("answers per second over the run") && html.contains("latency of the answers")
    );
    assert!(html.contains("items/s over"));
    tests::json_lines(&std::fs::read_to_string(&results).unwrap());
}

#[test]
fn a_shard_the_results_file_itself_and_a_bad_summary_are_refused() {
    let h = Harness::new();
    let (results, _) = run(&h);
    let shard = h.dir.path().join("scenes.0.jsonl");
    let out = h
        .describe_command(&[])
        .args(["--shard", "0/2", "--output"])
        .arg(&shard)
        .arg(h.dir.path().join("frames"))
        .output()
        .unwrap();
    assert!(out.status.code().is_some(), "{}", stderr(&out));
    let html = h.dir.path().join("report.html");
    let out = report(&shard, &html, &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("merge the shards first"),
        "{}",
        stderr(&out)
    );
    let out = report(&results, &results, &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("is the results file"),
        "{}",
        stderr(&out)
    );
    let out = report(&results, &html, &["--summary", results.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("give the file --summary wrote"),
        "{}",
        stderr(&out)
    );
    assert!(!html.exists(), "nothing is written after a refusal");
}

#[test]
fn run_answers_show_as_their_json() {
    let h = Harness::new();
    let results = h.dir.path().join("answers.jsonl");
    std::fs::write(
        &results,
        "{\"id\":\"ch1\",\"result\":{\"climax_t\":81.5}}\n{\"id\":2,\"error\":\"record 2: HTTP 500\"}\n",
    )
    .unwrap();
    let html_path = h.dir.path().join("report.html");
    let out = report(&results, &html_path, &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let html = std::fs::read_to_string(&html_path).unwrap();
    assert!(html.contains("id &quot;ch1&quot;") && html.contains("&quot;climax_t&quot;: 81.5"));
    assert!(html.contains("<article class=\"card failed\">") && html.contains("HTTP 500"));
}

#[test]
fn the_report_never_writes_over_a_frame_or_the_summary_and_skips_special_files() {
    let h = Harness::new();
    let (results, summary) = run(&h);
    let frame = h.dir.path().join("frames").join("shot_000.00s.jpg");
    let out = report(&results, &frame, &[]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("an image of line 1"),
        "{}",
        stderr(&out)
    );
    let out = report(
        &results,
        &summary,
        &["--summary", summary.to_str().unwrap()],
    );
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("is the --summary file"),
        "{}",
        stderr(&out)
    );
    // A frame that is a FIFO would block a reader for ever: it is shown as not a file.
    let fifo = h.dir.path().join("fifo.jpg");
    rustix::fs::mknodat(
        rustix::fs::CWD,
        &fifo,
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o644),
        0,
    )
    .unwrap();
    let lines = h.dir.path().join("fifo.jsonl");
    std::fs::write(
        &lines,
        format!(
            "{{\"frame_path\":{:?},\"timestamp_s\":-1.5,\"error\":\"x\"}}\n",
            fifo.display().to_string()
        ),
    )
    .unwrap();
    let html = h.dir.path().join("fifo.html");
    let out = report(&lines, &html, &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let page = std::fs::read_to_string(&html).unwrap();
    assert!(page.contains("not a regular file") && page.contains("-00:00:01.500"));
}
