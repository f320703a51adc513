//! `--slots auto`: how many requests a server can serve at once on a GPU, from the model's own
//! numbers. Each slot holds a KV cache of `ctx_size` tokens; llama-server allocates them all at
//! start (`-c ctx_size × slots`, `-np slots`), beside the weights and its compute buffers. So the
//! slots that fit are what the free VRAM leaves after the weights and a margin, over one slot's
//! cache — at most [`MAX_AUTO_SLOTS`], at least 1 (the VRAM check then decides whether it starts).
//!
//! One slot's cache: 2 (K and V) × layers × KV heads × head size × tokens × the cache type's bytes
//! per element (f16 unless the server arguments set `--cache-type-k`/`-ctk` or `--cache-type-v`/
//! `-ctv`). The numbers come from the GGUF header (`{arch}.block_count`, `{arch}.attention.
//! head_count_kv`, `{arch}.embedding_length` / `{arch}.attention.head_count` or `{arch}.attention.
//! key_length`), the weights from the files' sizes.

use std::ffi::OsString;
use std::path::Path;

use super::{ConfigError, EngineConfig, Setting};
use crate::gguf::read::read_header;

/// The most slots `auto` picks: past 16 requests at once, llama-server's batches gain little and
/// each request waits longer for its image to be encoded (measured on H200, BENCHMARKS.md).
pub const MAX_AUTO_SLOTS: u32 = 16;

/// VRAM kept free beyond the weights and the KV cache: llama.cpp's compute buffers (the language
/// model's and the vision encoder's), the CUDA context, and other processes' growth.
pub const MARGIN_MIB: u64 = 1536;

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
        let number = |key: &str| header.numbers.get(&format!("{arch}.{key}")).copied();
        let needed = |key: &str| {
            number(key)
                .filter(|n| *n > 0)
                .ok_or_else(|| format!("its header has no {arch}.{key}"))
        };
        let layers = needed("block_count")?;
        let heads = needed("attention.head_count")?;
        let kv_heads = number("attention.head_count_kv")
            .filter(|n| *n > 0)
            .unwrap_or(heads);
        let key_size = match number("attention.key_length").filter(|n| *n > 0) {
            Some(size) => size,
            None => needed("embedding_length")? / heads,
        };
        let value_size = number("attention.value_length")
            .filter(|n| *n > 0)
            .unwrap_or(key_size);
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

/// What `auto` chose, and why, in words for a person.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct SlotChoice {
    /// The slots.
    pub slots: u32,
    /// The numbers behind it.
    pub why: String,
}

/// The slots that fit: `free_mib` less the weights and [`MARGIN_MIB`], over one slot's cache of
/// `slot_bytes`; between 1 and [`MAX_AUTO_SLOTS`]. A pure decision (the property tests hold it to
/// never overcommit when more than one slot is chosen).
pub fn choose_slots(slot_bytes: u64, weights_bytes: u64, free_mib: u64) -> SlotChoice {
    const MIB: u64 = 1 << 20;
    let weights_mib = weights_bytes.div_ceil(MIB);
    let slot_mib = slot_bytes.div_ceil(MIB).max(1);
    let room = free_mib.saturating_sub(weights_mib + MARGIN_MIB);
    let fit = room / slot_mib;
    let slots = u32::try_from(fit)
        .unwrap_or(u32::MAX)
        .clamp(1, MAX_AUTO_SLOTS);
    let limit = if fit > u64::from(MAX_AUTO_SLOTS) {
        format!(" ({fit} would fit; at most {MAX_AUTO_SLOTS})")
    } else if fit == 0 {
        " (not even one fits: the VRAM check decides whether it starts)".to_string()
    } else {
        String::new()
    };
    SlotChoice {
        slots,
        why: format!(
            "{free_mib} MiB free, less {weights_mib} MiB of weights and a {MARGIN_MIB} MiB \
             margin, leaves {room} MiB for KV caches of {slot_mib} MiB per slot{limit}"
        ),
    }
}

impl EngineConfig {
    /// The slots this configuration's model can serve at once with `free_mib` of VRAM (see the
    /// module): its KV shape from the model's header, its cache types from the server arguments,
    /// its weights from the files.
    ///
    /// ```no_run
    /// use engine_core::EngineConfig;
    ///
    /// let config = EngineConfig::builder("llava.gguf", "mmproj.gguf").ctx_size(2048).build()?;
    /// let choice = config.auto_slots(139_000)?;
    /// eprintln!("{} slots: {}", choice.slots, choice.why);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn auto_slots(&self, free_mib: u64) -> Result<SlotChoice, ConfigError> {
        let model = self.model();
        let shape = KvShape::of_model(model).map_err(|e| {
            ConfigError::new(
                Setting::Slots,
                format!(
                    "auto reads the model's shape, and {}: {e} — give a number of slots instead",
                    model.display()
                ),
            )
        })?;
        let cache = CacheTypes::from_server_args(self.extra_args())
            .map_err(|e| ConfigError::new(Setting::Args, e))?;
        let size = |path: &Path| std::fs::metadata(path).map_or(0, |m| m.len());
        let weights = size(model) + self.mmproj().map_or(0, size);
        let tokens = self.ctx_size();
        let mut choice = choose_slots(shape.bytes_per_slot(tokens, cache), weights, free_mib);
        choice.why = format!(
            "{}; one slot's cache: {tokens} tokens × {} layers × {} KV heads × ({} + {}) × {}/{}",
            choice.why,
            shape.layers,
            shape.kv_heads,
            shape.key_size,
            shape.value_size,
            cache.k.name(),
            cache.v.name()
        );
        Ok(choice)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::{Gguf, Value};
    use proptest::prelude::*;

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
    fn the_choice_says_its_numbers() {
        let choice = choose_slots(1 << 30, 4 << 30, 140_000);
        assert_eq!(choice.slots, MAX_AUTO_SLOTS);
        assert!(choice.why.contains("at most 16"), "{}", choice.why);
        let choice = choose_slots(1 << 30, 4 << 30, 4096 + MARGIN_MIB + 3 * 1024 + 10);
        assert_eq!(choice.slots, 3);
        let choice = choose_slots(1 << 30, 4 << 30, 1000);
        assert_eq!(choice.slots, 1);
        assert!(choice.why.contains("not even one"), "{}", choice.why);
    }

    proptest! {
        #[test]
        fn auto_never_overcommits_and_stays_in_bounds(
            slot_mib in 1u64..4096,
            weights_mib in 0u64..200_000,
            free_mib in 0u64..300_000,
        ) {
            let choice = choose_slots(slot_mib << 20, weights_mib << 20, free_mib);
            prop_assert!((1..=MAX_AUTO_SLOTS).contains(&choice.slots));
            if choice.slots > 1 {
                prop_assert!(weights_mib + MARGIN_MIB + u64::from(choice.slots) * slot_mib <= free_mib);
            }
            // One more slot would not have fitted, unless the cap held it back.
            if choice.slots < MAX_AUTO_SLOTS {
                prop_assert!(weights_mib + MARGIN_MIB + u64::from(choice.slots + 1) * slot_mib > free_mib);
            }
        }
    }
}
