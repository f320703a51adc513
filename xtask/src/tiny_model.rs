//! The project's own tiny vision-language pair, for running the *real* llama-server without
//! downloading weights: a `llama`-architecture text model and a LLaVA-1.5-style CLIP mmproj, a few
//! hundred KB, deterministic from a seed.
//!
//! Text model: 2 layers, n_embd 64, 4 heads, ff 128, F32; a byte-level `gpt2` vocabulary of its own
//! (the 256 GPT-2 byte symbols and 7 ChatML/control tokens, no merges) with a ChatML template.
//! mmproj: `clip.projector_type = mlp` (LLaVA-1.5: `mm.0`, GELU, `mm.2`), a CLIP ViT of 2 blocks,
//! width 32, 2 heads, ff 64, image 32, patch 8. `mm.2` maps to the text width; the vision ff differs
//! from the vision width (llama.cpp needs both).
//!
//! Random weights rarely close a JSON object before `max_tokens`. So the weights are random except:
//! every token embedding shares one direction, the attention and FFN output projections are zero (the
//! residual stream carries that direction unchanged), and the output row of `"` points along it. Under
//! the server's JSON-schema grammar the `"` token then wins wherever it is allowed, so each string
//! closes at once and every answer is short, complete and schema-valid.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use crate::steps::target_dir;

use crate::rng::Rng;
use engine_core::gguf::{Gguf, Value};

const N_EMBD: u64 = 64;
const N_HEAD: u32 = 4;
const N_FF: u64 = 128;
const N_LAYER: u32 = 2;
const V_EMBD: u64 = 32;
const V_HEAD: u32 = 2;
const V_FF: u64 = 64;
const V_LAYER: u32 = 2;
const IMAGE: u32 = 32;
const PATCH: u32 = 8;

const SPECIALS: [&str; 7] = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|pad|>",
    "<unk>",
    "<|reserved_0|>",
    "<|reserved_1|>",
];

const CHATML: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + \
message['content'] + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ \
'<|im_start|>assistant\n' }}{% endif %}";

/// GPT-2's byte-to-unicode table: the printable symbol that stands for each byte.
fn byte_symbols() -> Vec<String> {
    let mut printable: Vec<u32> = (b'!' as u32..=b'~' as u32).collect();
    printable.extend(0xA1..=0xAC);
    printable.extend(0xAE..=0xFF);
    let mut extra = 0;
    (0u32..256)
        .map(|b| {
            let code = if printable.contains(&b) {
                b
            } else {
                extra += 1;
                255 + extra
            };
            char::from_u32(code).unwrap().to_string()
        })
        .collect()
}

fn text_model(seed: u64) -> Gguf {
    let mut rng = Rng(seed);
    let symbols = byte_symbols();
    let quote = symbols[usize::from(b'"')].clone();
    let mut tokens = symbols;
    let mut types = vec![1i32; tokens.len()]; // normal
    for special in SPECIALS {
        tokens.push(special.to_string());
        types.push(3); // control
    }
    let n_vocab = tokens.len() as u64;
    let quote_id = tokens.iter().position(|t| *t == quote).unwrap();
    let id = |name: &str| tokens.iter().position(|t| t == name).unwrap() as u32;

    let mut g = Gguf::default();
    g.kv("general.architecture", Value::Str("llama".into()))
        .kv("general.name", Value::Str("cinecut-tiny-llava".into()))
        .kv("general.file_type", Value::U32(0))
        .kv("llama.vocab_size", Value::U32(n_vocab as u32))
        .kv("llama.context_length", Value::U32(4096))
        .kv("llama.embedding_length", Value::U32(N_EMBD as u32))
        .kv("llama.block_count", Value::U32(N_LAYER))
        .kv("llama.feed_forward_length", Value::U32(N_FF as u32))
        .kv("llama.attention.head_count", Value::U32(N_HEAD))
        .kv("llama.attention.head_count_kv", Value::U32(N_HEAD))
        .kv(
            "llama.rope.dimension_count",
            Value::U32(N_EMBD as u32 / N_HEAD),
        )
        .kv("llama.rope.freq_base", Value::F32(10000.0))
        .kv("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5))
        .kv("tokenizer.ggml.model", Value::Str("gpt2".into()))
        .kv("tokenizer.ggml.pre", Value::Str("default".into()))
        .kv("tokenizer.ggml.tokens", Value::ArrStr(tokens.clone()))
        .kv("tokenizer.ggml.token_type", Value::ArrI32(types))
        .kv("tokenizer.ggml.merges", Value::ArrStr(Vec::new()))
        .kv(
            "tokenizer.ggml.bos_token_id",
            Value::U32(id("<|endoftext|>")),
        )
        .kv("tokenizer.ggml.eos_token_id", Value::U32(id("<|im_end|>")))
        .kv("tokenizer.ggml.padding_token_id", Value::U32(id("<|pad|>")))
        .kv("tokenizer.ggml.add_bos_token", Value::Bool(false))
        .kv("tokenizer.chat_template", Value::Str(CHATML.into()));

    // One shared direction d (entries ±1) in every token embedding, plus a little noise.
    let direction: Vec<f32> = (0..N_EMBD)
        .map(|_| if rng.next() & 1 == 0 { 1.0 } else { -1.0 })
        .collect();
    let mut embd = Vec::with_capacity((N_EMBD * n_vocab) as usize);
    for _ in 0..n_vocab {
        embd.extend(direction.iter().map(|d| d + rng.f32(0.05)));
    }
    g.tensor_f32("token_embd.weight", &[N_EMBD, n_vocab], embd);
    g.tensor_f32("output_norm.weight", &[N_EMBD], vec![1.0; N_EMBD as usize]);
    let mut output = rng.vec(N_EMBD * n_vocab, 0.01);
    let row = quote_id * N_EMBD as usize;
    for (i, d) in direction.iter().enumerate() {
        output[row + i] = d * 0.5;
    }
    g.tensor_f32("output.weight", &[N_EMBD, n_vocab], output);
    for layer in 0..N_LAYER {
        let name = |t: &str| format!("blk.{layer}.{t}.weight");
        g.tensor_f32(&name("attn_norm"), &[N_EMBD], vec![1.0; N_EMBD as usize]);
        for t in ["attn_q", "attn_k", "attn_v"] {
            g.tensor_f32(&name(t), &[N_EMBD, N_EMBD], rng.vec(N_EMBD * N_EMBD, 0.1));
        }
        g.tensor_f32(
            &name("attn_output"),
            &[N_EMBD, N_EMBD],
            vec![0.0; (N_EMBD * N_EMBD) as usize],
        );
        g.tensor_f32(&name("ffn_norm"), &[N_EMBD], vec![1.0; N_EMBD as usize]);
        g.tensor_f32(
            &name("ffn_gate"),
            &[N_EMBD, N_FF],
            rng.vec(N_EMBD * N_FF, 0.1),
        );
        g.tensor_f32(
            &name("ffn_up"),
            &[N_EMBD, N_FF],
            rng.vec(N_EMBD * N_FF, 0.1),
        );
        g.tensor_f32(
            &name("ffn_down"),
            &[N_FF, N_EMBD],
            vec![0.0; (N_FF * N_EMBD) as usize],
        );
    }
    g
}

fn mmproj(seed: u64) -> Gguf {
    let mut rng = Rng(seed ^ 0x5EED_C11F);
    let n_pos = u64::from((IMAGE / PATCH) * (IMAGE / PATCH) + 1);
    let mut g = Gguf::default();
    g.kv("general.architecture", Value::Str("clip".into()))
        .kv("general.name", Value::Str("cinecut-tiny-mmproj".into()))
        .kv("general.file_type", Value::U32(0))
        .kv("clip.has_vision_encoder", Value::Bool(true))
        .kv("clip.has_text_encoder", Value::Bool(false))
        .kv("clip.has_llava_projector", Value::Bool(true))
        .kv("clip.projector_type", Value::Str("mlp".into()))
        .kv("clip.use_gelu", Value::Bool(true))
        .kv("clip.vision.image_size", Value::U32(IMAGE))
        .kv("clip.vision.patch_size", Value::U32(PATCH))
        .kv("clip.vision.embedding_length", Value::U32(V_EMBD as u32))
        .kv("clip.vision.feed_forward_length", Value::U32(V_FF as u32))
        .kv("clip.vision.projection_dim", Value::U32(N_EMBD as u32))
        .kv("clip.vision.attention.head_count", Value::U32(V_HEAD))
        .kv("clip.vision.attention.layer_norm_epsilon", Value::F32(1e-5))
        .kv("clip.vision.block_count", Value::U32(V_LAYER))
        .kv(
            "clip.vision.image_mean",
            Value::ArrF32(vec![0.481_454_66, 0.457_827_5, 0.408_210_73]),
        )
        .kv(
            "clip.vision.image_std",
            Value::ArrF32(vec![0.268_629_55, 0.261_302_6, 0.275_777_1]),
        );
    let p = u64::from(PATCH);
    g.tensor_f32("v.class_embd", &[V_EMBD], rng.vec(V_EMBD, 0.1));
    g.tensor_f32(
        "v.patch_embd.weight",
        &[p, p, 3, V_EMBD],
        rng.vec(p * p * 3 * V_EMBD, 0.1),
    );
    g.tensor_f32(
        "v.position_embd.weight",
        &[V_EMBD, n_pos],
        rng.vec(V_EMBD * n_pos, 0.1),
    );
    g.tensor_f32("v.pre_ln.weight", &[V_EMBD], vec![1.0; V_EMBD as usize]);
    g.tensor_f32("v.pre_ln.bias", &[V_EMBD], vec![0.0; V_EMBD as usize]);
    for layer in 0..V_LAYER {
        let name = |t: &str, part: &str| format!("v.blk.{layer}.{t}.{part}");
        for t in ["attn_q", "attn_k", "attn_v", "attn_out"] {
            g.tensor_f32(
                &name(t, "weight"),
                &[V_EMBD, V_EMBD],
                rng.vec(V_EMBD * V_EMBD, 0.1),
            );
            g.tensor_f32(&name(t, "bias"), &[V_EMBD], rng.vec(V_EMBD, 0.01));
        }
        for t in ["ln1", "ln2"] {
            g.tensor_f32(&name(t, "weight"), &[V_EMBD], vec![1.0; V_EMBD as usize]);
            g.tensor_f32(&name(t, "bias"), &[V_EMBD], vec![0.0; V_EMBD as usize]);
        }
        g.tensor_f32(
            &name("ffn_up", "weight"),
            &[V_EMBD, V_FF],
            rng.vec(V_EMBD * V_FF, 0.1),
        );
        g.tensor_f32(&name("ffn_up", "bias"), &[V_FF], rng.vec(V_FF, 0.01));
        g.tensor_f32(
            &name("ffn_down", "weight"),
            &[V_FF, V_EMBD],
            rng.vec(V_FF * V_EMBD, 0.1),
        );
        g.tensor_f32(&name("ffn_down", "bias"), &[V_EMBD], rng.vec(V_EMBD, 0.01));
    }
    g.tensor_f32(
        "mm.0.weight",
        &[V_EMBD, N_EMBD],
        rng.vec(V_EMBD * N_EMBD, 0.1),
    );
    g.tensor_f32("mm.0.bias", &[N_EMBD], rng.vec(N_EMBD, 0.01));
    g.tensor_f32(
        "mm.2.weight",
        &[N_EMBD, N_EMBD],
        rng.vec(N_EMBD * N_EMBD, 0.1),
    );
    g.tensor_f32("mm.2.bias", &[N_EMBD], rng.vec(N_EMBD, 0.01));
    g
}

/// `cargo xtask tiny-model [DIR]`: writes the pair and prints the folder.
pub fn run(dir: Option<PathBuf>) -> ExitCode {
    let dir = dir.unwrap_or_else(|| target_dir().join("tiny-model"));
    let written = write(&dir, 42)
        .map(|()| dir.display().to_string())
        .map_err(|e| format!("cannot write the tiny model into {}: {e}", dir.display()));
    crate::steps::printed(written)
}

/// Writes `tiny-llava.gguf` and `tiny-mmproj.gguf` into `dir`.
pub fn write(dir: &Path, seed: u64) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    for (name, mut model) in [
        ("tiny-llava.gguf", text_model(seed)),
        ("tiny-mmproj.gguf", mmproj(seed)),
    ] {
        let mut file = std::io::BufWriter::new(std::fs::File::create(dir.join(name))?);
        model.write(&mut file)?;
        file.into_inner()?.sync_all()?;
    }
    Ok(())
}
