//! HELOGUARD_HELO_POLICY, HELOGUARD_HELO_ALLOW and HELOGUARD_REJECT_AT, and the verdict they
//! give over the fifteen check results.
//!
//! Policy string rules (`default=tag,localhost=reject,...`): items are `KEY=ACTION`, separated
//! by commas, blanks around items ignored, keys and actions case-insensitive. KEY is `default`
//! or a check name; ACTION is off, log, tag, greylist, defer or reject. A key given twice, an unknown
//! key or action, or an item without `=` is a [`PolicyError`] naming it. An empty string is
//! the default policy. A check not named takes `default` (itself `tag` unless given), except
//! `syntax`, which stays `reject` unless named: `default=log` is a dry run of the DNS checks
//! that still refuses unparsable HELOs, as SPEC's default `default=tag,syntax=reject` does;
//! and `spf`, which stays `off` unless named: it is the one check that sends queries to the
//! client's own DNS for every session, so an operator turns it on by name (`spf=tag`). The
//! lists (dnsbl, rhsbl) take `default` and are switched on by naming zones; helo_churn takes
//! `default` and is switched off by HELOGUARD_HELO_CHURN=0.
//!
//! Verdict (SPEC "HELO checks"): an allow-list match skips every check. Otherwise `off`
//! checks are not counted at all, `log` checks are measured but shown `none` and left out of
//! the verdict, and `tag`/`defer`/`reject` checks count. RFC 5321 4.1.4 forbids refusing mail
//! only because the HELO does not match the client IP, hence tag by default; a temporary DNS
//! failure is never answered with a 5xx.

use std::fmt;
use std::net::IpAddr;

use crate::dns::{Lookup, ReverseFacts};
use crate::helo::checks::{self, CheckInput};
pub use crate::helo::sender::SenderPolicy;
use crate::helo::sender::{ListHit, SenderFacts};
use crate::helo::trace::sanitize_helo;
use crate::helo::{Action, CHECKS, Check, CheckResult, VerdictKind};
// The verdict types live in `verdict` so `trace` can format them without importing the
// policy; these paths stay for the callers that name them here.
pub use crate::helo::verdict::{Decision, HeloVerdict, IprevResult};
use crate::net::{Cidr, canonical_ip};
use crate::protocol::reply::Reply;

/// One action per check (HELOGUARD_HELO_POLICY), and the sender checks' limits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeloPolicy {
    actions: [Action; CHECKS],
    pub sender: SenderPolicy,
}

/// Where HELO refusals are answered (HELOGUARD_REJECT_AT).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RejectAt {
    Rcpt,
    Helo,
}

/// One HELOGUARD_HELO_ALLOW entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AllowEntry {
    Net(Cidr),
    /// `ptr:DOMAIN`: a forward-confirmed PTR name equal to DOMAIN or below it.
    PtrDomain(String),
}

/// Why a policy, allow or reject-point string was refused; each variant names the bad part.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PolicyError {
    /// A policy item without `=`.
    NotCheckAction(String),
    UnknownCheck(String),
    UnknownAction(String),
    /// `default` or a check named twice.
    GivenTwice(String),
    /// An allow-list entry that is neither an address block nor `ptr:DOMAIN`, and why.
    BadAllowEntry {
        entry: String,
        why: String,
    },
    UnknownRejectAt(String),
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PolicyError::NotCheckAction(item) => {
                write!(f, "`{item}` in the HELO policy is not CHECK=ACTION")
            }
            PolicyError::UnknownCheck(name) => write!(f, "unknown HELO check `{name}`"),
            PolicyError::UnknownAction(name) => write!(
                f,
                "unknown HELO action `{name}` (expected off, log, tag, greylist, defer or reject)"
            ),
            PolicyError::GivenTwice(key) => write!(f, "`{key}` is given twice in the HELO policy"),
            PolicyError::BadAllowEntry { entry, why } => {
                write!(f, "`{entry}` in the HELO allow list: {why}")
            }
            PolicyError::UnknownRejectAt(text) => {
                write!(f, "unknown reject point `{text}` (expected rcpt or helo)")
            }
        }
    }
}

impl std::error::Error for PolicyError {}

impl HeloPolicy {
    /// Parses `default=tag,localhost=reject,...`; unspecified checks take `default`, which is
    /// `tag` unless given; `syntax` is `reject` unless given.
    pub fn parse(spec: &str) -> Result<Self, PolicyError> {
        let mut default = None;
        let mut explicit: [Option<Action>; CHECKS] = [None; CHECKS];
        for item in spec.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            let (key, action) = parse_item(item)?;
            let slot = match key {
                PolicyKey::Default => &mut default,
                PolicyKey::Check(check) => &mut explicit[check.index()],
            };
            if slot.is_some() {
                return Err(PolicyError::GivenTwice(key.name().to_string()));
            }
            *slot = Some(action);
        }
        let default = default.unwrap_or(Action::Tag);
        let mut actions = [default; CHECKS];
        for check in Check::ALL {
            let fallback = match check {
                Check::Syntax => Action::Reject,
                Check::Spf => Action::Off,
                _ => default,
            };
            actions[check.index()] = explicit[check.index()].unwrap_or(fallback);
        }
        Ok(Self {
            actions,
            sender: SenderPolicy::default(),
        })
    }

    pub fn action(&self, check: Check) -> Action {
        self.actions[check.index()]
    }

    /// Whether a failed `syntax` is refused at the EHLO/HELO itself with 501 5.5.2 (SPEC:
    /// whatever HELOGUARD_REJECT_AT says, and the session stays as it was).
    pub fn rejects_bad_syntax(&self) -> bool {
        self.action(Check::Syntax) == Action::Reject
    }
}

impl Default for HeloPolicy {
    /// `default=tag,syntax=reject`.
    fn default() -> Self {
        let mut actions = [Action::Tag; CHECKS];
        actions[Check::Syntax.index()] = Action::Reject;
        actions[Check::Spf.index()] = Action::Off;
        Self {
            actions,
            sender: SenderPolicy::default(),
        }
    }
}

impl fmt::Display for HeloPolicy {
    /// The policy written back as a complete `check=action,...` string.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, check) in Check::ALL.into_iter().enumerate() {
            let sep = if i == 0 { "" } else { "," };
            write!(f, "{sep}{}={}", check.name(), self.action(check).name())?;
        }
        Ok(())
    }
}

/// The left side of a policy item.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PolicyKey {
    Default,
    Check(Check),
}

impl PolicyKey {
    fn name(self) -> &'static str {
        match self {
            PolicyKey::Default => "default",
            PolicyKey::Check(check) => check.name(),
        }
    }
}

fn parse_item(item: &str) -> Result<(PolicyKey, Action), PolicyError> {
    let Some((key, action)) = item.split_once('=') else {
        return Err(PolicyError::NotCheckAction(item.to_string()));
    };
    let key = key.trim().to_ascii_lowercase();
    let key = match key.as_str() {
        "default" => PolicyKey::Default,
        name => PolicyKey::Check(
            Check::from_name(name).ok_or_else(|| PolicyError::UnknownCheck(name.to_string()))?,
        ),
    };
    Ok((key, parse_action(action.trim())?))
}

fn parse_action(text: &str) -> Result<Action, PolicyError> {
    match text.to_ascii_lowercase().as_str() {
        "off" => Ok(Action::Off),
        "log" => Ok(Action::Log),
        "tag" => Ok(Action::Tag),
        "greylist" => Ok(Action::Greylist),
        "defer" => Ok(Action::Defer),
        "reject" => Ok(Action::Reject),
        _ => Err(PolicyError::UnknownAction(text.to_string())),
    }
}

impl RejectAt {
    /// Parses HELOGUARD_REJECT_AT: `rcpt` or `helo`, any case.
    pub fn parse(text: &str) -> Result<Self, PolicyError> {
        match text.trim().to_ascii_lowercase().as_str() {
            "rcpt" => Ok(RejectAt::Rcpt),
            "helo" => Ok(RejectAt::Helo),
            _ => Err(PolicyError::UnknownRejectAt(text.to_string())),
        }
    }
}

impl Default for RejectAt {
    /// `rcpt`, as Postfix's smtpd_delay_reject.
    fn default() -> Self {
        RejectAt::Rcpt
    }
}

/// Parses HELOGUARD_HELO_ALLOW (comma separated).
pub fn parse_allow_list(spec: &str) -> Result<Vec<AllowEntry>, PolicyError> {
    spec.split(',')
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .map(parse_allow_entry)
        .collect()
}

fn parse_allow_entry(entry: &str) -> Result<AllowEntry, PolicyError> {
    let ptr_domain = entry
        .get(..4)
        .filter(|p| p.eq_ignore_ascii_case("ptr:"))
        .map(|_| &entry[4..]);
    if let Some(domain) = ptr_domain {
        return checks::normalize_domain(domain.trim())
            .map(AllowEntry::PtrDomain)
            .ok_or_else(|| PolicyError::BadAllowEntry {
                entry: entry.to_string(),
                why: "bad domain".to_string(),
            });
    }
    entry
        .parse::<Cidr>()
        .map(AllowEntry::Net)
        .map_err(|e| PolicyError::BadAllowEntry {
            entry: entry.to_string(),
            why: e.to_string(),
        })
}

impl AllowEntry {
    /// Whether this entry covers the client: its IP, or its forward-confirmed PTR name.
    pub fn matches(&self, client_ip: IpAddr, confirmed_ptr: Option<&str>) -> bool {
        match self {
            AllowEntry::Net(net) => net.contains(client_ip),
            // Never the HELO name: anyone can claim any name.
            AllowEntry::PtrDomain(domain) => {
                confirmed_ptr.is_some_and(|ptr| is_at_or_below(ptr, domain))
            }
        }
    }
}

fn is_at_or_below(name: &str, domain: &str) -> bool {
    name == domain
        || name
            .strip_suffix(domain)
            .is_some_and(|head| head.ends_with('.'))
}

impl fmt::Display for AllowEntry {
    /// The entry as the operator wrote it, normalized: an address without `/32` or `/128`, a
    /// block as `addr/len`, `ptr:domain` in lower case.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AllowEntry::Net(net) => {
                let width = if net.network().is_ipv4() { 32 } else { 128 };
                if net.prefix_len() == width {
                    write!(f, "{}", net.network())
                } else {
                    write!(f, "{net}")
                }
            }
            AllowEntry::PtrDomain(domain) => write!(f, "ptr:{domain}"),
        }
    }
}

impl IprevResult {
    /// The RFC 8601 result keyword.
    pub const fn name(self) -> &'static str {
        match self {
            IprevResult::Pass => "pass",
            IprevResult::Fail => "fail",
            IprevResult::PermError => "permerror",
            IprevResult::TempError => "temperror",
        }
    }

    /// RFC 8601 3: pass when a PTR name confirms, permerror when there is no PTR name,
    /// temperror when a lookup on the way failed temporarily, fail otherwise.
    pub fn of(reverse: Option<&ReverseFacts>, client_ip: IpAddr) -> Self {
        let Some(reverse) = reverse else {
            return IprevResult::TempError;
        };
        match &reverse.ptr {
            Lookup::NxDomain | Lookup::NoData => IprevResult::PermError,
            Lookup::Found(names) if names.is_empty() => IprevResult::PermError,
            _ => match checks::fcrdns(client_ip, Some(reverse)) {
                CheckResult::Pass => IprevResult::Pass,
                CheckResult::TempError => IprevResult::TempError,
                _ => IprevResult::Fail,
            },
        }
    }
}

/// The rule a failed check breaks, in words a sender's admin can act on.
pub const fn rule_text(check: Check) -> &'static str {
    match check {
        Check::Syntax => {
            "RFC 5321 4.1.1.1: HELO must be a domain name or an address literal such as [192.0.2.1]"
        }
        Check::BareIp => {
            "RFC 5321 4.1.3: an IP address in HELO must be an address literal in brackets"
        }
        Check::Fqdn => {
            "RFC 5321 2.3.5: HELO must be a fully-qualified domain name or an address literal"
        }
        Check::Localhost => {
            "RFC 5321 4.1.4: HELO must name this client, not localhost or a loopback address"
        }
        Check::OwnName => {
            "RFC 5321 4.1.4: HELO must name the client, not this server or its domains"
        }
        Check::LiteralMatch => {
            "RFC 5321 4.1.3: an address literal in HELO must be the client's own IP address"
        }
        Check::Forward => {
            "RFC 5321 2.3.5: the HELO name must resolve in the DNS (A or AAAA record)"
        }
        Check::ForwardMatch => "the A/AAAA records of the HELO name must include the client IP",
        Check::Fcrdns => {
            "RFC 8601 3 (iprev): the client IP needs a PTR name whose A/AAAA records include it"
        }
        Check::RdnsMatch => {
            "the HELO name and the PTR name of the client IP must be in the same registered domain"
        }
        Check::Dynamic => {
            "the HELO or PTR name looks like a dynamic address pool: \
             send through your provider's relay or use a static name"
        }
        Check::Spf => "RFC 7208 2.3: the SPF policy of the HELO name does not allow this client",
        Check::Rhsbl => "the domain of the HELO or PTR name is on a domain block list",
        Check::Dnsbl => "the client IP is on DNS block lists",
        Check::HeloChurn => {
            "this client presented too many different HELO names within the last hour"
        }
    }
}

/// The answer to an EHLO/HELO whose argument fails `syntax` under `reject`: SPEC, 501 5.5.2
/// at the command itself, naming the argument and the rule.
pub fn syntax_refusal(helo: &str) -> Reply {
    Reply::new(
        501,
        "5.5.2",
        &format!(
            "HELO {} refused: check syntax failed: {}",
            sanitize_helo(helo),
            rule_text(Check::Syntax)
        ),
    )
}

/// Runs the checks over the facts known and applies policy and allow list. Facts still
/// missing (`None`) when this is called give `temperror` (the lists: not listing; the state
/// store: `none`): call it when every fact is in or the verdict deadline has passed.
pub fn decide(
    input: &CheckInput<'_>,
    helo_addrs: Option<&crate::dns::Lookup<Vec<std::net::IpAddr>>>,
    reverse: Option<&ReverseFacts>,
    sender: &SenderFacts,
    policy: &HeloPolicy,
    allow: &[AllowEntry],
) -> HeloVerdict {
    let client_ip = canonical_ip(input.client_ip);
    let ptr = checks::confirmed_ptr(reverse, client_ip);
    let iprev = IprevResult::of(reverse, client_ip);
    let lists = &policy.sender;
    let listed: Vec<ListHit> = sender
        .dnsbl
        .as_ref()
        .map(|d| d.hits.clone())
        .unwrap_or_default();
    let dnswl: Vec<ListHit> = listed.iter().filter(|h| h.weight < 0).cloned().collect();
    if let Some(entry) = allow.iter().find(|e| e.matches(client_ip, ptr.as_deref())) {
        return HeloVerdict {
            listed,
            ..allowed_verdict(entry.to_string(), ptr, iprev, lists, Vec::new(), 0)
        };
    }
    let score = sender.dnsbl.as_ref().map_or(0, |d| d.score);
    if lists.dnswl_threshold < 0
        && policy.action(Check::Dnsbl) != Action::Off
        && score <= lists.dnswl_threshold
        && let Some(first) = dnswl.first()
    {
        // SPEC HELOGUARD_DNSWL_THRESHOLD: allowed as HELOGUARD_HELO_ALLOW allows, shown with
        // the first matching negative-weight entry's zone.
        let entry = format!("dnswl:{}", first.zone);
        return HeloVerdict {
            listed,
            ..allowed_verdict(entry, ptr, iprev, lists, dnswl, score)
        };
    }
    let results = checks::run_all(input, helo_addrs, reverse, sender, lists);
    let measured = mask(&results, policy, |a| a == Action::Off);
    let shown = mask(&results, policy, |a| a <= Action::Log);
    let failed: Vec<Check> = Check::ALL
        .into_iter()
        .filter(|c| shown[c.index()] == CheckResult::Fail)
        .collect();
    let decision = decision(input.helo, &shown, &failed, policy);
    let strongest_failed = failed
        .iter()
        .map(|c| policy.action(*c))
        .max()
        .unwrap_or(Action::Off);
    // SPEC: the verdict's action label is the action taken (`defer` for a 451 4.4.3).
    let action = match &decision {
        Decision::Refuse(reply) if reply.code == 451 => strongest_failed.max(Action::Defer),
        Decision::Greylist => strongest_failed.max(Action::Greylist),
        _ => strongest_failed,
    };
    // SPEC: A-R carries SPF's own result when spf ran under tag or stronger on a name SPF
    // applies to (its check is then not `none` for that reason alone: see `checks::spf`).
    let spf_shown = policy.action(Check::Spf) >= Action::Tag
        && checks::spf_applies(input, &checks::parse_helo(input.helo));
    HeloVerdict {
        kind: verdict_kind(&shown, &failed),
        shown,
        measured,
        action,
        decision,
        failed,
        allowed_by: None,
        ptr,
        iprev,
        dnsbl_score: lists.dnsbl.then_some(score),
        spf: sender.spf.clone().filter(|_| spf_shown),
        dnswl,
        listed,
    }
}

/// SPEC: an allowed client skips every check; verdict pass, every check `none`.
fn allowed_verdict(
    allowed_by: String,
    ptr: Option<String>,
    iprev: IprevResult,
    lists: &SenderPolicy,
    dnswl: Vec<ListHit>,
    score: i64,
) -> HeloVerdict {
    HeloVerdict {
        kind: VerdictKind::Pass,
        shown: [CheckResult::None; CHECKS],
        measured: [CheckResult::None; CHECKS],
        action: Action::Off,
        failed: Vec::new(),
        allowed_by: Some(allowed_by),
        ptr,
        iprev,
        decision: Decision::Accept,
        dnsbl_score: lists.dnsbl.then_some(score),
        spf: None,
        listed: Vec::new(),
        dnswl,
    }
}

/// The results with `none` for every check whose action is hidden by `hide`.
fn mask(
    results: &[CheckResult; CHECKS],
    policy: &HeloPolicy,
    hide: impl Fn(Action) -> bool,
) -> [CheckResult; CHECKS] {
    let mut out = *results;
    for check in Check::ALL {
        if hide(policy.action(check)) {
            out[check.index()] = CheckResult::None;
        }
    }
    out
}

fn verdict_kind(shown: &[CheckResult; CHECKS], failed: &[Check]) -> VerdictKind {
    if !failed.is_empty() {
        VerdictKind::Fail
    } else if shown.contains(&CheckResult::TempError) {
        VerdictKind::TempError
    } else {
        VerdictKind::Pass
    }
}

/// The answer the session owes: the strongest failed action decides; a temperror under defer
/// or reject defers (451 4.4.3, never 5xx: the DNS may answer next time).
fn decision(
    helo: &str,
    shown: &[CheckResult; CHECKS],
    failed: &[Check],
    policy: &HeloPolicy,
) -> Decision {
    let name = sanitize_helo(helo);
    let with_action = |action: Action| -> Vec<Check> {
        failed
            .iter()
            .copied()
            .filter(|c| policy.action(*c) == action)
            .collect()
    };
    let rejected = with_action(Action::Reject);
    if !rejected.is_empty() {
        return Decision::Refuse(refusal(550, "5.7.1", &name, "refused", &rejected));
    }
    let deferred = with_action(Action::Defer);
    if !deferred.is_empty() {
        return Decision::Refuse(refusal(450, "4.7.1", &name, "deferred", &deferred));
    }
    let undecided: Vec<Check> = Check::ALL
        .into_iter()
        .filter(|c| shown[c.index()] == CheckResult::TempError)
        .filter(|c| policy.action(*c) >= Action::Defer)
        .collect();
    if !undecided.is_empty() {
        return Decision::Refuse(undecided_reply(&name, &undecided));
    }
    // SPEC: a temperror under `greylist` greylists as a fail does.
    let greylisted = Check::ALL.into_iter().any(|c| {
        policy.action(c) == Action::Greylist
            && matches!(shown[c.index()], CheckResult::Fail | CheckResult::TempError)
    });
    if greylisted {
        return Decision::Greylist;
    }
    Decision::Accept
}

/// One line per failed check: the HELO, the check and the rule broken.
fn refusal(code: u16, enhanced: &str, name: &str, what: &str, checks: &[Check]) -> Reply {
    let lines = checks
        .iter()
        .map(|c| {
            format!(
                "{enhanced} HELO {name} {what}: check {} failed: {}",
                c.name(),
                rule_text(*c)
            )
        })
        .collect();
    Reply { code, lines }
}

fn undecided_reply(name: &str, checks: &[Check]) -> Reply {
    let names: Vec<&str> = checks.iter().map(|c| c.name()).collect();
    Reply::new(
        451,
        "4.4.3",
        &format!(
            "HELO {name} could not be verified ({}): temporary DNS failure, try again later",
            names.join(", ")
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dns::{PtrName, TempFailure};

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("test address")
    }

    fn policy(spec: &str) -> HeloPolicy {
        HeloPolicy::parse(spec).expect("valid policy")
    }

    fn err(spec: &str) -> String {
        HeloPolicy::parse(spec)
            .expect_err("invalid policy")
            .to_string()
    }

    #[test]
    fn policy_parsing_rules() {
        assert_eq!(policy(""), HeloPolicy::default());
        assert_eq!(policy("  "), HeloPolicy::default());
        assert_eq!(policy("default=tag"), HeloPolicy::default());
        assert_eq!(policy("default=tag,syntax=reject"), HeloPolicy::default());
        // syntax stays reject unless named.
        let dry = policy("default=log");
        assert_eq!(dry.action(Check::Syntax), Action::Reject);
        assert_eq!(dry.action(Check::Fcrdns), Action::Log);
        let p = policy("default=off,syntax=tag");
        assert_eq!(p.action(Check::Syntax), Action::Tag);
        assert_eq!(p.action(Check::Dynamic), Action::Off);
        let p = policy(" Default = TAG , LOCALHOST=Reject, literal_match=reject,");
        assert_eq!(p.action(Check::Localhost), Action::Reject);
        assert_eq!(p.action(Check::LiteralMatch), Action::Reject);
        assert_eq!(p.action(Check::Fqdn), Action::Tag);
        assert_eq!(p.action(Check::Syntax), Action::Reject);
        let p = policy("fqdn=defer");
        assert_eq!(p.action(Check::Fqdn), Action::Defer);
        assert_eq!(p.action(Check::Forward), Action::Tag);
        assert!(p.rejects_bad_syntax());
        assert!(!policy("syntax=tag").rejects_bad_syntax());
        assert_eq!(
            policy("default=log,dynamic=reject").to_string(),
            "syntax=reject,bare_ip=log,fqdn=log,localhost=log,own_name=log,literal_match=log,\
             forward=log,forward_match=log,fcrdns=log,rdns_match=log,dynamic=reject,spf=off,\
             rhsbl=log,dnsbl=log,helo_churn=log"
        );
        // spf stays off unless named; the other sender checks take `default`.
        assert_eq!(policy("default=reject").action(Check::Spf), Action::Off);
        assert_eq!(policy("spf=greylist").action(Check::Spf), Action::Greylist);
        assert_eq!(policy("default=defer").action(Check::Dnsbl), Action::Defer);
        let round = policy("default=defer,rdns_match=off");
        assert_eq!(policy(&round.to_string()), round);
    }

    #[test]
    fn policy_errors_name_the_bad_part() {
        assert!(err("default=block").contains("`block`"));
        assert!(err("spam=reject").contains("`spam`"));
        assert!(err("default=tag,localhost").contains("`localhost`"));
        assert!(err("fqdn=tag,fqdn=reject").contains("`fqdn` is given twice"));
        assert!(err("default=tag,default=log").contains("`default`"));
        assert!(err("fqdn=").contains("``"));
        assert_eq!(RejectAt::parse("RCPT"), Ok(RejectAt::Rcpt));
        assert_eq!(RejectAt::parse("helo"), Ok(RejectAt::Helo));
        assert!(
            RejectAt::parse("data")
                .expect_err("bad")
                .to_string()
                .contains("`data`")
        );
        assert_eq!(RejectAt::default(), RejectAt::Rcpt);
    }

    #[test]
    fn allow_list_parsing() {
        let list =
            parse_allow_list(" 192.0.2.0/24, 2001:db8::/32,198.51.100.7 ,ptr:Example.COM.,,")
                .expect("valid allow list");
        let shown: Vec<String> = list.iter().map(ToString::to_string).collect();
        assert_eq!(
            shown,
            [
                "192.0.2.0/24",
                "2001:db8::/32",
                "198.51.100.7",
                "ptr:example.com"
            ]
        );
        assert_eq!(parse_allow_list(""), Ok(Vec::new()));
        assert_eq!(
            parse_allow_list("PTR:mail.example")
                .expect("ptr entry")
                .first(),
            Some(&AllowEntry::PtrDomain("mail.example".into()))
        );
        for bad in [
            "ptr:",
            "ptr:bad domain",
            "300.1.1.1",
            "10.0.0.0/33",
            "example.com",
        ] {
            let e = parse_allow_list(bad).expect_err(bad);
            assert!(e.to_string().contains(&format!("`{bad}`")), "{bad}: {e}");
        }
    }

    #[test]
    fn allow_entries_match_ip_or_confirmed_ptr() {
        let net = AllowEntry::Net("192.0.2.0/24".parse().expect("cidr"));
        assert!(net.matches(ip("192.0.2.200"), None));
        assert!(net.matches(ip("::ffff:192.0.2.200"), None));
        assert!(!net.matches(ip("192.0.3.1"), Some("x.example")));
        let ptr = AllowEntry::PtrDomain("example.com".into());
        assert!(ptr.matches(ip("192.0.3.1"), Some("example.com")));
        assert!(ptr.matches(ip("192.0.3.1"), Some("mx.out.example.com")));
        assert!(!ptr.matches(ip("192.0.3.1"), Some("notexample.com")));
        assert!(!ptr.matches(ip("192.0.3.1"), Some("example.com.evil.test")));
        assert!(!ptr.matches(ip("192.0.3.1"), None));
    }

    // ---- decide ----

    const CLIENT: &str = "192.0.2.1";

    fn found(addrs: &[&str]) -> Lookup<Vec<IpAddr>> {
        Lookup::Found(addrs.iter().map(|a| ip(a)).collect())
    }

    fn confirmed(name: &str) -> ReverseFacts {
        ReverseFacts {
            ptr: Lookup::Found(vec![PtrName {
                name: name.into(),
                addrs: found(&[CLIENT]),
            }]),
        }
    }

    fn run(
        helo: &str,
        addrs: Option<&Lookup<Vec<IpAddr>>>,
        reverse: Option<&ReverseFacts>,
        policy_spec: &str,
        allow_spec: &str,
    ) -> HeloVerdict {
        let domains = vec!["example.org".to_string()];
        let input = CheckInput {
            client_ip: ip(CLIENT),
            helo,
            hostname: "mx.example.org",
            domains: &domains,
        };
        let allow = parse_allow_list(allow_spec).expect("allow list");
        decide(
            &input,
            addrs,
            reverse,
            &SenderFacts::default(),
            &policy(policy_spec),
            &allow,
        )
    }

    fn refusal_of(v: &HeloVerdict) -> &Reply {
        match &v.decision {
            Decision::Refuse(reply) => reply,
            Decision::Accept | Decision::Greylist => panic!("expected a refusal, got {v:?}"),
        }
    }

    #[test]
    fn aligned_client_passes() {
        let rev = confirmed("mx.example.com");
        let v = run(
            "mail.example.com",
            Some(&found(&[CLIENT])),
            Some(&rev),
            "",
            "",
        );
        assert_eq!(v.kind, VerdictKind::Pass);
        assert_eq!(v.action, Action::Off);
        assert!(v.failed.is_empty());
        assert_eq!(v.ptr.as_deref(), Some("mx.example.com"));
        assert_eq!(v.iprev, IprevResult::Pass);
        assert_eq!(v.decision, Decision::Accept);
        assert_eq!(v.shown, v.measured);
    }

    #[test]
    fn allow_list_skips_every_check() {
        let v = run(
            "localhost",
            None,
            None,
            "default=reject",
            "10.0.0.0/8,192.0.2.1",
        );
        assert_eq!(v.kind, VerdictKind::Pass);
        assert_eq!(v.allowed_by.as_deref(), Some("192.0.2.1"));
        assert_eq!(v.shown, [CheckResult::None; CHECKS]);
        assert_eq!(v.measured, [CheckResult::None; CHECKS]);
        assert_eq!(v.decision, Decision::Accept);
        assert_eq!(v.iprev, IprevResult::TempError);

        let rev = confirmed("out.mx.example.net");
        let v = run(
            "localhost",
            None,
            Some(&rev),
            "default=reject",
            "ptr:example.net",
        );
        assert_eq!(v.allowed_by.as_deref(), Some("ptr:example.net"));
        assert_eq!(v.ptr.as_deref(), Some("out.mx.example.net"));
        assert_eq!(v.decision, Decision::Accept);

        // The HELO name is never what a ptr: entry matches.
        let nx = ReverseFacts {
            ptr: Lookup::NxDomain,
        };
        let v = run(
            "mx.example.net",
            None,
            Some(&nx),
            "default=reject",
            "ptr:example.net",
        );
        assert_eq!(v.allowed_by, None);
        assert_eq!(v.kind, VerdictKind::Fail);
    }

    #[test]
    fn tagged_failure_is_accepted() {
        let rev = confirmed("mailhost.example.com");
        let v = run("mailhost", Some(&Lookup::NxDomain), Some(&rev), "", "");
        assert_eq!(v.kind, VerdictKind::Fail);
        assert_eq!(v.action, Action::Tag);
        // A single label has no registered domain to share with the PTR name.
        assert_eq!(
            v.failed,
            vec![Check::Fqdn, Check::Forward, Check::RdnsMatch]
        );
        assert_eq!(v.decision, Decision::Accept);
    }

    #[test]
    fn reject_names_the_helo_the_checks_and_the_rules() {
        let rev = confirmed("mailhost.example.com");
        let v = run(
            "mailhost",
            Some(&Lookup::NxDomain),
            Some(&rev),
            "fqdn=reject,forward=defer",
            "",
        );
        assert_eq!(v.action, Action::Reject);
        assert_eq!(
            v.failed,
            vec![Check::Fqdn, Check::Forward, Check::RdnsMatch]
        );
        let reply = refusal_of(&v);
        let mut wire = Vec::new();
        reply.write_to(&mut wire);
        assert_eq!(
            String::from_utf8_lossy(&wire),
            "550 5.7.1 HELO mailhost refused: check fqdn failed: RFC 5321 2.3.5: HELO must be \
             a fully-qualified domain name or an address literal\r\n"
        );

        let v = run(
            "mailhost",
            Some(&Lookup::NxDomain),
            Some(&rev),
            "default=reject",
            "",
        );
        let reply = refusal_of(&v);
        assert_eq!(reply.code, 550);
        assert_eq!(reply.lines.len(), 3);
        assert!(reply.lines[0].starts_with("5.7.1 HELO mailhost refused: check fqdn failed: "));
        assert!(reply.lines[1].starts_with("5.7.1 HELO mailhost refused: check forward failed: "));
        assert!(
            reply.lines[2].starts_with("5.7.1 HELO mailhost refused: check rdns_match failed: ")
        );
    }

    #[test]
    fn defer_answers_450() {
        let rev = confirmed("mx.example.com");
        let v = run(
            "mail.example.com",
            Some(&found(&["192.0.2.99"])),
            Some(&rev),
            "forward_match=defer",
            "",
        );
        assert_eq!(v.action, Action::Defer);
        assert_eq!(v.failed, vec![Check::ForwardMatch]);
        let reply = refusal_of(&v);
        assert_eq!(reply.code, 450);
        assert_eq!(
            reply.lines,
            [
                "4.7.1 HELO mail.example.com deferred: check forward_match failed: the A/AAAA \
              records of the HELO name must include the client IP"
            ]
        );
    }

    #[test]
    fn temperror_under_defer_or_reject_answers_451() {
        let t = Lookup::TempError(TempFailure::Timeout);
        let rev = confirmed("mx.example.com");
        let v = run(
            "mail.example.com",
            Some(&t),
            Some(&rev),
            "forward=reject",
            "",
        );
        assert_eq!(v.kind, VerdictKind::TempError);
        // SPEC: the action label is the action taken, `defer` for a 451 4.4.3.
        assert_eq!(v.action, Action::Defer);
        assert_eq!(
            refusal_of(&v),
            &Reply::new(
                451,
                "4.4.3",
                "HELO mail.example.com could not be verified (forward): temporary DNS failure, \
                 try again later"
            )
        );
        // Under tag a temperror is only tagged.
        let v = run("mail.example.com", Some(&t), Some(&rev), "", "");
        assert_eq!(v.kind, VerdictKind::TempError);
        assert_eq!(v.decision, Decision::Accept);
        // A failed tag check makes the verdict fail, and the temperror under defer still defers.
        let v = run("mailhost", None, Some(&rev), "forward=defer", "");
        assert_eq!(v.kind, VerdictKind::Fail);
        assert_eq!(v.action, Action::Defer);
        assert_eq!(refusal_of(&v).code, 451);
        // A failed defer check wins over a temperror under reject.
        let v = run(
            "mail.example.com",
            Some(&t),
            Some(&rev),
            "forward=reject,rdns_match=defer",
            "",
        );
        let rev_other = confirmed("mx.other.example");
        let v2 = run(
            "mail.example.com",
            Some(&t),
            Some(&rev_other),
            "forward=reject,rdns_match=defer",
            "",
        );
        assert_eq!(refusal_of(&v).code, 451);
        assert_eq!(refusal_of(&v2).code, 450);
    }

    #[test]
    fn log_and_off_are_left_out_of_the_verdict() {
        let rev = confirmed("mailhost.example.com");
        let addrs = found(&[CLIENT]);
        let v = run(
            "mailhost",
            Some(&addrs),
            Some(&rev),
            "fqdn=log,rdns_match=off",
            "",
        );
        assert_eq!(v.kind, VerdictKind::Pass);
        assert_eq!(v.shown[Check::Fqdn.index()], CheckResult::None);
        assert_eq!(v.measured[Check::Fqdn.index()], CheckResult::Fail);
        assert!(v.failed.is_empty());
        assert_eq!(v.decision, Decision::Accept);
        let v = run(
            "mailhost",
            Some(&addrs),
            Some(&rev),
            "fqdn=off,rdns_match=off",
            "",
        );
        assert_eq!(v.shown[Check::Fqdn.index()], CheckResult::None);
        assert_eq!(v.measured[Check::Fqdn.index()], CheckResult::None);
        assert_eq!(v.kind, VerdictKind::Pass);
        // A temperror under log does not make the verdict temperror.
        let v = run("mail.example.com", None, Some(&rev), "default=log", "");
        assert_eq!(v.kind, VerdictKind::Pass);
        assert_eq!(v.measured[Check::Forward.index()], CheckResult::TempError);
    }

    #[test]
    fn bad_syntax_is_still_reported() {
        let nx = ReverseFacts {
            ptr: Lookup::NxDomain,
        };
        let v = run("bad host!", None, Some(&nx), "", "");
        assert_eq!(v.kind, VerdictKind::Fail);
        assert_eq!(v.failed, vec![Check::Syntax, Check::Fcrdns]);
        let reply = refusal_of(&v);
        assert_eq!(reply.code, 550);
        assert_eq!(reply.lines.len(), 1);
        assert!(reply.lines[0].starts_with("5.7.1 HELO bad?host! refused: check syntax failed: "));
    }

    #[test]
    fn syntax_refusal_is_501_naming_the_argument() {
        let mut wire = Vec::new();
        syntax_refusal("bad host").write_to(&mut wire);
        assert_eq!(
            String::from_utf8_lossy(&wire),
            "501 5.5.2 HELO bad?host refused: check syntax failed: RFC 5321 4.1.1.1: HELO must \
             be a domain name or an address literal such as [192.0.2.1]\r\n"
        );
    }

    #[test]
    fn iprev_results() {
        let c = ip(CLIENT);
        let unconfirmed = ReverseFacts {
            ptr: Lookup::Found(vec![PtrName {
                name: "x.example".into(),
                addrs: found(&["192.0.2.2"]),
            }]),
        };
        let pending = ReverseFacts {
            ptr: Lookup::Found(vec![PtrName {
                name: "x.example".into(),
                addrs: Lookup::TempError(TempFailure::Other),
            }]),
        };
        let r = |facts: Option<&ReverseFacts>| IprevResult::of(facts, c);
        assert_eq!(r(Some(&confirmed("x.example"))), IprevResult::Pass);
        assert_eq!(r(Some(&unconfirmed)), IprevResult::Fail);
        assert_eq!(
            r(Some(&ReverseFacts {
                ptr: Lookup::NxDomain
            })),
            IprevResult::PermError
        );
        assert_eq!(
            r(Some(&ReverseFacts {
                ptr: Lookup::NoData
            })),
            IprevResult::PermError
        );
        assert_eq!(r(Some(&pending)), IprevResult::TempError);
        let t = ReverseFacts {
            ptr: Lookup::TempError(TempFailure::Refused),
        };
        assert_eq!(r(Some(&t)), IprevResult::TempError);
        assert_eq!(r(None), IprevResult::TempError);
        assert_eq!(IprevResult::PermError.name(), "permerror");
    }

    /// `run` with sender facts and the list settings.
    fn run_sender(
        helo: &str,
        sender: &SenderFacts,
        lists: SenderPolicy,
        policy_spec: &str,
        allow_spec: &str,
    ) -> HeloVerdict {
        let domains = vec!["example.org".to_string()];
        let input = CheckInput {
            client_ip: ip(CLIENT),
            helo,
            hostname: "mx.example.org",
            domains: &domains,
        };
        let rev = confirmed("mx.example.com");
        let addrs = found(&[CLIENT]);
        let mut p = policy(policy_spec);
        p.sender = lists;
        let allow = parse_allow_list(allow_spec).expect("allow list");
        decide(&input, Some(&addrs), Some(&rev), sender, &p, &allow)
    }

    fn hit(zone: &str, weight: i64) -> ListHit {
        ListHit {
            zone: zone.to_string(),
            answer: std::net::Ipv4Addr::new(127, 0, 0, 2),
            weight,
        }
    }

    fn lists() -> SenderPolicy {
        SenderPolicy {
            dnsbl: true,
            rhsbl: true,
            ..SenderPolicy::default()
        }
    }

    fn scored(score: i64, hits: Vec<ListHit>) -> SenderFacts {
        SenderFacts {
            dnsbl: Some(crate::helo::sender::DnsblOutcome { score, hits }),
            ..SenderFacts::default()
        }
    }

    #[test]
    fn dnsbl_fails_at_the_threshold_and_shows_the_score() {
        let mut l = lists();
        l.dnsbl_threshold = 3;
        let below = run_sender(
            "mail.example.com",
            &scored(2, vec![hit("a.test", 2)]),
            l,
            "",
            "",
        );
        assert_eq!(below.shown[Check::Dnsbl.index()], CheckResult::Pass);
        assert_eq!(below.dnsbl_score, Some(2));
        assert_eq!(below.listed.len(), 1);
        let at = run_sender(
            "mail.example.com",
            &scored(3, vec![hit("a.test", 2), hit("b.test", 1)]),
            l,
            "dnsbl=reject",
            "",
        );
        assert_eq!(at.shown[Check::Dnsbl.index()], CheckResult::Fail);
        assert_eq!(refusal_of(&at).code, 550);
        assert!(refusal_of(&at).lines[0].contains("check dnsbl failed"));
        // A list that never answered counts as not listing: pass, never temperror.
        let silent = run_sender("mail.example.com", &SenderFacts::default(), l, "", "");
        assert_eq!(silent.shown[Check::Dnsbl.index()], CheckResult::Pass);
        assert_eq!(silent.dnsbl_score, Some(0));
        // Lists not set: none, and no score shown.
        let unset = run_sender(
            "mail.example.com",
            &SenderFacts::default(),
            SenderPolicy::default(),
            "",
            "",
        );
        assert_eq!(unset.shown[Check::Dnsbl.index()], CheckResult::None);
        assert_eq!(unset.dnsbl_score, None);
    }

    #[test]
    fn a_dnswl_score_at_or_below_its_threshold_allows_the_client() {
        let mut l = lists();
        l.dnswl_threshold = -2;
        let facts = scored(-2, vec![hit("bl.test", 1), hit("wl.test", -3)]);
        let v = run_sender("localhost", &facts, l, "default=reject", "");
        assert_eq!(v.kind, VerdictKind::Pass);
        assert_eq!(v.allowed_by.as_deref(), Some("dnswl:wl.test"));
        assert_eq!(v.shown, [CheckResult::None; CHECKS]);
        assert_eq!(v.decision, Decision::Accept);
        assert_eq!(v.dnsbl_score, Some(-2));
        assert_eq!(v.dnswl, vec![hit("wl.test", -3)]);
        // HELO_ALLOW is decided first and wins.
        let v = run_sender("localhost", &facts, l, "default=reject", "192.0.2.0/24");
        assert_eq!(v.allowed_by.as_deref(), Some("192.0.2.0/24"));
        assert_eq!(v.dnsbl_score, Some(0));
        // Above the threshold the allowlist hit only lowers the score, and A-R still says so.
        let facts = scored(-1, vec![hit("wl.test", -1)]);
        let v = run_sender("mail.example.com", &facts, l, "", "");
        assert_eq!(v.allowed_by, None);
        assert_eq!(v.dnswl.len(), 1);
        // Threshold 0 is off.
        let v = run_sender(
            "mail.example.com",
            &scored(-5, vec![hit("wl.test", -5)]),
            lists(),
            "",
            "",
        );
        assert_eq!(v.allowed_by, None);
    }

    #[test]
    fn greylist_is_decided_between_tag_and_defer() {
        let listed = scored(1, vec![hit("bl.test", 1)]);
        let v = run_sender("mail.example.com", &listed, lists(), "dnsbl=greylist", "");
        assert_eq!(v.decision, Decision::Greylist);
        assert_eq!(v.action, Action::Greylist);
        assert_eq!(v.kind, VerdictKind::Fail);
        // A defer outranks greylist.
        let v = run_sender(
            "dyn-192-0-2-1.example.com",
            &listed,
            lists(),
            "dnsbl=greylist,dynamic=defer",
            "",
        );
        assert_eq!(refusal_of(&v).code, 450);
        assert_eq!(v.action, Action::Defer);
        // A temperror under greylist greylists as a fail does.
        let v = run_sender(
            "mail.example.com",
            &SenderFacts::default(),
            lists(),
            "spf=greylist",
            "",
        );
        assert_eq!(v.shown[Check::Spf.index()], CheckResult::TempError);
        assert_eq!(v.decision, Decision::Greylist);
        assert_eq!(v.action, Action::Greylist);
        // ...but a temperror under defer (451 4.4.3) outranks it, labelled defer.
        let v = run_sender(
            "mail.example.com",
            &listed,
            lists(),
            "dnsbl=greylist,spf=defer",
            "",
        );
        assert_eq!(refusal_of(&v).code, 451);
        assert_eq!(v.action, Action::Defer);
    }

    #[test]
    fn spf_results_map_to_the_check_and_to_authentication_results() {
        use crate::helo::sender::{SpfOutcome, SpfResult};
        let with = |result| SenderFacts {
            spf: Some(SpfOutcome {
                result,
                why: "test".into(),
            }),
            ..SenderFacts::default()
        };
        for (result, check) in [
            (SpfResult::Pass, CheckResult::Pass),
            (SpfResult::Fail, CheckResult::Fail),
            (SpfResult::SoftFail, CheckResult::None),
            (SpfResult::Neutral, CheckResult::None),
            (SpfResult::None, CheckResult::None),
            (SpfResult::PermError, CheckResult::None),
            (SpfResult::TempError, CheckResult::TempError),
        ] {
            let v = run_sender("mail.example.com", &with(result), lists(), "spf=tag", "");
            assert_eq!(v.shown[Check::Spf.index()], check, "{result:?}");
            assert_eq!(v.spf.as_ref().map(|o| o.result), Some(result), "{result:?}");
            // Off by default: not shown, not in A-R.
            let v = run_sender("mail.example.com", &with(result), lists(), "", "");
            assert_eq!(v.measured[Check::Spf.index()], CheckResult::None);
            assert_eq!(v.spf, None);
            // log: measured, shown none, not in A-R.
            let v = run_sender("mail.example.com", &with(result), lists(), "spf=log", "");
            assert_eq!(v.measured[Check::Spf.index()], check, "{result:?}");
            assert_eq!(v.shown[Check::Spf.index()], CheckResult::None);
            assert_eq!(v.spf, None);
        }
        // Never for a literal or a name that is not an FQDN.
        for helo in ["[192.0.2.1]", "mailhost"] {
            let v = run_sender(helo, &with(SpfResult::Fail), lists(), "spf=reject", "");
            assert_eq!(v.shown[Check::Spf.index()], CheckResult::None, "{helo}");
            assert_eq!(v.spf, None, "{helo}");
        }
    }

    #[test]
    fn rhsbl_and_helo_churn_results() {
        use crate::helo::sender::{ChurnOutcome, RhsblHit, RhsblOutcome};
        let listed = SenderFacts {
            rhsbl: Some(RhsblOutcome {
                hits: vec![RhsblHit {
                    domain: "example.com".into(),
                    zone: "dbl.test".into(),
                    answer: std::net::Ipv4Addr::new(127, 0, 1, 2),
                }],
            }),
            ..SenderFacts::default()
        };
        let v = run_sender("mail.example.com", &listed, lists(), "rhsbl=defer", "");
        assert_eq!(v.shown[Check::Rhsbl.index()], CheckResult::Fail);
        assert_eq!(refusal_of(&v).code, 450);
        let v = run_sender("mail.example.com", &SenderFacts::default(), lists(), "", "");
        assert_eq!(v.shown[Check::Rhsbl.index()], CheckResult::Pass);
        let churn = |n| SenderFacts {
            churn: Some(n),
            ..SenderFacts::default()
        };
        let l = lists();
        let v = run_sender(
            "mail.example.com",
            &churn(ChurnOutcome::DistinctNames(5)),
            l,
            "",
            "",
        );
        assert_eq!(v.shown[Check::HeloChurn.index()], CheckResult::Pass);
        let v = run_sender(
            "mail.example.com",
            &churn(ChurnOutcome::DistinctNames(6)),
            l,
            "",
            "",
        );
        assert_eq!(v.shown[Check::HeloChurn.index()], CheckResult::Fail);
        let v = run_sender(
            "mail.example.com",
            &churn(ChurnOutcome::Unavailable),
            l,
            "",
            "",
        );
        assert_eq!(v.shown[Check::HeloChurn.index()], CheckResult::None);
        let off = SenderPolicy {
            helo_churn: 0,
            ..lists()
        };
        let v = run_sender(
            "mail.example.com",
            &churn(ChurnOutcome::DistinctNames(60)),
            off,
            "",
            "",
        );
        assert_eq!(v.shown[Check::HeloChurn.index()], CheckResult::None);
    }
}
