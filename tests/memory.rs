//! SPEC "Memory", through the real binary: message content does not wait whole in memory.
//! Many sessions stream large messages at once and the server's peak resident size stays
//! near its baseline plus a small amount per session; messages never finished leave nothing
//! in tmp/; in relay modes a next hop that stops reading stops the client, not the memory;
//! a connection idle after STARTTLS holds a few KiB, not TLS records' worth.
//!
//! Scale with HELOGUARD_TEST_STREAM_SESSIONS (default 50) and HELOGUARD_TEST_STREAM_MIB
//! (default 25); the SPEC's figure is 1,000 sessions of 25 MiB under 256 MiB resident.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use common::certs;
use common::dns_server::{TestDns, TestZone};
use common::server::{Client, TempDir, TestServer};

/// What one session may hold beyond the baseline: its buffers, its memory part, a header
/// field, the allocator's slack. 1,000 of them are about 200 MiB.
const PER_SESSION_KIB: u64 = 200;

/// What a busy server holds beyond an idle one whatever the number of sessions: the malloc
/// arenas of the worker and writer threads, the connection table grown. With 1,000 sessions
/// the bound stays under the SPEC's 256 MiB.
const BUSY_KIB: u64 = 8 * 1024;

fn scale(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// What one connection idle after STARTTLS may hold: rustls' 4 KiB receive buffer, its state
/// and keys, the connection's own state and the allocator's slack come to about 12 KiB; a
/// whole TLS record (16 KiB) or send buffer kept per connection would cross this.
const IDLE_TLS_KIB: u64 = 24;

/// Connections held idle after STARTTLS (benches/load.sh measures 10,000).
const IDLE_TLS_CONNECTIONS: u64 = 500;

/// (sessions, MiB per message).
fn load() -> (u64, u64) {
    (
        scale("HELOGUARD_TEST_STREAM_SESSIONS", 50),
        scale("HELOGUARD_TEST_STREAM_MIB", 25),
    )
}

/// A field of /proc/PID/status, in KiB.
fn status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("field in /proc status")
}

fn server(dns: &TestDns, sessions: u64, mib: u64, extra: &[(&str, &str)]) -> TestServer {
    let connections = (sessions + 50).to_string();
    let size = ((mib + 1) * 1024 * 1024).to_string();
    let mut b = TestServer::builder()
        .dns(dns.addr())
        .env("HELOGUARD_DOMAINS", "example.net")
        .env("HELOGUARD_MAX_CONNECTIONS", &connections)
        .env("HELOGUARD_MAX_CONNECTIONS_PER_IP", &connections)
        .env("HELOGUARD_MAX_MESSAGE_SIZE", &size)
        .env("HELOGUARD_MIN_DATA_RATE", "0")
        .env("RUST_LOG", "warn");
    for (k, v) in extra {
        b = b.env(k, v);
    }
    b.start()
}

/// One piece of body: 64 lines of 1000 octets, the longest RFC 5321 allows.
fn piece() -> Vec<u8> {
    let mut line = vec![b'm'; 998];
    line.extend_from_slice(b"\r\n");
    line.repeat(64)
}

/// Pieces that make `mib` MiB or a little more.
fn pieces(mib: u64) -> u64 {
    (mib * 1024 * 1024).div_ceil(piece().len() as u64)
}

/// Opens a transaction on `c` and streams `mib` MiB of body as fast as the server takes it.
fn stream_body(mut c: Client, mib: u64, sent: &AtomicU64) -> Client {
    c.stream
        .set_read_timeout(Some(Duration::from_secs(600)))
        .expect("timeout");
    c.cmd("EHLO client.example.org", 250);
    c.cmd("MAIL FROM:<alice@example.org>", 250);
    c.cmd("RCPT TO:<bob@example.net>", 250);
    c.cmd("DATA", 354);
    c.send(b"Subject: large\r\n\r\n");
    let piece = piece();
    for _ in 0..pieces(mib) {
        c.send(&piece);
        sent.fetch_add(piece.len() as u64, Ordering::Relaxed);
    }
    c
}

/// Connects `sessions` clients one after the other (a burst of connects would only measure
/// the listen backlog), then runs `each` on all of them at once, on small stacks.
fn clients<T: Send + 'static>(
    addr: SocketAddr,
    sessions: u64,
    each: impl Fn(Client) -> T + Send + Sync + 'static,
) -> Vec<std::thread::JoinHandle<T>> {
    let each = Arc::new(each);
    let start = Arc::new(Barrier::new(sessions as usize));
    (0..sessions)
        .map(|_| {
            let client = Client::connect(addr);
            let each = each.clone();
            let start = start.clone();
            std::thread::Builder::new()
                .stack_size(256 * 1024)
                .spawn(move || {
                    start.wait();
                    each(client)
                })
                .expect("client thread")
        })
        .collect()
}

fn files_in(dir: &Path) -> usize {
    std::fs::read_dir(dir).map_or(0, |d| d.flatten().count())
}

fn bound_kib(baseline: u64, sessions: u64) -> u64 {
    baseline + BUSY_KIB + sessions * PER_SESSION_KIB
}

#[test]
fn many_sessions_streaming_large_messages_keep_the_server_small() {
    let (sessions, mib) = load();
    let dns = TestDns::start(TestZone::new());
    let srv = server(&dns, sessions, mib, &[]);
    let pid = srv.child.id();
    let baseline = status_kib(pid, "VmHWM:");
    let addr = srv.addr;
    let sent = Arc::new(AtomicU64::new(0));
    let sent2 = sent.clone();
    let started = Instant::now();
    let handles = clients(addr, sessions, move |c| {
        let mut c = stream_body(c, mib, &sent2);
        c.send(b".\r\n");
        c.reply().0
    });
    for h in handles {
        assert_eq!(h.join().expect("client"), 250);
    }
    let peak = status_kib(pid, "VmHWM:");
    let bound = bound_kib(baseline, sessions);
    println!(
        "{sessions} sessions x {mib} MiB in {:.1?}: peak RSS {} KiB (baseline {baseline} KiB, \
         bound {bound} KiB, {} MiB sent)",
        started.elapsed(),
        peak,
        sent.load(Ordering::Relaxed) >> 20
    );
    assert!(peak <= bound, "peak RSS {peak} KiB over {bound} KiB");
    let stored = srv.new_messages();
    assert_eq!(stored.len() as u64, sessions);
    let size = std::fs::metadata(&stored[0]).expect("stored").len();
    assert!(size > mib * 1024 * 1024, "{size}");
    assert_eq!(files_in(&srv.maildir().join("tmp")), 0);
}

#[test]
fn unfinished_messages_hold_no_memory_and_leave_nothing_in_tmp() {
    let (sessions, mib) = load();
    let (sessions, mib) = (sessions.min(50), mib.min(8));
    let dns = TestDns::start(TestZone::new());
    let srv = server(&dns, sessions, mib, &[]);
    let pid = srv.child.id();
    let baseline = status_kib(pid, "VmHWM:");
    let addr = srv.addr;
    let sent = Arc::new(AtomicU64::new(0));
    let sent2 = sent.clone();
    let handles = clients(addr, sessions, move |c| stream_body(c, mib, &sent2));
    let open: Vec<Client> = handles
        .into_iter()
        .map(|h| h.join().expect("client"))
        .collect();
    let tmp = srv.maildir().join("tmp");
    // Everything sent is in the server's hands once every spill has its bytes.
    let want = sessions * (mib * 1024 * 1024);
    let deadline = Instant::now() + Duration::from_secs(30);
    while spilled(&tmp) < want {
        assert!(
            Instant::now() < deadline,
            "spilled {} of {want}",
            spilled(&tmp)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let peak = status_kib(pid, "VmHWM:");
    let bound = bound_kib(baseline, sessions);
    println!("{sessions} unfinished x {mib} MiB: peak RSS {peak} KiB (bound {bound} KiB)");
    assert!(peak <= bound, "peak RSS {peak} KiB over {bound} KiB");
    assert_eq!(files_in(&tmp), sessions as usize);
    drop(open);
    let deadline = Instant::now() + Duration::from_secs(10);
    while files_in(&tmp) > 0 {
        assert!(
            Instant::now() < deadline,
            "{} files left in tmp/",
            files_in(&tmp)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(srv.new_messages().is_empty());
}

/// Octets in the files of `dir`.
fn spilled(dir: &Path) -> u64 {
    std::fs::read_dir(dir).map_or(0, |d| {
        d.flatten()
            .filter_map(|e| e.metadata().ok())
            .map(|m| m.len())
            .sum()
    })
}

/// An LMTP next hop that answers up to DATA's 354 and then never reads again.
fn stalled_next_hop() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("address");
    std::thread::spawn(move || {
        let mut kept = Vec::new();
        for stream in listener.incoming().flatten() {
            let mut out = stream.try_clone().expect("clone");
            let mut reader = BufReader::new(stream);
            let _ = out.write_all(b"220 lmtp.test LMTP ready\r\n");
            let mut line = String::new();
            while reader.read_line(&mut line).map(|n| n > 0).unwrap_or(false) {
                let upper = line.trim_end().to_ascii_uppercase();
                line.clear();
                let reply: &[u8] = if upper.starts_with("LHLO") {
                    b"250-lmtp.test\r\n250 8BITMIME\r\n"
                } else if upper == "DATA" {
                    let _ = out.write_all(b"354 go ahead\r\n");
                    break;
                } else {
                    b"250 2.0.0 ok\r\n"
                };
                let _ = out.write_all(reply);
            }
            // Stop reading; keep the connection open.
            kept.push((reader, out));
        }
    });
    addr
}

#[test]
fn a_next_hop_that_stops_reading_stops_the_client_not_the_memory() {
    let mib = 64;
    let dns = TestDns::start(TestZone::new());
    let hop = stalled_next_hop();
    let srv = server(
        &dns,
        1,
        mib,
        &[("HELOGUARD_DELIVER", &format!("lmtp://{hop}"))],
    );
    let pid = srv.child.id();
    let baseline = status_kib(pid, "VmHWM:");
    let addr = srv.addr;
    let sent = Arc::new(AtomicU64::new(0));
    let sent2 = sent.clone();
    let client = std::thread::spawn(move || {
        let mut c = Client::connect(addr);
        c.cmd("EHLO client.example.org", 250);
        c.cmd("MAIL FROM:<alice@example.org>", 250);
        c.cmd("RCPT TO:<bob@example.net>", 250);
        c.cmd("DATA", 354);
        let piece = piece();
        for _ in 0..pieces(mib) {
            if c.stream.write_all(&piece).is_err() {
                return;
            }
            sent2.fetch_add(piece.len() as u64, Ordering::Relaxed);
        }
    });
    // The socket buffers on the way take some; then the client must be held back.
    let mut last = u64::MAX;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        std::thread::sleep(Duration::from_millis(500));
        let now = sent.load(Ordering::Relaxed);
        if now == last {
            break;
        }
        assert!(Instant::now() < deadline, "the client is never held back");
        last = now;
    }
    let peak = status_kib(pid, "VmHWM:");
    println!(
        "stalled next hop: client held back after {} KiB, peak RSS {peak} KiB (baseline {baseline} KiB)",
        last >> 10
    );
    assert!(last < mib * 1024 * 1024 / 2, "sent {last}");
    assert!(peak <= bound_kib(baseline, 1), "peak RSS {peak} KiB");
    drop(srv);
    let _ = client.join();
    let _ = TcpStream::connect(hop);
}

/// EHLO, STARTTLS, a full handshake and EHLO again inside TLS; the connection stays open.
fn idle_in_tls(
    addr: SocketAddr,
    config: &Arc<rustls::ClientConfig>,
) -> rustls::StreamOwned<rustls::ClientConnection, TcpStream> {
    let mut c = Client::connect(addr);
    c.cmd("EHLO client.example.org", 250);
    c.cmd("STARTTLS", 220);
    let mut sock = c.stream.try_clone().expect("clone socket");
    let mut conn = certs::client_connection(Arc::clone(config));
    while conn.is_handshaking() {
        conn.complete_io(&mut sock).expect("handshake");
    }
    let mut tls = rustls::StreamOwned::new(conn, sock);
    tls.write_all(b"EHLO client.example.org\r\n")
        .expect("EHLO in TLS");
    let mut reader = BufReader::new(tls);
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).expect("EHLO reply in TLS");
        assert!(line.starts_with("250"), "{line}");
        if line.as_bytes().get(3) == Some(&b' ') {
            break;
        }
    }
    reader.into_inner()
}

#[test]
fn connections_idle_after_starttls_each_hold_a_few_kib() {
    let dir = TempDir::new("idle-tls");
    let (cert, key, der) = certs::write_self_signed(dir.path(), "server", 1);
    let dns = TestDns::start(TestZone::new().a("client.example.org", "127.0.0.1"));
    let connections = (IDLE_TLS_CONNECTIONS + 50).to_string();
    let srv = TestServer::builder()
        .dns(dns.addr())
        .env("HELOGUARD_TLS_CERT", cert.to_str().expect("path"))
        .env("HELOGUARD_TLS_KEY", key.to_str().expect("path"))
        .env("HELOGUARD_MAX_CONNECTIONS", &connections)
        .env("HELOGUARD_MAX_CONNECTIONS_PER_IP", &connections)
        .env("RUST_LOG", "warn")
        .start();
    let pid = srv.child.id();
    let config = certs::client_config(&der);
    // One connection first, so the loop's and a worker's first allocations are in the
    // baseline rather than counted against the idle connections.
    let warm = idle_in_tls(srv.addr, &config);
    let baseline = status_kib(pid, "VmRSS:");
    let held: Vec<_> = (0..IDLE_TLS_CONNECTIONS)
        .map(|_| idle_in_tls(srv.addr, &config))
        .collect();
    let with_idle = status_kib(pid, "VmRSS:");
    let per_connection = with_idle.saturating_sub(baseline) / IDLE_TLS_CONNECTIONS;
    println!(
        "{IDLE_TLS_CONNECTIONS} connections idle after STARTTLS: RSS {baseline} KiB -> \
         {with_idle} KiB, {per_connection} KiB each"
    );
    assert!(
        per_connection <= IDLE_TLS_KIB,
        "{per_connection} KiB per idle TLS connection, over {IDLE_TLS_KIB} KiB"
    );
    drop(held);
    drop(warm);
}
