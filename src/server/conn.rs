//! One client connection: its socket, bounded buffers, transport and where its session is.
//!
//! The connection does the socket I/O for its session. Where the session is, and so what the
//! connection may do next, is one [`ConnState`]; what the read side of the socket has shown is
//! one [`ReadSide`], kept apart because a client can half-close while its session is anywhere;
//! whether bytes pass through TLS is one [`Transport`]. Bytes that arrive while the session is
//! at a worker wait in `inbuf`.

use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use mio::net::TcpStream;

use crate::dns::DnsRequest;
use crate::dns::resolver::ResolverHandle;
use crate::net::ClientKey;
use crate::server::conn_id::ConnId;
use crate::server::listener::ListenerKind;
use crate::server::tls::TlsSession;
use crate::server::worker::OwnedEvent;
use crate::session::Session;

/// Plaintext waiting for the session is capped here; past it the socket is not read until
/// the session has consumed some (backpressure). A command line is at most 512 octets and
/// the DATA decoder consumes whatever it gets, so this only holds back floods.
pub(crate) const INBUF_CAP: usize = 64 * 1024;

/// Replies waiting for a client that does not read are capped here; past it the session
/// gets no more input until the client catches up.
pub(crate) const OUTBUF_CAP: usize = 256 * 1024;

/// A PROXY v2 header is at most 16 + 65535 octets; v1 at most 107.
pub(crate) const PROXY_HEADER_CAP: usize = 16 + 65_535;

/// Size of the loop's read scratch buffer: one read takes at most this much.
pub(crate) const READ_CHUNK: usize = 16 * 1024;

/// An emptied output buffer larger than this is given back. Replies are a few hundred octets
/// and fit; a TLS handshake flight (a certificate chain is several KiB) or a burst of
/// replies to a flood does not, and an idle connection should not keep its room.
pub(crate) const OUTBUF_KEEP: usize = 2 * 1024;

/// Where a connection is in its life, and where its session is.
pub(crate) enum ConnState {
    /// PROXY listener: the header has not arrived yet, so the client IP is not known and
    /// there is no session.
    AwaitingProxy,
    /// HELOGUARD_GREET_DELAY_MS is running; bytes arriving now are a pregreet.
    DelayingGreeting {
        session: Box<Session>,
        /// The client talked before the banner.
        pregreeted: bool,
    },
    /// The session is in the loop, waiting for input, an answer, or for the client to read
    /// its replies.
    Waiting { session: Box<Session> },
    /// The session is at a worker; the loop queues what arrives for it meanwhile.
    AtWorker,
    /// Nothing more is read or handed to the session: the connection closes once `outbuf` is
    /// flushed. The session, if there was one, stays for the session-end log line.
    Closing { session: Option<Box<Session>> },
}

impl std::fmt::Debug for ConnState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // A session is large and private; its presence is what tells states apart.
        match self {
            ConnState::AwaitingProxy => f.write_str("AwaitingProxy"),
            ConnState::DelayingGreeting { pregreeted, .. } => f
                .debug_struct("DelayingGreeting")
                .field("pregreeted", pregreeted)
                .finish_non_exhaustive(),
            ConnState::Waiting { .. } => f.write_str("Waiting"),
            ConnState::AtWorker => f.write_str("AtWorker"),
            ConnState::Closing { session } => f
                .debug_struct("Closing")
                .field("with_session", &session.is_some())
                .finish(),
        }
    }
}

impl ConnState {
    /// The session, when it is in the loop.
    pub(crate) fn session(&self) -> Option<&Session> {
        match self {
            ConnState::DelayingGreeting { session, .. } | ConnState::Waiting { session } => {
                Some(session)
            }
            ConnState::Closing { session } => session.as_deref(),
            ConnState::AwaitingProxy | ConnState::AtWorker => None,
        }
    }

    /// The session is running: it is in the loop ready to be fed, or at a worker.
    pub(crate) fn is_serving(&self) -> bool {
        matches!(self, ConnState::Waiting { .. } | ConnState::AtWorker)
    }

    /// Hands the session over for a worker: `Waiting` becomes `AtWorker`.
    pub(crate) fn send_to_worker(&mut self) -> Option<Box<Session>> {
        match std::mem::replace(self, ConnState::AtWorker) {
            ConnState::Waiting { session } => Some(session),
            other => {
                *self = other;
                None
            }
        }
    }

    /// Takes the session back from a worker. A connection that began closing meanwhile keeps
    /// closing, with its session for the log line.
    pub(crate) fn back_from_worker(&mut self, returned: Box<Session>) {
        *self = match std::mem::replace(self, ConnState::AtWorker) {
            ConnState::Closing { .. } => ConnState::Closing {
                session: Some(returned),
            },
            _ => ConnState::Waiting { session: returned },
        };
    }

    /// The greeting delay ended: the session runs. Returns whether the client pregreeted, or
    /// `None` when no greeting delay was running.
    pub(crate) fn end_greeting_delay(&mut self) -> Option<bool> {
        match std::mem::replace(self, ConnState::AtWorker) {
            ConnState::DelayingGreeting {
                session,
                pregreeted,
            } => {
                *self = ConnState::Waiting { session };
                Some(pregreeted)
            }
            other => {
                *self = other;
                None
            }
        }
    }

    /// Marks a pregreet: the client sent bytes during the greeting delay.
    pub(crate) fn note_early_talk(&mut self) {
        if let ConnState::DelayingGreeting { pregreeted, .. } = self {
            *pregreeted = true;
        }
    }

    /// Stops serving; the connection closes once its output is flushed.
    pub(crate) fn start_closing(&mut self) {
        let session = match std::mem::replace(self, ConnState::Closing { session: None }) {
            ConnState::DelayingGreeting { session, .. } | ConnState::Waiting { session } => {
                Some(session)
            }
            ConnState::Closing { session } => session,
            ConnState::AwaitingProxy | ConnState::AtWorker => None,
        };
        *self = ConnState::Closing { session };
    }
}

/// What reading the socket has shown.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ReadSide {
    /// Read until `WouldBlock`; the next readable event brings more.
    Open,
    /// Reading stopped because `inbuf` is full. Readiness is edge-triggered, so no event will
    /// come for the bytes already waiting: the loop reads again once `inbuf` drains.
    Full,
    /// The peer closed its side (or sent TLS close_notify).
    Ended,
}

/// How bytes pass between the socket and the session.
///
/// The TLS state is boxed: a rustls `ServerConnection` is over 1 KiB inline, and every
/// connection, plain ones included, lives in the loop's slab, so inline it would cost each
/// of 10,000 idle plain connections that much for nothing.
#[derive(Debug)]
pub(crate) enum Transport {
    Plain,
    /// STARTTLS was answered; the handshake runs.
    Handshaking(Box<TlsSession>),
    Tls(Box<TlsSession>),
}

impl Transport {
    fn tls_mut(&mut self) -> Option<&mut TlsSession> {
        match self {
            Transport::Plain => None,
            Transport::Handshaking(tls) | Transport::Tls(tls) => Some(tls),
        }
    }

    /// Moves a handshake that has just completed to `Tls`; true when it did.
    fn finish_handshake(&mut self) -> bool {
        match std::mem::replace(self, Transport::Plain) {
            Transport::Handshaking(tls) if !tls.is_handshaking() => {
                *self = Transport::Tls(tls);
                true
            }
            other => {
                *self = other;
                false
            }
        }
    }
}

/// What one round of reading produced.
#[derive(Debug, Default)]
pub(crate) struct ReadOutcome {
    /// New plaintext was appended to `inbuf`.
    pub got_data: bool,
    /// The peer closed its side (or sent TLS close_notify).
    pub eof: bool,
    /// The TLS handshake completed during this read.
    pub tls_established: bool,
}

/// A session's DNS work as the loop sees it.
#[derive(Clone, Debug, Default)]
pub(crate) struct DnsWork {
    /// Queries the resolver reported for this session's answers so far.
    pub queries: u32,
    /// The HELO name whose A/AAAA answer the session still waits for; an answer for another
    /// name is for an identity the session has replaced.
    pub forward_wanted: Option<String>,
    /// What the `forward_wanted` lookup may cost, counted until its answer says what it did.
    pub forward_reserved: u32,
    /// The resolver thread was asked something for this session (`ask`), so at close it is
    /// told to forget it. Most sessions of a repeat client are answered from the known answers
    /// and never wake that thread.
    pub asked_resolver: bool,
}

/// Queries one Forward lookup may make (A, then AAAA).
const FORWARD_QUERIES: u32 = 2;

impl DnsWork {
    /// HELOGUARD_DNS_BUDGET (0 = unlimited) is spent: no more lookups for this session. A
    /// lookup still running counts at what it may cost, so a client sending EHLOs faster than
    /// the answers come cannot run past the budget.
    pub(crate) fn over_budget(&self, budget: u32) -> bool {
        budget != 0 && self.queries.saturating_add(self.forward_reserved) >= budget
    }

    /// A new identity replaces the one whose Forward answer is awaited: that lookup may have
    /// sent its queries already and its answer may never come (the resolver drops it), so it
    /// is charged at what it may cost.
    pub(crate) fn replace_forward(&mut self) {
        self.queries = self.queries.saturating_add(self.forward_reserved);
        self.forward_reserved = 0;
    }

    /// Sends one of this session's lookups to the resolver thread.
    pub(crate) fn ask(&mut self, resolver: &ResolverHandle, request: DnsRequest) {
        self.asked_resolver = true;
        resolver.submit(request);
    }

    /// A Forward lookup goes to the resolver.
    pub(crate) fn reserve_forward(&mut self) {
        self.forward_reserved = FORWARD_QUERIES;
    }

    /// The wanted Forward answer came: its real cost replaces the reservation.
    pub(crate) fn settle_forward(&mut self, queries: u32) {
        self.forward_reserved = 0;
        self.queries = self.queries.saturating_add(queries);
    }
}

/// Time spent waiting for DNS, for the verdict log line.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct DnsTiming {
    pub reverse_started: Option<Instant>,
    pub reverse_took: Option<Duration>,
    pub forward_started: Option<Instant>,
    pub forward_took: Option<Duration>,
}

/// One client connection.
pub(crate) struct Conn {
    pub socket: TcpStream,
    pub id: ConnId,
    pub listener: ListenerKind,
    pub peer: SocketAddr,
    /// The client IP of SPEC "Who the client is": PROXY source or socket peer, canonical.
    pub client_ip: IpAddr,
    /// The client's port, from the same source as `client_ip` (for the `connect` log line).
    pub client_port: u16,
    /// Set once this connection is counted against HELOGUARD_MAX_CONNECTIONS_PER_IP.
    pub counted_as: Option<ClientKey>,
    /// Where the connection is in its life, with the session when it is here.
    pub state: ConnState,
    /// What reading the socket has shown so far.
    pub read: ReadSide,
    /// A readiness event hinted that the peer closed its side or the socket failed. Until
    /// then a short read shows the socket is drained (epoll reports every later arrival as a
    /// new edge), which saves the read that would only say `WouldBlock`; after it, reads go
    /// on until EOF or `WouldBlock`, because a FIN queued behind the data is not read with it.
    pub closed_hint: bool,
    pub transport: Transport,
    /// Events for the session that wait until it is here.
    pub pending: Vec<OwnedEvent>,
    /// Plaintext from the client not yet consumed by the session.
    pub inbuf: Vec<u8>,
    /// New bytes arrived since the session last saw `inbuf`: a session that left an incomplete
    /// line there gains nothing from seeing it again unchanged.
    pub unseen_input: bool,
    /// Bytes for the socket (ciphertext once TLS is on).
    pub outbuf: Vec<u8>,
    /// When the armed idle timer fires; `None` when none is armed.
    pub idle_timer: Option<Instant>,
    pub last_input: Instant,
    pub started: Instant,
    pub dns: DnsTiming,
    /// What DNS work this session caused and still waits for (HELOGUARD_DNS_BUDGET).
    pub dns_work: DnsWork,
    /// Relay modes: the slot of this session's link to the next hop.
    pub relay: Option<usize>,
    /// Relay modes: the next hop lags behind this session's message (its link holds more
    /// than the cap), so the session gets no input until it catches up.
    pub relay_lagging: bool,
    /// A message of this session is with the spool writers; its `SpoolDone` has not come.
    pub spooling: bool,
    /// The shutdown grace ended while `spooling`: the 421 waits until the message's own
    /// reply has gone out, so a stored message is never reported failed.
    pub grace_held: bool,
}

impl Conn {
    pub(crate) fn new(
        socket: TcpStream,
        id: ConnId,
        listener: ListenerKind,
        peer: SocketAddr,
        client_ip: IpAddr,
        now: Instant,
    ) -> Self {
        Self {
            socket,
            id,
            listener,
            peer,
            client_ip,
            client_port: peer.port(),
            counted_as: None,
            state: ConnState::AwaitingProxy,
            read: ReadSide::Open,
            closed_hint: false,
            transport: Transport::Plain,
            pending: Vec::new(),
            inbuf: Vec::new(),
            unseen_input: false,
            outbuf: Vec::new(),
            idle_timer: None,
            last_input: now,
            started: now,
            dns: DnsTiming::default(),
            dns_work: DnsWork::default(),
            relay: None,
            relay_lagging: false,
            spooling: false,
            grace_held: false,
        }
    }

    /// How much `inbuf` may hold in the current state.
    fn inbuf_cap(&self) -> usize {
        match self.state {
            ConnState::AwaitingProxy => PROXY_HEADER_CAP,
            _ => INBUF_CAP,
        }
    }

    /// Reads until the socket is drained (it would block, or a read came back short before any
    /// hint of a close), the input cap is reached, or EOF. mio readiness is edge-triggered:
    /// stopping early otherwise is only allowed with `ReadSide::Full`, so the loop knows to
    /// come back (mio `Poll` docs, "Draining readiness"; epoll(7) on short reads of stream
    /// sockets).
    ///
    /// `chunk` is the loop's scratch buffer: one for all connections, so no read pays for
    /// zeroing a fresh one.
    pub(crate) fn read_available(&mut self, chunk: &mut [u8]) -> io::Result<ReadOutcome> {
        let mut outcome = ReadOutcome::default();
        loop {
            let room = self.inbuf_cap().saturating_sub(self.inbuf.len());
            if room == 0 {
                self.read = ReadSide::Full;
                return Ok(outcome);
            }
            // Never read past the cap: `inbuf` stays within it, not within it plus a chunk.
            let want = room.min(READ_CHUNK).min(chunk.len());
            let n = match self.socket.read(&mut chunk[..want]) {
                Ok(0) => {
                    outcome.eof = true;
                    self.read = ReadSide::Ended;
                    return Ok(outcome);
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.read = ReadSide::Open;
                    return Ok(outcome);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            let drained = n < want && !self.closed_hint;
            let Some(tls) = self.transport.tls_mut() else {
                self.inbuf.extend_from_slice(&chunk[..n]);
                outcome.got_data = true;
                if drained {
                    self.read = ReadSide::Open;
                    return Ok(outcome);
                }
                continue;
            };
            let before = self.inbuf.len();
            let received = tls.receive_ciphertext(&chunk[..n]);
            // Handshake records and alerts must go out even when the input failed.
            tls.take_ciphertext(&mut self.outbuf);
            received.map_err(io::Error::other)?;
            tls.take_plaintext(&mut self.inbuf)
                .map_err(io::Error::other)?;
            tls.take_ciphertext(&mut self.outbuf);
            outcome.got_data |= self.inbuf.len() > before;
            let peer_closed = tls.peer_closed();
            outcome.tls_established |= self.transport.finish_handshake();
            if peer_closed {
                outcome.eof = true;
                self.read = ReadSide::Ended;
                return Ok(outcome);
            }
            if drained {
                self.read = ReadSide::Open;
                return Ok(outcome);
            }
        }
    }

    /// Queues bytes for the client, through TLS when it is on.
    pub(crate) fn queue_output(&mut self, bytes: &[u8]) -> io::Result<()> {
        if bytes.is_empty() {
            return Ok(());
        }
        match self.transport.tls_mut() {
            None => self.outbuf.extend_from_slice(bytes),
            Some(tls) => {
                tls.send_plaintext(bytes).map_err(io::Error::other)?;
                tls.take_ciphertext(&mut self.outbuf);
            }
        }
        Ok(())
    }

    /// Writes until `outbuf` is empty or the socket would block.
    pub(crate) fn flush(&mut self) -> io::Result<()> {
        let mut written = 0;
        while written < self.outbuf.len() {
            match self.socket.write(&self.outbuf[written..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => written += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    self.outbuf.clear();
                    return Err(e);
                }
            }
        }
        self.outbuf.drain(..written);
        if self.outbuf.is_empty() && self.outbuf.capacity() > OUTBUF_KEEP {
            self.outbuf = Vec::new();
        }
        Ok(())
    }

    /// Nothing is left to do for a client that has closed its side: no work, and the session
    /// (here, not at a worker) is not waiting for an answer the loop will bring.
    pub(crate) fn finished_after_eof(&self) -> bool {
        !matches!(self.state, ConnState::AtWorker)
            && !self.has_work()
            && !self.state.session().is_some_and(|s| s.awaits_loop())
    }

    /// The session may be handed to a worker: it is here and has something to do. Events
    /// always go; input waits while the client leaves OUTBUF_CAP of replies unread, so a
    /// client that never reads cannot make the session produce without bound.
    pub(crate) fn has_work(&self) -> bool {
        let ConnState::Waiting { session } = &self.state else {
            return false;
        };
        if !self.pending.is_empty() {
            return true;
        }
        self.outbuf.len() < OUTBUF_CAP
            && !self.relay_lagging
            && self.unseen_input
            && !self.inbuf.is_empty()
            && session.wants_input()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::event_loop::startup::tests::test_session;

    #[test]
    fn a_session_goes_to_a_worker_and_comes_back() {
        let mut state = ConnState::Waiting {
            session: test_session(),
        };
        assert!(state.is_serving());
        assert!(state.send_to_worker().is_some());
        assert!(matches!(state, ConnState::AtWorker));
        assert!(state.is_serving());
        assert!(state.session().is_none());
        // Only a waiting session can go: a second hand-over finds nothing.
        assert!(state.send_to_worker().is_none());
        state.back_from_worker(test_session());
        assert!(matches!(state, ConnState::Waiting { .. }));
    }

    #[test]
    fn a_delayed_greeting_remembers_early_talk_and_then_serves() {
        let mut state = ConnState::DelayingGreeting {
            session: test_session(),
            pregreeted: false,
        };
        // Not yet serving: the session gets nothing before the banner.
        assert!(!state.is_serving());
        assert!(state.send_to_worker().is_none());
        state.note_early_talk();
        assert_eq!(state.end_greeting_delay(), Some(true));
        assert!(matches!(state, ConnState::Waiting { .. }));
        assert_eq!(state.end_greeting_delay(), None);
    }

    #[test]
    fn closing_keeps_the_session_for_the_log_and_stops_serving() {
        let mut state = ConnState::Waiting {
            session: test_session(),
        };
        state.start_closing();
        assert!(!state.is_serving());
        assert!(state.session().is_some());
        assert!(state.send_to_worker().is_none());

        // A session that comes back to a closing connection stays there for the log line.
        let mut state = ConnState::AtWorker;
        state.start_closing();
        assert!(state.session().is_none());
        state.back_from_worker(test_session());
        assert!(matches!(state, ConnState::Closing { session: Some(_) }));

        let mut state = ConnState::AwaitingProxy;
        state.start_closing();
        assert!(matches!(state, ConnState::Closing { session: None }));
    }

    #[test]
    fn a_lookup_in_flight_counts_toward_the_budget_and_a_replaced_one_stays_charged() {
        let mut work = DnsWork::default();
        work.reserve_forward();
        assert!(!work.over_budget(3));
        assert!(work.over_budget(2));
        // Its answer came: one query (A found), the reservation is gone.
        work.settle_forward(1);
        assert_eq!(work.queries, 1);
        assert!(!work.over_budget(2));
        // A lookup replaced before its answer is charged at what it may cost.
        work.reserve_forward();
        work.replace_forward();
        assert_eq!(work.queries, 3);
        assert!(!work.over_budget(0));
    }
}
