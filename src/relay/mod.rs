//! Relay modes (HELOGUARD_DELIVER `smtp://`, `lmtp://`, `lmtp:unix:`): the next-hop side of the
//! before-queue proxy.
//!
//! SPEC "Relay modes": heloguard introduces itself to the next hop as HELOGUARD_HOSTNAME,
//! replays MAIL and RCPT, streams the data, and answers the client 250 only after the next
//! hop's 250. `client::RelayClient` is the sans-I/O SMTP/LMTP client that does this for one
//! next-hop connection: the event loop feeds it the bytes read from the socket and writes out
//! the bytes it produces; it never touches a socket, a clock or a TLS library itself.
//!
//! A refusal decided late (SPEC: bare LF under `reject`, an overlong line, SIZE) must abort the
//! next-hop transaction without the final dot ever reaching the wire: the client only sends
//! `CRLF.CRLF` from `end_data()`, so the loop aborts by closing the connection instead.

pub(crate) mod client;
pub(crate) mod outbound;
mod xclient;

use std::fmt;
use std::net::IpAddr;

use crate::protocol::reply::Reply;

/// A reply line from the next hop longer than this (CRLF included) makes the connection
/// unusable: RFC 5321 4.5.3.1.5 allows 512 octets; Postfix reads up to 2048
/// (`line_length_limit`), and so do we before giving up.
pub(crate) const MAX_REPLY_LINE: usize = 2048;

/// A multi-line reply with more lines than this is treated as garbage (EHLO replies in the
/// wild have a few dozen lines at most; this bounds memory per next-hop connection).
pub(crate) const MAX_REPLY_LINES: usize = 100;

/// The protocol spoken to the next hop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NextHopProtocol {
    /// RFC 5321 SMTP: EHLO, falling back to HELO.
    Smtp,
    /// RFC 2033 LMTP: LHLO, and one reply per accepted recipient after the data.
    Lmtp,
}

/// The XCLIENT `NAME` attribute: the client's verified (forward-confirmed) PTR name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum XclientName {
    Name(String),
    /// No PTR name, or none that confirms: XCLIENT_README's `[UNAVAILABLE]`.
    Unavailable,
    /// The DNS lookup failed temporarily: XCLIENT_README's `[TEMPUNAVAIL]`.
    TempUnavailable,
}

/// What XCLIENT tells the next hop about our client (Postfix XCLIENT_README).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct XclientAttrs {
    pub addr: IpAddr,
    /// The client's TCP port (the PROXY header's source port behind a proxy); the loop fills
    /// it in, the session does not know it.
    pub port: Option<u16>,
    pub name: XclientName,
    /// The client's HELO/EHLO argument; `[UNAVAILABLE]` is sent when there is none.
    pub helo: Option<String>,
    /// `"SMTP"` after HELO, `"ESMTP"` after EHLO: never `ESMTPS`, which Postfix refuses
    /// with 501 (XCLIENT_README lists SMTP and ESMTP only).
    pub proto: &'static str,
    /// The name of the EHLO sent after XCLIENT's 220: the client's HELO name when it passed
    /// the syntax check, else the client's address literal. Postfix takes the name of that
    /// EHLO as the client's HELO, so it must be the client's and not ours.
    pub greeting_name: String,
}

impl XclientAttrs {
    /// The EHLO name that stands for a client whose HELO is unusable: its address literal
    /// (RFC 5321 4.1.3), `[IPv6:...]` for IPv6.
    pub(crate) fn address_literal(addr: IpAddr) -> String {
        match addr {
            IpAddr::V4(v4) => format!("[{v4}]"),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => format!("[{v4}]"),
                None => format!("[IPv6:{v6}]"),
            },
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct RelayClientParams {
    /// HELOGUARD_HOSTNAME, sent in EHLO/LHLO/HELO.
    pub hostname: String,
    pub protocol: NextHopProtocol,
    pub xclient: XclientAttrs,
    /// The loop can wrap this connection in client TLS: STARTTLS is used when offered.
    pub can_tls: bool,
}

/// What the loop must act on after a call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum RelayEvent {
    /// The next hop sent 220 to our STARTTLS: the loop wraps the connection in client TLS,
    /// then calls `tls_established()` (or `tls_failed()`).
    StartTls,
    /// The answer to the oldest outstanding `mail()`/`rcpt()`/`data()`/`end_data()` call
    /// (SMTP: one per call; LMTP: `end_data()` yields one reply per accepted recipient, each
    /// as its own event, in RCPT order).
    Reply(Reply),
    /// Setup is done and the next hop did not offer XCLIENT (or none of the attributes we
    /// send): it sees our address as the client's. The loop warns once per next hop.
    XclientUnavailable,
    /// The connection can't be used any more: the loop closes it (after writing any bytes
    /// produced with this event, which are at most a courtesy `QUIT`) and answers every
    /// outstanding call with this reply (`451 4.4.1 Next hop unavailable: ...`).
    Failed(Reply),
}

/// Where a message holds octets beyond ASCII: a next hop without SMTPUTF8 must not get
/// them in the header, one without 8BITMIME not at all (SPEC "Relay modes").
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EightBit {
    pub header: bool,
    pub body: bool,
}

impl EightBit {
    pub fn any(self) -> bool {
        self.header || self.body
    }
}

/// Bytes to write to the next hop and events for the loop, appended to by every call.
#[derive(Debug, Default)]
pub(crate) struct RelayOutput {
    pub bytes: Vec<u8>,
    pub events: Vec<RelayEvent>,
}

/// Why a next-hop connection became unusable. The replies kept here are the next hop's own,
/// with their text already reduced to printable ASCII.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum RelayError {
    /// The greeting was not 220 (RFC 5321 3.1: 554 means "no service here").
    Greeting(Reply),
    /// EHLO/LHLO refused (and HELO too, or HELO was not allowed).
    Hello(Reply),
    /// STARTTLS refused (RFC 3207 4: 454 or 501).
    StartTls(Reply),
    /// The TLS handshake after STARTTLS's 220 failed.
    TlsHandshake,
    /// The next hop sent bytes after its 220 to STARTTLS, before the handshake (RFC 3207 6:
    /// such bytes could be an injection, and are never read as replies).
    DataAfterStartTls,
    /// XCLIENT refused.
    Xclient(Reply),
    /// RSET refused: the next hop's transaction state is unknown.
    Rset(Reply),
    /// 421 (RFC 5321 3.8: the service is closing the transmission channel).
    ServiceClosing(Reply),
    /// A well-formed reply that no command asked for, or a code no command can get
    /// (e.g. 250 to DATA).
    Unexpected(Reply),
    /// A line that is not an RFC 5321 4.2 reply line.
    Malformed,
    /// A reply line over MAX_REPLY_LINE octets.
    LineTooLong,
    /// A reply of more than MAX_REPLY_LINES lines.
    TooManyLines,
    /// The connection was closed by our QUIT.
    Closed,
    /// A message was refused here in the middle of its DATA: the connection is dropped
    /// without the final dot.
    Abandoned,
    /// A call the protocol state does not allow (e.g. a command while DATA is open, where it
    /// would be read as message content).
    Misuse(&'static str),
}

impl RelayError {
    /// The next hop's reply behind this error, if any.
    pub(crate) fn their_reply(&self) -> Option<&Reply> {
        match self {
            RelayError::Greeting(r)
            | RelayError::Hello(r)
            | RelayError::StartTls(r)
            | RelayError::Xclient(r)
            | RelayError::Rset(r)
            | RelayError::ServiceClosing(r)
            | RelayError::Unexpected(r) => Some(r),
            _ => None,
        }
    }

    /// The reply the loop gives for every call left outstanding. Temporary (4yz), whatever
    /// the next hop said: its refusal was of us, not of the client's message (SPEC: next hop
    /// down or slow is 451 4.4.1, never 250).
    pub(crate) fn reply(&self) -> Reply {
        let why = match self.their_reply() {
            Some(r) => summary(r),
            None => self.to_string(),
        };
        Reply::new(451, "4.4.1", &format!("Next hop unavailable: {why}"))
    }
}

/// `code text` of a reply on one line, cut to keep our own reply short.
fn summary(reply: &Reply) -> String {
    const MAX: usize = 200;
    let mut s = reply.code.to_string();
    for line in &reply.lines {
        if !line.is_empty() {
            s.push(' ');
            s.push_str(line);
        }
    }
    // The text is printable ASCII, so any byte index is a char boundary.
    s.truncate(MAX);
    s
}

impl fmt::Display for RelayError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RelayError::Greeting(r) => write!(f, "greeting refused: {}", summary(r)),
            RelayError::Hello(r) => write!(f, "EHLO/HELO refused: {}", summary(r)),
            RelayError::StartTls(r) => write!(f, "STARTTLS refused: {}", summary(r)),
            RelayError::TlsHandshake => f.write_str("TLS handshake failed"),
            RelayError::DataAfterStartTls => f.write_str("data before the TLS handshake"),
            RelayError::Xclient(r) => write!(f, "XCLIENT refused: {}", summary(r)),
            RelayError::Rset(r) => write!(f, "RSET refused: {}", summary(r)),
            RelayError::ServiceClosing(r) => write!(f, "service closing: {}", summary(r)),
            RelayError::Unexpected(r) => write!(f, "unexpected reply: {}", summary(r)),
            RelayError::Malformed => f.write_str("malformed reply"),
            RelayError::LineTooLong => f.write_str("reply line too long"),
            RelayError::TooManyLines => f.write_str("reply has too many lines"),
            RelayError::Closed => f.write_str("connection closed"),
            RelayError::Abandoned => f.write_str("transaction abandoned"),
            RelayError::Misuse(what) => write!(f, "internal error: {what}"),
        }
    }
}

impl std::error::Error for RelayError {}
