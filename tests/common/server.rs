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
    /// The metrics endpoint, when started with `.metrics()`.
    pub metrics_addr: Option<SocketAddr>,
    pub spool: TempDir,
    log: Arc<Mutex<String>>,
}

/// Builder for a TestServer: environment on top of test defaults.
pub struct ServerBuilder {
    env: Vec<(String, String)>,
    proxy: bool,
    metrics: bool,
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

    /// Also serve metrics, on a listener bound before the server starts (`metrics_addr`).
    pub fn metrics(mut self) -> Self {
        self.metrics = true;
        self
    }

    /// Starts the server on listeners this test binds first and passes in as systemd does
    /// (LISTEN_FDS), so every address is known before the process runs, and returns once the
    /// server says READY=1 on a NOTIFY_SOCKET of the test's own.
    pub fn start(self) -> TestServer {
        let spool = TempDir::new("spool");
        let plain = bind_loopback();
        let addr = plain.local_addr().expect("plain listener address");
        let proxy = self.proxy.then(bind_loopback);
        let proxy_addr = proxy
            .as_ref()
            .map(|l| l.local_addr().expect("proxy address"));
        let metrics = self.metrics.then(bind_loopback);
        let metrics_addr = metrics
            .as_ref()
            .map(|l| l.local_addr().expect("metrics address"));
        let ready = ReadySocket::new(spool.path());

        let mut cmd = Command::new(env!("CARGO_BIN_EXE_heloguard"));
        cmd.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("RUST_LOG", "info")
            .env("HELOGUARD_LISTEN", addr.to_string())
            .env("HELOGUARD_HOSTNAME", HOSTNAME)
            .env("HELOGUARD_SPOOL", spool.path().join("Maildir"))
            .env("HELOGUARD_MIN_FREE_MB", "0")
            .env("HELOGUARD_WORKERS", "2")
            .env("HELOGUARD_DNS_TIMEOUT_MS", "500")
            .env("HELOGUARD_STATE_FILE", spool.path().join("heloguard.state"))
            .env("NOTIFY_SOCKET", ready.path());
        if let Some(a) = proxy_addr {
            cmd.env("HELOGUARD_PROXY_LISTEN", a.to_string());
        }
        if let Some(a) = metrics_addr {
            cmd.env("HELOGUARD_METRICS", a.to_string());
        }
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        let passed: Vec<&std::net::TcpListener> = [Some(&plain), proxy.as_ref(), metrics.as_ref()]
            .into_iter()
            .flatten()
            .collect();
        pass_listeners(&mut cmd, &passed);
        cmd.stdout(Stdio::null())
            .stderr(Stdio::piped())
            .stdin(Stdio::null());
        let mut child = cmd.spawn().expect("spawn heloguard");
        let stderr = child.stderr.take().expect("stderr");
        let log = Arc::new(Mutex::new(String::new()));
        let log2 = log.clone();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(stderr);
            let mut line = String::new();
            while reader.read_line(&mut line).map(|n| n > 0).unwrap_or(false) {
                log2.lock().unwrap().push_str(&line);
                line.clear();
            }
        });
        // The child holds its own copies of the listeners now.
        drop((plain, proxy, metrics));
        if let Err(why) = ready.wait(&mut child, Duration::from_secs(30)) {
            let _ = child.kill();
            let _ = child.wait();
            // Let the log reader take the last lines.
            std::thread::sleep(Duration::from_millis(100));
            panic!("server did not start ({why}): {}", log.lock().unwrap());
        }
        TestServer {
            child,
            addr,
            proxy_addr,
            metrics_addr,
            spool,
            log,
        }
    }
}

fn bind_loopback() -> std::net::TcpListener {
    std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0")
}

/// Makes `listeners` the child's descriptors 3, 4, ... with LISTEN_FDS and LISTEN_PID set as
/// sd_listen_fds(3) reads them. LISTEN_PID must be the child's own pid, known only after
/// fork, so the child is a shell that sets it to `$$` and execs the server in its place.
pub fn pass_listeners(cmd: &mut Command, listeners: &[&std::net::TcpListener]) {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    let fds: Vec<i32> = listeners.iter().map(|l| l.as_raw_fd()).collect();
    let program = cmd.get_program().to_owned();
    let args: Vec<std::ffi::OsString> = cmd.get_args().map(|a| a.to_owned()).collect();
    let mut shell = Command::new("/bin/sh");
    shell
        .arg("-c")
        .arg("LISTEN_PID=$$ exec \"$0\" \"$@\"")
        .arg(program)
        .args(args)
        // Callers start from an empty environment (env_clear), which get_envs() cannot
        // show; the shell does the same and takes only what they set.
        .env_clear();
    for (k, v) in cmd.get_envs() {
        if let Some(v) = v {
            shell.env(k, v);
        }
    }
    shell.env("LISTEN_FDS", fds.len().to_string());
    // SAFETY: between fork and exec the closure calls only dup2, which is async-signal-safe,
    // and allocates nothing.
    unsafe {
        shell.pre_exec(move || {
            // First move every descriptor above the target range so no dup2 overwrites a
            // descriptor still to be moved.
            for (i, fd) in fds.iter().enumerate() {
                if libc::dup2(*fd, 100 + i as i32) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            for i in 0..fds.len() {
                if libc::dup2(100 + i as i32, 3 + i as i32) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                libc::close(100 + i as i32);
            }
            Ok(())
        });
    }
    *cmd = shell;
}

/// A NOTIFY_SOCKET of the test's own: the server sends READY=1 there once it serves.
pub struct ReadySocket {
    socket: std::os::unix::net::UnixDatagram,
    path: PathBuf,
}

impl ReadySocket {
    pub fn new(dir: &Path) -> Self {
        let path = dir.join("notify.sock");
        let socket = std::os::unix::net::UnixDatagram::bind(&path).expect("bind notify socket");
        socket
            .set_read_timeout(Some(Duration::from_millis(100)))
            .expect("notify socket timeout");
        Self { socket, path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Waits for READY=1, or says why it will not come (the process ended, time ran out).
    pub fn wait(&self, child: &mut Child, limit: Duration) -> Result<(), String> {
        let deadline = Instant::now() + limit;
        let mut buf = [0u8; 4096];
        while Instant::now() < deadline {
            match self.socket.recv(&mut buf) {
                Ok(n) => {
                    let msg = String::from_utf8_lossy(&buf[..n]);
                    if msg.lines().any(|l| l == "READY=1") {
                        return Ok(());
                    }
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(e) => return Err(format!("notify socket: {e}")),
            }
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!("exited with {status}"));
            }
        }
        Err(format!("no READY=1 within {limit:?}"))
    }
}

impl TestServer {
    pub fn builder() -> ServerBuilder {
        ServerBuilder {
            env: Vec::new(),
            proxy: false,
            metrics: false,
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
