//! heloguard: an inbound SMTP server that judges the HELO/EHLO identity against DNS.
//!
//! Layers, from pure to I/O (nothing pure imports anything below it):
//! - `protocol`: the zero-copy line parser, commands, DATA decoder, replies (sans-I/O)
//! - `session`: the SMTP session state machine (sans-I/O)
//! - `helo`: the eleven HELO checks, policy, verdict and trace fields (pure)
//! - `dns`: DNS message types, and `dns::resolver`, the resolver thread
//! - `spf`: the RFC 7208 evaluator of the HELO identity (pure `check_host()` over a DNS trait,
//!   and its adapter to the resolver thread's hickory resolver)
//! - `message`: an accepted message, its envelope and what its trace fields are made of
//! - `spool`: the trace field text and the Maildir writer threads
//! - `server`: listeners, the mio event loop, connections, the worker pool, TLS
//! - `relay`: the sans-I/O next-hop SMTP/LMTP client of the relay modes
//! - `reputation`: what the resolver thread needs for the sender checks (lists, SPF
//!   evaluator), from the configuration
//! - `check_cli`: the `heloguard check` command (one HELO verdict, printed)
//! - `whatif`: the `heloguard whatif` command (verdict log lines replayed under another policy)
//! - `logging`: the log format (env_logger, or sd-daemon priorities under journald)
//! - `logfmt`: one session event as one `key=value` log line, client text escaped
//! - `fuzzing`: invariant-checking drivers shared by the fuzz targets and the corpus test
//! - `config`, `net`, `proxy_protocol`, `metrics`: configuration, addresses, PROXY headers,
//!   Prometheus counters
//! - `sched`: scheduling hints for the threads (short slices for the loop and the workers,
//!   nice 10 for the spool writers)

#![warn(unreachable_pub)]

pub mod check_cli;
pub mod config;
pub mod dns;
pub mod fuzzing;
pub mod greylist;
pub mod helo;
pub(crate) mod logfmt;
pub mod logging;
pub mod message;
pub mod metrics;
pub(crate) mod net;
pub mod protocol;
pub(crate) mod proxy_protocol;
pub(crate) mod relay;
pub mod reputation;
pub(crate) mod sched;
pub mod server;
pub mod session;
pub mod spf;
pub(crate) mod spool;
pub mod state;
pub(crate) mod wake;
pub mod whatif;
