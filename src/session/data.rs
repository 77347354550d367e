//! The message content of a transaction: DATA and BDAT, the content passed through the header
//! filter and the spill as it is decoded, the data rate, and the end of the message.

use crate::message::content::{ContentBuilder, ContentError};
use crate::protocol::data::{DataDecoder, DataLimits, DataRefusal, Framing};
use crate::protocol::reply::Reply;
use crate::session::limits::DataRate;
use crate::session::machine::{Session, Subject};
use crate::session::state::{BdatChunk, InputMode, Park, content_decoder};
use crate::session::{Now, Observation, Output, Stage};

impl Session {
    /// Moves what the decoder has so far on: to the next hop (relay modes) or into the
    /// message's content, which spills past a small part in memory (maildir mode).
    pub(super) fn pass_content(&mut self, out: &mut Output) {
        if self.relaying() {
            self.relay_forward(out);
            return;
        }
        let Some(tx) = self.tx.as_mut() else {
            return;
        };
        let Some(decoder) = content_decoder(&mut self.input_mode, &mut tx.chunks) else {
            return;
        };
        if decoder.is_refused() {
            // Refused at its end whatever follows: its spill goes now, not after the rest.
            tx.content = None;
            return;
        }
        if let Some(content) = tx.content.as_mut() {
            content.push(&decoder.take_content());
        }
    }

    pub(super) fn count_data(&mut self, octets: usize, now: Now) {
        self.bytes = self.bytes.saturating_add(octets as u64);
        if let Some(rate) = self.rate.as_mut() {
            rate.add(now.mono, octets);
        }
    }

    /// 503 unless MAIL and at least one RCPT succeeded (RFC 5321 3.3).
    pub(super) fn ready_for_content(&mut self, out: &mut Output) -> bool {
        let refusal = match self.tx.as_ref() {
            None => "Need MAIL command",
            Some(tx) if tx.recipients.is_empty() => "Need RCPT command",
            Some(_) => return true,
        };
        self.reply(out, Reply::new(503, "5.5.1", refusal));
        false
    }

    pub(super) fn data_limits(&self) -> DataLimits {
        let settings = &self.params.settings;
        DataLimits {
            max_message_size: settings.max_message_size,
            bare_line_feed: settings.bare_line_feed,
        }
    }

    pub(super) fn on_data(&mut self, now: Now, out: &mut Output) {
        if !self.ready_for_content(out) {
            return;
        }
        // RFC 3030 3: DATA and BDAT cannot be mixed in one transaction.
        if self.tx.as_ref().is_some_and(|tx| tx.chunks.is_some()) {
            self.reply(out, Reply::new(503, "5.5.1", "DATA not allowed after BDAT"));
            return;
        }
        if self.relaying() {
            self.relay_content_start(None, now.wall, out);
            return;
        }
        self.reply_line(out, 354, "2.0.0", "End data with <CR><LF>.<CR><LF>");
        let decoder = DataDecoder::new(Framing::Dot, self.data_limits()).streaming();
        self.input_mode = InputMode::Data(decoder);
        self.start_content();
        self.rate = Some(DataRate::start(now.mono));
    }

    /// Maildir mode: the message's content starts (DATA, or the first BDAT).
    pub(super) fn start_content(&mut self) {
        let hostname = &self.params.settings.hostname;
        let spill = self.params.spill.clone();
        if let Some(tx) = self.tx.as_mut() {
            tx.content = Some(ContentBuilder::new(hostname, spill));
        }
    }

    pub(super) fn on_bdat(&mut self, size: u64, last: bool, now: Now, out: &mut Output) {
        // RFC 3030 3: the chunk's octets follow whatever the answer; read them to stay in sync.
        if !self.ready_for_content(out) {
            self.input_mode = InputMode::SkipChunk { remaining: size };
            return;
        }
        let limits = self.data_limits();
        let first_chunk = self.tx.as_ref().is_some_and(|tx| tx.chunks.is_none());
        if first_chunk && self.relaying() {
            self.relay_content_start(Some(BdatChunk { size, last }), now.wall, out);
            return;
        }
        if let Some(tx) = self.tx.as_mut()
            && tx.chunks.is_none()
        {
            tx.chunks = Some(DataDecoder::new(Framing::Chunked, limits).streaming());
            self.start_content();
            self.rate = Some(DataRate::start(now.mono));
        }
        self.input_mode = InputMode::Chunk {
            size,
            remaining: size,
            last,
        };
    }

    /// Every octet of the current chunk is in.
    pub(super) fn chunk_done(&mut self, now: Now, out: &mut Output) {
        let mode = std::mem::replace(&mut self.input_mode, InputMode::Command);
        let InputMode::Chunk { size, last, .. } = mode else {
            return;
        };
        if !last {
            self.reply(
                out,
                Reply::new(250, "2.0.0", &format!("{size} octets received")),
            );
            return;
        }
        let decoder = self.tx.as_mut().and_then(|tx| tx.chunks.take());
        if let Some(decoder) = decoder {
            self.end_of_message(decoder.finish(), now, out);
        }
    }

    pub(super) fn end_of_message(
        &mut self,
        result: Result<Vec<u8>, DataRefusal>,
        now: Now,
        out: &mut Output,
    ) {
        self.rate = None;
        if let Some(mut message) = self.tx.as_mut().and_then(|tx| tx.relay.take()) {
            self.end_of_relayed_message(&mut message, result, out);
            return;
        }
        let builder = self.tx.as_mut().and_then(|tx| tx.content.take());
        let content = match (result, builder) {
            (Err(refusal), _) => Err(refusal.reply()),
            (Ok(rest), Some(mut builder)) => {
                builder.push(&rest);
                builder.finish().map_err(|err| match err {
                    ContentError::Loop => DataRefusal::Loop.reply(),
                    ContentError::Spill(_) => Reply::new(451, "4.3.0", "Local error in processing"),
                })
            }
            (Ok(_), None) => Err(Reply::new(451, "4.3.0", "Local error in processing")),
        };
        match content {
            Err(reply) => {
                let tx = self.tx.take();
                out.observations
                    .push(Observation::MessageRejected(Stage::Data));
                let (from, to) = tx.as_ref().map_or(("", &[][..]), |tx| {
                    (tx.reverse_path.as_str(), &tx.recipients[..])
                });
                self.refuse(out, Stage::Data, Subject::Message { from, to }, reply);
            }
            Ok(content) => {
                self.park = Some(Park::DataVerdict {
                    content,
                    received_at: now.wall,
                });
                self.resume(out);
            }
        }
    }
}
