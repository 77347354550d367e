//! heloguard load generator: std threads and blocking sockets, one JSON line per run.
//!
//! ```text
//! cargo bench --bench loadgen -- latency --addr 127.0.0.1:2525 -c 20 -n 5000
//! cargo bench --bench loadgen -- helo --server target/release/heloguard --mode cold -n 5000
//! cargo bench --bench loadgen -- idle --addr 127.0.0.1:2525 -k 10000 --pid PID
//! cargo bench --bench loadgen -- dns            # serves the small zone of the plain loads
//! ```
//!
//! Subcommands:
//! * `latency`: C concurrent clients run N sessions (banner, EHLO, M messages, QUIT, no
//!   pipelining); EHLO reply latency p50/p90/p99 and the whole-session rate. With `--events`
//!   all C connections run on one thread over one mio poll instead of a thread each: on a
//!   small machine shared with the server, 50 client threads waiting for their turn on a core
//!   would be measured as server latency. `--starttls` (with `--events`): every session says
//!   STARTTLS after EHLO, does a rustls handshake, EHLO again and its messages inside TLS;
//!   `--resume` keeps tickets and TLS 1.2 session ids for the next sessions (full and resumed
//!   handshakes are counted), `--tls12` offers TLS 1.2 only. `--rate R` (with `--events`)
//!   starts R sessions a second, an open loop; `--message-rate R` keeps C connections open
//!   (one session each, `-n` equal to `-c`) and starts R messages a second over them, so
//!   that two servers can be compared at the same message rate. `--pid PID` adds that server
//!   process's CPU per message.
//! * `helo`: starts a test DNS server in this process, serving a zone of documentation-range
//!   clients (192.0.2.0/24, 198.51.100.0/24, 203.0.113.0/24, 2001:db8::/32) and varied HELO
//!   names (aligned, forward mismatch, NXDOMAIN, no PTR, dynamic-looking PTR, no dot, address
//!   literal), starts the server binary given with `--server` as a child with HELOGUARD_DNS
//!   pointing at that DNS server and a PROXY listener, and drives the PROXY listener with v1
//!   headers. `--mode cold`: every session a new client IP and name; `--mode warm`: a small set
//!   repeated. Reports DNS queries per session (counted by the test server) and the server's
//!   CPU per session. The rest of the child's configuration comes from this process's
//!   environment (HELOGUARD_HELO_POLICY, HELOGUARD_WORKERS, ...). `--sender` adds the sender
//!   checks: the zone gets DNS list entries (a client in five on `bl.test`, one in seven on
//!   the allowlist `wl.test`, none on `bl2.test`), SPF records for the HELO names and an RHSBL
//!   zone (`dbl.test`), and the child gets HELOGUARD_DNSBL, HELOGUARD_RHSBL and `spf=tag`
//!   (unless this process's environment sets them).
//! * `idle`: holds K idle connections (each from its own 127.0.0.x source address, or with
//!   `--proxy` each behind its own PROXY client address), then measures how long a new client
//!   waits for its banner, and the server's RSS from /proc/PID/status. With `--starttls` each
//!   connection says EHLO, STARTTLS, completes a handshake and EHLO again inside TLS before it
//!   goes idle.
//! * `dns`: serves `client.example.org A 127.0.0.1` (and the other names the plain loads use)
//!   until killed; prints `dns=IP:PORT` on its first line.

#[path = "../tests/common/dns_server.rs"]
mod dns_server;
#[path = "loadgen/tls_client.rs"]
mod tls_client;

use std::collections::{BTreeMap, VecDeque};
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dns_server::{TestDns, TestZone};
use rustls::{ClientConfig, ClientConnection, HandshakeKind};

const IO_TIMEOUT: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------------------------
// Argument handling

struct Args {
    rest: Vec<String>,
}

impl Args {
    fn new(rest: Vec<String>) -> Self {
        Args { rest }
    }

    fn take(&mut self, names: &[&str]) -> Option<String> {
        let i = self.rest.iter().position(|a| names.contains(&a.as_str()))?;
        if i + 1 >= self.rest.len() {
            die(&format!("{} needs a value", self.rest[i]));
        }
        let v = self.rest.remove(i + 1);
        self.rest.remove(i);
        Some(v)
    }

    fn flag(&mut self, name: &str) -> bool {
        match self.rest.iter().position(|a| a == name) {
            Some(i) => {
                self.rest.remove(i);
                true
            }
            None => false,
        }
    }

    fn num<T: std::str::FromStr>(&mut self, names: &[&str], default: T) -> T {
        match self.take(names) {
            Some(v) => v
                .parse()
                .unwrap_or_else(|_| die(&format!("{}: not a number: {v}", names[0]))),
            None => default,
        }
    }

    fn done(self) {
        if let Some(a) = self.rest.first() {
            die(&format!("unknown argument {a}"));
        }
    }
}

fn die(msg: &str) -> ! {
    eprintln!("loadgen: {msg}");
    std::process::exit(2);
}

const USAGE: &str = "usage: loadgen latency|helo|idle|dns [options]
  latency --addr A [-c 20] [-n 5000] [--msgs 1] [--size 1000] [--helo NAME] [--proxy]
          [--events [--starttls [--resume] [--tls12]] [--rate R | --message-rate R]]
          [--pid PID] [--label L]
  helo    --server PATH [--mode cold|warm] [-c 20] [-n 5000] [--msgs 1] [--size 1000]
          [--warm-set 16] [--workdir DIR] [--label L] [--sender]
  idle    --addr A [-k 10000] [--pid PID] [--proxy] [--starttls] [--hold 5] [--threads 8]
  dns     [--ttl 3600]";

fn main() {
    // `cargo bench` passes `--bench` to harness = false targets; ignore it.
    let mut argv: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    if argv.is_empty() {
        // `cargo bench` with no arguments: nothing to do without a server.
        eprintln!("{USAGE}");
        return;
    }
    raise_nofile();
    let cmd = argv.remove(0);
    let args = Args::new(argv);
    match cmd.as_str() {
        "latency" => latency(args),
        "helo" => helo(args),
        "idle" => idle(args),
        "dns" => dns(args),
        "-h" | "--help" | "help" => println!("{USAGE}"),
        other => die(&format!("unknown subcommand {other}\n{USAGE}")),
    }
}

fn raise_nofile() {
    // SAFETY: plain libc calls on a local struct.
    unsafe {
        let mut r = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) == 0 && r.rlim_cur < r.rlim_max {
            r.rlim_cur = r.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &r);
        }
    }
}

fn own_cpu_s() -> f64 {
    // SAFETY: getrusage fills the struct.
    unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut ru);
        let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
        tv(ru.ru_utime) + tv(ru.ru_stime)
    }
}

// ---------------------------------------------------------------------------------------------
// SMTP client

struct Smtp {
    s: TcpStream,
    buf: Vec<u8>,
}

impl Smtp {
    fn connect(addr: SocketAddr) -> io::Result<Smtp> {
        let s = TcpStream::connect_timeout(&addr, IO_TIMEOUT)?;
        Self::wrap(s)
    }

    fn wrap(s: TcpStream) -> io::Result<Smtp> {
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(IO_TIMEOUT))?;
        s.set_write_timeout(Some(IO_TIMEOUT))?;
        Ok(Smtp {
            s,
            buf: Vec::with_capacity(1024),
        })
    }

    /// Reads one (possibly multi-line) reply; returns its code, 0 for garbage.
    fn reply(&mut self) -> io::Result<u16> {
        loop {
            while let Some(nl) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=nl).collect();
                if line.len() >= 4 && line[3] == b'-' {
                    continue;
                }
                let code = std::str::from_utf8(line.get(..3).unwrap_or(b""))
                    .ok()
                    .and_then(|c| c.parse().ok())
                    .unwrap_or(0);
                return Ok(code);
            }
            let mut tmp = [0u8; 4096];
            let n = self.s.read(&mut tmp)?;
            if n == 0 {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "closed"));
            }
            self.buf.extend_from_slice(&tmp[..n]);
        }
    }

    fn cmd(&mut self, line: &[u8]) -> io::Result<u16> {
        self.s.write_all(line)?;
        self.reply()
    }
}

/// A message of about `size` octets, dot-terminated.
fn build_body(size: usize) -> Vec<u8> {
    let mut b = b"From: <load@client.example.org>\r\nTo: <rcpt@bench.test>\r\n\
Subject: loadgen\r\nMessage-ID: <loadgen@client.example.org>\r\n\r\n"
        .to_vec();
    let line = [b"x".repeat(76), b"\r\n".to_vec()].concat();
    while b.len() + line.len() <= size {
        b.extend_from_slice(&line);
    }
    if size > b.len() + 2 {
        let rest = size - b.len() - 2;
        b.extend(std::iter::repeat_n(b'y', rest));
        b.extend_from_slice(b"\r\n");
    }
    b.extend_from_slice(b".\r\n");
    b
}

#[derive(Default)]
struct Timing {
    banner: Duration,
    ehlo: Duration,
    session: Duration,
    msgs_ok: usize,
}

struct SessionSpec<'a> {
    addr: SocketAddr,
    proxy: Option<String>,
    helo: &'a str,
    msgs: usize,
    body: &'a [u8],
}

/// One session; errors come back as "stage:code" or "stage:io-kind".
fn run_session(sp: &SessionSpec) -> Result<Timing, String> {
    let t0 = Instant::now();
    let io = |stage: &str| {
        let stage = stage.to_string();
        move |e: io::Error| format!("{stage}:{:?}", e.kind())
    };
    let mut c = Smtp::connect(sp.addr).map_err(io("connect"))?;
    if let Some(h) = &sp.proxy {
        c.s.write_all(h.as_bytes()).map_err(io("proxy"))?;
    }
    let code = c.reply().map_err(io("banner"))?;
    if code != 220 {
        return Err(format!("banner:{code}"));
    }
    let banner = t0.elapsed();
    let t1 = Instant::now();
    let code = c
        .cmd(format!("EHLO {}\r\n", sp.helo).as_bytes())
        .map_err(io("ehlo"))?;
    let ehlo = t1.elapsed();
    if code != 250 {
        return Err(format!("ehlo:{code}"));
    }
    let mut ok = 0;
    for _ in 0..sp.msgs {
        let code = c
            .cmd(b"MAIL FROM:<load@client.example.org>\r\n")
            .map_err(io("mail"))?;
        if code != 250 {
            return Err(format!("mail:{code}"));
        }
        let code = c
            .cmd(b"RCPT TO:<rcpt@bench.test>\r\n")
            .map_err(io("rcpt"))?;
        if code != 250 {
            return Err(format!("rcpt:{code}"));
        }
        let code = c.cmd(b"DATA\r\n").map_err(io("data"))?;
        if code != 354 {
            return Err(format!("data:{code}"));
        }
        let code = c.cmd(sp.body).map_err(io("dot"))?;
        if code != 250 {
            return Err(format!("dot:{code}"));
        }
        ok += 1;
    }
    let code = c.cmd(b"QUIT\r\n").map_err(io("quit"))?;
    if code != 221 {
        return Err(format!("quit:{code}"));
    }
    Ok(Timing {
        banner,
        ehlo,
        session: t0.elapsed(),
        msgs_ok: ok,
    })
}

#[derive(Default)]
struct Results {
    banner: Vec<Duration>,
    ehlo: Vec<Duration>,
    session: Vec<Duration>,
    msgs_ok: usize,
    errors: BTreeMap<String, usize>,
    /// Completed TLS handshakes: full, resumed.
    handshakes: (usize, usize),
    /// Paced runs: sessions that started more than `LATE_START` after their time, because
    /// every connection was busy or the generator was.
    late_starts: usize,
}

/// A paced session starting later than this after its time counts as late (poll waits are
/// whole milliseconds, so a start can be up to one late without anything being busy).
const LATE_START: Duration = Duration::from_millis(5);

impl Results {
    fn merge(&mut self, o: Results) {
        self.banner.extend(o.banner);
        self.ehlo.extend(o.ehlo);
        self.session.extend(o.session);
        self.msgs_ok += o.msgs_ok;
        self.handshakes.0 += o.handshakes.0;
        self.late_starts += o.late_starts;
        self.handshakes.1 += o.handshakes.1;
        for (k, v) in o.errors {
            *self.errors.entry(k).or_default() += v;
        }
    }
}

/// Runs `n` sessions over `c` threads; `spec(i)` describes session i.
fn drive<F>(c: usize, n: usize, spec: F) -> (Results, Duration)
where
    F: Fn(usize, &mut dyn FnMut(&SessionSpec)) + Sync,
{
    let next = AtomicUsize::new(0);
    let all = Mutex::new(Results::default());
    let t0 = Instant::now();
    std::thread::scope(|sc| {
        for _ in 0..c.max(1) {
            sc.spawn(|| {
                let mut r = Results::default();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= n {
                        break;
                    }
                    spec(i, &mut |sp| match run_session(sp) {
                        Ok(t) => {
                            r.banner.push(t.banner);
                            r.ehlo.push(t.ehlo);
                            r.session.push(t.session);
                            r.msgs_ok += t.msgs_ok;
                        }
                        Err(e) => *r.errors.entry(e).or_default() += 1,
                    });
                }
                all.lock().unwrap().merge(r);
            });
        }
    });
    let wall = t0.elapsed();
    (all.into_inner().unwrap(), wall)
}

fn pct_json(v: &mut [Duration], unit_us: bool) -> String {
    v.sort_unstable();
    let f = |d: Duration| {
        if unit_us {
            d.as_secs_f64() * 1e6
        } else {
            d.as_secs_f64() * 1e3
        }
    };
    let p = |q: f64| -> f64 {
        if v.is_empty() {
            return 0.0;
        }
        let k = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1;
        f(v[k])
    };
    format!(
        "{{\"p50\":{:.1},\"p90\":{:.1},\"p99\":{:.1},\"max\":{:.1}}}",
        p(0.50),
        p(0.90),
        p(0.99),
        v.last().map(|d| f(*d)).unwrap_or(0.0)
    )
}

fn errors_json(e: &BTreeMap<String, usize>) -> String {
    let parts: Vec<String> = e.iter().map(|(k, v)| format!("\"{k}\":{v}")).collect();
    format!("{{{}}}", parts.join(","))
}

fn parse_addr(s: &str) -> SocketAddr {
    s.parse()
        .unwrap_or_else(|_| die(&format!("not an ip:port address: {s}")))
}

fn proxy_v1(src: IpAddr, sport: u16, dst: SocketAddr) -> String {
    match src {
        IpAddr::V4(_) => format!("PROXY TCP4 {src} 127.0.0.1 {sport} {}\r\n", dst.port()),
        IpAddr::V6(_) => format!("PROXY TCP6 {src} ::1 {sport} {}\r\n", dst.port()),
    }
}

// ---------------------------------------------------------------------------------------------
// latency

fn latency(mut a: Args) {
    let addr = parse_addr(&a.take(&["--addr"]).unwrap_or_else(|| die("--addr needed")));
    let c: usize = a.num(&["-c", "--concurrency"], 20);
    let n: usize = a.num(&["-n", "--sessions"], 5000);
    let msgs: usize = a.num(&["--msgs"], 1);
    let size: usize = a.num(&["--size"], 1000);
    let helo = a
        .take(&["--helo"])
        .unwrap_or_else(|| "client.example.org".into());
    let label = a.take(&["--label"]).unwrap_or_default();
    let proxy = a.flag("--proxy");
    let events = a.flag("--events");
    let starttls = a.flag("--starttls");
    let resume = a.flag("--resume");
    let tls12 = a.flag("--tls12");
    let pid: u32 = a.num(&["--pid"], 0);
    let rate: f64 = a.num(&["--rate"], 0.0);
    let message_rate: f64 = a.num(&["--message-rate"], 0.0);
    a.done();
    if (rate > 0.0 || message_rate > 0.0) && !events {
        die("--rate and --message-rate run on the event-driven generator: add --events");
    }
    if rate > 0.0 && message_rate > 0.0 {
        die("--rate paces sessions and --message-rate messages: give one");
    }
    if message_rate > 0.0 && n != c {
        die("--message-rate keeps each connection for one session: give -n equal to -c");
    }
    if (resume || tls12) && !starttls {
        die("--resume and --tls12 go with --starttls");
    }
    if starttls && !events {
        die("--starttls runs on the event-driven generator: add --events");
    }
    let tls = starttls.then(|| tls_client::client_config(resume, tls12));
    let body = build_body(size);
    let cpu0 = own_cpu_s();
    let server_cpu0 = (pid > 0).then(|| proc_usage(pid).0);
    let (mut r, wall) = if events {
        if proxy {
            die("--events does not send PROXY headers");
        }
        let script = Script {
            helo: &helo,
            body: &body,
            tls,
            paced_messages: message_rate > 0.0,
        };
        let pace = |r: f64| (r > 0.0).then(|| Duration::from_secs_f64(1.0 / r));
        drive_events(addr, c, n, msgs, &script, pace(rate), pace(message_rate))
    } else {
        drive(c, n, |i, run| {
            let hdr = proxy.then(|| {
                proxy_v1(
                    IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1)),
                    40000 + (i % 20000) as u16,
                    addr,
                )
            });
            run(&SessionSpec {
                addr,
                proxy: hdr,
                helo: &helo,
                msgs,
                body: &body,
            })
        })
    };
    let ws = wall.as_secs_f64();
    let rate_json = |r: f64| {
        if r > 0.0 {
            format!("{r}")
        } else {
            "null".into()
        }
    };
    let server_cpu = server_cpu0
        .map(|c0| {
            let used = proc_usage(pid).0 - c0;
            format!("{:.3}", 1000.0 * used / (r.msgs_ok.max(1) as f64))
        })
        .unwrap_or("null".into());
    let tls_json = if starttls {
        format!(
            "{{\"resume\":{resume},\"tls12_only\":{tls12},\"full\":{},\"resumed\":{}}}",
            r.handshakes.0, r.handshakes.1
        )
    } else {
        "null".into()
    };
    println!(
        "{{\"tool\":\"loadgen\",\"mode\":\"latency\",\"label\":\"{label}\",\"addr\":\"{addr}\",\"concurrency\":{c},\"sessions\":{n},\"msgs_per_session\":{msgs},\"size\":{size},\"tls\":{tls_json},\"wall_s\":{ws:.3},\"sessions_ok\":{},\"sessions_per_s\":{:.1},\"messages_ok\":{},\"msgs_per_s\":{:.1},\"server_cpu_ms_per_msg\":{server_cpu},\"ehlo_us\":{},\"banner_us\":{},\"session_ms\":{},\"errors\":{},\"rate\":{},\"message_rate\":{},\"late_starts\":{},\"client_cpu_s\":{:.2}}}",
        r.session.len(),
        r.session.len() as f64 / ws,
        r.msgs_ok,
        r.msgs_ok as f64 / ws,
        pct_json(&mut r.ehlo, true),
        pct_json(&mut r.banner, true),
        pct_json(&mut r.session, false),
        errors_json(&r.errors),
        rate_json(rate),
        rate_json(message_rate),
        r.late_starts,
        own_cpu_s() - cpu0
    );
}

/// What every event-driven session says.
struct Script<'a> {
    helo: &'a str,
    body: &'a [u8],
    /// STARTTLS after the first EHLO, with this client configuration.
    tls: Option<Arc<ClientConfig>>,
    /// Messages start when the driver says (`--message-rate`), not as soon as the last ends.
    paced_messages: bool,
}

/// Where an event-driven session is: the reply it waits for next (or the handshake).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Step {
    Banner,
    Ehlo,
    StartTls,
    Handshake,
    TlsEhlo,
    Mail,
    Rcpt,
    Data,
    Dot,
    /// Between messages, until the driver starts the next one (`--message-rate`).
    Waiting,
    Quit,
}

/// One connection of `drive_events`.
struct EvConn {
    sock: mio::net::TcpStream,
    step: Step,
    /// Plaintext from the server (decrypted once TLS is on).
    inbuf: Vec<u8>,
    /// Bytes for the socket (ciphertext once TLS is on).
    out: Vec<u8>,
    tls: Option<ClientConnection>,
    handshake: Option<HandshakeKind>,
    started: Instant,
    sent_at: Instant,
    banner: Duration,
    ehlo: Duration,
    msgs_left: usize,
    msgs_ok: usize,
    /// In the driver's queue of connections waiting for their next message.
    queued: bool,
}

impl EvConn {
    fn open(addr: SocketAddr, msgs: usize) -> io::Result<EvConn> {
        let sock = mio::net::TcpStream::connect(addr)?;
        sock.set_nodelay(true)?;
        let now = Instant::now();
        Ok(EvConn {
            sock,
            step: Step::Banner,
            inbuf: Vec::with_capacity(1024),
            out: Vec::new(),
            tls: None,
            handshake: None,
            started: now,
            sent_at: now,
            banner: Duration::ZERO,
            ehlo: Duration::ZERO,
            msgs_left: msgs,
            msgs_ok: 0,
            queued: false,
        })
    }

    fn send(&mut self, bytes: &[u8], step: Step) -> Result<(), String> {
        match &mut self.tls {
            None => self.out.extend_from_slice(bytes),
            Some(tls) => {
                tls_client::send(tls, bytes)?;
                tls_client::seal(tls, &mut self.out);
            }
        }
        self.step = step;
        self.sent_at = Instant::now();
        Ok(())
    }

    /// Takes bytes read from the socket: plaintext as is, or through TLS (whose handshake
    /// records go out again at once). When a handshake completes, EHLO follows inside TLS.
    fn receive(&mut self, bytes: &[u8], helo: &str) -> Result<(), String> {
        let Some(tls) = &mut self.tls else {
            self.inbuf.extend_from_slice(bytes);
            return Ok(());
        };
        tls_client::receive(tls, bytes, &mut self.inbuf)?;
        tls_client::seal(tls, &mut self.out);
        if self.step == Step::Handshake && !tls.is_handshaking() {
            self.handshake = tls.handshake_kind();
            self.send(format!("EHLO {helo}\r\n").as_bytes(), Step::TlsEhlo)?;
        }
        Ok(())
    }

    /// Writes what is queued until done or the socket is full.
    fn flush(&mut self) -> io::Result<()> {
        while !self.out.is_empty() {
            match self.sock.write(&self.out) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.out.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// The code of the next complete reply in `inbuf`, if one is there.
    fn next_reply(&mut self) -> Option<u16> {
        while let Some(nl) = self.inbuf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.inbuf.drain(..=nl).collect();
            if line.len() >= 4 && line[3] == b'-' {
                continue;
            }
            return Some(
                std::str::from_utf8(line.get(..3).unwrap_or(b""))
                    .ok()
                    .and_then(|c| c.parse().ok())
                    .unwrap_or(0),
            );
        }
        None
    }

    /// Acts on one reply; Ok(true) when the session is over.
    fn on_reply(&mut self, code: u16, script: &Script) -> Result<bool, String> {
        let expect = |want: u16, stage: &str| {
            if code == want {
                Ok(())
            } else {
                Err(format!("{stage}:{code}"))
            }
        };
        match self.step {
            Step::Banner => {
                expect(220, "banner")?;
                self.banner = self.started.elapsed();
                self.send(format!("EHLO {}\r\n", script.helo).as_bytes(), Step::Ehlo)?;
            }
            Step::Ehlo => {
                self.ehlo = self.sent_at.elapsed();
                expect(250, "ehlo")?;
                if script.tls.is_some() {
                    self.send(b"STARTTLS\r\n", Step::StartTls)?;
                } else {
                    self.next_message(script)?;
                }
            }
            Step::StartTls => {
                expect(220, "starttls")?;
                let config = script.tls.as_ref().ok_or("starttls:no-config")?;
                if !self.inbuf.is_empty() {
                    return Err("starttls:bytes-after-220".into());
                }
                let mut tls = tls_client::connect(config)?;
                tls_client::seal(&mut tls, &mut self.out);
                self.tls = Some(tls);
                self.step = Step::Handshake;
            }
            Step::Handshake => return Err(format!("handshake:plaintext-{code}")),
            Step::Waiting => return Err(format!("waiting:unexpected-{code}")),
            Step::TlsEhlo => {
                expect(250, "tls-ehlo")?;
                self.next_message(script)?;
            }
            Step::Mail => {
                expect(250, "mail")?;
                self.send(b"RCPT TO:<rcpt@bench.test>\r\n", Step::Rcpt)?;
            }
            Step::Rcpt => {
                expect(250, "rcpt")?;
                self.send(b"DATA\r\n", Step::Data)?;
            }
            Step::Data => {
                expect(354, "data")?;
                self.send(script.body, Step::Dot)?;
            }
            Step::Dot => {
                expect(250, "dot")?;
                self.msgs_ok += 1;
                self.next_message(script)?;
            }
            Step::Quit => {
                expect(221, "quit")?;
                return Ok(true);
            }
        }
        Ok(false)
    }

    fn next_message(&mut self, script: &Script) -> Result<(), String> {
        if self.msgs_left == 0 {
            self.send(b"QUIT\r\n", Step::Quit)
        } else if script.paced_messages {
            self.step = Step::Waiting;
            Ok(())
        } else {
            self.start_message()
        }
    }

    fn start_message(&mut self) -> Result<(), String> {
        self.msgs_left -= 1;
        self.send(b"MAIL FROM:<load@client.example.org>\r\n", Step::Mail)
    }
}

/// `drive` on one thread: `c` connections at a time over one mio poll, `n` sessions in all.
/// Without `pace` a session starts as soon as another ends (a closed loop: the rate is what
/// client and server manage together, and at that saturation a reply waits behind the
/// others by Little's law). With `pace` one session starts every `pace` (an open loop, as
/// mail arrives at an MX), at most `c` at a time; a start that finds every connection busy
/// waits for one and counts in `late_starts`.
///
/// With `msg_pace` (and `script.paced_messages`) each connection is one session of `msgs`
/// messages, and one message starts every `msg_pace` on a connection that waits between
/// messages: the same message rate for every server, so that CPU per message compares at
/// that rate. A start that finds no connection waiting counts in `late_starts`.
fn drive_events(
    addr: SocketAddr,
    c: usize,
    n: usize,
    msgs: usize,
    script: &Script,
    pace: Option<Duration>,
    msg_pace: Option<Duration>,
) -> (Results, Duration) {
    let mut poll = mio::Poll::new().unwrap_or_else(|e| die(&format!("poll: {e}")));
    let mut events = mio::Events::with_capacity(1024);
    let mut conns: Vec<Option<EvConn>> = (0..c.max(1)).map(|_| None).collect();
    let mut r = Results::default();
    let mut started = 0;
    let mut finished = 0;
    let t0 = Instant::now();
    let mut next_start = t0;
    let mut waiting: VecDeque<usize> = VecDeque::new();
    // Set when the first connection waits for a message, so session setup is not late.
    let mut next_message: Option<Instant> = None;
    // A session's connection in `slot`; one that cannot connect is a finished session with
    // its error counted.
    let start = |slot: usize, poll: &mut mio::Poll, r: &mut Results| -> Option<EvConn> {
        let opened = EvConn::open(addr, msgs).and_then(|mut conn| {
            poll.registry().register(
                &mut conn.sock,
                mio::Token(slot),
                mio::Interest::READABLE | mio::Interest::WRITABLE,
            )?;
            Ok(conn)
        });
        opened
            .map_err(|e| {
                *r.errors
                    .entry(format!("connect:{:?}", e.kind()))
                    .or_default() += 1;
            })
            .ok()
    };
    for (slot, entry) in conns.iter_mut().enumerate() {
        if started < n && pace.is_none() {
            started += 1;
            *entry = start(slot, &mut poll, &mut r);
            finished += usize::from(entry.is_none());
        }
    }
    let mut tmp = vec![0u8; 64 * 1024];
    while finished < n {
        let mut all_busy = false;
        if let Some(pace) = pace {
            // Open loop: every session whose start time has come gets a free connection.
            let now = Instant::now();
            while started < n && next_start <= now {
                let Some(slot) = conns.iter().position(Option::is_none) else {
                    all_busy = true;
                    break;
                };
                if now.saturating_duration_since(next_start) > LATE_START {
                    r.late_starts += 1;
                }
                started += 1;
                next_start += pace;
                conns[slot] = start(slot, &mut poll, &mut r);
                finished += usize::from(conns[slot].is_none());
            }
        }
        if let (Some(msg_pace), Some(due)) = (msg_pace, next_message.as_mut()) {
            let now = Instant::now();
            while *due <= now {
                let Some(slot) = waiting.pop_front() else {
                    break;
                };
                let Some(conn) = conns.get_mut(slot).and_then(Option::as_mut) else {
                    continue;
                };
                if now.saturating_duration_since(*due) > LATE_START {
                    r.late_starts += 1;
                }
                *due += msg_pace;
                conn.queued = false;
                let sent = conn
                    .start_message()
                    .and_then(|()| conn.flush().map_err(|e| format!("write:{:?}", e.kind())));
                if let Err(e) = sent {
                    *r.errors.entry(e).or_default() += 1;
                    finished += 1;
                    if let Some(mut old) = conns[slot].take() {
                        let _ = poll.registry().deregister(&mut old.sock);
                    }
                }
            }
        }
        let wait = match (pace, msg_pace, next_message) {
            (Some(_), _, _) if started < n && !all_busy => next_start
                .saturating_duration_since(Instant::now())
                .min(IO_TIMEOUT),
            (_, Some(_), Some(due)) if !waiting.is_empty() => due
                .saturating_duration_since(Instant::now())
                .min(IO_TIMEOUT),
            _ => IO_TIMEOUT,
        };
        if let Err(e) = poll.poll(&mut events, Some(wait)) {
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            die(&format!("poll: {e}"));
        }
        if events.is_empty() && wait == IO_TIMEOUT {
            die("no progress within the I/O timeout");
        }
        for event in events.iter() {
            let slot = event.token().0;
            let Some(conn) = conns.get_mut(slot).and_then(Option::as_mut) else {
                continue;
            };
            let outcome = (|| -> Result<bool, String> {
                let mut closed = false;
                loop {
                    match conn.sock.read(&mut tmp) {
                        Ok(0) => {
                            closed = true;
                            break;
                        }
                        Ok(got) => conn.receive(&tmp[..got], script.helo)?,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) if e.kind() == io::ErrorKind::NotConnected => break,
                        Err(e) => return Err(format!("read:{:?}", e.kind())),
                    }
                }
                while let Some(code) = conn.next_reply() {
                    if conn.on_reply(code, script)? {
                        return Ok(true);
                    }
                }
                if closed {
                    return Err("read:closed".into());
                }
                conn.flush().map_err(|e| format!("write:{:?}", e.kind()))?;
                Ok(false)
            })();
            let over = match outcome {
                Ok(false) => {
                    if conn.step == Step::Waiting && !conn.queued {
                        conn.queued = true;
                        waiting.push_back(slot);
                        next_message.get_or_insert_with(Instant::now);
                    }
                    continue;
                }
                Ok(true) => {
                    r.banner.push(conn.banner);
                    r.ehlo.push(conn.ehlo);
                    r.session.push(conn.started.elapsed());
                    r.msgs_ok += conn.msgs_ok;
                    match conn.handshake {
                        Some(HandshakeKind::Resumed) => r.handshakes.1 += 1,
                        Some(_) => r.handshakes.0 += 1,
                        None => {}
                    }
                    true
                }
                Err(e) => {
                    *r.errors.entry(e).or_default() += 1;
                    true
                }
            };
            if over {
                finished += 1;
                if let Some(mut old) = conns[slot].take() {
                    let _ = poll.registry().deregister(&mut old.sock);
                }
                if started < n && pace.is_none() {
                    started += 1;
                    conns[slot] = start(slot, &mut poll, &mut r);
                    finished += usize::from(conns[slot].is_none());
                }
            }
        }
    }
    (r, t0.elapsed())
}

// ---------------------------------------------------------------------------------------------
// helo: identities, zone, child server

/// 762 IPv4 documentation addresses: .1 to .254 of the three TEST-NETs.
fn doc_v4(k: usize) -> Ipv4Addr {
    let nets = [[192, 0, 2], [198, 51, 100], [203, 0, 113]];
    let n = nets[(k / 254) % 3];
    Ipv4Addr::new(n[0], n[1], n[2], (k % 254) as u8 + 1)
}

fn doc_v6(k: usize) -> Ipv6Addr {
    Ipv6Addr::new(
        0x2001,
        0xdb8,
        (k >> 16) as u16,
        k as u16,
        0,
        0,
        0,
        (k % 250) as u16 + 1,
    )
}

struct Identity {
    ip: IpAddr,
    helo: String,
}

/// The address of the other family that every name with records also gets, so that no
/// positive name answers NODATA: the test responder sends no SOA with a negative answer, and
/// a resolver cannot cache a negative answer without one.
fn other_family(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => "2001:db8:ffff::fe".parse().unwrap(),
        IpAddr::V6(_) => "203.0.113.254".parse().unwrap(),
    }
}

/// `name` resolves to `ip` and to an address of the other family.
fn dual(z: TestZone, name: &str, ip: IpAddr) -> TestZone {
    z.addr(name, ip).addr(name, other_family(ip))
}

/// Identity `i` and the records it needs. Kinds, by i % 8: 0-2 aligned (PTR, A, HELO name
/// agree), 3 forward mismatch (PTR confirms, HELO's A points elsewhere), 4 HELO name
/// NXDOMAIN with a dynamic-looking PTR, 5 no PTR, 6 HELO without a dot, 7 address literal.
fn identity(i: usize, mut z: TestZone) -> (Identity, TestZone) {
    let ip = if i.is_multiple_of(2) && i / 2 < 762 {
        IpAddr::V4(doc_v4(i / 2))
    } else {
        IpAddr::V6(doc_v6(i))
    };
    let dom = format!("d{}.test", i % 997);
    let helo = match i % 8 {
        0..=2 => {
            let name = format!("mail{i}.{dom}");
            z = dual(z, &name, ip).ptr(ip, &name);
            name
        }
        3 => {
            let name = format!("out{i}.{dom}");
            let ptr = format!("host-{i}.isp{}.test", i % 13);
            let elsewhere: IpAddr = match ip {
                IpAddr::V4(_) => "203.0.113.253".parse().unwrap(),
                IpAddr::V6(_) => "2001:db8:ffff::fd".parse().unwrap(),
            };
            z = dual(z, &name, elsewhere);
            z = dual(z, &ptr, ip).ptr(ip, &ptr);
            name
        }
        4 => {
            let ptr = match ip {
                IpAddr::V4(v4) => {
                    let o = v4.octets();
                    format!(
                        "dyn-{}-{}-{}-{}.pool.isp{}.test",
                        o[0],
                        o[1],
                        o[2],
                        o[3],
                        i % 13
                    )
                }
                IpAddr::V6(_) => format!("dhcp{i}.pool.isp{}.test", i % 13),
            };
            z = dual(z, &ptr, ip).ptr(ip, &ptr);
            format!("nx{i}.{dom}")
        }
        5 => {
            let name = format!("relay{i}.{dom}");
            z = dual(z, &name, ip);
            name
        }
        6 => {
            let ptr = format!("ws{i}.{dom}");
            z = dual(z, &ptr, ip).ptr(ip, &ptr);
            format!("workstation{i}")
        }
        _ => {
            let ptr = format!("lit{i}.{dom}");
            z = dual(z, &ptr, ip).ptr(ip, &ptr);
            match ip {
                IpAddr::V4(v4) => format!("[{v4}]"),
                IpAddr::V6(v6) => format!("[IPv6:{v6}]"),
            }
        }
    };
    (Identity { ip, helo }, z)
}

/// The sender checks' records for identity `i` (see `--sender`): list entries for its
/// address, an SPF record for its HELO name when it is a domain, its domain on the RHSBL.
fn sender_records(i: usize, id: &Identity, mut z: TestZone) -> TestZone {
    if i.is_multiple_of(5) {
        z = z.listed("bl.test", id.ip, "127.0.0.2");
    }
    if i.is_multiple_of(7) {
        z = z.listed("wl.test", id.ip, "127.0.10.2");
    }
    let dom = format!("d{}.test", i % 997);
    if (i % 997).is_multiple_of(11) {
        z = z.a(&format!("{dom}.dbl.test"), "127.0.1.2");
    }
    match i % 8 {
        0..=2 => z.txt(&id.helo, &["v=spf1 a -all"]),
        3 => z.txt(
            &id.helo,
            &["v=spf1 ip4:203.0.113.0/24 ip6:2001:db8:ffff::/48 ~all"],
        ),
        _ => z,
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| die(&format!("no free port: {e}")))
}

/// (utime+stime seconds, VmHWM kB, VmRSS kB) of a process.
fn proc_usage(pid: u32) -> (f64, u64, u64) {
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let cpu = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let rest = &s[s.rfind(')')? + 2..];
            let f: Vec<&str> = rest.split_whitespace().collect();
            let t: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
            Some(t / hz)
        })
        .unwrap_or(0.0);
    let (hwm, rss) = status_mem(pid);
    (cpu, hwm, rss)
}

fn status_mem(pid: u32) -> (u64, u64) {
    let st = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |k: &str| {
        st.lines()
            .find(|l| l.starts_with(k))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmHWM:"), field("VmRSS:"))
}

struct ChildServer {
    child: Child,
    dir: Option<std::path::PathBuf>,
}

impl Drop for ChildServer {
    fn drop(&mut self) {
        // SAFETY: signalling our own child.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(5) {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(d) = &self.dir {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

fn wait_port(addr: SocketAddr, child: &mut Child) {
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(20) {
        if let Ok(Some(st)) = child.try_wait() {
            die(&format!("server exited at startup: {st}"));
        }
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    die(&format!("server did not listen on {addr} within 20 s"));
}

fn helo(mut a: Args) {
    let server = a
        .take(&["--server"])
        .unwrap_or_else(|| die("--server PATH needed"));
    let mode = a.take(&["--mode"]).unwrap_or_else(|| "cold".into());
    let c: usize = a.num(&["-c", "--concurrency"], 20);
    let n: usize = a.num(&["-n", "--sessions"], 5000);
    let msgs: usize = a.num(&["--msgs"], 1);
    let size: usize = a.num(&["--size"], 1000);
    let warm_set: usize = a.num(&["--warm-set"], 16);
    let label = a.take(&["--label"]).unwrap_or_default();
    let sender = a.flag("--sender");
    let workdir = a.take(&["--workdir"]);
    a.done();
    let distinct = match mode.as_str() {
        "cold" => n,
        "warm" => warm_set.max(1),
        m => die(&format!("--mode cold|warm, not {m}")),
    };
    let mut zone = TestZone::new().ttl(if mode == "warm" { 3600 } else { 60 });
    let mut ids = Vec::with_capacity(distinct);
    for i in 0..distinct {
        let (id, z) = identity(i, zone);
        zone = if sender { sender_records(i, &id, z) } else { z };
        ids.push(id);
    }
    let dns = TestDns::start(zone);

    let proxy_addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let plain_addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    // A --workdir belongs to the caller, who removes it when every run is over: deleting a
    // spool of thousands of files just before the next run would make that run's inode
    // allocation skip over them (ext4 without a journal avoids recently freed inodes).
    let keep_dir = workdir.is_some();
    let base = workdir
        .map(std::path::PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let dir = base.join(format!(
        "loadgen-helo-{}-{}",
        std::process::id(),
        label.replace('/', "-")
    ));
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| die(&format!("{}: {e}", dir.display())));
    let mut cmd = Command::new(&server);
    cmd.env("HELOGUARD_LISTEN", plain_addr.to_string())
        .env("HELOGUARD_PROXY_LISTEN", proxy_addr.to_string())
        .env("HELOGUARD_DNS", dns.env_value())
        .env("HELOGUARD_SPOOL", dir.join("spool"))
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    for (k, v) in [
        ("HELOGUARD_MIN_FREE_MB", "0"),
        ("HELOGUARD_MAX_CONNECTIONS_PER_IP", "0"),
        ("RUST_LOG", "warn"),
    ] {
        if std::env::var_os(k).is_none() {
            cmd.env(k, v);
        }
    }
    if sender {
        for (k, v) in [
            (
                "HELOGUARD_DNSBL",
                "bl.test=127.0.0.[2..11]*2 bl2.test wl.test*-2",
            ),
            ("HELOGUARD_RHSBL", "dbl.test=127.0.1.[2..99]"),
            ("HELOGUARD_HELO_POLICY", "default=tag,syntax=reject,spf=tag"),
        ] {
            if std::env::var_os(k).is_none() {
                cmd.env(k, v);
            }
        }
    }
    let child = cmd
        .spawn()
        .unwrap_or_else(|e| die(&format!("cannot start {server}: {e}")));
    let mut srv = ChildServer {
        child,
        dir: (!keep_dir).then_some(dir),
    };
    wait_port(proxy_addr, &mut srv.child);
    let pid = srv.child.id();
    eprintln!(
        "loadgen helo: server pid {pid}, proxy {proxy_addr}, dns {}",
        dns.addr()
    );

    let body = build_body(size);
    let q0 = dns.queries().len();
    let (cpu0, _, _) = proc_usage(pid);
    let gcpu0 = own_cpu_s();
    let (mut r, wall) = drive(c, n, |i, run| {
        let id = &ids[i % distinct];
        run(&SessionSpec {
            addr: proxy_addr,
            proxy: Some(proxy_v1(id.ip, 10000 + (i % 50000) as u16, proxy_addr)),
            helo: &id.helo,
            msgs,
            body: &body,
        })
    });
    // answers still in flight for the last sessions
    std::thread::sleep(Duration::from_millis(200));
    let (cpu1, hwm, rss) = proc_usage(pid);
    let gcpu = own_cpu_s() - gcpu0;
    let qs = dns.queries();
    let mut by_type: BTreeMap<String, usize> = BTreeMap::new();
    for q in &qs[q0..] {
        *by_type.entry(q.qtype.to_string()).or_default() += 1;
    }
    let nq = qs.len() - q0;
    let ok = r.session.len();
    let ws = wall.as_secs_f64();
    drop(srv);
    println!(
        "{{\"tool\":\"loadgen\",\"mode\":\"helo\",\"cache\":\"{mode}\",\"sender\":{sender},\"label\":\"{label}\",\"policy\":\"{}\",\"workers\":\"{}\",\"concurrency\":{c},\"sessions\":{n},\"distinct_identities\":{distinct},\"msgs_per_session\":{msgs},\"wall_s\":{ws:.3},\"sessions_ok\":{ok},\"sessions_per_s\":{:.1},\"messages_ok\":{},\"msgs_per_s\":{:.1},\"server_cpu_s\":{:.2},\"server_cpu_ms_per_session\":{:.3},\"server_peak_rss_kb\":{hwm},\"server_rss_kb\":{rss},\"dns_queries\":{nq},\"dns_queries_per_session\":{:.2},\"dns_by_type\":{},\"ehlo_us\":{},\"session_ms\":{},\"errors\":{},\"loadgen_cpu_s\":{gcpu:.2}}}",
        std::env::var("HELOGUARD_HELO_POLICY").unwrap_or_default(),
        std::env::var("HELOGUARD_WORKERS").unwrap_or_default(),
        ok as f64 / ws,
        r.msgs_ok,
        r.msgs_ok as f64 / ws,
        cpu1 - cpu0,
        1000.0 * (cpu1 - cpu0) / ok.max(1) as f64,
        nq as f64 / n.max(1) as f64,
        errors_json(&by_type),
        pct_json(&mut r.ehlo, true),
        pct_json(&mut r.session, false),
        errors_json(&r.errors),
    );
}

// ---------------------------------------------------------------------------------------------
// idle

fn connect_from(src: Option<IpAddr>, addr: SocketAddr) -> io::Result<TcpStream> {
    let Some(src) = src else {
        return TcpStream::connect_timeout(&addr, IO_TIMEOUT);
    };
    let dom = socket2::Domain::for_address(addr);
    let s = socket2::Socket::new(dom, socket2::Type::STREAM, Some(socket2::Protocol::TCP))?;
    s.bind(&SocketAddr::new(src, 0).into())?;
    s.connect_timeout(&addr.into(), IO_TIMEOUT)?;
    Ok(s.into())
}

/// An idle connection the generator holds open.
enum Held {
    Plain(TcpStream),
    /// After EHLO, STARTTLS, a handshake and EHLO again inside TLS.
    Tls(Box<rustls::StreamOwned<ClientConnection, TcpStream>>),
}

impl Held {
    fn socket(&self) -> &TcpStream {
        match self {
            Held::Plain(s) => s,
            Held::Tls(t) => &t.sock,
        }
    }
}

/// EHLO, STARTTLS, the handshake and EHLO inside TLS on a connection that got its banner.
fn idle_in_tls(
    mut c: Smtp,
    config: &Arc<ClientConfig>,
) -> Result<Box<rustls::StreamOwned<ClientConnection, TcpStream>>, String> {
    let step = |stage: &'static str| move |e: io::Error| format!("{stage}:{:?}", e.kind());
    match c
        .cmd(b"EHLO client.example.org\r\n")
        .map_err(step("ehlo"))?
    {
        250 => {}
        code => return Err(format!("ehlo:{code}")),
    }
    match c.cmd(b"STARTTLS\r\n").map_err(step("starttls"))? {
        220 => {}
        code => return Err(format!("starttls:{code}")),
    }
    let mut conn = tls_client::connect(config)?;
    let mut sock = c.s;
    while conn.is_handshaking() {
        conn.complete_io(&mut sock).map_err(step("handshake"))?;
    }
    let mut t = Box::new(rustls::StreamOwned::new(conn, sock));
    t.write_all(b"EHLO client.example.org\r\n")
        .map_err(step("tls-ehlo"))?;
    // The multi-line EHLO reply ends with a line whose fourth octet is a space.
    let mut reply = Vec::new();
    let mut b = [0u8; 1024];
    loop {
        let n = t.read(&mut b).map_err(step("tls-ehlo"))?;
        if n == 0 {
            return Err("tls-ehlo:closed".into());
        }
        reply.extend_from_slice(&b[..n]);
        let last_line = reply
            .strip_suffix(b"\r\n")
            .map(|r| r.rsplit(|&x| x == b'\n').next().unwrap_or(r));
        if let Some(line) = last_line
            && line.len() >= 4
            && line[3] == b' '
        {
            return if line.starts_with(b"250") {
                Ok(t)
            } else {
                Err("tls-ehlo:refused".into())
            };
        }
    }
}

fn idle(mut a: Args) {
    let addr = parse_addr(&a.take(&["--addr"]).unwrap_or_else(|| die("--addr needed")));
    let k: usize = a.num(&["-k"], 10000);
    let pid: u32 = a.num(&["--pid"], 0);
    let hold: f64 = a.num(&["--hold"], 5.0);
    let threads: usize = a.num(&["--threads"], 8);
    let label = a.take(&["--label"]).unwrap_or_default();
    let proxy = a.flag("--proxy");
    let starttls = a.flag("--starttls");
    a.done();
    let tls = starttls.then(|| tls_client::client_config(false, false));

    let mem0 = if pid > 0 { status_mem(pid).1 } else { 0 };
    let next = AtomicUsize::new(0);
    let held: Mutex<Vec<Held>> = Mutex::new(Vec::with_capacity(k));
    let errors: Mutex<BTreeMap<String, usize>> = Mutex::new(BTreeMap::new());
    let t0 = Instant::now();
    std::thread::scope(|sc| {
        for _ in 0..threads.max(1) {
            sc.spawn(|| {
                let mut mine = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= k {
                        break;
                    }
                    let res = (|| -> Result<Held, String> {
                        let (src, hdr) = if proxy {
                            let ip = if i.is_multiple_of(2) && i / 2 < 762 {
                                IpAddr::V4(doc_v4(i / 2))
                            } else {
                                IpAddr::V6(doc_v6(i))
                            };
                            (None, Some(proxy_v1(ip, 10000 + (i % 50000) as u16, addr)))
                        } else {
                            let ip = IpAddr::V4(Ipv4Addr::new(
                                127,
                                0,
                                (i / 250 % 250) as u8,
                                (i % 250) as u8 + 2,
                            ));
                            (Some(ip), None)
                        };
                        let s = connect_from(src, addr)
                            .map_err(|e| format!("connect:{:?}", e.kind()))?;
                        let mut c = Smtp::wrap(s).map_err(|e| format!("setup:{:?}", e.kind()))?;
                        c.s.set_read_timeout(Some(Duration::from_secs(10))).ok();
                        if let Some(h) = hdr {
                            c.s.write_all(h.as_bytes())
                                .map_err(|e| format!("proxy:{:?}", e.kind()))?;
                        }
                        match c.reply() {
                            Ok(220) => {}
                            Ok(code) => return Err(format!("banner:{code}")),
                            Err(e) => return Err(format!("banner:{:?}", e.kind())),
                        }
                        match &tls {
                            None => Ok(Held::Plain(c.s)),
                            Some(config) => idle_in_tls(c, config).map(Held::Tls),
                        }
                    })();
                    match res {
                        Ok(s) => mine.push(s),
                        Err(e) => *errors.lock().unwrap().entry(e).or_default() += 1,
                    }
                }
                held.lock().unwrap().extend(mine);
            });
        }
    });
    let setup = t0.elapsed();
    let held = held.into_inner().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let mem1 = if pid > 0 { status_mem(pid) } else { (0, 0) };

    // A new client while K sessions sit idle: banner and EHLO times (5 probes, median kept).
    let probe = || -> Result<(Duration, Duration), String> {
        let t = Instant::now();
        let mut c = Smtp::connect(addr).map_err(|e| format!("probe-connect:{:?}", e.kind()))?;
        if proxy {
            c.s.write_all(
                proxy_v1(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 200)), 9999, addr).as_bytes(),
            )
            .map_err(|e| format!("probe:{:?}", e.kind()))?;
        }
        match c.reply() {
            Ok(220) => {}
            Ok(code) => return Err(format!("probe-banner:{code}")),
            Err(e) => return Err(format!("probe-banner:{:?}", e.kind())),
        }
        let banner = t.elapsed();
        let t2 = Instant::now();
        let code = c
            .cmd(b"EHLO probe.example.org\r\n")
            .map_err(|e| format!("probe-ehlo:{:?}", e.kind()))?;
        let ehlo = t2.elapsed();
        let _ = c.cmd(b"QUIT\r\n");
        if code != 250 {
            return Err(format!("probe-ehlo:{code}"));
        }
        Ok((banner, ehlo))
    };
    let mut probes = Vec::new();
    let mut probe_err = None;
    for _ in 0..5 {
        match probe() {
            Ok(p) => probes.push(p),
            Err(e) => probe_err = Some(e),
        }
    }
    probes.sort();
    let mid = probes.get(probes.len() / 2).copied();

    std::thread::sleep(Duration::from_secs_f64(hold));
    // Still open? A non-blocking read gives WouldBlock on a live idle socket.
    let mut open = 0;
    for h in &held {
        let s = h.socket();
        let _ = s.set_nonblocking(true);
        let mut b = [0u8; 64];
        match (&*s).read(&mut b) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => open += 1,
            _ => {}
        }
    }
    let mem2 = if pid > 0 { status_mem(pid) } else { (0, 0) };
    let got = held.len();
    for h in &held {
        let _ = h.socket().shutdown(Shutdown::Both);
    }
    drop(held);
    let per_conn = if got > 0 && pid > 0 {
        (mem1.1 as f64 - mem0 as f64) / got as f64
    } else {
        0.0
    };
    let errs = errors.into_inner().unwrap();
    println!(
        "{{\"tool\":\"loadgen\",\"mode\":\"idle\",\"label\":\"{label}\",\"addr\":\"{addr}\",\"proxy\":{proxy},\"starttls\":{starttls},\"k\":{k},\"banner_220\":{got},\"setup_s\":{:.2},\"still_open_after_hold\":{open},\"hold_s\":{hold},\"probe_banner_ms\":{},\"probe_ehlo_ms\":{},\"probe_error\":{},\"pid\":{pid},\"rss_before_kb\":{mem0},\"rss_with_idle_kb\":{},\"rss_end_kb\":{},\"peak_rss_kb\":{},\"per_conn_rss_kb\":{per_conn:.1},\"errors\":{}}}",
        setup.as_secs_f64(),
        mid.map(|m| format!("{:.3}", m.0.as_secs_f64() * 1e3))
            .unwrap_or("null".into()),
        mid.map(|m| format!("{:.3}", m.1.as_secs_f64() * 1e3))
            .unwrap_or("null".into()),
        probe_err
            .map(|e| format!("\"{e}\""))
            .unwrap_or("null".into()),
        mem1.1,
        mem2.1,
        mem2.0.max(mem1.0),
        errors_json(&errs),
    );
}

// ---------------------------------------------------------------------------------------------
// dns

fn dns(mut a: Args) {
    let ttl: u32 = a.num(&["--ttl"], 3600);
    a.done();
    let zone = TestZone::new()
        .ttl(ttl)
        .a("client.example.org", "127.0.0.1")
        .a("probe.example.org", "127.0.0.1")
        .a("localhost", "127.0.0.1")
        .ptr("127.0.0.1", "localhost");
    let d = Arc::new(TestDns::start(zone));
    println!("dns={}", d.env_value());
    let _ = io::stdout().flush();
    // Serves until killed.
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}
