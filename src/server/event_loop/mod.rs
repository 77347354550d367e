//! The mio readiness loop: the only code that touches client sockets.
//!
//! Rules of an edge-triggered loop (mio `src/poll.rs`, "Spurious events" and "Draining
//! readiness"), followed throughout:
//! 1. An event can be spurious: `WouldBlock` is never an error, and events for unknown or
//!    stale tokens are ignored.
//! 2. After an event, an operation is repeated until `WouldBlock` (or stopped on purpose in a
//!    state that brings us back, see `ReadSide::Full`); otherwise no new event comes.
//! 3. `read_closed`/`error` are hints: EOF and errors are handled on the actual read/write.
//!
//! Sockets are registered once for READABLE | WRITABLE, and each event does only the work its
//! readiness allows: a writable-only event writes and reads nothing, a readable-only one reads
//! and writes only what that produced. Workers, the resolver thread and the spool writers
//! answer over channels and wake the loop through one coalescing `LoopWake`, so every wake
//! drains every channel.
//!
//! The rest of the server lives beside this file, one concern each: `startup` builds it,
//! `admission` lets clients in, `dispatch` handles the threads' answers, `timers` the
//! deadlines, `next_hop` the relay links, `shutdown` the lifecycle, `session_log` the log lines.

use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use log::{debug, info};
use mio::event::Event;
use mio::net::TcpListener;
use mio::{Events, Poll, Token};
use rustls::ClientConfig;
use slab::Slab;

use crate::config::Config;
use crate::dns::resolver::ResolverHandle;
use crate::dns::{DnsAnswer, DnsRequest};
use crate::metrics::Metrics;
use crate::server::conn::{Conn, ConnState, READ_CHUNK, ReadSide, Transport};
use crate::server::conn_id::{ConnId, live_slot};
use crate::server::event_loop::admission::Admission;
use crate::server::event_loop::next_hop::NextHop;
use crate::server::event_loop::session_log::log_session_end;
use crate::server::event_loop::shutdown::Lifecycle;
use crate::server::event_loop::timers::Timers;
use crate::server::listener::ListenerKind;
use crate::server::loop_wake::LoopWake;
use crate::server::relay_link::RelayLink;
use crate::server::tls::TlsAcceptor;
use crate::server::worker::{Job, OwnedEvent, WorkerPool, WorkerReport, run_job};
use crate::session::Output;
use crate::session::SessionSettings;
use crate::spool::writer::SpoolDone;
use crate::spool::writer::SpoolWriters;

mod admission;
mod dispatch;
mod next_hop;
mod sender_lookups;
mod session_log;
mod shutdown;
pub(crate) mod startup;
mod timers;

pub(super) const WAKER: Token = Token(0);
pub(super) const SIGNALS: Token = Token(1);
pub(super) const FIRST_LISTENER: usize = 2;
/// Connection tokens start here; listeners sit below.
pub(super) const FIRST_CONN: usize = 1024;
/// Next-hop link tokens start here (relay modes); client connections sit below.
pub(super) const FIRST_RELAY: usize = 1 << 30;
/// Input above this goes to a worker: one job on the loop stays in the microseconds.
const LOOP_JOB_INPUT: usize = READ_CHUNK;
/// Jobs in a row for one connection on the loop; a client that keeps sending while its work
/// runs then continues at a worker, and the loop turns to the others.
const LOOP_JOB_ROUNDS: usize = 4;
/// Emptied job outputs kept for reuse: as many as jobs that come back in one busy round.
const SPARE_OUTPUTS: usize = 64;
/// A kept output's reply buffer at most (a long reply is rare; its buffer is not kept).
const SPARE_OUTPUT_BYTES: usize = 4096;

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

/// Options that differ between the binary and an embedded server.
#[derive(Clone, Copy, Debug)]
pub struct ServerOptions {
    /// Handle SIGTERM, SIGINT and SIGHUP. Only the binary should: signal handlers are
    /// process-wide, and an embedded server's owner decides when it stops.
    pub handle_signals: bool,
}

/// Where accepted mail goes.
pub enum Handoff {
    Maildir(SpoolWriters),
    /// Before-queue relay to the next hop (HELOGUARD_DELIVER smtp:// or lmtp://), with the
    /// TLS configuration every link's STARTTLS shares (built once, not per link).
    Relay {
        next_hop: NextHop,
        tls: Arc<ClientConfig>,
    },
}

/// The server: listeners, connections, timers and the threads that serve them.
pub struct Server {
    pub(super) poll: Poll,
    pub(super) config: Arc<Config>,
    pub(super) listeners: Vec<(TcpListener, ListenerKind)>,
    pub(super) conns: Slab<Conn>,
    /// Bumped for every connection, so a reused slot gets a new `ConnId`.
    pub(super) generation: u32,
    pub(super) sessions_started: u64,
    /// Distinguishes this run's session ids from an earlier run's.
    pub(super) run_id: u64,
    pub(super) admission: Admission,
    pub(super) timers: Timers,
    pub(super) lifecycle: Lifecycle,
    /// How workers, spool writers and the resolver wake us; rearmed before every drain.
    pub(super) wake: Arc<LoopWake>,
    pub(super) workers: Option<WorkerPool>,
    pub(super) done_rx: Receiver<WorkerReport>,
    pub(super) resolver: Option<ResolverHandle>,
    pub(super) dns_rx: Receiver<DnsAnswer>,
    pub(super) handoff: Option<Handoff>,
    pub(super) spool_rx: Receiver<SpoolDone>,
    /// The state thread, when a check needs the store (greylisting, helo_churn).
    pub(super) state: Option<crate::state::StateHandle>,
    pub(super) state_rx: Receiver<crate::state::StateAnswer>,
    pub(super) tls: Option<Arc<TlsAcceptor>>,
    pub(super) metrics: Arc<Metrics>,
    pub(super) signals: Option<signal_hook_mio::v1_0::Signals>,
    /// The spool's filesystem is below HELOGUARD_MIN_FREE_MB; every session is told when
    /// this changes (`Event::SpoolSpace`), and a new one at its start while it holds.
    pub(super) spool_space_low: bool,
    /// What every session reads of the configuration, built once.
    pub(super) session_settings: Arc<SessionSettings>,
    /// Maildir mode: the spool, where sessions spill message content as it arrives.
    pub(super) spill: Option<Arc<dyn crate::message::content::SpillStore>>,
    pub(super) relays: Slab<RelayLink>,
    pub(super) relay_check_armed: bool,
    /// The next hop was found not to offer XCLIENT, and the log said so (once).
    pub(super) xclient_warned: bool,
    /// Scratch for socket reads, shared by every connection.
    pub(super) read_buf: Box<[u8]>,
    /// The connection whose work `pump` is running on the loop right now.
    pub(super) pumping: Option<usize>,
    /// Emptied outputs of settled jobs, handed to the next jobs (at most `SPARE_OUTPUTS`).
    pub(super) spare_outputs: Vec<Output>,
}

/// What a readiness event allows, with mio's hints folded in (rule 3: they only tell us to
/// try, the read or write itself says what happened).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Readiness {
    pub readable: bool,
    pub writable: bool,
    /// The peer may have closed its side or the socket failed (EPOLLRDHUP, EPOLLERR).
    pub closed_hint: bool,
}

impl Readiness {
    fn of(event: &Event) -> Self {
        let closed_hint = event.is_read_closed() || event.is_error();
        Readiness {
            readable: event.is_readable() || closed_hint,
            writable: event.is_writable() || event.is_write_closed() || event.is_error(),
            closed_hint,
        }
    }
}

impl Server {
    /// Serves until shutdown completes.
    pub fn run(mut self) -> io::Result<()> {
        crate::sched::prefer_short_slices();
        let mut events = Events::with_capacity(1024);
        while !self.turn(&mut events, None)? {}
        self.finish();
        Ok(())
    }

    /// One round: waits for readiness or the next deadline (at most `max_wait`), then handles
    /// what came. Returns whether the server is done.
    pub(super) fn turn(
        &mut self,
        events: &mut Events,
        max_wait: Option<Duration>,
    ) -> io::Result<bool> {
        let now = Instant::now();
        let lifecycle_wait = self
            .lifecycle
            .deadline()
            .map(|at| at.saturating_duration_since(now));
        let timeout = [self.timers.timeout(now), lifecycle_wait, max_wait]
            .into_iter()
            .flatten()
            .min();
        match self.poll.poll(events, timeout) {
            Ok(()) => {}
            // Signals interrupt epoll_wait; that is not a failure.
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
        for event in events.iter() {
            match event.token() {
                // The channels are drained below, after every round.
                WAKER => {}
                SIGNALS => self.handle_signals(),
                Token(t) if (FIRST_LISTENER..FIRST_CONN).contains(&t) => {
                    self.accept(t - FIRST_LISTENER)
                }
                Token(t) if t >= FIRST_RELAY => self.relay_ready(t - FIRST_RELAY),
                Token(t) => self.conn_ready(t - FIRST_CONN, Readiness::of(event)),
            }
        }
        self.drain_channels();
        let now = Instant::now();
        self.fire_timers(now);
        self.advance_lifecycle(now);
        Ok(self.lifecycle.is_over(self.conns.len()))
    }

    /// The slot of connection `id`, unless it has closed since.
    pub(super) fn slot_of(&self, id: ConnId) -> Option<usize> {
        live_slot(&self.conns, id, |c| c.id)
    }

    // ----- connection I/O --------------------------------------------------------------

    fn conn_ready(&mut self, slot: usize, ready: Readiness) {
        let Some(conn) = self.conns.get_mut(slot) else {
            // A spurious event for a slot that was closed.
            return;
        };
        conn.closed_hint |= ready.closed_hint;
        if ready.writable
            && let Err(e) = conn.flush()
        {
            debug!("{}: write failed: {e}", conn.client_ip);
            self.close(slot, "write error");
            return;
        }
        if ready.readable {
            self.read_conn(slot);
        } else {
            // The client took replies: below OUTBUF_CAP again, the session gets its input.
            self.pump(slot);
        }
        self.flush_or_close(slot);
    }

    /// Reads what the client sent and feeds it on: to the PROXY parser, the pregreet check,
    /// or the session.
    pub(super) fn read_conn(&mut self, slot: usize) {
        let Some(conn) = self.conns.get_mut(slot) else {
            return;
        };
        if matches!(conn.state, ConnState::Closing { .. }) {
            // Nothing read now would be used; a closing connection only flushes.
            return;
        }
        if conn.read == ReadSide::Ended {
            // The FIN was read already; another read would only say so again.
            self.on_eof(slot);
            return;
        }
        let was_handshaking = matches!(conn.transport, Transport::Handshaking(_));
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
            conn.unseen_input = true;
        }
        if outcome.tls_established {
            self.metrics.tls_handshake(true);
            if let Transport::Tls(tls) = &conn.transport
                && let Some(info) = tls.info()
            {
                conn.pending.push(OwnedEvent::TlsEstablished(info));
            }
        }
        match conn.state {
            ConnState::AwaitingProxy => self.parse_proxy_header(slot, now),
            ConnState::DelayingGreeting { .. } if outcome.got_data => conn.state.note_early_talk(),
            _ => {}
        }
        if outcome.eof {
            self.on_eof(slot);
            return;
        }
        self.pump(slot);
    }

    fn on_eof(&mut self, slot: usize) {
        let Some(conn) = self.conns.get_mut(slot) else {
            return;
        };
        // Commands that came with the FIN (e.g. `QUIT` then close) still get processed;
        // the connection closes once nothing is left to do.
        if conn.has_work() {
            self.pump(slot);
            return;
        }
        if conn.finished_after_eof() {
            self.close(slot, "client closed");
        }
    }

    /// Runs the session's work when it is here and has something to do: on the loop when the
    /// work is small and stays in memory, at a worker otherwise.
    ///
    /// Most jobs are one command line or a small message, a few microseconds of work; sending
    /// them to a worker and back costs two thread wakes and more CPU than the work itself.
    /// Jobs that could touch the disk (message content past the memory part goes to a spill
    /// file), or that are large, go to a worker, so the loop never waits on the disk or
    /// serves one client for long.
    pub(super) fn pump(&mut self, slot: usize) {
        if self.pumping == Some(slot) {
            // Re-entered from `settle` (a re-read, an EOF): the loop below sees the new work.
            return;
        }
        let outer = self.pumping.replace(slot);
        let mut ran_here = false;
        for round in 0..=LOOP_JOB_ROUNDS {
            let Some(job) = self.take_job(slot) else {
                break;
            };
            let small =
                job.input.len() <= LOOP_JOB_INPUT && job.session.stays_in_memory(job.input.len());
            if round == LOOP_JOB_ROUNDS || !small {
                if let Some(w) = &self.workers {
                    w.submit(job);
                }
                break;
            }
            ran_here = true;
            let known = self.resolver.as_ref().map(|r| &**r.known_answers());
            match run_job(job, &self.metrics, known) {
                WorkerReport::Finished(done) => {
                    if self.settle(done).is_none() {
                        break;
                    }
                }
                WorkerReport::Panicked { conn_id, message } => {
                    self.on_worker_panic(conn_id, &message);
                    break;
                }
            }
        }
        self.pumping = outer;
        // A connection closed meanwhile is gone from its slot, and this does nothing.
        if ran_here {
            self.flush_or_close(slot);
        }
    }

    /// Keeps a settled job's output for a later job, emptied: a job's replies, actions and
    /// observations then go into buffers that already exist.
    pub(super) fn keep_spare(&mut self, mut output: Output) {
        if self.spare_outputs.len() < SPARE_OUTPUTS && output.bytes.capacity() <= SPARE_OUTPUT_BYTES
        {
            output.clear();
            self.spare_outputs.push(output);
        }
    }

    /// The session with its queued events and input, when it is here and has work.
    fn take_job(&mut self, slot: usize) -> Option<Job> {
        let conn = self.conns.get_mut(slot)?;
        if !conn.has_work() {
            return None;
        }
        let session = conn.state.send_to_worker()?;
        conn.unseen_input = false;
        Some(Job {
            conn_id: conn.id,
            session,
            events: std::mem::take(&mut conn.pending),
            input: std::mem::take(&mut conn.inbuf),
            output: self.spare_outputs.pop().unwrap_or_default(),
        })
    }

    /// Writes what is queued; a closing connection closes once all of it is out.
    pub(super) fn flush_or_close(&mut self, slot: usize) {
        let Some(conn) = self.conns.get_mut(slot) else {
            return;
        };
        if let Err(e) = conn.flush() {
            debug!("{}: write failed: {e}", conn.client_ip);
            self.close(slot, "write error");
            return;
        }
        if matches!(conn.state, ConnState::Closing { .. }) && conn.outbuf.is_empty() {
            self.close(slot, "closed");
        }
    }

    /// Closes a connection at once, whatever it was doing.
    pub(super) fn close(&mut self, slot: usize, why: &str) {
        if !self.conns.contains(slot) {
            return;
        }
        // Dropping the socket closes its descriptor, the only one for that socket, and the
        // kernel takes a closed descriptor out of the epoll set itself (epoll(7), Q6): a
        // `deregister` first would be one more syscall per connection for nothing.
        let mut conn = self.conns.remove(slot);
        // However it ends (bad bytes, silence, the client leaving, shutdown), a handshake that
        // never completed is a failed one, counted once here.
        if matches!(conn.transport, Transport::Handshaking(_)) {
            self.metrics.tls_handshake(false);
        }
        if let Some(r) = conn.relay.take() {
            self.close_relay(r, true);
        }
        if let Some(key) = conn.counted_as {
            self.admission.release(key);
        }
        // Lookups only this connection waited for are dropped or stopped.
        if conn.dns_work.asked_resolver
            && let Some(r) = &self.resolver
        {
            r.submit(DnsRequest::Forget { id: conn.id.raw() });
        }
        self.metrics.session_closed();
        log_session_end(&conn, why);
    }
}

#[cfg(test)]
pub mod tests {
    use super::*;

    use std::io::{Read, Write};
    use std::net::SocketAddr;
    use std::path::PathBuf;

    use crate::server::conn::{INBUF_CAP, OUTBUF_CAP};
    use crate::server::event_loop::startup::tests::test_config;
    use crate::server::listener::{self, BoundListener};

    /// How long a test waits for something the loop should do at once.
    const PATIENCE: Duration = Duration::from_secs(20);

    /// A server on a loopback port, driven one round at a time by the test.
    pub struct TestServer {
        pub server: Server,
        events: Events,
        pub spool: PathBuf,
    }

    impl TestServer {
        pub fn start(extra: &[(&str, &str)]) -> Self {
            static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
            let spool = std::env::temp_dir().join(format!(
                "heloguard-loop-{}-{}",
                std::process::id(),
                N.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
            ));
            let spool_text = spool.to_string_lossy().into_owned();
            let mut env: Vec<(&str, &str)> = vec![("HELOGUARD_SPOOL", &spool_text)];
            env.extend_from_slice(extra);
            let config = test_config(&env);
            let bound = BoundListener {
                listener: listener::bind("127.0.0.1:0".parse().expect("address")).expect("bind"),
                kind: ListenerKind::Plain,
            };
            let server = Server::new(
                Arc::new(config),
                vec![bound],
                Arc::new(Metrics::new()),
                ServerOptions {
                    handle_signals: false,
                },
            )
            .expect("server");
            TestServer {
                server,
                events: Events::with_capacity(64),
                spool,
            }
        }

        pub fn addr(&self) -> SocketAddr {
            self.server.local_addrs()[0].0
        }

        pub fn turn(&mut self) {
            self.server
                .turn(&mut self.events, Some(Duration::from_millis(10)))
                .expect("poll");
        }

        /// The id of the one open connection.
        pub(crate) fn only_conn_id(&self) -> ConnId {
            let ids: Vec<ConnId> = self.server.conns.iter().map(|(_, c)| c.id).collect();
            assert_eq!(ids.len(), 1, "one connection is open");
            ids[0]
        }

        /// The one open connection.
        pub(crate) fn only_conn(&self) -> &Conn {
            let slot = self.only_conn_id().slot();
            self.server.conns.get(slot).expect("open")
        }

        pub(crate) fn pending_events(&self, id: ConnId) -> usize {
            self.server
                .conns
                .get(id.slot())
                .expect("open")
                .pending
                .len()
        }

        /// Turns the loop until the client has one whole reply line.
        pub fn read_reply(&mut self, client: &mut std::net::TcpStream) -> String {
            client
                .set_read_timeout(Some(Duration::from_millis(5)))
                .expect("timeout");
            let deadline = Instant::now() + PATIENCE;
            let mut line = Vec::new();
            let mut byte = [0u8; 1];
            while !line.ends_with(b"\r\n") {
                assert!(Instant::now() < deadline, "no reply: {line:?}");
                match client.read(&mut byte) {
                    Ok(0) => panic!("closed before a reply: {line:?}"),
                    Ok(_) => line.push(byte[0]),
                    Err(_) => self.turn(),
                }
            }
            String::from_utf8_lossy(&line).into_owned()
        }
    }

    impl Drop for TestServer {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.spool);
        }
    }

    /// Connects a client and turns the loop until the server has accepted it.
    pub fn connect(server: &mut TestServer) -> std::net::TcpStream {
        // Every accepted connection takes a generation, also one that is closed at once.
        let before = server.server.generation;
        let client = std::net::TcpStream::connect(server.addr()).expect("connect");
        let deadline = Instant::now() + PATIENCE;
        while server.server.generation == before {
            assert!(Instant::now() < deadline, "not accepted");
            server.turn();
        }
        client
    }

    const READABLE: Readiness = Readiness {
        readable: true,
        writable: false,
        closed_hint: false,
    };

    /// Sends `bytes` and waits until they are in the server's socket, unseen by the loop.
    fn send_unseen(client: &mut std::net::TcpStream, bytes: &[u8]) {
        client.write_all(bytes).expect("write");
        std::thread::sleep(Duration::from_millis(50));
    }

    /// What the client can read without the loop turning again.
    fn read_now(client: &mut std::net::TcpStream) -> String {
        client
            .set_read_timeout(Some(Duration::from_millis(200)))
            .expect("timeout");
        let mut got = [0u8; 512];
        let n = client.read(&mut got).unwrap_or(0);
        String::from_utf8_lossy(&got[..n]).into_owned()
    }

    /// A readable event for `slot` hands its input to a worker instead of running it here.
    fn assert_read_goes_to_a_worker(server: &mut TestServer, slot: usize) {
        server.server.conn_ready(slot, READABLE);
        let conn = server.server.conns.get(slot).expect("open");
        assert!(
            matches!(conn.state, ConnState::AtWorker),
            "{:?}",
            conn.state
        );
    }

    #[test]
    fn a_fin_queued_behind_a_command_is_read_though_the_read_was_short() {
        let mut server = TestServer::start(&[]);
        let mut client = connect(&mut server);
        assert!(server.read_reply(&mut client).starts_with("220 "));
        // The command and the FIN both wait in the socket before the loop reads: one read
        // returns the command short of the buffer, and only the close hint says to go on.
        client.write_all(b"NOOP\r\n").expect("write");
        client
            .shutdown(std::net::Shutdown::Write)
            .expect("half-close");
        std::thread::sleep(Duration::from_millis(50));
        client
            .set_read_timeout(Some(Duration::from_millis(5)))
            .expect("timeout");
        let deadline = Instant::now() + PATIENCE;
        let mut got = Vec::new();
        let mut chunk = [0u8; 512];
        loop {
            assert!(Instant::now() < deadline, "never closed: {got:?}");
            match client.read(&mut chunk) {
                Ok(0) => break,
                Ok(n) => got.extend_from_slice(&chunk[..n]),
                Err(_) => server.turn(),
            }
        }
        let text = String::from_utf8_lossy(&got);
        assert!(text.starts_with("250 "), "{text}");
        assert!(server.server.conns.is_empty(), "closed after the reply");
    }

    #[test]
    fn only_a_session_that_asked_the_resolver_is_marked_for_forgetting_at_close() {
        // The test resolver (127.0.0.1:9) knows nothing yet, so the PTR lookup is asked.
        let mut server = TestServer::start(&[]);
        let _client = connect(&mut server);
        let conn = server.only_conn();
        assert!(conn.dns_work.asked_resolver);

        // A client whose PTR facts are known never wakes the resolver, nor at its close.
        let facts = crate::dns::answer_cache::Keepable {
            value: crate::dns::ReverseFacts {
                ptr: crate::dns::Lookup::NxDomain,
            },
            until: Some(Instant::now() + Duration::from_secs(60)),
        };
        let (ip, slot) = (conn.client_ip, conn.id.slot());
        let resolver = server.server.resolver.as_ref().expect("resolver");
        resolver
            .known_answers()
            .keep_reverse(ip, &facts, Vec::new());
        server.server.close(slot, "test");
        let _second = connect(&mut server);
        assert!(!server.only_conn().dns_work.asked_resolver);
    }

    #[test]
    fn an_accepted_connection_replies_without_nagle_delay() {
        let mut server = TestServer::start(&[]);
        let _client = connect(&mut server);
        // Set once on the listener, inherited at accept.
        assert!(server.only_conn().socket.nodelay().expect("getsockopt"));
    }

    #[test]
    fn a_command_is_answered_on_the_loop_in_the_same_round() {
        let mut server = TestServer::start(&[]);
        let mut client = connect(&mut server);
        assert!(server.read_reply(&mut client).starts_with("220 "));
        let slot = server.only_conn_id().slot();
        send_unseen(&mut client, b"NOOP\r\n");
        server.server.conn_ready(slot, READABLE);
        // No worker had the session: the reply went out before the loop turned again.
        assert!(read_now(&mut client).starts_with("250 "));
        let conn = server.server.conns.get(slot).expect("open");
        assert!(matches!(conn.state, ConnState::Waiting { .. }));
    }

    #[test]
    fn a_settled_job_leaves_its_output_empty_for_the_next_job_to_write_into() {
        let mut server = TestServer::start(&[]);
        let mut client = connect(&mut server);
        assert!(server.read_reply(&mut client).starts_with("220 "));
        let slot = server.only_conn_id().slot();
        for round in 0..3 {
            send_unseen(&mut client, b"NOOP\r\n");
            server.server.conn_ready(slot, READABLE);
            assert!(read_now(&mut client).starts_with("250 "), "round {round}");
            // One output circulates: taken by the job, kept again when it settled.
            let spare = &server.server.spare_outputs;
            assert_eq!(spare.len(), 1, "round {round}");
            let kept = &spare[0];
            assert!(kept.bytes.is_empty() && kept.bytes.capacity() > 0);
            assert!(kept.actions.is_empty() && kept.observations.is_empty());
            assert_eq!(kept.consumed, 0);
        }
    }

    #[test]
    fn message_content_that_would_spill_goes_to_a_worker() {
        let mut server = TestServer::start(&[]);
        let mut client = connect(&mut server);
        assert!(server.read_reply(&mut client).starts_with("220 "));
        for (line, code) in [
            ("HELO client.example.org\r\n", "250 "),
            ("MAIL FROM:<a@example.org>\r\n", "250 "),
            ("RCPT TO:<b@example.net>\r\n", "250 "),
            ("DATA\r\n", "354 "),
        ] {
            client.write_all(line.as_bytes()).expect("write");
            let reply = server.read_reply(&mut client);
            assert!(reply.starts_with(code), "{line}: {reply}");
        }
        let slot = server.only_conn_id().slot();
        let line = format!("{}\r\n", "x".repeat(998));
        let lines = crate::message::content::MEMORY_PART / line.len() + 2;
        send_unseen(&mut client, line.repeat(lines).as_bytes());
        assert_read_goes_to_a_worker(&mut server, slot);

        // Back from the worker with its content spilled: a small piece goes there too.
        let deadline = Instant::now() + PATIENCE;
        while !server
            .server
            .conns
            .get(slot)
            .is_some_and(|c| matches!(c.state, ConnState::Waiting { .. }) && c.inbuf.is_empty())
        {
            assert!(Instant::now() < deadline, "the worker never gave it back");
            server.turn();
        }
        send_unseen(&mut client, line.as_bytes());
        assert_read_goes_to_a_worker(&mut server, slot);

        client.write_all(b".\r\n").expect("write");
        let reply = server.read_reply(&mut client);
        assert!(reply.starts_with("250 "), "{reply}");
    }

    #[test]
    fn a_writable_only_event_reads_nothing() {
        let mut server = TestServer::start(&[("HELOGUARD_GREET_DELAY_MS", "60000")]);
        let mut client = connect(&mut server);
        let slot = server.only_conn_id().slot();
        client.write_all(b"EHLO early.example\r\n").expect("write");
        // Let the bytes reach the server's socket without the loop seeing them.
        std::thread::sleep(Duration::from_millis(50));
        let writable = Readiness {
            readable: false,
            writable: true,
            closed_hint: false,
        };
        server.server.conn_ready(slot, writable);
        let conn = server.server.conns.get(slot).expect("open");
        assert!(conn.inbuf.is_empty(), "a writable event read the socket");
        assert!(matches!(
            conn.state,
            ConnState::DelayingGreeting {
                pregreeted: false,
                ..
            }
        ));
        server.server.conn_ready(slot, READABLE);
        let conn = server.server.conns.get(slot).expect("open");
        assert_eq!(conn.inbuf, b"EHLO early.example\r\n");
        assert!(matches!(
            conn.state,
            ConnState::DelayingGreeting {
                pregreeted: true,
                ..
            }
        ));
    }

    #[test]
    fn a_client_that_does_not_read_its_replies_stops_being_served_until_it_does() {
        const COMMANDS: usize = 60_000;
        let mut server =
            TestServer::start(&[("HELOGUARD_MAX_JUNK", "0"), ("HELOGUARD_MAX_ERRORS", "0")]);
        // Small socket buffers, so the kernel holds little of what the client does not read.
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
            .expect("socket");
        socket.set_recv_buffer_size(4096).expect("rcvbuf");
        socket.set_send_buffer_size(4096).expect("sndbuf");
        let before = server.server.generation;
        socket.connect(&server.addr().into()).expect("connect");
        let client: std::net::TcpStream = socket.into();
        while server.server.generation == before {
            server.turn();
        }
        let conn = server.only_conn();
        let slot = conn.id.slot();
        let server_side = socket2::SockRef::from(&conn.socket);
        server_side.set_send_buffer_size(4096).expect("sndbuf");
        server_side.set_recv_buffer_size(4096).expect("rcvbuf");

        let mut writer = client.try_clone().expect("clone");
        let sender = std::thread::spawn(move || {
            let noops = b"NOOP\r\n".repeat(COMMANDS);
            // Blocks once the server stops reading; fails only if the server closed.
            writer.write_all(&noops).is_ok()
        });

        // Serve until the replies reach the cap and everything stands still: the session is
        // back in the loop and nothing moves for a while.
        let mut last = (usize::MAX, usize::MAX);
        let mut quiet_rounds = 0;
        let deadline = Instant::now() + PATIENCE;
        while quiet_rounds < 20 {
            server.turn();
            let conn = server.server.conns.get(slot).expect("open");
            let now = (conn.inbuf.len(), conn.outbuf.len());
            assert!(
                Instant::now() < deadline,
                "never stood still: {now:?} {:?}",
                conn.state
            );
            let resting = matches!(conn.state, ConnState::Waiting { .. });
            quiet_rounds = if now == last && resting && now.1 >= OUTBUF_CAP {
                quiet_rounds + 1
            } else {
                0
            };
            last = now;
        }
        let conn = server.server.conns.get(slot).expect("open");
        assert!(
            conn.outbuf.len() >= OUTBUF_CAP,
            "replies pile up to the cap: {}",
            conn.outbuf.len()
        );
        // One job's replies may go past the cap, no more: a job holds at most INBUF_CAP of
        // input, and a NOOP's reply is less than three times its command.
        assert!(conn.outbuf.len() <= OUTBUF_CAP + 3 * INBUF_CAP);
        assert!(matches!(conn.state, ConnState::Waiting { .. }));
        assert!(!conn.inbuf.is_empty(), "input waits, unfed");
        assert!(!sender.is_finished(), "the client is held back");

        // The client catches up: every command gets its reply.
        socket2::SockRef::from(&client)
            .set_recv_buffer_size(256 * 1024)
            .expect("rcvbuf");
        let mut reader = client;
        reader
            .set_read_timeout(Some(Duration::from_millis(1)))
            .expect("timeout");
        let mut replies = 0;
        let mut partial = Vec::new();
        let mut chunk = vec![0u8; 64 * 1024];
        let deadline = Instant::now() + PATIENCE * 3;
        // The banner, then one reply per command.
        while replies < COMMANDS + 1 {
            assert!(Instant::now() < deadline, "{replies} replies of {COMMANDS}");
            match reader.read(&mut chunk) {
                Ok(0) => panic!("closed after {replies} replies"),
                Ok(n) => {
                    partial.extend_from_slice(&chunk[..n]);
                    let whole = partial
                        .iter()
                        .rposition(|&b| b == b'\n')
                        .map_or(0, |i| i + 1);
                    replies += partial[..whole].split(|&b| b == b'\n').count() - 1;
                    partial.drain(..whole);
                }
                Err(_) => {}
            }
            server.turn();
        }
        assert!(sender.join().expect("sender"), "every command was sent");
    }
}
