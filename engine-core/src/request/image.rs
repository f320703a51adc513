//! An image a request carries, read from disk and checked before anything is sent.

use std::io::Read;
use std::path::Path;

use super::error::RequestError;

/// An image read from disk and checked: its MIME type and bytes.
#[derive(Debug)]
pub(crate) struct Image {
    pub(crate) mime: &'static str,
    pub(crate) bytes: Vec<u8>,
}

/// How an image goes in a request.
#[derive(Debug)]
pub(crate) enum Part {
    /// Its bytes, sent as a base64 data URI.
    Inline(Image),
    /// A `file://` reference the server reads itself (`--media-path /`).
    File(String),
}

/// Checks an image as [`load_image`] does, reading only its first bytes, and returns the
/// `file://` reference the server reads it by; `Ok(None)` where the server's rules for file names
/// refuse its path (then it is sent inline).
pub(crate) fn file_reference(path: &Path, max_bytes: u64) -> Result<Option<String>, RequestError> {
    let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let Some(name) = absolute.to_str().filter(|name| server_takes(name)) else {
        return Ok(None);
    };
    let mut head = Vec::with_capacity(8);
    check(path, max_bytes, |file| {
        file.take(8).read_to_end(&mut head).map(|_| ())
    })?;
    mime(path, &head)?;
    Ok(Some(format!("file://{name}")))
}

/// Whether llama-server takes `name` as a `file://` path (tools/server's `fs_validate_filename`):
/// at most 255 bytes, no `..`, none of `:*?"<>|` or control characters, no space at either end and no
/// trailing point.
fn server_takes(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && !name.contains("..")
        && !name
            .chars()
            .any(|c| c.is_control() || ":*?\"<>|".contains(c) || c == '\u{FEFF}')
        && !name.starts_with(' ')
        && !name.ends_with([' ', '.'])
}

/// Reads and checks an image before anything is sent: it must exist, be a non-empty file within the
/// size limit, and start with JPEG or PNG magic bytes.
pub(crate) fn load_image(path: &Path, max_bytes: u64) -> Result<Image, RequestError> {
    let mut bytes = Vec::new();
    let grew = check(path, max_bytes, |file| {
        file.take(max_bytes + 1).read_to_end(&mut bytes).map(|_| ())
    })
    .map(|()| bytes.len() as u64 > max_bytes)?;
    if grew {
        return Err(bad(
            path,
            format!("file grew past the {max_bytes}-byte limit while being read"),
        ));
    }
    let mime = mime(path, &bytes)?;
    Ok(Image { mime, bytes })
}

fn bad(path: &Path, reason: String) -> RequestError {
    RequestError::BadImage {
        path: path.to_path_buf(),
        reason,
    }
}

/// Checks that `path` is a non-empty regular file within `max_bytes`, then `read`s it.
fn check(
    path: &Path,
    max_bytes: u64,
    read: impl FnOnce(std::fs::File) -> std::io::Result<()>,
) -> Result<(), RequestError> {
    let meta = std::fs::metadata(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => bad(path, "file not found — check the frame path".into()),
        _ => bad(path, format!("cannot read it: {e}")),
    })?;
    if meta.is_dir() {
        return Err(bad(path, "is a folder, not an image file".into()));
    }
    if !meta.is_file() {
        return Err(bad(
            path,
            "not a regular file (a FIFO, a device or a socket) — give the keyframe's image file"
                .into(),
        ));
    }
    if meta.len() == 0 {
        return Err(bad(path, "file is empty — re-extract the keyframe".into()));
    }
    if meta.len() > max_bytes {
        return Err(bad(
            path,
            format!(
                "file is {} bytes, over the {max_bytes}-byte limit — downscale the frame or raise `max_frame_bytes`",
                meta.len()
            ),
        ));
    }
    std::fs::File::open(path)
        .and_then(read)
        .map_err(|e| bad(path, format!("cannot read it: {e}")))
}

/// The image's MIME type from its first bytes: JPEG or PNG, else an error naming them.
fn mime(path: &Path, bytes: &[u8]) -> Result<&'static str, RequestError> {
    if bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
        Ok("image/jpeg")
    } else if bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
        Ok("image/png")
    } else if bytes.is_empty() {
        Err(bad(path, "file is empty — re-extract the keyframe".into()))
    } else {
        let head: Vec<String> = bytes.iter().take(8).map(|b| format!("{b:02x}")).collect();
        Err(bad(
            path,
            format!(
                "not a JPEG or PNG (it starts with {}) — convert it to JPEG",
                head.join(" ")
            ),
        ))
    }
}
