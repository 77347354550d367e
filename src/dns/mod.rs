//! DNS message types shared by the resolver thread, the sessions and the HELO checks.
//!
//! Outcomes are a closed set (as Postfix's `dns.h`): records, NXDOMAIN, NODATA, or a
//! temporary failure. NXDOMAIN and NODATA are answers and lead checks to `fail`; a temporary
//! failure (timeout, SERVFAIL, REFUSED, network error) leads to `temperror`, never `fail`.
//! This module holds types only; `resolver` owns the thread and hickory, and
//! `answer_cache` holds the answers other threads may use without asking it; both report
//! their queries through a `QueryObserver`.

pub(crate) mod answer_cache;
pub mod lists;
pub(crate) mod records;
pub mod reputation;
pub mod resolver;

use std::net::IpAddr;
use std::sync::Arc;

use reputation::{DnsblOutcome, RhsblOutcome, SpfOutcome, SpfResult};
use std::time::Duration;

/// Identifies who asked: the event loop's connection token (slot and generation packed).
pub type RequestId = u64;

/// Why a lookup could not be decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TempFailure {
    Timeout,
    ServFail,
    Refused,
    Other,
}

/// The outcome of one lookup.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Lookup<T> {
    Found(T),
    NxDomain,
    NoData,
    TempError(TempFailure),
}

/// A PTR name of the client and what its own A/AAAA lookup gave.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PtrName {
    /// Lower case, without the trailing dot.
    pub name: String,
    pub addrs: Lookup<Vec<IpAddr>>,
}

/// Everything the reverse side learned: the PTR names and their forward confirmations.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReverseFacts {
    pub ptr: Lookup<Vec<PtrName>>,
}

impl ReverseFacts {
    /// The first PTR name whose A/AAAA records include `ip` (RFC 8601 iprev `pass`), an
    /// IPv4-mapped address being the IPv4 address it maps, as the checks compare them.
    pub fn confirmed_name(&self, ip: IpAddr) -> Option<&str> {
        match &self.ptr {
            Lookup::Found(names) => names
                .iter()
                .find(|n| {
                    let ip = crate::net::canonical_ip(ip);
                    matches!(&n.addrs, Lookup::Found(a)
                        if a.iter().any(|a| crate::net::canonical_ip(*a) == ip))
                })
                .map(|n| n.name.as_str()),
            _ => None,
        }
    }
}

/// The address family of the client a lookup is for. The checks only ever ask whether a
/// name's addresses include the client's, so the client's own family is asked first and the
/// other one only when the name has no record of the first (see `resolver::forward`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    /// The family of `ip`; an IPv4-mapped IPv6 address is the IPv4 client it stands for.
    pub fn of(ip: IpAddr) -> Family {
        match crate::net::canonical_ip(ip) {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }
}

/// A request to the resolver thread.
///
/// Identical requests in flight (the same name and family, or the same address) are one
/// lookup whose answer goes to every requester. A requester waits for at most one `Forward`:
/// a new one from the same `id` replaces the one before, which is then dropped (or stopped)
/// once nobody else waits for it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DnsRequest {
    /// PTR of the client, then the addresses of each PTR name (at most 10), for FCrDNS.
    Reverse { id: RequestId, ip: IpAddr },
    /// The addresses of a HELO name, for a client of `family`.
    Forward {
        id: RequestId,
        name: String,
        family: Family,
    },
    /// The client over every HELOGUARD_DNSBL zone, concurrently (asked at accept).
    Dnsbl { id: RequestId, ip: IpAddr },
    /// HELOGUARD_RHSBL over the registered domain of `name` (a HELO name key: lower case, no
    /// trailing dot; only when it is a domain name) and over that of the client's
    /// forward-confirmed PTR name.
    Rhsbl {
        id: RequestId,
        name: String,
        ip: IpAddr,
    },
    /// SPF (RFC 7208) of the HELO identity `name` for the client `ip`.
    Spf {
        id: RequestId,
        ip: IpAddr,
        name: String,
    },
    /// `id` wants no answer any more (its connection closed): what only it waits for is
    /// dropped. No answer comes for this request.
    Forget { id: RequestId },
}

impl DnsRequest {
    /// The answer when the resolver cannot take the request (its queue is full, or it is
    /// gone): undecided, so the checks it feeds are `temperror`, and no query was made.
    pub fn unavailable(&self) -> Option<DnsAnswer> {
        let undecided = TempFailure::Other;
        match self {
            Self::Reverse { id, ip } => Some(DnsAnswer::Reverse {
                id: *id,
                ip: *ip,
                facts: ReverseFacts {
                    ptr: Lookup::TempError(undecided),
                },
                queries: 0,
            }),
            Self::Forward { id, name, .. } => Some(DnsAnswer::Forward {
                id: *id,
                name: name.clone(),
                addrs: Lookup::TempError(undecided),
                queries: 0,
            }),
            // SPEC: a list that cannot be asked counts as not listing.
            Self::Dnsbl { id, ip } => Some(DnsAnswer::Dnsbl {
                id: *id,
                ip: *ip,
                outcome: DnsblOutcome::default(),
                queries: 0,
            }),
            Self::Rhsbl { id, name, .. } => Some(DnsAnswer::Rhsbl {
                id: *id,
                name: name.clone(),
                outcome: RhsblOutcome::default(),
                queries: 0,
            }),
            Self::Spf { id, name, .. } => Some(DnsAnswer::Spf {
                id: *id,
                name: name.clone(),
                outcome: SpfOutcome {
                    result: SpfResult::TempError,
                    why: "DNS resolver unavailable".to_string(),
                },
                queries: 0,
            }),
            Self::Forget { .. } => None,
        }
    }
}

/// An answer from the resolver thread.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DnsAnswer {
    Reverse {
        id: RequestId,
        ip: IpAddr,
        facts: ReverseFacts,
        /// DNS queries sent to get it (HELOGUARD_DNS_BUDGET); 0 when it was known.
        queries: u32,
    },
    Forward {
        id: RequestId,
        /// The name exactly as it was requested, so a session can ignore answers for an
        /// identity it has since replaced.
        name: String,
        addrs: Lookup<Vec<IpAddr>>,
        /// DNS queries sent to get it (HELOGUARD_DNS_BUDGET); 0 when it was known.
        queries: u32,
    },
    /// The client's score; a zone that did not answer counts as not listing.
    Dnsbl {
        id: RequestId,
        ip: IpAddr,
        outcome: DnsblOutcome,
        queries: u32,
    },
    Rhsbl {
        id: RequestId,
        /// The name exactly as it was requested.
        name: String,
        outcome: RhsblOutcome,
        queries: u32,
    },
    Spf {
        id: RequestId,
        /// The name exactly as it was requested.
        name: String,
        outcome: SpfOutcome,
        queries: u32,
    },
}

impl DnsAnswer {
    pub fn id(&self) -> RequestId {
        match self {
            Self::Reverse { id, .. }
            | Self::Forward { id, .. }
            | Self::Dnsbl { id, .. }
            | Self::Rhsbl { id, .. }
            | Self::Spf { id, .. } => *id,
        }
    }

    /// DNS queries sent to get this answer.
    pub fn queries(&self) -> u32 {
        match self {
            Self::Reverse { queries, .. }
            | Self::Forward { queries, .. }
            | Self::Dnsbl { queries, .. }
            | Self::Rhsbl { queries, .. }
            | Self::Spf { queries, .. } => *queries,
        }
    }
}

/// Record type of a single query, for metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QueryType {
    A,
    Aaaa,
    Ptr,
    /// SPF records.
    Txt,
    /// SPF `mx` mechanisms.
    Mx,
}

/// Outcome of a single query, for metrics (SPEC: ok, nxdomain, nodata, servfail, timeout, error).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QueryOutcome {
    Ok,
    NxDomain,
    NoData,
    ServFail,
    Timeout,
    Error,
}

/// Called once per query with its type, outcome and, for a query that went to the network, how
/// long it took (heloguard_dns_queries_total counts every query, heloguard_dns_seconds only the
/// network's latency); the resolver thread reports with `Some`, a known answer from the answer
/// cache with `None`, so known answers never pull the latency figures toward zero.
pub type QueryObserver = Arc<dyn Fn(QueryType, QueryOutcome, Option<Duration>) + Send + Sync>;

/// An observer that records nothing.
pub fn no_observer() -> QueryObserver {
    Arc::new(|_, _, _| {})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_confirming_address_may_be_written_as_an_ipv4_mapped_one() {
        let client: IpAddr = "192.0.2.9".parse().expect("literal");
        let mapped: IpAddr = "::ffff:192.0.2.9".parse().expect("literal");
        let facts = |addr: IpAddr| ReverseFacts {
            ptr: Lookup::Found(vec![PtrName {
                name: "host.example".into(),
                addrs: Lookup::Found(vec![addr]),
            }]),
        };
        assert_eq!(facts(mapped).confirmed_name(client), Some("host.example"));
        assert_eq!(facts(client).confirmed_name(mapped), Some("host.example"));
        let other: IpAddr = "192.0.2.10".parse().expect("literal");
        assert_eq!(facts(other).confirmed_name(client), None);
    }
}
