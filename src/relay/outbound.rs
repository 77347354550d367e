//! The client's message on its way to the next hop (SPEC "Relay modes", "What an accepted
//! message carries"): the header streams through a `HeaderFilter`, which removes the fields
//! that claim our name and counts Received fields over the whole header however long (more
//! than 100 is a loop, RFC 5321 6.3), holding back at most one field; the body then passes as
//! it comes.
//!
//! Sans-I/O: `push` says what to send, and the session turns that into its actions. A message
//! is dropped at the next hop at most once, and never finished with a dot after that.

use crate::message::header::HeaderFilter;
use crate::relay::EightBit;

/// One message being passed on to the next hop.
#[derive(Debug)]
pub(crate) struct OutboundMessage {
    /// The queue ID of the client's transaction (Received, the 250 reply).
    pub queue_id: String,
    /// Made at the first content, when the hostname is at hand.
    header: Option<HeaderFilter>,
    /// The next hop's transaction was dropped (no final dot); the client hears why at the end
    /// of its data.
    aborted: bool,
    /// More than 100 Received fields.
    looped: bool,
    /// Where the message passed on so far holds octets beyond ASCII.
    eight_bit: EightBit,
}

/// What the next hop gets after a `push`.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Outbound {
    /// Nothing yet (a header still incomplete), or nothing any more (dropped).
    Nothing,
    /// These octets: the header without our forged fields, or body content.
    Send(Vec<u8>),
    /// Drop the transaction without its final dot: the message loops.
    Abort,
}

impl OutboundMessage {
    pub(crate) fn new(queue_id: String) -> Self {
        Self {
            queue_id,
            header: None,
            aborted: false,
            looped: false,
            eight_bit: EightBit::default(),
        }
    }

    /// Takes decoded content (dot-unstuffed, CRLF lines); `last` flushes a message that ends
    /// in its header. `hostname` is HELOGUARD_HOSTNAME, whose fields are removed.
    pub(crate) fn push(&mut self, content: Vec<u8>, last: bool, hostname: &str) -> Outbound {
        if self.aborted {
            return Outbound::Nothing;
        }
        let filter = self
            .header
            .get_or_insert_with(|| HeaderFilter::new(hostname));
        if filter.in_body() && !last {
            // The common case past the header: the content moves on whole, uncopied.
            self.note_eight_bit(&[], &content);
            return if content.is_empty() {
                Outbound::Nothing
            } else {
                Outbound::Send(content)
            };
        }
        let mut kept = Vec::new();
        let body_from = filter.feed(&content, &mut kept);
        if last {
            filter.finish(&mut kept);
        }
        if filter.loop_detected() {
            self.looped = true;
            return if self.abort() {
                Outbound::Abort
            } else {
                Outbound::Nothing
            };
        }
        self.note_eight_bit(&kept, &content[body_from..]);
        if kept.is_empty() && body_from == 0 {
            return if content.is_empty() {
                Outbound::Nothing
            } else {
                Outbound::Send(content)
            };
        }
        kept.extend_from_slice(&content[body_from..]);
        if kept.is_empty() {
            Outbound::Nothing
        } else {
            Outbound::Send(kept)
        }
    }

    /// Where the content passed on so far holds octets beyond ASCII (our trace fields never
    /// do).
    pub(crate) fn eight_bit(&self) -> EightBit {
        self.eight_bit
    }

    fn note_eight_bit(&mut self, header: &[u8], body: &[u8]) {
        if !self.eight_bit.header && !header.is_ascii() {
            self.eight_bit.header = true;
        }
        if !self.eight_bit.body && !body.is_ascii() {
            self.eight_bit.body = true;
        }
    }

    /// Marks the message dropped; true the first time, when the next hop must be told.
    pub(crate) fn abort(&mut self) -> bool {
        !std::mem::replace(&mut self.aborted, true)
    }

    /// More than 100 Received fields were found in the header.
    pub(crate) fn looped(&self) -> bool {
        self.looped
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Everything sent for `pushes`, joined.
    fn sent(m: &mut OutboundMessage, pushes: &[(&[u8], bool)]) -> Vec<u8> {
        let mut all = Vec::new();
        for (content, last) in pushes {
            if let Outbound::Send(bytes) = m.push(content.to_vec(), *last, "mx.test") {
                all.extend_from_slice(&bytes);
            }
        }
        all
    }

    #[test]
    fn the_header_loses_our_fields_as_it_streams() {
        let mut m = OutboundMessage::new("Q1".into());
        let got = sent(
            &mut m,
            &[
                (b"X-HELO-Check: mx.test; pass\r\nSubject: hi\r\n", false),
                (b"\r\nbody\r\n", false),
            ],
        );
        assert_eq!(got, b"Subject: hi\r\n\r\nbody\r\n");
        assert_eq!(
            m.push(b"more\r\n".to_vec(), true, "mx.test"),
            Outbound::Send(b"more\r\n".to_vec())
        );
        assert_eq!(m.push(Vec::new(), true, "mx.test"), Outbound::Nothing);
    }

    #[test]
    fn a_header_past_64_kib_is_still_stripped_and_counted() {
        let mut m = OutboundMessage::new("Q1".into());
        let padding = b"X-Pad: 0123456789012345678901234567890123456789\r\n".repeat(2000);
        let forged = b"Authentication-Results: mx.test; dkim=pass\r\n";
        let got = sent(
            &mut m,
            &[(&padding, false), (forged, false), (b"\r\nbody\r\n", true)],
        );
        assert!(got.len() > 64 * 1024);
        assert!(memchr::memmem::find(&got, b"dkim=pass").is_none());
        assert!(got.ends_with(b"\r\n\r\nbody\r\n"));

        let mut m = OutboundMessage::new("Q2".into());
        let mut head = padding.clone();
        head.extend(b"Received: x\r\n".repeat(101));
        assert_eq!(m.push(head, false, "mx.test"), Outbound::Abort);
        assert!(m.looped());
    }

    #[test]
    fn eight_bit_octets_are_told_apart_in_header_and_body() {
        let cases: &[(&[&[u8]], EightBit)] = &[
            (&[b"Subject: plain\r\n\r\nplain\r\n"], EightBit::default()),
            (
                &["Subject: gr\u{fc}n\r\n\r\nplain\r\n".as_bytes()],
                EightBit {
                    header: true,
                    body: false,
                },
            ),
            (
                &[b"Subject: plain\r\n", b"\r\n", "gr\u{fc}n\r\n".as_bytes()],
                EightBit {
                    header: false,
                    body: true,
                },
            ),
            // A field held back across pushes is judged when it is passed on.
            (
                &[b"Subject: a", "\u{fc}\r\n\r\nx".as_bytes()],
                EightBit {
                    header: true,
                    body: false,
                },
            ),
        ];
        for (pushes, want) in cases {
            let mut m = OutboundMessage::new("Q".into());
            for (i, push) in pushes.iter().enumerate() {
                m.push(push.to_vec(), i + 1 == pushes.len(), "mx.test");
            }
            assert_eq!(m.eight_bit(), *want, "{pushes:?}");
        }
    }

    #[test]
    fn a_loop_aborts_once_and_sends_nothing_after() {
        let mut m = OutboundMessage::new("Q1".into());
        let head = b"Received: x\r\n".repeat(crate::protocol::data::MAX_RECEIVED_FIELDS + 1);
        assert_eq!(m.push(head, true, "mx.test"), Outbound::Abort);
        assert!(m.looped());
        assert!(!m.abort());
        assert_eq!(m.push(b"x".to_vec(), true, "mx.test"), Outbound::Nothing);
    }
}
