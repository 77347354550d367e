//! One client connection: its socket, bounded buffers, TLS state and where its session is.
//!
//! The connection does the socket I/O for its session; the session itself is either here
//! (`session: Some`) or at a worker. Bytes that arrive while it is away wait in `inbuf`.

use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use mio::net::TcpStream;

use crate::net::ClientKey;
use crate::server::listener::ListenerKind;
use crate::server::tls::TlsSession;
use crate::server::worker::OwnedEvent;
use crate::session::Session;

/// Plaintext waiting for the session is capped here; past it the socket is not read until
/// the session has consumed some (backpressure). A command line is at most 512 octets and
/// the DATA decoder consumes whatever it gets, so this only holds back floods.
pub const INBUF_CAP: usize = 64 * 1024;

/// Replies waiting for a client that does not read are capped here; past it the session
/// gets no more input until the client catches up.
pub const OUTBUF_CAP: usize = 256 * 1024;

/// A PROXY v2 header is at most 16 + 65535 octets; v1 at most 107.
pub const PROXY_HEADER_CAP: usize = 16 + 65_535;

/// Size of the loop's read scratch buffer: one read takes at most this much.
pub const READ_CHUNK: usize = 16 * 1024;

/// Where in its life a connection is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// PROXY listener: the header has not arrived yet.
    AwaitProxy,
    /// HELOGUARD_GREET_DELAY_MS is running; bytes arriving now are a pregreet.
    GreetDelay,
    /// The session runs.
    Active,
}

/// What one round of reading produced.
#[derive(Debug, Default)]
pub struct ReadOutcome {
    /// New plaintext was appended to `inbuf`.
    pub got_data: bool,
    /// The peer closed its side (or sent TLS close_notify).
    pub eof: bool,
    /// The TLS handshake completed during this read.
    pub tls_established: bool,
}

/// Time spent waiting for DNS, for the verdict log line.
#[derive(Clone, Copy, Debug, Default)]
pub struct DnsTiming {
    pub reverse_started: Option<Instant>,
    pub reverse_took: Option<Duration>,
    pub forward_started: Option<Instant>,
    pub forward_took: Option<Duration>,
}

/// One client connection.
pub struct Conn {
    pub socket: TcpStream,
    /// Slot and generation, packed: `generation << 32 | slot`. Late answers for a reused slot
    /// carry an old generation and are dropped.
    pub id: u64,
    pub listener: ListenerKind,
    pub peer: SocketAddr,
    /// The client IP of SPEC "Who the client is": PROXY source or socket peer, canonical.
    pub client_ip: IpAddr,
    /// Set once this connection is counted against HELOGUARD_MAX_CONNECTIONS_PER_IP.
    pub counted_as: Option<ClientKey>,
    pub phase: Phase,
    /// The session when it is here; `None` while it is at a worker (or before it starts).
    pub session: Option<Box<Session>>,
    pub at_worker: bool,
    /// Events for the session that wait until it is here.
    pub pending: Vec<OwnedEvent>,
    /// Plaintext from the client not yet consumed by the session.
    pub inbuf: Vec<u8>,
    /// New bytes arrived since the session last saw `inbuf`.
    pub input_dirty: bool,
    /// Bytes for the socket (ciphertext once TLS is on).
    pub outbuf: Vec<u8>,
    pub tls: Option<TlsSession>,
    /// The handshake completed.
    pub tls_up: bool,
    /// The client talked before the banner.
    pub pregreeted: bool,
    /// Close once `outbuf` is flushed.
    pub close_after_flush: bool,
    /// The peer closed its side.
    pub eof: bool,
    /// Reading stopped because `inbuf` is full; resume when it drains.
    pub read_paused: bool,
    pub idle_timer_armed: bool,
    pub last_input: Instant,
    pub started: Instant,
    pub dns: DnsTiming,
    /// Relay modes: the slot of this session's link to the next hop.
    pub relay: Option<usize>,
}

impl Conn {
    pub fn new(
        socket: TcpStream,
        id: u64,
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
            counted_as: None,
            phase: Phase::Active,
            session: None,
            at_worker: false,
            pending: Vec::new(),
            inbuf: Vec::new(),
            input_dirty: false,
            outbuf: Vec::new(),
            tls: None,
            tls_up: false,
            pregreeted: false,
            close_after_flush: false,
            eof: false,
            read_paused: false,
            idle_timer_armed: false,
            last_input: now,
            started: now,
            dns: DnsTiming::default(),
            relay: None,
        }
    }

    /// How much `inbuf` may hold in the current phase.
    fn inbuf_cap(&self) -> usize {
        match self.phase {
            Phase::AwaitProxy => PROXY_HEADER_CAP,
            _ => INBUF_CAP,
        }
    }

    /// Reads until the socket would block, the input cap is reached, or EOF. mio readiness
    /// is edge-triggered: stopping early is only allowed with `read_paused` set, so the loop
    /// knows to come back (mio `Poll` docs, "Draining readiness").
    ///
    /// `chunk` is the loop's scratch buffer: one for all connections, so no read pays for
    /// zeroing a fresh one.
    pub fn read_available(&mut self, chunk: &mut [u8]) -> io::Result<ReadOutcome> {
        let mut outcome = ReadOutcome::default();
        loop {
            let room = self.inbuf_cap().saturating_sub(self.inbuf.len());
            if room == 0 {
                self.read_paused = true;
                return Ok(outcome);
            }
            // Never read past the cap: `inbuf` stays within it, not within it plus a chunk.
            let want = room.min(READ_CHUNK);
            let n = match self.socket.read(&mut chunk[..want]) {
                Ok(0) => {
                    outcome.eof = true;
                    self.eof = true;
                    return Ok(outcome);
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.read_paused = false;
                    return Ok(outcome);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            match self.tls.as_mut() {
                None => {
                    self.inbuf.extend_from_slice(&chunk[..n]);
                    outcome.got_data = true;
                }
                Some(tls) => {
                    let before = self.inbuf.len();
                    let received = tls.receive_ciphertext(&chunk[..n]);
                    // Handshake records and alerts must go out even when the input failed.
                    tls.take_ciphertext(&mut self.outbuf);
                    received.map_err(io::Error::other)?;
                    tls.take_plaintext(&mut self.inbuf)
                        .map_err(io::Error::other)?;
                    tls.take_ciphertext(&mut self.outbuf);
                    outcome.got_data |= self.inbuf.len() > before;
                    if !self.tls_up && !tls.is_handshaking() {
                        self.tls_up = true;
                        outcome.tls_established = true;
                    }
                    if tls.peer_closed() {
                        outcome.eof = true;
                        self.eof = true;
                        return Ok(outcome);
                    }
                }
            }
        }
    }

    /// Queues bytes for the client, through TLS when it is on.
    pub fn queue_output(&mut self, bytes: &[u8]) -> io::Result<()> {
        if bytes.is_empty() {
            return Ok(());
        }
        match self.tls.as_mut() {
            None => self.outbuf.extend_from_slice(bytes),
            Some(tls) => {
                tls.send_plaintext(bytes).map_err(io::Error::other)?;
                tls.take_ciphertext(&mut self.outbuf);
            }
        }
        Ok(())
    }

    /// Writes until `outbuf` is empty or the socket would block.
    pub fn flush(&mut self) -> io::Result<()> {
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
        if self.outbuf.is_empty() && self.outbuf.capacity() > 16 * 1024 {
            // An idle connection should not keep a large buffer from one burst.
            self.outbuf = Vec::new();
        }
        Ok(())
    }

    /// Nothing is left to do for a client that has closed its side: no work, and the session
    /// (here, not at a worker) is not waiting for an answer the loop will bring.
    pub fn finished_after_eof(&self) -> bool {
        !self.at_worker
            && !self.has_work()
            && !self.session.as_ref().is_some_and(|s| s.awaits_loop())
    }

    /// The session may be handed to a worker: it is here and has something to do.
    pub fn has_work(&self) -> bool {
        let Some(session) = &self.session else {
            return false;
        };
        if self.phase != Phase::Active || self.outbuf.len() >= OUTBUF_CAP {
            return !self.pending.is_empty() && self.phase == Phase::Active;
        }
        !self.pending.is_empty()
            || (self.input_dirty && !self.inbuf.is_empty() && session.wants_input())
    }
}
