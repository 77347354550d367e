//! Session tests through the public API only: a small harness plays the event loop (re-offers
//! unread input, answers DNS, deliveries and TLS), and `cmd(line, "250 2.1.0")`-style tables
//! check the reply to each line, code first.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use proptest::prelude::*;

use crate::dns::{Lookup, PtrName, ReverseFacts};
use crate::greylist::GreylistOutcome;
use crate::helo::checks::{CheckInput, HeloArg};
use crate::helo::policy::{AllowEntry, HeloPolicy, RejectAt};
use crate::helo::verdict::{Decision, HeloVerdict, IprevResult};
use crate::helo::{Action, CheckResult, VerdictKind};
use crate::message::content::MemorySpillStore;
use crate::message::{Envelope, Protocol};
use crate::protocol::data::BareLineFeed;
use crate::protocol::reply::Reply;
use crate::relay::{XclientAttrs, XclientName};
use crate::session::state::HeloJudge;
use crate::session::{
    AcceptedMessage, DeliveryMode, DeliveryOutcome, Ending, Event, Now, Observation, Output,
    Refusal, Session, SessionAction, SessionParams, SessionSettings, Stage, TlsInfo,
};

fn config() -> SessionSettings {
    SessionSettings {
        hostname: "mx.test".into(),
        domains: Vec::new(),
        max_message_size: 10_000_000,
        max_recipients: 100,
        min_data_rate: 500,
        max_errors: 20,
        max_junk: 100,
        helo_policy: HeloPolicy::default(),
        helo_allow: Vec::new(),
        reject_at: RejectAt::Rcpt,
        bare_line_feed: BareLineFeed::Normalize,
        delivery: DeliveryMode::Maildir,
        sender_checks: Default::default(),
    }
}

/// Stands in for `helo::checks::parse_helo`: enough shape for the session's decisions.
fn fake_parse(arg: &str) -> HeloArg {
    if let Some(inner) = arg.strip_prefix('[').and_then(|a| a.strip_suffix(']')) {
        return inner
            .parse()
            .map_or(HeloArg::Invalid, HeloArg::AddressLiteral);
    }
    if let Ok(ip) = arg.parse() {
        return HeloArg::BareIp(ip);
    }
    let ok = arg.contains('.')
        && arg
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-');
    if ok {
        HeloArg::Domain(arg.to_ascii_lowercase())
    } else {
        HeloArg::Invalid
    }
}

/// Stands in for `helo::policy::decide`: names starting `refuse` get 550, `defer` 450,
/// `tempfail` 451, `greylist` greylisting.
fn fake_decide(
    input: &CheckInput<'_>,
    _forward: Option<&Lookup<Vec<IpAddr>>>,
    _reverse: Option<&ReverseFacts>,
    _sender: &crate::helo::sender::SenderFacts,
    _policy: &HeloPolicy,
    _allow: &[AllowEntry],
) -> HeloVerdict {
    let decision = if input.helo.starts_with("refuse") {
        Decision::Refuse(Reply::new(550, "5.7.1", "HELO refused"))
    } else if input.helo.starts_with("defer") {
        Decision::Refuse(Reply::new(450, "4.7.1", "HELO deferred"))
    } else if input.helo.starts_with("tempfail") {
        Decision::Refuse(Reply::new(451, "4.4.3", "HELO not verified"))
    } else if input.helo.starts_with("greylist") {
        Decision::Greylist
    } else {
        Decision::Accept
    };
    // A 451 comes from an undecided check: the verdict says so, as the real one does.
    let mut measured = [CheckResult::None; crate::helo::CHECKS];
    if input.helo.starts_with("tempfail") {
        measured[0] = CheckResult::TempError;
    }
    HeloVerdict {
        dnsbl_score: None,
        spf: None,
        dnswl: Vec::new(),
        listed: Vec::new(),
        kind: if decision == Decision::Accept {
            VerdictKind::Pass
        } else {
            VerdictKind::Fail
        },
        shown: [CheckResult::None; crate::helo::CHECKS],
        measured,
        action: Action::Off,
        failed: Vec::new(),
        allowed_by: None,
        ptr: None,
        iprev: IprevResult::PermError,
        decision,
    }
}

const FAKE: HeloJudge = HeloJudge {
    parse: fake_parse,
    decide: fake_decide,
};

fn tls_info() -> TlsInfo {
    TlsInfo {
        version: "TLSv1.3".into(),
        cipher: "TLS_AES_256_GCM_SHA384".into(),
        bits: 256,
    }
}

/// Plays the event loop around one session.
struct Harness {
    session: Session,
    now: Now,
    /// Input not yet consumed, offered again with what comes next.
    pending: Vec<u8>,
    replies: Vec<u8>,
    observations: Vec<Observation>,
    envelopes: Vec<Envelope>,
    lookups: Vec<(u32, Option<String>)>,
    /// Answer Reverse at greeting and every Forward at once (NXDOMAIN).
    auto_dns: bool,
    /// Answer every Deliver with this.
    auto_deliver: Option<DeliveryOutcome>,
    close_seen: bool,
    /// Relay modes: the MAIL/RCPT replays asked for, in order.
    relayed: Vec<String>,
    /// Relay modes: the XCLIENT attributes of each MAIL replay.
    xclient: Vec<XclientAttrs>,
    /// The sender lookups each accepted EHLO/HELO asked for: [spf, rhsbl, churn].
    sender_asks: Vec<[Option<String>; 3]>,
    /// Greylisting: the triplets asked about, in order.
    triplets: Vec<crate::greylist::Triplet>,
    /// Answer every greylisting question with this.
    greylist_answer: Option<GreylistOutcome>,
}

impl Harness {
    fn new(config: SessionSettings) -> Self {
        Self::build(config, false, true)
    }

    fn build(config: SessionSettings, tls_available: bool, auto_dns: bool) -> Self {
        let params = SessionParams {
            settings: Arc::new(config),
            client_ip: IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7)),
            session_id: 0xABC,
            tls_available,
            spill: Some(Arc::new(MemorySpillStore)),
        };
        let mut h = Self {
            session: Session::with_judge(params, FAKE),
            now: Now {
                mono: Instant::now(),
                wall: SystemTime::UNIX_EPOCH,
            },
            pending: Vec::new(),
            replies: Vec::new(),
            observations: Vec::new(),
            envelopes: Vec::new(),
            lookups: Vec::new(),
            auto_dns,
            auto_deliver: Some(DeliveryOutcome::Accepted),
            close_seen: false,
            relayed: Vec::new(),
            xclient: Vec::new(),
            triplets: Vec::new(),
            sender_asks: Vec::new(),
            greylist_answer: None,
        };
        h.event(Event::Greet);
        if auto_dns {
            h.event(Event::Reverse(ReverseFacts {
                ptr: Lookup::NxDomain,
            }));
        }
        h
    }

    fn event(&mut self, event: Event<'_>) {
        let mut out = Output::default();
        self.session.handle(event, self.now, &mut out);
        self.absorb(out);
        self.pump();
    }

    fn input(&mut self, bytes: &[u8]) {
        self.pending.extend_from_slice(bytes);
        self.pump();
    }

    /// Offers the unread input while the session wants it and makes progress.
    fn pump(&mut self) {
        while self.session.wants_input() && !self.pending.is_empty() {
            let pending = std::mem::take(&mut self.pending);
            let mut out = Output::default();
            self.session
                .handle(Event::Input(&pending), self.now, &mut out);
            self.pending = pending[out.consumed..].to_vec();
            let progressed = out.consumed > 0;
            self.absorb(out);
            if !progressed {
                break;
            }
        }
    }

    fn absorb(&mut self, out: Output) {
        self.replies.extend_from_slice(&out.bytes);
        self.observations.extend(out.observations);
        for action in out.actions {
            match action {
                SessionAction::HeloAccepted {
                    generation,
                    lookup,
                    spf,
                    rhsbl,
                    churn,
                } => {
                    self.sender_asks.push([spf, rhsbl, churn]);
                    self.lookups.push((generation, lookup.clone()));
                    if let (true, Some(name)) = (self.auto_dns, lookup) {
                        self.event(Event::Forward {
                            name,
                            addrs: Lookup::NxDomain,
                        });
                    }
                }
                SessionAction::Deliver(envelope) => {
                    self.envelopes.push(*envelope);
                    if let Some(outcome) = self.auto_deliver.clone() {
                        self.event(Event::Delivered(outcome));
                    }
                }
                SessionAction::StartTls => {
                    // RFC 3207 4.2: the loop discards every unread plaintext byte.
                    self.pending.clear();
                    self.event(Event::TlsEstablished(tls_info()));
                }
                SessionAction::Close => self.close_seen = true,
                SessionAction::Greylist(triplet) => {
                    self.triplets.push(triplet);
                    if let Some(outcome) = self.greylist_answer {
                        self.event(Event::Greylist(outcome));
                    }
                }
                SessionAction::RelayMail {
                    reverse_path,
                    xclient,
                    ..
                } => {
                    self.relayed.push(format!("MAIL {reverse_path}"));
                    self.xclient.push(xclient);
                }
                SessionAction::RelayRcpt { forward_path } => {
                    self.relayed.push(format!("RCPT {forward_path}"))
                }
                SessionAction::RelayData { trace, .. } => {
                    self.relayed.push(format!("DATA {}", trace.queue_id))
                }
                SessionAction::RelayChunk(bytes) => self
                    .relayed
                    .push(format!("CHUNK {}", String::from_utf8_lossy(&bytes))),
                SessionAction::RelayEndData { eight_bit } => {
                    self.relayed.push(if eight_bit.any() {
                        format!("END {eight_bit:?}")
                    } else {
                        "END".into()
                    })
                }
                SessionAction::RelayAbort => self.relayed.push("ABORT".into()),
                SessionAction::RelayReset => self.relayed.push("RESET".into()),
            }
        }
    }

    fn take(&mut self) -> String {
        String::from_utf8_lossy(&std::mem::take(&mut self.replies)).into_owned()
    }

    /// Sends one line and checks that its reply (all of it) starts with `want`.
    fn cmd(&mut self, line: &str, want: &str) -> String {
        self.input(format!("{line}\r\n").as_bytes());
        let got = self.take();
        assert!(
            got.starts_with(want),
            "{line:?}: want {want:?}, got {got:?}"
        );
        got
    }

    fn script(&mut self, steps: &[(&str, &str)]) {
        for (line, want) in steps {
            self.cmd(line, want);
        }
    }

    fn rejected(&self, stage: Stage) -> usize {
        self.observations
            .iter()
            .filter(|o| matches!(o, Observation::MessageRejected(s) if *s == stage))
            .count()
    }
}

fn greeted() -> Harness {
    let mut h = Harness::new(config());
    assert_eq!(h.take(), "220 mx.test ESMTP heloguard\r\n");
    h
}

fn with(change: impl FnOnce(&mut SessionSettings)) -> Harness {
    let mut c = config();
    change(&mut c);
    let mut h = Harness::new(c);
    h.take();
    h
}

const TRANSACTION: &[(&str, &str)] = &[
    ("EHLO client.example", "250-mx.test"),
    ("MAIL FROM:<a@b.example>", "250 2.1.0"),
    ("RCPT TO:<c@d.example>", "250 2.1.5"),
    ("DATA", "354 2.0.0"),
];

#[test]
fn ehlo_and_helo_replies() {
    let mut h = greeted();
    assert_eq!(
        h.cmd("EHLO client.example", "250"),
        "250-mx.test\r\n250-PIPELINING\r\n250-SIZE 10000000\r\n250-8BITMIME\r\n\
         250-ENHANCEDSTATUSCODES\r\n250-SMTPUTF8\r\n250 CHUNKING\r\n"
    );
    assert_eq!(h.cmd("HELO client.example", "250"), "250 mx.test\r\n");
    let mut h = Harness::build(config(), true, true);
    h.take();
    assert!(
        h.cmd("EHLO client.example", "250")
            .ends_with("250 STARTTLS\r\n")
    );
}

#[test]
fn dialogue_table() {
    let mut h = with(|c| c.max_errors = 0);
    h.script(&[
        ("NOOP", "250 2.0.0"),
        ("RSET", "250 2.0.0"),
        ("VRFY postmaster", "252 2.5.0"),
        ("HELP", "214 2.0.0"),
        ("MAIL FROM:<a@b.example>", "503 5.5.1"),
        ("RCPT TO:<a@b.example>", "503 5.5.1"),
        ("DATA", "503 5.5.1"),
        ("BDAT 0 LAST", "503 5.5.1"),
        ("STARTTLS", "503 5.5.1"),
        ("EHLO", "501 5.5.4"),
        ("HELO", "501 5.5.4"),
        ("EHLO bad!name", "501 5.5.2"),
        ("MAIL FROM:<a@b.example>", "503 5.5.1"),
        ("EXPN list", "500 5.5.2"),
        ("PROXY TCP4 1.2.3.4 5.6.7.8 1 2", "500 5.5.2"),
        ("EHLO client.example", "250-mx.test"),
        (
            "EHLO bad!name",
            "501 5.5.2 HELO bad!name refused: check syntax failed: RFC 5321",
        ),
        ("RCPT TO:<a@b.example>", "503 5.5.1"),
        ("DATA", "503 5.5.1"),
        ("MAIL FROM:<a@b.example> FOO=1", "555 5.5.4"),
        ("MAIL FROM:a@b.example", "501 5.5.4"),
        ("MAIL FROM:<>", "250 2.1.0"),
        ("MAIL FROM:<a@b.example>", "503 5.5.1"),
        ("DATA", "503 5.5.1"),
        ("RCPT TO:<c@d.example> NOTIFY=NEVER", "555 5.5.4"),
        ("RCPT TO:<c@d.example>", "250 2.1.5"),
        ("STARTTLS", "502 5.5.1"),
        ("EHLO other.example", "250-mx.test"),
        ("RCPT TO:<c@d.example>", "503 5.5.1"),
        ("NOOP", "250"),
        ("MAIL FROM:<ü@b.example>", "553 5.6.7"),
        ("MAIL FROM:<ü@b.example> SMTPUTF8", "250 2.1.0"),
        ("RSET", "250 2.0.0"),
        ("QUIT", "221 2.0.0"),
    ]);
    assert!(h.close_seen && h.session.is_closed());
    assert_eq!(h.session.summary().ending, Ending::Quit);
    assert_eq!(h.session.summary().helo.as_deref(), Some("other.example"));
}

#[test]
fn every_reply_is_observed() {
    let mut h = greeted();
    h.script(&[("NOOP", "250"), ("BOGUS", "500"), ("QUIT", "221")]);
    let codes: Vec<u16> = h
        .observations
        .iter()
        .filter_map(|o| match o {
            Observation::Reply(c) => Some(*c),
            _ => None,
        })
        .collect();
    assert_eq!(codes, [220, 250, 500, 221]);
}

#[test]
fn a_transaction_delivers_an_envelope() {
    let mut h = greeted();
    h.script(TRANSACTION);
    h.input(b"Subject: hi\r\n\r\n..dot\r\nbody\r\n.\r\n");
    assert_eq!(h.take(), "250 2.0.0 Ok: queued as ABCZ1\r\n");
    let e = &h.envelopes[0];
    assert_eq!(e.reverse_path, "a@b.example");
    assert_eq!(e.recipients, ["c@d.example"]);
    assert_eq!(e.content.bytes(), b"Subject: hi\r\n\r\n.dot\r\nbody\r\n");
    assert_eq!(e.trace.helo, "client.example");
    assert_eq!(e.trace.protocol, Protocol::Esmtp);
    assert_eq!(e.trace.queue_id, "ABCZ1");
    assert!(
        h.observations
            .iter()
            .any(|o| matches!(o, Observation::MessageAccepted))
    );
    assert_eq!(h.session.summary().messages, 1);
    // The second message gets the next queue ID; HELO gives SMTP, SMTPUTF8 gives UTF8SMTP.
    h.script(&[
        ("HELO client.example", "250 mx.test"),
        ("MAIL FROM:<a@b.example> SMTPUTF8", "250"),
        ("RCPT TO:<c@d.example>", "250"),
        ("DATA", "354"),
    ]);
    h.cmd(".", "250 2.0.0 Ok: queued as ABCZ2");
    assert_eq!(h.envelopes[1].trace.protocol, Protocol::Utf8Smtp);
    assert_eq!(h.envelopes[1].content.bytes(), b"");
}

#[test]
fn delivery_failure_gives_its_reply() {
    let mut h = greeted();
    h.auto_deliver = Some(DeliveryOutcome::Failed(Reply::new(
        451,
        "4.3.0",
        "Spool error",
    )));
    h.script(TRANSACTION);
    h.cmd("x\r\n.", "451 4.3.0 Spool error");
    assert_eq!(h.rejected(Stage::Data), 1);
    h.cmd("MAIL FROM:<a@b.example>", "250");
}

// The envelope holds the content as stored: through the header filter, which writes an empty
// line before a first line that is no header field.

#[test]
fn pipelined_transaction_answers_in_order() {
    let mut h = greeted();
    h.input(
        b"EHLO client.example\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\n\
          RCPT TO:<e@d.example>\r\nDATA\r\nhello\r\n.\r\nQUIT\r\n",
    );
    let replies = h.take();
    let codes: Vec<&str> = replies
        .lines()
        .filter(|l| !l.starts_with("250-"))
        .map(|l| &l[..3])
        .collect();
    assert_eq!(codes, ["250", "250", "250", "250", "354", "250", "221"]);
    assert_eq!(h.envelopes[0].content.bytes(), b"\r\nhello\r\n");
    assert_eq!(h.envelopes[0].recipients.len(), 2);
}

#[test]
fn smuggling_variants_never_end_data() {
    for variant in ["\n.\n", "\r.\r", "\n.\r\n", "\r\n.\n"] {
        let mut h = greeted();
        h.script(TRANSACTION);
        let smuggled = format!(
            "a{variant}MAIL FROM:<evil@x.example>\r\nRCPT TO:<v@d.example>\r\nDATA\r\nevil\r\n.\r\n"
        );
        h.input(smuggled.as_bytes());
        assert_eq!(h.take(), "250 2.0.0 Ok: queued as ABCZ1\r\n", "{variant:?}");
        assert_eq!(h.envelopes.len(), 1);
        let content = String::from_utf8_lossy(&h.envelopes[0].content.bytes()).into_owned();
        assert!(
            content.contains("MAIL FROM:<evil@x.example>"),
            "{variant:?}"
        );
    }
}

#[test]
fn bare_line_feed_both_modes() {
    let mut h = greeted();
    h.script(TRANSACTION);
    h.input(b"a\nb\r\n.\r\n");
    assert_eq!(h.take(), "250 2.0.0 Ok: queued as ABCZ1\r\n");
    assert_eq!(h.envelopes[0].content.bytes(), b"\r\na\r\nb\r\n");
    let mut h = with(|c| c.bare_line_feed = BareLineFeed::Reject);
    h.script(TRANSACTION);
    h.input(b"a\nb\r\n.\r\n");
    assert!(h.take().starts_with("550 5.5.2"));
    assert!(h.envelopes.is_empty());
    assert_eq!(h.rejected(Stage::Data), 1);
    h.script(&[("NOOP", "250"), ("MAIL FROM:<a@b.example>", "250")]);
}

#[test]
fn message_refusals_at_end_of_data() {
    let long = "x".repeat(999);
    let mut h = greeted();
    h.script(TRANSACTION);
    h.cmd(&format!("{long}\r\n."), "550 5.6.0");
    let mut h = with(|c| c.max_message_size = 100);
    h.script(TRANSACTION);
    h.cmd(&format!("{}\r\n.", "y".repeat(200)), "552 5.3.4");
    h.cmd("MAIL FROM:<a@b.example> SIZE=101", "552 5.3.4");
    h.cmd("MAIL FROM:<a@b.example> SIZE=100", "250");
    assert_eq!(h.rejected(Stage::Mail), 1);
    let mut h = greeted();
    h.script(TRANSACTION);
    h.cmd(
        &format!("{}\r\nbody\r\n.", "Received: x\r\n".repeat(101)),
        "554 5.4.6",
    );
    assert_eq!(h.rejected(Stage::Data), 1);
}

#[test]
fn recipients_limits_domains_and_postmaster() {
    let mut h = with(|c| {
        c.max_recipients = 2;
        c.domains = vec!["d.example".into()];
    });
    h.script(&[
        ("EHLO client.example", "250"),
        ("MAIL FROM:<a@b.example>", "250"),
        ("RCPT TO:<x@other.example>", "550 5.7.1"),
        ("RCPT TO:<x@D.example.>", "250 2.1.5"),
        ("RCPT TO:<PostMaster>", "250 2.1.5"),
        ("RCPT TO:<y@d.example>", "452 4.5.3"),
        ("RCPT TO:<postmaster>", "452 4.5.3"),
    ]);
    assert_eq!(h.rejected(Stage::Rcpt), 1);
}

#[test]
fn spool_space_low_defers_mail() {
    let mut h = greeted();
    h.cmd("EHLO client.example", "250");
    h.event(Event::SpoolSpace { low: true });
    assert_eq!(h.take(), "", "the state change itself is not answered");
    h.cmd("MAIL FROM:<a@b.example>", "452 4.3.1");
    h.event(Event::SpoolSpace { low: false });
    h.cmd("MAIL FROM:<a@b.example>", "250");
}

#[test]
fn bdat_chunks() {
    let mut h = greeted();
    h.script(&TRANSACTION[..3]);
    h.input(b"BDAT 6\r\nhello\nBDAT 8 LAST\r\n world\r\n");
    assert_eq!(
        h.take(),
        "250 2.0.0 6 octets received\r\n250 2.0.0 Ok: queued as ABCZ1\r\n"
    );
    assert_eq!(h.envelopes[0].content.bytes(), b"\r\nhello\r\n world\r\n");
    // Refused BDAT: its octets are read and dropped; the session stays in sync.
    h.input(b"BDAT 10\r\nMAIL FROM:NOOP\r\n");
    assert!(h.take().starts_with("503 5.5.1"));
    h.cmd("NOOP", "250");
    h.script(&TRANSACTION[1..3]);
    h.input(b"BDAT 3\r\nabc");
    h.take();
    h.script(&[
        ("DATA", "503 5.5.1"),
        ("RCPT TO:<x@d.example>", "503 5.5.1"),
    ]);
    h.input(b"BDAT 0 LAST\r\n");
    assert_eq!(h.take(), "250 2.0.0 Ok: queued as ABCZ2\r\n");
    assert_eq!(h.envelopes[1].content.bytes(), b"\r\nabc\r\n");
    // The decoder's rules apply to chunks too.
    let mut h = with(|c| c.bare_line_feed = BareLineFeed::Reject);
    h.script(&TRANSACTION[..3]);
    h.input(b"BDAT 3 LAST\r\na\nb");
    let got = h.take();
    assert!(got.starts_with("550 5.5.2"), "{got:?}");
}

#[test]
fn overlong_command_lines() {
    let mut h = greeted();
    h.cmd(&"A".repeat(600), "500 5.5.6 Line too long");
    h.cmd("NOOP", "250");
    let block = vec![b'a'; 64 * 1024];
    for _ in 0..16 {
        h.input(&block);
        assert!(h.pending.len() < 512, "input must not pile up");
    }
    assert!(h.take().is_empty());
    h.input(b"\r\nNOOP\r\n");
    assert_eq!(h.take(), "500 5.5.6 Line too long\r\n250 2.0.0 Ok\r\n");
}

#[test]
fn starttls() {
    let mut h = Harness::build(config(), true, true);
    h.take();
    h.cmd("EHLO client.example", "250");
    h.cmd("MAIL FROM:<a@b.example>", "250");
    h.cmd("STARTTLS", "503 5.5.1");
    h.cmd("RSET", "250");
    // Pipelined plaintext after STARTTLS is discarded (RFC 3207 4.2).
    h.input(b"STARTTLS\r\nMAIL FROM:<injected@x.example>\r\n");
    assert_eq!(h.take(), "220 2.0.0 Ready to start TLS\r\n");
    h.cmd("MAIL FROM:<a@b.example>", "503 5.5.1");
    let ehlo = h.cmd("EHLO client.example", "250");
    assert!(!ehlo.contains("STARTTLS"));
    h.cmd("STARTTLS", "503 5.5.1");
    h.script(&TRANSACTION[1..]);
    h.cmd(".", "250 2.0.0");
    assert_eq!(h.envelopes[0].trace.protocol, Protocol::Esmtps);
    assert_eq!(h.envelopes[0].trace.tls, Some(tls_info()));
}

#[test]
fn pregreet() {
    let mut h = Harness::build(config(), false, true);
    h.take();
    let mut h2 = {
        let params = SessionParams {
            settings: Arc::new(config()),
            client_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
            session_id: 1,
            tls_available: false,
            spill: None,
        };
        let mut session = Session::with_judge(params, FAKE);
        let mut out = Output::default();
        session.handle(Event::Pregreeted, h.now, &mut out);
        assert!(out.bytes.starts_with(b"554 5.5.1"));
        h.session = session;
        h
    };
    h2.script(&[
        ("EHLO client.example", "503 5.5.1"),
        ("NOOP", "503 5.5.1"),
        ("QUIT", "221 2.0.0"),
    ]);
    assert!(h2.close_seen);
    assert_eq!(h2.session.summary().ending, Ending::Pregreet);
}

#[test]
fn shutdown() {
    let mut h = greeted();
    h.cmd("EHLO client.example", "250");
    h.event(Event::Shutdown);
    assert_eq!(
        h.take(),
        "421 4.3.2 Service shutting down, closing connection\r\n"
    );
    assert!(h.close_seen);

    // Inside a transaction: it finishes, then 421.
    let mut h = greeted();
    h.script(&TRANSACTION[..2]);
    h.event(Event::Shutdown);
    assert!(h.take().is_empty() && !h.close_seen);
    h.script(&TRANSACTION[2..]);
    h.input(b"body\r\n.\r\n");
    assert_eq!(
        h.take(),
        "250 2.0.0 Ok: queued as ABCZ1\r\n421 4.3.2 Service shutting down, closing connection\r\n"
    );
    assert!(h.close_seen);

    // A new MAIL during the grace time gets 421 (here via RSET ending the transaction).
    let mut h = greeted();
    h.script(&TRANSACTION[..2]);
    h.event(Event::Shutdown);
    h.cmd("RSET", "250 2.0.0 Ok\r\n421 4.3.2");

    let mut h = greeted();
    h.script(&TRANSACTION[..2]);
    h.event(Event::Shutdown);
    h.event(Event::GraceExpired);
    assert!(h.take().starts_with("421 4.3.2"));
    assert_eq!(h.session.summary().ending, Ending::Shutdown);
}

#[test]
fn idle_timeout_and_data_rate() {
    let mut h = greeted();
    h.event(Event::IdleTimeout);
    assert!(h.take().starts_with("421 4.4.2"));
    assert_eq!(h.session.summary().ending, Ending::Timeout);

    let mut h = greeted();
    h.script(TRANSACTION);
    h.now.mono += Duration::from_secs(10);
    h.input(b"slow\r\n");
    assert!(h.take().is_empty());
    h.now.mono += Duration::from_secs(25);
    h.input(b"slow\r\n");
    assert!(h.take().starts_with("421 4.4.2"));
    assert!(h.close_seen);
}

#[test]
fn error_and_junk_limits() {
    let mut h = with(|c| c.max_errors = 2);
    h.cmd("BOGUS", "500");
    h.cmd("BOGUS", "500");
    h.cmd("BOGUS", "500 5.5.2 Command unrecognized\r\n421 4.7.0");
    assert!(h.close_seen);
    assert_eq!(h.session.summary().ending, Ending::TooManyErrors);

    let mut h = with(|c| c.max_junk = 2);
    h.script(&[("NOOP", "250"), ("RSET", "250"), ("VRFY x", "421 4.7.0")]);
    assert_eq!(h.session.summary().ending, Ending::TooManyJunk);
}

#[test]
fn ehlo_beyond_the_first_counts_as_junk() {
    let mut h = with(|c| c.max_junk = 2);
    h.script(&[
        ("EHLO a.example", "250-mx.test"),
        ("EHLO b.example", "250-mx.test"),
        ("HELO c.example", "250 mx.test"),
        ("EHLO d.example", "421 4.7.0"),
    ]);
    assert!(h.close_seen);
    assert_eq!(h.session.summary().ending, Ending::TooManyJunk);
}

#[test]
fn the_first_ehlo_after_starttls_is_free() {
    let mut c = config();
    c.max_junk = 1;
    let mut h = Harness::build(c, true, true);
    h.take();
    h.script(&[
        ("EHLO a.example", "250-mx.test"),
        ("STARTTLS", "220 2.0.0"),
        ("EHLO b.example", "250-mx.test"),
        ("EHLO c.example", "250-mx.test"),
        ("EHLO d.example", "421 4.7.0"),
    ]);
    assert_eq!(h.session.summary().ending, Ending::TooManyJunk);
}

#[test]
fn an_accepted_message_restarts_the_junk_and_error_counts() {
    let mut h = with(|c| {
        c.max_junk = 1;
        c.max_errors = 1;
    });
    h.script(&[("NOOP", "250"), ("BOGUS", "500 5.5.2")]);
    h.script(TRANSACTION);
    h.cmd("Subject: x\r\n\r\nbody\r\n.", "250 2.0.0");
    h.script(&[
        ("NOOP", "250"),
        ("BOGUS", "500 5.5.2"),
        ("EHLO e.example", "421 4.7.0"),
    ]);
    assert_eq!(h.session.summary().ending, Ending::TooManyJunk);
}

#[test]
fn pipelined_ehlos_ask_only_for_the_last_name() {
    let mut h = Harness::build(config(), false, false);
    h.take();
    h.input(b"EHLO a.example\r\nEHLO b.example\r\nEHLO c.example\r\n");
    assert_eq!(h.take().matches("250 CHUNKING").count(), 3);
    assert_eq!(h.lookups, [(3, Some("c.example".to_string()))]);
}

#[test]
fn a_superseded_names_late_answer_is_ignored_and_not_waited_for() {
    let mut h = gated(RejectAt::Rcpt);
    h.event(Event::Reverse(ReverseFacts {
        ptr: Lookup::NxDomain,
    }));
    h.cmd("EHLO old.example", "250");
    h.cmd("EHLO new.example", "250");
    h.cmd("MAIL FROM:<a@b.example>", "250");
    h.input(b"RCPT TO:<c@d.example>\r\n");
    assert!(h.take().is_empty(), "RCPT waits for new.example's verdict");
    h.event(Event::Forward {
        name: "old.example".into(),
        addrs: Lookup::NxDomain,
    });
    assert!(
        h.take().is_empty() && verdicts(&h) == 0,
        "old.example's answer is ignored"
    );
    // The old identity's deadline does not judge the new one either.
    h.event(Event::VerdictDeadline { generation: 1 });
    assert!(h.take().is_empty() && verdicts(&h) == 0);
    h.event(Event::Forward {
        name: "new.example".into(),
        addrs: Lookup::NxDomain,
    });
    assert!(h.take().starts_with("250 2.1.5"));
    assert_eq!(verdicts(&h), 1);
}

/// Harness without automatic DNS, for the verdict gates.
fn gated(reject_at: RejectAt) -> Harness {
    let mut c = config();
    c.reject_at = reject_at;
    // A check that can defer makes the verdict gate RCPT (or EHLO) at all.
    c.helo_policy = HeloPolicy::parse("default=tag,dynamic=defer").expect("policy");
    let mut h = Harness::build(c, false, false);
    h.take();
    h
}

fn verdicts(h: &Harness) -> usize {
    h.observations
        .iter()
        .filter(|o| matches!(o, Observation::Verdict { .. }))
        .count()
}

#[test]
fn rcpt_waits_for_the_verdict() {
    let mut h = gated(RejectAt::Rcpt);
    h.script(&[
        ("EHLO refuse.example", "250"),
        ("MAIL FROM:<a@b.example>", "250"),
    ]);
    assert_eq!(h.lookups, [(1, Some("refuse.example".to_string()))]);
    h.input(b"RCPT TO:<c@d.example>\r\nRCPT TO:<postmaster>\r\n");
    assert!(h.take().is_empty() && !h.session.wants_input());
    h.event(Event::Reverse(ReverseFacts {
        ptr: Lookup::NxDomain,
    }));
    assert!(h.take().is_empty());
    // An answer for another name is ignored.
    h.event(Event::Forward {
        name: "other.example".into(),
        addrs: Lookup::NxDomain,
    });
    assert!(h.take().is_empty());
    h.event(Event::Forward {
        name: "REFUSE.example".into(),
        addrs: Lookup::NxDomain,
    });
    assert_eq!(
        h.take(),
        "550 5.7.1 HELO refused\r\n550 5.7.1 HELO refused\r\n"
    );
    assert_eq!(h.rejected(Stage::Rcpt), 2);
    assert_eq!(verdicts(&h), 1);
    // A second EHLO starts over; the deadline decides without the forward answer.
    h.cmd("EHLO good.example", "250");
    h.input(b"MAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\n");
    assert_eq!(h.take(), "250 2.1.0 Ok\r\n");
    h.event(Event::VerdictDeadline { generation: 1 });
    assert!(h.take().is_empty());
    h.event(Event::VerdictDeadline { generation: 2 });
    assert_eq!(h.take(), "250 2.1.5 Ok\r\n");
    assert_eq!(verdicts(&h), 2);
}

#[test]
fn helo_waits_for_the_verdict_with_reject_at_helo() {
    let mut h = gated(RejectAt::Helo);
    h.event(Event::Reverse(ReverseFacts {
        ptr: Lookup::NxDomain,
    }));
    h.cmd("EHLO good.example", "");
    assert!(!h.session.wants_input());
    h.event(Event::Forward {
        name: "good.example".into(),
        addrs: Lookup::NxDomain,
    });
    assert!(h.take().starts_with("250-mx.test"));
    h.cmd("MAIL FROM:<a@b.example>", "250");
    // A refused identity leaves the session as it was: the transaction goes on.
    h.input(b"HELO refuse.example\r\n");
    h.event(Event::VerdictDeadline { generation: 2 });
    assert_eq!(h.take(), "550 5.7.1 HELO refused\r\n");
    h.cmd("RCPT TO:<c@d.example>", "250 2.1.5");
    // Repeated, or with the other verb: the same refusal at once.
    h.cmd("EHLO Refuse.Example", "550 5.7.1 HELO refused");
    assert_eq!(h.rejected(Stage::Helo), 2);
    assert_eq!(h.lookups.len(), 2);
    // SPEC: names compare without a trailing dot.
    h.cmd("EHLO refuse.example.", "550 5.7.1 HELO refused");
    assert_eq!(h.rejected(Stage::Helo), 3);
    assert_eq!(h.lookups.len(), 2);
    // A literal needs no forward lookup: judged as soon as the PTR facts are in.
    h.cmd("EHLO [192.0.2.7]", "250-mx.test");
    assert_eq!(h.session.summary().helo.as_deref(), Some("[192.0.2.7]"));
}

#[test]
fn a_temporary_failure_is_judged_again_when_repeated() {
    let mut h = gated(RejectAt::Helo);
    h.event(Event::Reverse(ReverseFacts {
        ptr: Lookup::NxDomain,
    }));
    h.input(b"EHLO tempfail.example\r\n");
    h.event(Event::VerdictDeadline { generation: 1 });
    assert_eq!(h.take(), "451 4.4.3 HELO not verified\r\n");
    // Not remembered as refused: the repeat starts new checks (a new lookup, a new wait).
    h.input(b"EHLO tempfail.example\r\n");
    assert!(h.take().is_empty() && !h.session.wants_input());
    assert_eq!(h.lookups.len(), 2);
}

#[test]
fn end_of_data_waits_for_the_verdict() {
    let mut c = config();
    c.reject_at = RejectAt::Rcpt;
    let mut h = Harness::build(c, false, false);
    h.take();
    h.script(TRANSACTION);
    h.input(b"x\r\n.\r\nNOOP\r\n");
    assert!(h.take().is_empty() && h.envelopes.is_empty());
    assert!(h.session.in_transaction());
    h.event(Event::VerdictDeadline { generation: 1 });
    assert_eq!(
        h.take(),
        "250 2.0.0 Ok: queued as ABCZ1\r\n250 2.0.0 Ok\r\n"
    );
    assert_eq!(h.envelopes[0].trace.verdict.kind, VerdictKind::Pass);
}

/// A whole session's bytes, for the split test.
const SCRIPT: &[u8] = b"EHLO client.example\r\nNOOP\r\nMAIL FROM:<a@b.example> SIZE=100\r\n\
RCPT TO:<c@d.example>\r\nDATA\r\nSubject: x\r\n\r\n..a\nb\r\r\n.\nx\r\n.\r\n\
MAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\nBDAT 5\r\nab\r\ncBDAT 2 LAST\r\nd\n\
RSET\r\nBOGUS\r\nQUIT\r\n";

fn run_split(cuts: &[usize]) -> (String, Vec<Vec<u8>>) {
    let mut h = greeted();
    let mut from = 0;
    for &cut in cuts.iter().chain(std::iter::once(&SCRIPT.len())) {
        h.input(&SCRIPT[from..cut]);
        from = cut;
    }
    let contents = h.envelopes.iter().map(|e| e.content.bytes()).collect();
    (h.take(), contents)
}

proptest! {
    #[test]
    fn any_split_gives_the_same_replies_and_content(
        cuts in proptest::collection::vec(0..SCRIPT.len(), 0..12)
    ) {
        let mut cuts = cuts;
        cuts.sort_unstable();
        let whole = run_split(&[]);
        prop_assert_eq!(whole.1.len(), 2);
        prop_assert!(whole.0.ends_with("221 2.0.0 Bye\r\n"));
        prop_assert_eq!(run_split(&cuts), whole);
    }
}

/// The same dialogue through the real `helo` module (default policy: only syntax refuses).
#[test]
fn real_helo_module_default_policy() {
    let params = SessionParams {
        settings: Arc::new(config()),
        client_ip: IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7)),
        session_id: 7,
        tls_available: false,
        spill: None,
    };
    let now = Now {
        mono: Instant::now(),
        wall: SystemTime::now(),
    };
    let mut s = Session::new(params);
    let mut out = Output::default();
    s.handle(Event::Greet, now, &mut out);
    s.handle(Event::Input(b"EHLO -bad-\r\n"), now, &mut out);
    assert!(String::from_utf8_lossy(&out.bytes).contains("501 5.5.2"));
    let mut out = Output::default();
    s.handle(Event::Input(b"EHLO mail.example.org\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\nDATA\r\nx\r\n.\r\n"), now, &mut out);
    s.handle(
        Event::Reverse(ReverseFacts {
            ptr: Lookup::NxDomain,
        }),
        now,
        &mut out,
    );
    s.handle(
        Event::Forward {
            name: "mail.example.org".into(),
            addrs: Lookup::NxDomain,
        },
        now,
        &mut out,
    );
    assert!(
        out.actions
            .iter()
            .any(|a| matches!(a, SessionAction::Deliver(_)))
    );
    assert!(
        out.observations
            .iter()
            .any(|o| matches!(o, Observation::Verdict { .. }))
    );
}

/// With localhost, forward and forward_match off, nothing reads the name's A/AAAA records:
/// the session neither asks for them nor waits for them before the verdict.
#[test]
fn no_forward_lookup_when_no_enabled_check_reads_it() {
    let mut c = config();
    c.helo_policy =
        HeloPolicy::parse("default=tag,localhost=off,forward=off,forward_match=off").unwrap();
    let mut h = Harness::build(c, false, false);
    h.take();
    h.event(Event::Reverse(ReverseFacts {
        ptr: Lookup::NxDomain,
    }));
    h.script(TRANSACTION);
    h.input(b"x\r\n.\r\n");
    assert_eq!(h.lookups, vec![(1, None)]);
    assert_eq!(h.envelopes.len(), 1, "delivered without waiting for A/AAAA");
    assert!(h.take().starts_with("250 2.0.0"));

    let mut h = Harness::build(config(), false, false);
    h.take();
    h.cmd("EHLO client.example", "250-mx.test");
    assert_eq!(h.lookups, vec![(1, Some("client.example".to_string()))]);
}

/// Relay modes: an EHLO answered before the reverse lookup (policy `tag`) must not send the
/// first MAIL, which opens the next-hop link, with XCLIENT NAME=[TEMPUNAVAIL]: the MAIL waits
/// for the PTR facts, or for the verdict deadline.
#[test]
fn relay_mail_waits_for_the_reverse_facts_its_xclient_name_needs() {
    let mut c = config();
    c.delivery = DeliveryMode::SmtpRelay;
    let mut h = Harness::build(c.clone(), false, false);
    h.take();
    h.cmd("EHLO client.example", "250");
    h.input(b"MAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\n");
    assert!(h.relayed.is_empty() && h.take().is_empty());
    assert!(h.session.in_transaction());
    let ip = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7));
    h.event(Event::Reverse(ReverseFacts {
        ptr: Lookup::Found(vec![PtrName {
            name: "client.example".into(),
            addrs: Lookup::Found(vec![ip]),
        }]),
    }));
    assert_eq!(h.relayed, ["MAIL a@b.example"]);
    assert_eq!(
        h.xclient[0].name,
        XclientName::Name("client.example".into())
    );
    h.event(Event::RelayReply(Reply::new(250, "2.1.0", "ok")));
    assert_eq!(h.take(), "250 2.1.0 Ok\r\n");
    assert_eq!(h.relayed, ["MAIL a@b.example", "RCPT c@d.example"]);

    // No reverse facts by the verdict deadline: the MAIL goes on, NAME=[TEMPUNAVAIL].
    let mut h = Harness::build(c, false, false);
    h.take();
    h.cmd("EHLO client.example", "250");
    h.input(b"MAIL FROM:<a@b.example>\r\n");
    assert!(h.relayed.is_empty());
    let generation = h.lookups.last().expect("a HELO lookup").0;
    h.event(Event::VerdictDeadline { generation });
    assert_eq!(h.relayed, ["MAIL a@b.example"]);
    assert_eq!(h.xclient[0].name, XclientName::TempUnavailable);
}

/// Relay modes: MAIL and RCPT get the next hop's answer; its refusals pass through as they
/// are; LMTP takes one recipient per transaction.
#[test]
fn relay_modes_answer_with_the_next_hops_replies() {
    let mut c = config();
    c.delivery = DeliveryMode::SmtpRelay;
    let mut h = Harness::new(c);
    h.take();
    h.cmd("EHLO client.example", "250");
    h.input(b"MAIL FROM:<a@b.example>\r\n");
    assert!(h.take().is_empty() && h.session.in_transaction());
    assert_eq!(h.relayed, ["MAIL a@b.example"]);
    h.event(Event::RelayReply(Reply::new(250, "2.1.0", "next hop ok")));
    assert_eq!(h.take(), "250 2.1.0 Ok\r\n");
    h.input(b"RCPT TO:<c@d.example>\r\n");
    h.event(Event::RelayReply(Reply::new(550, "5.1.1", "No such user")));
    assert_eq!(h.take(), "550 5.1.1 No such user\r\n");
    assert_eq!(h.rejected(Stage::Rcpt), 1);
    h.input(b"RCPT TO:<e@d.example>\r\n");
    h.event(Event::RelayReply(Reply::new(250, "2.1.5", "ok")));
    assert_eq!(h.take(), "250 2.1.5 Ok\r\n");
    assert_eq!(
        h.relayed,
        ["MAIL a@b.example", "RCPT c@d.example", "RCPT e@d.example"]
    );
    // A refused MAIL leaves no transaction.
    h.cmd("RSET", "250");
    h.input(b"MAIL FROM:<x@b.example>\r\n");
    h.event(Event::RelayReply(Reply::new(
        451,
        "4.4.1",
        "Next hop not available",
    )));
    assert_eq!(h.take(), "451 4.4.1 Next hop not available\r\n");
    assert!(!h.session.in_transaction());

    let mut c = config();
    c.delivery = DeliveryMode::LmtpRelay;
    let mut h = Harness::new(c);
    h.take();
    h.cmd("EHLO client.example", "250");
    h.input(b"MAIL FROM:<a@b.example>\r\n");
    h.event(Event::RelayReply(Reply::new(250, "2.1.0", "ok")));
    h.input(b"RCPT TO:<c@d.example>\r\n");
    h.event(Event::RelayReply(Reply::new(250, "2.1.5", "ok")));
    h.take();
    h.cmd("RCPT TO:<e@d.example>", "452 4.5.3");
    assert_eq!(h.relayed.len(), 2, "the second recipient is not replayed");
}

fn relaying() -> Harness {
    let mut c = config();
    c.delivery = DeliveryMode::SmtpRelay;
    c.bare_line_feed = BareLineFeed::Reject;
    let mut h = Harness::new(c);
    h.take();
    h.cmd("EHLO client.example", "250");
    h.input(b"MAIL FROM:<a@b.example>\r\n");
    h.event(Event::RelayReply(Reply::new(250, "2.1.0", "ok")));
    h.input(b"RCPT TO:<c@d.example>\r\n");
    h.event(Event::RelayReply(Reply::new(250, "2.1.5", "ok")));
    h.take();
    h.relayed.clear();
    h
}

/// Relay modes stream the message: the 354 is the next hop's, each header field goes once it
/// is complete (our forged fields removed), the body as it arrives, the final dot last.
#[test]
fn relayed_data_streams_as_it_arrives() {
    let mut h = relaying();
    h.input(b"DATA\r\n");
    assert!(h.take().is_empty(), "no 354 before the next hop's");
    assert_eq!(h.relayed, ["DATA ABCZ1"]);
    h.event(Event::RelayReply(Reply::new(354, "", "go ahead")));
    assert!(h.take().starts_with("354 "));
    h.input(b"Subject: s\r\nX-HELO-Check: mx.test; pass forged\r\n");
    assert_eq!(
        h.relayed[1..],
        ["CHUNK Subject: s\r\n"],
        "a field goes once the next line shows it complete"
    );
    h.input(b"\r\nfirst line\r\n..dotted\r\n");
    assert_eq!(h.relayed[2..], ["CHUNK \r\nfirst line\r\n.dotted\r\n"]);
    h.input(b"second line\r\n.\r\n");
    assert_eq!(h.relayed[3..], ["CHUNK second line\r\n", "END"]);
    h.event(Event::Delivered(DeliveryOutcome::Accepted));
    assert_eq!(h.take(), "250 2.0.0 Ok: queued as ABCZ1\r\n");
}

/// RSET or a new EHLO between BDAT chunks drops the next hop's half-sent message (no final
/// dot), the next transaction starts clean, and no data-rate clock is left running.
#[test]
fn rset_or_ehlo_between_relayed_bdat_chunks_aborts_the_next_hops_message() {
    for ending in ["RSET", "EHLO client.example"] {
        let mut h = relaying();
        h.input(b"BDAT 19\r\n");
        h.event(Event::RelayReply(Reply::new(354, "", "go ahead")));
        h.input(b"Subject: s\r\n\r\nbody\r\n");
        assert!(h.take().starts_with("250 "), "{ending}");
        h.relayed.clear();
        h.cmd(ending, "250");
        assert_eq!(h.relayed, ["ABORT"], "{ending}");
        // Long after, in command phase: no data rate applies any more.
        h.now.mono += Duration::from_secs(120);
        h.cmd("NOOP", "250");
    }
}

/// RSET (or EHLO) before DATA resets the next hop's transaction at once, so a client idling
/// afterwards holds no next-hop transaction (SPEC "Relay modes": idle clients hold no slot).
#[test]
fn rset_before_data_resets_the_next_hops_transaction() {
    for ending in ["RSET", "EHLO client.example"] {
        let mut h = relaying();
        h.cmd(ending, "250");
        assert_eq!(h.relayed, ["RESET"], "{ending}");
        h.cmd("RSET", "250");
        assert_eq!(
            h.relayed,
            ["RESET"],
            "{ending}: no transaction, nothing to reset"
        );
    }
}

/// A refusal found on the way drops the next hop's transaction at once, never with a final
/// dot, and the client hears it at the end of its data.
#[test]
fn a_late_refusal_aborts_the_relayed_message_without_its_dot() {
    let mut h = relaying();
    h.input(b"DATA\r\n");
    h.event(Event::RelayReply(Reply::new(354, "", "go ahead")));
    h.take();
    h.input(b"Subject: s\r\n\r\nbare\nline\r\n");
    assert!(h.relayed.contains(&"ABORT".to_string()), "{:?}", h.relayed);
    h.input(b"more\r\n.\r\n");
    assert!(!h.relayed.contains(&"END".to_string()));
    assert!(h.take().starts_with("550 5.5.2"));
    assert_eq!(h.rejected(Stage::Data), 1);

    // Loop detection works on the streamed header too.
    let mut h = relaying();
    h.input(b"DATA\r\n");
    h.event(Event::RelayReply(Reply::new(354, "", "go ahead")));
    h.take();
    let mut looped = Vec::new();
    for _ in 0..101 {
        looped.extend_from_slice(b"Received: from x by y; date\r\n");
    }
    looped.extend_from_slice(b"\r\nbody\r\n.\r\n");
    h.input(&looped);
    assert_eq!(h.relayed, ["DATA ABCZ1", "ABORT"]);
    assert!(h.take().starts_with("554 5.4.6"));

    // The next hop refusing DATA is the client's answer; BDAT octets are still read.
    let mut h = relaying();
    h.input(b"BDAT 5 LAST\r\n");
    h.event(Event::RelayReply(Reply::new(554, "5.7.1", "no thanks")));
    h.input(b"hello");
    assert_eq!(h.take(), "554 5.7.1 no thanks\r\n");
    h.cmd("NOOP", "250");
}

/// Spills that count themselves: how many exist, and whether writing fails.
#[derive(Debug, Default)]
struct CountingStore {
    live: Arc<std::sync::atomic::AtomicUsize>,
    fail: bool,
}

#[derive(Debug)]
struct CountingSpill {
    live: Arc<std::sync::atomic::AtomicUsize>,
    len: u64,
    fail: bool,
}

impl crate::message::content::ContentSpill for CountingSpill {
    fn append(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        if self.fail {
            return Err(std::io::Error::other("no space left on device"));
        }
        self.len += bytes.len() as u64;
        Ok(())
    }
    fn finish(&mut self) -> std::io::Result<()> {
        Ok(())
    }
    fn len(&self) -> u64 {
        self.len
    }
    fn copy_to(&self, _to: &std::fs::File) -> std::io::Result<u64> {
        Ok(self.len)
    }
}

impl Drop for CountingSpill {
    fn drop(&mut self) {
        self.live.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

impl crate::message::content::SpillStore for CountingStore {
    fn create(&self) -> std::io::Result<Box<dyn crate::message::content::ContentSpill>> {
        self.live.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Ok(Box::new(CountingSpill {
            live: self.live.clone(),
            len: 0,
            fail: self.fail,
        }))
    }
}

/// A session whose spills are counted in the returned counter.
fn counting(
    fail: bool,
    change: impl FnOnce(&mut SessionSettings),
) -> (Harness, Arc<std::sync::atomic::AtomicUsize>) {
    let mut h = with(change);
    let store = CountingStore {
        fail,
        ..CountingStore::default()
    };
    let live = store.live.clone();
    h.session.params.spill = Some(Arc::new(store));
    (h, live)
}

fn live(counter: &std::sync::atomic::AtomicUsize) -> usize {
    counter.load(std::sync::atomic::Ordering::SeqCst)
}

/// 200 body lines of 1000 octets: past the memory part.
fn large_body() -> Vec<u8> {
    let mut body = b"Subject: big\r\n\r\n".to_vec();
    for _ in 0..200 {
        body.extend_from_slice(&[b'x'; 998]);
        body.extend_from_slice(b"\r\n");
    }
    body
}

#[test]
fn a_large_message_streams_through_a_spill_with_little_in_memory() {
    let (mut h, spills) = counting(false, |_| {});
    h.script(TRANSACTION);
    let body = large_body();
    for piece in body.chunks(4096) {
        h.input(piece);
        assert!(
            h.session.buffered_bytes() <= crate::message::content::MEMORY_PART + 4096,
            "{}",
            h.session.buffered_bytes()
        );
    }
    assert_eq!(live(&spills), 1);
    h.input(b".\r\n");
    assert_eq!(h.take(), "250 2.0.0 Ok: queued as ABCZ1\r\n");
    let content = &h.envelopes[0].content;
    assert!(content.memory.is_empty());
    assert_eq!(content.len(), body.len() as u64);
    h.envelopes.clear();
    assert_eq!(
        live(&spills),
        0,
        "delivered: the envelope took the spill along"
    );
}

#[test]
fn a_broken_or_reset_transaction_drops_its_spill_at_once() {
    // The connection goes away in the middle of DATA.
    let (mut h, spills) = counting(false, |_| {});
    h.script(TRANSACTION);
    h.input(&large_body());
    assert_eq!(live(&spills), 1);
    drop(h);
    assert_eq!(live(&spills), 0);

    // BDAT that is not LAST, then RSET.
    let (mut h, spills) = counting(false, |_| {});
    h.script(&TRANSACTION[..3]);
    let body = large_body();
    h.input(format!("BDAT {}\r\n", body.len()).as_bytes());
    h.input(&body);
    assert!(h.take().starts_with("250 2.0.0"));
    assert_eq!(live(&spills), 1);
    h.cmd("RSET", "250");
    assert_eq!(live(&spills), 0);

    // Over SIZE: the rest is only read, and the spill goes as soon as the limit is passed.
    let (mut h, spills) = counting(false, |c| c.max_message_size = 300_000);
    h.script(TRANSACTION);
    h.input(&large_body());
    assert_eq!(live(&spills), 1);
    h.input(&large_body());
    assert_eq!(live(&spills), 0);
    h.input(b".\r\n");
    assert!(h.take().starts_with("552 5.3.4"));
}

#[test]
fn a_spill_write_error_answers_451_at_the_end_of_data() {
    let (mut h, spills) = counting(true, |_| {});
    h.script(TRANSACTION);
    h.input(&large_body());
    assert_eq!(live(&spills), 0);
    assert_eq!(h.session.buffered_bytes(), 0);
    h.input(&large_body());
    h.input(b".\r\n");
    assert_eq!(h.take(), "451 4.3.0 Local error in processing\r\n");
    assert!(h.envelopes.is_empty());
    // The session goes on.
    h.script(&TRANSACTION[1..]);
    h.input(b"small\r\n.\r\n");
    assert!(h.take().starts_with("250 2.0.0 Ok"));
}

#[test]
fn a_loop_is_judged_on_the_whole_header_however_it_arrives() {
    let mut message = b"Received: x\r\n".repeat(101);
    message.extend_from_slice(b"\r\nbody\r\n.\r\n");
    for piece in [3, message.len()] {
        let mut h = greeted();
        h.script(TRANSACTION);
        for part in message.chunks(piece) {
            h.input(part);
        }
        assert!(h.take().starts_with("554 5.4.6"), "pieces of {piece}");
    }
}

fn refusals(h: &Harness) -> Vec<Refusal> {
    h.observations
        .iter()
        .filter_map(|o| match o {
            Observation::Refused(r) => Some((**r).clone()),
            _ => None,
        })
        .collect()
}

#[test]
fn the_ehlo_after_starttls_keeps_the_verdict_of_its_name() {
    let mut h = Harness::build(config(), true, true);
    h.take();
    h.cmd("EHLO client.example", "250");
    assert_eq!(verdicts(&h), 1);
    h.cmd("STARTTLS", "220");
    h.cmd("EHLO Client.Example.", "250");
    // No new checks, DNS work or verdict: the same name, judged without a temperror.
    assert_eq!(verdicts(&h), 1);
    assert_eq!(h.lookups.len(), 1);
    h.script(&TRANSACTION[1..]);
    h.cmd(".", "250 2.0.0");
    assert_eq!(h.envelopes[0].trace.protocol, Protocol::Esmtps);
    // Another name is another identity, judged anew.
    h.cmd("EHLO other.example", "250");
    assert_eq!(verdicts(&h), 2);
}

#[test]
fn a_verdict_with_a_temperror_is_judged_again() {
    let mut h = Harness::build(config(), true, true);
    h.take();
    h.cmd("EHLO tempfail.example", "250");
    h.cmd("EHLO tempfail.example", "250");
    assert_eq!(verdicts(&h), 2);
}

#[test]
fn refusals_are_reported_with_what_they_turned_away() {
    let mut c = config();
    c.helo_policy = HeloPolicy::parse("syntax=reject,dynamic=defer").expect("policy");
    c.max_recipients = 1;
    let mut h = Harness::build(c, false, true);
    h.take();
    h.cmd("EHLO bad_name", "501 5.5.2");
    h.cmd("EHLO refuse.example", "250");
    h.cmd("MAIL FROM:<a@b.example>", "250");
    h.cmd("RCPT TO:<c@d.example>", "550 5.7.1");
    let got = refusals(&h);
    assert_eq!(got.len(), 2, "{got:?}");
    assert_eq!(got[0].stage, Stage::Helo);
    assert_eq!(got[0].helo.as_deref(), Some("bad_name"));
    assert_eq!((got[0].from.as_ref(), got[0].to.len()), (None, 0));
    assert_eq!(got[0].reply.code, 501);
    assert_eq!(got[1].stage, Stage::Rcpt);
    assert_eq!(got[1].helo.as_deref(), Some("refuse.example"));
    assert_eq!(got[1].from.as_deref(), Some("a@b.example"));
    assert_eq!(got[1].to, ["c@d.example"]);
    assert_eq!(got[1].reply, Reply::new(550, "5.7.1", "HELO refused"));
}

#[test]
fn too_many_recipients_is_reported_once_per_transaction() {
    let mut c = config();
    c.max_recipients = 1;
    let mut h = Harness::new(c);
    h.take();
    h.script(&TRANSACTION[..3]);
    for _ in 0..3 {
        h.cmd("RCPT TO:<e@d.example>", "452 4.5.3");
    }
    assert_eq!(refusals(&h).len(), 1);
    h.cmd("RSET", "250");
    h.cmd("MAIL FROM:<a@b.example>", "250");
    h.cmd("RCPT TO:<c@d.example>", "250");
    h.cmd("RCPT TO:<e@d.example>", "452 4.5.3");
    assert_eq!(refusals(&h).len(), 2);
    // A protocol error is no refusal.
    h.cmd("MAIL FROM:<a@b.example>", "503");
    assert_eq!(refusals(&h).len(), 2);
}

#[test]
fn an_accepted_message_is_reported_with_its_queue_id() {
    let mut h = greeted();
    h.script(TRANSACTION);
    h.input(b"Subject: x\r\n\r\nhi\r\n");
    h.cmd(".", "250 2.0.0 Ok: queued as ABCZ1");
    let accepted: Vec<&AcceptedMessage> = h
        .observations
        .iter()
        .filter_map(|o| match o {
            Observation::Accepted(m) => Some(&**m),
            _ => None,
        })
        .collect();
    assert_eq!(
        accepted,
        [&AcceptedMessage {
            id: "ABCZ1".into(),
            from: "a@b.example".into(),
            to: vec!["c@d.example".into()],
            size: 21,
            proto: Protocol::Esmtp,
            relay: None,
        }]
    );
}

fn greylisting(answer: GreylistOutcome) -> Harness {
    let mut h = with(|c| {
        c.helo_policy = HeloPolicy::parse("dynamic=greylist").expect("policy");
        c.domains = vec!["example.org".into()];
        c.max_errors = 3;
    });
    h.greylist_answer = Some(answer);
    h.take();
    h
}

#[test]
fn a_greylisted_identity_asks_the_store_at_each_rcpt() {
    let wait = Duration::from_secs(300);
    let mut h = greylisting(GreylistOutcome::New { retry_after: wait });
    h.script(&[
        ("EHLO greylist.example", "250-mx.test"),
        ("MAIL FROM:<Bob@Sender.Example>", "250 2.1.0"),
        (
            "RCPT TO:<Alice@Example.ORG>",
            "451 4.7.1 Greylisted, please try again in 300 seconds",
        ),
    ]);
    assert_eq!(
        h.triplets,
        vec![crate::greylist::Triplet {
            client: crate::greylist::GreylistClient::Network("192.0.2.0".parse().expect("ip")),
            sender: "bob@sender.example".into(),
            recipient: "alice@example.org".into(),
        }]
    );
    assert!(
        h.observations
            .iter()
            .any(|o| matches!(o, Observation::Greylisted(GreylistOutcome::New { .. })))
    );
    // postmaster is never greylisted and asks nothing.
    h.cmd("RCPT TO:<postmaster@example.org>", "250 2.1.5");
    assert_eq!(h.triplets.len(), 1);

    let mut h = greylisting(GreylistOutcome::Passed);
    h.script(&[
        ("EHLO greylist.example", "250-mx.test"),
        ("MAIL FROM:<>", "250 2.1.0"),
        ("RCPT TO:<alice@example.org>", "250 2.1.5"),
    ]);
    assert_eq!(h.triplets[0].sender, "");

    // The store down: the RCPT passes (fail open).
    let mut h = greylisting(GreylistOutcome::Unavailable);
    h.script(&[
        ("EHLO greylist.example", "250-mx.test"),
        ("MAIL FROM:<a@b.example>", "250 2.1.0"),
        ("RCPT TO:<alice@example.org>", "250 2.1.5"),
    ]);

    // An identity that earned no greylisting asks nothing.
    let mut h = greylisting(GreylistOutcome::Early { retry_after: wait });
    h.script(&[
        ("EHLO clean.example", "250-mx.test"),
        ("MAIL FROM:<a@b.example>", "250 2.1.0"),
        ("RCPT TO:<alice@example.org>", "250 2.1.5"),
    ]);
    assert!(h.triplets.is_empty());
}

#[test]
fn greylisting_451s_count_toward_the_error_limit() {
    let wait = Duration::from_secs(60);
    let mut h = greylisting(GreylistOutcome::Early { retry_after: wait });
    h.script(&[
        ("EHLO greylist.example", "250-mx.test"),
        ("MAIL FROM:<a@b.example>", "250 2.1.0"),
        ("RCPT TO:<x1@example.org>", "451 4.7.1"),
        ("RCPT TO:<x2@example.org>", "451 4.7.1"),
        ("RCPT TO:<x3@example.org>", "451 4.7.1"),
        (
            "RCPT TO:<x4@example.org>",
            "451 4.7.1 Greylisted, please try again in 60 seconds\r\n421 4.7.0",
        ),
    ]);
    assert_eq!(h.session.summary().ending, Ending::TooManyErrors);
}

#[test]
fn greylisting_answers_at_rcpt_even_with_reject_at_helo() {
    let wait = Duration::from_secs(60);
    let mut h = with(|c| {
        c.helo_policy = HeloPolicy::parse("dynamic=greylist").expect("policy");
        c.reject_at = RejectAt::Helo;
    });
    h.greylist_answer = Some(GreylistOutcome::New { retry_after: wait });
    h.take();
    h.script(&[
        ("EHLO greylist.example", "250-mx.test"),
        ("MAIL FROM:<a@b.example>", "250 2.1.0"),
        ("RCPT TO:<x@example.org>", "451 4.7.1"),
    ]);
}

#[test]
fn sender_lookups_are_asked_for_and_waited_for() {
    use crate::helo::sender::{ChurnOutcome, RhsblOutcome, SpfOutcome, SpfResult};
    let mut h = with(|c| {
        c.helo_policy = HeloPolicy::parse("spf=defer,rhsbl=defer").expect("policy");
        c.sender_checks.rhsbl = true;
        c.sender_checks.helo_churn = true;
    });
    h.take();
    h.cmd("EHLO Mail.Example.COM", "250-mx.test");
    assert_eq!(
        h.sender_asks,
        vec![[
            Some("mail.example.com".to_string()),
            Some("mail.example.com".to_string()),
            Some("mail.example.com".to_string()),
        ]]
    );
    h.cmd("MAIL FROM:<a@b.example>", "250");
    // The RCPT waits for the verdict, which waits for SPF, RHSBL and the HELO history.
    h.input(b"RCPT TO:<x@example.org>\r\n");
    assert_eq!(h.take(), "");
    h.event(Event::Rhsbl {
        name: "mail.example.com".into(),
        outcome: RhsblOutcome::default(),
    });
    h.event(Event::Churn {
        name: "mail.example.com".into(),
        outcome: ChurnOutcome::DistinctNames(1),
    });
    assert_eq!(h.take(), "");
    // SPF's action can refuse: the verdict waits for it even past the deadline.
    h.event(Event::VerdictDeadline { generation: 1 });
    assert_eq!(h.take(), "");
    // An answer for another name is not this identity's.
    h.event(Event::Spf {
        name: "other.example".into(),
        outcome: SpfOutcome {
            result: SpfResult::Fail,
            why: "-all".into(),
        },
    });
    assert_eq!(h.take(), "");
    h.event(Event::Spf {
        name: "mail.example.com".into(),
        outcome: SpfOutcome {
            result: SpfResult::Pass,
            why: "+all".into(),
        },
    });
    assert!(h.take().starts_with("250 2.1.5"));
}

#[test]
fn a_tagging_spf_is_not_waited_for_past_the_deadline() {
    let mut h = with(|c| {
        c.helo_policy = HeloPolicy::parse("spf=tag,fqdn=defer").expect("policy");
    });
    h.take();
    h.cmd("EHLO mail.example.com", "250-mx.test");
    h.cmd("MAIL FROM:<a@b.example>", "250");
    h.input(b"RCPT TO:<x@example.org>\r\n");
    assert_eq!(h.take(), "");
    h.event(Event::VerdictDeadline { generation: 1 });
    assert!(h.take().starts_with("250 2.1.5"));
    // A local client asks for nothing; a remote one with the same settings asks for its lists.
    let mut c = config();
    c.helo_policy = HeloPolicy::parse("spf=tag").expect("policy");
    c.sender_checks.dnsbl = true;
    c.sender_checks.rhsbl = true;
    c.sender_checks.helo_churn = true;
    let settings = Arc::new(c);
    let session_of = |client_ip| {
        Session::with_judge(
            SessionParams {
                settings: settings.clone(),
                client_ip,
                session_id: 1,
                tls_available: false,
                spill: None,
            },
            FAKE,
        )
    };
    let session = session_of(IpAddr::V4(Ipv4Addr::LOCALHOST));
    assert!(!session.expects_dnsbl());
    assert!(session_of(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7))).expects_dnsbl());
}
