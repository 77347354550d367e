//! Configuration from HELOGUARD_* environment variables into an immutable `Config`.
//!
//! Every variable is validated at startup; a bad value is a `ConfigError` that names the
//! variable, and the binary exits 2 without starting anything. `--help` text is generated from
//! the same table of variables, so the two cannot drift apart. For the limits, 0 = unlimited.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::helo::policy::{AllowEntry, HeloPolicy, RejectAt};
use crate::net::Cidr;

/// Where accepted mail goes (HELOGUARD_DELIVER).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeliverTarget {
    Maildir,
    Smtp { host: String, port: u16 },
    Lmtp { host: String, port: u16 },
    LmtpUnix { path: PathBuf },
}

/// What to do with a bare LF in DATA/BDAT (HELOGUARD_BARE_NEWLINE).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BareNewline {
    Normalize,
    Reject,
}

/// The whole configuration, immutable once built; shared as `Arc<Config>`.
#[derive(Clone, Debug)]
pub struct Config {
    pub listen: Vec<SocketAddr>,
    pub proxy_listen: Vec<SocketAddr>,
    pub proxy_trusted: Vec<Cidr>,
    pub hostname: String,
    pub workers: usize,
    pub spool_writers: usize,
    /// From HELOGUARD_DNS, else the nameserver lines of /etc/resolv.conf (port 53).
    pub dns_servers: Vec<SocketAddr>,
    /// Total time for one lookup, retries included.
    pub dns_timeout: Duration,
    pub deliver: DeliverTarget,
    pub spool: PathBuf,
    pub min_free_mb: u64,
    /// Lower case, no trailing dot. Empty = every domain.
    pub domains: Vec<String>,
    /// 0 = unlimited.
    pub max_message_size: u64,
    /// 0 = unlimited.
    pub max_recipients: usize,
    /// 0 = unlimited.
    pub max_connections: usize,
    /// 0 = unlimited.
    pub max_connections_per_ip: usize,
    /// Idle time before 421 4.4.2; zero = never.
    pub timeout: Duration,
    /// Bytes/s; 0 = off.
    pub min_data_rate: u64,
    /// 0 = unlimited.
    pub max_errors: u32,
    /// 0 = unlimited.
    pub max_junk: u32,
    /// Zero = no greeting delay and no pregreet test.
    pub greet_delay: Duration,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub helo_policy: HeloPolicy,
    pub helo_allow: Vec<AllowEntry>,
    pub reject_at: RejectAt,
    pub bare_newline: BareNewline,
    pub metrics: Option<SocketAddr>,
    pub shutdown_grace: Duration,
}
