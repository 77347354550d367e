//! Relay modes: the next hop, and the loop's links to it.
//!
//! SPEC "Relay modes": the link of a session opens at its first MAIL, never at connect or
//! EHLO, serves that one client only (it carries the client's XCLIENT attributes), and a next
//! hop that is down or slow answers the waiting client 451 4.4.1, never 250. The links are
//! sockets of the loop like client connections; [`RelayLink`] does their protocol.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use log::{debug, warn};
use mio::{Interest, Token};

use crate::metrics::RelayFailure;
use crate::protocol::reply::Reply;
use crate::relay::{NextHopProtocol, RelayClientParams, XclientAttrs};
use crate::server::conn_id::ConnId;
use crate::server::event_loop::timers::TimerKind;
use crate::server::event_loop::{FIRST_RELAY, Server};
use crate::server::event_loop::{Handoff, StartError};
use crate::server::relay_link::{LinkAnswer, LinkFailure, NextHopSocket, RelayLink};
use crate::server::worker::OwnedEvent;
use crate::session::DeliveryOutcome;

/// Bytes a link may hold for a next hop that lags before its session stops being fed. One
/// job's content (at most INBUF_CAP) can go past it once.
const RELAY_BACKLOG_CAP: usize = 256 * 1024;
/// How often links to the next hop are checked against their deadlines.
const RELAY_CHECK_EVERY: Duration = Duration::from_secs(1);

/// The next hop of the relay modes, resolved once at startup.
#[derive(Clone, Debug)]
pub enum NextHop {
    Tcp {
        addr: SocketAddr,
        host: String,
        protocol: NextHopProtocol,
    },
    Unix {
        path: PathBuf,
    },
}

impl NextHop {
    /// `host:port` or the socket's path, for the log.
    pub(super) fn describe(&self) -> String {
        match self {
            NextHop::Tcp { addr, host, .. } => format!("{host}:{}", addr.port()),
            NextHop::Unix { path } => path.display().to_string(),
        }
    }

    /// Resolves the next hop's host once, at startup (a blocking lookup is fine there).
    pub fn resolve(host: &str, port: u16, protocol: NextHopProtocol) -> Result<Self, StartError> {
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
}

/// The session's event for a link's answer.
pub(super) fn session_event(answer: LinkAnswer) -> OwnedEvent {
    match answer {
        LinkAnswer::Command(reply) => OwnedEvent::RelayReply(reply),
        LinkAnswer::Delivery(Ok(reply)) => OwnedEvent::Delivered(DeliveryOutcome::Relayed(reply)),
        LinkAnswer::Delivery(Err(reply)) => OwnedEvent::Delivered(DeliveryOutcome::Failed(reply)),
    }
}

/// What a client hears when the next hop cannot take its mail: try again later.
pub(super) fn next_hop_unavailable() -> Reply {
    Reply::new(451, "4.4.1", "Next hop not available, try again later")
}

impl Server {
    /// The session's link to the next hop, connecting one when it has none.
    pub(super) fn relay_link(
        &mut self,
        slot: usize,
        mut xclient: XclientAttrs,
        now: Instant,
    ) -> Option<&mut RelayLink> {
        let Some(Handoff::Relay { next_hop, tls }) = &self.handoff else {
            return None;
        };
        let conn = self.conns.get(slot)?;
        if let Some(r) = conn.relay
            && self.relays.contains(r)
        {
            return self.relays.get_mut(r);
        }
        let owner = conn.id;
        xclient.port = Some(conn.client_port);
        let tls_config = tls.clone();
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
        let mut link = RelayLink::new(socket, owner, params, &tls_host, tls_config, now);
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
            self.timers
                .push(now + RELAY_CHECK_EVERY, TimerKind::RelayCheck);
        }
        self.relays.get_mut(key)
    }

    /// A link's socket is ready: run its I/O and hand the replies to its session.
    pub(super) fn relay_ready(&mut self, key: usize) {
        let now = Instant::now();
        let Some(link) = self.relays.get_mut(key) else {
            return;
        };
        let progress = link.ready(now, &mut self.read_buf);
        let owner = link.owner;
        if progress.xclient_unavailable {
            self.warn_xclient_unavailable();
        }
        self.route_link_answers(owner, progress.answers);
        if let Some(failure) = progress.failed {
            self.fail_relay(key, failure, progress.why.as_deref());
            return;
        }
        self.note_relay_backlog(key);
    }

    /// SPEC "Relay modes": a next hop that does not offer XCLIENT is told of once in the log.
    /// Without XCLIENT it sees every client as our address, so its restrictions and logs are
    /// about us, and any access it grants our address it grants every client.
    fn warn_xclient_unavailable(&mut self) {
        if std::mem::replace(&mut self.xclient_warned, true) {
            return;
        }
        let Some(Handoff::Relay { next_hop, .. }) = &self.handoff else {
            return;
        };
        warn!(
            "next hop {} does not offer XCLIENT to us: it sees every client as our own address; \
             authorize us there (Postfix: smtpd_authorized_xclient_hosts)",
            next_hop.describe()
        );
    }

    /// Holds the link's session back while the next hop lags (SPEC "Memory": the client is
    /// not read meanwhile), and lets it go on once the backlog has drained below the cap.
    pub(super) fn note_relay_backlog(&mut self, key: usize) {
        let Some(link) = self.relays.get(key) else {
            return;
        };
        let lagging = link.backlog() > RELAY_BACKLOG_CAP;
        let owner = link.owner;
        let Some(slot) = self.slot_of(owner) else {
            return;
        };
        let Some(conn) = self.conns.get_mut(slot) else {
            return;
        };
        let caught_up = conn.relay_lagging && !lagging;
        conn.relay_lagging = lagging;
        if caught_up {
            // The session's input waited in `inbuf`; nothing else brings it back.
            self.pump(slot);
        }
    }

    fn route_link_answers(&mut self, owner: ConnId, answers: Vec<LinkAnswer>) {
        if answers.is_empty() {
            return;
        }
        let Some(slot) = self.slot_of(owner) else {
            return;
        };
        let Some(conn) = self.conns.get_mut(slot) else {
            return;
        };
        conn.pending.extend(answers.into_iter().map(session_event));
        self.pump(slot);
        self.flush_or_close(slot);
    }

    /// The link is unusable: everything waiting on it gets 451 4.4.1 and it is closed.
    fn fail_relay(&mut self, key: usize, failure: LinkFailure, why: Option<&str>) {
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
        match why {
            Some(why) => {
                warn!("next hop failed ({failure:?}: {why}); waiting clients get 451 4.4.1")
            }
            None => warn!("next hop failed ({failure:?}); waiting clients get 451 4.4.1"),
        }
        self.close_relay(key, false);
        if let Some(slot) = self.slot_of(owner)
            && let Some(conn) = self.conns.get_mut(slot)
        {
            conn.relay = None;
        }
        self.route_link_answers(owner, answers);
    }

    /// Closes a link; `polite` sends QUIT first (the client left), otherwise the socket just
    /// closes, which is the only way to abort a next-hop DATA without its final dot.
    pub(super) fn close_relay(&mut self, key: usize, polite: bool) {
        if !self.relays.contains(key) {
            return;
        }
        let mut link = self.relays.remove(key);
        // A session held back for this link's backlog must not wait for a link that is gone.
        if let Some(slot) = self.slot_of(link.owner)
            && let Some(conn) = self.conns.get_mut(slot)
            && std::mem::take(&mut conn.relay_lagging)
        {
            self.pump(slot);
        }
        if polite {
            if link.is_waiting() {
                // The client left mid-transaction: the next hop never sees the final dot.
                self.metrics.relay_failure(RelayFailure::Aborted);
            }
            link.quit();
        }
        let _ = self.poll.registry().deregister(&mut link.socket);
    }

    /// Closes a link that carried no transaction for HELOGUARD_RELAY_IDLE_SECS (SPEC "Relay
    /// modes"). Its session keeps going: its next MAIL opens a new link.
    fn close_idle_relay(&mut self, key: usize) {
        let Some(link) = self.relays.get(key) else {
            return;
        };
        let owner = link.owner;
        debug!("next hop link of session {} idle: closing it", owner.raw());
        if let Some(slot) = self.slot_of(owner)
            && let Some(conn) = self.conns.get_mut(slot)
            && conn.relay == Some(key)
        {
            conn.relay = None;
        }
        self.close_relay(key, true);
    }

    /// Fails the links whose next hop is late; re-arms itself while any link is open.
    pub(super) fn check_relays(&mut self, now: Instant) {
        let late: Vec<usize> = self
            .relays
            .iter()
            .filter(|(_, l)| l.is_waiting() && l.deadline <= now)
            .map(|(k, _)| k)
            .collect();
        for key in late {
            self.fail_relay(key, LinkFailure::Timeout, None);
        }
        let idle = self.config.relay_idle;
        let idle_links: Vec<usize> = self
            .relays
            .iter_mut()
            .filter_map(|(k, l)| l.idle_for(idle, now).then_some(k))
            .collect();
        for key in idle_links {
            self.close_idle_relay(key);
        }
        if self.relays.is_empty() {
            self.relay_check_armed = false;
        } else {
            self.timers
                .push(now + RELAY_CHECK_EVERY, TimerKind::RelayCheck);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::{BufRead, BufReader, Read, Write};
    use std::net::TcpListener;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use crate::server::event_loop::tests::{TestServer, connect};

    /// Connections the next hop accepted, and QUITs it was sent.
    #[derive(Default)]
    struct HopCounts {
        connections: AtomicUsize,
        quits: AtomicUsize,
    }

    /// A next hop that accepts every command and message, on as many connections as come.
    fn next_hop() -> (String, Arc<HopCounts>) {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let target = format!("smtp://{}", listener.local_addr().expect("address"));
        let counts = Arc::new(HopCounts::default());
        let seen = Arc::clone(&counts);
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { return };
                seen.connections.fetch_add(1, Ordering::SeqCst);
                let seen = Arc::clone(&seen);
                std::thread::spawn(move || {
                    let mut reader = BufReader::new(stream.try_clone().expect("clone"));
                    let _ = stream.write_all(b"220 hop.test ESMTP\r\n");
                    let mut line = String::new();
                    while reader.read_line(&mut line).map(|n| n > 0).unwrap_or(false) {
                        let verb = line.get(..4).unwrap_or("").to_ascii_uppercase();
                        let reply: &[u8] = match verb.as_str() {
                            "EHLO" => b"250-hop.test\r\n250 8BITMIME\r\n",
                            "DATA" => {
                                let _ = stream.write_all(b"354 go on\r\n");
                                let mut data = Vec::new();
                                let mut byte = [0u8; 1];
                                while !data.ends_with(b"\r\n.\r\n") {
                                    if reader.read(&mut byte).unwrap_or(0) == 0 {
                                        return;
                                    }
                                    data.push(byte[0]);
                                }
                                b"250 2.0.0 queued\r\n"
                            }
                            "QUIT" => {
                                seen.quits.fetch_add(1, Ordering::SeqCst);
                                let _ = stream.write_all(b"221 2.0.0 bye\r\n");
                                return;
                            }
                            _ => b"250 2.0.0 ok\r\n",
                        };
                        let _ = stream.write_all(reply);
                        line.clear();
                    }
                });
            }
        });
        (target, counts)
    }

    fn command(server: &mut TestServer, client: &mut std::net::TcpStream, line: &str) -> String {
        client.write_all(line.as_bytes()).expect("write");
        server.read_reply(client)
    }

    #[test]
    fn an_idle_next_hop_link_closes_and_the_next_mail_opens_a_new_one() {
        let (target, hop) = next_hop();
        let mut server = TestServer::start(&[
            ("HELOGUARD_DELIVER", &target),
            ("HELOGUARD_DOMAINS", "example.net"),
            ("HELOGUARD_RELAY_IDLE_SECS", "1"),
            ("HELOGUARD_DNS_TIMEOUT_MS", "100"),
        ]);
        let mut client = connect(&mut server);
        assert!(server.read_reply(&mut client).starts_with("220 "));
        // SPEC: not at connect, not at EHLO.
        client.write_all(b"EHLO client.example\r\n").expect("write");
        while !server.read_reply(&mut client).starts_with("250 ") {}
        assert!(server.server.relays.is_empty(), "a link before MAIL");

        for (line, code) in [
            ("MAIL FROM:<a@example.org>\r\n", "250 "),
            ("RCPT TO:<b@example.net>\r\n", "250 "),
            ("DATA\r\n", "354 "),
            ("Subject: one\r\n\r\nbody\r\n.\r\n", "250 "),
        ] {
            let reply = command(&mut server, &mut client, line);
            assert!(reply.starts_with(code), "{line:?}: {reply}");
        }
        assert_eq!(server.server.relays.len(), 1);

        // No transaction for HELOGUARD_RELAY_IDLE_SECS: the link goes, the session stays.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !server.server.relays.is_empty() {
            assert!(std::time::Instant::now() < deadline, "the idle link stayed");
            server.turn();
        }
        while hop.quits.load(Ordering::SeqCst) == 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "no QUIT at the next hop"
            );
            server.turn();
        }
        let reply = command(&mut server, &mut client, "NOOP\r\n");
        assert!(reply.starts_with("250 "), "{reply}");

        let reply = command(&mut server, &mut client, "MAIL FROM:<a@example.org>\r\n");
        assert!(reply.starts_with("250 "), "{reply}");
        assert_eq!(server.server.relays.len(), 1);
        assert_eq!(hop.connections.load(Ordering::SeqCst), 2);
    }
}
