//! The X-HELO-Check and Authentication-Results (RFC 8601 iprev) fields.
//!
//! Formats are SPEC "What an accepted message carries", byte for byte:
//! ```text
//! Authentication-Results: HOSTNAME; iprev=RESULT policy.iprev=IP (PTR)[; spf=R smtp.helo=NAME][; dnswl=pass dns.zone=Z policy.ip=A]...
//! X-HELO-Check: HOSTNAME; VERDICT [allow=ENTRY ]helo=NAME ip=IP ptr=PTR
//! <TAB>syntax=R ... dynamic=R
//! <TAB>spf=R rhsbl=R dnsbl=R helo_churn=R[ dnsbl_score=N]
//! ```
//! X-HELO-Check is folded (CRLF and a tab) before `syntax=` and before `spf=`, so no line
//! passes 998 octets (RFC 5322 2.1.1); Authentication-Results is one line. The HELO is client
//! data, so it is sanitized before it reaches a header; every other part comes from our own
//! parsing.

use std::fmt::Write as _;
use std::net::IpAddr;

use crate::helo::Check;
use crate::helo::verdict::HeloVerdict;
use crate::net::canonical_ip;

/// SPEC: the HELO in a header is cut to 255 octets.
const MAX_HELO_OCTETS: usize = 255;

/// The whole `X-HELO-Check: ...\r\n` field for a message.
pub fn x_helo_check_field(
    hostname: &str,
    helo: &str,
    client_ip: IpAddr,
    verdict: &HeloVerdict,
) -> String {
    let mut field = format!("X-HELO-Check: {hostname}; {}", verdict.kind.name());
    if let Some(entry) = &verdict.allowed_by {
        field.push_str(" allow=");
        field.push_str(&sanitize_helo(entry));
    }
    let ptr = verdict.ptr.as_deref().unwrap_or("none");
    // Writing to a String cannot fail.
    let _ = write!(
        field,
        " helo={} ip={} ptr={ptr}",
        sanitize_helo(helo),
        canonical_ip(client_ip)
    );
    for check in Check::ALL {
        let fold = matches!(check, Check::Syntax | Check::Spf);
        let _ = write!(
            field,
            "{}{}={}",
            if fold { "\r\n\t" } else { " " },
            check.name(),
            verdict.shown[check.index()].name()
        );
    }
    if let Some(score) = verdict.dnsbl_score {
        let _ = write!(field, " dnsbl_score={score}");
    }
    field.push_str("\r\n");
    field
}

/// The whole `Authentication-Results: ...\r\n` field for a message.
pub fn authentication_results_field(
    hostname: &str,
    helo: &str,
    client_ip: IpAddr,
    verdict: &HeloVerdict,
) -> String {
    // RFC 8601 2.3: a pvalue is a value (RFC 2045 token or quoted-string); an IPv6 address
    // holds colons, which a token cannot, so it is quoted.
    let ip = match canonical_ip(client_ip) {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => format!("\"{v6}\""),
    };
    let comment = match &verdict.ptr {
        Some(ptr) => format!(" ({ptr})"),
        None => String::new(),
    };
    let mut field = format!(
        "Authentication-Results: {hostname}; iprev={} policy.iprev={ip}{comment}",
        verdict.iprev.name()
    );
    // RFC 8601 2.7.2: SPF's own result for the HELO identity.
    if let Some(spf) = &verdict.spf {
        let _ = write!(
            field,
            "; spf={} smtp.helo={}",
            spf.result.name(),
            sanitize_helo(helo)
        );
    }
    // RFC 8904: one `dnswl=pass` per allowlist entry that lists the client.
    for hit in &verdict.dnswl {
        let _ = write!(
            field,
            "; dnswl=pass dns.zone={} policy.ip={}",
            sanitize_helo(&hit.zone),
            hit.answer
        );
    }
    field.push_str("\r\n");
    field
}

/// The HELO argument made safe for a header: octets outside printable ASCII, space, `;`, `"`,
/// `(` and `)` become `?`; cut to 255 octets.
pub fn sanitize_helo(helo: &str) -> String {
    helo.bytes()
        .take(MAX_HELO_OCTETS)
        .map(|b| match b {
            b';' | b'"' | b'(' | b')' => '?',
            // Printable ASCII without space (RFC 5234 VCHAR).
            0x21..=0x7e => char::from(b),
            _ => '?',
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dns::{Lookup, PtrName, ReverseFacts};
    use crate::helo::checks::CheckInput;
    use crate::helo::policy::{HeloPolicy, decide, parse_allow_list};

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("test address")
    }

    fn verdict(
        client: &str,
        helo: &str,
        reverse: Option<&ReverseFacts>,
        allow: &str,
    ) -> HeloVerdict {
        let domains = vec!["example.org".to_string()];
        let input = CheckInput {
            client_ip: ip(client),
            helo,
            hostname: "mx.example.org",
            domains: &domains,
        };
        let addrs = Lookup::Found(vec![ip(client)]);
        let allow = parse_allow_list(allow).expect("allow list");
        decide(
            &input,
            Some(&addrs),
            reverse,
            &crate::helo::sender::SenderFacts::default(),
            &HeloPolicy::default(),
            &allow,
        )
    }

    fn confirmed(name: &str, client: &str) -> ReverseFacts {
        ReverseFacts {
            ptr: Lookup::Found(vec![PtrName {
                name: name.to_string(),
                addrs: Lookup::Found(vec![ip(client)]),
            }]),
        }
    }

    #[test]
    fn x_helo_check_ipv4_pass() {
        let facts = confirmed("mail.example.com", "192.0.2.1");
        let v = verdict("192.0.2.1", "mail.example.com", Some(&facts), "");
        assert_eq!(
            x_helo_check_field("mx.example.org", "mail.example.com", ip("192.0.2.1"), &v),
            "X-HELO-Check: mx.example.org; pass helo=mail.example.com ip=192.0.2.1 \
             ptr=mail.example.com\r\n\tsyntax=pass bare_ip=pass fqdn=pass localhost=pass \
             own_name=pass literal_match=none forward=pass forward_match=pass fcrdns=pass \
             rdns_match=pass dynamic=pass\r\n\tspf=none rhsbl=none dnsbl=none helo_churn=none\r\n"
        );
        assert_eq!(
            authentication_results_field("mx.example.org", "h", ip("192.0.2.1"), &v),
            "Authentication-Results: mx.example.org; iprev=pass \
             policy.iprev=192.0.2.1 (mail.example.com)\r\n"
        );
    }

    #[test]
    fn x_helo_check_ipv6_fail_without_ptr() {
        let nx = ReverseFacts {
            ptr: Lookup::NxDomain,
        };
        let v = verdict("2001:db8::1", "[IPv6:2001:db8::1]", Some(&nx), "");
        assert_eq!(
            x_helo_check_field(
                "mx.example.org",
                "[IPv6:2001:db8::1]",
                ip("2001:db8::1"),
                &v
            ),
            "X-HELO-Check: mx.example.org; fail helo=[IPv6:2001:db8::1] ip=2001:db8::1 \
             ptr=none\r\n\tsyntax=pass bare_ip=pass fqdn=none localhost=pass own_name=none \
             literal_match=pass forward=none forward_match=none fcrdns=fail rdns_match=none \
             dynamic=none\r\n\tspf=none rhsbl=none dnsbl=none helo_churn=none\r\n"
        );
        assert_eq!(
            authentication_results_field("mx.example.org", "h", ip("2001:db8::1"), &v),
            "Authentication-Results: mx.example.org; iprev=permerror \
             policy.iprev=\"2001:db8::1\"\r\n"
        );
    }

    #[test]
    fn mapped_client_is_written_as_ipv4() {
        let nx = ReverseFacts {
            ptr: Lookup::NoData,
        };
        let v = verdict("::ffff:192.0.2.1", "[192.0.2.1]", Some(&nx), "");
        let field = x_helo_check_field("mx", "[192.0.2.1]", ip("::ffff:192.0.2.1"), &v);
        assert!(field.contains(" ip=192.0.2.1 "), "{field}");
        assert_eq!(
            authentication_results_field("mx", "h", ip("::ffff:192.0.2.1"), &v),
            "Authentication-Results: mx; iprev=permerror policy.iprev=192.0.2.1\r\n"
        );
    }

    #[test]
    fn allowed_client_shows_the_entry_after_the_verdict() {
        let v = verdict("192.0.2.9", "localhost", None, "10.0.0.0/8, 192.0.2.0/24");
        assert_eq!(
            x_helo_check_field("mx.example.org", "localhost", ip("192.0.2.9"), &v),
            "X-HELO-Check: mx.example.org; pass allow=192.0.2.0/24 helo=localhost \
             ip=192.0.2.9 ptr=none\r\n\tsyntax=none bare_ip=none fqdn=none localhost=none \
             own_name=none literal_match=none forward=none forward_match=none fcrdns=none \
             rdns_match=none dynamic=none\r\n\tspf=none rhsbl=none dnsbl=none helo_churn=none\r\n"
        );
        assert_eq!(
            authentication_results_field("mx.example.org", "h", ip("192.0.2.9"), &v),
            "Authentication-Results: mx.example.org; iprev=temperror policy.iprev=192.0.2.9\r\n"
        );
    }

    #[test]
    fn sanitize_replaces_unsafe_octets_and_cuts() {
        assert_eq!(sanitize_helo("mail.example.com"), "mail.example.com");
        assert_eq!(sanitize_helo("a b;c\"d(e)f"), "a?b?c?d?e?f");
        assert_eq!(sanitize_helo("x\r\ny\t\u{7f}"), "x??y??");
        // One `?` per octet: é is two octets in UTF-8.
        assert_eq!(sanitize_helo("h\u{e9}.example"), "h??.example");
        assert_eq!(sanitize_helo("[IPv6:::1]"), "[IPv6:::1]");
        assert_eq!(sanitize_helo(&"a".repeat(300)).len(), 255);
        assert_eq!(sanitize_helo(""), "");
    }
}
