//! What the loop does with answers from its threads: sessions back from workers (and the
//! actions they ask for), DNS answers, spool results.
//!
//! Every answer carries the `ConnId` it was asked for. One whose connection is gone, or whose
//! slot now holds another connection, is dropped: the client it was for has left.

use std::time::Instant;

use log::{debug, warn};

use crate::dns::{DnsAnswer, DnsRequest, Family};
use crate::metrics::RelayFailure;
use crate::protocol::reply::Reply;
use crate::server::conn::{INBUF_CAP, ReadSide, Transport};
use crate::server::conn_id::ConnId;
use crate::server::event_loop::Handoff;
use crate::server::event_loop::Server;
use crate::server::event_loop::next_hop::next_hop_unavailable;
use crate::server::event_loop::session_log::log_observations;
use crate::server::event_loop::timers::{ConnTimer, TimerKind};
use crate::server::worker::{Done, OwnedEvent};
use crate::session::{DeliveryOutcome, SessionAction};
use crate::spool::envelope::trace_fields;
use crate::spool::writer::{SpoolDone, SpoolJob};

impl Server {
    /// Handles everything the threads sent. Wakes coalesce, so each drain empties every
    /// channel; the wake is rearmed first so a message sent during the drain wakes us again.
    pub(super) fn drain_channels(&mut self) {
        self.wake.rearm();
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

    /// A session is back from a worker with its replies and actions.
    pub(super) fn on_done(&mut self, done: Done) {
        let Some(slot) = self.slot_of(done.conn_id) else {
            return;
        };
        let now = Instant::now();
        let Some(conn) = self.conns.get_mut(slot) else {
            return;
        };
        let mut input = done.input;
        if !conn.inbuf.is_empty() {
            input.extend_from_slice(&conn.inbuf);
        }
        conn.inbuf = input;
        if conn.inbuf.is_empty() && conn.inbuf.capacity() > 4096 {
            // Idle sessions should not hold a DATA-sized buffer.
            conn.inbuf = Vec::new();
        }
        conn.state.back_from_worker(done.session);
        let output = done.output;
        if let Err(e) = conn.queue_output(&output.bytes) {
            debug!("{}: TLS write failed: {e}", conn.client_ip);
            self.close(slot, "TLS error");
            return;
        }
        log_observations(conn, &output.observations);
        for action in output.actions {
            self.on_action(slot, action, now);
        }
        let Some(conn) = self.conns.get_mut(slot) else {
            return;
        };
        if conn.read == ReadSide::Full && conn.inbuf.len() < INBUF_CAP {
            self.read_conn(slot);
        }
        let Some(conn) = self.conns.get_mut(slot) else {
            return;
        };
        if conn.read == ReadSide::Ended && conn.finished_after_eof() {
            let _ = conn.flush();
            self.close(slot, "client closed");
            return;
        }
        self.pump(slot);
        self.flush_or_close(slot);
    }

    /// Carries out one thing a session asked for.
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
                conn.dns_work.forward_wanted.clone_from(&lookup);
                if let Some(name) = lookup {
                    conn.dns.forward_started = Some(now);
                    let request = DnsRequest::Forward {
                        id: id.raw(),
                        name,
                        family: Family::of(conn.client_ip),
                    };
                    if conn.dns_work.over_budget(self.config.dns_budget) {
                        // SPEC HELOGUARD_DNS_BUDGET: past it, what is still undecided is
                        // temperror; the answer comes now instead of at the deadline.
                        if let Some(DnsAnswer::Forward { name, addrs, .. }) = request.unavailable()
                        {
                            conn.dns_work.forward_wanted = None;
                            conn.pending.push(OwnedEvent::Forward { name, addrs });
                        }
                    } else if let Some(r) = &self.resolver {
                        r.submit(request);
                    }
                }
                let deadline = now + self.config.dns_timeout * 2;
                self.timers.push(
                    deadline,
                    TimerKind::Conn(id, ConnTimer::Verdict(generation)),
                );
            }
            SessionAction::Deliver(envelope) => match &self.handoff {
                Some(Handoff::Maildir(w)) => w.submit(SpoolJob {
                    id: conn.id.raw(),
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
                conn.unseen_input = false;
                match self.tls.as_ref().map(|t| t.accept()) {
                    Some(Ok(tls)) => conn.transport = Transport::Handshaking(tls),
                    Some(Err(e)) => {
                        warn!("{}: cannot start TLS: {e}", conn.client_ip);
                        self.metrics.tls_handshake(false);
                        conn.state.start_closing();
                    }
                    None => conn.state.start_closing(),
                }
            }
            SessionAction::Close => conn.state.start_closing(),
        }
    }

    /// A DNS answer for a session; a late one for a reused slot is dropped.
    pub(super) fn on_dns(&mut self, answer: DnsAnswer) {
        let Some(slot) = self.slot_of(ConnId::from_raw(answer.id())) else {
            return;
        };
        let Some(conn) = self.conns.get_mut(slot) else {
            return;
        };
        let now = Instant::now();
        conn.dns_work.queries = conn.dns_work.queries.saturating_add(answer.queries());
        let event = match answer {
            DnsAnswer::Reverse { facts, .. } => {
                conn.dns.reverse_took = conn.dns.reverse_started.map(|t| now - t);
                OwnedEvent::Reverse(facts)
            }
            DnsAnswer::Forward { name, addrs, .. } => {
                let wanted = conn
                    .dns_work
                    .forward_wanted
                    .as_deref()
                    .is_some_and(|w| w.eq_ignore_ascii_case(&name));
                if !wanted {
                    // For an identity the session has replaced: it would only ignore it.
                    return;
                }
                conn.dns_work.forward_wanted = None;
                conn.dns.forward_took = conn.dns.forward_started.map(|t| now - t);
                OwnedEvent::Forward { name, addrs }
            }
        };
        conn.pending.push(event);
        self.pump(slot);
    }

    /// A spool writer finished a message: the session answers the end of data.
    fn on_spooled(&mut self, done: SpoolDone) {
        let Some(slot) = self.slot_of(ConnId::from_raw(done.id)) else {
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dns::{Lookup, ReverseFacts};
    use crate::server::event_loop::tests::{TestServer, connect};

    #[test]
    fn a_late_dns_answer_for_a_reused_slot_is_dropped() {
        let mut server = TestServer::start(&[("HELOGUARD_GREET_DELAY_MS", "60000")]);
        let first = connect(&mut server);
        let first_id = server.only_conn_id();
        server.server.close(first_id.slot(), "test");
        drop(first);
        let _second = connect(&mut server);
        let second_id = server.only_conn_id();
        assert_eq!(second_id.slot(), first_id.slot());
        let pending_before = server.pending_events(second_id);
        let answer = |id: ConnId| DnsAnswer::Reverse {
            id: id.raw(),
            ip: "127.0.0.1".parse().expect("address"),
            facts: ReverseFacts {
                ptr: Lookup::NxDomain,
            },
            queries: 1,
        };
        server.server.on_dns(answer(first_id));
        assert_eq!(server.pending_events(second_id), pending_before);
        // The same answer for the live connection is taken (it waits for the banner).
        server.server.on_dns(answer(second_id));
        assert_eq!(server.pending_events(second_id), pending_before + 1);
    }
}
