//! The sans-I/O SMTP session state machine (RFC 5321, with PIPELINING, SIZE, 8BITMIME,
//! ENHANCEDSTATUSCODES, SMTPUTF8, CHUNKING and STARTTLS).
//!
//! `Session::handle` takes one `Event` and appends what it has to say to an `Output`: reply
//! bytes, actions for the event loop (look up a HELO name, deliver, start TLS, close) and
//! observations for metrics. It never reads, writes, sleeps or resolves; time comes in as
//! `Now`. When it needs something from outside (a HELO verdict, a delivery result, the TLS
//! handshake) it stops consuming input until the matching event arrives: `wants_input` tells.
//!
//! It takes the settings it reads (`SessionSettings`), never the whole configuration, and
//! learns of the world only through events (`Event::SpoolSpace` included), so it holds no
//! shared state. The parts:
//! - `machine`: `Session` and the plain SMTP dialogue
//! - `identity`: EHLO/HELO identities, their DNS facts and verdicts
//! - `delivery`: the maildir hand-off and the trace information of a message
//! - `relay`: the before-queue relay modes, behind `Session::relaying`
//! - `state`: what a session remembers (identity, transaction, input mode, what it waits for)
//! - `limits`: error and junk counters, the data rate

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use crate::dns::{Lookup, ReverseFacts};
use crate::greylist::{GreylistOutcome, Triplet};
use crate::helo::policy::{AllowEntry, HeloPolicy, RejectAt};
use crate::helo::sender::{ChurnOutcome, DnsblOutcome, RhsblOutcome, SpfOutcome};
use crate::helo::verdict::HeloVerdict;
use crate::message::content::SpillStore;
use crate::message::{Envelope, Protocol, TraceInfo};
use crate::protocol::command::MailParams;
use crate::protocol::data::BareLineFeed;
use crate::protocol::reply::Reply;
use crate::relay::{EightBit, XclientAttrs};

mod data;
mod delivery;
mod identity;
mod limits;
mod machine;
mod relay;
mod sender;
mod state;
#[cfg(test)]
mod tests;

pub use crate::protocol::stage::Stage;
pub use machine::Session;
// Part of `Event::TlsEstablished`; the session's callers name it here.
pub use crate::message::TlsInfo;

/// The time now, from the loop: monotonic for rates and deadlines, wall for Date fields.
#[derive(Clone, Copy, Debug)]
pub struct Now {
    pub mono: Instant,
    pub wall: SystemTime,
}

/// What happened to a message handed off with `SessionAction::Deliver`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeliveryOutcome {
    /// Stored durably (or taken by the next hop): the client gets 250.
    Accepted,
    /// Relay modes: the next hop took the message with this reply; the client gets our 250.
    Relayed(Reply),
    /// Not stored: the client gets exactly this reply (451 4.3.0 for a spool error, 452 4.3.1
    /// below HELOGUARD_MIN_FREE_MB, the next hop's reply in relay modes).
    Failed(Reply),
}

/// An input to the session.
#[derive(Debug)]
pub enum Event<'a> {
    /// Send the banner (after the PROXY header and the greeting delay).
    Greet,
    /// The client talked before the banner (HELOGUARD_GREET_DELAY_MS): 554 5.5.1.
    Pregreeted,
    /// Bytes from the client (plaintext, after TLS). `Output::consumed` says how many were
    /// used; the rest must be offered again, with what arrives later appended.
    Input(&'a [u8]),
    /// PTR of the client and forward confirmation of its names.
    Reverse(ReverseFacts),
    /// A/AAAA of a HELO name that the session asked for.
    Forward {
        name: String,
        addrs: Lookup<Vec<std::net::IpAddr>>,
    },
    /// 2 x HELOGUARD_DNS_TIMEOUT_MS after the EHLO/HELO of this generation: undecided
    /// checks become `temperror`.
    VerdictDeadline {
        generation: u32,
    },
    Delivered(DeliveryOutcome),
    /// The STARTTLS handshake completed.
    TlsEstablished(TlsInfo),
    /// Nothing heard for HELOGUARD_TIMEOUT_SECS: 421 4.4.2, then close.
    IdleTimeout,
    /// SIGTERM: outside a transaction 421 at once; inside, finish the transaction first.
    Shutdown,
    /// HELOGUARD_SHUTDOWN_GRACE_SECS ran out: 421 4.3.2 now.
    GraceExpired,
    /// The spool's filesystem went below HELOGUARD_MIN_FREE_MB (`low`), or back above it:
    /// while low, MAIL gets 452 4.3.1. The loop sends it when the state changes, and to a
    /// new session at once while the space is low.
    SpoolSpace {
        low: bool,
    },
    /// Relay modes: the next hop's answer to `RelayMail` or `RelayRcpt` (or the loop's
    /// 451 4.4.1 when the next hop could not be reached).
    RelayReply(Reply),
    /// The client's score over HELOGUARD_DNSBL, asked by the loop at accept when
    /// `Session::expects_dnsbl` says so.
    Dnsbl(DnsblOutcome),
    /// SPF of a HELO name that `SessionAction::HeloAccepted` asked for.
    Spf {
        name: String,
        outcome: SpfOutcome,
    },
    /// HELOGUARD_RHSBL over the registered domains of a HELO name (asked for in
    /// `HeloAccepted`) and of the client's forward-confirmed PTR name.
    Rhsbl {
        name: String,
        outcome: RhsblOutcome,
    },
    /// The client's HELO history after recording a name `HeloAccepted` asked for.
    Churn {
        name: String,
        outcome: ChurnOutcome,
    },
    /// The state store's answer to `SessionAction::Greylist`.
    Greylist(GreylistOutcome),
}

/// A request from the session to the event loop.
#[derive(Debug)]
pub enum SessionAction {
    /// An EHLO/HELO was accepted: arm the verdict deadline for `generation`, and start what
    /// its checks need. Each name asked for is answered by one event carrying that name:
    /// `lookup` (A/AAAA) by `Event::Forward`, `spf` by `Event::Spf`, `rhsbl` by
    /// `Event::Rhsbl`, `churn` (record the name in the client's HELO history) by
    /// `Event::Churn`.
    HeloAccepted {
        generation: u32,
        lookup: Option<String>,
        spf: Option<String>,
        rhsbl: Option<String>,
        churn: Option<String>,
    },
    /// Greylisting: ask the state store about this triplet; answer with `Event::Greylist`.
    Greylist(Triplet),
    /// Hand this message off; answer with `Event::Delivered`.
    Deliver(Box<Envelope>),
    /// The 220 to STARTTLS is in `bytes`: flush it, discard all unread plaintext, handshake.
    StartTls,
    /// Flush `bytes`, then close the connection.
    Close,
    /// Relay modes: replay MAIL at the next hop (opening the connection if needed); answer
    /// with `Event::RelayReply`. A next-hop transaction left open (RSET, a late refusal) is
    /// reset by the loop before the next MAIL, so no final dot is ever sent for it.
    RelayMail {
        reverse_path: String,
        params: MailParams,
        xclient: XclientAttrs,
    },
    /// Relay modes: replay RCPT at the next hop; answer with `Event::RelayReply`.
    RelayRcpt { forward_path: String },
    /// Relay modes: send DATA to the next hop; answer its reply with `Event::RelayReply`.
    /// On 354 the trace fields go first, then the `RelayChunk`s.
    RelayData {
        trace: Box<TraceInfo>,
        recipients: Vec<String>,
    },
    /// Relay modes: message content (dot-unstuffed, CRLF lines) for the next hop.
    RelayChunk(Vec<u8>),
    /// Relay modes: the message is complete: send the final dot; answer with
    /// `Event::Delivered`. `eight_bit` says where the message holds octets beyond ASCII: a
    /// next hop that did not offer what they need gets no dot, and the client the refusal.
    RelayEndData { eight_bit: EightBit },
    /// Relay modes: the client dropped its transaction before DATA (RSET, EHLO): reset the
    /// next hop's too.
    RelayReset,
    /// Relay modes: the message was refused on the way: drop the next hop's transaction
    /// without its final dot.
    RelayAbort,
}

/// Something worth counting, reported with the output so the session stays free of globals.
#[derive(Clone, Debug)]
pub enum Observation {
    Reply(u16),
    MessageAccepted,
    MessageRejected(Stage),
    /// A verdict was reached (once per accepted EHLO/HELO whose verdict was evaluated; an
    /// EHLO that repeats a decided name keeps its verdict and reports none).
    Verdict {
        verdict: Box<HeloVerdict>,
        /// The EHLO/HELO argument judged (with REJECT_AT=helo, not yet the current one).
        helo: String,
    },
    /// A 4xx/5xx reply that turned the client's identity, sender, recipient or message away
    /// (protocol errors are not refusals): the `refused` log line.
    Refused(Box<Refusal>),
    /// A message was accepted (stored, or taken by the next hop): the `accepted` log line.
    Accepted(Box<AcceptedMessage>),
    /// The state store answered a greylisting question (heloguard_greylist_total).
    Greylisted(GreylistOutcome),
}

/// What a refusal turned away, for the `refused` log line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub stage: Stage,
    /// The EHLO/HELO argument: the refused one at stage `helo`, else the current one.
    pub helo: Option<String>,
    /// The reverse path (empty for `<>`); none at stage `helo`.
    pub from: Option<String>,
    /// The refused recipient at stage `rcpt`, the transaction's recipients at stage `data`.
    pub to: Vec<String>,
    pub reply: Reply,
}

/// A message the session accepted, for the `accepted` log line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AcceptedMessage {
    /// The queue ID of the Received field and the 250 reply.
    pub id: String,
    pub from: String,
    pub to: Vec<String>,
    /// DATA/BDAT octets as received.
    pub size: u64,
    /// The Received field's `with` word.
    pub proto: Protocol,
    /// Relay modes: the next hop's reply to the end of data.
    pub relay: Option<Reply>,
}

/// What one call to `Session::handle` produced.
#[derive(Debug, Default)]
pub struct Output {
    /// Reply bytes to send, in order.
    pub bytes: Vec<u8>,
    /// For `Event::Input`: how many input bytes were used.
    pub consumed: usize,
    pub actions: Vec<SessionAction>,
    pub observations: Vec<Observation>,
}

impl Output {
    /// Empties the output and keeps its buffers, so the next job writes into them without
    /// allocating.
    pub fn clear(&mut self) {
        self.bytes.clear();
        self.consumed = 0;
        self.actions.clear();
        self.observations.clear();
    }
}

/// How a session ended, for the session-end log line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ending {
    Quit,
    Timeout,
    TooManyErrors,
    TooManyJunk,
    Shutdown,
    Pregreet,
    /// Still open (the loop closed it for another reason: EOF, I/O error, TLS error).
    Open,
}

/// Numbers for the session-end log line.
#[derive(Clone, Debug)]
pub struct Summary {
    /// `Session::id`, for the log's `sid=`.
    pub sid: u64,
    pub helo: Option<String>,
    pub verdict: Option<crate::helo::VerdictKind>,
    pub messages: u32,
    pub bytes: u64,
    pub ending: Ending,
}

/// Everything the session knows at accept time.
#[derive(Clone, Debug)]
pub struct SessionParams {
    /// Shared by every session of the server; built once from `Config`.
    pub settings: Arc<SessionSettings>,
    pub client_ip: IpAddr,
    /// Unique per process run; queue IDs are derived from it.
    pub session_id: u64,
    /// HELOGUARD_TLS_CERT/KEY are loaded: EHLO advertises STARTTLS outside TLS.
    pub tls_available: bool,
    /// Where message content past `message::content::MEMORY_PART` goes while it arrives
    /// (maildir mode: the spool's tmp/). None keeps it in memory, for tests and relay modes,
    /// which stream to the next hop instead.
    pub spill: Option<Arc<dyn SpillStore>>,
}

/// What the state machine reads of the configuration, and nothing else: the session depends
/// on these fields, not on `Config` (`impl From<&Config>` in `config` builds it).
#[derive(Clone, Debug)]
pub struct SessionSettings {
    /// HELOGUARD_HOSTNAME: the banner, the EHLO reply, own_name, the trace fields.
    pub hostname: String,
    /// HELOGUARD_DOMAINS: lower case, no trailing dot; empty = every domain.
    pub domains: Vec<String>,
    /// HELOGUARD_MAX_MESSAGE_SIZE in octets; 0 = unlimited.
    pub max_message_size: u64,
    /// HELOGUARD_MAX_RECIPIENTS per transaction; 0 = unlimited.
    pub max_recipients: usize,
    /// HELOGUARD_MIN_DATA_RATE in octets/s; 0 = off.
    pub min_data_rate: u64,
    /// HELOGUARD_MAX_ERRORS; 0 = unlimited.
    pub max_errors: u32,
    /// HELOGUARD_MAX_JUNK; 0 = unlimited.
    pub max_junk: u32,
    /// HELOGUARD_HELO_POLICY.
    pub helo_policy: HeloPolicy,
    /// HELOGUARD_HELO_ALLOW.
    pub helo_allow: Vec<AllowEntry>,
    /// HELOGUARD_REJECT_AT.
    pub reject_at: RejectAt,
    /// HELOGUARD_BARE_NEWLINE.
    pub bare_line_feed: BareLineFeed,
    /// HELOGUARD_DELIVER, as far as the dialogue differs by it.
    pub delivery: DeliveryMode,
    /// What the sender checks need to know of the configuration.
    pub sender_checks: SenderChecks,
}

/// Which sender lookups the configuration makes possible; a check whose action is `off` is
/// not asked for either way.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SenderChecks {
    /// HELOGUARD_DNSBL is set.
    pub dnsbl: bool,
    /// HELOGUARD_RHSBL is set.
    pub rhsbl: bool,
    /// HELOGUARD_HELO_CHURN is not 0.
    pub helo_churn: bool,
}

/// Where accepted messages go, as far as the dialogue differs by it (HELOGUARD_DELIVER).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeliveryMode {
    /// Into the spool; 250 once it is durable.
    Maildir,
    /// Before-queue relay to an SMTP next hop.
    SmtpRelay,
    /// Before-queue relay to an LMTP next hop: one recipient per transaction.
    LmtpRelay,
}
