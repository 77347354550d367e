//! The sender reputation checks end to end (SPEC "Sender reputation, SPF and HELO history"):
//! the real binary behind a PROXY listener, so clients come from documentation addresses, and
//! the in-process test DNS server with DNS list zones (listed and unlisted IPv4 and IPv6
//! clients, error answers a filter must ignore, a zone that never answers) and RHSBL zones.

mod common;

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use common::dns_server::{TestDns, TestZone, list_name};
use common::server::{Client, TestServer};
use hickory_proto::rr::RecordType;

/// The verdict is due 2 x this after EHLO.
const DNS_TIMEOUT_MS: &str = "300";

const DNSBL: &str = "bl1.test=127.0.0.[2..11]*2, bl2.test dead.test \
                     wl.test=127.0.[0..255].[1..3]*-5";
const RHSBL: &str = "dbl.test=127.0.1.[2..99]";

fn ip(s: &str) -> IpAddr {
    s.parse().expect("test address")
}

/// `name` has `addr` as its A/AAAA record and is the PTR name of `addr`.
fn aligned(zone: TestZone, addr: &str, name: &str) -> TestZone {
    zone.addr(name, addr).ptr(addr, name)
}

/// Clients and names: every client's HELO and PTR agree, so only the list checks can fail.
fn zone() -> TestZone {
    let z = TestZone::new();
    // bl1 (weight 2, filter 127.0.0.[2..11]) only.
    let z = aligned(z, "192.0.2.10", "c10.example.com").listed(
        "bl1.test",
        ip("192.0.2.10"),
        "127.0.0.2",
    );
    // bl2 (weight 1, any answer) only.
    let z = aligned(z, "192.0.2.11", "c11.example.com").listed(
        "bl2.test",
        ip("192.0.2.11"),
        "127.0.0.9",
    );
    // Both: 2 + 1 = 3; bl1 answers twice and still counts once.
    let z = aligned(z, "192.0.2.12", "c12.example.com")
        .listed("bl1.test", ip("192.0.2.12"), "127.0.0.2")
        .listed("bl1.test", ip("192.0.2.12"), "127.0.0.4")
        .listed("bl2.test", ip("192.0.2.12"), "127.0.0.2");
    // An error answer (Spamhaus' 127.255.255.254) that bl1's filter ignores.
    let z = aligned(z, "192.0.2.13", "c13.example.com").listed(
        "bl1.test",
        ip("192.0.2.13"),
        "127.255.255.254",
    );
    // On the allowlist only: -5.
    let z = aligned(z, "192.0.2.14", "c14.example.com").listed(
        "wl.test",
        ip("192.0.2.14"),
        "127.0.10.2",
    );
    // On the allowlist and on both block lists: 2 + 1 - 5 = -2.
    let z = aligned(z, "192.0.2.15", "c15.example.com")
        .listed("wl.test", ip("192.0.2.15"), "127.0.10.2")
        .listed("bl1.test", ip("192.0.2.15"), "127.0.0.2")
        .listed("bl2.test", ip("192.0.2.15"), "127.0.0.2");
    // Unlisted.
    let z = aligned(z, "192.0.2.16", "c16.example.com");
    // IPv6, by nibbles.
    let z = aligned(z, "2001:db8::10", "v6.example.com").listed(
        "bl1.test",
        ip("2001:db8::10"),
        "127.0.0.3",
    );
    let z = aligned(z, "2001:db8::11", "v6-clean.example.com");
    // RHSBL: the HELO name's domain, the PTR name's domain, an error answer.
    let z = aligned(z, "198.51.100.20", "mail.spammy.example")
        .a("spammy.example.dbl.test", "127.0.1.2");
    let z = aligned(z, "198.51.100.21", "host.badptr.example")
        .a("clean.example.com", "198.51.100.21")
        .a("badptr.example.dbl.test", "127.0.1.5");
    let z = aligned(z, "198.51.100.22", "mail.errdom.example")
        .a("errdom.example.dbl.test", "127.0.1.255");
    let z = aligned(z, "198.51.100.23", "mail.fine.example");
    // The list that never answers.
    z.blackhole_zone("dead.test")
}

fn start(env: &[(&str, &str)]) -> (TestServer, TestDns) {
    start_with(zone(), env)
}

fn start_with(zone: TestZone, env: &[(&str, &str)]) -> (TestServer, TestDns) {
    let dns = TestDns::start(zone);
    let mut b = TestServer::builder()
        .dns(dns.addr())
        .proxy()
        .metrics()
        .env("HELOGUARD_DNS_TIMEOUT_MS", DNS_TIMEOUT_MS)
        .env("HELOGUARD_DNSBL", DNSBL)
        .env("HELOGUARD_DNSBL_THRESHOLD", "3")
        .env("HELOGUARD_DNSWL_THRESHOLD", "-2")
        .env("HELOGUARD_RHSBL", RHSBL);
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

fn marker() -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!("rep-{}", N.fetch_add(1, Ordering::SeqCst))
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

/// One whole session as `client` saying `EHLO helo`; returns the stored message.
fn deliver_as(s: &TestServer, client: &str, helo: &str) -> String {
    let mut c = open(s, client);
    c.cmd(&format!("EHLO {helo}"), 250);
    let m = marker();
    c.cmd("MAIL FROM:<a@example.org>", 250);
    c.cmd("RCPT TO:<b@example.net>", 250);
    c.cmd("DATA", 354);
    c.send(format!("Subject: {m}\r\n\r\nbody\r\n.\r\n").as_bytes());
    let (code, text) = c.reply();
    assert_eq!(code, 250, "end of data: {text}");
    c.cmd("QUIT", 221);
    stored(s, &m)
}

/// The header fields named `name`, unfolded.
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

fn x_helo_check(msg: &str) -> String {
    let f = fields(msg, "X-HELO-Check");
    assert_eq!(f.len(), 1, "one X-HELO-Check expected: {msg}");
    f[0].clone()
}

fn auth_results(msg: &str) -> String {
    fields(msg, "Authentication-Results")
        .into_iter()
        .next()
        .expect("Authentication-Results")
}

/// `key=value` from a header field or log line.
fn value<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    text.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
}

/// The verdict word right after `HOSTNAME;`.
fn verdict(xhc: &str) -> &str {
    xhc.split_whitespace().nth(2).unwrap_or("")
}

fn scrape(addr: SocketAddr) -> String {
    let mut c = std::net::TcpStream::connect(addr).expect("metrics connect");
    c.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
        .expect("metrics request");
    let mut text = String::new();
    c.read_to_string(&mut text).expect("metrics response");
    text
}

/// Waits until the server's log holds `needle` (bounded).
fn wait_log(s: &TestServer, needle: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let log = s.log();
        if log.contains(needle) {
            return log;
        }
        assert!(
            Instant::now() < deadline,
            "no {needle:?} in the log:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

// ---- dnsbl: scores, weights, thresholds, filters ----

#[test]
fn weights_sum_across_zones_against_the_threshold() {
    let (s, dns) = start(&[]);
    for (client, helo, score, result, want_verdict) in [
        ("192.0.2.10", "c10.example.com", "2", "pass", "pass"),
        ("192.0.2.11", "c11.example.com", "1", "pass", "pass"),
        ("192.0.2.12", "c12.example.com", "3", "fail", "fail"),
        // The error answer matches no filter: not listed.
        ("192.0.2.13", "c13.example.com", "0", "pass", "pass"),
        ("192.0.2.16", "c16.example.com", "0", "pass", "pass"),
        // The allowlist's weight brings the score to -2, the DNSWL threshold here: allowed,
        // every check none (see the allowlist test for the header).
        ("192.0.2.15", "c15.example.com", "-2", "none", "pass"),
    ] {
        let msg = deliver_as(&s, client, helo);
        let xhc = x_helo_check(&msg);
        assert_eq!(value(&xhc, "dnsbl_score"), Some(score), "{client}: {xhc}");
        assert_eq!(value(&xhc, "dnsbl"), Some(result), "{client}: {xhc}");
        assert_eq!(verdict(&xhc), want_verdict, "{client}: {xhc}");
        // A list that never answers defers nothing and decides nothing.
        assert_ne!(verdict(&xhc), "temperror", "{client}: {xhc}");
    }
    // Each zone asked once per client, the unanswering one included.
    assert_eq!(
        dns.count(&list_name(ip("192.0.2.12"), "bl1.test"), RecordType::A),
        1
    );
    assert!(dns.count(&list_name(ip("192.0.2.12"), "dead.test"), RecordType::A) >= 1);
    let metrics = scrape(s.metrics_addr.expect("metrics address"));
    assert!(
        metrics.contains("heloguard_dnsbl_listings_total{zone=\"bl1.test\"}"),
        "{metrics}"
    );
    assert!(
        metrics.contains("heloguard_dns_queries_total{type=\"A\",outcome=\"timeout\"}"),
        "{metrics}"
    );
    // The outage is logged once, not per query.
    let log = wait_log(&s, "DNS list dead.test did not answer");
    assert_eq!(
        log.matches("DNS list dead.test did not answer").count(),
        1,
        "{log}"
    );
}

#[test]
fn a_negative_weight_allowlist_skips_every_check() {
    // -5 alone reaches the DNSWL threshold of -5.
    let (s, _dns) = start(&[("HELOGUARD_DNSWL_THRESHOLD", "-5")]);
    // The HELO does not even resolve: every check is skipped all the same.
    let msg = deliver_as(&s, "192.0.2.14", "nowhere.example.com");
    let xhc = x_helo_check(&msg);
    assert_eq!(verdict(&xhc), "pass", "{xhc}");
    assert_eq!(value(&xhc, "allow"), Some("dnswl:wl.test"), "{xhc}");
    for check in ["forward", "forward_match", "dnsbl", "rhsbl", "spf"] {
        assert_eq!(value(&xhc, check), Some("none"), "{check}: {xhc}");
    }
    assert_eq!(value(&xhc, "dnsbl_score"), Some("-5"), "{xhc}");
    let ar = auth_results(&msg);
    assert!(
        ar.contains("; dnswl=pass dns.zone=wl.test policy.ip=127.0.10.2"),
        "{ar}"
    );
    // Listed on the block lists too: 3 - 5 = -2, above -5: judged, and the dnswl hit is still
    // reported (RFC 8904).
    let msg = deliver_as(&s, "192.0.2.15", "c15.example.com");
    let xhc = x_helo_check(&msg);
    assert_eq!(value(&xhc, "allow"), None, "{xhc}");
    assert_eq!(value(&xhc, "dnsbl_score"), Some("-2"), "{xhc}");
    assert_eq!(value(&xhc, "dnsbl"), Some("pass"), "{xhc}");
    assert!(auth_results(&msg).contains("dnswl=pass dns.zone=wl.test"));
}

#[test]
fn ipv6_clients_are_looked_up_by_nibbles() {
    let (s, dns) = start(&[("HELOGUARD_DNSBL_THRESHOLD", "2")]);
    let msg = deliver_as(&s, "2001:db8::10", "v6.example.com");
    let xhc = x_helo_check(&msg);
    assert_eq!(value(&xhc, "dnsbl_score"), Some("2"), "{xhc}");
    assert_eq!(value(&xhc, "dnsbl"), Some("fail"), "{xhc}");
    assert_eq!(
        dns.count(&list_name(ip("2001:db8::10"), "bl1.test"), RecordType::A),
        1
    );
    let msg = deliver_as(&s, "2001:db8::11", "v6-clean.example.com");
    assert_eq!(value(&x_helo_check(&msg), "dnsbl_score"), Some("0"));
}

#[test]
fn local_and_allowed_clients_are_not_looked_up() {
    let (s, dns) = start(&[("HELOGUARD_HELO_ALLOW", "192.0.2.12")]);
    let msg = deliver_as(&s, "192.0.2.12", "c12.example.com");
    let xhc = x_helo_check(&msg);
    assert_eq!(value(&xhc, "allow"), Some("192.0.2.12"), "{xhc}");
    assert_eq!(value(&xhc, "dnsbl_score"), Some("0"), "{xhc}");
    assert_eq!(
        dns.count(&list_name(ip("192.0.2.12"), "bl1.test"), RecordType::A),
        0
    );
    let msg = deliver_as(&s, "127.0.0.1", "localhost.example.com");
    assert_eq!(value(&x_helo_check(&msg), "dnsbl_score"), Some("0"));
}

// ---- rhsbl ----

#[test]
fn rhsbl_lists_the_helo_and_the_ptr_domains() {
    let (s, dns) = start(&[]);
    for (client, helo, result) in [
        ("198.51.100.20", "mail.spammy.example", "fail"),
        ("198.51.100.21", "clean.example.com", "fail"),
        ("198.51.100.22", "mail.errdom.example", "pass"),
        ("198.51.100.23", "mail.fine.example", "pass"),
    ] {
        let xhc = x_helo_check(&deliver_as(&s, client, helo));
        assert_eq!(value(&xhc, "rhsbl"), Some(result), "{client} {helo}: {xhc}");
    }
    // The registered domain, not the whole name.
    assert_eq!(dns.count("spammy.example.dbl.test", RecordType::A), 1);
    assert_eq!(dns.count("mail.spammy.example.dbl.test", RecordType::A), 0);
    assert_eq!(dns.count("example.com.dbl.test", RecordType::A), 1);
}

// ---- actions ----

/// The RCPT reply of a listed client under `policy` (which makes RCPT wait for the verdict).
fn rcpt_under(policy: &str, client: &str, helo: &str) -> (u16, String) {
    let (s, _dns) = start(&[("HELOGUARD_HELO_POLICY", policy)]);
    let mut c = open(&s, client);
    c.cmd(&format!("EHLO {helo}"), 250);
    c.cmd("MAIL FROM:<a@example.org>", 250);
    c.send(b"RCPT TO:<b@example.net>\r\n");
    let reply = c.reply();
    c.send(b"QUIT\r\n");
    reply
}

#[test]
fn every_list_check_under_each_action() {
    for (check, client, helo) in [
        ("dnsbl", "192.0.2.12", "c12.example.com"),
        ("rhsbl", "198.51.100.20", "mail.spammy.example"),
    ] {
        let (code, text) = rcpt_under(&format!("{check}=reject"), client, helo);
        assert_eq!(code, 550, "{check}=reject: {text}");
        assert!(text.starts_with("550 5.7.1 "), "{text}");
        assert!(
            text.contains(check),
            "{check}=reject names the check: {text}"
        );
        let (code, text) = rcpt_under(&format!("{check}=defer"), client, helo);
        assert_eq!(code, 450, "{check}=defer: {text}");
        assert!(text.starts_with("450 4.7.1"), "{text}");
        // The first sight of a triplet is greylisted (the embedded store).
        let (code, text) = rcpt_under(&format!("{check}=greylist"), client, helo);
        assert_eq!(code, 451, "{check}=greylist: {text}");
        assert!(text.starts_with("451 4.7.1 Greylisted"), "{text}");
        // Tag, log and off never hold up RCPT; the message shows what each does.
        for (action, shown, logged) in [
            ("tag", "fail", "fail"),
            ("log", "none", "fail"),
            ("off", "none", "none"),
        ] {
            let (s, _dns) = start(&[("HELOGUARD_HELO_POLICY", &format!("{check}={action}"))]);
            let xhc = x_helo_check(&deliver_as(&s, client, helo));
            assert_eq!(value(&xhc, check), Some(shown), "{check}={action}: {xhc}");
            let log = wait_log(&s, "helo verdict");
            assert!(
                log.contains(&format!("{check}:{logged}")),
                "{check}={action} logs {logged}: {log}"
            );
        }
    }
}

#[test]
fn a_check_that_is_off_is_not_looked_up() {
    let (s, dns) = start(&[("HELOGUARD_HELO_POLICY", "dnsbl=off,rhsbl=off")]);
    let xhc = x_helo_check(&deliver_as(&s, "198.51.100.20", "mail.spammy.example"));
    assert_eq!(value(&xhc, "rhsbl"), Some("none"), "{xhc}");
    assert_eq!(value(&xhc, "dnsbl"), Some("none"), "{xhc}");
    assert_eq!(dns.count("spammy.example.dbl.test", RecordType::A), 0);
    assert_eq!(
        dns.count(&list_name(ip("198.51.100.20"), "bl1.test"), RecordType::A),
        0
    );
}

// ---- display names ----

#[test]
fn a_zone_with_an_access_key_shows_only_its_display_name() {
    const KEY: &str = "k3yk3yk3y";
    let keyed = format!("{KEY}.zen.dq.test");
    let wl = format!("{KEY}.wl.dq.test");
    let z = aligned(TestZone::new(), "192.0.2.40", "c40.example.com")
        .listed(&keyed, ip("192.0.2.40"), "127.0.0.2")
        .listed(&wl, ip("192.0.2.40"), "127.0.10.1");
    let (s, _dns) = start_with(
        z,
        &[
            (
                "HELOGUARD_DNSBL",
                &format!("{keyed}=127.0.0.[2..11]*5 {wl}=127.0.[0..255].[1..3]*-1"),
            ),
            (
                "HELOGUARD_DNSBL_DISPLAY",
                &format!("{keyed}=zen.spamhaus.org,{wl}=list.dnswl.org"),
            ),
            ("HELOGUARD_RHSBL", ""),
            ("HELOGUARD_HELO_POLICY", "dnsbl=reject"),
        ],
    );
    let mut c = open(&s, "192.0.2.40");
    c.cmd("EHLO c40.example.com", 250);
    c.cmd("MAIL FROM:<a@example.org>", 250);
    c.send(b"RCPT TO:<b@example.net>\r\n");
    let (code, text) = c.reply();
    assert_eq!(code, 550, "{text}");
    assert!(!text.contains(KEY), "{text}");
    c.cmd("QUIT", 221);
    // Tagged, so the header shows the zones too.
    let (s2, _dns2) = start_with(
        aligned(TestZone::new(), "192.0.2.40", "c40.example.com")
            .listed(&keyed, ip("192.0.2.40"), "127.0.0.2")
            .listed(&wl, ip("192.0.2.40"), "127.0.10.1"),
        &[
            ("HELOGUARD_DNSBL", &format!("{keyed}*5 {wl}*-1")),
            (
                "HELOGUARD_DNSBL_DISPLAY",
                &format!("{keyed}=zen.spamhaus.org {wl}=list.dnswl.org"),
            ),
        ],
    );
    let msg = deliver_as(&s2, "192.0.2.40", "c40.example.com");
    assert!(!msg.contains(KEY), "{msg}");
    assert!(
        auth_results(&msg).contains("dnswl=pass dns.zone=list.dnswl.org policy.ip=127.0.10.1"),
        "{msg}"
    );
    for server in [&s, &s2] {
        let metrics = scrape(server.metrics_addr.expect("metrics address"));
        assert!(!metrics.contains(KEY), "{metrics}");
        assert!(
            metrics.contains("heloguard_dnsbl_listings_total{zone=\"zen.spamhaus.org\"}"),
            "{metrics}"
        );
        let log = wait_log(server, "helo verdict");
        assert!(log.contains("configuration:"), "{log}");
        assert!(!log.contains(KEY), "{log}");
    }
}

#[test]
fn a_bad_list_stops_startup_naming_the_variable() {
    for (name, bad) in [
        ("HELOGUARD_DNSBL", "zen.test=127.0.0.[2..x]"),
        ("HELOGUARD_DNSBL", "zen.test*heavy"),
        ("HELOGUARD_RHSBL", "dbl.test*2"),
        ("HELOGUARD_DNSBL_DISPLAY", "zen.test"),
        ("HELOGUARD_DNSBL_THRESHOLD", "one"),
        ("HELOGUARD_DNSWL_THRESHOLD", "3"),
        ("HELOGUARD_SPF_TIMEOUT_MS", "0"),
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_heloguard"))
            .env_clear()
            .env("HELOGUARD_DNS", "127.0.0.1:53")
            .env(name, bad)
            .output()
            .expect("run heloguard");
        assert_eq!(out.status.code(), Some(2), "{name}={bad}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(name), "{name}={bad}: {err}");
    }
}

// ---- head of line ----

/// Sessions whose list queries never come back hold up no other session, and are answered
/// at their deadline as not listed (never deferred).
#[test]
fn a_slow_list_holds_up_no_other_session() {
    const SLOW: usize = 20;
    const FAST: usize = 30;
    const TIMEOUT_MS: u64 = 3000;
    let slow_ip = |i: usize| format!("203.0.113.{}", 10 + i);
    let fast_ip = |i: usize| format!("198.18.{}.{}", i / 200, 1 + i % 200);
    let mut z = TestZone::new();
    for i in 0..SLOW {
        z = aligned(z, &slow_ip(i), &format!("slow-{i}.example.com"))
            .blackhole_listed("bl1.test", ip(&slow_ip(i)));
    }
    for i in 0..FAST {
        z = aligned(z, &fast_ip(i), &format!("fast-{i}.example.com"));
    }
    let (s, _dns) = start_with(
        z,
        &[
            ("HELOGUARD_DNSBL", "bl1.test"),
            ("HELOGUARD_RHSBL", ""),
            ("HELOGUARD_HELO_POLICY", "dnsbl=reject"),
            ("HELOGUARD_DNS_TIMEOUT_MS", &TIMEOUT_MS.to_string()),
            ("HELOGUARD_MAX_CONNECTIONS_PER_IP", "0"),
        ],
    );
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
    let fast_started = Instant::now();
    for i in 0..FAST {
        let msg = deliver_as(&s, &fast_ip(i), &format!("fast-{i}.example.com"));
        assert_eq!(value(&x_helo_check(&msg), "dnsbl"), Some("pass"));
    }
    let fast_done = Instant::now();
    // The slow sessions' verdicts are due 2 x TIMEOUT_MS after their EHLO: the fast ones
    // finish well before that, and (below) before any slow one is answered.
    assert!(
        fast_done - fast_started < Duration::from_millis(2 * TIMEOUT_MS),
        "{FAST} sessions took {:?} while {SLOW} waited on a silent list",
        fast_done - fast_started
    );
    for w in slow_waiters {
        let ((code, text), at) = w.join().expect("slow session");
        // Not listing: accepted, never 451.
        assert_eq!(code, 250, "{text}");
        assert!(
            at >= fast_done,
            "a slow session was answered before the fast ones"
        );
        assert!(at - slow_started < Duration::from_millis(2 * TIMEOUT_MS + 2500));
    }
}

// ---- spf ----

/// Clients and HELO names with every SPF result (RFC 7208 2.6).
fn spf_zone() -> TestZone {
    let z = TestZone::new();
    let z = aligned(z, "192.0.2.60", "spf-pass.example.com")
        .txt("spf-pass.example.com", &["v=spf1 ip4:192.0.2.60 -all"]);
    let z = aligned(z, "192.0.2.61", "spf-fail.example.com")
        .txt("spf-fail.example.com", &["v=spf1 ", "-all"]);
    let z = aligned(z, "192.0.2.62", "spf-soft.example.com")
        .txt("spf-soft.example.com", &["v=spf1 ~all"]);
    let z = aligned(z, "192.0.2.63", "spf-neutral.example.com")
        .txt("spf-neutral.example.com", &["v=spf1 ?all"]);
    let z = aligned(z, "192.0.2.64", "spf-none.example.com");
    let z = aligned(z, "192.0.2.65", "spf-temp.example.com")
        .servfail_type("spf-temp.example.com", RecordType::TXT);
    let z = aligned(z, "192.0.2.66", "spf-loop.example.com").txt(
        "spf-loop.example.com",
        &["v=spf1 include:spf-loop.example.com -all"],
    );
    let many = (0..11)
        .map(|i| format!("a:h{i}.example.com"))
        .collect::<Vec<_>>()
        .join(" ");
    let mut z = aligned(z, "192.0.2.67", "spf-many.example.com")
        .txt("spf-many.example.com", &[&format!("v=spf1 {many} -all")]);
    for i in 0..11 {
        z = z.a(&format!("h{i}.example.com"), "198.51.100.99");
    }
    let z = aligned(z, "192.0.2.68", "spf-syntax.example.com")
        .txt("spf-syntax.example.com", &["v=spf1 frobnicate:x -all"]);
    // ptr reuses the session's FCrDNS answers.
    aligned(z, "192.0.2.69", "spf-ptr.example.com").txt("spf-ptr.example.com", &["v=spf1 ptr -all"])
}

#[test]
fn each_spf_result_in_both_headers() {
    let (s, _dns) = start_with(
        spf_zone(),
        &[
            ("HELOGUARD_HELO_POLICY", "spf=tag"),
            ("HELOGUARD_DNSBL", ""),
            ("HELOGUARD_RHSBL", ""),
        ],
    );
    for (client, helo, spf, check, want_verdict) in [
        ("192.0.2.60", "spf-pass.example.com", "pass", "pass", "pass"),
        ("192.0.2.61", "spf-fail.example.com", "fail", "fail", "fail"),
        (
            "192.0.2.62",
            "spf-soft.example.com",
            "softfail",
            "none",
            "pass",
        ),
        (
            "192.0.2.63",
            "spf-neutral.example.com",
            "neutral",
            "none",
            "pass",
        ),
        ("192.0.2.64", "spf-none.example.com", "none", "none", "pass"),
        (
            "192.0.2.65",
            "spf-temp.example.com",
            "temperror",
            "temperror",
            "temperror",
        ),
        (
            "192.0.2.66",
            "spf-loop.example.com",
            "permerror",
            "none",
            "pass",
        ),
        (
            "192.0.2.67",
            "spf-many.example.com",
            "permerror",
            "none",
            "pass",
        ),
        (
            "192.0.2.68",
            "spf-syntax.example.com",
            "permerror",
            "none",
            "pass",
        ),
        ("192.0.2.69", "spf-ptr.example.com", "pass", "pass", "pass"),
    ] {
        let msg = deliver_as(&s, client, helo);
        let xhc = x_helo_check(&msg);
        assert_eq!(value(&xhc, "spf"), Some(check), "{helo}: {xhc}");
        assert_eq!(verdict(&xhc), want_verdict, "{helo}: {xhc}");
        // No dnsbl_score without HELOGUARD_DNSBL.
        assert_eq!(value(&xhc, "dnsbl_score"), None, "{xhc}");
        let ar = auth_results(&msg);
        assert!(
            ar.contains(&format!("; spf={spf} smtp.helo={helo}")),
            "{helo}: {ar}"
        );
    }
    let metrics = scrape(s.metrics_addr.expect("metrics address"));
    assert!(
        metrics.contains("heloguard_dns_queries_total{type=\"TXT\",outcome=\"ok\"}"),
        "{metrics}"
    );
}

#[test]
fn spf_under_each_action() {
    let fail = ("192.0.2.61", "spf-fail.example.com");
    for (policy, code) in [
        ("spf=reject", 550),
        ("spf=defer", 450),
        // The first sight of a triplet is greylisted (the embedded store).
        ("spf=greylist", 451),
    ] {
        let (s, _dns) = start_with(
            spf_zone(),
            &[("HELOGUARD_HELO_POLICY", policy), ("HELOGUARD_DNSBL", "")],
        );
        let mut c = open(&s, fail.0);
        c.cmd(&format!("EHLO {}", fail.1), 250);
        c.cmd("MAIL FROM:<a@example.org>", 250);
        c.send(b"RCPT TO:<b@example.net>\r\n");
        let (got, text) = c.reply();
        assert_eq!(got, code, "{policy}: {text}");
        if code == 550 {
            assert!(text.contains("spf"), "{text}");
            assert!(text.contains("RFC 7208"), "{text}");
        }
    }
    // A DNS error under a refusing action is 451, never 5xx.
    let (s, _dns) = start_with(
        spf_zone(),
        &[
            ("HELOGUARD_HELO_POLICY", "spf=reject"),
            ("HELOGUARD_DNSBL", ""),
        ],
    );
    let mut c = open(&s, "192.0.2.65");
    c.cmd("EHLO spf-temp.example.com", 250);
    c.cmd("MAIL FROM:<a@example.org>", 250);
    c.send(b"RCPT TO:<b@example.net>\r\n");
    let (got, text) = c.reply();
    assert_eq!(got, 451, "{text}");
    // log: the header shows none, the log line the real result, and no A-R spf part.
    for (action, shown) in [("log", "none"), ("off", "none")] {
        let (s, dns) = start_with(
            spf_zone(),
            &[
                ("HELOGUARD_HELO_POLICY", &format!("spf={action}")),
                ("HELOGUARD_DNSBL", ""),
            ],
        );
        let msg = deliver_as(&s, fail.0, fail.1);
        assert_eq!(value(&x_helo_check(&msg), "spf"), Some(shown), "{action}");
        assert!(!auth_results(&msg).contains("spf="), "{action}: {msg}");
        let log = wait_log(&s, "helo verdict");
        let real = if action == "log" {
            "spf:fail"
        } else {
            "spf:none"
        };
        assert!(log.contains(real), "{action}: {log}");
        let asked = dns.count("spf-fail.example.com", RecordType::TXT);
        assert_eq!(asked, usize::from(action == "log"), "{action}");
    }
}

/// A client seen again within the answers' TTL is answered from the known answers: the lists
/// are not asked twice (the test zone's TTL is 60 s).
#[test]
fn known_list_answers_are_reused_within_their_ttl() {
    let (s, dns) = start(&[("HELOGUARD_DNSBL", "bl1.test=127.0.0.[2..11]*2 bl2.test")]);
    for _ in 0..3 {
        let xhc = x_helo_check(&deliver_as(&s, "192.0.2.10", "c10.example.com"));
        assert_eq!(value(&xhc, "dnsbl_score"), Some("2"), "{xhc}");
        let xhc = x_helo_check(&deliver_as(&s, "198.51.100.20", "mail.spammy.example"));
        assert_eq!(value(&xhc, "rhsbl"), Some("fail"), "{xhc}");
    }
    assert_eq!(
        dns.count(&list_name(ip("192.0.2.10"), "bl1.test"), RecordType::A),
        1
    );
    assert_eq!(
        dns.count(&list_name(ip("192.0.2.10"), "bl2.test"), RecordType::A),
        1
    );
    assert_eq!(dns.count("spammy.example.dbl.test", RecordType::A), 1);
}

/// SPF whose evaluation outlasts the verdict deadline (four answers of 250 ms each, one after
/// the other; the deadline at 600 ms): waited for under a refusing action, temperror under tag.
#[test]
fn the_verdict_waits_for_spf_only_when_its_action_refuses() {
    let slow = Duration::from_millis(250);
    let zone = || {
        aligned(TestZone::new(), "192.0.2.80", "spf-slow.example.com")
            .txt(
                "spf-slow.example.com",
                &["v=spf1 include:_a.spf-slow.example.com -all"],
            )
            .txt(
                "_a.spf-slow.example.com",
                &["v=spf1 include:_b.spf-slow.example.com ?all"],
            )
            .txt(
                "_b.spf-slow.example.com",
                &["v=spf1 a:_c.spf-slow.example.com ?all"],
            )
            .a("_c.spf-slow.example.com", "198.51.100.99")
            .delay("spf-slow.example.com", slow)
            .delay("_a.spf-slow.example.com", slow)
            .delay("_b.spf-slow.example.com", slow)
            .delay("_c.spf-slow.example.com", slow)
            .ttl(0)
    };
    let env = |policy: &'static str| {
        [
            ("HELOGUARD_HELO_POLICY", policy),
            ("HELOGUARD_DNSBL", ""),
            ("HELOGUARD_RHSBL", ""),
        ]
    };
    let (s, _dns) = start_with(zone(), &env("spf=reject"));
    let mut c = open(&s, "192.0.2.80");
    c.cmd("EHLO spf-slow.example.com", 250);
    c.cmd("MAIL FROM:<a@example.org>", 250);
    c.send(b"RCPT TO:<b@example.net>\r\n");
    let (code, text) = c.reply();
    assert_eq!(code, 550, "{text}");
    assert!(text.contains("spf"), "{text}");
    drop(s);

    let (s, _dns) = start_with(zone(), &env("spf=tag"));
    let msg = deliver_as(&s, "192.0.2.80", "spf-slow.example.com");
    let xhc = x_helo_check(&msg);
    assert_eq!(value(&xhc, "spf"), Some("temperror"), "{xhc}");
}
