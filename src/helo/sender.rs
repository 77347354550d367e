//! What the four sender checks (spf, rhsbl, dnsbl, helo_churn) learn, as the session receives
//! it: the outcome of an SPF evaluation of the HELO identity, the client's list scores, the
//! domain lists' hits, and the client's HELO history. Types only: the resolver thread and the
//! state thread produce them, `checks` turns them into results, `trace` writes them.
//!
//! A fact that has not arrived is `None` in [`SenderFacts`]; the checks then give `temperror`
//! (spf, helo_churn: `none`, as the store fails open) or count as not listing (dnsbl, rhsbl:
//! SPEC, a list's outage never defers mail).

pub use crate::dns::reputation::{
    DnsblOutcome, ListHit, RhsblHit, RhsblOutcome, SpfOutcome, SpfResult,
};

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
