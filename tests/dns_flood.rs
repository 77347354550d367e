//! One connection pipelines thousands of EHLOs with distinct names whose lookups never
//! answer, while an honest client comes in: the flood must neither delay the honest client's
//! verdict nor make the server ask DNS without bound (SPEC "Memory", HELOGUARD_MAX_JUNK,
//! HELOGUARD_DNS_BUDGET).
//!
//! HELOGUARD_FLOOD_EHLOS scales the flood (default 3000, a couple of seconds); the test prints
//! the queries the DNS server saw, the honest client's verdict time and the server's memory.

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::dns_server::{TestDns, TestZone};
use common::server::{TestServer, read_reply};

/// HELOGUARD_DNS_TIMEOUT_MS here: the honest verdict is due 2 x this after its EHLO.
const DNS_TIMEOUT_MS: u64 = 500;

const HONEST_IP: &str = "192.0.2.41";
const HONEST_NAME: &str = "honest.example.com";

/// The server's resident memory now and at its peak, in KiB (Linux /proc).
fn memory_kib(pid: u32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse::<u64>().ok())
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

fn flood_size() -> usize {
    std::env::var("HELOGUARD_FLOOD_EHLOS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3000)
}

#[test]
fn an_ehlo_flood_is_cut_at_the_junk_limit_and_does_not_delay_an_honest_verdict() {
    let ehlos = flood_size();
    let mut zone = TestZone::new()
        .addr(HONEST_NAME, HONEST_IP)
        .ptr(HONEST_IP, HONEST_NAME);
    for i in 0..ehlos {
        zone = zone.blackhole(&format!("flood{i}.example.net"));
    }
    let dns = TestDns::start(zone);
    let server = TestServer::builder()
        .proxy()
        .dns(dns.addr())
        .env("HELOGUARD_DNS_TIMEOUT_MS", &DNS_TIMEOUT_MS.to_string())
        // The verdict gates RCPT, so the RCPT reply shows when it came and what fcrdns was.
        .env("HELOGUARD_HELO_POLICY", "default=tag,fcrdns=defer")
        .start();
    let pid = server.child.id();
    let before = memory_kib(pid);

    let mut flood = TcpStream::connect(server.addr).expect("connect flood");
    flood
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let mut commands = Vec::with_capacity(ehlos * 32);
    for i in 0..ehlos {
        write!(commands, "EHLO flood{i}.example.net\r\n").expect("in memory");
    }
    let mut reader = std::io::BufReader::new(flood.try_clone().expect("clone"));
    let (code, banner) = read_reply(&mut reader).expect("flood banner");
    assert_eq!(code, 220, "{banner}");
    let sender = std::thread::spawn(move || {
        // The server closes after the junk limit, so the tail of the flood may not be taken.
        let _ = flood.write_all(&commands);
    });

    // The honest client comes while the flood is being read.
    std::thread::sleep(Duration::from_millis(100));
    let mut honest = server.connect_as(HONEST_IP.parse().expect("address"));
    let (code, banner) = honest.reply();
    assert_eq!(code, 220, "{banner}");
    let started = Instant::now();
    honest.cmd(&format!("EHLO {HONEST_NAME}"), 250);
    honest.cmd("MAIL FROM:<a@honest.example.com>", 250);
    honest.send(b"RCPT TO:<postmaster@mx.heloguard.test>\r\n");
    let (rcpt, rcpt_text) = honest.reply();
    let verdict_after = started.elapsed();
    let stored = if rcpt == 250 {
        honest.cmd("DATA", 354);
        honest.send(b"Subject: hello\r\n\r\nhi\r\n.\r\n");
        let (code, text) = honest.reply();
        assert_eq!(code, 250, "end of data -> {text}");
        let message = server.wait_messages(1);
        std::fs::read_to_string(&message[0]).expect("stored message")
    } else {
        String::new()
    };

    // The flood gets 250s up to the junk limit, then 421 4.7.0 and the end.
    let mut last = None;
    let mut answered = 0;
    while let Some((code, text)) = read_reply(&mut reader) {
        answered += 1;
        let closing = code == 421;
        last = Some((code, text));
        if closing || answered == ehlos {
            break;
        }
    }
    let _ = sender.join();
    // Let the lookups the flood started run out before counting what reached DNS.
    std::thread::sleep(Duration::from_millis(2 * DNS_TIMEOUT_MS));
    let queries = dns.queries().len();
    let after = memory_kib(pid);
    eprintln!(
        "dns_flood: ehlos={ehlos} answered={answered} queries={queries} \
         honest_verdict_ms={} honest_rcpt={rcpt} rss_kib_before={:?} rss_kib_after={:?} \
         (VmRSS, VmHWM)",
        verdict_after.as_millis(),
        before,
        after,
    );
    assert_eq!(rcpt, 250, "RCPT -> {rcpt_text}");
    let (code, text) = last.expect("the flood got replies");
    assert!(code == 421 && text.starts_with("421 4.7.0"), "{text}");
    let unfolded = stored
        .replace("\r\n", "\n")
        .replace("\n ", " ")
        .replace("\n\t", " ");
    let check = unfolded
        .lines()
        .find(|l| l.starts_with("X-HELO-Check:"))
        .unwrap_or_default();
    assert!(check.contains("fcrdns=pass"), "{check}");
    assert!(
        verdict_after < Duration::from_millis(2 * DNS_TIMEOUT_MS),
        "the honest verdict took {verdict_after:?}"
    );
    // Budget (100) for the flood, a few for the honest client, and the lookups a stopped
    // request had already sent.
    assert!(queries <= 130, "{queries} DNS queries");
}

#[test]
fn one_session_stops_causing_queries_at_its_dns_budget() {
    const BUDGET: usize = 20;
    const EHLOS: usize = 60;
    let mut zone = TestZone::new();
    // NODATA for A makes each name cost two queries (A, then AAAA).
    for i in 0..=EHLOS {
        zone = zone.nodata(&format!("nd{i}.example.net"));
    }
    let dns = TestDns::start(zone);
    let server = TestServer::builder()
        .proxy()
        .dns(dns.addr())
        .env("HELOGUARD_DNS_TIMEOUT_MS", &DNS_TIMEOUT_MS.to_string())
        .env("HELOGUARD_MAX_JUNK", "0")
        .env("HELOGUARD_DNS_BUDGET", &BUDGET.to_string())
        // The verdict gates RCPT, so the RCPT reply shows what forward became.
        .env("HELOGUARD_HELO_POLICY", "default=tag,forward=defer")
        .start();
    // A client with no PTR record: its reverse lookup is one query the DNS server sees.
    let mut client = server.connect_as("192.0.2.77".parse().expect("address"));
    let (code, banner) = client.reply();
    assert_eq!(code, 220, "{banner}");
    for i in 0..EHLOS {
        client.cmd(&format!("EHLO nd{i}.example.net"), 250);
        // Time for the lookup to be made, so each EHLO would cost its queries.
        std::thread::sleep(Duration::from_millis(20));
    }
    let spent = dns.queries().len();
    // Past the budget an EHLO's lookup is not made: its undecided check answers at once.
    client.cmd(&format!("EHLO nd{EHLOS}.example.net"), 250);
    client.cmd("MAIL FROM:<a@example.net>", 250);
    let started = Instant::now();
    client.send(b"RCPT TO:<postmaster@mx.heloguard.test>\r\n");
    let (code, text) = client.reply();
    let waited = started.elapsed();
    eprintln!(
        "dns_budget: budget={BUDGET} ehlos={EHLOS} queries={spent} rcpt={code} after {waited:?}"
    );
    assert!(
        (BUDGET..=BUDGET + 2).contains(&spent),
        "{spent} queries for a budget of {BUDGET}"
    );
    assert_eq!(dns.queries().len(), spent);
    assert_eq!(code / 100, 4, "{text}");
    assert!(waited < Duration::from_millis(DNS_TIMEOUT_MS), "{waited:?}");
}
