// lock() exists only on Engine<VramOk>: the VRAM check comes first.
use engine_core::{Engine, EngineConfig};

fn main() {
    let engine = Engine::new(EngineConfig::new("m.gguf", "p.gguf"));
    let _ = engine.lock();
}
