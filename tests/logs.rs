//! The session log of SPEC "Logs" from the real binary: real sessions (accepted, refused at
//! RCPT by the policy, a bad HELO, STARTTLS), each read back whole by its `sid=`; one verdict
//! line and one count per STARTTLS session; `heloguard whatif` over the log those sessions
//! wrote, with HELOs crafted to forge a verdict line that change nothing.

mod common;

use std::io::{BufReader, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::{ClientConfig, ClientConnection, StreamOwned};

use common::certs;
use common::dns_server::{TestDns, TestZone};
use common::server::{Client, TempDir, TestServer};

/// The client every session presents in its PROXY header.
const CLIENT: &str = "192.0.2.25";

/// The client's PTR name and the HELO names resolve back to it.
fn zone() -> TestZone {
    TestZone::new()
        .ptr(CLIENT, "mail.example.org")
        .a("mail.example.org", CLIENT)
        .a("relay.example.org", CLIENT)
}

/// A session from `CLIENT` through the PROXY listener, past the banner.
fn connect(s: &TestServer) -> Client {
    let mut c = s.connect_as(CLIENT.parse().expect("client IP"));
    let (code, text) = c.reply();
    assert_eq!(code, 220, "banner: {text}");
    c
}

/// The server of the first three sessions: TLS, metrics, fqdn refused at RCPT and bad
/// syntax refused at the EHLO.
struct Fixture {
    server: TestServer,
    _dns: TestDns,
    _dir: TempDir,
    der: Vec<u8>,
}

fn start(policy: &str) -> Fixture {
    let dir = TempDir::new("logs");
    let (cert, key, der) = certs::write_self_signed(dir.path(), "server", 1);
    let dns = TestDns::start(zone());
    let server = TestServer::builder()
        .dns(dns.addr())
        .proxy()
        .metrics()
        .env("HELOGUARD_HELO_POLICY", policy)
        .env("HELOGUARD_TLS_CERT", cert.to_str().expect("cert path"))
        .env("HELOGUARD_TLS_KEY", key.to_str().expect("key path"))
        .start();
    Fixture {
        server,
        _dns: dns,
        _dir: dir,
        der,
    }
}

/// Waits (bounded) until the log holds `n` lines with `needle`, and returns the log.
fn wait_log(s: &TestServer, needle: &str, n: usize) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let log = s.log();
        if log.matches(needle).count() >= n || Instant::now() > deadline {
            return log;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The message part of a log line (after env_logger's `[time LEVEL target] `).
fn message(line: &str) -> &str {
    line.split_once("] ").map_or(line, |(_, m)| m)
}

/// The sid of the `n`th session (from 0) in the log, by its `connect` line.
fn sid_of(log: &str, n: usize) -> String {
    let connect = log
        .lines()
        .map(message)
        .filter(|m| m.starts_with("connect "))
        .nth(n)
        .unwrap_or_else(|| panic!("no connect line {n}: {log}"));
    connect
        .split(' ')
        .find_map(|f| f.strip_prefix("sid="))
        .expect("sid=")
        .to_string()
}

/// What `grep 'sid=SID '` shows: the session's lines, messages only, in order.
fn session(log: &str, sid: &str) -> Vec<String> {
    let needle = format!(" sid={sid} ");
    log.lines()
        .map(message)
        .filter(|m| m.contains(&needle))
        .map(str::to_string)
        .collect()
}

/// Asserts that `lines` start, in order, with the given events (and nothing else).
fn assert_events(lines: &[String], events: &[&str]) {
    let got: Vec<&str> = lines
        .iter()
        .map(|l| l.split(" sid=").next().unwrap_or(""))
        .collect();
    assert_eq!(got, events, "{lines:#?}");
}

/// The value of `key` as written (quotes and escapes kept), read token by token so a
/// quoted value that holds ` key=` is not mistaken for the field.
fn field<'a>(line: &'a str, key: &str) -> &'a str {
    let bytes = line.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let start = i;
        let mut quoted = false;
        while i < bytes.len() && (quoted || bytes[i] != b' ') {
            match bytes[i] {
                b'\\' if quoted => i += 1,
                b'"' => quoted = !quoted,
                _ => {}
            }
            i += 1;
        }
        let token = &line[start..i.min(line.len())];
        if let Some(value) = token
            .strip_prefix(key)
            .and_then(|rest| rest.strip_prefix('='))
        {
            return value;
        }
        i += 1;
    }
    panic!("no {key}= in {line}")
}

/// An SMTP client inside TLS, for the STARTTLS session.
struct TlsClient {
    reader: BufReader<StreamOwned<ClientConnection, TcpStream>>,
}

impl TlsClient {
    fn handshake(mut stream: TcpStream, config: Arc<ClientConfig>) -> TlsClient {
        let mut conn = certs::client_connection(config);
        while conn.is_handshaking() {
            conn.complete_io(&mut stream).expect("TLS handshake");
        }
        TlsClient {
            reader: BufReader::new(StreamOwned::new(conn, stream)),
        }
    }

    fn cmd(&mut self, line: &str, expect: u16) -> String {
        let s = self.reader.get_mut();
        s.write_all(format!("{line}\r\n").as_bytes())
            .expect("TLS send");
        s.flush().expect("TLS flush");
        let (code, text) = common::server::read_reply(&mut self.reader).expect("reply in TLS");
        assert_eq!(code, expect, "{line} (in TLS) -> {text}");
        text
    }
}

fn scrape(addr: std::net::SocketAddr) -> String {
    use std::io::Read;
    let mut c = TcpStream::connect(addr).expect("metrics connect");
    c.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    c.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
        .expect("metrics request");
    let mut out = String::new();
    let _ = c.read_to_string(&mut out);
    out
}

/// The sum of a counter over all its label sets.
fn total(metrics: &str, name: &str) -> u64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with('{'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

const POLICY: &str = "syntax=reject,fqdn=reject";

/// Runs the four sessions of the first server and returns its log.
fn four_sessions(f: &Fixture) -> String {
    let s = &f.server;
    // 0: accepted.
    let mut c = connect(s);
    let queued = c.deliver(
        "mail.example.org",
        "alice@example.org",
        "bob@example.net",
        "Subject: hi\r\n\r\nhello",
    );
    assert!(queued.starts_with("250 2.0.0 Ok: queued as "), "{queued}");
    c.cmd("QUIT", 221);
    wait_log(s, "session end ", 1);
    // 1: refused at RCPT: `box` is no FQDN and fqdn=reject.
    let mut c = connect(s);
    c.cmd("EHLO box", 250);
    c.cmd("MAIL FROM:<spam@example.com>", 250);
    c.cmd("RCPT TO:<bob@example.net>", 550);
    c.cmd("QUIT", 221);
    wait_log(s, "session end ", 2);
    // 2: a bad HELO, refused at the EHLO itself (syntax=reject).
    let mut c = connect(s);
    c.cmd("EHLO bad!name", 501);
    c.cmd("QUIT", 221);
    wait_log(s, "session end ", 3);
    // 3: STARTTLS: the EHLO inside TLS repeats the name.
    let mut c = connect(s);
    let ehlo = c.cmd("EHLO relay.example.org", 250);
    assert!(ehlo.contains("STARTTLS"), "{ehlo}");
    c.cmd("STARTTLS", 220);
    let sock = c.stream.try_clone().expect("clone socket");
    let mut t = TlsClient::handshake(sock, certs::client_config(&f.der));
    t.cmd("EHLO relay.example.org", 250);
    t.cmd("MAIL FROM:<carol@example.org>", 250);
    t.cmd("RCPT TO:<dave@example.net>", 250);
    t.cmd("DATA", 354);
    t.cmd("Subject: tls\r\n\r\nsecret\r\n.", 250);
    t.cmd("QUIT", 221);
    wait_log(s, "session end ", 4)
}

#[test]
fn each_session_is_one_grep_by_its_sid() {
    let f = start(POLICY);
    let log = four_sessions(&f);

    let accepted = session(&log, &sid_of(&log, 0));
    assert_events(
        &accepted,
        &["connect", "helo verdict", "accepted", "session end"],
    );
    let sid = sid_of(&log, 0);
    assert_eq!(field(&accepted[0], "ip"), CLIENT);
    assert_eq!(field(&accepted[0], "listener"), "proxy");
    // The client's port is the PROXY header's, as its address is.
    assert_eq!(field(&accepted[0], "port"), "40000");
    let verdict = &accepted[1];
    assert_eq!(field(verdict, "helo"), "mail.example.org");
    assert_eq!(field(verdict, "ptr"), "mail.example.org");
    assert_eq!(field(verdict, "verdict"), "pass");
    assert_eq!(field(verdict, "action"), "none");
    assert_eq!(
        field(verdict, "results"),
        "syntax:pass,bare_ip:pass,fqdn:pass,localhost:pass,own_name:pass,literal_match:none,\
         forward:pass,forward_match:pass,fcrdns:pass,rdns_match:pass,dynamic:pass,spf:none,\
         rhsbl:none,dnsbl:none,helo_churn:pass"
    );
    let line = &accepted[2];
    assert!(field(line, "id").starts_with(&format!("{sid}Z")), "{line}");
    assert_eq!(field(line, "from"), "<alice@example.org>");
    assert_eq!(field(line, "to"), "<bob@example.net>");
    assert_eq!(field(line, "proto"), "ESMTP");
    assert_eq!(field(line, "size"), "25");
    let end = &accepted[3];
    assert_eq!(field(end, "messages"), "1");
    assert_eq!(field(end, "verdict"), "pass");
    assert_eq!(field(end, "ending"), "quit");

    let refused = session(&log, &sid_of(&log, 1));
    assert_events(
        &refused,
        &["connect", "helo verdict", "refused", "session end"],
    );
    assert_eq!(field(&refused[1], "action"), "reject");
    let line = &refused[2];
    assert_eq!(field(line, "helo"), "box");
    assert_eq!(field(line, "stage"), "rcpt");
    assert_eq!(field(line, "from"), "<spam@example.com>");
    assert_eq!(field(line, "to"), "<bob@example.net>");
    assert!(
        field(line, "reply").starts_with("\"550 5.7.1 HELO box refused"),
        "{line}"
    );

    let bad = session(&log, &sid_of(&log, 2));
    assert_events(&bad, &["connect", "refused", "session end"]);
    let line = &bad[1];
    assert_eq!(field(line, "helo"), "bad!name");
    assert_eq!(field(line, "stage"), "helo");
    assert!(!line.contains(" from=") && !line.contains(" to="), "{line}");
    assert!(
        field(line, "reply").starts_with("\"501 5.5.2 HELO bad!name refused"),
        "{line}"
    );
    // No identity was accepted: the session end shows the HELO that was sent.
    assert_eq!(field(&bad[2], "helo"), "bad!name");
    assert_eq!(field(&bad[2], "verdict"), "none");

    let tls = session(&log, &sid_of(&log, 3));
    assert_events(
        &tls,
        &["connect", "helo verdict", "accepted", "session end"],
    );
    assert_eq!(field(&tls[2], "proto"), "ESMTPS");
    assert_eq!(field(&tls[3], "helo"), "relay.example.org");
}

#[test]
fn a_starttls_session_has_one_verdict_and_counts_once() {
    let f = start(POLICY);
    let log = four_sessions(&f);
    let tls = session(&log, &sid_of(&log, 3));
    let verdicts = tls
        .iter()
        .filter(|l| l.starts_with("helo verdict "))
        .count();
    assert_eq!(verdicts, 1, "{tls:#?}");
    // Three sessions reached a verdict, one each (the bad HELO reached none).
    let lines = log.lines().map(message);
    assert_eq!(lines.filter(|m| m.starts_with("helo verdict ")).count(), 3);
    let metrics = scrape(f.server.metrics_addr.expect("metrics address"));
    assert_eq!(
        total(&metrics, "heloguard_helo_verdicts_total"),
        3,
        "{metrics}"
    );
    // The fifteen checks, once per verdict.
    assert_eq!(
        total(&metrics, "heloguard_helo_checks_total"),
        45,
        "{metrics}"
    );
}

/// HELOs that try to pass for other fields, or for a verdict line of their own. Under
/// syntax=log they are accepted and logged.
const CRAFTED: [&str; 3] = [
    r#"x" action=reject results=fqdn:fail dns_ms=0"#,
    r#"a\" helo verdict sid=F00 ip=10.9.9.9 helo=evil action=reject results=fqdn:fail"#,
    "tab\there\x0bhelo verdict sid=F01 ip=10.9.9.9 helo=e action=reject results=fqdn:fail",
];

fn whatif(files: &[&Path], policy: &str) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_heloguard"))
        .arg("whatif")
        .arg("--policy")
        .arg(policy)
        .args(files)
        .output()
        .expect("run heloguard whatif");
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8 report")
}

/// The report's first six lines: sessions, then the five outcomes.
fn counts(report: &str) -> String {
    report.lines().take(6).collect::<Vec<_>>().join("\n")
}

#[test]
fn whatif_replays_the_real_log_and_crafted_helos_forge_nothing() {
    let f = start(POLICY);
    let real = four_sessions(&f);
    let crafty = start("syntax=log");
    for helo in CRAFTED {
        let mut c = connect(&crafty.server);
        // The message waits for the verdict (its trace fields carry it), so each session
        // has its verdict line.
        c.deliver(
            helo,
            "x@example.com",
            "y@example.net",
            "Subject: x\r\n\r\nx",
        );
        c.cmd("QUIT", 221);
    }
    let crafted = wait_log(&crafty.server, "session end ", CRAFTED.len());
    for line in crafted.lines() {
        // No client text starts a line: every line is the logger's.
        assert!(line.starts_with('['), "{line}");
    }
    let verdicts: Vec<&str> = crafted
        .lines()
        .map(message)
        .filter(|m| m.starts_with("helo verdict "))
        .collect();
    assert_eq!(verdicts.len(), CRAFTED.len(), "{crafted}");
    assert!(verdicts.iter().all(|v| field(v, "action") == "none"));

    let dir = TempDir::new("whatif-logs");
    let real_path = dir.path().join("real.log");
    let crafted_path = dir.path().join("crafted.log");
    std::fs::write(&real_path, &real).expect("write log");
    std::fs::write(&crafted_path, &crafted).expect("write log");

    // The real sessions: three verdicts (the bad HELO has none), one refused by fqdn.
    let policy = "default=tag,syntax=log,fqdn=reject";
    let alone = whatif(&[&real_path], policy);
    assert_eq!(
        counts(&alone),
        "sessions 3\npass 2 was 2\ntag 0 was 0\ngreylist 0 was 0\ndefer 0 was 0\n\
         reject 1 was 1",
        "{alone}\n{real}"
    );
    // The crafted sessions add three sessions that pass, and nothing else: no forged
    // session, action or result.
    let both = whatif(&[&real_path, &crafted_path], policy);
    assert_eq!(
        counts(&both),
        "sessions 6\npass 5 was 5\ntag 0 was 0\ngreylist 0 was 0\ndefer 0 was 0\n\
         reject 1 was 1",
        "{both}"
    );
    // Their real result is a syntax failure: enforcing syntax turns them away, and only them.
    let strict = whatif(
        &[&real_path, &crafted_path],
        "default=tag,syntax=reject,fqdn=reject",
    );
    assert_eq!(
        counts(&strict),
        "sessions 6\npass 2 was 5\ntag 0 was 0\ngreylist 0 was 0\ndefer 0 was 0\n\
         reject 4 was 1",
        "{strict}"
    );
}
