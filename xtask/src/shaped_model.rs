//! `cargo xtask shaped-model NAME --out DIR`: a GGUF pair with a real model's architecture and
//! random weights, so that the GPU does the work the real model costs without its weights (which
//! cannot be downloaded here).
//!
//! `llava-1.5-7b`: the language model as llama.cpp loads `llava-v1.5-7b` (llama: 32 layers, 4096
//! embedding, 11008 FFN, 32 heads, 32 000 tokens, 4096 context) in Q4_K_M — Q4_K everywhere, Q6_K
//! for `output` and for `attn_v` and `ffn_down` in the layers llama-quantize's `use_more_bits`
//! picks — and the CLIP ViT-L/14-336 projector in F16 (23 blocks of 1024, 16 heads, 4096 FFN,
//! quick-GELU, LLaVA-1.5's two-layer MLP `mm.0`/`mm.2` to 4096): 4.1 GB and 0.6 GB, as the real
//! pair. `llava-mini`: the same keys, tensor names and types at a few MB, for CI's real CPU server.
//!
//! The vocabulary is a SentencePiece one of its own (`<unk>`, `<s>`, `</s>`, the 256 byte tokens,
//! then pieces of one to four characters, longer pieces scored higher), so prompts split into
//! about as many tokens as with the real one. Quantised blocks are random but well-formed: fixed
//! sub-block scales and random quants give weights uniform in ±0.035 (std 0.02), as at
//! initialisation; no NaN or infinity anywhere. Random weights write random tokens: benchmark
//! under a schema whose strings have `maxLength`, so that every answer closes.

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use crate::rng::Rng;
use engine_core::gguf::{Fill, Gguf, TensorType, Value};

/// A model's shape.
#[derive(Debug, Clone, Copy)]
struct Shape {
    name: &'static str,
    vocab: u64,
    embd: u64,
    ff: u64,
    layers: u32,
    heads: u32,
    context: u32,
    vision: Vision,
}

#[derive(Debug, Clone, Copy)]
struct Vision {
    image: u32,
    patch: u32,
    embd: u64,
    ff: u64,
    layers: u32,
    heads: u32,
}

const SHAPES: &[Shape] = &[
    Shape {
        name: "llava-1.5-7b",
        vocab: 32000,
        embd: 4096,
        ff: 11008,
        layers: 32,
        heads: 32,
        context: 4096,
        vision: Vision {
            image: 336,
            patch: 14,
            embd: 1024,
            ff: 4096,
            layers: 23,
            heads: 16,
        },
    },
    Shape {
        name: "llava-mini",
        vocab: 32000,
        embd: 256,
        ff: 512,
        layers: 2,
        heads: 4,
        context: 4096,
        vision: Vision {
            image: 336,
            patch: 14,
            embd: 64,
            ff: 128,
            layers: 2,
            heads: 2,
        },
    },
];

/// The names `cargo xtask shaped-model` takes.
pub fn names() -> Vec<&'static str> {
    SHAPES.iter().map(|s| s.name).collect()
}

/// The f16 bits of `x` (normal values; those too small for one are 0).
fn f16_bits(x: f32) -> u16 {
    let bits = x.to_bits();
    let sign = ((bits >> 16) & 0x8000) as u16;
    let exponent = ((bits >> 23) & 0xff) as i32 - 127 + 15;
    if exponent <= 0 {
        return sign;
    }
    let exponent = exponent.min(30) as u16;
    sign | (exponent << 10) | ((bits >> 13) & 0x3ff) as u16
}

/// Weights this far from zero at most: std 0.02 for a uniform spread.
const SPREAD: f32 = 0.0346;

/// A fill of `elements` random values of `kind`, `seed`ed.
fn random(kind: TensorType, elements: u64, seed: u64) -> Fill {
    let mut rng = Rng(seed);
    let blocks = elements / kind.block().0;
    Box::new(move |out: &mut dyn Write| match kind {
        TensorType::F32 => write_values(out, elements, |o| {
            o.extend_from_slice(&rng.f32(SPREAD).to_le_bytes())
        }),
        TensorType::F16 => write_values(out, elements, |o| {
            o.extend_from_slice(&f16_bits(rng.f32(SPREAD)).to_le_bytes())
        }),
        TensorType::Q4K => write_blocks(out, blocks, 144, |block| {
            // w = d·32·q − dmin·32 with q in 0..15: uniform in ±7.5·d·32.
            let d = SPREAD / 7.5 / 32.0;
            block[0..2].copy_from_slice(&f16_bits(d).to_le_bytes());
            block[2..4].copy_from_slice(&f16_bits(d * 7.5).to_le_bytes());
            // Every sub-block's 6-bit scale and min 32, packed as ggml's get_scale_min_k4 reads.
            block[4..12].fill(0xA0);
            block[12..16].fill(0);
            rng.bytes(&mut block[16..]);
        }),
        TensorType::Q6K => write_blocks(out, blocks, 210, |block| {
            // w = d·16·(q − 32) with q in 0..63.
            rng.bytes(&mut block[..192]);
            block[192..208].fill(16);
            block[208..210].copy_from_slice(&f16_bits(SPREAD / 32.0 / 16.0).to_le_bytes());
        }),
    })
}

fn write_values(
    out: &mut dyn Write,
    elements: u64,
    mut one: impl FnMut(&mut Vec<u8>),
) -> io::Result<()> {
    let mut buffer = Vec::with_capacity(1 << 20);
    for _ in 0..elements {
        one(&mut buffer);
        if buffer.len() >= 1 << 20 {
            out.write_all(&buffer)?;
            buffer.clear();
        }
    }
    out.write_all(&buffer)
}

fn write_blocks(
    out: &mut dyn Write,
    blocks: u64,
    size: usize,
    mut one: impl FnMut(&mut [u8]),
) -> io::Result<()> {
    let per_buffer = (1 << 20) / size;
    let mut buffer = vec![0u8; per_buffer * size];
    let mut left = blocks;
    while left > 0 {
        let n = left.min(per_buffer as u64) as usize;
        for block in buffer[..n * size].chunks_mut(size) {
            one(block);
        }
        out.write_all(&buffer[..n * size])?;
        left -= n as u64;
    }
    Ok(())
}

/// Constant values (norms' weights 1, biases 0), as F32.
fn constant(value: f32, elements: u64) -> Fill {
    Box::new(move |out: &mut dyn Write| {
        write_values(out, elements, |o| o.extend_from_slice(&value.to_le_bytes()))
    })
}

/// llama-quantize's choice of layers that get more bits in Q4_K_M.
fn use_more_bits(layer: u32, layers: u32) -> bool {
    layer < layers / 8 || layer >= 7 * layers / 8 || (layer as i64 - (layers / 8) as i64) % 3 == 2
}

/// The SentencePiece vocabulary: specials, bytes, then pieces (▁ for a space) of one to four
/// characters, scored by length.
fn vocabulary(size: u64) -> (Vec<String>, Vec<f32>, Vec<i32>) {
    let mut tokens = vec!["<unk>".to_string(), "<s>".into(), "</s>".into()];
    let mut types = vec![2, 3, 3];
    for byte in 0..=255u8 {
        tokens.push(format!("<0x{byte:02X}>"));
        types.push(6);
    }
    let mut pieces: Vec<String> = (b'!'..=b'~').map(|b| (b as char).to_string()).collect();
    pieces.push("▁".into());
    let letters: Vec<char> = "▁abcdefghijklmnopqrstuvwxyz".chars().collect();
    for a in &letters {
        for b in &letters {
            pieces.push(format!("{a}{b}"));
        }
    }
    for a in &letters {
        for b in &letters {
            for c in &letters {
                pieces.push(format!("{a}{b}{c}"));
            }
        }
    }
    let common: Vec<char> = "▁etaoinshrdlcu".chars().collect();
    'four: for a in &common {
        for b in &common {
            for c in &common {
                for d in &common {
                    pieces.push(format!("{a}{b}{c}{d}"));
                    if (tokens.len() + pieces.len()) as u64 >= size {
                        break 'four;
                    }
                }
            }
        }
    }
    pieces.truncate(size as usize - tokens.len());
    let mut scores = vec![0.0; tokens.len()];
    for piece in pieces {
        scores.push(piece.chars().count() as f32);
        tokens.push(piece);
        types.push(1);
    }
    (tokens, scores, types)
}

/// LLaVA-1.5's conversation (Vicuna v1): `USER: ... ASSISTANT:`.
const VICUNA: &str = "{% for message in messages %}{% if message['role'] == 'system' %}{{ \
message['content'] + '\n' }}{% elif message['role'] == 'user' %}{{ 'USER: ' + message['content'] \
+ '\n' }}{% else %}{{ 'ASSISTANT: ' + message['content'] + '</s>' }}{% endif %}{% endfor %}{% if \
add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}";

fn language_model(shape: &Shape) -> Gguf {
    let (tokens, scores, types) = vocabulary(shape.vocab);
    let (embd, ff, vocab) = (shape.embd, shape.ff, shape.vocab);
    let mut g = Gguf::default();
    g.kv("general.architecture", Value::Str("llama".into()))
        .kv(
            "general.name",
            Value::Str(format!("cinecut-shaped-{}", shape.name)),
        )
        .kv("general.file_type", Value::U32(15)) // MOSTLY_Q4_K_M
        .kv("llama.vocab_size", Value::U32(vocab as u32))
        .kv("llama.context_length", Value::U32(shape.context))
        .kv("llama.embedding_length", Value::U32(embd as u32))
        .kv("llama.block_count", Value::U32(shape.layers))
        .kv("llama.feed_forward_length", Value::U32(ff as u32))
        .kv("llama.attention.head_count", Value::U32(shape.heads))
        .kv("llama.attention.head_count_kv", Value::U32(shape.heads))
        .kv(
            "llama.rope.dimension_count",
            Value::U32(embd as u32 / shape.heads),
        )
        .kv("llama.rope.freq_base", Value::F32(10000.0))
        .kv("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5))
        .kv("tokenizer.ggml.model", Value::Str("llama".into()))
        .kv("tokenizer.ggml.tokens", Value::ArrStr(tokens))
        .kv("tokenizer.ggml.scores", Value::ArrF32(scores))
        .kv("tokenizer.ggml.token_type", Value::ArrI32(types))
        .kv("tokenizer.ggml.unknown_token_id", Value::U32(0))
        .kv("tokenizer.ggml.bos_token_id", Value::U32(1))
        .kv("tokenizer.ggml.eos_token_id", Value::U32(2))
        .kv("tokenizer.ggml.add_bos_token", Value::Bool(true))
        .kv("tokenizer.ggml.add_eos_token", Value::Bool(false))
        .kv("tokenizer.chat_template", Value::Str(VICUNA.into()));
    let mut seed = 1u64;
    let mut next = || {
        seed += 1;
        seed
    };
    g.tensor_with(
        "token_embd.weight",
        &[embd, vocab],
        TensorType::Q4K,
        random(TensorType::Q4K, embd * vocab, next()),
    );
    g.tensor_with(
        "output_norm.weight",
        &[embd],
        TensorType::F32,
        constant(1.0, embd),
    );
    g.tensor_with(
        "output.weight",
        &[embd, vocab],
        TensorType::Q6K,
        random(TensorType::Q6K, embd * vocab, next()),
    );
    for layer in 0..shape.layers {
        let name = |t: &str| format!("blk.{layer}.{t}.weight");
        let more = if use_more_bits(layer, shape.layers) {
            TensorType::Q6K
        } else {
            TensorType::Q4K
        };
        g.tensor_with(
            &name("attn_norm"),
            &[embd],
            TensorType::F32,
            constant(1.0, embd),
        );
        for (t, kind) in [
            ("attn_q", TensorType::Q4K),
            ("attn_k", TensorType::Q4K),
            ("attn_v", more),
            ("attn_output", TensorType::Q4K),
        ] {
            g.tensor_with(
                &name(t),
                &[embd, embd],
                kind,
                random(kind, embd * embd, next()),
            );
        }
        g.tensor_with(
            &name("ffn_norm"),
            &[embd],
            TensorType::F32,
            constant(1.0, embd),
        );
        for (t, shape, kind) in [
            ("ffn_gate", [embd, ff], TensorType::Q4K),
            ("ffn_up", [embd, ff], TensorType::Q4K),
            ("ffn_down", [ff, embd], more),
        ] {
            g.tensor_with(&name(t), &shape, kind, random(kind, embd * ff, next()));
        }
    }
    g
}

fn projector(shape: &Shape) -> Gguf {
    let v = shape.vision;
    let (embd, ff) = (v.embd, v.ff);
    let positions = u64::from((v.image / v.patch).pow(2) + 1);
    let patch = u64::from(v.patch);
    let mut g = Gguf::default();
    g.kv("general.architecture", Value::Str("clip".into()))
        .kv(
            "general.name",
            Value::Str(format!("cinecut-shaped-{}-mmproj", shape.name)),
        )
        .kv("general.file_type", Value::U32(1)) // F16
        .kv("clip.has_vision_encoder", Value::Bool(true))
        .kv("clip.has_text_encoder", Value::Bool(false))
        .kv("clip.has_llava_projector", Value::Bool(true))
        .kv("clip.projector_type", Value::Str("mlp".into()))
        .kv("clip.use_gelu", Value::Bool(false)) // OpenAI CLIP: quick-GELU
        .kv("clip.vision.image_size", Value::U32(v.image))
        .kv("clip.vision.patch_size", Value::U32(v.patch))
        .kv("clip.vision.embedding_length", Value::U32(embd as u32))
        .kv("clip.vision.feed_forward_length", Value::U32(ff as u32))
        .kv("clip.vision.projection_dim", Value::U32(768))
        .kv("clip.vision.attention.head_count", Value::U32(v.heads))
        .kv("clip.vision.attention.layer_norm_epsilon", Value::F32(1e-5))
        .kv("clip.vision.block_count", Value::U32(v.layers))
        .kv(
            "clip.vision.image_mean",
            Value::ArrF32(vec![0.481_454_66, 0.457_827_5, 0.408_210_73]),
        )
        .kv(
            "clip.vision.image_std",
            Value::ArrF32(vec![0.268_629_55, 0.261_302_6, 0.275_777_1]),
        );
    let mut seed = 1000u64;
    let mut next = || {
        seed += 1;
        seed
    };
    let f16 = |g: &mut Gguf, name: &str, dims: &[u64], seed: u64| {
        let n = dims.iter().product();
        g.tensor_with(
            name,
            dims,
            TensorType::F16,
            random(TensorType::F16, n, seed),
        );
    };
    let f32 = |g: &mut Gguf, name: &str, n: u64, value: Option<f32>, seed: u64| {
        let fill = match value {
            Some(v) => constant(v, n),
            None => random(TensorType::F32, n, seed),
        };
        g.tensor_with(name, &[n], TensorType::F32, fill);
    };
    f32(&mut g, "v.class_embd", embd, None, next());
    f16(
        &mut g,
        "v.patch_embd.weight",
        &[patch, patch, 3, embd],
        next(),
    );
    f16(&mut g, "v.position_embd.weight", &[embd, positions], next());
    f32(&mut g, "v.pre_ln.weight", embd, Some(1.0), 0);
    f32(&mut g, "v.pre_ln.bias", embd, Some(0.0), 0);
    for layer in 0..v.layers {
        let name = |t: &str, part: &str| format!("v.blk.{layer}.{t}.{part}");
        for t in ["attn_q", "attn_k", "attn_v", "attn_out"] {
            f16(&mut g, &name(t, "weight"), &[embd, embd], next());
            f32(&mut g, &name(t, "bias"), embd, None, next());
        }
        for t in ["ln1", "ln2"] {
            f32(&mut g, &name(t, "weight"), embd, Some(1.0), 0);
            f32(&mut g, &name(t, "bias"), embd, Some(0.0), 0);
        }
        f16(&mut g, &name("ffn_up", "weight"), &[embd, ff], next());
        f32(&mut g, &name("ffn_up", "bias"), ff, None, next());
        f16(&mut g, &name("ffn_down", "weight"), &[ff, embd], next());
        f32(&mut g, &name("ffn_down", "bias"), embd, None, next());
    }
    f16(&mut g, "mm.0.weight", &[embd, shape.embd], next());
    f32(&mut g, "mm.0.bias", shape.embd, None, next());
    f16(&mut g, "mm.2.weight", &[shape.embd, shape.embd], next());
    f32(&mut g, "mm.2.bias", shape.embd, None, next());
    g
}

/// The benchmark's schema: LLaVA's four fields, each string bounded (random weights write random
/// tokens; `maxLength` makes every answer close).
pub const BOUNDED_SCHEMA: &str = r#"{"type": "object", "properties": {
  "visual_content": {"type": "string", "maxLength": 80}, "mood": {"type": "string", "maxLength": 32},
  "action": {"type": "string", "maxLength": 64}, "setting": {"type": "string", "maxLength": 48}},
  "required": ["visual_content", "mood", "action", "setting"], "additionalProperties": false}"#;

/// The pair's file names in `dir`: CineCut's own (`ggml-model-q4_k.gguf`, `mmproj-model-f16.gguf`).
pub fn files(dir: &Path) -> (PathBuf, PathBuf) {
    (
        dir.join("ggml-model-q4_k.gguf"),
        dir.join("mmproj-model-f16.gguf"),
    )
}

/// Writes the pair of shape `name` into `dir`.
pub fn write(name: &str, dir: &Path) -> Result<(PathBuf, PathBuf), String> {
    let shape = SHAPES
        .iter()
        .find(|s| s.name == name)
        .ok_or_else(|| format!("no shape {name:?}: one of {}", names().join(", ")))?;
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let (model, mmproj) = files(dir);
    for (path, mut gguf) in [(&model, language_model(shape)), (&mmproj, projector(shape))] {
        let written = (|| {
            let mut out = io::BufWriter::with_capacity(1 << 22, std::fs::File::create(path)?);
            gguf.write(&mut out)?;
            out.into_inner().map_err(|e| e.into_error())?.sync_all()
        })();
        written.map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    }
    Ok((model, mmproj))
}

/// `cargo xtask shaped-model NAME --out DIR`: writes the pair and prints its two paths.
pub fn run(name: &str, out: &Path) -> ExitCode {
    let written = write(name, out);
    crate::steps::printed(
        written.map(|(model, mmproj)| format!("{}\n{}", model.display(), mmproj.display())),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q4_k_m_gives_more_bits_to_the_layers_llama_quantize_does() {
        let more: Vec<u32> = (0..32).filter(|&i| use_more_bits(i, 32)).collect();
        assert_eq!(
            more,
            [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]
        );
    }

    #[test]
    fn f16_bits_match_known_values() {
        assert_eq!(f16_bits(1.0), 0x3C00);
        assert_eq!(f16_bits(-2.0), 0xC000);
        assert_eq!(f16_bits(0.0), 0);
        assert_eq!(f16_bits(1e-9), 0);
    }

    #[test]
    fn the_7b_pair_has_the_real_sizes() {
        let shape = &SHAPES[0];
        let gib = |g: Gguf| g.size() as f64 / f64::from(1 << 30);
        let (lm, proj) = (gib(language_model(shape)), gib(projector(shape)));
        // llava-v1.5-7b's ggml-model-q4_k.gguf is 3.8 GiB, its mmproj-model-f16.gguf 0.58 GiB.
        assert!((3.7..3.95).contains(&lm), "{lm} GiB");
        assert!((0.55..0.62).contains(&proj), "{proj} GiB");
        let (tokens, scores, types) = vocabulary(32000);
        assert_eq!(
            (tokens.len(), scores.len(), types.len()),
            (32000, 32000, 32000)
        );
        let unique: std::collections::HashSet<&String> = tokens.iter().collect();
        assert_eq!(unique.len(), 32000);
    }

    #[test]
    fn the_mini_pair_reads_back_with_its_kv_shape() {
        let dir = tempfile::tempdir().unwrap();
        let (model, _) = write("llava-mini", dir.path()).unwrap();
        let shape = engine_core::config::KvShape::of_model(&model).unwrap();
        assert_eq!((shape.layers, shape.kv_heads, shape.key_size), (2, 4, 64));
    }
}
