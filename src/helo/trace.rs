//! The X-HELO-Check and Authentication-Results (RFC 8601 iprev) fields.

use std::net::IpAddr;

use crate::helo::policy::HeloVerdict;

/// The whole `X-HELO-Check: ...\r\n` field for a message.
pub fn x_helo_check_field(
    hostname: &str,
    helo: &str,
    client_ip: IpAddr,
    verdict: &HeloVerdict,
) -> String {
    let _ = (hostname, helo, client_ip, verdict);
    todo!("x-helo-check")
}

/// The whole `Authentication-Results: ...\r\n` field for a message.
pub fn authentication_results_field(
    hostname: &str,
    client_ip: IpAddr,
    verdict: &HeloVerdict,
) -> String {
    let _ = (hostname, client_ip, verdict);
    todo!("authentication-results")
}

/// The HELO argument made safe for a header: octets outside printable ASCII, space, `;`, `"`,
/// `(` and `)` become `?`; cut to 255 octets.
pub fn sanitize_helo(helo: &str) -> String {
    let _ = helo;
    todo!("sanitize")
}
