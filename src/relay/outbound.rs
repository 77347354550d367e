//! The client's message on its way to the next hop (SPEC "Relay modes", "What an accepted
//! message carries"): the header section is held back until it is complete, because the
//! fields that claim our name are removed from it and its Received fields are counted (more
//! than 100 is a loop, RFC 5321 6.3); the body then passes as it comes.
//!
//! Sans-I/O: `push` says what to send, and the session turns that into its actions. A message
//! is dropped at the next hop at most once, and never finished with a dot after that.

use crate::protocol::data::{MAX_RECEIVED_FIELDS, count_received};
use crate::spool::header::strip_own_fields;

/// The largest header section held back before it is passed on anyway.
const HEAD_LIMIT: usize = 64 * 1024;

/// One message being passed on to the next hop.
#[derive(Debug)]
pub struct OutboundMessage {
    /// The queue ID of the client's transaction (Received, the 250 reply).
    pub queue_id: String,
    /// The header section so far, until it is complete.
    head: Vec<u8>,
    head_sent: bool,
    /// The next hop's transaction was dropped (no final dot); the client hears why at the end
    /// of its data.
    aborted: bool,
    /// More than 100 Received fields.
    looped: bool,
}

/// What the next hop gets after a `push`.
#[derive(Debug, PartialEq, Eq)]
pub enum Outbound {
    /// Nothing yet (a header still incomplete), or nothing any more (dropped).
    Nothing,
    /// These octets: the header without our forged fields, or body content.
    Send(Vec<u8>),
    /// Drop the transaction without its final dot: the message loops.
    Abort,
}

impl OutboundMessage {
    pub fn new(queue_id: String) -> Self {
        Self {
            queue_id,
            head: Vec::new(),
            head_sent: false,
            aborted: false,
            looped: false,
        }
    }

    /// Takes decoded content (dot-unstuffed, CRLF lines); `last` flushes a message that has
    /// no body. `hostname` is HELOGUARD_HOSTNAME, whose fields are removed from the header.
    pub fn push(&mut self, content: Vec<u8>, last: bool, hostname: &str) -> Outbound {
        if self.aborted {
            return Outbound::Nothing;
        }
        if self.head_sent {
            if content.is_empty() {
                return Outbound::Nothing;
            }
            return Outbound::Send(content);
        }
        self.head.extend_from_slice(&content);
        let head = &self.head;
        let complete =
            head.starts_with(b"\r\n") || memchr::memmem::find(head, b"\r\n\r\n").is_some();
        if !(complete || last || head.len() > HEAD_LIMIT) {
            return Outbound::Nothing;
        }
        if count_received(head) > MAX_RECEIVED_FIELDS {
            self.looped = true;
            return if self.abort() {
                Outbound::Abort
            } else {
                Outbound::Nothing
            };
        }
        let head = std::mem::take(&mut self.head);
        self.head_sent = true;
        Outbound::Send(strip_own_fields(&head, hostname).into_owned())
    }

    /// Marks the message dropped; true the first time, when the next hop must be told.
    pub fn abort(&mut self) -> bool {
        !std::mem::replace(&mut self.aborted, true)
    }

    /// More than 100 Received fields were found in the header.
    pub fn looped(&self) -> bool {
        self.looped
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_header_waits_until_complete_then_loses_our_fields() {
        let mut m = OutboundMessage::new("Q1".into());
        let own = b"X-HELO-Check: mx.test; pass\r\nSubject: hi\r\n".to_vec();
        assert_eq!(m.push(own, false, "mx.test"), Outbound::Nothing);
        assert_eq!(
            m.push(b"\r\nbody\r\n".to_vec(), false, "mx.test"),
            Outbound::Send(b"Subject: hi\r\n\r\nbody\r\n".to_vec())
        );
        assert_eq!(
            m.push(b"more\r\n".to_vec(), true, "mx.test"),
            Outbound::Send(b"more\r\n".to_vec())
        );
        assert_eq!(m.push(Vec::new(), true, "mx.test"), Outbound::Nothing);
    }

    #[test]
    fn a_loop_aborts_once_and_sends_nothing_after() {
        let mut m = OutboundMessage::new("Q1".into());
        let head = b"Received: x\r\n".repeat(MAX_RECEIVED_FIELDS + 1);
        assert_eq!(m.push(head, true, "mx.test"), Outbound::Abort);
        assert!(m.looped());
        assert!(!m.abort());
        assert_eq!(m.push(b"x".to_vec(), true, "mx.test"), Outbound::Nothing);
    }
}
