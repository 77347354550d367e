//! The real binary under attack: idle-connection floods, limits, junk, slow data, pregreet,
//! SIGKILL mid-load, disk errors and low disk space.

mod common;

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use common::dns_server::{TestDns, TestZone};
use common::server::{Client, TestServer};

/// Resident set size of a process, in KiB.
fn rss_kib(pid: u32) -> u64 {
    status_kib(pid, "VmRSS:")
}

/// Peak resident set size of a process so far, in KiB: memory taken and given back in
/// between still shows here.
fn peak_rss_kib(pid: u32) -> u64 {
    status_kib(pid, "VmHWM:")
}

fn status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("{field} in /proc/{pid}/status"))
}

/// GET /metrics from HELOGUARD_METRICS.
fn metrics(addr: SocketAddr) -> String {
    let mut s = TcpStream::connect(addr).expect("metrics connect");
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut body = String::new();
    let _ = s.read_to_string(&mut body);
    body
}

fn metric_value(text: &str, series: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(series))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0.0)
}

/// Reads everything until EOF or timeout; the bytes read.
fn drain(c: &mut Client) -> Vec<u8> {
    let mut all = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match c.stream.read(&mut buf) {
            Ok(0) | Err(_) => return all,
            Ok(n) => all.extend_from_slice(&buf[..n]),
        }
    }
}

fn raise_nofile(want: u64) -> Result<(), String> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit write to / read from a valid rlimit struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return Err("getrlimit failed".into());
        }
        if lim.rlim_max < want {
            return Err(format!(
                "RLIMIT_NOFILE hard limit {} < {want}",
                lim.rlim_max
            ));
        }
        lim.rlim_cur = lim.rlim_max;
        if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
            return Err("setrlimit failed".into());
        }
    }
    Ok(())
}

/// A TCP connection from a chosen loopback source address.
fn connect_from(src: Ipv4Addr, to: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    socket.bind(&SocketAddr::new(IpAddr::V4(src), 0).into())?;
    socket.connect(&to.into())?;
    Ok(socket.into())
}

#[test]
fn ten_thousand_idle_connections_leave_room_for_a_real_client() {
    let n: usize = std::env::var("HELOGUARD_TEST_IDLE_CONNECTIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    if let Err(why) = raise_nofile(n as u64 + 100) {
        println!("skipped: {why}");
        return;
    }
    let sources = 100usize;
    let per_source = n.div_ceil(sources);
    let dns = TestDns::start(TestZone::default());
    let s = TestServer::builder()
        .dns(dns.addr())
        .env("HELOGUARD_MAX_CONNECTIONS", &(n + 10).to_string())
        .env(
            "HELOGUARD_MAX_CONNECTIONS_PER_IP",
            &(per_source + 5).to_string(),
        )
        .env("HELOGUARD_TIMEOUT_SECS", "900")
        .start();
    let pid = s.child.id();
    let before = rss_kib(pid);
    let started = Instant::now();
    let mut idle = Vec::with_capacity(n);
    for i in 0..n {
        let src = Ipv4Addr::new(127, 0, 0, 2 + (i % sources) as u8);
        match connect_from(src, s.addr) {
            Ok(c) => idle.push(c),
            Err(e) => panic!("connection {i} from {src}: {e}"),
        }
    }
    // A newcomer is accepted after every idle one (one listen queue): its banner means all
    // the idle connections are in.
    let mut c = Client::connect(s.addr);
    c.deliver(
        "newcomer.example.org",
        "a@example.org",
        "b@example.net",
        "Subject: still here\r\n\r\nhello",
    );
    c.cmd("QUIT", 221);
    let after = rss_kib(pid);
    let per_conn = (after.saturating_sub(before)) as f64 * 1024.0 / n as f64;
    println!(
        "{n} idle connections in {:?}: server RSS {before} KiB -> {after} KiB, {per_conn:.0} bytes per idle connection",
        started.elapsed()
    );
    assert_eq!(s.wait_messages(1).len(), 1);
    // The idle ones are all still served (spot check: a banner is waiting on each).
    for conn in idle.iter_mut().step_by(n.div_ceil(20).max(1)) {
        conn.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut buf = [0u8; 4];
        conn.read_exact(&mut buf)
            .expect("banner on an idle connection");
        assert_eq!(&buf[..3], b"220");
    }
    assert!(
        per_conn < 16.0 * 1024.0,
        "{per_conn:.0} bytes per idle connection"
    );
}

#[test]
fn connection_floods_get_421_and_the_others_go_on() {
    let dns = TestDns::start(TestZone::default());
    let s = TestServer::builder()
        .dns(dns.addr())
        .proxy()
        .env("HELOGUARD_MAX_CONNECTIONS", "6")
        .env("HELOGUARD_MAX_CONNECTIONS_PER_IP", "3")
        .start();
    let flooder: IpAddr = "198.51.100.9".parse().unwrap();
    let mut kept = Vec::new();
    for _ in 0..3 {
        let mut c = s.connect_as(flooder);
        assert_eq!(c.reply().0, 220);
        kept.push(c);
    }
    for _ in 0..5 {
        let mut c = s.connect_as(flooder);
        let (code, text) = c.reply();
        assert_eq!(code, 421, "{text}");
        assert!(text.starts_with("421 4.3.2"), "{text}");
        assert!(c.is_closed());
    }
    // Another client is not affected by the per-IP limit.
    let mut other = s.connect_as("203.0.113.5".parse().unwrap());
    assert_eq!(other.reply().0, 220);
    kept.push(other);
    kept.push(s.connect());
    kept.push(s.connect());
    // Six sessions: the total limit now answers everyone 421.
    for _ in 0..5 {
        let mut c = Client::connect_raw(s.addr);
        let (code, text) = c.reply();
        assert_eq!(code, 421, "{text}");
        assert!(text.starts_with("421 4.3.2"), "{text}");
    }
    for c in &mut kept {
        c.cmd("NOOP", 250);
    }
    // Closing one makes room for one, as soon as the server has seen it close.
    kept.pop().unwrap().cmd("QUIT", 221);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut c = Client::connect_raw(s.addr);
        if c.reply().0 == 220 {
            c.cmd("QUIT", 221);
            break;
        }
        assert!(Instant::now() < deadline, "the slot was never freed");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn error_and_junk_floods_end_with_421_4_7_0() {
    let s = TestServer::builder()
        .env("HELOGUARD_MAX_ERRORS", "5")
        .env("HELOGUARD_MAX_JUNK", "5")
        .env("HELOGUARD_DNS", "127.0.0.1:9")
        .start();
    let mut c = s.connect();
    c.send("BOGUS\r\n".repeat(50).as_bytes());
    let text = String::from_utf8_lossy(&drain(&mut c)).into_owned();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 7, "{text}");
    assert!(
        lines[..6].iter().all(|l| l.starts_with("500 5.5.2")),
        "{text}"
    );
    assert!(lines[6].starts_with("421 4.7.0"), "{text}");

    let mut c = s.connect();
    c.send("NOOP\r\n".repeat(50).as_bytes());
    let text = String::from_utf8_lossy(&drain(&mut c)).into_owned();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 6, "{text}");
    assert!(lines[..5].iter().all(|l| l.starts_with("250")), "{text}");
    assert!(lines[5].starts_with("421 4.7.0"), "{text}");
    // The server goes on.
    s.connect().cmd("QUIT", 221);
}

#[test]
fn overlong_lines_and_oversize_data_stream_through_without_memory() {
    let s = TestServer::builder()
        .env("HELOGUARD_MAX_MESSAGE_SIZE", "100000")
        .env("HELOGUARD_DNS", "127.0.0.1:9")
        .env("HELOGUARD_DNS_TIMEOUT_MS", "100")
        .start();
    let pid = s.child.id();
    let mut c = s.connect();
    let before = rss_kib(pid);
    let peak_before = peak_rss_kib(pid);
    let chunk = vec![b'x'; 64 * 1024];
    for _ in 0..256 {
        c.send(&chunk);
    }
    c.send(b"\r\n");
    let (code, text) = c.reply();
    assert_eq!(code, 500, "{text}");
    assert!(text.starts_with("500 5.5.6"), "{text}");
    c.cmd("EHLO client.example.org", 250);
    c.cmd("MAIL FROM:<a@example.org>", 250);
    c.cmd("RCPT TO:<b@example.net>", 250);
    c.cmd("DATA", 354);
    let line = [vec![b'y'; 998], b"\r\n".to_vec()].concat();
    for _ in 0..(32 * 1024 * 1024 / line.len()) {
        c.send(&line);
    }
    c.send(b".\r\n");
    let (code, text) = c.reply();
    assert_eq!(code, 552, "{text}");
    assert!(text.starts_with("552 5.3.4"), "{text}");
    let after = rss_kib(pid);
    println!("server RSS {before} KiB -> {after} KiB after a 16 MiB line and a 32 MiB DATA");
    assert!(
        after < before + 8 * 1024,
        "RSS grew from {before} KiB to {after} KiB"
    );
    // Nor held for a while and given back before the reply.
    let peak = peak_rss_kib(pid);
    assert!(
        peak < peak_before + 8 * 1024,
        "peak RSS grew from {peak_before} KiB to {peak} KiB"
    );
    c.cmd("NOOP", 250);
    assert!(s.new_messages().is_empty());
}

#[test]
fn data_trickled_below_the_minimum_rate_is_cut_after_its_grace_time() {
    let s = TestServer::builder()
        .env("HELOGUARD_MIN_DATA_RATE", "1000")
        .env("HELOGUARD_DNS", "127.0.0.1:9")
        .env("HELOGUARD_DNS_TIMEOUT_MS", "100")
        .start();
    let mut c = s.connect();
    c.cmd("EHLO client.example.org", 250);
    c.cmd("MAIL FROM:<a@example.org>", 250);
    c.cmd("RCPT TO:<b@example.net>", 250);
    c.cmd("DATA", 354);
    let started = Instant::now();
    c.stream.set_nonblocking(true).unwrap();
    let mut got = Vec::new();
    while started.elapsed() < Duration::from_secs(45) {
        let _ = c.stream.write_all(b"slow\r\n");
        std::thread::sleep(Duration::from_millis(500));
        let mut buf = [0u8; 256];
        match c.stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(_) => {}
        }
    }
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("421 4.4.2"), "{text:?}");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_secs(29) && took < Duration::from_secs(40),
        "{took:?}"
    );
    assert!(s.new_messages().is_empty());
}

#[test]
fn a_proxy_client_that_never_sends_its_header_is_closed_without_a_banner() {
    let s = TestServer::builder().proxy().start();
    let started = Instant::now();
    let mut silent: Vec<Client> = (0..20)
        .map(|_| Client::connect_raw(s.proxy_addr.unwrap()))
        .collect();
    // Meanwhile a plain client is served.
    s.connect().cmd("QUIT", 221);
    for c in &mut silent {
        assert!(drain(c).is_empty(), "no banner without a PROXY header");
    }
    let took = started.elapsed();
    assert!(
        took >= Duration::from_secs(4) && took < Duration::from_secs(15),
        "{took:?}"
    );
}

#[test]
fn pregreet_gets_554_then_503_until_quit_or_ten_seconds_and_is_counted() {
    let s = TestServer::builder()
        .metrics()
        .env("HELOGUARD_GREET_DELAY_MS", "800")
        .env("HELOGUARD_DNS", "127.0.0.1:9")
        .env("HELOGUARD_DNS_TIMEOUT_MS", "100")
        .start();
    // Patient client: 220.
    let mut good = Client::connect(s.addr);
    good.cmd("EHLO client.example.org", 250);

    // Talks first, then QUITs.
    let mut c = Client::connect_raw(s.addr);
    c.send(b"EHLO spam.example\r\n");
    let (code, text) = c.reply();
    assert_eq!(code, 554, "{text}");
    assert!(text.starts_with("554 5.5.1"), "{text}");
    assert_eq!(c.reply().0, 503, "the early EHLO");
    for line in ["EHLO spam.example", "MAIL FROM:<a@b.example>", "NOOP"] {
        let text = c.cmd(line, 503);
        assert!(text.starts_with("503 5.5.1"), "{text}");
    }
    c.cmd("QUIT", 221);
    assert!(c.is_closed());

    // Talks first, then stays: closed 10 s later.
    let mut c = Client::connect_raw(s.addr);
    c.send(b"HELO x\r\n");
    let started = Instant::now();
    assert_eq!(c.reply().0, 554);
    assert_eq!(c.reply().0, 503);
    assert!(c.try_reply().is_none(), "closed");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_secs(9) && took < Duration::from_secs(20),
        "{took:?}"
    );
    good.cmd("QUIT", 221);
    let text = metrics(s.metrics_addr.expect("metrics address"));
    let pregreets = metric_value(
        &text,
        "heloguard_connections_refused_total{reason=\"pregreet\"}",
    );
    assert_eq!(pregreets, 2.0, "{text}");
}

/// A message body that says how long it is and ends with a marker, so a cut is visible.
fn body_for(id: usize) -> String {
    let filler = "x".repeat(76);
    let mut body = format!("Subject: load {id}\r\n\r\n");
    for _ in 0..800 {
        body.push_str(&filler);
        body.push_str("\r\n");
    }
    body.push_str(&format!("END-OF-MESSAGE {id}"));
    body
}

fn set_age(path: &Path, age: Duration) {
    let f = std::fs::File::options().write(true).open(path).unwrap();
    f.set_modified(SystemTime::now() - age).unwrap();
}

#[test]
fn sigkill_mid_load_leaves_only_whole_messages_and_restart_cleans_tmp() {
    let dns = TestDns::start(TestZone::default());
    let s = TestServer::builder().dns(dns.addr()).start();
    let accepted = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let addr = s.addr;
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let accepted = accepted.clone();
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut id = t * 100_000;
                while !stop.load(Ordering::SeqCst) {
                    let Ok(stream) = TcpStream::connect(addr) else {
                        return;
                    };
                    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
                    if let Some(()) = load_session(stream, id, &accepted) {
                        id += 5;
                    } else {
                        return;
                    }
                }
            })
        })
        .collect();
    // Mid-load: some messages are stored and more are on their way.
    let deadline = Instant::now() + Duration::from_secs(30);
    while accepted.lock().unwrap().len() < 40 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    s.signal(libc::SIGKILL);
    stop.store(true, Ordering::SeqCst);
    for t in threads {
        let _ = t.join();
    }
    let accepted = accepted.lock().unwrap().clone();
    assert!(!accepted.is_empty(), "no message got 250 before the kill");
    let maildir = s.maildir();
    let mut in_new = std::collections::HashSet::new();
    for path in s.new_messages() {
        let text = String::from_utf8(std::fs::read(&path).unwrap()).unwrap();
        let id: usize = text
            .split("Subject: load ")
            .nth(1)
            .and_then(|r| r.split("\r\n").next()?.parse().ok())
            .unwrap_or_else(|| panic!("unreadable message {}", path.display()));
        assert!(
            text.ends_with(&format!("{}\r\n", body_for(id))),
            "partial message in new/: {}",
            path.display()
        );
        in_new.insert(id);
    }
    for id in &accepted {
        assert!(
            in_new.contains(id),
            "message {id} got 250 but is not in new/"
        );
    }
    println!(
        "{} messages got 250 before SIGKILL; {} in new/",
        accepted.len(),
        in_new.len()
    );
    // Stale and fresh leftovers in tmp/.
    let stale = maildir.join("tmp/1.stale.leftover");
    let fresh = maildir.join("tmp/2.fresh.leftover");
    std::fs::write(&stale, b"half a message").unwrap();
    std::fs::write(&fresh, b"half a message").unwrap();
    set_age(&stale, Duration::from_secs(2 * 24 * 3600));
    set_age(&fresh, Duration::from_secs(3600));
    let s2 = TestServer::builder()
        .dns(dns.addr())
        .env("HELOGUARD_SPOOL", maildir.to_str().unwrap())
        .start();
    assert!(!stale.exists(), "a tmp/ file two days old survived startup");
    assert!(fresh.exists(), "a tmp/ file an hour old was removed");
    let mut c = s2.connect();
    c.deliver(
        "client.example.org",
        "a@example.org",
        "b@example.net",
        &body_for(999_999),
    );
    c.cmd("QUIT", 221);
}

/// One session delivering messages until an error; records the IDs that got 250.
fn load_session(stream: TcpStream, first: usize, accepted: &Mutex<Vec<usize>>) -> Option<()> {
    use std::io::{BufRead, BufReader};
    let mut w = stream.try_clone().ok()?;
    let mut r = BufReader::new(stream);
    let mut reply = || -> Option<u16> {
        loop {
            let mut line = String::new();
            if r.read_line(&mut line).ok()? == 0 {
                return None;
            }
            if line.as_bytes().get(3) != Some(&b'-') {
                return line.get(..3)?.parse().ok();
            }
        }
    };
    (reply()? == 220).then_some(())?;
    w.write_all(b"EHLO load.example.org\r\n").ok()?;
    (reply()? == 250).then_some(())?;
    for id in first..first + 5 {
        let msg = format!(
            "MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n{}\r\n.\r\n",
            body_for(id)
        );
        w.write_all(msg.as_bytes()).ok()?;
        for want in [250, 250, 354] {
            (reply()? == want).then_some(())?;
        }
        if reply()? == 250 {
            accepted.lock().unwrap().push(id);
        }
    }
    let _ = w.write_all(b"QUIT\r\n");
    Some(())
}

#[test]
fn a_spool_write_error_answers_451_and_the_server_goes_on() {
    let s = TestServer::builder()
        .env("HELOGUARD_DNS", "127.0.0.1:9")
        .env("HELOGUARD_DNS_TIMEOUT_MS", "100")
        .start();
    let tmp = s.maildir().join("tmp");
    std::fs::remove_dir(&tmp).expect("tmp/ is empty");
    std::fs::write(&tmp, b"not a directory").unwrap();
    let mut c = s.connect();
    c.cmd("EHLO client.example.org", 250);
    c.cmd("MAIL FROM:<a@example.org>", 250);
    c.cmd("RCPT TO:<b@example.net>", 250);
    c.cmd("DATA", 354);
    c.send(b"Subject: doomed\r\n\r\nhi\r\n.\r\n");
    let (code, text) = c.reply();
    assert_eq!(code, 451, "{text}");
    assert!(text.starts_with("451 4.3.0"), "{text}");
    assert!(s.new_messages().is_empty());
    // The disk comes back: the same session and new ones go on.
    std::fs::remove_file(&tmp).unwrap();
    std::fs::create_dir(&tmp).unwrap();
    c.deliver(
        "client.example.org",
        "a@example.org",
        "b@example.net",
        "Subject: fine\r\n\r\nhi",
    );
    s.connect().cmd("QUIT", 221);
    assert_eq!(s.wait_messages(1).len(), 1);
}

#[test]
fn a_file_size_limit_on_the_server_answers_451_and_the_server_goes_on() {
    let s = TestServer::builder()
        .env("HELOGUARD_DNS", "127.0.0.1:9")
        .env("HELOGUARD_DNS_TIMEOUT_MS", "100")
        .start();
    let pid = s.child.id() as libc::pid_t;
    let lim = libc::rlimit {
        rlim_cur: 4096,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: prlimit on our own child with a valid new limit and no old-limit output.
    let rc = unsafe { libc::prlimit(pid, libc::RLIMIT_FSIZE, &lim, std::ptr::null_mut()) };
    if rc != 0 {
        println!("skipped: prlimit(RLIMIT_FSIZE) failed");
        return;
    }
    let mut c = s.connect();
    c.cmd("EHLO client.example.org", 250);
    c.cmd("MAIL FROM:<a@example.org>", 250);
    c.cmd("RCPT TO:<b@example.net>", 250);
    c.cmd("DATA", 354);
    c.send(body_for(1).as_bytes());
    c.send(b"\r\n.\r\n");
    let (code, text) = c.reply();
    assert_eq!(code, 451, "{text}");
    assert!(text.starts_with("451 4.3.0"), "{text}");
    assert!(s.new_messages().is_empty());
    assert!(
        std::fs::read_dir(s.maildir().join("tmp")).unwrap().count() == 0,
        "the failed file is removed from tmp/"
    );
    c.deliver(
        "client.example.org",
        "a@example.org",
        "b@example.net",
        "Subject: small\r\n\r\nhi",
    );
    c.cmd("QUIT", 221);
}

#[test]
fn below_min_free_space_mail_gets_452_4_3_1() {
    let s = TestServer::builder()
        .env("HELOGUARD_MIN_FREE_MB", "999999999")
        .env("HELOGUARD_DNS", "127.0.0.1:9")
        .env("HELOGUARD_DNS_TIMEOUT_MS", "100")
        .start();
    let mut c = s.connect();
    c.cmd("EHLO client.example.org", 250);
    let text = c.cmd("MAIL FROM:<a@example.org>", 452);
    assert!(text.starts_with("452 4.3.1"), "{text}");
    c.cmd("QUIT", 221);
}

/// Out of file descriptors, accept fails and the queued connections raise no new readiness
/// event: the loop must come back to them by itself once descriptors are free again.
#[test]
fn connections_queued_while_out_of_descriptors_are_served_once_some_free_up() {
    let dns = TestDns::start(TestZone::new());
    let s = TestServer::builder()
        .dns(dns.addr())
        .env("HELOGUARD_MAX_CONNECTIONS_PER_IP", "0")
        .start();
    let pid = s.child.id() as libc::pid_t;
    // Count what the server has open, then allow only a few more.
    let open = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0);
    if open == 0 {
        println!("skipped: cannot read /proc/{pid}/fd");
        return;
    }
    let mut old = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: prlimit on our own child, reading its limit into a valid rlimit.
    let rc = unsafe { libc::prlimit(pid, libc::RLIMIT_NOFILE, std::ptr::null(), &mut old) };
    if rc != 0 {
        println!("skipped: prlimit(RLIMIT_NOFILE) cannot be read");
        return;
    }
    // The hard limit stays (above it RLIMIT_NOFILE cannot go); only the soft one drops.
    let lim = libc::rlimit {
        rlim_cur: (open + 4) as libc::rlim_t,
        rlim_max: old.rlim_max,
    };
    // SAFETY: prlimit on our own child with a valid new limit and no old-limit output.
    let rc = unsafe { libc::prlimit(pid, libc::RLIMIT_NOFILE, &lim, std::ptr::null_mut()) };
    if rc != 0 {
        println!("skipped: prlimit(RLIMIT_NOFILE) failed");
        return;
    }
    let mut served: Vec<Client> = (0..4).map(|_| Client::connect(s.addr)).collect();
    // These wait in the listen backlog: the server cannot accept them now.
    let mut waiting: Vec<Client> = (0..3).map(|_| Client::connect_raw(s.addr)).collect();
    std::thread::sleep(Duration::from_millis(300));
    for c in served.iter_mut() {
        c.cmd("QUIT", 221);
    }
    drop(served);
    // No new connection arrives; the queued ones are greeted all the same.
    for c in waiting.iter_mut() {
        let (code, text) = c.reply();
        assert_eq!(code, 220, "{text}");
    }
    waiting[0].cmd("QUIT", 221);
}
