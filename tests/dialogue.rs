//! The whole ESMTP dialogue against the real binary on an ephemeral loopback port.

mod common;

use std::time::Duration;

use common::dns_server::{TestDns, TestZone};
use common::server::{Client, TestServer, proxy_v1};

fn server() -> (TestServer, TestDns) {
    let dns = TestDns::start(TestZone::default());
    let s = TestServer::builder().dns(dns.addr()).proxy().start();
    (s, dns)
}

fn read(path: &std::path::Path) -> Vec<u8> {
    std::fs::read(path).expect("read message")
}

#[test]
fn a_whole_dialogue_stores_the_message_with_envelope_and_trace_fields() {
    let (s, _dns) = server();
    let mut c = s.connect();
    let ehlo = c.cmd("EHLO client.example.org", 250);
    for kw in [
        "PIPELINING",
        "SIZE 26214400",
        "8BITMIME",
        "ENHANCEDSTATUSCODES",
        "SMTPUTF8",
        "CHUNKING",
    ] {
        assert!(ehlo.contains(kw), "EHLO lacks {kw}: {ehlo}");
    }
    assert!(!ehlo.contains("STARTTLS"), "no TLS configured: {ehlo}");
    c.cmd("MAIL FROM:<alice@example.org>", 250);
    c.cmd("RCPT TO:<bob@example.net>", 250);
    c.cmd("DATA", 354);
    c.send(b"Subject: hi\r\n\r\nHello\r\n..leading dot\r\n.\r\n");
    let (code, text) = c.reply();
    assert_eq!(code, 250, "{text}");
    assert!(text.starts_with("250 2.0.0"), "{text}");
    c.cmd("QUIT", 221);
    assert!(c.is_closed());
    let files = s.wait_messages(1);
    assert_eq!(files.len(), 1);
    let msg = String::from_utf8(read(&files[0])).unwrap();
    assert!(msg.starts_with("Return-Path: <alice@example.org>\r\nX-Envelope-To: <bob@example.net>\r\nReceived: from client.example.org ("), "{msg}");
    assert!(
        msg.contains("by mx.heloguard.test (heloguard) with ESMTP id "),
        "{msg}"
    );
    assert!(msg.contains("for <bob@example.net>; "), "{msg}");
    assert!(
        msg.contains("\r\nAuthentication-Results: mx.heloguard.test; iprev="),
        "{msg}"
    );
    assert!(
        msg.contains("\r\nX-HELO-Check: mx.heloguard.test; "),
        "{msg}"
    );
    assert!(
        msg.ends_with("Subject: hi\r\n\r\nHello\r\n.leading dot\r\n"),
        "{msg}"
    );
}

#[test]
fn pipelined_commands_in_one_write_get_their_replies_in_order() {
    let (s, _dns) = server();
    let mut c = s.connect();
    c.send(b"EHLO p.example.org\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nRCPT TO:<c@example.net>\r\nDATA\r\n");
    assert_eq!(c.reply().0, 250);
    assert_eq!(c.reply().0, 250);
    assert_eq!(c.reply().0, 250);
    assert_eq!(c.reply().0, 250);
    assert_eq!(c.reply().0, 354);
    c.send(b"one\r\n.\r\nRSET\r\nNOOP\r\nQUIT\r\n");
    assert_eq!(c.reply().0, 250);
    assert_eq!(c.reply().0, 250);
    assert_eq!(c.reply().0, 250);
    assert_eq!(c.reply().0, 221);
    let files = s.wait_messages(1);
    let msg = String::from_utf8(read(&files[0])).unwrap();
    assert!(msg.contains("X-Envelope-To: <b@example.net>\r\nX-Envelope-To: <c@example.net>\r\n"));
    // Two recipients: no `for <...>` (RFC 5321 7.2).
    assert!(!msg.contains("\tfor <"), "{msg}");
}

#[test]
fn bdat_chunks_and_eight_bit_bodies_are_stored_byte_exact() {
    let (s, _dns) = server();
    let mut c = s.connect();
    c.cmd("EHLO b.example.org", 250);
    c.cmd("MAIL FROM:<a@example.org> BODY=8BITMIME", 250);
    c.cmd("RCPT TO:<b@example.net>", 250);
    let part1: &[u8] = b"Subject: \xc3\xa9t\xc3\xa9\r\n\r\nLine with . and \xff\xfe bytes\r\n";
    let part2: &[u8] = b".not stuffed in BDAT\r\n";
    c.send(format!("BDAT {}\r\n", part1.len()).as_bytes());
    c.send(part1);
    assert_eq!(c.reply().0, 250);
    c.send(format!("BDAT {} LAST\r\n", part2.len()).as_bytes());
    c.send(part2);
    let (code, text) = c.reply();
    assert_eq!(code, 250, "{text}");
    let files = s.wait_messages(1);
    let msg = read(&files[0]);
    let mut expected = part1.to_vec();
    expected.extend_from_slice(part2);
    assert!(msg.ends_with(&expected));
}

#[test]
fn smuggling_variants_never_end_data_or_inject_a_command() {
    let (s, _dns) = server();
    for variant in [&b"\n.\n"[..], b"\r.\r", b"\n.\r\n", b"\r\n.\n"] {
        let mut c = s.connect();
        c.cmd("EHLO smuggler.example.org", 250);
        c.cmd("MAIL FROM:<a@example.org>", 250);
        c.cmd("RCPT TO:<b@example.net>", 250);
        c.cmd("DATA", 354);
        let mut body = b"Subject: x\r\n\r\nfirst".to_vec();
        body.extend_from_slice(variant);
        body.extend_from_slice(
            b"MAIL FROM:<evil@example.org>\r\nRCPT TO:<victim@example.net>\r\nDATA\r\n",
        );
        c.send(&body);
        c.send(b"\r\n.\r\n");
        let (code, text) = c.reply();
        // One reply for the whole message: the injected commands are message text.
        assert_eq!(code, 250, "{text}");
        c.cmd("QUIT", 221);
    }
    let files = s.wait_messages(4);
    assert_eq!(files.len(), 4);
    for f in files {
        let msg = read(&f);
        assert!(
            msg.windows(12).any(|w| w == b"MAIL FROM:<e"),
            "injected text stays in the body"
        );
    }
}

#[test]
fn an_overlong_command_line_gets_500_and_the_session_goes_on() {
    let (s, _dns) = server();
    let mut c = s.connect();
    let long = format!("NOOP {}", "x".repeat(600));
    let text = c.cmd(&long, 500);
    assert!(text.starts_with("500 5.5.6"), "{text}");
    c.cmd("NOOP", 250);
    // A megabyte without a line end: bounded, refused when the line finally ends.
    c.send(&vec![b'a'; 1 << 20]);
    let mut other = s.connect();
    other.cmd("NOOP", 250);
    c.send(b"\r\n");
    let (code, _) = c.reply();
    assert_eq!(code, 500);
    c.cmd("QUIT", 221);
}

#[test]
fn a_client_that_half_closes_after_its_last_command_still_gets_every_reply() {
    let (s, _dns) = server();
    let mut c = s.connect();
    c.cmd("EHLO client.example.org", 250);
    // The whole transaction and QUIT in one write, then the client's side is shut: the
    // message's 250 comes only after the spool writer is done, and must still be sent.
    c.send(
        b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n\
          Subject: half\r\n\r\nbody\r\n.\r\nQUIT\r\n",
    );
    c.stream
        .shutdown(std::net::Shutdown::Write)
        .expect("half-close");
    let codes: Vec<u16> = std::iter::from_fn(|| c.try_reply().map(|(code, _)| code)).collect();
    assert_eq!(codes, [250, 250, 354, 250, 221]);
    assert_eq!(s.wait_messages(1).len(), 1);
}

#[test]
fn a_client_that_disconnects_mid_data_leaves_nothing() {
    let (s, _dns) = server();
    let mut c = s.connect();
    c.cmd("EHLO gone.example.org", 250);
    c.cmd("MAIL FROM:<a@example.org>", 250);
    c.cmd("RCPT TO:<b@example.net>", 250);
    c.cmd("DATA", 354);
    c.send(b"Subject: half\r\n\r\nhalf a message\r\n");
    drop(c);
    // The server still serves others afterwards, and stored nothing.
    let mut d = s.connect();
    d.cmd("NOOP", 250);
    d.cmd("QUIT", 221);
    assert!(s.new_messages().is_empty());
}

#[test]
fn idle_clients_get_421_after_the_timeout() {
    let dns = TestDns::start(TestZone::default());
    let s = TestServer::builder()
        .dns(dns.addr())
        .env("HELOGUARD_TIMEOUT_SECS", "1")
        .start();
    let mut c = s.connect();
    c.cmd("EHLO idle.example.org", 250);
    let (code, text) = c.reply();
    assert_eq!(code, 421, "{text}");
    assert!(text.starts_with("421 4.4.2"), "{text}");
    assert!(c.is_closed());
}

#[test]
fn the_per_ip_limit_refuses_only_the_excess_connection() {
    let dns = TestDns::start(TestZone::default());
    let s = TestServer::builder()
        .dns(dns.addr())
        .env("HELOGUARD_MAX_CONNECTIONS_PER_IP", "2")
        .start();
    let mut a = s.connect();
    let mut b = s.connect();
    let mut c = Client::connect_raw(s.addr);
    let (code, text) = c.reply();
    assert_eq!(code, 421, "{text}");
    assert!(text.starts_with("421 4.3.2"), "{text}");
    a.cmd("NOOP", 250);
    b.cmd("NOOP", 250);
    drop(a);
    // A slot is free again once a connection closes.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let mut d = Client::connect_raw(s.addr);
        if d.reply().0 == 220 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "slot never freed");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn proxy_v1_and_v2_headers_set_the_client_ip() {
    let (s, _dns) = server();
    let mut c = s.connect_as("192.0.2.10".parse().unwrap());
    assert_eq!(c.reply().0, 220);
    c.deliver(
        "v1.example.org",
        "a@example.org",
        "b@example.net",
        "Subject: v1\r\n\r\nx",
    );
    c.cmd("QUIT", 221);

    // v2: signature, PROXY command, TCP over IPv6, addresses and ports.
    let mut v2 = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    v2.extend_from_slice(&[0x21, 0x21, 0, 36]);
    let src: std::net::Ipv6Addr = "2001:db8::7".parse().unwrap();
    v2.extend_from_slice(&src.octets());
    v2.extend_from_slice(&std::net::Ipv6Addr::LOCALHOST.octets());
    v2.extend_from_slice(&40000u16.to_be_bytes());
    v2.extend_from_slice(&25u16.to_be_bytes());
    let mut c = Client::connect_raw(s.proxy_addr.unwrap());
    c.send(&v2);
    assert_eq!(c.reply().0, 220);
    c.deliver(
        "v2.example.org",
        "a@example.org",
        "b@example.net",
        "Subject: v2\r\n\r\nx",
    );
    c.cmd("QUIT", 221);

    let files = s.wait_messages(2);
    let all: Vec<String> = files
        .iter()
        .map(|f| String::from_utf8(read(f)).unwrap())
        .collect();
    assert!(
        all.iter()
            .any(|m| m.contains("[192.0.2.10]") && m.contains("ip=192.0.2.10 ")),
        "{all:?}"
    );
    assert!(
        all.iter()
            .any(|m| m.contains("[IPv6:2001:db8::7]") && m.contains("ip=2001:db8::7 ")),
        "{all:?}"
    );
}

#[test]
fn bad_or_missing_proxy_headers_close_without_a_banner() {
    let (s, _dns) = server();
    let proxy = s.proxy_addr.unwrap();
    let mut c = Client::connect_raw(proxy);
    c.send(b"EHLO not-a-proxy-header\r\n");
    assert!(c.try_reply().is_none(), "no banner for a bad header");

    let mut c = Client::connect_raw(proxy);
    c.send(b"PROXY TCP4 999.0.2.1 127.0.0.1 1 25\r\n");
    assert!(c.try_reply().is_none());

    // On the plain listener a PROXY line is just an unknown command.
    let mut c = s.connect();
    let text = c.cmd(proxy_v1("192.0.2.1".parse().unwrap()).trim_end(), 500);
    assert!(text.starts_with("500 5.5.2"), "{text}");
}

#[test]
fn a_thousand_concurrent_sessions_each_deliver_one_message() {
    let dns = TestDns::start(TestZone::default());
    let s = TestServer::builder()
        .dns(dns.addr())
        .env("HELOGUARD_MAX_CONNECTIONS_PER_IP", "0")
        .env("HELOGUARD_MAX_CONNECTIONS", "0")
        .start();
    let addr = s.addr;
    let threads: Vec<_> = (0..20)
        .map(|t| {
            std::thread::spawn(move || {
                // 50 open sessions per thread, driven step by step so all 1000 overlap.
                let mut clients: Vec<Client> = (0..50).map(|_| Client::connect(addr)).collect();
                for c in clients.iter_mut() {
                    c.send(b"EHLO many.example.org\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n");
                }
                for (i, c) in clients.iter_mut().enumerate() {
                    for expect in [250, 250, 250, 354] {
                        assert_eq!(c.reply().0, expect);
                    }
                    c.send(format!("Subject: {t}-{i}\r\n\r\nbody\r\n.\r\nQUIT\r\n").as_bytes());
                }
                for c in clients.iter_mut() {
                    assert_eq!(c.reply().0, 250);
                    assert_eq!(c.reply().0, 221);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("client thread");
    }
    assert_eq!(s.wait_messages(1000).len(), 1000);
}

#[test]
fn lettre_delivers_through_the_server() {
    use lettre::{Message, SmtpTransport, Transport};
    let (s, _dns) = server();
    let mailer = SmtpTransport::builder_dangerous("127.0.0.1")
        .port(s.addr.port())
        .timeout(Some(Duration::from_secs(10)))
        .build();
    let email = Message::builder()
        .from("Alice <alice@example.org>".parse().unwrap())
        .to("Bob <bob@example.net>".parse().unwrap())
        .subject("from lettre")
        .body(String::from(
            "Hello from a real client.\n.leading dot line\n",
        ))
        .unwrap();
    mailer.send(&email).expect("lettre send");
    let files = s.wait_messages(1);
    let msg = String::from_utf8(read(&files[0])).unwrap();
    assert!(msg.contains("Subject: from lettre"), "{msg}");
    assert!(msg.contains("\r\n.leading dot line"), "{msg}");
}

#[test]
fn invalid_configuration_stops_startup_naming_the_variable() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_heloguard"))
        .env("HELOGUARD_MAX_RECIPIENTS", "many")
        .env("HELOGUARD_DNS", "127.0.0.1:53")
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("HELOGUARD_MAX_RECIPIENTS"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
}
