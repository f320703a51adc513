//! [`DescribeOptions`]: how every request is sent (retries, timeout, image size limit), and the
//! describe preset over the one request path (the scene schema, the default prompt, the frame as
//! the one image).

use std::path::Path;
use std::time::Duration;

use super::grammar::Constraint;
use super::prompt::{Prompt, check_sampling};
use super::scene::scene_schema;
use crate::setting::{ConfigError, Setting, Zero, check_duration};

/// The default prompt: what a film trailer editor needs from a keyframe.
pub const DEFAULT_PROMPT: &str = "You are helping a film trailer editor choose shots. Describe this \
keyframe as JSON with four short fields: visual_content (what is visible), mood (the emotional \
tone), action (what is happening), setting (where and when it takes place).";

/// How the engine asks llama-server for descriptions (prompt, temperature, max_tokens) and for every
/// answer (retries, request timeout, image size limit, which [`crate::Engine::complete`] uses too):
/// set with the chained setters, checked by [`crate::config::EngineConfigBuilder::build`].
///
/// ```
/// use std::time::Duration;
/// let options = engine_core::DescribeOptions::default()
///     .retries(0)
///     .request_timeout(Duration::from_secs(30));
/// let config = engine_core::EngineConfig::builder("m.gguf", "p.gguf").describe_options(options).build()?;
/// # Ok::<(), engine_core::setting::ConfigError>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct DescribeOptions {
    /// The instruction sent with every frame.
    pub(crate) prompt: String,
    /// Sampling temperature; low keeps descriptions factual.
    pub(crate) temperature: f32,
    /// Upper bound on generated tokens per answer.
    pub(crate) max_tokens: u32,
    /// Further tries after an invalid answer (cut-off or schema-breaking output).
    pub(crate) retries: u32,
    /// Time limit for one request.
    pub(crate) request_timeout: Duration,
    /// Frames larger than this are refused before anything is sent.
    pub(crate) max_frame_bytes: u64,
    /// How each request holds the answer to its schema.
    pub(crate) constraint: Constraint,
}

impl Default for DescribeOptions {
    fn default() -> Self {
        DescribeOptions {
            prompt: DEFAULT_PROMPT.into(),
            temperature: 0.1,
            max_tokens: 512,
            retries: 2,
            request_timeout: Duration::from_secs(120),
            max_frame_bytes: 20 * 1024 * 1024,
            constraint: Constraint::Gbnf,
        }
    }
}

impl DescribeOptions {
    /// Sets the prompt.
    pub fn prompt(mut self, prompt: impl Into<String>) -> Self {
        self.prompt = prompt.into();
        self
    }
    /// Sets the temperature.
    pub fn temperature(mut self, temperature: f32) -> Self {
        self.temperature = temperature;
        self
    }
    /// Sets the token bound.
    pub fn max_tokens(mut self, max_tokens: u32) -> Self {
        self.max_tokens = max_tokens;
        self
    }
    /// Sets how many further tries follow an invalid answer.
    pub fn retries(mut self, retries: u32) -> Self {
        self.retries = retries;
        self
    }
    /// Sets the per-request time limit.
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }
    /// Sets the frame size limit.
    pub fn max_frame_bytes(mut self, bytes: u64) -> Self {
        self.max_frame_bytes = bytes;
        self
    }
    /// Sets how each request holds the answer to its schema (the engine's GBNF grammar by
    /// default: no output parse on the server; see [`Constraint`]).
    pub fn constraint(mut self, constraint: Constraint) -> Self {
        self.constraint = constraint;
        self
    }
    /// How each request holds the answer to its schema.
    pub fn constraint_of(&self) -> Constraint {
        self.constraint
    }

    /// The [`Prompt`] `describe` sends for `frame_path`: the scene schema, this prompt and sampling,
    /// the frame as the one image. Change it (a system message, a second image) and send it with
    /// [`crate::Engine::complete`].
    pub fn frame_prompt(&self, frame_path: &Path) -> Prompt {
        Prompt::new(scene_schema(), self.prompt.clone())
            .image(frame_path)
            .max_tokens(self.max_tokens)
            .temperature(self.temperature)
    }

    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        check_sampling(self.temperature, self.max_tokens)?;
        check_duration(Setting::RequestTimeout, self.request_timeout, Zero::Refused)
    }
}
