//! Relay mode over STARTTLS to a next hop that reads slowly: every byte of a large message
//! reaches it, in order, however far the next hop lags behind the client.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ServerConfig, ServerConnection, StreamOwned};

use common::certs;
use common::dns_server::{TestDns, TestZone};
use common::server::{Client, TempDir, TestServer};

/// Bytes the next hop takes per read once DATA is under way.
const SLOW_READ: usize = 2048;

/// A line-oriented view of the next hop's side of the connection, plaintext or TLS.
struct HopStream<S: Read + Write> {
    stream: S,
    buf: Vec<u8>,
    /// Reads between two pauses while receiving the message; `None` reads at full speed.
    pause_every: Option<usize>,
    reads: usize,
}

impl<S: Read + Write> HopStream<S> {
    fn fill(&mut self) {
        let mut chunk = [0u8; SLOW_READ];
        let n = self.stream.read(&mut chunk).expect("next hop read");
        assert!(n > 0, "the relay closed the connection early");
        self.buf.extend_from_slice(&chunk[..n]);
        self.reads += 1;
        if let Some(every) = self.pause_every
            && self.reads.is_multiple_of(every)
        {
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn line(&mut self) -> String {
        loop {
            if let Some(end) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let line: Vec<u8> = self.buf.drain(..end + 2).collect();
                return String::from_utf8_lossy(&line[..end]).into_owned();
            }
            self.fill();
        }
    }

    /// The message up to (without) the CRLF.CRLF that ends it, still dot-stuffed.
    fn data(&mut self) -> Vec<u8> {
        // Where the search resumes: the terminator can only end in bytes not yet searched.
        let mut searched = 0;
        loop {
            if let Some(at) = self.buf[searched..]
                .windows(5)
                .position(|w| w == b"\r\n.\r\n")
            {
                let end = searched + at;
                let mut data: Vec<u8> = self.buf.drain(..end + 5).collect();
                data.truncate(end + 2);
                return data;
            }
            searched = self.buf.len().saturating_sub(4);
            self.fill();
        }
    }

    fn say(&mut self, reply: &str) {
        self.stream
            .write_all(reply.as_bytes())
            .expect("next hop write");
        self.stream.flush().expect("next hop flush");
    }
}

/// RFC 5321 4.5.2: a leading period that the sender doubled is removed.
fn unstuff(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len());
    let mut at_line_start = true;
    for &b in data {
        if !(at_line_start && b == b'.') {
            out.push(b);
        }
        at_line_start = b == b'\n';
    }
    out
}

fn tls_config(cert_pem: &std::path::Path, key_pem: &std::path::Path) -> Arc<ServerConfig> {
    let certs = CertificateDer::pem_file_iter(cert_pem)
        .expect("certificate file")
        .collect::<Result<Vec<_>, _>>()
        .expect("certificate");
    let key = PrivateKeyDer::from_pem_file(key_pem).expect("key");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .expect("server config");
    Arc::new(config)
}

/// A next hop that offers STARTTLS, takes one message after the handshake reading it in
/// small pieces with pauses, and returns it (dot-unstuffed).
fn slow_tls_next_hop(config: Arc<ServerConfig>) -> (SocketAddr, JoinHandle<Vec<u8>>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("address");
    let handle = std::thread::spawn(move || {
        let (socket, _) = listener.accept().expect("accept");
        socket
            .set_read_timeout(Some(Duration::from_secs(60)))
            .expect("timeout");
        let mut plain = HopStream {
            stream: socket,
            buf: Vec::new(),
            pause_every: None,
            reads: 0,
        };
        plain.say("220 hop.test ESMTP\r\n");
        let ehlo = plain.line();
        assert!(ehlo.starts_with("EHLO "), "{ehlo}");
        plain.say("250-hop.test\r\n250-8BITMIME\r\n250 STARTTLS\r\n");
        assert_eq!(plain.line(), "STARTTLS");
        plain.say("220 2.0.0 Ready to start TLS\r\n");
        assert!(
            plain.buf.is_empty(),
            "nothing may follow STARTTLS in plaintext"
        );
        let conn = ServerConnection::new(config).expect("TLS server");
        let mut hop = HopStream {
            stream: StreamOwned::new(conn, plain.stream),
            buf: Vec::new(),
            pause_every: None,
            reads: 0,
        };
        let ehlo = hop.line();
        assert!(ehlo.starts_with("EHLO "), "{ehlo}");
        hop.say("250-hop.test\r\n250 8BITMIME\r\n");
        let mail = hop.line();
        assert!(mail.starts_with("MAIL FROM:<alice@example.org>"), "{mail}");
        hop.say("250 2.1.0 Ok\r\n");
        assert_eq!(hop.line(), "RCPT TO:<bob@example.net>");
        hop.say("250 2.1.5 Ok\r\n");
        assert_eq!(hop.line(), "DATA");
        hop.say("354 End data with <CR><LF>.<CR><LF>\r\n");
        // Let the relay's buffers fill before taking anything.
        std::thread::sleep(Duration::from_millis(300));
        hop.pause_every = Some(2);
        let data = hop.data();
        hop.say("250 2.0.0 Ok: queued\r\n");
        // QUIT, or the connection closing, ends the session; either is fine here.
        let mut rest = [0u8; 64];
        let _ = hop.stream.read(&mut rest);
        let _ = hop.stream.write_all(b"221 2.0.0 Bye\r\n");
        unstuff(&data)
    });
    (addr, handle)
}

/// A header over 64 KiB (the relay sends a message's header in one piece once it is whole
/// or that long), then a body of about 10 MB with lines that need dot-stuffing.
fn large_message() -> Vec<u8> {
    let mut msg = Vec::with_capacity(11 << 20);
    msg.extend_from_slice(b"Subject: a large message\r\n");
    for n in 0..1200 {
        msg.extend_from_slice(format!("X-Filler-{n:04}: {}\r\n", "h".repeat(80)).as_bytes());
    }
    msg.extend_from_slice(b"\r\n");
    let mut n = 0u64;
    while msg.len() < 10_000_000 {
        let line = match n % 7 {
            0 => format!(".dotted line {n}\r\n"),
            1 => ".\r\n".to_string(),
            _ => format!("line {n} {}\r\n", "b".repeat((n % 120) as usize)),
        };
        msg.extend_from_slice(line.as_bytes());
        n += 1;
    }
    msg
}

/// The wire form of `msg` inside DATA: each leading period doubled.
fn dot_stuff(msg: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(msg.len() + msg.len() / 50);
    let mut at_line_start = true;
    for &b in msg {
        if at_line_start && b == b'.' {
            out.push(b'.');
        }
        out.push(b);
        at_line_start = b == b'\n';
    }
    out
}

#[test]
fn a_large_message_reaches_a_slow_tls_next_hop_byte_for_byte() {
    let dir = TempDir::new("slow-tls-hop");
    let (cert, key, _der) = certs::write_self_signed(dir.path(), "hop", 11);
    let (hop_addr, hop) = slow_tls_next_hop(tls_config(&cert, &key));
    let dns = TestDns::start(TestZone::new());
    let relay = TestServer::builder()
        .dns(dns.addr())
        .env("HELOGUARD_DELIVER", &format!("smtp://{hop_addr}"))
        .env("HELOGUARD_DOMAINS", "example.net")
        .start();

    let message = large_message();
    let mut client = Client::connect(relay.addr);
    client
        .stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    client.cmd("EHLO client.example.org", 250);
    client.cmd("MAIL FROM:<alice@example.org>", 250);
    client.cmd("RCPT TO:<bob@example.net>", 250);
    client.cmd("DATA", 354);
    let mut writer = client.stream.try_clone().expect("clone");
    let wire = dot_stuff(&message);
    let sender = std::thread::spawn(move || {
        // A failure shows as the missing answer below, with the server's log.
        let _ = writer.write_all(&wire);
        let _ = writer.write_all(b".\r\n");
    });
    let Some((code, text)) = client.try_reply() else {
        panic!("no answer to the end of data\n{}", relay.log());
    };
    sender.join().expect("sender");
    assert_eq!(code, 250, "end of data -> {text}\n{}", relay.log());
    client.cmd("QUIT", 221);

    let received = hop.join().expect("next hop");
    // Our trace fields come first; after them, the client's message exactly.
    assert!(
        received.len() >= message.len(),
        "the next hop got {} bytes of {}",
        received.len(),
        message.len()
    );
    let (trace, rest) = received.split_at(received.len() - message.len());
    assert!(
        trace.starts_with(b"Received: "),
        "{:?}",
        &trace[..trace.len().min(200)]
    );
    assert!(trace.len() < 4096, "trace fields of {} bytes", trace.len());
    if rest != message.as_slice() {
        let first = rest
            .iter()
            .zip(&message)
            .position(|(a, b)| a != b)
            .unwrap_or(0);
        panic!(
            "the message differs from byte {first}: got {:?}, sent {:?}",
            String::from_utf8_lossy(&rest[first..(first + 80).min(rest.len())]),
            String::from_utf8_lossy(&message[first..(first + 80).min(message.len())])
        );
    }
}
