// lock_gpu() exists only on Engine<VramOk>: the VRAM check comes first.
use engine_core::{Engine, EngineConfig, Wait};

fn main() {
    let engine = Engine::new(EngineConfig::builder("m.gguf", "p.gguf").build().unwrap());
    let _ = engine.lock_gpu(Wait::Forever);
}
