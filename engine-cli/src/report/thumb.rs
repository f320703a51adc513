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
