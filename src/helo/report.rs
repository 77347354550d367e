//! The text report of `heloguard check`: one line per check with its result and why.

use std::net::IpAddr;

use crate::dns::{Lookup, ReverseFacts};
use crate::helo::VerdictKind;
use crate::helo::checks::CheckInput;
use crate::helo::policy::{AllowEntry, HeloPolicy};

/// Renders the report (a line per check, the verdict last) and returns it with the verdict.
pub fn render(
    input: &CheckInput<'_>,
    helo_addrs: Option<&Lookup<Vec<IpAddr>>>,
    reverse: Option<&ReverseFacts>,
    policy: &HeloPolicy,
    allow: &[AllowEntry],
) -> (String, VerdictKind) {
    let _ = (input, helo_addrs, reverse, policy, allow);
    todo!("report")
}
