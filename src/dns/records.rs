//! Reading hickory's answers into our own types: record data, outcomes, how long a negative
//! answer may be kept, and names made absolute.

use std::net::IpAddr;

use hickory_resolver::net::{DnsError, NetError};
use hickory_resolver::proto::op::ResponseCode;
use hickory_resolver::proto::rr::{Name, RData};

use super::{Lookup, QueryOutcome, TempFailure};

/// At most this many PTR names of one client are forward-confirmed (as Postfix and the
/// usual iprev implementations do): a hostile reverse zone must not multiply our queries.
pub const MAX_PTR_NAMES: usize = 10;

/// The name as an absolute DNS name, so no search list or ndots rule applies.
pub(super) fn fqdn(name: &str) -> Option<Name> {
    let trimmed = name.strip_suffix('.').unwrap_or(name);
    if trimmed.is_empty() {
        return None;
    }
    let mut n = Name::from_ascii(trimmed).ok()?;
    n.set_fqdn(true);
    Some(n)
}

/// Record data a query can yield, extracted from an answer.
pub(super) trait FromRecords: Sized {
    fn extract(rdata: &RData, out: &mut Vec<Self>);
}

impl FromRecords for IpAddr {
    fn extract(rdata: &RData, out: &mut Vec<Self>) {
        match rdata {
            RData::A(a) => out.push(IpAddr::V4(a.0)),
            RData::AAAA(a) => out.push(IpAddr::V6(a.0)),
            _ => {}
        }
    }
}

/// A PTR name as reported (lower case, no trailing dot) and as asked next.
impl FromRecords for (String, Name) {
    fn extract(rdata: &RData, out: &mut Vec<Self>) {
        if let RData::PTR(p) = rdata {
            if out.len() >= MAX_PTR_NAMES {
                return;
            }
            let mut name = p.0.to_lowercase();
            name.set_fqdn(true);
            let ascii = name.to_ascii();
            let shown = ascii.strip_suffix('.').unwrap_or(&ascii).to_string();
            // A zone may list the same name twice (or in two cases); ask it once.
            if !out.iter().any(|(s, _)| *s == shown) {
                out.push((shown, name));
            }
        }
    }
}

/// How long a negative answer may be kept: the SOA's negative TTL (RFC 2308); without an SOA,
/// not at all.
pub(super) fn negative_ttl(e: &NetError) -> Option<u32> {
    match e {
        NetError::Dns(DnsError::NoRecordsFound(no_records)) => no_records.negative_ttl,
        _ => None,
    }
}

/// Maps hickory's error to the closed set of outcomes.
pub(crate) fn classify<T>(e: &NetError) -> Lookup<T> {
    if e.is_nx_domain() {
        return Lookup::NxDomain;
    }
    if e.is_no_records_found() {
        return Lookup::NoData;
    }
    let failure = match e {
        NetError::Timeout => TempFailure::Timeout,
        NetError::Dns(DnsError::ResponseCode(ResponseCode::ServFail)) => TempFailure::ServFail,
        NetError::Dns(DnsError::ResponseCode(ResponseCode::Refused)) => TempFailure::Refused,
        other => {
            log::debug!("DNS query failed: {other}");
            TempFailure::Other
        }
    };
    Lookup::TempError(failure)
}

pub(crate) fn outcome_of<T>(result: &Lookup<T>) -> QueryOutcome {
    match result {
        Lookup::Found(_) => QueryOutcome::Ok,
        Lookup::NxDomain => QueryOutcome::NxDomain,
        Lookup::NoData => QueryOutcome::NoData,
        Lookup::TempError(TempFailure::Timeout) => QueryOutcome::Timeout,
        Lookup::TempError(TempFailure::ServFail) => QueryOutcome::ServFail,
        Lookup::TempError(TempFailure::Refused | TempFailure::Other) => QueryOutcome::Error,
    }
}
