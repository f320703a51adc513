//! `cinecut-infer`, the process a user runs, end to end against the fake llama-server and the
//! nvidia-smi shim. One test binary, a module per behaviour; every test that starts the CLI checks
//! that no server it started is left behind.

mod describe;
mod every_line;
mod gpus;
mod hostile_inputs;
mod report;
mod run;
mod scale_out_recipes;
mod shapes;
mod summary;
