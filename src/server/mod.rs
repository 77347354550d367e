//! The I/O edge: listeners, the mio event loop, connections, workers, TLS.
//!
//! `event_loop` is the poll loop itself; each concern it drives has its own module below.

pub mod admission;
pub mod conn;
pub mod dispatch;
pub mod event_loop;
pub mod listener;
pub mod loop_wake;
pub mod next_hop;
pub mod relay_link;
pub mod sd_notify;
pub mod session_log;
pub mod shutdown;
pub mod startup;
pub mod timers;
pub mod tls;
pub mod worker;
