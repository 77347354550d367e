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
//!
//! The parts that are not the plain dialogue live beside it, as further `impl Session` blocks:
//! `identity` (EHLO/HELO identities and their verdicts), `data` (DATA/BDAT content, streamed
//! through the header filter and the spill), `delivery` (the maildir hand-off) and
//! `relay` (the before-queue relay modes, entered only where `relaying()` says so).

use crate::helo::policy::RejectAt;
use crate::helo::sender::DnsblOutcome;
use crate::helo::verdict::Decision;
use crate::helo::{Action, Check};
use crate::message::content::{ContentBuilder, MEMORY_PART};
use crate::protocol::command::{Command, MailParams, Path, Verb};
use crate::protocol::line::{LineRead, LineReader};
use crate::protocol::reply::Reply;
use crate::session::limits::{Counters, DataRate};
use crate::session::state::{HeloJudge, Identity, InputMode, Park, Transaction, dnsbl_applies};
use crate::session::{
    Ending, Event, Now, Observation, Output, Refusal, SessionAction, SessionParams, Stage, Summary,
    TlsInfo,
};

/// What a refusal turned away, as far as the log names it.
pub(super) enum Subject<'a> {
    /// An EHLO/HELO argument.
    Helo(&'a str),
    /// A MAIL reverse path.
    Mail(&'a str),
    /// A RCPT forward path, in the open transaction.
    Rcpt(&'a str),
    /// A message: its sender and recipients.
    Message { from: &'a str, to: &'a [String] },
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
    pub(super) params: SessionParams,
    pub(super) judge: HeloJudge,
    /// Some check other than the syntax gate can defer or reject: the verdict gates replies.
    pub(super) policy_can_refuse: bool,
    /// Some check's action is `greylist`.
    pub(super) policy_can_greylist: bool,
    greeting: Greeting,
    /// Command lines and the overlong-line skip mode.
    pub(super) lines: LineReader,
    pub(super) input_mode: InputMode,
    pub(super) park: Option<Park>,
    pub(super) closed: bool,
    pub(super) ending: Ending,
    /// The identity of the latest accepted EHLO/HELO.
    pub(super) current: Option<Identity>,
    /// The identity STARTTLS cleared (RFC 3207 4.2), whose verdict the EHLO inside TLS keeps
    /// when it repeats the name.
    pub(super) before_tls: Option<Identity>,
    /// The argument of the latest EHLO/HELO, accepted or not: the session-end line shows it
    /// when no identity was accepted.
    pub(super) helo_sent: Option<String>,
    /// REJECT_AT=helo: an identity whose EHLO/HELO waits for its verdict.
    pub(super) candidate: Option<Identity>,
    /// Identities refused at EHLO/HELO (as `name_key`), with their reply (RFC 5321 4.1.4: the
    /// session stays).
    pub(super) refused: Vec<(String, Reply)>,
    /// PTR facts of the client, once per session.
    pub(super) reverse: Option<crate::dns::ReverseFacts>,
    /// The loop asks HELOGUARD_DNSBL about this client at accept (`expects_dnsbl`).
    pub(super) dnsbl_expected: bool,
    /// The client's list score, once it arrived.
    pub(super) dnsbl: Option<DnsblOutcome>,
    /// Generation of the latest identity that passed the syntax gate.
    pub(super) generation: u32,
    pub(super) tx: Option<Transaction>,
    pub(super) tls: Option<TlsInfo>,
    pub(super) counters: Counters,
    /// No EHLO/HELO yet since connect or STARTTLS: the next one is free of the junk count.
    pub(super) helo_free: bool,
    /// The DATA/BDAT transfer in progress, for HELOGUARD_MIN_DATA_RATE.
    pub(super) rate: Option<DataRate>,
    /// SIGTERM came during a transaction: close after it.
    pub(super) draining: bool,
    /// The latest `Event::SpoolSpace`: MAIL gets 452 4.3.1 while set.
    pub(super) spool_space_low: bool,
    /// Messages accepted.
    pub(super) messages: u32,
    /// Messages handed off (queue ID numbering).
    pub(super) handed_off: u32,
    /// DATA/BDAT octets read.
    pub(super) bytes: u64,
}

impl Session {
    pub fn new(params: SessionParams) -> Self {
        Self::with_judge(params, HeloJudge::STANDARD)
    }

    pub(crate) fn with_judge(params: SessionParams, judge: HeloJudge) -> Self {
        let policy = &params.settings.helo_policy;
        let policy_can_refuse = Check::ALL.into_iter().any(|check| {
            let action = policy.action(check);
            action >= Action::Defer && !(check == Check::Syntax && policy.rejects_bad_syntax())
        });
        let policy_can_greylist = Check::ALL
            .into_iter()
            .any(|check| policy.action(check) == Action::Greylist);
        let dnsbl_expected = dnsbl_applies(&params.settings, params.client_ip);
        Self {
            params,
            judge,
            policy_can_refuse,
            policy_can_greylist,
            greeting: Greeting::Waiting,
            lines: LineReader::new(),
            input_mode: InputMode::Command,
            park: Some(Park::Greeting),
            closed: false,
            ending: Ending::Open,
            current: None,
            before_tls: None,
            helo_sent: None,
            candidate: None,
            refused: Vec::new(),
            reverse: None,
            dnsbl_expected,
            dnsbl: None,
            generation: 0,
            tx: None,
            tls: None,
            counters: Counters::default(),
            helo_free: true,
            rate: None,
            draining: false,
            spool_space_low: false,
            messages: 0,
            handed_off: 0,
            bytes: 0,
        }
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
            Event::Reverse(facts) => self.on_reverse(facts, out),
            Event::Forward { name, addrs } => self.on_forward(&name, addrs, out),
            Event::VerdictDeadline { generation } => self.on_verdict_deadline(generation, out),
            Event::Delivered(outcome) => self.on_delivered(outcome, out),
            Event::RelayReply(reply) => self.on_relay_reply(reply, now, out),
            Event::TlsEstablished(info) => self.on_tls(info, out),
            Event::SpoolSpace { low } => self.spool_space_low = low,
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
            Event::Dnsbl(outcome) => self.on_dnsbl(outcome, out),
            Event::Spf { name, outcome } => self.on_spf(&name, outcome, out),
            Event::Rhsbl { name, outcome } => self.on_rhsbl(&name, outcome, out),
            Event::Churn { name, outcome } => self.on_churn(&name, outcome, out),
            Event::Greylist(outcome) => self.on_greylist(outcome, out),
        }
        self.check_draining(out);
    }

    /// Whether this session waits for `Event::Dnsbl`: the loop asks HELOGUARD_DNSBL about
    /// the client at accept exactly when this is true.
    pub fn expects_dnsbl(&self) -> bool {
        self.dnsbl_expected
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
                Some(Park::DataVerdict { .. } | Park::Delivery { .. } | Park::Relay(_))
            )
    }

    pub fn is_closed(&self) -> bool {
        self.closed
    }

    /// Message octets this session holds in memory: the DATA or BDAT content received so far
    /// and not yet spilled, or a complete message waiting for its verdict. With a spill store
    /// (maildir mode) never much above `message::content::MEMORY_PART` plus one header field;
    /// input bytes not yet consumed are the connection's, not counted here.
    pub fn buffered_bytes(&self) -> usize {
        let data = match &self.input_mode {
            InputMode::Data(decoder) => decoder.buffered(),
            _ => 0,
        };
        let tx = self.tx.as_ref();
        let chunks = tx
            .and_then(|tx| tx.chunks.as_ref())
            .map_or(0, |decoder| decoder.buffered());
        let content = tx
            .and_then(|tx| tx.content.as_ref())
            .map_or(0, ContentBuilder::buffered);
        let parked = match &self.park {
            Some(Park::DataVerdict { content, .. }) => content.memory.len(),
            _ => 0,
        };
        data + chunks + content + parked
    }

    /// Whether the session can take `more` octets of input, and whatever event is queued for
    /// it, without touching the disk: no content of its message has gone to a spill (whose
    /// appends, flush and removal are file I/O), and `more` would not make it go there.
    pub fn stays_in_memory(&self, more: usize) -> bool {
        let spilled = self
            .tx
            .as_ref()
            .and_then(|tx| tx.content.as_ref())
            .is_some_and(ContentBuilder::spilled)
            || matches!(&self.park, Some(Park::DataVerdict { content, .. }) if content.spill.is_some());
        !spilled && self.buffered_bytes().saturating_add(more) <= MEMORY_PART
    }

    /// The id the loop gave the session, unique in this run; queue IDs start with it.
    pub fn id(&self) -> u64 {
        self.params.session_id
    }

    pub fn summary(&self) -> Summary {
        let current = self.current.as_ref();
        Summary {
            sid: self.params.session_id,
            helo: current
                .map(|id| id.arg.clone())
                .or_else(|| self.helo_sent.clone()),
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
            let banner = format!("{} ESMTP heloguard", self.params.settings.hostname);
            Reply::write_plain_line(&mut out.bytes, 220, &banner);
            out.observations.push(Observation::Reply(220));
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
            let used = match &mut self.input_mode {
                InputMode::Command => match self.lines.read(rest) {
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
                InputMode::Data(decoder) => {
                    if rest.is_empty() {
                        break;
                    }
                    let feed = decoder.feed(rest);
                    if feed.complete {
                        let InputMode::Data(decoder) =
                            std::mem::replace(&mut self.input_mode, InputMode::Command)
                        else {
                            unreachable!("matched InputMode::Data above")
                        };
                        self.count_data(feed.consumed, now);
                        self.end_of_message(decoder.finish(), now, out);
                        pos += feed.consumed;
                        continue;
                    }
                    self.count_data(feed.consumed, now);
                    self.pass_content(out);
                    feed.consumed
                }
                InputMode::Chunk { remaining, .. } | InputMode::SkipChunk { remaining } => {
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
                    if let (InputMode::Chunk { .. }, Some(tx)) =
                        (&self.input_mode, self.tx.as_mut())
                        && let Some(decoder) = tx.chunks.as_mut()
                    {
                        decoder.feed(&rest[..n]);
                    }
                    self.count_data(n, now);
                    self.pass_content(out);
                    n
                }
            };
            pos += used;
            if pos >= input.len() && matches!(self.input_mode, InputMode::Command) {
                break;
            }
        }
        if let Some(rate) = self.rate
            && !self.closed
            && rate.too_slow(now.mono, self.params.settings.min_data_rate)
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
            // SPEC: EHLO/HELO is junk beyond the first after connect and after STARTTLS, so a
            // client cannot make a session start DNS work for name after name.
            let repeated_helo = matches!(verb, Verb::Ehlo | Verb::Helo)
                && !std::mem::replace(&mut self.helo_free, false);
            let junk = verb.counts_as_junk() || repeated_helo;
            if junk && self.counters.junk_over(self.params.settings.max_junk) {
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

    /// Ends the open transaction, if any: a message already streaming to the next hop (after
    /// a BDAT that was not LAST) is aborted there, never finished with a dot, and the data-rate
    /// clock, which only runs while message data is due, stops.
    pub(super) fn drop_transaction(&mut self, out: &mut Output) {
        self.relay_drop(out);
        self.tx = None;
        self.rate = None;
    }

    /// Answers what was parked on a verdict, if the verdict is there.
    pub(super) fn resume(&mut self, out: &mut Output) {
        match self.park.take() {
            Some(Park::HeloVerdict) => self.resume_helo(out),
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
            Some(Park::Relay(park)) => self.resume_relay(park, out),
            other => self.park = other,
        }
    }

    fn on_mail(&mut self, from: Path<'_>, params: MailParams, out: &mut Output) {
        let settings = &self.params.settings;
        if self.draining {
            self.close_for_shutdown(out);
            return;
        }
        if self.tx.is_some() {
            self.reply(out, Reply::new(503, "5.5.1", "Nested MAIL command"));
            return;
        }
        if self.spool_space_low {
            out.observations
                .push(Observation::MessageRejected(Stage::Mail));
            let reply = Reply::new(452, "4.3.1", "Insufficient system storage");
            self.refuse(out, Stage::Mail, Subject::Mail(from.mailbox), reply);
            return;
        }
        // RFC 6531 3.4: UTF-8 addresses only in an SMTPUTF8 transaction.
        if !params.smtputf8 && !from.mailbox.is_ascii() {
            let reply = Reply::new(553, "5.6.7", "Non-ASCII address requires SMTPUTF8");
            self.refuse(out, Stage::Mail, Subject::Mail(from.mailbox), reply);
            return;
        }
        let max = settings.max_message_size;
        if max != 0 && params.size.is_some_and(|size| size > max) {
            out.observations
                .push(Observation::MessageRejected(Stage::Mail));
            let reply = Reply::new(
                552,
                "5.3.4",
                "Message size exceeds fixed maximum message size",
            );
            self.refuse(out, Stage::Mail, Subject::Mail(from.mailbox), reply);
            return;
        }
        if self.relaying() {
            self.relay_on_mail(from.mailbox.to_string(), params, out);
            return;
        }
        let mut tx = Transaction::new(from.mailbox, params.smtputf8);
        tx.octets_before = self.bytes;
        self.tx = Some(tx);
        self.reply_line(out, 250, "2.1.0", "Ok");
    }

    fn on_rcpt(&mut self, to: Path<'_>, out: &mut Output) {
        let settings = &self.params.settings;
        let Some(tx) = self.tx.as_ref() else {
            self.reply(out, Reply::new(503, "5.5.1", "Need MAIL command"));
            return;
        };
        if tx.chunks.is_some() {
            self.reply(out, Reply::new(503, "5.5.1", "RCPT after BDAT"));
            return;
        }
        if !tx.smtputf8 && !to.mailbox.is_ascii() {
            let reply = Reply::new(553, "5.6.7", "Non-ASCII address requires SMTPUTF8");
            self.refuse(out, Stage::Rcpt, Subject::Rcpt(to.mailbox), reply);
            return;
        }
        // SPEC "Relay modes": routing tricks are refused in every mode, as relaying.
        if to.is_routing_trick() {
            out.observations
                .push(Observation::MessageRejected(Stage::Rcpt));
            let reply = Reply::new(
                550,
                "5.7.1",
                "Source routing in the local part: relay access denied",
            );
            self.refuse(out, Stage::Rcpt, Subject::Rcpt(to.mailbox), reply);
            return;
        }
        let max = settings.max_recipients;
        if max != 0 && tx.recipients.len() >= max {
            let reply = Reply::new(452, "4.5.3", "Too many recipients");
            self.refuse_recipient_over_limit(out, to.mailbox, reply);
            return;
        }
        // RFC 5321 4.5.1: <postmaster> is accepted whatever the domain list says.
        if !to.is_bare_postmaster() && !settings.domains.is_empty() {
            let domain = to.domain.unwrap_or_default().trim_end_matches('.');
            if !settings
                .domains
                .iter()
                .any(|d| d.eq_ignore_ascii_case(domain))
            {
                out.observations
                    .push(Observation::MessageRejected(Stage::Rcpt));
                let reply = Reply::new(
                    550,
                    "5.7.1",
                    "Recipient domain not accepted here: relay access denied",
                );
                self.refuse(out, Stage::Rcpt, Subject::Rcpt(to.mailbox), reply);
                return;
            }
        }
        let recipient = to.mailbox.to_string();
        // SPEC: greylisting is answered at RCPT whatever HELOGUARD_REJECT_AT says; with
        // REJECT_AT=helo a deferring or refusing verdict was answered at the EHLO already.
        let decides_here = (settings.reject_at == RejectAt::Rcpt && self.policy_can_refuse)
            || self.policy_can_greylist;
        if decides_here {
            match self.current_decision() {
                Some(decision) => self.answer_rcpt(recipient, decision, out),
                None => self.park = Some(Park::RcptVerdict { recipient }),
            }
            return;
        }
        self.answer_rcpt(recipient, Decision::Accept, out);
    }

    pub(super) fn answer_rcpt(&mut self, recipient: String, decision: Decision, out: &mut Output) {
        let relaying = self.relaying();
        match (decision, self.tx.as_mut()) {
            (Decision::Accept, Some(_)) if relaying => self.relay_accept_rcpt(recipient, out),
            (Decision::Accept, Some(tx)) => {
                tx.recipients.push(recipient);
                self.reply_line(out, 250, "2.1.5", "Ok");
            }
            (Decision::Accept, None) => {
                self.reply(out, Reply::new(503, "5.5.1", "Need MAIL command"))
            }
            (Decision::Greylist, Some(_)) => self.greylist_rcpt(recipient, out),
            (Decision::Greylist, None) => {
                self.reply(out, Reply::new(503, "5.5.1", "Need MAIL command"))
            }
            (Decision::Refuse(reply), _) => {
                out.observations
                    .push(Observation::MessageRejected(Stage::Rcpt));
                self.refuse(out, Stage::Rcpt, Subject::Rcpt(&recipient), reply);
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
        self.helo_free = true;
        self.before_tls = self.current.take();
        self.candidate = None;
        self.drop_transaction(out);
        self.input_mode = InputMode::Command;
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

    pub(super) fn close(
        &mut self,
        out: &mut Output,
        code: u16,
        enhanced: &str,
        text: &str,
        ending: Ending,
    ) {
        self.send_line(out, code, enhanced, text);
        out.actions.push(SessionAction::Close);
        self.closed = true;
        self.ending = ending;
        self.park = None;
    }

    /// A reply that turns `subject` away at `stage`: reported for the `refused` log line, then
    /// sent as any reply.
    pub(super) fn refuse(
        &mut self,
        out: &mut Output,
        stage: Stage,
        subject: Subject<'_>,
        reply: Reply,
    ) {
        let current_helo = || self.current.as_ref().map(|id| id.arg.clone());
        let tx_from = || self.tx.as_ref().map(|tx| tx.reverse_path.clone());
        let (helo, from, to) = match subject {
            Subject::Helo(arg) => (Some(arg.to_string()), None, Vec::new()),
            Subject::Mail(from) => (current_helo(), Some(from.to_string()), Vec::new()),
            Subject::Rcpt(to) => (current_helo(), tx_from(), vec![to.to_string()]),
            Subject::Message { from, to } => (current_helo(), Some(from.to_string()), to.to_vec()),
        };
        out.observations
            .push(Observation::Refused(Box::new(Refusal {
                stage,
                helo,
                from,
                to,
                reply: reply.clone(),
            })));
        self.reply(out, reply);
    }

    /// A 452 for a recipient over the transaction's limit: refused as any other, but reported
    /// once per transaction, since a client may send hundreds of RCPTs past the limit.
    pub(super) fn refuse_recipient_over_limit(&mut self, out: &mut Output, to: &str, reply: Reply) {
        let noted = self
            .tx
            .as_mut()
            .map(|tx| std::mem::replace(&mut tx.too_many_noted, true));
        if noted == Some(false) {
            self.refuse(out, Stage::Rcpt, Subject::Rcpt(to), reply);
        } else {
            self.reply(out, reply);
        }
    }

    /// A reply to a command or a message: 5xx counts toward HELOGUARD_MAX_ERRORS.
    pub(super) fn reply(&mut self, out: &mut Output, reply: Reply) {
        self.send(out, &reply);
        self.count_if_error(out, reply.code);
    }

    /// `reply` of `Reply::new(code, enhanced, text)`, written without making the `Reply`.
    pub(super) fn reply_line(&mut self, out: &mut Output, code: u16, enhanced: &str, text: &str) {
        self.send_line(out, code, enhanced, text);
        self.count_if_error(out, code);
    }

    fn count_if_error(&mut self, out: &mut Output, code: u16) {
        if code >= 500 {
            self.count_error(out);
        }
    }

    /// One more error toward HELOGUARD_MAX_ERRORS: past it, 421 4.7.0 and close.
    pub(super) fn count_error(&mut self, out: &mut Output) {
        if self.counters.error_over(self.params.settings.max_errors) {
            self.close(
                out,
                421,
                "4.7.0",
                "Too many errors, closing connection",
                Ending::TooManyErrors,
            );
        }
    }

    pub(super) fn send(&mut self, out: &mut Output, reply: &Reply) {
        reply.write_to(&mut out.bytes);
        out.observations.push(Observation::Reply(reply.code));
    }

    fn send_line(&mut self, out: &mut Output, code: u16, enhanced: &str, text: &str) {
        Reply::write_line(&mut out.bytes, code, enhanced, text);
        out.observations.push(Observation::Reply(code));
    }
}
