//! Generic (dynamic pool) host name heuristics.
//!
//! SPEC "HELO checks", dynamic: a name is dynamic when it contains at least three of the IPv4
//! client's octets (decimal in any order and any separators, or as 8 hex digits), or has a
//! label that is or starts with one of the pool words of [`POOL_WORDS`], or `host` followed by
//! digits.
//!
//! How the rule is read, so it is the same everywhere:
//! - Octets match whole digit runs, by value: in `c-73-22-11-5` the runs are 73, 22, 11, 5; in
//!   `1234.example` there is one run 1234, which is no octet. Zero padding (`093`) is the same
//!   octet (93). A run of exactly 12 digits is also read as four zero-padded octets
//!   (`p093104001002`), the decimal form written without separators. Each octet of the
//!   address is matched at most once, so 10.0.0.5 needs two `0` runs to count both zeros.
//! - The hex form is the address's 8 hex digits anywhere in the name, any case
//!   (`p5DE8A3F1.dip0.t-ipconnect.de`).
//! - "Starts with" a pool word means the word is followed by something that is not a letter:
//!   `dsl-pool`, `ppp93`, `dyn_ip` and `pool` itself count, `poolside` and `cableway` do not.
//!   Words that extend others are listed in full (`dynamic`, `dialup`, `customer`).
//! - `host` counts only followed directly by a digit: `host123` is a pool name, `hostmaster`,
//!   `hosting` and plain `host` are not.
//! - For IPv6 clients only the label rule applies.

use std::net::{IpAddr, Ipv4Addr};

use crate::net::canonical_ip;

/// SPEC's pool words: a label that is one of these, or starts with one followed by a non-letter.
pub const POOL_WORDS: [&str; 15] = [
    "dyn",
    "dynamic",
    "dhcp",
    "pool",
    "dsl",
    "adsl",
    "xdsl",
    "cable",
    "ppp",
    "dial",
    "dialup",
    "client",
    "cust",
    "customer",
    "broadband",
];

/// The octets needed to call a name generic.
const OCTETS_NEEDED: usize = 3;

/// Whether `name` looks like a dynamic or generic pool name for `client_ip`.
pub fn looks_dynamic(name: &str, client_ip: IpAddr) -> bool {
    let name = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
    if let IpAddr::V4(v4) = canonical_ip(client_ip)
        && (has_octets(&name, v4) || has_hex_form(&name, v4))
    {
        return true;
    }
    name.split('.').any(is_pool_label)
}

/// Whether at least three of the address's octets appear as whole digit runs.
fn has_octets(name: &str, ip: Ipv4Addr) -> bool {
    let mut runs = octet_runs(name);
    let mut matched = 0;
    for octet in ip.octets() {
        if let Some(pos) = runs.iter().position(|&r| r == octet) {
            // Each run stands for one octet only.
            runs.swap_remove(pos);
            matched += 1;
        }
    }
    matched >= OCTETS_NEEDED
}

/// The values of the digit runs that can be octets: runs of 1-3 digits up to 255, and the four
/// 3-digit groups of a 12-digit run.
fn octet_runs(name: &str) -> Vec<u8> {
    let mut values = Vec::new();
    for run in name.split(|c: char| !c.is_ascii_digit()) {
        match run.len() {
            1..=3 => values.extend(run.parse::<u8>().ok()),
            12 => values.extend(
                run.as_bytes()
                    .chunks(3)
                    .filter_map(|g| std::str::from_utf8(g).ok()?.parse::<u8>().ok()),
            ),
            _ => {}
        }
    }
    values
}

/// Whether the address written as 8 hex digits appears in the (lower-cased) name.
fn has_hex_form(name: &str, ip: Ipv4Addr) -> bool {
    name.contains(&format!("{:08x}", u32::from(ip)))
}

fn is_pool_label(label: &str) -> bool {
    if let Some(rest) = label.strip_prefix("host")
        && rest.starts_with(|c: char| c.is_ascii_digit())
    {
        return true;
    }
    POOL_WORDS.iter().any(|word| {
        label
            .strip_prefix(word)
            .is_some_and(|rest| !rest.starts_with(|c: char| c.is_ascii_alphabetic()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("test address")
    }

    #[test]
    fn real_world_names_by_ipv4() {
        // (name, client, dynamic?)
        let cases: &[(&str, &str, bool)] = &[
            ("c-73-22-11-5.hsd1.ca.comcast.net", "73.22.11.5", true),
            ("ppp-93-104-1-2.dynamic.mnet-online.de", "93.104.1.2", true),
            (
                "dsl-187-156-13-77-dyn.prod-infinitum.com.mx",
                "187.156.13.77",
                true,
            ),
            ("cpe-24-28-3-2.nyc.res.rr.com", "24.28.3.2", true),
            ("5.3.22.73.static.example.net", "73.22.3.5", true),
            ("73-22-11-5.static.example.net", "73.22.11.5", true),
            ("ip-10-0-0-5.ec2.internal", "10.0.0.5", true),
            ("host-093-104-001-002.example.net", "93.104.1.2", true),
            ("p093104001002.example.net", "93.104.1.2", true),
            ("p5DE8A3F1.dip0.t-ipconnect.de", "93.232.163.241", true),
            (
                "ip5de8a3f1.dynamic.kabel-deutschland.de",
                "93.232.163.241",
                true,
            ),
            ("91-64-23-7.dyn.example.de", "91.64.23.7", true),
            ("bl6-22-11.dsl.telepac.pt", "1.2.3.4", true),
            (
                "adsl-75-18-220-4.dsl.pltn13.sbcglobal.net",
                "75.18.220.4",
                true,
            ),
            (
                "pool-71-105-88-4.nycmny.fios.verizon.net",
                "71.105.88.4",
                true,
            ),
            ("dhcp-10-20-30-40.example.edu", "10.20.30.40", true),
            ("cable-1-2.example.net", "9.9.9.9", true),
            ("dialup-4-5-6-7.example.net", "8.8.8.8", true),
            ("customer.example.net", "8.8.8.8", true),
            ("cust-12.example.net", "8.8.8.8", true),
            ("client-200.example.net", "8.8.8.8", true),
            ("broadband.example.net", "8.8.8.8", true),
            ("xdsl-line.example.net", "8.8.8.8", true),
            ("host123.example.net", "8.8.8.8", true),
            ("dsl-pool.example.net", "8.8.8.8", true),
            ("a.pool.example.org", "8.8.8.8", true),
            ("Dyn-1.Example.NET.", "8.8.8.8", true),
            ("mail.example.com", "73.22.11.5", false),
            ("mx1.google.com", "209.85.220.41", false),
            ("mail-sor-f41.google.com", "209.85.220.41", false),
            ("smtp.dhl.com", "165.72.200.11", false),
            ("poolside.example", "8.8.8.8", false),
            ("hostmaster.example", "8.8.8.8", false),
            ("hosting.example", "8.8.8.8", false),
            ("host.example", "8.8.8.8", false),
            ("dyndns.example.org", "8.8.8.8", false),
            ("clients.example.org", "8.8.8.8", false),
            ("cablecom.example", "8.8.8.8", false),
            ("dialog.example", "8.8.8.8", false),
            ("mail.12345.example", "1.23.45.6", false),
            ("mail2.example.com", "2.2.8.9", false),
            ("mx-73-22.example.net", "73.22.11.5", false),
            ("c0a80101.example", "192.168.1.2", false),
            ("10-0-5.example", "10.0.0.5", true),
            ("10-7-5.example", "10.0.0.5", false),
            ("o1.email.example.com", "1.1.1.1", false),
        ];
        for (name, client, want) in cases {
            assert_eq!(
                looks_dynamic(name, ip(client)),
                *want,
                "looks_dynamic({name:?}, {client})"
            );
        }
    }

    #[test]
    fn ipv6_clients_use_only_the_label_rule() {
        let v6 = ip("2001:db8::49:16:b");
        assert!(looks_dynamic("dynamic-ip6.example.net", v6));
        assert!(looks_dynamic("ppp.example.net", v6));
        assert!(!looks_dynamic("73-22-11-5.example.net", v6));
        assert!(!looks_dynamic("20010db8.example.net", v6));
        assert!(!looks_dynamic("mail.example.net", v6));
        // An IPv4-mapped client is an IPv4 client.
        assert!(looks_dynamic(
            "73-22-11-5.example.net",
            ip("::ffff:73.22.11.5")
        ));
    }
}
