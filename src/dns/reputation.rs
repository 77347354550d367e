//! What the resolver thread learns for the sender checks (SPEC "Sender reputation, SPF and
//! HELO history"): an SPF evaluation of the HELO identity, the client's list score, the domain
//! lists' hits. Types only; `helo::sender` shows them to the checks as its own.

use std::net::Ipv4Addr;

/// RFC 7208 2.6: the result of `check_host()`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SpfResult {
    None,
    Neutral,
    Pass,
    Fail,
    SoftFail,
    TempError,
    PermError,
}

impl SpfResult {
    /// The RFC 7208 / RFC 8601 keyword.
    pub const fn name(self) -> &'static str {
        match self {
            SpfResult::None => "none",
            SpfResult::Neutral => "neutral",
            SpfResult::Pass => "pass",
            SpfResult::Fail => "fail",
            SpfResult::SoftFail => "softfail",
            SpfResult::TempError => "temperror",
            SpfResult::PermError => "permerror",
        }
    }
}

/// One SPF evaluation of a HELO name for a client.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpfOutcome {
    pub result: SpfResult,
    /// What decided it, for `heloguard check` and the logs: the mechanism that matched
    /// (`-all`, `ip4:192.0.2.0/24`, `include:_spf.example.net`), or the error (`too many
    /// DNS lookups`, `syntax error at "a:"`, `no SPF record`). Never the `exp=` text, which is
    /// third-party text.
    pub why: String,
}

/// One list entry whose filter matched one of its zone's answers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListHit {
    /// The zone as shown (HELOGUARD_DNSBL_DISPLAY applied): never an access key.
    pub zone: String,
    /// The first answer the entry's filter matched (RFC 8904 `policy.ip`).
    pub answer: Ipv4Addr,
    /// The entry's weight; negative for an allowlist.
    pub weight: i64,
}

/// The client address over every HELOGUARD_DNSBL entry.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DnsblOutcome {
    /// The sum of the weights of the matching entries (each entry once).
    pub score: i64,
    /// The matching entries, in configuration order.
    pub hits: Vec<ListHit>,
}

/// One listed domain under one HELOGUARD_RHSBL zone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RhsblHit {
    /// The registered domain that is listed (of the HELO name or of the confirmed PTR name).
    pub domain: String,
    /// The zone as shown (HELOGUARD_DNSBL_DISPLAY applied).
    pub zone: String,
    pub answer: Ipv4Addr,
}

/// The registered domains of the HELO name and of the forward-confirmed PTR name over every
/// HELOGUARD_RHSBL zone.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RhsblOutcome {
    /// Empty: listed nowhere (or no zone answered).
    pub hits: Vec<RhsblHit>,
}
