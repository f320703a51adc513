//! `cargo xtask demo`: the main job on the built-in fakes: sample keyframes described through the
//! engine's full lifecycle, no GPU needed.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use engine_core::gguf::{Gguf, Value};
use xshell::cmd;

use crate::steps::{Steps, cargo, done, shell, target_dir};

/// Writes the demo's scratch folder: placeholder model files and a few keyframes whose names carry
/// their timestamps.
fn demo_frames(dir: &Path) -> std::io::Result<PathBuf> {
    let frames = dir.join("frames");
    std::fs::create_dir_all(&frames)?;
    // Weightless GGUF files: the metadata the engine checks, nothing the fake server would need.
    let placeholder = |name: &str, keys: &[(&str, &str)]| -> std::io::Result<()> {
        let mut file = Gguf::default();
        for (key, value) in keys {
            file.kv(key, Value::Str(value.to_string()));
        }
        file.write(&mut std::fs::File::create(dir.join(name))?)
    };
    placeholder("demo-llava.gguf", &[("general.architecture", "llama")])?;
    placeholder(
        "demo-mmproj.gguf",
        &[
            ("general.architecture", "clip"),
            ("clip.projector_type", "mlp"),
        ],
    )?;
    let shots: [(&str, u32, u32, [u8; 3]); 5] = [
        ("shot_0003.20s.jpg", 1280, 720, [200, 40, 30]),
        ("shot_0017.85s.jpg", 1280, 720, [30, 60, 190]),
        ("shot_0042.00s.jpg", 960, 540, [15, 15, 20]),
        ("shot_0063.50s.jpg", 1920, 1080, [40, 170, 60]),
        ("shot_0090.10s.jpg", 640, 360, [230, 230, 235]),
    ];
    for (name, width, height, rgb) in shots {
        let image = image::RgbImage::from_fn(width, height, |x, y| {
            // A gentle gradient so each frame is a real, non-trivial JPEG.
            let shade = ((x + y) % 64) as u8;
            image::Rgb(rgb.map(|c| c.saturating_add(shade / 4)))
        });
        image
            .save_with_format(frames.join(name), image::ImageFormat::Jpeg)
            .map_err(std::io::Error::other)?;
    }
    Ok(frames)
}

pub fn run(args: &[String]) -> ExitCode {
    let sh = shell();
    let cargo = cargo();
    let mut steps = Steps::new();
    let built = steps.cmd(
        "build",
        cmd!(
            sh,
            "{cargo} build --quiet -p fake-llama-server -p nvsmi-shim -p engine-cli"
        ),
    );
    if !built {
        return steps.report();
    }
    let bin = target_dir().join("debug");
    let dir = target_dir().join("demo");
    steps.run("describe", || {
        let frames = demo_frames(&dir)
            .map_err(|e| format!("cannot write the demo frames under {}: {e}", dir.display()))?;
        let cli = bin.join("cinecut-infer");
        let (model, mmproj) = (dir.join("demo-llava.gguf"), dir.join("demo-mmproj.gguf"));
        // The built-in fakes stand in for llama-server and nvidia-smi; a real GPU machine needs
        // neither variable.
        done(
            cmd!(sh, "{cli} describe --model {model} --mmproj {mmproj} --port 0 --slots 2 {args...} {frames}")
                .env("LLAMA_SERVER", bin.join("fake-llama-server"))
                .env("NVIDIA_SMI", bin.join("nvsmi-shim"))
                .env("FAKE_LLAMA_LOAD_MS", "300")
                .env("FAKE_LLAMA_LATENCY_MS", "150")
                .run(),
        )
    });
    steps.report()
}
