//! The trace fields of an accepted message, and the Maildir spool.
//!
//! The session builds a `crate::message::Envelope` at the end of DATA/BDAT; `envelope` formats
//! the Return-Path, X-Envelope-To and Received fields and prepends the trace block; `maildir`
//! writes it durably, sharing directory fsyncs through `group_sync`; `writer` runs those
//! writes on the spool writer threads; `spill` holds the content of messages still arriving in
//! tmp/, past what a session keeps in memory.

pub(crate) mod envelope;
pub(crate) mod group_sync;
pub(crate) mod maildir;
pub(crate) mod spill;
pub(crate) mod writer;

/// A plain accepted message for the spool's unit tests: one recipient, a passing verdict;
/// `content` goes through the header filter as the session's would.
#[cfg(test)]
pub(crate) fn test_envelope(queue_id: &str, content: &[u8]) -> crate::message::Envelope {
    use std::net::IpAddr;

    use crate::helo::verdict::{Decision, HeloVerdict, IprevResult};
    use crate::helo::{Action, CheckResult, VerdictKind};
    use crate::message::{Envelope, Protocol, TraceInfo};

    Envelope {
        reverse_path: "a@example.org".to_owned(),
        recipients: vec!["b@example.net".to_owned()],
        trace: TraceInfo {
            hostname: "mx.example.net".to_owned(),
            helo: "mail.example.org".to_owned(),
            client_ip: IpAddr::from([192, 0, 2, 7]),
            verdict: HeloVerdict {
                dnsbl_score: None,
                spf: None,
                dnswl: Vec::new(),
                listed: Vec::new(),
                kind: VerdictKind::Pass,
                shown: [CheckResult::Pass; crate::helo::CHECKS],
                measured: [CheckResult::Pass; crate::helo::CHECKS],
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
        content: crate::message::MessageContent::in_memory(
            crate::message::header::strip_own_fields(content, "mx.example.net"),
        ),
    }
}
