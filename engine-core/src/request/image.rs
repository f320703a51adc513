//! An image a request carries, read from disk and checked before anything is sent.

use std::io::Read;
use std::path::Path;

use crate::error::RequestError;

/// An image read from disk and checked: its MIME type and bytes.
#[derive(Debug)]
pub(crate) struct Image {
    pub(crate) mime: &'static str,
    pub(crate) bytes: Vec<u8>,
}

/// Reads and checks an image before anything is sent: it must exist, be a non-empty file within the
/// size limit, and start with JPEG or PNG magic bytes.
pub(crate) fn load_image(path: &Path, max_bytes: u64) -> Result<Image, RequestError> {
    let bad = |reason: String| RequestError::BadImage {
        path: path.to_path_buf(),
        reason,
    };
    let meta = std::fs::metadata(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => bad("file not found — check the frame path".into()),
        _ => bad(format!("cannot read it: {e}")),
    })?;
    if meta.is_dir() {
        return Err(bad("is a folder, not an image file".into()));
    }
    if !meta.is_file() {
        return Err(bad(
            "not a regular file (a FIFO, a device or a socket) — give the keyframe's image file"
                .into(),
        ));
    }
    if meta.len() == 0 {
        return Err(bad("file is empty — re-extract the keyframe".into()));
    }
    if meta.len() > max_bytes {
        return Err(bad(format!(
            "file is {} bytes, over the {max_bytes}-byte limit — downscale the frame or raise max_frame_bytes",
            meta.len()
        )));
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    std::fs::File::open(path)
        .and_then(|f| f.take(max_bytes + 1).read_to_end(&mut bytes))
        .map_err(|e| bad(format!("cannot read it: {e}")))?;
    if bytes.len() as u64 > max_bytes {
        return Err(bad(format!(
            "file grew past the {max_bytes}-byte limit while being read"
        )));
    }
    let mime = if bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
        "image/jpeg"
    } else if bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
        "image/png"
    } else if bytes.is_empty() {
        return Err(bad("file is empty — re-extract the keyframe".into()));
    } else {
        let head: Vec<String> = bytes.iter().take(8).map(|b| format!("{b:02x}")).collect();
        return Err(bad(format!(
            "not a JPEG or PNG (it starts with {}) — convert it to JPEG",
            head.join(" ")
        )));
    };
    Ok(Image { mime, bytes })
}
