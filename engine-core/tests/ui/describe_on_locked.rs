// describe() needs a healthy server: a locked engine has none yet.
use engine_core::{Engine, EngineConfig, KeyframeRecord};

fn main() {
    let engine = Engine::new(EngineConfig::builder("m.gguf", "p.gguf").build().unwrap())
        .check_vram()
        .unwrap()
        .lock()
        .unwrap();
    let _ = engine.describe(&KeyframeRecord::new("f.jpg", 0.0, "test"));
    let _ = engine.pid();
}
