//! What the four sender checks (spf, rhsbl, dnsbl, helo_churn) learn, as the session receives
//! it: the outcome of an SPF evaluation of the HELO identity, the client's list scores, the
//! domain lists' hits, and the client's HELO history. Types only: the resolver thread and the
//! state thread produce them, `checks` turns them into results, `trace` writes them.
//!
//! A fact that has not arrived is `None` in [`SenderFacts`]; the checks then give `temperror`
//! (spf, helo_churn: `none`, as the store fails open) or count as not listing (dnsbl, rhsbl:
//! SPEC, a list's outage never defers mail).

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

/// The client's HELO history, after recording the name just presented.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChurnOutcome {
    /// The state store did not answer in time, or is down: the check gives `none`.
    Unavailable,
    /// Distinct names this client (IPv4 address, IPv6 /64) presented within the last hour,
    /// the current one included.
    DistinctNames(u32),
}

/// Everything the sender checks know of one identity; `None` for what has not arrived.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SenderFacts {
    pub spf: Option<SpfOutcome>,
    pub dnsbl: Option<DnsblOutcome>,
    pub rhsbl: Option<RhsblOutcome>,
    pub churn: Option<ChurnOutcome>,
}

/// What the sender checks compare against (HELOGUARD_DNSBL_THRESHOLD, _DNSWL_THRESHOLD,
/// _HELO_CHURN), and which lists are set at all.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SenderPolicy {
    /// HELOGUARD_DNSBL is set.
    pub dnsbl: bool,
    /// HELOGUARD_RHSBL is set.
    pub rhsbl: bool,
    /// A combined score at or above this fails dnsbl.
    pub dnsbl_threshold: i64,
    /// A combined score at or below this negative number allows the client; 0 = off.
    pub dnswl_threshold: i64,
    /// Distinct names per client and hour before helo_churn fails; 0 = the check gives none.
    pub helo_churn: u32,
}

impl Default for SenderPolicy {
    fn default() -> Self {
        Self {
            dnsbl: false,
            rhsbl: false,
            dnsbl_threshold: 1,
            dnswl_threshold: 0,
            helo_churn: 5,
        }
    }
}
