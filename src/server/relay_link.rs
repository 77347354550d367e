//! One connection to the next hop in relay modes (HELOGUARD_DELIVER smtp:// or lmtp://),
//! owned by the event loop like a client connection: non-blocking, no thread of its own.
//!
//! The protocol is `crate::relay::client::RelayClient` (sans-I/O); this module does its
//! socket and TLS I/O and remembers which answer belongs to which request, so the loop can
//! hand each reply to the session that asked. A link serves one client session only: it
//! carries that client's XCLIENT attributes and is never reused for another.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::event::Source;
use mio::net::{TcpStream, UnixStream};
use mio::{Interest, Registry, Token};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, ClientConnection, DigitallySignedStruct, SignatureScheme};

use crate::protocol::reply::Reply;
use crate::relay::client::RelayClient;
use crate::relay::{EightBit, RelayClientParams, RelayEvent, RelayOutput};
use crate::server::conn_id::ConnId;
use crate::server::tls::TlsSession;

/// How long the next hop gets to accept the connection and finish the setup (greeting,
/// EHLO, STARTTLS, XCLIENT).
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the next hop gets for each reply (RFC 5321 4.5.3.2 suggests minutes for a
/// queueing MTA; a before-queue proxy holds a client meanwhile, so we wait less).
pub(crate) const REPLY_TIMEOUT: Duration = Duration::from_secs(60);

/// TCP or a Unix socket (`lmtp:unix:/PATH`).
pub(crate) enum NextHopSocket {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl NextHopSocket {
    /// With TCP_NODELAY: the link writes whole commands and message pieces itself, and a
    /// final `.` left waiting for the next hop's delayed ACK (Nagle) costs tens of ms per message.
    pub(crate) fn connect_tcp(addr: SocketAddr) -> io::Result<Self> {
        let stream = TcpStream::connect(addr)?;
        stream.set_nodelay(true)?;
        Ok(NextHopSocket::Tcp(stream))
    }

    pub(crate) fn connect_unix(path: &Path) -> io::Result<Self> {
        UnixStream::connect(path).map(NextHopSocket::Unix)
    }

    /// A non-blocking connect has finished when the socket has a peer; an error here is
    /// the connect's own error (SO_ERROR).
    fn check_connected(&self) -> io::Result<bool> {
        let (err, peer) = match self {
            NextHopSocket::Tcp(s) => (s.take_error()?, s.peer_addr().map(|_| ())),
            NextHopSocket::Unix(s) => (s.take_error()?, s.peer_addr().map(|_| ())),
        };
        if let Some(e) = err {
            return Err(e);
        }
        match peer {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(false),
            Err(e) => Err(e),
        }
    }
}

impl Read for NextHopSocket {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            NextHopSocket::Tcp(s) => s.read(buf),
            NextHopSocket::Unix(s) => s.read(buf),
        }
    }
}

impl Write for NextHopSocket {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            NextHopSocket::Tcp(s) => s.write(buf),
            NextHopSocket::Unix(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Source for NextHopSocket {
    fn register(&mut self, r: &Registry, t: Token, i: Interest) -> io::Result<()> {
        match self {
            NextHopSocket::Tcp(s) => s.register(r, t, i),
            NextHopSocket::Unix(s) => s.register(r, t, i),
        }
    }

    fn reregister(&mut self, r: &Registry, t: Token, i: Interest) -> io::Result<()> {
        match self {
            NextHopSocket::Tcp(s) => s.reregister(r, t, i),
            NextHopSocket::Unix(s) => s.reregister(r, t, i),
        }
    }

    fn deregister(&mut self, r: &Registry) -> io::Result<()> {
        match self {
            NextHopSocket::Tcp(s) => s.deregister(r),
            NextHopSocket::Unix(s) => s.deregister(r),
        }
    }
}

/// What a reply from the next hop answers.
pub(crate) enum Awaiting {
    Mail,
    Rcpt,
    /// DATA; on 354 these trace fields go first, then the client's content as it arrives.
    Data(Vec<u8>),
    /// The final dot.
    EndOfData,
}

/// A reply routed back to the owning session.
pub(crate) enum LinkAnswer {
    /// For `Event::RelayReply` (MAIL, RCPT).
    Command(Reply),
    /// For `Event::Delivered`: accepted (`Ok`, with the next hop's reply for the log) or the
    /// reply to pass on.
    Delivery(Result<Reply, Reply>),
}

/// What happened on the link during one round of I/O.
#[derive(Default)]
pub(crate) struct LinkProgress {
    pub answers: Vec<LinkAnswer>,
    /// The link can no longer be used: the loop closes it.
    pub failed: Option<LinkFailure>,
    /// The next hop did not offer XCLIENT: it will take us for the client.
    pub xclient_unavailable: bool,
    /// What the protocol said about a failure, for the log (e.g. the next hop's refusal of
    /// XCLIENT).
    pub why: Option<String>,
}

/// Why a link failed, for `heloguard_relay_failures_total{reason}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum LinkFailure {
    Connect,
    Timeout,
    Refused,
}

/// The client side of the connection to the next hop.
pub(crate) struct RelayLink {
    pub socket: NextHopSocket,
    /// The client connection this link serves.
    pub owner: ConnId,
    client: RelayClient,
    tls: Option<TlsSession<ClientConnection>>,
    /// The next hops' TLS configuration, built once at startup.
    tls_config: Arc<ClientConfig>,
    /// Server name for the next hop's TLS (SNI); the certificate is not verified.
    tls_name: ServerName<'static>,
    /// Handing bytes to TLS failed: the link is unusable (reported at the next `ready`).
    broken: bool,
    connected: bool,
    /// `tls_established` was reported to the protocol after the handshake.
    tls_announced: bool,
    /// Bytes for the socket before TLS (after it, `tls` keeps what waits).
    outbuf: Vec<u8>,
    inbuf: Vec<u8>,
    awaiting: VecDeque<Awaiting>,
    /// A MAIL was accepted and its transaction has not ended: RSET before the next MAIL.
    transaction_open: bool,
    pub deadline: Instant,
    /// When the link last had a request outstanding or a transaction open; with neither for
    /// HELOGUARD_RELAY_IDLE_SECS it closes, so an idle client holds no next-hop slot.
    last_busy: Instant,
    /// Answers given at once, without the next hop (a command refused here, such as a UTF-8
    /// address for a next hop without SMTPUTF8), for the caller to take (`take_answers`).
    immediate: Vec<LinkAnswer>,
}

impl RelayLink {
    pub(crate) fn new(
        socket: NextHopSocket,
        owner: ConnId,
        params: RelayClientParams,
        tls_host: &str,
        tls_config: Arc<ClientConfig>,
        now: Instant,
    ) -> Self {
        let tls_name = ServerName::try_from(tls_host.to_string())
            .unwrap_or_else(|_| ServerName::try_from("localhost").expect("a valid DNS name"));
        Self {
            socket,
            owner,
            client: RelayClient::new(params),
            tls: None,
            tls_config,
            tls_name,
            broken: false,
            connected: false,
            tls_announced: false,
            outbuf: Vec::new(),
            inbuf: Vec::new(),
            awaiting: VecDeque::new(),
            transaction_open: false,
            deadline: now + CONNECT_TIMEOUT,
            last_busy: now,
            immediate: Vec::new(),
        }
    }

    /// Replays MAIL, resetting a transaction left open before (no final dot for it).
    pub(crate) fn mail(
        &mut self,
        reverse_path: &str,
        params: &crate::protocol::command::MailParams,
    ) {
        let mut out = RelayOutput::default();
        if self.transaction_open {
            self.client.rset(&mut out);
            self.transaction_open = false;
        }
        self.client.mail(reverse_path, params, &mut out);
        self.expect(Awaiting::Mail);
        self.absorb_output(out);
    }

    pub(crate) fn rcpt(&mut self, forward_path: &str) {
        let mut out = RelayOutput::default();
        self.client.rcpt(forward_path, &mut out);
        self.expect(Awaiting::Rcpt);
        self.absorb_output(out);
    }

    /// Sends DATA; `trace` (our Received, Authentication-Results, X-HELO-Check) goes first
    /// once the next hop says 354.
    pub(crate) fn start_data(&mut self, trace: Vec<u8>) {
        let mut out = RelayOutput::default();
        self.client.data(&mut out);
        self.expect(Awaiting::Data(trace));
        self.absorb_output(out);
    }

    /// Message content as the client sends it (the protocol dot-stuffs it).
    pub(crate) fn data_chunk(&mut self, bytes: Vec<u8>) {
        let mut out = RelayOutput::default();
        self.client.data_chunk(bytes, &mut out);
        self.absorb_output(out);
    }

    /// The final dot; its reply is the delivery's answer. A message this next hop cannot
    /// take as it is (`EightBit` without SMTPUTF8 or 8BITMIME) gets no dot: the refusal for
    /// the client comes back, and the caller must close the link.
    pub(crate) fn end_data(&mut self, eight_bit: EightBit) -> Result<(), Reply> {
        let mut out = RelayOutput::default();
        self.client.end_data(eight_bit, &mut out)?;
        self.expect(Awaiting::EndOfData);
        self.absorb_output(out);
        Ok(())
    }

    /// The client dropped its transaction before DATA (RSET, a new EHLO): the next hop's
    /// goes too, at once, so that the link counts as idle from now on and an idle client
    /// holds no next-hop slot.
    pub(crate) fn reset(&mut self) {
        if !self.transaction_open {
            return;
        }
        let mut out = RelayOutput::default();
        self.client.rset(&mut out);
        self.transaction_open = false;
        self.last_busy = Instant::now();
        self.absorb_output(out);
    }

    /// Ends the session with the next hop politely (best effort).
    pub(crate) fn quit(&mut self) {
        let mut out = RelayOutput::default();
        self.client.quit(&mut out);
        self.queue(out.bytes);
        if let Some(tls) = self.tls.as_mut() {
            tls.send_close_notify();
        }
        let _ = self.flush();
    }

    /// Bytes accepted for the next hop and not yet written to its socket (what rustls holds
    /// is bounded by its own limit and not counted). The loop stops feeding the session
    /// while this is high: the client is not read while the next hop lags.
    pub(crate) fn backlog(&self) -> usize {
        self.outbuf.len() + self.tls.as_ref().map_or(0, |t| t.unsent())
    }

    /// Queues what the next reply answers. The reply clock starts when a request is the
    /// only one outstanding on a ready link: time spent idle between transactions is not
    /// the next hop's.
    fn expect(&mut self, awaiting: Awaiting) {
        self.last_busy = Instant::now();
        if self.awaiting.is_empty() && self.client.is_ready() {
            self.deadline = Instant::now() + REPLY_TIMEOUT;
        }
        self.awaiting.push_back(awaiting);
    }

    pub(crate) fn is_waiting(&self) -> bool {
        !self.awaiting.is_empty()
    }

    /// Whether the link has carried no transaction for `idle` at `now`: nothing asked and
    /// unanswered, no MAIL left open (its RSET would be owed), nothing left to write.
    pub(crate) fn idle_for(&mut self, idle: Duration, now: Instant) -> bool {
        if self.is_waiting() || self.transaction_open || self.backlog() > 0 {
            self.last_busy = now;
            return false;
        }
        now.saturating_duration_since(self.last_busy) >= idle
    }

    /// Answers every outstanding request with `reply` (the link is gone).
    pub(crate) fn fail_all(&mut self, reply: &Reply) -> Vec<LinkAnswer> {
        self.awaiting
            .drain(..)
            .map(|a| match a {
                Awaiting::Mail | Awaiting::Rcpt | Awaiting::Data(_) => {
                    LinkAnswer::Command(reply.clone())
                }
                Awaiting::EndOfData => LinkAnswer::Delivery(Err(reply.clone())),
            })
            .collect()
    }

    /// Handles readiness: finishes the connect, writes, reads and runs the protocol.
    /// `chunk` is the loop's read scratch buffer, shared with the client connections.
    pub(crate) fn ready(&mut self, now: Instant, chunk: &mut [u8]) -> LinkProgress {
        let mut progress = LinkProgress::default();
        if self.broken {
            progress.failed = Some(LinkFailure::Refused);
            return progress;
        }
        if !self.connected {
            match self.socket.check_connected() {
                Ok(true) => {
                    self.connected = true;
                    // The greeting and the rest of the setup count as connecting: a next hop
                    // that accepts but never greets is as unavailable as one that refuses.
                    self.deadline = now + CONNECT_TIMEOUT;
                }
                Ok(false) => return progress,
                Err(_) => {
                    progress.failed = Some(LinkFailure::Connect);
                    return progress;
                }
            }
        }
        if self.flush().is_err() {
            progress.failed = Some(LinkFailure::Connect);
            return progress;
        }
        match self.read_available(chunk) {
            Ok(eof) => {
                self.run_protocol(&mut progress, now);
                if eof && progress.failed.is_none() {
                    progress.failed = Some(LinkFailure::Refused);
                }
            }
            Err(_) => progress.failed = Some(LinkFailure::Refused),
        }
        if progress.failed.is_none() && (self.broken || self.flush().is_err()) {
            progress.failed = Some(LinkFailure::Refused);
        }
        progress
    }

    fn read_available(&mut self, chunk: &mut [u8]) -> io::Result<bool> {
        loop {
            let n = match self.socket.read(chunk) {
                Ok(0) => return Ok(true),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            let Some(tls) = self.tls.as_mut() else {
                self.inbuf.extend_from_slice(&chunk[..n]);
                continue;
            };
            if let Err(e) = tls.receive_ciphertext(&chunk[..n]) {
                // Send the alert, if any, once before the link closes.
                let _ = tls.write_tls_to(&mut self.socket);
                return Err(io::Error::other(e));
            }
            tls.take_plaintext(&mut self.inbuf)
                .map_err(io::Error::other)?;
            if tls.peer_closed() {
                return Ok(true);
            }
        }
    }

    fn run_protocol(&mut self, progress: &mut LinkProgress, now: Instant) {
        if let Some(tls) = &self.tls {
            if tls.is_handshaking() {
                return;
            }
            if !self.tls_announced {
                // The handshake just completed: EHLO again (RFC 3207 4.2).
                self.tls_announced = true;
                let mut out = RelayOutput::default();
                self.client.tls_established(&mut out);
                self.absorb_events(out, progress, now);
            }
        }
        let mut out = RelayOutput::default();
        let used = self.client.receive(&self.inbuf, &mut out);
        self.inbuf.drain(..used.min(self.inbuf.len()));
        self.absorb_events(out, progress, now);
    }

    fn absorb_events(&mut self, out: RelayOutput, progress: &mut LinkProgress, now: Instant) {
        let RelayOutput { bytes, events } = out;
        self.queue(bytes);
        for event in events {
            match event {
                RelayEvent::StartTls => self.start_tls(progress),
                RelayEvent::XclientUnavailable => progress.xclient_unavailable = true,
                RelayEvent::Reply(reply) => {
                    self.deadline = now + REPLY_TIMEOUT;
                    // The next hop's reply goes to our client as it is, so it must follow our
                    // rules for replies.
                    self.on_reply(reply.with_enhanced_codes(), progress);
                }
                RelayEvent::Failed(reply) => {
                    progress.answers.extend(self.fail_all(&reply));
                    progress.failed = Some(LinkFailure::Refused);
                    progress.why = Some(reply.lines.join(" "));
                }
            }
        }
    }

    fn on_reply(&mut self, reply: Reply, progress: &mut LinkProgress) {
        let accepted = (200..300).contains(&reply.code);
        match self.awaiting.pop_front() {
            Some(Awaiting::Mail) => {
                self.transaction_open = accepted;
                progress.answers.push(LinkAnswer::Command(reply));
            }
            Some(Awaiting::Rcpt) => progress.answers.push(LinkAnswer::Command(reply)),
            Some(Awaiting::Data(trace)) => {
                if reply.code == 354 {
                    let mut out = RelayOutput::default();
                    self.client.data_chunk(trace, &mut out);
                    self.absorb_output(out);
                }
                progress.answers.push(LinkAnswer::Command(reply));
            }
            Some(Awaiting::EndOfData) => {
                self.transaction_open = false;
                let result = if accepted { Ok(reply) } else { Err(reply) };
                progress.answers.push(LinkAnswer::Delivery(result));
            }
            // A reply nobody asked for (e.g. to RSET): nothing waits on it.
            None => {}
        }
    }

    fn start_tls(&mut self, progress: &mut LinkProgress) {
        let tls = match TlsSession::connect(self.tls_config.clone(), self.tls_name.clone()) {
            Ok(tls) => tls,
            Err(_) => {
                let mut out = RelayOutput::default();
                self.client.tls_failed(&mut out);
                progress.failed = Some(LinkFailure::Refused);
                return;
            }
        };
        // Anything after the 220 in plaintext is not trusted (RFC 3207 4.2).
        self.inbuf.clear();
        // The ClientHello goes out with the next flush.
        self.tls = Some(tls);
    }

    /// What a request produced: bytes for the next hop, and the answers it got at once.
    fn absorb_output(&mut self, out: RelayOutput) {
        let mut progress = LinkProgress::default();
        self.absorb_events(out, &mut progress, Instant::now());
        self.immediate.append(&mut progress.answers);
        if progress.failed.is_some() {
            self.broken = true;
        }
        let _ = self.flush();
    }

    /// The answers the last requests got without the next hop; the caller hands them to the
    /// session as it would the next hop's.
    pub(crate) fn take_answers(&mut self) -> Vec<LinkAnswer> {
        std::mem::take(&mut self.immediate)
    }

    fn queue(&mut self, bytes: Vec<u8>) {
        if bytes.is_empty() {
            return;
        }
        match self.tls.as_mut() {
            // A message piece usually finds the buffer empty: it is taken as it is.
            None if self.outbuf.is_empty() => self.outbuf = bytes,
            None => self.outbuf.extend_from_slice(&bytes),
            // What rustls does not take now waits in the session and counts in `backlog`.
            Some(tls) => {
                if tls.send_plaintext(&bytes).is_err() {
                    self.broken = true;
                }
            }
        }
    }

    /// Writes until the socket would block: plaintext queued before TLS first, then TLS
    /// records (and the plaintext waiting behind them).
    fn flush(&mut self) -> io::Result<()> {
        if !self.connected {
            return Ok(());
        }
        let mut written = 0;
        while written < self.outbuf.len() {
            match self.socket.write(&self.outbuf[written..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => written += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        self.outbuf.drain(..written);
        if !self.outbuf.is_empty() {
            return Ok(());
        }
        match self.tls.as_mut() {
            Some(tls) => tls.write_tls_to(&mut self.socket),
            None => Ok(()),
        }
    }
}

/// TLS to the next hop is opportunistic, as Postfix's `smtp_tls_security_level = may`: it
/// protects against passive listeners on the way; the next hop is usually local and its
/// certificate often self-signed, so the certificate is not verified (the handshake
/// signature still is).
pub(crate) fn opportunistic_tls_config() -> Result<Arc<ClientConfig>, rustls::Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = Arc::new(AnyCertificate(provider.clone()));
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

#[derive(Debug)]
struct AnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
