//! The eleven HELO checks of SPEC.md, one pure function each.

use std::net::IpAddr;

/// The identity under judgement and the server's own names.
#[derive(Clone, Copy, Debug)]
pub struct CheckInput<'a> {
    pub client_ip: IpAddr,
    /// The EHLO/HELO argument exactly as sent.
    pub helo: &'a str,
    /// HELOGUARD_HOSTNAME.
    pub hostname: &'a str,
    /// HELOGUARD_DOMAINS, lower case.
    pub domains: &'a [String],
}
