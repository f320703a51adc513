//! The process room: a supervised child and its whole tree (`SupervisedChild`, under a keeper),
//! its output drained into bounded rings, what `/proc` says about the tree, and how a child ended.
//! This room is the only code of the engine that sends a signal.

mod exit;
mod keeper;
mod output;
mod procfs;
mod supervisor;

pub use exit::{ChildExit, Escalation, Leftover};

pub(crate) use exit::Stopped;
pub(crate) use supervisor::{Scope, SupervisedChild};

/// The environment variable that marks every process of a supervised tree (value: random, per child).
pub const TREE_MARKER: &str = "CINECUT_ENGINE_TREE";
