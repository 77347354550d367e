//! The I/O edge: listeners, the mio event loop, connections, workers, TLS.

pub mod conn;
pub mod event_loop;
pub mod listener;
pub mod worker;
