//! GGUF, llama.cpp's model format: reading a file's header (what the engine checks before it starts
//! anything) and writing files (the models the project makes for itself).

pub(crate) mod read;
mod write;

pub use read::read_architecture;
pub use write::{Fill, Gguf, TensorType, Value};

pub(crate) use read::check_role;
