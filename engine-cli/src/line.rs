//! An output line read back as written: its keys in their order, each value as its exact JSON text.
//! `--resume` and `merge` read earlier lines through it, so an id such as
//! `123456789012345678901234567890` or `1e0` is kept exactly as the caller wrote it (a number read
//! into a float would come back as `1.2345678901234568e+29` or `1.0`).

use std::fmt;

use serde::de::{MapAccess, Visitor};
use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::value::RawValue;

/// A JSON object whose values are kept as their text, in the order written.
#[derive(Debug, Default)]
pub struct RawLine(Vec<(String, Box<RawValue>)>);

impl RawLine {
    /// Reads one line; `None` if it is not a JSON object (a torn or corrupt line).
    pub fn parse(text: &[u8]) -> Option<RawLine> {
        serde_json::from_slice(text).ok()
    }

    /// The exact text of `key`'s value.
    pub fn raw(&self, key: &str) -> Option<&RawValue> {
        self.0.iter().find(|(k, _)| k == key).map(|(_, v)| &**v)
    }

    /// `key`'s value read as `T`.
    pub fn get<'a, T: Deserialize<'a>>(&'a self, key: &str) -> Option<T> {
        serde_json::from_str(self.raw(key)?.get()).ok()
    }

    /// Whether the line has `key`.
    pub fn has(&self, key: &str) -> bool {
        self.raw(key).is_some()
    }

    /// Drops `keys`, keeping the others in their order.
    pub fn without(mut self, keys: &[&str]) -> RawLine {
        self.0.retain(|(k, _)| !keys.contains(&k.as_str()));
        self
    }
}

impl<'de> Deserialize<'de> for RawLine {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Pairs;
        impl<'de> Visitor<'de> for Pairs {
            type Value = RawLine;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<RawLine, M::Error> {
                let mut pairs = Vec::new();
                while let Some(pair) = map.next_entry::<String, Box<RawValue>>()? {
                    pairs.push(pair);
                }
                Ok(RawLine(pairs))
            }
        }
        deserializer.deserialize_map(Pairs)
    }
}

impl Serialize for RawLine {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.0.len()))?;
        for (key, value) in &self.0 {
            map.serialize_entry(key, value)?;
        }
        map.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_come_back_as_written_in_their_order() {
        let text =
            r#"{"id":123456789012345678901234567890,"index":3,"n":1e0,"z":-0,"result":{"a":1}}"#;
        let line = RawLine::parse(text.as_bytes()).unwrap();
        assert_eq!(
            line.raw("id").unwrap().get(),
            "123456789012345678901234567890"
        );
        assert_eq!(line.get::<u64>("index"), Some(3));
        let back = serde_json::to_string(&line.without(&["index"])).unwrap();
        assert_eq!(
            back,
            r#"{"id":123456789012345678901234567890,"n":1e0,"z":-0,"result":{"a":1}}"#
        );
        assert!(RawLine::parse(b"[1]").is_none() && RawLine::parse(b"{\"a\":").is_none());
    }
}
