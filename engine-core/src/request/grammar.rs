//! How a request holds the model to its schema ([`Constraint`]), and the schema's own GBNF grammar.
//!
//! Why the engine writes the grammar: sent as `response_format`, a schema makes llama-server (11434)
//! parse the generated text with its chat-output parser ("peg-native"), strict JSON to the end.
//! The grammar that constrains sampling accepts bytes that parser refuses (a byte token 0xF5–0xFF
//! decodes as a code point above U+10FFFF in `llama-grammar.cpp`, which a negated character class
//! lets through, and `common_parse_utf8_codepoint` calls it invalid), so an answer the grammar
//! allowed fails with HTTP 500 "The model produced output that
//! does not match the expected peg-native format" — a quarter of the answers of a random-weight
//! 7B model. Sent as `grammar`, the same constraint comes with no output parse: the server returns
//! the text as generated, and the engine validates it as it always does; the engine's grammar
//! also leaves those code points out (`COMMON`). The converter covers the
//! schemas CineCut sends (objects of strings, numbers, enums, arrays); a schema beyond it goes as
//! `response_format`, where the server converts it.

use std::fmt::Write as _;

use serde_json::{Map, Value};

/// How a request holds the model's answer to its schema.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Constraint {
    /// The engine's own GBNF grammar of the schema, sent as `grammar`: no output parse on the
    /// server. A schema beyond the engine's converter goes as `response_format`.
    #[default]
    Gbnf,
    /// `%llguidance` with the schema, sent as `grammar`: the server samples through llguidance
    /// (only a server built with `LLAMA_LLGUIDANCE`; others refuse the request, or abort: 9093
    /// does, and the request ends as [`crate::RequestError::ServerDied`] with its words).
    Llguidance,
    /// `response_format: json_schema`: the server converts the schema, and parses the output.
    ResponseFormat,
    /// No constraint (the answer is still validated): for measuring what the grammar costs.
    Off,
}

impl std::str::FromStr for Constraint {
    type Err = String;

    fn from_str(text: &str) -> Result<Constraint, String> {
        match text {
            "gbnf" => Ok(Constraint::Gbnf),
            "llguidance" => Ok(Constraint::Llguidance),
            "response-format" => Ok(Constraint::ResponseFormat),
            "off" => Ok(Constraint::Off),
            other => Err(format!(
                "unknown grammar {other:?}: choose gbnf, llguidance, response-format or off"
            )),
        }
    }
}

/// The GBNF grammar of `schema`, or `None` when the schema uses what this converter does not
/// cover (then the schema goes as `response_format`). Every text the grammar derives is JSON that
/// the schema accepts (the property test holds it to that); it need not derive every such text.
pub(crate) fn gbnf(schema: &Value) -> Option<String> {
    let mut grammar = Grammar::default();
    let root = grammar.rule_of(schema, 0)?;
    let mut text = format!("root ::= {root}\n");
    for (name, body) in &grammar.rules {
        let _ = writeln!(text, "{name} ::= {body}");
    }
    text.push_str(COMMON);
    Some(text)
}

/// The rules every grammar shares: whitespace (one space at most: a model that may write runs of
/// newlines and tabs can spend its whole `max_tokens` on them, as random weights do), a string's
/// characters, and numbers without exponents (an unbounded exponent is valid JSON that no `f64`
/// holds).
///
/// A string's characters leave out the code points no UTF-8 text holds: surrogates, and those
/// above U+10FFFF, which is what llama.cpp's grammar decodes a byte token 0xF5–0xFF into. Allowed,
/// such a byte reaches the answer as one to four U+FFFD, and a string bounded by `maxLength` comes
/// out too long (on an H200, a fifth of a random-weight 7B model's answers did). An escape `\uD…`
/// (a surrogate half, which JSON readers refuse alone) is left out likewise.
const COMMON: &str = r#"space ::= " "?
char ::= [^"\\\x7F\x00-\x1F\uD800-\uDFFF\U00110000-\U003FFFFF] | [\\] (["\\bfnrt] | "u" [0-9a-cA-Ce-fE-F] [0-9a-fA-F]{3})
string ::= "\"" char* "\"" space
integer ::= ("-"? ([0-9] | [1-9] [0-9]{0,15})) space
number ::= ("-"? ([0-9] | [1-9] [0-9]{0,15})) ("." [0-9]{1,16})? space
boolean ::= ("true" | "false") space
null ::= "null" space
"#;

/// How deep a schema may nest before the converter gives up (a self-similar schema is no issue:
/// `$ref` is not followed).
const MAX_DEPTH: usize = 16;

/// The keywords that only describe (they constrain nothing), which the converter may ignore.
const DESCRIPTIVE: &[&str] = &[
    "title",
    "description",
    "$schema",
    "$id",
    "$comment",
    "examples",
    "default",
    "deprecated",
    "readOnly",
    "writeOnly",
];

#[derive(Default)]
struct Grammar {
    /// Named rules in the order they were made.
    rules: Vec<(String, String)>,
}

impl Grammar {
    /// A new rule for `body`, by name.
    fn rule(&mut self, body: String) -> String {
        let name = format!("r{}", self.rules.len());
        self.rules.push((name.clone(), body));
        name
    }

    /// The expression (a rule reference or a short sequence) that derives `schema`'s values, each
    /// followed by `space`; `None` for what is not covered.
    fn rule_of(&mut self, schema: &Value, depth: usize) -> Option<String> {
        if depth > MAX_DEPTH {
            return None;
        }
        if schema == &Value::Bool(true) {
            return None;
        }
        let object = schema.as_object()?;
        let known = |keys: &[&str]| {
            object
                .keys()
                .all(|k| keys.contains(&k.as_str()) || DESCRIPTIVE.contains(&k.as_str()))
        };
        if let Some(value) = object.get("const") {
            return known(&["const", "type"]).then(|| literal(value));
        }
        if let Some(Value::Array(values)) = object.get("enum") {
            if !known(&["enum", "type"]) || values.is_empty() {
                return None;
            }
            let body = values.iter().map(literal).collect::<Vec<_>>().join(" | ");
            return Some(self.rule(body));
        }
        for alternatives in ["anyOf", "oneOf"] {
            if let Some(Value::Array(options)) = object.get(alternatives) {
                // oneOf's "exactly one" is left to the validation every answer goes through.
                if !known(&[alternatives]) || options.is_empty() {
                    return None;
                }
                let each: Option<Vec<String>> =
                    options.iter().map(|o| self.rule_of(o, depth + 1)).collect();
                return Some(self.rule(each?.join(" | ")));
            }
        }
        match object.get("type")? {
            Value::Array(types) => {
                let each: Option<Vec<String>> = types
                    .iter()
                    .map(|t| {
                        let mut one = object.clone();
                        one.insert("type".into(), t.clone());
                        self.rule_of(&Value::Object(one), depth + 1)
                    })
                    .collect();
                Some(self.rule(each?.join(" | ")))
            }
            Value::String(kind) => match kind.as_str() {
                "string" => self.string(object),
                "integer" if known(&["type"]) => Some("integer".into()),
                "number" if known(&["type"]) => Some("number".into()),
                "boolean" if known(&["type"]) => Some("boolean".into()),
                "null" if known(&["type"]) => Some("null".into()),
                "object" => self.object(object, depth),
                "array" => self.array(object, depth),
                _ => None,
            },
            _ => None,
        }
    }

    fn string(&mut self, object: &Map<String, Value>) -> Option<String> {
        let allowed = ["type", "minLength", "maxLength"];
        if !object
            .keys()
            .all(|k| allowed.contains(&k.as_str()) || DESCRIPTIVE.contains(&k.as_str()))
        {
            return None;
        }
        let min = count(object.get("minLength"))?.unwrap_or(0);
        let max = count(object.get("maxLength"))?;
        if max.is_some_and(|max| max < min) {
            return None;
        }
        if min == 0 && max.is_none() {
            return Some("string".into());
        }
        let repeat = match max {
            Some(max) => format!("{{{min},{max}}}"),
            None => format!("{{{min},}}"),
        };
        Some(self.rule(format!("\"\\\"\" char{repeat} \"\\\"\" space")))
    }

    fn object(&mut self, object: &Map<String, Value>, depth: usize) -> Option<String> {
        let allowed = ["type", "properties", "required", "additionalProperties"];
        if !object
            .keys()
            .all(|k| allowed.contains(&k.as_str()) || DESCRIPTIVE.contains(&k.as_str()))
        {
            return None;
        }
        let properties = match object.get("properties") {
            None => Map::new(),
            Some(Value::Object(p)) => p.clone(),
            Some(_) => return None,
        };
        let required: Vec<&str> = match object.get("required") {
            None => Vec::new(),
            Some(Value::Array(names)) => names.iter().map(Value::as_str).collect::<Option<_>>()?,
            Some(_) => return None,
        };
        // Every property written, in order: an optional one is written too (which the schema
        // allows), so the grammar stays a plain sequence. A required name that is no property
        // could only be met by an extra key: not covered.
        if required.iter().any(|r| !properties.contains_key(*r)) {
            return None;
        }
        let mut members = Vec::new();
        for (name, value) in &properties {
            let value = self.rule_of(value, depth + 1)?;
            let key = literal_text(&Value::String(name.clone()).to_string());
            members.push(format!("{key} space \":\" space {value}"));
        }
        let body = if members.is_empty() {
            "\"{\" space \"}\" space".to_string()
        } else {
            format!(
                "\"{{\" space {} \"}}\" space",
                members.join(" \",\" space ")
            )
        };
        Some(self.rule(body))
    }

    fn array(&mut self, object: &Map<String, Value>, depth: usize) -> Option<String> {
        let allowed = ["type", "items", "minItems", "maxItems"];
        if !object
            .keys()
            .all(|k| allowed.contains(&k.as_str()) || DESCRIPTIVE.contains(&k.as_str()))
        {
            return None;
        }
        let item = self.rule_of(object.get("items")?, depth + 1)?;
        let min = count(object.get("minItems"))?.unwrap_or(0);
        let max = count(object.get("maxItems"))?;
        if max.is_some_and(|max| max < min) {
            return None;
        }
        let rest = match (min, max) {
            (_, Some(0)) => return Some(self.rule("\"[\" space \"]\" space".into())),
            (0, Some(max)) => format!("(\",\" space {item}){{0,{}}}", max - 1),
            (0, None) => format!("(\",\" space {item})*"),
            (min, Some(max)) => format!("(\",\" space {item}){{{},{}}}", min - 1, max - 1),
            (min, None) => format!("(\",\" space {item}){{{},}}", min - 1),
        };
        let items = format!("{item} {rest}");
        let body = if min == 0 {
            format!("\"[\" space ({items})? \"]\" space")
        } else {
            format!("\"[\" space {items} \"]\" space")
        };
        Some(self.rule(body))
    }
}

/// The largest bound the converter writes: llama.cpp expands `x{0,N}` into N rules, so a larger
/// bound goes to the server's own converter.
const MAX_BOUND: u64 = 2000;

/// A length or count keyword: absent, or a whole number (a bad or huge one: not covered).
fn count(value: Option<&Value>) -> Option<Option<u64>> {
    match value {
        None => Some(None),
        Some(v) => v.as_u64().filter(|n| *n <= MAX_BOUND).map(Some),
    }
}

/// A JSON value as a GBNF literal, followed by `space`.
fn literal(value: &Value) -> String {
    format!("{} space", literal_text(&value.to_string()))
}

/// JSON text as a GBNF string literal (`"…"`, with `"` and `\` escaped; JSON text holds no raw
/// control characters, but they would be written as escapes).
fn literal_text(json: &str) -> String {
    let mut out = String::from("\"");
    for c in json.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    /// A random text the grammar derives: a small GBNF sampler over the subset the converter
    /// writes (literals, character classes the converter uses, groups, alternatives, repeats),
    /// enough to hold the converter to "everything it derives is valid".
    mod derive {
        use std::collections::HashMap;

        /// A small deterministic generator (splitmix64), seeded by the property test.
        pub struct TestRng(pub u64);

        impl TestRng {
            fn next(&mut self) -> u64 {
                self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
                let mut z = self.0;
                z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
                z ^ (z >> 31)
            }

            /// A number in `range` (inclusive or not, as given).
            pub fn random_range<R: std::ops::RangeBounds<usize>>(&mut self, range: R) -> usize {
                use std::ops::Bound::*;
                let low = match range.start_bound() {
                    Included(&n) => n,
                    Excluded(&n) => n + 1,
                    Unbounded => 0,
                };
                let high = match range.end_bound() {
                    Included(&n) => n + 1,
                    Excluded(&n) => n,
                    Unbounded => usize::MAX,
                };
                low + (self.next() % (high - low) as u64) as usize
            }
        }

        pub fn random_text(grammar: &str, rng: &mut TestRng) -> String {
            let rules: HashMap<&str, &str> = grammar
                .lines()
                .filter_map(|line| line.split_once(" ::= "))
                .collect();
            let mut out = String::new();
            expand(&rules, rules["root"], rng, &mut out, 0);
            out
        }

        fn expand(
            rules: &HashMap<&str, &str>,
            body: &str,
            rng: &mut TestRng,
            out: &mut String,
            depth: usize,
        ) {
            let alternatives = split_top(body, '|');
            let pick = alternatives[rng.random_range(0..alternatives.len())].trim();
            let mut rest = pick;
            while !rest.is_empty() {
                rest = rest.trim_start();
                if rest.is_empty() {
                    break;
                }
                let (atom, after) = take_atom(rest);
                rest = after;
                let (min, max, after) = repeat(rest);
                rest = after;
                let max = if depth > 6 { min } else { max.min(min + 3) };
                let times = rng.random_range(min..=max);
                for _ in 0..times {
                    emit(rules, atom, rng, out, depth);
                }
            }
        }

        fn emit(
            rules: &HashMap<&str, &str>,
            atom: &str,
            rng: &mut TestRng,
            out: &mut String,
            depth: usize,
        ) {
            if let Some(group) = atom.strip_prefix('(').and_then(|a| a.strip_suffix(')')) {
                expand(rules, group, rng, out, depth + 1);
            } else if let Some(text) = atom.strip_prefix('"').and_then(|a| a.strip_suffix('"')) {
                let mut chars = text.chars();
                while let Some(c) = chars.next() {
                    if c == '\\' {
                        match chars.next() {
                            Some('n') => out.push('\n'),
                            Some('t') => out.push('\t'),
                            Some('r') => out.push('\r'),
                            Some(other) => out.push(other),
                            None => {}
                        }
                    } else {
                        out.push(c);
                    }
                }
            } else if atom.starts_with('[') {
                out.push(class_member(atom, rng));
            } else {
                expand(rules, rules[atom], rng, out, depth + 1);
            }
        }

        /// A character of one of the classes the converter writes.
        fn class_member(class: &str, rng: &mut TestRng) -> char {
            match class {
                r#"[^"\\\x7F\x00-\x1F\uD800-\uDFFF\U00110000-\U003FFFFF]"# => {
                    let pool = ['a', 'Z', ' ', 'é', '€', '/', '\'', '😀', '\u{2028}'];
                    pool[rng.random_range(0..pool.len())]
                }
                r#"[\\]"# => '\\',
                r#"["\\bfnrt]"# => ['"', '\\', 'b', 'f', 'n', 'r', 't'][rng.random_range(0..7)],
                "[0-9a-fA-F]" => ['0', '9', 'a', 'F', 'd'][rng.random_range(0..5)],
                "[0-9a-cA-Ce-fE-F]" => ['0', '9', 'a', 'C', 'e', 'F'][rng.random_range(0..6)],
                "[0-9]" => char::from(b'0' + rng.random_range(0..10) as u8),
                "[1-9]" => char::from(b'1' + rng.random_range(0..9) as u8),
                r"[ \t]" => [' ', '\t'][rng.random_range(0..2)],
                other => panic!("a class the sampler does not know: {other}"),
            }
        }

        /// The first atom of `text` and the rest.
        fn take_atom(text: &str) -> (&str, &str) {
            let bytes = text.as_bytes();
            let end = match bytes[0] {
                b'"' => {
                    let mut i = 1;
                    while bytes[i] != b'"' {
                        i += if bytes[i] == b'\\' { 2 } else { 1 };
                    }
                    i + 1
                }
                b'[' => {
                    let mut i = 1;
                    while bytes[i] != b']' {
                        i += if bytes[i] == b'\\' { 2 } else { 1 };
                    }
                    i + 1
                }
                b'(' => {
                    let (mut depth, mut i, mut quoted, mut class) = (0, 0, false, false);
                    loop {
                        match bytes[i] {
                            b'\\' if quoted || class => i += 1,
                            b'"' if !class => quoted = !quoted,
                            b'[' if !quoted => class = true,
                            b']' if !quoted => class = false,
                            b'(' if !quoted && !class => depth += 1,
                            b')' if !quoted && !class => {
                                depth -= 1;
                                if depth == 0 {
                                    break i + 1;
                                }
                            }
                            _ => {}
                        }
                        i += 1;
                    }
                }
                _ => text
                    .find(|c: char| !(c.is_ascii_alphanumeric() || c == '-' || c == '_'))
                    .unwrap_or(text.len()),
            };
            (&text[..end], &text[end..])
        }

        /// A repeat after an atom: `*`, `+`, `?`, `{m}`, `{m,}`, `{m,n}`; (1, 1) without.
        fn repeat(text: &str) -> (usize, usize, &str) {
            match text.chars().next() {
                Some('*') => (0, 3, &text[1..]),
                Some('+') => (1, 3, &text[1..]),
                Some('?') => (0, 1, &text[1..]),
                Some('{') => {
                    let close = text.find('}').unwrap();
                    let inner = &text[1..close];
                    let (min, max) = match inner.split_once(',') {
                        None => (inner.parse().unwrap(), inner.parse().unwrap()),
                        Some((m, "")) => (m.parse().unwrap(), m.parse::<usize>().unwrap() + 3),
                        Some((m, n)) => (m.parse().unwrap(), n.parse().unwrap()),
                    };
                    (min, max, &text[close + 1..])
                }
                _ => (1, 1, text),
            }
        }

        /// `body` split at `sep` outside quotes, classes and groups.
        fn split_top(body: &str, sep: char) -> Vec<&str> {
            let mut parts = Vec::new();
            let (mut depth, mut quoted, mut class, mut start) = (0, false, false, 0);
            let mut chars = body.char_indices().peekable();
            while let Some((i, c)) = chars.next() {
                match c {
                    '\\' if quoted || class => {
                        chars.next();
                    }
                    '"' if !class => quoted = !quoted,
                    '[' if !quoted => class = true,
                    ']' if !quoted => class = false,
                    '(' if !quoted && !class => depth += 1,
                    ')' if !quoted && !class => depth -= 1,
                    c if c == sep && !quoted && !class && depth == 0 => {
                        parts.push(&body[start..i]);
                        start = i + 1;
                    }
                    _ => {}
                }
            }
            parts.push(&body[start..]);
            parts
        }
    }

    fn valid(schema: &Value, text: &str) -> Result<(), String> {
        let value: Value =
            serde_json::from_str(text).map_err(|e| format!("not JSON ({e}): {text:?}"))?;
        let validator = jsonschema::validator_for(schema).unwrap();
        match validator.validate(&value) {
            Ok(()) => Ok(()),
            Err(e) => Err(format!("{e}: {text}")),
        }
    }

    /// Schemas of the kinds CineCut sends, and of the kinds a user's `run` may.
    fn schemas() -> Vec<Value> {
        vec![
            crate::SCENE_DESCRIPTION_SCHEMA.clone(),
            json!({"type": "object", "properties": {
                "visual_content": {"type": "string", "maxLength": 120},
                "mood": {"type": "string", "minLength": 1, "maxLength": 40}},
                "required": ["visual_content", "mood"], "additionalProperties": false}),
            json!({"type": "object", "properties": {"begin_t": {"type": "number"},
                "escalation_t": {"type": "number"}, "climax_t": {"type": "number"}},
                "required": ["begin_t", "escalation_t", "climax_t"], "additionalProperties": false}),
            json!({"type": "object", "properties": {
                "kind": {"enum": ["cut", "fade", 3, null, "say \"hi\"\n"]},
                "n": {"type": "integer"}, "ok": {"type": "boolean"},
                "tags": {"type": "array", "items": {"type": "string", "maxLength": 5}, "minItems": 1, "maxItems": 3},
                "maybe": {"type": ["string", "null"]},
                "either": {"anyOf": [{"type": "integer"}, {"const": "none"}]},
                "empty": {"type": "object", "properties": {}},
                "nested": {"type": "object", "properties": {"x": {"type": "array", "items": {"type": "number"}}},
                    "required": ["x"]}},
                "required": ["kind", "n"]}),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]
        #[test]
        fn every_text_the_grammar_derives_is_valid_for_its_schema(which in 0usize..4, seed in any::<u64>()) {
            let schema = &schemas()[which];
            let grammar = gbnf(schema).expect("the converter covers these schemas");
            let mut rng = derive::TestRng(seed);
            let text = derive::random_text(&grammar, &mut rng);
            prop_assert!(valid(schema, &text).is_ok(), "{}\n{grammar}", valid(schema, &text).unwrap_err());
        }
    }

    #[test]
    fn what_the_converter_does_not_cover_goes_as_response_format() {
        for schema in [
            json!({"type": "integer", "minimum": 0, "maximum": 9}),
            json!({"type": "string", "pattern": "^a+$"}),
            json!({"type": "object", "properties": {"a": {"$ref": "#/$defs/x"}}}),
            json!({"type": "object", "required": ["b"], "properties": {"a": {"type": "string"}}}),
            json!({"type": "string", "format": "date"}),
            json!({"allOf": [{"type": "string"}]}),
            json!(true),
        ] {
            assert_eq!(gbnf(&schema), None, "{schema}");
        }
    }

    #[test]
    fn the_scene_grammar_reads_as_gbnf() {
        let grammar = gbnf(&crate::SCENE_DESCRIPTION_SCHEMA).unwrap();
        assert!(grammar.starts_with("root ::= r0\n"), "{grammar}");
        assert!(
            grammar.contains(
                r#"r0 ::= "{" space "\"visual_content\"" space ":" space string "," space"#
            ),
            "{grammar}"
        );
        assert!("gbnf".parse::<Constraint>() == Ok(Constraint::Gbnf));
        assert!(
            "grammar"
                .parse::<Constraint>()
                .unwrap_err()
                .contains("response-format")
        );
    }
}
