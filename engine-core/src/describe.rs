//! Turning a keyframe into a [`SceneDescription`]: a preset over the engine's one request path
//! (the scene schema, the default prompt, the frame as the one image), and the request options.

use std::path::Path;
use std::time::Duration;

use crate::client::Client;
use crate::error::InferenceError;
use crate::prompt::Prompt;
use crate::request::{Unusable, complete, parse_answer, prepare};
use crate::scene::{KeyframeRecord, SceneDescription, scene_schema};

/// The default prompt: what a film trailer editor needs from a keyframe.
pub const DEFAULT_PROMPT: &str = "You are helping a film trailer editor choose shots. Describe this \
keyframe as JSON with four short fields: visual_content (what is visible), mood (the emotional \
tone), action (what is happening), setting (where and when it takes place).";

/// How the engine asks llama-server for descriptions (prompt, temperature, max_tokens) and for every
/// answer (retries, request timeout, image size limit, which [`crate::Engine::complete`] uses too):
/// set with the chained setters, checked by [`crate::EngineConfigBuilder::build`].
///
/// ```
/// use std::time::Duration;
/// let options = engine_core::DescribeOptions::default()
///     .retries(0)
///     .request_timeout(Duration::from_secs(30));
/// let config = engine_core::EngineConfig::builder("m.gguf", "p.gguf").describe_options(options).build()?;
/// # Ok::<(), engine_core::ConfigError>(())
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

    /// The exact `POST /v1/chat/completions` body the engine sends for `frame_path` (after the same
    /// checks `describe` makes): for debugging a server by hand, and for benchmarks.
    pub fn request_body(&self, frame_path: &Path) -> Result<Vec<u8>, InferenceError> {
        prepare(&self.frame_prompt(frame_path), self, true)
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

    pub(crate) fn validate(&self) -> Result<(), String> {
        crate::prompt::check_sampling(self.temperature, self.max_tokens)?;
        if self.request_timeout.is_zero() {
            return Err("request_timeout is zero: it must be more than zero".into());
        }
        Ok(())
    }
}

/// Removes a Markdown code fence (```` ```json ... ``` ````) around the JSON, which the real server's
/// schema grammar allows.
pub fn strip_code_fence(text: &str) -> &str {
    let trimmed = text.trim();
    let Some(rest) = trimmed.strip_prefix("```") else {
        return trimmed;
    };
    // Drop the info string ("json") up to the end of the first line.
    let body = match rest.find('\n') {
        Some(newline) => &rest[newline + 1..],
        None => rest.trim_start_matches(|c: char| c.is_ascii_alphabetic()),
    };
    body.trim_end().strip_suffix("```").unwrap_or(body).trim()
}

/// Parses a chat-completion response body into a validated description. The error says why the
/// answer is unusable, with the raw text (truncated).
pub fn parse_chat_response(body: &str) -> Result<SceneDescription, String> {
    let value =
        parse_answer(body, u32::MAX, scene_schema()).map_err(|unusable| match unusable {
            Unusable::Invalid(reason) | Unusable::ContextFull(reason) => reason,
        })?;
    serde_json::from_value(value).map_err(|e| e.to_string())
}

/// Describes one frame through `client`: the preset prompt through the one request path.
pub(crate) fn describe_frame(
    client: &Client,
    options: &DescribeOptions,
    frame: &KeyframeRecord,
    death: &dyn Fn(Duration) -> Option<InferenceError>,
) -> Result<SceneDescription, InferenceError> {
    complete(
        client,
        options,
        true,
        &options.frame_prompt(&frame.frame_path),
        death,
    )
}

#[cfg(test)]
mod http_tests;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::tests::response;
    use crate::scene::SCENE_DESCRIPTION_SCHEMA;
    use proptest::prelude::*;
    use serde_json::{Value, json};

    const VALID: &str = r#"{"visual_content":"a","mood":"b","action":"c","setting":"d"}"#;

    #[test]
    fn fence_is_stripped() {
        assert_eq!(strip_code_fence(&format!("```json\n{VALID}\n```")), VALID);
        assert_eq!(strip_code_fence(&format!("```\n{VALID}```")), VALID);
        assert_eq!(strip_code_fence(&format!("  {VALID} ")), VALID);
        assert!(parse_chat_response(&response(&format!("```json\n{VALID}\n```"), "stop")).is_ok());
    }

    #[test]
    fn each_kind_of_bad_answer_names_its_cause() {
        let cases = [
            ("not json".to_string(), "response is not JSON"),
            (json!({"choices": []}).to_string(), "no choices[0]"),
            (
                json!({"choices": [{"message": {}}]}).to_string(),
                "no message.content",
            ),
            (
                response(r#"{"visual_content":"a","mo"#, "length"),
                "cut off",
            ),
            (response("I see a car", "stop"), "content is not JSON"),
            (response(r#"{"visual_content":"a"}"#, "stop"), "mood"),
        ];
        for (body, needle) in cases {
            let err = parse_chat_response(&body).unwrap_err();
            assert!(err.contains(needle), "{body} gave {err}");
        }
    }

    #[test]
    fn request_carries_image_as_data_uri_and_schema() {
        let dir = tempfile::tempdir().unwrap();
        let frame = dir.path().join("f.jpg");
        std::fs::write(&frame, [0xFF, 0xD8, 0xFF, 0xE0]).unwrap();
        let body: Value =
            serde_json::from_slice(&DescribeOptions::default().request_body(&frame).unwrap())
                .unwrap();
        let url = body["messages"][0]["content"][1]["image_url"]["url"]
            .as_str()
            .unwrap();
        assert_eq!(url, "data:image/jpeg;base64,/9j/4A==");
        assert_eq!(
            body["response_format"]["json_schema"]["schema"],
            *SCENE_DESCRIPTION_SCHEMA
        );
        assert_eq!(body["max_tokens"], 512);
    }

    proptest! {
        #[test]
        fn response_parser_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = parse_chat_response(&String::from_utf8_lossy(&bytes));
        }

        #[test]
        fn content_parser_never_panics(content in any::<String>(), finish in "stop|length|") {
            let _ = parse_chat_response(&response(&content, &finish));
        }
    }
}
