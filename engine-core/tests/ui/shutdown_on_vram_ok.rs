// shutdown() stops a server; an engine that never started one has nothing to shut down.
use engine_core::{Engine, EngineConfig};

fn main() {
    let engine = Engine::new(EngineConfig::new("m.gguf", "p.gguf")).check_vram().unwrap();
    let _ = engine.shutdown();
}
