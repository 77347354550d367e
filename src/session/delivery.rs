//! The hand-off of an accepted message (maildir mode): its trace information and queue ID,
//! `SessionAction::Deliver`, and the reply once the loop says how it went. The relay modes
//! hand off through `relay` and share `trace_info`.

use std::time::SystemTime;

use crate::message::{Envelope, MessageContent, Protocol, TraceInfo};
use crate::protocol::command::Verb;
use crate::protocol::reply::Reply;
use crate::session::machine::Session;
use crate::session::state::{Park, Transaction};
use crate::session::{DeliveryOutcome, Observation, Output, SessionAction, Stage};

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
        let tls = self.tls.is_some();
        let protocol = match (tx.smtputf8, tls, identity.verb) {
            (true, true, _) => Protocol::Utf8Smtps,
            (true, false, _) => Protocol::Utf8Smtp,
            (false, true, _) => Protocol::Esmtps,
            (false, false, Verb::Ehlo) => Protocol::Esmtp,
            (false, false, _) => Protocol::Smtp,
        };
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
        let queue_id = trace.queue_id.clone();
        let envelope = Envelope {
            reverse_path: tx.reverse_path,
            recipients: tx.recipients,
            trace,
            content,
        };
        out.actions.push(SessionAction::Deliver(Box::new(envelope)));
        self.park = Some(Park::Delivery { queue_id });
    }

    pub(super) fn on_delivered(&mut self, outcome: DeliveryOutcome, out: &mut Output) {
        let Some(Park::Delivery { queue_id }) = self.park.take() else {
            return;
        };
        match outcome {
            DeliveryOutcome::Accepted => {
                self.messages += 1;
                // SPEC HELOGUARD_MAX_ERRORS / MAX_JUNK: a sender reusing a connection for
                // many messages starts each one with a clean slate.
                self.counters.restart();
                out.observations.push(Observation::MessageAccepted);
                self.reply(
                    out,
                    Reply::new(250, "2.0.0", &format!("Ok: queued as {queue_id}")),
                );
            }
            DeliveryOutcome::Failed(reply) => {
                out.observations
                    .push(Observation::MessageRejected(Stage::Data));
                self.reply(out, reply);
            }
        }
    }
}
