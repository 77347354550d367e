//! Scale-out: Debian's HAProxy in front of two instances that share one private Redis.
//! HAProxy takes the test client's PROXY v1 header (`accept-proxy`), so the client can come
//! from a documentation address, and passes it on to the instances in PROXY v2
//! (`send-proxy-v2`, health checks with `check-send-proxy`). The instances see that address,
//! greylisting holds across them, and stopping one mid-run loses no accepted message while the
//! other keeps serving.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::dns_server::TestDns;
use common::server::{Client, TempDir, TestServer, proxy_v1};
use common::state::{DYNAMIC_IP, DYNAMIC_NAME, Redis, free_port, ip, zone};

const HAPROXY: &str = "/usr/sbin/haproxy";

struct Haproxy {
    child: Child,
    port: u16,
    _dir: TempDir,
}

impl Haproxy {
    fn start(backends: &[std::net::SocketAddr]) -> Haproxy {
        let dir = TempDir::new("haproxy");
        let port = free_port();
        let servers: String = backends
            .iter()
            .enumerate()
            .map(|(n, addr)| {
                format!(
                    "    server mx{n} {addr} send-proxy-v2 check check-send-proxy inter 200ms \
                     fall 1 rise 1\n"
                )
            })
            .collect();
        let cfg = format!(
            "global\n    maxconn 256\n\
             defaults\n    mode tcp\n    timeout connect 2s\n    timeout client 30s\n    \
             timeout server 30s\n    retries 3\n    option redispatch\n\
             frontend smtp\n    bind 127.0.0.1:{port} accept-proxy\n    default_backend mx\n\
             backend mx\n    balance roundrobin\n{servers}"
        );
        let path = dir.path().join("haproxy.cfg");
        std::fs::write(&path, cfg).expect("write haproxy.cfg");
        let check = Command::new(HAPROXY)
            .arg("-c")
            .arg("-f")
            .arg(&path)
            .output()
            .expect("haproxy -c");
        assert!(
            check.status.success(),
            "haproxy.cfg: {}",
            String::from_utf8_lossy(&check.stderr)
        );
        let child = Command::new(HAPROXY)
            .arg("-db")
            .arg("-f")
            .arg(&path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn haproxy");
        let h = Haproxy {
            child,
            port,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "haproxy did not listen");
            std::thread::sleep(Duration::from_millis(50));
        }
        h
    }

    /// A session through HAProxy from `client_ip`, after its banner.
    fn connect_as(&self, client_ip: &str) -> Client {
        let mut c = Client::connect_raw(([127, 0, 0, 1], self.port).into());
        c.send(proxy_v1(ip(client_ip)).as_bytes());
        let (code, text) = c.reply();
        assert_eq!(code, 220, "banner: {text}");
        c
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn instance(dns: &TestDns, redis: &Redis) -> TestServer {
    TestServer::builder()
        .proxy()
        .dns(dns.addr())
        .env("HELOGUARD_DOMAINS", "example.org")
        .env("HELOGUARD_HELO_POLICY", "default=tag,dynamic=greylist")
        .env("HELOGUARD_GREYLIST_DELAY", "2s")
        .env("HELOGUARD_STATE", &redis.url())
        .env("HELOGUARD_SHUTDOWN_GRACE_SECS", "10")
        .start()
}

/// EHLO, MAIL, RCPT from the dynamic client; the RCPT reply code.
fn to_rcpt(c: &mut Client) -> u16 {
    c.cmd(&format!("EHLO {DYNAMIC_NAME}"), 250);
    c.cmd("MAIL FROM:<alice@example.net>", 250);
    c.send(b"RCPT TO:<bob@example.org>\r\n");
    c.reply().0
}

/// DATA; whether the message was accepted.
fn finish(c: &mut Client, n: usize) -> bool {
    c.send(b"DATA\r\n");
    if c.try_reply().map(|r| r.0) != Some(354) {
        return false;
    }
    c.send(format!("Subject: scale-out {n}\r\n\r\nbody {n}\r\n.\r\n").as_bytes());
    c.try_reply().map(|r| r.0) == Some(250)
}

fn count_files(dir: &Path) -> usize {
    std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0)
}

#[test]
fn two_instances_behind_haproxy_share_greylisting_and_survive_losing_one() {
    if !Path::new(HAPROXY).exists() {
        common::skip_without("haproxy", "haproxy is not installed (.ci/run installs it)");
        return;
    }
    let Some(redis) = Redis::start(None) else {
        return;
    };
    let dns = TestDns::start(zone());
    let mut a = instance(&dns, &redis);
    let b = instance(&dns, &redis);
    let haproxy = Haproxy::start(&[
        a.proxy_addr.expect("proxy listener"),
        b.proxy_addr.expect("proxy listener"),
    ]);

    // Greylisted on whichever instance takes the first session; after the delay the retry
    // passes, and round robin sends it to the other one.
    let first_sight = Instant::now();
    let mut c = haproxy.connect_as(DYNAMIC_IP);
    assert_eq!(to_rcpt(&mut c), 451);
    c.cmd("QUIT", 221);
    std::thread::sleep(
        Duration::from_secs(2).saturating_sub(first_sight.elapsed()) + Duration::from_millis(200),
    );
    let mut accepted = 0;
    for n in 0..4 {
        let mut c = haproxy.connect_as(DYNAMIC_IP);
        assert_eq!(to_rcpt(&mut c), 250);
        assert!(finish(&mut c, n));
        accepted += 1;
        c.cmd("QUIT", 221);
    }
    // Both instances served sessions, and both saw the documentation address.
    for s in [&a, &b] {
        let log = s.log();
        assert!(
            log.contains(&format!("ip={DYNAMIC_IP}")),
            "instance saw the client: {log}"
        );
    }

    // Open transactions on both instances, then stop A: what either accepts is stored.
    let mut open: Vec<Client> = (0..4)
        .map(|_| {
            let mut c = haproxy.connect_as(DYNAMIC_IP);
            assert_eq!(to_rcpt(&mut c), 250);
            c
        })
        .collect();
    a.signal(libc::SIGTERM);
    let mut tried = 0;
    for (n, c) in open.iter_mut().enumerate() {
        tried += 1;
        if finish(c, 100 + n) {
            accepted += 1;
        }
    }
    drop(open);
    assert_eq!(a.wait_exit(Duration::from_secs(20)), Some(0), "{}", a.log());

    // B keeps serving everything HAProxy sends (its health check has taken A out, and a
    // connection refused is redispatched).
    for n in 0..6 {
        let mut c = haproxy.connect_as(DYNAMIC_IP);
        assert_eq!(to_rcpt(&mut c), 250);
        assert!(finish(&mut c, 200 + n), "B serves after A stopped");
        accepted += 1;
        c.cmd("QUIT", 221);
    }
    let stored = count_files(&a.maildir().join("new")) + count_files(&b.maildir().join("new"));
    assert_eq!(
        stored, accepted,
        "every accepted message is stored ({tried} open at stop)"
    );
    // Draining: the transactions open on A at SIGTERM had their grace to finish.
    assert_eq!(accepted, 14);
}
