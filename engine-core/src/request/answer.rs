//! Reading an answer: the chat completion's content parsed as JSON (a Markdown fence stripped),
//! validated against the request's schema, and told apart when it cannot be used (invalid output
//! is worth a retry; a full context is not).

use std::time::Duration;

use serde_json::Value;

use super::scene::{SceneDescription, scene_schema};
use super::schema::Schema;
use crate::util::truncate;

/// Why an answer cannot be used, and whether asking again can help.
#[derive(Debug, PartialEq)]
pub(crate) enum Unusable {
    /// The model's output was bad this time (not JSON, schema-breaking, cut at max_tokens): retry.
    Invalid(String),
    /// The slot's context ran out before the answer was complete: the same request fails the same way.
    ContextFull(String),
}

/// A request's answer, read into `T`, and what it cost.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Answer<T> {
    /// The answer.
    pub value: T,
    /// The tokens of every attempt (a retried invalid answer's too), as the server counted them.
    pub usage: Usage,
    /// The server's `timings` of the accepted attempt (prompt and generation, in tokens and ms).
    pub timings: Option<Value>,
    /// Attempts made: 1, unless invalid output was retried.
    pub attempts: u32,
    /// From the request's first attempt to its answer read.
    pub latency: Duration,
}

/// Tokens a request cost, as the server counted them (its `usage`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct Usage {
    /// Prompt tokens (an image's embeddings included).
    pub prompt_tokens: u64,
    /// Generated tokens.
    pub generated_tokens: u64,
}

impl Usage {
    /// The `usage` of a chat completion's body (zero where it has none).
    pub(crate) fn of(body: &str) -> Usage {
        let value: Value = serde_json::from_str(body).unwrap_or_default();
        Usage::in_response(&value)
    }

    fn in_response(response: &Value) -> Usage {
        let count = |key: &str| response["usage"][key].as_u64().unwrap_or(0);
        Usage {
            prompt_tokens: count("prompt_tokens"),
            generated_tokens: count("completion_tokens"),
        }
    }

    pub(crate) fn plus(self, other: Usage) -> Usage {
        Usage {
            prompt_tokens: self.prompt_tokens + other.prompt_tokens,
            generated_tokens: self.generated_tokens + other.generated_tokens,
        }
    }
}

/// A usable answer: its value, validated, and what the server said of its cost.
#[derive(Debug)]
pub(crate) struct Parsed {
    pub(crate) value: Value,
    pub(crate) usage: Usage,
    pub(crate) timings: Option<Value>,
}

/// Parses an answer to a request that asked for at most `max_tokens`, and validates it against
/// `schema`.
pub(crate) fn parse_answer(
    body: &str,
    max_tokens: u32,
    schema: &Schema,
) -> Result<Parsed, Unusable> {
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
    Ok(Parsed {
        value,
        usage: Usage::in_response(&response),
        timings: response.get("timings").cloned(),
    })
}

/// Whether an HTTP error is the server's way of saying the request does not fit the slot's context
/// (its unified KV pool is full, say): asking again cannot help.
pub(crate) fn is_context_exceeded(status: u16, body: &str) -> bool {
    (400..600).contains(&status)
        && (body.contains("Context size has been exceeded")
            || body.contains("exceeds the available context size"))
}

/// Whether an HTTP error is the server's way of saying the output broke the grammar (worth a retry).
pub(crate) fn is_invalid_output_status(status: u16, body: &str) -> bool {
    status == 500 && body.contains("does not match the expected")
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
    let parsed =
        parse_answer(body, u32::MAX, scene_schema()).map_err(|unusable| match unusable {
            Unusable::Invalid(reason) | Unusable::ContextFull(reason) => reason,
        })?;
    serde_json::from_value(parsed.value).map_err(|e| e.to_string())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    /// A chat completion's body with one choice (the request tests share it).
    pub(crate) fn response(content: &str, finish: &str) -> String {
        json!({"choices": [{"index": 0, "finish_reason": finish,
            "message": {"role": "assistant", "content": content}}]})
        .to_string()
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
        assert_eq!(ok.unwrap().value["climax_t"], 81.5);
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
