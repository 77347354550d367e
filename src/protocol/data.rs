//! The streaming decoder of message content, for DATA (RFC 5321 4.1.1.4) and BDAT chunks
//! (RFC 3030).
//!
//! Contract: `feed` takes whatever bytes have arrived and always uses them all, except that
//! DATA stops right after its end marker (`complete`); the bytes after it are commands again.
//! No input is ever offered twice, so a megabyte-long line costs one scan. The content kept is
//! the message as received: dot-unstuffed, every line ending in CRLF.
//!
//! Hot path: one `memchr` for LF per line and one copy per line; the work per line start
//! (a period?) is a single comparison. Nothing is allocated per line.
//!
//! Rules, each chosen against SMTP smuggling:
//! - DATA ends at CRLF "." CRLF and nothing else: the line before the period must have ended in
//!   a real CRLF (the DATA command's own line end counts for an empty message), and the period
//!   line must end in a real CRLF. `<LF>.<LF>`, `<CR>.<CR>`, `<LF>.<CRLF>` and `<CRLF>.<LF>` are
//!   content, never an end.
//! - Bare LF (`BareLineFeed`): `Normalize` ends a line there as if CRLF had been sent (CRLF is
//!   stored; Postfix's default); `Reject` reads on to the real end, then refuses 550 5.5.2. Either
//!   way a bare LF never helps to end the message.
//! - Bare CR: content, kept as it is; only CR immediately followed by LF is a line end. A
//!   decoder for the relay modes (`crlf_only`) hands on CRLF line ends only: there a bare CR
//!   is handled as `BareLineFeed` says (SPEC "Relay modes"): `Normalize` ends a line there
//!   (CRLF is passed on), `Reject` refuses 550 5.5.2 after the real end. It still never ends
//!   the message, nor makes a period after it a line start: what the client sent after it is
//!   content, and the relay's own dot-stuffing protects it on the way out.
//! - Dot-stuffing (RFC 5321 4.5.2): "If the first character is a period and there are other
//!   characters on the line, the first character is deleted." A lone period line that does not
//!   end the message (after a bare LF) has no other characters and is kept.
//! - BDAT chunks carry exact octet counts: no dot handling at all, the same line rules.
//!
//! Refusals are found while reading but answered after the real end (the session goes on):
//! a text line over 1000 octets incl. CRLF (550 5.6.0), a message over the size limit
//! (552 5.3.4), a bare LF under `Reject` (550 5.5.2), more than 100 Received fields in the
//! header (554 5.4.6, RFC 5321 6.3; a `streaming` caller judges that on the whole header
//! itself). Once refused, nothing more is stored. A caller that takes the content after each
//! `feed` (`take_content`) holds no more than one feed's worth here.

use memchr::memchr;

use crate::protocol::MAX_TEXT_LINE;
use crate::protocol::reply::Reply;

/// RFC 5321 6.3: a loop is assumed past this many Received fields (Postfix uses 50 hops; the
/// SPEC says more than 100).
pub const MAX_RECEIVED_FIELDS: usize = 100;

/// How the message is framed on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framing {
    /// DATA: dot-stuffed, ends at CRLF.CRLF.
    Dot,
    /// BDAT: the session slices exact chunk sizes; ends when the LAST chunk is done.
    Chunked,
}

/// What a bare LF in message content does (HELOGUARD_BARE_NEWLINE).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BareLineFeed {
    Normalize,
    Reject,
}

/// The limits one message is decoded under.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DataLimits {
    /// Octets of content; 0 = unlimited.
    pub max_message_size: u64,
    pub bare_line_feed: BareLineFeed,
}

/// Why a message is refused at its end.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DataRefusal {
    /// 552 5.3.4.
    TooBig,
    /// 550 5.6.0.
    LineTooLong,
    /// 550 5.5.2.
    BareLineFeed,
    /// 550 5.5.2 (relay modes, under `Reject`).
    BareCarriageReturn,
    /// 554 5.4.6.
    Loop,
}

impl DataRefusal {
    pub fn reply(self) -> Reply {
        match self {
            DataRefusal::TooBig => Reply::new(
                552,
                "5.3.4",
                "Message size exceeds fixed maximum message size",
            ),
            DataRefusal::LineTooLong => Reply::new(
                550,
                "5.6.0",
                "Message refused: text line longer than 1000 octets (RFC 5321 4.5.3.1.6)",
            ),
            DataRefusal::BareLineFeed => Reply::new(
                550,
                "5.5.2",
                "Message refused: bare <LF> received, lines must end in <CR><LF> (RFC 5321 2.3.8)",
            ),
            DataRefusal::BareCarriageReturn => Reply::new(
                550,
                "5.5.2",
                "Message refused: bare <CR> received, lines must end in <CR><LF> (RFC 5321 2.3.8)",
            ),
            DataRefusal::Loop => Reply::new(
                554,
                "5.4.6",
                "Message refused: too many Received header fields, mail loop",
            ),
        }
    }
}

/// What one `feed` did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Feed {
    pub consumed: usize,
    /// DATA only: the end marker was the last byte consumed.
    pub complete: bool,
}

/// Where in the current line the decoder is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum LineState {
    /// Nothing of the line seen yet.
    Start,
    /// DATA: the line began with a period, not stored (yet).
    Dot,
    /// DATA: the line began with period, CR.
    DotCr,
    /// Inside a line's text.
    Text,
}

/// One message being received.
#[derive(Clone, Debug)]
pub struct DataDecoder {
    framing: Framing,
    limits: DataLimits,
    state: LineState,
    /// The previous line ended in a real CRLF (true at the start: the command's line end).
    after_crlf: bool,
    /// The last octet taken was CR: a CRLF may straddle two reads or two BDAT chunks.
    last_cr: bool,
    /// Octets of the current line so far, as sent (a stuffing period included).
    line_len: usize,
    /// The first reason to refuse, if any; once set nothing more is stored.
    refusal: Option<DataRefusal>,
    content: Vec<u8>,
    /// Octets of content decoded so far, taken or not: what SIZE is checked against.
    stored: u64,
    /// `take_content` was called: the caller streams the message and checks its header.
    streamed: bool,
    /// Relay modes: a bare CR is handled as `limits.bare_line_feed` says (`crlf_only`).
    crlf_only: bool,
    /// Octets taken from the wire, for the data rate and the session summary.
    octets: u64,
}

impl DataDecoder {
    pub fn new(framing: Framing, limits: DataLimits) -> Self {
        Self {
            framing,
            limits,
            state: LineState::Start,
            after_crlf: true,
            last_cr: false,
            line_len: 0,
            refusal: None,
            content: Vec::new(),
            stored: 0,
            streamed: false,
            crlf_only: false,
            octets: 0,
        }
    }

    /// A decoder whose content has CRLF line ends only (the relay modes): a bare CR is
    /// handled as HELOGUARD_BARE_NEWLINE says for a bare LF, so that no next hop that reads a
    /// lone CR as a line end can be made to see a line, or an end of data, that we did not.
    pub fn crlf_only(mut self) -> Self {
        self.crlf_only = true;
        self
    }

    /// A decoder whose caller takes the content as it arrives (`take_content`) and checks the
    /// header itself: `finish` then never counts Received fields, however the message was
    /// split, so a loop is judged on the whole header once, by the caller.
    pub fn streaming(mut self) -> Self {
        self.streamed = true;
        self
    }

    /// Takes the content decoded so far, for a caller that passes the message on as it
    /// arrives instead of holding it whole. Limits still apply to the total.
    pub fn take_content(&mut self) -> Vec<u8> {
        self.streamed = true;
        std::mem::take(&mut self.content)
    }

    /// Decodes as much of `input` as belongs to the message.
    pub fn feed(&mut self, input: &[u8]) -> Feed {
        if self.refusal.is_none() {
            // Decoded content is about as long as the input: one reservation, not a growth
            // step per line.
            self.content.reserve(input.len());
        }
        let mut i = 0;
        while i < input.len() {
            match self.state {
                LineState::Start => {
                    if self.framing == Framing::Dot && input[i] == b'.' {
                        self.state = LineState::Dot;
                        self.line_len = 1;
                        i += 1;
                    } else {
                        self.state = LineState::Text;
                    }
                }
                LineState::Dot => match input[i] {
                    b'\r' => {
                        self.state = LineState::DotCr;
                        self.line_len = 2;
                        i += 1;
                    }
                    b'\n' => {
                        // `.<LF>`: a lone period ended by a bare LF is content, never the end.
                        self.store(b".");
                        self.last_cr = false;
                        self.end_line();
                        i += 1;
                    }
                    // A stuffed period: drop it and read the line's text.
                    _ => self.state = LineState::Text,
                },
                LineState::DotCr => {
                    if input[i] == b'\n' {
                        i += 1;
                        if self.after_crlf {
                            self.octets += i as u64;
                            return Feed {
                                consumed: i,
                                complete: true,
                            };
                        }
                        // `<LF>.<CRLF>`: the line before ended in a bare LF, so this is no end.
                        self.store(b".\r");
                        self.last_cr = true;
                        self.end_line();
                    } else {
                        // `.<CR>x`: a stuffed period before a bare CR.
                        self.store(b"\r");
                        self.last_cr = true;
                        self.state = LineState::Text;
                    }
                }
                LineState::Text => {
                    if self.crlf_only && self.last_cr && input[i] != b'\n' {
                        // The CR that ended the text so far was not a CRLF's.
                        self.last_cr = false;
                        self.bare_cr_ends_line();
                    }
                    let rest = &input[i..];
                    match memchr(b'\n', rest) {
                        None => {
                            self.take_text(rest);
                            i = input.len();
                        }
                        Some(lf) => {
                            self.take_text(&rest[..lf]);
                            self.end_line();
                            i += lf + 1;
                        }
                    }
                }
            }
        }
        self.octets += input.len() as u64;
        Feed {
            consumed: input.len(),
            complete: false,
        }
    }

    /// The message is over (DATA's end marker seen, or BDAT LAST's chunk taken): the content,
    /// or why it is refused.
    pub fn finish(mut self) -> Result<Vec<u8>, DataRefusal> {
        // RFC 3030 does not promise a final CRLF in the last chunk; the spool wants one.
        if self.state == LineState::Text && self.line_len > 0 {
            let end: &[u8] = if self.last_cr { b"\n" } else { b"\r\n" };
            self.store(end);
        }
        if let Some(refusal) = self.refusal {
            return Err(refusal);
        }
        // A streaming caller has already passed the header on and checks it itself.
        if !self.streamed && count_received(&self.content) > MAX_RECEIVED_FIELDS {
            return Err(DataRefusal::Loop);
        }
        Ok(self.content)
    }

    /// Octets read from the wire so far.
    pub fn octets(&self) -> u64 {
        self.octets
    }

    /// Octets of content held in memory (never above the size limit when there is one).
    pub fn buffered(&self) -> usize {
        self.content.len()
    }

    /// A reason to refuse was found; the rest is only read.
    pub fn is_refused(&self) -> bool {
        self.refusal.is_some()
    }

    fn take_text(&mut self, text: &[u8]) {
        let Some((&last, inner)) = text.split_last() else {
            return;
        };
        self.last_cr = last == b'\r';
        // Every CR but a last one (whose LF may follow) is bare.
        let mut from = 0;
        if self.crlf_only {
            for cr in memchr::memchr_iter(b'\r', inner) {
                self.take_line_text(&text[from..=cr]);
                self.bare_cr_ends_line();
                from = cr + 1;
            }
        }
        self.take_line_text(&text[from..]);
    }

    fn take_line_text(&mut self, text: &[u8]) {
        self.line_len += text.len();
        // Without its LF the line is already at the limit: with it, it will be over.
        if self.line_len >= MAX_TEXT_LINE {
            self.refuse(DataRefusal::LineTooLong);
        }
        self.store(text);
    }

    /// A bare CR was taken as content (`crlf_only`): `Normalize` makes it a CRLF line end, as
    /// for a bare LF; `Reject` refuses the message.
    fn bare_cr_ends_line(&mut self) {
        match self.limits.bare_line_feed {
            BareLineFeed::Normalize => {
                self.store(b"\n");
                self.line_len = 0;
            }
            BareLineFeed::Reject => self.refuse(DataRefusal::BareCarriageReturn),
        }
    }

    /// Takes the LF that ends the current line.
    fn end_line(&mut self) {
        self.line_len += 1;
        if self.line_len > MAX_TEXT_LINE {
            self.refuse(DataRefusal::LineTooLong);
        }
        let crlf = self.last_cr;
        if crlf {
            self.store(b"\n");
        } else {
            match self.limits.bare_line_feed {
                BareLineFeed::Normalize => self.store(b"\r\n"),
                BareLineFeed::Reject => self.refuse(DataRefusal::BareLineFeed),
            }
        }
        self.after_crlf = crlf;
        self.last_cr = false;
        self.line_len = 0;
        self.state = LineState::Start;
    }

    fn store(&mut self, bytes: &[u8]) {
        if self.refusal.is_some() {
            return;
        }
        let max = self.limits.max_message_size;
        if max != 0 && self.stored + bytes.len() as u64 > max {
            self.refuse(DataRefusal::TooBig);
            return;
        }
        self.stored += bytes.len() as u64;
        self.content.extend_from_slice(bytes);
    }

    fn refuse(&mut self, why: DataRefusal) {
        if self.refusal.is_none() {
            self.refusal = Some(why);
            // Nothing of a refused message is needed any more.
            self.content = Vec::new();
        }
    }
}

/// Counts `Received:` fields in the header section (up to the first empty line), stopping
/// once past the loop limit.
pub fn count_received(content: &[u8]) -> usize {
    let mut count = 0;
    let mut pos = 0;
    while pos < content.len() && count <= MAX_RECEIVED_FIELDS {
        let end = memchr(b'\n', &content[pos..]).map_or(content.len(), |lf| pos + lf + 1);
        let line = &content[pos..end];
        if line == b"\r\n" {
            break;
        }
        if line.len() >= 9 && line[..9].eq_ignore_ascii_case(b"received:") {
            count += 1;
        }
        pos = end;
    }
    count
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn limits(bare: BareLineFeed, max: u64) -> DataLimits {
        DataLimits {
            max_message_size: max,
            bare_line_feed: bare,
        }
    }

    /// Feeds DATA input in pieces; returns the result and the bytes left after the end.
    fn run_dot(pieces: &[&[u8]], l: DataLimits) -> (Option<Result<Vec<u8>, DataRefusal>>, Vec<u8>) {
        run_dot_with(pieces, DataDecoder::new(Framing::Dot, l))
    }

    fn run_dot_with(
        pieces: &[&[u8]],
        mut d: DataDecoder,
    ) -> (Option<Result<Vec<u8>, DataRefusal>>, Vec<u8>) {
        let mut leftover = Vec::new();
        let mut done = false;
        for piece in pieces {
            if done {
                leftover.extend_from_slice(piece);
                continue;
            }
            let f = d.feed(piece);
            if f.complete {
                done = true;
                leftover.extend_from_slice(&piece[f.consumed..]);
            } else {
                assert_eq!(f.consumed, piece.len());
            }
        }
        (done.then(|| d.finish()), leftover)
    }

    fn dot(input: &[u8], bare: BareLineFeed) -> (Option<Result<Vec<u8>, DataRefusal>>, Vec<u8>) {
        run_dot(&[input], limits(bare, 0))
    }

    #[test]
    fn end_of_data_and_smuggling() {
        use BareLineFeed::*;
        type Case = (
            &'static str,
            &'static [u8],
            BareLineFeed,
            Option<Result<&'static [u8], DataRefusal>>,
            &'static [u8],
        );
        let cases: &[Case] = &[
            ("empty", b".\r\n", Normalize, Some(Ok(b"")), b""),
            (
                "simple",
                b"a\r\nb\r\n.\r\nQUIT\r\n",
                Normalize,
                Some(Ok(b"a\r\nb\r\n")),
                b"QUIT\r\n",
            ),
            (
                "unstuff",
                b"..x\r\n..\r\n.\r\n",
                Normalize,
                Some(Ok(b".x\r\n.\r\n")),
                b"",
            ),
            (
                "lf.lf",
                b"a\n.\nMAIL FROM:<x@y>\r\n.\r\n",
                Normalize,
                Some(Ok(b"a\r\n.\r\nMAIL FROM:<x@y>\r\n")),
                b"",
            ),
            (
                "cr.cr",
                b"a\r.\rMAIL FROM:<x@y>\r\n.\r\n",
                Normalize,
                Some(Ok(b"a\r.\rMAIL FROM:<x@y>\r\n")),
                b"",
            ),
            (
                "lf.crlf",
                b"a\n.\r\nMAIL FROM:<x@y>\r\n.\r\n",
                Normalize,
                Some(Ok(b"a\r\n.\r\nMAIL FROM:<x@y>\r\n")),
                b"",
            ),
            (
                "crlf.lf",
                b"a\r\n.\nMAIL FROM:<x@y>\r\n.\r\n",
                Normalize,
                Some(Ok(b"a\r\n.\r\nMAIL FROM:<x@y>\r\n")),
                b"",
            ),
            (
                "crlf.cr",
                b"a\r\n.\rMAIL\r\n.\r\n",
                Normalize,
                Some(Ok(b"a\r\n\rMAIL\r\n")),
                b"",
            ),
            ("only lf.lf", b"a\n.\n", Normalize, None, b""),
            (
                "lf.lf reject",
                b"a\n.\nMAIL\r\n.\r\nNOOP\r\n",
                Reject,
                Some(Err(DataRefusal::BareLineFeed)),
                b"NOOP\r\n",
            ),
            (
                "bare cr kept",
                b"a\rb\r\n.\r\n",
                Reject,
                Some(Ok(b"a\rb\r\n")),
                b"",
            ),
            (
                "bare lf normalized",
                b"a\nb\r\n.\r\n",
                Normalize,
                Some(Ok(b"a\r\nb\r\n")),
                b"",
            ),
        ];
        for (name, input, bare, want, rest) in cases {
            let (got, left) = dot(input, *bare);
            let want = want.map(|w| w.map(<[u8]>::to_vec));
            assert_eq!(got, want, "{name}");
            assert_eq!(left, rest.to_vec(), "{name} leftover");
        }
    }

    #[test]
    fn text_line_limit() {
        let line_ok = [vec![b'x'; 998], b"\r\n".to_vec()].concat();
        let line_long = [vec![b'x'; 999], b"\r\n".to_vec()].concat();
        let stuffed_ok = [b".".to_vec(), vec![b'x'; 997], b"\r\n".to_vec()].concat();
        let ok = [line_ok.clone(), stuffed_ok.clone(), b".\r\n".to_vec()].concat();
        assert!(matches!(dot(&ok, BareLineFeed::Normalize).0, Some(Ok(_))));
        let long = [line_long, b"next\r\n.\r\nNOOP\r\n".to_vec()].concat();
        let (got, left) = dot(&long, BareLineFeed::Normalize);
        assert_eq!(got, Some(Err(DataRefusal::LineTooLong)));
        assert_eq!(left, b"NOOP\r\n");
    }

    #[test]
    fn size_limit_reads_to_the_end() {
        let l = limits(BareLineFeed::Normalize, 10);
        assert_eq!(
            run_dot(&[b"0123456\r\n.\r\n"], l).0,
            Some(Ok(b"0123456\r\n".to_vec()))
        );
        let (got, left) = run_dot(&[b"01234567\r\n", b"more\r\n.\r\nQUIT\r\n"], l);
        assert_eq!(got, Some(Err(DataRefusal::TooBig)));
        assert_eq!(left, b"QUIT\r\n");
    }

    #[test]
    fn received_loop() {
        let mut msg = b"Received: x\r\n".repeat(100);
        msg.extend_from_slice(b"Subject: s\r\n\r\nReceived: body\r\n.\r\n");
        assert!(matches!(dot(&msg, BareLineFeed::Normalize).0, Some(Ok(_))));
        let mut msg = b"RECEIVED: x\r\n".repeat(101);
        msg.extend_from_slice(b"\r\nbody\r\n.\r\n");
        assert_eq!(
            dot(&msg, BareLineFeed::Normalize).0,
            Some(Err(DataRefusal::Loop))
        );
    }

    #[test]
    fn chunked_has_no_dots_and_joins_crlf_across_chunks() {
        let mut d = DataDecoder::new(Framing::Chunked, limits(BareLineFeed::Reject, 0));
        for chunk in [&b".a\r"[..], b"\n.\r\n", b"tail"] {
            assert_eq!(d.feed(chunk).consumed, chunk.len());
        }
        assert_eq!(d.finish(), Ok(b".a\r\n.\r\ntail\r\n".to_vec()));
        let mut d = DataDecoder::new(Framing::Chunked, limits(BareLineFeed::Reject, 0));
        d.feed(b"a\nb\r\n");
        assert_eq!(d.finish(), Err(DataRefusal::BareLineFeed));
    }

    #[test]
    fn crlf_only_makes_a_bare_cr_a_line_end_or_refuses_it() {
        use BareLineFeed::*;
        type Case = (
            &'static str,
            &'static [&'static [u8]],
            BareLineFeed,
            Result<&'static [u8], DataRefusal>,
        );
        let cases: &[Case] = &[
            (
                "smuggling shape",
                &[b"a\r.\rb\r\n.\r\n"],
                Normalize,
                Ok(b"a\r\n.\r\nb\r\n"),
            ),
            (
                "split after the CR",
                &[b"a\r", b".\rb\r\n.\r\n"],
                Normalize,
                Ok(b"a\r\n.\r\nb\r\n"),
            ),
            ("CRLF split", &[b"a\r", b"\n.\r\n"], Normalize, Ok(b"a\r\n")),
            ("CR CR LF", &[b"a\r\r\n.\r\n"], Normalize, Ok(b"a\r\n\r\n")),
            // A period after a bare CR is content, not a line start: it is kept, not unstuffed.
            (
                "period after a bare CR",
                &[b"x\r.y\r\n.\r\n"],
                Normalize,
                Ok(b"x\r\n.y\r\n"),
            ),
            (
                "stuffed period, bare CR",
                &[b"..\rz\r\n.\r\n"],
                Normalize,
                Ok(b".\r\nz\r\n"),
            ),
            ("last octet a CR", &[b"a\r"], Normalize, Ok(b"a\r\n")),
            (
                "reject",
                &[b"a\r.\rb\r\n.\r\n"],
                Reject,
                Err(DataRefusal::BareCarriageReturn),
            ),
            (
                "reject, split",
                &[b"a\r", b"b\r\n.\r\n"],
                Reject,
                Err(DataRefusal::BareCarriageReturn),
            ),
            (
                "reject, CRLF only",
                &[b"a\r", b"\nb\r\n.\r\n"],
                Reject,
                Ok(b"a\r\nb\r\n"),
            ),
        ];
        for (name, pieces, bare, want) in cases {
            let d = DataDecoder::new(Framing::Dot, limits(*bare, 0)).crlf_only();
            let (got, _) = run_dot_with(pieces, d);
            // "last octet a CR" never ends: the message stays open.
            let got = got.unwrap_or_else(|| {
                let mut d = DataDecoder::new(Framing::Chunked, limits(*bare, 0)).crlf_only();
                for p in *pieces {
                    d.feed(p);
                }
                d.finish()
            });
            assert_eq!(got, want.map(<[u8]>::to_vec), "{name}");
        }
        // Without crlf_only (maildir mode) a bare CR is content, as received.
        let d = DataDecoder::new(Framing::Dot, limits(Reject, 0));
        let (got, _) = run_dot_with(&[b"a\r.\rb\r\n.\r\n"], d);
        assert_eq!(got, Some(Ok(b"a\r.\rb\r\n".to_vec())));
    }

    #[test]
    fn a_mebibyte_line_is_not_kept() {
        let mut d = DataDecoder::new(Framing::Dot, limits(BareLineFeed::Normalize, 0));
        let block = vec![b'a'; 65536];
        for _ in 0..16 {
            d.feed(&block);
        }
        assert!(d.is_refused() && d.content.capacity() == 0);
        assert!(d.feed(b"\r\n.\r\n").complete);
        assert_eq!(d.finish(), Err(DataRefusal::LineTooLong));
    }

    proptest! {
        #[test]
        fn any_split_gives_the_same_result(
            body in proptest::collection::vec(prop_oneof![
                Just(b'a'), Just(b'.'), Just(b'\r'), Just(b'\n')
            ], 0..200),
            cuts in proptest::collection::vec(0usize..220, 0..6),
            reject in any::<bool>(),
        ) {
            let bare = if reject { BareLineFeed::Reject } else { BareLineFeed::Normalize };
            let mut input = body.clone();
            input.extend_from_slice(b"\r\n.\r\nQUIT\r\n");
            let whole = run_dot(&[&input], limits(bare, 0));
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(input.len())).collect();
            cuts.sort_unstable();
            let mut pieces = Vec::new();
            let mut from = 0;
            for c in cuts {
                pieces.push(&input[from..c]);
                from = c;
            }
            pieces.push(&input[from..]);
            let split = run_dot(&pieces, limits(bare, 0));
            prop_assert!(whole.0.is_some());
            prop_assert_eq!(&whole, &split);
            if let Some(Ok(content)) = &whole.0 {
                // Every line of what is kept ends in CRLF; no bare LF survives.
                let bare_lf = content.iter().enumerate().any(|(i, &b)| b == b'\n' && (i == 0 || content[i - 1] != b'\r'));
                prop_assert!(!bare_lf);
            }
            // For a next hop (crlf_only): the same end, however split, and no bare CR either.
            let relayed = |pieces: &[&[u8]]| {
                run_dot_with(pieces, DataDecoder::new(Framing::Dot, limits(bare, 0)).crlf_only())
            };
            let whole_relayed = relayed(&[&input]);
            prop_assert_eq!(&whole_relayed, &relayed(&pieces));
            prop_assert_eq!(&whole_relayed.1, &whole.1);
            if let Some(Ok(content)) = &whole_relayed.0 {
                let bare_cr = content.iter().enumerate().any(|(i, &b)| b == b'\r' && content.get(i + 1) != Some(&b'\n'));
                prop_assert!(!bare_cr);
            }
        }
    }
}
