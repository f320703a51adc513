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
    // Keyframe-like frames, named as CineCut names them (their timestamps in the name).
    let names = [
        "shot_0003.20s.jpg",
        "shot_0017.85s.jpg",
        "shot_0042.00s.jpg",
        "shot_0063.50s.jpg",
        "shot_0090.10s.jpg",
        "shot_0112.40s.jpg",
        "shot_0131.75s.jpg",
        "shot_0158.00s.jpg",
    ];
    let made = dir.join("made");
    crate::frames::write(names.len(), 746, 420, &made).map_err(std::io::Error::other)?;
    for (n, name) in names.iter().enumerate() {
        std::fs::rename(made.join(format!("frame_{n:05}.jpg")), frames.join(name))?;
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
    let _ = std::fs::remove_dir_all(&dir);
    let cli = bin.join("cinecut-infer");
    let (scenes, summary, report) = (
        dir.join("scenes.jsonl"),
        dir.join("summary.json"),
        dir.join("report.html"),
    );
    let described = steps.run("describe", || {
        let frames = demo_frames(&dir)
            .map_err(|e| format!("cannot write the demo frames under {}: {e}", dir.display()))?;
        let (model, mmproj) = (dir.join("demo-llava.gguf"), dir.join("demo-mmproj.gguf"));
        // The built-in fakes stand in for llama-server and nvidia-smi; a real GPU machine needs
        // neither variable.
        done(
            cmd!(sh, "{cli} describe --model {model} --mmproj {mmproj} --port 0 --slots 2 --timings --summary {summary} --output {scenes} {args...} {frames}")
                .env("LLAMA_SERVER", bin.join("fake-llama-server"))
                .env("NVIDIA_SMI", bin.join("nvsmi-shim"))
                .env("FAKE_LLAMA_LOAD_MS", "300")
                .env("FAKE_LLAMA_LATENCY_MS", "150")
                .run(),
        )?;
        let lines = std::fs::read_to_string(&scenes).map_err(|e| e.to_string())?;
        println!("{}", lines.trim_end());
        Ok(())
    });
    if described {
        steps.cmd(
            "report",
            cmd!(
                sh,
                "{cli} report {scenes} --summary {summary} --output {report}"
            ),
        );
        eprintln!(
            "xtask: the lines are in {}; open {} in a browser",
            scenes.display(),
            report.display()
        );
    }
    steps.report()
}
