//! The engine's lifecycle against the real fake server: the happy path and every server failure of
//! docs/design.md §3. Each test ends by checking that no process is left and the GPU lock is free.

use std::net::TcpListener;
use std::time::{Duration, Instant};

use engine_core::config::EngineConfigBuilder;
use engine_core::error::ModelRole;
use engine_core::process::{ChildExit, Escalation};
use engine_core::{Engine, EngineError, StartError, Wait};
use tests::{Harness, alive, assert_gone};

fn start(
    config: EngineConfigBuilder,
) -> Result<Engine<engine_core::typestate::Healthy>, StartError> {
    Engine::new(config.build().unwrap())
        .check_vram(Wait::Forever)
        .expect("vram")
        .lock_gpu(Wait::Forever)
        .expect("lock")
        .start(Wait::Forever)
}

#[test]
fn happy_path_runs_every_step_and_cleans_up() {
    let h = Harness::new();
    let engine = Engine::new(h.config().build().unwrap());
    let engine = engine.check_vram(Wait::Forever).unwrap();
    assert_eq!(engine.vram().free_mib, 79000);
    let engine = engine.lock_gpu(Wait::Forever).unwrap();
    // While locked, nobody else gets the GPU.
    assert!(engine_core::gpu_lock(h.gpu, Wait::For(Duration::ZERO)).is_err());
    let engine = engine.start(Wait::Forever).unwrap();
    let pid = engine.pid();
    assert!(alive(pid));
    assert_ne!(engine.port(), 0);
    assert_eq!(
        engine.base_url(),
        format!("http://127.0.0.1:{}", engine.port())
    );
    let report = engine.shutdown().unwrap();
    assert_eq!(report.escalation, Escalation::Term);
    assert_eq!(report.status, Some(ChildExit::Code(0)));
    assert_gone(pid);
    h.assert_clean();
    let events: Vec<String> = h
        .server_events()
        .iter()
        .map(|e| e["event"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        events,
        ["spawned", "listening", "ready", "slots", "sigterm", "exit"]
    );
}

#[test]
fn the_server_gets_the_seed_flags_and_a_private_api_key() {
    let h = Harness::new();
    let argv_file = h.dir.path().join("argv");
    let env_file = h.dir.path().join("env");
    // A wrapper that records what the engine passed, then runs the fake.
    let body = format!(
        "echo \"$@\" > '{}'\nenv > '{}'\nexec '{}' \"$@\"\n",
        argv_file.display(),
        env_file.display(),
        tests::fake_server().display()
    );
    let wrapper = h.script("llama-server", &body);
    let engine = start(h.config().server_bin(&wrapper).log_disable(true)).unwrap();
    let argv = std::fs::read_to_string(&argv_file).unwrap();
    let expected = format!(
        // CineCut's flags; and, as the server's --help offers them, --media-path for frames as
        // files and the prompt cache off.
        "-m {} --mmproj {} --port {} --host 127.0.0.1 -ngl 99 -c 2048 -np 1 --log-disable --media-path / --cache-ram 0",
        h.model.display(),
        h.mmproj.display(),
        engine.port()
    );
    assert_eq!(argv.trim(), expected);
    let env = std::fs::read_to_string(&env_file).unwrap();
    let key = env
        .lines()
        .find_map(|l| l.strip_prefix("LLAMA_API_KEY="))
        .expect("the key is in the environment");
    assert_eq!(key.len(), 32);
    assert!(!argv.contains(key), "the key must never be in argv");
    // Without the key the server refuses everything but /health.
    let (status, _) = tests::http_get(engine.port(), "/props", None);
    assert_eq!(status, 401);
    let (status, body) = tests::http_get(engine.port(), "/health", None);
    assert_eq!((status, body.as_str()), (200, r#"{"status":"ok"}"#));
    let (status, body) = tests::http_get(engine.port(), "/props", Some(key));
    assert_eq!(status, 200);
    assert!(body.contains(h.model.to_str().unwrap()));
    drop(engine);
    h.assert_clean();
}

#[test]
fn dropping_a_healthy_engine_stops_the_server_and_frees_the_lock() {
    let h = Harness::new();
    let engine = start(h.config()).unwrap();
    let pid = engine.pid();
    drop(engine);
    assert_gone(pid);
    h.assert_clean();
}

#[test]
fn a_panic_while_healthy_still_cleans_up() {
    let h = Harness::new();
    let config = h.config();
    let result = std::panic::catch_unwind(move || {
        let _engine = start(config).unwrap();
        panic!("a caller's bug");
    });
    assert!(result.is_err());
    assert!(!h.spawned_pids().is_empty());
    h.assert_clean();
}

#[test]
fn launch_runs_all_steps() {
    let h = Harness::new();
    let engine = Engine::launch(h.config().build().unwrap()).unwrap();
    assert_eq!(engine.gpu(), h.gpu);
    engine.shutdown().unwrap();
    h.assert_clean();
}

#[test]
fn exit_during_load_is_reported_at_once_with_code_and_message() {
    let h = Harness::new();
    let config = h
        .config()
        .startup_timeout(Duration::from_secs(60))
        .env("FAKE_LLAMA_EXIT_DURING_LOAD", "3")
        .env(
            "FAKE_LLAMA_EXIT_MESSAGE",
            "ggml_cuda_init: failed to initialize CUDA: out of memory",
        );
    let started = Instant::now();
    let err = start(config).unwrap_err();
    // "At once": far below the 60 s startup timeout (the fake loads in 30 ms).
    assert!(started.elapsed() < Duration::from_secs(30));
    match &err {
        StartError::ExitedDuringStartup {
            status,
            output_tail,
        } => {
            assert_eq!(*status, ChildExit::Code(3));
            assert!(output_tail.contains("out of memory"), "{output_tail}");
        }
        other => panic!("unexpected {other:?}"),
    }
    assert!(err.to_string().contains("check model path and VRAM"));
    h.assert_clean();
}

#[test]
fn death_by_signal_during_load_names_the_signal() {
    let h = Harness::new();
    let err = start(h.config().env("FAKE_LLAMA_EXIT_DURING_LOAD", "abort")).unwrap_err();
    assert!(
        matches!(&err, StartError::ExitedDuringStartup { status, .. } if *status == ChildExit::Signal(6)),
        "{err}"
    );
    h.assert_clean();
}

#[test]
fn never_healthy_times_out_and_the_child_is_reaped() {
    let h = Harness::new();
    let config = h
        .config()
        .startup_timeout(Duration::from_secs(2))
        .env("FAKE_LLAMA_NEVER_READY", "1");
    let err = start(config).unwrap_err();
    match &err {
        StartError::Timeout { last_health, .. } => {
            assert!(last_health.contains("503"), "{last_health}");
            assert!(last_health.contains("Loading model"), "{last_health}");
        }
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(h.spawned_pids().len(), 1);
    h.assert_clean();
}

#[test]
fn a_200_without_status_ok_is_not_ready() {
    let h = Harness::new();
    let config = h
        .config()
        .startup_timeout(Duration::from_secs(2))
        .env("FAKE_LLAMA_HEALTH_BODY", r#"{"status":"loading"}"#);
    let err = start(config).unwrap_err();
    match &err {
        StartError::Timeout { last_health, .. } => {
            assert!(last_health.contains("HTTP 200"), "{last_health}");
            assert!(last_health.contains("loading"), "{last_health}");
        }
        other => panic!("unexpected {other:?}"),
    }
    h.assert_clean();
}

#[test]
fn a_server_that_ignores_sigterm_is_killed_at_the_grace_deadline() {
    let h = Harness::new();
    let grace = Duration::from_millis(300);
    let engine = start(
        h.config()
            .stop_grace(grace)
            .env("FAKE_LLAMA_SIGTERM", "ignore"),
    )
    .unwrap();
    let pid = engine.pid();
    let report = engine.shutdown().unwrap();
    assert_eq!(report.escalation, Escalation::Kill);
    assert_eq!(report.status, Some(ChildExit::Signal(9)));
    assert!(report.took >= grace);
    assert_gone(pid);
    // The fake saw both SIGTERMs before the SIGKILL.
    let terms = h
        .server_events()
        .iter()
        .filter(|e| e["event"] == "sigterm")
        .count();
    assert_eq!(terms, 2);
    h.assert_clean();
}

#[test]
fn a_swallowed_sigterm_is_followed_by_a_second() {
    let h = Harness::new();
    let grace = Duration::from_secs(4);
    let engine = start(
        h.config()
            .stop_grace(grace)
            .env("FAKE_LLAMA_SIGTERM", "swallow-first"),
    )
    .unwrap();
    let report = engine.shutdown().unwrap();
    assert_eq!(report.escalation, Escalation::SecondTerm);
    // The real server's handler is spent by the lost SIGTERM: the second is a second interrupt.
    assert_eq!(report.status, Some(ChildExit::Code(1)));
    assert!(report.took < grace);
    h.assert_clean();
}

/// The real server loses a SIGTERM that comes after it turns healthy and before its task loop
/// starts. The engine is ready only once the loop has answered (`GET /slots`), so a stop right
/// after the start needs one SIGTERM, and the server exits 0.
#[test]
fn a_stop_right_after_the_start_comes_after_the_task_loop_runs() {
    let h = Harness::new();
    let engine = start(h.config().env("FAKE_LLAMA_SIGTERM", "swallow-before-loop")).unwrap();
    let report = engine.shutdown().unwrap();
    assert_eq!(report.escalation, Escalation::Term);
    assert_eq!(report.status, Some(ChildExit::Code(0)));
    assert_eq!(h.events_named("slots").len(), 1);
    h.assert_clean();
}

#[test]
fn a_flood_of_output_on_both_streams_does_not_block_the_server() {
    let h = Harness::new();
    let flood = 64 * 1024 * 1024;
    let engine = start(h.config().env("FAKE_LLAMA_FLOOD_BYTES", flood.to_string())).unwrap();
    engine.shutdown().unwrap();
    h.assert_clean();
}

#[test]
fn debug_mode_writes_the_whole_log_beside_the_model() {
    let h = Harness::new();
    let flood = 256 * 1024;
    let config = h
        .config()
        .debug(true)
        .env("FAKE_LLAMA_FLOOD_BYTES", flood.to_string());
    let log = config.clone().build().unwrap().debug_log_path();
    assert_eq!(log, h.dir.path().join("llama-server.log"));
    start(config).unwrap().shutdown().unwrap();
    let text = std::fs::read_to_string(&log).unwrap();
    // Both floods (more than the 64 KiB kept in memory) and the startup lines are in the file.
    assert!(text.len() >= 2 * flood, "{} bytes", text.len());
    assert!(text.contains("server is listening"));
    h.assert_clean();
}

#[test]
fn a_taken_port_is_reported_fast_and_nothing_is_spawned() {
    let h = Harness::new();
    let holder = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = holder.local_addr().unwrap().port();
    let err = start(h.config().port(port)).unwrap_err();
    match &err {
        StartError::PortInUse { port: p, .. } => assert_eq!(*p, port),
        other => panic!("unexpected {other:?}"),
    }
    assert!(err.to_string().contains(&format!("port {port} is taken")));
    assert!(h.spawned_pids().is_empty());
    h.assert_clean();
}

#[test]
fn missing_model_or_mmproj_names_the_path_and_spawns_nothing() {
    let h = Harness::new();
    let missing = h.dir.path().join("nope.gguf");
    let mut config = h.config();
    config = config.model(&missing);
    let err = start(config).unwrap_err();
    assert!(
        matches!(&err, StartError::ModelNotFound { role: ModelRole::Model, path } if *path == missing)
    );
    assert!(err.to_string().contains("nope.gguf"));
    let mut config = h.config();
    config = config.mmproj(&missing);
    let err = start(config).unwrap_err();
    assert!(matches!(
        &err,
        StartError::ModelNotFound {
            role: ModelRole::Mmproj,
            ..
        }
    ));
    assert!(h.spawned_pids().is_empty());
    h.assert_clean();
}

#[test]
fn the_fake_itself_refuses_a_missing_model_like_the_real_server() {
    // Bypass the engine's own pre-check: a model that vanishes between check and load (the
    // server's wrapper removes it before the server starts).
    let h = Harness::new();
    let gone = h.dir.path().join("gone.gguf");
    std::fs::copy(&h.model, &gone).unwrap();
    let body = format!(
        "rm -f '{}'\nexec '{}' \"$@\"\n",
        gone.display(),
        tests::fake_server().display()
    );
    let wrapper = h.script("vanishing-model", &body);
    let config = h.config().model(&gone).server_bin(&wrapper);
    let err = start(config).unwrap_err();
    match &err {
        StartError::ExitedDuringStartup {
            status,
            output_tail,
        } => {
            assert_eq!(*status, ChildExit::Code(1));
            assert!(
                output_tail.contains("failed to load model"),
                "{output_tail}"
            );
        }
        other => panic!("unexpected {other:?}"),
    }
    h.assert_clean();
}

#[test]
fn an_unknown_flag_fails_the_start_with_the_servers_reason() {
    let h = Harness::new();
    let err = start(h.config().arg("--no-such-flag")).unwrap_err();
    assert!(
        err.to_string().contains("invalid argument: --no-such-flag"),
        "{err}"
    );
    h.assert_clean();
}

#[test]
fn a_missing_server_binary_says_how_to_fix_it() {
    let h = Harness::new();
    let err = start(h.config().server_bin(h.dir.path().join("no-llama-server"))).unwrap_err();
    assert!(matches!(err, StartError::ServerNotFound { .. }));
    assert!(err.to_string().contains("`server_bin`"), "{err}");
    h.assert_clean();
}

#[test]
fn a_bad_config_is_refused_before_anything_runs() {
    let h = Harness::new();
    let err = h
        .config()
        .health_poll_interval(Duration::from_millis(50))
        .build()
        .unwrap_err();
    assert!(
        err.to_string().contains("`health_poll_interval` is 50ms"),
        "{err}"
    );
    let err = h.config().slots(0).build().unwrap_err();
    assert!(err.to_string().contains("`slots` is 0"), "{err}");
    assert!(h.spawned_pids().is_empty());
    h.assert_clean();
}

#[test]
fn a_second_engine_on_the_same_gpu_waits_for_the_lock() {
    let h = Harness::new();
    let first = start(h.config()).unwrap();
    let second = Engine::new(h.config().build().unwrap())
        .check_vram(Wait::Forever)
        .unwrap();
    let err = second
        .lock_gpu(Wait::For(Duration::from_millis(50)))
        .unwrap_err();
    assert!(
        err.to_string()
            .contains(&format!("GPU {} is still locked", h.gpu)),
        "{err}"
    );
    first.shutdown().unwrap();
    h.assert_clean();
}

#[test]
fn launch_reports_each_kind_of_failure() {
    let h = Harness::new();
    let low = h.shim(&[("NVSMI_GPUS", "100"), ("NVSMI_GPU_COUNT", "200")]);
    let err = Engine::launch(h.config().nvidia_smi(low).build().unwrap()).unwrap_err();
    assert!(matches!(err, EngineError::Vram(_)));
    assert!(
        err.to_string()
            .starts_with("Only 100 MiB free VRAM, need at least 6144 MiB")
    );
    h.assert_clean();
}
