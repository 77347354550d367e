//! What the loop does with answers from its threads: sessions back from workers (and the
//! actions they ask for), DNS answers, spool results.
//!
//! Every answer carries the `ConnId` it was asked for. One whose connection is gone, or whose
//! slot now holds another connection, is dropped: the client it was for has left.

use std::time::Instant;

use log::{debug, error, warn};

use crate::dns::{DnsAnswer, DnsRequest, Family};
use crate::metrics::RelayFailure;
use crate::protocol::reply::Reply;
use crate::server::conn::{INBUF_CAP, ReadSide, Transport};
use crate::server::conn_id::ConnId;
use crate::server::event_loop::Handoff;
use crate::server::event_loop::Server;
use crate::server::event_loop::next_hop::{next_hop_unavailable, session_event};
use crate::server::event_loop::sender_lookups::sender_event;
use crate::server::event_loop::session_log::log_observations;
use crate::server::event_loop::timers::{ConnTimer, TimerKind};
use crate::server::worker::{Done, OwnedEvent, WorkerReport};
use crate::session::{DeliveryOutcome, SessionAction};
use crate::spool::envelope::trace_fields;
use crate::spool::maildir::SpoolError;
use crate::spool::writer::{SpoolDone, SpoolJob};
use crate::state::{StateAnswer, StateQuery, StateReply};

impl Server {
    /// Handles everything the threads sent. Wakes coalesce, so each drain empties every
    /// channel; the wake is rearmed first so a message sent during the drain wakes us again.
    pub(super) fn drain_channels(&mut self) {
        self.wake.rearm();
        while let Ok(report) = self.done_rx.try_recv() {
            match report {
                WorkerReport::Finished(done) => self.on_done(done),
                WorkerReport::Panicked { conn_id, message } => {
                    self.on_worker_panic(conn_id, &message)
                }
            }
        }
        while let Ok(answer) = self.dns_rx.try_recv() {
            self.on_dns(answer);
        }
        while let Ok(done) = self.spool_rx.try_recv() {
            self.on_spooled(done);
        }
        while let Ok(answer) = self.state_rx.try_recv() {
            self.on_state(answer);
        }
    }

    /// A session is back from a worker with its replies and actions.
    pub(super) fn on_done(&mut self, done: Done) {
        let Some(slot) = self.settle(done) else {
            return;
        };
        self.pump(slot);
        self.flush_or_close(slot);
    }

    /// Takes a session back from its job (at a worker or on the loop): queues its replies,
    /// carries out its actions and reads on if the socket was left unread. Returns its slot,
    /// or `None` when the connection is gone or was closed here.
    pub(super) fn settle(&mut self, done: Done) -> Option<usize> {
        let slot = self.slot_of(done.conn_id)?;
        let now = Instant::now();
        let conn = self.conns.get_mut(slot)?;
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
        let mut output = done.output;
        if let Err(e) = conn.queue_output(&output.bytes) {
            debug!("{}: TLS write failed: {e}", conn.client_ip);
            self.close(slot, "TLS error");
            return None;
        }
        log_observations(conn, &output.observations);
        for action in output.actions.drain(..) {
            self.on_action(slot, action, now);
        }
        self.keep_spare(output);
        let conn = self.conns.get_mut(slot)?;
        if conn.read == ReadSide::Full && conn.inbuf.len() < INBUF_CAP {
            self.read_conn(slot);
        }
        let conn = self.conns.get_mut(slot)?;
        if conn.read == ReadSide::Ended && conn.finished_after_eof() {
            let _ = conn.flush();
            self.close(slot, "client closed");
            return None;
        }
        Some(slot)
    }

    /// A worker panicked on this connection's job: its session is gone, so the connection
    /// ends with 421 4.3.0 and gives back its per-IP slot like any other close.
    pub(super) fn on_worker_panic(&mut self, conn_id: ConnId, message: &str) {
        self.metrics.panicked();
        let Some(slot) = self.slot_of(conn_id) else {
            error!(
                "session {}: worker panicked after the client left: {message}",
                conn_id.raw()
            );
            return;
        };
        if let Some(conn) = self.conns.get(slot) {
            error!(
                "session {} ip={}: worker panicked: {message}",
                conn_id.raw(),
                conn.client_ip
            );
        }
        self.close_for_internal_error(slot);
    }

    /// Ends a connection whose session can no longer be trusted to answer: 421 4.3.0, then
    /// close once it is flushed. Input and events still waiting are dropped with it.
    fn close_for_internal_error(&mut self, slot: usize) {
        let Some(conn) = self.conns.get_mut(slot) else {
            return;
        };
        conn.inbuf.clear();
        conn.pending.clear();
        conn.state.start_closing();
        let mut reply = Vec::new();
        Reply::new(421, "4.3.0", "Internal error, closing connection").write_to(&mut reply);
        self.metrics.reply(421);
        if let Err(e) = conn.queue_output(&reply) {
            debug!("{}: TLS write failed: {e}", conn.client_ip);
            self.close(slot, "internal error");
            return;
        }
        self.flush_or_close(slot);
    }

    /// Carries out one thing a session asked for.
    fn on_action(&mut self, slot: usize, action: SessionAction, now: Instant) {
        let Some(conn) = self.conns.get_mut(slot) else {
            return;
        };
        match action {
            SessionAction::HeloAccepted {
                generation,
                lookup,
                spf,
                rhsbl,
                churn,
            } => {
                let id = conn.id;
                if let Some(name) = churn {
                    let query = StateQuery::churn(conn.client_ip, name);
                    self.ask_state(slot, query);
                }
                let Some(conn) = self.conns.get_mut(slot) else {
                    return;
                };
                // No lookup left: none was needed, or the worker answered it from the
                // resolver's known answers (in no time).
                conn.dns.forward_took = None;
                conn.dns_work.replace_forward();
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
                        conn.dns_work.reserve_forward();
                        conn.dns_work.ask(r, request);
                    }
                }
                let deadline = now + self.config.dns_timeout * 2;
                self.timers.push(
                    deadline,
                    TimerKind::Conn(id, ConnTimer::Verdict(generation)),
                );
                self.ask_sender_lookups(slot, spf, rhsbl, now);
            }
            SessionAction::Greylist(triplet) => self.ask_state(slot, StateQuery::Greylist(triplet)),
            SessionAction::Deliver(envelope) => match &self.handoff {
                Some(Handoff::Maildir(w)) => {
                    conn.spooling = true;
                    // The grace may have ended while this job was at a worker: its 421 waits
                    // for the message's answer (see `end_grace`).
                    if let Some(i) = conn
                        .pending
                        .iter()
                        .position(|e| matches!(e, OwnedEvent::GraceExpired))
                    {
                        conn.pending.remove(i);
                        conn.grace_held = true;
                    }
                    w.submit(SpoolJob {
                        id: conn.id.raw(),
                        envelope,
                    })
                }
                // Relay modes stream the message (RelayData/RelayChunk/RelayEndData).
                Some(Handoff::Relay { .. }) => {
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
                let answers = link.take_answers();
                if let Some(conn) = self.conns.get_mut(slot) {
                    conn.pending.extend(answers.into_iter().map(session_event));
                }
            }
            SessionAction::RelayData { trace, recipients } => {
                match conn.relay.and_then(|r| self.relays.get_mut(r)) {
                    Some(link) => {
                        link.start_data(trace_fields(&trace, &recipients));
                        let answers = link.take_answers();
                        conn.pending.extend(answers.into_iter().map(session_event));
                    }
                    None => conn
                        .pending
                        .push(OwnedEvent::RelayReply(next_hop_unavailable())),
                }
            }
            SessionAction::RelayChunk(bytes) => {
                // Without a link the chunk has nowhere to go; the end of data answers 451.
                if let Some(key) = conn.relay
                    && let Some(link) = self.relays.get_mut(key)
                {
                    link.data_chunk(bytes);
                    self.note_relay_backlog(key);
                }
            }
            SessionAction::RelayEndData { eight_bit } => {
                let mut ended = match conn.relay.and_then(|r| self.relays.get_mut(r)) {
                    Some(link) => link.end_data(eight_bit).map(|()| link.take_answers()),
                    None => Err(next_hop_unavailable()),
                };
                if let Ok(answers) = &mut ended {
                    conn.pending
                        .extend(std::mem::take(answers).into_iter().map(session_event));
                }
                if let Err(reply) = ended {
                    conn.pending
                        .push(OwnedEvent::Delivered(DeliveryOutcome::Failed(reply)));
                    // Refused without the final dot: closing is the only way out of DATA.
                    if let Some(r) = conn.relay.take() {
                        self.metrics.relay_failure(RelayFailure::Aborted);
                        self.close_relay(r, false);
                    }
                }
            }
            SessionAction::RelayReset => {
                if let Some(link) = conn.relay.and_then(|r| self.relays.get_mut(r)) {
                    link.reset();
                }
            }
            SessionAction::RelayAbort => {
                // No final dot: closing the connection is the only way out of DATA.
                if let Some(r) = conn.relay.take() {
                    self.metrics.relay_failure(RelayFailure::Aborted);
                    self.close_relay(r, false);
                }
            }
            SessionAction::RelayRcpt { forward_path } => {
                match conn.relay.and_then(|r| self.relays.get_mut(r)) {
                    Some(link) => {
                        link.rcpt(&forward_path);
                        let answers = link.take_answers();
                        conn.pending.extend(answers.into_iter().map(session_event));
                    }
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

    /// Asks the state thread; without one the answer is unavailable at once (SPEC: the store
    /// fails open).
    fn ask_state(&mut self, slot: usize, query: StateQuery) {
        let Some(conn) = self.conns.get_mut(slot) else {
            return;
        };
        match &self.state {
            Some(state) => state.submit(conn.id.raw(), query),
            None => conn.pending.push(state_event(query.unavailable())),
        }
    }

    /// The state store's answer for a session; a late one for a reused slot is dropped.
    fn on_state(&mut self, answer: StateAnswer) {
        let Some(slot) = self.slot_of(ConnId::from_raw(answer.id)) else {
            return;
        };
        let Some(conn) = self.conns.get_mut(slot) else {
            return;
        };
        conn.pending.push(state_event(answer.reply));
        self.pump(slot);
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
        let queries = answer.queries();
        let event = match answer {
            DnsAnswer::Reverse { facts, .. } => {
                conn.dns_work.queries = conn.dns_work.queries.saturating_add(queries);
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
                    // For an identity the session has replaced: it would only ignore it, and
                    // its cost was charged when it was replaced.
                    return;
                }
                conn.dns_work.settle_forward(queries);
                conn.dns_work.forward_wanted = None;
                conn.dns.forward_took = conn.dns.forward_started.map(|t| now - t);
                OwnedEvent::Forward { name, addrs }
            }
            // Answers for a name the session no longer waits for go too: it ignores them.
            sender => {
                conn.dns_work.queries = conn.dns_work.queries.saturating_add(queries);
                match sender_event(sender) {
                    Some(event) => event,
                    None => return,
                }
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
        conn.spooling = false;
        let grace_held = std::mem::take(&mut conn.grace_held);
        let outcome = match done.result {
            Ok(_) => DeliveryOutcome::Accepted,
            Err(SpoolError::WriterPanicked) => {
                // Whether the file reached new/ is unknown, so neither 250 nor 451 is true:
                // the session ends as after a worker panic. The writer has logged the job.
                error!(
                    "session {} ip={}: spool writer panicked on its message",
                    done.id, conn.client_ip
                );
                self.metrics.panicked();
                self.close_for_internal_error(slot);
                return;
            }
            // SPEC "Memory": a message that would take the spool below HELOGUARD_MIN_FREE_MB.
            Err(e @ SpoolError::InsufficientSpace { .. }) => {
                warn!("{}: {e}", conn.client_ip);
                DeliveryOutcome::Failed(Reply::new(452, "4.3.1", "Insufficient system storage"))
            }
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
        if grace_held {
            // After the message's own reply, never before it.
            conn.pending.push(OwnedEvent::GraceExpired);
            self.lifecycle.extend_flush(Instant::now());
        }
        self.pump(slot);
        self.flush_or_close(slot);
    }
}

fn state_event(reply: StateReply) -> OwnedEvent {
    match reply {
        StateReply::Greylist(outcome) => OwnedEvent::Greylist(outcome),
        StateReply::Churn { name, outcome } => OwnedEvent::Churn { name, outcome },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dns::{Lookup, ReverseFacts};
    use crate::server::event_loop::tests::{TestServer, connect};

    /// Turns the loop until the server has closed the client's connection; what came before
    /// the close is returned.
    fn read_to_eof(server: &mut TestServer, client: &mut std::net::TcpStream) -> String {
        use std::io::Read;
        client
            .set_read_timeout(Some(std::time::Duration::from_millis(5)))
            .expect("timeout");
        let deadline = Instant::now() + std::time::Duration::from_secs(20);
        let mut got = Vec::new();
        let mut chunk = [0u8; 512];
        loop {
            assert!(Instant::now() < deadline, "never closed: {got:?}");
            match client.read(&mut chunk) {
                Ok(0) => return String::from_utf8_lossy(&got).into_owned(),
                Ok(n) => got.extend_from_slice(&chunk[..n]),
                Err(_) => server.turn(),
            }
        }
    }

    /// `count` NOOP lines; past 16 KiB they make a job for a worker, not for the loop.
    fn noops(count: usize) -> Vec<u8> {
        b"NOOP\r\n".repeat(count)
    }

    /// A session whose job panics ends with 421 4.3.0 and gives back its per-IP slot; the
    /// next client is served by the same threads. `padding` NOOP lines ride along with the
    /// panicking line, and with the next client's first command.
    fn a_panic_ends_only_its_session(padding: usize) {
        use crate::server::worker::PANIC_TRIGGER;
        use std::io::Write;
        let mut server = TestServer::start(&[
            ("HELOGUARD_WORKERS", "1"),
            ("HELOGUARD_MAX_CONNECTIONS_PER_IP", "1"),
        ]);
        let mut client = connect(&mut server);
        assert!(server.read_reply(&mut client).starts_with("220 "));
        let mut line = b"NOOP ".to_vec();
        line.extend_from_slice(PANIC_TRIGGER);
        line.extend_from_slice(b"\r\n");
        line.extend_from_slice(&noops(padding));
        client.write_all(&line).expect("write");
        // All of it in the server's socket before the loop reads, so it is one job.
        std::thread::sleep(std::time::Duration::from_millis(50));
        let rest = read_to_eof(&mut server, &mut client);
        assert!(rest.starts_with("421 4.3.0 "), "{rest:?}");
        assert_eq!(rest.lines().count(), 1, "{rest:?}");
        assert!(
            server
                .server
                .metrics
                .render()
                .contains("heloguard_panics_total 1\n")
        );
        assert!(server.server.conns.is_empty());
        assert_eq!(server.server.admission.clients(), 0, "per-IP slot released");

        // Same IP, limit 1, one worker: served as if nothing had happened.
        let mut again = connect(&mut server);
        let banner = server.read_reply(&mut again);
        assert!(banner.starts_with("220 "), "{banner}");
        let mut next = b"NOOP\r\n".to_vec();
        next.extend_from_slice(&noops(padding));
        again.write_all(&next).expect("write");
        let reply = server.read_reply(&mut again);
        assert!(reply.starts_with("250 "), "{reply}");
        assert!(
            server
                .server
                .metrics
                .render()
                .contains("heloguard_panics_total 1\n")
        );
    }

    #[test]
    fn a_panic_on_the_loop_ends_its_session_with_421_and_frees_its_slot() {
        a_panic_ends_only_its_session(0);
    }

    #[test]
    fn a_worker_panic_ends_its_session_with_421_and_frees_its_slot_and_thread() {
        // 4,000 lines are 24,000 octets: above what the loop runs itself.
        a_panic_ends_only_its_session(4_000);
    }

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
