//! Ctrl-C and SIGTERM: the first cancels the token every wait of the engine gives up on (cleaning
//! up); a second exits at once with 130 (the server's keeper then takes its tree down).

use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use engine_core::CancellationToken;

use crate::exit::Exit;

/// Installs the handlers from the first moment, and returns the token they cancel. A handler may
/// only store to an atomic: the token is made from that flag.
pub fn stop_on_signals() -> CancellationToken {
    let flag = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        let exit = i32::from(Exit::Interrupted.code());
        let _ = signal_hook::flag::register_conditional_shutdown(signal, exit, Arc::clone(&flag));
        let _ = signal_hook::flag::register(signal, Arc::clone(&flag));
    }
    CancellationToken::from_flag(flag)
}
