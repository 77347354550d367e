//! HELOGUARD_HELO_POLICY, HELOGUARD_HELO_ALLOW and HELOGUARD_REJECT_AT, and the verdict they
//! give over the eleven check results.

use std::fmt;

use crate::dns::ReverseFacts;
use crate::helo::checks::CheckInput;
use crate::helo::{Action, Check, CheckResult, VerdictKind};
use crate::net::Cidr;
use crate::protocol::reply::Reply;

/// One action per check (HELOGUARD_HELO_POLICY).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeloPolicy {
    actions: [Action; 11],
}

/// Where HELO refusals are answered (HELOGUARD_REJECT_AT).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RejectAt {
    Rcpt,
    Helo,
}

/// One HELOGUARD_HELO_ALLOW entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AllowEntry {
    Net(Cidr),
    /// `ptr:DOMAIN`: a forward-confirmed PTR name equal to DOMAIN or below it.
    PtrDomain(String),
}

/// Why a policy or allow string was refused; the message names the bad part.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyError(pub String);

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for PolicyError {}

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

impl HeloPolicy {
    /// Parses `default=tag,localhost=reject,...`; unspecified checks take `default`, which is
    /// `tag` unless given; `syntax` is `reject` unless given.
    pub fn parse(spec: &str) -> Result<Self, PolicyError> {
        let _ = spec;
        todo!("helo policy parsing")
    }

    pub fn action(&self, check: Check) -> Action {
        self.actions[check.index()]
    }
}

impl Default for HeloPolicy {
    /// `default=tag,syntax=reject`.
    fn default() -> Self {
        let mut actions = [Action::Tag; 11];
        actions[Check::Syntax.index()] = Action::Reject;
        Self { actions }
    }
}

/// Parses HELOGUARD_HELO_ALLOW (comma separated).
pub fn parse_allow_list(spec: &str) -> Result<Vec<AllowEntry>, PolicyError> {
    let _ = spec;
    todo!("allow list parsing")
}

/// Runs the checks over the facts known and applies policy and allow list. `final_` says the
/// verdict deadline has passed (or every fact is in): missing facts then give `temperror`.
pub fn decide(
    input: &CheckInput<'_>,
    helo_addrs: Option<&crate::dns::Lookup<Vec<std::net::IpAddr>>>,
    reverse: Option<&ReverseFacts>,
    policy: &HeloPolicy,
    allow: &[AllowEntry],
) -> HeloVerdict {
    let _ = (input, helo_addrs, reverse, policy, allow);
    todo!("verdict")
}
