//! RFC 7208 4: `check_host()`, over any DNS that implements `SpfDns`.
//!
//! Contract: `check_helo` evaluates the HELO identity (RFC 7208 2.3: the name checked as the
//! domain of `postmaster@NAME`) for a client address and returns one `SpfOutcome`, whose
//! `why` says what decided it. It follows RFC 7208 4 to 6 including its limits (4.6.4): at
//! most 10 DNS-querying terms (include, a, mx, ptr, exists, redirect) over the whole
//! evaluation, at most 2 void lookups (NXDOMAIN or an empty answer), at most 10 MX names per
//! `mx` (more is `permerror`) and 10 PTR names per `ptr` (the rest ignored); past a limit the
//! result is `permerror`. A DNS error (timeout, SERVFAIL, ...) is `temperror` (2.6.6), except
//! in `ptr` and `%{p}`, where RFC 7208 5.5 and 7.3 make it a non-match or `unknown`.
//! Include and redirect loops end at the 10-term limit. The overall time limit (4.6.4,
//! HELOGUARD_SPF_TIMEOUT_MS) is the caller's: wrap the future in `tokio::time::timeout` and
//! answer `out_of_time` when it fires. The `exp=` text is never fetched.

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::pin::Pin;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::macros::{MacroContext, MacroString};
use super::record::{self, Directive, DualCidr, Mechanism, Record};
use crate::dns::{Lookup, TempFailure};
use crate::helo::sender::{SpfOutcome, SpfResult};

/// RFC 7208 4.6.4: terms that query DNS, over the whole evaluation.
pub const MAX_DNS_TERMS: u32 = 10;

/// RFC 7208 4.6.4: lookups that find nothing (NXDOMAIN, or no record of the type).
pub const MAX_VOID_LOOKUPS: u32 = 2;

/// RFC 7208 4.6.4: names one `mx` may look up; more is `permerror`.
pub const MAX_MX_NAMES: usize = 10;

/// RFC 7208 4.6.4: PTR names one `ptr` (or `%{p}`) may look up; the rest are ignored.
pub const MAX_PTR_NAMES: usize = 10;

/// The DNS queries SPF makes. Names are given without the trailing dot; an implementation
/// answers NXDOMAIN for a name it cannot ask. The futures are `Send` so the evaluation can
/// run as a spawned task.
pub trait SpfDns: Sync {
    /// The TXT records of `name`, each record's strings concatenated (RFC 7208 3.3).
    fn txt(&self, name: &str) -> impl Future<Output = Lookup<Vec<String>>> + Send;

    /// The A records of `name`.
    fn a(&self, name: &str) -> impl Future<Output = Lookup<Vec<Ipv4Addr>>> + Send;

    /// The AAAA records of `name`.
    fn aaaa(&self, name: &str) -> impl Future<Output = Lookup<Vec<Ipv6Addr>>> + Send;

    /// The exchange names of `name`'s MX records, lower case, without the trailing dot (the
    /// null MX of RFC 7505 is the empty name).
    fn mx(&self, name: &str) -> impl Future<Output = Lookup<Vec<String>>> + Send;

    /// The PTR names of `ip`, lower case, without the trailing dot.
    fn ptr(&self, ip: IpAddr) -> impl Future<Output = Lookup<Vec<String>>> + Send;

    /// RFC 7208 5.5: the validated names of `ip` (PTR names whose own addresses include
    /// `ip`); the PTR lookup's NXDOMAIN, NODATA or error as it came. By default, `ptr` and
    /// then `a` or `aaaa` of the first `MAX_PTR_NAMES` names; an implementation that already
    /// knows the answers (the session's FCrDNS) gives them without asking.
    fn validated_names(&self, ip: IpAddr) -> impl Future<Output = Lookup<Vec<String>>> + Send {
        validate_by_lookup(self, ip)
    }
}

/// Evaluates the HELO identity `helo` for `client_ip` (RFC 7208 2.3); `receiver` is our own
/// host name (the `%{r}` macro).
pub async fn check_helo(
    dns: &impl SpfDns,
    client_ip: IpAddr,
    helo: &str,
    receiver: &str,
) -> SpfOutcome {
    let helo = helo.strip_suffix('.').unwrap_or(helo);
    let mut evaluation = Evaluation {
        dns,
        // RFC 7208 5: an IPv4-mapped IPv6 client is the IPv4 client it stands for.
        ip: crate::net::canonical_ip(client_ip),
        helo,
        receiver,
        timestamp: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        dns_terms: 0,
        void_lookups: 0,
        validated: None,
    };
    evaluation.check_host(helo.to_string()).await
}

/// The outcome when the evaluation did not finish within `limit` (RFC 7208 4.6.4: a time
/// limit ends it as `temperror`).
pub fn out_of_time(limit: Duration) -> SpfOutcome {
    SpfOutcome {
        result: SpfResult::TempError,
        why: format!("no SPF result within {} ms", limit.as_millis()),
    }
}

/// RFC 7208 5.5 by queries: PTR, then the client's family for each of the first
/// `MAX_PTR_NAMES` names. A name whose lookup fails is skipped ("If a DNS error occurs while
/// doing an A RR lookup, then that domain name is skipped and the search continues").
pub async fn validate_by_lookup<D: SpfDns + ?Sized>(dns: &D, ip: IpAddr) -> Lookup<Vec<String>> {
    let names = match dns.ptr(ip).await {
        Lookup::Found(names) => names,
        Lookup::NxDomain => return Lookup::NxDomain,
        Lookup::NoData => return Lookup::NoData,
        Lookup::TempError(failure) => return Lookup::TempError(failure),
    };
    let mut validated = Vec::new();
    for name in names.into_iter().take(MAX_PTR_NAMES) {
        let confirms = match ip {
            IpAddr::V4(v4) => matches!(dns.a(&name).await, Lookup::Found(a) if a.contains(&v4)),
            IpAddr::V6(v6) => {
                matches!(dns.aaaa(&name).await, Lookup::Found(a) if a.contains(&v6))
            }
        };
        if confirms {
            validated.push(name);
        }
    }
    Lookup::Found(validated)
}

/// One `check_helo`: what the limits have counted so far, across includes and redirects.
struct Evaluation<'a, D> {
    dns: &'a D,
    ip: IpAddr,
    helo: &'a str,
    receiver: &'a str,
    timestamp: u64,
    /// DNS-querying terms evaluated (RFC 7208 4.6.4).
    dns_terms: u32,
    void_lookups: u32,
    /// The validated names of the client, once `%{p}` needed them.
    validated: Option<Vec<String>>,
}

impl<'a, D: SpfDns> Evaluation<'a, D> {
    /// `check_host()` of `domain`; boxed, as include and redirect recurse.
    fn check_host<'s>(
        &'s mut self,
        domain: String,
    ) -> Pin<Box<dyn Future<Output = SpfOutcome> + Send + 's>> {
        Box::pin(async move { self.evaluate(domain).await })
    }

    async fn evaluate(&mut self, domain: String) -> SpfOutcome {
        let domain = domain.strip_suffix('.').unwrap_or(&domain).to_string();
        // RFC 7208 4.3: a malformed or single-label domain has no SPF policy.
        if !is_valid_name(&domain) || !domain.contains('.') {
            return outcome(SpfResult::None, format!("malformed domain {domain:?}"));
        }
        let record = match self.record(&domain).await {
            Ok(record) => record,
            Err(stop) => return stop,
        };
        // RFC 7208 4.6.2: mechanisms left to right; the first match decides.
        for directive in &record.directives {
            match self.matches(directive, &domain).await {
                Ok(true) => {
                    return outcome(directive.qualifier.result(), directive.text.clone());
                }
                Ok(false) => {}
                Err(stop) => return stop,
            }
        }
        // RFC 7208 6.1: redirect only when nothing matched; an `all` always matches, so a
        // record with one never gets here.
        if let Some((spec, text)) = &record.redirect {
            return self.redirect(spec, text, &domain).await;
        }
        // RFC 7208 4.7: the default result.
        outcome(SpfResult::Neutral, "no mechanism matched".to_string())
    }

    /// RFC 7208 4.4 and 4.5: the one SPF record of `domain`.
    async fn record(&self, domain: &str) -> Result<Record, SpfOutcome> {
        let no_record = || outcome(SpfResult::None, "no SPF record".to_string());
        let txts = match self.dns.txt(domain).await {
            Lookup::Found(txts) => txts,
            Lookup::NxDomain | Lookup::NoData => return Err(no_record()),
            Lookup::TempError(failure) => return Err(dns_error(failure, "TXT", domain)),
        };
        let mut spf = txts.iter().filter(|t| record::is_spf_record(t));
        let Some(first) = spf.next() else {
            return Err(no_record());
        };
        if spf.next().is_some() {
            return Err(permerror(format!("more than one SPF record at {domain}")));
        }
        record::parse(first).map_err(|e| permerror(e.to_string()))
    }

    /// Whether one mechanism matches; `Err` ends the evaluation with that outcome.
    async fn matches(&mut self, directive: &Directive, domain: &str) -> Result<bool, SpfOutcome> {
        match &directive.mechanism {
            Mechanism::All => Ok(true),
            Mechanism::Ip4 { network, prefix } => {
                Ok(matches!(self.ip, IpAddr::V4(ip) if same_v4_prefix(ip, *network, *prefix)))
            }
            Mechanism::Ip6 { network, prefix } => {
                Ok(matches!(self.ip, IpAddr::V6(ip) if same_v6_prefix(ip, *network, *prefix)))
            }
            Mechanism::A { domain: spec, cidr } => {
                self.count_dns_term()?;
                let Some(target) = self.target(spec.as_ref(), domain).await? else {
                    return Ok(false);
                };
                let addrs = match self.addresses(&target).await {
                    Lookup::Found(addrs) => addrs,
                    Lookup::NxDomain | Lookup::NoData => {
                        self.count_void_lookup()?;
                        return Ok(false);
                    }
                    Lookup::TempError(failure) => {
                        return Err(dns_error(failure, self.address_type(), &target));
                    }
                };
                Ok(addrs.iter().any(|a| in_network(self.ip, *a, *cidr)))
            }
            Mechanism::Mx { domain: spec, cidr } => {
                self.count_dns_term()?;
                let Some(target) = self.target(spec.as_ref(), domain).await? else {
                    return Ok(false);
                };
                self.mx_matches(&target, *cidr).await
            }
            Mechanism::Ptr(spec) => {
                self.count_dns_term()?;
                let Some(target) = self.target(spec.as_ref(), domain).await? else {
                    return Ok(false);
                };
                let names = match self.dns.validated_names(self.ip).await {
                    Lookup::Found(names) => names,
                    Lookup::NxDomain | Lookup::NoData => {
                        self.count_void_lookup()?;
                        return Ok(false);
                    }
                    // RFC 7208 5.5: "If a DNS error occurs while doing the PTR RR lookup,
                    // then this mechanism fails to match."
                    Lookup::TempError(_) => return Ok(false),
                };
                Ok(names.iter().any(|name| is_within(name, &target)))
            }
            Mechanism::Exists(spec) => {
                self.count_dns_term()?;
                let Some(target) = self.target(Some(spec), domain).await? else {
                    return Ok(false);
                };
                // RFC 7208 5.7: an A lookup, even for an IPv6 client.
                match self.dns.a(&target).await {
                    Lookup::Found(addrs) => Ok(!addrs.is_empty()),
                    Lookup::NxDomain | Lookup::NoData => {
                        self.count_void_lookup()?;
                        Ok(false)
                    }
                    Lookup::TempError(failure) => Err(dns_error(failure, "A", &target)),
                }
            }
            Mechanism::Include(spec) => {
                self.count_dns_term()?;
                let Some(target) = self.target(Some(spec), domain).await? else {
                    return Err(permerror(format!("{}: malformed domain", directive.text)));
                };
                let inner = self.check_host(target).await;
                // RFC 7208 5.2: the included record's result, as a match or not.
                match inner.result {
                    SpfResult::Pass => Ok(true),
                    SpfResult::Fail | SpfResult::SoftFail | SpfResult::Neutral => Ok(false),
                    SpfResult::TempError | SpfResult::PermError => Err(inner),
                    SpfResult::None => Err(without_record(&directive.text, &inner)),
                }
            }
        }
    }

    /// RFC 7208 5.4: the addresses of the target's MX names.
    async fn mx_matches(&mut self, target: &str, cidr: DualCidr) -> Result<bool, SpfOutcome> {
        let names = match self.dns.mx(target).await {
            Lookup::Found(names) => names,
            Lookup::NxDomain | Lookup::NoData => {
                self.count_void_lookup()?;
                return Ok(false);
            }
            Lookup::TempError(failure) => return Err(dns_error(failure, "MX", target)),
        };
        if names.len() > MAX_MX_NAMES {
            return Err(permerror(format!(
                "more than {MAX_MX_NAMES} MX names at {target}"
            )));
        }
        // The null MX (RFC 7505) names no host.
        for name in names.iter().filter(|n| !n.is_empty() && n.as_str() != ".") {
            match self.addresses(name).await {
                Lookup::Found(addrs) => {
                    if addrs.iter().any(|a| in_network(self.ip, *a, cidr)) {
                        return Ok(true);
                    }
                }
                Lookup::NxDomain | Lookup::NoData => {}
                Lookup::TempError(failure) => {
                    return Err(dns_error(failure, self.address_type(), name));
                }
            }
        }
        Ok(false)
    }

    /// RFC 7208 6.1: the redirect target's result is the result; one without a record is
    /// `permerror`.
    async fn redirect(&mut self, spec: &MacroString, text: &str, domain: &str) -> SpfOutcome {
        if let Err(stop) = self.count_dns_term() {
            return stop;
        }
        let target = match self.target(Some(spec), domain).await {
            Ok(Some(target)) => target,
            Ok(None) => return permerror(format!("{text}: malformed domain")),
            Err(stop) => return stop,
        };
        let inner = self.check_host(target).await;
        if inner.result == SpfResult::None {
            return without_record(text, &inner);
        }
        inner
    }

    /// The name a mechanism looks up: its expanded domain-spec, or the current domain. None
    /// when the expansion is no name DNS can carry (an empty or overlong label): such a
    /// mechanism matches nothing. `Err` when `%{p}`'s lookup is past the term limit.
    async fn target(
        &mut self,
        spec: Option<&MacroString>,
        domain: &str,
    ) -> Result<Option<String>, SpfOutcome> {
        let Some(spec) = spec else {
            return Ok(Some(domain.to_string()));
        };
        let validated_name = if spec.uses_validated_name() {
            self.validated_name(domain).await?
        } else {
            None
        };
        let ctx = MacroContext {
            local_part: "postmaster",
            sender_domain: self.helo,
            domain,
            ip: self.ip,
            helo: self.helo,
            validated_name: validated_name.as_deref(),
            receiver: self.receiver,
            timestamp: self.timestamp,
        };
        let expanded = spec.expand(&ctx);
        let name = truncate_name(expanded.strip_suffix('.').unwrap_or(&expanded));
        Ok(is_valid_name(name).then(|| name.to_string()))
    }

    /// RFC 7208 7.3 `%{p}`: a validated name of the client, preferring `domain` itself,
    /// then a subdomain of it; None (expanded as `unknown`) when there is none or DNS failed.
    /// The lookup is made once per evaluation and counts as one DNS-querying term (RFC 7208
    /// 4.6.4: "When evaluating the "ptr" mechanism or the %{p} macro, the number of "PTR"
    /// resource records queried is included in the overall limit").
    async fn validated_name(&mut self, domain: &str) -> Result<Option<String>, SpfOutcome> {
        if self.validated.is_none() {
            self.count_dns_term()?;
            let names = match self.dns.validated_names(self.ip).await {
                Lookup::Found(names) => names,
                _ => Vec::new(),
            };
            self.validated = Some(names);
        }
        let names = self.validated.as_deref().unwrap_or_default();
        Ok(names
            .iter()
            .find(|n| n.eq_ignore_ascii_case(domain))
            .or_else(|| names.iter().find(|n| is_within(n, domain)))
            .or_else(|| names.first())
            .cloned())
    }

    /// The client's family's addresses of `name` (RFC 7208 5.3: A for an IPv4 client, AAAA
    /// for an IPv6 one).
    async fn addresses(&self, name: &str) -> Lookup<Vec<IpAddr>> {
        match self.ip {
            IpAddr::V4(_) => widen(self.dns.a(name).await, IpAddr::V4),
            IpAddr::V6(_) => widen(self.dns.aaaa(name).await, IpAddr::V6),
        }
    }

    fn address_type(&self) -> &'static str {
        match self.ip {
            IpAddr::V4(_) => "A",
            IpAddr::V6(_) => "AAAA",
        }
    }

    fn count_dns_term(&mut self) -> Result<(), SpfOutcome> {
        self.dns_terms += 1;
        if self.dns_terms > MAX_DNS_TERMS {
            return Err(permerror("too many DNS lookups".to_string()));
        }
        Ok(())
    }

    fn count_void_lookup(&mut self) -> Result<(), SpfOutcome> {
        self.void_lookups += 1;
        if self.void_lookups > MAX_VOID_LOOKUPS {
            return Err(permerror("too many void DNS lookups".to_string()));
        }
        Ok(())
    }
}

fn outcome(result: SpfResult, why: String) -> SpfOutcome {
    SpfOutcome { result, why }
}

fn permerror(why: String) -> SpfOutcome {
    outcome(SpfResult::PermError, why)
}

/// RFC 7208 5.2 and 6.1: an include or redirect target without a policy is `permerror`.
fn without_record(term: &str, inner: &SpfOutcome) -> SpfOutcome {
    permerror(format!("{term}: {}", inner.why))
}

/// RFC 7208 2.6.6: a DNS error is `temperror`; the why names the query.
fn dns_error(failure: TempFailure, qtype: &str, name: &str) -> SpfOutcome {
    let what = match failure {
        TempFailure::Timeout => "timeout",
        TempFailure::ServFail => "server failure",
        TempFailure::Refused => "refusal",
        TempFailure::Other => "error",
    };
    outcome(
        SpfResult::TempError,
        format!("DNS {what} looking up {qtype} {name}"),
    )
}

fn widen<T>(lookup: Lookup<Vec<T>>, into: impl Fn(T) -> IpAddr) -> Lookup<Vec<IpAddr>> {
    match lookup {
        Lookup::Found(addrs) => Lookup::Found(addrs.into_iter().map(into).collect()),
        Lookup::NxDomain => Lookup::NxDomain,
        Lookup::NoData => Lookup::NoData,
        Lookup::TempError(failure) => Lookup::TempError(failure),
    }
}

/// RFC 7208 7.3: an expanded name over 253 characters loses labels from the left.
fn truncate_name(mut name: &str) -> &str {
    while name.len() > 253 {
        match name.split_once('.') {
            Some((_, rest)) => name = rest,
            None => return name,
        }
    }
    name
}

/// Non-empty labels of at most 63 characters, at most 253 in all (RFC 7208 4.3).
fn is_valid_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= 253 && name.split('.').all(|l| !l.is_empty() && l.len() <= 63)
}

/// `name` is `domain` or a subdomain of it (RFC 7208 5.5), in any case.
fn is_within(name: &str, domain: &str) -> bool {
    let name = name.strip_suffix('.').unwrap_or(name);
    let domain = domain.strip_suffix('.').unwrap_or(domain);
    if name.len() == domain.len() {
        return name.eq_ignore_ascii_case(domain);
    }
    name.len() > domain.len()
        && name.is_char_boundary(name.len() - domain.len())
        && name[name.len() - domain.len()..].eq_ignore_ascii_case(domain)
        && name.as_bytes()[name.len() - domain.len() - 1] == b'.'
}

fn in_network(ip: IpAddr, network: IpAddr, cidr: DualCidr) -> bool {
    match (ip, network) {
        (IpAddr::V4(ip), IpAddr::V4(net)) => same_v4_prefix(ip, net, cidr.v4),
        (IpAddr::V6(ip), IpAddr::V6(net)) => same_v6_prefix(ip, net, cidr.v6),
        _ => false,
    }
}

fn same_v4_prefix(a: Ipv4Addr, b: Ipv4Addr, prefix: u8) -> bool {
    let mask = u32::MAX
        .checked_shl(32u32.saturating_sub(u32::from(prefix)))
        .unwrap_or(0);
    (u32::from(a) ^ u32::from(b)) & mask == 0
}

fn same_v6_prefix(a: Ipv6Addr, b: Ipv6Addr, prefix: u8) -> bool {
    let mask = u128::MAX
        .checked_shl(128u32.saturating_sub(u32::from(prefix)))
        .unwrap_or(0);
    (u128::from(a) ^ u128::from(b)) & mask == 0
}
