//! The port the server will listen on.

use std::net::TcpListener;

use super::error::StartError;

/// Checks that `port` is free on 127.0.0.1 now, and returns it; for 0, asks the kernel for a free
/// one. Nothing is held: the listener closes at once, and the server binds the port itself (a
/// process that takes it in between is caught by the ownership check).
pub(crate) fn free_port(port: u16) -> Result<u16, StartError> {
    match TcpListener::bind(("127.0.0.1", port)) {
        Ok(listener) => listener
            .local_addr()
            .map(|a| a.port())
            .map_err(|source| StartError::Listen { port, source }),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => Err(StartError::PortInUse {
            port,
            detail: "something already listens on it (another program, or another engine)".into(),
        }),
        Err(source) => Err(StartError::Listen { port, source }),
    }
}
