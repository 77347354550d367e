//! What a session remembers between events: the HELO identities, the mail transaction, the
//! input mode and what it is parked on.
//!
//! Stages are types, not strings (unlike Postfix's `state->where`): a transaction is a struct
//! that RSET, EHLO and STARTTLS drop whole; the input mode says how the next input bytes are
//! read.

use std::net::IpAddr;
use std::time::SystemTime;

use crate::dns::{Lookup, ReverseFacts};
use crate::helo::checks::{CheckInput, HeloArg};
use crate::helo::policy::{AllowEntry, HeloPolicy};
use crate::helo::sender::{ChurnOutcome, DnsblOutcome, RhsblOutcome, SenderFacts, SpfOutcome};
use crate::helo::verdict::HeloVerdict;
use crate::helo::{Action, Check};
use crate::message::MessageContent;
use crate::message::content::ContentBuilder;
use crate::net::{canonical_ip, is_local};
use crate::protocol::command::{MailParams, Verb};
use crate::protocol::data::DataDecoder;
use crate::relay::outbound::OutboundMessage;
use crate::session::{AcceptedMessage, SessionSettings};

/// Runs the checks and the policy on what is known of one identity.
pub(crate) type DecideFn = fn(
    &CheckInput<'_>,
    Option<&Lookup<Vec<IpAddr>>>,
    Option<&ReverseFacts>,
    &SenderFacts,
    &HeloPolicy,
    &[AllowEntry],
) -> HeloVerdict;

/// The HELO functions the session calls; a value so tests can judge without DNS rules.
#[derive(Clone, Copy)]
pub(crate) struct HeloJudge {
    pub parse: fn(&str) -> HeloArg,
    pub decide: DecideFn,
}

impl HeloJudge {
    /// The checks and policy of `crate::helo`.
    pub(crate) const STANDARD: Self = Self {
        parse: crate::helo::checks::parse_helo,
        decide: crate::helo::policy::decide,
    };
}

/// One EHLO/HELO identity that passed the syntax gate, and what is known about it.
#[derive(Clone, Debug)]
pub(crate) struct Identity {
    /// `Verb::Ehlo` or `Verb::Helo`: decides the reply and the Received protocol.
    pub verb: Verb,
    /// The argument as sent (invalid UTF-8 replaced), for the checks and trace fields.
    pub arg: String,
    pub parsed: HeloArg,
    /// Numbers `HeloAccepted`, `VerdictDeadline` and the verdict of this identity.
    pub generation: u32,
    /// A/AAAA of the name, once the loop has answered `HeloAccepted { lookup }`.
    pub forward: Option<Lookup<Vec<IpAddr>>>,
    /// The verdict deadline passed: evaluate with what is known.
    pub deadline_passed: bool,
    pub verdict: Option<HeloVerdict>,
    /// Some enabled check reads the name's A/AAAA records (localhost, forward,
    /// forward_match); with all three off the lookup is not made and not waited for.
    pub needs_forward: bool,
    /// SPF of the name (spf).
    pub spf: Asked<SpfOutcome>,
    /// HELOGUARD_RHSBL over the name's and the PTR name's registered domains (rhsbl).
    pub rhsbl: Asked<RhsblOutcome>,
    /// The client's HELO history with this name recorded (helo_churn).
    pub churn: Asked<ChurnOutcome>,
}

impl Identity {
    pub(super) fn new(
        verb: Verb,
        arg: String,
        parsed: HeloArg,
        generation: u32,
        needs_forward: bool,
    ) -> Self {
        Self {
            verb,
            arg,
            parsed,
            generation,
            forward: None,
            deadline_passed: false,
            verdict: None,
            needs_forward,
            spf: Asked::No,
            rhsbl: Asked::No,
            churn: Asked::No,
        }
    }

    /// The name whose A/AAAA records the checks need, if any.
    pub(super) fn lookup_name(&self) -> Option<&str> {
        match &self.parsed {
            HeloArg::Domain(name) if self.needs_forward => Some(name),
            _ => None,
        }
    }

    /// Every fact the checks need is in (or the deadline made the missing ones temperror).
    /// When spf's action can delay or refuse (`spf_decides`) SPF is waited for past the
    /// deadline: it has its own time limit, HELOGUARD_SPF_TIMEOUT_MS, and always answers.
    pub(super) fn ready_to_judge(
        &self,
        reverse_known: bool,
        dnsbl_waiting: bool,
        spf_decides: bool,
    ) -> bool {
        if spf_decides && self.spf.is_waiting() {
            return false;
        }
        self.deadline_passed
            || (reverse_known
                && !dnsbl_waiting
                && (self.lookup_name().is_none() || self.forward.is_some())
                && !self.spf.is_waiting()
                && !self.rhsbl.is_waiting()
                && !self.churn.is_waiting())
    }

    /// What the sender checks know of this identity, with the session's list score.
    pub(super) fn sender_facts(&self, dnsbl: Option<&DnsblOutcome>) -> SenderFacts {
        SenderFacts {
            spf: self.spf.answer().cloned(),
            dnsbl: dnsbl.cloned(),
            rhsbl: self.rhsbl.answer().cloned(),
            churn: self.churn.answer().copied(),
        }
    }
}

/// One mail transaction (RFC 5321 3.3), from MAIL to the final reply.
#[derive(Debug)]
pub(crate) struct Transaction {
    /// Without angle brackets; empty for `<>`.
    pub reverse_path: String,
    /// MAIL ... SMTPUTF8 (RFC 6531).
    pub smtputf8: bool,
    /// Forward-paths without angle brackets, in RCPT order.
    pub recipients: Vec<String>,
    /// The message so far once a BDAT was accepted (RFC 3030); DATA is then refused.
    pub chunks: Option<DataDecoder>,
    /// Relay modes: the message being passed on to the next hop.
    pub relay: Option<OutboundMessage>,
    /// Maildir mode: the message so far, filtered, in memory or spilled. Dropped with the
    /// transaction, which removes its spill.
    pub content: Option<ContentBuilder>,
    /// The session's DATA/BDAT octets before this transaction, for the message's size.
    pub octets_before: u64,
    /// A 452 for too many recipients was logged (once per transaction is enough).
    pub too_many_noted: bool,
}

impl Transaction {
    pub(super) fn new(reverse_path: &str, smtputf8: bool) -> Self {
        Self {
            reverse_path: reverse_path.to_string(),
            smtputf8,
            recipients: Vec::new(),
            chunks: None,
            relay: None,
            content: None,
            octets_before: 0,
            too_many_noted: false,
        }
    }
}

/// The decoder of the message being received: DATA's own, or the transaction's BDAT decoder
/// that every chunk feeds.
pub(crate) fn content_decoder<'a>(
    mode: &'a mut InputMode,
    chunks: &'a mut Option<DataDecoder>,
) -> Option<&'a mut DataDecoder> {
    match mode {
        InputMode::Data(decoder) => Some(decoder),
        _ => chunks.as_mut(),
    }
}

/// How the next input bytes are read.
#[derive(Debug)]
pub(crate) enum InputMode {
    /// Command lines.
    Command,
    /// DATA content up to CRLF.CRLF.
    Data(DataDecoder),
    /// The octets of an accepted BDAT chunk, into the transaction's decoder.
    Chunk {
        size: u64,
        remaining: u64,
        last: bool,
    },
    /// The octets of a refused BDAT chunk, read and dropped to stay in sync (RFC 3030 3).
    SkipChunk { remaining: u64 },
}

/// What the session waits for; no input is consumed meanwhile.
#[derive(Debug)]
pub(crate) enum Park {
    /// `Event::Greet` or `Event::Pregreeted`.
    Greeting,
    /// REJECT_AT=helo: the verdict on the candidate identity, to answer its EHLO/HELO.
    HeloVerdict,
    /// REJECT_AT=rcpt: the verdict, to answer this RCPT.
    RcptVerdict { recipient: String },
    /// Greylisting: the state store's answer for this RCPT's triplet.
    Greylist { recipient: String },
    /// The message is complete; its trace fields need the verdict.
    DataVerdict {
        content: MessageContent,
        received_at: SystemTime,
    },
    /// `Event::Delivered` for this message (its queue ID and what the log says of it).
    Delivery(Box<AcceptedMessage>),
    /// `Event::TlsEstablished` after our 220 to STARTTLS.
    Tls,
    /// Relay modes: the next hop, or what must be known before it is asked.
    Relay(RelayPark),
}

/// Relay modes: what the session waits for from the next hop, or before it can ask the next hop.
#[derive(Debug)]
pub(crate) enum RelayPark {
    /// The reverse DNS facts (or the verdict deadline) before this MAIL is replayed, because
    /// the next-hop link it opens carries them in XCLIENT NAME.
    MailReverse {
        reverse_path: String,
        params: MailParams,
    },
    /// The next hop's answer to MAIL.
    Mail {
        reverse_path: String,
        smtputf8: bool,
    },
    /// The next hop's answer to RCPT.
    Rcpt { recipient: String },
    /// DATA (or the first BDAT) waits for the verdict, which the trace fields carry, before
    /// the next hop is asked for its DATA.
    DataVerdict {
        chunk: Option<BdatChunk>,
        received_at: SystemTime,
    },
    /// The next hop's answer to DATA (354 or a refusal).
    DataStart {
        chunk: Option<BdatChunk>,
        queue_id: String,
    },
}

/// The BDAT command that opened a relayed message: its octets follow the command.
#[derive(Clone, Copy, Debug)]
pub(crate) struct BdatChunk {
    pub size: u64,
    pub last: bool,
}

/// One lookup an identity may ask for, by name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Asked<T> {
    /// Not asked: the check does not apply or is off.
    No,
    /// Asked for `name`; the answer has not come.
    Waiting(String),
    Answered(T),
}

impl<T> Asked<T> {
    /// Waiting for `name` when it was asked for, else not asked.
    pub(crate) fn for_name(name: Option<&String>) -> Self {
        match name {
            Some(name) => Asked::Waiting(name.clone()),
            None => Asked::No,
        }
    }

    pub(crate) fn answer(&self) -> Option<&T> {
        match self {
            Asked::Answered(value) => Some(value),
            _ => None,
        }
    }

    pub(crate) fn is_waiting(&self) -> bool {
        matches!(self, Asked::Waiting(_))
    }

    /// Takes `value` when it answers the name waited for.
    pub(crate) fn take(&mut self, name: &str, value: T) {
        if matches!(self, Asked::Waiting(waited) if waited.eq_ignore_ascii_case(name)) {
            *self = Asked::Answered(value);
        }
    }
}

/// Whether the loop asks HELOGUARD_DNSBL about this client at accept: the lists are set, the
/// dnsbl check is not off, and the client is neither local nor allowed by address (SPEC:
/// `dnsbl_score=0`, not queried).
pub(crate) fn dnsbl_applies(settings: &SessionSettings, client_ip: IpAddr) -> bool {
    let ip = canonical_ip(client_ip);
    settings.sender_checks.dnsbl
        && settings.helo_policy.action(Check::Dnsbl) != Action::Off
        && !is_local(ip)
        && !settings
            .helo_allow
            .iter()
            .any(|entry| matches!(entry, AllowEntry::Net(net) if net.contains(ip)))
}
