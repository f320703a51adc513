//! Resource bounds: `report` streams — 20,000 lines, each with a frame to decode and embed, never
//! hold more than one decoded frame (its peak memory, read by wait4, says so).
//!
//! A test binary of its own: a child's peak memory as wait4 reads it includes what the forked test
//! process held before the exec, so the parent must be this small binary, not a suite whose other
//! tests fill its memory.

#[test]
#[expect(
    clippy::zombie_processes,
    reason = "the child is reaped by wait4, which also reads its peak memory"
)]
fn twenty_thousand_frames_are_reported_in_bounded_memory() {
    let dir = tempfile::tempdir().unwrap();
    let frame = dir.path().join("frame.jpg");
    image::RgbImage::from_fn(64, 36, |x, y| {
        image::Rgb([(x * 4) as u8, (y * 7) as u8, 90])
    })
    .save_with_format(&frame, image::ImageFormat::Jpeg)
    .unwrap();
    let results = dir.path().join("scenes.jsonl");
    let mut text = String::new();
    for n in 0..20_000 {
        text.push_str(&format!(
            "{{\"frame_path\":{:?},\"timestamp_s\":{n},\"scene\":{{\"visual_content\":\"v\",\"mood\":\"m\",\"action\":\"a\",\"setting\":\"s\"}}}}\n",
            frame.display().to_string()
        ));
    }
    std::fs::write(&results, text).unwrap();
    let html = dir.path().join("report.html");
    let child = std::process::Command::new(tests::cinecut_infer())
        .arg("report")
        .arg(&results)
        .arg("--output")
        .arg(&html)
        .spawn()
        .unwrap();
    // wait4: this child's own peak memory (the cargo that built it is a child of this process too).
    // SAFETY: wait4 writes the status and the zeroed rusage it is given, nothing else.
    let (status, peak_mib) = unsafe {
        let mut status = 0;
        let mut usage: libc::rusage = std::mem::zeroed();
        let pid = child.id() as libc::pid_t;
        assert_eq!(libc::wait4(pid, &mut status, 0, &mut usage), pid);
        (status, usage.ru_maxrss / 1024)
    };
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "status {status}"
    );
    // 20,000 decoded frames would take 138 MB, the input 4 MB and the cards over 30 MB: the report
    // holds none of them (it peaks at about 10 MB, most of it the program itself).
    assert!(peak_mib < 32, "the report peaked at {peak_mib} MiB");
    let written = std::fs::read_to_string(&html).unwrap();
    assert_eq!(written.matches("<article class=\"card\">").count(), 20_000);
}
