//! The one poison-tolerant mutex helper: a panic while holding one of the engine's locks must not
//! turn every later cleanup into a second panic.

use std::sync::{Mutex, MutexGuard, PoisonError};

/// Locks `m`, taking the data as it is if a holder panicked.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}
