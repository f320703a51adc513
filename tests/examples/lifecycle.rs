//! The engine's full lifecycle against the built-in fake llama-server and nvidia-smi shim, printing
//! each step: `cargo run -p tests --example lifecycle`.
//!
//! With a real GPU and llama-server, the same steps run with `EngineConfig::builder(model, mmproj)` and
//! nothing else: the engine then finds `llama-server` and `nvidia-smi` on PATH.

use std::time::Instant;

use engine_core::{Engine, KeyframeRecord, Wait};
use tests::Harness;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let h = Harness::new();
    let config = h.config();
    println!("fake llama-server: {}", tests::fake_server().display());
    println!("nvidia-smi shim:   {}", tests::nvsmi_shim().display());

    let t = Instant::now();
    let engine = Engine::new(config.build().unwrap());
    println!(
        "Engine<Unchecked>  configured (GPU {})",
        engine.config().gpu()
    );
    let engine = engine.check_vram(Wait::Forever)?;
    println!(
        "Engine<VramOk>     {} MiB free on GPU {} (need {})     [{:?}]",
        engine.vram().free_mib,
        engine.vram().gpu,
        engine.config().min_vram_mib(),
        t.elapsed()
    );
    let engine = engine.lock_gpu(Wait::Forever)?;
    println!(
        "Engine<Locked>     GPU lock held                              [{:?}]",
        t.elapsed()
    );
    let engine = engine.start(Wait::Forever)?;
    println!(
        "Engine<Healthy>    llama-server pid {} at {}     [{:?}]",
        engine.pid(),
        engine.base_url(),
        t.elapsed()
    );

    let frames = [
        KeyframeRecord::new(
            h.jpeg("frame_0001.jpg", 640, 360, [200, 30, 30]),
            1.5,
            "scene-cut",
        ),
        KeyframeRecord::new(
            h.jpeg("frame_0002.jpg", 1280, 720, [20, 40, 180]),
            7.25,
            "scene-cut",
        ),
        KeyframeRecord::new(
            h.png("frame_0003.png", 320, 240, [10, 10, 10]),
            12.0,
            "subtitle",
        ),
    ];
    for frame in &frames {
        let scene = engine.describe(frame)?;
        println!(
            "  {} @ {:>5.2}s -> {}",
            frame.frame_path.file_name().unwrap().to_string_lossy(),
            frame.timestamp_s,
            serde_json::to_string(&scene)?
        );
    }

    let pid = engine.pid();
    let report = engine.shutdown()?;
    println!(
        "shutdown           pid {} {} after {:?} ({:?})",
        report.pid,
        report
            .status
            .map_or_else(|| "still running".to_string(), |s| s.to_string()),
        report.took,
        report.escalation
    );
    println!(
        "process gone: {}, GPU lock free: {}",
        !tests::alive(pid),
        engine_core::gpu_lock(h.gpu, Wait::For(std::time::Duration::ZERO)).is_ok()
    );
    Ok(())
}
