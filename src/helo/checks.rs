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

/// The HELO argument, parsed once (parse, don't validate).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HeloArg {
    /// A syntactically valid domain: lower case, trailing dot removed.
    Domain(String),
    /// `[a.b.c.d]` or `[IPv6:...]`.
    AddressLiteral(IpAddr),
    /// An IP address without brackets.
    BareIp(IpAddr),
    /// Neither: the syntax check fails.
    Invalid,
}

/// Parses an EHLO/HELO argument.
pub fn parse_helo(arg: &str) -> HeloArg {
    let _ = arg;
    todo!("helo argument parsing")
}
