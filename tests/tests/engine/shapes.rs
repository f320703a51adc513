//! The shapes users run the engine in, beyond the tests' first assumptions: a server behind a wrapper
//! script, a child that leaves its process group, a GPU that fills up while we wait for its lock, a
//! start that fails, a host with several GPUs, many slots, a squatter that enforces no key, a debug
//! log path that is a symlink. Each test failed before its fix.

use std::sync::mpsc;
use std::time::Duration;

use engine_core::gpu::LockError;
use engine_core::process::Escalation;
use engine_core::{Engine, EngineError, GpuId, KeyframeRecord, RequestError, StartError, Wait};
use tests::{Harness, alive, assert_gone};

#[test]
fn a_server_behind_a_wrapper_script_is_stopped_with_its_tree() {
    let h = Harness::new();
    let engine = Engine::launch(
        h.config()
            .server_bin(h.wrapper_without_exec())
            .build()
            .unwrap(),
    )
    .unwrap();
    let shell = engine.pid();
    let server = h.spawned_pids()[0];
    assert_ne!(shell, server, "the server is the wrapper's child");
    engine
        .describe(&KeyframeRecord::new(
            h.jpeg("f.jpg", 32, 32, [9, 9, 9]),
            0.0,
            "t",
        ))
        .unwrap();
    let report = engine.shutdown().unwrap();
    assert!(report.left_running.is_empty(), "{report:?}");
    // Before: the shell was reaped, the server kept running with ppid 1 and /health answering.
    tests::wait_not_running(shell);
    tests::wait_not_running(server);
    tests::assert_lock_free(h.gpu);
}

#[test]
fn stop_ends_even_when_the_child_left_its_group_and_ignores_sigterm() {
    let h = Harness::new();
    let grace = Duration::from_millis(300);
    let config = h
        .config()
        .stop_grace(grace)
        .env("FAKE_LLAMA_LEAVE_GROUP", "1")
        .env("FAKE_LLAMA_SIGTERM", "ignore")
        .build()
        .unwrap();
    let engine = Engine::launch(config).unwrap();
    let pid = engine.pid();
    // Before, SIGTERM and SIGKILL went to the empty group only, and the wait for the exit had no end:
    // the shutdown runs on its own thread so that a hang fails this test instead of stalling it.
    let (done, finished) = mpsc::channel();
    std::thread::spawn(move || done.send(engine.shutdown()).unwrap());
    let report = finished
        .recv_timeout(Duration::from_secs(30))
        .expect("shutdown ended")
        .unwrap();
    assert_eq!(report.escalation, Escalation::Kill);
    assert!(report.left_running.is_empty(), "{report:?}");
    assert_gone(pid);
    h.assert_clean();
}

#[test]
fn a_failed_start_waits_for_vram_like_a_normal_stop() {
    let h = Harness::new();
    let log = h.shim_log();
    let config = h
        .config()
        .env("FAKE_LLAMA_EXIT_DURING_LOAD", "1")
        .env("FAKE_LLAMA_EXIT_MESSAGE", "CUDA error: out of memory")
        .build()
        .unwrap();
    let err = Engine::launch(config).unwrap_err();
    assert!(err.to_string().contains("out of memory"), "{err}");
    // The check, the check under the lock, and at least one recovery reading after the failed start
    // (before: the lock went at once, after the first two).
    let calls = std::fs::read_to_string(&log).unwrap().lines().count();
    assert!(calls >= 3, "nvidia-smi ran {calls} times");
    h.assert_clean();
}

#[test]
fn vram_is_checked_again_once_the_lock_is_held() {
    let h = Harness::new();
    let free = h.dir.path().join("free-mib");
    std::fs::write(&free, "79000").unwrap();
    let config = h
        .config()
        .nvidia_smi(h.shim(&[("NVSMI_FREE_FILE", free.to_str().unwrap())]))
        .build()
        .unwrap();
    // Another holder has the GPU; our check passes meanwhile.
    let other = engine_core::gpu_lock(h.gpu, Wait::Forever).unwrap();
    let checked = Engine::new(config).check_vram(Wait::Forever).unwrap();
    let (tx, rx) = mpsc::channel();
    let waiter = std::thread::spawn(move || {
        tx.send(()).unwrap();
        checked.lock_gpu(Wait::Forever)
    });
    rx.recv().unwrap();
    // The other holder fills the GPU, then lets go.
    std::fs::write(&free, "500").unwrap();
    drop(other);
    let err = waiter.join().unwrap().unwrap_err();
    assert!(matches!(&err, LockError::VramUnderLock(_)), "{err:?}");
    assert!(
        err.to_string()
            .contains("after taking the GPU lock: Only 500 MiB free VRAM"),
        "{err}"
    );
    assert!(h.spawned_pids().is_empty(), "no server started");
    h.assert_clean();
}

#[test]
fn the_server_sees_only_the_gpu_the_engine_locked() {
    let h = Harness::new();
    let engine = Engine::launch(h.config().build().unwrap()).unwrap();
    assert_eq!(engine.gpu(), h.gpu);
    assert_eq!(engine.vram().uuid, tests::shim_uuid(h.gpu));
    drop(engine);
    let spawned = &h.server_events()[0];
    assert_eq!(spawned["cuda_visible_devices"], tests::shim_uuid(h.gpu));
    h.assert_clean();
}

#[test]
fn a_gpu_can_be_named_by_its_uuid() {
    let h = Harness::new();
    let uuid: GpuId = tests::shim_uuid(h.gpu).parse().unwrap();
    let engine = Engine::launch(h.config().gpu(uuid).build().unwrap()).unwrap();
    assert_eq!(engine.gpu(), h.gpu, "the lock is on that GPU's index");
    drop(engine);
    h.assert_clean();
}

#[test]
fn eight_slots_each_get_the_whole_context_per_slot() {
    let h = Harness::new();
    let engine = Engine::launch(h.config().slots(8).build().unwrap()).unwrap();
    let frames: Vec<KeyframeRecord> = (0..16)
        .map(|i| {
            KeyframeRecord::new(
                h.jpeg(&format!("f{i}.jpg"), 32, 32, [i as u8, 0, 0]),
                0.0,
                "t",
            )
        })
        .collect();
    // Before: -c 2048 -np 8 left 256 tokens a slot and every answer was cut off.
    let results = engine
        .describe_many(&frames, 8, |_, _| std::ops::ControlFlow::Continue(()))
        .results;
    for result in &results {
        assert!(result.is_ok(), "{result:?}");
    }
    drop(engine);
    h.assert_clean();
}

#[test]
fn a_full_context_is_reported_with_the_fix_and_not_retried() {
    let h = Harness::new();
    // 230 tokens a slot: the fake's prompt (200) fits, its answer does not.
    let engine = Engine::launch(h.config().ctx_size(230).build().unwrap()).unwrap();
    let err = engine
        .describe(&KeyframeRecord::new(
            h.jpeg("f.jpg", 32, 32, [1, 2, 3]),
            0.0,
            "t",
        ))
        .unwrap_err();
    assert!(
        matches!(err, RequestError::ContextExhausted { .. }),
        "{err:?}"
    );
    let text = err.to_string();
    assert!(text.contains("context ran out after 230 tokens"), "{text}");
    assert!(text.contains("raise the context per slot"), "{text}");
    let requests = h
        .server_events()
        .iter()
        .filter(|e| e["event"] == "request_start")
        .count();
    assert_eq!(requests, 1, "a failure that cannot change is not retried");
    drop(engine);
    h.assert_clean();
}

#[test]
fn a_squatter_that_enforces_no_key_is_not_our_server() {
    let h = Harness::new();
    let err =
        Engine::launch(h.config().env("FAKE_LLAMA_NO_KEY", "1").build().unwrap()).unwrap_err();
    let text = err.to_string();
    assert!(
        matches!(&err, EngineError::Start(StartError::PortInUse { .. })),
        "{err:?}"
    );
    assert!(text.contains("without an API key"), "{text}");
    h.assert_clean();
}

#[test]
fn the_api_key_never_appears_in_debug_output() {
    let h = Harness::new();
    let engine = Engine::launch(h.config().build().unwrap()).unwrap();
    let shown = format!("{engine:?}");
    assert!(!shown.contains(engine.api_key()), "{shown}");
    assert!(shown.contains("<redacted>"));
    drop(engine);
    h.assert_clean();
}

#[test]
fn the_debug_log_is_private_and_never_followed_through_a_symlink() {
    use std::os::unix::fs::PermissionsExt;
    let h = Harness::new();
    let log = h.dir.path().join("llama-server.log");
    let elsewhere = h.dir.path().join("elsewhere.txt");
    std::fs::write(&elsewhere, "keep me").unwrap();
    std::os::unix::fs::symlink(&elsewhere, &log).unwrap();
    let err = Engine::launch(h.config().debug(true).build().unwrap()).unwrap_err();
    assert!(err.to_string().contains("never a symlink"), "{err}");
    assert_eq!(std::fs::read_to_string(&elsewhere).unwrap(), "keep me");
    assert!(h.spawned_pids().is_empty());
    // A plain (even pre-existing, world-readable) log ends up readable by its owner only.
    std::fs::remove_file(&log).unwrap();
    std::fs::write(&log, "old").unwrap();
    std::fs::set_permissions(&log, std::fs::Permissions::from_mode(0o644)).unwrap();
    drop(Engine::launch(h.config().debug(true).build().unwrap()).unwrap());
    let mode = std::fs::metadata(&log).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    h.assert_clean();
}

#[test]
fn frames_that_are_not_regular_files_say_so() {
    let h = Harness::new();
    let engine = Engine::launch(h.config().build().unwrap()).unwrap();
    let fifo = h.dir.path().join("frame.jpg");
    rustix::fs::mknodat(
        rustix::fs::CWD,
        &fifo,
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o600),
        0,
    )
    .unwrap();
    for path in [fifo.as_path(), std::path::Path::new("/dev/zero")] {
        let err = engine
            .describe(&KeyframeRecord::new(path, 0.0, "t"))
            .unwrap_err();
        assert!(err.to_string().contains("not a regular file"), "{err}");
    }
    assert!(alive(engine.pid()));
    drop(engine);
    h.assert_clean();
}
