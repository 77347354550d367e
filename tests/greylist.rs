//! Greylisting and helo_churn with the embedded state store, through the real server: a test
//! DNS zone where one client has a dynamic PTR name (`dynamic=greylist` picks it) and one is
//! clean, both presented through the PROXY listener.

mod common;

use std::time::{Duration, Instant};

use common::dns_server::{TestDns, TestZone};
use common::server::{Client, TempDir, TestServer};
use common::state::{CLEAN_IP, CLEAN_NAME, DYNAMIC_IP, DYNAMIC_NAME, ip, sample, scrape, zone};

/// HELOGUARD_GREYLIST_DELAY for these tests.
const DELAY: Duration = Duration::from_secs(2);

fn server(dns: &TestDns, extra: &[(&str, &str)]) -> TestServer {
    let mut b = TestServer::builder()
        .proxy()
        .metrics()
        .dns(dns.addr())
        .env("HELOGUARD_DOMAINS", "example.org")
        .env("HELOGUARD_HELO_POLICY", "default=tag,dynamic=greylist")
        .env("HELOGUARD_GREYLIST_DELAY", "2s");
    for (k, v) in extra {
        b = b.env(k, v);
    }
    b.start()
}

/// A session from `client` up to MAIL.
fn mail_from(s: &TestServer, client: &str, helo: &str, from: &str) -> Client {
    let mut c = s.connect_as(ip(client));
    let (code, banner) = c.reply();
    assert_eq!(code, 220, "{banner}");
    c.cmd(&format!("EHLO {helo}"), 250);
    c.cmd(&format!("MAIL FROM:<{from}>"), 250);
    c
}

fn rcpt(c: &mut Client, to: &str) -> (u16, String) {
    c.send(format!("RCPT TO:<{to}>\r\n").as_bytes());
    c.reply()
}

fn greylisted(s: &TestServer, outcome: &str) -> u64 {
    let text = scrape(s.metrics_addr.expect("metrics"));
    sample(
        &text,
        &format!("heloguard_greylist_total{{outcome=\"{outcome}\"}}"),
    )
}

#[test]
fn a_greylisted_triplet_is_deferred_until_the_delay_then_passes_and_postmaster_never_waits() {
    let dns = TestDns::start(zone());
    let s = server(&dns, &[]);
    let first_sight = Instant::now();
    let mut c = mail_from(&s, DYNAMIC_IP, DYNAMIC_NAME, "alice@example.net");
    let (code, text) = rcpt(&mut c, "bob@example.org");
    assert_eq!(code, 451, "{text}");
    assert!(
        text.starts_with("451 4.7.1 ") && text.contains("try again in 2 seconds"),
        "{text}"
    );
    // postmaster is never greylisted, bare or at our domain.
    c.cmd("RCPT TO:<postmaster@example.org>", 250);
    c.cmd("RCPT TO:<postmaster>", 250);
    // A retry before the delay is deferred again.
    let (code, text) = rcpt(&mut c, "bob@example.org");
    assert_eq!(code, 451, "{text}");
    c.cmd("QUIT", 221);

    // The clean client's checks earn nothing: no greylisting at all.
    let mut clean = mail_from(&s, CLEAN_IP, CLEAN_NAME, "carol@example.org");
    clean.cmd("RCPT TO:<bob@example.org>", 250);
    clean.cmd("QUIT", 221);

    std::thread::sleep(DELAY.saturating_sub(first_sight.elapsed()) + Duration::from_millis(200));
    let mut c = mail_from(&s, DYNAMIC_IP, DYNAMIC_NAME, "alice@example.net");
    c.cmd("RCPT TO:<bob@example.org>", 250);
    c.cmd("DATA", 354);
    c.send(b"Subject: retried\r\n\r\nhello\r\n.\r\n");
    assert_eq!(c.reply().0, 250);
    // Passed triplets pass at once from then on, from another address of the same pool
    // provider too (the client is the PTR name's registered domain).
    c.cmd("MAIL FROM:<alice@example.net>", 250);
    c.cmd("RCPT TO:<bob@example.org>", 250);
    c.cmd("QUIT", 221);
    assert_eq!(s.wait_messages(1).len(), 1);

    assert_eq!(greylisted(&s, "new"), 1);
    assert_eq!(greylisted(&s, "early"), 1);
    assert_eq!(greylisted(&s, "passed"), 1);
    assert_eq!(greylisted(&s, "known"), 1);
    assert_eq!(greylisted(&s, "unavailable"), 0);
    let metrics = scrape(s.metrics_addr.expect("metrics"));
    assert_eq!(sample(&metrics, "heloguard_state_errors_total"), 0);
}

#[test]
fn greylisting_451s_count_toward_max_errors() {
    let dns = TestDns::start(zone());
    let s = server(&dns, &[("HELOGUARD_MAX_ERRORS", "2")]);
    let mut c = mail_from(&s, DYNAMIC_IP, DYNAMIC_NAME, "flood@example.net");
    for to in ["a@example.org", "b@example.org"] {
        let (code, text) = rcpt(&mut c, to);
        assert_eq!(code, 451, "{text}");
    }
    // The third error is past the limit of two.
    c.send(b"RCPT TO:<c@example.org>\r\n");
    let (code, text) = c.reply();
    assert_eq!(code, 451, "{text}");
    let (code, text) = c.reply();
    assert_eq!(code, 421, "{text}");
    assert!(text.starts_with("421 4.7.0"), "{text}");
    assert!(c.is_closed());
}

/// The state file's lines after the version line, by kind (`g` triplets, `h` histories).
fn saved_entries(path: &std::path::Path, kind: &str) -> usize {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .skip(1)
        .filter(|l| l.starts_with(&format!("{kind} ")))
        .count()
}

fn stop(s: &mut TestServer) {
    s.signal(libc::SIGTERM);
    assert_eq!(s.wait_exit(Duration::from_secs(20)), Some(0), "{}", s.log());
}

#[test]
fn triplets_are_kept_across_a_restart() {
    let dns = TestDns::start(zone());
    let dir = TempDir::new("greylist-restart");
    let file = dir.path().join("heloguard.state");
    let file_env = file.to_str().expect("utf-8 path");
    let mut first = server(&dns, &[("HELOGUARD_STATE_FILE", file_env)]);
    let first_sight = Instant::now();
    let mut c = mail_from(&first, DYNAMIC_IP, DYNAMIC_NAME, "alice@example.net");
    assert_eq!(rcpt(&mut c, "bob@example.org").0, 451);
    c.cmd("QUIT", 221);
    stop(&mut first);
    assert_eq!(saved_entries(&file, "g"), 1, "saved at shutdown");

    let second = server(&dns, &[("HELOGUARD_STATE_FILE", file_env)]);
    assert!(second.log().contains("entries loaded"), "{}", second.log());
    std::thread::sleep(DELAY.saturating_sub(first_sight.elapsed()) + Duration::from_millis(200));
    // Had the triplet been lost, this would be a first sight (451).
    let mut c = mail_from(&second, DYNAMIC_IP, DYNAMIC_NAME, "alice@example.net");
    c.cmd("RCPT TO:<bob@example.org>", 250);
    c.cmd("QUIT", 221);
    assert_eq!(greylisted(&second, "passed"), 1);
}

#[test]
fn a_flood_of_distinct_triplets_stays_bounded_and_entries_expire() {
    let dns = TestDns::start(zone());
    let mut s = server(
        &dns,
        &[
            ("HELOGUARD_MAX_ERRORS", "0"),
            ("HELOGUARD_STATE_MAX_ENTRIES", "50"),
            ("HELOGUARD_GREYLIST_RETRY", "3s"),
        ],
    );
    let mut c = mail_from(&s, DYNAMIC_IP, DYNAMIC_NAME, "flood@example.net");
    for n in 0..300 {
        let (code, text) = rcpt(&mut c, &format!("user{n}@example.org"));
        assert_eq!(code, 451, "{text}");
    }
    c.cmd("QUIT", 221);
    assert_eq!(greylisted(&s, "new"), 300);
    let file = s.spool.path().join("heloguard.state");
    // Past the retry window every triplet has expired: the save at shutdown drops them.
    std::thread::sleep(Duration::from_millis(3200));
    stop(&mut s);
    assert_eq!(saved_entries(&file, "g"), 0);
    assert_eq!(saved_entries(&file, "h"), 1, "the client's HELO history");

    // Without expiry, the bound holds: at most 50 entries of all kinds.
    let mut s = server(
        &dns,
        &[
            ("HELOGUARD_MAX_ERRORS", "0"),
            ("HELOGUARD_STATE_MAX_ENTRIES", "50"),
        ],
    );
    let mut c = mail_from(&s, DYNAMIC_IP, DYNAMIC_NAME, "flood@example.net");
    for n in 0..300 {
        assert_eq!(rcpt(&mut c, &format!("user{n}@example.org")).0, 451);
    }
    c.cmd("QUIT", 221);
    let file = s.spool.path().join("heloguard.state");
    stop(&mut s);
    assert_eq!(saved_entries(&file, "g") + saved_entries(&file, "h"), 50);
}

/// helo_churn with the default limit of 5 names an hour: the 6th distinct name fails, over
/// two sessions, and so does every name while six stand; a local client gives none.
#[test]
fn the_sixth_distinct_helo_name_within_the_hour_fails_helo_churn() {
    let dns = TestDns::start(TestZone::new());
    let s = TestServer::builder()
        .proxy()
        .dns(dns.addr())
        .env("HELOGUARD_DOMAINS", "example.org")
        .env("HELOGUARD_HELO_POLICY", "default=log,helo_churn=reject")
        .start();
    let client = ip("198.51.100.7");
    let session = |names: &[&str]| {
        let mut c = s.connect_as(client);
        assert_eq!(c.reply().0, 220);
        for name in names {
            c.cmd(&format!("EHLO {name}"), 250);
        }
        c.cmd("MAIL FROM:<x@example.net>", 250);
        c.send(b"RCPT TO:<y@example.org>\r\n");
        let reply = c.reply();
        c.cmd("QUIT", 221);
        reply
    };
    assert_eq!(
        session(&["a1.example.net", "A2.example.net.", "a3.example.net"]).0,
        250
    );
    // a2 again, case and trailing dot aside: not a new name.
    assert_eq!(
        session(&["a2.example.net", "a4.example.net", "a5.example.net"]).0,
        250
    );
    let (code, text) = session(&["a6.example.net"]);
    assert_eq!(code, 550, "{text}");
    assert!(text.contains("helo_churn"), "{text}");
    // While six names stand in the hour, a name seen before fails too.
    assert_eq!(session(&["a1.example.net"]).0, 550);

    // A local client is never counted: helo_churn is none.
    let mut c = s.connect();
    for n in 0..8 {
        c.cmd(&format!("EHLO local{n}.example.net"), 250);
    }
    c.cmd("MAIL FROM:<x@example.net>", 250);
    c.cmd("RCPT TO:<y@example.org>", 250);
}
