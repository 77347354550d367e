//! The hand-off of an accepted message (maildir mode): its trace information and queue ID,
//! `SessionAction::Deliver`, and the reply once the loop says how it went. The relay modes
//! hand off through `relay` and share `trace_info`.

use std::time::SystemTime;

use crate::message::{Envelope, MessageContent, Protocol, TraceInfo};
use crate::protocol::command::Verb;
use crate::protocol::reply::Reply;
use crate::session::machine::{Session, Subject};
use crate::session::state::{Park, Transaction};
use crate::session::{AcceptedMessage, DeliveryOutcome, Observation, Output, SessionAction, Stage};

impl Session {
    /// The trace information of a message of `tx`, with a new queue ID; `None` without an
    /// identity and verdict (which the callers wait for).
    pub(super) fn trace_info(
        &mut self,
        tx: &Transaction,
        received_at: SystemTime,
    ) -> Option<TraceInfo> {
        let identity = self.current.as_ref()?;
        let verdict = identity.verdict.clone()?;
        self.handed_off += 1;
        // Unique per process: the session ID, a separator that is no hex digit, the counter.
        let queue_id = format!("{:X}Z{:X}", self.params.session_id, self.handed_off);
        let protocol = self.protocol(tx.smtputf8);
        Some(TraceInfo {
            hostname: self.params.settings.hostname.clone(),
            helo: identity.arg.clone(),
            client_ip: self.params.client_ip,
            verdict,
            tls: self.tls.clone(),
            protocol,
            queue_id,
            received_at,
        })
    }

    /// The Received field's `with` word for a transaction (RFC 3848, RFC 6531).
    pub(super) fn protocol(&self, smtputf8: bool) -> Protocol {
        let verb = self.current.as_ref().map(|id| id.verb);
        match (smtputf8, self.tls.is_some(), verb) {
            (true, true, _) => Protocol::Utf8Smtps,
            (true, false, _) => Protocol::Utf8Smtp,
            (false, true, _) => Protocol::Esmtps,
            (false, false, Some(Verb::Ehlo)) => Protocol::Esmtp,
            (false, false, _) => Protocol::Smtp,
        }
    }

    /// Hands the message off and waits for `Event::Delivered`.
    pub(super) fn deliver(
        &mut self,
        content: MessageContent,
        received_at: SystemTime,
        out: &mut Output,
    ) {
        let Some(tx) = self.tx.take() else {
            self.reply(out, Reply::new(451, "4.3.0", "Local error in processing"));
            return;
        };
        let Some(trace) = self.trace_info(&tx, received_at) else {
            self.reply(out, Reply::new(451, "4.3.0", "Local error in processing"));
            return;
        };
        let accepted = self.accepted_message(&tx, &trace);
        let envelope = Envelope {
            reverse_path: tx.reverse_path,
            recipients: tx.recipients,
            trace,
            content,
        };
        out.actions.push(SessionAction::Deliver(Box::new(envelope)));
        self.park = Some(Park::Delivery(accepted));
    }

    /// What the log will say of the message of `tx` once it is accepted (or refused).
    pub(super) fn accepted_message(
        &self,
        tx: &Transaction,
        trace: &TraceInfo,
    ) -> Box<AcceptedMessage> {
        Box::new(AcceptedMessage {
            id: trace.queue_id.clone(),
            from: tx.reverse_path.clone(),
            to: tx.recipients.clone(),
            size: self.bytes.saturating_sub(tx.octets_before),
            proto: trace.protocol,
            relay: None,
        })
    }

    pub(super) fn on_delivered(&mut self, outcome: DeliveryOutcome, out: &mut Output) {
        let Some(Park::Delivery(mut message)) = self.park.take() else {
            return;
        };
        let relay = match outcome {
            DeliveryOutcome::Accepted => None,
            DeliveryOutcome::Relayed(reply) => Some(reply),
            DeliveryOutcome::Failed(reply) => {
                out.observations
                    .push(Observation::MessageRejected(Stage::Data));
                let subject = Subject::Message {
                    from: &message.from,
                    to: &message.to,
                };
                self.refuse(out, Stage::Data, subject, reply);
                return;
            }
        };
        self.messages += 1;
        // SPEC HELOGUARD_MAX_ERRORS / MAX_JUNK: a sender reusing a connection for
        // many messages starts each one with a clean slate.
        self.counters.restart();
        out.observations.push(Observation::MessageAccepted);
        let queued = format!("Ok: queued as {}", message.id);
        message.relay = relay;
        out.observations.push(Observation::Accepted(message));
        self.reply_line(out, 250, "2.0.0", &queued);
    }
}
