//! Greylisting (SPEC "Greylisting and shared state"): the triplet a RCPT is judged by, the
//! times, and what the state store answered. The store keeps the triplets and decides; the
//! session only asks at RCPT and answers the client.

use std::net::IpAddr;
use std::time::Duration;

/// HELOGUARD_GREYLIST_DELAY, _RETRY and _PASS.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GreylistTimes {
    /// A retry earlier than this after the first sight is deferred again.
    pub delay: Duration,
    /// A retry later than this after the first sight starts over (a new first sight).
    pub retry: Duration,
    /// How long a passed triplet passes at once after its last use.
    pub pass: Duration,
}

impl Default for GreylistTimes {
    /// 5m / 48h / 35d.
    fn default() -> Self {
        Self {
            delay: Duration::from_secs(5 * 60),
            retry: Duration::from_secs(48 * 3600),
            pass: Duration::from_secs(35 * 86400),
        }
    }
}

/// The client part of a triplet: a provider retrying from another address of its pool is the
/// same client when its PTR names are confirmed in one registered domain.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum GreylistClient {
    /// The registered domain of the forward-confirmed PTR name, lower case.
    Domain(String),
    /// The IPv4 /24 or IPv6 /64 of the client, as its network address.
    Network(IpAddr),
}

/// (client; envelope sender; recipient), compared case-insensitively: the parts are kept in
/// lower case.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Triplet {
    pub client: GreylistClient,
    /// The reverse path without angle brackets, empty for `<>`.
    pub sender: String,
    pub recipient: String,
}

/// What the state store answered for one triplet (heloguard_greylist_total's `outcome`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GreylistOutcome {
    /// First sight, recorded now: 451 4.7.1, retry after `retry_after`.
    New { retry_after: Duration },
    /// Seen before, but the delay has not passed: 451 4.7.1, retry after `retry_after`.
    Early { retry_after: Duration },
    /// A retry within the window after the delay: passes now, and for the pass period.
    Passed,
    /// Passed before and used within the pass period: passes.
    Known,
    /// The store is down, slow or its queue is full: passes (fail open).
    Unavailable,
}

impl GreylistOutcome {
    /// The metric label.
    pub const fn name(self) -> &'static str {
        match self {
            GreylistOutcome::New { .. } => "new",
            GreylistOutcome::Early { .. } => "early",
            GreylistOutcome::Passed => "passed",
            GreylistOutcome::Known => "known",
            GreylistOutcome::Unavailable => "unavailable",
        }
    }

    /// How long the client must still wait, when the RCPT is deferred.
    pub const fn retry_after(self) -> Option<Duration> {
        match self {
            GreylistOutcome::New { retry_after } | GreylistOutcome::Early { retry_after } => {
                Some(retry_after)
            }
            _ => None,
        }
    }
}
