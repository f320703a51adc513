//! Reading a GGUF file's header and metadata keys (not its tensors): enough to tell, before any
//! process starts, whether a file can be loaded as the model or as the vision projector.
//!
//! Layout (little-endian, versions 2 and 3): `GGUF`, u32 version, u64 tensor count, u64 key count,
//! then each key as a u64-length string, a u32 type and a value. The writer beside it is its
//! partner: the contract suite checks the files it writes (the tiny model) through this reader.

use std::fs::File;
use std::io::{BufReader, Read, Seek};
use std::path::Path;

use super::ModelRole;

/// The metadata the engine checks.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct Header {
    pub(crate) version: u32,
    /// `general.architecture` (`llama`, `clip`, ...).
    pub(crate) architecture: Option<String>,
    /// `clip.projector_type`, or `clip.vision.projector_type` for projectors of several modalities.
    pub(crate) projector_type: Option<String>,
    /// The keys that size a model's KV cache (`llama.block_count`, `llama.attention.
    /// head_count_kv`, ...: any key ending in one of [`SHAPE_KEYS`]), by their full names: the
    /// whole number, or what the value is instead (`-3`, `the float 32.5`), for a message.
    pub(crate) numbers: std::collections::BTreeMap<String, Result<u64, String>>,
}

/// The ends of the integer keys [`Header::numbers`] keeps.
pub(crate) const SHAPE_KEYS: &[&str] = &[
    ".block_count",
    ".embedding_length",
    ".context_length",
    ".attention.head_count",
    ".attention.head_count_kv",
    ".attention.key_length",
    ".attention.value_length",
];

/// Longest key or string value read (keys are short; a chat template may be tens of KiB).
const MAX_STRING: u64 = 16 * 1024 * 1024;
/// Most keys read before giving up (real files have tens to a few hundred).
const MAX_KEYS: u64 = 1 << 20;

use super::value_type::{
    ARRAY as T_ARRAY, F32 as T_F32, F64 as T_F64, I32 as T_I32, I64 as T_I64, STRING as T_STRING,
    U32 as T_U32, U64 as T_U64,
};

/// Reads `path`'s header. The error says what is wrong, in words for a user.
pub(crate) fn read_header(path: &Path) -> Result<Header, String> {
    let file = File::open(path).map_err(|e| format!("cannot read it: {e}"))?;
    let mut r = BufReader::new(file);
    let mut magic = [0u8; 4];
    r.read_exact(&mut magic)
        .map_err(|_| "shorter than a GGUF header — the file is empty or cut off".to_string())?;
    if &magic != b"GGUF" {
        let hint = if magic.starts_with(b"ggml") || magic.starts_with(b"lmgg") || &magic == b"ggjt"
        {
            "an old GGML file: convert it to GGUF with llama.cpp's tools"
        } else {
            "not a GGUF file (llama-server loads only GGUF): check that you gave the right file"
        };
        return Err(format!("it starts with {magic:02x?}, {hint}"));
    }
    let version = u32_le(&mut r)?;
    if !(2..=3).contains(&version) {
        return Err(format!(
            "GGUF version {version}: llama-server reads versions 2 and 3 — re-convert the model with a current llama.cpp"
        ));
    }
    let _tensors = u64_le(&mut r)?;
    let keys = u64_le(&mut r)?;
    if keys > MAX_KEYS {
        return Err(format!(
            "claims {keys} metadata keys: the header is corrupt"
        ));
    }
    let mut header = Header {
        version,
        ..Header::default()
    };
    for _ in 0..keys {
        let key = string(&mut r)?;
        let kind = u32_le(&mut r)?;
        let wanted = matches!(
            key.as_str(),
            "general.architecture" | "clip.projector_type" | "clip.vision.projector_type"
        );
        if wanted && kind == T_STRING {
            let value = string(&mut r)?;
            match key.as_str() {
                "general.architecture" => header.architecture = Some(value),
                "clip.projector_type" => header.projector_type = Some(value),
                _ => {
                    header.projector_type.get_or_insert(value);
                }
            }
        } else if SHAPE_KEYS.iter().any(|end| key.ends_with(end)) {
            let number = number(&mut r, kind)?;
            header.numbers.insert(key, number);
        } else {
            skip_value(&mut r, kind, 0)?;
        }
    }
    Ok(header)
}

fn cut_off<E>(_: E) -> String {
    "its metadata is cut off — the file is incomplete (an interrupted download?)".to_string()
}

fn u32_le(r: &mut impl Read) -> Result<u32, String> {
    let mut bytes = [0u8; 4];
    r.read_exact(&mut bytes).map_err(cut_off)?;
    Ok(u32::from_le_bytes(bytes))
}

fn u64_le(r: &mut impl Read) -> Result<u64, String> {
    let mut bytes = [0u8; 8];
    r.read_exact(&mut bytes).map_err(cut_off)?;
    Ok(u64::from_le_bytes(bytes))
}

/// A value of type `kind` read as a whole number of zero or more; what it is instead for a
/// negative number, a float or any other type (which is skipped).
fn number<R: Read + Seek>(r: &mut BufReader<R>, kind: u32) -> Result<Result<u64, String>, String> {
    let negative = |n: i64| u64::try_from(n).map_err(|_| n.to_string());
    Ok(match kind {
        T_U32 => Ok(u64::from(u32_le(r)?)),
        T_I32 => negative(i64::from(u32_le(r)? as i32)),
        T_U64 => Ok(u64_le(r)?),
        T_I64 => negative(u64_le(r)? as i64),
        T_F32 => Err(format!("the float {}", f32::from_bits(u32_le(r)?))),
        T_F64 => Err(format!("the float {}", f64::from_bits(u64_le(r)?))),
        other => {
            skip_value(r, other, 0)?;
            Err(format!("a value of GGUF type {other}, not a number"))
        }
    })
}

fn string_len(r: &mut impl Read) -> Result<u64, String> {
    let len = u64_le(r)?;
    if len > MAX_STRING {
        return Err(format!(
            "holds a {len}-byte string in its metadata: the header is corrupt"
        ));
    }
    Ok(len)
}

fn string(r: &mut impl Read) -> Result<String, String> {
    let len = string_len(r)?;
    let mut bytes = Vec::with_capacity(len as usize);
    r.take(len).read_to_end(&mut bytes).map_err(cut_off)?;
    if bytes.len() as u64 != len {
        return Err(cut_off(()));
    }
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// The size of a fixed-size value type, `None` for strings, arrays and unknown types.
fn fixed_size(kind: u32) -> Option<i64> {
    match kind {
        0 | 1 | 7 => Some(1), // u8, i8, bool
        2 | 3 => Some(2),     // u16, i16
        4..=6 => Some(4),     // u32, i32, f32
        10..=12 => Some(8),   // u64, i64, f64
        _ => None,
    }
}

fn skip_value<R: Read + Seek>(r: &mut BufReader<R>, kind: u32, depth: u32) -> Result<(), String> {
    if let Some(size) = fixed_size(kind) {
        return r.seek_relative(size).map_err(cut_off);
    }
    match kind {
        T_STRING => {
            let len = string_len(r)?;
            r.seek_relative(len as i64).map_err(cut_off)
        }
        T_ARRAY if depth < 4 => {
            let element = u32_le(r)?;
            let count = u64_le(r)?;
            if let Some(size) = fixed_size(element) {
                let bytes = count
                    .checked_mul(size as u64)
                    .filter(|b| *b <= i64::MAX as u64)
                    .ok_or_else(|| {
                        "holds an impossibly long array: the header is corrupt".to_string()
                    })?;
                return r.seek_relative(bytes as i64).map_err(cut_off);
            }
            for _ in 0..count {
                skip_value(r, element, depth + 1)?;
            }
            Ok(())
        }
        _ => Err(format!(
            "holds a metadata value of unknown type {kind}: the header is corrupt or newer than this engine"
        )),
    }
}

/// `general.architecture` of the GGUF file at `path` (`llama`, `clip`, ...), if it has one; the
/// error says what is wrong with the file, in words for a user.
pub fn read_architecture(path: &Path) -> Result<Option<String>, String> {
    read_header(path).map(|header| header.architecture)
}

/// Checks that `path` can be loaded in `role`: GGUF 2 or 3; a model that is not a CLIP projector;
/// an mmproj that is one, with its projector type.
pub(crate) fn check_role(role: ModelRole, path: &Path) -> Result<(), String> {
    let header = read_header(path)?;
    let architecture = header.architecture.as_deref();
    match role {
        ModelRole::Mmproj if architecture != Some("clip") => Err(format!(
            "general.architecture is {}, not clip: this is not a vision projector — give the \
             model's mmproj file (often mmproj-*.gguf)",
            architecture.map_or("missing".into(), |a| format!("{a:?}"))
        )),
        ModelRole::Mmproj if header.projector_type.is_none() => Err(
            "no clip.projector_type key: llama-server refuses to load it — add the key (`mlp` for \
             LLaVA-1.5) with gguf-py's gguf_new_metadata.py, or re-convert the projector with a \
             current llama.cpp"
                .into(),
        ),
        ModelRole::Model if architecture == Some("clip") => Err(
            "this is a vision projector (general.architecture clip), not a language model — pass it \
             as the mmproj, and the language model as the model"
                .into(),
        ),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::{Gguf, Value};
    use std::io::Write;

    /// A GGUF header with string keys (and, for the skipping paths, an int, a float array and a
    /// string array).
    fn gguf(version: u32, keys: &[(&str, &str)]) -> Vec<u8> {
        let mut file = Gguf::default();
        file.version(version)
            .kv("general.alignment", Value::U32(32))
            .kv("tokenizer.ggml.scores", Value::ArrF32(vec![0.0, 0.0]))
            .kv(
                "tokenizer.ggml.tokens",
                Value::ArrStr(vec!["<s>".into(), "</s>".into()]),
            );
        for (key, value) in keys {
            file.kv(key, Value::Str(value.to_string()));
        }
        let mut out = Vec::new();
        file.write(&mut out).unwrap();
        out
    }

    fn file(bytes: &[u8]) -> tempfile::NamedTempFile {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        file.write_all(bytes).unwrap();
        file
    }

    #[test]
    fn keys_after_arrays_and_numbers_are_found() {
        let model = file(&gguf(3, &[("general.architecture", "llama")]));
        let header = read_header(model.path()).unwrap();
        assert_eq!(header.architecture.as_deref(), Some("llama"));
        let mixed = file(&gguf(
            3,
            &[
                ("general.architecture", "clip"),
                ("clip.vision.projector_type", "gemma3"),
            ],
        ));
        assert_eq!(
            read_header(mixed.path()).unwrap().projector_type.as_deref(),
            Some("gemma3")
        );
        assert!(check_role(ModelRole::Mmproj, mixed.path()).is_ok());
        assert!(check_role(ModelRole::Model, model.path()).is_ok());
    }

    #[test]
    fn each_wrong_file_is_told_apart() {
        let projector = gguf(
            3,
            &[
                ("general.architecture", "clip"),
                ("clip.projector_type", "mlp"),
            ],
        );
        let model = gguf(2, &[("general.architecture", "llama")]);
        let no_type = gguf(3, &[("general.architecture", "clip")]);
        let cases: [(ModelRole, Vec<u8>, &str); 7] = [
            (ModelRole::Mmproj, no_type, "no clip.projector_type"),
            (ModelRole::Mmproj, model.clone(), "not a vision projector"),
            (ModelRole::Model, projector.clone(), "pass it as the mmproj"),
            (
                ModelRole::Model,
                b"PK\x03\x04zip".to_vec(),
                "not a GGUF file",
            ),
            (ModelRole::Model, Vec::new(), "empty or cut off"),
            (ModelRole::Model, gguf(1, &[]), "GGUF version 1"),
            (
                ModelRole::Model,
                model[..model.len() - 3].to_vec(),
                "cut off",
            ),
        ];
        for (what, bytes, needle) in cases {
            let f = file(&bytes);
            let err = check_role(what, f.path()).unwrap_err();
            assert!(err.contains(needle), "{what}: {err}");
        }
        assert!(check_role(ModelRole::Mmproj, file(&projector).path()).is_ok());
    }

    #[test]
    fn corrupt_lengths_are_errors_not_allocations() {
        let mut bytes = b"GGUF".to_vec();
        bytes.extend(3u32.to_le_bytes());
        bytes.extend(0u64.to_le_bytes());
        bytes.extend(1u64.to_le_bytes());
        bytes.extend(u64::MAX.to_le_bytes()); // the first key's length
        let err = read_header(file(&bytes).path()).unwrap_err();
        assert!(err.contains("corrupt"), "{err}");
    }

    proptest::proptest! {
        #[test]
        fn any_bytes_after_the_magic_never_panic(tail in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..256)) {
            let mut bytes = b"GGUF\x03\x00\x00\x00".to_vec();
            bytes.extend(tail);
            let _ = read_header(file(&bytes).path());
        }
    }
}
