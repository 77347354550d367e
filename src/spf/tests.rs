//! `check_helo` over an in-memory zone: every mechanism and modifier, every result, the
//! limits, and the macros in the HELO identity.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Mutex;
use std::time::Duration;

use proptest::prelude::*;

use super::*;
use crate::dns::{Lookup, TempFailure};
use crate::helo::sender::{SpfOutcome, SpfResult};

/// A zone in a map. A name with no record of the asked type but some other record (or
/// declared with `exists`) is NODATA; a name nowhere is NXDOMAIN.
#[derive(Default)]
struct Zone {
    txt: HashMap<String, Vec<String>>,
    a: HashMap<String, Vec<Ipv4Addr>>,
    aaaa: HashMap<String, Vec<Ipv6Addr>>,
    mx: HashMap<String, Vec<String>>,
    ptr: HashMap<IpAddr, Vec<String>>,
    names: HashSet<String>,
    failing: HashMap<String, TempFailure>,
    /// Every query, as `TYPE name`.
    asked: Mutex<Vec<String>>,
}

impl Zone {
    fn new() -> Zone {
        Zone::default()
    }

    fn txt(mut self, name: &str, text: &str) -> Zone {
        self.names.insert(name.to_string());
        self.txt
            .entry(name.to_string())
            .or_default()
            .push(text.to_string());
        self
    }

    fn a(mut self, name: &str, ip: &str) -> Zone {
        self.names.insert(name.to_string());
        let ip = ip.parse().expect("IPv4 literal");
        self.a.entry(name.to_string()).or_default().push(ip);
        self
    }

    fn aaaa(mut self, name: &str, ip: &str) -> Zone {
        self.names.insert(name.to_string());
        let ip = ip.parse().expect("IPv6 literal");
        self.aaaa.entry(name.to_string()).or_default().push(ip);
        self
    }

    fn mx(mut self, name: &str, exchange: &str) -> Zone {
        self.names.insert(name.to_string());
        self.mx
            .entry(name.to_string())
            .or_default()
            .push(exchange.to_string());
        self
    }

    fn ptr(mut self, ip: &str, name: &str) -> Zone {
        let ip = ip.parse().expect("IP literal");
        self.ptr.entry(ip).or_default().push(name.to_string());
        self
    }

    fn failing(mut self, name: &str, failure: TempFailure) -> Zone {
        self.failing.insert(name.to_string(), failure);
        self
    }

    fn lookup<T: Clone>(
        &self,
        qtype: &str,
        name: &str,
        map: &HashMap<String, Vec<T>>,
    ) -> Lookup<Vec<T>> {
        let name = name.to_ascii_lowercase();
        self.asked
            .lock()
            .expect("query log")
            .push(format!("{qtype} {name}"));
        if let Some(failure) = self.failing.get(&name) {
            return Lookup::TempError(*failure);
        }
        match map.get(&name) {
            Some(records) => Lookup::Found(records.clone()),
            None if self.names.contains(&name) => Lookup::NoData,
            None => Lookup::NxDomain,
        }
    }

    fn asked(&self) -> Vec<String> {
        self.asked.lock().expect("query log").clone()
    }

    fn asked_of(&self, qtype: &str) -> usize {
        self.asked()
            .iter()
            .filter(|q| q.starts_with(&format!("{qtype} ")))
            .count()
    }
}

impl SpfDns for Zone {
    fn txt(&self, name: &str) -> impl Future<Output = Lookup<Vec<String>>> + Send {
        std::future::ready(self.lookup("TXT", name, &self.txt))
    }

    fn a(&self, name: &str) -> impl Future<Output = Lookup<Vec<Ipv4Addr>>> + Send {
        std::future::ready(self.lookup("A", name, &self.a))
    }

    fn aaaa(&self, name: &str) -> impl Future<Output = Lookup<Vec<Ipv6Addr>>> + Send {
        std::future::ready(self.lookup("AAAA", name, &self.aaaa))
    }

    fn mx(&self, name: &str) -> impl Future<Output = Lookup<Vec<String>>> + Send {
        std::future::ready(self.lookup("MX", name, &self.mx))
    }

    fn ptr(&self, ip: IpAddr) -> impl Future<Output = Lookup<Vec<String>>> + Send {
        self.asked
            .lock()
            .expect("query log")
            .push(format!("PTR {ip}"));
        if let Some(failure) = self.failing.get(&ip.to_string()) {
            return std::future::ready(Lookup::TempError(*failure));
        }
        let found = match self.ptr.get(&ip) {
            Some(names) => Lookup::Found(names.clone()),
            None => Lookup::NxDomain,
        };
        std::future::ready(found)
    }
}

/// `check_helo` run to completion (the in-memory zone never waits).
fn check(zone: &Zone, ip: &str, helo: &str) -> SpfOutcome {
    let ip: IpAddr = ip.parse().expect("IP literal");
    tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime")
        .block_on(check_helo(zone, ip, helo, "mx.heloguard.test"))
}

fn outcome(result: SpfResult, why: &str) -> SpfOutcome {
    SpfOutcome {
        result,
        why: why.to_string(),
    }
}

const HELO: &str = "mail.example.com";

/// A zone where HELO's record is `record`.
fn helo_record(record: &str) -> Zone {
    Zone::new().txt(HELO, record)
}

#[test]
fn each_qualifier_gives_its_result() {
    for (record, result, why) in [
        (
            "v=spf1 ip4:192.0.2.0/24 -all",
            SpfResult::Pass,
            "ip4:192.0.2.0/24",
        ),
        (
            "v=spf1 +ip4:192.0.2.3 -all",
            SpfResult::Pass,
            "+ip4:192.0.2.3",
        ),
        ("v=spf1 ip4:198.51.100.0/24 -all", SpfResult::Fail, "-all"),
        (
            "v=spf1 ip4:198.51.100.0/24 ~all",
            SpfResult::SoftFail,
            "~all",
        ),
        (
            "v=spf1 ip4:198.51.100.0/24 ?all",
            SpfResult::Neutral,
            "?all",
        ),
        (
            "v=spf1 -ip4:192.0.2.3 +all",
            SpfResult::Fail,
            "-ip4:192.0.2.3",
        ),
        (
            "v=spf1 ~ip4:192.0.2.0/24 -all",
            SpfResult::SoftFail,
            "~ip4:192.0.2.0/24",
        ),
        (
            "V=SPF1 IP4:192.0.2.3 -ALL",
            SpfResult::Pass,
            "IP4:192.0.2.3",
        ),
    ] {
        assert_eq!(
            check(&helo_record(record), "192.0.2.3", HELO),
            outcome(result, why),
            "{record}"
        );
    }
}

#[test]
fn nothing_matching_and_no_redirect_is_neutral() {
    let zone = helo_record("v=spf1 ip4:198.51.100.1");
    assert_eq!(
        check(&zone, "192.0.2.3", HELO),
        outcome(SpfResult::Neutral, "no mechanism matched")
    );
    let empty = helo_record("v=spf1");
    assert_eq!(check(&empty, "192.0.2.3", HELO).result, SpfResult::Neutral);
}

#[test]
fn no_record_is_none() {
    let none = outcome(SpfResult::None, "no SPF record");
    assert_eq!(check(&Zone::new(), "192.0.2.3", HELO), none);
    let other_txt = helo_record("google-site-verification=abc");
    assert_eq!(check(&other_txt, "192.0.2.3", HELO), none);
    let nodata = Zone::new().a(HELO, "192.0.2.3");
    assert_eq!(check(&nodata, "192.0.2.3", HELO), none);
    // A record of another version is not ours (RFC 7208 4.5).
    let spf10 = helo_record("v=spf10 +all");
    assert_eq!(check(&spf10, "192.0.2.3", HELO), none);
    let spf2 = helo_record("spf2.0/pra +all");
    assert_eq!(check(&spf2, "192.0.2.3", HELO), none);
}

#[test]
fn a_malformed_or_single_label_helo_is_none() {
    let zone = Zone::new().txt("localhost", "v=spf1 +all");
    assert_eq!(
        check(&zone, "192.0.2.3", "localhost").result,
        SpfResult::None
    );
    let label = "a".repeat(64);
    assert_eq!(
        check(&zone, "192.0.2.3", &format!("{label}.example.com")).result,
        SpfResult::None
    );
    assert_eq!(
        check(&zone, "192.0.2.3", "a..example.com").result,
        SpfResult::None
    );
    assert!(zone.asked().is_empty(), "{:?}", zone.asked());
}

#[test]
fn a_trailing_dot_on_the_helo_name_is_the_same_name() {
    let zone = helo_record("v=spf1 ip4:192.0.2.3 -all");
    assert_eq!(
        check(&zone, "192.0.2.3", "mail.example.com.").result,
        SpfResult::Pass
    );
}

#[test]
fn dns_errors_are_temperror() {
    let txt = Zone::new().failing(HELO, TempFailure::ServFail);
    assert_eq!(
        check(&txt, "192.0.2.3", HELO),
        outcome(
            SpfResult::TempError,
            "DNS server failure looking up TXT mail.example.com"
        )
    );
    let a = helo_record("v=spf1 a:slow.example.com -all")
        .failing("slow.example.com", TempFailure::Timeout);
    assert_eq!(
        check(&a, "192.0.2.3", HELO),
        outcome(
            SpfResult::TempError,
            "DNS timeout looking up A slow.example.com"
        )
    );
    let aaaa = helo_record("v=spf1 a:slow.example.com -all")
        .failing("slow.example.com", TempFailure::Refused);
    assert_eq!(
        check(&aaaa, "2001:db8::1", HELO),
        outcome(
            SpfResult::TempError,
            "DNS refusal looking up AAAA slow.example.com"
        )
    );
    let mx = helo_record("v=spf1 mx -all").failing(HELO, TempFailure::Other);
    // The TXT lookup of the same name fails first.
    assert_eq!(check(&mx, "192.0.2.3", HELO).result, SpfResult::TempError);
    let mx_host = helo_record("v=spf1 mx -all")
        .mx(HELO, "mx1.example.com")
        .failing("mx1.example.com", TempFailure::Timeout);
    assert_eq!(
        check(&mx_host, "192.0.2.3", HELO),
        outcome(
            SpfResult::TempError,
            "DNS timeout looking up A mx1.example.com"
        )
    );
    let exists = helo_record("v=spf1 exists:x.example.com -all")
        .failing("x.example.com", TempFailure::ServFail);
    assert_eq!(
        check(&exists, "192.0.2.3", HELO).result,
        SpfResult::TempError
    );
}

#[test]
fn an_earlier_match_stops_before_a_later_dns_error() {
    let zone = helo_record("v=spf1 ip4:192.0.2.3 a:slow.example.com -all")
        .failing("slow.example.com", TempFailure::Timeout);
    assert_eq!(check(&zone, "192.0.2.3", HELO).result, SpfResult::Pass);
    assert_eq!(zone.asked(), ["TXT mail.example.com"]);
}

#[test]
fn a_syntax_error_anywhere_is_permerror() {
    for (record, at) in [
        ("v=spf1 a:1.2.3.4 -all", "a:1.2.3.4"),
        // RFC 7208 4.6: even after a mechanism that would match.
        ("v=spf1 +all foo", "foo"),
        ("v=spf1 ip4:192.0.2.3/33 -all", "ip4:192.0.2.3/33"),
        (
            "v=spf1 -all redirect=a.example.com redirect=b.example.com",
            "redirect=b.example.com",
        ),
        ("v=spf1 exists:%{x}.example.com", "exists:%{x}.example.com"),
    ] {
        assert_eq!(
            check(&helo_record(record), "192.0.2.3", HELO),
            outcome(SpfResult::PermError, &format!("syntax error at {at:?}")),
            "{record}"
        );
    }
}

#[test]
fn two_records_are_permerror() {
    let zone = helo_record("v=spf1 +all").txt(HELO, "v=spf1 -all");
    assert_eq!(
        check(&zone, "192.0.2.3", HELO),
        outcome(
            SpfResult::PermError,
            "more than one SPF record at mail.example.com"
        )
    );
    // Other TXT records beside the one SPF record do not count.
    let one = helo_record("v=spf1 -all").txt(HELO, "v=DMARC1; p=none");
    assert_eq!(check(&one, "192.0.2.3", HELO).result, SpfResult::Fail);
}

#[test]
fn an_include_loop_is_permerror_at_the_lookup_limit() {
    let zone = helo_record("v=spf1 include:mail.example.com -all");
    assert_eq!(
        check(&zone, "192.0.2.3", HELO),
        outcome(SpfResult::PermError, "too many DNS lookups")
    );
    // The record itself, then ten includes; the eleventh is refused before its query.
    assert_eq!(zone.asked_of("TXT"), 11);
}

#[test]
fn a_redirect_loop_is_permerror() {
    let zone = helo_record("v=spf1 redirect=b.example.com")
        .txt("b.example.com", "v=spf1 redirect=mail.example.com");
    assert_eq!(
        check(&zone, "192.0.2.3", HELO),
        outcome(SpfResult::PermError, "too many DNS lookups")
    );
}

#[test]
fn ten_dns_terms_are_allowed_and_the_eleventh_is_permerror() {
    let hosts = |n: usize| -> String {
        (1..=n)
            .map(|i| format!("a:h{i}.example.com"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let mut zone10 = helo_record(&format!("v=spf1 {} -all", hosts(10)));
    let mut zone11 = helo_record(&format!("v=spf1 {} -all", hosts(11)));
    for i in 1..=11 {
        zone10 = zone10.a(&format!("h{i}.example.com"), "198.51.100.1");
        zone11 = zone11.a(&format!("h{i}.example.com"), "198.51.100.1");
    }
    assert_eq!(
        check(&zone10, "192.0.2.3", HELO),
        outcome(SpfResult::Fail, "-all")
    );
    assert_eq!(
        check(&zone11, "192.0.2.3", HELO),
        outcome(SpfResult::PermError, "too many DNS lookups")
    );
    assert_eq!(zone11.asked_of("A"), 10);
}

#[test]
fn every_dns_term_counts_toward_the_limit() {
    // include, a, mx and ptr three times: ten terms that match nothing; the redirect is the
    // eleventh.
    let zone = helo_record(
        "v=spf1 include:i.example.com a mx ptr a mx ptr a mx ptr redirect=r.example.com",
    )
    .txt("i.example.com", "v=spf1 -ip4:198.51.100.2")
    .a(HELO, "198.51.100.3")
    .mx(HELO, "mx.example.com")
    .a("mx.example.com", "198.51.100.4")
    .ptr("192.0.2.3", "other.example.net")
    .a("other.example.net", "192.0.2.3")
    .txt("r.example.com", "v=spf1 -all");
    assert_eq!(
        check(&zone, "192.0.2.3", HELO),
        outcome(SpfResult::PermError, "too many DNS lookups")
    );
    // exists counts as well.
    let exists = helo_record(&format!(
        "v=spf1 {} -all",
        ["exists:e.example.com"; 11].join(" ")
    ))
    .a("e.example.com", "127.0.0.2");
    assert_eq!(check(&exists, "192.0.2.3", HELO).result, SpfResult::Pass);
    let negated = helo_record(&format!(
        "v=spf1 {} -all",
        ["-exists:n.example.com"; 11].join(" ")
    ))
    .a("e.example.com", "127.0.0.2")
    .txt("n.example.com", "not an address");
    assert_eq!(
        check(&negated, "192.0.2.3", HELO).why,
        "too many void DNS lookups"
    );
    // ip4, ip6 and all query nothing and count nothing.
    let free = helo_record(&format!(
        "v=spf1 {} {} -all",
        ["a"; 10].join(" "),
        ["ip4:198.51.100.9 ip6:2001:db8::9"; 5].join(" ")
    ))
    .a(HELO, "198.51.100.3");
    assert_eq!(
        check(&free, "192.0.2.3", HELO),
        outcome(SpfResult::Fail, "-all")
    );
}

#[test]
fn a_third_void_lookup_is_permerror() {
    let two = helo_record("v=spf1 a:n1.example.com mx:n2.example.com -all");
    assert_eq!(
        check(&two, "192.0.2.3", HELO),
        outcome(SpfResult::Fail, "-all")
    );
    let three = helo_record("v=spf1 a:n1.example.com mx:n2.example.com exists:n3.example.com -all");
    assert_eq!(
        check(&three, "192.0.2.3", HELO),
        outcome(SpfResult::PermError, "too many void DNS lookups")
    );
    // NODATA is void as NXDOMAIN is.
    let nodata = helo_record("v=spf1 a a a -all").txt(HELO, "not spf");
    assert_eq!(
        check(&nodata, "192.0.2.3", HELO),
        outcome(SpfResult::PermError, "too many void DNS lookups")
    );
    // A void PTR counts too.
    let ptr = helo_record("v=spf1 ptr ptr ptr -all");
    assert_eq!(
        check(&ptr, "192.0.2.3", HELO).why,
        "too many void DNS lookups"
    );
}

#[test]
fn a_mechanism_with_its_cidr_lengths() {
    let zone = helo_record("v=spf1 a -all").a(HELO, "192.0.2.3");
    assert_eq!(
        check(&zone, "192.0.2.3", HELO),
        outcome(SpfResult::Pass, "a")
    );
    assert_eq!(check(&zone, "192.0.2.4", HELO).result, SpfResult::Fail);

    let cidr = helo_record("v=spf1 a/24 -all").a(HELO, "192.0.2.200");
    assert_eq!(check(&cidr, "192.0.2.3", HELO).result, SpfResult::Pass);
    assert_eq!(check(&cidr, "192.0.3.3", HELO).result, SpfResult::Fail);

    let other = helo_record("v=spf1 a:web.example.com/24//64 -all")
        .a("web.example.com", "192.0.2.1")
        .aaaa("web.example.com", "2001:db8:1:2::1");
    assert_eq!(check(&other, "192.0.2.3", HELO).result, SpfResult::Pass);
    assert_eq!(
        check(&other, "2001:db8:1:2::ff", HELO).result,
        SpfResult::Pass
    );
    assert_eq!(
        check(&other, "2001:db8:1:3::1", HELO).result,
        SpfResult::Fail
    );

    // The client's family only: an IPv6 client never asks A.
    let v6 = helo_record("v=spf1 a -all").aaaa(HELO, "2001:db8::1");
    assert_eq!(check(&v6, "2001:db8::1", HELO).result, SpfResult::Pass);
    assert!(!v6.asked().iter().any(|q| q.starts_with("A ")));
}

#[test]
fn an_ipv4_mapped_client_is_its_ipv4_address() {
    let zone = helo_record("v=spf1 ip4:192.0.2.3 -all");
    assert_eq!(
        check(&zone, "::ffff:192.0.2.3", HELO).result,
        SpfResult::Pass
    );
    let a = helo_record("v=spf1 a -all").a(HELO, "192.0.2.3");
    assert_eq!(check(&a, "::ffff:192.0.2.3", HELO).result, SpfResult::Pass);
}

#[test]
fn ip_mechanisms_match_only_their_family() {
    let zone = helo_record("v=spf1 ip6:2001:db8::/32 ip4:0.0.0.0/0 -all");
    assert_eq!(
        check(&zone, "2001:db8:ffff::1", HELO),
        outcome(SpfResult::Pass, "ip6:2001:db8::/32")
    );
    assert_eq!(
        check(&zone, "2001:db9::1", HELO),
        outcome(SpfResult::Fail, "-all")
    );
    assert_eq!(
        check(&zone, "203.0.113.9", HELO),
        outcome(SpfResult::Pass, "ip4:0.0.0.0/0")
    );
    let exact = helo_record("v=spf1 ip6:2001:db8::1 -all");
    assert_eq!(check(&exact, "2001:db8::1", HELO).result, SpfResult::Pass);
    assert_eq!(check(&exact, "2001:db8::2", HELO).result, SpfResult::Fail);
}

#[test]
fn mx_mechanism() {
    let zone = helo_record("v=spf1 mx -all")
        .mx(HELO, "mx1.example.com")
        .mx(HELO, "mx2.example.com")
        .a("mx1.example.com", "198.51.100.1")
        .a("mx2.example.com", "192.0.2.3");
    assert_eq!(
        check(&zone, "192.0.2.3", HELO),
        outcome(SpfResult::Pass, "mx")
    );
    assert_eq!(check(&zone, "192.0.2.4", HELO).result, SpfResult::Fail);

    let cidr = helo_record("v=spf1 mx:example.net/24 -all")
        .mx("example.net", "mx.example.net")
        .a("mx.example.net", "192.0.2.99");
    assert_eq!(check(&cidr, "192.0.2.3", HELO).result, SpfResult::Pass);

    // An MX name without addresses is skipped (not void, not an error).
    let gone = helo_record("v=spf1 mx -all")
        .mx(HELO, "gone.example.com")
        .mx(HELO, "mx2.example.com")
        .a("mx2.example.com", "192.0.2.3");
    assert_eq!(check(&gone, "192.0.2.3", HELO).result, SpfResult::Pass);

    // The null MX names no host.
    let null = helo_record("v=spf1 mx -all").mx(HELO, "");
    assert_eq!(check(&null, "192.0.2.3", HELO).result, SpfResult::Fail);
    assert_eq!(null.asked_of("A"), 0);
}

#[test]
fn more_than_ten_mx_names_is_permerror() {
    let mut ten = helo_record("v=spf1 mx -all");
    let mut eleven = helo_record("v=spf1 mx -all");
    for i in 1..=11 {
        let name = format!("mx{i}.example.com");
        if i <= 10 {
            ten = ten.mx(HELO, &name).a(&name, "198.51.100.1");
        }
        eleven = eleven.mx(HELO, &name).a(&name, "198.51.100.1");
    }
    assert_eq!(check(&ten, "192.0.2.3", HELO).result, SpfResult::Fail);
    assert_eq!(
        check(&eleven, "192.0.2.3", HELO),
        outcome(
            SpfResult::PermError,
            "more than 10 MX names at mail.example.com"
        )
    );
    assert_eq!(eleven.asked_of("A"), 0);
}

#[test]
fn ptr_mechanism_needs_a_validated_name_within_the_target() {
    let base = || {
        helo_record("v=spf1 ptr -all")
            .ptr("192.0.2.3", "host.mail.example.com")
            .ptr("192.0.2.3", "other.example.org")
    };
    // Confirmed and under the HELO domain.
    let zone = base()
        .a("host.mail.example.com", "192.0.2.3")
        .a("other.example.org", "192.0.2.3");
    assert_eq!(
        check(&zone, "192.0.2.3", HELO),
        outcome(SpfResult::Pass, "ptr")
    );
    // Under the domain but not confirmed: no match.
    let unconfirmed = base()
        .a("host.mail.example.com", "198.51.100.1")
        .a("other.example.org", "192.0.2.3");
    assert_eq!(
        check(&unconfirmed, "192.0.2.3", HELO).result,
        SpfResult::Fail
    );
    // ptr:DOMAIN compares with that domain.
    let named = helo_record("v=spf1 ptr:example.org -all")
        .ptr("192.0.2.3", "other.example.org")
        .a("other.example.org", "192.0.2.3");
    assert_eq!(check(&named, "192.0.2.3", HELO).result, SpfResult::Pass);
    // "notexample.org" is not within "example.org".
    let lookalike = helo_record("v=spf1 ptr:example.org -all")
        .ptr("192.0.2.3", "notexample.org")
        .a("notexample.org", "192.0.2.3");
    assert_eq!(check(&lookalike, "192.0.2.3", HELO).result, SpfResult::Fail);
}

#[test]
fn a_ptr_lookup_error_fails_to_match() {
    // RFC 7208 5.5: a PTR error is no match (not temperror), and neither void.
    let zone = helo_record("v=spf1 ptr ptr ptr ip4:192.0.2.3 -all")
        .failing("192.0.2.3", TempFailure::Timeout);
    assert_eq!(
        check(&zone, "192.0.2.3", HELO),
        outcome(SpfResult::Pass, "ip4:192.0.2.3")
    );
    // An address lookup error skips that name; the next one may still confirm.
    let skipped = helo_record("v=spf1 ptr -all")
        .ptr("192.0.2.3", "slow.mail.example.com")
        .ptr("192.0.2.3", "host.mail.example.com")
        .failing("slow.mail.example.com", TempFailure::ServFail)
        .a("host.mail.example.com", "192.0.2.3");
    assert_eq!(
        check(&skipped, "192.0.2.3", HELO),
        outcome(SpfResult::Pass, "ptr")
    );
}

#[test]
fn ptr_looks_up_at_most_ten_names() {
    let mut zone = helo_record("v=spf1 ptr -all");
    for i in 1..=12 {
        let name = format!("h{i}.mail.example.com");
        zone = zone.ptr("192.0.2.3", &name).a(&name, "198.51.100.1");
    }
    // The twelfth would match, but it is past the tenth name.
    let zone = zone.a("h12.mail.example.com", "192.0.2.3");
    assert_eq!(check(&zone, "192.0.2.3", HELO).result, SpfResult::Fail);
    assert_eq!(zone.asked_of("A"), 10);
}

#[test]
fn exists_mechanism_asks_a_even_for_ipv6() {
    let zone = helo_record("v=spf1 exists:%{ir}.%{v}._spf.%{d} -all")
        .a("3.2.0.192.in-addr._spf.mail.example.com", "127.0.0.2");
    assert_eq!(
        check(&zone, "192.0.2.3", HELO),
        outcome(SpfResult::Pass, "exists:%{ir}.%{v}._spf.%{d}")
    );
    assert_eq!(check(&zone, "192.0.2.4", HELO).result, SpfResult::Fail);

    let v6 = helo_record("v=spf1 exists:x.example.com -all").a("x.example.com", "127.0.0.2");
    assert_eq!(check(&v6, "2001:db8::1", HELO).result, SpfResult::Pass);
    assert_eq!(v6.asked(), ["TXT mail.example.com", "A x.example.com"]);
}

#[test]
fn include_matches_on_pass_only() {
    let inner = |record: &str| {
        helo_record("v=spf1 include:_spf.example.net ?all").txt("_spf.example.net", record)
    };
    assert_eq!(
        check(&inner("v=spf1 ip4:192.0.2.3 -all"), "192.0.2.3", HELO),
        outcome(SpfResult::Pass, "include:_spf.example.net")
    );
    // fail, softfail and neutral in the included record are "no match" here.
    for record in ["v=spf1 -all", "v=spf1 ~all", "v=spf1 ?all", "v=spf1"] {
        assert_eq!(
            check(&inner(record), "192.0.2.3", HELO),
            outcome(SpfResult::Neutral, "?all"),
            "{record}"
        );
    }
    // A qualifier on the include applies to its match.
    let negated =
        helo_record("v=spf1 -include:_spf.example.net +all").txt("_spf.example.net", "v=spf1 +all");
    assert_eq!(
        check(&negated, "192.0.2.3", HELO),
        outcome(SpfResult::Fail, "-include:_spf.example.net")
    );
}

#[test]
fn include_errors_propagate_and_none_is_permerror() {
    let temp = helo_record("v=spf1 include:_spf.example.net +all")
        .failing("_spf.example.net", TempFailure::ServFail);
    assert_eq!(
        check(&temp, "192.0.2.3", HELO),
        outcome(
            SpfResult::TempError,
            "DNS server failure looking up TXT _spf.example.net"
        )
    );
    let perm =
        helo_record("v=spf1 include:_spf.example.net +all").txt("_spf.example.net", "v=spf1 bogus");
    assert_eq!(
        check(&perm, "192.0.2.3", HELO),
        outcome(SpfResult::PermError, "syntax error at \"bogus\"")
    );
    let none = helo_record("v=spf1 include:_spf.example.net +all");
    assert_eq!(
        check(&none, "192.0.2.3", HELO),
        outcome(
            SpfResult::PermError,
            "include:_spf.example.net: no SPF record"
        )
    );
}

#[test]
fn include_evaluates_macros_against_the_included_domain() {
    // RFC 7208 5.2: <domain> becomes the target; %{d} inside the include is that.
    let zone = helo_record("v=spf1 include:_spf.example.net -all")
        .txt(
            "_spf.example.net",
            "v=spf1 exists:%{d}.check.example.org -all",
        )
        .a("_spf.example.net.check.example.org", "127.0.0.2");
    assert_eq!(check(&zone, "192.0.2.3", HELO).result, SpfResult::Pass);
}

#[test]
fn redirect_applies_when_nothing_matched() {
    let zone = helo_record("v=spf1 ip4:198.51.100.1 redirect=_spf.example.net")
        .txt("_spf.example.net", "v=spf1 ip4:192.0.2.0/24 -all");
    assert_eq!(
        check(&zone, "192.0.2.3", HELO),
        outcome(SpfResult::Pass, "ip4:192.0.2.0/24")
    );
    assert_eq!(
        check(&zone, "203.0.113.1", HELO),
        outcome(SpfResult::Fail, "-all")
    );
    // A match before it wins, and the redirect is not looked up.
    let matched = helo_record("v=spf1 ip4:192.0.2.3 redirect=_spf.example.net");
    assert_eq!(check(&matched, "192.0.2.3", HELO).result, SpfResult::Pass);
    assert_eq!(matched.asked_of("TXT"), 1);
}

#[test]
fn redirect_is_ignored_with_all() {
    let zone =
        helo_record("v=spf1 redirect=_spf.example.net ~all").txt("_spf.example.net", "v=spf1 +all");
    assert_eq!(
        check(&zone, "192.0.2.3", HELO),
        outcome(SpfResult::SoftFail, "~all")
    );
    assert_eq!(zone.asked_of("TXT"), 1);
}

#[test]
fn redirect_to_no_record_is_permerror() {
    let zone = helo_record("v=spf1 redirect=_spf.example.net");
    assert_eq!(
        check(&zone, "192.0.2.3", HELO),
        outcome(
            SpfResult::PermError,
            "redirect=_spf.example.net: no SPF record"
        )
    );
    let errors = helo_record("v=spf1 redirect=_spf.example.net")
        .failing("_spf.example.net", TempFailure::Timeout);
    assert_eq!(
        check(&errors, "192.0.2.3", HELO).result,
        SpfResult::TempError
    );
}

#[test]
fn exp_and_unknown_modifiers_do_not_change_the_result() {
    let zone = helo_record("v=spf1 -all exp=explain.example.com x-tag=%{d}.whatever")
        .txt("explain.example.com", "You are not %{s}");
    let got = check(&zone, "192.0.2.3", HELO);
    assert_eq!(got, outcome(SpfResult::Fail, "-all"));
    // The explanation is never fetched.
    assert_eq!(zone.asked(), ["TXT mail.example.com"]);
}

#[test]
fn macros_see_the_helo_identity() {
    // RFC 7208 2.3: the HELO identity is postmaster@NAME; %{h} is the name too.
    let zone = helo_record("v=spf1 exists:%{l}.%{o}.%{h}.%{d2}.%{s}.x.example -all")
        .a(
            "postmaster.mail.example.com.mail.example.com.example.com.postmaster@mail.example.com.x.example",
            "127.0.0.2",
        );
    assert_eq!(check(&zone, "192.0.2.3", HELO).result, SpfResult::Pass);
}

#[test]
fn the_p_macro_uses_the_validated_name() {
    let zone = helo_record("v=spf1 exists:%{p}.allow.example -all")
        .ptr("192.0.2.3", "unconfirmed.example.net")
        .ptr("192.0.2.3", "host.example.net")
        .a("host.example.net", "192.0.2.3")
        .a("host.example.net.allow.example", "127.0.0.2");
    assert_eq!(check(&zone, "192.0.2.3", HELO).result, SpfResult::Pass);
    // Without a validated name it expands to "unknown".
    let unknown = helo_record("v=spf1 exists:%{p}.allow.example -all")
        .a("unknown.allow.example", "127.0.0.2");
    assert_eq!(check(&unknown, "192.0.2.3", HELO).result, SpfResult::Pass);
    // Prefer the domain itself, then a subdomain of it.
    let preferred = helo_record("v=spf1 exists:%{p}.allow.example -all")
        .ptr("192.0.2.3", "other.example.net")
        .ptr("192.0.2.3", "x.mail.example.com")
        .a("other.example.net", "192.0.2.3")
        .a("x.mail.example.com", "192.0.2.3")
        .a("x.mail.example.com.allow.example", "127.0.0.2");
    assert_eq!(check(&preferred, "192.0.2.3", HELO).result, SpfResult::Pass);
}

#[test]
fn an_overlong_expansion_loses_labels_on_the_left() {
    // %{l} repeated makes a name over 253 characters; the right labels stay.
    let spec = ["%{l}"; 40].join(".");
    let zone = helo_record(&format!("v=spf1 exists:{spec}.allow.example -all"));
    let got = check(&zone, "192.0.2.3", HELO);
    assert_eq!(got.result, SpfResult::Fail);
    let asked = zone.asked();
    let name = asked[1].strip_prefix("A ").expect("an A query");
    assert!(name.len() <= 253, "{name}");
    assert!(name.ends_with("postmaster.allow.example"), "{name}");
    assert!(name.starts_with("postmaster."), "{name}");
}

#[test]
fn the_evaluation_is_send() {
    fn is_send<T: Send>(_: &T) {}
    let zone = Zone::new();
    let ip: IpAddr = "192.0.2.3".parse().expect("literal");
    let fut = check_helo(&zone, ip, HELO, "mx.heloguard.test");
    is_send(&fut);
}

#[test]
fn out_of_time_is_temperror() {
    assert_eq!(
        out_of_time(Duration::from_millis(1500)),
        outcome(SpfResult::TempError, "no SPF result within 1500 ms")
    );
}

#[test]
fn the_p_macro_lookup_counts_as_a_dns_term_once() {
    let nine = ["a"; 9].join(" ");
    let without_p =
        helo_record(&format!("v=spf1 {nine} exists:%{{d}}.x.example -all")).a(HELO, "198.51.100.1");
    assert_eq!(check(&without_p, "192.0.2.3", HELO).why, "-all");
    let with_p =
        helo_record(&format!("v=spf1 {nine} exists:%{{p}}.x.example -all")).a(HELO, "198.51.100.1");
    assert_eq!(
        check(&with_p, "192.0.2.3", HELO),
        outcome(SpfResult::PermError, "too many DNS lookups")
    );
    // Asked once however many macros use it.
    let twice = helo_record("v=spf1 exists:%{p}.x.example exists:%{p}.y.example -all")
        .ptr("192.0.2.3", "host.example.net")
        .a("host.example.net", "192.0.2.3")
        .a("host.example.net.y.example", "127.0.0.2");
    assert_eq!(check(&twice, "192.0.2.3", HELO).result, SpfResult::Pass);
    assert_eq!(twice.asked_of("PTR"), 1);
}

#[test]
fn an_include_or_redirect_to_a_malformed_name_is_permerror() {
    let include = helo_record("v=spf1 include:%{d}x..%{d} -all");
    assert_eq!(
        check(&include, "192.0.2.3", HELO),
        outcome(
            SpfResult::PermError,
            "include:%{d}x..%{d}: malformed domain"
        )
    );
    // A single-label target has no policy (RFC 7208 4.3), so the redirect is permerror.
    let redirect = helo_record("v=spf1 redirect=%{d1}");
    assert_eq!(
        check(&redirect, "192.0.2.3", HELO),
        outcome(
            SpfResult::PermError,
            "redirect=%{d1}: malformed domain \"com\""
        )
    );
}

#[test]
fn lookups_inside_an_include_count_toward_the_same_limit() {
    // a, include, then eight a's inside: ten terms; the ip4 after them still decides.
    let inner = ["a"; 8].join(" ");
    let at_limit = helo_record("v=spf1 a include:inc.example.com ip4:192.0.2.3 -all")
        .a(HELO, "198.51.100.1")
        .txt("inc.example.com", &format!("v=spf1 {inner}"))
        .a("inc.example.com", "198.51.100.2");
    assert_eq!(
        check(&at_limit, "192.0.2.3", HELO),
        outcome(SpfResult::Pass, "ip4:192.0.2.3")
    );
    // One more `a` after the include is the eleventh.
    let over = helo_record("v=spf1 a include:inc.example.com a ip4:192.0.2.3 -all")
        .a(HELO, "198.51.100.1")
        .txt("inc.example.com", &format!("v=spf1 {inner}"))
        .a("inc.example.com", "198.51.100.2");
    assert_eq!(
        check(&over, "192.0.2.3", HELO),
        outcome(SpfResult::PermError, "too many DNS lookups")
    );
}

#[test]
fn a_redirect_changes_the_implicit_domain() {
    let zone = helo_record("v=spf1 redirect=target.example.com")
        .a(HELO, "192.0.2.1")
        .txt("target.example.com", "v=spf1 a -all")
        .a("target.example.com", "192.0.2.2");
    assert_eq!(
        check(&zone, "192.0.2.2", HELO),
        outcome(SpfResult::Pass, "a")
    );
    assert_eq!(check(&zone, "192.0.2.1", HELO).result, SpfResult::Fail);
}

#[test]
fn eleven_mx_records_are_too_many_even_for_one_name() {
    let mut zone = helo_record("v=spf1 mx").a("mx.example.com", "192.0.2.3");
    for _ in 0..11 {
        zone = zone.mx(HELO, "mx.example.com");
    }
    assert_eq!(check(&zone, "192.0.2.3", HELO).result, SpfResult::PermError);
}

#[test]
fn the_helo_macro_in_an_include_of_a_negated_policy() {
    // A policy that requires the HELO name to resolve to the client: -include of a record
    // that passes unless %{h} has the client's address.
    let zone = helo_record("v=spf1 -include:_spfh.%{d2} ip4:192.0.2.0/24 -all")
        .txt("_spfh.example.com", "v=spf1 -a:%{h} +all");
    assert_eq!(
        check(&zone, "192.0.2.3", HELO),
        outcome(SpfResult::Fail, "-include:_spfh.%{d2}")
    );
    let resolving = helo_record("v=spf1 -include:_spfh.%{d2} ip4:192.0.2.0/24 -all")
        .txt("_spfh.example.com", "v=spf1 -a:%{h} +all")
        .a(HELO, "192.0.2.3");
    assert_eq!(
        check(&resolving, "192.0.2.3", HELO),
        outcome(SpfResult::Pass, "ip4:192.0.2.0/24")
    );
}

#[test]
fn more_syntax_errors_from_real_records() {
    for record in [
        "v=spf1 -all.",
        "v=spf1 -all:foobar",
        "v=spf1 -all/8",
        "v=spf1 ptr/0 -all",
        "v=spf1 a/24/64 -all",
        "v=spf1 ip4:192.0.2.3/032 -all",
        "v=spf1 ip4:192.0.2.3:8080",
        "v=spf1 ip6::CAFE::BABE",
        "v=spf1 ip6:::1.1.1.1//33",
        "v=spf1 a:example.com:8080",
        "v=spf1 a:museum.",
        "v=spf1 a:example.-com",
        "v=spf1 include:ip5.example.com/24 -all",
        "v=spf1 exists:mail.example.com/24",
        "v=spf1 ip4:192.0.2.3 redirect:t2.example.com",
        "v=spf1 moo.cow/far_out=man:dog/cat ip4:192.0.2.3 -all",
        "v=spf1 1up=foo",
        "v=spf1 =all",
        "v=spf1 -all foo=%abc",
        "v=spf1 exp= -all",
        "v=spf1 ?all redirect=",
        "v=spf1 a:ctrl.example.com\rptr -all",
        "v=spf1 \u{80}a:example.net -all",
    ] {
        assert_eq!(
            check(&helo_record(record), "192.0.2.3", HELO).result,
            SpfResult::PermError,
            "{record:?}"
        );
    }
    // And what is not an error: a modifier name with dots, dashes and underscores, two
    // spaces, any visible character in a domain-spec, a dashed top label.
    for record in [
        "v=spf1 moo.cow-far_out=man:dog/cat ip4:192.0.2.3 -all",
        "v=spf1 ip4:192.0.2.3  -all",
        "v=spf1 a:foo:bar/baz.example.com ip4:192.0.2.3",
        "v=spf1 a:foo.example.xn--zckzah ip4:192.0.2.3",
        "v=spf1 default=+ ip4:192.0.2.3",
    ] {
        assert_eq!(
            check(&helo_record(record), "192.0.2.3", HELO).result,
            SpfResult::Pass,
            "{record:?}"
        );
    }
}

proptest! {
    #[test]
    fn any_record_gives_some_result_without_panicking(
        text in "[ -~]{0,120}",
        ip6 in any::<bool>(),
    ) {
        let zone = helo_record(&format!("v=spf1 {text}"))
            .a(HELO, "192.0.2.3")
            .mx(HELO, "mx.example.com")
            .a("mx.example.com", "198.51.100.1")
            .ptr("192.0.2.3", "host.example.com")
            .a("host.example.com", "192.0.2.3");
        let ip = if ip6 { "2001:db8::1" } else { "192.0.2.3" };
        let got = check(&zone, ip, HELO);
        prop_assert!(!got.why.is_empty());
        // However hostile the record, the limits hold.
        prop_assert!(zone.asked().len() <= 1 + 10 * (1 + 10) + 1, "{:?}", zone.asked());
    }

    #[test]
    fn random_policies_stay_within_the_limits(
        terms in prop::collection::vec(prop::sample::select(vec![
            "a", "mx", "ptr", "-all", "?all", "ip4:192.0.2.0/24", "ip6:2001:db8::/32",
            "include:mail.example.com", "include:other.example.com", "a:nx.example.com",
            "exists:%{i}.x.example.com", "exists:%{p}.x.example.com", "-mx:other.example.com",
            "redirect=other.example.com",
        ]), 0..16),
        other in prop::collection::vec(prop::sample::select(vec![
            "a", "mx", "include:mail.example.com", "include:other.example.com",
            "redirect=mail.example.com", "ptr:example.com", "a:nx2.example.com",
        ]), 0..8),
        ip6 in any::<bool>(),
    ) {
        let dedup = |terms: Vec<&str>| {
            let mut redirect = false;
            terms
                .into_iter()
                .filter(|t| !t.starts_with("redirect=") || !std::mem::replace(&mut redirect, true))
                .collect::<Vec<_>>()
                .join(" ")
        };
        let mut zone = helo_record(&format!("v=spf1 {}", dedup(terms)))
            .txt("other.example.com", &format!("v=spf1 {}", dedup(other)))
            .a(HELO, "198.51.100.1")
            .aaaa(HELO, "2001:db8::1")
            .ptr("192.0.2.3", "host.example.com")
            .a("host.example.com", "192.0.2.3");
        for i in 0..10 {
            let name = format!("mx{i}.example.com");
            zone = zone.mx(HELO, &name).a(&name, "198.51.100.2");
        }
        zone = zone.mx("other.example.com", "mx0.example.com");
        let ip = if ip6 { "2001:db8::1" } else { "192.0.2.3" };
        let got = check(&zone, ip, HELO);
        prop_assert!(!got.why.is_empty());
        // The record's TXT, then one per include or redirect at most: ten.
        prop_assert!(zone.asked_of("TXT") <= 11, "{:?}", zone.asked());
        // Each of at most ten terms asks one name, or an MX and its ten names, or a PTR and
        // its names; %{p} once more.
        prop_assert!(zone.asked().len() <= 1 + 11 * 11, "{:?}", zone.asked());
        if got.result == SpfResult::PermError {
            prop_assert!(
                got.why == "too many DNS lookups"
                    || got.why == "too many void DNS lookups"
                    || got.why.ends_with("no SPF record"),
                "{:?}",
                got
            );
        }
    }
}
