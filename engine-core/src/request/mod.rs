//! The request room: what a request is ([`Prompt`] under a [`Schema`]; the scene preset), how it is
//! checked, built and sent, and how its answer is read and validated. `describe` and `complete`
//! both go through the one path here.

mod answer;
mod body;
mod error;
mod grammar;
mod image;
mod options;
mod prompt;
mod scene;
mod schema;
mod send;

#[cfg(test)]
mod http_tests;

pub use answer::{Answer, Usage, parse_chat_response, strip_code_fence};
pub use error::RequestError;
pub use grammar::Constraint;
pub use options::{DEFAULT_PROMPT, DescribeOptions};
pub use prompt::{Prompt, Subject, check_sampling};
pub use scene::{
    KeyframeRecord, SCENE_DESCRIPTION_SCHEMA, SceneDescription, validate_scene_description,
};
pub use schema::{Schema, SchemaError, SchemaViolation};

pub(crate) use send::{Modality, Transport, complete};
