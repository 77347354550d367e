//! Runs the real `heloguard` binary on ephemeral loopback ports, and a small SMTP client.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "heloguard-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create temp dir");
        Self(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub const HOSTNAME: &str = "mx.heloguard.test";

/// The real server as a child process.
pub struct TestServer {
    pub child: Child,
    pub addr: SocketAddr,
    pub proxy_addr: Option<SocketAddr>,
    pub spool: TempDir,
    log: Arc<Mutex<String>>,
}

/// Builder for a TestServer: environment on top of test defaults.
pub struct ServerBuilder {
    env: Vec<(String, String)>,
    proxy: bool,
}

impl ServerBuilder {
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.retain(|(k, _)| k != key);
        self.env.push((key.to_string(), value.to_string()));
        self
    }

    /// Also listen on a PROXY listener (trusting loopback).
    pub fn proxy(mut self) -> Self {
        self.proxy = true;
        self
    }

    pub fn dns(self, addr: SocketAddr) -> Self {
        self.env("HELOGUARD_DNS", &addr.to_string())
    }

    pub fn start(self) -> TestServer {
        let spool = TempDir::new("spool");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_heloguard"));
        cmd.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("RUST_LOG", "info")
            .env("HELOGUARD_LISTEN", "127.0.0.1:0")
            .env("HELOGUARD_HOSTNAME", HOSTNAME)
            .env("HELOGUARD_SPOOL", spool.path().join("Maildir"))
            .env("HELOGUARD_MIN_FREE_MB", "0")
            .env("HELOGUARD_WORKERS", "2")
            .env("HELOGUARD_DNS_TIMEOUT_MS", "500");
        if self.proxy {
            cmd.env("HELOGUARD_PROXY_LISTEN", "127.0.0.1:0");
        }
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        cmd.stdout(Stdio::null())
            .stderr(Stdio::piped())
            .stdin(Stdio::null());
        let mut child = cmd.spawn().expect("spawn heloguard");
        let stderr = child.stderr.take().expect("stderr");
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let log2 = log.clone();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(stderr);
            let mut line = String::new();
            while reader.read_line(&mut line).map(|n| n > 0).unwrap_or(false) {
                if let Some(rest) = line.split("listening on ").nth(1) {
                    let mut parts = rest.split_whitespace();
                    if let (Some(a), Some(k)) = (parts.next(), parts.next())
                        && let Ok(addr) = a.parse::<SocketAddr>()
                    {
                        let _ = tx.send((addr, k.contains("proxy")));
                    }
                }
                if line.contains("serving as") {
                    let _ = tx.send(("0.0.0.0:0".parse().unwrap(), false));
                }
                log2.lock().unwrap().push_str(&line);
                line.clear();
            }
        });
        let mut addr = None;
        let mut proxy_addr = None;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok((a, _)) if a.port() == 0 => break,
                Ok((a, true)) => proxy_addr = Some(a),
                Ok((a, false)) => addr = Some(a),
                Err(_) => {
                    let _ = child.kill();
                    panic!("server did not start: {}", log.lock().unwrap());
                }
            }
        }
        TestServer {
            child,
            addr: addr.expect("plain listener address"),
            proxy_addr,
            spool,
            log,
        }
    }
}

impl TestServer {
    pub fn builder() -> ServerBuilder {
        ServerBuilder {
            env: Vec::new(),
            proxy: false,
        }
    }

    pub fn maildir(&self) -> PathBuf {
        self.spool.path().join("Maildir")
    }

    /// Files in new/, sorted by name.
    pub fn new_messages(&self) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(self.maildir().join("new"))
            .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
            .unwrap_or_default();
        v.sort();
        v
    }

    /// Waits (bounded) until `n` messages are in new/.
    pub fn wait_messages(&self, n: usize) -> Vec<PathBuf> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let v = self.new_messages();
            if v.len() >= n || Instant::now() > deadline {
                return v;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid has no memory-safety preconditions.
        unsafe {
            libc::kill(self.child.id() as i32, sig);
        }
    }

    /// Waits for the process to exit and returns its status code.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        let deadline = Instant::now() + limit;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn connect(&self) -> Client {
        Client::connect(self.addr)
    }

    /// Connects to the PROXY listener and presents `client_ip` in a v1 header.
    pub fn connect_as(&self, client_ip: IpAddr) -> Client {
        let addr = self.proxy_addr.expect("server started with .proxy()");
        let mut c = Client::connect_raw(addr);
        c.send(proxy_v1(client_ip).as_bytes());
        c
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A PROXY v1 header presenting `ip` as the source.
pub fn proxy_v1(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => format!("PROXY TCP4 {v4} 127.0.0.1 40000 25\r\n"),
        IpAddr::V6(v6) => format!("PROXY TCP6 {v6} ::1 40000 25\r\n"),
    }
}

/// Reads one (possibly multi-line) SMTP reply from any buffered stream: its code and its
/// lines joined by '\n'; `None` at EOF, on an error or on a line that is no reply.
pub fn read_reply(reader: &mut impl BufRead) -> Option<(u16, String)> {
    let mut all = String::new();
    loop {
        let mut line = String::new();
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => return None,
            Ok(_) => {}
        }
        all.push_str(line.trim_end_matches(['\r', '\n']));
        let code = line.get(..3)?.parse::<u16>().ok()?;
        if line.as_bytes().get(3) == Some(&b'-') {
            all.push('\n');
            continue;
        }
        return Some((code, all));
    }
}

/// A minimal blocking SMTP client for tests.
pub struct Client {
    pub stream: TcpStream,
    reader: BufReader<TcpStream>,
}

impl Client {
    pub fn connect_raw(addr: SocketAddr) -> Client {
        let stream = TcpStream::connect(addr).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(15)))
            .expect("timeout");
        let reader = BufReader::new(stream.try_clone().expect("clone"));
        Client { stream, reader }
    }

    /// Connects and reads the banner, which must be 220.
    pub fn connect(addr: SocketAddr) -> Client {
        let mut c = Client::connect_raw(addr);
        let (code, text) = c.reply();
        assert_eq!(code, 220, "banner: {text}");
        c
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("send");
    }

    /// Reads one (possibly multi-line) reply: its code and all its lines joined by '\n'.
    pub fn reply(&mut self) -> (u16, String) {
        self.try_reply().expect("reply")
    }

    pub fn try_reply(&mut self) -> Option<(u16, String)> {
        read_reply(&mut self.reader)
    }

    /// Sends one command line and asserts the reply code.
    pub fn cmd(&mut self, line: &str, expect: u16) -> String {
        self.send(format!("{line}\r\n").as_bytes());
        let (code, text) = self.reply();
        assert_eq!(code, expect, "{line} -> {text}");
        text
    }

    /// EHLO, MAIL, RCPT, DATA with `body` (already dot-stuffed, without the final dot).
    pub fn deliver(&mut self, helo: &str, from: &str, to: &str, body: &str) -> String {
        self.cmd(&format!("EHLO {helo}"), 250);
        self.cmd(&format!("MAIL FROM:<{from}>"), 250);
        self.cmd(&format!("RCPT TO:<{to}>"), 250);
        self.cmd("DATA", 354);
        self.send(body.as_bytes());
        self.send(b"\r\n.\r\n");
        let (code, text) = self.reply();
        assert_eq!(code, 250, "end of data -> {text}");
        text
    }

    /// True when the server has closed the connection (EOF on read).
    pub fn is_closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.reader.read(&mut b), Ok(0))
    }
}
