//! `SpfDns` over hickory's `TokioResolver`, for the resolver thread.
//!
//! Each query is made the way the resolver thread makes its own (`dns::resolver`): bounded by
//! the per-query timeout whatever hickory does inside, classified into the closed set of
//! outcomes, and reported to the `QueryObserver` with its type (TXT, MX, A, AAAA, PTR), so
//! heloguard_dns_queries_total and heloguard_dns_seconds count SPF's queries like the others.
//! With the session's FCrDNS answers given (`with_reverse`), `ptr` and the validated names
//! come from them and no PTR query is made (SPEC: "the ptr mechanism reuses the fcrdns
//! answers"). Names go into queries label by label as raw octets, as RFC 7208 7.3 expects
//! of a macro expansion (`%{s}` holds an `@`, a local part may hold `+` or `=`): DNS carries
//! any octet in a label. A name that still cannot be one (an empty label, a label over 63
//! octets, over 255 in all) is answered NXDOMAIN without a query.

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use hickory_resolver::TokioResolver;
use hickory_resolver::net::NetError;
use hickory_resolver::proto::rr::{Name, RData};

use super::eval::{MAX_PTR_NAMES, SpfDns, validate_by_lookup};
use crate::dns::records::{classify, outcome_of};
use crate::dns::{Lookup, QueryObserver, QueryType, ReverseFacts};

/// The resolver thread's resolver, seen as SPF's DNS.
pub struct HickorySpfDns {
    resolver: TokioResolver,
    /// Total time for one query, retries included (HELOGUARD_DNS_TIMEOUT_MS).
    timeout: Duration,
    observer: QueryObserver,
    /// The client and what its FCrDNS found, when the session already has it.
    reverse: Option<(IpAddr, ReverseFacts)>,
    /// Queries sent so far (for HELOGUARD_DNS_BUDGET).
    queries: AtomicU32,
}

impl HickorySpfDns {
    /// SPF's queries through `resolver`, each bounded by `timeout` and reported to `observer`.
    pub fn new(resolver: TokioResolver, timeout: Duration, observer: QueryObserver) -> Self {
        Self {
            resolver,
            timeout,
            observer,
            reverse: None,
            queries: AtomicU32::new(0),
        }
    }

    /// Answers `ptr` (and the validated names) of `client` from the session's FCrDNS facts.
    pub fn with_reverse(mut self, client: IpAddr, facts: ReverseFacts) -> Self {
        self.reverse = Some((crate::net::canonical_ip(client), facts));
        self
    }

    /// DNS queries sent so far.
    pub fn queries(&self) -> u32 {
        self.queries.load(Ordering::Relaxed)
    }

    /// The known facts for `ip`, if any.
    fn known(&self, ip: IpAddr) -> Option<&ReverseFacts> {
        let ip = crate::net::canonical_ip(ip);
        self.reverse
            .as_ref()
            .filter(|(client, _)| *client == ip)
            .map(|(_, facts)| facts)
    }

    /// Runs one query under the timeout, classifies it, reports it.
    async fn query<T>(
        &self,
        qtype: QueryType,
        lookup: impl Future<Output = Result<hickory_resolver::lookup::Lookup, NetError>>,
        extract: impl Fn(&RData, &mut Vec<T>),
    ) -> Lookup<Vec<T>> {
        self.queries.fetch_add(1, Ordering::Relaxed);
        let started = Instant::now();
        let result = match tokio::time::timeout(self.timeout, lookup).await {
            Ok(Ok(answer)) => {
                let mut out = Vec::new();
                for record in answer.answers() {
                    extract(&record.data, &mut out);
                }
                // Only CNAMEs or other types in the answer: no record of this type.
                if out.is_empty() {
                    Lookup::NoData
                } else {
                    Lookup::Found(out)
                }
            }
            Ok(Err(e)) => classify(&e),
            Err(_elapsed) => Lookup::TempError(crate::dns::TempFailure::Timeout),
        };
        (self.observer)(qtype, outcome_of(&result), Some(started.elapsed()));
        result
    }
}

impl SpfDns for HickorySpfDns {
    fn txt(&self, name: &str) -> impl Future<Output = Lookup<Vec<String>>> + Send {
        let name = query_name(name);
        async move {
            let Some(name) = name else {
                return Lookup::NxDomain;
            };
            self.query(
                QueryType::Txt,
                self.resolver.txt_lookup(name),
                |rdata, out| {
                    if let RData::TXT(txt) = rdata {
                        // RFC 7208 3.3: a record's strings are concatenated without spaces.
                        let bytes: Vec<u8> = txt
                            .txt_data
                            .iter()
                            .flat_map(|s| s.iter())
                            .copied()
                            .collect();
                        out.push(String::from_utf8_lossy(&bytes).into_owned());
                    }
                },
            )
            .await
        }
    }

    fn a(&self, name: &str) -> impl Future<Output = Lookup<Vec<Ipv4Addr>>> + Send {
        let name = query_name(name);
        async move {
            let Some(name) = name else {
                return Lookup::NxDomain;
            };
            self.query(
                QueryType::A,
                self.resolver.ipv4_lookup(name),
                |rdata, out| {
                    if let RData::A(a) = rdata {
                        out.push(a.0);
                    }
                },
            )
            .await
        }
    }

    fn aaaa(&self, name: &str) -> impl Future<Output = Lookup<Vec<Ipv6Addr>>> + Send {
        let name = query_name(name);
        async move {
            let Some(name) = name else {
                return Lookup::NxDomain;
            };
            self.query(
                QueryType::Aaaa,
                self.resolver.ipv6_lookup(name),
                |rdata, out| {
                    if let RData::AAAA(a) = rdata {
                        out.push(a.0);
                    }
                },
            )
            .await
        }
    }

    fn mx(&self, name: &str) -> impl Future<Output = Lookup<Vec<String>>> + Send {
        let name = query_name(name);
        async move {
            let Some(name) = name else {
                return Lookup::NxDomain;
            };
            self.query(
                QueryType::Mx,
                self.resolver.mx_lookup(name),
                |rdata, out| {
                    if let RData::MX(mx) = rdata {
                        out.push(shown(&mx.exchange));
                    }
                },
            )
            .await
        }
    }

    async fn ptr(&self, ip: IpAddr) -> Lookup<Vec<String>> {
        if let Some(facts) = self.known(ip) {
            return match &facts.ptr {
                Lookup::Found(names) => {
                    Lookup::Found(names.iter().map(|n| n.name.clone()).collect())
                }
                Lookup::NxDomain => Lookup::NxDomain,
                Lookup::NoData => Lookup::NoData,
                Lookup::TempError(failure) => Lookup::TempError(*failure),
            };
        }
        let ip = crate::net::canonical_ip(ip);
        self.query(
            QueryType::Ptr,
            self.resolver.reverse_lookup(ip),
            |rdata, out| {
                if let RData::PTR(ptr) = rdata
                    && out.len() < MAX_PTR_NAMES
                {
                    let name = shown(&ptr.0);
                    if !out.contains(&name) {
                        out.push(name);
                    }
                }
            },
        )
        .await
    }

    async fn validated_names(&self, ip: IpAddr) -> Lookup<Vec<String>> {
        let Some(facts) = self.known(ip) else {
            return validate_by_lookup(self, ip).await;
        };
        let ip = crate::net::canonical_ip(ip);
        match &facts.ptr {
            Lookup::Found(names) => Lookup::Found(
                names
                    .iter()
                    .filter(|n| {
                        matches!(&n.addrs, Lookup::Found(addrs)
                            if addrs.iter().any(|a| crate::net::canonical_ip(*a) == ip))
                    })
                    .map(|n| n.name.clone())
                    .collect(),
            ),
            Lookup::NxDomain => Lookup::NxDomain,
            Lookup::NoData => Lookup::NoData,
            Lookup::TempError(failure) => Lookup::TempError(*failure),
        }
    }
}

/// `name` as an absolute DNS name of raw labels (no search list applies; no character is
/// refused that DNS can carry).
fn query_name(name: &str) -> Option<Name> {
    let name = name.strip_suffix('.').unwrap_or(name);
    if name.is_empty() {
        return None;
    }
    Name::from_labels(name.split('.').map(str::as_bytes)).ok()
}

/// Lower case, without the trailing dot (the root, the null MX, becomes the empty name).
fn shown(name: &Name) -> String {
    let ascii = name.to_lowercase().to_ascii();
    ascii.strip_suffix('.').unwrap_or(&ascii).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_names_keep_every_octet_dns_can_carry() {
        let name = query_name("postmaster@mail.example.com").expect("a name");
        assert!(name.is_fqdn());
        assert_eq!(name.num_labels(), 3);
        assert_eq!(
            name.iter().next().map(<[u8]>::to_vec),
            Some(b"postmaster@mail".to_vec())
        );
        let spaced = query_name("a b+c=d.example.com.").expect("a name");
        assert_eq!(spaced.num_labels(), 3);
        for bad in [
            "",
            ".",
            "a..example.com",
            &format!("{}.com", "a".repeat(64)),
        ] {
            assert_eq!(query_name(bad), None, "{bad:?}");
        }
    }
}
