//! The I/O edge: listeners, the mio event loop, connections, workers, TLS.
//!
//! `event_loop` is the poll loop itself; each concern it drives has its own module below.

pub(crate) mod conn;
pub(crate) mod conn_id;
pub mod event_loop;
pub mod listener;
pub(crate) mod loop_wake;
pub(crate) mod relay_link;
pub mod sd_notify;
pub mod tls;
pub(crate) mod worker;
