//! `EnginePool` against the fake server and the shim: one engine per GPU, work to whichever GPU has
//! a free slot, a death handed over to the others, GPUs left out with the reason, everything released.

use std::ops::ControlFlow;
use std::sync::atomic::AtomicBool;

use engine_core::config::EngineConfigBuilder;
use engine_core::gpu::LockError;
use engine_core::pool::WhenLocked;
use engine_core::{
    EngineError, EnginePool, KeyframeRecord, RequestError, StartError, VramError, Wait,
};
use tests::Harness;

/// Two harnesses: the first's scratch folder and fake, and a GPU index each (so locks never clash
/// with other tests).
struct TwoGpus {
    h: Harness,
    other: Harness,
}

impl TwoGpus {
    fn new() -> Self {
        TwoGpus {
            h: Harness::new(),
            other: Harness::new(),
        }
    }
    fn gpus(&self) -> [u32; 2] {
        [self.h.gpu, self.other.gpu]
    }
    fn configs(&self, base: EngineConfigBuilder) -> Vec<engine_core::EngineConfig> {
        self.gpus()
            .iter()
            .map(|&g| base.clone().gpu(g).build().unwrap())
            .collect()
    }
    fn frames(&self, n: usize) -> Vec<KeyframeRecord> {
        (0..n)
            .map(|i| {
                let path = self.h.jpeg(
                    &format!("kf/frame_{:010}.jpg", i * 40),
                    24,
                    16,
                    [i as u8, 9, 9],
                );
                KeyframeRecord::new(path, i as f64 * 0.04, "pool")
            })
            .collect()
    }
    fn assert_clean(&self) {
        self.h.assert_clean();
        tests::assert_lock_free(self.other.gpu);
    }
}

fn launch(configs: Vec<engine_core::EngineConfig>, when: WhenLocked) -> EnginePool {
    EnginePool::launch(configs, when, Wait::Forever).unwrap()
}

fn go_on<T>(_: usize, _: &Result<T, RequestError>) -> ControlFlow<()> {
    ControlFlow::Continue(())
}

#[test]
fn every_gpu_serves_and_results_come_back_in_input_order() {
    let two = TwoGpus::new();
    let pool = launch(two.configs(two.h.config().slots(2)), WhenLocked::Wait);
    assert_eq!(pool.slots(), 4);
    let frames = two.frames(40);
    let done = pool.describe_many(&frames, go_on);
    assert_eq!(done.results.len(), 40);
    for (frame, result) in frames.iter().zip(&done.results) {
        let scene = result.as_ref().unwrap();
        // The fake describes the image it got: its width is in the description.
        assert!(
            scene.visual_content.contains("24x16"),
            "{frame:?}: {scene:?}"
        );
    }
    assert!(done.servers.iter().all(|s| s.died.is_none()));
    assert_eq!(done.servers.iter().map(|s| s.answered).sum::<usize>(), 40);
    // Each server was shown only its own GPU.
    let shown: Vec<String> = two
        .h
        .server_events()
        .iter()
        .filter(|e| e["event"] == "spawned")
        .map(|e| e["cuda_visible_devices"].as_str().unwrap().to_string())
        .collect();
    let mut expected: Vec<String> = two.gpus().iter().map(|&g| tests::shim_uuid(g)).collect();
    let mut shown_sorted = shown.clone();
    shown_sorted.sort();
    expected.sort();
    assert_eq!(shown_sorted, expected);
    let stops = pool.shutdown();
    assert!(stops.iter().all(|(_, stop)| stop.is_ok()), "{stops:?}");
    two.assert_clean();
}

#[test]
fn the_faster_gpu_takes_more_of_the_work() {
    let two = TwoGpus::new();
    let [slow, fast] = two.gpus();
    let latency = format!("60@{},1@{}", tests::shim_uuid(slow), tests::shim_uuid(fast));
    let pool = launch(
        two.configs(two.h.config().env("FAKE_LLAMA_LATENCY_MS", &latency)),
        WhenLocked::Wait,
    );
    let done = pool.describe_many(&two.frames(30), go_on);
    assert!(done.results.iter().all(Result::is_ok));
    let count = |gpu: u32| done.servers.iter().find(|s| s.gpu == gpu).unwrap().answered;
    assert!(
        count(fast) > 2 * count(slow),
        "no static split: the fast GPU answers most ({:?})",
        done.servers
    );
    drop(pool);
    two.assert_clean();
}

#[test]
fn a_server_that_dies_hands_its_items_to_the_others() {
    let two = TwoGpus::new();
    let [dying, _] = two.gpus();
    let crash = format!("3@{}", tests::shim_uuid(dying));
    let pool = launch(
        two.configs(
            two.h
                .config()
                .slots(2)
                .env("FAKE_LLAMA_CRASH_AFTER", &crash),
        ),
        WhenLocked::Wait,
    );
    let done = pool.describe_many(&two.frames(24), go_on);
    for result in &done.results {
        assert!(result.is_ok(), "{result:?}");
    }
    let died: Vec<_> = done.servers.iter().filter(|s| s.died.is_some()).collect();
    assert_eq!(died.len(), 1, "{died:?}");
    assert_eq!(died[0].gpu, dying);
    assert!(died[0].handed_over >= 1);
    assert_eq!(
        died[0].died.as_ref().unwrap().status,
        engine_core::process::ChildExit::Signal(6),
        "{died:?}"
    );
    let stops = pool.shutdown();
    let dead_stop = stops.iter().find(|(g, _)| *g == dying).unwrap();
    assert!(matches!(dead_stop.1, Err(RequestError::ServerDied { .. })));
    two.assert_clean();
}

#[test]
fn when_every_server_dies_the_rest_fail_naming_the_last_death() {
    let two = TwoGpus::new();
    let pool = launch(
        two.configs(two.h.config().env("FAKE_LLAMA_CRASH_AFTER", "2")),
        WhenLocked::Wait,
    );
    let done = pool.describe_many(&two.frames(12), go_on);
    let ok = done.results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(ok, 4, "two answers from each server before it died");
    // The item in flight when the last server died ends with that death; the rest were never sent.
    let mut died_in_flight = 0;
    for result in done.results.iter().filter(|r| r.is_err()) {
        let err = result.as_ref().unwrap_err();
        match err {
            RequestError::ServerDied { .. } => died_in_flight += 1,
            RequestError::NoServerLeft { .. } => assert!(
                err.to_string().contains("every server died before it"),
                "{err}"
            ),
            other => panic!("{other}"),
        }
    }
    assert!(died_in_flight >= 1);
    assert_eq!(done.servers.iter().filter(|s| s.died.is_some()).count(), 2);
    drop(pool);
    two.assert_clean();
}

#[test]
fn busy_or_full_gpus_are_left_out_with_the_reason_and_the_rest_runs() {
    let two = TwoGpus::new();
    let [free, busy] = two.gpus();
    let holder = engine_core::gpu_lock(busy, Wait::Forever).unwrap();
    let pool = launch(two.configs(two.h.config()), WhenLocked::Skip);
    assert_eq!(pool.engines().len(), 1);
    assert_eq!(pool.engines()[0].gpu(), free);
    assert!(matches!(
        pool.left_out()[0].error,
        EngineError::Lock(LockError::Timeout { .. })
    ));
    assert!(
        pool.describe_many(&two.frames(3), go_on)
            .results
            .iter()
            .all(Result::is_ok)
    );
    drop(pool);
    drop(holder);

    // A GPU without the free VRAM, and then no GPU at all: the error lists each.
    let mut free_mib = vec!["79000"; tests::SHIM_GPUS as usize];
    free_mib[busy as usize] = "500";
    let shim = two.h.shim(&[("NVSMI_GPUS", &free_mib.join(","))]);
    let pool = launch(
        two.configs(two.h.config().nvidia_smi(&shim)),
        WhenLocked::Skip,
    );
    assert!(matches!(
        pool.left_out()[0].error,
        EngineError::Vram(VramError::Insufficient { free_mib: 500, .. })
    ));
    drop(pool);
    let err = EnginePool::launch(
        two.configs(two.h.config().min_vram_mib(100_000)),
        WhenLocked::Skip,
        Wait::Forever,
    )
    .unwrap_err();
    assert_eq!(err.failures.len(), 2);
    assert!(
        err.to_string().contains("no GPU of the pool started"),
        "{err}"
    );
    two.assert_clean();
}

#[test]
fn cancelling_a_wait_for_a_locked_gpu_releases_everything() {
    let two = TwoGpus::new();
    let [_, busy] = two.gpus();
    let holder = engine_core::gpu_lock(busy, Wait::Forever).unwrap();
    let cancel = AtomicBool::new(false);
    let err = std::thread::scope(|scope| {
        let launching = scope.spawn(|| {
            EnginePool::launch(
                two.configs(two.h.config()),
                WhenLocked::Wait,
                Wait::Until(&cancel),
            )
        });
        // The free GPU's server comes up while the other waits for its lock.
        two.h.wait_for_event("ready");
        cancel.store(true, std::sync::atomic::Ordering::Release);
        launching.join().unwrap()
    });
    // The locked GPU's wait is cancelled. The free GPU's start may have finished first (the pool
    // then runs without the other) or been cancelled too: either way, nothing else.
    let cancelled = |e: &EngineError| {
        matches!(
            e,
            EngineError::Lock(LockError::Cancelled { .. })
                | EngineError::Start(StartError::Cancelled)
        )
    };
    match err {
        Ok(pool) => {
            assert_eq!(pool.engines().len(), 1);
            assert!(matches!(
                pool.left_out()[0].error,
                EngineError::Lock(LockError::Cancelled { .. })
            ));
        }
        Err(e) => assert!(e.failures.iter().all(|f| cancelled(&f.error)), "{e:?}"),
    }
    drop(holder);
    two.assert_clean();
}

#[test]
fn a_gpu_named_twice_is_left_out_instead_of_waiting_for_itself() {
    let two = TwoGpus::new();
    let configs = vec![
        two.h.config().build().unwrap(),
        two.h
            .config()
            .gpu(engine_core::GpuId::Uuid(tests::shim_uuid(two.h.gpu)))
            .build()
            .unwrap(),
    ];
    let pool = launch(configs, WhenLocked::Wait);
    assert_eq!(pool.engines().len(), 1);
    assert!(
        pool.left_out()[0]
            .error
            .to_string()
            .contains("is named twice"),
        "{:?}",
        pool.left_out()
    );
    drop(pool);
    two.assert_clean();
}

#[test]
fn is_locked_reads_the_lock_without_taking_it() {
    let two = TwoGpus::new();
    let gpu = two.other.gpu;
    assert_eq!(engine_core::gpu::lockfile::is_locked(gpu), Some(false));
    let guard = engine_core::gpu_lock(gpu, Wait::Forever).unwrap();
    assert_eq!(engine_core::gpu::lockfile::is_locked(gpu), Some(true));
    drop(guard);
    // While it is asked about in a loop, a try-lock never fails on a free lock.
    let asking = AtomicBool::new(true);
    std::thread::scope(|scope| {
        scope.spawn(|| {
            while asking.load(std::sync::atomic::Ordering::Acquire) {
                assert!(engine_core::gpu::lockfile::is_locked(gpu).is_some());
            }
        });
        for _ in 0..200 {
            let taken = engine_core::gpu_lock(gpu, Wait::For(std::time::Duration::ZERO));
            assert!(taken.is_ok(), "{taken:?}");
            drop(taken);
        }
        asking.store(false, std::sync::atomic::Ordering::Release);
    });
}
