//! `Session`: the SMTP dialogue of RFC 5321 as a state machine over `Event`s.
//!
//! One call to `handle` runs as far as it can: `Event::Input` answers every complete command
//! in the buffer in order (RFC 2920 pipelining: replies go out in one batch), and stops where
//! the answer needs something from outside: a HELO verdict, a delivery, a TLS handshake. The
//! event that brings it (`Reverse`, `Forward`, `VerdictDeadline`, `Delivered`,
//! `TlsEstablished`) writes the held reply; the loop then offers the unread input again.
//!
//! Order of checks for one command line (after Postfix `smtpd_proto`): pregreet mode, junk
//! limit, "HELO first", syntax, the command, then the error limit on its reply.
//!
//! Decisions worth knowing:
//! - The error limit (HELOGUARD_MAX_ERRORS) counts every 5xx reply to a command or message;
//!   the reply that takes the count past the limit is followed by 421 4.7.0 and close.
//! - A RCPT (or, with REJECT_AT=helo, an EHLO) waits for the verdict only when the policy can
//!   refuse at all (some check set to defer or reject, `syntax=reject` aside, which acts at the
//!   EHLO itself). Otherwise the verdict is needed only for the trace fields at the end of the
//!   message, and DNS latency stays hidden behind the dialogue.
//! - 354 carries `2.0.0` like every other reply but the banner and EHLO/HELO (SPEC).

use std::time::SystemTime;

use crate::config::{BareNewline, DeliverTarget};
use crate::dns::Lookup;
use crate::helo::checks::{CheckInput, HeloArg, name_key};
use crate::helo::policy::{Decision, RejectAt};
use crate::helo::{Action, Check};
use crate::protocol::command::{Command, MailParams, Path, Verb};
use crate::protocol::data::{BareLineFeed, DataDecoder, DataLimits, DataRefusal, Framing};
use crate::protocol::line::{LineRead, LineReader};
use crate::protocol::reply::Reply;
use crate::relay::{XclientAttrs, XclientName};
use crate::session::limits::{Counters, DataRate};
use crate::session::state::{
    BdatChunk, HeloJudge, Identity, Park, Phase, RelayStream, Transaction,
};
use crate::session::{
    DeliveryOutcome, Ending, Event, Now, Observation, Output, SessionAction, SessionParams, Stage,
    Summary, TlsInfo,
};
use crate::spool::header::HeaderFilter;
use crate::spool::{Envelope, Protocol, TraceInfo};

/// Refused identities remembered per session (REJECT_AT=helo), so a repeat gets the same answer.
const REMEMBERED_REFUSALS: usize = 16;

/// The EHLO/HELO argument as text: valid UTF-8 is kept, and each octet of an invalid sequence
/// becomes one `?`, so headers show one `?` per octet (SPEC) and never a 3-octet U+FFFD.
fn helo_text(arg: &[u8]) -> String {
    let mut text = String::with_capacity(arg.len());
    for chunk in arg.utf8_chunks() {
        text.push_str(chunk.valid());
        text.extend(std::iter::repeat_n('?', chunk.invalid().len()));
    }
    text
}

/// Whether the banner went out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Greeting {
    Waiting,
    Greeted,
    /// The client talked first: 503 to everything but QUIT.
    Pregreeted,
}

/// One SMTP session, sans I/O.
pub struct Session {
    params: SessionParams,
    judge: HeloJudge,
    /// Some check other than the syntax gate can defer or reject: the verdict gates replies.
    policy_can_refuse: bool,
    greeting: Greeting,
    /// Command lines and the overlong-line skip mode.
    lines: LineReader,
    phase: Phase,
    park: Option<Park>,
    closed: bool,
    ending: Ending,
    /// The identity of the latest accepted EHLO/HELO.
    current: Option<Identity>,
    /// REJECT_AT=helo: an identity whose EHLO/HELO waits for its verdict.
    candidate: Option<Identity>,
    /// Identities refused at EHLO/HELO (as `name_key`), with their reply (RFC 5321 4.1.4: the
    /// session stays).
    refused: Vec<(String, Reply)>,
    /// PTR facts of the client, once per session.
    reverse: Option<crate::dns::ReverseFacts>,
    /// Generation of the latest identity that passed the syntax gate.
    generation: u32,
    tx: Option<Transaction>,
    tls: Option<TlsInfo>,
    counters: Counters,
    /// The DATA/BDAT transfer in progress, for HELOGUARD_MIN_DATA_RATE.
    rate: Option<DataRate>,
    /// SIGTERM came during a transaction: close after it.
    draining: bool,
    /// Messages accepted.
    messages: u32,
    /// Messages handed off (queue ID numbering).
    handed_off: u32,
    /// DATA/BDAT octets read.
    bytes: u64,
}

impl Session {
    pub fn new(params: SessionParams) -> Self {
        Self::with_judge(params, HeloJudge::STANDARD)
    }

    pub(crate) fn with_judge(params: SessionParams, judge: HeloJudge) -> Self {
        let policy = &params.config.helo_policy;
        let policy_can_refuse = Check::ALL.into_iter().any(|check| {
            let action = policy.action(check);
            action >= Action::Defer && !(check == Check::Syntax && action == Action::Reject)
        });
        Self {
            params,
            judge,
            policy_can_refuse,
            greeting: Greeting::Waiting,
            lines: LineReader::new(),
            phase: Phase::Command,
            park: Some(Park::Greeting),
            closed: false,
            ending: Ending::Open,
            current: None,
            candidate: None,
            refused: Vec::new(),
            reverse: None,
            generation: 0,
            tx: None,
            tls: None,
            counters: Counters::default(),
            rate: None,
            draining: false,
            messages: 0,
            handed_off: 0,
            bytes: 0,
        }
    }

    /// Tests: make the verdict gate RCPT/EHLO whatever the policy says (the policy parser
    /// lives in `helo`).
    #[cfg(test)]
    pub(crate) fn set_policy_can_refuse(&mut self, can_refuse: bool) {
        self.policy_can_refuse = can_refuse;
    }

    /// Tests: the flag the loop sets when the spool runs low.
    #[cfg(test)]
    pub(crate) fn spool_flag(&self) -> std::sync::Arc<std::sync::atomic::AtomicBool> {
        std::sync::Arc::clone(&self.params.spool_space_low)
    }

    /// Processes one event, appending replies, actions and observations to `out`.
    pub fn handle(&mut self, event: Event<'_>, now: Now, out: &mut Output) {
        if let Event::Input(_) = event {
            out.consumed = 0;
        }
        if self.closed {
            return;
        }
        match event {
            Event::Greet => self.on_greeting(Greeting::Greeted, out),
            Event::Pregreeted => self.on_greeting(Greeting::Pregreeted, out),
            Event::Input(input) => out.consumed = self.on_input(input, now, out),
            Event::Reverse(facts) => {
                if self.reverse.is_none() {
                    self.reverse = Some(facts);
                }
                self.evaluate(out);
            }
            Event::Forward { name, addrs } => {
                for identity in [self.candidate.as_mut(), self.current.as_mut()]
                    .into_iter()
                    .flatten()
                {
                    let wanted = identity
                        .lookup_name()
                        .is_some_and(|n| n.eq_ignore_ascii_case(&name));
                    if wanted && identity.forward.is_none() {
                        identity.forward = Some(addrs.clone());
                    }
                }
                self.evaluate(out);
            }
            Event::VerdictDeadline { generation } => {
                for identity in [self.candidate.as_mut(), self.current.as_mut()]
                    .into_iter()
                    .flatten()
                {
                    if identity.generation == generation {
                        identity.deadline_passed = true;
                    }
                }
                self.evaluate(out);
            }
            Event::Delivered(outcome) => self.on_delivered(outcome, out),
            Event::RelayReply(reply) => self.on_relay_reply(reply, now, out),
            Event::TlsEstablished(info) => self.on_tls(info, out),
            Event::IdleTimeout => self.close(
                out,
                421,
                "4.4.2",
                "Timeout exceeded, closing connection",
                Ending::Timeout,
            ),
            Event::Shutdown => {
                if self.in_transaction() {
                    // Let the transaction finish; `check_draining` closes after its last reply.
                    self.draining = true;
                } else {
                    self.close_for_shutdown(out);
                }
            }
            Event::GraceExpired => self.close_for_shutdown(out),
        }
        self.check_draining(out);
    }

    /// The client's address (after a PROXY header, the client the proxy names).
    pub fn client_ip(&self) -> std::net::IpAddr {
        self.params.client_ip
    }

    /// False while parked (waiting for a verdict, a delivery, TLS, the greeting) or closed.
    pub fn wants_input(&self) -> bool {
        !self.closed && self.park.is_none()
    }

    /// Parked on an answer the loop will bring without more from the client (a verdict, a
    /// delivery, a next-hop reply, the greeting): a client that has half-closed its side must
    /// still get that reply. A TLS handshake needs the client's bytes, so it is not one.
    pub fn awaits_loop(&self) -> bool {
        !self.closed
            && self
                .park
                .as_ref()
                .is_some_and(|park| !matches!(park, Park::Tls))
    }

    /// Between MAIL and the final reply of its message.
    pub fn in_transaction(&self) -> bool {
        self.tx.is_some()
            || matches!(
                self.park,
                Some(
                    Park::DataVerdict { .. }
                        | Park::Delivery { .. }
                        | Park::RelayMailReverse { .. }
                        | Park::RelayMail { .. }
                        | Park::RelayRcpt { .. }
                        | Park::RelayDataVerdict { .. }
                        | Park::RelayDataStart { .. }
                )
            )
    }

    pub fn is_closed(&self) -> bool {
        self.closed
    }

    /// Message octets this session holds in memory: the DATA or BDAT content received so far,
    /// or a complete message waiting for its verdict. Never above HELOGUARD_MAX_MESSAGE_SIZE
    /// when that is set; input bytes not yet consumed are the connection's, not counted here.
    pub fn buffered_bytes(&self) -> usize {
        let data = match &self.phase {
            Phase::Data(decoder) => decoder.buffered(),
            _ => 0,
        };
        let chunks = self
            .tx
            .as_ref()
            .and_then(|tx| tx.chunks.as_ref())
            .map_or(0, |decoder| decoder.buffered());
        let parked = match &self.park {
            Some(Park::DataVerdict { content, .. }) => content.len(),
            _ => 0,
        };
        data + chunks + parked
    }

    pub fn summary(&self) -> Summary {
        let current = self.current.as_ref();
        Summary {
            helo: current.map(|id| id.arg.clone()),
            verdict: current.and_then(|id| id.verdict.as_ref()).map(|v| v.kind),
            messages: self.messages,
            bytes: self.bytes,
            ending: self.ending,
        }
    }

    fn on_greeting(&mut self, greeting: Greeting, out: &mut Output) {
        if self.greeting != Greeting::Waiting {
            return;
        }
        self.greeting = greeting;
        self.park = None;
        if greeting == Greeting::Greeted {
            let banner = format!("{} ESMTP heloguard", self.params.config.hostname);
            self.send(out, &Reply::plain(220, &banner));
        } else {
            self.send_line(
                out,
                554,
                "5.5.1",
                "Protocol error: client talked before the greeting",
            );
        }
    }

    /// Runs everything complete in `input`; returns how much was used.
    fn on_input(&mut self, input: &[u8], now: Now, out: &mut Output) -> usize {
        let mut pos = 0;
        while !self.closed && self.park.is_none() {
            let rest = &input[pos..];
            let used = match &mut self.phase {
                Phase::Command => match self.lines.read(rest) {
                    LineRead::Line { line, consumed } => {
                        self.on_line(line, now, out);
                        consumed
                    }
                    LineRead::TooLong { consumed } => {
                        self.reply(out, Reply::new(500, "5.5.6", "Line too long"));
                        consumed
                    }
                    LineRead::Partial { consumed } => {
                        pos += consumed;
                        break;
                    }
                },
                Phase::Data(decoder) => {
                    if rest.is_empty() {
                        break;
                    }
                    let feed = decoder.feed(rest);
                    if feed.complete {
                        let Phase::Data(decoder) =
                            std::mem::replace(&mut self.phase, Phase::Command)
                        else {
                            unreachable!("matched Phase::Data above")
                        };
                        self.count_data(feed.consumed);
                        self.end_of_message(decoder.finish(), now, out);
                        pos += feed.consumed;
                        continue;
                    }
                    self.count_data(feed.consumed);
                    self.relay_forward(out);
                    feed.consumed
                }
                Phase::Chunk { remaining, .. } | Phase::SkipChunk { remaining } => {
                    if *remaining == 0 {
                        self.chunk_done(now, out);
                        continue;
                    }
                    if rest.is_empty() {
                        break;
                    }
                    let n = rest
                        .len()
                        .min(usize::try_from(*remaining).unwrap_or(usize::MAX));
                    *remaining -= n as u64;
                    if let (Phase::Chunk { .. }, Some(tx)) = (&self.phase, self.tx.as_mut())
                        && let Some(decoder) = tx.chunks.as_mut()
                    {
                        decoder.feed(&rest[..n]);
                    }
                    self.count_data(n);
                    self.relay_forward(out);
                    n
                }
            };
            pos += used;
            if pos >= input.len() && matches!(self.phase, Phase::Command) {
                break;
            }
        }
        if let Some(rate) = self.rate
            && !self.closed
            && rate.too_slow(now.mono, self.params.config.min_data_rate)
        {
            self.close(
                out,
                421,
                "4.4.2",
                "Data rate too low, closing connection",
                Ending::Timeout,
            );
        }
        pos
    }

    fn count_data(&mut self, octets: usize) {
        self.bytes = self.bytes.saturating_add(octets as u64);
        if let Some(rate) = self.rate.as_mut() {
            rate.add(octets);
        }
    }

    fn on_line(&mut self, line: &[u8], now: Now, out: &mut Output) {
        let parsed = Command::parse(line);
        if self.greeting == Greeting::Pregreeted {
            match parsed {
                Ok(Command::Quit) => self.close(out, 221, "2.0.0", "Bye", Ending::Pregreet),
                _ => self.send_line(
                    out,
                    503,
                    "5.5.1",
                    "Protocol error: client talked before the greeting",
                ),
            }
            return;
        }
        let verb = match &parsed {
            Ok(command) => Some(command.verb()),
            Err(error) => error.verb(),
        };
        if let Some(verb) = verb {
            if verb.counts_as_junk() && self.counters.junk_over(self.params.config.max_junk) {
                self.close(
                    out,
                    421,
                    "4.7.0",
                    "Too many junk commands, closing connection",
                    Ending::TooManyJunk,
                );
                return;
            }
            // RFC 5321 4.1.4: a session starts with EHLO or HELO.
            if !verb.allowed_before_helo() && self.current.is_none() {
                self.reply(out, Reply::new(503, "5.5.1", "Send EHLO or HELO first"));
                return;
            }
        }
        match parsed {
            Err(error) => self.reply(out, error.reply()),
            Ok(command) => self.run(command, now, out),
        }
    }

    fn run(&mut self, command: Command<'_>, now: Now, out: &mut Output) {
        match command {
            Command::Helo(arg) => self.on_helo(Verb::Helo, arg, out),
            Command::Ehlo(arg) => self.on_helo(Verb::Ehlo, arg, out),
            Command::Mail { from, params } => self.on_mail(from, params, out),
            Command::Rcpt { to } => self.on_rcpt(to, out),
            Command::Data => self.on_data(now, out),
            Command::Bdat { size, last } => self.on_bdat(size, last, now, out),
            Command::Rset => {
                self.drop_transaction(out);
                self.reply(out, Reply::new(250, "2.0.0", "Ok"));
            }
            Command::Noop => self.reply(out, Reply::new(250, "2.0.0", "Ok")),
            // RFC 5321 3.5.3: 252 when the server will not verify but will accept.
            Command::Vrfy => self.reply(
                out,
                Reply::new(
                    252,
                    "2.5.0",
                    "Cannot VRFY user, but will accept message and attempt delivery",
                ),
            ),
            Command::Help => self.reply(
                out,
                Reply::new(
                    214,
                    "2.0.0",
                    "Commands: EHLO HELO MAIL RCPT DATA BDAT RSET NOOP VRFY HELP QUIT STARTTLS",
                ),
            ),
            Command::Quit => self.close(out, 221, "2.0.0", "Bye", Ending::Quit),
            Command::StartTls => self.on_starttls(out),
        }
    }

    fn on_helo(&mut self, verb: Verb, arg: &[u8], out: &mut Output) {
        let arg = helo_text(arg);
        // SPEC: a refused identity stays refused when repeated, or sent with the other verb
        // (names compare case-insensitively and without a trailing dot).
        let key = name_key(&arg);
        if let Some((_, reply)) = self.refused.iter().find(|(refused, _)| *refused == key) {
            let reply = reply.clone();
            out.observations
                .push(Observation::MessageRejected(Stage::Helo));
            self.reply(out, reply);
            return;
        }
        let parsed = (self.judge.parse)(&arg);
        let config = &self.params.config;
        if parsed == HeloArg::Invalid && config.helo_policy.action(Check::Syntax) == Action::Reject
        {
            // RFC 5321 4.1.4: a refused EHLO leaves the session as it was.
            self.reply(
                out,
                Reply::new(501, "5.5.2", "Invalid HELO/EHLO argument: use a domain name or an address literal (RFC 5321 4.1.1.1)"),
            );
            return;
        }
        self.generation = self.generation.wrapping_add(1);
        let needs_forward = [Check::Localhost, Check::Forward, Check::ForwardMatch]
            .into_iter()
            .any(|check| config.helo_policy.action(check) != Action::Off);
        let identity = Identity::new(verb, arg, parsed, self.generation, needs_forward);
        out.actions.push(SessionAction::HeloAccepted {
            generation: self.generation,
            lookup: identity.lookup_name().map(str::to_string),
        });
        if config.reject_at == RejectAt::Helo && self.policy_can_refuse {
            self.candidate = Some(identity);
            self.park = Some(Park::HeloVerdict);
        } else {
            self.adopt(identity, out);
        }
        self.evaluate(out);
    }

    /// The identity is accepted: it replaces the old one and resets the transaction.
    fn adopt(&mut self, identity: Identity, out: &mut Output) {
        let config = &self.params.config;
        let reply = if identity.verb == Verb::Ehlo {
            let mut lines = vec![
                config.hostname.clone(),
                "PIPELINING".to_string(),
                format!("SIZE {}", config.max_message_size),
                "8BITMIME".to_string(),
                "ENHANCEDSTATUSCODES".to_string(),
                "SMTPUTF8".to_string(),
                "CHUNKING".to_string(),
            ];
            if self.params.tls_available && self.tls.is_none() {
                lines.push("STARTTLS".to_string());
            }
            Reply { code: 250, lines }
        } else {
            Reply::plain(250, &config.hostname)
        };
        self.current = Some(identity);
        self.drop_transaction(out);
        self.reply(out, reply);
    }

    /// Ends the open transaction, if any: a message already streaming to the next hop (after
    /// a BDAT that was not LAST) is aborted there, never finished with a dot, and the data-rate
    /// clock, which only runs while message data is due, stops.
    fn drop_transaction(&mut self, out: &mut Output) {
        if let Some(stream) = self.tx.as_mut().and_then(|tx| tx.relay.as_mut()) {
            abort_relay(stream, out);
        }
        self.tx = None;
        self.rate = None;
    }

    /// Judges every identity whose facts are in, then resumes what waited for a verdict.
    fn evaluate(&mut self, out: &mut Output) {
        let reverse = self.reverse.as_ref();
        let config = &self.params.config;
        for identity in [self.candidate.as_mut(), self.current.as_mut()]
            .into_iter()
            .flatten()
        {
            if identity.verdict.is_some() || !identity.ready_to_judge(reverse.is_some()) {
                continue;
            }
            let input = CheckInput {
                client_ip: self.params.client_ip,
                helo: &identity.arg,
                hostname: &config.hostname,
                domains: &config.domains,
            };
            let verdict = (self.judge.decide)(
                &input,
                identity.forward.as_ref(),
                reverse,
                &config.helo_policy,
                &config.helo_allow,
            );
            out.observations
                .push(Observation::Verdict(Box::new(verdict.clone())));
            identity.verdict = Some(verdict);
        }
        self.resume(out);
    }

    /// Answers what was parked on a verdict, if the verdict is there.
    fn resume(&mut self, out: &mut Output) {
        match self.park.take() {
            Some(Park::HeloVerdict) => {
                let decision = self
                    .candidate
                    .as_ref()
                    .and_then(|id| id.verdict.as_ref())
                    .map(|v| v.decision.clone());
                match (decision, self.candidate.take()) {
                    (Some(Decision::Accept), Some(identity)) => self.adopt(identity, out),
                    (Some(Decision::Refuse(reply)), Some(identity)) => {
                        // A policy refusal sticks to the identity (sending it again, or with
                        // the other verb, must not get through). A 451 for undecided DNS is
                        // not a judgement: the next try runs the checks again.
                        if reply.code != 451 {
                            if self.refused.len() == REMEMBERED_REFUSALS {
                                self.refused.remove(0);
                            }
                            self.refused.push((name_key(&identity.arg), reply.clone()));
                        }
                        out.observations
                            .push(Observation::MessageRejected(Stage::Helo));
                        self.reply(out, reply);
                    }
                    (_, candidate) => {
                        self.candidate = candidate;
                        self.park = Some(Park::HeloVerdict);
                    }
                }
            }
            Some(Park::RelayDataVerdict { chunk, received_at }) => {
                if self.current_decision().is_some() {
                    self.start_relay_data(chunk, received_at, out);
                } else {
                    self.park = Some(Park::RelayDataVerdict { chunk, received_at });
                }
            }
            Some(Park::RcptVerdict { recipient }) => match self.current_decision() {
                Some(decision) => self.answer_rcpt(recipient, decision, out),
                None => self.park = Some(Park::RcptVerdict { recipient }),
            },
            Some(Park::DataVerdict {
                content,
                received_at,
            }) => {
                if self.current_decision().is_some() {
                    self.deliver(content, received_at, out);
                } else {
                    self.park = Some(Park::DataVerdict {
                        content,
                        received_at,
                    });
                }
            }
            Some(Park::RelayMailReverse {
                reverse_path,
                params,
            }) => {
                if self.reverse_settled() {
                    self.relay_mail(reverse_path, params, out);
                } else {
                    self.park = Some(Park::RelayMailReverse {
                        reverse_path,
                        params,
                    });
                }
            }
            other => self.park = other,
        }
    }

    /// Relaying: DATA (or the first BDAT) has its verdict; ask the next hop for DATA.
    fn start_relay_data(
        &mut self,
        chunk: Option<BdatChunk>,
        received_at: SystemTime,
        out: &mut Output,
    ) {
        let Some(tx) = self.tx.take() else {
            self.reply(out, Reply::new(503, "5.5.1", "Need MAIL command"));
            return;
        };
        let Some(trace) = self.trace_info(&tx, received_at) else {
            self.reply(out, Reply::new(451, "4.3.0", "Local error in processing"));
            return;
        };
        let queue_id = trace.queue_id.clone();
        out.actions.push(SessionAction::RelayData {
            trace: Box::new(trace),
            recipients: tx.recipients.clone(),
        });
        self.tx = Some(tx);
        self.park = Some(Park::RelayDataStart { chunk, queue_id });
    }

    /// The next hop answered DATA: on 354 the client's message streams through.
    fn on_relay_data_start(
        &mut self,
        reply: Reply,
        chunk: Option<BdatChunk>,
        queue_id: String,
        now: Now,
        out: &mut Output,
    ) {
        let limits = self.data_limits();
        if reply.code != 354 {
            out.observations
                .push(Observation::MessageRejected(Stage::Data));
            self.tx = None;
            if let Some(c) = chunk {
                // RFC 3030 3: the chunk's octets follow whatever the answer.
                self.phase = Phase::SkipChunk { remaining: c.size };
            }
            self.reply(out, reply);
            return;
        }
        let Some(tx) = self.tx.as_mut() else {
            return;
        };
        tx.relay = Some(RelayStream {
            queue_id,
            ..RelayStream::default()
        });
        self.rate = Some(DataRate::start(now.mono));
        match chunk {
            None => {
                self.phase = Phase::Data(DataDecoder::new(Framing::Dot, limits));
                self.reply(
                    out,
                    Reply::new(354, "2.0.0", "End data with <CR><LF>.<CR><LF>"),
                );
            }
            Some(BdatChunk { size, last }) => {
                tx.chunks = Some(DataDecoder::new(Framing::Chunked, limits));
                self.phase = Phase::Chunk {
                    size,
                    remaining: size,
                    last,
                };
            }
        }
    }

    /// Relaying: passes on what the decoder has so far (the header once it is complete), or
    /// drops the next hop's transaction as soon as the message is refused.
    fn relay_forward(&mut self, out: &mut Output) {
        let Some(tx) = self.tx.as_mut() else {
            return;
        };
        let Some(stream) = tx.relay.as_mut() else {
            return;
        };
        let decoder = match &mut self.phase {
            Phase::Data(decoder) => Some(decoder),
            _ => tx.chunks.as_mut(),
        };
        let Some(decoder) = decoder else {
            return;
        };
        if decoder.is_refused() {
            abort_relay(stream, out);
            return;
        }
        let content = decoder.take_content();
        push_relay_content(stream, content, false, &self.params.config.hostname, out);
    }

    fn current_decision(&self) -> Option<Decision> {
        let verdict = self.current.as_ref()?.verdict.as_ref()?;
        Some(verdict.decision.clone())
    }

    fn on_mail(&mut self, from: Path<'_>, params: MailParams, out: &mut Output) {
        let config = &self.params.config;
        if self.draining {
            self.close_for_shutdown(out);
            return;
        }
        if self.tx.is_some() {
            self.reply(out, Reply::new(503, "5.5.1", "Nested MAIL command"));
            return;
        }
        if self
            .params
            .spool_space_low
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            out.observations
                .push(Observation::MessageRejected(Stage::Mail));
            self.reply(out, Reply::new(452, "4.3.1", "Insufficient system storage"));
            return;
        }
        // RFC 6531 3.4: UTF-8 addresses only in an SMTPUTF8 transaction.
        if !params.smtputf8 && !from.mailbox.is_ascii() {
            self.reply(
                out,
                Reply::new(553, "5.6.7", "Non-ASCII address requires SMTPUTF8"),
            );
            return;
        }
        let max = config.max_message_size;
        if max != 0 && params.size.is_some_and(|size| size > max) {
            out.observations
                .push(Observation::MessageRejected(Stage::Mail));
            self.reply(
                out,
                Reply::new(
                    552,
                    "5.3.4",
                    "Message size exceeds fixed maximum message size",
                ),
            );
            return;
        }
        if config.deliver != DeliverTarget::Maildir {
            let reverse_path = from.mailbox.to_string();
            if self.reverse_settled() {
                self.relay_mail(reverse_path, params, out);
            } else {
                // The first MAIL opens the next-hop link, whose XCLIENT NAME is the PTR name:
                // an EHLO answered before the reverse lookup (policy `tag`) must not make it
                // [TEMPUNAVAIL].
                self.park = Some(Park::RelayMailReverse {
                    reverse_path,
                    params,
                });
            }
            return;
        }
        self.tx = Some(Transaction::new(from.mailbox, params.smtputf8));
        self.reply(out, Reply::new(250, "2.1.0", "Ok"));
    }

    /// Before-queue relay: the client's MAIL gets the next hop's answer.
    fn relay_mail(&mut self, reverse_path: String, params: MailParams, out: &mut Output) {
        out.actions.push(SessionAction::RelayMail {
            reverse_path: reverse_path.clone(),
            params,
            xclient: self.xclient_attrs(),
        });
        self.park = Some(Park::RelayMail {
            reverse_path,
            smtputf8: params.smtputf8,
        });
    }

    /// The reverse DNS facts are in, or the verdict deadline of the current identity passed
    /// without them (XCLIENT then says [TEMPUNAVAIL]).
    fn reverse_settled(&self) -> bool {
        self.reverse.is_some() || self.current.as_ref().is_some_and(|id| id.deadline_passed)
    }

    /// What XCLIENT tells the next hop about the client (Postfix XCLIENT_README).
    fn xclient_attrs(&self) -> XclientAttrs {
        let ip = self.params.client_ip;
        let name = match self.reverse.as_ref() {
            None => XclientName::TempUnavailable,
            Some(facts) => match facts.confirmed_name(ip) {
                Some(name) => XclientName::Name(name.to_string()),
                // Postfix turns [TEMPUNAVAIL] into a 4xx, never a 5xx: use it while
                // the PTR side is undecided.
                None if matches!(facts.ptr, Lookup::TempError(_)) => XclientName::TempUnavailable,
                None => XclientName::Unavailable,
            },
        };
        let current = self.current.as_ref();
        XclientAttrs {
            addr: ip,
            name,
            helo: current.map(|id| id.arg.clone()),
            proto: match current.map(|id| id.verb) {
                Some(Verb::Ehlo) => "ESMTP",
                _ => "SMTP",
            },
        }
    }

    /// The next hop answered the replayed MAIL or RCPT.
    fn on_relay_reply(&mut self, reply: Reply, now: Now, out: &mut Output) {
        let accepted = (200..300).contains(&reply.code);
        match self.park.take() {
            Some(Park::RelayMail {
                reverse_path,
                smtputf8,
            }) => {
                if accepted {
                    self.tx = Some(Transaction::new(&reverse_path, smtputf8));
                    self.reply(out, Reply::new(250, "2.1.0", "Ok"));
                } else {
                    out.observations
                        .push(Observation::MessageRejected(Stage::Mail));
                    self.reply(out, reply);
                }
            }
            Some(Park::RelayRcpt { recipient }) => match (accepted, self.tx.as_mut()) {
                (true, Some(tx)) => {
                    tx.recipients.push(recipient);
                    self.reply(out, Reply::new(250, "2.1.5", "Ok"));
                }
                _ => {
                    out.observations
                        .push(Observation::MessageRejected(Stage::Rcpt));
                    self.reply(out, reply);
                }
            },
            Some(Park::RelayDataStart { chunk, queue_id }) => {
                self.on_relay_data_start(reply, chunk, queue_id, now, out)
            }
            other => self.park = other,
        }
    }

    fn on_rcpt(&mut self, to: Path<'_>, out: &mut Output) {
        let config = &self.params.config;
        let Some(tx) = self.tx.as_ref() else {
            self.reply(out, Reply::new(503, "5.5.1", "Need MAIL command"));
            return;
        };
        if tx.chunks.is_some() {
            self.reply(out, Reply::new(503, "5.5.1", "RCPT after BDAT"));
            return;
        }
        if !tx.smtputf8 && !to.mailbox.is_ascii() {
            self.reply(
                out,
                Reply::new(553, "5.6.7", "Non-ASCII address requires SMTPUTF8"),
            );
            return;
        }
        let max = config.max_recipients;
        if max != 0 && tx.recipients.len() >= max {
            self.reply(out, Reply::new(452, "4.5.3", "Too many recipients"));
            return;
        }
        // RFC 5321 4.5.1: <postmaster> is accepted whatever the domain list says.
        if !to.is_bare_postmaster() && !config.domains.is_empty() {
            let domain = to.domain.unwrap_or_default().trim_end_matches('.');
            if !config
                .domains
                .iter()
                .any(|d| d.eq_ignore_ascii_case(domain))
            {
                out.observations
                    .push(Observation::MessageRejected(Stage::Rcpt));
                self.reply(
                    out,
                    Reply::new(
                        550,
                        "5.7.1",
                        "Recipient domain not accepted here: relay access denied",
                    ),
                );
                return;
            }
        }
        let recipient = to.mailbox.to_string();
        if config.reject_at == RejectAt::Rcpt && self.policy_can_refuse {
            match self.current_decision() {
                Some(decision) => self.answer_rcpt(recipient, decision, out),
                None => self.park = Some(Park::RcptVerdict { recipient }),
            }
            return;
        }
        self.answer_rcpt(recipient, Decision::Accept, out);
    }

    fn answer_rcpt(&mut self, recipient: String, decision: Decision, out: &mut Output) {
        match (decision, self.tx.as_mut()) {
            (Decision::Accept, Some(tx)) => match &self.params.config.deliver {
                DeliverTarget::Maildir => {
                    tx.recipients.push(recipient);
                    self.reply(out, Reply::new(250, "2.1.5", "Ok"));
                }
                // LMTP answers once per recipient after the data (RFC 2033 4.2), while the
                // SMTP client expects one reply: one recipient per transaction keeps the two
                // in step. RFC 5321 4.5.3.1.10: clients retry the others in a new one.
                DeliverTarget::Lmtp { .. } | DeliverTarget::LmtpUnix { .. }
                    if !tx.recipients.is_empty() =>
                {
                    self.reply(
                        out,
                        Reply::new(
                            452,
                            "4.5.3",
                            "One recipient per transaction, send the rest later",
                        ),
                    );
                }
                _ => {
                    out.actions.push(SessionAction::RelayRcpt {
                        forward_path: recipient.clone(),
                    });
                    self.park = Some(Park::RelayRcpt { recipient });
                }
            },
            (Decision::Accept, None) => {
                self.reply(out, Reply::new(503, "5.5.1", "Need MAIL command"))
            }
            (Decision::Refuse(reply), _) => {
                out.observations
                    .push(Observation::MessageRejected(Stage::Rcpt));
                self.reply(out, reply);
            }
        }
    }

    /// 503 unless MAIL and at least one RCPT succeeded (RFC 5321 3.3).
    fn ready_for_content(&mut self, out: &mut Output) -> bool {
        let refusal = match self.tx.as_ref() {
            None => "Need MAIL command",
            Some(tx) if tx.recipients.is_empty() => "Need RCPT command",
            Some(_) => return true,
        };
        self.reply(out, Reply::new(503, "5.5.1", refusal));
        false
    }

    fn data_limits(&self) -> DataLimits {
        let config = &self.params.config;
        DataLimits {
            max_message_size: config.max_message_size,
            bare_line_feed: match config.bare_newline {
                BareNewline::Normalize => BareLineFeed::Normalize,
                BareNewline::Reject => BareLineFeed::Reject,
            },
        }
    }

    fn on_data(&mut self, now: Now, out: &mut Output) {
        if !self.ready_for_content(out) {
            return;
        }
        // RFC 3030 3: DATA and BDAT cannot be mixed in one transaction.
        if self.tx.as_ref().is_some_and(|tx| tx.chunks.is_some()) {
            self.reply(out, Reply::new(503, "5.5.1", "DATA not allowed after BDAT"));
            return;
        }
        if self.params.config.deliver != DeliverTarget::Maildir {
            // The 354 is the next hop's to give: ask it first (after the verdict, which the
            // trace fields carry).
            self.park = Some(Park::RelayDataVerdict {
                chunk: None,
                received_at: now.wall,
            });
            self.resume(out);
            return;
        }
        self.reply(
            out,
            Reply::new(354, "2.0.0", "End data with <CR><LF>.<CR><LF>"),
        );
        self.phase = Phase::Data(DataDecoder::new(Framing::Dot, self.data_limits()));
        self.rate = Some(DataRate::start(now.mono));
    }

    fn on_bdat(&mut self, size: u64, last: bool, now: Now, out: &mut Output) {
        // RFC 3030 3: the chunk's octets follow whatever the answer; read them to stay in sync.
        if !self.ready_for_content(out) {
            self.phase = Phase::SkipChunk { remaining: size };
            return;
        }
        let limits = self.data_limits();
        let first_chunk = self.tx.as_ref().is_some_and(|tx| tx.chunks.is_none());
        if first_chunk && self.params.config.deliver != DeliverTarget::Maildir {
            self.park = Some(Park::RelayDataVerdict {
                chunk: Some(BdatChunk { size, last }),
                received_at: now.wall,
            });
            self.resume(out);
            return;
        }
        if let Some(tx) = self.tx.as_mut()
            && tx.chunks.is_none()
        {
            tx.chunks = Some(DataDecoder::new(Framing::Chunked, limits));
            self.rate = Some(DataRate::start(now.mono));
        }
        self.phase = Phase::Chunk {
            size,
            remaining: size,
            last,
        };
    }

    /// Every octet of the current chunk is in.
    fn chunk_done(&mut self, now: Now, out: &mut Output) {
        let phase = std::mem::replace(&mut self.phase, Phase::Command);
        let Phase::Chunk { size, last, .. } = phase else {
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

    fn end_of_message(&mut self, result: Result<Vec<u8>, DataRefusal>, now: Now, out: &mut Output) {
        self.rate = None;
        if let Some(mut stream) = self.tx.as_mut().and_then(|tx| tx.relay.take()) {
            self.end_of_relayed_message(&mut stream, result, out);
            return;
        }
        match result {
            Err(refusal) => {
                self.tx = None;
                out.observations
                    .push(Observation::MessageRejected(Stage::Data));
                self.reply(out, refusal.reply());
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

    /// Relaying: the client's message is complete; the final dot goes to the next hop only
    /// if nothing refused the message on the way.
    fn end_of_relayed_message(
        &mut self,
        stream: &mut RelayStream,
        result: Result<Vec<u8>, DataRefusal>,
        out: &mut Output,
    ) {
        let refusal = match result {
            Ok(rest) => {
                push_relay_content(stream, rest, true, &self.params.config.hostname, out);
                stream.looped.then_some(DataRefusal::Loop)
            }
            Err(refusal) => Some(refusal),
        };
        self.tx = None;
        if let Some(refusal) = refusal {
            abort_relay(stream, out);
            out.observations
                .push(Observation::MessageRejected(Stage::Data));
            self.reply(out, refusal.reply());
            return;
        }
        out.actions.push(SessionAction::RelayEndData);
        self.park = Some(Park::Delivery {
            queue_id: std::mem::take(&mut stream.queue_id),
        });
    }

    /// The trace information of a message of `tx`, with a new queue ID; `None` without an
    /// identity and verdict (which the callers wait for).
    fn trace_info(&mut self, tx: &Transaction, received_at: SystemTime) -> Option<TraceInfo> {
        let identity = self.current.as_ref()?;
        let verdict = identity.verdict.clone()?;
        self.handed_off += 1;
        // Unique per process: the session ID, a separator that is no hex digit, the counter.
        let queue_id = format!("{:X}Z{:X}", self.params.session_id, self.handed_off);
        let tls = self.tls.is_some();
        let protocol = match (tx.smtputf8, tls, identity.verb) {
            (true, true, _) => Protocol::Utf8Smtps,
            (true, false, _) => Protocol::Utf8Smtp,
            (false, true, _) => Protocol::Esmtps,
            (false, false, Verb::Ehlo) => Protocol::Esmtp,
            (false, false, _) => Protocol::Smtp,
        };
        Some(TraceInfo {
            hostname: self.params.config.hostname.clone(),
            helo: identity.arg.clone(),
            client_ip: self.params.client_ip,
            verdict,
            tls: self.tls.clone(),
            protocol,
            queue_id,
            received_at,
        })
    }

    /// Hands the message off and waits for `Event::Delivered`.
    fn deliver(&mut self, content: Vec<u8>, received_at: SystemTime, out: &mut Output) {
        let Some(tx) = self.tx.take() else {
            self.reply(out, Reply::new(451, "4.3.0", "Local error in processing"));
            return;
        };
        let Some(trace) = self.trace_info(&tx, received_at) else {
            self.reply(out, Reply::new(451, "4.3.0", "Local error in processing"));
            return;
        };
        let queue_id = trace.queue_id.clone();
        let envelope = Envelope {
            reverse_path: tx.reverse_path,
            recipients: tx.recipients,
            trace,
            content,
        };
        out.actions.push(SessionAction::Deliver(Box::new(envelope)));
        self.park = Some(Park::Delivery { queue_id });
    }

    fn on_delivered(&mut self, outcome: DeliveryOutcome, out: &mut Output) {
        let Some(Park::Delivery { queue_id }) = self.park.take() else {
            return;
        };
        match outcome {
            DeliveryOutcome::Accepted => {
                self.messages += 1;
                out.observations.push(Observation::MessageAccepted);
                self.reply(
                    out,
                    Reply::new(250, "2.0.0", &format!("Ok: queued as {queue_id}")),
                );
            }
            DeliveryOutcome::Failed(reply) => {
                out.observations
                    .push(Observation::MessageRejected(Stage::Data));
                self.reply(out, reply);
            }
        }
    }

    fn on_starttls(&mut self, out: &mut Output) {
        if !self.params.tls_available {
            self.reply(out, Reply::new(502, "5.5.1", "STARTTLS not available"));
        } else if self.tls.is_some() {
            self.reply(out, Reply::new(503, "5.5.1", "Already in TLS"));
        } else if self.tx.is_some() {
            self.reply(
                out,
                Reply::new(
                    503,
                    "5.5.1",
                    "STARTTLS not allowed during a mail transaction",
                ),
            );
        } else {
            self.reply(out, Reply::new(220, "2.0.0", "Ready to start TLS"));
            out.actions.push(SessionAction::StartTls);
            self.park = Some(Park::Tls);
        }
    }

    /// RFC 3207 4.2: after the handshake the client starts over with EHLO.
    fn on_tls(&mut self, info: TlsInfo, out: &mut Output) {
        if !matches!(self.park, Some(Park::Tls)) {
            return;
        }
        self.park = None;
        self.tls = Some(info);
        self.current = None;
        self.candidate = None;
        self.drop_transaction(out);
        self.phase = Phase::Command;
        self.lines.reset();
    }

    /// SIGTERM during a transaction: its final reply has gone out, now close.
    fn check_draining(&mut self, out: &mut Output) {
        if self.draining && !self.closed && !self.in_transaction() {
            self.close_for_shutdown(out);
        }
    }

    fn close_for_shutdown(&mut self, out: &mut Output) {
        self.close(
            out,
            421,
            "4.3.2",
            "Service shutting down, closing connection",
            Ending::Shutdown,
        );
    }

    fn close(&mut self, out: &mut Output, code: u16, enhanced: &str, text: &str, ending: Ending) {
        self.send_line(out, code, enhanced, text);
        out.actions.push(SessionAction::Close);
        self.closed = true;
        self.ending = ending;
        self.park = None;
    }

    /// A reply to a command or a message: 5xx counts toward HELOGUARD_MAX_ERRORS.
    fn reply(&mut self, out: &mut Output, reply: Reply) {
        self.send(out, &reply);
        if reply.code >= 500 && self.counters.error_over(self.params.config.max_errors) {
            self.close(
                out,
                421,
                "4.7.0",
                "Too many errors, closing connection",
                Ending::TooManyErrors,
            );
        }
    }

    fn send(&mut self, out: &mut Output, reply: &Reply) {
        reply.write_to(&mut out.bytes);
        out.observations.push(Observation::Reply(reply.code));
    }

    fn send_line(&mut self, out: &mut Output, code: u16, enhanced: &str, text: &str) {
        self.send(out, &Reply::new(code, enhanced, text));
    }
}

/// Passes decoded content on to the next hop through the header filter (the fields that claim
/// our name removed, SPEC "What an accepted message carries"; the Received fields of the whole
/// header counted), the body as it comes. `last` flushes a message that ends in its header.
fn push_relay_content(
    stream: &mut RelayStream,
    content: Vec<u8>,
    last: bool,
    hostname: &str,
    out: &mut Output,
) {
    if stream.aborted {
        return;
    }
    let filter = stream
        .header
        .get_or_insert_with(|| HeaderFilter::new(hostname));
    let mut kept = Vec::new();
    let body_from = filter.feed(&content, &mut kept);
    if last {
        filter.finish(&mut kept);
    }
    if filter.loop_detected() {
        stream.looped = true;
        abort_relay(stream, out);
        return;
    }
    // The body goes on as it came: moved whole once the header is over, else copied once
    // after what is kept of the header.
    if body_from == 0 && !content.is_empty() {
        out.actions.push(SessionAction::RelayChunk(content));
        return;
    }
    kept.extend_from_slice(&content[body_from..]);
    if !kept.is_empty() {
        out.actions.push(SessionAction::RelayChunk(kept));
    }
}

/// Drops the next hop's transaction without its final dot (once).
fn abort_relay(stream: &mut RelayStream, out: &mut Output) {
    if !stream.aborted {
        stream.aborted = true;
        out.actions.push(SessionAction::RelayAbort);
    }
}
