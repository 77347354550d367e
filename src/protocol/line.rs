//! Command lines out of a byte buffer, without copying.
//!
//! The caller offers everything it has buffered; `LineReader::read` answers with one line
//! borrowed from that buffer and how many bytes it used. Bytes not used must be offered again
//! with later bytes appended, so a line split across reads is simply found on a later call.
//!
//! Limits: RFC 5321 4.5.3.1.4 caps a command line at 512 octets including CRLF. A longer line
//! is not kept: the reader switches to skip mode, consumes what it has, and keeps consuming up
//! to the line's LF across as many reads as it takes (Postfix `smtp_get(..., SKIP)`: "to avoid
//! loss of synchronization"). Only then is `TooLong` reported, once, so the 500 5.5.6 comes in
//! order with the replies to the commands around it. Memory stays bounded by 512 octets
//! whatever the client sends.
//!
//! Line ends: CRLF ends a command line. A bare LF also ends one (as Postfix does), with an
//! optional CR before it removed. This is safe here because it applies to command lines only:
//! the DATA and BDAT decoder (`protocol::data`) never lets a bare LF end a message, so a bare LF
//! can never open a command channel inside message content (SMTP smuggling). A bare CR is not
//! a line end; it stays in the line, where the command parser refuses it as bad syntax.

use memchr::memchr;

use crate::protocol::MAX_COMMAND_LINE;

/// What one call to `LineReader::read` found.
#[derive(Debug, PartialEq, Eq)]
pub enum LineRead<'a> {
    /// A whole line, without its CRLF (or LF); `consumed` includes the terminator.
    Line { line: &'a [u8], consumed: usize },
    /// The end of an overlong line: answer 500 5.5.6. `consumed` ends after its LF.
    TooLong { consumed: usize },
    /// No whole line yet. `consumed` is non-zero only when skipping an overlong line.
    Partial { consumed: usize },
}

/// Finds command lines; remembers only whether it is skipping an overlong line.
#[derive(Clone, Debug, Default)]
pub struct LineReader {
    /// Inside an overlong line whose LF has not arrived yet.
    skipping: bool,
}

impl LineReader {
    pub fn new() -> Self {
        Self::default()
    }

    /// Reads the next line at the start of `buf`.
    pub fn read<'a>(&mut self, buf: &'a [u8]) -> LineRead<'a> {
        if self.skipping {
            return match memchr(b'\n', buf) {
                Some(lf) => {
                    self.skipping = false;
                    LineRead::TooLong { consumed: lf + 1 }
                }
                None => LineRead::Partial {
                    consumed: buf.len(),
                },
            };
        }
        // Only the first 512 octets can hold the LF of a line we accept.
        let window = &buf[..buf.len().min(MAX_COMMAND_LINE)];
        match memchr(b'\n', window) {
            Some(lf) => {
                let line = &buf[..lf];
                let line = line.strip_suffix(b"\r").unwrap_or(line);
                LineRead::Line {
                    line,
                    consumed: lf + 1,
                }
            }
            None if buf.len() >= MAX_COMMAND_LINE => {
                self.skipping = true;
                self.read(buf)
            }
            None => LineRead::Partial { consumed: 0 },
        }
    }

    /// True while inside an overlong line.
    pub fn is_skipping(&self) -> bool {
        self.skipping
    }

    /// Forgets a half-skipped line (after STARTTLS every unread byte is discarded).
    pub fn reset(&mut self) {
        self.skipping = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `chunks` one after another, re-offering unconsumed bytes like the event loop.
    fn lines_of(chunks: &[&[u8]]) -> Vec<Result<Vec<u8>, &'static str>> {
        let mut reader = LineReader::new();
        let mut buf = Vec::new();
        let mut found = Vec::new();
        for chunk in chunks {
            buf.extend_from_slice(chunk);
            loop {
                let (consumed, item) = match reader.read(&buf) {
                    LineRead::Line { line, consumed } => (consumed, Some(Ok(line.to_vec()))),
                    LineRead::TooLong { consumed } => (consumed, Some(Err("too long"))),
                    LineRead::Partial { consumed } => (consumed, None),
                };
                buf.drain(..consumed);
                match item {
                    Some(i) => found.push(i),
                    None => break,
                }
            }
            assert!(buf.len() < MAX_COMMAND_LINE, "buffer must stay bounded");
        }
        found
    }

    #[test]
    fn table() {
        let long = vec![b'x'; 600];
        let exact: Vec<u8> = [vec![b'y'; 510], b"\r\n".to_vec()].concat();
        let over: Vec<u8> = [vec![b'z'; 511], b"\r\n".to_vec()].concat();
        type Case<'a> = (&'a str, Vec<&'a [u8]>, Vec<Result<Vec<u8>, &'a str>>);
        let cases: Vec<Case> = vec![
            ("crlf", vec![b"NOOP\r\n"], vec![Ok(b"NOOP".to_vec())]),
            ("bare lf", vec![b"NOOP\n"], vec![Ok(b"NOOP".to_vec())]),
            (
                "bare cr is not an end",
                vec![b"NO\rOP\r\n"],
                vec![Ok(b"NO\rOP".to_vec())],
            ),
            (
                "split",
                vec![b"NO", b"OP\r", b"\n"],
                vec![Ok(b"NOOP".to_vec())],
            ),
            (
                "two in one",
                vec![b"A\r\nB\r\nC"],
                vec![Ok(b"A".to_vec()), Ok(b"B".to_vec())],
            ),
            ("512 exactly", vec![&exact], vec![Ok(vec![b'y'; 510])]),
            (
                "513",
                vec![&over, b"QUIT\r\n"],
                vec![Err("too long"), Ok(b"QUIT".to_vec())],
            ),
            (
                "600 split",
                vec![&long[..300], &long[300..], b"\r\nQUIT\r\n"],
                vec![Err("too long"), Ok(b"QUIT".to_vec())],
            ),
        ];
        for (name, chunks, want) in cases {
            assert_eq!(lines_of(&chunks), want, "{name}");
        }
    }

    #[test]
    fn a_mebibyte_without_lf_stays_bounded() {
        let chunk = vec![b'a'; 4096];
        let mut chunks: Vec<&[u8]> = vec![&chunk[..]; 256];
        chunks.push(b"\nNOOP\r\n");
        assert_eq!(
            lines_of(&chunks),
            vec![Err("too long"), Ok(b"NOOP".to_vec())]
        );
    }
}
