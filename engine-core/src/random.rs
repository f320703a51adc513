//! Unguessable tokens: the server's API key and the marker of its process tree.

use std::fs::File;
use std::io::Read;

/// 128 random bits from `/dev/urandom`, as 32 hex digits.
pub(crate) fn hex128() -> String {
    let mut bytes = [0u8; 16];
    let read = File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut bytes));
    if read.is_err() {
        // No /dev/urandom (a strange chroot): fall back to time and pid, still unguessable enough
        // for a loopback-only server that lives for one run.
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default()
            ^ u128::from(std::process::id()) << 64;
        bytes = seed.to_le_bytes();
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
