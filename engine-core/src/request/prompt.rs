//! [`Prompt`]: one schema-constrained request (instructions, text, images, sampling), and
//! [`Subject`], what an error names it by.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use super::schema::Schema;
use crate::setting::{ConfigError, Setting};

/// One request for a schema-constrained answer: what [`crate::Engine::complete`] sends.
///
/// ```
/// use engine_core::{Prompt, Schema};
/// use serde_json::json;
///
/// let schema = Schema::new("anchors", json!({"type": "object"}))?;
/// let prompt = Prompt::new(&schema, "00:01:02 She opens the door.")
///     .system("Find the story's structural anchors.")
///     .max_tokens(128)
///     .temperature(0.1)
///     .id("chunk-7");
/// assert_eq!(prompt.subject().to_string(), "request chunk-7");
/// # Ok::<(), engine_core::error::SchemaError>(())
/// ```
#[derive(Debug, Clone)]
pub struct Prompt {
    pub(crate) schema: Schema,
    pub(crate) system: Option<String>,
    pub(crate) text: String,
    pub(crate) images: Vec<PathBuf>,
    pub(crate) max_tokens: u32,
    pub(crate) temperature: f32,
    pub(crate) id: Option<String>,
    /// The whole answer's time limit, every attempt included.
    pub(crate) timeout: Option<Duration>,
}

impl Prompt {
    /// A prompt of `text` whose answer must match `schema`; 128 tokens at most, temperature 0.1
    /// (CineCut's text stage), no system message, no images.
    pub fn new(schema: &Schema, text: impl Into<String>) -> Prompt {
        Prompt {
            schema: schema.clone(),
            system: None,
            text: text.into(),
            images: Vec::new(),
            max_tokens: 128,
            temperature: 0.1,
            id: None,
            timeout: None,
        }
    }
    /// Sets the system message.
    pub fn system(mut self, system: impl Into<String>) -> Self {
        self.system = Some(system.into());
        self
    }
    /// Adds an image (JPEG or PNG, checked before sending); needs an engine with an mmproj.
    pub fn image(mut self, path: impl Into<PathBuf>) -> Self {
        self.images.push(path.into());
        self
    }
    /// Sets the bound on generated tokens (at least 1).
    pub fn max_tokens(mut self, max_tokens: u32) -> Self {
        self.max_tokens = max_tokens;
        self
    }
    /// Sets the sampling temperature (0 to 2).
    pub fn temperature(mut self, temperature: f32) -> Self {
        self.temperature = temperature;
        self
    }
    /// Names the request in errors (else its first image, else the start of its text).
    pub fn id(mut self, id: impl Into<String>) -> Self {
        self.id = Some(id.into());
        self
    }
    /// Bounds the whole answer, every attempt included: when it runs out, the request in flight is
    /// abandoned (the server stops generating for it) and the answer is
    /// [`RequestError::Timeout`](crate::RequestError::Timeout). Without it, each attempt gets the
    /// engine's `request_timeout`.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// The schema.
    pub fn schema(&self) -> &Schema {
        &self.schema
    }
    /// The images, in order.
    pub fn images(&self) -> &[PathBuf] {
        &self.images
    }

    /// What errors about this request name.
    pub fn subject(&self) -> Subject {
        match (&self.id, self.images.first()) {
            (Some(id), _) => Subject::Request(id.clone()),
            (None, Some(image)) => Subject::Frame(image.clone()),
            (None, None) => {
                Subject::Request(format!("{:?}", crate::util::truncate(&self.text, 40)))
            }
        }
    }

    /// Checks the sampling values; the message names the value and its range.
    pub(crate) fn check(&self) -> Result<(), String> {
        check_sampling(self.temperature, self.max_tokens)
            .map_err(|e| format!("{} {}", e.setting, e.reason))?;
        if self.text.is_empty() && self.images.is_empty() {
            return Err("the prompt has neither text nor images: give at least one".into());
        }
        if let Some(timeout) = self.timeout {
            crate::setting::check_duration(
                Setting::RequestTimeout,
                timeout,
                crate::setting::Zero::Refused,
            )
            .map_err(|e| format!("{} {}", e.setting, e.reason))?;
        }
        Ok(())
    }
}

/// The sampling rules every request shares: a temperature llama-server accepts (0 to 2, so no NaN
/// or infinity) and room for an answer. A prompt, `describe`'s options and every front end's flags
/// are checked by this one function.
///
/// ```
/// use engine_core::request::check_sampling;
/// assert!(check_sampling(0.1, 128).is_ok());
/// assert!(check_sampling(f32::NAN, 128).unwrap_err().to_string().contains("`temperature`"));
/// assert!(check_sampling(0.1, 0).unwrap_err().to_string().contains("`max_tokens`"));
/// ```
pub fn check_sampling(temperature: f32, max_tokens: u32) -> Result<(), ConfigError> {
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ConfigError::new(
            Setting::Temperature,
            format!("is {temperature}: it must be between 0 and 2"),
        ));
    }
    if max_tokens == 0 {
        return Err(ConfigError::new(
            Setting::MaxTokens,
            "is 0: it must be at least 1",
        ));
    }
    Ok(())
}

/// What a request error is about: a keyframe (by its path) or a request (by its id or text).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Subject {
    /// A keyframe, by its file.
    Frame(PathBuf),
    /// A request, by its id or the start of its text.
    Request(String),
}

impl fmt::Display for Subject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Subject::Frame(path) => write!(f, "frame {}", path.display()),
            Subject::Request(id) => write!(f, "request {id}"),
        }
    }
}
