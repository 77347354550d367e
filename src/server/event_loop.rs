//! The mio readiness loop: the only code that touches client sockets.
//!
//! Rules of an edge-triggered loop (mio `src/poll.rs`, "Spurious events" and "Draining
//! readiness"), followed throughout:
//! 1. An event can be spurious: `WouldBlock` is never an error, and events for unknown or
//!    stale tokens are ignored.
//! 2. After an event, an operation is repeated until `WouldBlock` (or stopped on purpose with
//!    a flag that brings us back, see `Conn::read_paused`); otherwise no new event comes.
//! 3. `read_closed`/`error` are hints: EOF and errors are handled on the actual read/write.
//!
//! Sockets are registered once for READABLE | WRITABLE. Workers, the resolver thread and the
//! spool writers answer over channels and wake the loop through one shared `mio::Waker`;
//! wakes coalesce, so every wake drains every channel.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crossbeam_channel::Receiver;
use log::{debug, info, warn};
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token, Waker};
use slab::Slab;

use crate::config::{Config, DeliverTarget};
use crate::dns::resolver::{self, ResolverHandle, ResolverSettings};
use crate::dns::{DnsAnswer, DnsRequest, Family};
use crate::metrics::{Listener as MetricListener, Metrics, RefuseReason, RelayFailure};
use crate::net::{ClientKey, canonical_ip};
use crate::protocol::reply::Reply;
use crate::proxy_protocol::{self, ProxyParse};
use crate::relay::{NextHopProtocol, RelayClientParams, XclientAttrs};
use crate::server::conn::{Conn, Phase};
use crate::server::listener::{BoundListener, ListenerKind};
use crate::server::loop_wake::LoopWake;
use crate::server::relay_link::{LinkAnswer, LinkFailure, NextHopSocket, RelayLink};
use crate::server::tls::TlsAcceptor;
use crate::server::worker::{Done, Job, OwnedEvent, WorkerPool};
use crate::session::{DeliveryOutcome, Observation, Session, SessionAction, SessionParams};
use crate::spool::envelope::trace_fields;
use crate::spool::maildir::{self, Maildir};
use crate::spool::writer::{self, SpoolDone, SpoolJob, SpoolWriters};

const WAKER: Token = Token(0);
const SIGNALS: Token = Token(1);
const FIRST_LISTENER: usize = 2;
/// Connection tokens start here; listeners sit below.
const FIRST_CONN: usize = 1024;
/// Next-hop link tokens start here (relay modes); client connections sit below.
const FIRST_RELAY: usize = 1 << 30;
/// How soon a listener is tried again after accept failed (e.g. out of file descriptors).
const ACCEPT_RETRY: Duration = Duration::from_millis(100);
/// How often links to the next hop are checked against their deadlines.
const RELAY_CHECK_EVERY: Duration = Duration::from_secs(1);

/// SPEC "PROXY protocol": the header must arrive within 5 seconds of connect.
const PROXY_HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// SPEC "Pregreet": 503 to everything until QUIT or 10 s, then close.
const PREGREET_LINGER: Duration = Duration::from_secs(10);
/// How often the spool's free space is measured against HELOGUARD_MIN_FREE_MB.
const SPACE_CHECK_EVERY: Duration = Duration::from_secs(10);
/// After the shutdown grace, sessions get this long to flush their 421 before exit.
const FINAL_FLUSH: Duration = Duration::from_secs(1);

/// Why the server could not start.
#[derive(Debug)]
pub enum StartError {
    Io(&'static str, io::Error),
    Spool(String),
    Tls(String),
    Relay(String),
}

impl std::fmt::Display for StartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StartError::Io(what, e) => write!(f, "{what}: {e}"),
            StartError::Spool(e) => write!(f, "HELOGUARD_SPOOL: {e}"),
            StartError::Tls(e) => write!(f, "{e}"),
            StartError::Relay(e) => write!(f, "HELOGUARD_DELIVER: {e}"),
        }
    }
}

impl std::error::Error for StartError {}

/// Stops a running server from another thread (tests, embedding), like SIGTERM does.
#[derive(Clone)]
pub struct StopHandle {
    requested: Arc<AtomicBool>,
    waker: Arc<Waker>,
}

impl StopHandle {
    /// Begins a graceful shutdown; a second call ends at once.
    pub fn stop(&self) {
        self.requested.store(true, Ordering::SeqCst);
        let _ = self.waker.wake();
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum TimerKind {
    ProxyDeadline,
    Greet,
    Idle,
    Verdict(u32),
    PregreetClose,
    SpaceCheck,
    GraceExpired,
    FinalExit,
    RelayCheck,
    /// `conn_id` holds the listener index.
    AcceptRetry,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Timer {
    at: Instant,
    conn_id: u64,
    kind: TimerKind,
}

/// Where accepted mail goes.
enum Handoff {
    Maildir(SpoolWriters),
    /// Before-queue relay to the next hop (HELOGUARD_DELIVER smtp:// or lmtp://).
    Relay(NextHop),
}

/// The next hop of the relay modes, resolved once at startup.
#[derive(Clone, Debug)]
enum NextHop {
    Tcp {
        addr: SocketAddr,
        host: String,
        protocol: NextHopProtocol,
    },
    Unix {
        path: std::path::PathBuf,
    },
}

/// The server: listeners, connections, timers and the threads that serve them.
pub struct Server {
    poll: Poll,
    config: Arc<Config>,
    listeners: Vec<(TcpListener, ListenerKind)>,
    conns: Slab<Conn>,
    generation: u32,
    sessions_started: u64,
    run_id: u64,
    per_client: HashMap<ClientKey, usize>,
    timers: BinaryHeap<Reverse<Timer>>,
    waker: Arc<Waker>,
    workers: Option<WorkerPool>,
    done_rx: Receiver<Done>,
    /// The workers' wake-ups, rearmed before every drain.
    worker_wake: Arc<LoopWake>,
    resolver: Option<ResolverHandle>,
    dns_rx: Receiver<DnsAnswer>,
    handoff: Option<Handoff>,
    spool_rx: Receiver<SpoolDone>,
    tls: Option<Arc<TlsAcceptor>>,
    metrics: Arc<Metrics>,
    signals: Option<signal_hook_mio::v1_0::Signals>,
    stop_requested: Arc<AtomicBool>,
    stop_seen: bool,
    shutting_down: bool,
    exit_now: bool,
    spool_space_low: Arc<AtomicBool>,
    relays: Slab<RelayLink>,
    relay_check_armed: bool,
    /// Scratch for socket reads, shared by every connection.
    read_buf: Box<[u8]>,
}

/// Options that differ between the binary and an embedded (test) server.
#[derive(Clone, Copy, Debug)]
pub struct ServerOptions {
    /// Install SIGTERM/SIGINT/SIGHUP handling (the binary); tests use `StopHandle`.
    pub handle_signals: bool,
}

impl Server {
    /// Starts the threads (workers, resolver, spool writers) and registers the listeners.
    pub fn new(
        config: Arc<Config>,
        bound: Vec<BoundListener>,
        metrics: Arc<Metrics>,
        options: ServerOptions,
    ) -> Result<Self, StartError> {
        let poll = Poll::new().map_err(|e| StartError::Io("poll", e))?;
        let waker =
            Arc::new(Waker::new(poll.registry(), WAKER).map_err(|e| StartError::Io("waker", e))?);

        let tls = match (&config.tls_cert, &config.tls_key) {
            (Some(cert), Some(key)) => {
                Some(Arc::new(TlsAcceptor::new(cert, key).map_err(|e| {
                    // A startup error names the variable at fault.
                    let variable = match e.path() {
                        Some(path) if path == key.as_path() => "HELOGUARD_TLS_KEY",
                        _ => "HELOGUARD_TLS_CERT",
                    };
                    StartError::Tls(format!("{variable}: {e}"))
                })?))
            }
            _ => None,
        };

        let mut listeners = Vec::with_capacity(bound.len());
        for (i, b) in bound.into_iter().enumerate() {
            let mut l = TcpListener::from_std(b.listener);
            poll.registry()
                .register(&mut l, Token(FIRST_LISTENER + i), Interest::READABLE)
                .map_err(|e| StartError::Io("listener", e))?;
            listeners.push((l, b.kind));
        }

        let (dns_tx, dns_rx) = crossbeam_channel::unbounded();
        let observer_metrics = metrics.clone();
        let resolver = resolver::spawn(
            ResolverSettings {
                servers: config.dns_servers.clone(),
                timeout: config.dns_timeout,
                max_in_flight: 4096,
            },
            dns_tx,
            Some(waker.clone()),
            Arc::new(move |qtype, outcome, took| observer_metrics.dns_query(qtype, outcome, took)),
        )
        .map_err(|e| StartError::Io("HELOGUARD_DNS", e))?;

        let (done_tx, done_rx) = crossbeam_channel::unbounded();
        let worker_wake = Arc::new(LoopWake::new(waker.clone()));
        let workers = WorkerPool::start(
            config.workers,
            done_tx,
            worker_wake.clone(),
            metrics.clone(),
            resolver.known_answers().clone(),
        )
        .map_err(|e| StartError::Io("HELOGUARD_WORKERS", e))?;

        let (spool_tx, spool_rx) = crossbeam_channel::unbounded();
        let handoff = match &config.deliver {
            DeliverTarget::Maildir => {
                let maildir = Maildir::open(&config.spool, &config.hostname)
                    .map_err(|e| StartError::Spool(e.to_string()))?
                    .with_metrics(metrics.clone());
                let writers = writer::spawn_writers(
                    Arc::new(maildir),
                    config.spool_writers,
                    spool_tx,
                    Some(waker.clone()),
                )
                .map_err(|e| StartError::Io("HELOGUARD_SPOOL_WRITERS", e))?;
                Handoff::Maildir(writers)
            }
            DeliverTarget::Smtp { host, port } => {
                Handoff::Relay(resolve_next_hop(host, *port, NextHopProtocol::Smtp)?)
            }
            DeliverTarget::Lmtp { host, port } => {
                Handoff::Relay(resolve_next_hop(host, *port, NextHopProtocol::Lmtp)?)
            }
            DeliverTarget::LmtpUnix { path } => {
                Handoff::Relay(NextHop::Unix { path: path.clone() })
            }
        };

        let signals = if options.handle_signals {
            use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
            let mut s = signal_hook_mio::v1_0::Signals::new([SIGINT, SIGTERM, SIGHUP])
                .map_err(|e| StartError::Io("signals", e))?;
            poll.registry()
                .register(&mut s, SIGNALS, Interest::READABLE)
                .map_err(|e| StartError::Io("signals", e))?;
            Some(s)
        } else {
            None
        };

        let run_id = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);

        let mut server = Self {
            poll,
            config,
            listeners,
            conns: Slab::with_capacity(1024),
            generation: 0,
            sessions_started: 0,
            run_id,
            per_client: HashMap::new(),
            timers: BinaryHeap::new(),
            waker,
            workers: Some(workers),
            done_rx,
            worker_wake,
            resolver: Some(resolver),
            dns_rx,
            handoff: Some(handoff),
            spool_rx,
            tls,
            metrics,
            signals,
            stop_requested: Arc::new(AtomicBool::new(false)),
            stop_seen: false,
            shutting_down: false,
            exit_now: false,
            spool_space_low: Arc::new(AtomicBool::new(false)),
            relays: Slab::new(),
            relay_check_armed: false,
            read_buf: vec![0u8; crate::server::conn::READ_CHUNK].into_boxed_slice(),
        };
        server.check_spool_space(Instant::now());
        Ok(server)
    }

    /// The bound addresses, in configuration order (plain first, then PROXY).
    pub fn local_addrs(&self) -> Vec<(SocketAddr, ListenerKind)> {
        self.listeners
            .iter()
            .filter_map(|(l, k)| l.local_addr().ok().map(|a| (a, *k)))
            .collect()
    }

    pub fn stop_handle(&self) -> StopHandle {
        StopHandle {
            requested: self.stop_requested.clone(),
            waker: self.waker.clone(),
        }
    }

    /// Serves until shutdown completes.
    pub fn run(mut self) -> io::Result<()> {
        crate::sched::prefer_short_slices();
        let mut events = Events::with_capacity(1024);
        loop {
            let timeout = self.next_timeout();
            match self.poll.poll(&mut events, timeout) {
                Ok(()) => {}
                // Signals interrupt epoll_wait; that is not a failure.
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
            for event in events.iter() {
                match event.token() {
                    WAKER => {}
                    SIGNALS => self.handle_signals(),
                    Token(t) if (FIRST_LISTENER..FIRST_CONN).contains(&t) => {
                        self.accept(t - FIRST_LISTENER)
                    }
                    Token(t) if t >= FIRST_RELAY => self.relay_ready(t - FIRST_RELAY),
                    Token(t) => self.conn_ready(t - FIRST_CONN),
                }
            }
            self.drain_channels();
            self.fire_timers();
            if self.stop_requested.swap(false, Ordering::SeqCst) {
                self.request_stop();
            }
            if self.exit_now || (self.shutting_down && self.conns.is_empty()) {
                break;
            }
        }
        self.finish();
        Ok(())
    }

    fn finish(mut self) {
        for slot in self.conns.iter().map(|(k, _)| k).collect::<Vec<_>>() {
            self.close(slot, "shutdown");
        }
        if let Some(w) = self.workers.take() {
            w.stop();
        }
        // Spool writers finish every submitted job: a file is either whole in new/ or only in
        // tmp/, never half-written in new/.
        if let Some(Handoff::Maildir(w)) = self.handoff.take() {
            w.shutdown();
        }
        drop(self.resolver.take());
        info!("heloguard stopped");
    }

    // ----- signals and shutdown -------------------------------------------------------

    fn handle_signals(&mut self) {
        use signal_hook::consts::SIGHUP;
        let pending: Vec<i32> = match self.signals.as_mut() {
            Some(s) => s.pending().collect(),
            None => return,
        };
        for sig in pending {
            if sig == SIGHUP {
                self.reload_tls();
            } else {
                self.request_stop();
            }
        }
    }

    fn reload_tls(&mut self) {
        let Some(tls) = &self.tls else {
            info!("SIGHUP: no TLS configured, nothing to reload");
            return;
        };
        match tls.reload() {
            Ok(()) => info!("SIGHUP: TLS certificate and key reloaded"),
            Err(e) => warn!("SIGHUP: TLS reload failed, keeping the old certificate: {e}"),
        }
    }

    /// First request: stop accepting, 421 to idle sessions, grace for open transactions.
    /// Second request: end at once.
    fn request_stop(&mut self) {
        if self.stop_seen {
            info!("second stop request: exiting now");
            self.exit_now = true;
            return;
        }
        self.stop_seen = true;
        self.shutting_down = true;
        info!(
            "stop requested: no new connections, {} s grace for open transactions",
            self.config.shutdown_grace.as_secs()
        );
        for (mut l, _) in self.listeners.drain(..) {
            let _ = self.poll.registry().deregister(&mut l);
        }
        let now = Instant::now();
        self.push_timer(
            now + self.config.shutdown_grace,
            u64::MAX,
            TimerKind::GraceExpired,
        );
        let slots: Vec<usize> = self.conns.iter().map(|(k, _)| k).collect();
        for slot in slots {
            let Some(conn) = self.conns.get_mut(slot) else {
                continue;
            };
            if conn.phase == Phase::Active && (conn.session.is_some() || conn.at_worker) {
                conn.pending.push(OwnedEvent::Shutdown);
                self.pump(slot);
            } else {
                self.metrics.refused(RefuseReason::Shutdown);
                self.close(slot, "shutdown");
            }
        }
    }

    // ----- accepting -------------------------------------------------------------------

    fn accept(&mut self, index: usize) {
        loop {
            let Some((listener, kind)) = self.listeners.get(index) else {
                return;
            };
            let kind = *kind;
            let (socket, peer) = match listener.accept() {
                Ok(pair) => pair,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // EMFILE and friends. Readiness is edge-triggered: the connections
                    // already queued raise no new event, so come back on a timer.
                    warn!("accept failed: {e}; retrying in {ACCEPT_RETRY:?}");
                    let at = Instant::now() + ACCEPT_RETRY;
                    self.push_timer(at, index as u64, TimerKind::AcceptRetry);
                    return;
                }
            };
            self.admit(socket, peer, kind);
        }
    }

    fn admit(&mut self, mut socket: TcpStream, peer: SocketAddr, kind: ListenerKind) {
        self.metrics.connection(match kind {
            ListenerKind::Plain => MetricListener::Plain,
            ListenerKind::Proxy => MetricListener::Proxy,
        });
        let peer_ip = canonical_ip(peer.ip());
        if kind == ListenerKind::Proxy
            && !self
                .config
                .proxy_trusted
                .iter()
                .any(|c| c.contains(peer_ip))
        {
            debug!("PROXY listener: {peer_ip} is not in HELOGUARD_PROXY_TRUSTED");
            self.metrics.refused(RefuseReason::ProxyUntrusted);
            return;
        }
        let max = self.config.max_connections;
        if max > 0 && self.conns.len() >= max {
            self.metrics.refused(RefuseReason::MaxConnections);
            refuse_at_once(
                &mut socket,
                "421 4.3.2 Too many connections, try again later\r\n",
            );
            self.metrics.reply(421);
            return;
        }
        let _ = socket.set_nodelay(true);
        let entry = self.conns.vacant_entry();
        let slot = entry.key();
        self.generation = self.generation.wrapping_add(1);
        let id = (u64::from(self.generation) << 32) | slot as u64;
        let now = Instant::now();
        let mut conn = Conn::new(socket, id, kind, peer, peer_ip, now);
        if self
            .poll
            .registry()
            .register(
                &mut conn.socket,
                Token(FIRST_CONN + slot),
                Interest::READABLE | Interest::WRITABLE,
            )
            .is_err()
        {
            return;
        }
        entry.insert(conn);
        self.metrics.session_opened();
        match kind {
            ListenerKind::Plain => self.start_session(slot, now),
            ListenerKind::Proxy => {
                if let Some(c) = self.conns.get_mut(slot) {
                    c.phase = Phase::AwaitProxy;
                }
                self.push_timer(now + PROXY_HEADER_TIMEOUT, id, TimerKind::ProxyDeadline);
            }
        }
    }

    /// The client IP is known: apply the per-client limit, create the session, start the PTR
    /// lookup (its latency hides behind the banner and EHLO) and greet or wait.
    fn start_session(&mut self, slot: usize, now: Instant) {
        let Some(conn) = self.conns.get_mut(slot) else {
            return;
        };
        let key = ClientKey::of(conn.client_ip);
        let per_ip = self.config.max_connections_per_ip;
        let count = self.per_client.entry(key).or_insert(0);
        if per_ip > 0 && *count >= per_ip {
            self.metrics.refused(RefuseReason::PerIp);
            self.metrics.reply(421);
            let _ = conn.queue_output(b"421 4.3.2 Too many connections from your address\r\n");
            conn.close_after_flush = true;
            self.flush_or_close(slot);
            return;
        }
        *count += 1;
        conn.counted_as = Some(key);

        self.sessions_started += 1;
        let session_id = (self.run_id << 24) ^ self.sessions_started;
        conn.session = Some(Box::new(Session::new(SessionParams {
            config: self.config.clone(),
            client_ip: conn.client_ip,
            session_id,
            tls_available: self.tls.is_some(),
            spool_space_low: self.spool_space_low.clone(),
        })));
        conn.dns.reverse_started = Some(now);
        let known_reverse = self.resolver.as_ref().and_then(|r| {
            let known = r.known_answers().reverse(conn.client_ip, now);
            if known.is_none() {
                r.submit(DnsRequest::Reverse {
                    id: conn.id,
                    ip: conn.client_ip,
                });
            }
            known
        });
        let id = conn.id;
        let greet_now = self.config.greet_delay.is_zero();
        if greet_now {
            conn.phase = Phase::Active;
            conn.pending.push(OwnedEvent::Greet);
        } else {
            conn.phase = Phase::GreetDelay;
            // Anything already here (after a PROXY header) was sent before the banner.
            conn.pregreeted = !conn.inbuf.is_empty();
        }
        // A known answer rides along with the first job instead of arriving later in a second.
        if let Some(facts) = known_reverse {
            conn.dns.reverse_took = Some(Duration::ZERO);
            conn.pending.push(OwnedEvent::Reverse(facts));
        }
        if !greet_now {
            self.push_timer(now + self.config.greet_delay, id, TimerKind::Greet);
        }
        self.arm_idle(slot, now);
        self.pump(slot);
    }

    // ----- connection I/O --------------------------------------------------------------

    fn conn_ready(&mut self, slot: usize) {
        let Some(conn) = self.conns.get_mut(slot) else {
            // A spurious event for a slot that was closed.
            return;
        };
        if let Err(e) = conn.flush() {
            debug!("{}: write failed: {e}", conn.client_ip);
            self.close(slot, "write error");
            return;
        }
        self.read_conn(slot);
        self.flush_or_close(slot);
    }

    fn read_conn(&mut self, slot: usize) {
        let Some(conn) = self.conns.get_mut(slot) else {
            return;
        };
        if conn.close_after_flush {
            return;
        }
        let was_handshaking = conn.tls.is_some() && !conn.tls_up;
        let outcome = match conn.read_available(&mut self.read_buf) {
            Ok(o) => o,
            Err(e) => {
                if was_handshaking {
                    info!("{}: TLS handshake failed: {e}", conn.client_ip);
                } else {
                    debug!("{}: read failed: {e}", conn.client_ip);
                }
                // Send the TLS alert, if any, once before closing.
                let _ = conn.flush();
                self.close(slot, "read error");
                return;
            }
        };
        let now = Instant::now();
        if outcome.got_data {
            conn.last_input = now;
            conn.input_dirty = true;
        }
        if outcome.tls_established {
            self.metrics.tls_handshake(true);
            if let Some(info) = conn.tls.as_ref().and_then(|t| t.info()) {
                conn.pending.push(OwnedEvent::TlsEstablished(info));
            }
        }
        match conn.phase {
            Phase::AwaitProxy => self.parse_proxy_header(slot, now),
            Phase::GreetDelay => {
                if outcome.got_data {
                    conn.pregreeted = true;
                }
            }
            Phase::Active => {}
        }
        if outcome.eof {
            self.on_eof(slot);
            return;
        }
        self.pump(slot);
    }

    fn parse_proxy_header(&mut self, slot: usize, now: Instant) {
        let Some(conn) = self.conns.get_mut(slot) else {
            return;
        };
        match proxy_protocol::parse(&conn.inbuf) {
            ProxyParse::Incomplete => {
                if conn.read_paused || conn.eof {
                    self.metrics.refused(RefuseReason::ProxyHeader);
                    self.close(slot, "bad PROXY header");
                }
            }
            ProxyParse::Invalid(e) => {
                debug!("{}: bad PROXY header: {e}", conn.peer);
                self.metrics.refused(RefuseReason::ProxyHeader);
                self.close(slot, "bad PROXY header");
            }
            ProxyParse::Done { source, consumed } => {
                if let Some(src) = source {
                    conn.client_ip = canonical_ip(src.ip());
                }
                conn.inbuf.drain(..consumed);
                conn.input_dirty = !conn.inbuf.is_empty();
                conn.phase = Phase::Active;
                self.start_session(slot, now);
            }
        }
    }

    fn on_eof(&mut self, slot: usize) {
        let Some(conn) = self.conns.get_mut(slot) else {
            return;
        };
        // Commands that came with the FIN (e.g. `QUIT` then close) still get processed;
        // the connection closes once nothing is left to do.
        if conn.phase == Phase::Active && conn.has_work() {
            self.pump(slot);
            return;
        }
        if conn.finished_after_eof() {
            self.close(slot, "client closed");
        }
    }

    /// Hands the session to a worker when it is here and has something to do.
    fn pump(&mut self, slot: usize) {
        let Some(conn) = self.conns.get_mut(slot) else {
            return;
        };
        if !conn.has_work() {
            return;
        }
        let Some(session) = conn.session.take() else {
            return;
        };
        let events = std::mem::take(&mut conn.pending);
        let input = std::mem::take(&mut conn.inbuf);
        conn.input_dirty = false;
        conn.at_worker = true;
        if let Some(w) = &self.workers {
            w.submit(Job {
                conn_id: conn.id,
                session,
                events,
                input,
            });
        }
    }

    fn flush_or_close(&mut self, slot: usize) {
        let Some(conn) = self.conns.get_mut(slot) else {
            return;
        };
        if let Err(e) = conn.flush() {
            debug!("{}: write failed: {e}", conn.client_ip);
            self.close(slot, "write error");
            return;
        }
        if conn.close_after_flush && conn.outbuf.is_empty() && !conn.at_worker {
            self.close(slot, "closed");
        }
    }

    // ----- answers from the threads ----------------------------------------------------

    fn drain_channels(&mut self) {
        self.worker_wake.rearm();
        while let Ok(done) = self.done_rx.try_recv() {
            self.on_done(done);
        }
        while let Ok(answer) = self.dns_rx.try_recv() {
            self.on_dns(answer);
        }
        while let Ok(done) = self.spool_rx.try_recv() {
            self.on_spooled(done);
        }
    }

    fn slot_of(&self, id: u64) -> Option<usize> {
        let slot = (id & 0xffff_ffff) as usize;
        match self.conns.get(slot) {
            Some(c) if c.id == id => Some(slot),
            // The connection is gone and its slot may be reused: a late answer.
            _ => None,
        }
    }

    fn on_done(&mut self, done: Done) {
        let Some(slot) = self.slot_of(done.conn_id) else {
            return;
        };
        let now = Instant::now();
        let Some(conn) = self.conns.get_mut(slot) else {
            return;
        };
        conn.at_worker = false;
        let mut input = done.input;
        if !conn.inbuf.is_empty() {
            input.extend_from_slice(&conn.inbuf);
        }
        conn.inbuf = input;
        if conn.inbuf.is_empty() && conn.inbuf.capacity() > 4096 {
            // Idle sessions should not hold a DATA-sized buffer.
            conn.inbuf = Vec::new();
        }
        conn.session = Some(done.session);
        let output = done.output;
        if let Err(e) = conn.queue_output(&output.bytes) {
            debug!("{}: TLS write failed: {e}", conn.client_ip);
            self.close(slot, "TLS error");
            return;
        }
        for obs in &output.observations {
            if let Observation::Verdict(v) = obs {
                log_verdict(conn, v);
            }
        }
        for action in output.actions {
            self.on_action(slot, action, now);
        }
        let Some(conn) = self.conns.get_mut(slot) else {
            return;
        };
        if conn.read_paused && conn.inbuf.len() < crate::server::conn::INBUF_CAP {
            self.read_conn(slot);
        }
        let Some(conn) = self.conns.get_mut(slot) else {
            return;
        };
        if conn.eof && conn.finished_after_eof() {
            let _ = conn.flush();
            self.close(slot, "client closed");
            return;
        }
        self.pump(slot);
        self.flush_or_close(slot);
    }

    fn on_action(&mut self, slot: usize, action: SessionAction, now: Instant) {
        let Some(conn) = self.conns.get_mut(slot) else {
            return;
        };
        match action {
            SessionAction::HeloAccepted { generation, lookup } => {
                let id = conn.id;
                // No lookup left: none was needed, or the worker answered it from the
                // resolver's known answers (in no time).
                conn.dns.forward_took = None;
                if let Some(name) = lookup {
                    conn.dns.forward_started = Some(now);
                    if let Some(r) = &self.resolver {
                        r.submit(DnsRequest::Forward {
                            id,
                            name,
                            family: Family::of(conn.client_ip),
                        });
                    }
                }
                let deadline = now + self.config.dns_timeout * 2;
                self.push_timer(deadline, id, TimerKind::Verdict(generation));
            }
            SessionAction::Deliver(envelope) => match &self.handoff {
                Some(Handoff::Maildir(w)) => w.submit(SpoolJob {
                    id: conn.id,
                    envelope,
                }),
                // Relay modes stream the message (RelayData/RelayChunk/RelayEndData).
                Some(Handoff::Relay(_)) => {
                    conn.pending
                        .push(OwnedEvent::Delivered(DeliveryOutcome::Failed(
                            next_hop_unavailable(),
                        )))
                }
                None => conn
                    .pending
                    .push(OwnedEvent::Delivered(DeliveryOutcome::Failed(Reply::new(
                        421,
                        "4.3.2",
                        "Service shutting down",
                    )))),
            },
            SessionAction::RelayMail {
                reverse_path,
                params,
                xclient,
            } => {
                let Some(link) = self.relay_link(slot, xclient, now) else {
                    if let Some(conn) = self.conns.get_mut(slot) {
                        conn.pending
                            .push(OwnedEvent::RelayReply(next_hop_unavailable()));
                    }
                    return;
                };
                link.mail(&reverse_path, &params);
            }
            SessionAction::RelayData { trace, recipients } => {
                match conn.relay.and_then(|r| self.relays.get_mut(r)) {
                    Some(link) => link.start_data(trace_fields(&trace, &recipients)),
                    None => conn
                        .pending
                        .push(OwnedEvent::RelayReply(next_hop_unavailable())),
                }
            }
            SessionAction::RelayChunk(bytes) => {
                // Without a link the chunk has nowhere to go; the end of data answers 451.
                if let Some(link) = conn.relay.and_then(|r| self.relays.get_mut(r)) {
                    link.data_chunk(&bytes);
                }
            }
            SessionAction::RelayEndData => match conn.relay.and_then(|r| self.relays.get_mut(r)) {
                Some(link) => link.end_data(),
                None => conn
                    .pending
                    .push(OwnedEvent::Delivered(DeliveryOutcome::Failed(
                        next_hop_unavailable(),
                    ))),
            },
            SessionAction::RelayAbort => {
                // No final dot: closing the connection is the only way out of DATA.
                if let Some(r) = conn.relay.take() {
                    self.metrics.relay_failure(RelayFailure::Aborted);
                    self.close_relay(r, false);
                }
            }
            SessionAction::RelayRcpt { forward_path } => {
                match conn.relay.and_then(|r| self.relays.get_mut(r)) {
                    Some(link) => link.rcpt(&forward_path),
                    None => conn
                        .pending
                        .push(OwnedEvent::RelayReply(next_hop_unavailable())),
                }
            }
            SessionAction::StartTls => {
                // RFC 3207 4.2 (and CVE-2011-0411): nothing the client sent before the
                // handshake may be read inside TLS. The 220 is already queued in plaintext.
                conn.inbuf.clear();
                conn.input_dirty = false;
                match self.tls.as_ref().map(|t| t.accept()) {
                    Some(Ok(tls)) => conn.tls = Some(tls),
                    Some(Err(e)) => {
                        warn!("{}: cannot start TLS: {e}", conn.client_ip);
                        self.metrics.tls_handshake(false);
                        conn.close_after_flush = true;
                    }
                    None => conn.close_after_flush = true,
                }
            }
            SessionAction::Close => conn.close_after_flush = true,
        }
    }

    fn on_dns(&mut self, answer: DnsAnswer) {
        let Some(slot) = self.slot_of(answer.id()) else {
            return;
        };
        let Some(conn) = self.conns.get_mut(slot) else {
            return;
        };
        let now = Instant::now();
        let event = match answer {
            DnsAnswer::Reverse { facts, .. } => {
                conn.dns.reverse_took = conn.dns.reverse_started.map(|t| now - t);
                OwnedEvent::Reverse(facts)
            }
            DnsAnswer::Forward { name, addrs, .. } => {
                conn.dns.forward_took = conn.dns.forward_started.map(|t| now - t);
                OwnedEvent::Forward { name, addrs }
            }
        };
        conn.pending.push(event);
        self.pump(slot);
    }

    fn on_spooled(&mut self, done: SpoolDone) {
        let Some(slot) = self.slot_of(done.id) else {
            return;
        };
        let Some(conn) = self.conns.get_mut(slot) else {
            return;
        };
        let outcome = match done.result {
            Ok(_) => DeliveryOutcome::Accepted,
            Err(e) => {
                warn!("{}: spool write failed: {e}", conn.client_ip);
                DeliveryOutcome::Failed(Reply::new(
                    451,
                    "4.3.0",
                    "Temporary local problem writing the message, try again later",
                ))
            }
        };
        conn.pending.push(OwnedEvent::Delivered(outcome));
        self.pump(slot);
        self.flush_or_close(slot);
    }

    // ----- timers ----------------------------------------------------------------------

    fn push_timer(&mut self, at: Instant, conn_id: u64, kind: TimerKind) {
        self.timers.push(Reverse(Timer { at, conn_id, kind }));
    }

    fn next_timeout(&self) -> Option<Duration> {
        self.timers
            .peek()
            .map(|Reverse(t)| t.at.saturating_duration_since(Instant::now()))
    }

    fn arm_idle(&mut self, slot: usize, now: Instant) {
        if self.config.timeout.is_zero() {
            return;
        }
        let Some(conn) = self.conns.get_mut(slot) else {
            return;
        };
        if conn.idle_timer_armed {
            return;
        }
        conn.idle_timer_armed = true;
        let at = now + self.config.timeout;
        let id = conn.id;
        self.push_timer(at, id, TimerKind::Idle);
    }

    fn fire_timers(&mut self) {
        let now = Instant::now();
        while let Some(Reverse(t)) = self.timers.peek().copied() {
            if t.at > now {
                break;
            }
            self.timers.pop();
            match t.kind {
                TimerKind::SpaceCheck => self.check_spool_space(now),
                TimerKind::GraceExpired => self.grace_expired(now),
                TimerKind::FinalExit => self.exit_now = true,
                TimerKind::RelayCheck => self.check_relays(now),
                TimerKind::AcceptRetry => {
                    if !self.shutting_down {
                        self.accept(t.conn_id as usize);
                    }
                }
                _ => self.fire_conn_timer(t, now),
            }
        }
    }

    fn fire_conn_timer(&mut self, t: Timer, now: Instant) {
        let Some(slot) = self.slot_of(t.conn_id) else {
            return;
        };
        let timeout = self.config.timeout;
        let Some(conn) = self.conns.get_mut(slot) else {
            return;
        };
        match t.kind {
            TimerKind::ProxyDeadline => {
                if conn.phase == Phase::AwaitProxy {
                    self.metrics.refused(RefuseReason::ProxyHeader);
                    self.close(slot, "no PROXY header in time");
                }
            }
            TimerKind::Greet => {
                if conn.phase != Phase::GreetDelay {
                    return;
                }
                conn.phase = Phase::Active;
                if conn.pregreeted {
                    self.metrics.refused(RefuseReason::Pregreet);
                    conn.pending.push(OwnedEvent::Pregreeted);
                    let id = conn.id;
                    self.push_timer(now + PREGREET_LINGER, id, TimerKind::PregreetClose);
                } else {
                    conn.pending.push(OwnedEvent::Greet);
                }
                self.pump(slot);
            }
            TimerKind::Idle => {
                conn.idle_timer_armed = false;
                let due = conn.last_input + timeout;
                if due > now {
                    conn.idle_timer_armed = true;
                    let id = conn.id;
                    self.push_timer(due, id, TimerKind::Idle);
                    return;
                }
                if conn.tls.is_some() && !conn.tls_up {
                    info!("{}: TLS handshake timed out", conn.client_ip);
                    self.close(slot, "TLS handshake timeout");
                } else if conn.phase == Phase::Active && (conn.session.is_some() || conn.at_worker)
                {
                    conn.pending.push(OwnedEvent::IdleTimeout);
                    self.pump(slot);
                } else {
                    self.close(slot, "timeout");
                }
            }
            TimerKind::Verdict(generation) => {
                conn.pending
                    .push(OwnedEvent::VerdictDeadline { generation });
                self.pump(slot);
            }
            TimerKind::PregreetClose => self.close(slot, "pregreet"),
            TimerKind::SpaceCheck
            | TimerKind::GraceExpired
            | TimerKind::FinalExit
            | TimerKind::RelayCheck
            | TimerKind::AcceptRetry => {}
        }
    }

    fn grace_expired(&mut self, now: Instant) {
        let slots: Vec<usize> = self.conns.iter().map(|(k, _)| k).collect();
        for slot in slots {
            if let Some(conn) = self.conns.get_mut(slot) {
                conn.pending.push(OwnedEvent::GraceExpired);
                self.pump(slot);
            }
        }
        self.push_timer(now + FINAL_FLUSH, u64::MAX, TimerKind::FinalExit);
    }

    fn check_spool_space(&mut self, now: Instant) {
        if self.config.deliver != DeliverTarget::Maildir || self.config.min_free_mb == 0 {
            return;
        }
        let low = match maildir::free_space_mb(&self.config.spool) {
            Ok(mb) => mb < self.config.min_free_mb,
            Err(e) => {
                warn!("cannot measure free space of HELOGUARD_SPOOL: {e}");
                false
            }
        };
        if low != self.spool_space_low.swap(low, Ordering::Relaxed) {
            if low {
                warn!(
                    "spool below HELOGUARD_MIN_FREE_MB={}: MAIL gets 452 4.3.1",
                    self.config.min_free_mb
                );
            } else {
                info!("spool free space recovered");
            }
        }
        self.push_timer(now + SPACE_CHECK_EVERY, u64::MAX, TimerKind::SpaceCheck);
    }

    // ----- relay links -----------------------------------------------------------------

    /// The session's link to the next hop, connecting one when it has none. A link carries
    /// one client's XCLIENT attributes and serves only that client.
    fn relay_link(
        &mut self,
        slot: usize,
        xclient: XclientAttrs,
        now: Instant,
    ) -> Option<&mut RelayLink> {
        let Some(Handoff::Relay(next_hop)) = &self.handoff else {
            return None;
        };
        let conn = self.conns.get(slot)?;
        if let Some(r) = conn.relay
            && self.relays.contains(r)
        {
            return self.relays.get_mut(r);
        }
        let owner = conn.id;
        let (socket, tls_host, protocol) = match next_hop {
            NextHop::Tcp {
                addr,
                host,
                protocol,
            } => (NextHopSocket::connect_tcp(*addr), host.clone(), *protocol),
            NextHop::Unix { path } => (
                NextHopSocket::connect_unix(path),
                "localhost".to_string(),
                NextHopProtocol::Lmtp,
            ),
        };
        let socket = match socket {
            Ok(s) => s,
            Err(e) => {
                warn!("next hop: cannot connect: {e}");
                self.metrics.relay_failure(RelayFailure::Connect);
                return None;
            }
        };
        let params = RelayClientParams {
            hostname: self.config.hostname.clone(),
            protocol,
            xclient,
            can_tls: true,
        };
        let entry = self.relays.vacant_entry();
        let key = entry.key();
        let mut link = RelayLink::new(socket, owner, params, &tls_host, now);
        if self
            .poll
            .registry()
            .register(
                &mut link.socket,
                Token(FIRST_RELAY + key),
                Interest::READABLE | Interest::WRITABLE,
            )
            .is_err()
        {
            self.metrics.relay_failure(RelayFailure::Connect);
            return None;
        }
        entry.insert(link);
        if let Some(conn) = self.conns.get_mut(slot) {
            conn.relay = Some(key);
        }
        if !self.relay_check_armed {
            self.relay_check_armed = true;
            self.push_timer(now + RELAY_CHECK_EVERY, u64::MAX, TimerKind::RelayCheck);
        }
        self.relays.get_mut(key)
    }

    fn relay_ready(&mut self, key: usize) {
        let now = Instant::now();
        let Some(link) = self.relays.get_mut(key) else {
            return;
        };
        let progress = link.ready(now);
        let owner = link.owner;
        self.route_link_answers(owner, progress.answers);
        if let Some(failure) = progress.failed {
            self.fail_relay(key, failure);
        }
    }

    fn route_link_answers(&mut self, owner: u64, answers: Vec<LinkAnswer>) {
        if answers.is_empty() {
            return;
        }
        let Some(slot) = self.slot_of(owner) else {
            return;
        };
        let Some(conn) = self.conns.get_mut(slot) else {
            return;
        };
        for answer in answers {
            conn.pending.push(match answer {
                LinkAnswer::Command(reply) => OwnedEvent::RelayReply(reply),
                LinkAnswer::Delivery(Ok(())) => OwnedEvent::Delivered(DeliveryOutcome::Accepted),
                LinkAnswer::Delivery(Err(reply)) => {
                    OwnedEvent::Delivered(DeliveryOutcome::Failed(reply))
                }
            });
        }
        self.pump(slot);
        self.flush_or_close(slot);
    }

    /// The link is unusable: everything waiting on it gets 451 4.4.1 and it is closed.
    fn fail_relay(&mut self, key: usize, failure: LinkFailure) {
        let Some(link) = self.relays.get_mut(key) else {
            return;
        };
        let answers = link.fail_all(&next_hop_unavailable());
        let owner = link.owner;
        self.metrics.relay_failure(match failure {
            LinkFailure::Connect => RelayFailure::Connect,
            LinkFailure::Timeout => RelayFailure::Timeout,
            LinkFailure::Refused => RelayFailure::Refused,
        });
        warn!("next hop failed ({failure:?}); waiting clients get 451 4.4.1");
        self.close_relay(key, false);
        if let Some(slot) = self.slot_of(owner)
            && let Some(conn) = self.conns.get_mut(slot)
        {
            conn.relay = None;
        }
        self.route_link_answers(owner, answers);
    }

    fn close_relay(&mut self, key: usize, polite: bool) {
        if !self.relays.contains(key) {
            return;
        }
        let mut link = self.relays.remove(key);
        if polite {
            if link.is_waiting() {
                // The client left mid-transaction: the next hop never sees the final dot.
                self.metrics.relay_failure(RelayFailure::Aborted);
            }
            link.quit();
        }
        let _ = self.poll.registry().deregister(&mut link.socket);
    }

    fn check_relays(&mut self, now: Instant) {
        let late: Vec<usize> = self
            .relays
            .iter()
            .filter(|(_, l)| l.is_waiting() && l.deadline <= now)
            .map(|(k, _)| k)
            .collect();
        for key in late {
            self.fail_relay(key, LinkFailure::Timeout);
        }
        if self.relays.is_empty() {
            self.relay_check_armed = false;
        } else {
            self.push_timer(now + RELAY_CHECK_EVERY, u64::MAX, TimerKind::RelayCheck);
        }
    }

    // ----- closing ---------------------------------------------------------------------

    fn close(&mut self, slot: usize, why: &str) {
        if !self.conns.contains(slot) {
            return;
        }
        let mut conn = self.conns.remove(slot);
        let _ = self.poll.registry().deregister(&mut conn.socket);
        // However it ends (bad bytes, silence, the client leaving, shutdown), a handshake that
        // never completed is a failed one, counted once here.
        if conn.tls.is_some() && !conn.tls_up {
            self.metrics.tls_handshake(false);
        }
        if let Some(r) = conn.relay.take() {
            self.close_relay(r, true);
        }
        if let Some(key) = conn.counted_as
            && let Some(n) = self.per_client.get_mut(&key)
        {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.per_client.remove(&key);
            }
        }
        self.metrics.session_closed();
        log_session_end(&conn, why);
    }
}

/// What a client hears when the next hop cannot take its mail: try again later.
fn next_hop_unavailable() -> Reply {
    Reply::new(451, "4.4.1", "Next hop not available, try again later")
}

/// Resolves the next hop's host once, at startup (a blocking lookup is fine there).
fn resolve_next_hop(
    host: &str,
    port: u16,
    protocol: NextHopProtocol,
) -> Result<NextHop, StartError> {
    use std::net::ToSocketAddrs;
    let addr = (host, port)
        .to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .ok_or_else(|| StartError::Relay(format!("cannot resolve next hop {host}")))?;
    Ok(NextHop::Tcp {
        addr,
        host: host.to_string(),
        protocol,
    })
}

/// Best-effort one-shot reply to a connection we will not serve.
fn refuse_at_once(socket: &mut TcpStream, reply: &str) {
    use std::io::Write;
    let _ = socket.write(reply.as_bytes());
}

fn log_verdict(conn: &Conn, verdict: &crate::helo::policy::HeloVerdict) {
    let helo = conn
        .session
        .as_ref()
        .and_then(|s| s.summary().helo)
        .unwrap_or_default();
    let failed: Vec<&str> = verdict.failed.iter().map(|c| c.name()).collect();
    // SPEC: a `log` check is run, logged and counted, but left out of the verdict. It is the
    // one that failed by measure while the header shows `none` (an `off` check measures none).
    let log_failed: Vec<&str> = crate::helo::Check::ALL
        .into_iter()
        .filter(|c| {
            verdict.measured[c.index()] == crate::helo::CheckResult::Fail
                && verdict.shown[c.index()] == crate::helo::CheckResult::None
        })
        .map(|c| c.name())
        .collect();
    let list = |names: &[&str]| {
        if names.is_empty() {
            "-".to_string()
        } else {
            names.join(",")
        }
    };
    let dns_ms = conn
        .dns
        .reverse_took
        .max(conn.dns.forward_took)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    info!(
        "helo verdict ip={} helo={:?} ptr={} verdict={} action={} failed={} log_failed={} dns_ms={}",
        conn.client_ip,
        helo,
        verdict.ptr.as_deref().unwrap_or("none"),
        verdict.kind,
        verdict.action.name(),
        list(&failed),
        list(&log_failed),
        dns_ms,
    );
}

fn log_session_end(conn: &Conn, why: &str) {
    let duration = conn.started.elapsed().as_secs_f64();
    match conn.session.as_ref().map(|s| s.summary()) {
        Some(s) => info!(
            "session end ip={} helo={:?} verdict={} messages={} bytes={} duration={:.3}s ending={:?}/{}",
            conn.client_ip,
            s.helo.unwrap_or_default(),
            s.verdict.map(|v| v.name()).unwrap_or("none"),
            s.messages,
            s.bytes,
            duration,
            s.ending,
            why,
        ),
        None => debug!(
            "connection end ip={} duration={:.3}s ending={}",
            conn.client_ip, duration, why
        ),
    }
}
