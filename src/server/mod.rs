//! The I/O edge: listeners, the mio event loop, connections, workers, TLS.

pub mod conn;
pub mod event_loop;
pub mod listener;
pub mod loop_wake;
pub mod relay_link;
pub mod sd_notify;
pub mod tls;
pub mod worker;
