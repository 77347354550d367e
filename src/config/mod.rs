//! Configuration from HELOGUARD_* environment variables into an immutable `Config`.
//!
//! Every variable is validated at startup; a bad value is a `ConfigError` that names the
//! variable, and the binary exits 2 without starting anything. `--help` text is generated from
//! the same table of variables (`VARIABLES`) the parser reads through, so the two cannot drift
//! apart. For the limits, 0 = unlimited.
//!
//! Value rules: surrounding whitespace, and whitespace around list items, is ignored. A value
//! that is empty after trimming counts as unset (systemd `EnvironmentFile` writes `NAME=` for
//! "nothing"), with one exception: an empty HELOGUARD_LISTEN means "no plain listener", which is
//! allowed only when HELOGUARD_PROXY_LISTEN is set. Anything else that does not parse is an
//! error; nothing is silently clamped.

use std::fmt;
use std::fs::File;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use crate::dns::lists::{DisplayNames, ListError, Lists, parse_dnsbl, parse_rhsbl};
use crate::greylist::GreylistTimes;
use crate::helo::policy::{AllowEntry, HeloPolicy, RejectAt, parse_allow_list};
use crate::net::Cidr;
use crate::protocol::data::BareLineFeed;
use crate::session::{DeliveryMode, SenderChecks, SessionSettings};
use crate::state::{StateSettings, StateStore};

mod values;
mod variables;

use values::*;
use variables::*;
pub use variables::{help_text, hide_url_password, non_default_settings};

/// Where accepted mail goes (HELOGUARD_DELIVER).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeliverTarget {
    Maildir,
    Smtp { host: String, port: u16 },
    Lmtp { host: String, port: u16 },
    LmtpUnix { path: PathBuf },
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
    /// HELOGUARD_DNS_BUDGET: queries one session may cause; 0 = unlimited.
    pub dns_budget: u32,
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
    /// What a bare LF in DATA/BDAT does (HELOGUARD_BARE_NEWLINE).
    pub bare_newline: BareLineFeed,
    pub metrics: Option<SocketAddr>,
    pub shutdown_grace: Duration,
    /// Relay modes: a next-hop link without a transaction for this long is closed.
    pub relay_idle: Duration,
    /// The state store, greylisting's times and helo_churn's limit.
    pub state: StateSettings,
    /// HELOGUARD_DNSBL, HELOGUARD_RHSBL, HELOGUARD_DNSBL_DISPLAY (the thresholds are in
    /// `helo_policy.sender`).
    pub lists: Lists,
    /// HELOGUARD_SPF_TIMEOUT_MS.
    pub spf_timeout: Duration,
}

impl Config {
    /// Whether anything asks the state store: a check whose action is greylist, or
    /// helo_churn on (HELOGUARD_HELO_CHURN not 0 and its action not off).
    pub fn needs_state_store(&self) -> bool {
        use crate::helo::{Action, Check};
        let policy = &self.helo_policy;
        Check::ALL
            .iter()
            .any(|check| policy.action(*check) == Action::Greylist)
            || (self.state.helo_churn != 0 && policy.action(Check::HeloChurn) != Action::Off)
    }
}

impl Config {
    /// Reads the process environment. Warnings (not errors) come back for the log.
    pub fn from_env() -> Result<(Config, Vec<String>), ConfigError> {
        let (config, mut warnings) = Self::from_lookup(|name| {
            // A value that is not UTF-8 is kept (lossily) so that it fails validation with the
            // variable's name instead of being silently ignored.
            std::env::var_os(name).map(|v| v.to_string_lossy().into_owned())
        })?;
        warnings.extend(unknown_variable_warnings(
            std::env::vars_os().map(|(name, _)| name.to_string_lossy().into_owned()),
        ));
        Ok((config, warnings))
    }

    /// Reads every variable through `lookup` (None = unset); machine defaults (host name,
    /// cores, /etc/resolv.conf) come from this machine.
    pub fn from_lookup(
        lookup: impl Fn(&str) -> Option<String>,
    ) -> Result<(Config, Vec<String>), ConfigError> {
        build(&Env { lookup: &lookup }, &ThisMachine)
    }
}

impl From<&Config> for SessionSettings {
    /// The one place the session's settings are taken from the configuration.
    fn from(config: &Config) -> Self {
        Self {
            hostname: config.hostname.clone(),
            domains: config.domains.clone(),
            max_message_size: config.max_message_size,
            max_recipients: config.max_recipients,
            min_data_rate: config.min_data_rate,
            max_errors: config.max_errors,
            max_junk: config.max_junk,
            helo_policy: config.helo_policy.clone(),
            helo_allow: config.helo_allow.clone(),
            reject_at: config.reject_at,
            bare_line_feed: config.bare_newline,
            delivery: match config.deliver {
                DeliverTarget::Maildir => DeliveryMode::Maildir,
                DeliverTarget::Smtp { .. } => DeliveryMode::SmtpRelay,
                DeliverTarget::Lmtp { .. } | DeliverTarget::LmtpUnix { .. } => {
                    DeliveryMode::LmtpRelay
                }
            },
            sender_checks: SenderChecks {
                helo_churn: config.state.helo_churn != 0,
                ..sender_checks(config)
            },
        }
    }
}

/// Which sender lookups the configured lists make possible.
fn sender_checks(config: &Config) -> SenderChecks {
    SenderChecks {
        dnsbl: !config.lists.dnsbl.is_empty(),
        rhsbl: !config.lists.rhsbl.is_empty(),
        ..SenderChecks::default()
    }
}

/// A bad configuration value; its Display is one line that names the variable.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    /// The environment variable at fault.
    pub variable: &'static str,
    /// The value as given, when the fault is in a value (not in a missing companion).
    pub value: Option<String>,
    /// What is wrong, phrased to follow the value: `is not a whole number`.
    pub reason: String,
}

impl ConfigError {
    fn bad_value(variable: &'static str, value: &str, reason: impl Into<String>) -> Self {
        Self {
            variable,
            value: Some(value.to_string()),
            reason: reason.into(),
        }
    }

    fn other(variable: &'static str, reason: impl Into<String>) -> Self {
        Self {
            variable,
            value: None,
            reason: reason.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // `{:?}` quotes the value and escapes control characters, so the message stays on one
        // line whatever the operator typed.
        match &self.value {
            Some(value) => write!(
                f,
                "{}: {:?} {}",
                self.variable,
                hide_url_password(value),
                self.reason
            ),
            None => write!(f, "{}: {}", self.variable, self.reason),
        }
    }
}

impl std::error::Error for ConfigError {}

/// The facts defaults are taken from; a trait so tests can stand in for the machine.
trait Machine {
    fn host_name(&self) -> Option<String>;
    fn cores(&self) -> usize;
    fn resolv_conf(&self) -> io::Result<String>;
}

struct ThisMachine;

impl Machine for ThisMachine {
    fn host_name(&self) -> Option<String> {
        system_host_name()
    }

    fn cores(&self) -> usize {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    }

    fn resolv_conf(&self) -> io::Result<String> {
        std::fs::read_to_string("/etc/resolv.conf")
    }
}

/// gethostname(2); None when it fails or the name is not UTF-8.
fn system_host_name() -> Option<String> {
    let mut buf = [0u8; 256];
    // SAFETY: the pointer and length describe `buf`, which outlives the call; gethostname
    // writes at most `len` bytes into it.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return None;
    }
    // POSIX leaves truncated names without a NUL; then the whole buffer is the name.
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8(buf[..end].to_vec()).ok()
}

/// The variables as the operator set them.
struct Env<'a> {
    lookup: &'a dyn Fn(&str) -> Option<String>,
}

impl Env<'_> {
    /// The trimmed value as set, None when unset or empty.
    fn set_value(&self, variable: &Variable) -> Option<String> {
        (self.lookup)(variable.name)
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty())
    }

    /// The value as set, else the table's default text; None for unset and machine defaults.
    fn value(&self, variable: &Variable) -> Option<String> {
        self.set_value(variable).or_else(|| match variable.default {
            DefaultValue::Text(text) => Some(text.to_string()),
            DefaultValue::Unset | DefaultValue::Machine(_) => None,
        })
    }

    /// Whether the variable is present at all, even if empty.
    fn is_present(&self, variable: &Variable) -> bool {
        (self.lookup)(variable.name).is_some()
    }
}

fn build(env: &Env<'_>, machine: &dyn Machine) -> Result<(Config, Vec<String>), ConfigError> {
    let mut warnings = Vec::new();

    let listeners = listeners(env)?;
    let hostname = hostname(env, machine, &mut warnings)?;
    let deliver = deliver(env)?;
    let domains = domains(env, &deliver, &mut warnings)?;
    let max_recipients = count(env, &MAX_RECIPIENTS)?;
    if (1..100).contains(&max_recipients) {
        warnings.push(format!(
            "{}={max_recipients} is below the 100 recipients RFC 5321 4.5.3.1.8 asks servers \
             to accept",
            MAX_RECIPIENTS.name
        ));
    }
    let (tls_cert, tls_key) = tls_files(env)?;
    let state = state_settings(env)?;
    let mut helo_policy = helo_policy(env)?;
    helo_policy.sender.helo_churn = state.helo_churn;
    let lists = lists(env)?;
    helo_policy.sender.dnsbl = !lists.dnsbl.is_empty();
    helo_policy.sender.rhsbl = !lists.rhsbl.is_empty();
    helo_policy.sender.dnsbl_threshold = signed(env, &DNSBL_THRESHOLD)?;
    helo_policy.sender.dnswl_threshold = dnswl_threshold(env)?;

    let config = Config {
        listen: listeners.smtp,
        proxy_listen: listeners.proxy,
        proxy_trusted: cidr_list(env, &PROXY_TRUSTED)?,
        hostname,
        workers: thread_count(env, &WORKERS, machine.cores())?,
        spool_writers: thread_count(env, &SPOOL_WRITERS, 8)?,
        dns_servers: dns_servers(env, machine)?,
        dns_timeout: Duration::from_millis(within_a_year(env, &DNS_TIMEOUT_MS, positive, 1000)?),
        dns_budget: small_count(env, &DNS_BUDGET)?,
        deliver,
        spool: spool(env)?,
        min_free_mb: whole(env, &MIN_FREE_MB)?,
        domains,
        max_message_size: whole(env, &MAX_MESSAGE_SIZE)?,
        max_recipients,
        max_connections: count(env, &MAX_CONNECTIONS)?,
        max_connections_per_ip: count(env, &MAX_CONNECTIONS_PER_IP)?,
        timeout: Duration::from_secs(within_a_year(env, &TIMEOUT_SECS, whole, 1)?),
        min_data_rate: whole(env, &MIN_DATA_RATE)?,
        max_errors: small_count(env, &MAX_ERRORS)?,
        max_junk: small_count(env, &MAX_JUNK)?,
        greet_delay: Duration::from_millis(within_a_year(env, &GREET_DELAY_MS, whole, 1000)?),
        tls_cert,
        tls_key,
        helo_policy,
        helo_allow: helo_allow(env)?,
        reject_at: reject_at(env)?,
        bare_newline: bare_newline(env)?,
        metrics: listeners.metrics,
        shutdown_grace: Duration::from_secs(within_a_year(env, &SHUTDOWN_GRACE_SECS, whole, 1)?),
        relay_idle: Duration::from_secs(within_a_year(env, &RELAY_IDLE_SECS, whole, 1)?),
        state,
        lists,
        spf_timeout: Duration::from_millis(within_a_year(env, &SPF_TIMEOUT_MS, positive, 1000)?),
    };
    Ok((config, warnings))
}

/// A warning per HELOGUARD_* name that is not one of ours: most likely a typo that would
/// otherwise leave a default in force unnoticed.
fn unknown_variable_warnings(names: impl Iterator<Item = String>) -> Vec<String> {
    names
        .filter(|name| name.starts_with("HELOGUARD_"))
        .filter(|name| !VARIABLES.iter().any(|v| v.name == name))
        .map(|name| format!("{name} is not a heloguard variable and is ignored"))
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn non_default_settings_name_what_differs_and_hide_passwords() {
        let env = |name: &str| match name {
            "HELOGUARD_LISTEN" => Some("127.0.0.1:2525".to_string()),
            "HELOGUARD_HOSTNAME" => Some("mx.example.org".to_string()),
            "HELOGUARD_DOMAINS" => Some(" ".to_string()),
            "HELOGUARD_DELIVER" => Some("smtp://relay:pw@10.0.0.2:25".to_string()),
            "HELOGUARD_MAX_JUNK" => Some("50".to_string()),
            _ => None,
        };
        assert_eq!(
            super::non_default_settings(env),
            vec![
                ("HELOGUARD_HOSTNAME", "mx.example.org".to_string()),
                (
                    "HELOGUARD_DELIVER",
                    "smtp://relay:***@10.0.0.2:25".to_string()
                ),
                ("HELOGUARD_MAX_JUNK", "50".to_string()),
            ]
        );
    }

    #[test]
    fn url_passwords_are_hidden_and_nothing_else_changes() {
        for (given, shown) in [
            (
                "redis://:s3cret@10.0.0.5:6379/2",
                "redis://:***@10.0.0.5:6379/2",
            ),
            ("redis://app:p@ss:w@host", "redis://app:***@host"),
            ("redis://app@host:6379", "redis://app@host:6379"),
            ("redis://host:6379/0", "redis://host:6379/0"),
            ("lmtp:unix:/run/dovecot/lmtp", "lmtp:unix:/run/dovecot/lmtp"),
            (
                "smtp://a:1,redis://u:p@h/1 x",
                "smtp://a:1,redis://u:***@h/1 x",
            ),
            ("", ""),
        ] {
            assert_eq!(super::hide_url_password(given), shown, "{given}");
        }
    }

    use std::cell::RefCell;
    use std::collections::HashMap;

    use super::*;

    /// A machine with a fixed host name, core count and resolv.conf.
    struct FakeMachine {
        host_name: Option<&'static str>,
        resolv_conf: Option<&'static str>,
    }

    const MACHINE: FakeMachine = FakeMachine {
        host_name: Some("mx.example.org"),
        resolv_conf: Some("nameserver 192.0.2.53\n"),
    };

    impl Machine for FakeMachine {
        fn host_name(&self) -> Option<String> {
            self.host_name.map(str::to_string)
        }

        fn cores(&self) -> usize {
            3
        }

        fn resolv_conf(&self) -> io::Result<String> {
            self.resolv_conf
                .map(str::to_string)
                .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "gone"))
        }
    }

    fn parse_on(
        machine: &FakeMachine,
        vars: &[(&str, &str)],
    ) -> Result<(Config, Vec<String>), ConfigError> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let lookup = move |name: &str| map.get(name).cloned();
        build(&Env { lookup: &lookup }, machine)
    }

    fn config(vars: &[(&str, &str)]) -> Config {
        match parse_on(&MACHINE, vars) {
            Ok((config, _)) => config,
            Err(e) => panic!("unexpected error: {e}"),
        }
    }

    fn warnings(vars: &[(&str, &str)]) -> Vec<String> {
        match parse_on(&MACHINE, vars) {
            Ok((_, warnings)) => warnings,
            Err(e) => panic!("unexpected error: {e}"),
        }
    }

    fn error(vars: &[(&str, &str)]) -> String {
        match parse_on(&MACHINE, vars) {
            Ok(_) => panic!("{vars:?} was accepted"),
            Err(e) => e.to_string(),
        }
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn every_default_matches_spec() {
        let c = config(&[]);
        assert_eq!(c.listen, vec![addr("127.0.0.1:2525")]);
        assert!(c.proxy_listen.is_empty());
        assert_eq!(
            c.proxy_trusted,
            vec![
                "127.0.0.0/8".parse::<Cidr>().unwrap(),
                "::1/128".parse::<Cidr>().unwrap()
            ]
        );
        assert_eq!(c.hostname, "mx.example.org");
        assert_eq!(c.workers, 3);
        assert_eq!(c.spool_writers, 8);
        assert_eq!(c.dns_servers, vec![addr("192.0.2.53:53")]);
        assert_eq!(c.dns_timeout, Duration::from_millis(2000));
        assert_eq!(c.deliver, DeliverTarget::Maildir);
        assert_eq!(c.spool, PathBuf::from("./spool"));
        assert_eq!(c.min_free_mb, 100);
        assert!(c.domains.is_empty());
        assert_eq!(c.max_message_size, 26_214_400);
        assert_eq!(c.max_recipients, 100);
        assert_eq!(c.max_connections, 10_000);
        assert_eq!(c.max_connections_per_ip, 50);
        assert_eq!(c.timeout, Duration::from_secs(300));
        assert_eq!(c.min_data_rate, 500);
        assert_eq!(c.max_errors, 20);
        assert_eq!(c.max_junk, 100);
        assert_eq!(c.dns_budget, 100);
        assert_eq!(c.greet_delay, Duration::ZERO);
        assert_eq!((c.tls_cert, c.tls_key), (None, None));
        assert_eq!(c.helo_policy, HeloPolicy::default());
        assert!(c.helo_allow.is_empty());
        assert_eq!(c.reject_at, RejectAt::Rcpt);
        assert_eq!(c.bare_newline, BareLineFeed::Normalize);
        assert_eq!(c.metrics, None);
        assert_eq!(c.shutdown_grace, Duration::from_secs(30));
        assert_eq!(c.relay_idle, Duration::from_secs(10));
        assert_eq!(
            warnings(&[]),
            vec!["HELOGUARD_DOMAINS is empty: mail for every domain is accepted"]
        );
    }

    #[test]
    fn the_parser_reads_exactly_the_variables_of_the_table() {
        let asked = RefCell::new(Vec::<String>::new());
        let lookup = |name: &str| {
            asked.borrow_mut().push(name.to_string());
            None
        };
        assert!(build(&Env { lookup: &lookup }, &MACHINE).is_ok());
        let mut asked = asked.into_inner();
        asked.sort();
        asked.dedup();
        let mut table: Vec<String> = VARIABLES
            .iter()
            .filter(|v| v.name != RUST_LOG.name)
            .map(|v| v.name.to_string())
            .collect();
        table.sort();
        assert_eq!(asked, table);
    }

    #[test]
    fn help_names_every_subcommand_and_variable_with_its_default() {
        let help = help_text();
        for needle in ["serve", "check --ip IP --helo NAME", "--help"] {
            assert!(help.contains(needle), "{needle} missing");
        }
        for variable in VARIABLES {
            assert!(help.contains(&format!("\n  {}\n", variable.name)));
        }
        assert!(help.contains("default: 127.0.0.1:2525"));
        assert!(help.contains("default: 26214400"));
        assert!(help.contains("default: default=tag,syntax=reject"));
        assert!(help.contains("default: the system host name"));
    }

    #[test]
    fn unknown_heloguard_names_are_warned_about() {
        let names = ["HELOGUARD_MAX_RCPT", "HELOGUARD_LISTEN", "PATH"].map(String::from);
        assert_eq!(
            unknown_variable_warnings(names.into_iter()),
            vec!["HELOGUARD_MAX_RCPT is not a heloguard variable and is ignored"]
        );
    }

    #[test]
    fn listen() {
        let c = config(&[("HELOGUARD_LISTEN", " 0.0.0.0:25 , [::]:25 ")]);
        assert_eq!(c.listen, vec![addr("0.0.0.0:25"), addr("[::]:25")]);
        assert_eq!(
            error(&[("HELOGUARD_LISTEN", "localhost:25")]),
            r#"HELOGUARD_LISTEN: "localhost:25" is not an address:port (IPv6 as [addr]:port)"#
        );
        assert_eq!(
            error(&[("HELOGUARD_LISTEN", "127.0.0.1:25,,[::1]:25")]),
            r#"HELOGUARD_LISTEN: "127.0.0.1:25,,[::1]:25" has an empty list item"#
        );
        assert_eq!(
            error(&[("HELOGUARD_LISTEN", "0.0.0.0:25,192.0.2.1:25")]),
            "HELOGUARD_LISTEN: \"192.0.2.1:25\" overlaps the listen address 0.0.0.0:25 given \
             before"
        );
        assert_eq!(
            error(&[("HELOGUARD_LISTEN", "")]),
            "HELOGUARD_LISTEN: is empty and HELOGUARD_PROXY_LISTEN is unset: nothing would listen"
        );
        // Port 0 asks for a fresh port each time, and V6ONLY keeps families apart.
        let c = config(&[(
            "HELOGUARD_LISTEN",
            "127.0.0.1:0,127.0.0.1:0,0.0.0.0:25,[::]:25",
        )]);
        assert_eq!(c.listen.len(), 4);
    }

    #[test]
    fn proxy_listen() {
        let c = config(&[("HELOGUARD_PROXY_LISTEN", "127.0.0.1:2526")]);
        assert_eq!(c.proxy_listen, vec![addr("127.0.0.1:2526")]);
        let c = config(&[
            ("HELOGUARD_LISTEN", ""),
            ("HELOGUARD_PROXY_LISTEN", "[::1]:2526"),
        ]);
        assert!(c.listen.is_empty());
        assert_eq!(
            error(&[("HELOGUARD_PROXY_LISTEN", "127.0.0.1:2525")]),
            "HELOGUARD_PROXY_LISTEN: \"127.0.0.1:2525\" overlaps the listen address \
             127.0.0.1:2525 given before"
        );
        assert_eq!(
            error(&[("HELOGUARD_PROXY_LISTEN", "2526")]),
            r#"HELOGUARD_PROXY_LISTEN: "2526" is not an address:port (IPv6 as [addr]:port)"#
        );
    }

    #[test]
    fn proxy_trusted() {
        let c = config(&[("HELOGUARD_PROXY_TRUSTED", "10.0.0.0/8, 2001:db8::/32")]);
        assert_eq!(c.proxy_trusted.len(), 2);
        assert!(c.proxy_trusted[1].contains("2001:db8::7".parse().unwrap()));
        assert_eq!(
            error(&[("HELOGUARD_PROXY_TRUSTED", "10.0.0.0/33")]),
            r#"HELOGUARD_PROXY_TRUSTED: "10.0.0.0/33" is not a CIDR: `33` is not a valid prefix length"#
        );
    }

    #[test]
    fn hostname() {
        assert_eq!(
            config(&[("HELOGUARD_HOSTNAME", "MX1.Example.NET.")]).hostname,
            "MX1.Example.NET"
        );
        assert_eq!(
            error(&[("HELOGUARD_HOSTNAME", "mx_1.example.net")]),
            "HELOGUARD_HOSTNAME: \"mx_1.example.net\" has a character other than a letter, \
             digit, hyphen or dot"
        );
        assert_eq!(
            error(&[("HELOGUARD_HOSTNAME", "192.0.2.1")]),
            "HELOGUARD_HOSTNAME: \"192.0.2.1\" is an IP address or ends in a numeric label, \
             not a domain name"
        );
        assert!(warnings(&[("HELOGUARD_HOSTNAME", "mailbox")])[0].contains("not fully qualified"));
        let broken = FakeMachine {
            host_name: Some("bad host"),
            ..MACHINE
        };
        let err = parse_on(&broken, &[]).unwrap_err();
        assert_eq!(err.variable, "HELOGUARD_HOSTNAME");
        assert!(err.to_string().contains("the system host name"));
    }

    #[test]
    fn the_real_system_host_name_is_read() {
        assert!(system_host_name().is_some_and(|name| !name.is_empty()));
    }

    #[test]
    fn workers_and_spool_writers() {
        assert_eq!(config(&[("HELOGUARD_WORKERS", "16")]).workers, 16);
        assert_eq!(config(&[("HELOGUARD_SPOOL_WRITERS", "2")]).spool_writers, 2);
        assert_eq!(
            error(&[("HELOGUARD_WORKERS", "0")]),
            r#"HELOGUARD_WORKERS: "0" must be at least 1"#
        );
        assert_eq!(
            error(&[("HELOGUARD_SPOOL_WRITERS", "-1")]),
            r#"HELOGUARD_SPOOL_WRITERS: "-1" is not a whole number"#
        );
        assert_eq!(
            error(&[("HELOGUARD_WORKERS", "5000")]),
            r#"HELOGUARD_WORKERS: "5000" is more than 1024 threads"#
        );
    }

    #[test]
    fn dns() {
        let c = config(&[(
            "HELOGUARD_DNS",
            "192.0.2.1, 192.0.2.2:5353, [2001:db8::1]:53, 2001:db8::2, [2001:db8::3]",
        )]);
        assert_eq!(
            c.dns_servers,
            vec![
                addr("192.0.2.1:53"),
                addr("192.0.2.2:5353"),
                addr("[2001:db8::1]:53"),
                addr("[2001:db8::2]:53"),
                addr("[2001:db8::3]:53"),
            ]
        );
        assert_eq!(
            error(&[("HELOGUARD_DNS", "dns.example:53")]),
            r#"HELOGUARD_DNS: "dns.example:53" is not a nameserver ip:port (IPv6 as [addr]:port)"#
        );
    }

    #[test]
    fn resolv_conf_lines_give_the_default_nameservers() {
        let text = "# comment\nsearch example.org\nnameserver 10.0.0.1\n  nameserver\t\
                    fe80::1%eth0\nnameserver 2001:db8::53 # trailing\nnameserver bogus\n\
                    ;nameserver 10.9.9.9\noptions edns0\n";
        assert_eq!(
            resolv_conf_nameservers(text),
            vec![
                addr("10.0.0.1:53"),
                addr("[fe80::1]:53"),
                addr("[2001:db8::53]:53")
            ]
        );
        let empty = FakeMachine {
            resolv_conf: Some("search example.org\n"),
            ..MACHINE
        };
        assert_eq!(
            parse_on(&empty, &[]).unwrap_err().to_string(),
            "HELOGUARD_DNS: is unset and /etc/resolv.conf has no usable nameserver line; set it"
        );
        let missing = FakeMachine {
            resolv_conf: None,
            ..MACHINE
        };
        let err = parse_on(&missing, &[]).unwrap_err();
        assert_eq!(err.variable, "HELOGUARD_DNS");
        // HELOGUARD_DNS set: resolv.conf is not needed at all.
        assert!(parse_on(&missing, &[("HELOGUARD_DNS", "192.0.2.1")]).is_ok());
    }

    #[test]
    fn dns_timeout() {
        assert_eq!(
            config(&[("HELOGUARD_DNS_TIMEOUT_MS", "500")]).dns_timeout,
            Duration::from_millis(500)
        );
        assert_eq!(
            error(&[("HELOGUARD_DNS_TIMEOUT_MS", "0")]),
            r#"HELOGUARD_DNS_TIMEOUT_MS: "0" must be more than 0"#
        );
        assert_eq!(
            error(&[("HELOGUARD_DNS_TIMEOUT_MS", "2s")]),
            r#"HELOGUARD_DNS_TIMEOUT_MS: "2s" is not a whole number"#
        );
    }

    #[test]
    fn deliver() {
        let relay = |target: &str| {
            config(&[
                ("HELOGUARD_DELIVER", target),
                ("HELOGUARD_DOMAINS", "example.org"),
            ])
            .deliver
        };
        assert_eq!(relay("MAILDIR"), DeliverTarget::Maildir);
        assert_eq!(
            relay("smtp://mx.internal:10025"),
            DeliverTarget::Smtp {
                host: "mx.internal".into(),
                port: 10025
            }
        );
        assert_eq!(
            relay("lmtp://[::1]:24"),
            DeliverTarget::Lmtp {
                host: "::1".into(),
                port: 24
            }
        );
        assert_eq!(
            relay("lmtp://127.0.0.1:24"),
            DeliverTarget::Lmtp {
                host: "127.0.0.1".into(),
                port: 24
            }
        );
        assert_eq!(
            relay("lmtp:unix:/run/dovecot/lmtp"),
            DeliverTarget::LmtpUnix {
                path: "/run/dovecot/lmtp".into()
            }
        );
        let bad = |target: &str| {
            error(&[
                ("HELOGUARD_DELIVER", target),
                ("HELOGUARD_DOMAINS", "example.org"),
            ])
        };
        assert_eq!(
            bad("mbox"),
            "HELOGUARD_DELIVER: \"mbox\" is not maildir, smtp://HOST:PORT, lmtp://HOST:PORT \
             or lmtp:unix:/PATH"
        );
        assert_eq!(
            bad("smtp://mx.internal"),
            "HELOGUARD_DELIVER: \"smtp://mx.internal\" needs HOST:PORT with a port from 1 to \
             65535 (IPv6 as [addr]:PORT)"
        );
        for target in [
            "smtp://mx:0",
            "smtp://mx:+25",
            "smtp://::1:25",
            "smtp://mx:25/",
            "smtp://:25",
            "lmtp:unix:run/lmtp",
        ] {
            assert!(bad(target).starts_with("HELOGUARD_DELIVER: "), "{target}");
        }
    }

    #[test]
    fn spool_and_min_free() {
        let c = config(&[
            ("HELOGUARD_SPOOL", "/var/spool/heloguard"),
            ("HELOGUARD_MIN_FREE_MB", "0"),
        ]);
        assert_eq!(c.spool, PathBuf::from("/var/spool/heloguard"));
        assert_eq!(c.min_free_mb, 0);
        assert_eq!(
            error(&[("HELOGUARD_MIN_FREE_MB", "1.5")]),
            r#"HELOGUARD_MIN_FREE_MB: "1.5" is not a whole number"#
        );
    }

    #[test]
    fn domains() {
        let c = config(&[(
            "HELOGUARD_DOMAINS",
            " Example.ORG. ,mail.example.net,example.org",
        )]);
        assert_eq!(c.domains, vec!["example.org", "mail.example.net"]);
        assert!(warnings(&[("HELOGUARD_DOMAINS", "example.org")]).is_empty());
        assert_eq!(
            error(&[("HELOGUARD_DOMAINS", "example.org,exa mple.net")]),
            "HELOGUARD_DOMAINS: \"exa mple.net\" has a character other than a letter, digit, \
             hyphen or dot"
        );
        assert_eq!(
            error(&[("HELOGUARD_DELIVER", "smtp://127.0.0.1:10025")]),
            "HELOGUARD_DOMAINS: is empty, which in a relay mode would make an open relay; list \
             the domains"
        );
    }

    #[test]
    fn numeric_limits() {
        let cases = [
            ("HELOGUARD_MAX_MESSAGE_SIZE", "1048576"),
            ("HELOGUARD_MAX_RECIPIENTS", "1000"),
            ("HELOGUARD_MAX_CONNECTIONS", "0"),
            ("HELOGUARD_MAX_CONNECTIONS_PER_IP", "5"),
            ("HELOGUARD_TIMEOUT_SECS", "60"),
            ("HELOGUARD_MIN_DATA_RATE", "0"),
            ("HELOGUARD_MAX_ERRORS", "3"),
            ("HELOGUARD_MAX_JUNK", "7"),
            ("HELOGUARD_DNS_BUDGET", "0"),
            ("HELOGUARD_SHUTDOWN_GRACE_SECS", "5"),
            ("HELOGUARD_RELAY_IDLE_SECS", "30"),
        ];
        for (name, value) in cases {
            assert_eq!(
                limit(name, &config(&[(name, value)])),
                value.parse::<u64>().unwrap()
            );
            assert_eq!(
                error(&[(name, "abc")]),
                format!("{name}: \"abc\" is not a whole number")
            );
            assert_eq!(
                error(&[(name, "+5")]),
                format!("{name}: \"+5\" is not a whole number")
            );
            assert_eq!(
                error(&[(name, "99999999999999999999")]),
                format!("{name}: \"99999999999999999999\" is too large")
            );
        }
        assert_eq!(
            error(&[("HELOGUARD_MAX_ERRORS", "4294967296")]),
            r#"HELOGUARD_MAX_ERRORS: "4294967296" is too large"#
        );
        // Times past a year would overflow the clock they are added to.
        for (name, over) in [
            ("HELOGUARD_TIMEOUT_SECS", "31536001"),
            ("HELOGUARD_SHUTDOWN_GRACE_SECS", "9223372036854775808"),
            ("HELOGUARD_GREET_DELAY_MS", "31536000001"),
            ("HELOGUARD_DNS_TIMEOUT_MS", "31536000001"),
        ] {
            assert_eq!(
                error(&[(name, over)]),
                format!("{name}: \"{over}\" is more than a year")
            );
        }
        assert_eq!(
            config(&[("HELOGUARD_TIMEOUT_SECS", "31536000")]).timeout,
            Duration::from_secs(31_536_000)
        );
        assert!(warnings(&[("HELOGUARD_MAX_RECIPIENTS", "10")])[1].contains("RFC 5321"));
    }

    /// The Config field a numeric limit variable sets, as u64.
    fn limit(name: &str, c: &Config) -> u64 {
        match name {
            "HELOGUARD_MAX_MESSAGE_SIZE" => c.max_message_size,
            "HELOGUARD_MAX_RECIPIENTS" => c.max_recipients as u64,
            "HELOGUARD_MAX_CONNECTIONS" => c.max_connections as u64,
            "HELOGUARD_MAX_CONNECTIONS_PER_IP" => c.max_connections_per_ip as u64,
            "HELOGUARD_TIMEOUT_SECS" => c.timeout.as_secs(),
            "HELOGUARD_MIN_DATA_RATE" => c.min_data_rate,
            "HELOGUARD_MAX_ERRORS" => u64::from(c.max_errors),
            "HELOGUARD_MAX_JUNK" => u64::from(c.max_junk),
            "HELOGUARD_DNS_BUDGET" => u64::from(c.dns_budget),
            "HELOGUARD_SHUTDOWN_GRACE_SECS" => c.shutdown_grace.as_secs(),
            "HELOGUARD_RELAY_IDLE_SECS" => c.relay_idle.as_secs(),
            other => panic!("{other} is not a numeric limit"),
        }
    }

    #[test]
    fn greet_delay() {
        assert_eq!(
            config(&[("HELOGUARD_GREET_DELAY_MS", "3000")]).greet_delay,
            Duration::from_secs(3)
        );
        assert_eq!(
            error(&[("HELOGUARD_GREET_DELAY_MS", "3 s")]),
            r#"HELOGUARD_GREET_DELAY_MS: "3 s" is not a whole number"#
        );
    }

    #[test]
    fn tls_files() {
        let dir = std::env::temp_dir().join(format!("heloguard-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let cert = dir.join("cert.pem");
        let key = dir.join("key.pem");
        std::fs::write(&cert, "cert").unwrap();
        std::fs::write(&key, "key").unwrap();
        let (cert, key) = (cert.to_str().unwrap(), key.to_str().unwrap());
        let c = config(&[("HELOGUARD_TLS_CERT", cert), ("HELOGUARD_TLS_KEY", key)]);
        assert_eq!(c.tls_cert.as_deref(), Some(std::path::Path::new(cert)));
        assert_eq!(c.tls_key.as_deref(), Some(std::path::Path::new(key)));
        assert_eq!(
            error(&[("HELOGUARD_TLS_CERT", cert)]),
            "HELOGUARD_TLS_KEY: is unset but HELOGUARD_TLS_CERT is set; set both or neither"
        );
        assert_eq!(
            error(&[("HELOGUARD_TLS_KEY", key)]),
            "HELOGUARD_TLS_CERT: is unset but HELOGUARD_TLS_KEY is set; set both or neither"
        );
        let missing = dir.join("missing.pem");
        let err = error(&[
            ("HELOGUARD_TLS_CERT", cert),
            ("HELOGUARD_TLS_KEY", missing.to_str().unwrap()),
        ]);
        assert!(err.starts_with("HELOGUARD_TLS_KEY: \""), "{err}");
        assert!(err.contains("cannot be read"), "{err}");
        let err = error(&[
            ("HELOGUARD_TLS_CERT", dir.to_str().unwrap()),
            ("HELOGUARD_TLS_KEY", key),
        ]);
        assert!(err.ends_with("is not a regular file"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn helo_policy_default_text_is_the_default_policy() {
        assert_eq!(
            HeloPolicy::parse("default=tag,syntax=reject").unwrap(),
            HeloPolicy::default()
        );
        let c = config(&[("HELOGUARD_HELO_POLICY", "default=tag,localhost=reject")]);
        assert_eq!(
            c.helo_policy.action(crate::helo::Check::Localhost),
            crate::helo::Action::Reject
        );
        let err = error(&[("HELOGUARD_HELO_POLICY", "bogus=reject")]);
        assert!(
            err.starts_with(r#"HELOGUARD_HELO_POLICY: "bogus=reject" "#),
            "{err}"
        );
    }

    #[test]
    fn helo_allow() {
        let c = config(&[("HELOGUARD_HELO_ALLOW", "192.0.2.0/24, ptr:example.org")]);
        assert_eq!(c.helo_allow.len(), 2);
        let err = error(&[("HELOGUARD_HELO_ALLOW", "not-an-entry")]);
        assert!(
            err.starts_with(r#"HELOGUARD_HELO_ALLOW: "not-an-entry" "#),
            "{err}"
        );
    }

    #[test]
    fn reject_at_and_bare_newline() {
        let c = config(&[
            ("HELOGUARD_REJECT_AT", "helo"),
            ("HELOGUARD_BARE_NEWLINE", "reject"),
        ]);
        assert_eq!(c.reject_at, RejectAt::Helo);
        assert_eq!(c.bare_newline, BareLineFeed::Reject);
        assert_eq!(
            error(&[("HELOGUARD_REJECT_AT", "data")]),
            r#"HELOGUARD_REJECT_AT: "data" is not rcpt or helo"#
        );
        assert_eq!(
            error(&[("HELOGUARD_BARE_NEWLINE", "keep")]),
            r#"HELOGUARD_BARE_NEWLINE: "keep" is not normalize or reject"#
        );
    }

    #[test]
    fn metrics() {
        assert_eq!(
            config(&[("HELOGUARD_METRICS", "127.0.0.1:9425")]).metrics,
            Some(addr("127.0.0.1:9425"))
        );
        assert_eq!(
            error(&[("HELOGUARD_METRICS", ":9425")]),
            r#"HELOGUARD_METRICS: ":9425" is not an address:port (IPv6 as [addr]:port)"#
        );
        assert_eq!(
            error(&[("HELOGUARD_METRICS", "0.0.0.0:2525")]),
            "HELOGUARD_METRICS: \"0.0.0.0:2525\" overlaps the listen address 127.0.0.1:2525 \
             given before"
        );
    }

    #[test]
    fn error_lines_escape_control_characters() {
        let line = error(&[("HELOGUARD_MAX_JUNK", "1\n2")]);
        assert_eq!(line, r#"HELOGUARD_MAX_JUNK: "1\n2" is not a whole number"#);
    }

    #[test]
    fn sender_reputation_defaults_and_values() {
        let c = config(&[]);
        assert!(c.lists.dnsbl.is_empty() && c.lists.rhsbl.is_empty());
        assert_eq!(c.helo_policy.sender.dnsbl_threshold, 1);
        assert_eq!(c.helo_policy.sender.dnswl_threshold, 0);
        assert!(!c.helo_policy.sender.dnsbl && !c.helo_policy.sender.rhsbl);
        assert_eq!(c.spf_timeout, Duration::from_secs(20));
        let settings = SessionSettings::from(&c);
        assert!(!settings.sender_checks.dnsbl && !settings.sender_checks.rhsbl);

        let c = config(&[
            (
                "HELOGUARD_DNSBL",
                "zen.spamhaus.org=127.0.0.[2..11]*3 list.dnswl.org=127.0.[0..255].[1..3]*-2",
            ),
            ("HELOGUARD_DNSBL_THRESHOLD", "3"),
            ("HELOGUARD_DNSWL_THRESHOLD", "-2"),
            ("HELOGUARD_RHSBL", "dbl.spamhaus.org=127.0.1.[2..99]"),
            ("HELOGUARD_SPF_TIMEOUT_MS", "25000"),
        ]);
        assert_eq!(c.lists.dnsbl.len(), 2);
        assert_eq!(c.lists.dnsbl[1].weight, -2);
        assert_eq!(c.lists.rhsbl[0].zone, "dbl.spamhaus.org");
        assert_eq!(c.helo_policy.sender.dnsbl_threshold, 3);
        assert_eq!(c.helo_policy.sender.dnswl_threshold, -2);
        assert!(c.helo_policy.sender.dnsbl && c.helo_policy.sender.rhsbl);
        assert_eq!(c.spf_timeout, Duration::from_secs(25));
        let settings = SessionSettings::from(&c);
        assert!(settings.sender_checks.dnsbl && settings.sender_checks.rhsbl);
        assert_eq!(settings.helo_policy.sender, c.helo_policy.sender);
    }

    #[test]
    fn sender_reputation_errors_name_the_variable_and_entry() {
        assert_eq!(
            error(&[("HELOGUARD_DNSBL", "ok.test, bad.test=127.0.0")]),
            "HELOGUARD_DNSBL: \"ok.test, bad.test=127.0.0\" entry \"bad.test=127.0.0\": the \
             filter is not four octets of N, [N..M] or [N;M;...]"
        );
        assert!(
            error(&[("HELOGUARD_DNSWL_THRESHOLD", "2")]).starts_with("HELOGUARD_DNSWL_THRESHOLD: ")
        );
        assert!(
            error(&[("HELOGUARD_DNSBL_THRESHOLD", "1.5")])
                .starts_with("HELOGUARD_DNSBL_THRESHOLD: ")
        );
        assert!(error(&[("HELOGUARD_RHSBL", "dbl.test*3")]).starts_with("HELOGUARD_RHSBL: "));
        assert!(
            error(&[("HELOGUARD_SPF_TIMEOUT_MS", "0")]).starts_with("HELOGUARD_SPF_TIMEOUT_MS: ")
        );
        // An access key in a bad entry is hidden by a good display name.
        let err = error(&[
            ("HELOGUARD_DNSBL", "KEY.zen.dq.test=bad"),
            (
                "HELOGUARD_DNSBL_DISPLAY",
                "key.zen.dq.test=zen.spamhaus.org",
            ),
        ]);
        assert!(!err.contains("KEY") && !err.contains("key."), "{err}");
    }

    #[test]
    fn the_configuration_line_shows_zones_by_their_display_names() {
        let env = |name: &str| match name {
            "HELOGUARD_DNSBL" => Some("S3CR3T.zen.dq.spamhaus.net*3 bl.spamcop.net".to_string()),
            "HELOGUARD_RHSBL" => Some("s3cr3t.dbl.dq.spamhaus.net".to_string()),
            "HELOGUARD_DNSBL_DISPLAY" => Some(
                "s3cr3t.zen.dq.spamhaus.net=zen.spamhaus.org,\
                 s3cr3t.dbl.dq.spamhaus.net=dbl.spamhaus.org"
                    .to_string(),
            ),
            _ => None,
        };
        let shown = super::non_default_settings(env);
        let text = format!("{shown:?}");
        assert!(!text.to_ascii_lowercase().contains("s3cr3t"), "{text}");
        assert!(shown.contains(&(
            "HELOGUARD_DNSBL",
            "zen.spamhaus.org*3 bl.spamcop.net".to_string()
        )));
    }
}
