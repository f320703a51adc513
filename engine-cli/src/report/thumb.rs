//! A frame's thumbnail, embedded in the page: decoded, downscaled to fit 192×108 and encoded as a
//! JPEG data URI (about 4 KB for a 746×420 frame), so the report needs no file beside it. One frame
//! is decoded at a time.

use std::io::Cursor;
use std::path::Path;

use base64::Engine as _;
use image::ImageReader;

use super::escape;

/// The largest thumbnail, in pixels.
const WIDTH: u32 = 192;
const HEIGHT: u32 = 108;
/// JPEG quality of the thumbnails: small files, faces and shapes still legible.
const QUALITY: u8 = 70;

/// The `<img>` of `frame`, or a placeholder that says why there is none (missing, unreadable).
pub fn tag(frame: &Path) -> String {
    match thumbnail(frame) {
        Ok((data, w, h)) => format!(
            "<img src=\"data:image/jpeg;base64,{data}\" width=\"{w}\" height=\"{h}\" alt=\"\">"
        ),
        Err(why) => format!("<div class=\"nothumb\">{}</div>", escape(&why)),
    }
}

/// The most a frame may take to decode: an 8K frame (7680×4320) fits, a 13000×13000 picture
/// planted among the frames does not (it would take 500 MB for a 192×108 thumbnail).
const MAX_SIDE: u32 = 8192;
const MAX_DECODE_BYTES: u64 = 160 << 20;

fn limits() -> image::Limits {
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(MAX_SIDE);
    limits.max_image_height = Some(MAX_SIDE);
    limits.max_alloc = Some(MAX_DECODE_BYTES);
    limits
}

fn thumbnail(frame: &Path) -> Result<(String, u32, u32), String> {
    match std::fs::metadata(frame) {
        Err(_) => return Err("frame missing on disk".into()),
        // A FIFO or a device would block or never end: only files are read.
        Ok(meta) if !meta.is_file() => return Err("not a regular file".into()),
        Ok(_) => {}
    }
    let mut reader = ImageReader::open(frame)
        .and_then(|r| r.with_guessed_format())
        .map_err(|e| format!("cannot read the frame: {e}"))?;
    reader.limits(limits());
    let image = reader
        .decode()
        .map_err(|e| format!("cannot decode the frame: {e}"))?;
    // Down to fit, never up: a small frame stays as it is.
    let small = if image.width() > WIDTH || image.height() > HEIGHT {
        image.thumbnail(WIDTH, HEIGHT).into_rgb8()
    } else {
        image.into_rgb8()
    };
    let mut jpeg = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(Cursor::new(&mut jpeg), QUALITY)
        .encode_image(&small)
        .map_err(|e| format!("cannot make a thumbnail: {e}"))?;
    let data = base64::engine::general_purpose::STANDARD.encode(jpeg);
    Ok((data, small.width(), small.height()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// CRC-32 (IEEE), as PNG chunks carry it.
    fn crc32(bytes: &[u8]) -> u32 {
        let mut crc = !0u32;
        for &b in bytes {
            crc ^= u32::from(b);
            for _ in 0..8 {
                crc = if crc & 1 == 1 {
                    (crc >> 1) ^ 0xEDB8_8320
                } else {
                    crc >> 1
                };
            }
        }
        !crc
    }

    /// A PNG that claims `width`×`height` RGB pixels (its data is not there to decode).
    fn png_claiming(width: u32, height: u32) -> Vec<u8> {
        let chunk = |kind: &[u8], data: &[u8]| {
            let mut out = (data.len() as u32).to_be_bytes().to_vec();
            let body = [kind, data].concat();
            out.extend_from_slice(&body);
            out.extend_from_slice(&crc32(&body).to_be_bytes());
            out
        };
        let mut header = width.to_be_bytes().to_vec();
        header.extend_from_slice(&height.to_be_bytes());
        header.extend_from_slice(&[8, 2, 0, 0, 0]);
        [
            b"\x89PNG\r\n\x1a\n".to_vec(),
            chunk(b"IHDR", &header),
            chunk(b"IDAT", &[0x78, 0x9c, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01]),
            chunk(b"IEND", &[]),
        ]
        .concat()
    }

    #[test]
    fn a_frame_larger_than_any_film_frame_is_refused_before_its_pixels_are_allocated() {
        let dir = tempfile::tempdir().unwrap();
        let huge = dir.path().join("huge.png");
        std::fs::write(&huge, png_claiming(13_000, 13_000)).unwrap();
        let err = thumbnail(&huge).unwrap_err();
        assert!(err.contains("limit") || err.contains("dimensions"), "{err}");
        // An 8K frame is within the limits: its decode is tried (and fails on the missing data).
        let eight_k = dir.path().join("8k.png");
        std::fs::write(&eight_k, png_claiming(7680, 4320)).unwrap();
        let err = thumbnail(&eight_k).unwrap_err();
        assert!(
            !err.contains("limit") && !err.contains("dimensions"),
            "{err}"
        );
    }
}
