//! The server room: our llama-server child, spawned with CineCut's flags on a free port, proven
//! ready and ours, talked to over HTTP with its own API key, and stopped.

mod client;
mod command;
mod error;
mod log;
mod offers;
mod port;
mod ready;
mod running;

pub(crate) use client::Client;
pub(crate) use command::{ServerSpec, check_extra_args, check_model_files, find_program};
pub use error::{ServerDeath, StartError};
pub(crate) use running::Server;
