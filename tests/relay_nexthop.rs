//! Relay modes against next hops of every kind: a heloguard offering STARTTLS, a real
//! Postfix trusting our XCLIENT (when Postfix is installed), scripted SMTP and LMTP servers
//! (TCP and Unix socket), and next hops that are slow or down.

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::certs;
use common::dns_server::{TestDns, TestZone};
use common::server::{Client, HOSTNAME, TempDir, TestServer};

/// The client presented through the PROXY listener, and its forward-confirmed PTR name.
const CLIENT_IP: &str = "192.0.2.44";
const CLIENT_NAME: &str = "client.example.org";

fn client_zone() -> TestZone {
    TestZone::new()
        .ptr(CLIENT_IP, CLIENT_NAME)
        .a(CLIENT_NAME, CLIENT_IP)
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// A heloguard relaying to `target`, with a PROXY listener trusting loopback.
fn relay_to(dns: &TestDns, target: &str, extra: &[(&str, &str)]) -> TestServer {
    relay_with_dns(dns.addr(), target, extra)
}

fn relay_with_dns(dns: SocketAddr, target: &str, extra: &[(&str, &str)]) -> TestServer {
    let mut b = TestServer::builder()
        .dns(dns)
        .proxy()
        .env("HELOGUARD_DELIVER", target)
        .env("HELOGUARD_DOMAINS", "example.net");
    for (k, v) in extra {
        b = b.env(k, v);
    }
    b.start()
}

/// Connects through the PROXY listener as `client_ip` and reads the banner.
fn connect_as(relay: &TestServer, client_ip: &str) -> Client {
    let mut c = relay.connect_as(ip(client_ip));
    let (code, text) = c.reply();
    assert_eq!(code, 220, "banner: {text}");
    c
}

fn read_message(path: &Path) -> String {
    String::from_utf8(std::fs::read(path).expect("read message")).expect("UTF-8 message")
}

/// The first `Received:` field of a message (the newest), folded lines joined by "\r\n".
fn first_received(msg: &str) -> &str {
    let start = msg.find("Received: ").expect("Received field");
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

// ----- 1. STARTTLS to the next hop -------------------------------------------------------

#[test]
fn starttls_to_the_next_hop_is_used_when_offered() {
    let dir = TempDir::new("nexthop-tls");
    let (cert, key, _der) = certs::write_self_signed(dir.path(), "nexthop", 7);
    let dns = TestDns::start(client_zone());
    let hop = TestServer::builder()
        .dns(dns.addr())
        .env("HELOGUARD_HOSTNAME", "nexthop.heloguard.test")
        .env("HELOGUARD_DOMAINS", "example.net")
        .env("HELOGUARD_TLS_CERT", cert.to_str().unwrap())
        .env("HELOGUARD_TLS_KEY", key.to_str().unwrap())
        .start();
    let relay = relay_to(&dns, &format!("smtp://{}", hop.addr), &[]);
    let mut c = connect_as(&relay, CLIENT_IP);
    c.deliver(
        CLIENT_NAME,
        "alice@example.org",
        "bob@example.net",
        "Subject: over TLS\r\n\r\nsecret",
    );
    c.cmd("QUIT", 221);

    let files = hop.new_messages();
    assert_eq!(files.len(), 1, "{}\n{}", relay.log(), hop.log());
    let msg = read_message(&files[0]);
    // The next hop's own field comes first: it received from us over TLS.
    let hop_received = first_received(&msg);
    assert!(
        hop_received.contains(&format!("from {HOSTNAME} ")),
        "{hop_received}"
    );
    assert!(
        hop_received.contains("\tby nexthop.heloguard.test (heloguard) with ESMTPS id "),
        "{hop_received}"
    );
    let using = hop_received
        .split("\r\n")
        .find(|l| l.starts_with("\t(using "))
        .unwrap_or_else(|| panic!("no (using ...) line: {hop_received}"));
    assert!(
        using.starts_with("\t(using TLSv1.3 with cipher TLS_") && using.ends_with(" bits))"),
        "{using}"
    );
    // Our trace fields, once: the client spoke plaintext ESMTP to us.
    assert_eq!(
        msg.matches(&format!("by {HOSTNAME} (heloguard)")).count(),
        1
    );
    assert!(
        msg.contains(&format!("by {HOSTNAME} (heloguard) with ESMTP id ")),
        "{msg}"
    );
    assert_eq!(msg.matches("(using ").count(), 1, "{msg}");
    assert_eq!(
        msg.matches(&format!("Authentication-Results: {HOSTNAME};"))
            .count(),
        1
    );
    assert_eq!(
        msg.matches(&format!("X-HELO-Check: {HOSTNAME};")).count(),
        1
    );
    assert!(msg.contains(&format!("[{CLIENT_IP}]")), "{msg}");
    assert!(
        msg.ends_with("Subject: over TLS\r\n\r\nsecret\r\n"),
        "{msg}"
    );
}

// ----- 2. XCLIENT ------------------------------------------------------------------------

/// What a scripted SMTP next hop saw: the command lines of each connection, in order.
type Transcripts = Arc<Mutex<Vec<Vec<String>>>>;

/// A scripted SMTP next hop that advertises XCLIENT (and, after XCLIENT, no longer does, as
/// Postfix) and accepts everything.
fn xclient_next_hop() -> (SocketAddr, Transcripts) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let seen: Transcripts = Arc::new(Mutex::new(Vec::new()));
    let seen2 = seen.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let index = {
                let mut all = seen2.lock().unwrap();
                all.push(Vec::new());
                all.len() - 1
            };
            let seen = seen2.clone();
            std::thread::spawn(move || serve_xclient(stream, index, &seen));
        }
    });
    (addr, seen)
}

fn serve_xclient(stream: TcpStream, index: usize, seen: &Mutex<Vec<Vec<String>>>) {
    let mut out = stream.try_clone().unwrap();
    let mut reader = BufReader::new(stream);
    let _ = out.write_all(b"220 scripted.test ESMTP\r\n");
    let mut xclient_done = false;
    let mut line = String::new();
    while reader.read_line(&mut line).map(|n| n > 0).unwrap_or(false) {
        let cmd = line.trim_end().to_string();
        line.clear();
        seen.lock().unwrap()[index].push(cmd.clone());
        let upper = cmd.to_ascii_uppercase();
        let reply: &[u8] = if upper.starts_with("EHLO") {
            if xclient_done {
                b"250-scripted.test\r\n250 8BITMIME\r\n"
            } else {
                b"250-scripted.test\r\n250-XCLIENT NAME ADDR PROTO HELO\r\n250 8BITMIME\r\n"
            }
        } else if upper.starts_with("XCLIENT") {
            xclient_done = true;
            b"220 scripted.test ESMTP\r\n"
        } else if upper.starts_with("MAIL") || upper.starts_with("RSET") {
            b"250 2.1.0 ok\r\n"
        } else if upper.starts_with("RCPT") {
            b"250 2.1.5 ok\r\n"
        } else if upper == "DATA" {
            let _ = out.write_all(b"354 go ahead\r\n");
            let mut size = 0;
            loop {
                let mut l = String::new();
                if reader.read_line(&mut l).unwrap_or(0) == 0 || l == ".\r\n" {
                    break;
                }
                size += l.len();
            }
            seen.lock().unwrap()[index].push(format!("<{size} octets>"));
            b"250 2.0.0 queued\r\n"
        } else if upper == "QUIT" {
            let _ = out.write_all(b"221 bye\r\n");
            return;
        } else {
            b"500 5.5.2 what\r\n"
        };
        let _ = out.write_all(reply);
    }
}

/// Waits (bounded) until the scripted next hop has seen `n` connections.
fn wait_connections(seen: &Transcripts, n: usize) -> Vec<Vec<String>> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let all = seen.lock().unwrap().clone();
        if all.len() >= n || Instant::now() > deadline {
            return all;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn send_one(c: &mut Client, subject: &str) {
    c.cmd("MAIL FROM:<alice@example.org>", 250);
    c.cmd("RCPT TO:<bob@example.net>", 250);
    c.cmd("DATA", 354);
    c.send(format!("Subject: {subject}\r\n\r\nx\r\n.\r\n").as_bytes());
    let (code, text) = c.reply();
    assert_eq!(code, 250, "{text}");
}

#[test]
fn xclient_carries_each_clients_identity_on_its_own_next_hop_connection() {
    let dns = TestDns::start(client_zone());
    let (addr, seen) = xclient_next_hop();
    let relay = relay_to(&dns, &format!("smtp://{addr}"), &[]);

    // Two clients at once, each with a transaction; the first one then sends a second.
    let mut a = connect_as(&relay, CLIENT_IP);
    a.cmd(&format!("EHLO {CLIENT_NAME}"), 250);
    send_one(&mut a, "from a");
    let mut b = connect_as(&relay, "192.0.2.45");
    b.cmd("HELO other.example.org", 250);
    send_one(&mut b, "from b");
    send_one(&mut a, "from a again");
    a.cmd("QUIT", 221);
    b.cmd("QUIT", 221);
    // A later client from the first one's address still gets a connection of its own.
    let mut c = connect_as(&relay, CLIENT_IP);
    c.cmd(&format!("EHLO {CLIENT_NAME}"), 250);
    send_one(&mut c, "from c");
    c.cmd("QUIT", 221);

    let all = wait_connections(&seen, 3);
    assert_eq!(all.len(), 3, "{all:?}\n{}", relay.log());
    let xclient_a =
        format!("XCLIENT ADDR={CLIENT_IP} NAME={CLIENT_NAME} HELO={CLIENT_NAME} PROTO=ESMTP");
    let xclient_b = "XCLIENT ADDR=192.0.2.45 NAME=[UNAVAILABLE] HELO=other.example.org PROTO=SMTP";
    let ehlo = format!("EHLO {HOSTNAME}");
    let ehlo_a = format!("EHLO {CLIENT_NAME}");
    for (i, (conn, xclient, client_ehlo, messages)) in [
        (&all[0], xclient_a.as_str(), ehlo_a.as_str(), 2),
        (&all[1], xclient_b, "EHLO other.example.org", 1),
        (&all[2], xclient_a.as_str(), ehlo_a.as_str(), 1),
    ]
    .into_iter()
    .enumerate()
    {
        // Our EHLO, the exact XCLIENT, and after its 220 the EHLO XCLIENT_README's proxy
        // sends: with the client's HELO name, which the next hop keeps as the client's.
        assert!(conn.len() >= 3, "connection {i}: {conn:?}");
        assert_eq!(conn[0], ehlo, "connection {i}: {conn:?}");
        assert_eq!(conn[1], xclient, "connection {i}: {conn:?} {}", relay.log());
        assert_eq!(conn[2], client_ehlo, "connection {i}: {conn:?}");
        assert_eq!(
            conn.iter().filter(|l| l.starts_with("XCLIENT")).count(),
            1,
            "connection {i}: {conn:?}"
        );
        assert_eq!(
            conn.iter().filter(|l| l.starts_with("MAIL FROM:")).count(),
            messages,
            "connection {i}: {conn:?}"
        );
    }
}

/// A private Postfix instance (its own config, queue and log directories) whose smtpd on a
/// loopback port trusts XCLIENT from loopback and discards mail for example.net.
struct PrivatePostfix {
    postfix: &'static str,
    config: PathBuf,
    addr: SocketAddr,
    log: PathBuf,
    // Dropped after the instance is stopped (fields drop after `Drop::drop`).
    _dir: TempDir,
}

impl PrivatePostfix {
    /// Starts one, or says why it can't (no Postfix, not root, startup failed).
    fn start() -> Result<PrivatePostfix, String> {
        let postfix = ["/usr/sbin/postfix", "/usr/local/sbin/postfix"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .ok_or("postfix is not installed")?;
        // SAFETY: geteuid(2) has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err("postfix's master must start as root".into());
        }
        let postconf = |name: &str| -> Result<String, String> {
            let out = Command::new("postconf")
                .args(["-h", name])
                .output()
                .map_err(|e| format!("postconf: {e}"))?;
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
        };
        let daemon_directory = postconf("daemon_directory")?;
        let dir = TempDir::new("postfix");
        let config = dir.path().join("etc");
        let queue = dir.path().join("queue");
        let data = dir.path().join("data");
        let log = dir.path().join("maillog");
        for d in [&config, &queue, &data] {
            std::fs::create_dir_all(d).map_err(|e| format!("{}: {e}", d.display()))?;
        }
        // The lock files live in data_directory, which must belong to mail_owner.
        let chown = Command::new("chown")
            .arg("postfix")
            .arg(&data)
            .status()
            .map_err(|e| format!("chown: {e}"))?;
        if !chown.success() {
            return Err("chown postfix failed (no postfix user?)".into());
        }
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| e.to_string())?
            .port();
        let main_cf = format!(
            "compatibility_level = 3.6\n\
             queue_directory = {queue}\n\
             data_directory = {data}\n\
             daemon_directory = {daemon_directory}\n\
             myhostname = postfix.heloguard.test\n\
             mydomain = heloguard.test\n\
             inet_interfaces = 127.0.0.1\n\
             inet_protocols = ipv4\n\
             # heloguard's address must not be in mynetworks: XCLIENT makes the real client\n\
             # the one that restrictions see.\n\
             mynetworks = 198.51.100.0/24\n\
             mydestination = example.net\n\
             local_recipient_maps =\n\
             local_transport = discard:\n\
             default_transport = discard:\n\
             relay_transport = discard:\n\
             alias_maps =\n\
             alias_database =\n\
             smtpd_authorized_xclient_hosts = 127.0.0.0/8\n\
             # Logs one line per recipient with the client's name, address and HELO as\n\
             # smtpd sees them.\n\
             smtpd_recipient_restrictions = check_client_access static:WARN\n\
             maillog_file = {log}\n\
             maillog_file_prefixes = {prefix}\n",
            queue = queue.display(),
            data = data.display(),
            log = log.display(),
            prefix = dir.path().display(),
        );
        let master_cf = format!(
            "127.0.0.1:{port} inet n - n - - smtpd\n\
             cleanup   unix  n - n - 0 cleanup\n\
             qmgr      unix  n - n 300 1 qmgr\n\
             rewrite   unix  - - n - - trivial-rewrite\n\
             bounce    unix  - - n - 0 bounce\n\
             defer     unix  - - n - 0 bounce\n\
             trace     unix  - - n - 0 bounce\n\
             verify    unix  - - n - 1 verify\n\
             flush     unix  n - n 1000? 0 flush\n\
             proxymap  unix  - - n - - proxymap\n\
             error     unix  - - n - - error\n\
             retry     unix  - - n - - error\n\
             discard   unix  - - n - - discard\n\
             anvil     unix  - - n - 1 anvil\n\
             scache    unix  - - n - 1 scache\n\
             postlog   unix-dgram n - n - 1 postlogd\n"
        );
        std::fs::write(config.join("main.cf"), main_cf).map_err(|e| e.to_string())?;
        std::fs::write(config.join("master.cf"), master_cf).map_err(|e| e.to_string())?;
        let pf = PrivatePostfix {
            postfix,
            config,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            log,
            _dir: dir,
        };
        let out = Command::new(postfix)
            .arg("-c")
            .arg(&pf.config)
            .arg("start")
            .output()
            .map_err(|e| format!("postfix start: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "postfix start failed: {}{}",
                String::from_utf8_lossy(&out.stderr),
                pf.maillog()
            ));
        }
        // master opens its listeners before it forks; still, wait for the port.
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(pf.addr).is_err() {
            if Instant::now() > deadline {
                return Err(format!("postfix did not listen: {}", pf.maillog()));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(pf)
    }

    fn maillog(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits (bounded) until the log has a line containing `needle`.
    fn wait_log(&self, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let log = self.maillog();
            if log.contains(needle) || Instant::now() > deadline {
                return log;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for PrivatePostfix {
    fn drop(&mut self) {
        let _ = Command::new(self.postfix)
            .arg("-c")
            .arg(&self.config)
            .arg("stop")
            .output();
    }
}

#[test]
fn postfix_behind_the_relay_sees_the_original_client_through_xclient() {
    let postfix = match PrivatePostfix::start() {
        Ok(p) => p,
        Err(why) => {
            common::skip_without("postfix", &why.to_string());
            return;
        }
    };
    let dns = TestDns::start(client_zone());
    let relay = relay_to(&dns, &format!("smtp://{}", postfix.addr), &[]);
    let mut c = connect_as(&relay, CLIENT_IP);
    // A HELO name other than the PTR name, so that the log shows which is which.
    let text = c.deliver(
        "helo.example.org",
        "alice@example.org",
        "bob@example.net",
        "Subject: via postfix\r\n\r\nhello postfix",
    );
    // Postfix's own 250 (with its queue id) is the client's answer.
    assert!(text.contains("queued as"), "{text}");
    c.cmd("QUIT", 221);

    let needle = format!("client={CLIENT_NAME}[{CLIENT_IP}]");
    let log = postfix.wait_log(&needle);
    assert!(log.contains(&needle), "{log}\n{}", relay.log());
    assert!(!log.contains("client=localhost[127.0.0.1]"), "{log}");
    // The client's address, PTR name and HELO, as smtpd checked them: after XCLIENT, the EHLO
    // carried the client's HELO name, not ours.
    let warn = log
        .lines()
        .find(|l| l.contains(": warn: RCPT from "))
        .unwrap_or_else(|| panic!("no warn line: {log}"));
    assert!(
        warn.contains(&format!("RCPT from {CLIENT_NAME}[{CLIENT_IP}]: ")),
        "{warn}"
    );
    assert!(warn.contains(" helo=<helo.example.org>"), "{warn}");
    assert!(!log.contains(&format!("helo=<{HOSTNAME}>")), "{log}");
    assert!(!log.contains("reject:"), "{log}");
    // Delivered (discarded) for the right recipient.
    let log = postfix.wait_log("status=sent");
    assert!(
        log.contains("to=<bob@example.net>") && log.contains("status=sent"),
        "{log}"
    );
    // docs/relay.md: the smtpd behind heloguard keeps Postfix's own program names, so that
    // pflogsumm still counts what it received.
    let Ok(summary) = Command::new("pflogsumm").arg(&postfix.log).output() else {
        common::skip_without("pflogsumm", "pflogsumm is not installed");
        return;
    };
    let summary = String::from_utf8_lossy(&summary.stdout);
    let count = |what: &str| {
        summary
            .lines()
            .find(|l| l.trim_end().ends_with(what) && !l.contains("bytes"))
            .and_then(|l| l.split_whitespace().next()?.parse::<u32>().ok())
    };
    assert_eq!(count("received"), Some(1), "{summary}\n{log}");
    assert_eq!(count("delivered"), Some(1), "{summary}\n{log}");
}

// ----- 3. slow next hops -----------------------------------------------------------------

/// A listener whose accept queue is full: further connects get no SYN-ACK, so they neither
/// succeed nor fail. Returns it with the connections that fill it.
fn unresponsive_listener() -> (socket2::Socket, SocketAddr, Vec<TcpStream>) {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    socket
        .bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .unwrap();
    socket.listen(0).unwrap();
    let addr = socket.local_addr().unwrap().as_socket().unwrap();
    let mut fillers = Vec::new();
    for _ in 0..8 {
        match TcpStream::connect_timeout(&addr, Duration::from_millis(300)) {
            Ok(s) => fillers.push(s),
            Err(_) => return (socket, addr, fillers),
        }
    }
    panic!("the accept queue of a listen(0) socket never filled");
}

#[test]
fn a_next_hop_that_never_answers_the_connect_gives_451_after_the_connect_timeout() {
    let dns = TestDns::start(client_zone());
    let (_listener, addr, _fillers) = unresponsive_listener();
    let (relay, metrics) = start_with_metrics(&dns, &format!("smtp://{addr}"));
    let mut c = relay.connect();
    c.cmd("EHLO client.example.org", 250);
    let started = Instant::now();
    let text = c.cmd("MAIL FROM:<alice@example.org>", 451);
    let took = started.elapsed();
    assert!(text.contains("4.4.1"), "{text}");
    // CONNECT_TIMEOUT (10 s), checked every second.
    assert!(
        took >= Duration::from_secs(9) && took < Duration::from_secs(20),
        "{took:?}"
    );
    let body = scrape(metrics);
    assert_eq!(failures(&body, "timeout"), 1.0, "{body}");
    assert_eq!(failures(&body, "connect"), 0.0, "{body}");
    // The session goes on: another try is another 451, never a 250.
    c.cmd("QUIT", 221);
}

/// The greeting belongs to the setup, which must finish within CONNECT_TIMEOUT (10 s).
#[test]
fn a_next_hop_that_never_greets_gives_451_after_the_connect_timeout() {
    let dns = TestDns::start(client_zone());
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    // Accepts, then says nothing at all (held open until the test ends).
    let held = Arc::new(Mutex::new(Vec::new()));
    let held2 = held.clone();
    std::thread::spawn(move || {
        for s in listener.incoming().flatten() {
            held2.lock().unwrap().push(s);
        }
    });
    let relay = relay_to(&dns, &format!("smtp://{addr}"), &[]);
    let mut c = relay.connect();
    c.stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    c.cmd("EHLO client.example.org", 250);
    let started = Instant::now();
    let text = c.cmd("MAIL FROM:<alice@example.org>", 451);
    assert!(text.contains("4.4.1"), "{text}");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_secs(9) && took < Duration::from_secs(20),
        "{took:?}"
    );
    assert_eq!(held.lock().unwrap().len(), 1);
}

// ----- 4. LMTP over a Unix socket --------------------------------------------------------

#[test]
fn lmtp_over_a_unix_socket_delivers_and_its_reply_is_the_answer() {
    let dir = TempDir::new("lmtp-unix");
    let path = dir.path().join("lmtp");
    let listener = UnixListener::bind(&path).unwrap();
    let seen = Arc::new(Mutex::new(Vec::<String>::new()));
    let seen2 = seen.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let seen = seen2.clone();
            std::thread::spawn(move || {
                let out = stream.try_clone().unwrap();
                common::lmtp::serve(BufReader::new(stream), out, &seen, &bob_only);
            });
        }
    });
    let dns = TestDns::start(client_zone());
    let relay = relay_to(&dns, &format!("lmtp:unix:{}", path.display()), &[]);
    let mut c = connect_as(&relay, CLIENT_IP);
    c.deliver(
        CLIENT_NAME,
        "alice@example.org",
        "bob@example.net",
        "Subject: over a unix socket\r\n\r\n..dot\r\nend",
    );
    // A second transaction on the same session and next-hop connection.
    c.cmd("MAIL FROM:<alice@example.org>", 250);
    c.cmd("RCPT TO:<carol@example.net>", 250);
    // LMTP: one recipient per transaction; RFC 5321 clients retry a 452.
    let text = c.cmd("RCPT TO:<dave@example.net>", 452);
    assert!(text.contains("4.5.3"), "{text}");
    c.cmd("DATA", 354);
    c.send(b"Subject: refused\r\n\r\nx\r\n.\r\n");
    let (code, text) = c.reply();
    assert_eq!(code, 550, "{text}");
    assert!(text.contains("5.1.1"), "{text}");
    c.cmd("QUIT", 221);

    let seen = seen.lock().unwrap().clone();
    let lhlo: Vec<&String> = seen.iter().filter(|l| l.starts_with("LHLO")).collect();
    assert_eq!(lhlo, [&format!("LHLO {HOSTNAME}")], "{seen:?}");
    assert!(!seen.iter().any(|l| l.starts_with("XCLIENT")), "{seen:?}");
    let rcpts: Vec<&String> = seen.iter().filter(|l| l.starts_with("RCPT")).collect();
    assert_eq!(
        rcpts,
        ["RCPT TO:<bob@example.net>", "RCPT TO:<carol@example.net>"],
        "{seen:?}"
    );
    // The message arrived dot-stuffed on the wire and whole, after our trace fields.
    let body = seen
        .iter()
        .find(|l| l.starts_with("BODY "))
        .expect("a message");
    assert!(
        body.contains(&format!("by {HOSTNAME} (heloguard)")),
        "{body}"
    );
    assert!(
        body.ends_with("Subject: over a unix socket\r\n\r\n..dot\r\nend\r\n"),
        "{body}"
    );
    // The log has the LMTP 452 and the next hop's refusal of the message, by stage.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !relay.log().contains("session end ") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let log = relay.log();
    let refused: Vec<&str> = log
        .lines()
        .filter_map(|l| l.split_once("] refused sid=").map(|(_, rest)| rest))
        .collect();
    assert_eq!(refused.len(), 2, "{log}");
    assert!(
        refused[0].contains(
            " stage=rcpt from=<alice@example.org> to=<dave@example.net> reply=\"452 4.5.3 "
        ),
        "{log}"
    );
    assert!(
        refused[1].contains(
            " stage=data from=<alice@example.org> to=<carol@example.net> reply=\"550 5.1.1 "
        ),
        "{log}"
    );
}

#[test]
fn next_hop_replies_without_enhanced_codes_reach_the_client_with_generic_ones() {
    let dir = TempDir::new("lmtp-plain");
    let path = dir.path().join("lmtp");
    let listener = UnixListener::bind(&path).unwrap();
    let seen = Arc::new(Mutex::new(Vec::<String>::new()));
    let seen2 = seen.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let seen = seen2.clone();
            std::thread::spawn(move || {
                let out = stream.try_clone().unwrap();
                common::lmtp::serve(BufReader::new(stream), out, &seen, &|_| {
                    "550 mailbox full".to_string()
                });
            });
        }
    });
    let dns = TestDns::start(client_zone());
    let relay = relay_to(&dns, &format!("lmtp:unix:{}", path.display()), &[]);
    let mut c = connect_as(&relay, CLIENT_IP);
    c.cmd(&format!("EHLO {CLIENT_NAME}"), 250);
    c.cmd("MAIL FROM:<alice@example.org>", 250);
    c.cmd("RCPT TO:<bob@example.net>", 250);
    c.cmd("DATA", 354);
    c.send(b"Subject: full\r\n\r\nx\r\n.\r\n");
    let (code, text) = c.reply();
    assert_eq!((code, text.as_str()), (550, "550 5.0.0 mailbox full"));
    c.cmd("QUIT", 221);
}

/// After the data: 250 for bob, 550 5.1.1 for anyone else.
fn bob_only(rcpt: &str) -> String {
    if rcpt.contains("<bob@") {
        "250 2.0.0 delivered".to_string()
    } else {
        "550 5.1.1 no such user".to_string()
    }
}

// ----- 5. metrics ------------------------------------------------------------------------

/// A heloguard relaying to `target` with HELOGUARD_METRICS on a listener bound before it
/// starts.
fn start_with_metrics(dns: &TestDns, target: &str) -> (TestServer, SocketAddr) {
    let relay = TestServer::builder()
        .dns(dns.addr())
        .proxy()
        .metrics()
        .env("HELOGUARD_DELIVER", target)
        .env("HELOGUARD_DOMAINS", "example.net")
        .start();
    let metrics = relay.metrics_addr.expect("metrics address");
    (relay, metrics)
}

/// GET /metrics over a raw socket; the status must be 200.
fn scrape(addr: SocketAddr) -> String {
    let mut stream = TcpStream::connect(addr).expect("connect to the metrics endpoint");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(stream, "GET /metrics HTTP/1.1\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").expect("end of head");
    assert!(head.starts_with("HTTP/1.1 200 "), "{head}");
    body.to_string()
}

/// `heloguard_relay_failures_total{reason="..."}`, which must be present.
fn failures(body: &str, reason: &str) -> f64 {
    let samples: HashMap<&str, &str> = body
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.rsplit_once(' '))
        .collect();
    let key = format!("heloguard_relay_failures_total{{reason=\"{reason}\"}}");
    samples
        .get(key.as_str())
        .unwrap_or_else(|| panic!("no {key} in {body}"))
        .parse()
        .unwrap()
}

#[test]
fn a_connect_failure_counts_once_as_reason_connect() {
    let dns = TestDns::start(client_zone());
    // Nothing listens on this port.
    let closed = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let (relay, metrics) = start_with_metrics(&dns, &format!("smtp://{closed}"));
    let before = scrape(metrics);
    for reason in ["connect", "timeout", "refused", "aborted"] {
        assert_eq!(failures(&before, reason), 0.0, "{before}");
    }
    let mut c = connect_as(&relay, CLIENT_IP);
    c.cmd(&format!("EHLO {CLIENT_NAME}"), 250);
    let text = c.cmd("MAIL FROM:<alice@example.org>", 451);
    assert!(text.contains("4.4.1"), "{text}");
    // No transaction: RCPT and DATA are out of sequence, not new connect attempts.
    c.cmd("RCPT TO:<bob@example.net>", 503);
    c.cmd("QUIT", 221);
    let after = scrape(metrics);
    assert_eq!(failures(&after, "connect"), 1.0, "{after}");
    for reason in ["timeout", "refused", "aborted"] {
        assert_eq!(failures(&after, reason), 0.0, "{after}");
    }
}
