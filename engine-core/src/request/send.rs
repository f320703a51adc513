//! The one request path: check the prompt and its images, build the schema-constrained request,
//! post it, read and validate the answer, retry invalid output. `describe` is a preset over it.

use std::path::Path;
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;

use super::answer::{
    Answer, Unusable, Usage, is_context_exceeded, is_invalid_output_status, parse_answer,
};
use super::body::chat_request;
use super::error::RequestError;
use super::image::{Part, file_reference, load_image};
use super::options::DescribeOptions;
use super::prompt::Prompt;
use crate::server::Client;
use crate::util::truncate;

/// Whether the server has a vision projector (a text-only model takes no images), and how it
/// takes them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Modality {
    Vision(Transport),
    Text,
}

/// How images reach a vision server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Transport {
    /// As base64 data URIs.
    Inline,
    /// As `file://` references it reads itself, where their paths allow (else inline).
    Files,
}

/// Checks `prompt` and its images, then builds its request body. A text-only model's images are
/// refused here, before the server refuses them.
pub(crate) fn prepare(
    prompt: &Prompt,
    options: &DescribeOptions,
    modality: Modality,
) -> Result<Vec<u8>, RequestError> {
    let refuse = |reason: String| RequestError::InvalidPrompt {
        subject: prompt.subject(),
        reason,
    };
    prompt.check().map_err(refuse)?;
    if modality == Modality::Text && !prompt.images.is_empty() {
        return Err(refuse(format!(
            "{} image(s) for a text-only model — start the engine with an mmproj (a vision \
             model), or send text only",
            prompt.images.len()
        )));
    }
    let max = options.max_frame_bytes;
    let part = |path: &std::path::PathBuf| match modality {
        Modality::Vision(Transport::Files) => match file_reference(path, max)? {
            Some(url) => Ok(Part::File(url)),
            None => load_image(path, max).map(Part::Inline),
        },
        _ => load_image(path, max).map(Part::Inline),
    };
    let images = prompt
        .images
        .iter()
        .map(part)
        .collect::<Result<Vec<_>, _>>()?;
    Ok(chat_request(prompt, &images, options.constraint))
}

/// Sends `prompt` through `client` and returns its validated answer as `T`, with what it cost;
/// retries answers that are invalid (not JSON, off-schema, cut off, not a `T`). `death(wait)` says
/// whether the server has died (waiting up to `wait` for an exit under way); it is asked when a
/// request fails at the transport level, so that a dead server is reported as such.
pub(crate) fn complete<T: DeserializeOwned>(
    client: &Client,
    options: &DescribeOptions,
    modality: Modality,
    prompt: &Prompt,
    death: &dyn Fn(Duration) -> Option<RequestError>,
) -> Result<Answer<T>, RequestError> {
    let body = prepare(prompt, options, modality)?;
    let subject = prompt.subject();
    let started = Instant::now();
    let mut usage = Usage::default();
    let mut attempts = Vec::new();
    // The prompt's own limit bounds every attempt together; else each gets the engine's.
    let deadline = prompt.timeout.map(|limit| started + limit);
    let limit = prompt.timeout.unwrap_or(options.request_timeout);
    for attempt in 0..=options.retries {
        let this_attempt = match deadline {
            Some(at) => at.saturating_duration_since(Instant::now()),
            None => options.request_timeout,
        };
        if this_attempt.is_zero() {
            return Err(RequestError::Timeout {
                subject,
                timeout: limit,
            });
        }
        let reply = match client.post_json("/v1/chat/completions", &body, this_attempt) {
            Ok(reply) => reply,
            Err(e) => {
                // A refused or reset connection usually means the child died: say so if it did.
                if let Some(died) = death(Duration::from_millis(200)) {
                    return Err(died.during(&subject));
                }
                return Err(match e {
                    ureq::Error::Timeout(_) => RequestError::Timeout {
                        subject,
                        timeout: limit,
                    },
                    other => RequestError::Transport {
                        subject,
                        source: Box::new(other),
                    },
                });
            }
        };
        let reason = match reply.status {
            200 => match parse_answer(&reply.body, prompt.max_tokens, &prompt.schema) {
                Ok(parsed) => match serde_json::from_value::<T>(parsed.value) {
                    Ok(value) => {
                        tracing::debug!(%subject, attempt, "answered");
                        return Ok(Answer {
                            value,
                            usage: usage.plus(parsed.usage),
                            timings: parsed.timings,
                            attempts: attempt + 1,
                            latency: started.elapsed(),
                        });
                    }
                    Err(e) => format!(
                        "the answer matches the schema but not the type it is read into ({e})"
                    ),
                },
                Err(Unusable::ContextFull(detail)) => {
                    return Err(RequestError::ContextExhausted { subject, detail });
                }
                Err(Unusable::Invalid(reason)) => {
                    usage = usage.plus(Usage::of(&reply.body));
                    reason
                }
            },
            status if is_context_exceeded(status, &reply.body) => {
                return Err(RequestError::ContextExhausted {
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
                return Err(RequestError::Http {
                    subject,
                    status,
                    body: truncate(&reply.body, 500),
                });
            }
        };
        tracing::warn!(%subject, attempt, %reason, "invalid answer");
        attempts.push(format!("attempt {}: {reason}", attempt + 1));
    }
    Err(RequestError::InvalidOutput {
        subject,
        schema: prompt.schema.name().to_string(),
        attempts,
    })
}

impl DescribeOptions {
    /// The exact `POST /v1/chat/completions` body the engine sends for `frame_path` (after the same
    /// checks `describe` makes): for debugging a server by hand, and for benchmarks.
    pub fn request_body(&self, frame_path: &Path) -> Result<Vec<u8>, RequestError> {
        prepare(
            &self.frame_prompt(frame_path),
            self,
            Modality::Vision(Transport::Inline),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::scene::SCENE_DESCRIPTION_SCHEMA;
    use crate::request::schema::Schema;
    use serde_json::{Value, json};

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
        // The scene schema's own grammar, naming the schema: no output parse on the server.
        let grammar = body["grammar"].as_str().unwrap();
        let first = format!(
            "# json_schema SceneDescription: {}\n",
            *SCENE_DESCRIPTION_SCHEMA
        );
        assert!(grammar.starts_with(&first), "{grammar}");
        assert!(grammar.contains("\"\\\"visual_content\\\"\""), "{grammar}");
        assert_eq!(body["max_tokens"], 512);
    }
    #[test]
    fn bad_sampling_values_and_images_for_a_text_model_are_refused_before_sending() {
        let schema = Schema::new("s", json!({"type": "object"})).unwrap();
        let options = DescribeOptions::default();
        let cases = [
            (
                Prompt::new(&schema, "x").temperature(3.0),
                Modality::Vision(Transport::Inline),
                "`temperature` is 3",
            ),
            (
                Prompt::new(&schema, "x").max_tokens(0),
                Modality::Vision(Transport::Inline),
                "`max_tokens` is 0",
            ),
            (
                Prompt::new(&schema, ""),
                Modality::Vision(Transport::Inline),
                "neither text nor images",
            ),
            (
                Prompt::new(&schema, "x").image("a.jpg"),
                Modality::Text,
                "text-only model",
            ),
        ];
        for (prompt, modality, needle) in cases {
            let err = prepare(&prompt, &options, modality).unwrap_err();
            assert!(
                matches!(&err, RequestError::InvalidPrompt { .. })
                    && err.to_string().contains(needle),
                "{err}"
            );
        }
    }
}
