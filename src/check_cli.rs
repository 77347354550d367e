//! `heloguard check --ip IP --helo NAME`: every HELO check once, against the configured
//! resolver, with a line per check and the verdict. The operator's tool to verify an outbound
//! server's HELO/PTR/A alignment before sending.
//!
//! Exit codes (SPEC "Running it"): 0 pass, 1 fail, 2 temperror or usage error.

use crate::helo::sender::SenderFacts;
use std::fmt;
use std::io::Write;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use crate::config::Config;
use crate::dns::resolver::{self, ResolverSettings};
use crate::dns::{DnsAnswer, DnsRequest, Family, Lookup, ReverseFacts, no_observer};
use crate::helo::VerdictKind;
use crate::helo::checks::{CheckInput, HeloArg, fqdn, name_key, parse_helo};
use crate::helo::policy::AllowEntry;
use crate::helo::report;
use crate::helo::{Action, Check, CheckResult};
use crate::net::canonical_ip;
use crate::net::is_local;

/// Shown on a usage error (stderr) and for `--help` (stdout).
pub const USAGE: &str = "\
usage: heloguard check --ip IP --helo NAME

Runs every HELO check once against the configured resolver (HELOGUARD_DNS,
HELOGUARD_DNS_TIMEOUT_MS) and policy (HELOGUARD_HELO_POLICY, HELOGUARD_HELO_ALLOW),
prints each check's result and why, then the verdict.

  --ip IP      the address the server sends from (IPv4 or IPv6)
  --helo NAME  the EHLO/HELO argument it sends, as sent

exit status: 0 pass, 1 fail, 2 temperror or usage error
";

/// Exit status for a usage error (the same as temperror, as SPEC says).
pub const EXIT_USAGE: i32 = 2;

/// What the command line asked for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    Check { ip: IpAddr, helo: String },
    Help,
}

/// Why the command line was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UsageError {
    MissingValue(&'static str),
    Missing(&'static str),
    Repeated(&'static str),
    BadIp(String),
    Unknown(String),
}

impl fmt::Display for UsageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::MissingValue(opt) => write!(f, "{opt} needs a value"),
            Self::Missing(opt) => write!(f, "{opt} is required"),
            Self::Repeated(opt) => write!(f, "{opt} given twice"),
            Self::BadIp(s) => write!(f, "--ip {s:?} is not an IP address"),
            Self::Unknown(s) => write!(f, "unknown argument {s:?}"),
        }
    }
}

impl std::error::Error for UsageError {}

/// Parses the arguments after `check` (a leading `check` itself is skipped too, so the
/// caller may pass either `argv[1..]` or `argv[2..]`). Accepts `--opt VALUE` and
/// `--opt=VALUE`.
pub fn parse_args(args: &[String]) -> Result<Command, UsageError> {
    let args = match args.first() {
        Some(first) if first == "check" => &args[1..],
        _ => args,
    };
    let mut ip: Option<String> = None;
    let mut helo: Option<String> = None;
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let (opt, inline) = match arg.split_once('=') {
            Some((o, v)) if o.starts_with("--") => (o, Some(v.to_string())),
            _ => (arg.as_str(), None),
        };
        let slot = match opt {
            "-h" | "--help" => return Ok(Command::Help),
            "--ip" => (&mut ip, "--ip"),
            "--helo" => (&mut helo, "--helo"),
            _ => return Err(UsageError::Unknown(arg.clone())),
        };
        let (target, name) = slot;
        let value = match inline {
            Some(v) => v,
            None => it.next().cloned().ok_or(UsageError::MissingValue(name))?,
        };
        if target.replace(value).is_some() {
            return Err(UsageError::Repeated(name));
        }
    }
    let ip_text = ip.ok_or(UsageError::Missing("--ip"))?;
    let ip = ip_text
        .parse::<IpAddr>()
        .map_err(|_| UsageError::BadIp(ip_text.clone()))?;
    let helo = helo.ok_or(UsageError::Missing("--helo"))?;
    // The same address every other part of heloguard would judge (SPEC "Who the client is").
    Ok(Command::Check {
        ip: canonical_ip(ip),
        helo,
    })
}

/// Runs `heloguard check`; returns the exit status.
pub fn run(args: &[String], config: &Config) -> i32 {
    let (ip, helo) = match parse_args(args) {
        Ok(Command::Check { ip, helo }) => (ip, helo),
        Ok(Command::Help) => {
            print!("{USAGE}");
            return 0;
        }
        Err(e) => {
            eprintln!("heloguard check: {e}\n\n{USAGE}");
            return EXIT_USAGE;
        }
    };
    let asks = SenderAsks::for_check(config, ip, &helo);
    let Gathered {
        helo_addrs,
        reverse,
        sender,
    } = match gather_with_sender(settings(config), ip, forward_name(&helo), asks) {
        Ok(found) => found,
        Err(e) => {
            eprintln!("heloguard check: {e}");
            return exit_code(VerdictKind::TempError);
        }
    };
    let input = CheckInput {
        client_ip: ip,
        helo: &helo,
        hostname: &config.hostname,
        domains: &config.domains,
    };
    let (text, verdict) = report::render(
        &input,
        helo_addrs.as_ref(),
        reverse.as_ref(),
        &sender,
        &config.helo_policy,
        &config.helo_allow,
    );
    let mut out = std::io::stdout().lock();
    let written = if text.ends_with('\n') {
        out.write_all(text.as_bytes())
    } else {
        writeln!(out, "{text}")
    };
    if let Err(e) = written.and_then(|()| out.flush()) {
        eprintln!("heloguard check: writing the report: {e}");
    }
    exit_code(verdict)
}

fn exit_code(verdict: VerdictKind) -> i32 {
    match verdict {
        VerdictKind::Pass => 0,
        VerdictKind::Fail => 1,
        VerdictKind::TempError => 2,
    }
}

fn settings(config: &Config) -> ResolverSettings {
    crate::reputation::resolver_settings(config, 256)
}

/// The sender lookups `heloguard check` makes, as the server would for this client and name
/// (helo_churn has no history to read in a one-shot command, so it is never asked).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SenderAsks {
    pub dnsbl: bool,
    /// The HELO name to check SPF of.
    pub spf: Option<String>,
    /// The HELO name key whose registered domain (and the PTR name's) is looked up.
    pub rhsbl: Option<String>,
}

impl SenderAsks {
    /// What the configuration and the policy make the server ask about `ip` saying `helo`.
    pub fn for_check(config: &Config, ip: IpAddr, helo: &str) -> Self {
        let policy = &config.helo_policy;
        let on = |check: Check| policy.action(check) != Action::Off;
        if is_local(ip) || allowed_by_address(config, ip) {
            return Self::default();
        }
        let arg = parse_helo(helo);
        // Asked even when the policy leaves spf off (its default): the report shows it
        // without counting it.
        let spf = match &arg {
            HeloArg::Domain(name) if fqdn(&arg) == CheckResult::Pass => Some(name.clone()),
            _ => None,
        };
        Self {
            dnsbl: !config.lists.dnsbl.is_empty() && on(Check::Dnsbl),
            spf,
            rhsbl: (!config.lists.rhsbl.is_empty() && on(Check::Rhsbl)).then(|| name_key(helo)),
        }
    }
}

/// HELOGUARD_HELO_ALLOW by address: such a client is never looked up (SPEC).
fn allowed_by_address(config: &Config, ip: IpAddr) -> bool {
    config
        .helo_allow
        .iter()
        .any(|entry| matches!(entry, AllowEntry::Net(net) if net.contains(ip)))
}

/// The name whose A/AAAA the checks need: only a syntactically valid domain has one.
fn forward_name(helo: &str) -> Option<String> {
    match parse_helo(helo) {
        HeloArg::Domain(name) => Some(name),
        HeloArg::AddressLiteral(_) | HeloArg::BareIp(_) | HeloArg::Invalid => None,
    }
}

const REVERSE_ID: u64 = 1;
const FORWARD_ID: u64 = 2;
const SENDER_ID: u64 = 3;

/// The DNS facts the checks need, as the server would gather them: PTR with its forward
/// confirmations, and `forward_name`'s A/AAAA (the HELO name, when it is a domain). Whatever
/// has not arrived after 2 x the lookup timeout (the server's verdict deadline) is `None`,
/// which the checks treat as undecided.
pub fn gather(
    settings: ResolverSettings,
    ip: IpAddr,
    forward_name: Option<String>,
) -> std::io::Result<Gathered> {
    gather_with_sender(settings, ip, forward_name, SenderAsks::default())
}

/// `gather`, and the sender facts `asks` names: the lists at once, SPF and the domain lists
/// once the reverse side is in (the `ptr` mechanism and the PTR name's domain build on it).
/// The lists answer by the usual deadline (a zone that does not counts as not listing); SPF
/// gets HELOGUARD_SPF_TIMEOUT_MS, as the server gives it under a refusing action.
pub fn gather_with_sender(
    settings: ResolverSettings,
    ip: IpAddr,
    forward_name: Option<String>,
    asks: SenderAsks,
) -> std::io::Result<Gathered> {
    let started = Instant::now();
    let deadline = started + settings.timeout.saturating_mul(2);
    let spf_deadline = started + settings.spf_timeout.max(settings.timeout.saturating_mul(2));
    let (tx, rx) = crossbeam_channel::unbounded();
    let handle = resolver::spawn(settings, tx, None, no_observer())?;
    handle.submit(DnsRequest::Reverse { id: REVERSE_ID, ip });
    if asks.dnsbl {
        handle.submit(DnsRequest::Dnsbl { id: SENDER_ID, ip });
    }
    let want_forward = forward_name.is_some();
    if let Some(name) = forward_name {
        handle.submit(DnsRequest::Forward {
            id: FORWARD_ID,
            name,
            family: Family::of(ip),
        });
    }
    let mut helo_addrs = None;
    let mut reverse = None;
    let mut sender = SenderFacts::default();
    let mut after_reverse = Some((asks.spf.clone(), asks.rhsbl.clone()));
    loop {
        let lists_missing = (asks.dnsbl && sender.dnsbl.is_none())
            || (asks.rhsbl.is_some() && sender.rhsbl.is_none());
        let usual_missing = reverse.is_none() || (want_forward && helo_addrs.is_none());
        let spf_missing = asks.spf.is_some() && sender.spf.is_none();
        let now = Instant::now();
        let until = if (usual_missing || lists_missing) && now < deadline {
            deadline
        } else if spf_missing {
            spf_deadline
        } else {
            break;
        };
        let left = until.saturating_duration_since(now);
        if left == Duration::ZERO {
            break;
        }
        match rx.recv_timeout(left) {
            Ok(DnsAnswer::Reverse { facts, .. }) => reverse = Some(facts),
            Ok(DnsAnswer::Forward { addrs, .. }) => helo_addrs = Some(addrs),
            Ok(DnsAnswer::Dnsbl { outcome, .. }) => sender.dnsbl = Some(outcome),
            Ok(DnsAnswer::Rhsbl { outcome, .. }) => sender.rhsbl = Some(outcome),
            Ok(DnsAnswer::Spf { outcome, .. }) => sender.spf = Some(outcome),
            // The usual deadline passed without the reverse side: SPF still gets its time.
            Err(crossbeam_channel::RecvTimeoutError::Timeout)
                if after_reverse.is_some() && asks.spf.is_some() => {}
            // Timeout: the deadline passed. Disconnected: the thread is gone; either way what
            // is missing stays undecided.
            Err(_) => break,
        }
        if (reverse.is_some() || Instant::now() >= deadline)
            && let Some((spf, rhsbl)) = after_reverse.take()
        {
            if let Some(name) = spf {
                handle.submit(DnsRequest::Spf {
                    id: SENDER_ID,
                    ip,
                    name,
                });
            }
            if let Some(name) = rhsbl {
                handle.submit(DnsRequest::Rhsbl {
                    id: SENDER_ID,
                    name,
                    ip,
                });
            }
        }
    }
    // SPEC: a list that did not answer counts as not listing.
    if asks.dnsbl && sender.dnsbl.is_none() {
        sender.dnsbl = Some(Default::default());
    }
    if asks.rhsbl.is_some() && sender.rhsbl.is_none() {
        sender.rhsbl = Some(Default::default());
    }
    // Dropping the only handle cancels whatever is still in flight.
    handle.join();
    Ok(Gathered {
        helo_addrs,
        reverse,
        sender,
    })
}

/// What `gather` learned; `None` is undecided.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Gathered {
    pub helo_addrs: Option<Lookup<Vec<IpAddr>>>,
    pub reverse: Option<ReverseFacts>,
    pub sender: SenderFacts,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn parses_both_forms() {
        let want = Command::Check {
            ip: "192.0.2.1".parse().expect("literal"),
            helo: "Mail.Example.test".into(),
        };
        assert_eq!(
            parse_args(&args(&["--ip", "192.0.2.1", "--helo", "Mail.Example.test"])),
            Ok(want.clone())
        );
        assert_eq!(
            parse_args(&args(&[
                "check",
                "--helo=Mail.Example.test",
                "--ip=192.0.2.1"
            ])),
            Ok(want)
        );
        assert_eq!(parse_args(&args(&["--help"])), Ok(Command::Help));
    }

    #[test]
    fn mapped_addresses_become_ipv4() {
        assert_eq!(
            parse_args(&args(&["--ip", "::ffff:192.0.2.7", "--helo", "x"])),
            Ok(Command::Check {
                ip: "192.0.2.7".parse().expect("literal"),
                helo: "x".into()
            })
        );
    }

    #[test]
    fn usage_errors() {
        assert_eq!(
            parse_args(&args(&["--helo", "x"])),
            Err(UsageError::Missing("--ip"))
        );
        assert_eq!(
            parse_args(&args(&["--ip", "192.0.2.1"])),
            Err(UsageError::Missing("--helo"))
        );
        assert_eq!(
            parse_args(&args(&["--ip"])),
            Err(UsageError::MissingValue("--ip"))
        );
        assert_eq!(
            parse_args(&args(&["--ip", "mail.example", "--helo", "x"])),
            Err(UsageError::BadIp("mail.example".into()))
        );
        assert_eq!(
            parse_args(&args(&["--ip", "192.0.2.1", "--ip", "192.0.2.2"])),
            Err(UsageError::Repeated("--ip"))
        );
        assert_eq!(
            parse_args(&args(&["--verbose"])),
            Err(UsageError::Unknown("--verbose".into()))
        );
    }
}
