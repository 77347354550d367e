//! The relay part of the session (HELOGUARD_DELIVER `smtp://`, `lmtp://`, `lmtp:unix:`): the
//! before-queue proxy, transaction by transaction (SPEC "Relay modes").
//!
//! The core in `machine` speaks plain SMTP and hands over at a few points when the session
//! relays (`Session::relaying`): MAIL (`relay_on_mail`), an accepted RCPT
//! (`relay_accept_rcpt`), DATA or the first BDAT (`relay_content_start`), each piece of
//! content (`relay_forward`), the end of the message (`end_of_relayed_message`), a dropped
//! transaction (`relay_drop`), what waits on a verdict (`resume_relay`) and the next hop's
//! replies (`on_relay_reply`). Everything parked for the next hop is a `RelayPark` (in
//! `state`, with the other things a session remembers).
//!
//! The client gets 250 only after the next hop's 250. A message refused on the way (bare LF
//! under `reject`, an overlong line, SIZE, a loop) drops the next hop's transaction without its
//! final dot (`SessionAction::RelayAbort`).

use std::time::SystemTime;

use crate::dns::Lookup;
use crate::helo::checks::HeloArg;
use crate::protocol::command::{MailParams, Verb};
use crate::protocol::data::{DataDecoder, DataRefusal, Framing};
use crate::protocol::reply::Reply;
use crate::relay::outbound::{Outbound, OutboundMessage};
use crate::relay::{XclientAttrs, XclientName};
use crate::session::limits::DataRate;
use crate::session::machine::{Session, Subject};
use crate::session::state::{BdatChunk, InputMode, Park, RelayPark, Transaction, content_decoder};
use crate::session::{
    AcceptedMessage, DeliveryMode, Now, Observation, Output, SessionAction, Stage,
};

impl Session {
    /// Messages go to a next hop, not into the spool.
    pub(super) fn relaying(&self) -> bool {
        self.params.settings.delivery != DeliveryMode::Maildir
    }

    /// MAIL passed the core's checks: the client gets the next hop's answer to it.
    pub(super) fn relay_on_mail(
        &mut self,
        reverse_path: String,
        params: MailParams,
        out: &mut Output,
    ) {
        if self.reverse_settled() {
            self.relay_mail(reverse_path, params, out);
        } else {
            // The first MAIL opens the next-hop link, whose XCLIENT NAME is the PTR name: an
            // EHLO answered before the reverse lookup (policy `tag`) must not make it
            // [TEMPUNAVAIL].
            self.park = Some(Park::Relay(RelayPark::MailReverse {
                reverse_path,
                params,
            }));
        }
    }

    /// RCPT passed the core's checks and the policy: the client gets the next hop's answer.
    pub(super) fn relay_accept_rcpt(&mut self, recipient: String, out: &mut Output) {
        let has_recipient = self.tx.as_ref().is_some_and(|tx| !tx.recipients.is_empty());
        // LMTP answers once per recipient after the data (RFC 2033 4.2), while the SMTP client
        // expects one reply: one recipient per transaction keeps the two in step. RFC 5321
        // 4.5.3.1.10: clients retry the others in a new one.
        if self.params.settings.delivery == DeliveryMode::LmtpRelay && has_recipient {
            let reply = Reply::new(
                452,
                "4.5.3",
                "One recipient per transaction, send the rest later",
            );
            self.refuse_recipient_over_limit(out, &recipient, reply);
            return;
        }
        out.actions.push(SessionAction::RelayRcpt {
            forward_path: recipient.clone(),
        });
        self.park = Some(Park::Relay(RelayPark::Rcpt { recipient }));
    }

    /// DATA (`chunk` None) or the first BDAT: the 354 is the next hop's to give, so it is
    /// asked first, after the verdict, which the trace fields carry.
    pub(super) fn relay_content_start(
        &mut self,
        chunk: Option<BdatChunk>,
        received_at: SystemTime,
        out: &mut Output,
    ) {
        self.park = Some(Park::Relay(RelayPark::DataVerdict { chunk, received_at }));
        self.resume(out);
    }

    /// Ends the next hop's side of a transaction that the client dropped (RSET, EHLO,
    /// STARTTLS): never finished with a dot. Before any content, an RSET there ends it, so
    /// that a client idling after RSET holds no next-hop transaction (and, after
    /// HELOGUARD_RELAY_IDLE_SECS, no connection).
    pub(super) fn relay_drop(&mut self, out: &mut Output) {
        let relaying = self.relaying();
        let Some(tx) = self.tx.as_mut() else {
            return;
        };
        match tx.relay.as_mut() {
            Some(message) => abort_relay(message, out),
            None if relaying => out.actions.push(SessionAction::RelayReset),
            None => {}
        }
    }

    /// Answers what waits on the verdict or the reverse facts, if they are there.
    pub(super) fn resume_relay(&mut self, park: RelayPark, out: &mut Output) {
        match park {
            RelayPark::DataVerdict { chunk, received_at } => {
                if self.current_decision().is_some() {
                    self.start_relay_data(chunk, received_at, out);
                } else {
                    self.park = Some(Park::Relay(RelayPark::DataVerdict { chunk, received_at }));
                }
            }
            RelayPark::MailReverse {
                reverse_path,
                params,
            } => {
                if self.reverse_settled() {
                    self.relay_mail(reverse_path, params, out);
                } else {
                    self.park = Some(Park::Relay(RelayPark::MailReverse {
                        reverse_path,
                        params,
                    }));
                }
            }
            other => self.park = Some(Park::Relay(other)),
        }
    }

    /// Relaying: DATA (or the first BDAT) has its verdict; ask the next hop for DATA.
    fn start_relay_data(
        &mut self,
        chunk: Option<BdatChunk>,
        received_at: SystemTime,
        out: &mut Output,
    ) {
        let Some(tx) = self.tx.take() else {
            self.reply(out, Reply::new(503, "5.5.1", "Need MAIL command"));
            return;
        };
        let Some(trace) = self.trace_info(&tx, received_at) else {
            self.reply(out, Reply::new(451, "4.3.0", "Local error in processing"));
            return;
        };
        let queue_id = trace.queue_id.clone();
        out.actions.push(SessionAction::RelayData {
            trace: Box::new(trace),
            recipients: tx.recipients.clone(),
        });
        self.tx = Some(tx);
        self.park = Some(Park::Relay(RelayPark::DataStart { chunk, queue_id }));
    }

    /// The next hop answered DATA: on 354 the client's message streams through.
    fn on_relay_data_start(
        &mut self,
        reply: Reply,
        chunk: Option<BdatChunk>,
        queue_id: String,
        now: Now,
        out: &mut Output,
    ) {
        let limits = self.data_limits();
        if reply.code != 354 {
            out.observations
                .push(Observation::MessageRejected(Stage::Data));
            let tx = self.tx.take();
            if let Some(c) = chunk {
                // RFC 3030 3: the chunk's octets follow whatever the answer.
                self.input_mode = InputMode::SkipChunk { remaining: c.size };
            }
            let (from, to) = tx.as_ref().map_or(("", &[][..]), |tx| {
                (tx.reverse_path.as_str(), &tx.recipients[..])
            });
            self.refuse(out, Stage::Data, Subject::Message { from, to }, reply);
            return;
        }
        let Some(tx) = self.tx.as_mut() else {
            return;
        };
        tx.relay = Some(OutboundMessage::new(queue_id));
        self.rate = Some(DataRate::start(now.mono));
        match chunk {
            None => {
                self.input_mode = InputMode::Data(
                    DataDecoder::new(Framing::Dot, limits)
                        .streaming()
                        .crlf_only(),
                );
                self.reply(
                    out,
                    Reply::new(354, "2.0.0", "End data with <CR><LF>.<CR><LF>"),
                );
            }
            Some(BdatChunk { size, last }) => {
                tx.chunks = Some(
                    DataDecoder::new(Framing::Chunked, limits)
                        .streaming()
                        .crlf_only(),
                );
                self.input_mode = InputMode::Chunk {
                    size,
                    remaining: size,
                    last,
                };
            }
        }
    }

    /// Relaying: passes on what the decoder has so far (the header once it is complete), or
    /// drops the next hop's transaction as soon as the message is refused.
    pub(super) fn relay_forward(&mut self, out: &mut Output) {
        let Some(tx) = self.tx.as_mut() else {
            return;
        };
        let Some(message) = tx.relay.as_mut() else {
            return;
        };
        let Some(decoder) = content_decoder(&mut self.input_mode, &mut tx.chunks) else {
            return;
        };
        if decoder.is_refused() {
            abort_relay(message, out);
            return;
        }
        let content = decoder.take_content();
        push_relay_content(message, content, false, &self.params.settings.hostname, out);
    }

    /// Before-queue relay: the client's MAIL gets the next hop's answer.
    fn relay_mail(&mut self, reverse_path: String, params: MailParams, out: &mut Output) {
        out.actions.push(SessionAction::RelayMail {
            reverse_path: reverse_path.clone(),
            params,
            xclient: self.xclient_attrs(),
        });
        self.park = Some(Park::Relay(RelayPark::Mail {
            reverse_path,
            smtputf8: params.smtputf8,
        }));
    }

    /// The reverse DNS facts are in, or the verdict deadline of the current identity passed
    /// without them (XCLIENT then says [TEMPUNAVAIL]).
    fn reverse_settled(&self) -> bool {
        self.reverse.is_some() || self.current.as_ref().is_some_and(|id| id.deadline_passed)
    }

    /// What XCLIENT tells the next hop about the client (Postfix XCLIENT_README).
    fn xclient_attrs(&self) -> XclientAttrs {
        let ip = self.params.client_ip;
        let name = match self.reverse.as_ref() {
            None => XclientName::TempUnavailable,
            Some(facts) => match facts.confirmed_name(ip) {
                Some(name) => XclientName::Name(name.to_string()),
                // Postfix turns [TEMPUNAVAIL] into a 4xx, never a 5xx: use it while
                // the PTR side is undecided.
                None if matches!(facts.ptr, Lookup::TempError(_)) => XclientName::TempUnavailable,
                None => XclientName::Unavailable,
            },
        };
        let current = self.current.as_ref();
        // SPEC: the EHLO after XCLIENT carries the client's HELO name when it passed the
        // syntax check, else the client's address literal.
        let greeting_name = match current {
            Some(id) if id.parsed != HeloArg::Invalid => id.arg.clone(),
            _ => XclientAttrs::address_literal(ip),
        };
        XclientAttrs {
            addr: ip,
            port: None,
            name,
            helo: current.map(|id| id.arg.clone()),
            proto: match current.map(|id| id.verb) {
                Some(Verb::Ehlo) => "ESMTP",
                _ => "SMTP",
            },
            greeting_name,
        }
    }

    /// The next hop answered the replayed MAIL or RCPT.
    pub(super) fn on_relay_reply(&mut self, reply: Reply, now: Now, out: &mut Output) {
        let accepted = (200..300).contains(&reply.code);
        match self.park.take() {
            Some(Park::Relay(RelayPark::Mail {
                reverse_path,
                smtputf8,
            })) => {
                if accepted {
                    let mut tx = Transaction::new(&reverse_path, smtputf8);
                    tx.octets_before = self.bytes;
                    self.tx = Some(tx);
                    self.reply(out, Reply::new(250, "2.1.0", "Ok"));
                } else {
                    out.observations
                        .push(Observation::MessageRejected(Stage::Mail));
                    self.refuse(out, Stage::Mail, Subject::Mail(&reverse_path), reply);
                }
            }
            Some(Park::Relay(RelayPark::Rcpt { recipient })) => {
                match (accepted, self.tx.as_mut()) {
                    (true, Some(tx)) => {
                        tx.recipients.push(recipient);
                        self.reply(out, Reply::new(250, "2.1.5", "Ok"));
                    }
                    _ => {
                        out.observations
                            .push(Observation::MessageRejected(Stage::Rcpt));
                        self.refuse(out, Stage::Rcpt, Subject::Rcpt(&recipient), reply);
                    }
                }
            }
            Some(Park::Relay(RelayPark::DataStart { chunk, queue_id })) => {
                self.on_relay_data_start(reply, chunk, queue_id, now, out)
            }
            other => self.park = other,
        }
    }

    /// Relaying: the client's message is complete; the final dot goes to the next hop only
    /// if nothing refused the message on the way.
    pub(super) fn end_of_relayed_message(
        &mut self,
        message: &mut OutboundMessage,
        result: Result<Vec<u8>, DataRefusal>,
        out: &mut Output,
    ) {
        let refusal = match result {
            Ok(rest) => {
                push_relay_content(message, rest, true, &self.params.settings.hostname, out);
                message.looped().then_some(DataRefusal::Loop)
            }
            Err(refusal) => Some(refusal),
        };
        let Some(tx) = self.tx.take() else {
            return;
        };
        if let Some(refusal) = refusal {
            abort_relay(message, out);
            out.observations
                .push(Observation::MessageRejected(Stage::Data));
            let subject = Subject::Message {
                from: &tx.reverse_path,
                to: &tx.recipients,
            };
            self.refuse(out, Stage::Data, subject, refusal.reply());
            return;
        }
        out.actions.push(SessionAction::RelayEndData {
            eight_bit: message.eight_bit(),
        });
        self.park = Some(Park::Delivery(Box::new(AcceptedMessage {
            id: std::mem::take(&mut message.queue_id),
            size: self.bytes.saturating_sub(tx.octets_before),
            proto: self.protocol(tx.smtputf8),
            from: tx.reverse_path,
            to: tx.recipients,
            relay: None,
        })));
    }
}

/// Passes decoded content on to the next hop (see `OutboundMessage::push`).
fn push_relay_content(
    message: &mut OutboundMessage,
    content: Vec<u8>,
    last: bool,
    hostname: &str,
    out: &mut Output,
) {
    match message.push(content, last, hostname) {
        Outbound::Nothing => {}
        Outbound::Send(bytes) => out.actions.push(SessionAction::RelayChunk(bytes)),
        Outbound::Abort => out.actions.push(SessionAction::RelayAbort),
    }
}

/// Drops the next hop's transaction without its final dot (once).
fn abort_relay(message: &mut OutboundMessage, out: &mut Output) {
    if message.abort() {
        out.actions.push(SessionAction::RelayAbort);
    }
}
