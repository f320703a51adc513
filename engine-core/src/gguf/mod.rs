//! GGUF, llama.cpp's model format: reading a file's header (what the engine checks before it starts
//! anything) and writing files (the models the project makes for itself).

use std::fmt;

pub(crate) mod read;
mod write;

/// GGUF's metadata value type ids, as the reader and the writer use them.
mod value_type {
    pub(super) const U32: u32 = 4;
    pub(super) const I32: u32 = 5;
    pub(super) const F32: u32 = 6;
    pub(super) const BOOL: u32 = 7;
    pub(super) const STRING: u32 = 8;
    pub(super) const ARRAY: u32 = 9;
    pub(super) const U64: u32 = 10;
    pub(super) const I64: u32 = 11;
    pub(super) const F64: u32 = 12;
}

pub use read::read_architecture;
pub use write::{Fill, Gguf, TensorType, Value};

pub(crate) use read::check_role;

/// Which of the two model files a message is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelRole {
    /// The language model (`-m`).
    Model,
    /// The vision projector (`--mmproj`).
    Mmproj,
}

impl fmt::Display for ModelRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ModelRole::Model => "model",
            ModelRole::Mmproj => "mmproj",
        })
    }
}
