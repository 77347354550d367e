//! Relay modes: the next hop, and the loop's links to it.
//!
//! SPEC "Relay modes": the link of a session opens at its first MAIL, never at connect or
//! EHLO, serves that one client only (it carries the client's XCLIENT attributes), and a next
//! hop that is down or slow answers the waiting client 451 4.4.1, never 250. The links are
//! sockets of the loop like client connections; [`RelayLink`] does their protocol.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use log::warn;
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

/// What a client hears when the next hop cannot take its mail: try again later.
pub fn next_hop_unavailable() -> Reply {
    Reply::new(451, "4.4.1", "Next hop not available, try again later")
}

impl Server {
    /// The session's link to the next hop, connecting one when it has none.
    pub(super) fn relay_link(
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
        let progress = link.ready(now);
        let owner = link.owner;
        self.route_link_answers(owner, progress.answers);
        if let Some(failure) = progress.failed {
            self.fail_relay(key, failure);
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
        for answer in answers {
            conn.pending.push(match answer {
                LinkAnswer::Command(reply) => OwnedEvent::RelayReply(reply),
                LinkAnswer::Delivery(Ok(reply)) => {
                    OwnedEvent::Delivered(DeliveryOutcome::Relayed(reply))
                }
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

    /// Closes a link; `polite` sends QUIT first (the client left), otherwise the socket just
    /// closes, which is the only way to abort a next-hop DATA without its final dot.
    pub(super) fn close_relay(&mut self, key: usize, polite: bool) {
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

    /// Fails the links whose next hop is late; re-arms itself while any link is open.
    pub(super) fn check_relays(&mut self, now: Instant) {
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
            self.timers
                .push(now + RELAY_CHECK_EVERY, TimerKind::RelayCheck);
        }
    }
}
