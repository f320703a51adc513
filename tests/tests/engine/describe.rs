//! Describing frames against the fake server: answers that depend on the image, every bad answer the
//! real server gives, server trouble, bad input, and concurrency. Each test checks that nothing is
//! left behind.

use std::collections::BTreeSet;
use std::ops::ControlFlow;
use std::sync::Mutex;
use std::time::Duration;

use engine_core::config::EngineConfigBuilder;
use engine_core::process::ChildExit;
use engine_core::typestate::Healthy;
use engine_core::{DescribeOptions, Engine, KeyframeRecord, RequestError};
use tests::{Harness, assert_gone};

fn start(config: EngineConfigBuilder) -> Engine<Healthy> {
    Engine::launch(config.build().unwrap()).expect("engine starts")
}

fn record(path: std::path::PathBuf) -> KeyframeRecord {
    KeyframeRecord::new(path, 0.0, "test")
}

/// How many completion requests the fake started.
fn requests(h: &Harness) -> usize {
    h.events_named("request_start").len()
}

#[test]
fn jpeg_and_png_frames_get_descriptions_that_depend_on_the_image() {
    let h = Harness::new();
    let engine = start(h.config());
    let red = engine
        .describe(&record(h.jpeg("red.jpg", 640, 360, [220, 20, 20])))
        .unwrap();
    let blue = engine
        .describe(&record(h.png("blue.png", 320, 240, [20, 20, 220])))
        .unwrap();
    assert!(red.visual_content.contains("640x360"), "{red:?}");
    assert!(red.visual_content.contains("red"), "{red:?}");
    assert!(blue.visual_content.contains("320x240"), "{blue:?}");
    assert!(blue.visual_content.contains("blue"), "{blue:?}");
    // The same image gives the same description.
    let again = engine
        .describe(&record(h.dir.path().join("red.jpg")))
        .unwrap();
    assert_eq!(red, again);
    engine.shutdown().unwrap();
    h.assert_clean();
}

#[test]
fn a_fenced_answer_is_accepted() {
    let h = Harness::new();
    let engine = start(h.config().env("FAKE_LLAMA_RESPONSE", "fence"));
    engine
        .describe(&record(h.jpeg("f.jpg", 64, 64, [1, 2, 3])))
        .unwrap();
    drop(engine);
    h.assert_clean();
}

#[test]
fn invalid_output_is_retried_then_reported_with_every_attempt_and_the_engine_keeps_working() {
    let h = Harness::new();
    let engine = start(
        h.config()
            .env("FAKE_LLAMA_RESPONSE", "not-json,bad-schema,length,valid"),
    );
    let frame = record(h.jpeg("f.jpg", 64, 64, [1, 2, 3]));
    let err = engine.describe(&frame).unwrap_err();
    match &err {
        RequestError::InvalidOutput { attempts, .. } => {
            assert_eq!(attempts.len(), 3, "default: 2 retries");
            assert!(attempts[0].contains("content is not JSON"), "{attempts:?}");
            assert!(attempts[1].contains("mood"), "{attempts:?}");
            assert!(attempts[2].contains("cut off"), "{attempts:?}");
        }
        other => panic!("unexpected {other:?}"),
    }
    assert!(err.to_string().contains("f.jpg"));
    // The fourth answer is valid: the engine is still usable.
    engine.describe(&frame).unwrap();
    assert_eq!(requests(&h), 4);
    engine.shutdown().unwrap();
    h.assert_clean();
}

#[test]
fn the_peg_format_500_is_retried() {
    let h = Harness::new();
    let engine = start(h.config().env("FAKE_LLAMA_RESPONSE", "peg-500,valid"));
    engine
        .describe(&record(h.jpeg("f.jpg", 64, 64, [1, 2, 3])))
        .unwrap();
    assert_eq!(requests(&h), 2);
    drop(engine);
    h.assert_clean();
}

#[test]
fn an_http_500_is_reported_and_the_next_frame_works() {
    let h = Harness::new();
    let engine = start(h.config().env("FAKE_LLAMA_RESPONSE", "http-500,valid"));
    let frame = record(h.jpeg("f.jpg", 64, 64, [1, 2, 3]));
    let err = engine.describe(&frame).unwrap_err();
    assert!(
        matches!(&err, RequestError::Http { status: 500, body, .. } if body.contains("internal error")),
        "{err:?}"
    );
    engine.describe(&frame).unwrap();
    drop(engine);
    h.assert_clean();
}

#[test]
fn a_frame_the_server_cannot_decode_is_a_400_and_the_engine_goes_on() {
    let h = Harness::new();
    let engine = start(h.config());
    // JPEG magic bytes, then garbage: passes the engine's check, fails the server's decoder.
    let corrupt = h.dir.path().join("corrupt.jpg");
    std::fs::write(
        &corrupt,
        [0xFF, 0xD8, 0xFF, 0xE0, 0, 16, b'J', b'F', 9, 9, 9],
    )
    .unwrap();
    let err = engine.describe(&record(corrupt)).unwrap_err();
    assert!(
        matches!(&err, RequestError::Http { status: 400, body, .. } if body.contains("Failed to load image")),
        "{err:?}"
    );
    engine
        .describe(&record(h.jpeg("ok.jpg", 32, 32, [9, 9, 9])))
        .unwrap();
    drop(engine);
    h.assert_clean();
}

#[test]
fn bad_frames_never_reach_the_server() {
    let h = Harness::new();
    let options = DescribeOptions::default().max_frame_bytes(1024);
    let engine = start(h.config().describe_options(options));
    let dir = h.dir.path();
    std::fs::write(dir.join("empty.jpg"), b"").unwrap();
    std::fs::write(dir.join("notes.jpg"), b"these are notes, not a picture").unwrap();
    let cases = [
        (dir.join("missing.jpg"), "file not found"),
        (dir.join("empty.jpg"), "empty"),
        (dir.join("notes.jpg"), "not a JPEG or PNG"),
        (
            h.jpeg("huge.jpg", 800, 800, [1, 200, 3]),
            "over the 1024-byte limit",
        ),
    ];
    for (path, needle) in cases {
        let err = engine.describe(&record(path.clone())).unwrap_err();
        assert!(matches!(err, RequestError::BadImage { .. }), "{err:?}");
        assert!(err.to_string().contains(needle), "{err}");
        assert!(err.to_string().contains(&path.display().to_string()));
    }
    assert_eq!(requests(&h), 0);
    drop(engine);
    h.assert_clean();
}

#[test]
fn a_slow_answer_times_out_and_shutdown_still_ends() {
    let h = Harness::new();
    let options = DescribeOptions::default().request_timeout(Duration::from_millis(200));
    let engine = start(
        h.config()
            .describe_options(options)
            .env("FAKE_LLAMA_LATENCY_MS", "1500"),
    );
    let err = engine
        .describe(&record(h.jpeg("f.jpg", 32, 32, [1, 2, 3])))
        .unwrap_err();
    assert!(matches!(err, RequestError::Timeout { .. }), "{err:?}");
    let pid = engine.pid();
    engine.shutdown().unwrap();
    assert_gone(pid);
    h.assert_clean();
}

#[test]
fn a_crash_mid_request_is_reported_with_the_signal_and_the_engine_reports_itself_dead() {
    let h = Harness::new();
    let engine = start(h.config().env("FAKE_LLAMA_CRASH_AFTER", "1"));
    let frame = record(h.jpeg("f.jpg", 32, 32, [1, 2, 3]));
    engine.describe(&frame).unwrap();
    let err = engine.describe(&frame).unwrap_err();
    match &err {
        RequestError::ServerDied {
            during: Some(during),
            death,
            ..
        } => {
            assert_eq!(
                during,
                &engine_core::request::Subject::Frame(frame.frame_path.clone())
            );
            assert_eq!(death.status, ChildExit::Signal(6));
            assert!(
                death.output_tail.contains("GGML_ASSERT"),
                "{}",
                death.output_tail
            );
        }
        other => panic!("unexpected {other:?}"),
    }
    // Dead stays dead, at once, without contacting anything.
    let again = engine.describe(&frame).unwrap_err();
    assert!(matches!(again, RequestError::ServerDied { .. }));
    assert_eq!(
        requests(&h),
        1,
        "the crashing request never started its answer"
    );
    let shutdown = engine.shutdown();
    assert!(matches!(shutdown, Err(RequestError::ServerDied { .. })));
    h.assert_clean();
}

#[test]
fn describe_many_keeps_input_order_and_uses_the_slots() {
    let h = Harness::new();
    let slots = 4;
    let engine = start(h.config().slots(slots).env("FAKE_LLAMA_LATENCY_MS", "400"));
    let frames: Vec<KeyframeRecord> = (0..8u32)
        .map(|i| {
            let path = h.jpeg(&format!("f{i}.jpg"), 16 + i * 8, 16, [10, 10, 10]);
            KeyframeRecord::new(path, f64::from(i), "test")
        })
        .collect();
    let done = Mutex::new(Vec::new());
    let results = engine
        .describe_many(&frames, slots as usize, |i, result| {
            assert!(result.is_ok());
            done.lock().unwrap().push(i);
            ControlFlow::Continue(())
        })
        .results;
    for (i, result) in results.iter().enumerate() {
        let width = 16 + i * 8;
        assert!(
            result
                .as_ref()
                .unwrap()
                .visual_content
                .contains(&format!("{width}x16"))
        );
    }
    let done: BTreeSet<usize> = done.into_inner().unwrap().into_iter().collect();
    assert_eq!(done, (0..8).collect());
    // The fake saw up to `slots` requests at once: measure overlap from its own events.
    assert_eq!(max_in_flight(&h), slots as usize);
    drop(engine);
    h.assert_clean();
}

/// The most completion requests the fake was serving at once.
fn max_in_flight(h: &Harness) -> usize {
    let (mut now, mut max) = (0i64, 0i64);
    for event in h.server_events() {
        match event["event"].as_str() {
            Some("request_start") => now += 1,
            Some("request_end") => now -= 1,
            _ => {}
        }
        max = max.max(now);
    }
    max as usize
}

#[test]
fn describe_many_stops_when_asked_and_cancels_the_rest() {
    let h = Harness::new();
    let engine = start(h.config());
    let frames: Vec<KeyframeRecord> = (0..6)
        .map(|i| record(h.jpeg(&format!("f{i}.jpg"), 16, 16, [i as u8, 0, 0])))
        .collect();
    let results = engine
        .describe_many(&frames, 1, |i, _| {
            if i == 1 {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        })
        .results;
    assert!(results[0].is_ok() && results[1].is_ok());
    for result in &results[2..] {
        assert!(
            matches!(result, Err(RequestError::Cancelled { .. })),
            "{result:?}"
        );
    }
    assert_eq!(requests(&h), 2);
    drop(engine);
    h.assert_clean();
}

#[test]
fn describe_is_safe_from_several_threads() {
    let h = Harness::new();
    let engine = start(h.config().slots(2));
    let frames: Vec<KeyframeRecord> = (0..6)
        .map(|i| record(h.jpeg(&format!("t{i}.jpg"), 24, 24 + i * 4, [0, 90, 0])))
        .collect();
    std::thread::scope(|scope| {
        for (i, frame) in frames.iter().enumerate() {
            let engine = &engine;
            scope.spawn(move || {
                let scene = engine.describe(frame).unwrap();
                assert!(scene.visual_content.contains(&format!("24x{}", 24 + i * 4)));
            });
        }
    });
    drop(engine);
    h.assert_clean();
}
