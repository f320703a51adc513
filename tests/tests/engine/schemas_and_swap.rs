//! Any model, any schema, through the library: a text-only engine answering CineCut's
//! structural-anchors schema, the model-file checks, the bounded VRAM wait, and the swap from the
//! vision model to the text model that never lets go of the GPU lock.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use engine_core::{
    Engine, EngineError, KeyframeRecord, Prompt, RequestError, Schema, StartError, VramError, Wait,
};
use serde::Deserialize;
use serde_json::{Value, json};
use tests::Harness;

fn anchors() -> Schema {
    tests::anchors_schema()
}

#[derive(Debug, Deserialize)]
struct Anchors {
    begin_t: f64,
    escalation_t: f64,
    climax_t: f64,
}

/// The harness's config without its projector: a text-only model.
fn text_config(h: &Harness) -> engine_core::config::EngineConfigBuilder {
    h.config().text_only()
}

fn completions(h: &Harness) -> usize {
    h.events_named("request_start").len()
}

#[test]
fn a_text_model_answers_the_anchors_schema_as_a_typed_value() {
    let h = Harness::new();
    let engine = Engine::launch(text_config(&h).build().unwrap()).unwrap();
    let prompt = Prompt::new(&anchors(), "1\n00:00:01,000 --> 00:00:03,000\nWho's there?")
        .system("Find the story's structural anchors, in seconds.");
    let answer: Anchors = engine.complete(&prompt).unwrap();
    assert!(answer.begin_t.is_finite() && answer.escalation_t.is_finite());
    assert!(answer.climax_t.is_finite());
    // The same request as a plain JSON value validates against the caller's schema.
    let value: Value = engine.complete(&prompt).unwrap();
    assert!(anchors().validate(&value).is_ok(), "{value}");
    let args = h.spawned_args();
    assert!(!args[0].iter().any(|a| a == "--mmproj"), "{args:?}");
    let (_, props) = tests::http_get(engine.port(), "/props", Some(engine.api_key()));
    assert!(props.contains(r#""vision":false"#), "{props}");
    drop(engine);
    h.assert_clean();
}

#[test]
fn an_image_for_a_text_model_is_refused_before_anything_is_sent() {
    let h = Harness::new();
    let engine = Engine::launch(text_config(&h).build().unwrap()).unwrap();
    let frame = h.jpeg("f.jpg", 16, 16, [1, 2, 3]);
    let err = engine
        .complete::<Value>(&Prompt::new(&anchors(), "x").image(&frame))
        .unwrap_err();
    assert!(
        matches!(&err, RequestError::InvalidPrompt { .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("text-only model"), "{err}");
    let err = engine
        .describe(&KeyframeRecord::new(&frame, 1.0, "cut"))
        .unwrap_err();
    assert!(err.to_string().contains("mmproj"), "{err}");
    assert_eq!(completions(&h), 0, "nothing reached the server");
    drop(engine);
    h.assert_clean();
}

#[test]
fn an_off_schema_answer_is_retried_and_the_error_names_the_schema() {
    let h = Harness::new();
    let config = text_config(&h)
        .env("FAKE_LLAMA_RESPONSE", "bad-schema,not-json,bad-schema")
        .describe_options(engine_core::DescribeOptions::default().retries(2))
        .build()
        .unwrap();
    let engine = Engine::launch(config).unwrap();
    let err = engine
        .complete::<Anchors>(&Prompt::new(&anchors(), "subtitles").id("chunk-3"))
        .unwrap_err();
    match &err {
        RequestError::InvalidOutput {
            schema, attempts, ..
        } => {
            assert_eq!(schema, "structural_anchors");
            assert_eq!(attempts.len(), 3, "{attempts:?}");
            assert!(attempts[0].contains("begin_t"), "{attempts:?}");
            assert!(attempts[1].contains("not JSON"), "{attempts:?}");
        }
        other => panic!("{other:?}"),
    }
    assert!(err.to_string().starts_with("request chunk-3:"), "{err}");
    assert_eq!(completions(&h), 3);
    drop(engine);
    h.assert_clean();
}

#[test]
fn a_vision_model_answers_any_schema_about_its_images() {
    let h = Harness::new();
    let engine = Engine::launch(h.config().build().unwrap()).unwrap();
    let schema = Schema::new(
        "shot",
        json!({"type": "object", "required": ["kind", "people"], "additionalProperties": false,
               "properties": {"kind": {"enum": ["wide", "close-up"]},
                              "people": {"type": "integer", "minimum": 0, "maximum": 9}}}),
    )
    .unwrap();
    let prompt = Prompt::new(&schema, "What shot is this?")
        .image(h.jpeg("a.jpg", 32, 24, [200, 0, 0]))
        .image(h.png("b.png", 24, 32, [0, 0, 200]));
    let value: Value = engine.complete(&prompt).unwrap();
    assert!(schema.validate(&value).is_ok(), "{value}");
    drop(engine);
    h.assert_clean();
}

#[test]
fn model_files_that_llama_server_cannot_load_in_their_role_are_refused_before_any_process() {
    let h = Harness::new();
    let no_type = h.dir.path().join("old-mmproj.gguf");
    tests::write_gguf(&no_type, &[("general.architecture", "clip")]);
    let not_gguf = h.dir.path().join("model.bin");
    std::fs::write(&not_gguf, b"\x7fELF not a model").unwrap();
    let cases = [
        (h.config().mmproj(&no_type), "no clip.projector_type"),
        (h.config().model(&h.mmproj), "pass it as the mmproj"),
        (h.config().mmproj(&h.model), "not a vision projector"),
        (h.config().model(&not_gguf), "not a GGUF file"),
    ];
    for (config, needle) in cases {
        let err = Engine::launch(config.build().unwrap()).unwrap_err();
        assert!(
            matches!(&err, EngineError::Start(StartError::BadModel { .. })),
            "{err:?}"
        );
        assert!(err.to_string().contains(needle), "{err}");
    }
    assert!(h.spawned_pids().is_empty(), "no server was started");
    h.assert_clean();
}

/// A shim whose free VRAM (every GPU's) is read from a file at each call, logging each call;
/// returns the file and the shim.
fn changing_vram(h: &Harness, free_mib: &str) -> (PathBuf, PathBuf) {
    let file = h.dir.path().join("free-mib");
    std::fs::write(&file, free_mib).unwrap();
    let log = h.shim_log();
    let shim = h.shim(&[
        ("NVSMI_FREE_FILE", file.to_str().unwrap()),
        ("NVSMI_GPU_COUNT", "200"),
        ("NVSMI_LOG", log.to_str().unwrap()),
    ]);
    (file, shim)
}

/// How many times the harness's shims have been asked so far.
fn shim_calls(h: &Harness) -> usize {
    h.shim_pids().len()
}

#[test]
fn check_vram_within_waits_for_memory_being_freed_and_names_the_last_reading() {
    let h = Harness::new();
    let (file, shim) = changing_vram(&h, "2000");
    let config = h.config().nvidia_smi(&shim).build().unwrap();
    let err = Engine::new(config.clone())
        .check_vram_within(Duration::from_millis(200))
        .unwrap_err();
    assert!(
        matches!(err, VramError::NotFreed { free_mib: 2000, .. }),
        "{err:?}"
    );
    assert!(
        err.to_string().contains("only 2000 MiB free after waiting"),
        "{err}"
    );
    // Memory comes back while we wait (another model's server finishing its exit): freed once the
    // waiter has asked twice and been told 2000.
    let before = shim_calls(&h);
    let checked = std::thread::scope(|scope| {
        scope.spawn(|| {
            while shim_calls(&h) < before + 2 {
                std::thread::sleep(Duration::from_millis(2));
            }
            std::fs::write(&file, "79000").unwrap();
        });
        Engine::new(config).check_vram_within(Duration::from_secs(20))
    })
    .unwrap();
    assert_eq!(checked.vram().free_mib, 79000);
    assert!(shim_calls(&h) >= before + 3, "it waited and asked again");
    // Errors other than too little memory end the wait at once.
    let broken = h.shim(&[("NVSMI_EXIT", "9")]);
    let started = std::time::Instant::now();
    let err = Engine::new(h.config().nvidia_smi(broken).build().unwrap())
        .check_vram_within(Duration::from_secs(60))
        .unwrap_err();
    assert!(matches!(err, VramError::Failed { .. }), "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(30));
    h.assert_clean();
}

#[test]
fn a_swap_from_the_vision_model_to_the_text_model_never_lets_go_of_the_gpu() {
    let h = Harness::new();
    let vision = Engine::launch(h.config().build().unwrap()).unwrap();
    let scene = vision
        .describe(&KeyframeRecord::new(
            h.jpeg("f.jpg", 32, 24, [9, 9, 9]),
            1.0,
            "cut",
        ))
        .unwrap();
    assert!(!scene.mood.is_empty());
    let first = vision.pid();
    // A third process trying the lock throughout the swap must never get it.
    let swapping = AtomicBool::new(true);
    let (tries, taken) = (AtomicUsize::new(0), AtomicUsize::new(0));
    let text = std::thread::scope(|scope| {
        scope.spawn(|| {
            while swapping.load(Ordering::Acquire) {
                tries.fetch_add(1, Ordering::Relaxed);
                if engine_core::gpu_lock(h.gpu, Wait::For(Duration::ZERO)).is_ok() {
                    taken.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        let text = vision.swap(text_config(&h).port(0).build().unwrap(), Wait::Forever);
        swapping.store(false, Ordering::Release);
        text
    })
    .unwrap();
    assert_eq!(
        taken.load(Ordering::Relaxed),
        0,
        "the lock was free during the swap"
    );
    assert!(tries.load(Ordering::Relaxed) > 0);
    assert!(!tests::alive(first), "the vision server is gone");
    assert_ne!(text.pid(), first);
    assert!(text.config().mmproj().is_none());
    let answer: Anchors = text
        .complete(&Prompt::new(&anchors(), "subtitles"))
        .unwrap();
    assert!(answer.climax_t.is_finite());
    // And back: the text model swaps to the vision model again.
    let vision = text
        .swap(h.config().build().unwrap(), Wait::Forever)
        .unwrap();
    vision
        .describe(&KeyframeRecord::new(
            h.jpeg("g.jpg", 32, 24, [9, 90, 9]),
            2.0,
            "cut",
        ))
        .unwrap();
    let args = h.spawned_args();
    assert_eq!(args.len(), 3);
    assert_eq!(
        args.iter()
            .map(|a| a.iter().any(|x| x == "--mmproj"))
            .collect::<Vec<_>>(),
        [true, false, true]
    );
    vision.shutdown().unwrap();
    h.assert_clean();
}

#[test]
fn a_failed_swap_leaves_nothing_running_and_the_gpu_free() {
    let h = Harness::new();
    // The next server exits during its load.
    let engine = Engine::launch(h.config().build().unwrap()).unwrap();
    let first = engine.pid();
    let err = engine
        .swap(
            text_config(&h)
                .env("FAKE_LLAMA_EXIT_DURING_LOAD", "1")
                .build()
                .unwrap(),
            Wait::Forever,
        )
        .unwrap_err();
    assert!(err.to_string().contains("exited during startup"), "{err}");
    assert!(!tests::alive(first));
    h.assert_clean();

    // What a swap checks before it stops anything — another GPU, a missing server program, a
    // missing model — is refused with the engine handed back, still serving; dropping it then
    // releases everything.
    let engine = Engine::launch(h.config().build().unwrap()).unwrap();
    let frame = h.jpeg("still.jpg", 8, 8, [1, 2, 3]);
    let refusals = [
        (text_config(&h).gpu(h.gpu + 1), "keeps the GPU"),
        (
            text_config(&h).server_bin("/nonexistent/llama-server"),
            "llama-server not found",
        ),
        (
            text_config(&h).model(h.dir.path().join("gone.gguf")),
            "model file not found",
        ),
    ];
    let mut engine = engine;
    for (next, says) in refusals {
        let pid = engine.pid();
        let err = engine
            .swap(next.build().unwrap(), Wait::Forever)
            .unwrap_err();
        assert!(err.error.to_string().contains(says), "{err}");
        engine = *err.still_running.expect("nothing was stopped");
        assert_eq!(engine.pid(), pid);
        engine
            .describe(&KeyframeRecord::new(&frame, 0.0, "still"))
            .unwrap();
    }
    drop(engine);
    h.assert_clean();

    // VRAM never comes back for the next model: the bounded wait ends, the lock is released.
    let (_file, shim) = changing_vram(&h, "7000");
    let engine = Engine::launch(h.config().nvidia_smi(&shim).build().unwrap()).unwrap();
    let next = text_config(&h)
        .nvidia_smi(&shim)
        .min_vram_mib(9000)
        .vram_recovery_timeout(Duration::from_millis(100))
        .build()
        .unwrap();
    let servers = h.spawned_pids().len();
    let err = engine.swap(next, Wait::Forever).unwrap_err();
    assert!(
        matches!(
            err.error,
            EngineError::Vram(VramError::NotFreed { free_mib: 7000, .. })
        ) && err.still_running.is_none(),
        "{err:?}"
    );
    assert_eq!(
        h.spawned_pids().len(),
        servers,
        "the next server never started"
    );
    h.assert_clean();
}
