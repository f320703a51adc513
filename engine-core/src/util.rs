//! Small helpers every room uses: a poison-tolerant mutex lock, text shortened for messages, and
//! unguessable tokens.

use std::sync::{Mutex, MutexGuard, PoisonError};

/// Locks `m`, taking the data as it is if a holder panicked: a panic while holding one of the
/// engine's mutexes must not turn every later cleanup into a second panic.
pub(crate) fn unpoisoned<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Truncates `text` to at most `max` bytes on a char boundary, marking the cut: server answers and
/// tool output are quoted in errors, but never whole.
pub(crate) fn truncate(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} bytes in all)", &text[..end], text.len())
}

/// 128 random bits from the kernel (`getrandom(2)`), as 32 hex digits: the server's API key and the
/// marker of its process tree. No weaker fallback: the key guards the server, so a guessable one
/// would be worse than an error.
pub(crate) fn hex128() -> std::io::Result<String> {
    let mut bytes = [0u8; 16];
    let mut filled = 0;
    while filled < bytes.len() {
        match rustix::rand::getrandom(&mut bytes[filled..], rustix::rand::GetRandomFlags::empty()) {
            Ok(n) => filled += n,
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// `; last output:` and the server's last lines, or nothing when it printed none: the end of every
/// message about a server that failed.
pub(crate) fn tail_suffix(tail: &str) -> String {
    if tail.trim().is_empty() {
        String::new()
    } else {
        format!("; last output:\n{tail}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cuts_on_a_char_boundary_and_says_how_long_it_was() {
        assert_eq!(truncate("short", 10), "short");
        assert_eq!(truncate("ééé", 3), "é… (6 bytes in all)");
    }

    #[test]
    fn tokens_are_32_hex_digits_and_differ() {
        let (a, b) = (hex128().unwrap(), hex128().unwrap());
        assert_eq!(a.len(), 32);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }
}
