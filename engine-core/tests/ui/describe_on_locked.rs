// describe() needs a healthy server: a locked engine has none yet.
use engine_core::{Engine, EngineConfig, KeyframeRecord};

fn main() {
    let engine = Engine::new(EngineConfig::new("m.gguf", "p.gguf"))
        .check_vram()
        .unwrap()
        .lock()
        .unwrap();
    let _ = engine.describe(&KeyframeRecord::new("f.jpg", 0.0, "test"));
    let _ = engine.pid();
}
