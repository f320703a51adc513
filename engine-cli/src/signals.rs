//! Ctrl-C and SIGTERM: the first sets a flag every wait of the engine gives up on (cleaning up);
//! a second exits at once with 130 (the server's keeper then takes its tree down).

use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use crate::job::summary::EXIT_INTERRUPTED;

/// Installs the handlers from the first moment, and returns the flag they set.
pub fn stop_on_signals() -> Arc<AtomicBool> {
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        let exit = i32::from(EXIT_INTERRUPTED);
        let _ = signal_hook::flag::register_conditional_shutdown(signal, exit, Arc::clone(&stop));
        let _ = signal_hook::flag::register(signal, Arc::clone(&stop));
    }
    stop
}
