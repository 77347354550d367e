//! What an operator relies on: the Prometheus endpoint after a known dialogue, SIGTERM and
//! its grace time, the systemd unit, and `--help` naming every variable.

mod common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::dns_server::{TestDns, TestZone};
use common::server::{Client, TempDir, TestServer};

/// Every variable of SPEC's configuration table.
const SPEC_VARIABLES: &[&str] = &[
    "HELOGUARD_LISTEN",
    "HELOGUARD_PROXY_LISTEN",
    "HELOGUARD_PROXY_TRUSTED",
    "HELOGUARD_HOSTNAME",
    "HELOGUARD_WORKERS",
    "HELOGUARD_SPOOL_WRITERS",
    "HELOGUARD_DNS",
    "HELOGUARD_DNS_TIMEOUT_MS",
    "HELOGUARD_DNS_BUDGET",
    "HELOGUARD_DELIVER",
    "HELOGUARD_SPOOL",
    "HELOGUARD_MIN_FREE_MB",
    "HELOGUARD_DOMAINS",
    "HELOGUARD_MAX_MESSAGE_SIZE",
    "HELOGUARD_MAX_RECIPIENTS",
    "HELOGUARD_MAX_CONNECTIONS",
    "HELOGUARD_MAX_CONNECTIONS_PER_IP",
    "HELOGUARD_TIMEOUT_SECS",
    "HELOGUARD_MIN_DATA_RATE",
    "HELOGUARD_MAX_ERRORS",
    "HELOGUARD_MAX_JUNK",
    "HELOGUARD_GREET_DELAY_MS",
    "HELOGUARD_TLS_CERT",
    "HELOGUARD_TLS_KEY",
    "HELOGUARD_HELO_POLICY",
    "HELOGUARD_HELO_ALLOW",
    "HELOGUARD_REJECT_AT",
    "HELOGUARD_BARE_NEWLINE",
    "HELOGUARD_METRICS",
    "HELOGUARD_SHUTDOWN_GRACE_SECS",
    "HELOGUARD_GREYLIST_DELAY",
    "HELOGUARD_GREYLIST_RETRY",
    "HELOGUARD_GREYLIST_PASS",
    "HELOGUARD_HELO_CHURN",
    "HELOGUARD_STATE",
    "HELOGUARD_STATE_FILE",
    "HELOGUARD_STATE_TIMEOUT_MS",
    "HELOGUARD_STATE_MAX_ENTRIES",
    "HELOGUARD_DNSBL",
    "HELOGUARD_DNSBL_THRESHOLD",
    "HELOGUARD_DNSWL_THRESHOLD",
    "HELOGUARD_RHSBL",
    "HELOGUARD_DNSBL_DISPLAY",
    "HELOGUARD_SPF_TIMEOUT_MS",
    "RUST_LOG",
];

/// The 11 HELO checks of SPEC, in header order.
const CHECKS: [&str; 15] = [
    "syntax",
    "bare_ip",
    "fqdn",
    "localhost",
    "own_name",
    "literal_match",
    "forward",
    "forward_match",
    "fcrdns",
    "rdns_match",
    "dynamic",
    "spf",
    "rhsbl",
    "dnsbl",
    "helo_churn",
];

// ---------------------------------------------------------------------------------------
// helpers

/// Starts a server with HELOGUARD_METRICS on a listener bound before it starts.
fn start_with_metrics(dns: SocketAddr, env: &[(&str, &str)]) -> (TestServer, SocketAddr) {
    let mut b = TestServer::builder().dns(dns).proxy().metrics();
    for (k, v) in env {
        b = b.env(k, v);
    }
    let s = b.start();
    let metrics = s.metrics_addr.expect("metrics address");
    (s, metrics)
}

/// One HTTP/1.1 GET over a raw socket: the status code and the body.
fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).expect("connect to the metrics endpoint");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n").expect("send request");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("read response");
    let (head, body) = response
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no end of head in {response:?}"));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line in {head:?}"));
    (status, body.to_string())
}

/// GET /metrics, which must answer 200.
fn scrape(addr: SocketAddr) -> String {
    let (status, body) = http_get(addr, "/metrics");
    assert_eq!(status, 200, "{body}");
    body
}

/// Every sample line as `name{labels}` -> value.
fn samples(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (key, value) = l.rsplit_once(' ').unwrap_or_else(|| panic!("{l:?}"));
            let value = value.parse().unwrap_or_else(|_| panic!("value in {l:?}"));
            (key.to_string(), value)
        })
        .collect()
}

/// The value of one sample, which must be present.
fn sample(text: &str, key: &str) -> f64 {
    *samples(text)
        .get(key)
        .unwrap_or_else(|| panic!("no sample {key} in\n{text}"))
}

/// The sum of every sample of metric `name` whose labels contain all of `having`.
fn sum_of(text: &str, name: &str, having: &[&str]) -> f64 {
    samples(text)
        .iter()
        .filter(|(k, _)| k.split('{').next() == Some(name))
        .filter(|(k, _)| having.iter().all(|h| k.contains(h)))
        .map(|(_, v)| v)
        .sum()
}

/// Waits (bounded) until the server log contains `needle`.
fn wait_log(s: &TestServer, needle: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !s.log().contains(needle) {
        assert!(
            Instant::now() < deadline,
            "log never showed {needle:?}:\n{}",
            s.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// SIGTERM, then wait until the event loop has taken it.
fn sigterm(s: &TestServer) {
    s.signal(libc::SIGTERM);
    wait_log(s, "stop requested");
}

/// True when nobody accepts on `addr` any more: the connect fails, or the connection is
/// closed without a banner.
fn refuses_connections(addr: SocketAddr) -> bool {
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_secs(2)) else {
        return true;
    };
    stream
        .set_read_timeout(Some(Duration::from_secs(3)))
        .expect("timeout");
    let mut b = [0u8; 64];
    // A listener that still served would send a 220 banner.
    !matches!(stream.read(&mut b), Ok(n) if n > 0 && b[..n].starts_with(b"220"))
}

/// EHLO, MAIL, RCPT, DATA: the client is then inside the message.
fn open_data(c: &mut Client, helo: &str) {
    c.cmd(&format!("EHLO {helo}"), 250);
    c.cmd("MAIL FROM:<alice@example.org>", 250);
    c.cmd("RCPT TO:<bob@example.net>", 250);
    c.cmd("DATA", 354);
}

/// The next reply must be 421 4.3.2, then the server closes.
fn expect_shutdown_421(c: &mut Client, who: &str) {
    let (code, text) = c
        .try_reply()
        .unwrap_or_else(|| panic!("{who}: closed without a 421"));
    assert_eq!(code, 421, "{who}: {text}");
    assert!(text.starts_with("421 4.3.2 "), "{who}: {text}");
    assert!(c.is_closed(), "{who}: still open after the 421");
}

// ---------------------------------------------------------------------------------------
// metrics

#[test]
fn metrics_count_a_known_dialogue_exactly() {
    let dns = TestDns::start(TestZone::default());
    let (s, metrics) = start_with_metrics(dns.addr(), &[("HELOGUARD_DOMAINS", "example.net")]);

    // A fresh server: every labelled series at zero, the TYPE lines there.
    let fresh = scrape(metrics);
    for (name, kind) in [
        ("heloguard_connections_total", "counter"),
        ("heloguard_connections_refused_total", "counter"),
        ("heloguard_sessions_active", "gauge"),
        ("heloguard_messages_accepted_total", "counter"),
        ("heloguard_messages_rejected_total", "counter"),
        ("heloguard_helo_checks_total", "counter"),
        ("heloguard_helo_verdicts_total", "counter"),
        ("heloguard_dns_queries_total", "counter"),
        ("heloguard_dns_seconds", "histogram"),
        ("heloguard_replies_total", "counter"),
        ("heloguard_tls_handshakes_total", "counter"),
        ("heloguard_relay_failures_total", "counter"),
    ] {
        let line = format!("# TYPE {name} {kind}");
        assert!(fresh.lines().any(|l| l == line), "missing {line}\n{fresh}");
    }
    assert_eq!(sample(&fresh, "heloguard_messages_accepted_total"), 0.0);
    assert_eq!(
        sample(&fresh, "heloguard_connections_total{listener=\"plain\"}"),
        0.0
    );

    // Plain session: one message, an unknown command, a recipient domain not ours.
    let mut a = s.connect();
    a.cmd("EHLO a.example.org", 250);
    a.cmd("MAIL FROM:<alice@example.org>", 250);
    a.cmd("RCPT TO:<bob@example.net>", 250);
    a.cmd("DATA", 354);
    a.send(b"Subject: one\r\n\r\nfirst\r\n.\r\n");
    assert_eq!(a.reply().0, 250);
    a.cmd("FROB", 500);
    a.cmd("MAIL FROM:<alice@example.org>", 250);
    a.cmd("RCPT TO:<carol@elsewhere.test>", 550);
    a.cmd("RSET", 250);
    a.cmd("QUIT", 221);
    assert!(a.is_closed());

    // PROXY session presenting 192.0.2.7: the second message.
    let mut b = s.connect_as("192.0.2.7".parse().unwrap());
    let (code, banner) = b.reply();
    assert_eq!(code, 220, "{banner}");
    b.deliver(
        "b.example.org",
        "dave@example.org",
        "bob@example.net",
        "Subject: two\r\n\r\nsecond",
    );
    b.cmd("QUIT", 221);
    assert!(b.is_closed());

    // A PROXY connection without a header: closed, no session.
    let mut junk = Client::connect_raw(s.proxy_addr.unwrap());
    junk.send(b"EHLO not-a-proxy-header\r\n");
    assert!(junk.is_closed());

    assert_eq!(s.wait_messages(2).len(), 2);

    // The gauge falls back to zero once the server has seen both sessions end.
    let deadline = Instant::now() + Duration::from_secs(10);
    let text = loop {
        let text = scrape(metrics);
        if sample(&text, "heloguard_sessions_active") == 0.0 || Instant::now() > deadline {
            break text;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(sample(&text, "heloguard_sessions_active"), 0.0, "{text}");

    for (key, want) in [
        ("heloguard_connections_total{listener=\"plain\"}", 1.0),
        ("heloguard_connections_total{listener=\"proxy\"}", 2.0),
        (
            "heloguard_connections_refused_total{reason=\"proxy_header\"}",
            1.0,
        ),
        (
            "heloguard_connections_refused_total{reason=\"max_connections\"}",
            0.0,
        ),
        (
            "heloguard_connections_refused_total{reason=\"per_ip\"}",
            0.0,
        ),
        (
            "heloguard_connections_refused_total{reason=\"shutdown\"}",
            0.0,
        ),
        ("heloguard_messages_accepted_total", 2.0),
        ("heloguard_messages_rejected_total{stage=\"rcpt\"}", 1.0),
        ("heloguard_messages_rejected_total{stage=\"helo\"}", 0.0),
        ("heloguard_messages_rejected_total{stage=\"mail\"}", 0.0),
        ("heloguard_messages_rejected_total{stage=\"data\"}", 0.0),
        ("heloguard_replies_total{code=\"220\"}", 2.0),
        // a: EHLO MAIL RCPT end-of-data MAIL RSET; b: EHLO MAIL RCPT end-of-data.
        ("heloguard_replies_total{code=\"250\"}", 10.0),
        ("heloguard_replies_total{code=\"354\"}", 2.0),
        ("heloguard_replies_total{code=\"500\"}", 1.0),
        ("heloguard_replies_total{code=\"550\"}", 1.0),
        ("heloguard_replies_total{code=\"221\"}", 2.0),
        ("heloguard_tls_handshakes_total{outcome=\"ok\"}", 0.0),
        ("heloguard_relay_failures_total{reason=\"connect\"}", 0.0),
    ] {
        assert_eq!(sample(&text, key), want, "{key}\n{text}");
    }
    // Only the codes that were sent appear.
    assert_eq!(
        sum_of(&text, "heloguard_replies_total", &[]),
        18.0,
        "{text}"
    );

    // One verdict per session (each EHLO before a DATA), 15 check results per verdict.
    let verdict_lines = s.log().matches("helo verdict ").count();
    assert_eq!(verdict_lines, 2, "{}", s.log());
    assert_eq!(
        sum_of(&text, "heloguard_helo_verdicts_total", &[]),
        2.0,
        "{text}"
    );
    assert_eq!(
        sum_of(&text, "heloguard_helo_checks_total", &[]),
        30.0,
        "{text}"
    );
    for check in CHECKS {
        let label = format!("check=\"{check}\"");
        assert_eq!(
            sum_of(&text, "heloguard_helo_checks_total", &[&label]),
            2.0,
            "{check}\n{text}"
        );
    }
    // The names have no address records in the test zone: forward fails (tagged by default),
    // so forward_match does not apply and both verdicts are `fail` with action `tag`.
    for (key, want) in [
        (
            "heloguard_helo_checks_total{check=\"syntax\",result=\"pass\"}",
            2.0,
        ),
        (
            "heloguard_helo_checks_total{check=\"literal_match\",result=\"none\"}",
            2.0,
        ),
        (
            "heloguard_helo_checks_total{check=\"forward\",result=\"fail\"}",
            2.0,
        ),
        (
            "heloguard_helo_checks_total{check=\"forward_match\",result=\"none\"}",
            2.0,
        ),
        (
            "heloguard_helo_verdicts_total{verdict=\"fail\",action=\"tag\"}",
            2.0,
        ),
    ] {
        assert_eq!(sample(&text, key), want, "{key}\n{text}");
    }
    // Each client IP's PTR was asked once.
    assert_eq!(
        sum_of(&text, "heloguard_dns_queries_total", &["type=\"PTR\""]),
        2.0,
        "{text}"
    );
    assert_eq!(
        sample(&text, "heloguard_dns_seconds_count{type=\"PTR\"}"),
        2.0,
        "{text}"
    );

    // Anything but /metrics is 404.
    let (status, body) = http_get(metrics, "/other");
    assert_eq!(status, 404, "{body}");
}

#[test]
fn a_log_only_check_is_logged_and_counted_but_not_enforced() {
    let dns = TestDns::start(TestZone::default());
    let (s, metrics) = start_with_metrics(
        dns.addr(),
        &[("HELOGUARD_HELO_POLICY", "default=tag,forward=log")],
    );
    let mut c = s.connect();
    c.deliver(
        "dry.example.org",
        "alice@example.org",
        "bob@example.net",
        "Subject: dry run\r\n\r\nbody",
    );
    c.cmd("QUIT", 221);
    assert!(c.is_closed());
    wait_log(&s, "session end ");

    let log = s.log();
    let line = log
        .lines()
        .find(|l| l.contains("helo verdict "))
        .unwrap_or_else(|| panic!("no verdict line:\n{log}"));
    // The dry run shows in the log line: forward's real result, though its action is `log`.
    assert!(line.contains(",forward:fail,"), "{line}");

    let text = scrape(metrics);
    assert_eq!(
        sample(
            &text,
            "heloguard_helo_checks_total{check=\"forward\",result=\"fail\"}"
        ),
        1.0,
        "{text}"
    );
    let msg = std::fs::read_to_string(&s.wait_messages(1)[0]).unwrap();
    assert!(msg.contains(" forward=none "), "{msg}");
}

// ---------------------------------------------------------------------------------------
// signals

#[test]
fn sigterm_lets_a_slow_data_finish_then_exits_0_and_accepts_no_one() {
    let dns = TestDns::start(TestZone::default());
    let mut s = TestServer::builder()
        .dns(dns.addr())
        .env("HELOGUARD_SHUTDOWN_GRACE_SECS", "20")
        .start();
    let addr = s.addr;
    let mut c = s.connect();
    open_data(&mut c, "slow.example.org");
    c.send(b"Subject: slow\r\n\r\nfirst half\r\n");

    sigterm(&s);
    assert!(
        refuses_connections(addr),
        "a new connection was served after SIGTERM"
    );
    assert!(s.new_messages().is_empty());

    c.send(b"second half\r\n.\r\n");
    let (code, text) = c.reply();
    assert_eq!(code, 250, "{text}");
    // The transaction is over: the session is closed for the shutdown.
    expect_shutdown_421(&mut c, "after its message");

    let files = s.wait_messages(1);
    assert_eq!(files.len(), 1);
    let msg = std::fs::read_to_string(&files[0]).unwrap();
    assert!(
        msg.ends_with("Subject: slow\r\n\r\nfirst half\r\nsecond half\r\n"),
        "{msg}"
    );
    assert_eq!(s.wait_exit(Duration::from_secs(10)), Some(0), "{}", s.log());
    assert!(refuses_connections(addr));
}

#[test]
fn sigterm_closes_idle_sessions_with_421_at_once() {
    let dns = TestDns::start(TestZone::default());
    let mut s = TestServer::builder()
        .dns(dns.addr())
        .env("HELOGUARD_SHUTDOWN_GRACE_SECS", "60")
        .start();
    let mut greeted = s.connect();
    let mut after_ehlo = s.connect();
    after_ehlo.cmd("EHLO idle.example.org", 250);
    let mut after_rset = s.connect();
    after_rset.cmd("EHLO idle2.example.org", 250);
    after_rset.cmd("MAIL FROM:<a@example.org>", 250);
    after_rset.cmd("RSET", 250);

    let t0 = Instant::now();
    s.signal(libc::SIGTERM);
    expect_shutdown_421(&mut greeted, "after the banner");
    expect_shutdown_421(&mut after_ehlo, "after EHLO");
    expect_shutdown_421(&mut after_rset, "after RSET");
    // "At once": the three 421s came well inside the 60 s grace, however loaded the machine.
    assert!(t0.elapsed() < Duration::from_secs(20), "{:?}", t0.elapsed());
    // Nobody was in a transaction: no waiting for the 60 s grace.
    assert_eq!(s.wait_exit(Duration::from_secs(10)), Some(0), "{}", s.log());
    assert!(t0.elapsed() < Duration::from_secs(30));
    let log = s.log();
    assert_eq!(log.matches("session end ").count(), 3, "{log}");
}

#[test]
fn during_the_grace_time_a_new_mail_gets_421() {
    let dns = TestDns::start(TestZone::default());
    let mut s = TestServer::builder()
        .dns(dns.addr())
        .env("HELOGUARD_SHUTDOWN_GRACE_SECS", "20")
        .start();
    // In DATA at the signal; finishes its message and pipelines a new MAIL behind it.
    let mut in_data = s.connect();
    open_data(&mut in_data, "data.example.org");
    in_data.send(b"Subject: grace\r\n\r\nbody\r\n");
    // Between MAIL and DATA at the signal.
    let mut in_envelope = s.connect();
    in_envelope.cmd("EHLO env.example.org", 250);
    in_envelope.cmd("MAIL FROM:<erin@example.org>", 250);

    sigterm(&s);

    // The open transaction may go on: another recipient is still accepted...
    in_envelope.cmd("RCPT TO:<bob@example.net>", 250);
    // ...but a new MAIL is not.
    in_envelope.send(b"MAIL FROM:<erin@example.org>\r\n");
    expect_shutdown_421(&mut in_envelope, "MAIL inside a transaction");

    in_data.send(b".\r\nMAIL FROM:<alice@example.org>\r\n");
    let (code, text) = in_data.reply();
    assert_eq!(code, 250, "{text}");
    expect_shutdown_421(&mut in_data, "MAIL after the finished message");

    assert_eq!(s.wait_messages(1).len(), 1);
    assert_eq!(s.wait_exit(Duration::from_secs(10)), Some(0), "{}", s.log());
    assert_eq!(s.new_messages().len(), 1);
}

#[test]
fn a_transaction_still_open_when_the_grace_ends_gets_421_and_leaves_nothing() {
    let dns = TestDns::start(TestZone::default());
    let mut s = TestServer::builder()
        .dns(dns.addr())
        .env("HELOGUARD_SHUTDOWN_GRACE_SECS", "1")
        .start();
    let mut c = s.connect();
    open_data(&mut c, "stuck.example.org");
    c.send(b"Subject: never finished\r\n\r\npart\r\n");

    let t0 = Instant::now();
    sigterm(&s);
    expect_shutdown_421(&mut c, "at the end of the grace time");
    assert!(
        t0.elapsed() >= Duration::from_millis(900),
        "421 before the grace time ended: {:?}",
        t0.elapsed()
    );
    assert_eq!(s.wait_exit(Duration::from_secs(10)), Some(0), "{}", s.log());
    assert!(s.new_messages().is_empty());
}

#[test]
fn a_second_sigterm_ends_at_once_without_partial_files() {
    let dns = TestDns::start(TestZone::default());
    let mut s = TestServer::builder()
        .dns(dns.addr())
        .env("HELOGUARD_SHUTDOWN_GRACE_SECS", "60")
        .start();
    let line = "x".repeat(998) + "\r\n";
    // Inside DATA at both signals: must leave nothing.
    let mut half = s.connect();
    open_data(&mut half, "twice.example.org");
    for _ in 0..200 {
        half.send(line.as_bytes());
    }
    // Sends a whole 2 MB message whose spool write races the second signal: its file is
    // either whole in new/ or absent, never cut short.
    let mut whole = s.connect();
    open_data(&mut whole, "race.example.org");
    for _ in 0..2000 {
        whole.send(line.as_bytes());
    }

    sigterm(&s);
    whole.send(b"last\r\n.\r\n");
    let t0 = Instant::now();
    s.signal(libc::SIGTERM);
    assert_eq!(s.wait_exit(Duration::from_secs(10)), Some(0), "{}", s.log());
    assert!(
        t0.elapsed() < Duration::from_secs(10),
        "the grace time was waited out"
    );
    assert!(s.log().contains("second stop request"), "{}", s.log());

    let accepted = whole.try_reply().map(|(code, _)| code) == Some(250);
    let files = s.new_messages();
    assert!(files.len() <= 1, "{files:?}");
    if accepted {
        assert_eq!(files.len(), 1, "250 was sent but new/ is empty");
    }
    for f in &files {
        let msg = std::fs::read_to_string(f).unwrap();
        assert!(
            msg.contains("Received: from race.example.org ")
                && msg.ends_with(&(line.repeat(2000) + "last\r\n")),
            "partial file in new/: {} octets",
            msg.len()
        );
    }
    // The half-sent message never shows up; its client sees the end (421 or a plain close).
    match half.try_reply() {
        None => {}
        Some((code, text)) => assert_eq!(code, 421, "{text}"),
    }
}

// ---------------------------------------------------------------------------------------
// installation

#[test]
fn the_systemd_unit_verifies() {
    let Ok(out) = Command::new("systemd-analyze").arg("--version").output() else {
        common::skip_without("systemd-analyze", "systemd-analyze is not installed");
        return;
    };
    if !out.status.success() {
        common::skip_without("systemd-analyze", "systemd-analyze --version failed");
        return;
    }
    let unit = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd/heloguard.service"),
    )
    .expect("read systemd/heloguard.service");
    let exec_lines = unit.lines().filter(|l| l.starts_with("ExecStart=")).count();
    assert_eq!(exec_lines, 1, "one ExecStart= line expected");
    let unit: String = unit
        .lines()
        .map(|l| {
            if l.starts_with("ExecStart=") {
                format!("ExecStart={}\n", env!("CARGO_BIN_EXE_heloguard"))
            } else {
                format!("{l}\n")
            }
        })
        .collect();
    let dir = TempDir::new("unit");
    let path = dir.path().join("heloguard.service");
    std::fs::write(&path, unit).expect("write unit copy");

    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .expect("run systemd-analyze verify");
    let output = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "systemd-analyze verify failed:\n{output}"
    );
    // verify exits 0 on directives it ignores; any line about our file is a defect.
    let about_unit: Vec<&str> = output
        .lines()
        .filter(|l| l.contains("heloguard.service"))
        .collect();
    assert!(
        about_unit.is_empty(),
        "systemd-analyze verify complained:\n{output}"
    );
}

#[test]
fn help_and_the_env_file_name_every_variable() {
    let out = Command::new(env!("CARGO_BIN_EXE_heloguard"))
        .arg("--help")
        .env_clear()
        .output()
        .expect("run heloguard --help");
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).expect("utf-8 help");
    let env_file = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd/heloguard.env"),
    )
    .expect("read systemd/heloguard.env");
    let mut missing = Vec::new();
    for name in SPEC_VARIABLES {
        if !help.split_whitespace().any(|w| w == *name) {
            missing.push(format!("--help lacks {name}"));
        }
        if !env_file
            .lines()
            .any(|l| l.starts_with(&format!("#{name}=")))
        {
            missing.push(format!("heloguard.env lacks #{name}="));
        }
    }
    assert!(missing.is_empty(), "{missing:#?}\n{help}");
    assert!(
        help.contains("heloguard check --ip IP --helo NAME"),
        "{help}"
    );
}
