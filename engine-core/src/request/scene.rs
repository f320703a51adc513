//! What the engine produces ([`SceneDescription`]), its JSON schema, and what it consumes
//! ([`KeyframeRecord`]).

use std::path::PathBuf;
use std::sync::LazyLock;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::schema::{Schema, SchemaViolation};

/// A keyframe's description, as the vision model gives it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SceneDescription {
    /// What is visible in the frame.
    pub visual_content: String,
    /// The emotional tone.
    pub mood: String,
    /// What is happening.
    pub action: String,
    /// Where and when it takes place.
    pub setting: String,
}

/// A keyframe cut from the film: the input CineCut's keyframe stage writes (its plan's `KeyframeRecord`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KeyframeRecord {
    /// Where in the film, in seconds.
    pub timestamp_s: f64,
    /// The JPEG (or PNG) on disk.
    pub frame_path: PathBuf,
    /// What chose this frame (a scene cut, a subtitle, ...).
    pub source: String,
}

impl KeyframeRecord {
    /// A record for `frame_path` at `timestamp_s`.
    pub fn new(
        frame_path: impl Into<PathBuf>,
        timestamp_s: f64,
        source: impl Into<String>,
    ) -> Self {
        KeyframeRecord {
            timestamp_s,
            frame_path: frame_path.into(),
            source: source.into(),
        }
    }
}

/// The JSON schema of [`SceneDescription`], exactly as CineCut's plan gives it; sent to llama-server to
/// constrain its output.
pub static SCENE_DESCRIPTION_SCHEMA: LazyLock<Value> = LazyLock::new(|| {
    json!({
        "type": "object",
        "properties": {
            "visual_content": {"type": "string"},
            "mood": {"type": "string"},
            "action": {"type": "string"},
            "setting": {"type": "string"},
        },
        "required": ["visual_content", "mood", "action", "setting"],
        "additionalProperties": false,
    })
});

static SCENE_SCHEMA: LazyLock<Schema> = LazyLock::new(|| {
    Schema::new("SceneDescription", SCENE_DESCRIPTION_SCHEMA.clone())
        .expect("the built-in schema is valid")
});

/// [`SCENE_DESCRIPTION_SCHEMA`], compiled once: what `describe` sends and validates against.
pub(crate) fn scene_schema() -> &'static Schema {
    &SCENE_SCHEMA
}

/// Validates `value` against [`SCENE_DESCRIPTION_SCHEMA`] (compiled once) and converts it.
///
/// ```
/// use engine_core::validate_scene_description;
/// use serde_json::json;
///
/// let ok = json!({"visual_content": "a car", "mood": "tense", "action": "chase", "setting": "night"});
/// assert_eq!(validate_scene_description(&ok).unwrap().mood, "tense");
///
/// let bad = json!({"visual_content": 3, "mood": "tense", "extra": true});
/// let err = validate_scene_description(&bad).unwrap_err();
/// assert!(err.violations.len() >= 3); // wrong type, missing fields, extra field
/// ```
pub fn validate_scene_description(value: &Value) -> Result<SceneDescription, SchemaViolation> {
    SCENE_SCHEMA.validate(value)?;
    serde_json::from_value(value.clone()).map_err(|e| SchemaViolation {
        schema: SCENE_SCHEMA.name().to_string(),
        violations: vec![e.to_string()],
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const FIELDS: [&str; 4] = ["visual_content", "mood", "action", "setting"];

    fn object(values: &[String; 4]) -> serde_json::Map<String, Value> {
        FIELDS
            .iter()
            .zip(values)
            .map(|(k, v)| (k.to_string(), Value::String(v.clone())))
            .collect()
    }

    fn non_string() -> impl Strategy<Value = Value> {
        prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(|n| json!(n)),
            Just(json!([])),
            Just(json!({})),
        ]
    }

    proptest! {
        #[test]
        fn any_valid_object_round_trips(values in any::<[String; 4]>()) {
            let value = Value::Object(object(&values));
            let scene = validate_scene_description(&value).unwrap();
            prop_assert_eq!(serde_json::to_value(&scene).unwrap(), value);
        }

        #[test]
        fn missing_field_is_rejected(values in any::<[String; 4]>(), drop in 0usize..4) {
            let mut map = object(&values);
            map.remove(FIELDS[drop]);
            let err = validate_scene_description(&Value::Object(map)).unwrap_err();
            prop_assert!(err.to_string().contains(FIELDS[drop]));
        }

        #[test]
        fn non_string_value_is_rejected(values in any::<[String; 4]>(), at in 0usize..4, bad in non_string()) {
            let mut map = object(&values);
            map.insert(FIELDS[at].to_string(), bad);
            let err = validate_scene_description(&Value::Object(map)).unwrap_err();
            prop_assert!(err.violations.iter().any(|v| v.contains(FIELDS[at])), "{:?}", err);
        }

        #[test]
        fn extra_field_is_rejected(values in any::<[String; 4]>(), key in "[a-z_]{1,12}", extra in any::<String>()) {
            prop_assume!(!FIELDS.contains(&key.as_str()));
            let mut map = object(&values);
            map.insert(key.clone(), Value::String(extra));
            let err = validate_scene_description(&Value::Object(map)).unwrap_err();
            prop_assert!(err.to_string().contains(&key), "{}", err);
        }

        #[test]
        fn arbitrary_json_never_panics(text in any::<String>()) {
            if let Ok(value) = serde_json::from_str::<Value>(&text) {
                let _ = validate_scene_description(&value);
            }
        }
    }

    #[test]
    fn every_violation_is_listed() {
        let err = validate_scene_description(&json!({"mood": 1, "x": 2})).unwrap_err();
        // mood has the wrong type; three fields are missing; x is extra.
        assert!(err.violations.len() >= 3, "{err:?}");
    }
}
