// The states are sealed: code outside the crate cannot build one, or an engine in one.
use engine_core::typestate::{Healthy, Unchecked};
use engine_core::{Engine, EngineConfig};

fn forge(config: EngineConfig, state: Healthy) -> Engine<Healthy> {
    Engine { config, state }
}

fn main() {
    let _state = Unchecked { _private: () };
    let _ = forge;
}
