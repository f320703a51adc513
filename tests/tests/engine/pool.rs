//! A launch over several GPUs against the fake server and the shim: one or more servers per GPU,
//! work to whichever server has a free slot, a death handed over to the others, GPUs left out with
//! the reason, everything released.

use std::ops::ControlFlow;
use std::sync::atomic::AtomicBool;

use engine_core::config::{Count, EngineConfigBuilder};
use engine_core::gpu::LockError;
use engine_core::launch::Gpus;
use engine_core::{
    CancellationToken, EngineError, EnginePool, KeyframeRecord, Launch, RequestError, VramError,
    Wait,
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
    /// A launch of `base` on both GPUs, by index.
    fn launch(&self, base: EngineConfigBuilder) -> Launch {
        let gpus = self.gpus().iter().map(|&g| g.into()).collect();
        Launch::new(base.build().unwrap()).gpus(Gpus::List(gpus))
    }
    /// A launch of `base` on every GPU of a machine whose GPUs are these two (`--gpus all`).
    fn launch_all(&self, base: EngineConfigBuilder, knobs: &[(&str, &str)]) -> Launch {
        let only = format!("{},{}", self.h.gpu, self.other.gpu);
        let mut knobs = knobs.to_vec();
        knobs.push(("NVSMI_ONLY", &only));
        let shim = self.h.shim(&knobs);
        Launch::new(base.nvidia_smi(shim).build().unwrap()).gpus(Gpus::All)
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

fn start(launch: Launch) -> Result<EnginePool, EngineError> {
    let never = CancellationToken::new();
    launch.plan(&never)?.start(&never, &|_| {})
}

fn go_on<T>(_: usize, _: &Result<T, RequestError>) -> ControlFlow<()> {
    ControlFlow::Continue(())
}

#[test]
fn every_gpu_serves_and_results_come_back_in_input_order() {
    let two = TwoGpus::new();
    let pool = start(two.launch(two.h.config().slots(2))).unwrap();
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
    let pool = start(two.launch(two.h.config().env("FAKE_LLAMA_LATENCY_MS", &latency))).unwrap();
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
    let [dying, healthy] = two.gpus();
    let crash = format!("3@{}", tests::shim_uuid(dying));
    // The healthy server's answers wait for the crash, so it cannot take every item first.
    let hold = format!("20000@{}", tests::shim_uuid(healthy));
    let pool = start(
        two.launch(
            two.h
                .config()
                .slots(2)
                .env("FAKE_LLAMA_CRASH_AFTER", &crash)
                .env(
                    "FAKE_LLAMA_CRASH_CLAIM",
                    two.h.dir.path().join("crash-claim"),
                )
                .env("FAKE_LLAMA_HOLD_UNTIL_CRASH_MS", &hold),
        ),
    )
    .unwrap();
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
    let pool = start(two.launch(two.h.config().env("FAKE_LLAMA_CRASH_AFTER", "2"))).unwrap();
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
    let pool = start(two.launch_all(two.h.config(), &[])).unwrap();
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

    // A GPU without the free VRAM is left out at the plan; and then no GPU at all: the error lists
    // each.
    let mut free_mib = vec!["79000"; tests::SHIM_GPUS as usize];
    free_mib[busy as usize] = "500";
    let free_mib = free_mib.join(",");
    let pool = start(two.launch_all(two.h.config(), &[("NVSMI_GPUS", &free_mib)])).unwrap();
    assert!(matches!(
        pool.left_out()[0].error,
        EngineError::Vram(VramError::Insufficient { free_mib: 500, .. })
    ));
    drop(pool);
    let err = start(two.launch_all(two.h.config().min_vram_mib(100_000), &[])).unwrap_err();
    let EngineError::Pool(pool) = &err else {
        panic!("{err}");
    };
    assert_eq!(pool.failures.len(), 2);
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
    let cancel = CancellationToken::new();
    let plan = two.launch(two.h.config()).plan(&cancel).unwrap();
    let started = std::thread::scope(|scope| {
        let starting = scope.spawn(|| plan.start(&cancel, &|_| {}));
        // The free GPU's server comes up while the other waits for its lock.
        two.h.wait_for_event("ready");
        cancel.cancel();
        starting.join().unwrap()
    });
    // The locked GPU's wait is cancelled. The free GPU's start may have finished first (the pool
    // then runs without the other) or been cancelled too: either way, nothing else.
    match started {
        Ok(pool) => {
            assert_eq!(pool.engines().len(), 1);
            assert!(matches!(
                pool.left_out()[0].error,
                EngineError::Lock(LockError::Cancelled { .. })
            ));
        }
        Err(e) => assert!(e.is_cancelled(), "{e:?}"),
    }
    drop(holder);
    two.assert_clean();
}

#[test]
fn a_gpu_named_twice_is_refused_before_anything_starts() {
    let two = TwoGpus::new();
    let twice = Gpus::List(vec![
        two.h.gpu.into(),
        engine_core::GpuId::Uuid(tests::shim_uuid(two.h.gpu)),
    ]);
    let launch = Launch::new(two.h.config().build().unwrap()).gpus(twice);
    let err = launch.plan(&CancellationToken::new()).unwrap_err();
    assert!(
        err.to_string()
            .contains(&format!("names GPU {} twice", two.h.gpu)),
        "{err}"
    );
    two.assert_clean();
}

#[test]
fn several_servers_per_gpu_share_its_slots_its_lock_and_its_frames() {
    let two = TwoGpus::new();
    let launch = two
        .launch(two.h.config().slots(6))
        .servers_per_gpu(Count::Fixed(3));
    let plan = launch.plan(&CancellationToken::new()).unwrap();
    assert!(
        plan.gpus()
            .iter()
            .all(|g| g.layout.servers == 3 && g.layout.slots == 6)
    );
    let pool = plan.start(&CancellationToken::new(), &|_| {}).unwrap();
    // Three servers a GPU, each with its share of the slots, each on a port of its own.
    assert_eq!(pool.engines().len(), 6);
    assert_eq!(pool.slots(), 12);
    let mut ports: Vec<u16> = pool.engines().iter().map(|e| e.port()).collect();
    ports.sort_unstable();
    ports.dedup();
    assert_eq!(ports.len(), 6);
    for gpu in two.gpus() {
        let on_gpu: Vec<_> = pool.engines().iter().filter(|e| e.gpu() == gpu).collect();
        assert_eq!(on_gpu.len(), 3);
        assert!(on_gpu.iter().all(|e| e.config().slots() == 2));
        // Pinned the same way: every server of a GPU sees that GPU alone.
        assert!(
            on_gpu
                .iter()
                .all(|e| e.vram().uuid == tests::shim_uuid(gpu))
        );
        // One lock for the GPU, held while any of its servers runs.
        assert_eq!(engine_core::gpu::lockfile::is_locked(gpu), Some(true));
    }
    let done = pool.answer_many::<serde_json::Value, _>(&[], go_on);
    assert!(done.results.is_empty());
    let frames = two.frames(36);
    let done = pool.describe_many(&frames, go_on);
    assert!(done.results.iter().all(Result::is_ok));
    assert_eq!(done.servers.len(), 6);
    assert!(
        done.servers.iter().all(|s| s.answered > 0),
        "{:?}",
        done.servers
    );
    let stops = pool.shutdown();
    assert_eq!(stops.len(), 6);
    assert!(stops.iter().all(|(_, stop)| stop.is_ok()), "{stops:?}");
    two.assert_clean();
}

#[test]
fn a_dying_server_hands_its_items_to_its_siblings_and_its_gpu_keeps_serving() {
    let two = TwoGpus::new();
    let gpu = two.h.gpu;
    // One of the GPU's two servers dies at its fourth request (the fake counts per server; the
    // claim file makes it one server only).
    let launch = Launch::new(
        two.h
            .config()
            .slots(4)
            .env("FAKE_LLAMA_CRASH_AFTER", "3")
            .env(
                "FAKE_LLAMA_CRASH_CLAIM",
                two.h.dir.path().join("crash-claim"),
            )
            .build()
            .unwrap(),
    )
    .servers_per_gpu(Count::Fixed(2));
    let pool = start(launch).unwrap();
    let done = pool.describe_many(&two.frames(30), go_on);
    for result in &done.results {
        assert!(result.is_ok(), "{result:?}");
    }
    let died: Vec<_> = done.servers.iter().filter(|s| s.died.is_some()).collect();
    assert_eq!(died.len(), 1, "{:?}", done.servers);
    assert_eq!(died[0].gpu, gpu);
    let sibling = done.servers.iter().find(|s| s.died.is_none()).unwrap();
    assert_eq!(sibling.gpu, gpu);
    assert_eq!(died[0].answered + sibling.answered, 30);
    // The GPU's lock stays held while the sibling serves, and goes once both are stopped.
    assert_eq!(engine_core::gpu::lockfile::is_locked(gpu), Some(true));
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
