// start() exists only on Engine<Locked>: an unchecked engine cannot start a server.
use engine_core::{Engine, EngineConfig};

fn main() {
    let engine = Engine::new(EngineConfig::new("m.gguf", "p.gguf"));
    let _ = engine.start();
}
