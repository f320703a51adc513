//! What a server costs on a GPU, from the model's own numbers: its weights (the files' sizes) and
//! one slot's KV cache. Each slot holds a cache of `ctx_size` tokens; llama-server allocates them
//! all at start (`-c ctx_size × slots`, `-np slots`), beside the weights and its compute buffers.
//! [`super::layout`] chooses servers and slots from these numbers ([`EngineConfig::budget`]).
//!
//! One slot's cache: 2 (K and V) × layers × KV heads × head size × tokens × the cache type's bytes
//! per element (f16 unless the server arguments set `--cache-type-k`/`-ctk` or `--cache-type-v`/
//! `-ctv`). The numbers come from the GGUF header (`{arch}.block_count`, `{arch}.attention.
//! head_count_kv`, `{arch}.embedding_length` / `{arch}.attention.head_count` or `{arch}.attention.
//! key_length`), the weights from the files' sizes.

use std::ffi::OsString;
use std::path::Path;

use super::EngineConfig;
use super::layout::Budget;
use crate::gguf::read::read_header;
use crate::request::Constraint;
use crate::setting::{ConfigError, Setting};

/// The shape of a model's KV cache, per token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvShape {
    /// Transformer layers (`block_count`).
    pub layers: u64,
    /// Heads of K and V (`head_count_kv`, else `head_count`: no grouped-query attention).
    pub kv_heads: u64,
    /// Size of a K head (`key_length`, else `embedding_length / head_count`).
    pub key_size: u64,
    /// Size of a V head (`value_length`, else the K head's).
    pub value_size: u64,
}

impl KvShape {
    /// Reads the shape from the GGUF header of `model`; the error names the key that is missing.
    pub fn of_model(model: &Path) -> Result<KvShape, String> {
        let header = read_header(model)?;
        let arch = header
            .architecture
            .ok_or("its header names no general.architecture")?;
        // A key that is there must be a positive whole number; `None` where it is missing.
        let number = |key: &str| -> Result<Option<u64>, String> {
            let key = format!("{arch}.{key}");
            match header.numbers.get(&key) {
                None => Ok(None),
                Some(Ok(n)) if *n > 0 => Ok(Some(*n)),
                Some(Ok(n)) => Err(format!(
                    "its header's {key} is {n}, not a positive whole number"
                )),
                Some(Err(what)) => Err(format!(
                    "its header's {key} is {what}, not a positive whole number"
                )),
            }
        };
        let needed =
            |key: &str| number(key)?.ok_or_else(|| format!("its header has no {arch}.{key}"));
        let layers = needed("block_count")?;
        let heads = needed("attention.head_count")?;
        let kv_heads = number("attention.head_count_kv")?.unwrap_or(heads);
        let key_size = match number("attention.key_length")? {
            Some(size) => size,
            None => {
                let width = needed("embedding_length")?;
                match width / heads {
                    0 => {
                        return Err(format!(
                            "its head size works out to 0 ({arch}.embedding_length {width} over \
                             {heads} heads): the header is wrong"
                        ));
                    }
                    size => size,
                }
            }
        };
        let value_size = number("attention.value_length")?.unwrap_or(key_size);
        Ok(KvShape {
            layers,
            kv_heads,
            key_size,
            value_size,
        })
    }

    /// Bytes of one slot's cache of `tokens` tokens, K and V stored as `cache`.
    pub fn bytes_per_slot(&self, tokens: u32, cache: CacheTypes) -> u64 {
        let per_layer_token = self.kv_heads as f64
            * (self.key_size as f64 * cache.k.bytes_per_element()
                + self.value_size as f64 * cache.v.bytes_per_element());
        (per_layer_token * self.layers as f64 * f64::from(tokens)).ceil() as u64
    }
}

/// A KV cache element type, as llama-server's `--cache-type-k`/`--cache-type-v` name it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CacheType {
    name: &'static str,
    bytes: f64,
}

const CACHE_TYPES: &[(&str, f64)] = &[
    ("f32", 4.0),
    ("f16", 2.0),
    ("bf16", 2.0),
    ("q8_0", 34.0 / 32.0),
    ("q5_1", 24.0 / 32.0),
    ("q5_0", 22.0 / 32.0),
    ("q4_1", 20.0 / 32.0),
    ("q4_0", 18.0 / 32.0),
    ("iq4_nl", 18.0 / 32.0),
];

impl CacheType {
    /// llama-server's default.
    pub const F16: CacheType = CacheType {
        name: "f16",
        bytes: 2.0,
    };

    /// The type of this name, if llama-server has it.
    pub fn named(name: &str) -> Option<CacheType> {
        CACHE_TYPES
            .iter()
            .find(|(n, _)| *n == name)
            .map(|&(name, bytes)| CacheType { name, bytes })
    }

    /// Bytes per element (a block's bytes over its elements, for the quantised types).
    pub fn bytes_per_element(self) -> f64 {
        self.bytes
    }

    /// Its name (`f16`, `q8_0`, ...).
    pub fn name(self) -> &'static str {
        self.name
    }
}

/// The K and V cache types of a server.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CacheTypes {
    /// K's.
    pub k: CacheType,
    /// V's.
    pub v: CacheType,
}

impl CacheTypes {
    /// The types the server arguments set (`--cache-type-k q8_0`, `-ctv=q4_0`, ...), f16 where
    /// they set none; an unknown name is refused with the names llama-server takes.
    pub fn from_server_args(args: &[OsString]) -> Result<CacheTypes, String> {
        let mut types = CacheTypes {
            k: CacheType::F16,
            v: CacheType::F16,
        };
        let args: Vec<String> = args
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        for (i, arg) in args.iter().enumerate() {
            let (flag, inline) = match arg.split_once('=') {
                Some((flag, value)) => (flag, Some(value.to_string())),
                None => (arg.as_str(), None),
            };
            let slot = match flag {
                "-ctk" | "--cache-type-k" => &mut types.k,
                "-ctv" | "--cache-type-v" => &mut types.v,
                _ => continue,
            };
            let value = inline
                .or_else(|| args.get(i + 1).cloned())
                .unwrap_or_default();
            *slot = CacheType::named(&value).ok_or_else(|| {
                let known: Vec<&str> = CACHE_TYPES.iter().map(|(n, _)| *n).collect();
                format!(
                    "{flag} {value:?} is no cache type llama-server has: use one of {}",
                    known.join(", ")
                )
            })?;
        }
        Ok(types)
    }
}

impl EngineConfig {
    /// What this configuration's servers cost on a GPU with `free_mib` free, whose servers share
    /// `cores` of the host: a copy of the weights per server (the files' sizes) and one slot's KV
    /// cache (its shape from the model's header, its types from the server arguments). The
    /// second value is how one slot's cache adds up, in words, or why it is unknown (`None` in
    /// the budget): `auto` slots need it.
    ///
    /// ```no_run
    /// use engine_core::EngineConfig;
    /// use engine_core::config::{Count, choose_layout};
    ///
    /// let config = EngineConfig::builder("llava.gguf", "mmproj.gguf").ctx_size(2048).build()?;
    /// let (budget, _) = config.budget(139_000, 16)?;
    /// let layout = choose_layout(&budget, Count::Auto, Count::Auto);
    /// eprintln!("{} servers, {} slots: {}", layout.servers, layout.slots, layout.why);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn budget(
        &self,
        free_mib: u64,
        cores: u32,
    ) -> Result<(Budget, Result<String, String>), ConfigError> {
        const MIB: u64 = 1 << 20;
        let model = self.model();
        let cache = CacheTypes::from_server_args(self.extra_args())
            .map_err(|e| ConfigError::new(Setting::Args, e))?;
        let size = |path: &Path| std::fs::metadata(path).map_or(0, |m| m.len());
        let weights = size(model) + self.mmproj().map_or(0, size);
        let tokens = self.ctx_size();
        let (slot_mib, slot) = match KvShape::of_model(model) {
            Ok(shape) => {
                let bytes = shape.bytes_per_slot(tokens, cache);
                let words = format!(
                    "{tokens} tokens × {} layers × {} KV heads × ({} + {}) × {}/{}",
                    shape.layers,
                    shape.kv_heads,
                    shape.key_size,
                    shape.value_size,
                    cache.k.name(),
                    cache.v.name()
                );
                (Some(bytes.div_ceil(MIB).max(1)), Ok(words))
            }
            Err(e) => (None, Err(format!("{}: {e}", model.display()))),
        };
        let budget = Budget {
            free_mib,
            weights_mib: weights.div_ceil(MIB),
            slot_mib,
            cores,
            grammar: self.sends_grammar(),
        };
        Ok((budget, slot))
    }

    /// Whether this engine's requests carry a grammar (every constraint but
    /// [`Constraint::Off`]), which each server's main loop applies on one thread.
    pub(crate) fn sends_grammar(&self) -> bool {
        self.describe_options().constraint_of() != Constraint::Off
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::{Gguf, Value};

    #[test]
    fn the_shape_of_llava_1_5_7b_gives_a_gibibyte_per_slot_of_2048_tokens() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.gguf");
        let mut gguf = Gguf::default();
        gguf.kv("general.architecture", Value::Str("llama".into()))
            .kv("llama.block_count", Value::U32(32))
            .kv("llama.embedding_length", Value::U32(4096))
            .kv("llama.attention.head_count", Value::U32(32))
            .kv("llama.attention.head_count_kv", Value::U32(32));
        gguf.write(&mut std::fs::File::create(&path).unwrap())
            .unwrap();
        let shape = KvShape::of_model(&path).unwrap();
        assert_eq!(
            shape,
            KvShape {
                layers: 32,
                kv_heads: 32,
                key_size: 128,
                value_size: 128
            }
        );
        let f16 = CacheTypes {
            k: CacheType::F16,
            v: CacheType::F16,
        };
        assert_eq!(shape.bytes_per_slot(2048, f16), 1 << 30);
        let q8 = CacheTypes::from_server_args(&["-ctk".into(), "q8_0".into()]).unwrap();
        assert_eq!(q8.k.name(), "q8_0");
        assert_eq!(
            shape.bytes_per_slot(2048, q8),
            (1 << 29) + (1 << 29) * 17 / 32
        );
    }

    #[test]
    fn a_header_without_the_numbers_and_a_bad_cache_type_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.gguf");
        let mut gguf = Gguf::default();
        gguf.kv("general.architecture", Value::Str("llama".into()));
        gguf.write(&mut std::fs::File::create(&path).unwrap())
            .unwrap();
        let err = KvShape::of_model(&path).unwrap_err();
        assert!(err.contains("llama.block_count"), "{err}");
        let err = CacheTypes::from_server_args(&["--cache-type-v=q9".into()]).unwrap_err();
        assert!(err.contains("q9") && err.contains("q8_0"), "{err}");
    }

    #[test]
    fn numbers_that_are_negative_fractional_or_zero_are_named_as_they_are() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.gguf");
        let write = |extra: (&str, Value)| {
            let mut gguf = Gguf::default();
            gguf.kv("general.architecture", Value::Str("llama".into()))
                .kv("llama.block_count", Value::U32(32))
                .kv("llama.embedding_length", Value::U32(16))
                .kv("llama.attention.head_count", Value::U32(32));
            gguf.kv(extra.0, extra.1);
            gguf.write(&mut std::fs::File::create(&path).unwrap())
                .unwrap();
            KvShape::of_model(&path).unwrap_err()
        };
        let err = write(("llama.block_count", Value::I32(-3)));
        assert!(err.contains("llama.block_count is -3"), "{err}");
        let err = write(("llama.block_count", Value::F32(32.5)));
        assert!(err.contains("is the float 32.5"), "{err}");
        // 16 wide over 32 heads: no head size at all.
        let err = write(("general.name", Value::Str("x".into())));
        assert!(err.contains("head size works out to 0"), "{err}");
    }
}
