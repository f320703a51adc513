//! Soak: many start/stop cycles against the fake server must leak no process, file descriptor or
//! thread. Ignored by default (it takes a while); `cargo xtask ci` runs it as its own step.
//! `SOAK_CYCLES` sets the count (default 1000).

use std::time::{Duration, Instant};

use engine_core::Engine;
use tests::{Harness, alive};

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

fn threads() -> usize {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

#[test]
#[ignore = "slow: run by `cargo xtask ci` as the soak step"]
fn start_stop_cycles_leak_nothing() {
    let cycles: usize = std::env::var("SOAK_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let h = Harness::new();
    let config = h.config().env("FAKE_LLAMA_LOAD_MS", "0");
    // One warm-up cycle, so that lazily created process-wide state is not counted as a leak.
    Engine::launch(config.clone().build().unwrap())
        .unwrap()
        .shutdown()
        .unwrap();
    let (fds, thread_count) = (open_fds(), threads());
    let started = Instant::now();
    for _ in 0..cycles {
        Engine::launch(config.clone().build().unwrap())
            .unwrap()
            .shutdown()
            .unwrap();
    }
    let per_cycle = started.elapsed() / cycles as u32;
    let pids = h.spawned_pids();
    assert_eq!(pids.len(), cycles + 1);
    assert!(
        pids.iter().all(|&pid| !alive(pid)),
        "a server outlived its engine"
    );
    assert_eq!(open_fds(), fds, "file descriptors leaked");
    // A thread that was just joined can linger in /proc for a moment, so allow one in flight; a leak
    // would show as one or more per cycle, in the hundreds here.
    let after = threads();
    assert!(
        after <= thread_count + 1,
        "threads leaked: {thread_count} before, {after} after"
    );
    h.assert_clean();
    println!(
        "soak: {cycles} start/stop cycles, {:.1} ms per cycle, {fds} fds and {thread_count} threads before and after",
        per_cycle.as_secs_f64() * 1000.0
    );
    assert!(
        per_cycle < Duration::from_secs(5),
        "a cycle should take far less than a stop grace"
    );
}
