//! Relay modes as an operator meets them in front of Postfix (tracker issue 17), each fault
//! through the real server against a scripted next hop that records what it was sent, byte
//! for byte: the client's identity after XCLIENT, the warning for a next hop without XCLIENT,
//! next-hop slots held by idle clients, UTF-8 and 8-bit mail toward a next hop that did not
//! offer SMTPUTF8 or 8BITMIME, bare CR, routing tricks, forged fields and loops past 64 KiB,
//! and the ids in the log.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::dns_server::{TestDns, TestZone};
use common::server::{Client, HOSTNAME, TestServer};

const CLIENT_IP: &str = "192.0.2.44";
const CLIENT_NAME: &str = "client.example.org";

fn client_zone() -> TestZone {
    TestZone::new()
        .ptr(CLIENT_IP, CLIENT_NAME)
        .a(CLIENT_NAME, CLIENT_IP)
}

/// One connection as the scripted next hop saw it.
#[derive(Clone, Debug, Default)]
struct HopConnection {
    /// Command lines, in order.
    commands: Vec<String>,
    /// Each DATA's octets exactly as they came (still dot-stuffed), final dot included when
    /// it came.
    data: Vec<Vec<u8>>,
    /// The connection has ended.
    closed: bool,
}

impl HopConnection {
    /// DATA transactions that the final dot completed.
    fn completed(&self) -> Vec<&Vec<u8>> {
        self.data
            .iter()
            .filter(|d| d.ends_with(b"\r\n.\r\n"))
            .collect()
    }
}

/// A scripted SMTP next hop: `extensions` are its EHLO keywords (XCLIENT among them or not),
/// it accepts every command, and it serves at most `max_sessions` connections at once (more
/// get `421` at the greeting, as Postfix's smtpd process limit does to a new connection).
struct ScriptedHop {
    addr: SocketAddr,
    connections: Arc<Mutex<Vec<HopConnection>>>,
}

impl ScriptedHop {
    fn start(extensions: &'static [&'static str], max_sessions: usize) -> ScriptedHop {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let connections: Arc<Mutex<Vec<HopConnection>>> = Arc::default();
        let open = Arc::new(AtomicUsize::new(0));
        let (all, open2) = (connections.clone(), open);
        std::thread::spawn(move || {
            for mut stream in listener.incoming().flatten() {
                if open2.load(Ordering::SeqCst) >= max_sessions {
                    let _ = stream.write_all(b"421 4.7.0 hop.test Error: too many connections\r\n");
                    continue;
                }
                open2.fetch_add(1, Ordering::SeqCst);
                let index = {
                    let mut all = all.lock().unwrap();
                    all.push(HopConnection::default());
                    all.len() - 1
                };
                let (all, open) = (all.clone(), open2.clone());
                std::thread::spawn(move || {
                    serve(stream, extensions, index, &all);
                    // The slot is free before anyone can see the connection closed.
                    open.fetch_sub(1, Ordering::SeqCst);
                    all.lock().unwrap()[index].closed = true;
                });
            }
        });
        ScriptedHop { addr, connections }
    }

    fn target(&self) -> String {
        format!("smtp://{}", self.addr)
    }

    fn connections(&self) -> Vec<HopConnection> {
        self.connections.lock().unwrap().clone()
    }

    /// Waits (bounded) until `done` holds for what the hop saw.
    fn wait_until(
        &self,
        what: &str,
        done: impl Fn(&[HopConnection]) -> bool,
    ) -> Vec<HopConnection> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let seen = self.connections();
            if done(&seen) {
                return seen;
            }
            assert!(Instant::now() < deadline, "{what}: {seen:#?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn serve(stream: TcpStream, extensions: &[&str], index: usize, all: &Mutex<Vec<HopConnection>>) {
    let mut out = stream.try_clone().unwrap();
    let mut reader = BufReader::new(stream);
    let _ = out.write_all(b"220 hop.test ESMTP\r\n");
    let mut xclient_done = false;
    let mut queued = 0;
    loop {
        let mut raw = Vec::new();
        if reader.read_until(b'\n', &mut raw).unwrap_or(0) == 0 {
            return;
        }
        let line = String::from_utf8_lossy(&raw).trim_end().to_string();
        all.lock().unwrap()[index].commands.push(line.clone());
        let verb = line
            .split(' ')
            .next()
            .unwrap_or_default()
            .to_ascii_uppercase();
        let reply = match verb.as_str() {
            "EHLO" => {
                let mut r = String::from("250-hop.test\r\n");
                for ext in extensions {
                    // Postfix offers XCLIENT no more once it is in effect.
                    if !(xclient_done && ext.starts_with("XCLIENT")) {
                        r.push_str(&format!("250-{ext}\r\n"));
                    }
                }
                r.push_str("250 ENHANCEDSTATUSCODES\r\n");
                r
            }
            "XCLIENT" => {
                xclient_done = true;
                "220 hop.test ESMTP\r\n".into()
            }
            "DATA" => {
                let _ = out.write_all(b"354 End data with <CR><LF>.<CR><LF>\r\n");
                all.lock().unwrap()[index].data.push(Vec::new());
                let mut byte = [0u8; 1];
                loop {
                    if reader.read(&mut byte).unwrap_or(0) == 0 {
                        return;
                    }
                    let mut seen = all.lock().unwrap();
                    let data = seen[index].data.last_mut().unwrap();
                    data.push(byte[0]);
                    if data.ends_with(b"\r\n.\r\n") {
                        break;
                    }
                }
                queued += 1;
                format!("250 2.0.0 Ok: queued as HOPQ{index}X{queued}\r\n")
            }
            "QUIT" => {
                let _ = out.write_all(b"221 2.0.0 Bye\r\n");
                return;
            }
            _ => "250 2.0.0 Ok\r\n".into(),
        };
        let _ = out.write_all(reply.as_bytes());
    }
}

/// A heloguard relaying to `target`, with a PROXY listener trusting loopback.
fn relay(dns: &TestDns, target: &str, extra: &[(&str, &str)]) -> TestServer {
    let mut b = TestServer::builder()
        .dns(dns.addr())
        .proxy()
        .env("HELOGUARD_DELIVER", target)
        .env("HELOGUARD_DOMAINS", "example.net");
    for (k, v) in extra {
        b = b.env(k, v);
    }
    b.start()
}

fn maildir(dns: &TestDns, extra: &[(&str, &str)]) -> TestServer {
    let mut b = TestServer::builder()
        .dns(dns.addr())
        .proxy()
        .env("HELOGUARD_DOMAINS", "example.net");
    for (k, v) in extra {
        b = b.env(k, v);
    }
    b.start()
}

fn connect_as(server: &TestServer, ip: &str) -> Client {
    let mut c = server.connect_as(ip.parse().unwrap());
    let (code, text) = c.reply();
    assert_eq!(code, 220, "banner: {text}");
    c
}

/// Sends a whole message after DATA's 354 and returns the final reply.
fn data(c: &mut Client, message: &[u8]) -> (u16, String) {
    c.cmd("DATA", 354);
    c.send(message);
    c.send(b".\r\n");
    c.reply()
}

/// Sends `message` as BDAT chunks of `size` octets, the last one LAST; returns the reply to it.
fn bdat(c: &mut Client, message: &[u8], size: usize) -> (u16, String) {
    let chunks: Vec<&[u8]> = message.chunks(size).collect();
    for (i, chunk) in chunks.iter().enumerate() {
        let last = i + 1 == chunks.len();
        let verb = if last { " LAST" } else { "" };
        c.send(format!("BDAT {}{verb}\r\n", chunk.len()).as_bytes());
        c.send(chunk);
        let (code, text) = c.reply();
        if last || code != 250 {
            return (code, text);
        }
    }
    unreachable!("a message has a last chunk")
}

/// Waits (bounded) for the session end line of every session so far, then returns the log.
fn settled_log(server: &TestServer, sessions: usize) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let log = server.log();
        if log.matches("] session end sid=").count() >= sessions || Instant::now() > deadline {
            return log;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn log_lines<'a>(log: &'a str, event: &str) -> Vec<&'a str> {
    let marker = format!("] {event} sid=");
    log.lines().filter(|l| l.contains(&marker)).collect()
}

const XCLIENT_EXTENSIONS: &[&str] = &[
    "PIPELINING",
    "8BITMIME",
    "SMTPUTF8",
    "XCLIENT NAME ADDR PROTO HELO PORT LOGIN",
];
const PLAIN_EXTENSIONS: &[&str] = &["PIPELINING", "8BITMIME", "SMTPUTF8"];

// ----- XCLIENT: the client's identity, and the warning without it -------------------------

#[test]
fn the_ehlo_after_xclient_carries_the_clients_helo_or_its_address_literal() {
    let dns = TestDns::start(client_zone());
    let hop = ScriptedHop::start(XCLIENT_EXTENSIONS, 100);
    // syntax=tag: a client whose HELO fails the syntax check still relays.
    let relay = relay(
        &dns,
        &hop.target(),
        &[("HELOGUARD_HELO_POLICY", "default=tag,syntax=tag")],
    );
    let mut a = connect_as(&relay, CLIENT_IP);
    a.cmd("EHLO helo.example.org", 250);
    a.cmd("MAIL FROM:<alice@example.org>", 250);
    a.cmd("QUIT", 221);
    let mut b = connect_as(&relay, "192.0.2.45");
    b.cmd("HELO bad..name", 250);
    b.cmd("MAIL FROM:<alice@example.org>", 250);
    b.cmd("QUIT", 221);
    let mut c = connect_as(&relay, "2001:db8::45");
    c.cmd("EHLO [IPv6:2001:db8::45]", 250);
    c.cmd("MAIL FROM:<alice@example.org>", 250);
    c.cmd("QUIT", 221);

    let seen = hop.wait_until("three connections past MAIL", |s| {
        s.len() == 3
            && s.iter()
                .all(|c| c.commands.iter().any(|l| l.starts_with("MAIL")))
    });
    let expected = [
        (
            "XCLIENT ADDR=192.0.2.44 PORT=40000 NAME=client.example.org HELO=helo.example.org PROTO=ESMTP",
            "EHLO helo.example.org",
        ),
        (
            "XCLIENT ADDR=192.0.2.45 PORT=40000 NAME=[UNAVAILABLE] HELO=bad..name PROTO=SMTP",
            "EHLO [192.0.2.45]",
        ),
        (
            "XCLIENT ADDR=IPV6:2001:db8::45 PORT=40000 NAME=[UNAVAILABLE] HELO=[IPv6:2001:db8::45] PROTO=ESMTP",
            "EHLO [IPv6:2001:db8::45]",
        ),
    ];
    for (conn, (xclient, ehlo)) in seen.iter().zip(expected) {
        let c = &conn.commands;
        // Our own name before XCLIENT, the client's after its 220 (XCLIENT_README).
        assert_eq!(c[0], format!("EHLO {HOSTNAME}"), "{c:?}");
        assert_eq!(c[1], xclient, "{c:?}");
        assert_eq!(c[2], ehlo, "{c:?}");
        assert!(c[3].starts_with("MAIL FROM:<alice@example.org>"), "{c:?}");
    }
    assert!(!relay.log().contains("smtpd_authorized_xclient_hosts"));
}

#[test]
fn a_next_hop_without_xclient_is_warned_of_once_naming_the_postfix_setting() {
    let dns = TestDns::start(client_zone());
    let hop = ScriptedHop::start(PLAIN_EXTENSIONS, 100);
    let relay = relay(&dns, &hop.target(), &[]);
    for _ in 0..3 {
        let mut c = connect_as(&relay, CLIENT_IP);
        c.cmd(&format!("EHLO {CLIENT_NAME}"), 250);
        c.cmd("MAIL FROM:<alice@example.org>", 250);
        c.cmd("RCPT TO:<bob@example.net>", 250);
        let (code, text) = data(&mut c, b"Subject: no xclient\r\n\r\nx\r\n");
        assert_eq!(code, 250, "{text}");
        c.cmd("QUIT", 221);
    }
    let log = settled_log(&relay, 3);
    let warnings: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("smtpd_authorized_xclient_hosts"))
        .collect();
    assert_eq!(warnings.len(), 1, "{log}");
    assert!(warnings[0].contains("WARN"), "{}", warnings[0]);
    assert!(
        warnings[0].contains(&hop.addr.port().to_string()),
        "{}",
        warnings[0]
    );
    // Without XCLIENT the next hop gets our own name, never a claim it cannot check.
    for conn in hop.connections() {
        assert_eq!(conn.commands[0], format!("EHLO {HOSTNAME}"));
        assert!(!conn.commands.iter().any(|l| l.starts_with("XCLIENT")));
    }
}

// ----- held slots --------------------------------------------------------------------------

#[test]
fn clients_idling_after_rset_hold_no_next_hop_slot() {
    let dns = TestDns::start(client_zone());
    const SLOTS: usize = 4;
    let hop = ScriptedHop::start(XCLIENT_EXTENSIONS, SLOTS);
    let relay = relay(&dns, &hop.target(), &[("HELOGUARD_RELAY_IDLE_SECS", "1")]);
    // As many clients as the next hop has slots: EHLO, MAIL, RSET, then nothing.
    let mut idle: Vec<Client> = (0..SLOTS)
        .map(|_| {
            let mut c = connect_as(&relay, CLIENT_IP);
            c.cmd(&format!("EHLO {CLIENT_NAME}"), 250);
            c.cmd("MAIL FROM:<alice@example.org>", 250);
            c.cmd("RSET", 250);
            c
        })
        .collect();
    // The RSET reached the next hop at once; then the idle links closed with QUIT.
    let seen = hop.wait_until("the idle links closed", |s| {
        s.len() == SLOTS && s.iter().all(|c| c.closed)
    });
    for conn in &seen {
        let tail: Vec<&str> = conn
            .commands
            .iter()
            .rev()
            .take(2)
            .map(String::as_str)
            .collect();
        assert_eq!(tail, ["QUIT", "RSET"], "{:?}", conn.commands);
    }
    // An honest client now finds a slot, and the idle sessions are still there.
    let mut honest = connect_as(&relay, CLIENT_IP);
    honest.cmd(&format!("EHLO {CLIENT_NAME}"), 250);
    honest.cmd("MAIL FROM:<carol@example.org>", 250);
    honest.cmd("RCPT TO:<bob@example.net>", 250);
    let (code, text) = data(&mut honest, b"Subject: honest\r\n\r\nx\r\n");
    assert_eq!(code, 250, "{text}");
    for c in &mut idle {
        c.cmd("NOOP", 250);
    }
}

// ----- SMTPUTF8 and 8BITMIME ------------------------------------------------------------

/// The refusal lines of the log, from `reply="` on.
fn refusals(log: &str) -> Vec<String> {
    log_lines(log, "refused")
        .iter()
        .filter_map(|l| l.split_once(" stage=").map(|(_, r)| format!("stage={r}")))
        .collect()
}

#[test]
fn utf8_and_8bit_mail_toward_a_next_hop_without_smtputf8_or_8bitmime_is_refused_never_altered() {
    let dns = TestDns::start(client_zone());
    // A next hop that offers neither SMTPUTF8 nor 8BITMIME.
    let hop = ScriptedHop::start(&["PIPELINING", "XCLIENT NAME ADDR PROTO HELO"], 100);
    let relay = relay(&dns, &hop.target(), &[]);
    let mut c = connect_as(&relay, CLIENT_IP);
    c.cmd(&format!("EHLO {CLIENT_NAME}"), 250);
    // A UTF-8 sender: 553 5.6.7 at MAIL.
    let text = c.cmd("MAIL FROM:<j\u{f6}rg@example.org> SMTPUTF8", 553);
    assert!(text.starts_with("553 5.6.7 "), "{text}");
    // ASCII sender: on without SMTPUTF8 or BODY=; a UTF-8 recipient gets 553 5.6.7 at RCPT.
    c.cmd("MAIL FROM:<alice@example.org> SMTPUTF8 BODY=8BITMIME", 250);
    let text = c.cmd("RCPT TO:<m\u{fc}ller@example.net>", 553);
    assert!(text.starts_with("553 5.6.7 "), "{text}");
    c.cmd("RCPT TO:<bob@example.net>", 250);
    // UTF-8 in the header: 554 5.6.9 after the dot.
    let (code, text) = data(
        &mut c,
        "Subject: gr\u{fc}\u{df}e\r\n\r\nplain\r\n".as_bytes(),
    );
    assert_eq!(code, 554, "{text}");
    assert!(text.starts_with("554 5.6.9 "), "{text}");
    // 8-bit body: 554 5.6.3 after the dot, in DATA and in BDAT.
    c.cmd("MAIL FROM:<alice@example.org> BODY=8BITMIME", 250);
    c.cmd("RCPT TO:<bob@example.net>", 250);
    let (code, text) = data(
        &mut c,
        "Subject: plain\r\n\r\ngr\u{fc}\u{df}e\r\n".as_bytes(),
    );
    assert_eq!(code, 554, "{text}");
    assert!(text.starts_with("554 5.6.3 "), "{text}");
    c.cmd("MAIL FROM:<alice@example.org> BODY=8BITMIME", 250);
    c.cmd("RCPT TO:<bob@example.net>", 250);
    let (code, text) = bdat(
        &mut c,
        "Subject: plain\r\n\r\ngr\u{fc}\u{df}e\r\n".as_bytes(),
        8,
    );
    assert_eq!(code, 554, "{text}");
    assert!(text.starts_with("554 5.6.3 "), "{text}");
    // A 7-bit message goes on.
    c.cmd("MAIL FROM:<alice@example.org> BODY=8BITMIME SMTPUTF8", 250);
    c.cmd("RCPT TO:<bob@example.net>", 250);
    let (code, text) = data(&mut c, b"Subject: plain\r\n\r\nseven bit\r\n");
    assert_eq!(code, 250, "{text}");
    c.cmd("QUIT", 221);

    let log = settled_log(&relay, 1);
    let seen = hop.connections();
    let commands: Vec<&String> = seen.iter().flat_map(|c| &c.commands).collect();
    // Nothing UTF-8, and no parameter the next hop did not offer, ever reached it.
    for line in &commands {
        assert!(line.is_ascii(), "{commands:?}");
        assert!(
            !line.contains("SMTPUTF8") && !line.contains("BODY="),
            "{commands:?}"
        );
    }
    // Every refused message was dropped without its final dot; the 7-bit one arrived.
    let completed: Vec<&Vec<u8>> = seen.iter().flat_map(|c| c.completed()).collect();
    assert_eq!(completed.len(), 1, "{seen:#?}\n{log}");
    assert!(completed[0].ends_with(b"Subject: plain\r\n\r\nseven bit\r\n.\r\n"));
    assert!(
        seen.iter()
            .flat_map(|c| &c.data)
            .all(|d| !d.ends_with(b"\r\n.\r\n") || d.is_ascii())
    );
    // Each refusal is logged like any other, by stage.
    let refused = refusals(&log);
    let stages: Vec<&str> = refused.iter().map(|r| &r[..r.find(' ').unwrap()]).collect();
    assert_eq!(
        stages,
        [
            "stage=mail",
            "stage=rcpt",
            "stage=data",
            "stage=data",
            "stage=data"
        ],
        "{log}"
    );
    assert!(refused[2].contains("reply=\"554 5.6.9 "), "{log}");
    assert!(refused[3].contains("reply=\"554 5.6.3 "), "{log}");
}

#[test]
fn eight_bit_bodies_go_to_a_next_hop_with_8bitmime_and_utf8_headers_need_smtputf8() {
    let dns = TestDns::start(client_zone());
    let hop = ScriptedHop::start(&["PIPELINING", "8BITMIME"], 100);
    let relay = relay(&dns, &hop.target(), &[]);
    let mut c = connect_as(&relay, CLIENT_IP);
    c.cmd(&format!("EHLO {CLIENT_NAME}"), 250);
    c.cmd("MAIL FROM:<alice@example.org> BODY=8BITMIME", 250);
    c.cmd("RCPT TO:<bob@example.net>", 250);
    let body = "Subject: plain\r\n\r\ngr\u{fc}\u{df}e\r\n";
    let (code, text) = data(&mut c, body.as_bytes());
    assert_eq!(code, 250, "{text}");
    c.cmd("MAIL FROM:<alice@example.org> BODY=8BITMIME", 250);
    c.cmd("RCPT TO:<bob@example.net>", 250);
    let (code, text) = data(&mut c, "Subject: gr\u{fc}\u{df}e\r\n\r\nx\r\n".as_bytes());
    assert!(text.starts_with("554 5.6.9 "), "{code} {text}");
    c.cmd("QUIT", 221);
    let seen = hop.connections();
    let completed: Vec<&Vec<u8>> = seen.iter().flat_map(|c| c.completed()).collect();
    assert_eq!(completed.len(), 1, "{seen:#?}");
    assert!(completed[0].ends_with(format!("{body}.\r\n").as_bytes()));
    assert!(
        seen[0]
            .commands
            .iter()
            .any(|l| l == "MAIL FROM:<alice@example.org> BODY=8BITMIME")
    );
}

// ----- bare CR and dot-stuffing --------------------------------------------------------

/// Every CR of `bytes` is followed by LF.
fn crlf_only(bytes: &[u8]) -> bool {
    bytes
        .iter()
        .enumerate()
        .all(|(i, &b)| b != b'\r' || bytes.get(i + 1) == Some(&b'\n'))
        && bytes
            .iter()
            .enumerate()
            .all(|(i, &b)| b != b'\n' || (i > 0 && bytes[i - 1] == b'\r'))
}

#[test]
fn a_bare_cr_reaches_the_next_hop_as_a_line_end_and_dot_stuffed_never_raw() {
    let dns = TestDns::start(client_zone());
    let hop = ScriptedHop::start(XCLIENT_EXTENSIONS, 100);
    let relay = relay(&dns, &hop.target(), &[]);
    let mut c = connect_as(&relay, CLIENT_IP);
    c.cmd(&format!("EHLO {CLIENT_NAME}"), 250);
    // `\r.\r` is what a next hop that ends lines at CR would take for an end of data.
    let message = b"Subject: cr\r\n\r\nbefore\r.\rafter\r\n.dot\r\nlast\r";
    c.cmd("MAIL FROM:<alice@example.org>", 250);
    c.cmd("RCPT TO:<bob@example.net>", 250);
    // In DATA the client stuffs the period that starts a line (RFC 5321 4.5.2).
    let stuffed = [&message[..], b"\n"].concat();
    let stuffed = String::from_utf8_lossy(&stuffed).replace("\r\n.dot", "\r\n..dot");
    let (code, text) = data(&mut c, stuffed.as_bytes());
    assert_eq!(code, 250, "{text}");
    c.cmd("MAIL FROM:<alice@example.org>", 250);
    c.cmd("RCPT TO:<bob@example.net>", 250);
    let (code, text) = bdat(&mut c, message, 5);
    assert_eq!(code, 250, "{text}");
    c.cmd("QUIT", 221);
    let seen = hop.wait_until("two messages", |s| {
        s.iter().map(|c| c.completed().len()).sum::<usize>() == 2
    });
    for sent in seen.iter().flat_map(|c| c.completed()) {
        assert!(crlf_only(sent), "{:?}", String::from_utf8_lossy(sent));
        let text = String::from_utf8_lossy(sent);
        assert!(
            text.ends_with("Subject: cr\r\n\r\nbefore\r\n..\r\nafter\r\n..dot\r\nlast\r\n.\r\n"),
            "{text:?}"
        );
    }
}

#[test]
fn under_bare_newline_reject_a_bare_cr_is_refused_after_the_real_end_without_a_dot() {
    let dns = TestDns::start(client_zone());
    let hop = ScriptedHop::start(XCLIENT_EXTENSIONS, 100);
    let relay = relay(&dns, &hop.target(), &[("HELOGUARD_BARE_NEWLINE", "reject")]);
    let mut c = connect_as(&relay, CLIENT_IP);
    c.cmd(&format!("EHLO {CLIENT_NAME}"), 250);
    for chunked in [false, true] {
        c.cmd("MAIL FROM:<alice@example.org>", 250);
        c.cmd("RCPT TO:<bob@example.net>", 250);
        let message = b"Subject: cr\r\n\r\nbefore\r.\rafter\r\n";
        let (code, text) = if chunked {
            bdat(&mut c, message, 7)
        } else {
            data(&mut c, message)
        };
        assert_eq!(code, 550, "{text}");
        assert!(text.starts_with("550 5.5.2 "), "{text}");
    }
    // The session goes on and a clean message passes.
    c.cmd("MAIL FROM:<alice@example.org>", 250);
    c.cmd("RCPT TO:<bob@example.net>", 250);
    let (code, text) = data(&mut c, b"Subject: clean\r\n\r\nx\r\n");
    assert_eq!(code, 250, "{text}");
    c.cmd("QUIT", 221);
    let seen = hop.connections();
    let completed: Vec<&Vec<u8>> = seen.iter().flat_map(|c| c.completed()).collect();
    assert_eq!(completed.len(), 1, "{seen:#?}");
    assert!(completed[0].ends_with(b"Subject: clean\r\n\r\nx\r\n.\r\n"));
}

// ----- routing tricks ------------------------------------------------------------------

const TRICKS: [&str; 4] = [
    "user%evil.test@example.net",
    "evil.test!user@example.net",
    "\"user@evil.test\"@example.net",
    "\"user%evil.test\"@example.net",
];

#[test]
fn routing_tricks_in_a_recipient_are_refused_in_every_mode() {
    let dns = TestDns::start(client_zone());
    let hop = ScriptedHop::start(XCLIENT_EXTENSIONS, 100);
    for relaying in [false, true] {
        let server = if relaying {
            relay(&dns, &hop.target(), &[])
        } else {
            maildir(&dns, &[])
        };
        let mut c = connect_as(&server, CLIENT_IP);
        c.cmd(&format!("EHLO {CLIENT_NAME}"), 250);
        c.cmd("MAIL FROM:<alice@example.org>", 250);
        for trick in TRICKS {
            let text = c.cmd(&format!("RCPT TO:<{trick}>"), 550);
            assert!(
                text.starts_with("550 5.7.1 "),
                "{relaying}: {trick}: {text}"
            );
        }
        // Ordinary recipients, and postmaster, are still taken.
        c.cmd("RCPT TO:<Postmaster>", 250);
        c.cmd("RCPT TO:<user.name+tag@example.net>", 250);
        let (code, text) = data(&mut c, b"Subject: after the tricks\r\n\r\nx\r\n");
        assert_eq!(code, 250, "{relaying}: {text}");
        c.cmd("QUIT", 221);
        let log = settled_log(&server, 1);
        let refused = refusals(&log);
        assert_eq!(refused.len(), TRICKS.len(), "{relaying}: {log}");
        for (line, trick) in refused.iter().zip(TRICKS) {
            assert!(line.starts_with("stage=rcpt "), "{line}");
            assert!(line.contains("reply=\"550 5.7.1 "), "{line}");
            let logged = trick.replace('"', "\\\"");
            assert!(
                line.contains(&format!("to=<{logged}>"))
                    || line.contains(&format!("to=\"<{logged}>\"")),
                "{line}"
            );
        }
    }
    // The next hop never heard of them.
    for conn in hop.connections() {
        let rcpts: Vec<&String> = conn
            .commands
            .iter()
            .filter(|l| l.starts_with("RCPT"))
            .collect();
        assert_eq!(
            rcpts,
            [
                "RCPT TO:<Postmaster>",
                "RCPT TO:<user.name+tag@example.net>"
            ],
            "{:?}",
            conn.commands
        );
    }
}

// ----- forged fields and loops over a long header -------------------------------------

/// A header of more than 64 KiB of harmless fields, then `tail` fields, then a body.
fn long_header_message(tail: &str) -> Vec<u8> {
    let mut m = String::new();
    let mut n = 0;
    while m.len() < 70 * 1024 {
        m.push_str(&format!(
            "X-Padding-{n}: 0123456789abcdef0123456789abcdef0123456789\r\n"
        ));
        n += 1;
    }
    m.push_str(tail);
    m.push_str("Subject: long header\r\n\r\nbody\r\n");
    m.into_bytes()
}

const FORGED: &str = "X-HELO-Check: mx.heloguard.test; pass forged=yes\r\n\
                      Authentication-Results: mx.heloguard.test; iprev=pass forged=yes\r\n";

fn received_fields(n: usize) -> String {
    "Received: from a.example by b.example; Mon, 7 Dec 2026 04:00:00 +0000\r\n".repeat(n)
}

/// Our fields, once each, and none of the forgeries.
fn assert_stripped(message: &[u8], what: &str) {
    let text = String::from_utf8_lossy(message);
    assert!(!text.contains("forged=yes"), "{what}");
    assert_eq!(
        text.matches(&format!("X-HELO-Check: {HOSTNAME};")).count(),
        1,
        "{what}"
    );
    assert_eq!(
        text.matches(&format!("Authentication-Results: {HOSTNAME};"))
            .count(),
        1,
        "{what}"
    );
    assert!(
        text.contains("X-Padding-0: ") && text.contains("Subject: long header"),
        "{what}"
    );
}

#[test]
fn forged_fields_and_loops_past_64_kib_of_header_in_data_and_bdat_relay_and_maildir() {
    let dns = TestDns::start(client_zone());
    let hop = ScriptedHop::start(XCLIENT_EXTENSIONS, 100);
    let forged = long_header_message(FORGED);
    let looping = long_header_message(&received_fields(101));
    let hundred = long_header_message(&received_fields(100));
    for relaying in [false, true] {
        let server = if relaying {
            relay(&dns, &hop.target(), &[])
        } else {
            maildir(&dns, &[])
        };
        let mut c = connect_as(&server, CLIENT_IP);
        c.cmd(&format!("EHLO {CLIENT_NAME}"), 250);
        for chunked in [false, true] {
            let mut send = |message: &[u8]| {
                c.cmd("MAIL FROM:<alice@example.org>", 250);
                c.cmd("RCPT TO:<bob@example.net>", 250);
                if chunked {
                    bdat(&mut c, message, 4000)
                } else {
                    data(&mut c, message)
                }
            };
            let (code, text) = send(&forged);
            assert_eq!(code, 250, "{relaying} {chunked}: {text}");
            let (code, text) = send(&looping);
            assert_eq!(code, 554, "{relaying} {chunked}: {text}");
            assert!(text.starts_with("554 5.4.6 "), "{text}");
            // 100 Received fields are no loop.
            let (code, text) = send(&hundred);
            assert_eq!(code, 250, "{relaying} {chunked}: {text}");
        }
        c.cmd("QUIT", 221);
        let stored: Vec<Vec<u8>> = if relaying {
            let seen = hop.wait_until("four messages", |s| {
                s.iter().map(|c| c.completed().len()).sum::<usize>() == 4
            });
            seen.iter().flat_map(|c| c.completed()).cloned().collect()
        } else {
            server
                .wait_messages(4)
                .iter()
                .map(|f| std::fs::read(f).unwrap())
                .collect()
        };
        assert_eq!(stored.len(), 4, "{relaying}");
        for (i, message) in stored.iter().enumerate() {
            assert_stripped(message, &format!("relaying={relaying} message {i}"));
            let received = String::from_utf8_lossy(message)
                .matches("Received: from a.example")
                .count();
            assert!(
                received == 0 || received == 100,
                "{relaying} {i}: {received}"
            );
        }
    }
}

// ----- the ids in the log --------------------------------------------------------------

#[test]
fn the_log_carries_our_queue_id_and_the_next_hops_reply_with_its_own() {
    let dns = TestDns::start(client_zone());
    let hop = ScriptedHop::start(XCLIENT_EXTENSIONS, 100);
    let relay = relay(&dns, &hop.target(), &[]);
    let mut c = connect_as(&relay, CLIENT_IP);
    c.cmd(&format!("EHLO {CLIENT_NAME}"), 250);
    c.cmd("MAIL FROM:<alice@example.org>", 250);
    c.cmd("RCPT TO:<bob@example.net>", 250);
    let (code, text) = data(&mut c, b"Subject: ids\r\n\r\nx\r\n");
    assert_eq!(code, 250, "{text}");
    c.cmd("QUIT", 221);
    // The client hears our queue id, the one in our Received field.
    let ours = text.rsplit(' ').next().unwrap_or_default().to_string();
    let log = settled_log(&relay, 1);
    let accepted = log_lines(&log, "accepted");
    assert_eq!(accepted.len(), 1, "{log}");
    assert!(
        accepted[0].contains(&format!(" id={ours} ")),
        "{}",
        accepted[0]
    );
    assert!(
        accepted[0].contains("relay=\"250 2.0.0 Ok: queued as HOPQ0X1\""),
        "{}",
        accepted[0]
    );
    let seen = hop.connections();
    let sent = String::from_utf8_lossy(seen[0].completed()[0]).to_string();
    assert!(
        sent.contains(&format!("by {HOSTNAME} (heloguard) with ESMTP id {ours}")),
        "{sent}"
    );
}
