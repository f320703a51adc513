// describe() needs a healthy server: a locked engine has none yet.
use engine_core::{Engine, EngineConfig, KeyframeRecord, Wait};

fn main() {
    let engine = Engine::new(EngineConfig::builder("m.gguf", "p.gguf").build().unwrap())
        .check_vram(Wait::Forever)
        .unwrap()
        .lock_gpu(Wait::Forever)
        .unwrap();
    let _ = engine.describe(&KeyframeRecord::new("f.jpg", 0.0, "test"));
    let _ = engine.pid();
}
