// Each step consumes the engine: the earlier state cannot be used again.
use engine_core::{Engine, EngineConfig, Wait};

fn main() {
    let engine = Engine::new(EngineConfig::builder("m.gguf", "p.gguf").build().unwrap());
    let _checked = engine.check_vram(Wait::Forever);
    let _again = engine.check_vram(Wait::Forever);
}
