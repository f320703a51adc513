//! The fake's answers: a schema-valid description that depends on the image, a schema-valid object
//! for any other schema (derived from the image or the text), and the ways a real server's answer
//! goes wrong.

use serde_json::{Value, json};

const MOODS: [&str; 6] = [
    "tense",
    "joyful",
    "melancholic",
    "eerie",
    "triumphant",
    "calm",
];
const ACTIONS: [&str; 6] = [
    "a chase through traffic",
    "two people argue",
    "someone waits alone",
    "a crowd celebrates",
    "a door slowly opens",
    "a figure runs toward the camera",
];
const SETTINGS: [&str; 6] = [
    "a city street at night",
    "a sunlit beach",
    "a cramped kitchen",
    "a forest at dawn",
    "an empty warehouse",
    "a rooftop in the rain",
];

/// FNV-1a: a stable hash so that the same image always gets the same description.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// What the fake learned from a decoded image.
#[derive(Debug, Clone, Copy)]
pub struct ImageFacts {
    pub width: u32,
    pub height: u32,
    pub mean_rgb: [u8; 3],
    pub hash: u64,
}

/// Decodes the image fully, as the real server does; `None` if it does not decode.
pub fn inspect(bytes: &[u8]) -> Option<ImageFacts> {
    let image = image::load_from_memory(bytes).ok()?.to_rgb8();
    let (width, height) = image.dimensions();
    let mut sum = [0u64; 3];
    for pixel in image.pixels() {
        for (s, c) in sum.iter_mut().zip(pixel.0) {
            *s += u64::from(c);
        }
    }
    let n = u64::from(width) * u64::from(height);
    let mean_rgb = sum.map(|s| (s / n.max(1)) as u8);
    Some(ImageFacts {
        width,
        height,
        mean_rgb,
        hash: fnv1a(bytes),
    })
}

fn colour_name([r, g, b]: [u8; 3]) -> &'static str {
    let (r, g, b) = (i32::from(r), i32::from(g), i32::from(b));
    if r.max(g).max(b) < 48 {
        "dark"
    } else if r.min(g).min(b) > 208 {
        "bright white"
    } else if (r - g).abs() < 24 && (g - b).abs() < 24 {
        "grey"
    } else if r >= g && r >= b {
        "red"
    } else if g >= r && g >= b {
        "green"
    } else {
        "blue"
    }
}

/// A schema-valid description of the image.
pub fn describe(facts: &ImageFacts) -> Value {
    let pick = |list: &[&'static str], shift: u32| {
        list[((facts.hash >> shift) % list.len() as u64) as usize]
    };
    let [r, g, b] = facts.mean_rgb;
    json!({
        "visual_content": format!(
            "a {}x{} frame, mostly {} (mean colour #{r:02x}{g:02x}{b:02x})",
            facts.width, facts.height, colour_name(facts.mean_rgb)
        ),
        "mood": pick(&MOODS, 0),
        "action": pick(&ACTIONS, 8),
        "setting": pick(&SETTINGS, 16),
    })
}

/// Whether `schema` is the engine's SceneDescription schema (answered with [`describe`]).
/// The scene schema's shape (four strings), for an answer no schema constrains.
pub fn scene_schema() -> Value {
    let string = serde_json::json!({"type": "string"});
    serde_json::json!({"type": "object", "properties": {"visual_content": string,
        "mood": string, "action": string, "setting": string}})
}

pub fn is_scene_schema(schema: &Value) -> bool {
    ["visual_content", "mood", "action", "setting"]
        .iter()
        .all(|k| schema["properties"].get(k).is_some())
}

/// A value valid under `schema`, derived from `seed`: objects get every property (required or
/// not), numbers respect `minimum`/`maximum`, strings `minLength`/`maxLength`, arrays `minItems`;
/// `enum` and `const` are honoured; of `anyOf`/`oneOf` the first is taken. What the real server's grammar
/// would allow, without a model.
pub fn from_schema(schema: &Value, seed: u64) -> Value {
    from_schema_at(schema, seed, 0)
}

fn from_schema_at(schema: &Value, seed: u64, depth: u32) -> Value {
    if depth > 16 {
        return Value::Null;
    }
    if let Some(value) = schema.get("const") {
        return value.clone();
    }
    if let Some(options) = schema["enum"].as_array().filter(|o| !o.is_empty()) {
        return options[(seed % options.len() as u64) as usize].clone();
    }
    for key in ["anyOf", "oneOf", "allOf"] {
        if let Some(first) = schema[key].as_array().and_then(|a| a.first()) {
            return from_schema_at(first, seed, depth + 1);
        }
    }
    let kind = match &schema["type"] {
        Value::String(t) => t.as_str(),
        Value::Array(types) => types
            .iter()
            .filter_map(Value::as_str)
            .find(|t| *t != "null")
            .unwrap_or("null"),
        _ if schema["properties"].is_object() => "object",
        _ => "string",
    };
    let next = |shift: u64| fnv1a(&(seed ^ shift).to_le_bytes());
    match kind {
        "object" => {
            let mut object = serde_json::Map::new();
            if let Some(properties) = schema["properties"].as_object() {
                for (i, (key, sub)) in properties.iter().enumerate() {
                    object.insert(
                        key.clone(),
                        from_schema_at(sub, next(i as u64 + 1), depth + 1),
                    );
                }
            }
            Value::Object(object)
        }
        "array" => {
            let n = schema["minItems"].as_u64().unwrap_or(1).min(8);
            (0..n)
                .map(|i| from_schema_at(&schema["items"], next(i + 100), depth + 1))
                .collect()
        }
        "number" | "integer" => {
            let low = schema["minimum"].as_f64().unwrap_or(0.0);
            let high = schema["maximum"].as_f64().unwrap_or(low + 1000.0).max(low);
            let x = low + (seed % 10_000) as f64 / 10_000.0 * (high - low);
            if kind == "integer" {
                json!(x.floor().max(low.ceil()) as i64)
            } else {
                json!((x * 10.0).floor() / 10.0)
            }
        }
        "boolean" => json!(seed.is_multiple_of(2)),
        "null" => Value::Null,
        _ => {
            let word = SETTINGS[(seed % SETTINGS.len() as u64) as usize];
            let min = schema["minLength"].as_u64().unwrap_or(0) as usize;
            let max = schema["maxLength"]
                .as_u64()
                .map_or(usize::MAX, |m| m as usize);
            let mut text: String = word.chars().take(max).collect();
            while text.chars().count() < min {
                text.push('.');
            }
            json!(text)
        }
    }
}

/// How a completion request is answered (knob `FAKE_LLAMA_RESPONSE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Valid,
    Fence,
    NotJson,
    BadSchema,
    Length,
    Peg500,
    Http500,
}

impl Mode {
    pub fn parse(name: &str) -> Option<Mode> {
        Some(match name.trim() {
            "valid" => Mode::Valid,
            "fence" => Mode::Fence,
            "not-json" => Mode::NotJson,
            "bad-schema" => Mode::BadSchema,
            "length" => Mode::Length,
            "peg-500" => Mode::Peg500,
            "http-500" => Mode::Http500,
            _ => return None,
        })
    }
}

/// The generated text for `mode` and whether generation was cut off at the token limit.
/// `None` for the modes that answer with an HTTP error instead.
pub fn content(mode: Mode, description: &Value) -> Option<(String, bool)> {
    let text = description.to_string();
    Some(match mode {
        Mode::Valid => (text, false),
        Mode::Fence => (format!("```json\n{text}\n```"), false),
        Mode::NotJson => (
            "I see a frame from a film, but I cannot say more.".into(),
            false,
        ),
        Mode::BadSchema if description.get("mood").is_some() => (
            json!({"visual_content": description["visual_content"], "mood": 7, "extra": true})
                .to_string(),
            false,
        ),
        // Any other schema: each string becomes a number and each other value a string.
        Mode::BadSchema => {
            let wrong = |v: &Value| {
                if v.is_string() {
                    json!(7)
                } else {
                    json!("seven")
                }
            };
            let off = match description {
                Value::Object(map) => {
                    Value::Object(map.iter().map(|(k, v)| (k.clone(), wrong(v))).collect())
                }
                other => wrong(other),
            };
            (off.to_string(), false)
        }
        Mode::Length => (text[..text.len() / 2].to_string(), true),
        Mode::Peg500 | Mode::Http500 => return None,
    })
}

/// The llama-server error body shape.
pub fn error_body(code: u16, message: &str, kind: &str) -> String {
    json!({"error": {"code": code, "message": message, "type": kind}}).to_string()
}
