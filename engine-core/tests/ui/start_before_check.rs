// start() exists only on Engine<Locked>: an unchecked engine cannot start a server.
use engine_core::{Engine, EngineConfig, Wait};

fn main() {
    let engine = Engine::new(EngineConfig::builder("m.gguf", "p.gguf").build().unwrap());
    let _ = engine.start(Wait::Forever);
}
