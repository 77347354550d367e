//! The text report of `heloguard check`: one line per check with its result and why.
//!
//! Layout: the identity and the DNS facts (HELO A/AAAA, PTR names and their confirmation),
//! then `check: result — why` in SPEC order, an `allow:` line when the allow list matched, and
//! `verdict: pass|fail|temperror` last. A check whose action is `off` is shown `off — not run`;
//! a `log` check shows its result marked as not counted. The verdict is the one the server
//! would reach ([`decide`]), so the operator sees exactly what a message would be tagged with.

use std::fmt::Write as _;
use std::net::IpAddr;

use crate::dns::{Lookup, PtrName, ReverseFacts, TempFailure};
use crate::helo::checks::{self, CheckInput, HeloArg};
use crate::helo::dynamic::looks_dynamic;
use crate::helo::policy::{AllowEntry, HeloPolicy, decide};
use crate::helo::sender::{ChurnOutcome, SenderFacts, SenderPolicy};
use crate::helo::{Action, Check, CheckResult, VerdictKind};
use crate::net::{canonical_ip, is_local};

/// Renders the report (a line per check, the verdict last) and returns it with the verdict.
pub fn render(
    input: &CheckInput<'_>,
    helo_addrs: Option<&Lookup<Vec<IpAddr>>>,
    reverse: Option<&ReverseFacts>,
    sender: &SenderFacts,
    policy: &HeloPolicy,
    allow: &[AllowEntry],
) -> (String, VerdictKind) {
    let facts = Facts {
        input,
        arg: checks::parse_helo(input.helo),
        ip: canonical_ip(input.client_ip),
        helo_addrs,
        reverse,
        sender,
        lists: policy.sender,
    };
    let results = checks::run_all(input, helo_addrs, reverse, sender, &policy.sender);
    let verdict = decide(input, helo_addrs, reverse, sender, policy, allow);
    let mut out = String::new();
    facts.write_header(&mut out);
    for check in Check::ALL {
        let result = results[check.index()];
        let line = match policy.action(check) {
            // SPF is off unless the policy names it; `heloguard check` still shows what it
            // finds, since a sender's admin runs the command to see exactly that.
            Action::Off if check == Check::Spf && sender.spf.is_some() => format!(
                "{}: off — not counted (policy); {}",
                check.name(),
                facts.why_spf(CheckResult::None)
            ),
            Action::Off => format!("{}: off — not run (policy)", check.name()),
            Action::Log => format!(
                "{}: {} — {} (action log: not counted)",
                check.name(),
                result.name(),
                facts.why(check, result)
            ),
            _ => format!(
                "{}: {} — {}",
                check.name(),
                result.name(),
                facts.why(check, result)
            ),
        };
        out.push_str(&line);
        out.push('\n');
    }
    if let Some(entry) = &verdict.allowed_by {
        let _ = writeln!(out, "allow: {entry} (the server skips every check)");
    }
    let _ = writeln!(out, "verdict: {}", verdict.kind);
    (out, verdict.kind)
}

/// What the report explains from: the same facts the checks saw.
struct Facts<'a> {
    input: &'a CheckInput<'a>,
    arg: HeloArg,
    ip: IpAddr,
    helo_addrs: Option<&'a Lookup<Vec<IpAddr>>>,
    reverse: Option<&'a ReverseFacts>,
    sender: &'a SenderFacts,
    lists: SenderPolicy,
}

impl Facts<'_> {
    fn write_header(&self, out: &mut String) {
        let _ = writeln!(out, "client: {}", self.ip);
        let _ = writeln!(out, "helo: {}", self.input.helo);
        if self.arg.domain().is_some() {
            let _ = writeln!(out, "helo A/AAAA: {}", describe_addrs(self.helo_addrs));
        }
        let _ = writeln!(out, "ptr: {}", self.describe_ptr());
        let confirmed = checks::confirmed_ptr(self.reverse, self.ip);
        let _ = writeln!(
            out,
            "fcrdns name: {}",
            confirmed.as_deref().unwrap_or("none")
        );
    }

    fn describe_ptr(&self) -> String {
        let Some(reverse) = self.reverse else {
            return "no answer".to_string();
        };
        match &reverse.ptr {
            Lookup::Found(names) if names.is_empty() => "none (NODATA)".to_string(),
            Lookup::Found(names) => names
                .iter()
                .map(|n| format!("{} -> {}", n.name, describe_addrs(Some(&n.addrs))))
                .collect::<Vec<_>>()
                .join("; "),
            other => format!("none ({})", outcome(other)),
        }
    }

    /// The name the checks judge, for messages.
    fn helo(&self) -> &str {
        self.input.helo
    }

    fn why(&self, check: Check, result: CheckResult) -> String {
        match check {
            Check::Syntax => self.why_syntax(result),
            Check::BareIp => self.why_bare_ip(result),
            Check::Fqdn => self.why_fqdn(result),
            Check::Localhost => self.why_localhost(result),
            Check::OwnName => self.why_own_name(result),
            Check::LiteralMatch => self.why_literal_match(result),
            Check::Forward => self.why_forward(result),
            Check::ForwardMatch => self.why_forward_match(result),
            Check::Fcrdns => self.why_fcrdns(result),
            Check::RdnsMatch => self.why_rdns_match(result),
            Check::Dynamic => self.why_dynamic(result),
            Check::Spf => self.why_spf(result),
            Check::Rhsbl => self.why_rhsbl(result),
            Check::Dnsbl => self.why_dnsbl(result),
            Check::HeloChurn => self.why_helo_churn(result),
        }
    }

    fn why_spf(&self, result: CheckResult) -> String {
        if !checks::spf_applies(self.input, &self.arg) {
            return "SPF applies only to a fully-qualified HELO name of a remote client \
                    (RFC 7208 2.3)"
                .to_string();
        }
        let h = self.helo();
        match (&self.sender.spf, result) {
            (None, _) => format!("SPF of {h}: no result in time (temporary error)"),
            (Some(spf), _) => format!(
                "SPF of {h} for {}: {} ({})",
                self.ip,
                spf.result.name(),
                spf.why
            ),
        }
    }

    fn why_rhsbl(&self, result: CheckResult) -> String {
        if !self.lists.rhsbl {
            return "no domain lists set (HELOGUARD_RHSBL)".to_string();
        }
        if result == CheckResult::None {
            return "no HELO or confirmed PTR domain to look up, or a local client".to_string();
        }
        match self.sender.rhsbl.as_ref().map(|r| r.hits.as_slice()) {
            Some(hits) if !hits.is_empty() => hits
                .iter()
                .map(|h| format!("{} listed by {} ({})", h.domain, h.zone, h.answer))
                .collect::<Vec<_>>()
                .join("; "),
            _ => "the HELO and PTR domains are listed in no zone".to_string(),
        }
    }

    fn why_dnsbl(&self, result: CheckResult) -> String {
        if !self.lists.dnsbl {
            return "no IP lists set (HELOGUARD_DNSBL)".to_string();
        }
        if result == CheckResult::None {
            return "a local client is not looked up".to_string();
        }
        let Some(dnsbl) = self.sender.dnsbl.as_ref() else {
            return "no list answered: score 0".to_string();
        };
        let zones = if dnsbl.hits.is_empty() {
            "listed in no zone".to_string()
        } else {
            dnsbl
                .hits
                .iter()
                .map(|h| format!("{} ({}, weight {})", h.zone, h.answer, h.weight))
                .collect::<Vec<_>>()
                .join(", ")
        };
        format!(
            "{} score {} (threshold {}): {zones}",
            self.ip, dnsbl.score, self.lists.dnsbl_threshold
        )
    }

    fn why_helo_churn(&self, result: CheckResult) -> String {
        if self.lists.helo_churn == 0 {
            return "off (HELOGUARD_HELO_CHURN=0)".to_string();
        }
        match (self.sender.churn, result) {
            (Some(ChurnOutcome::DistinctNames(n)), _) => format!(
                "{n} distinct HELO names from this client within the last hour (at most {})",
                self.lists.helo_churn
            ),
            (_, CheckResult::None) if is_local(self.ip) => "a local client".to_string(),
            (None, _) => "not judged: `heloguard check` is one-shot and keeps no HELO history \
                          (the server reads it from its state store)"
                .to_string(),
            _ => "the state store did not answer: not judged".to_string(),
        }
    }

    fn why_syntax(&self, result: CheckResult) -> String {
        let h = self.helo();
        match (&self.arg, result) {
            (HeloArg::Domain(_), _) => format!("{h} is a valid domain name"),
            (HeloArg::AddressLiteral(_), _) => format!("{h} is a valid address literal"),
            (HeloArg::BareIp(_), _) => format!("{h} is an IP address"),
            (HeloArg::Invalid, _) => format!(
                "{h:?} is neither a domain name (letter/digit/hyphen labels of 1-63 octets, \
                 at most 255 octets) nor an address literal nor an IP address"
            ),
        }
    }

    fn why_bare_ip(&self, result: CheckResult) -> String {
        match (&self.arg, result) {
            (HeloArg::BareIp(IpAddr::V4(v4)), _) => {
                format!("{v4} is an IP address without brackets; send [{v4}]")
            }
            (HeloArg::BareIp(IpAddr::V6(v6)), _) => {
                format!("{v6} is an IP address without brackets; send [IPv6:{v6}]")
            }
            (HeloArg::Invalid, _) => "syntax failed".to_string(),
            _ => "not a bare IP address".to_string(),
        }
    }

    fn why_fqdn(&self, result: CheckResult) -> String {
        let Some(name) = self.arg.domain() else {
            return "not a domain name".to_string();
        };
        match result {
            CheckResult::Fail if !name.contains('.') => format!("{name} has no dot"),
            CheckResult::Fail => format!("the last label of {name} is all digits"),
            _ => format!("{name} is fully qualified"),
        }
    }

    fn why_localhost(&self, result: CheckResult) -> String {
        if result == CheckResult::None {
            return "syntax failed".to_string();
        }
        if is_local(self.ip) {
            return "the client itself is local".to_string();
        }
        match (&self.arg, result) {
            (HeloArg::Domain(name), CheckResult::Fail) => match self.helo_addrs {
                Some(Lookup::Found(_)) if !checks::is_localhost_name(name) => {
                    format!("every A/AAAA record of {name} is a loopback address")
                }
                _ => format!("{name} is a localhost name, sent by a remote client"),
            },
            (HeloArg::Domain(name), CheckResult::TempError) => {
                format!(
                    "A/AAAA lookup of {name}: {}",
                    describe_addrs(self.helo_addrs)
                )
            }
            (HeloArg::Domain(name), _) => {
                format!("{name} is neither a localhost name nor only loopback addresses")
            }
            (_, CheckResult::Fail) => format!("{} is a loopback address", self.helo()),
            _ => format!("{} is not a loopback address", self.helo()),
        }
    }

    fn why_own_name(&self, result: CheckResult) -> String {
        let Some(name) = self.arg.domain() else {
            return "not a domain name".to_string();
        };
        match result {
            CheckResult::Fail => format!("{name} is this server's own name or mail domain"),
            _ if is_local(self.ip) => "the client itself is local".to_string(),
            _ => format!("{name} is not this server's name nor one of its mail domains"),
        }
    }

    fn why_literal_match(&self, result: CheckResult) -> String {
        match (&self.arg, result) {
            (HeloArg::AddressLiteral(lit), CheckResult::Pass) => {
                format!("{lit} is the client IP")
            }
            (HeloArg::AddressLiteral(lit), _) => {
                format!("{lit} is not the client IP {}", self.ip)
            }
            _ => "not an address literal".to_string(),
        }
    }

    fn why_forward(&self, result: CheckResult) -> String {
        let Some(name) = self.arg.domain() else {
            return "not a domain name".to_string();
        };
        let addrs = describe_addrs(self.helo_addrs);
        match result {
            CheckResult::Pass => format!("{name} has A/AAAA records: {addrs}"),
            CheckResult::Fail => format!("{name} has no A/AAAA record ({addrs})"),
            _ => format!("A/AAAA lookup of {name}: {addrs}"),
        }
    }

    fn why_forward_match(&self, result: CheckResult) -> String {
        let name = self.arg.domain().unwrap_or_default();
        let addrs = describe_addrs(self.helo_addrs);
        match result {
            CheckResult::Pass => format!("{} is among the A/AAAA records of {name}", self.ip),
            CheckResult::Fail => {
                format!(
                    "the A/AAAA records of {name} ({addrs}) do not include {}",
                    self.ip
                )
            }
            CheckResult::TempError => format!("A/AAAA lookup of {name}: {addrs}"),
            CheckResult::None => "forward did not pass".to_string(),
        }
    }

    fn why_fcrdns(&self, result: CheckResult) -> String {
        let ip = self.ip;
        match result {
            CheckResult::Pass => {
                let ptr = checks::confirmed_ptr(self.reverse, ip).unwrap_or_default();
                format!("PTR name {ptr} resolves back to {ip}")
            }
            CheckResult::Fail => match self.reverse.map(|r| &r.ptr) {
                Some(Lookup::Found(names)) if !names.is_empty() => format!(
                    "no PTR name of {ip} resolves back to it ({})",
                    self.describe_ptr()
                ),
                Some(other @ (Lookup::NxDomain | Lookup::NoData)) => {
                    format!("{ip} has no PTR record ({})", outcome(other))
                }
                _ => format!("{ip} has no PTR record (NODATA)"),
            },
            _ => format!("lookups not decided: PTR {}", self.describe_ptr()),
        }
    }

    fn why_rdns_match(&self, result: CheckResult) -> String {
        let Some(name) = self.arg.domain() else {
            return "not a domain name".to_string();
        };
        let ptr = checks::confirmed_ptr(self.reverse, self.ip).unwrap_or_default();
        let reg = |n: &str| {
            checks::registered_domain(n)
                .unwrap_or("no registered domain")
                .to_string()
        };
        match result {
            CheckResult::Pass => format!("{name} and {ptr} are both in {}", reg(&ptr)),
            CheckResult::Fail => format!(
                "{name} ({}) and PTR name {ptr} ({}) are in different registered domains",
                reg(name),
                reg(&ptr)
            ),
            CheckResult::TempError => "fcrdns could not be decided".to_string(),
            CheckResult::None => "fcrdns did not pass".to_string(),
        }
    }

    fn why_dynamic(&self, result: CheckResult) -> String {
        match result {
            CheckResult::Fail => {
                let name = self
                    .names()
                    .into_iter()
                    .find(|n| looks_dynamic(n, self.ip))
                    .unwrap_or_default();
                format!("{name} looks like a dynamic or generic pool name")
            }
            CheckResult::Pass => format!("no dynamic pool name among {}", self.names().join(", ")),
            CheckResult::TempError => format!(
                "no dynamic name so far, PTR lookup not decided ({})",
                self.describe_ptr()
            ),
            CheckResult::None => "no HELO name and no PTR name".to_string(),
        }
    }

    /// The HELO name (when a domain) and every PTR name.
    fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.arg.domain().map(str::to_string).into_iter().collect();
        if let Some(ReverseFacts {
            ptr: Lookup::Found(ptrs),
        }) = self.reverse
        {
            names.extend(ptrs.iter().map(|p: &PtrName| p.name.clone()));
        }
        names
    }
}

fn describe_addrs(addrs: Option<&Lookup<Vec<IpAddr>>>) -> String {
    match addrs {
        None => "no answer".to_string(),
        Some(Lookup::Found(list)) if list.is_empty() => "NODATA".to_string(),
        Some(Lookup::Found(list)) => list
            .iter()
            .map(IpAddr::to_string)
            .collect::<Vec<_>>()
            .join(", "),
        Some(other) => outcome(other).to_string(),
    }
}

/// A lookup outcome other than records, in DNS terms.
fn outcome<T>(lookup: &Lookup<T>) -> &'static str {
    match lookup {
        Lookup::Found(_) => "found",
        Lookup::NxDomain => "NXDOMAIN",
        Lookup::NoData => "NODATA",
        Lookup::TempError(TempFailure::Timeout) => "temporary failure: timeout",
        Lookup::TempError(TempFailure::ServFail) => "temporary failure: SERVFAIL",
        Lookup::TempError(TempFailure::Refused) => "temporary failure: REFUSED",
        Lookup::TempError(TempFailure::Other) => "temporary failure",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("test address")
    }

    fn input<'a>(client: &str, helo: &'a str, domains: &'a [String]) -> CheckInput<'a> {
        CheckInput {
            client_ip: ip(client),
            helo,
            hostname: "mx.example.org",
            domains,
        }
    }

    #[test]
    fn aligned_sender_passes() {
        let domains = Vec::new();
        let inp = input("192.0.2.1", "mail.example.test", &domains);
        let addrs = Lookup::Found(vec![ip("192.0.2.1")]);
        let rev = ReverseFacts {
            ptr: Lookup::Found(vec![PtrName {
                name: "mail.example.test".into(),
                addrs: Lookup::Found(vec![ip("192.0.2.1")]),
            }]),
        };
        let (text, kind) = render(
            &inp,
            Some(&addrs),
            Some(&rev),
            &SenderFacts::default(),
            &HeloPolicy::default(),
            &[],
        );
        assert_eq!(kind, VerdictKind::Pass);
        assert!(
            text.contains("fcrdns: pass — PTR name mail.example.test resolves back to 192.0.2.1\n"),
            "{text}"
        );
        assert!(text.contains("rdns_match: pass — "), "{text}");
        assert!(text.ends_with("verdict: pass\n"), "{text}");
        assert_eq!(text.lines().filter(|l| l.contains(" — ")).count(), 15);
    }

    #[test]
    fn missing_records_fail_with_reasons() {
        let domains = Vec::new();
        let inp = input("192.0.2.1", "mail.example.test", &domains);
        let rev = ReverseFacts {
            ptr: Lookup::NxDomain,
        };
        let policy = HeloPolicy::parse("dynamic=off,fqdn=log").expect("policy");
        let (text, kind) = render(
            &inp,
            Some(&Lookup::NxDomain),
            Some(&rev),
            &SenderFacts::default(),
            &policy,
            &[],
        );
        assert_eq!(kind, VerdictKind::Fail);
        assert!(
            text.contains("forward: fail — mail.example.test has no A/AAAA record (NXDOMAIN)\n"),
            "{text}"
        );
        assert!(
            text.contains("forward_match: none — forward did not pass\n"),
            "{text}"
        );
        assert!(
            text.contains("fcrdns: fail — 192.0.2.1 has no PTR record (NXDOMAIN)\n"),
            "{text}"
        );
        assert!(text.contains("dynamic: off — not run (policy)\n"), "{text}");
        assert!(
            text.contains(
                "fqdn: pass — mail.example.test is fully qualified (action log: not counted)\n"
            ),
            "{text}"
        );
        assert!(text.ends_with("verdict: fail\n"), "{text}");
    }

    #[test]
    fn timeouts_give_temperror() {
        let domains = Vec::new();
        let inp = input("2001:db8::1", "mail.example.test", &domains);
        let t = Lookup::TempError(TempFailure::Timeout);
        let rev = ReverseFacts {
            ptr: Lookup::TempError(TempFailure::ServFail),
        };
        let (text, kind) = render(
            &inp,
            Some(&t),
            Some(&rev),
            &SenderFacts::default(),
            &HeloPolicy::default(),
            &[],
        );
        assert_eq!(kind, VerdictKind::TempError);
        let want = "forward: temperror — A/AAAA lookup of mail.example.test: \
                    temporary failure: timeout\n";
        assert!(text.contains(want), "{text}");
        assert!(
            text.contains("ptr: none (temporary failure: SERVFAIL)\n"),
            "{text}"
        );
        assert!(text.ends_with("verdict: temperror\n"), "{text}");
    }

    #[test]
    fn allowed_client_is_reported() {
        let domains = Vec::new();
        let inp = input("192.0.2.1", "localhost", &domains);
        let allow = crate::helo::policy::parse_allow_list("192.0.2.0/24").expect("allow");
        let (text, kind) = render(
            &inp,
            None,
            None,
            &SenderFacts::default(),
            &HeloPolicy::default(),
            &allow,
        );
        assert_eq!(kind, VerdictKind::Pass);
        assert!(
            text.contains("localhost: fail — localhost is a localhost name"),
            "{text}"
        );
        assert!(
            text.contains("allow: 192.0.2.0/24 (the server skips every check)\n"),
            "{text}"
        );
        assert!(text.ends_with("verdict: pass\n"), "{text}");
    }
}
