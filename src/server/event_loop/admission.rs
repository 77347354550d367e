//! Letting clients in: accept, the connection limits, the PROXY header, the greeting delay.
//!
//! SPEC "Limits": a connection over HELOGUARD_MAX_CONNECTIONS or
//! HELOGUARD_MAX_CONNECTIONS_PER_IP gets 421 4.3.2 and is closed; the others are unaffected.
//! The per-client count keys by [`ClientKey`] (an IPv4 address, an IPv6 /64) and starts only
//! once the client IP is known, which on a PROXY listener is after the header.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use log::{debug, warn};
use mio::net::TcpStream;
use mio::{Interest, Token};

use crate::dns::DnsRequest;
use crate::metrics::{Listener as MetricListener, RefuseReason};
use crate::net::{ClientKey, canonical_ip};
use crate::proxy_protocol::{self, ProxyParse};
use crate::server::conn::{Conn, ConnState, ReadSide};
use crate::server::conn_id::ConnId;
use crate::server::event_loop::session_log::log_connect;
use crate::server::event_loop::timers::{ConnTimer, TimerKind};
use crate::server::event_loop::{FIRST_CONN, Server};
use crate::server::listener::ListenerKind;
use crate::server::worker::OwnedEvent;

/// How soon a listener is tried again after accept failed (e.g. out of file descriptors).
const ACCEPT_RETRY: Duration = Duration::from_millis(100);
/// SPEC "PROXY protocol": the header must arrive within 5 seconds of connect.
const PROXY_HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a connection was turned away by a limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// HELOGUARD_MAX_CONNECTIONS sessions are open.
    Total,
    /// HELOGUARD_MAX_CONNECTIONS_PER_IP sessions of this client are open.
    PerClient,
}

/// The connection limits and the per-client counts they are checked against. A limit of 0
/// means unlimited.
#[derive(Debug)]
pub(crate) struct Admission {
    max_total: usize,
    max_per_client: usize,
    per_client: HashMap<ClientKey, usize>,
}

impl Admission {
    pub(crate) fn new(max_total: usize, max_per_client: usize) -> Self {
        Admission {
            max_total,
            max_per_client,
            per_client: HashMap::new(),
        }
    }

    /// Whether one more connection fits beside the `open` ones.
    pub(crate) fn has_room(&self, open: usize) -> Result<(), Refusal> {
        if self.max_total > 0 && open >= self.max_total {
            return Err(Refusal::Total);
        }
        Ok(())
    }

    /// Counts one more session of `ip`'s client, or refuses it. The key returned is what
    /// [`Self::release`] takes when the session ends.
    pub(crate) fn count(&mut self, ip: IpAddr) -> Result<ClientKey, Refusal> {
        let key = ClientKey::of(ip);
        let count = self.per_client.entry(key).or_insert(0);
        if self.max_per_client > 0 && *count >= self.max_per_client {
            return Err(Refusal::PerClient);
        }
        *count += 1;
        Ok(key)
    }

    /// A counted session ended.
    pub(crate) fn release(&mut self, key: ClientKey) {
        let Some(n) = self.per_client.get_mut(&key) else {
            return;
        };
        *n = n.saturating_sub(1);
        if *n == 0 {
            // An entry per client ever seen would grow without bound.
            self.per_client.remove(&key);
        }
    }

    /// Clients with at least one counted session.
    #[cfg(test)]
    pub(crate) fn clients(&self) -> usize {
        self.per_client.len()
    }
}

impl Server {
    /// Accepts until the listener would block.
    pub(super) fn accept(&mut self, index: usize) {
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
                    self.timers.push(at, TimerKind::AcceptRetry { index });
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
        if self.admission.has_room(self.conns.len()).is_err() {
            self.metrics.refused(RefuseReason::MaxConnections);
            refuse_at_once(
                &mut socket,
                "421 4.3.2 Too many connections, try again later\r\n",
            );
            self.metrics.reply(421);
            return;
        }
        let entry = self.conns.vacant_entry();
        let slot = entry.key();
        self.generation = self.generation.wrapping_add(1);
        let id = ConnId::new(slot, self.generation);
        let now = Instant::now();
        // Every connection starts without a session; a plain one gets it right below.
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
                let at = now + PROXY_HEADER_TIMEOUT;
                self.timers
                    .push(at, TimerKind::Conn(id, ConnTimer::ProxyHeader));
            }
        }
    }

    /// The client IP is known: apply the per-client limit, create the session, start the PTR
    /// lookup (its latency hides behind the banner and EHLO) and greet or wait.
    pub(super) fn start_session(&mut self, slot: usize, now: Instant) {
        let Some(client_ip) = self.conns.get(slot).map(|c| c.client_ip) else {
            return;
        };
        let Ok(key) = self.admission.count(client_ip) else {
            self.refuse_per_client(slot);
            return;
        };
        let session = self.new_session(client_ip);
        let wants_dnsbl = session.expects_dnsbl();
        let Some(conn) = self.conns.get_mut(slot) else {
            return;
        };
        log_connect(conn, session.id());
        conn.counted_as = Some(key);
        if self.spool_space_low {
            conn.pending.push(OwnedEvent::SpoolSpace { low: true });
        }

        conn.dns.reverse_started = Some(now);
        let known_reverse = self.resolver.as_ref().and_then(|r| {
            let known = r.known_answers().reverse(client_ip, now);
            if known.is_none() {
                let request = DnsRequest::Reverse {
                    id: conn.id.raw(),
                    ip: client_ip,
                };
                conn.dns_work.ask(r, request);
            }
            known
        });
        let id = conn.id;
        let greet_now = self.config.greet_delay.is_zero();
        if greet_now {
            conn.state = ConnState::Waiting { session };
            conn.pending.push(OwnedEvent::Greet);
        } else {
            conn.state = ConnState::DelayingGreeting {
                session,
                // Anything already here (after a PROXY header) was sent before the banner.
                pregreeted: !conn.inbuf.is_empty(),
            };
        }
        // A known answer rides along with the first job instead of arriving later in a second.
        if let Some(facts) = known_reverse {
            conn.dns.reverse_took = Some(Duration::ZERO);
            conn.pending.push(OwnedEvent::Reverse(facts));
        }
        if !greet_now {
            let at = now + self.config.greet_delay;
            self.timers.push(at, TimerKind::Conn(id, ConnTimer::Greet));
        }
        self.arm_idle(slot, now);
        // After the banner and a known PTR answer, so the session sees them first.
        if wants_dnsbl {
            self.ask_dnsbl(slot, client_ip, now);
        }
        self.pump(slot);
    }

    /// HELOGUARD_MAX_CONNECTIONS_PER_IP is reached: 421, then close.
    fn refuse_per_client(&mut self, slot: usize) {
        let Some(conn) = self.conns.get_mut(slot) else {
            return;
        };
        self.metrics.refused(RefuseReason::PerIp);
        self.metrics.reply(421);
        let _ = conn.queue_output(b"421 4.3.2 Too many connections from your address\r\n");
        conn.state.start_closing();
        self.flush_or_close(slot);
    }

    /// Looks for the PROXY header in what has arrived; the session starts right after it.
    pub(super) fn parse_proxy_header(&mut self, slot: usize, now: Instant) {
        let Some(conn) = self.conns.get_mut(slot) else {
            return;
        };
        match proxy_protocol::parse(&conn.inbuf) {
            ProxyParse::Incomplete => {
                if conn.read != ReadSide::Open {
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
                    conn.client_port = src.port();
                }
                conn.inbuf.drain(..consumed);
                conn.unseen_input = !conn.inbuf.is_empty();
                self.start_session(slot, now);
            }
        }
    }
}

/// Best-effort one-shot reply to a connection we will not serve.
fn refuse_at_once(socket: &mut TcpStream, reply: &str) {
    use std::io::Write;
    let _ = socket.write(reply.as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::event_loop::tests::{TestServer, connect};

    fn ip(text: &str) -> IpAddr {
        text.parse().expect("test address")
    }

    #[test]
    fn the_per_client_limit_counts_an_ipv6_64_as_one_client() {
        let mut admission = Admission::new(0, 2);
        assert!(admission.count(ip("2001:db8:1:2::1")).is_ok());
        assert!(admission.count(ip("2001:db8:1:2:ffff::9")).is_ok());
        assert_eq!(
            admission.count(ip("2001:db8:1:2::77")),
            Err(Refusal::PerClient)
        );
        // The next /64 is another client.
        assert!(admission.count(ip("2001:db8:1:3::1")).is_ok());
        // An IPv4-mapped address counts as the plain IPv4 client.
        assert!(admission.count(ip("192.0.2.1")).is_ok());
        assert!(admission.count(ip("::ffff:192.0.2.1")).is_ok());
        assert_eq!(admission.count(ip("192.0.2.1")), Err(Refusal::PerClient));
        assert!(admission.count(ip("192.0.2.2")).is_ok());
    }

    #[test]
    fn a_released_session_makes_room_and_leaves_no_entry_behind() {
        let mut admission = Admission::new(0, 1);
        let key = admission.count(ip("192.0.2.1")).expect("first");
        assert_eq!(admission.count(ip("192.0.2.1")), Err(Refusal::PerClient));
        admission.release(key);
        assert_eq!(admission.clients(), 0);
        let key = admission.count(ip("192.0.2.1")).expect("room again");
        admission.release(key);
        // Releasing more than was counted does not underflow or resurrect an entry.
        admission.release(key);
        assert_eq!(admission.clients(), 0);
    }

    #[test]
    fn zero_means_unlimited() {
        let mut admission = Admission::new(0, 0);
        for _ in 0..1000 {
            assert!(admission.count(ip("192.0.2.1")).is_ok());
        }
        assert_eq!(admission.has_room(1_000_000), Ok(()));
    }

    #[test]
    fn the_total_limit_counts_every_open_connection() {
        let admission = Admission::new(3, 0);
        assert_eq!(admission.has_room(0), Ok(()));
        assert_eq!(admission.has_room(2), Ok(()));
        assert_eq!(admission.has_room(3), Err(Refusal::Total));
        assert_eq!(admission.has_room(4), Err(Refusal::Total));
    }

    #[test]
    fn a_client_over_its_limit_hears_421_and_the_one_within_it_is_served() {
        let mut server = TestServer::start(&[("HELOGUARD_MAX_CONNECTIONS_PER_IP", "1")]);
        let mut first = connect(&mut server);
        assert!(server.read_reply(&mut first).starts_with("220 "));
        let mut second = connect(&mut server);
        let reply = server.read_reply(&mut second);
        assert_eq!(
            reply,
            "421 4.3.2 Too many connections from your address\r\n"
        );
        assert_eq!(server.server.conns.len(), 1, "the refused one is closed");
        assert_eq!(server.server.admission.clients(), 1);
        use std::io::Write;
        first.write_all(b"QUIT\r\n").expect("write");
        assert!(server.read_reply(&mut first).starts_with("221 "));
    }
}
