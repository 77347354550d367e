//! HELO/EHLO identity checks: fifteen pure checks over the client IP, the HELO argument, the
//! server's own names, DNS facts and the sender facts (SPF, lists, HELO history); the
//! per-check policy; the verdict; the trace headers.
//!
//! Nothing here does I/O. DNS facts come in from `crate::dns`; the session decides when to
//! evaluate. See SPEC.md "HELO checks" for the exact table implemented by `checks`.

pub mod checks;
pub mod dynamic;
pub mod policy;
pub mod report;
pub mod sender;
pub mod trace;
pub mod verdict;

use std::fmt;

/// The fifteen checks, in the order SPEC fixes for the X-HELO-Check header.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Check {
    Syntax,
    BareIp,
    Fqdn,
    Localhost,
    OwnName,
    LiteralMatch,
    Forward,
    ForwardMatch,
    Fcrdns,
    RdnsMatch,
    Dynamic,
    Spf,
    Rhsbl,
    Dnsbl,
    HeloChurn,
}

/// How many checks there are: the length of every per-check array.
pub const CHECKS: usize = 15;

impl Check {
    pub const ALL: [Check; CHECKS] = [
        Check::Syntax,
        Check::BareIp,
        Check::Fqdn,
        Check::Localhost,
        Check::OwnName,
        Check::LiteralMatch,
        Check::Forward,
        Check::ForwardMatch,
        Check::Fcrdns,
        Check::RdnsMatch,
        Check::Dynamic,
        Check::Spf,
        Check::Rhsbl,
        Check::Dnsbl,
        Check::HeloChurn,
    ];

    /// The name used in HELOGUARD_HELO_POLICY, headers, logs and metrics.
    pub const fn name(self) -> &'static str {
        match self {
            Check::Syntax => "syntax",
            Check::BareIp => "bare_ip",
            Check::Fqdn => "fqdn",
            Check::Localhost => "localhost",
            Check::OwnName => "own_name",
            Check::LiteralMatch => "literal_match",
            Check::Forward => "forward",
            Check::ForwardMatch => "forward_match",
            Check::Fcrdns => "fcrdns",
            Check::RdnsMatch => "rdns_match",
            Check::Dynamic => "dynamic",
            Check::Spf => "spf",
            Check::Rhsbl => "rhsbl",
            Check::Dnsbl => "dnsbl",
            Check::HeloChurn => "helo_churn",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.name() == name)
    }

    pub const fn index(self) -> usize {
        self as usize
    }
}

/// The result of one check.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CheckResult {
    Pass,
    Fail,
    TempError,
    None,
}

impl CheckResult {
    pub const fn name(self) -> &'static str {
        match self {
            CheckResult::Pass => "pass",
            CheckResult::Fail => "fail",
            CheckResult::TempError => "temperror",
            CheckResult::None => "none",
        }
    }
}

/// What the operator wants done when a check fails; ordered from weakest to strongest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Action {
    Off,
    Log,
    Tag,
    Greylist,
    Defer,
    Reject,
}

impl Action {
    pub const fn name(self) -> &'static str {
        match self {
            Action::Off => "off",
            Action::Log => "log",
            Action::Tag => "tag",
            Action::Greylist => "greylist",
            Action::Defer => "defer",
            Action::Reject => "reject",
        }
    }
}

/// The overall verdict written in X-HELO-Check and counted in metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum VerdictKind {
    Pass,
    Fail,
    TempError,
}

impl VerdictKind {
    pub const fn name(self) -> &'static str {
        match self {
            VerdictKind::Pass => "pass",
            VerdictKind::Fail => "fail",
            VerdictKind::TempError => "temperror",
        }
    }
}

impl fmt::Display for VerdictKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}
