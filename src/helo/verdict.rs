//! The verdict on one EHLO/HELO identity: what `policy` decides and what `trace`, the session
//! and the metrics read. Types only, so producers and readers need not import each other.

use crate::helo::sender::{ListHit, SpfOutcome};
use crate::helo::{Action, CHECKS, Check, CheckResult, VerdictKind};
use crate::protocol::reply::Reply;

/// RFC 8601 iprev result.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IprevResult {
    Pass,
    Fail,
    PermError,
    TempError,
}

/// What the session must do with the client after the verdict.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    Accept,
    /// The strongest action is `greylist`: each RCPT asks the state store about its triplet
    /// (451 4.7.1 until it passes), whatever HELOGUARD_REJECT_AT says.
    Greylist,
    /// 450 4.7.1 (defer) or 451 4.4.3 (temperror under defer/reject) or 550 5.7.1 (reject).
    Refuse(Reply),
}

/// The verdict on one EHLO/HELO identity.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeloVerdict {
    pub kind: VerdictKind,
    /// As shown in X-HELO-Check: `none` for checks whose action is off or log.
    pub shown: [CheckResult; CHECKS],
    /// What each check really gave (`none` for off): what metrics count.
    pub measured: [CheckResult; CHECKS],
    /// The action taken: the strongest among the failed counted checks, or `defer` for a
    /// 451 4.4.3 and `greylist` for a greylisted temperror (Off when nothing failed).
    pub action: Action,
    /// Failed checks whose action is tag, defer or reject, in Check order.
    pub failed: Vec<Check>,
    /// The HELOGUARD_HELO_ALLOW entry that matched, as written by the operator.
    pub allowed_by: Option<String>,
    /// The forward-confirmed PTR name, lower case, no trailing dot.
    pub ptr: Option<String>,
    pub iprev: IprevResult,
    pub decision: Decision,
    /// `dnsbl_score=N` in X-HELO-Check and the log: Some whenever HELOGUARD_DNSBL is set (0
    /// for a client not queried).
    pub dnsbl_score: Option<i64>,
    /// Authentication-Results `spf=`: the SPF outcome when the spf check ran under tag or a
    /// stronger action on a name SPF applies to.
    pub spf: Option<SpfOutcome>,
    /// Authentication-Results `dnswl=pass`: the negative-weight entries that list the client.
    pub dnswl: Vec<ListHit>,
    /// Every list entry that matched (heloguard_dnsbl_listings_total, the log).
    pub listed: Vec<ListHit>,
}
