//! The one request path: check the images, build the schema-constrained chat request, post it,
//! parse and validate the answer against the caller's schema, retry invalid output.

use std::io::Read;
use std::path::Path;
use std::time::Duration;

use base64::Engine as _;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use crate::client::Client;
use crate::describe::{DescribeOptions, strip_code_fence};
use crate::error::InferenceError;
use crate::prompt::Prompt;
use crate::schema::Schema;
use crate::text::truncate;

/// An image read from disk and checked: its MIME type and bytes.
#[derive(Debug)]
pub(crate) struct Image {
    pub(crate) mime: &'static str,
    pub(crate) bytes: Vec<u8>,
}

/// Reads and checks an image before anything is sent: it must exist, be a non-empty file within the
/// size limit, and start with JPEG or PNG magic bytes.
pub(crate) fn load_image(path: &Path, max_bytes: u64) -> Result<Image, InferenceError> {
    let bad = |reason: String| InferenceError::BadImage {
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
    Ok(Image { mime, bytes })
}

/// Stands in for image `i`'s URL in the JSON skeleton; replaced by its data URI.
fn image_slot(i: usize) -> String {
    format!("cinecut-image-slot-{i}")
}

/// The `POST /v1/chat/completions` body: the system message, then the text and the images as data
/// URIs (never `http://` URLs, which the server would fetch), constrained by the schema. Without
/// images the user's content is a plain string, which every server version takes.
///
/// An image is a megabyte or more of base64: it is encoded straight into a buffer of the final size,
/// spliced into a small serialised skeleton, instead of passing through a JSON value (several copies
/// into growing buffers cost about 2 ms per 1080p frame, more than everything else the client does).
pub(crate) fn chat_request(prompt: &Prompt, images: &[Image]) -> Vec<u8> {
    let content = if images.is_empty() {
        json!(prompt.text)
    } else {
        let mut parts = vec![json!({"type": "text", "text": prompt.text})];
        parts.extend(
            (0..images.len())
                .map(|i| json!({"type": "image_url", "image_url": {"url": image_slot(i)}})),
        );
        Value::Array(parts)
    };
    let mut messages = Vec::new();
    if let Some(system) = &prompt.system {
        messages.push(json!({"role": "system", "content": system}));
    }
    messages.push(json!({"role": "user", "content": content}));
    let skeleton = json!({
        "messages": messages,
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": prompt.schema.name(), "schema": prompt.schema.value()},
        },
        "temperature": prompt.temperature,
        "max_tokens": prompt.max_tokens,
        "stream": false,
    })
    .to_string();
    let encoded: usize = images
        .iter()
        .map(|image| base64::encoded_len(image.bytes.len(), true).expect("an image fits in memory"))
        .sum();
    let mut body = Vec::with_capacity(skeleton.len() + encoded + 64 * images.len());
    let mut rest = skeleton.as_str();
    for (i, image) in images.iter().enumerate() {
        // Each slot appears once as a JSON token of its own; text holding the same words would be a
        // different, escaped token inside a text part, so `"url":"SLOT"` is unambiguous.
        let token = format!("\"url\":\"{}\"", image_slot(i));
        let at = rest
            .find(&token)
            .expect("the skeleton holds every image slot");
        body.extend_from_slice(&rest.as_bytes()[..at]);
        body.extend_from_slice(format!("\"url\":\"data:{};base64,", image.mime).as_bytes());
        let start = body.len();
        let len = base64::encoded_len(image.bytes.len(), true).expect("an image fits in memory");
        body.resize(start + len, 0);
        let written = base64::engine::general_purpose::STANDARD
            .encode_slice(&image.bytes, &mut body[start..])
            .expect("the buffer has the encoded length");
        body.truncate(start + written);
        body.push(b'"');
        rest = &rest[at + token.len()..];
    }
    body.extend_from_slice(rest.as_bytes());
    body
}

/// Why an answer cannot be used, and whether asking again can help.
#[derive(Debug, PartialEq)]
pub(crate) enum Unusable {
    /// The model's output was bad this time (not JSON, schema-breaking, cut at max_tokens): retry.
    Invalid(String),
    /// The slot's context ran out before the answer was complete: the same request fails the same way.
    ContextFull(String),
}

/// Parses an answer to a request that asked for at most `max_tokens`, and validates it against
/// `schema`.
pub(crate) fn parse_answer(
    body: &str,
    max_tokens: u32,
    schema: &Schema,
) -> Result<Value, Unusable> {
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
    schema
        .validate(&value)
        .map_err(|e| invalid(format!("{e}: {}", truncate(content, 200))))?;
    Ok(value)
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

/// Checks `prompt` and its images, then builds its request body. `vision`: whether the server has
/// a projector (else images are refused here, before the server refuses them).
pub(crate) fn prepare(
    prompt: &Prompt,
    options: &DescribeOptions,
    vision: bool,
) -> Result<Vec<u8>, InferenceError> {
    let refuse = |reason: String| InferenceError::InvalidPrompt {
        subject: prompt.subject(),
        reason,
    };
    prompt.check().map_err(refuse)?;
    if !vision && !prompt.images.is_empty() {
        return Err(refuse(format!(
            "{} image(s) for a text-only model — start the engine with an mmproj (a vision \
             model), or send text only",
            prompt.images.len()
        )));
    }
    let images = prompt
        .images
        .iter()
        .map(|path| load_image(path, options.max_frame_bytes))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(chat_request(prompt, &images))
}

/// Sends `prompt` through `client` and returns its validated answer as `T`; retries answers that
/// are invalid (not JSON, off-schema, cut off, not a `T`). `death(wait)` says whether the server has
/// died (waiting up to `wait` for an exit under way); it is asked when a request fails at the
/// transport level, so that a dead server is reported as such.
pub(crate) fn complete<T: DeserializeOwned>(
    client: &Client,
    options: &DescribeOptions,
    vision: bool,
    prompt: &Prompt,
    death: &dyn Fn(Duration) -> Option<InferenceError>,
) -> Result<T, InferenceError> {
    let body = prepare(prompt, options, vision)?;
    let subject = prompt.subject();
    let mut attempts = Vec::new();
    for attempt in 0..=options.retries {
        let reply = match client.post_json("/v1/chat/completions", &body, options.request_timeout) {
            Ok(reply) => reply,
            Err(e) => {
                // A refused or reset connection usually means the child died: say so if it did.
                if let Some(died) = death(Duration::from_millis(200)) {
                    return Err(died.during(&subject));
                }
                return Err(match e {
                    ureq::Error::Timeout(_) => InferenceError::RequestTimeout {
                        subject,
                        timeout: options.request_timeout,
                    },
                    other => InferenceError::Transport {
                        subject,
                        detail: other.to_string(),
                    },
                });
            }
        };
        let reason = match reply.status {
            200 => match parse_answer(&reply.body, prompt.max_tokens, &prompt.schema) {
                Ok(value) => match serde_json::from_value::<T>(value) {
                    Ok(answer) => {
                        tracing::debug!(%subject, attempt, "answered");
                        return Ok(answer);
                    }
                    Err(e) => format!(
                        "the answer matches the schema but not the type it is read into ({e})"
                    ),
                },
                Err(Unusable::ContextFull(detail)) => {
                    return Err(InferenceError::ContextExhausted { subject, detail });
                }
                Err(Unusable::Invalid(reason)) => reason,
            },
            status if is_context_exceeded(status, &reply.body) => {
                return Err(InferenceError::ContextExhausted {
                    subject,
                    detail: format!(
                        "llama-server answered HTTP {status}: {}",
                        truncate(reply.body.trim(), 200)
                    ),
                });
            }
            status if is_invalid_output_status(status, &reply.body) => {
                format!("HTTP {status}: {}", truncate(&reply.body, 200))
            }
            status => {
                return Err(InferenceError::Http {
                    subject,
                    status,
                    body: truncate(&reply.body, 500),
                });
            }
        };
        tracing::warn!(%subject, attempt, %reason, "invalid answer");
        attempts.push(format!("attempt {}: {reason}", attempt + 1));
    }
    Err(InferenceError::InvalidOutput {
        subject,
        schema: prompt.schema.name().to_string(),
        attempts,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::scene::scene_schema;

    /// A chat completion's body with one choice (the describe tests share it).
    pub(crate) fn response(content: &str, finish: &str) -> String {
        json!({"choices": [{"index": 0, "finish_reason": finish,
            "message": {"role": "assistant", "content": content}}]})
        .to_string()
    }

    #[test]
    fn a_text_prompt_has_a_system_message_and_plain_content() {
        let schema = Schema::new("anchors", json!({"type": "object"})).unwrap();
        let prompt = Prompt::new(&schema, "the subtitles").system("find anchors");
        let body: Value = serde_json::from_slice(&chat_request(&prompt, &[])).unwrap();
        assert_eq!(
            body["messages"][0],
            json!({"role": "system", "content": "find anchors"})
        );
        assert_eq!(
            body["messages"][1],
            json!({"role": "user", "content": "the subtitles"})
        );
        assert_eq!(body["response_format"]["json_schema"]["name"], "anchors");
        assert_eq!(body["max_tokens"], 128);
    }

    #[test]
    fn several_images_are_spliced_in_order_whatever_the_text_says() {
        let schema = Schema::new("s", json!({"type": "object"})).unwrap();
        let text = format!("\"url\":\"{}\" {}", image_slot(0), image_slot(1));
        let prompt = Prompt::new(&schema, text.clone());
        let images = [
            Image {
                mime: "image/png",
                bytes: vec![0x89, b'P', b'N', b'G'],
            },
            Image {
                mime: "image/jpeg",
                bytes: vec![0xFF, 0xD8, 0xFF, 0xE0],
            },
        ];
        let body: Value = serde_json::from_slice(&chat_request(&prompt, &images)).unwrap();
        let parts = &body["messages"][0]["content"];
        assert_eq!(parts[0]["text"], text);
        assert_eq!(
            parts[1]["image_url"]["url"],
            "data:image/png;base64,iVBORw=="
        );
        assert_eq!(
            parts[2]["image_url"]["url"],
            "data:image/jpeg;base64,/9j/4A=="
        );
    }

    #[test]
    fn an_answer_is_validated_against_the_callers_schema() {
        let schema = Schema::new(
            "anchors",
            json!({"type": "object", "required": ["climax_t"],
                   "properties": {"climax_t": {"type": "number"}}}),
        )
        .unwrap();
        let ok = parse_answer(&response(r#"{"climax_t": 81.5}"#, "stop"), 128, &schema);
        assert_eq!(ok.unwrap()["climax_t"], 81.5);
        match parse_answer(&response(r#"{"climax_t": "late"}"#, "stop"), 128, &schema) {
            Err(Unusable::Invalid(reason)) => {
                assert!(
                    reason.contains("anchors") && reason.contains("climax_t"),
                    "{reason}"
                )
            }
            other => panic!("{other:?}"),
        }
        assert!(parse_answer(&response("{}", "stop"), 128, scene_schema()).is_err());
    }

    #[test]
    fn a_full_context_is_told_apart_from_max_tokens() {
        let cut = |generated: u32| {
            json!({"choices": [{"finish_reason": "length", "message": {"content": "{\"visual"}}],
                   "usage": {"prompt_tokens": 240, "completion_tokens": generated}})
            .to_string()
        };
        match parse_answer(&cut(16), 512, scene_schema()) {
            Err(Unusable::ContextFull(detail)) => {
                assert!(detail.contains("256 tokens"), "{detail}")
            }
            other => panic!("{other:?}"),
        }
        assert!(
            matches!(parse_answer(&cut(512), 512, scene_schema()), Err(Unusable::Invalid(r)) if r.contains("max_tokens"))
        );
        assert!(is_context_exceeded(
            500,
            &json!({"error": {"code": 500, "message": "Context size has been exceeded."}})
                .to_string()
        ));
    }

    #[test]
    fn bad_sampling_values_and_images_for_a_text_model_are_refused_before_sending() {
        let schema = Schema::new("s", json!({"type": "object"})).unwrap();
        let options = DescribeOptions::default();
        let cases = [
            (
                Prompt::new(&schema, "x").temperature(3.0),
                true,
                "temperature is 3",
            ),
            (
                Prompt::new(&schema, "x").max_tokens(0),
                true,
                "max_tokens is 0",
            ),
            (Prompt::new(&schema, ""), true, "neither text nor images"),
            (
                Prompt::new(&schema, "x").image("a.jpg"),
                false,
                "text-only model",
            ),
        ];
        for (prompt, vision, needle) in cases {
            let err = prepare(&prompt, &options, vision).unwrap_err();
            assert!(
                matches!(&err, InferenceError::InvalidPrompt { .. })
                    && err.to_string().contains(needle),
                "{err}"
            );
        }
    }
}
