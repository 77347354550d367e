//! The HELO checks end to end: the real binary behind a PROXY listener (so every session has
//! its own client IP; hickory answers PTR for 127/8 itself), a test DNS zone, and assertions on
//! the stored X-HELO-Check and Authentication-Results fields and on the reply codes.

mod common;

use std::net::IpAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use common::dns_server::{TestDns, TestZone, reverse_name};
use common::server::{Client, HOSTNAME, TestServer};
use hickory_proto::rr::RecordType;

/// The eleven checks, in header order.
const CHECKS: [&str; 15] = [
    "syntax",
    "bare_ip",
    "fqdn",
    "localhost",
    "own_name",
    "literal_match",
    "forward",
    "forward_match",
    "fcrdns",
    "rdns_match",
    "dynamic",
    "spf",
    "rhsbl",
    "dnsbl",
    "helo_churn",
];

/// Every check passes for a domain HELO (literal_match does not apply).
const ALL_PASS: &str = "pass pass pass pass pass none pass pass pass pass pass";

/// HELOGUARD_DNS_TIMEOUT_MS for most tests: the verdict is due 600 ms after EHLO.
const DNS_TIMEOUT_MS: &str = "300";

/// Bound for a verdict that waited on DNS: 2 x 300 ms with slack for a loaded machine, and
/// under the 4 s that the 2000 ms default timeout would give.
const VERDICT_BOUND: Duration = Duration::from_millis(2500);

fn ip(s: &str) -> IpAddr {
    s.parse().expect("test address")
}

/// `name` has `addr` as its A/AAAA record and is the PTR name of `addr`.
fn aligned(zone: TestZone, addr: &str, name: &str) -> TestZone {
    zone.addr(name, addr).ptr(addr, name)
}

/// One zone for every test; each case has its own client IP and its own names.
fn zone() -> TestZone {
    let z = TestZone::new();
    // syntax
    let z = aligned(z, "192.0.2.20", "syntax-ok.example.com");
    let z = aligned(z, "192.0.2.21", "syntax-bad.example.com");
    // bare_ip
    let z = aligned(z, "192.0.2.22", "bare-ok.example.com");
    let z = aligned(z, "192.0.2.23", "bare-bad.example.com");
    // fqdn: a single-label name that is also the PTR name, so only fqdn fails.
    let z = aligned(z, "192.0.2.24", "fqdn-ok.example.com");
    let z = aligned(z, "192.0.2.25", "mailhost");
    // localhost
    let z = aligned(z, "192.0.2.26", "lh-ok.example.com");
    let z = aligned(z, "192.0.2.27", "lh-bad.example.com").a("loopy.example.com", "127.0.0.1");
    let z = aligned(z, "192.0.2.28", "lh-lit.example.com");
    // own_name
    let z = aligned(z, "192.0.2.29", "own-ok.example.com");
    let z = aligned(z, "192.0.2.30", HOSTNAME);
    // literal_match
    let z = aligned(z, "192.0.2.31", "lit-ok.example.com");
    let z = aligned(z, "192.0.2.32", "lit-bad.example.com");
    let z = aligned(z, "2001:db8::5", "v6-ok.example.com");
    let z = aligned(z, "2001:db8::50", "v6-bad.example.com");
    // forward
    let z = aligned(z, "192.0.2.33", "fwd-ok.example.com");
    let z = aligned(z, "192.0.2.34", "fwd-nx.example.com");
    let z = aligned(z, "192.0.2.35", "fwd-nodata.example.com").nodata("nodata-helo.example.com");
    let z = aligned(z, "192.0.2.36", "fwd-sf.example.com").servfail("sf-helo.example.com");
    let z = aligned(z, "192.0.2.37", "fwd-bh.example.com").blackhole("bh-helo.example.com");
    let z = aligned(z, "192.0.2.38", "fwd-ref.example.com").refused("ref-helo.example.com");
    // forward_match
    let z = aligned(z, "192.0.2.39", "fm-ok.example.com");
    let z = aligned(z, "192.0.2.40", "fm-ptr.example.com").a("fm-bad.example.com", "192.0.2.99");
    let z = aligned(z, "2001:db8::6", "fm6.example.com");
    let z = aligned(z, "2001:db8::60", "fm6-bad.example.com");
    // fcrdns
    let z = aligned(z, "192.0.2.41", "fc-ok.example.com");
    let z = z
        .ptr("192.0.2.42", "unconf.example.com")
        .a("unconf.example.com", "192.0.2.99")
        .a("fc-bad.example.com", "192.0.2.42");
    let z = z.a("nptr.example.com", "192.0.2.43");
    let z = z
        .nodata(&reverse_name(ip("192.0.2.44")))
        .a("nodata-ptr.example.com", "192.0.2.44");
    let z = z
        .servfail_ptr("192.0.2.45")
        .a("sf-ptr.example.com", "192.0.2.45");
    let z = z
        .blackhole_ptr("192.0.2.46")
        .a("bh-ptr.example.com", "192.0.2.46");
    let z = z.aaaa("nptr6.example.com", "2001:db8::7");
    // PTR names whose own lookups fail, and a PTR set where only the second name confirms.
    let z = z
        .ptr("192.0.2.49", "silent-ptr.example.com")
        .blackhole("silent-ptr.example.com")
        .a("chain-bh.example.com", "192.0.2.49");
    let z = z
        .ptr("192.0.2.50", "wrong.example.org")
        .a("wrong.example.org", "192.0.2.99")
        .ptr("192.0.2.50", "right.example.com")
        .a("right.example.com", "192.0.2.50")
        .a("multi.example.com", "192.0.2.50");
    let z = z
        .ptr("192.0.2.51", "broken.example.org")
        .servfail("broken.example.org")
        .ptr("192.0.2.51", "fine.example.com")
        .a("fine.example.com", "192.0.2.51")
        .a("half.example.com", "192.0.2.51");
    // rdns_match
    let z = z
        .a("rd-ok.example.com", "192.0.2.47")
        .ptr("192.0.2.47", "out.example.com")
        .a("out.example.com", "192.0.2.47");
    let z = aligned(z, "192.0.2.48", "rd-ptr.example.net").a("rd-bad.example.org", "192.0.2.48");
    // dynamic
    let z = aligned(z, "198.51.100.10", "static.example.net");
    let z = aligned(z, "198.51.100.11", "dsl-198-51-100-11.pool.example.net")
        .a("smtp-eleven.example.net", "198.51.100.11");
    let z = aligned(z, "198.51.100.12", "static-twelve.example.net")
        .a("ppp-12.example.net", "198.51.100.12");
    // case and trailing dot
    let z = aligned(z, "203.0.113.10", "upper.example.com");
    // policies: `mailhost2` fails fqdn (and, tagged, rdns_match); its FQDN passes everything.
    let z = aligned(z, "203.0.113.20", "mailhost2.example.com").a("mailhost2", "203.0.113.20");
    let z = aligned(z, "203.0.113.21", "good-a.example.com");
    let z = aligned(z, "203.0.113.22", "pol-sf.example.com").servfail("sf-pol.example.com");
    let z = aligned(z, "203.0.113.23", "pol-bh.example.com").blackhole("bh-pol.example.com");
    let z = z
        .servfail_ptr("203.0.113.24")
        .a("sf-pol-ptr.example.com", "203.0.113.24");
    // allow list
    let z = aligned(z, "198.51.100.80", "relay.out.example.test");
    let z = z.a("mx.example.test", "198.51.100.81");
    let z = z
        .ptr("198.51.100.82", "fake.example.test")
        .a("fake.example.test", "198.51.100.99");
    aligned(z, "198.51.100.83", "relay.notexample.test").a("relay.example.test", "198.51.100.83")
}

fn start(env: &[(&str, &str)]) -> (TestServer, TestDns) {
    start_with(zone(), env)
}

fn start_with(zone: TestZone, env: &[(&str, &str)]) -> (TestServer, TestDns) {
    let dns = TestDns::start(zone);
    let mut b = TestServer::builder()
        .dns(dns.addr())
        .proxy()
        .env("HELOGUARD_DNS_TIMEOUT_MS", DNS_TIMEOUT_MS)
        // helo_churn has its own tests (greylist.rs, state_redis.rs); here it stays `none`.
        .env("HELOGUARD_HELO_CHURN", "0");
    for (k, v) in env {
        b = b.env(k, v);
    }
    (b.start(), dns)
}

/// A session presenting `client` through PROXY, banner read.
fn open(s: &TestServer, client: &str) -> Client {
    let mut c = s.connect_as(ip(client));
    let (code, text) = c.reply();
    assert_eq!(code, 220, "banner for {client}: {text}");
    c
}

/// A Subject no other message of the process has.
fn marker() -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!("case-{}", N.fetch_add(1, Ordering::SeqCst))
}

/// The stored message whose Subject is `marker` (waits, bounded).
fn stored(s: &TestServer, marker: &str) -> String {
    let needle = format!("\r\nSubject: {marker}\r\n");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        for f in s.new_messages() {
            if let Ok(bytes) = std::fs::read(&f) {
                let text = String::from_utf8_lossy(&bytes).into_owned();
                if text.contains(&needle) {
                    return text;
                }
            }
        }
        assert!(Instant::now() < deadline, "no stored message {marker}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// MAIL, RCPT, DATA after an accepted EHLO/HELO; returns the stored message.
fn send_message(s: &TestServer, c: &mut Client) -> String {
    let m = marker();
    c.cmd("MAIL FROM:<a@example.org>", 250);
    c.cmd("RCPT TO:<b@example.net>", 250);
    c.cmd("DATA", 354);
    c.send(format!("Subject: {m}\r\n\r\nbody\r\n.\r\n").as_bytes());
    let (code, text) = c.reply();
    assert_eq!(code, 250, "end of data: {text}");
    stored(s, &m)
}

/// One whole session as `client` saying `EHLO helo`; returns the stored message.
fn deliver_as(s: &TestServer, client: &str, helo: &str) -> String {
    let mut c = open(s, client);
    c.cmd(&format!("EHLO {helo}"), 250);
    let msg = send_message(s, &mut c);
    c.cmd("QUIT", 221);
    msg
}

/// The header fields named `name`, in order, unfolded (each fold becomes one space, as a
/// reader that splits on white space sees it).
fn fields(msg: &str, name: &str) -> Vec<String> {
    let head = msg.split("\r\n\r\n").next().unwrap_or("");
    let prefix = format!("{}:", name.to_ascii_lowercase());
    let mut found: Vec<String> = Vec::new();
    let mut inside = false;
    for line in head.split("\r\n") {
        if line.starts_with([' ', '\t']) {
            if inside && let Some(last) = found.last_mut() {
                last.push(' ');
                last.push_str(line.trim_start());
            }
            continue;
        }
        inside = line.to_ascii_lowercase().starts_with(&prefix);
        if inside {
            found.push(line.to_string());
        }
    }
    found
}

/// The one X-HELO-Check field of a stored message.
fn x_helo_check(msg: &str) -> String {
    let f = fields(msg, "X-HELO-Check");
    assert_eq!(f.len(), 1, "one X-HELO-Check expected: {msg}");
    f[0].clone()
}

/// Our Authentication-Results field (the first one: ours is prepended).
fn auth_results(msg: &str) -> String {
    let f = fields(msg, "Authentication-Results");
    assert!(!f.is_empty(), "no Authentication-Results: {msg}");
    f[0].clone()
}

/// The X-HELO-Check field expected (unfolded), from `results` (11 words in check order: the
/// four sender checks are `none` here, or 15 words).
fn expected_xhc(
    verdict: &str,
    allow: Option<&str>,
    helo: &str,
    client: &str,
    ptr: &str,
    results: &str,
) -> String {
    let mut results: Vec<&str> = results.split_whitespace().collect();
    if results.len() == 11 {
        results.extend(["none"; 4]);
    }
    assert_eq!(results.len(), 15, "15 results: {results:?}");
    let mut f = format!("X-HELO-Check: {HOSTNAME}; {verdict}");
    if let Some(entry) = allow {
        f.push_str(&format!(" allow={entry}"));
    }
    f.push_str(&format!(" helo={helo} ip={client} ptr={ptr}"));
    for (check, result) in CHECKS.iter().zip(results) {
        f.push_str(&format!(" {check}={result}"));
    }
    f
}

/// The Authentication-Results field expected.
fn expected_ar(iprev: &str, client: &str, ptr: Option<&str>) -> String {
    let value = if client.contains(':') {
        format!("\"{client}\"")
    } else {
        client.to_string()
    };
    let comment = ptr.map(|p| format!(" ({p})")).unwrap_or_default();
    format!("Authentication-Results: {HOSTNAME}; iprev={iprev} policy.iprev={value}{comment}")
}

/// One identity and what its message must carry.
struct Case {
    client: &'static str,
    helo: &'static str,
    verdict: &'static str,
    /// The forward-confirmed PTR name, if any.
    ptr: Option<&'static str>,
    results: &'static str,
    iprev: &'static str,
}

impl Case {
    fn check(&self, s: &TestServer) -> String {
        let msg = deliver_as(s, self.client, self.helo);
        let what = format!("{} as {}", self.helo, self.client);
        assert_eq!(
            x_helo_check(&msg),
            expected_xhc(
                self.verdict,
                None,
                self.helo,
                self.client,
                self.ptr.unwrap_or("none"),
                self.results
            ),
            "{what}"
        );
        assert_eq!(
            auth_results(&msg),
            expected_ar(self.iprev, self.client, self.ptr),
            "{what}"
        );
        msg
    }
}

/// A domain HELO with every check passing, for the pass side of a check.
fn aligned_case(client: &'static str, name: &'static str) -> Case {
    Case {
        client,
        helo: name,
        verdict: "pass",
        ptr: Some(name),
        results: ALL_PASS,
        iprev: "pass",
    }
}

fn run_cases(env: &[(&str, &str)], cases: &[Case]) {
    let (s, _dns) = start(env);
    for case in cases {
        case.check(&s);
    }
}

/// Asserts one `check=result` token in a field.
fn assert_token(field: &str, token: &str) {
    assert!(
        field.split_whitespace().any(|t| t == token),
        "{token} missing in {field}"
    );
}

// ---- one test per check: a passing and a failing identity ----

#[test]
fn syntax_passes_a_domain_and_fails_a_malformed_name_under_tag() {
    run_cases(
        &[("HELOGUARD_HELO_POLICY", "syntax=tag")],
        &[
            aligned_case("192.0.2.20", "syntax-ok.example.com"),
            Case {
                client: "192.0.2.21",
                helo: "bad..name",
                verdict: "fail",
                ptr: Some("syntax-bad.example.com"),
                results: "fail none none none none none none none pass none pass",
                iprev: "pass",
            },
        ],
    );
}

#[test]
fn bare_ip_passes_a_literal_and_fails_an_unbracketed_address() {
    run_cases(
        &[],
        &[
            Case {
                client: "192.0.2.22",
                helo: "[192.0.2.22]",
                verdict: "pass",
                ptr: Some("bare-ok.example.com"),
                results: "pass pass none pass none pass none none pass none pass",
                iprev: "pass",
            },
            Case {
                client: "192.0.2.23",
                helo: "192.0.2.23",
                verdict: "fail",
                ptr: Some("bare-bad.example.com"),
                results: "pass fail none pass none none none none pass none pass",
                iprev: "pass",
            },
        ],
    );
}

#[test]
fn fqdn_passes_a_dotted_name_and_fails_a_single_label() {
    run_cases(
        &[],
        &[
            aligned_case("192.0.2.24", "fqdn-ok.example.com"),
            Case {
                client: "192.0.2.25",
                helo: "mailhost",
                verdict: "fail",
                ptr: Some("mailhost"),
                results: "pass pass fail pass pass none pass pass pass pass pass",
                iprev: "pass",
            },
        ],
    );
}

#[test]
fn localhost_fails_loopback_records_literals_and_names_from_a_remote_client() {
    let (s, _dns) = start(&[]);
    aligned_case("192.0.2.26", "lh-ok.example.com").check(&s);
    Case {
        client: "192.0.2.27",
        helo: "loopy.example.com",
        verdict: "fail",
        ptr: Some("lh-bad.example.com"),
        results: "pass pass pass fail pass none pass fail pass pass pass",
        iprev: "pass",
    }
    .check(&s);
    Case {
        client: "192.0.2.28",
        helo: "[127.0.0.1]",
        verdict: "fail",
        ptr: Some("lh-lit.example.com"),
        results: "pass pass none fail none fail none none pass none pass",
        iprev: "pass",
    }
    .check(&s);
    // The name itself: whatever the resolver says about `localhost`, the check fails.
    let msg = deliver_as(&s, "192.0.2.26", "LocalHost");
    let xhc = x_helo_check(&msg);
    assert_token(&xhc, "localhost=fail");
    assert_token(&xhc, "fqdn=fail");
    assert!(
        xhc.starts_with(&format!("X-HELO-Check: {HOSTNAME}; fail helo=LocalHost ")),
        "{xhc}"
    );
}

#[test]
fn own_name_fails_when_a_remote_client_claims_the_server_name() {
    let (s, _dns) = start(&[]);
    aligned_case("192.0.2.29", "own-ok.example.com").check(&s);
    Case {
        client: "192.0.2.30",
        helo: HOSTNAME,
        verdict: "fail",
        ptr: Some(HOSTNAME),
        results: "pass pass pass pass fail none pass pass pass pass pass",
        iprev: "pass",
    }
    .check(&s);
    // Case and a trailing dot do not hide it.
    let msg = deliver_as(&s, "192.0.2.30", "MX.HeloGuard.TEST.");
    let xhc = x_helo_check(&msg);
    assert_token(&xhc, "own_name=fail");
    assert_token(&xhc, "helo=MX.HeloGuard.TEST.");
}

#[test]
fn literal_match_compares_ipv4_and_ipv6_literals_with_the_client() {
    run_cases(
        &[],
        &[
            Case {
                client: "192.0.2.31",
                helo: "[192.0.2.31]",
                verdict: "pass",
                ptr: Some("lit-ok.example.com"),
                results: "pass pass none pass none pass none none pass none pass",
                iprev: "pass",
            },
            Case {
                client: "192.0.2.32",
                helo: "[192.0.2.99]",
                verdict: "fail",
                ptr: Some("lit-bad.example.com"),
                results: "pass pass none pass none fail none none pass none pass",
                iprev: "pass",
            },
            Case {
                client: "2001:db8::5",
                helo: "[IPv6:2001:db8::5]",
                verdict: "pass",
                ptr: Some("v6-ok.example.com"),
                results: "pass pass none pass none pass none none pass none pass",
                iprev: "pass",
            },
            Case {
                client: "2001:db8::50",
                helo: "[IPv6:2001:db8::5]",
                verdict: "fail",
                ptr: Some("v6-bad.example.com"),
                results: "pass pass none pass none fail none none pass none pass",
                iprev: "pass",
            },
        ],
    );
}

#[test]
fn forward_fails_on_nxdomain_and_nodata() {
    run_cases(
        &[],
        &[
            aligned_case("192.0.2.33", "fwd-ok.example.com"),
            Case {
                client: "192.0.2.34",
                helo: "nx-helo.example.com",
                verdict: "fail",
                ptr: Some("fwd-nx.example.com"),
                results: "pass pass pass pass pass none fail none pass pass pass",
                iprev: "pass",
            },
            Case {
                client: "192.0.2.35",
                helo: "nodata-helo.example.com",
                verdict: "fail",
                ptr: Some("fwd-nodata.example.com"),
                results: "pass pass pass pass pass none fail none pass pass pass",
                iprev: "pass",
            },
        ],
    );
}

#[test]
fn forward_match_needs_the_client_among_the_a_or_aaaa_records() {
    run_cases(
        &[],
        &[
            aligned_case("192.0.2.39", "fm-ok.example.com"),
            Case {
                client: "192.0.2.40",
                helo: "fm-bad.example.com",
                verdict: "fail",
                ptr: Some("fm-ptr.example.com"),
                results: "pass pass pass pass pass none pass fail pass pass pass",
                iprev: "pass",
            },
            aligned_case("2001:db8::6", "fm6.example.com"),
            Case {
                client: "2001:db8::60",
                helo: "fm6.example.com",
                verdict: "fail",
                ptr: Some("fm6-bad.example.com"),
                results: "pass pass pass pass pass none pass fail pass pass pass",
                iprev: "pass",
            },
        ],
    );
}

#[test]
fn fcrdns_and_iprev_pass_fail_and_permerror() {
    let unconfirmed = "pass pass pass pass pass none pass pass fail none pass";
    run_cases(
        &[],
        &[
            aligned_case("192.0.2.41", "fc-ok.example.com"),
            // A PTR name that does not resolve back: iprev=fail.
            Case {
                client: "192.0.2.42",
                helo: "fc-bad.example.com",
                verdict: "fail",
                ptr: None,
                results: unconfirmed,
                iprev: "fail",
            },
            // No PTR at all (NXDOMAIN, NODATA): iprev=permerror.
            Case {
                client: "192.0.2.43",
                helo: "nptr.example.com",
                verdict: "fail",
                ptr: None,
                results: unconfirmed,
                iprev: "permerror",
            },
            Case {
                client: "192.0.2.44",
                helo: "nodata-ptr.example.com",
                verdict: "fail",
                ptr: None,
                results: unconfirmed,
                iprev: "permerror",
            },
            Case {
                client: "2001:db8::7",
                helo: "nptr6.example.com",
                verdict: "fail",
                ptr: None,
                results: unconfirmed,
                iprev: "permerror",
            },
            // Several PTR names: the one that confirms is the PTR, whatever its position.
            Case {
                client: "192.0.2.50",
                helo: "multi.example.com",
                verdict: "pass",
                ptr: Some("right.example.com"),
                results: ALL_PASS,
                iprev: "pass",
            },
            // One name confirms, another fails temporarily: still pass.
            Case {
                client: "192.0.2.51",
                helo: "half.example.com",
                verdict: "pass",
                ptr: Some("fine.example.com"),
                results: ALL_PASS,
                iprev: "pass",
            },
        ],
    );
}

#[test]
fn rdns_match_compares_registered_domains() {
    run_cases(
        &[],
        &[
            Case {
                client: "192.0.2.47",
                helo: "rd-ok.example.com",
                verdict: "pass",
                ptr: Some("out.example.com"),
                results: ALL_PASS,
                iprev: "pass",
            },
            Case {
                client: "192.0.2.48",
                helo: "rd-bad.example.org",
                verdict: "fail",
                ptr: Some("rd-ptr.example.net"),
                results: "pass pass pass pass pass none pass pass pass fail pass",
                iprev: "pass",
            },
        ],
    );
}

#[test]
fn dynamic_fails_pool_names_in_the_ptr_or_the_helo() {
    let dynamic = "pass pass pass pass pass none pass pass pass pass fail";
    run_cases(
        &[],
        &[
            aligned_case("198.51.100.10", "static.example.net"),
            Case {
                client: "198.51.100.11",
                helo: "smtp-eleven.example.net",
                verdict: "fail",
                ptr: Some("dsl-198-51-100-11.pool.example.net"),
                results: dynamic,
                iprev: "pass",
            },
            Case {
                client: "198.51.100.12",
                helo: "ppp-12.example.net",
                verdict: "fail",
                ptr: Some("static-twelve.example.net"),
                results: dynamic,
                iprev: "pass",
            },
        ],
    );
}

#[test]
fn an_upper_case_helo_with_a_trailing_dot_is_judged_as_its_name_and_shown_as_sent() {
    run_cases(
        &[],
        &[Case {
            client: "203.0.113.10",
            helo: "Upper.Example.COM.",
            verdict: "pass",
            ptr: Some("upper.example.com"),
            results: ALL_PASS,
            iprev: "pass",
        }],
    );
}

// ---- DNS outcomes ----

/// A temporary failure of the HELO name's lookup.
const FORWARD_TEMPERROR: &str =
    "pass pass pass temperror pass none temperror temperror pass pass pass";
/// A temporary failure of the client's PTR lookup.
const REVERSE_TEMPERROR: &str =
    "pass pass pass pass pass none pass pass temperror temperror temperror";

#[test]
fn servfail_refused_and_silence_give_temperror_never_fail() {
    let (s, _dns) = start(&[]);
    let cases = [
        Case {
            client: "192.0.2.36",
            helo: "sf-helo.example.com",
            verdict: "temperror",
            ptr: Some("fwd-sf.example.com"),
            results: FORWARD_TEMPERROR,
            iprev: "pass",
        },
        Case {
            client: "192.0.2.38",
            helo: "ref-helo.example.com",
            verdict: "temperror",
            ptr: Some("fwd-ref.example.com"),
            results: FORWARD_TEMPERROR,
            iprev: "pass",
        },
        Case {
            client: "192.0.2.37",
            helo: "bh-helo.example.com",
            verdict: "temperror",
            ptr: Some("fwd-bh.example.com"),
            results: FORWARD_TEMPERROR,
            iprev: "pass",
        },
        Case {
            client: "192.0.2.45",
            helo: "sf-ptr.example.com",
            verdict: "temperror",
            ptr: None,
            results: REVERSE_TEMPERROR,
            iprev: "temperror",
        },
        Case {
            client: "192.0.2.46",
            helo: "bh-ptr.example.com",
            verdict: "temperror",
            ptr: None,
            results: REVERSE_TEMPERROR,
            iprev: "temperror",
        },
        // The PTR answers, but its name's A/AAAA lookup is never answered.
        Case {
            client: "192.0.2.49",
            helo: "chain-bh.example.com",
            verdict: "temperror",
            ptr: None,
            results: "pass pass pass pass pass none pass pass temperror temperror pass",
            iprev: "temperror",
        },
    ];
    for case in &cases {
        let started = Instant::now();
        case.check(&s);
        let took = started.elapsed();
        assert!(
            took < VERDICT_BOUND,
            "{} as {}: session took {took:?}",
            case.helo,
            case.client
        );
    }
}

#[test]
fn a_blackholed_name_under_reject_is_answered_451_within_the_verdict_deadline() {
    let (s, _dns) = start(&[("HELOGUARD_HELO_POLICY", "forward=reject")]);
    for (client, helo) in [
        ("203.0.113.23", "bh-pol.example.com"),
        ("192.0.2.46", "bh-ptr.example.com"),
    ] {
        let mut c = open(&s, client);
        c.cmd(&format!("EHLO {helo}"), 250);
        c.cmd("MAIL FROM:<a@example.org>", 250);
        let started = Instant::now();
        c.send(b"RCPT TO:<b@example.net>\r\n");
        let (code, text) = c.reply();
        let took = started.elapsed();
        if helo == "bh-pol.example.com" {
            // forward is undecided under reject: 451, never 5xx.
            assert_eq!(code, 451, "{text}");
            assert!(text.starts_with("451 4.4.3"), "{text}");
            assert!(text.contains("bh-pol.example.com"), "{text}");
            assert!(text.contains("forward"), "{text}");
        } else {
            // Only the PTR is silent, and fcrdns is tagged: the RCPT is accepted.
            assert_eq!(code, 250, "{text}");
        }
        assert!(took < VERDICT_BOUND, "{helo}: RCPT took {took:?}");
        c.cmd("QUIT", 221);
    }
    assert!(s.new_messages().is_empty());
}

// ---- policies ----

const FQDN_RULE: &str =
    "RFC 5321 2.3.5: HELO must be a fully-qualified domain name or an address literal";

#[test]
fn fqdn_reject_refuses_rcpt_naming_the_helo_the_check_and_the_rule() {
    let (s, _dns) = start(&[("HELOGUARD_HELO_POLICY", "fqdn=reject")]);
    let mut c = open(&s, "203.0.113.20");
    c.cmd("EHLO mailhost2", 250);
    c.cmd("MAIL FROM:<a@example.org>", 250);
    let text = c.cmd("RCPT TO:<b@example.net>", 550);
    assert_eq!(
        text,
        format!("550 5.7.1 HELO mailhost2 refused: check fqdn failed: {FQDN_RULE}")
    );
    c.cmd("DATA", 503);
    c.cmd("QUIT", 221);
    assert!(s.new_messages().is_empty());
    // The policy leaves good names alone.
    let msg = deliver_as(&s, "203.0.113.21", "good-a.example.com");
    assert_token(&x_helo_check(&msg), "fqdn=pass");
    assert_eq!(s.new_messages().len(), 1);
}

#[test]
fn fqdn_defer_answers_450() {
    let (s, _dns) = start(&[("HELOGUARD_HELO_POLICY", "fqdn=defer")]);
    let mut c = open(&s, "203.0.113.20");
    c.cmd("EHLO mailhost2", 250);
    c.cmd("MAIL FROM:<a@example.org>", 250);
    let text = c.cmd("RCPT TO:<b@example.net>", 450);
    assert!(text.starts_with("450 4.7.1 "), "{text}");
    assert!(
        text.contains("mailhost2") && text.contains("fqdn"),
        "{text}"
    );
    c.cmd("QUIT", 221);
    assert!(s.new_messages().is_empty());
}

#[test]
fn a_temperror_under_reject_is_451_never_5xx() {
    let (s, _dns) = start(&[("HELOGUARD_HELO_POLICY", "default=reject")]);
    for (client, helo) in [
        ("203.0.113.22", "sf-pol.example.com"),
        ("203.0.113.24", "sf-pol-ptr.example.com"),
    ] {
        let mut c = open(&s, client);
        c.cmd(&format!("EHLO {helo}"), 250);
        c.cmd("MAIL FROM:<a@example.org>", 250);
        let text = c.cmd("RCPT TO:<b@example.net>", 451);
        assert!(text.starts_with("451 4.4.3 "), "{text}");
        assert!(text.contains(helo), "{text}");
        c.cmd("QUIT", 221);
    }
    assert!(s.new_messages().is_empty());
}

#[test]
fn reject_at_helo_refuses_the_ehlo_and_keeps_the_session_as_it_was() {
    let (s, _dns) = start(&[
        ("HELOGUARD_HELO_POLICY", "fqdn=reject"),
        ("HELOGUARD_REJECT_AT", "helo"),
    ]);
    let mut c = open(&s, "203.0.113.20");
    let refusal = format!("550 5.7.1 HELO mailhost2 refused: check fqdn failed: {FQDN_RULE}");
    assert_eq!(c.cmd("EHLO mailhost2", 550), refusal);
    // Still before any accepted EHLO.
    let text = c.cmd("MAIL FROM:<a@example.org>", 503);
    assert!(text.starts_with("503 5.5.1"), "{text}");
    // The same identity again, in another case, or with the other verb: still refused.
    assert_eq!(c.cmd("EHLO mailhost2", 550), refusal);
    c.cmd("HELO mailhost2", 550);
    c.cmd("EHLO MailHost2", 550);
    // A good identity is accepted and the session works.
    c.cmd("EHLO mailhost2.example.com", 250);
    let msg = send_message(&s, &mut c);
    assert_eq!(
        x_helo_check(&msg),
        expected_xhc(
            "pass",
            None,
            "mailhost2.example.com",
            "203.0.113.20",
            "mailhost2.example.com",
            ALL_PASS
        )
    );
    // Refused after a good one: the good identity stays.
    c.cmd("EHLO mailhost2", 550);
    let msg = send_message(&s, &mut c);
    assert_token(&x_helo_check(&msg), "helo=mailhost2.example.com");
    c.cmd("QUIT", 221);
    assert_eq!(s.new_messages().len(), 2);
}

#[test]
fn reject_at_helo_defers_450_and_temperror_451_at_the_ehlo() {
    let (s, _dns) = start(&[
        ("HELOGUARD_HELO_POLICY", "fqdn=defer,forward=reject"),
        ("HELOGUARD_REJECT_AT", "helo"),
    ]);
    let mut c = open(&s, "203.0.113.20");
    let text = c.cmd("EHLO mailhost2", 450);
    assert!(
        text.starts_with("450 4.7.1 ") && text.contains("mailhost2"),
        "{text}"
    );
    c.cmd("MAIL FROM:<a@example.org>", 503);
    c.cmd("QUIT", 221);
    let mut c = open(&s, "203.0.113.22");
    let text = c.cmd("HELO sf-pol.example.com", 451);
    assert!(text.starts_with("451 4.4.3 "), "{text}");
    c.cmd("MAIL FROM:<a@example.org>", 503);
    c.cmd("QUIT", 221);
    assert!(s.new_messages().is_empty());
}

#[test]
fn bad_syntax_is_501_at_the_ehlo_with_the_default_policy() {
    let (s, _dns) = start(&[]);
    let mut c = open(&s, "203.0.113.20");
    let text = c.cmd("EHLO bad..name", 501);
    assert!(text.starts_with("501 5.5.2 "), "{text}");
    c.cmd("MAIL FROM:<a@example.org>", 503);
    c.cmd("HELO bad..name", 501);
    c.cmd("EHLO mailhost2.example.com", 250);
    // A refused EHLO after a good one leaves the good one in place.
    c.cmd("EHLO bad..name", 501);
    let msg = send_message(&s, &mut c);
    assert_eq!(
        x_helo_check(&msg),
        expected_xhc(
            "pass",
            None,
            "mailhost2.example.com",
            "203.0.113.20",
            "mailhost2.example.com",
            ALL_PASS
        )
    );
    // A missing argument is always 501 5.5.4.
    let text = c.cmd("EHLO", 501);
    assert!(text.starts_with("501 5.5.4"), "{text}");
    c.cmd("QUIT", 221);
}

#[test]
fn log_and_off_show_none_and_stay_out_of_the_verdict() {
    for policy in ["fqdn=log", "fqdn=off", "fqdn=log,forward=reject"] {
        let (s, _dns) = start(&[("HELOGUARD_HELO_POLICY", policy)]);
        let msg = deliver_as(&s, "192.0.2.25", "mailhost");
        assert_eq!(
            x_helo_check(&msg),
            expected_xhc(
                "pass",
                None,
                "mailhost",
                "192.0.2.25",
                "mailhost",
                "pass pass none pass pass none pass pass pass pass pass"
            ),
            "{policy}"
        );
    }
    // A log check under an otherwise rejecting policy: the RCPT is accepted.
    let (s, _dns) = start(&[(
        "HELOGUARD_HELO_POLICY",
        "default=reject,fqdn=log,rdns_match=off",
    )]);
    let msg = deliver_as(&s, "203.0.113.20", "mailhost2");
    assert_eq!(
        x_helo_check(&msg),
        expected_xhc(
            "pass",
            None,
            "mailhost2",
            "203.0.113.20",
            "mailhost2.example.com",
            "pass pass none pass pass none pass pass pass none pass"
        )
    );
}

// ---- allow list ----

const ALL_NONE: &str = "none none none none none none none none none none none";

#[test]
fn allow_list_ip_entries_skip_every_check() {
    let (s, _dns) = start(&[
        ("HELOGUARD_HELO_POLICY", "default=reject"),
        ("HELOGUARD_HELO_ALLOW", "203.0.113.64/26, 2001:db8:1::/48"),
    ]);
    let msg = deliver_as(&s, "203.0.113.70", "localhost");
    assert_eq!(
        x_helo_check(&msg),
        expected_xhc(
            "pass",
            Some("203.0.113.64/26"),
            "localhost",
            "203.0.113.70",
            "none",
            ALL_NONE
        )
    );
    assert_eq!(
        auth_results(&msg),
        expected_ar("permerror", "203.0.113.70", None)
    );
    let msg = deliver_as(&s, "2001:db8:1::9", "[IPv6:2001:db8::1]");
    assert_eq!(
        x_helo_check(&msg),
        expected_xhc(
            "pass",
            Some("2001:db8:1::/48"),
            "[IPv6:2001:db8::1]",
            "2001:db8:1::9",
            "none",
            ALL_NONE
        )
    );
    assert_eq!(
        auth_results(&msg),
        expected_ar("permerror", "2001:db8:1::9", None)
    );
    // Outside the list the policy applies.
    let mut c = open(&s, "203.0.113.20");
    c.cmd("EHLO mailhost2", 250);
    c.cmd("MAIL FROM:<a@example.org>", 250);
    c.cmd("RCPT TO:<b@example.net>", 550);
    c.cmd("QUIT", 221);
    assert_eq!(s.new_messages().len(), 2);
}

#[test]
fn allow_list_ptr_entries_match_only_a_forward_confirmed_ptr() {
    let (s, _dns) = start(&[
        ("HELOGUARD_HELO_POLICY", "default=reject"),
        ("HELOGUARD_HELO_ALLOW", "ptr:example.test"),
    ]);
    let msg = deliver_as(&s, "198.51.100.80", "localhost");
    assert_eq!(
        x_helo_check(&msg),
        expected_xhc(
            "pass",
            Some("ptr:example.test"),
            "localhost",
            "198.51.100.80",
            "relay.out.example.test",
            ALL_NONE
        )
    );
    assert_eq!(
        auth_results(&msg),
        expected_ar("pass", "198.51.100.80", Some("relay.out.example.test"))
    );
    for (client, helo) in [
        // The HELO name is under the domain, the client has no PTR.
        ("198.51.100.81", "mx.example.test"),
        // The PTR name is under the domain but does not resolve back.
        ("198.51.100.82", "fake.example.test"),
        // Confirmed, but under another domain that merely ends the same way.
        ("198.51.100.83", "relay.example.test"),
    ] {
        let mut c = open(&s, client);
        c.cmd(&format!("EHLO {helo}"), 250);
        c.cmd("MAIL FROM:<a@example.org>", 250);
        let text = c.cmd("RCPT TO:<b@example.net>", 550);
        assert!(text.contains(helo), "{client}: {text}");
        c.cmd("QUIT", 221);
    }
    assert_eq!(s.new_messages().len(), 1);
}

// ---- a second EHLO ----

#[test]
fn a_second_ehlo_starts_new_checks() {
    let (s, _dns) = start(&[]);
    let mut c = open(&s, "203.0.113.20");
    c.cmd("EHLO mailhost2", 250);
    c.cmd("EHLO mailhost2.example.com", 250);
    let msg = send_message(&s, &mut c);
    assert_eq!(
        x_helo_check(&msg),
        expected_xhc(
            "pass",
            None,
            "mailhost2.example.com",
            "203.0.113.20",
            "mailhost2.example.com",
            ALL_PASS
        )
    );
    c.cmd("HELO mailhost2", 250);
    let msg = send_message(&s, &mut c);
    assert_eq!(
        x_helo_check(&msg),
        expected_xhc(
            "fail",
            None,
            "mailhost2",
            "203.0.113.20",
            "mailhost2.example.com",
            "pass pass fail pass pass none pass pass pass fail pass"
        )
    );
    assert!(msg.contains(" with SMTP id "), "HELO gives SMTP: {msg}");
    c.cmd("QUIT", 221);

    // Under reject the RCPT follows the latest identity both ways.
    let (s, _dns) = start(&[("HELOGUARD_HELO_POLICY", "fqdn=reject")]);
    let mut c = open(&s, "203.0.113.20");
    c.cmd("EHLO mailhost2.example.com", 250);
    c.cmd("EHLO mailhost2", 250);
    c.cmd("MAIL FROM:<a@example.org>", 250);
    c.cmd("RCPT TO:<b@example.net>", 550);
    c.cmd("EHLO mailhost2.example.com", 250);
    c.cmd("MAIL FROM:<a@example.org>", 250);
    c.cmd("RCPT TO:<b@example.net>", 250);
    c.cmd("QUIT", 221);
}

// ---- forged fields ----

#[test]
fn forged_verdict_fields_are_removed_and_other_hosts_fields_stay() {
    let (s, _dns) = start(&[]);
    let m = marker();
    let mut c = open(&s, "192.0.2.24");
    c.cmd("EHLO fqdn-ok.example.com", 250);
    c.cmd("MAIL FROM:<a@example.org>", 250);
    c.cmd("RCPT TO:<b@example.net>", 250);
    c.cmd("DATA", 354);
    let body = format!(
        "X-HELO-Check: {HOSTNAME}; pass helo=forged ip=192.0.2.1 ptr=forged\r\n\
         Authentication-Results: {HOSTNAME}; iprev=pass\r\n\
         Authentication-Results: other.example.net; iprev=fail policy.iprev=192.0.2.24\r\n\
         authentication-results: MX.HELOGUARD.TEST;\r\n\tiprev=pass policy.iprev=192.0.2.24\r\n\
         Subject: {m}\r\n\
         \r\n\
         X-HELO-Check: {HOSTNAME}; body text stays\r\n\
         .\r\n"
    );
    c.send(body.as_bytes());
    let (code, text) = c.reply();
    assert_eq!(code, 250, "{text}");
    c.cmd("QUIT", 221);
    let msg = stored(&s, &m);
    let head = msg.split("\r\n\r\n").next().unwrap();
    assert!(!head.contains("forged"), "{msg}");
    assert!(!head.contains("\tiprev=pass"), "{msg}");
    assert_eq!(
        x_helo_check(&msg),
        expected_xhc(
            "pass",
            None,
            "fqdn-ok.example.com",
            "192.0.2.24",
            "fqdn-ok.example.com",
            ALL_PASS
        )
    );
    assert_eq!(
        fields(&msg, "Authentication-Results"),
        [
            expected_ar("pass", "192.0.2.24", Some("fqdn-ok.example.com")),
            "Authentication-Results: other.example.net; iprev=fail policy.iprev=192.0.2.24"
                .to_string(),
        ]
    );
    assert!(
        msg.ends_with(&format!(
            "\r\n\r\nX-HELO-Check: {HOSTNAME}; body text stays\r\n"
        )),
        "{msg}"
    );
}

// ---- head-of-line blocking ----

#[test]
fn sessions_waiting_on_silent_dns_do_not_hold_up_others() {
    const SLOW: usize = 50;
    const FAST: usize = 200;
    const TIMEOUT_MS: u64 = 3000;
    let slow_ip = |i: usize| format!("192.0.2.{}", 100 + i);
    let fast_ip = |i: usize| {
        if i < 100 {
            format!("198.51.100.{}", 100 + i)
        } else {
            format!("203.0.113.{}", i)
        }
    };
    let mut z = TestZone::new();
    for i in 0..SLOW {
        z = z.blackhole(&format!("slow-{i}.example.com"));
    }
    for i in 0..FAST {
        z = aligned(z, &fast_ip(i), &format!("fast-{i}.example.com"));
    }
    let (s, _dns) = start_with(
        z,
        &[
            ("HELOGUARD_HELO_POLICY", "forward=reject"),
            ("HELOGUARD_DNS_TIMEOUT_MS", &TIMEOUT_MS.to_string()),
            ("HELOGUARD_MAX_CONNECTIONS_PER_IP", "0"),
        ],
    );
    let deadline = Duration::from_millis(2 * TIMEOUT_MS);

    // The slow sessions: their RCPT waits for a verdict that only the deadline brings.
    let slow_started = Instant::now();
    let mut slow: Vec<Client> = (0..SLOW).map(|i| open(&s, &slow_ip(i))).collect();
    for (i, c) in slow.iter_mut().enumerate() {
        c.send(
            format!("EHLO slow-{i}.example.com\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\n")
                .as_bytes(),
        );
        assert_eq!(c.reply().0, 250);
        assert_eq!(c.reply().0, 250);
    }
    let slow_waiters: Vec<_> = slow
        .into_iter()
        .map(|mut c| {
            std::thread::spawn(move || {
                let reply = c.reply();
                (reply, Instant::now())
            })
        })
        .collect();

    // The fast sessions, 20 threads of 10 open sessions each.
    let fast_started = Instant::now();
    let proxy = s.proxy_addr.unwrap();
    let threads: Vec<_> = (0..20)
        .map(|t| {
            std::thread::spawn(move || {
                let mut clients: Vec<(usize, Client)> = (0..10)
                    .map(|k| {
                        let i = t * 10 + k;
                        let mut c = Client::connect_raw(proxy);
                        c.send(common::server::proxy_v1(fast_ip(i).parse().unwrap()).as_bytes());
                        (i, c)
                    })
                    .collect();
                for (i, c) in clients.iter_mut() {
                    assert_eq!(c.reply().0, 220);
                    c.send(
                        format!(
                            "EHLO fast-{i}.example.com\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n"
                        )
                        .as_bytes(),
                    );
                }
                for (i, c) in clients.iter_mut() {
                    for expect in [250, 250, 250, 354] {
                        let (code, text) = c.reply();
                        assert_eq!(code, expect, "fast-{i}: {text}");
                    }
                    c.send(format!("Subject: fast-{i}\r\n\r\nbody\r\n.\r\nQUIT\r\n").as_bytes());
                }
                for (i, c) in clients.iter_mut() {
                    let (code, text) = c.reply();
                    assert_eq!(code, 250, "fast-{i}: {text}");
                    assert_eq!(c.reply().0, 221);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("fast session thread");
    }
    let fast_done = Instant::now();
    let fast_took = fast_done - fast_started;
    assert!(
        fast_took < deadline,
        "{FAST} sessions took {fast_took:?}, the slow ones' deadline is {deadline:?}"
    );
    assert_eq!(s.wait_messages(FAST).len(), FAST);

    for w in slow_waiters {
        let ((code, text), at) = w.join().expect("slow session");
        assert_eq!(code, 451, "{text}");
        assert!(text.starts_with("451 4.4.3"), "{text}");
        // They really waited for DNS, and were answered only after the fast ones were done.
        assert!(
            at >= fast_done,
            "a slow session was answered before the fast ones finished"
        );
        assert!(
            at - slow_started < deadline + VERDICT_BOUND,
            "slow session answered after {:?}",
            at - slow_started
        );
    }
    assert_eq!(s.new_messages().len(), FAST);
}

// ---- edge cases ----

#[test]
fn an_ipv4_mapped_proxy_source_is_the_plain_ipv4_client() {
    let (s, _dns) = start(&[]);
    let msg = deliver_as(&s, "::ffff:192.0.2.24", "fqdn-ok.example.com");
    assert_eq!(
        x_helo_check(&msg),
        expected_xhc(
            "pass",
            None,
            "fqdn-ok.example.com",
            "192.0.2.24",
            "fqdn-ok.example.com",
            ALL_PASS
        )
    );
    assert_eq!(
        auth_results(&msg),
        expected_ar("pass", "192.0.2.24", Some("fqdn-ok.example.com"))
    );
    assert!(msg.contains("(fqdn-ok.example.com [192.0.2.24])"), "{msg}");
    // A mapped literal names the same address.
    let msg = deliver_as(&s, "192.0.2.31", "[IPv6:::ffff:192.0.2.31]");
    assert_token(&x_helo_check(&msg), "literal_match=pass");
    let msg = deliver_as(&s, "2001:db8::5", "[ipv6:2001:DB8:0::5]");
    assert_token(&x_helo_check(&msg), "literal_match=pass");
    assert!(msg.contains("[IPv6:2001:db8::5]"), "{msg}");
}

#[test]
fn a_second_ehlo_does_not_wait_for_the_first_ones_silent_dns() {
    // A long timeout: the silent name's verdict would be due only after 4 s.
    let (s, _dns) = start(&[("HELOGUARD_DNS_TIMEOUT_MS", "2000")]);
    let mut c = open(&s, "192.0.2.37");
    c.cmd("EHLO bh-helo.example.com", 250);
    let started = Instant::now();
    c.cmd("EHLO fwd-bh.example.com", 250);
    let msg = send_message(&s, &mut c);
    let took = started.elapsed();
    assert_eq!(
        x_helo_check(&msg),
        expected_xhc(
            "pass",
            None,
            "fwd-bh.example.com",
            "192.0.2.37",
            "fwd-bh.example.com",
            ALL_PASS
        )
    );
    // The silent name's deadline (4 s) is not what the message waited for; generous for a
    // loaded machine, still well short of it.
    assert!(took < Duration::from_millis(3000), "took {took:?}");
    c.cmd("QUIT", 221);

    let (s, _dns) = start(&[
        ("HELOGUARD_HELO_POLICY", "forward=reject"),
        ("HELOGUARD_DNS_TIMEOUT_MS", "2000"),
    ]);
    let started = Instant::now();
    let mut c = open(&s, "203.0.113.23");
    c.cmd("EHLO bh-pol.example.com", 250);
    c.cmd("EHLO pol-bh.example.com", 250);
    c.cmd("MAIL FROM:<a@example.org>", 250);
    c.cmd("RCPT TO:<b@example.net>", 250);
    assert!(
        started.elapsed() < Duration::from_millis(3000),
        "{:?}",
        started.elapsed()
    );
    c.cmd("QUIT", 221);
}

#[test]
fn reject_at_helo_answers_a_silent_name_451_at_the_deadline() {
    let (s, _dns) = start(&[
        ("HELOGUARD_HELO_POLICY", "forward=reject"),
        ("HELOGUARD_REJECT_AT", "helo"),
    ]);
    let mut c = open(&s, "203.0.113.23");
    let started = Instant::now();
    let text = c.cmd("EHLO bh-pol.example.com", 451);
    assert!(started.elapsed() < VERDICT_BOUND, "{:?}", started.elapsed());
    assert!(text.starts_with("451 4.4.3 "), "{text}");
    c.cmd("MAIL FROM:<a@example.org>", 503);
    c.cmd("EHLO pol-bh.example.com", 250);
    let msg = send_message(&s, &mut c);
    assert_token(&x_helo_check(&msg), "helo=pol-bh.example.com");
    c.cmd("QUIT", 221);
}

#[test]
fn pipelined_recipients_wait_for_the_verdict_and_keep_their_order() {
    let (s, _dns) = start(&[("HELOGUARD_HELO_POLICY", "forward=reject")]);
    let mut c = open(&s, "203.0.113.23");
    c.send(
        b"EHLO bh-pol.example.com\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\n\
          RCPT TO:<c@example.net>\r\nDATA\r\nNOOP\r\n",
    );
    for expect in [250, 250, 451, 451, 503, 250] {
        let (code, text) = c.reply();
        assert_eq!(code, expect, "{text}");
    }
    c.cmd("QUIT", 221);
    assert!(s.new_messages().is_empty());
}

#[test]
fn the_helo_in_headers_is_sanitized_octet_by_octet() {
    let (s, _dns) = start(&[("HELOGUARD_HELO_POLICY", "syntax=tag")]);
    let msg = deliver_as(&s, "192.0.2.21", "bad;name\"(x)");
    let xhc = x_helo_check(&msg);
    assert_token(&xhc, "helo=bad?name??x?");
    assert_token(&xhc, "syntax=fail");
    assert!(msg.contains("Received: from bad?name??x? ("), "{msg}");

    // Raw octets that are not UTF-8: one `?` each.
    let mut c = open(&s, "192.0.2.21");
    c.send(b"EHLO h\xffx\xe9.example\r\n");
    assert_eq!(c.reply().0, 250);
    let msg = send_message(&s, &mut c);
    c.cmd("QUIT", 221);
    let xhc = x_helo_check(&msg);
    assert_token(&xhc, "helo=h?x?.example");
    assert!(msg.contains("Received: from h?x?.example ("), "{msg}");

    // Cut to 255 octets.
    let long = format!("{}!", "a".repeat(300));
    let msg = deliver_as(&s, "192.0.2.21", &long);
    assert_token(&x_helo_check(&msg), &format!("helo={}", "a".repeat(255)));
}

#[test]
fn a_local_client_may_call_itself_localhost_or_the_server() {
    let (s, _dns) = start(&[]);
    for helo in ["localhost", HOSTNAME] {
        let msg = deliver_as(&s, "127.0.0.5", helo);
        let xhc = x_helo_check(&msg);
        assert_token(&xhc, "localhost=pass");
        assert_token(&xhc, "own_name=pass");
        assert_token(&xhc, "ip=127.0.0.5");
    }
    let msg = deliver_as(&s, "::1", "[IPv6:::1]");
    let xhc = x_helo_check(&msg);
    assert_token(&xhc, "localhost=pass");
    assert_token(&xhc, "literal_match=pass");
}

#[test]
fn own_name_covers_the_accepted_domains_but_not_their_subdomains() {
    let (s, _dns) = start(&[("HELOGUARD_DOMAINS", "example.net,Example.COM")]);
    let msg = deliver_as(&s, "192.0.2.24", "example.com");
    assert_token(&x_helo_check(&msg), "own_name=fail");
    let msg = deliver_as(&s, "192.0.2.24", "EXAMPLE.NET.");
    assert_token(&x_helo_check(&msg), "own_name=fail");
    let msg = deliver_as(&s, "192.0.2.24", "fqdn-ok.example.com");
    assert_token(&x_helo_check(&msg), "own_name=pass");
}

#[test]
fn each_verdict_is_logged_with_the_client_and_the_helo() {
    let (s, _dns) = start(&[]);
    deliver_as(&s, "192.0.2.40", "fm-bad.example.com");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let log = s.log();
        if let Some(line) = log.lines().find(|l| {
            l.contains("192.0.2.40")
                && l.contains("fm-bad.example.com")
                && l.contains("forward_match")
        }) {
            assert!(line.contains("fail"), "{line}");
            assert!(line.contains("fm-ptr.example.com"), "{line}");
            break;
        }
        assert!(Instant::now() < deadline, "no verdict line: {log}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn the_ptr_lookup_starts_at_accept_before_any_ehlo() {
    let (s, dns) = start(&[]);
    let _c = open(&s, "192.0.2.41");
    let ptr_name = reverse_name(ip("192.0.2.41"));
    let deadline = Instant::now() + Duration::from_secs(5);
    // The PTR, then the PTR name's own A lookup (forward confirmation), all before EHLO.
    while dns.count(&ptr_name, RecordType::PTR) == 0
        || dns.count("fc-ok.example.com", RecordType::A) == 0
    {
        assert!(
            Instant::now() < deadline,
            "no PTR lookup before EHLO: {:?}",
            dns.queries()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn an_allowed_client_is_accepted_at_the_ehlo_under_reject_at_helo() {
    let (s, _dns) = start(&[
        ("HELOGUARD_HELO_POLICY", "default=reject"),
        ("HELOGUARD_REJECT_AT", "helo"),
        ("HELOGUARD_HELO_ALLOW", "203.0.113.70"),
    ]);
    let mut c = open(&s, "203.0.113.70");
    c.cmd("EHLO localhost", 250);
    let msg = send_message(&s, &mut c);
    c.cmd("QUIT", 221);
    assert_eq!(
        x_helo_check(&msg),
        expected_xhc(
            "pass",
            Some("203.0.113.70"),
            "localhost",
            "203.0.113.70",
            "none",
            ALL_NONE
        )
    );
    let mut c = open(&s, "203.0.113.71");
    let text = c.cmd("EHLO localhost", 550);
    assert!(text.contains("check localhost failed"), "{text}");
    c.cmd("QUIT", 221);
}
