//! STARTTLS end to end against the real binary: advertisement, real TLS clients (rustls and
//! lettre), the RFC 3207 rules (plaintext injection, EHLO again, 503s), broken and silent
//! handshakes, certificate reload on SIGHUP, and session resumption (TLS 1.3 tickets, TLS 1.2
//! tickets and session ids, across a reload).

mod common;

use std::io::{BufReader, ErrorKind, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::client::{Resumption, Tls12Resumption};
use rustls::{ClientConfig, ClientConnection, HandshakeKind, StreamOwned};

use common::certs;
use common::dns_server::{TestDns, TestZone};
use common::server::{HOSTNAME, TempDir, TestServer};

/// A server with a fresh self-signed pair (serial 1) on disk, and a DNS responder.
struct TlsFixture {
    server: TestServer,
    _dns: TestDns,
    dir: TempDir,
    cert: PathBuf,
    key: PathBuf,
    der: Vec<u8>,
}

impl TlsFixture {
    fn start() -> Self {
        Self::start_with(&[])
    }

    fn start_with(env: &[(&str, &str)]) -> Self {
        Self::start_built(env, |b| b)
    }

    fn start_with_metrics() -> Self {
        Self::start_built(&[], |b| b.metrics())
    }

    fn start_built(
        env: &[(&str, &str)],
        change: impl FnOnce(common::server::ServerBuilder) -> common::server::ServerBuilder,
    ) -> Self {
        let dir = TempDir::new("tls");
        let (cert, key, der) = certs::write_self_signed(dir.path(), "server", 1);
        let dns = TestDns::start(TestZone::default());
        let mut b = TestServer::builder()
            .dns(dns.addr())
            .env("HELOGUARD_TLS_CERT", cert.to_str().unwrap())
            .env("HELOGUARD_TLS_KEY", key.to_str().unwrap());
        for (k, v) in env {
            b = b.env(k, v);
        }
        TlsFixture {
            server: change(b).start(),
            _dns: dns,
            dir,
            cert,
            key,
            der,
        }
    }
}

/// An SMTP client inside TLS.
struct TlsClient {
    reader: BufReader<StreamOwned<ClientConnection, TcpStream>>,
}

impl TlsClient {
    /// Completes the handshake on `stream` (right after the 220 to STARTTLS).
    fn handshake(stream: TcpStream, config: Arc<ClientConfig>) -> TlsClient {
        Self::try_handshake(stream, config).expect("TLS handshake")
    }

    fn try_handshake(
        mut stream: TcpStream,
        config: Arc<ClientConfig>,
    ) -> std::io::Result<TlsClient> {
        stream.set_read_timeout(Some(Duration::from_secs(15)))?;
        let mut conn = certs::client_connection(config);
        while conn.is_handshaking() {
            conn.complete_io(&mut stream)?;
        }
        Ok(TlsClient {
            reader: BufReader::new(StreamOwned::new(conn, stream)),
        })
    }

    fn conn(&self) -> &ClientConnection {
        &self.reader.get_ref().conn
    }

    /// The serial number of the certificate the server presented.
    fn peer_serial(&self) -> Vec<u8> {
        let chain = self.conn().peer_certificates().expect("peer certificates");
        certs::serial_of(chain[0].as_ref()).expect("serial in peer certificate")
    }

    fn send(&mut self, bytes: &[u8]) {
        let s = self.reader.get_mut();
        s.write_all(bytes).expect("TLS send");
        s.flush().expect("TLS flush");
    }

    fn try_reply(&mut self) -> Option<(u16, String)> {
        common::server::read_reply(&mut self.reader)
    }

    fn reply(&mut self) -> (u16, String) {
        self.try_reply().expect("reply inside TLS")
    }

    fn cmd(&mut self, line: &str, expect: u16) -> String {
        self.send(format!("{line}\r\n").as_bytes());
        let (code, text) = self.reply();
        assert_eq!(code, expect, "{line} (in TLS) -> {text}");
        text
    }

    fn deliver(&mut self, from: &str, to: &str, body: &str) -> String {
        self.cmd(&format!("MAIL FROM:<{from}>"), 250);
        self.cmd(&format!("RCPT TO:<{to}>"), 250);
        self.cmd("DATA", 354);
        self.send(body.as_bytes());
        self.send(b"\r\n.\r\n");
        let (code, text) = self.reply();
        assert_eq!(code, 250, "end of data (in TLS) -> {text}");
        text
    }

    /// The server closed the TLS session or the socket (EOF, close_notify or reset).
    fn is_closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        !matches!(self.reader.read(&mut b), Ok(n) if n > 0)
    }
}

/// Connects, says EHLO, STARTTLS (220 2.0.0) and hands back the bare socket.
fn starttls_socket(s: &TestServer, helo: &str) -> TcpStream {
    let mut c = s.connect();
    let ehlo = c.cmd(&format!("EHLO {helo}"), 250);
    assert!(ehlo.contains("STARTTLS"), "STARTTLS not offered: {ehlo}");
    let ready = c.cmd("STARTTLS", 220);
    assert!(ready.starts_with("220 2.0.0"), "{ready}");
    c.stream.try_clone().expect("clone socket")
}

/// EHLO, STARTTLS, handshake with `config`, EHLO again inside TLS.
fn tls_session(s: &TestServer, config: Arc<ClientConfig>) -> TlsClient {
    let sock = starttls_socket(s, "client.example.org");
    let mut t = TlsClient::handshake(sock, config);
    let ehlo = t.cmd("EHLO client.example.org", 250);
    assert!(
        !ehlo.contains("STARTTLS"),
        "STARTTLS offered inside TLS: {ehlo}"
    );
    t
}

/// Waits (bounded by `limit`) for EOF or a reset on `stream`; false if it stays open.
fn closed_within(stream: &mut TcpStream, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        stream.set_read_timeout(Some(left)).expect("read timeout");
        match stream.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return false;
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => return true,
        }
    }
}

fn read_message(path: &Path) -> String {
    String::from_utf8(std::fs::read(path).expect("read message")).expect("UTF-8 message")
}

/// The `Received:` field of a stored message, unfolded lines joined by "\r\n".
fn received_field(msg: &str) -> &str {
    let start = msg.find("\r\nReceived: ").expect("Received field") + 2;
    let rest = &msg[start..];
    let mut end = 0;
    for line in rest.split_inclusive("\r\n") {
        if end > 0 && !line.starts_with([' ', '\t']) {
            break;
        }
        end += line.len();
    }
    &rest[..end]
}

/// Asserts the `\t(using VERSION with cipher CIPHER (B/B bits))` line and returns the cipher.
fn assert_using_line(received: &str, version: &str) -> String {
    let line = received
        .split("\r\n")
        .find(|l| l.starts_with("\t(using "))
        .unwrap_or_else(|| panic!("no (using ...) line: {received}"));
    let rest = line
        .strip_prefix(&format!("\t(using {version} with cipher "))
        .unwrap_or_else(|| panic!("wrong version in {line:?}"));
    let (cipher, bits) = rest
        .split_once(" (")
        .unwrap_or_else(|| panic!("no bits in {line:?}"));
    assert!(
        cipher.starts_with("TLS_")
            && cipher
                .bytes()
                .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_'),
        "cipher name {cipher:?} in {line:?}"
    );
    let bits = bits
        .strip_suffix(" bits))")
        .unwrap_or_else(|| panic!("line does not end ' bits))': {line:?}"));
    let (a, b) = bits.split_once('/').expect("bits a/b");
    assert_eq!(a, b, "{line:?}");
    assert!(a == "128" || a == "256", "{line:?}");
    cipher.to_string()
}

/// The IANA-style name heloguard logs for the suite a rustls client negotiated.
fn iana_name(conn: &ClientConnection) -> String {
    let suite = format!(
        "{:?}",
        conn.negotiated_cipher_suite().expect("suite").suite()
    );
    match suite.strip_prefix("TLS13_") {
        Some(rest) => format!("TLS_{rest}"),
        None => suite,
    }
}

fn wait_log(s: &TestServer, needle: &str, count: usize) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let log = s.log();
        if log.matches(needle).count() >= count || Instant::now() > deadline {
            return log;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A fresh client can still get its banner and talk.
fn assert_serving(s: &TestServer) {
    let mut other = s.connect();
    other.cmd("EHLO other.example.org", 250);
    other.cmd("NOOP", 250);
    other.cmd("QUIT", 221);
}

// ----- advertisement -------------------------------------------------------------------

#[test]
fn without_cert_and_key_starttls_is_neither_offered_nor_accepted() {
    let dns = TestDns::start(TestZone::default());
    let s = TestServer::builder().dns(dns.addr()).start();
    let mut c = s.connect();
    let ehlo = c.cmd("EHLO client.example.org", 250);
    assert!(!ehlo.contains("STARTTLS"), "{ehlo}");
    let text = c.cmd("STARTTLS", 502);
    assert!(text.starts_with("502 5.5.1"), "{text}");
    // The session goes on in plaintext.
    c.cmd("NOOP", 250);
    c.deliver("client.example.org", "a@example.org", "b@example.net", "x");
    // SIGHUP without TLS is logged and changes nothing (it must not end the process).
    s.signal(libc::SIGHUP);
    let log = wait_log(&s, "no TLS configured", 1);
    assert!(log.contains("SIGHUP: no TLS configured"), "{log}");
    c.cmd("NOOP", 250);
    assert_serving(&s);
}

#[test]
fn with_cert_and_key_ehlo_offers_starttls_and_plaintext_mail_has_no_using_line() {
    let f = TlsFixture::start();
    let mut c = f.server.connect();
    let ehlo = c.cmd("EHLO client.example.org", 250);
    assert!(
        ehlo.lines()
            .any(|l| l == "250-STARTTLS" || l == "250 STARTTLS"),
        "{ehlo}"
    );
    c.cmd("MAIL FROM:<a@example.org>", 250);
    c.cmd("RCPT TO:<b@example.net>", 250);
    c.cmd("DATA", 354);
    c.send(b"Subject: plain\r\n\r\nplain\r\n.\r\n");
    assert_eq!(c.reply().0, 250);
    let files = f.server.wait_messages(1);
    assert_eq!(files.len(), 1);
    let msg = read_message(&files[0]);
    let received = received_field(&msg);
    assert!(received.contains(" with ESMTP id "), "{received}");
    assert!(!received.contains("(using"), "{received}");
}

// ----- real TLS clients ----------------------------------------------------------------

#[test]
fn a_tls13_client_delivers_and_the_received_field_says_esmtps_and_using() {
    let f = TlsFixture::start();
    let mut t = tls_session(&f.server, certs::client_config(&f.der));
    assert_eq!(t.peer_serial(), certs::serial_octets(1));
    assert_eq!(
        t.conn().protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_3)
    );
    let negotiated = iana_name(t.conn());
    let ok = t.deliver(
        "alice@example.org",
        "bob@example.net",
        "Subject: over TLS\r\n\r\nsecret",
    );
    assert!(ok.starts_with("250 2.0.0"), "{ok}");
    t.cmd("QUIT", 221);
    let files = f.server.wait_messages(1);
    assert_eq!(files.len(), 1);
    let msg = read_message(&files[0]);
    let received = received_field(&msg);
    assert!(
        received.starts_with("Received: from client.example.org ("),
        "{received}"
    );
    let cipher = assert_using_line(received, "TLSv1.3");
    assert_eq!(cipher, negotiated, "{received}");
    assert!(
        received.contains(&format!("\r\n\tby {HOSTNAME} (heloguard) with ESMTPS id ")),
        "{received}"
    );
    assert!(received.contains("for <bob@example.net>; "), "{received}");
    // The using line sits between the from line and the by line.
    let using_at = received.find("\t(using").unwrap();
    let by_at = received.find("\tby ").unwrap();
    assert!(using_at < by_at, "{received}");
    assert!(
        msg.ends_with("Subject: over TLS\r\n\r\nsecret\r\n"),
        "{msg}"
    );
}

#[test]
fn a_tls12_only_client_delivers_and_the_received_field_says_tlsv12() {
    let f = TlsFixture::start();
    let config = certs::client_config_with_versions(&f.der, &[&rustls::version::TLS12]);
    let mut t = tls_session(&f.server, config);
    assert_eq!(
        t.conn().protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_2)
    );
    let negotiated = iana_name(t.conn());
    t.deliver(
        "alice@example.org",
        "bob@example.net",
        "Subject: 1.2\r\n\r\nold",
    );
    let files = f.server.wait_messages(1);
    assert_eq!(files.len(), 1);
    let msg = read_message(&files[0]);
    let received = received_field(&msg);
    let cipher = assert_using_line(received, "TLSv1.2");
    assert_eq!(cipher, negotiated, "{received}");
    assert!(
        cipher.starts_with("TLS_ECDHE_ECDSA_WITH_"),
        "{cipher}: the test key is ECDSA"
    );
    assert!(received.contains(" with ESMTPS id "), "{received}");
}

#[test]
fn lettre_delivers_with_starttls_required() {
    use lettre::transport::smtp::client::{Certificate, CertificateStore, Tls, TlsParameters};
    use lettre::transport::smtp::extension::ClientId;
    use lettre::{Message, SmtpTransport, Transport};

    let f = TlsFixture::start();
    let pem = std::fs::read(&f.cert).expect("read cert");
    let params = TlsParameters::builder(certs::SERVER_NAME.to_string())
        .certificate_store(CertificateStore::None)
        .add_root_certificate(Certificate::from_pem(&pem).expect("PEM certificate"))
        .build()
        .expect("TLS parameters");
    let mailer = SmtpTransport::builder_dangerous("127.0.0.1")
        .port(f.server.addr.port())
        .hello_name(ClientId::Domain("lettre.example.org".to_string()))
        .tls(Tls::Required(params))
        .timeout(Some(Duration::from_secs(10)))
        .build();
    let email = Message::builder()
        .from("Alice <alice@example.org>".parse().unwrap())
        .to("Bob <bob@example.net>".parse().unwrap())
        .subject("lettre over STARTTLS")
        .body(String::from("Hello through TLS.\n"))
        .unwrap();
    mailer.send(&email).expect("lettre send over STARTTLS");
    let files = f.server.wait_messages(1);
    assert_eq!(files.len(), 1);
    let msg = read_message(&files[0]);
    assert!(msg.contains("Subject: lettre over STARTTLS"), "{msg}");
    let received = received_field(&msg);
    assert!(
        received.starts_with("Received: from lettre.example.org ("),
        "{received}"
    );
    assert_using_line(received, "TLSv1.3");
    assert!(received.contains(" with ESMTPS id "), "{received}");
}

// ----- RFC 3207 rules ------------------------------------------------------------------

#[test]
fn a_command_pipelined_after_starttls_is_never_executed_inside_tls() {
    let f = TlsFixture::start();
    let mut c = f.server.connect();
    c.cmd("EHLO client.example.org", 250);
    c.send(b"STARTTLS\r\nNOOP\r\n");
    let (code, text) = c.reply();
    assert_eq!(code, 220, "{text}");
    let sock = c.stream.try_clone().expect("clone");
    let mut t = TlsClient::handshake(sock, certs::client_config(&f.der));
    t.send(b"EHLO client.example.org\r\n");
    let (code, text) = t.reply();
    assert_eq!(code, 250, "{text}");
    let first = text.lines().next().unwrap_or_default();
    assert!(
        first.starts_with("250-") && first.contains(HOSTNAME),
        "first reply inside TLS is not the EHLO greeting (injected NOOP answered?): {text}"
    );
    assert!(text.contains("PIPELINING"), "{text}");
    // Nothing else is waiting: the next reply answers the next command.
    let noop = t.cmd("NOOP", 250);
    assert!(noop.starts_with("250 2.0.0"), "{noop}");
    let quit = t.cmd("QUIT", 221);
    assert!(quit.starts_with("221"), "{quit}");
}

#[test]
fn a_pipelined_ehlo_and_mail_after_starttls_are_discarded_too() {
    let f = TlsFixture::start();
    let mut c = f.server.connect();
    c.cmd("EHLO client.example.org", 250);
    c.send(b"STARTTLS\r\nEHLO evil.example.org\r\nMAIL FROM:<evil@example.org>\r\n");
    assert_eq!(c.reply().0, 220);
    let sock = c.stream.try_clone().expect("clone");
    let mut t = TlsClient::handshake(sock, certs::client_config(&f.der));
    // Had the injected EHLO and MAIL survived, their 250s would come first and RCPT would be
    // accepted; a clean session answers RCPT without EHLO with a sequence error.
    t.send(b"RCPT TO:<victim@example.net>\r\n");
    let (code, text) = t.reply();
    assert_eq!(code, 503, "injected commands answered inside TLS: {text}");
    assert!(text.starts_with("503 5.5.1"), "{text}");
    t.cmd("EHLO client.example.org", 250);
    let rcpt = t.cmd("RCPT TO:<b@example.net>", 503);
    assert!(rcpt.starts_with("503 5.5.1"), "{rcpt}");
}

#[test]
fn inside_tls_the_client_must_say_ehlo_again() {
    let f = TlsFixture::start();
    let sock = starttls_socket(&f.server, "client.example.org");
    let mut t = TlsClient::handshake(sock, certs::client_config(&f.der));
    let mail = t.cmd("MAIL FROM:<a@example.org>", 503);
    assert!(mail.starts_with("503 5.5.1"), "{mail}");
    let ehlo = t.cmd("EHLO client.example.org", 250);
    assert!(!ehlo.contains("STARTTLS"), "{ehlo}");
    t.cmd("MAIL FROM:<a@example.org>", 250);
}

#[test]
fn starttls_inside_tls_is_503() {
    let f = TlsFixture::start();
    let mut t = tls_session(&f.server, certs::client_config(&f.der));
    let again = t.cmd("STARTTLS", 503);
    assert!(again.starts_with("503 5.5.1"), "{again}");
    // Still in the same TLS session and usable.
    t.deliver("a@example.org", "b@example.net", "Subject: x\r\n\r\ny");
    assert_eq!(f.server.wait_messages(1).len(), 1);
}

#[test]
fn starttls_during_a_transaction_is_503_and_the_transaction_goes_on() {
    let f = TlsFixture::start();
    let mut c = f.server.connect();
    c.cmd("EHLO client.example.org", 250);
    c.cmd("MAIL FROM:<a@example.org>", 250);
    let text = c.cmd("STARTTLS", 503);
    assert!(text.starts_with("503 5.5.1"), "{text}");
    // Still plaintext: ordinary replies come back in the clear.
    c.cmd("RCPT TO:<b@example.net>", 250);
    c.cmd("DATA", 354);
    c.send(b"Subject: t\r\n\r\nbody\r\n.\r\n");
    assert_eq!(c.reply().0, 250);
    let files = f.server.wait_messages(1);
    let received = read_message(&files[0]);
    assert!(!received.contains("(using"), "{received}");
    // After RSET the transaction is gone and STARTTLS works.
    c.cmd("RSET", 250);
    c.cmd("STARTTLS", 220);
    let sock = c.stream.try_clone().expect("clone");
    let mut t = TlsClient::handshake(sock, certs::client_config(&f.der));
    t.cmd("EHLO client.example.org", 250);
}

// ----- broken and silent handshakes ------------------------------------------------------

#[test]
fn garbage_instead_of_a_client_hello_closes_only_that_connection() {
    let f = TlsFixture::start();
    let mut sock = starttls_socket(&f.server, "client.example.org");
    sock.write_all(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
        .expect("send garbage");
    assert!(
        closed_within(&mut sock, Duration::from_secs(5)),
        "server kept a connection that sent garbage for a ClientHello"
    );
    let log = wait_log(&f.server, "TLS handshake failed", 1);
    assert!(log.contains("TLS handshake failed"), "{log}");
    assert_serving(&f.server);
    // And TLS still works for the next client.
    let mut t = tls_session(&f.server, certs::client_config(&f.der));
    t.cmd("NOOP", 250);
}

#[test]
fn a_client_that_distrusts_the_certificate_fails_alone() {
    let f = TlsFixture::start();
    // A client trusting some other certificate aborts the handshake with an alert.
    let other_dir = TempDir::new("other");
    let (_, _, other_der) = certs::write_self_signed(other_dir.path(), "other", 99);
    let sock = starttls_socket(&f.server, "client.example.org");
    let r = TlsClient::try_handshake(sock, certs::client_config(&other_der));
    assert!(
        r.is_err(),
        "handshake with an untrusted certificate succeeded"
    );
    assert_serving(&f.server);
    let mut t = tls_session(&f.server, certs::client_config(&f.der));
    t.cmd("NOOP", 250);
}

#[test]
fn a_client_silent_after_220_is_closed_at_the_timeout() {
    let f = TlsFixture::start_with(&[("HELOGUARD_TIMEOUT_SECS", "1")]);
    let mut sock = starttls_socket(&f.server, "client.example.org");
    let started = Instant::now();
    // Meanwhile another client keeps talking (within the 1 s timeout) and is served.
    let mut other = f.server.connect();
    other.cmd("EHLO other.example.org", 250);
    let busy = std::thread::spawn(move || {
        for _ in 0..12 {
            std::thread::sleep(Duration::from_millis(200));
            other.cmd("NOOP", 250);
        }
        other.cmd("QUIT", 221);
    });
    assert!(
        closed_within(&mut sock, Duration::from_secs(8)),
        "silent TLS client still open after {:?}",
        started.elapsed()
    );
    assert!(
        started.elapsed() >= Duration::from_millis(500),
        "closed too early: {:?}",
        started.elapsed()
    );
    busy.join().expect("the other client was served throughout");
    assert_serving(&f.server);
}

#[test]
fn a_client_silent_mid_client_hello_is_closed_at_the_timeout() {
    let f = TlsFixture::start_with(&[("HELOGUARD_TIMEOUT_SECS", "1")]);
    let mut sock = starttls_socket(&f.server, "client.example.org");
    // The first bytes of a real ClientHello, then nothing.
    let mut conn = certs::client_connection(certs::client_config(&f.der));
    let mut hello = Vec::new();
    conn.write_tls(&mut hello).expect("client hello");
    assert!(hello.len() > 20);
    sock.write_all(&hello[..hello.len() / 2])
        .expect("half hello");
    let started = Instant::now();
    assert!(
        closed_within(&mut sock, Duration::from_secs(8)),
        "half-handshake client still open after {:?}",
        started.elapsed()
    );
    assert_serving(&f.server);
}

#[test]
fn an_idle_client_inside_tls_is_closed_at_the_timeout() {
    let f = TlsFixture::start_with(&[("HELOGUARD_TIMEOUT_SECS", "1")]);
    let mut t = tls_session(&f.server, certs::client_config(&f.der));
    // The 421 comes through TLS, then the session ends.
    let (code, text) = t.try_reply().expect("421 inside TLS");
    assert_eq!(code, 421, "{text}");
    assert!(t.is_closed());
}

// ----- SIGHUP reload -------------------------------------------------------------------

#[test]
fn sighup_reloads_the_certificate_and_a_bad_pair_keeps_the_old_one() {
    let f = TlsFixture::start();
    let s = &f.server;

    // A session in TLS under the first certificate.
    let mut early = tls_session(s, certs::client_config(&f.der));
    assert_eq!(early.peer_serial(), certs::serial_octets(1));

    // New pair over the same paths.
    let (cert2, key2, der2) = certs::write_self_signed(f.dir.path(), "server", 2);
    assert_eq!((&cert2, &key2), (&f.cert, &f.key));
    s.signal(libc::SIGHUP);
    let log = wait_log(s, "TLS certificate and key reloaded", 1);
    assert!(log.contains("TLS certificate and key reloaded"), "{log}");

    let mut fresh = tls_session(s, certs::client_config(&der2));
    assert_eq!(fresh.peer_serial(), certs::serial_octets(2));
    fresh.cmd("NOOP", 250);

    // The session that was already in TLS keeps working.
    early.deliver(
        "a@example.org",
        "b@example.net",
        "Subject: early\r\n\r\nstill here",
    );
    assert_eq!(s.wait_messages(1).len(), 1);

    // A new certificate with a broken key: the reload fails and the old pair stays.
    let other_dir = TempDir::new("bad");
    let (cert3, _, _) = certs::write_self_signed(other_dir.path(), "three", 3);
    std::fs::copy(&cert3, &f.cert).expect("copy cert 3");
    std::fs::write(
        &f.key,
        "-----BEGIN PRIVATE KEY-----\nnot base64 at all!\n-----END PRIVATE KEY-----\n",
    )
    .expect("write broken key");
    s.signal(libc::SIGHUP);
    let log = wait_log(s, "TLS reload failed", 1);
    let line = log
        .lines()
        .find(|l| l.contains("TLS reload failed"))
        .unwrap_or_else(|| panic!("no reload failure logged: {log}"));
    assert!(
        line.contains("keeping the old certificate") && line.contains(f.key.to_str().unwrap()),
        "{line}"
    );
    let mut after_bad = tls_session(s, certs::client_config(&der2));
    assert_eq!(after_bad.peer_serial(), certs::serial_octets(2));
    after_bad.cmd("NOOP", 250);

    // A well-formed key that does not belong to the certificate: refused as well.
    let (_, key4, _) = certs::write_self_signed(other_dir.path(), "four", 4);
    std::fs::copy(&key4, &f.key).expect("copy key 4");
    s.signal(libc::SIGHUP);
    let log = wait_log(s, "TLS reload failed", 2);
    let line = log
        .lines()
        .filter(|l| l.contains("TLS reload failed"))
        .nth(1)
        .unwrap_or_else(|| panic!("no second reload failure logged: {log}"));
    assert!(line.contains("does not match"), "{line}");
    let after_mismatch = tls_session(s, certs::client_config(&der2));
    assert_eq!(after_mismatch.peer_serial(), certs::serial_octets(2));

    // The earliest session still works after all of it.
    early.cmd("NOOP", 250);
    early.cmd("QUIT", 221);
}

// ----- volume and pipelining inside TLS ----------------------------------------------------

#[test]
fn a_large_message_in_one_tls_write_is_stored_byte_exact() {
    let f = TlsFixture::start();
    let mut t = tls_session(&f.server, certs::client_config(&f.der));
    // 3 MiB in one write: far past rustls' 16 KiB of unread plaintext per session.
    let mut body = String::from("Subject: big\r\n\r\n");
    let mut n = 0u32;
    while body.len() < 3 * 1024 * 1024 {
        body.push_str(&format!("line {n:08} {}\r\n", "x".repeat(90)));
        n += 1;
    }
    let mut wire = Vec::new();
    wire.extend_from_slice(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n");
    wire.extend_from_slice(body.as_bytes());
    wire.extend_from_slice(b".\r\nNOOP\r\n");
    t.send(&wire);
    assert_eq!(t.reply().0, 250, "MAIL");
    assert_eq!(t.reply().0, 250, "RCPT");
    assert_eq!(t.reply().0, 354, "DATA");
    let (code, text) = t.reply();
    assert_eq!(code, 250, "end of data: {text}");
    assert_eq!(t.reply().0, 250, "NOOP");
    let files = f.server.wait_messages(1);
    assert_eq!(files.len(), 1);
    let msg = read_message(&files[0]);
    assert!(
        msg.ends_with(&body),
        "stored body differs ({} bytes)",
        msg.len()
    );
}

#[test]
fn bdat_chunks_inside_tls_are_stored_byte_exact() {
    let f = TlsFixture::start();
    let mut t = tls_session(&f.server, certs::client_config(&f.der));
    t.cmd("MAIL FROM:<a@example.org>", 250);
    t.cmd("RCPT TO:<b@example.net>", 250);
    let mut chunk1 = b"Subject: chunked\r\n\r\n".to_vec();
    while chunk1.len() < 40_000 {
        chunk1.extend_from_slice(&[b'a'; 78]);
        chunk1.extend_from_slice(b"\r\n");
    }
    let chunk2 = b"\r\n.\r\nnot the end\r\n".to_vec();
    let mut wire = format!("BDAT {}\r\n", chunk1.len()).into_bytes();
    wire.extend_from_slice(&chunk1);
    wire.extend_from_slice(format!("BDAT {} LAST\r\n", chunk2.len()).as_bytes());
    wire.extend_from_slice(&chunk2);
    t.send(&wire);
    assert_eq!(t.reply().0, 250, "first chunk");
    let (code, text) = t.reply();
    assert_eq!(code, 250, "last chunk: {text}");
    let files = f.server.wait_messages(1);
    assert_eq!(files.len(), 1);
    let stored = std::fs::read(&files[0]).expect("read");
    let mut expect = chunk1.clone();
    expect.extend_from_slice(&chunk2);
    assert!(stored.ends_with(&expect), "BDAT content differs");
    let msg = String::from_utf8_lossy(&stored);
    assert!(msg.contains(" with ESMTPS id "), "{msg}");
}

#[test]
fn close_notify_from_the_client_ends_the_session_cleanly() {
    let f = TlsFixture::start();
    let mut t = tls_session(&f.server, certs::client_config(&f.der));
    t.cmd("NOOP", 250);
    {
        let s = t.reader.get_mut();
        s.conn.send_close_notify();
        s.conn.complete_io(&mut s.sock).expect("send close_notify");
    }
    let mut raw = t.reader.get_ref().sock.try_clone().expect("clone");
    assert!(closed_within(&mut raw, Duration::from_secs(5)));
    assert_serving(&f.server);
}

// ----- reload during a handshake, metrics --------------------------------------------------

#[test]
fn a_handshake_begun_before_sighup_finishes_with_the_pair_it_began_with() {
    let f = TlsFixture::start();
    let s = &f.server;
    let sock = starttls_socket(s, "client.example.org");
    // The 220 is out, the server side of this session exists; now the pair changes.
    let (_, _, der2) = certs::write_self_signed(f.dir.path(), "server", 2);
    s.signal(libc::SIGHUP);
    let log = wait_log(s, "TLS certificate and key reloaded", 1);
    assert!(log.contains("TLS certificate and key reloaded"), "{log}");
    let mut t = TlsClient::handshake(sock, certs::client_config(&f.der));
    assert_eq!(t.peer_serial(), certs::serial_octets(1));
    t.cmd("EHLO client.example.org", 250);
    t.deliver("a@example.org", "b@example.net", "Subject: r\r\n\r\nr");
    // Sessions that start now get the new pair.
    let fresh = tls_session(s, certs::client_config(&der2));
    assert_eq!(fresh.peer_serial(), certs::serial_octets(2));
}

fn scrape(addr: &str) -> String {
    let mut c = TcpStream::connect(addr).expect("metrics connect");
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    c.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
        .expect("metrics request");
    let mut out = String::new();
    let _ = c.read_to_string(&mut out);
    out
}

fn handshakes(text: &str, outcome: &str) -> Option<u64> {
    let prefix = format!("heloguard_tls_handshakes_total{{outcome=\"{outcome}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse().ok())
}

#[test]
fn handshake_outcomes_are_counted() {
    let f = TlsFixture::start_with_metrics();
    let metrics = f.server.metrics_addr.expect("metrics address").to_string();
    let s = &f.server;

    let mut good = tls_session(s, certs::client_config(&f.der));
    good.cmd("NOOP", 250);

    let mut garbage = starttls_socket(s, "client.example.org");
    garbage.write_all(b"\x16\x03\x01\x00\x05hello").unwrap();
    assert!(closed_within(&mut garbage, Duration::from_secs(5)));

    let other_dir = TempDir::new("other");
    let (_, _, other_der) = certs::write_self_signed(other_dir.path(), "other", 7);
    let sock = starttls_socket(s, "client.example.org");
    assert!(TlsClient::try_handshake(sock, certs::client_config(&other_der)).is_err());

    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = scrape(&metrics);
        let (ok, err) = (handshakes(&text, "ok"), handshakes(&text, "error"));
        if (ok, err) == (Some(1), Some(2)) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "expected ok=1 error=2, got ok={ok:?} error={err:?}:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_client_that_leaves_in_the_middle_of_the_handshake_counts_as_a_failed_one() {
    let f = TlsFixture::start_with_metrics();
    let metrics = f.server.metrics_addr.expect("metrics address").to_string();
    let sock = starttls_socket(&f.server, "client.example.org");
    drop(sock);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = scrape(&metrics);
        let (ok, err) = (handshakes(&text, "ok"), handshakes(&text, "error"));
        if (ok, err) == (Some(0), Some(1)) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "expected ok=0 error=1, got ok={ok:?} error={err:?}:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn ehlo_in_the_same_segment_as_the_client_finished_is_answered() {
    let f = TlsFixture::start();
    let mut sock = starttls_socket(&f.server, "client.example.org");
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut conn = certs::client_connection(certs::client_config(&f.der));
    let mut out = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut out).unwrap();
    }
    sock.write_all(&out).unwrap();
    // Read the server's flight until the client side is done (TLS 1.3: the client's
    // Finished is then queued but not yet sent).
    while conn.is_handshaking() {
        conn.read_tls(&mut sock).expect("server flight");
        conn.process_new_packets().expect("server flight valid");
    }
    assert_eq!(
        conn.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_3)
    );
    // Finished, EHLO, MAIL, RCPT and DATA leave in one write.
    conn.writer()
        .write_all(b"EHLO client.example.org\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n")
        .unwrap();
    let mut out = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut out).unwrap();
    }
    sock.write_all(&out).unwrap();
    let mut t = TlsClient {
        reader: BufReader::new(StreamOwned::new(conn, sock)),
    };
    let (code, text) = t.reply();
    assert_eq!(code, 250, "{text}");
    assert!(text.starts_with(&format!("250-{HOSTNAME}")), "{text}");
    assert_eq!(t.reply().0, 250, "MAIL");
    assert_eq!(t.reply().0, 250, "RCPT");
    assert_eq!(t.reply().0, 354, "DATA");
    t.send(b"Subject: fast\r\n\r\nfast\r\n.\r\n");
    assert_eq!(t.reply().0, 250);
    let files = f.server.wait_messages(1);
    assert!(read_message(&files[0]).contains(" with ESMTPS id "));
}

#[test]
fn an_smtputf8_transaction_inside_tls_is_utf8smtps() {
    let f = TlsFixture::start();
    let mut t = tls_session(&f.server, certs::client_config(&f.der));
    t.cmd("MAIL FROM:<j\u{00f6}rg@example.org> SMTPUTF8", 250);
    t.cmd("RCPT TO:<b@example.net>", 250);
    t.cmd("DATA", 354);
    t.send("Subject: gr\u{00fc}\u{00df}e\r\n\r\nhi\r\n.\r\n".as_bytes());
    assert_eq!(t.reply().0, 250);
    let files = f.server.wait_messages(1);
    let msg = read_message(&files[0]);
    let received = received_field(&msg);
    assert_using_line(received, "TLSv1.3");
    assert!(received.contains(" with UTF8SMTPS id "), "{received}");
}

#[test]
fn starttls_through_the_proxy_listener_keeps_the_proxied_client_ip() {
    let dir = TempDir::new("tlsproxy");
    let (cert, key, der) = certs::write_self_signed(dir.path(), "server", 5);
    let dns = TestDns::start(TestZone::default());
    let s = TestServer::builder()
        .dns(dns.addr())
        .proxy()
        .env("HELOGUARD_TLS_CERT", cert.to_str().unwrap())
        .env("HELOGUARD_TLS_KEY", key.to_str().unwrap())
        .start();
    let mut c = s.connect_as("192.0.2.7".parse().unwrap());
    let (code, text) = c.reply();
    assert_eq!(code, 220, "{text}");
    let ehlo = c.cmd("EHLO proxied.example.org", 250);
    assert!(ehlo.contains("STARTTLS"), "{ehlo}");
    c.cmd("STARTTLS", 220);
    let sock = c.stream.try_clone().expect("clone");
    let mut t = TlsClient::handshake(sock, certs::client_config(&der));
    assert_eq!(t.peer_serial(), certs::serial_octets(5));
    t.cmd("EHLO proxied.example.org", 250);
    t.deliver("a@example.org", "b@example.net", "Subject: p\r\n\r\np");
    let files = s.wait_messages(1);
    let msg = read_message(&files[0]);
    let received = received_field(&msg);
    assert!(received.contains("[192.0.2.7]"), "{received}");
    assert!(!received.contains("127.0.0.1"), "{received}");
    assert_using_line(received, "TLSv1.3");
}

#[test]
fn fifty_concurrent_tls_sessions_each_deliver_one_message() {
    let f = TlsFixture::start();
    let addr = f.server.addr;
    let config = certs::client_config(&f.der);
    let threads: Vec<_> = (0..50)
        .map(|i| {
            let config = config.clone();
            std::thread::spawn(move || {
                let mut c = common::server::Client::connect(addr);
                c.cmd("EHLO c.example.org", 250);
                c.cmd("STARTTLS", 220);
                let sock = c.stream.try_clone().expect("clone");
                let mut t = TlsClient::handshake(sock, config);
                t.cmd("EHLO c.example.org", 250);
                t.deliver(
                    "a@example.org",
                    &format!("r{i}@example.net"),
                    &format!("Subject: n{i}\r\n\r\nbody {i}"),
                );
                t.cmd("QUIT", 221);
            })
        })
        .collect();
    for t in threads {
        t.join().expect("client thread");
    }
    let files = f.server.wait_messages(50);
    assert_eq!(files.len(), 50);
    for file in files {
        let msg = read_message(&file);
        assert!(msg.contains(" with ESMTPS id "), "{msg}");
    }
}

#[test]
fn a_bad_certificate_or_key_stops_startup_naming_the_variable() {
    let dir = TempDir::new("tlsbad");
    let (cert, key, _) = certs::write_self_signed(dir.path(), "server", 8);
    let (_, other_key, _) = certs::write_self_signed(dir.path(), "other", 9);
    let not_pem = dir.path().join("not.pem");
    std::fs::write(&not_pem, b"not a certificate").expect("write");
    let start = |cert: &Path, key: &Path| {
        std::process::Command::new(env!("CARGO_BIN_EXE_heloguard"))
            .env("HELOGUARD_LISTEN", "127.0.0.1:0")
            .env("HELOGUARD_DNS", "127.0.0.1:53")
            .env("HELOGUARD_SPOOL", dir.path().join("spool"))
            .env("HELOGUARD_TLS_CERT", cert)
            .env("HELOGUARD_TLS_KEY", key)
            .output()
            .expect("run")
    };
    for (cert, key, variable) in [
        (not_pem.as_path(), key.as_path(), "HELOGUARD_TLS_CERT"),
        (cert.as_path(), not_pem.as_path(), "HELOGUARD_TLS_KEY"),
        (cert.as_path(), other_key.as_path(), "HELOGUARD_TLS_KEY"),
    ] {
        let out = start(cert, key);
        assert_eq!(out.status.code(), Some(2), "{variable}");
        let err = String::from_utf8_lossy(&out.stderr);
        let last = err.trim().lines().last().unwrap_or_default();
        assert!(
            last.starts_with(&format!("heloguard: {variable}: ")),
            "{err}"
        );
    }
}

// ----- session resumption ------------------------------------------------------------------

/// A client that keeps what the server gives it for resumption (tickets, TLS 1.2 session
/// ids) across its connections, as a sending MTA's TLS session cache does.
fn resuming_client(
    der: &[u8],
    versions: &[&'static rustls::SupportedProtocolVersion],
    tls12: Tls12Resumption,
) -> Arc<ClientConfig> {
    let mut config = (*certs::client_config_with_versions(der, versions)).clone();
    config.resumption = Resumption::in_memory_sessions(16).tls12_resumption(tls12);
    Arc::new(config)
}

/// One whole session in TLS (EHLO, STARTTLS, EHLO, a message, QUIT); how its handshake went
/// and the version it agreed.
fn deliver_in_tls(s: &TestServer, config: Arc<ClientConfig>, n: usize) -> (HandshakeKind, String) {
    let mut t = tls_session(s, config);
    t.deliver(
        "a@example.org",
        "b@example.net",
        &format!("Subject: resumption {n}\r\n\r\nbody {n}"),
    );
    let kind = t.conn().handshake_kind().expect("handshake kind");
    let version = format!("{:?}", t.conn().protocol_version().expect("version"));
    // The QUIT reply comes after any ticket the server sent, so the store has it.
    t.cmd("QUIT", 221);
    (kind, version)
}

/// The first session of `config` does a full handshake, the second resumes.
fn assert_second_session_resumes(f: &TlsFixture, config: Arc<ClientConfig>, version: &str) {
    let first = deliver_in_tls(&f.server, Arc::clone(&config), 1);
    assert_eq!(first, (HandshakeKind::Full, version.to_string()));
    let second = deliver_in_tls(&f.server, config, 2);
    assert_eq!(second, (HandshakeKind::Resumed, version.to_string()));
    assert_eq!(f.server.wait_messages(2).len(), 2);
}

#[test]
fn a_tls13_client_resumes_with_the_ticket_of_its_first_session() {
    let f = TlsFixture::start();
    let config = resuming_client(
        &f.der,
        &[&rustls::version::TLS13],
        Tls12Resumption::SessionIdOrTickets,
    );
    assert_second_session_resumes(&f, config, "TLSv1_3");
}

#[test]
fn a_tls12_client_without_tickets_resumes_by_session_id() {
    let f = TlsFixture::start();
    let config = resuming_client(
        &f.der,
        &[&rustls::version::TLS12],
        Tls12Resumption::SessionIdOnly,
    );
    assert_second_session_resumes(&f, config, "TLSv1_2");
}

#[test]
fn a_tls12_client_with_tickets_resumes_by_ticket() {
    let f = TlsFixture::start();
    let config = resuming_client(
        &f.der,
        &[&rustls::version::TLS12],
        Tls12Resumption::SessionIdOrTickets,
    );
    assert_second_session_resumes(&f, config, "TLSv1_2");
}

#[test]
fn sessions_from_before_a_sighup_still_resume_after_it() {
    let f = TlsFixture::start();
    let s = &f.server;
    let tls13 = resuming_client(
        &f.der,
        &[&rustls::version::TLS13],
        Tls12Resumption::SessionIdOrTickets,
    );
    let tls12 = resuming_client(
        &f.der,
        &[&rustls::version::TLS12],
        Tls12Resumption::SessionIdOnly,
    );
    assert_eq!(
        deliver_in_tls(s, Arc::clone(&tls13), 1).0,
        HandshakeKind::Full
    );
    assert_eq!(
        deliver_in_tls(s, Arc::clone(&tls12), 2).0,
        HandshakeKind::Full
    );
    s.signal(libc::SIGHUP);
    let log = wait_log(s, "TLS certificate and key reloaded", 1);
    assert!(log.contains("TLS certificate and key reloaded"), "{log}");
    assert_eq!(deliver_in_tls(s, tls13, 3).0, HandshakeKind::Resumed);
    assert_eq!(deliver_in_tls(s, tls12, 4).0, HandshakeKind::Resumed);
}
