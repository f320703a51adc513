// shutdown() stops a server; an engine that never started one has nothing to shut down.
use engine_core::{Engine, EngineConfig, Wait};

fn main() {
    let engine = Engine::new(EngineConfig::builder("m.gguf", "p.gguf").build().unwrap()).check_vram(Wait::Forever).unwrap();
    let _ = engine.shutdown();
}
