//! The I/O edge: listeners, the mio event loop, connections, workers, TLS.
pub mod sd_notify;
pub mod tls;
