//! One accepted message as it goes from the session to the hand-off (the spool, or the next
//! hop in relay modes): the envelope, the content, and what its trace fields are made of.
//!
//! Types only. The session builds them; `spool` and the relay link read them; neither side
//! imports the other.

use std::net::IpAddr;
use std::time::SystemTime;

use crate::helo::verdict::HeloVerdict;

/// The negotiated TLS parameters, for the Received field.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsInfo {
    /// `TLSv1.3` or `TLSv1.2`.
    pub version: String,
    /// IANA name, e.g. `TLS_AES_256_GCM_SHA384`.
    pub cipher: String,
    /// Symmetric key bits, e.g. 256.
    pub bits: u16,
}

/// The protocol name written after `with` in Received (RFC 3848, RFC 6531).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Smtp,
    Esmtp,
    Esmtps,
    Utf8Smtp,
    Utf8Smtps,
}

impl Protocol {
    pub const fn name(self) -> &'static str {
        match self {
            Protocol::Smtp => "SMTP",
            Protocol::Esmtp => "ESMTP",
            Protocol::Esmtps => "ESMTPS",
            Protocol::Utf8Smtp => "UTF8SMTP",
            Protocol::Utf8Smtps => "UTF8SMTPS",
        }
    }
}

/// Everything the trace fields of one message are made of.
#[derive(Clone, Debug)]
pub struct TraceInfo {
    /// HELOGUARD_HOSTNAME.
    pub hostname: String,
    /// The EHLO/HELO argument exactly as sent.
    pub helo: String,
    pub client_ip: IpAddr,
    /// The verdict of the latest accepted EHLO/HELO; carries the confirmed PTR and iprev.
    pub verdict: HeloVerdict,
    /// Present only for a session in TLS.
    pub tls: Option<TlsInfo>,
    pub protocol: Protocol,
    pub queue_id: String,
    pub received_at: SystemTime,
}

/// One accepted message, ready for the hand-off.
#[derive(Clone, Debug)]
pub struct Envelope {
    /// The reverse-path without angle brackets; empty for the null sender `<>`.
    pub reverse_path: String,
    /// Forward-paths without angle brackets, in RCPT order.
    pub recipients: Vec<String>,
    pub trace: TraceInfo,
    /// The message as received: dot-unstuffed, CRLF line ends. `envelope` removes the
    /// X-HELO-Check and Authentication-Results fields that claim our name when it prepends.
    pub content: Vec<u8>,
}
