//! The engine's in-process costs per frame, apart from the server: reading and encoding a 1920×1080
//! JPEG into the request body, and parsing and validating an answer. Run by `cargo xtask bench`.

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use engine_core::DescribeOptions;
use engine_core::gpu::parse_rows;
use engine_core::request::parse_chat_response;

fn frame_1080p(dir: &std::path::Path) -> std::path::PathBuf {
    let path = dir.join("frame-1080p.jpg");
    let image = image::RgbImage::from_fn(1920, 1080, |x, y| {
        image::Rgb([(x % 256) as u8, (y % 256) as u8, ((x + y) % 256) as u8])
    });
    image
        .save_with_format(&path, image::ImageFormat::Jpeg)
        .unwrap();
    path
}

fn benches(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let frame = frame_1080p(dir.path());
    let options = DescribeOptions::default();
    c.bench_function("request_body_1080p_jpeg", |b| {
        b.iter(|| options.request_body(black_box(&frame)).unwrap())
    });

    let answer = serde_json::json!({
        "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant",
            "content": "```json\n{\"visual_content\":\"a man in a red coat crosses a rainy street\",\"mood\":\"tense\",\"action\":\"he looks back over his shoulder\",\"setting\":\"a city street at night\"}\n```"}}],
        "usage": {"completion_tokens": 60, "prompt_tokens": 700, "total_tokens": 760},
        "timings": {"prompt_n": 700, "prompt_ms": 80.0, "predicted_n": 60, "predicted_ms": 400.0},
    })
    .to_string();
    c.bench_function("parse_and_validate_answer", |b| {
        b.iter(|| parse_chat_response(black_box(&answer)).unwrap())
    });

    let smi: String = [
        "81000", "80500", "[N/A]", "79999", "12", "0", "81559", "40000",
    ]
    .iter()
    .enumerate()
    .map(|(i, free)| format!("{i}, GPU-5eed{i:04x}-4c1e-8a11-000000000000, {free}\n"))
    .collect();
    c.bench_function("parse_nvidia_smi_8_gpus", |b| {
        b.iter(|| parse_rows(black_box(&smi)).unwrap())
    });
}

criterion_group!(in_process, benches);
criterion_main!(in_process);
