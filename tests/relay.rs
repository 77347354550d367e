//! Relay modes: heloguard as a before-queue proxy in front of a real next hop.

mod common;

use std::io::BufReader;
use std::net::{SocketAddr, TcpListener};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::dns_server::{TestDns, TestZone};
use common::server::TestServer;

/// A second heloguard in Maildir mode, the next hop.
fn next_hop(dns: &TestDns, extra: &[(&str, &str)]) -> TestServer {
    let mut b = TestServer::builder()
        .dns(dns.addr())
        .env("HELOGUARD_HOSTNAME", "nexthop.heloguard.test")
        .env("HELOGUARD_DOMAINS", "example.net");
    for (k, v) in extra {
        b = b.env(k, v);
    }
    b.start()
}

fn relay_to(dns: &TestDns, target: &str) -> TestServer {
    TestServer::builder()
        .dns(dns.addr())
        .env("HELOGUARD_DELIVER", target)
        .env("HELOGUARD_DOMAINS", "example.net,other.test")
        .start()
}

#[test]
fn relayed_messages_arrive_byte_exact_with_our_trace_fields_once() {
    let dns = TestDns::start(TestZone::new());
    let hop = next_hop(&dns, &[]);
    let relay = relay_to(&dns, &format!("smtp://{}", hop.addr));
    let mut c = relay.connect();
    let body = "Subject: relayed\r\nX-HELO-Check: mx.heloguard.test; pass forged\r\n\r\n\
                8-bit \u{e9}t\u{e9}\r\n.leading dot\r\nend\r\n";
    c.cmd("EHLO client.example.org", 250);
    c.cmd("MAIL FROM:<alice@example.org> BODY=8BITMIME", 250);
    c.cmd("RCPT TO:<bob@example.net>", 250);
    c.cmd("DATA", 354);
    c.send(body.replace("\r\n.", "\r\n..").as_bytes());
    c.send(b".\r\n");
    let (code, text) = c.reply();
    assert_eq!(code, 250, "{text}");
    c.cmd("QUIT", 221);
    // The client's 250 came after the next hop's: the file is already there.
    let files = hop.new_messages();
    assert_eq!(files.len(), 1, "{}", relay.log());
    assert!(relay.new_messages().is_empty(), "relay mode keeps no spool");
    // The log's `accepted` line carries the next hop's own reply to the end of data.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !relay.log().contains("session end ") && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let log = relay.log();
    let accepted = log
        .lines()
        .find(|l| l.contains("] accepted sid="))
        .unwrap_or_else(|| panic!("no accepted line: {log}"));
    assert!(
        accepted.contains(" from=<alice@example.org> to=<bob@example.net> "),
        "{accepted}"
    );
    assert!(accepted.contains(" relay=\"250 2.0.0 "), "{accepted}");
    let msg = String::from_utf8(std::fs::read(&files[0]).unwrap()).unwrap();
    // Next hop's fields first, then ours (once), then the message as sent minus the forgery.
    let hop_received = msg.find("by nexthop.heloguard.test (heloguard)").unwrap();
    let our_received = msg.find("by mx.heloguard.test (heloguard)").unwrap();
    assert!(hop_received < our_received, "{msg}");
    assert_eq!(msg.matches("by mx.heloguard.test (heloguard)").count(), 1);
    assert_eq!(
        msg.matches("Authentication-Results: mx.heloguard.test;")
            .count(),
        1
    );
    assert_eq!(msg.matches("X-HELO-Check: mx.heloguard.test;").count(), 1);
    assert!(!msg.contains("pass forged"), "{msg}");
    // Return-Path and X-Envelope-To are the next hop's (Maildir-only fields), not ours.
    assert_eq!(msg.matches("Return-Path:").count(), 1);
    assert!(
        msg.ends_with("Subject: relayed\r\n\r\n8-bit \u{e9}t\u{e9}\r\n.leading dot\r\nend\r\n"),
        "{msg}"
    );
}

#[test]
fn the_next_hops_refusals_reach_the_client() {
    let dns = TestDns::start(TestZone::new());
    let hop = next_hop(&dns, &[]);
    let relay = relay_to(&dns, &format!("smtp://{}", hop.addr));
    let mut c = relay.connect();
    c.cmd("EHLO client.example.org", 250);
    c.cmd("MAIL FROM:<alice@example.org>", 250);
    // other.test is ours but not the next hop's: its 550 comes through.
    let text = c.cmd("RCPT TO:<carol@other.test>", 550);
    assert!(text.contains("5.7.1"), "{text}");
    c.cmd("RCPT TO:<bob@example.net>", 250);
    c.cmd("DATA", 354);
    c.send(b"Subject: one of two\r\n\r\nx\r\n.\r\n");
    assert_eq!(c.reply().0, 250);
    let files = hop.wait_messages(1);
    let msg = String::from_utf8(std::fs::read(&files[0]).unwrap()).unwrap();
    assert!(msg.contains("X-Envelope-To: <bob@example.net>") && !msg.contains("carol"));

    // A 4xx from the next hop (its spool "full") is a 4xx for the client, never a 250.
    let full = next_hop(&dns, &[("HELOGUARD_MIN_FREE_MB", "999999999")]);
    let relay = relay_to(&dns, &format!("smtp://{}", full.addr));
    let mut c = relay.connect();
    c.cmd("EHLO client.example.org", 250);
    let text = c.cmd("MAIL FROM:<alice@example.org>", 452);
    assert!(text.contains("4.3.1"), "{text}");
}

#[test]
fn a_next_hop_that_is_down_or_dies_mid_data_gives_4xx_and_never_250() {
    let dns = TestDns::start(TestZone::new());
    // Nothing listens on this port.
    let closed = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let relay = relay_to(&dns, &format!("smtp://{closed}"));
    let mut c = relay.connect();
    c.cmd("EHLO client.example.org", 250);
    let text = c.cmd("MAIL FROM:<alice@example.org>", 451);
    assert!(text.contains("4.4.1"), "{text}");
    c.cmd("QUIT", 221);

    let mut hop = next_hop(&dns, &[]);
    let relay = relay_to(&dns, &format!("smtp://{}", hop.addr));
    let mut c = relay.connect();
    c.cmd("EHLO client.example.org", 250);
    c.cmd("MAIL FROM:<alice@example.org>", 250);
    c.cmd("RCPT TO:<bob@example.net>", 250);
    c.cmd("DATA", 354);
    c.send(b"Subject: doomed\r\n\r\nfirst half\r\n");
    let _ = hop.child.kill();
    let _ = hop.child.wait();
    c.send(b"second half\r\n.\r\n");
    let (code, text) = c.reply();
    assert!((400..500).contains(&code), "{text}");
    assert!(hop.new_messages().is_empty());
}

/// An LMTP next hop that gives every recipient `reply` after the data.
fn lmtp_responder(reply: &'static str) -> (SocketAddr, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let seen2 = seen.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let seen = seen2.clone();
            std::thread::spawn(move || {
                let out = stream.try_clone().unwrap();
                common::lmtp::serve(BufReader::new(stream), out, &seen, &|_| reply.to_string());
            });
        }
    });
    (addr, seen)
}

#[test]
fn lmtp_takes_one_recipient_per_transaction_and_its_reply_is_the_answer() {
    let dns = TestDns::start(TestZone::new());
    let (addr, seen) = lmtp_responder("250 2.0.0 delivered");
    let relay = relay_to(&dns, &format!("lmtp://{addr}"));
    let mut c = relay.connect();
    c.cmd("EHLO client.example.org", 250);
    c.cmd("MAIL FROM:<alice@example.org>", 250);
    c.cmd("RCPT TO:<bob@example.net>", 250);
    // A second recipient waits for the next transaction (RFC 5321 clients retry 452).
    let text = c.cmd("RCPT TO:<carol@example.net>", 452);
    assert!(text.contains("4.5.3"), "{text}");
    c.cmd("DATA", 354);
    c.send(b"Subject: lmtp\r\n\r\nhi\r\n.\r\n");
    assert_eq!(c.reply().0, 250);
    c.cmd("QUIT", 221);
    let seen = seen.lock().unwrap().clone();
    assert!(
        seen.iter().any(|l| l.starts_with("LHLO mx.heloguard.test")),
        "{seen:?}"
    );
    assert_eq!(
        seen.iter().filter(|l| l.starts_with("RCPT")).count(),
        1,
        "{seen:?}"
    );

    // A per-recipient temporary failure after the data is the client's answer.
    let (addr, _seen) = lmtp_responder("452 4.2.2 mailbox full");
    let relay = relay_to(&dns, &format!("lmtp://{addr}"));
    let mut c = relay.connect();
    c.cmd("EHLO client.example.org", 250);
    c.cmd("MAIL FROM:<alice@example.org>", 250);
    c.cmd("RCPT TO:<bob@example.net>", 250);
    c.cmd("DATA", 354);
    c.send(b"Subject: lmtp\r\n\r\nhi\r\n.\r\n");
    let (code, text) = c.reply();
    assert_eq!(code, 452, "{text}");
}

#[test]
fn relay_modes_refuse_to_start_without_domains() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_heloguard"))
        .env("HELOGUARD_DELIVER", "smtp://127.0.0.1:10025")
        .env("HELOGUARD_DNS", "127.0.0.1:53")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("HELOGUARD_DOMAINS"), "{err}");
}

#[test]
fn large_and_chunked_messages_relay_byte_exact_and_late_refusals_store_nothing() {
    let dns = TestDns::start(TestZone::new());
    let hop = next_hop(&dns, &[]);
    let relay = relay_to(&dns, &format!("smtp://{}", hop.addr));
    let mut c = relay.connect();
    c.cmd("EHLO client.example.org", 250);
    // 4 MiB through DATA, in many writes.
    c.cmd("MAIL FROM:<alice@example.org>", 250);
    c.cmd("RCPT TO:<bob@example.net>", 250);
    c.cmd("DATA", 354);
    let line = format!("{}\r\n", "y".repeat(78));
    let mut body = String::from("Subject: big\r\n\r\n");
    while body.len() < 4 << 20 {
        body.push_str(&line);
    }
    for piece in body.as_bytes().chunks(60_000) {
        c.send(piece);
    }
    c.send(b".\r\n");
    assert_eq!(c.reply().0, 250);
    // BDAT in two chunks.
    c.cmd("MAIL FROM:<alice@example.org>", 250);
    c.cmd("RCPT TO:<bob@example.net>", 250);
    let part1 = b"Subject: chunked\r\n\r\n.first\r\n";
    let part2 = b"second\r\n";
    c.send(format!("BDAT {}\r\n", part1.len()).as_bytes());
    c.send(part1);
    assert_eq!(c.reply().0, 250);
    c.send(format!("BDAT {} LAST\r\n", part2.len()).as_bytes());
    c.send(part2);
    assert_eq!(c.reply().0, 250);
    // An overlong line is refused at the end; the next hop never sees a final dot.
    c.cmd("MAIL FROM:<alice@example.org>", 250);
    c.cmd("RCPT TO:<bob@example.net>", 250);
    c.cmd("DATA", 354);
    c.send(format!("Subject: refused\r\n\r\n{}\r\n.\r\n", "z".repeat(2000)).as_bytes());
    let (code, text) = c.reply();
    assert_eq!(code, 550, "{text}");
    c.cmd("QUIT", 221);

    let files = hop.wait_messages(2);
    assert_eq!(files.len(), 2);
    let all: Vec<Vec<u8>> = files.iter().map(|f| std::fs::read(f).unwrap()).collect();
    assert!(
        all.iter().any(|m| m.ends_with(body.as_bytes())),
        "4 MiB body byte-exact"
    );
    assert!(
        all.iter()
            .any(|m| m.ends_with(b"Subject: chunked\r\n\r\n.first\r\nsecond\r\n"))
    );
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        hop.new_messages().len(),
        2,
        "the refused message was never completed"
    );
}

#[test]
fn the_message_reaches_the_next_hop_before_the_client_has_finished() {
    let dns = TestDns::start(TestZone::new());
    let (addr, seen) = lmtp_responder("250 2.0.0 delivered");
    let relay = relay_to(&dns, &format!("lmtp://{addr}"));
    let mut c = relay.connect();
    c.cmd("EHLO client.example.org", 250);
    c.cmd("MAIL FROM:<alice@example.org>", 250);
    c.cmd("RCPT TO:<bob@example.net>", 250);
    c.cmd("DATA", 354);
    c.send(b"Subject: streamed\r\n\r\n");
    c.send(format!("{}\r\n", "s".repeat(70)).repeat(1000).as_bytes());
    // Before the final dot the next hop already has the header and body lines.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let lines = seen.lock().unwrap().clone();
        if lines.iter().any(|l| l == "DATA") && partial_body(&lines) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "nothing streamed: {lines:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    c.send(b".\r\n");
    assert_eq!(c.reply().0, 250);
}

/// The LMTP responder records `PARTIAL` once 10 kB of body lines arrived, `BODY n` at the
/// dot: a `PARTIAL` before the client's dot shows the message streams.
fn partial_body(lines: &[String]) -> bool {
    lines.iter().any(|l| l.starts_with("PARTIAL"))
}
