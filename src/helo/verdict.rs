//! The verdict on one EHLO/HELO identity: what `policy` decides and what `trace`, the session
//! and the metrics read. Types only, so producers and readers need not import each other.

use crate::helo::{Action, Check, CheckResult, VerdictKind};
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
    /// 450 4.7.1 (defer) or 451 4.4.3 (temperror under defer/reject) or 550 5.7.1 (reject).
    Refuse(Reply),
}

/// The verdict on one EHLO/HELO identity.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeloVerdict {
    pub kind: VerdictKind,
    /// As shown in X-HELO-Check: `none` for checks whose action is off or log.
    pub shown: [CheckResult; 11],
    /// What each check really gave (`none` for off): what metrics count.
    pub measured: [CheckResult; 11],
    /// The strongest action among the failed counted checks (Off when nothing failed).
    pub action: Action,
    /// Failed checks whose action is tag, defer or reject, in Check order.
    pub failed: Vec<Check>,
    /// The HELOGUARD_HELO_ALLOW entry that matched, as written by the operator.
    pub allowed_by: Option<String>,
    /// The forward-confirmed PTR name, lower case, no trailing dot.
    pub ptr: Option<String>,
    pub iprev: IprevResult,
    pub decision: Decision,
}
