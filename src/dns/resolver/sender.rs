//! The sender lookups on the resolver thread (SPEC "Sender reputation, SPF and HELO
//! history"): the client over every HELOGUARD_DNSBL zone, the registered domains of the HELO
//! name and of the confirmed PTR name over every HELOGUARD_RHSBL zone, SPF of the HELO name.
//!
//! Every zone is asked concurrently, each query bounded by the per-query timeout like any
//! other. A zone that times out or fails counts as not listing: the outage is logged once
//! (when it starts, and again when it ends), counted in heloguard_dns_queries_total like every
//! query, and the answer is not kept, so the next client asks again.

use std::fmt;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use hickory_resolver::TokioResolver;

use super::{Context, Keepable, Queries, fqdn, query, reverse, until_both};
use crate::dns::lists::{dnsbl_query_name, rhsbl_query_name};
use crate::dns::reputation::{DnsblOutcome, RhsblOutcome, SpfOutcome, SpfResult};
use crate::dns::{Lookup, QueryObserver, QueryOutcome, QueryType, ReverseFacts};

/// What an SPF evaluation gets: the thread's resolver, an observer that counts its queries
/// (into heloguard_dns_queries_total and the session's HELOGUARD_DNS_BUDGET), the per-query
/// timeout, and the client's reverse facts when they are known (the `ptr` mechanism reuses
/// them, SPEC).
pub struct SpfQuery {
    pub resolver: TokioResolver,
    pub observer: QueryObserver,
    pub query_timeout: Duration,
    pub ip: IpAddr,
    /// The HELO name, checked as the domain of `postmaster@NAME` (RFC 7208 2.3).
    pub name: String,
    pub reverse: Option<ReverseFacts>,
}

type SpfFuture = Pin<Box<dyn Future<Output = SpfOutcome> + Send>>;

/// Evaluates SPF for the resolver thread. The evaluator lives outside `dns` (it builds on
/// it), so the thread is handed one at startup.
#[derive(Clone)]
pub struct SpfEvaluator(Arc<dyn Fn(SpfQuery) -> SpfFuture + Send + Sync>);

impl SpfEvaluator {
    pub fn new<F, Fut>(evaluate: F) -> Self
    where
        F: Fn(SpfQuery) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = SpfOutcome> + Send + 'static,
    {
        Self(Arc::new(move |q| Box::pin(evaluate(q))))
    }
}

impl fmt::Debug for SpfEvaluator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SpfEvaluator")
    }
}

impl PartialEq for SpfEvaluator {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for SpfEvaluator {}

/// The A answers of one list query: the records, or nothing when the name is not listed or
/// the zone did not answer (then `failed`).
struct ZoneAnswer {
    addrs: Vec<Ipv4Addr>,
    until: Option<Instant>,
    failed: bool,
}

/// Asks `name` (under the list zone `zone`) for its A records.
async fn list_query(ctx: &Context, zone: &str, name: String) -> (ZoneAnswer, Queries) {
    let Some(qname) = fqdn(&name) else {
        // A zone and an address always make a valid name unless the zone is at the length
        // limit: nothing to ask, so nothing listed.
        return (
            ZoneAnswer {
                addrs: Vec::new(),
                until: None,
                failed: false,
            },
            Vec::new(),
        );
    };
    let (answer, q) = query::<IpAddr>(ctx, QueryType::A, ctx.resolver.ipv4_lookup(qname)).await;
    let shown = ctx.lists.display.show(zone).to_string();
    let failed = matches!(answer.value, Lookup::TempError(_));
    note_outage(ctx, &shown, failed, q.1);
    let addrs = match answer.value {
        Lookup::Found(addrs) => addrs
            .into_iter()
            .filter_map(|a| match a {
                IpAddr::V4(v4) => Some(v4),
                IpAddr::V6(_) => None,
            })
            .collect(),
        _ => Vec::new(),
    };
    let until = if failed { None } else { answer.until };
    (
        ZoneAnswer {
            addrs,
            until,
            failed,
        },
        vec![q],
    )
}

/// Logs a zone's outage when it starts and when it ends.
fn note_outage(ctx: &Context, shown: &str, failed: bool, outcome: QueryOutcome) {
    let mut outages = ctx
        .list_outages
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if failed {
        if outages.insert(shown.to_string()) {
            log::warn!(
                "DNS list {shown} did not answer ({}); it counts as not listing until it does",
                outcome_word(outcome)
            );
        }
    } else if outages.remove(shown) {
        log::info!("DNS list {shown} answers again");
    }
}

fn outcome_word(outcome: QueryOutcome) -> &'static str {
    match outcome {
        QueryOutcome::Timeout => "timeout",
        QueryOutcome::ServFail => "servfail",
        QueryOutcome::Ok | QueryOutcome::NxDomain | QueryOutcome::NoData => "ok",
        QueryOutcome::Error => "error",
    }
}

/// Asks every (zone, name) pair concurrently; answers in the order asked.
async fn ask_all(ctx: &Arc<Context>, asks: Vec<(String, String)>) -> (Vec<ZoneAnswer>, Queries) {
    let mut set = tokio::task::JoinSet::new();
    for (i, (zone, name)) in asks.iter().cloned().enumerate() {
        let ctx = ctx.clone();
        set.spawn(async move {
            let answer = list_query(&ctx, &zone, name).await;
            (i, answer)
        });
    }
    let mut answers: Vec<ZoneAnswer> = asks
        .iter()
        .map(|_| ZoneAnswer {
            addrs: Vec::new(),
            until: None,
            failed: true,
        })
        .collect();
    let mut queries = Vec::new();
    while let Some(joined) = set.join_next().await {
        match joined {
            Ok((i, (answer, q))) => {
                if let Some(slot) = answers.get_mut(i) {
                    *slot = answer;
                }
                queries.extend(q);
            }
            // A list query cannot panic short of a bug in hickory; its zone counts as not
            // listing (and the answer is not kept).
            Err(e) => log::error!("DNS list query task failed: {e}"),
        }
    }
    (answers, queries)
}

/// How long a whole answer may be kept: while every zone's answer may, and not at all when
/// one zone did not answer.
fn until_all(answers: &[ZoneAnswer]) -> Option<Instant> {
    answers
        .iter()
        .try_fold(None, |acc: Option<Instant>, a| {
            if a.failed {
                return Err(());
            }
            let until = a.until.ok_or(())?;
            Ok(Some(acc.map_or(until, |t| t.min(until))))
        })
        .ok()
        .flatten()
}

/// The client over every HELOGUARD_DNSBL zone.
pub(super) async fn dnsbl(ctx: &Arc<Context>, ip: IpAddr) -> (Keepable<DnsblOutcome>, Queries) {
    let zones: Vec<String> = ctx
        .lists
        .dnsbl_zones()
        .into_iter()
        .map(String::from)
        .collect();
    let asks = zones
        .iter()
        .map(|zone| (zone.clone(), dnsbl_query_name(ip, zone)))
        .collect();
    let (answers, queries) = ask_all(ctx, asks).await;
    let outcome = ctx.lists.score(|zone| {
        zones
            .iter()
            .position(|z| z == zone)
            .and_then(|i| answers.get(i))
            .map_or(&[][..], |a| a.addrs.as_slice())
    });
    let until = if zones.is_empty() {
        None
    } else {
        until_all(&answers)
    };
    (
        Keepable {
            value: outcome,
            until,
        },
        queries,
    )
}

/// The registered domain of a name, when it is a domain name (not an address literal or a
/// bare IP) with a public suffix.
fn registered_domain(name: &str) -> Option<String> {
    let name = name.strip_suffix('.').unwrap_or(name);
    if name.starts_with('[') || name.parse::<IpAddr>().is_ok() || fqdn(name).is_none() {
        return None;
    }
    psl::domain_str(name).map(str::to_ascii_lowercase)
}

/// HELOGUARD_RHSBL over the registered domains of the HELO name key `name` and of the client's
/// forward-confirmed PTR name.
pub(super) async fn rhsbl(
    ctx: &Arc<Context>,
    name: &str,
    ip: IpAddr,
) -> (Keepable<RhsblOutcome>, Queries) {
    let mut queries = Vec::new();
    let mut until: Option<Instant> = None;
    // The session's own Reverse lookup counted the PTR queries; a known answer is only read.
    let facts = match ctx.known.peek_reverse(ip, Instant::now()) {
        Some(facts) => Some(facts),
        None => {
            let (facts, q) = reverse(ctx, ip).await;
            queries.extend(q);
            until = facts.until;
            Some(facts.value)
        }
    };
    let mut domains: Vec<String> = Vec::new();
    let confirmed = facts
        .as_ref()
        .and_then(|f| f.confirmed_name(ip))
        .and_then(registered_domain);
    for domain in registered_domain(name).into_iter().chain(confirmed) {
        if !domains.contains(&domain) {
            domains.push(domain);
        }
    }
    let zones: Vec<String> = ctx
        .lists
        .rhsbl_zones()
        .into_iter()
        .map(String::from)
        .collect();
    let mut asks = Vec::new();
    for domain in &domains {
        for zone in &zones {
            asks.push((zone.clone(), rhsbl_query_name(domain, zone)));
        }
    }
    let (answers, q) = ask_all(ctx, asks).await;
    queries.extend(q);
    let outcome = ctx.lists.rhsbl_hits(&domains, |domain, zone| {
        let i = domains
            .iter()
            .position(|d| d == domain)
            .unwrap_or(usize::MAX);
        let j = zones.iter().position(|z| z == zone).unwrap_or(usize::MAX);
        i.checked_mul(zones.len())
            .and_then(|k| k.checked_add(j))
            .and_then(|k| answers.get(k))
            .map_or(&[][..], |a| a.addrs.as_slice())
    });
    let until = if answers.is_empty() {
        None
    } else {
        // A Reverse answer read from the known answers keeps its own lifetime there.
        let lists = until_all(&answers);
        if queries.iter().any(|(t, _)| *t == QueryType::Ptr) {
            until_both(lists, until)
        } else {
            lists
        }
    };
    (
        Keepable {
            value: outcome,
            until,
        },
        queries,
    )
}

/// SPF of the HELO name, within HELOGUARD_SPF_TIMEOUT_MS (RFC 7208 4.6.4): past it,
/// `temperror`. With the queries it made.
pub(super) async fn spf(ctx: &Arc<Context>, name: &str, ip: IpAddr) -> (SpfOutcome, usize) {
    let Some(evaluator) = ctx.spf.clone() else {
        return (
            SpfOutcome {
                result: SpfResult::TempError,
                why: "SPF evaluation is not available".to_string(),
            },
            0,
        );
    };
    let count = Arc::new(AtomicU32::new(0));
    let observer: QueryObserver = {
        let count = count.clone();
        let inner = ctx.observer.clone();
        Arc::new(move |qtype, outcome, took| {
            count.fetch_add(1, Ordering::Relaxed);
            inner(qtype, outcome, took);
        })
    };
    let query = SpfQuery {
        resolver: ctx.resolver.clone(),
        observer,
        query_timeout: ctx.timeout,
        ip: crate::net::canonical_ip(ip),
        name: name.to_string(),
        reverse: ctx.known.peek_reverse(ip, Instant::now()),
    };
    let outcome = match tokio::time::timeout(ctx.spf_timeout, (evaluator.0)(query)).await {
        Ok(outcome) => outcome,
        Err(_elapsed) => SpfOutcome {
            result: SpfResult::TempError,
            why: format!(
                "no result within {} ms (HELOGUARD_SPF_TIMEOUT_MS)",
                ctx.spf_timeout.as_millis()
            ),
        },
    };
    let queries = usize::try_from(count.load(Ordering::Relaxed)).unwrap_or(usize::MAX);
    (outcome, queries)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_domain_names_have_a_registered_domain() {
        assert_eq!(
            registered_domain("mail.example.co.uk"),
            Some("example.co.uk".into())
        );
        assert_eq!(
            registered_domain("Mail.Example.TEST."),
            Some("example.test".into())
        );
        assert_eq!(registered_domain("[192.0.2.1]"), None);
        assert_eq!(registered_domain("192.0.2.1"), None);
        assert_eq!(registered_domain("2001:db8::1"), None);
    }
}
