//! Turning a keyframe into a [`SceneDescription`]: check the file, build the schema-constrained
//! chat request, parse and validate the answer, retry invalid output.

use std::io::Read;
use std::path::Path;
use std::time::Duration;

use base64::Engine as _;
use serde_json::{Value, json};

use crate::client::Client;
use crate::error::InferenceError;
use crate::scene::{
    KeyframeRecord, SCENE_DESCRIPTION_SCHEMA, SceneDescription, validate_scene_description,
};
use crate::text::truncate;

/// The default prompt: what a film trailer editor needs from a keyframe.
pub const DEFAULT_PROMPT: &str = "You are helping a film trailer editor choose shots. Describe this \
keyframe as JSON with four short fields: visual_content (what is visible), mood (the emotional \
tone), action (what is happening), setting (where and when it takes place).";

/// How the engine asks llama-server for descriptions: set with the chained setters, checked by
/// [`crate::EngineConfigBuilder::build`].
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
        let frame = load_frame(frame_path, self.max_frame_bytes)?;
        Ok(chat_request(self, &frame))
    }

    pub(crate) fn validate(&self) -> Result<(), String> {
        if !(0.0..=2.0).contains(&self.temperature) {
            return Err(format!(
                "temperature is {}: it must be between 0 and 2",
                self.temperature
            ));
        }
        if self.max_tokens == 0 {
            return Err("max_tokens is 0: it must be at least 1".into());
        }
        if self.request_timeout.is_zero() {
            return Err("request_timeout is zero: it must be more than zero".into());
        }
        Ok(())
    }
}

/// A frame read from disk and checked: its MIME type and bytes.
#[derive(Debug)]
pub(crate) struct Frame {
    pub(crate) mime: &'static str,
    pub(crate) bytes: Vec<u8>,
}

/// Reads and checks a frame before anything is sent: it must exist, be a non-empty file within the
/// size limit, and start with JPEG or PNG magic bytes.
pub(crate) fn load_frame(path: &Path, max_bytes: u64) -> Result<Frame, InferenceError> {
    let bad = |reason: String| InferenceError::BadFrame {
        path: path.to_path_buf(),
        reason,
    };
    let meta = std::fs::metadata(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => bad("file not found — check the frame path".into()),
        _ => bad(format!("cannot read it: {e}")),
    })?;
    if meta.is_dir() {
        return Err(bad("is a folder, not an image file".into()));
    }
    if !meta.is_file() {
        return Err(bad(
            "not a regular file (a FIFO, a device or a socket) — give the keyframe's image file"
                .into(),
        ));
    }
    if meta.len() == 0 {
        return Err(bad("file is empty — re-extract the keyframe".into()));
    }
    if meta.len() > max_bytes {
        return Err(bad(format!(
            "file is {} bytes, over the {max_bytes}-byte limit — downscale the frame or raise max_frame_bytes",
            meta.len()
        )));
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    std::fs::File::open(path)
        .and_then(|f| f.take(max_bytes + 1).read_to_end(&mut bytes))
        .map_err(|e| bad(format!("cannot read it: {e}")))?;
    if bytes.len() as u64 > max_bytes {
        return Err(bad(format!(
            "file grew past the {max_bytes}-byte limit while being read"
        )));
    }
    let mime = if bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
        "image/jpeg"
    } else if bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
        "image/png"
    } else if bytes.is_empty() {
        return Err(bad("file is empty — re-extract the keyframe".into()));
    } else {
        let head: Vec<String> = bytes.iter().take(8).map(|b| format!("{b:02x}")).collect();
        return Err(bad(format!(
            "not a JPEG or PNG (it starts with {}) — convert it to JPEG",
            head.join(" ")
        )));
    };
    Ok(Frame { mime, bytes })
}

/// Stands in for the image URL in the JSON skeleton; replaced by the data URI.
const IMAGE_SLOT: &str = "cinecut-image-slot";

/// The `POST /v1/chat/completions` body for one frame: the prompt and the image as a data URI (never
/// an `http://` URL, which the server would fetch), constrained by the schema.
///
/// The image is a megabyte or more of base64: it is encoded straight into a buffer of the final size,
/// spliced into a small serialised skeleton, instead of passing through a JSON value (several copies
/// into growing buffers cost about 2 ms per 1080p frame, more than everything else the client does).
pub(crate) fn chat_request(options: &DescribeOptions, frame: &Frame) -> Vec<u8> {
    let skeleton = json!({
        "messages": [{
            "role": "user",
            "content": [
                {"type": "text", "text": options.prompt},
                {"type": "image_url", "image_url": {"url": IMAGE_SLOT}},
            ],
        }],
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "scene_description", "schema": *SCENE_DESCRIPTION_SCHEMA},
        },
        "temperature": options.temperature,
        "max_tokens": options.max_tokens,
        "stream": false,
    })
    .to_string();
    // The slot appears once as a JSON token of its own; a prompt holding the same words would be a
    // different, escaped token inside the text part, so `"url":"SLOT"` is unambiguous.
    let token = format!("\"url\":\"{IMAGE_SLOT}\"");
    let at = skeleton
        .find(&token)
        .expect("the skeleton holds the image slot");
    let (head, tail) = (&skeleton[..at], &skeleton[at + token.len()..]);
    let uri_prefix = format!("\"url\":\"data:{};base64,", frame.mime);
    let encoded = base64::encoded_len(frame.bytes.len(), true).expect("a frame fits in memory");
    let mut body = Vec::with_capacity(head.len() + uri_prefix.len() + encoded + 1 + tail.len());
    body.extend_from_slice(head.as_bytes());
    body.extend_from_slice(uri_prefix.as_bytes());
    let start = body.len();
    body.resize(start + encoded, 0);
    let written = base64::engine::general_purpose::STANDARD
        .encode_slice(&frame.bytes, &mut body[start..])
        .expect("the buffer has the encoded length");
    body.truncate(start + written);
    body.push(b'"');
    body.extend_from_slice(tail.as_bytes());
    body
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
    parse_answer(body, u32::MAX).map_err(|unusable| match unusable {
        Unusable::Invalid(reason) | Unusable::ContextFull(reason) => reason,
    })
}

/// Why an answer cannot be used, and whether asking again can help.
#[derive(Debug, PartialEq)]
enum Unusable {
    /// The model's output was bad this time (not JSON, schema-breaking, cut at max_tokens): retry.
    Invalid(String),
    /// The slot's context ran out before the answer was complete: the same request fails the same way.
    ContextFull(String),
}

/// Parses an answer to a request that asked for at most `max_tokens`.
fn parse_answer(body: &str, max_tokens: u32) -> Result<SceneDescription, Unusable> {
    let invalid = Unusable::Invalid;
    let response: Value = serde_json::from_str(body).map_err(|e| {
        invalid(format!(
            "response is not JSON ({e}): {}",
            truncate(body, 200)
        ))
    })?;
    let choice = response
        .get("choices")
        .and_then(|c| c.get(0))
        .ok_or_else(|| {
            invalid(format!(
                "response has no choices[0]: {}",
                truncate(body, 200)
            ))
        })?;
    let content = choice
        .get("message")
        .and_then(|m| m.get("content"))
        .and_then(Value::as_str)
        .ok_or_else(|| {
            invalid(format!(
                "choices[0] has no message.content: {}",
                truncate(body, 200)
            ))
        })?;
    if choice.get("finish_reason").and_then(Value::as_str) == Some("length") {
        let usage = |key: &str| response["usage"][key].as_u64();
        // Cut off before max_tokens were generated: the slot's context, not max_tokens, ran out.
        if let (Some(generated), Some(prompt)) =
            (usage("completion_tokens"), usage("prompt_tokens"))
            && generated < u64::from(max_tokens)
        {
            return Err(Unusable::ContextFull(format!(
                "the slot's context ran out after {} tokens ({prompt} of prompt, {generated} \
                 generated), before max_tokens {max_tokens}",
                prompt + generated
            )));
        }
        return Err(invalid(format!(
            "output cut off at max_tokens (finish_reason \"length\"): {}",
            truncate(content, 200)
        )));
    }
    let value: Value = serde_json::from_str(strip_code_fence(content)).map_err(|e| {
        invalid(format!(
            "content is not JSON ({e}): {}",
            truncate(content, 200)
        ))
    })?;
    validate_scene_description(&value)
        .map_err(|e| invalid(format!("{e}: {}", truncate(content, 200))))
}

/// Whether an HTTP error is the server's way of saying the request does not fit the slot's context
/// (its unified KV pool is full, say): asking again cannot help.
fn is_context_exceeded(status: u16, body: &str) -> bool {
    (400..600).contains(&status)
        && (body.contains("Context size has been exceeded")
            || body.contains("exceeds the available context size"))
}

/// Whether an HTTP error is the server's way of saying the output broke the grammar (worth a retry).
pub(crate) fn is_invalid_output_status(status: u16, body: &str) -> bool {
    status == 500 && body.contains("does not match the expected")
}

/// Describes one frame through `client`: checks the file, posts the request, retries invalid answers.
/// `death(wait)` says whether the server has died (waiting up to `wait` for an exit under way); it is
/// asked when a request fails at the transport level, so that a dead server is reported as such.
pub(crate) fn describe_frame(
    client: &Client,
    options: &DescribeOptions,
    frame: &KeyframeRecord,
    death: &dyn Fn(Duration) -> Option<InferenceError>,
) -> Result<SceneDescription, InferenceError> {
    let path = &frame.frame_path;
    let image = load_frame(path, options.max_frame_bytes)?;
    let body = chat_request(options, &image);
    let mut attempts = Vec::new();
    for attempt in 0..=options.retries {
        let reply = match client.post_json("/v1/chat/completions", &body, options.request_timeout) {
            Ok(reply) => reply,
            Err(e) => {
                // A refused or reset connection usually means the child died: say so if it did.
                if let Some(died) = death(Duration::from_millis(200)) {
                    return Err(died.for_frame(path));
                }
                return Err(match e {
                    ureq::Error::Timeout(_) => InferenceError::RequestTimeout {
                        path: path.clone(),
                        timeout: options.request_timeout,
                    },
                    other => InferenceError::Transport {
                        path: path.clone(),
                        detail: other.to_string(),
                    },
                });
            }
        };
        let context_full = |detail: String| InferenceError::ContextExhausted {
            path: path.clone(),
            detail,
        };
        let reason = match reply.status {
            200 => match parse_answer(&reply.body, options.max_tokens) {
                Ok(scene) => {
                    tracing::debug!(frame = %path.display(), attempt, "frame described");
                    return Ok(scene);
                }
                Err(Unusable::ContextFull(detail)) => return Err(context_full(detail)),
                Err(Unusable::Invalid(reason)) => reason,
            },
            status if is_context_exceeded(status, &reply.body) => {
                return Err(context_full(format!(
                    "llama-server answered HTTP {status}: {}",
                    truncate(reply.body.trim(), 200)
                )));
            }
            status if is_invalid_output_status(status, &reply.body) => {
                format!("HTTP {status}: {}", truncate(&reply.body, 200))
            }
            status => {
                return Err(InferenceError::Http {
                    path: path.clone(),
                    status,
                    body: truncate(&reply.body, 500),
                });
            }
        };
        tracing::warn!(frame = %path.display(), attempt, %reason, "invalid answer");
        attempts.push(format!("attempt {}: {reason}", attempt + 1));
    }
    Err(InferenceError::InvalidOutput {
        path: path.clone(),
        attempts,
    })
}

#[cfg(test)]
mod http_tests;

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn response(content: &str, finish: &str) -> String {
        json!({"choices": [{"index": 0, "finish_reason": finish,
            "message": {"role": "assistant", "content": content}}]})
        .to_string()
    }

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
    fn a_prompt_that_names_the_image_slot_does_not_confuse_the_splice() {
        let frame = Frame {
            mime: "image/png",
            bytes: vec![0x89, b'P', b'N', b'G'],
        };
        let options =
            DescribeOptions::default().prompt(format!("\"url\":\"{IMAGE_SLOT}\" {IMAGE_SLOT}"));
        let body: Value = serde_json::from_slice(&chat_request(&options, &frame)).unwrap();
        assert_eq!(body["messages"][0]["content"][0]["text"], options.prompt);
        assert_eq!(
            body["messages"][0]["content"][1]["image_url"]["url"],
            "data:image/png;base64,iVBORw=="
        );
    }

    #[test]
    fn request_carries_image_as_data_uri_and_schema() {
        let frame = Frame {
            mime: "image/jpeg",
            bytes: vec![0xFF, 0xD8, 0xFF, 0xE0],
        };
        let body: Value =
            serde_json::from_slice(&chat_request(&DescribeOptions::default(), &frame)).unwrap();
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

    #[test]
    fn a_full_context_is_told_apart_from_max_tokens() {
        let cut = |generated: u32| {
            json!({"choices": [{"finish_reason": "length", "message": {"content": "{\"visual"}}],
                   "usage": {"prompt_tokens": 240, "completion_tokens": generated}})
            .to_string()
        };
        match parse_answer(&cut(16), 512) {
            Err(Unusable::ContextFull(detail)) => {
                assert!(detail.contains("256 tokens"), "{detail}")
            }
            other => panic!("{other:?}"),
        }
        assert!(
            matches!(parse_answer(&cut(512), 512), Err(Unusable::Invalid(r)) if r.contains("max_tokens"))
        );
        assert!(is_context_exceeded(
            500,
            &json!({"error": {"code": 500, "message": "Context size has been exceeded."}})
                .to_string()
        ));
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
