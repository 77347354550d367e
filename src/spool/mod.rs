//! What an accepted message carries to the hand-off, and the Maildir spool.
//!
//! `Envelope` is built by the session at the end of DATA/BDAT; `envelope` formats the
//! Return-Path, X-Envelope-To and Received fields and prepends the trace block; `maildir`
//! writes it durably, sharing directory fsyncs through `group_sync`; `writer` runs those writes on the spool writer threads.

pub mod envelope;
pub mod group_sync;
pub mod header;
pub mod maildir;
pub mod writer;

use std::net::IpAddr;
use std::time::SystemTime;

use crate::helo::policy::HeloVerdict;
use crate::session::TlsInfo;

pub use maildir::SpoolError;

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

/// A plain accepted message for the spool's unit tests: one recipient, a passing verdict.
#[cfg(test)]
pub(crate) fn test_envelope(queue_id: &str, content: &[u8]) -> Envelope {
    use crate::helo::policy::{Decision, IprevResult};
    use crate::helo::{Action, CheckResult, VerdictKind};

    Envelope {
        reverse_path: "a@example.org".to_owned(),
        recipients: vec!["b@example.net".to_owned()],
        trace: TraceInfo {
            hostname: "mx.example.net".to_owned(),
            helo: "mail.example.org".to_owned(),
            client_ip: IpAddr::from([192, 0, 2, 7]),
            verdict: HeloVerdict {
                kind: VerdictKind::Pass,
                shown: [CheckResult::Pass; 11],
                measured: [CheckResult::Pass; 11],
                action: Action::Off,
                failed: Vec::new(),
                allowed_by: None,
                ptr: None,
                iprev: IprevResult::PermError,
                decision: Decision::Accept,
            },
            tls: None,
            protocol: Protocol::Esmtp,
            queue_id: queue_id.to_owned(),
            received_at: std::time::UNIX_EPOCH,
        },
        content: content.to_vec(),
    }
}
