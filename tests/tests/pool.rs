//! `EnginePool` against the fake server and the shim: one engine per GPU, work to whichever GPU has
//! a free slot, a death handed over to the others, GPUs left out with the reason, everything released.

use std::ops::ControlFlow;
use std::sync::atomic::AtomicBool;

use engine_core::{
    EngineConfigBuilder, EngineError, EnginePool, InferenceError, KeyframeRecord, LockError,
    VramError, WhenLocked,
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
    EnginePool::launch(configs, when, &AtomicBool::new(false)).unwrap()
}

fn go_on<T>(_: usize, _: &Result<T, InferenceError>) -> ControlFlow<()> {
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
    assert!(done.deaths.is_empty());
    assert_eq!(done.answered.iter().map(|(_, n)| n).sum::<usize>(), 40);
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
    let count = |gpu: u32| done.answered.iter().find(|(g, _)| *g == gpu).unwrap().1;
    assert!(
        count(fast) > 2 * count(slow),
        "no static split: the fast GPU answers most ({:?})",
        done.answered
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
    assert_eq!(done.deaths.len(), 1, "{:?}", done.deaths);
    assert_eq!(done.deaths[0].gpu, dying);
    assert!(done.deaths[0].handed_over >= 1);
    assert!(
        done.deaths[0].error.contains("signal 6"),
        "{:?}",
        done.deaths
    );
    let stops = pool.shutdown();
    let dead_stop = stops.iter().find(|(g, _)| *g == dying).unwrap();
    assert!(matches!(
        dead_stop.1,
        Err(InferenceError::ServerDied { .. })
    ));
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
    for result in done.results.iter().filter(|r| r.is_err()) {
        let err = result.as_ref().unwrap_err();
        assert!(
            matches!(err, InferenceError::PoolExhausted { .. })
                && err.to_string().contains("every server of the pool died"),
            "{err}"
        );
    }
    assert_eq!(done.deaths.len(), 2);
    drop(pool);
    two.assert_clean();
}

#[test]
fn busy_or_full_gpus_are_left_out_with_the_reason_and_the_rest_runs() {
    let two = TwoGpus::new();
    let [free, busy] = two.gpus();
    let holder = engine_core::gpu_lock(busy).unwrap();
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
        &AtomicBool::new(false),
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
    let holder = engine_core::gpu_lock(busy).unwrap();
    let cancel = AtomicBool::new(false);
    let err = std::thread::scope(|scope| {
        let launching = scope
            .spawn(|| EnginePool::launch(two.configs(two.h.config()), WhenLocked::Wait, &cancel));
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
                | EngineError::Inference(InferenceError::StartCancelled)
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
            .contains("already in this pool"),
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
    assert_eq!(engine_core::lock::is_locked(gpu), Some(false));
    let guard = engine_core::gpu_lock(gpu).unwrap();
    assert_eq!(engine_core::lock::is_locked(gpu), Some(true));
    drop(guard);
    // While it is asked about in a loop, a try-lock never fails on a free lock.
    let asking = AtomicBool::new(true);
    std::thread::scope(|scope| {
        scope.spawn(|| {
            while asking.load(std::sync::atomic::Ordering::Acquire) {
                assert!(engine_core::lock::is_locked(gpu).is_some());
            }
        });
        for _ in 0..200 {
            let taken = engine_core::try_gpu_lock_for(gpu, std::time::Duration::ZERO);
            assert!(taken.is_ok(), "{taken:?}");
            drop(taken);
        }
        asking.store(false, std::sync::atomic::Ordering::Release);
    });
}
