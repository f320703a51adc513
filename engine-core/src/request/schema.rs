//! [`Schema`]: a caller's JSON schema, compiled once, that constrains the server's output and
//! validates every answer.

use std::path::Path;
use std::sync::Arc;

use serde_json::Value;

/// A JSON schema for answers, compiled once: cheap to clone and to share between threads.
///
/// ```
/// use engine_core::Schema;
/// use serde_json::json;
///
/// let anchors = Schema::new("structural_anchors", json!({
///     "type": "object",
///     "properties": {
///         "begin_t": {"type": "number"},
///         "escalation_t": {"type": "number"},
///         "climax_t": {"type": "number"},
///     },
///     "required": ["begin_t", "escalation_t", "climax_t"],
///     "additionalProperties": false,
/// }))?;
/// assert!(anchors.validate(&json!({"begin_t": 1, "escalation_t": 2, "climax_t": 3})).is_ok());
/// let err = anchors.validate(&json!({"begin_t": "soon"})).unwrap_err();
/// assert!(err.to_string().contains("escalation_t"));
/// # Ok::<(), engine_core::error::SchemaError>(())
/// ```
#[derive(Clone)]
pub struct Schema {
    name: Arc<str>,
    value: Arc<Value>,
    validator: Arc<jsonschema::Validator>,
    /// Its GBNF grammar, where the engine's converter covers it.
    gbnf: Option<Arc<str>>,
}

impl std::fmt::Debug for Schema {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Schema")
            .field("name", &self.name)
            .field("value", &self.value)
            .finish_non_exhaustive()
    }
}

/// A schema the engine cannot use: not valid JSON Schema, not an object, a bad name, an unreadable
/// file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("schema {name}: {reason}")]
pub struct SchemaError {
    /// The schema's name or file.
    pub name: String,
    /// What is wrong, and what to do.
    pub reason: String,
}

/// A value that does not match a [`Schema`]; lists every violation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a {schema}: {}", violations.join("; "))]
pub struct SchemaViolation {
    /// The schema's name.
    pub schema: String,
    /// One entry per violation, each naming where it is.
    pub violations: Vec<String>,
}

impl Schema {
    /// Compiles `schema` under `name` (letters, digits, `_` and `-`, at most 64: the name travels
    /// in the request, where OpenAI-style servers demand that form).
    pub fn new(name: impl Into<String>, schema: Value) -> Result<Schema, SchemaError> {
        let name = name.into();
        let fail = |reason: String| {
            Err(SchemaError {
                name: name.clone(),
                reason,
            })
        };
        let name_ok = !name.is_empty()
            && name.len() <= 64
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
        if !name_ok {
            return fail(
                "the name must be 1 to 64 letters, digits, `_` or `-` — rename it".to_string(),
            );
        }
        if !schema.is_object() {
            return fail(format!(
                "a schema is a JSON object, not {} — give an object such as {{\"type\": \"object\", ...}}",
                crate::util::truncate(&schema.to_string(), 80)
            ));
        }
        let validator = match jsonschema::validator_for(&schema) {
            Ok(validator) => validator,
            Err(e) => return fail(format!("not a valid JSON Schema: {e}")),
        };
        Ok(Schema {
            name: name.into(),
            gbnf: super::grammar::gbnf(&schema).map(Arc::from),
            value: Arc::new(schema),
            validator: Arc::new(validator),
        })
    }

    /// Reads and compiles a schema file; its name is the file's stem (`anchors.json` → `anchors`,
    /// characters the name cannot hold replaced by `_`).
    pub fn from_file(path: &Path) -> Result<Schema, SchemaError> {
        let shown = path.display().to_string();
        let fail = |reason: String| SchemaError {
            name: shown.clone(),
            reason,
        };
        let text =
            std::fs::read_to_string(path).map_err(|e| fail(format!("cannot read it: {e}")))?;
        let value: Value = serde_json::from_str(&text)
            .map_err(|e| fail(format!("not JSON ({e}) — check the file")))?;
        let stem = path
            .file_stem()
            .map(|s| s.to_string_lossy())
            .unwrap_or_default();
        let mut name: String = stem
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .take(64)
            .collect();
        if name.is_empty() {
            name = "schema".into();
        }
        Schema::new(name, value).map_err(|e| fail(e.reason))
    }

    /// The name sent with the schema.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its GBNF grammar (the engine's own conversion), where the converter covers it: what a
    /// request sends as `grammar` (see [`crate::request::Constraint`]).
    pub fn gbnf(&self) -> Option<&str> {
        self.gbnf.as_deref()
    }

    /// The schema as given.
    pub fn value(&self) -> &Value {
        &self.value
    }

    /// Checks `value` against the schema; the error lists every violation with where it is.
    pub fn validate(&self, value: &Value) -> Result<(), SchemaViolation> {
        let violations: Vec<String> = self
            .validator
            .iter_errors(value)
            .map(|e| {
                let at = e.instance_path().to_string();
                if at.is_empty() {
                    e.to_string()
                } else {
                    format!("{at}: {e}")
                }
            })
            .collect();
        if violations.is_empty() {
            Ok(())
        } else {
            Err(SchemaViolation {
                schema: self.name.to_string(),
                violations,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn bad_schemas_and_names_are_refused_with_the_reason() {
        let object = json!({"type": "object"});
        for (name, schema, needle) in [
            ("has space", object.clone(), "rename"),
            ("", object.clone(), "rename"),
            ("ok", json!(["not", "an", "object"]), "JSON object"),
            (
                "ok",
                json!({"type": "no-such-type"}),
                "not a valid JSON Schema",
            ),
        ] {
            let err = Schema::new(name, schema).unwrap_err().to_string();
            assert!(err.contains(needle), "{err}");
        }
    }

    #[test]
    fn a_schema_file_is_named_after_its_stem() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("story anchors.json");
        std::fs::write(&path, r#"{"type": "object"}"#).unwrap();
        assert_eq!(Schema::from_file(&path).unwrap().name(), "story_anchors");
        std::fs::write(&path, "{").unwrap();
        let err = Schema::from_file(&path).unwrap_err().to_string();
        assert!(
            err.contains("story anchors.json") && err.contains("not JSON"),
            "{err}"
        );
        let missing = Schema::from_file(&dir.path().join("nope.json")).unwrap_err();
        assert!(missing.reason.contains("cannot read"), "{missing}");
    }
}
