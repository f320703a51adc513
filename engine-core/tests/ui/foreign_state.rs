// Only the crate's four states are states: a type of the caller's cannot be one.
use engine_core::Engine;
use engine_core::typestate::State;

struct MyState;
impl State for MyState {}

fn main() {
    let _: Option<Engine<MyState>> = None;
}
