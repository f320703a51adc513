//! `cargo xtask frames --count N --size WxH --out DIR`: keyframe-like JPEGs for benchmarks on
//! machines that have no frames of their own (the GPU machine reaches no network): smooth colour
//! fields with a few shapes and fine grain, so that each compresses as a film frame does (about
//! 40–80 KB at 746×420, CineCut's size) rather than as noise or a flat colour.

use std::path::Path;
use std::process::ExitCode;

use image::{ImageFormat, Rgb, RgbImage};

/// Writes `count` frames of `width`×`height` named `frame_NNNNN.jpg` into `out`.
pub fn write(count: usize, width: u32, height: u32, out: &Path) -> Result<(), String> {
    std::fs::create_dir_all(out).map_err(|e| format!("cannot create {}: {e}", out.display()))?;
    for n in 0..count {
        let seed = n as u32;
        let image = RgbImage::from_fn(width, height, |x, y| {
            let (fx, fy) = (x as f32 / width as f32, y as f32 / height as f32);
            let t = seed as f32 * 0.37;
            // A moving disc and a horizon over a gradient, with grain.
            let (cx, cy) = (0.5 + 0.3 * t.sin(), 0.45 + 0.2 * (t * 1.3).cos());
            let disc = ((fx - cx).powi(2) + (fy - cy).powi(2) * 0.5).sqrt() < 0.12;
            let grain = ((x.wrapping_mul(374_761_393) ^ y.wrapping_mul(668_265_263) ^ seed)
                .wrapping_mul(1_274_126_177)
                >> 27) as f32;
            let sky = fy < 0.55 + 0.05 * (fx * 6.0 + t).sin();
            let base = if disc {
                [230.0, 200.0, 120.0]
            } else if sky {
                [40.0 + 120.0 * fy, 70.0 + 90.0 * fx, 160.0 - 60.0 * fy]
            } else {
                [60.0 + 40.0 * fx, 50.0 + 30.0 * fy, 30.0 + 20.0 * (fx * fy)]
            };
            Rgb(base.map(|c| (c + grain - 16.0).clamp(0.0, 255.0) as u8))
        });
        let path = out.join(format!("frame_{n:05}.jpg"));
        image
            .save_with_format(&path, ImageFormat::Jpeg)
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    }
    Ok(())
}

/// `WxH`, as `746x420`.
pub fn parse_size(text: &str) -> Result<(u32, u32), String> {
    let (w, h) = text
        .split_once('x')
        .ok_or_else(|| format!("{text:?}: give the size as WIDTHxHEIGHT, such as 746x420"))?;
    let number = |s: &str| {
        s.parse::<u32>()
            .ok()
            .filter(|n| (1..=16384).contains(n))
            .ok_or_else(|| format!("{text:?}: {s:?} is not a size in pixels (1 to 16384)"))
    };
    Ok((number(w)?, number(h)?))
}

pub fn run(count: usize, size: (u32, u32), out: &Path) -> ExitCode {
    crate::steps::printed(write(count, size.0, size.1, out).map(|()| out.display().to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_compress_as_film_frames_do() {
        let dir = tempfile::tempdir().unwrap();
        write(2, 746, 420, dir.path()).unwrap();
        for n in 0..2 {
            let size = std::fs::metadata(dir.path().join(format!("frame_{n:05}.jpg")))
                .unwrap()
                .len();
            assert!((20_000..150_000).contains(&size), "{size} bytes");
        }
        assert_eq!(parse_size("1920x1080"), Ok((1920, 1080)));
        assert!(parse_size("1920").unwrap_err().contains("WIDTHxHEIGHT"));
    }
}
