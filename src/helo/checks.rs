//! The fifteen HELO checks of SPEC.md, one pure function each: the eleven on the name and
//! the four on the sender (spf, rhsbl, dnsbl, helo_churn), which read the facts the resolver
//! and the state store found ([`SenderFacts`]).
//!
//! Contract: every check maps the parsed HELO argument, the canonical client IP and the DNS
//! facts known so far to a [`CheckResult`]. No I/O, no configuration lookups. DNS outcomes
//! follow SPEC.md (as Postfix's `dns.h`): NXDOMAIN and NODATA are answers and may give `fail`;
//! a temporary failure, or a fact that has not arrived by the verdict deadline (`None`), gives
//! `temperror` for every check whose answer depends on it, never `fail` and never `pass`.
//!
//! Names compare case-insensitively and without a trailing dot (SPEC "HELO checks").

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::dns::{Lookup, PtrName, ReverseFacts};
use crate::helo::dynamic::looks_dynamic;
use crate::helo::sender::{
    ChurnOutcome, DnsblOutcome, RhsblOutcome, SenderFacts, SenderPolicy, SpfOutcome, SpfResult,
};
use crate::helo::{CHECKS, CheckResult};
use crate::net::{canonical_ip, is_local};

/// The identity under judgement and the server's own names.
#[derive(Clone, Copy, Debug)]
pub struct CheckInput<'a> {
    pub client_ip: IpAddr,
    /// The EHLO/HELO argument exactly as sent.
    pub helo: &'a str,
    /// HELOGUARD_HOSTNAME.
    pub hostname: &'a str,
    /// HELOGUARD_DOMAINS, lower case.
    pub domains: &'a [String],
}

/// The HELO argument, parsed once (parse, don't validate).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HeloArg {
    /// A syntactically valid domain: lower case, trailing dot removed.
    Domain(String),
    /// `[a.b.c.d]` or `[IPv6:...]`.
    AddressLiteral(IpAddr),
    /// An IP address without brackets.
    BareIp(IpAddr),
    /// Neither: the syntax check fails.
    Invalid,
}

impl HeloArg {
    /// The domain name, when the argument is one.
    pub fn domain(&self) -> Option<&str> {
        match self {
            HeloArg::Domain(name) => Some(name),
            _ => None,
        }
    }
}

/// SPEC: a domain is at most 255 octets.
const MAX_DOMAIN_LEN: usize = 255;
/// RFC 1035 2.3.4: labels are 63 octets or less.
const MAX_LABEL_LEN: usize = 63;

/// Parses an EHLO/HELO argument.
pub fn parse_helo(arg: &str) -> HeloArg {
    if let Some(inner) = arg.strip_prefix('[').and_then(|a| a.strip_suffix(']')) {
        return parse_address_literal(inner);
    }
    if let Ok(ip) = arg.parse::<IpAddr>() {
        return HeloArg::BareIp(ip);
    }
    match normalize_domain(arg) {
        Some(name) => HeloArg::Domain(name),
        None => HeloArg::Invalid,
    }
}

/// Parses the inside of `[...]`: RFC 5321 4.1.3 IPv4-address-literal or IPv6-address-literal.
/// Other General-address-literal tags are not addresses we can compare, so they are invalid.
fn parse_address_literal(inner: &str) -> HeloArg {
    // RFC 5321 4.1.3: the tag `IPv6:` is a case-insensitive string (RFC 5234 2.3).
    if let Some(tag) = inner.get(..5)
        && tag.eq_ignore_ascii_case("ipv6:")
    {
        return match inner[5..].parse::<Ipv6Addr>() {
            Ok(v6) => HeloArg::AddressLiteral(IpAddr::V6(v6)),
            Err(_) => HeloArg::Invalid,
        };
    }
    match inner.parse::<Ipv4Addr>() {
        Ok(v4) => HeloArg::AddressLiteral(IpAddr::V4(v4)),
        Err(_) => HeloArg::Invalid,
    }
}

/// Lower-cases a domain and drops one trailing dot, or returns `None` when it is not a domain
/// by SPEC's rule: letter/digit/hyphen labels of 1-63 octets (no hyphen at either end, as
/// RFC 5321 4.1.2), underscore tolerated (it is common in real host names), at most 255
/// octets.
pub fn normalize_domain(name: &str) -> Option<String> {
    let name = name.strip_suffix('.').unwrap_or(name);
    if name.is_empty() || name.len() > MAX_DOMAIN_LEN {
        return None;
    }
    name.split('.')
        .all(is_label)
        .then(|| name.to_ascii_lowercase())
}

/// RFC 5321 4.1.2 `sub-domain = Let-dig [Ldh-str]`, where an Ldh-str ends in a Let-dig: a
/// hyphen may not start or end a label. Underscore is tolerated anywhere.
fn is_label(label: &str) -> bool {
    let bytes = label.as_bytes();
    (1..=MAX_LABEL_LEN).contains(&bytes.len())
        && bytes.first() != Some(&b'-')
        && bytes.last() != Some(&b'-')
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || *b == b'-' || *b == b'_')
}

/// Lower case without a trailing dot, for comparing names that did not come through
/// [`parse_helo`] (the configured host name, PTR names).
pub fn name_key(name: &str) -> String {
    name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase()
}

/// Runs the fifteen checks in [`crate::helo::Check`] order.
pub fn run_all(
    input: &CheckInput,
    helo_addrs: Option<&Lookup<Vec<IpAddr>>>,
    reverse: Option<&ReverseFacts>,
    sender: &SenderFacts,
    lists: &SenderPolicy,
) -> [CheckResult; CHECKS] {
    let arg = parse_helo(input.helo);
    let ip = canonical_ip(input.client_ip);
    let forward_result = forward(&arg, helo_addrs);
    let fcrdns_result = fcrdns(ip, reverse);
    [
        syntax(&arg),
        bare_ip(&arg),
        fqdn(&arg),
        localhost(&arg, ip, helo_addrs),
        own_name(&arg, ip, input.hostname, input.domains),
        literal_match(&arg, ip),
        forward_result,
        forward_match(&arg, ip, forward_result, helo_addrs),
        fcrdns_result,
        rdns_match(&arg, ip, fcrdns_result, reverse),
        dynamic(&arg, ip, reverse),
        spf(input, &arg, sender.spf.as_ref()),
        rhsbl(
            &arg,
            ip,
            lists,
            confirmed_ptr(reverse, ip).is_some(),
            sender.rhsbl.as_ref(),
        ),
        dnsbl(ip, lists, sender.dnsbl.as_ref()),
        helo_churn(ip, lists, sender.churn),
    ]
}

/// Whether SPF applies to this identity (SPEC: not for a literal, a bare IP, a name that is
/// not an FQDN, a failed syntax or a local client).
pub fn spf_applies(input: &CheckInput, arg: &HeloArg) -> bool {
    arg.domain().is_some() && fqdn(arg) == CheckResult::Pass && !is_local(input.client_ip)
}

/// spf: fails when the HELO name's SPF policy gives `fail` (RFC 7208 2.3); `temperror` on a
/// DNS error or when no result came; `none` for none, neutral, softfail and permerror, and
/// where SPF does not apply.
pub fn spf(input: &CheckInput, arg: &HeloArg, outcome: Option<&SpfOutcome>) -> CheckResult {
    if !spf_applies(input, arg) {
        return CheckResult::None;
    }
    match outcome.map(|o| o.result) {
        None | Some(SpfResult::TempError) => CheckResult::TempError,
        Some(SpfResult::Pass) => CheckResult::Pass,
        Some(SpfResult::Fail) => CheckResult::Fail,
        Some(SpfResult::None | SpfResult::Neutral | SpfResult::SoftFail | SpfResult::PermError) => {
            CheckResult::None
        }
    }
}

/// rhsbl: fails when a registered domain of the HELO name or of the confirmed PTR name is
/// listed. A zone that did not answer counts as not listing, so this is never `temperror`.
pub fn rhsbl(
    arg: &HeloArg,
    client_ip: IpAddr,
    lists: &SenderPolicy,
    has_confirmed_ptr: bool,
    outcome: Option<&RhsblOutcome>,
) -> CheckResult {
    let has_name = arg.domain().is_some() || has_confirmed_ptr;
    if !lists.rhsbl || is_local(client_ip) || !has_name {
        return CheckResult::None;
    }
    match outcome {
        Some(o) if !o.hits.is_empty() => CheckResult::Fail,
        _ => CheckResult::Pass,
    }
}

/// dnsbl: fails when the client's combined score reaches HELOGUARD_DNSBL_THRESHOLD. A zone
/// that did not answer counts as not listing, so this is never `temperror`.
pub fn dnsbl(
    client_ip: IpAddr,
    lists: &SenderPolicy,
    outcome: Option<&DnsblOutcome>,
) -> CheckResult {
    if !lists.dnsbl || is_local(client_ip) {
        return CheckResult::None;
    }
    let score = outcome.map_or(0, |o| o.score);
    if score >= lists.dnsbl_threshold {
        CheckResult::Fail
    } else {
        CheckResult::Pass
    }
}

/// helo_churn: fails when the client presented more than HELOGUARD_HELO_CHURN distinct names
/// within the last hour; `none` when the store could not say (it fails open).
pub fn helo_churn(
    client_ip: IpAddr,
    lists: &SenderPolicy,
    outcome: Option<ChurnOutcome>,
) -> CheckResult {
    if lists.helo_churn == 0 || is_local(client_ip) {
        return CheckResult::None;
    }
    match outcome {
        Some(ChurnOutcome::DistinctNames(n)) if n > lists.helo_churn => CheckResult::Fail,
        Some(ChurnOutcome::DistinctNames(_)) => CheckResult::Pass,
        None | Some(ChurnOutcome::Unavailable) => CheckResult::None,
    }
}

/// syntax: fails when the argument is neither a domain, an address literal nor a bare IP.
pub fn syntax(arg: &HeloArg) -> CheckResult {
    match arg {
        HeloArg::Invalid => CheckResult::Fail,
        _ => CheckResult::Pass,
    }
}

/// bare_ip: fails for an IP address without brackets (RFC 5321 4.1.3 wants a literal).
pub fn bare_ip(arg: &HeloArg) -> CheckResult {
    match arg {
        HeloArg::BareIp(_) => CheckResult::Fail,
        HeloArg::Invalid => CheckResult::None,
        _ => CheckResult::Pass,
    }
}

/// fqdn: fails when a name has no dot or its last label is all digits (RFC 5321 2.3.5).
pub fn fqdn(arg: &HeloArg) -> CheckResult {
    let Some(name) = arg.domain() else {
        return CheckResult::None;
    };
    let last = name.rsplit('.').next().unwrap_or(name);
    let has_dot = name.contains('.');
    if !has_dot || last.bytes().all(|b| b.is_ascii_digit()) {
        return CheckResult::Fail;
    }
    CheckResult::Pass
}

/// localhost: fails when a remote client claims to be the loopback host, by name, by literal
/// or bare IP, or by a name whose A/AAAA records are all loopback.
pub fn localhost(
    arg: &HeloArg,
    client_ip: IpAddr,
    helo_addrs: Option<&Lookup<Vec<IpAddr>>>,
) -> CheckResult {
    if *arg == HeloArg::Invalid {
        return CheckResult::None;
    }
    // A local client may call itself localhost: that is the truth.
    if is_local(client_ip) {
        return CheckResult::Pass;
    }
    match arg {
        HeloArg::Domain(name) if is_localhost_name(name) => CheckResult::Fail,
        HeloArg::Domain(_) => match helo_addrs {
            None | Some(Lookup::TempError(_)) => CheckResult::TempError,
            Some(Lookup::Found(addrs)) if all_loopback(addrs) => CheckResult::Fail,
            Some(_) => CheckResult::Pass,
        },
        HeloArg::AddressLiteral(ip) | HeloArg::BareIp(ip) if is_loopback(*ip) => CheckResult::Fail,
        _ => CheckResult::Pass,
    }
}

/// RFC 6761 6.3: `localhost` and every name below `.localhost` are loopback names.
pub fn is_localhost_name(name: &str) -> bool {
    name == "localhost" || name == "localhost.localdomain" || name.ends_with(".localhost")
}

fn all_loopback(addrs: &[IpAddr]) -> bool {
    !addrs.is_empty() && addrs.iter().all(|ip| is_loopback(*ip))
}

fn is_loopback(ip: IpAddr) -> bool {
    canonical_ip(ip).is_loopback()
}

/// own_name: fails when a remote client claims this server's name or one of its mail domains
/// (the domains themselves, not their subdomains).
pub fn own_name(
    arg: &HeloArg,
    client_ip: IpAddr,
    hostname: &str,
    domains: &[String],
) -> CheckResult {
    let Some(name) = arg.domain() else {
        return CheckResult::None;
    };
    if is_local(client_ip) {
        return CheckResult::Pass;
    }
    let ours = name == name_key(hostname) || domains.iter().any(|d| name == name_key(d));
    if ours {
        CheckResult::Fail
    } else {
        CheckResult::Pass
    }
}

/// literal_match: fails when an address literal is not the client IP, compared as addresses.
pub fn literal_match(arg: &HeloArg, client_ip: IpAddr) -> CheckResult {
    match arg {
        HeloArg::AddressLiteral(ip) if same_ip(*ip, client_ip) => CheckResult::Pass,
        HeloArg::AddressLiteral(_) => CheckResult::Fail,
        _ => CheckResult::None,
    }
}

/// Address equality after turning IPv4-mapped IPv6 into IPv4 (SPEC "Who the client is").
fn same_ip(a: IpAddr, b: IpAddr) -> bool {
    canonical_ip(a) == canonical_ip(b)
}

/// forward: fails when the name has no A/AAAA record (NXDOMAIN or NODATA).
pub fn forward(arg: &HeloArg, helo_addrs: Option<&Lookup<Vec<IpAddr>>>) -> CheckResult {
    if arg.domain().is_none() {
        return CheckResult::None;
    }
    match helo_addrs {
        None | Some(Lookup::TempError(_)) => CheckResult::TempError,
        Some(Lookup::Found(addrs)) if !addrs.is_empty() => CheckResult::Pass,
        Some(_) => CheckResult::Fail,
    }
}

/// forward_match: fails when none of the name's A/AAAA records is the client IP.
///
/// SPEC: `none` when forward is not `pass`. When forward is `temperror` the answer is not
/// known either way, so this check is `temperror` too: a lookup that timed out must not
/// quietly drop a check the operator set to defer or reject.
pub fn forward_match(
    arg: &HeloArg,
    client_ip: IpAddr,
    forward_result: CheckResult,
    helo_addrs: Option<&Lookup<Vec<IpAddr>>>,
) -> CheckResult {
    match forward_result {
        CheckResult::Pass => {}
        CheckResult::TempError if arg.domain().is_some() => return CheckResult::TempError,
        _ => return CheckResult::None,
    }
    match helo_addrs {
        Some(Lookup::Found(addrs)) if addrs.iter().any(|a| same_ip(*a, client_ip)) => {
            CheckResult::Pass
        }
        _ => CheckResult::Fail,
    }
}

/// fcrdns: passes when a PTR name of the client has A/AAAA records that include the client IP
/// (RFC 8601 3, iprev); fails on NXDOMAIN/NODATA or when no name confirms.
pub fn fcrdns(client_ip: IpAddr, reverse: Option<&ReverseFacts>) -> CheckResult {
    let Some(reverse) = reverse else {
        return CheckResult::TempError;
    };
    let names = match &reverse.ptr {
        Lookup::Found(names) => names,
        Lookup::TempError(_) => return CheckResult::TempError,
        Lookup::NxDomain | Lookup::NoData => return CheckResult::Fail,
    };
    if confirming_name(names, client_ip).is_some() {
        return CheckResult::Pass;
    }
    // RFC 8601 3: a temporary failure on the way gives temperror, not fail.
    if names
        .iter()
        .any(|n| matches!(n.addrs, Lookup::TempError(_)))
    {
        return CheckResult::TempError;
    }
    CheckResult::Fail
}

/// The forward-confirmed PTR name (lower case, no trailing dot), if any.
pub fn confirmed_ptr(reverse: Option<&ReverseFacts>, client_ip: IpAddr) -> Option<String> {
    match &reverse?.ptr {
        Lookup::Found(names) => confirming_name(names, client_ip).map(|n| name_key(&n.name)),
        _ => None,
    }
}

fn confirming_name(names: &[PtrName], client_ip: IpAddr) -> Option<&PtrName> {
    names.iter().find(|n| match &n.addrs {
        Lookup::Found(addrs) => addrs.iter().any(|a| same_ip(*a, client_ip)),
        _ => false,
    })
}

/// rdns_match: fails when the HELO name and the forward-confirmed PTR name are not in the same
/// registered domain (public suffix list, ICANN and private sections).
///
/// SPEC: `none` when fcrdns is not `pass`; when fcrdns is `temperror` this check cannot be
/// decided either, so it is `temperror` (see [`forward_match`]).
pub fn rdns_match(
    arg: &HeloArg,
    client_ip: IpAddr,
    fcrdns_result: CheckResult,
    reverse: Option<&ReverseFacts>,
) -> CheckResult {
    let Some(name) = arg.domain() else {
        return CheckResult::None;
    };
    match fcrdns_result {
        CheckResult::Pass => {}
        CheckResult::TempError => return CheckResult::TempError,
        _ => return CheckResult::None,
    }
    let Some(ptr) = confirmed_ptr(reverse, client_ip) else {
        return CheckResult::None;
    };
    if same_registered_domain(name, &ptr) {
        CheckResult::Pass
    } else {
        CheckResult::Fail
    }
}

/// Whether two normalized names share a registered domain. Equal names always do; a name that
/// has no registered domain (a single label, a public suffix itself) shares none.
pub fn same_registered_domain(a: &str, b: &str) -> bool {
    if a == b {
        return true;
    }
    match (registered_domain(a), registered_domain(b)) {
        (Some(x), Some(y)) => x == y,
        _ => false,
    }
}

/// The registrable domain of a normalized name by the public suffix list (both sections; an
/// unlisted TLD counts as a public suffix, the list's `*` rule).
pub fn registered_domain(name: &str) -> Option<&str> {
    psl::domain_str(name)
}

/// dynamic: fails when the HELO name or any PTR name of the client looks like a dynamic or
/// generic pool name (see [`crate::helo::dynamic`]).
///
/// A PTR name counts whether or not it is forward-confirmed: an ISP's pool naming shows in
/// the PTR whatever its A records say. When no name is dynamic but the PTR lookup is still
/// undecided, the answer is `temperror`; with no name at all it is `none`.
pub fn dynamic(arg: &HeloArg, client_ip: IpAddr, reverse: Option<&ReverseFacts>) -> CheckResult {
    let helo_name = arg.domain();
    if helo_name.is_some_and(|n| looks_dynamic(n, client_ip)) {
        return CheckResult::Fail;
    }
    let ptr_names: &[PtrName] = match reverse.map(|r| &r.ptr) {
        None | Some(Lookup::TempError(_)) => return CheckResult::TempError,
        Some(Lookup::Found(names)) => names,
        Some(Lookup::NxDomain | Lookup::NoData) => &[],
    };
    if ptr_names.iter().any(|n| looks_dynamic(&n.name, client_ip)) {
        return CheckResult::Fail;
    }
    if helo_name.is_none() && ptr_names.is_empty() {
        return CheckResult::None;
    }
    CheckResult::Pass
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dns::TempFailure;
    use crate::helo::Check;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("test address")
    }

    fn found(addrs: &[&str]) -> Lookup<Vec<IpAddr>> {
        Lookup::Found(addrs.iter().map(|a| ip(a)).collect())
    }

    fn temp<T>() -> Lookup<T> {
        Lookup::TempError(TempFailure::Timeout)
    }

    fn ptr(name: &str, addrs: Lookup<Vec<IpAddr>>) -> PtrName {
        PtrName {
            name: name.to_string(),
            addrs,
        }
    }

    fn reverse(names: Vec<PtrName>) -> ReverseFacts {
        ReverseFacts {
            ptr: Lookup::Found(names),
        }
    }

    fn domain(s: &str) -> HeloArg {
        HeloArg::Domain(s.to_string())
    }

    use CheckResult::{Fail, None as NoneR, Pass, TempError};

    #[test]
    fn parse_helo_table() {
        let cases: &[(&str, HeloArg)] = &[
            ("mail.example.com", domain("mail.example.com")),
            ("Mail.Example.COM.", domain("mail.example.com")),
            ("under_score.example", domain("under_score.example")),
            ("a-b.example", domain("a-b.example")),
            ("localhost", domain("localhost")),
            ("1.2.3.4.", domain("1.2.3.4")),
            ("[192.0.2.1]", HeloArg::AddressLiteral(ip("192.0.2.1"))),
            (
                "[IPv6:2001:DB8::0:1]",
                HeloArg::AddressLiteral(ip("2001:db8::1")),
            ),
            ("[ipv6:::1]", HeloArg::AddressLiteral(ip("::1"))),
            ("192.0.2.1", HeloArg::BareIp(ip("192.0.2.1"))),
            ("2001:db8::1", HeloArg::BareIp(ip("2001:db8::1"))),
            ("", HeloArg::Invalid),
            (".", HeloArg::Invalid),
            ("a..b", HeloArg::Invalid),
            (".example.com", HeloArg::Invalid),
            ("mail.example.com..", HeloArg::Invalid),
            ("bad host", HeloArg::Invalid),
            ("bad/host.example", HeloArg::Invalid),
            ("h\u{e9}.example", HeloArg::Invalid),
            ("[192.0.2.1", HeloArg::Invalid),
            ("[2001:db8::1]", HeloArg::Invalid),
            ("[IPv6:192.0.2.1]", HeloArg::Invalid),
            ("[192.0.2.256]", HeloArg::Invalid),
            ("[x-tag:foo]", HeloArg::Invalid),
            ("[]", HeloArg::Invalid),
        ];
        for (arg, want) in cases {
            assert_eq!(&parse_helo(arg), want, "parse_helo({arg:?})");
        }
    }

    #[test]
    fn parse_helo_lengths() {
        let label63 = "a".repeat(63);
        assert_eq!(
            parse_helo(&format!("{label63}.example")),
            domain(&format!("{label63}.example"))
        );
        assert_eq!(parse_helo(&format!("a{label63}.example")), HeloArg::Invalid);
        // 4 x 63 + 3 dots = 255 octets: the longest allowed; with a trailing dot too.
        let longest = [label63.as_str(); 4].join(".");
        assert_eq!(longest.len(), 255);
        assert!(matches!(parse_helo(&longest), HeloArg::Domain(_)));
        assert!(matches!(
            parse_helo(&format!("{longest}.")),
            HeloArg::Domain(_)
        ));
        assert_eq!(parse_helo(&format!("a{longest}")), HeloArg::Invalid);
    }

    #[test]
    fn syntax_and_bare_ip() {
        assert_eq!(syntax(&domain("a.example")), Pass);
        assert_eq!(syntax(&parse_helo("[192.0.2.1]")), Pass);
        assert_eq!(syntax(&parse_helo("192.0.2.1")), Pass);
        assert_eq!(syntax(&HeloArg::Invalid), Fail);
        assert_eq!(bare_ip(&parse_helo("192.0.2.1")), Fail);
        assert_eq!(bare_ip(&parse_helo("2001:db8::1")), Fail);
        assert_eq!(bare_ip(&parse_helo("[192.0.2.1]")), Pass);
        assert_eq!(bare_ip(&domain("a.example")), Pass);
        assert_eq!(bare_ip(&HeloArg::Invalid), NoneR);
    }

    #[test]
    fn fqdn_table() {
        assert_eq!(fqdn(&parse_helo("mail.example.com.")), Pass);
        assert_eq!(fqdn(&parse_helo("a.b2")), Pass);
        assert_eq!(fqdn(&parse_helo("mailhost")), Fail);
        assert_eq!(fqdn(&parse_helo("mailhost.")), Fail);
        assert_eq!(fqdn(&parse_helo("host.123")), Fail);
        assert_eq!(fqdn(&parse_helo("1.2.3.4.")), Fail);
        assert_eq!(fqdn(&parse_helo("[192.0.2.1]")), NoneR);
        assert_eq!(fqdn(&parse_helo("192.0.2.1")), NoneR);
        assert_eq!(fqdn(&HeloArg::Invalid), NoneR);
    }

    #[test]
    fn localhost_by_name_literal_and_records() {
        let remote = ip("203.0.113.5");
        let remote6 = ip("2001:db8::5");
        let any = Some(&Lookup::NxDomain);
        for name in [
            "localhost",
            "LOCALHOST.",
            "localhost.localdomain",
            "foo.localhost",
        ] {
            assert_eq!(localhost(&parse_helo(name), remote, any), Fail, "{name}");
            assert_eq!(localhost(&parse_helo(name), remote6, any), Fail, "{name}");
        }
        assert_eq!(
            localhost(&parse_helo("localhost.example"), remote, any),
            Pass
        );
        assert_eq!(localhost(&parse_helo("[127.0.0.1]"), remote, None), Fail);
        assert_eq!(localhost(&parse_helo("[IPv6:::1]"), remote6, None), Fail);
        assert_eq!(
            localhost(&parse_helo("[IPv6:::ffff:127.0.0.1]"), remote, None),
            Fail
        );
        assert_eq!(localhost(&parse_helo("127.0.0.2"), remote, None), Fail);
        assert_eq!(localhost(&parse_helo("[192.0.2.1]"), remote, None), Pass);
        let lo = found(&["127.0.0.1", "::1"]);
        let mixed = found(&["127.0.0.1", "192.0.2.1"]);
        let name = parse_helo("mail.example.com");
        assert_eq!(localhost(&name, remote, Some(&lo)), Fail);
        assert_eq!(localhost(&name, remote6, Some(&lo)), Fail);
        assert_eq!(localhost(&name, remote, Some(&mixed)), Pass);
        assert_eq!(localhost(&name, remote, Some(&Lookup::NoData)), Pass);
        assert_eq!(localhost(&name, remote, Some(&temp())), TempError);
        assert_eq!(localhost(&name, remote, None), TempError);
        // A local client is telling the truth.
        for local in ["127.0.0.1", "::1", "::ffff:127.0.0.9"] {
            assert_eq!(localhost(&parse_helo("localhost"), ip(local), None), Pass);
            assert_eq!(localhost(&name, ip(local), Some(&lo)), Pass);
        }
        assert_eq!(localhost(&HeloArg::Invalid, remote, None), NoneR);
    }

    #[test]
    fn own_name_table() {
        let domains = vec!["example.org".to_string(), "example.net".to_string()];
        let remote = ip("198.51.100.7");
        let check = |helo: &str, client: IpAddr| {
            own_name(&parse_helo(helo), client, "MX.Example.org.", &domains)
        };
        assert_eq!(check("mx.example.org", remote), Fail);
        assert_eq!(check("MX.EXAMPLE.ORG.", ip("2001:db8::7")), Fail);
        assert_eq!(check("example.net", remote), Fail);
        assert_eq!(check("Example.Org.", remote), Fail);
        assert_eq!(check("sub.example.net", remote), Pass);
        assert_eq!(check("mail.sender.example", remote), Pass);
        assert_eq!(check("mx.example.org", ip("127.0.0.1")), Pass);
        assert_eq!(check("[198.51.100.7]", remote), NoneR);
        assert_eq!(check("198.51.100.7", remote), NoneR);
        assert_eq!(check("bad host", remote), NoneR);
    }

    #[test]
    fn literal_match_compares_addresses() {
        let m = |helo: &str, client: &str| literal_match(&parse_helo(helo), ip(client));
        assert_eq!(m("[192.0.2.1]", "192.0.2.1"), Pass);
        assert_eq!(m("[192.0.2.1]", "::ffff:192.0.2.1"), Pass);
        assert_eq!(m("[192.0.2.1]", "192.0.2.10"), Fail);
        assert_eq!(m("[IPv6:2001:DB8::0:1]", "2001:db8::1"), Pass);
        assert_eq!(m("[ipv6:2001:0db8:0000::1]", "2001:db8::1"), Pass);
        assert_eq!(m("[IPv6:2001:db8::1]", "2001:db8::10"), Fail);
        assert_eq!(m("[IPv6:::ffff:192.0.2.1]", "192.0.2.1"), Pass);
        assert_eq!(m("[IPv6:2001:db8::1]", "192.0.2.1"), Fail);
        assert_eq!(m("192.0.2.1", "192.0.2.1"), NoneR);
        assert_eq!(m("mail.example.com", "192.0.2.1"), NoneR);
        assert_eq!(m("[bogus]", "192.0.2.1"), NoneR);
    }

    #[test]
    fn forward_and_forward_match() {
        let name = parse_helo("Mail.Example.com.");
        let v4 = ip("192.0.2.1");
        let v6 = ip("2001:db8::1");
        let both = found(&["192.0.2.1", "2001:db8::1"]);
        let other = found(&["192.0.2.99", "2001:db8::10"]);
        let fm = |addrs: Option<&Lookup<Vec<IpAddr>>>, client: IpAddr| {
            forward_match(&name, client, forward(&name, addrs), addrs)
        };
        assert_eq!(forward(&name, Some(&both)), Pass);
        assert_eq!(forward(&name, Some(&Lookup::NxDomain)), Fail);
        assert_eq!(forward(&name, Some(&Lookup::NoData)), Fail);
        assert_eq!(forward(&name, Some(&found(&[]))), Fail);
        assert_eq!(forward(&name, Some(&temp())), TempError);
        assert_eq!(forward(&name, None), TempError);
        assert_eq!(forward(&parse_helo("[192.0.2.1]"), None), NoneR);
        assert_eq!(forward(&parse_helo("192.0.2.1"), None), NoneR);
        assert_eq!(forward(&HeloArg::Invalid, None), NoneR);

        assert_eq!(fm(Some(&both), v4), Pass);
        assert_eq!(fm(Some(&both), v6), Pass);
        assert_eq!(fm(Some(&both), ip("::ffff:192.0.2.1")), Pass);
        assert_eq!(fm(Some(&other), v4), Fail);
        assert_eq!(fm(Some(&other), v6), Fail);
        assert_eq!(fm(Some(&Lookup::NxDomain), v4), NoneR);
        assert_eq!(fm(Some(&temp()), v4), TempError);
        assert_eq!(fm(None, v6), TempError);
        let lit = parse_helo("[192.0.2.1]");
        assert_eq!(forward_match(&lit, v4, NoneR, None), NoneR);
    }

    #[test]
    fn fcrdns_table() {
        let v4 = ip("192.0.2.1");
        let v6 = ip("2001:db8::1");
        let good = reverse(vec![
            ptr("other.example", found(&["192.0.2.50"])),
            ptr("mx.example.com", found(&["192.0.2.1", "2001:db8::1"])),
        ]);
        assert_eq!(fcrdns(v4, Some(&good)), Pass);
        assert_eq!(fcrdns(v6, Some(&good)), Pass);
        assert_eq!(fcrdns(ip("::ffff:192.0.2.1"), Some(&good)), Pass);
        assert_eq!(
            confirmed_ptr(Some(&good), v4).as_deref(),
            Some("mx.example.com")
        );
        assert_eq!(fcrdns(ip("192.0.2.2"), Some(&good)), Fail);
        assert_eq!(fcrdns(ip("2001:db8::10"), Some(&good)), Fail);
        let nx = ReverseFacts {
            ptr: Lookup::NxDomain,
        };
        let nodata = ReverseFacts {
            ptr: Lookup::NoData,
        };
        assert_eq!(fcrdns(v4, Some(&nx)), Fail);
        assert_eq!(fcrdns(v6, Some(&nodata)), Fail);
        assert_eq!(fcrdns(v4, Some(&reverse(vec![]))), Fail);
        let unconfirmed = reverse(vec![ptr("mx.example.com", Lookup::NxDomain)]);
        assert_eq!(fcrdns(v4, Some(&unconfirmed)), Fail);
        let pending = reverse(vec![
            ptr("a.example", Lookup::NoData),
            ptr("b.example", temp()),
        ]);
        assert_eq!(fcrdns(v4, Some(&pending)), TempError);
        let confirmed_anyway = reverse(vec![
            ptr("b.example", temp()),
            ptr("c.example", found(&["192.0.2.1"])),
        ]);
        assert_eq!(fcrdns(v4, Some(&confirmed_anyway)), Pass);
        assert_eq!(fcrdns(v4, Some(&ReverseFacts { ptr: temp() })), TempError);
        assert_eq!(fcrdns(v4, None), TempError);
        assert_eq!(confirmed_ptr(None, v4), None);
    }

    #[test]
    fn rdns_match_uses_registered_domains() {
        let v4 = ip("192.0.2.1");
        let facts = |name: &str| reverse(vec![ptr(name, found(&["192.0.2.1"]))]);
        let m = |helo: &str, ptr_name: &str| {
            let r = facts(ptr_name);
            rdns_match(&parse_helo(helo), v4, fcrdns(v4, Some(&r)), Some(&r))
        };
        assert_eq!(m("mail.example.com", "mx.example.com"), Pass);
        assert_eq!(m("MAIL.Example.COM.", "out.mx.example.com"), Pass);
        assert_eq!(m("smtp.example.co.uk", "mx1.example.co.uk"), Pass);
        assert_eq!(m("smtp.example.co.uk", "mx1.other.co.uk"), Fail);
        assert_eq!(m("mail.example.com", "mail.example.net"), Fail);
        // Private section: github.io names belong to different owners.
        assert_eq!(m("alice.github.io", "bob.github.io"), Fail);
        assert_eq!(m("mx.alice.github.io", "alice.github.io"), Pass);
        assert_eq!(m("mailhost", "mailhost"), Pass);
        assert_eq!(m("mailhost", "mailhost.example.com"), Fail);

        let v6 = ip("2001:db8::1");
        let r6 = reverse(vec![ptr("mx.example.com", found(&["2001:db8::1"]))]);
        let helo = parse_helo("mail.example.com");
        assert_eq!(
            rdns_match(&helo, v6, fcrdns(v6, Some(&r6)), Some(&r6)),
            Pass
        );
        let helo = parse_helo("mail.example.org");
        assert_eq!(
            rdns_match(&helo, v6, fcrdns(v6, Some(&r6)), Some(&r6)),
            Fail
        );

        let name = parse_helo("mail.example.com");
        assert_eq!(rdns_match(&name, v4, Fail, None), NoneR);
        assert_eq!(rdns_match(&name, v4, TempError, None), TempError);
        let lit = parse_helo("[192.0.2.1]");
        assert_eq!(
            rdns_match(&lit, v4, Pass, Some(&facts("mx.example.com"))),
            NoneR
        );
        let bare = parse_helo("192.0.2.1");
        assert_eq!(rdns_match(&bare, v4, TempError, None), NoneR);
    }

    #[test]
    fn dynamic_over_helo_and_ptr_names() {
        let v4 = ip("73.22.11.5");
        let v6 = ip("2001:db8::5");
        let static_ptr = reverse(vec![ptr("mx.example.com", found(&["73.22.11.5"]))]);
        let pool_ptr = reverse(vec![ptr(
            "c-73-22-11-5.hsd1.ca.comcast.net",
            Lookup::NoData,
        )]);
        let no_ptr = ReverseFacts {
            ptr: Lookup::NxDomain,
        };
        let mail = parse_helo("mail.example.com");
        assert_eq!(dynamic(&mail, v4, Some(&static_ptr)), Pass);
        assert_eq!(dynamic(&mail, v4, Some(&pool_ptr)), Fail);
        assert_eq!(dynamic(&mail, v4, Some(&no_ptr)), Pass);
        assert_eq!(dynamic(&mail, v4, None), TempError);
        let pool_helo = parse_helo("c-73-22-11-5.hsd1.ca.comcast.net");
        assert_eq!(dynamic(&pool_helo, v4, None), Fail);
        assert_eq!(dynamic(&parse_helo("dsl-pool.example.net"), v6, None), Fail);
        let lit = parse_helo("[73.22.11.5]");
        assert_eq!(dynamic(&lit, v4, Some(&no_ptr)), NoneR);
        assert_eq!(dynamic(&lit, v4, Some(&pool_ptr)), Fail);
        assert_eq!(dynamic(&lit, v4, Some(&static_ptr)), Pass);
        assert_eq!(
            dynamic(&HeloArg::Invalid, v4, Some(&ReverseFacts { ptr: temp() })),
            TempError
        );
        let v6_pool = reverse(vec![ptr("dynamic-2001-db8.example.net", Lookup::NoData)]);
        assert_eq!(dynamic(&mail, v6, Some(&v6_pool)), Fail);
    }

    #[test]
    fn run_all_orders_results_and_canonicalizes_the_client() {
        let domains = vec!["example.org".to_string()];
        let input = CheckInput {
            client_ip: ip("::ffff:192.0.2.1"),
            helo: "Mail.Example.COM.",
            hostname: "mx.example.org",
            domains: &domains,
        };
        let addrs = found(&["192.0.2.1"]);
        let facts = reverse(vec![ptr("out.example.com", found(&["192.0.2.1"]))]);
        // No sender facts; lists not set; the store never answered.
        let none = SenderFacts::default();
        let lists = SenderPolicy::default();
        let got = run_all(&input, Some(&addrs), Some(&facts), &none, &lists);
        assert_eq!(
            got,
            [
                Pass, Pass, Pass, Pass, Pass, NoneR, Pass, Pass, Pass, Pass, Pass, TempError,
                NoneR, NoneR, NoneR
            ]
        );

        let got = run_all(&input, None, None, &none, &lists);
        assert_eq!(got[Check::Forward.index()], TempError);
        assert_eq!(got[Check::ForwardMatch.index()], TempError);
        assert_eq!(got[Check::Localhost.index()], TempError);
        assert_eq!(got[Check::Fcrdns.index()], TempError);
        assert_eq!(got[Check::RdnsMatch.index()], TempError);
        assert_eq!(got[Check::Dynamic.index()], TempError);

        let bad = CheckInput {
            helo: "no such host!",
            ..input
        };
        let got = run_all(
            &bad,
            None,
            Some(&ReverseFacts {
                ptr: Lookup::NxDomain,
            }),
            &none,
            &lists,
        );
        assert_eq!(
            got,
            [
                Fail, NoneR, NoneR, NoneR, NoneR, NoneR, NoneR, NoneR, Fail, NoneR, NoneR, NoneR,
                NoneR, NoneR, NoneR
            ]
        );

        let literal = CheckInput {
            client_ip: ip("2001:db8::1"),
            helo: "[IPv6:2001:DB8::0:1]",
            ..input
        };
        let got = run_all(
            &literal,
            None,
            Some(&ReverseFacts {
                ptr: Lookup::NoData,
            }),
            &none,
            &lists,
        );
        assert_eq!(
            got,
            [
                Pass, Pass, NoneR, Pass, NoneR, Pass, NoneR, NoneR, Fail, NoneR, NoneR, NoneR,
                NoneR, NoneR, NoneR
            ]
        );
    }
}
