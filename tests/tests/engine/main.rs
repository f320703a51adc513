//! The library's behaviour, driven against the fake llama-server and the nvidia-smi shim: what an
//! embedding program gets from `engine-core`. One test binary, a module per behaviour; every test
//! ends by checking that no process it started is left and that its GPU lock can be taken again.

mod describe;
mod lifecycle;
mod pool;
mod schemas_and_swap;
mod server;
mod shapes;
mod supervision;
mod vram;
