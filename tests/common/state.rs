//! What the state store tests share: a private redis-server, a metrics scrape, the zone of
//! clients that greylisting does and does not pick.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::dns_server::TestZone;
use super::server::TempDir;

pub const REDIS_SERVER: &str = "/usr/bin/redis-server";

/// The client greylisting picks: its PTR name is a dynamic pool name, forward-confirmed, in the
/// registered domain `example.net` (the greylist client).
pub const DYNAMIC_IP: &str = "192.0.2.10";
pub const DYNAMIC_NAME: &str = "dsl-192-0-2-10.pool.example.net";
/// A client whose checks all pass: never greylisted.
pub const CLEAN_IP: &str = "192.0.2.20";
pub const CLEAN_NAME: &str = "mail.example.org";

pub fn ip(s: &str) -> IpAddr {
    s.parse().expect("test address")
}

/// The zone both clients resolve in.
pub fn zone() -> TestZone {
    TestZone::new()
        .addr(DYNAMIC_NAME, DYNAMIC_IP)
        .ptr(DYNAMIC_IP, DYNAMIC_NAME)
        .addr(CLEAN_NAME, CLEAN_IP)
        .ptr(CLEAN_IP, CLEAN_NAME)
}

/// GET /metrics.
pub fn scrape(addr: SocketAddr) -> String {
    let mut c = TcpStream::connect(addr).expect("metrics connect");
    c.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    c.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
        .expect("metrics request");
    let mut out = String::new();
    let _ = c.read_to_string(&mut out);
    out
}

/// A sample's value (`name` with its labels, as rendered), 0 when absent.
pub fn sample(metrics: &str, name: &str) -> u64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or(0)
}

/// A free loopback port (bound, then released for a child to take).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// A private redis-server on a loopback port, in a temp directory, persisting nothing.
pub struct Redis {
    child: Option<Child>,
    pub port: u16,
    password: Option<String>,
    dir: TempDir,
}

impl Redis {
    /// None (after `skip_without`) when redis-server is not installed.
    pub fn start(password: Option<&str>) -> Option<Redis> {
        if !Path::new(REDIS_SERVER).exists() {
            super::skip_without(
                "redis-server",
                "redis-server is not installed (.ci/run installs it)",
            );
            return None;
        }
        let mut redis = Redis {
            child: None,
            port: free_port(),
            password: password.map(str::to_string),
            dir: TempDir::new("redis"),
        };
        redis.run();
        Some(redis)
    }

    fn run(&mut self) {
        let mut cmd = Command::new(REDIS_SERVER);
        cmd.args(["--bind", "127.0.0.1", "--port"])
            .arg(self.port.to_string())
            .arg("--dir")
            .arg(self.dir.path())
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .args(["--protected-mode", "no", "--loglevel", "warning"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .stdin(Stdio::null());
        if let Some(pw) = &self.password {
            cmd.args(["--requirepass", pw]);
        }
        self.child = Some(cmd.spawn().expect("spawn redis-server"));
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if self
                .command(&["PING"])
                .is_some_and(|r| r.starts_with("+PONG"))
            {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("redis-server did not answer PING on port {}", self.port);
    }

    /// The HELOGUARD_STATE value for it.
    pub fn url(&self) -> String {
        match &self.password {
            Some(pw) => format!("redis://:{pw}@127.0.0.1:{}/0", self.port),
            None => format!("redis://127.0.0.1:{}/0", self.port),
        }
    }

    /// Kills it (SIGKILL: an outage, not a shutdown).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port, empty.
    pub fn restart(&mut self) {
        self.kill();
        self.run();
    }

    /// One command over RESP, its first reply line (None when it cannot connect).
    pub fn command(&self, args: &[&str]) -> Option<String> {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        let mut out = Vec::new();
        if let Some(pw) = &self.password {
            write_command(&mut out, &["AUTH", pw]);
        }
        write_command(&mut out, args);
        s.write_all(&out).ok()?;
        let mut reader = BufReader::new(s);
        let mut line = String::new();
        if self.password.is_some() {
            reader.read_line(&mut line).ok()?;
            line.clear();
        }
        reader.read_line(&mut line).ok()?;
        Some(line.trim_end().to_string())
    }

    /// A `field:value` of INFO (as text).
    pub fn info_field(&self, section: &str, field: &str) -> Option<String> {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        let mut out = Vec::new();
        if let Some(pw) = &self.password {
            write_command(&mut out, &["AUTH", pw]);
        }
        write_command(&mut out, &["INFO", section]);
        write_command(&mut out, &["QUIT"]);
        s.write_all(&out).ok()?;
        let mut text = String::new();
        let _ = s.read_to_string(&mut text);
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{field}:")).map(str::to_string))
    }

    pub fn dir(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }
}

fn write_command(out: &mut Vec<u8>, args: &[&str]) {
    out.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
    for a in args {
        out.extend_from_slice(format!("${}\r\n{a}\r\n", a.len()).as_bytes());
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}
