//! Invariant-checking drivers shared by the fuzz targets (`fuzz/fuzz_targets/`) and the
//! corpus replay test (`tests/fuzz_corpus.rs`). Each driver takes arbitrary bytes and panics
//! when an invariant breaks, so a fuzzer finding and a corpus file replay the same checks.
//!
//! Input layout: byte 0 selects options (configuration, greeting, delivery outcomes), byte 1
//! seeds how the rest is split into reads, the rest is what the client sends.
//!
//! Invariants:
//! - nothing panics;
//! - every reply line is `DDD` then space or hyphen then text then CRLF, with no other CR or
//!   LF, the code 2xx-5xx, only the last line of a reply with a space, and an enhanced status
//!   code (when there is one) of the reply code's class (2 for a 3xx reply);
//! - bounds: the line reader never leaves 512 octets or more unconsumed; a session that wants
//!   input leaves at most a partial command line (< 512 octets) unconsumed; the message bytes a
//!   session holds never exceed HELOGUARD_MAX_MESSAGE_SIZE.

use crate::protocol::reply::enhanced_status;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use crate::config::Config;
use crate::dns::{Lookup, PtrName, ReverseFacts, TempFailure};
use crate::message::header;
use crate::protocol::MAX_COMMAND_LINE;
use crate::protocol::command::Command;
use crate::protocol::line::{LineRead, LineReader};
use crate::protocol::reply::Reply;
use crate::proxy_protocol;
use crate::session::{
    DeliveryOutcome, Event, Now, Output, Session, SessionAction, SessionParams, SessionSettings,
    TlsInfo,
};

pub mod header_reader;

/// The size limit the session driver runs under (small, so fuzzing reaches it).
pub const FUZZ_MAX_MESSAGE_SIZE: u64 = 4096;

/// Checks that `bytes` is a sequence of whole, well-formed replies.
pub fn check_replies(bytes: &[u8]) -> Result<(), String> {
    let mut rest = bytes;
    let mut open: Option<&[u8]> = None;
    while !rest.is_empty() {
        let Some(lf) = rest.iter().position(|&b| b == b'\n') else {
            return Err(format!("reply without LF: {:?}", show(rest)));
        };
        let line = &rest[..=lf];
        rest = &rest[lf + 1..];
        if line.len() < 6 || !line.ends_with(b"\r\n") {
            return Err(format!("reply line not ended by CRLF: {:?}", show(line)));
        }
        let body = &line[..line.len() - 2];
        if body.iter().any(|&b| b == b'\r' || b == b'\n') {
            return Err(format!("CR or LF inside a reply line: {:?}", show(line)));
        }
        let code = &body[..3];
        if !code.iter().all(u8::is_ascii_digit) || !(b'2'..=b'5').contains(&code[0]) {
            return Err(format!("bad reply code: {:?}", show(line)));
        }
        if let Some(prev) = open
            && prev != code
        {
            return Err(format!("code changed inside a reply: {:?}", show(line)));
        }
        match body[3] {
            b'-' => open = Some(code),
            b' ' => open = None,
            _ => return Err(format!("no space or hyphen after code: {:?}", show(line))),
        }
        let text = &body[4..];
        // RFC 3463 has classes 2, 4 and 5; an intermediate 3xx reply carries 2.
        let class = if code[0] == b'3' { b'2' } else { code[0] };
        if let Some(status) = enhanced_status(text)
            && status != class
        {
            return Err(format!(
                "enhanced status of another class: {:?}",
                show(line)
            ));
        }
    }
    if open.is_some() {
        return Err("multi-line reply without its last line".to_string());
    }
    Ok(())
}

fn show(bytes: &[u8]) -> String {
    String::from_utf8_lossy(&bytes[..bytes.len().min(200)]).into_owned()
}

/// Splits `data` into reads whose sizes come from a small generator seeded by `seed`.
fn reads(data: &[u8], seed: u8) -> Vec<&[u8]> {
    let mut state = u32::from(seed).wrapping_mul(2_654_435_761) | 1;
    let mut out = Vec::new();
    let mut rest = data;
    while !rest.is_empty() {
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        // Mostly small reads, sometimes large ones (a whole pipelined batch).
        let size = match state % 8 {
            0 => 1,
            1..=4 => 1 + (state >> 8) as usize % 16,
            5 | 6 => 1 + (state >> 8) as usize % 700,
            _ => rest.len(),
        };
        let (now, later) = rest.split_at(size.min(rest.len()));
        out.push(now);
        rest = later;
    }
    out
}

/// The line reader, fed like the event loop feeds it: every line it yields parses without
/// panicking, every parse error has a well-formed reply, nothing 512 octets long stays held.
pub fn line_input(data: &[u8]) {
    let (seed, body) = match data {
        [s, rest @ ..] => (*s, rest),
        [] => return,
    };
    let mut reader = LineReader::new();
    let mut buf: Vec<u8> = Vec::new();
    for chunk in reads(body, seed) {
        buf.extend_from_slice(chunk);
        loop {
            let before = buf.len();
            let (consumed, more) = match reader.read(&buf) {
                LineRead::Line { line, consumed } => {
                    assert!(line.len() < MAX_COMMAND_LINE, "line over 511 octets");
                    assert!(!line.contains(&b'\n'), "LF inside a line");
                    if let Err(error) = Command::parse(line) {
                        let mut out = Vec::new();
                        error.reply().write_to(&mut out);
                        if let Err(why) = check_replies(&out) {
                            panic!("parse error reply: {why}");
                        }
                    }
                    (consumed, true)
                }
                LineRead::TooLong { consumed } => (consumed, true),
                LineRead::Partial { consumed } => (consumed, false),
            };
            assert!(consumed <= before, "consumed more than offered");
            buf.drain(..consumed);
            if !more {
                break;
            }
            assert!(consumed > 0, "a line or refusal that used no input");
        }
        assert!(
            buf.len() < MAX_COMMAND_LINE,
            "line reader holds {} octets",
            buf.len()
        );
        assert!(
            !reader.is_skipping() || buf.is_empty(),
            "skipping but holding"
        );
    }
}

/// Sixteen configurations: the low bits of the option byte pick eight, the top bit picks
/// relay mode (which needs a domain list).
fn settings(variant: u8) -> Arc<SessionSettings> {
    static SETTINGS: OnceLock<Vec<Arc<SessionSettings>>> = OnceLock::new();
    let all = SETTINGS.get_or_init(|| {
        (0..16u8)
            .map(|v| {
                let lookup = move |name: &str| -> Option<String> {
                    let value = match name {
                        "HELOGUARD_HOSTNAME" => "mx.fuzz.test",
                        "HELOGUARD_DNS" => "127.0.0.1:53",
                        "HELOGUARD_WORKERS" => "1",
                        "HELOGUARD_MAX_MESSAGE_SIZE" => "4096",
                        "HELOGUARD_MAX_RECIPIENTS" => "3",
                        "HELOGUARD_MAX_ERRORS" => "12",
                        "HELOGUARD_MAX_JUNK" => "12",
                        "HELOGUARD_DOMAINS" if v & 12 != 0 => "fuzz.test",
                        "HELOGUARD_DELIVER" if v & 8 != 0 => "smtp://127.0.0.1:10025",
                        "HELOGUARD_BARE_NEWLINE" if v & 1 != 0 => "reject",
                        "HELOGUARD_HELO_POLICY" if v & 2 != 0 => {
                            "default=reject,dynamic=defer,forward=defer"
                        }
                        "HELOGUARD_REJECT_AT" if v & 6 == 6 => "helo",
                        _ => return None,
                    };
                    Some(value.to_string())
                };
                let config = Config::from_lookup(lookup).expect("fuzz config").0;
                Arc::new(SessionSettings::from(&config))
            })
            .collect()
    });
    all[usize::from(variant & 15)].clone()
}

/// What the driver does between reads, decided by the option byte.
struct Options {
    variant: u8,
    pregreet: bool,
    tls: bool,
    fail_delivery: bool,
    /// Seconds the clock moves per read (0 or 7: the data rate check after 30 s).
    tick: u64,
}

/// The session, driven like a worker drives it: greeting, arbitrary reads, and the answers
/// of the resolver, the spool and the TLS layer as the session asks for them.
pub fn session_input(data: &[u8]) {
    let (opt, seed, body) = match data {
        [o, s, rest @ ..] => (*o, *s, rest),
        _ => return,
    };
    let options = Options {
        variant: (opt & 7) | ((opt & 128) >> 4),
        pregreet: opt & 8 != 0,
        tls: opt & 16 != 0,
        fail_delivery: opt & 32 != 0,
        tick: if opt & 64 != 0 { 7 } else { 0 },
    };
    let settings = settings(options.variant);
    let client_ip = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7));
    let mut session = Session::new(SessionParams {
        settings,
        client_ip,
        session_id: 1,
        tls_available: options.tls,
        // Large messages take the spill path, in memory.
        spill: Some(Arc::new(crate::message::content::MemorySpillStore)),
    });
    let start = Instant::now();
    let mut now = Now {
        mono: start,
        wall: SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000),
    };
    let mut wire = Vec::new();
    let mut pending: Vec<Event<'static>> = Vec::new();
    let mut input: Vec<u8> = Vec::new();
    let chunks = reads(body, seed);
    let greeting = if options.pregreet && !body.is_empty() {
        Event::Pregreeted
    } else {
        Event::Greet
    };
    if opt & 128 != 0 {
        // As the loop does for a session that starts while the spool is low.
        step(
            &mut session,
            Event::SpoolSpace { low: true },
            now,
            &mut wire,
            &mut pending,
            &mut input,
        );
    }
    step(
        &mut session,
        greeting,
        now,
        &mut wire,
        &mut pending,
        &mut input,
    );
    pending.push(Event::Reverse(ReverseFacts {
        ptr: match seed % 3 {
            0 => Lookup::Found(vec![PtrName {
                name: "mail.fuzz.test".to_string(),
                addrs: Lookup::Found(vec![client_ip]),
            }]),
            1 => Lookup::NxDomain,
            _ => Lookup::TempError(TempFailure::Timeout),
        },
    }));
    for chunk in chunks {
        now.mono += Duration::from_secs(options.tick);
        input.extend_from_slice(chunk);
        run(
            &mut session,
            now,
            &mut wire,
            &mut pending,
            &mut input,
            &options,
        );
        if session.is_closed() {
            break;
        }
    }
    // The client stops sending: whatever the session waits for still arrives.
    run(
        &mut session,
        now,
        &mut wire,
        &mut pending,
        &mut input,
        &options,
    );
    if let Err(why) = check_replies(&wire) {
        panic!("{why}");
    }
}

/// Offers pending events and input until the session can make no more progress.
fn run(
    session: &mut Session,
    now: Now,
    wire: &mut Vec<u8>,
    pending: &mut Vec<Event<'static>>,
    input: &mut Vec<u8>,
    options: &Options,
) {
    for _ in 0..10_000 {
        if session.is_closed() {
            return;
        }
        if !pending.is_empty() {
            let event = pending.remove(0);
            let event = match event {
                Event::Delivered(_) if options.fail_delivery => Event::Delivered(
                    DeliveryOutcome::Failed(Reply::new(451, "4.3.0", "Local error in processing")),
                ),
                other => other,
            };
            step(session, event, now, wire, pending, input);
            continue;
        }
        if !session.wants_input() || input.is_empty() {
            return;
        }
        let before = input.len();
        let mut out = Output::default();
        session.handle(Event::Input(input), now, &mut out);
        assert!(out.consumed <= before, "consumed more than offered");
        input.drain(..out.consumed);
        after(session, out, wire, pending, input);
        if session.wants_input() && pending.is_empty() {
            // Everything whole was used: what is left is part of one command line.
            assert!(
                input.len() < MAX_COMMAND_LINE,
                "session left {} octets unconsumed",
                input.len()
            );
            return;
        }
    }
    panic!("session makes no progress");
}

fn step(
    session: &mut Session,
    event: Event<'_>,
    now: Now,
    wire: &mut Vec<u8>,
    pending: &mut Vec<Event<'static>>,
    input: &mut Vec<u8>,
) {
    let mut out = Output::default();
    session.handle(event, now, &mut out);
    after(session, out, wire, pending, input);
}

/// Checks one output and turns its actions into the events the event loop would send.
fn after(
    session: &Session,
    out: Output,
    wire: &mut Vec<u8>,
    pending: &mut Vec<Event<'static>>,
    input: &mut Vec<u8>,
) {
    if let Err(why) = check_replies(&out.bytes) {
        panic!("{why}");
    }
    let held = session.buffered_bytes() as u64;
    assert!(
        held <= FUZZ_MAX_MESSAGE_SIZE,
        "session holds {held} message octets"
    );
    wire.extend_from_slice(&out.bytes);
    for action in out.actions {
        match action {
            SessionAction::HeloAccepted {
                generation, lookup, ..
            } => {
                if let Some(name) = lookup {
                    let addrs = if name.len() % 2 == 0 {
                        Lookup::Found(vec![IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7))])
                    } else {
                        Lookup::NxDomain
                    };
                    pending.push(Event::Forward { name, addrs });
                }
                pending.push(Event::VerdictDeadline { generation });
            }
            SessionAction::Deliver(envelope) => {
                // The header filter may write one empty line before a message that does not
                // begin with a header field.
                assert!(
                    envelope.content.len() <= FUZZ_MAX_MESSAGE_SIZE + 2,
                    "message over the size limit accepted"
                );
                assert!(
                    !envelope.recipients.is_empty(),
                    "message without recipients"
                );
                pending.push(Event::Delivered(DeliveryOutcome::Accepted));
            }
            SessionAction::Greylist(triplet) => {
                let outcome = if triplet.recipient.len() % 2 == 0 {
                    crate::greylist::GreylistOutcome::Passed
                } else {
                    crate::greylist::GreylistOutcome::New {
                        retry_after: std::time::Duration::from_secs(300),
                    }
                };
                pending.push(Event::Greylist(outcome));
            }
            SessionAction::StartTls => {
                // RFC 3207 4.2: the loop discards what was read before the handshake.
                input.clear();
                pending.push(Event::TlsEstablished(TlsInfo {
                    version: "TLSv1.3".to_string(),
                    cipher: "TLS_AES_256_GCM_SHA384".to_string(),
                    bits: 256,
                }));
            }
            SessionAction::Close => {
                assert!(session.is_closed(), "Close action from an open session");
            }
            // Relay modes: the next hop takes everything; a failing delivery is mapped at
            // `Event::Delivered` like the spool's.
            SessionAction::RelayMail { .. } | SessionAction::RelayRcpt { .. } => {
                pending.push(Event::RelayReply(Reply::new(250, "2.0.0", "next hop ok")));
            }
            SessionAction::RelayData { trace, recipients } => {
                assert!(!recipients.is_empty(), "relayed message without recipients");
                assert!(!trace.queue_id.is_empty());
                pending.push(Event::RelayReply(Reply::new(354, "", "go ahead")));
            }
            SessionAction::RelayChunk(bytes) => {
                assert!(
                    bytes.len() as u64 <= FUZZ_MAX_MESSAGE_SIZE,
                    "relayed chunk over the size limit"
                );
            }
            SessionAction::RelayEndData { .. } => {
                pending.push(Event::Delivered(DeliveryOutcome::Accepted));
            }
            SessionAction::RelayAbort | SessionAction::RelayReset => {}
        }
    }
}

/// Checks a stored message whose header starts with `ours` (the fields we prepend) under every
/// reading of `header_reader`: our fields come out whole (nothing the client sent folds into
/// them), and no other field claims `host`.
pub fn check_stored_header(stored: &[u8], ours: &[&[u8]], host: &str) -> Result<(), String> {
    for reading in header_reader::READINGS {
        let fields = header_reader::fields(stored, reading);
        if fields.len() < ours.len() || fields[..ours.len()] != *ours {
            return Err(format!("{reading:?}: our fields altered: {fields:?}"));
        }
        if let Some(forged) = fields[ours.len()..]
            .iter()
            .find(|field| header_reader::claims(field, host))
        {
            return Err(format!(
                "{reading:?}: a field claims {host}: {:?}",
                String::from_utf8_lossy(forged)
            ));
        }
    }
    Ok(())
}

/// The hostname the `header` driver and the header tests filter for.
pub const HEADER_HOST: &str = "mx.example.net";

/// The fields the `header` driver puts before the filtered message, as the spool and the relay
/// do: a folded Received, then the two fields the filter protects.
pub const OUR_FIELDS: [&[u8]; 3] = [
    b"Received: from a.example (a.example [192.0.2.1])\r\n\tby mx.example.net (heloguard) with ESMTP id X;\r\n\tMon, 7 Dec 2026 02:00:00 +0000\r\n",
    b"Authentication-Results: mx.example.net; iprev=pass policy.iprev=192.0.2.1\r\n",
    b"X-HELO-Check: mx.example.net; pass helo=a.example ip=192.0.2.1\r\n",
];

/// The header filter on an arbitrary message cut into arbitrary chunks: the output is the same
/// as in one piece, the body is passed on untouched, no more than one bounded field is held,
/// and after our fields no reading of the stored header finds a field claiming our name or
/// anything folded into our fields.
pub fn header_input(data: &[u8]) {
    let (seed, message) = match data {
        [s, rest @ ..] => (*s, rest),
        [] => return,
    };
    let whole = header::filter_message(message, HEADER_HOST);
    let mut filter = header::HeaderFilter::new(HEADER_HOST);
    let mut chunked = Vec::new();
    let mut offset = 0;
    for chunk in reads(message, seed) {
        let body_from = filter.feed(chunk, &mut chunked);
        assert!(body_from <= chunk.len(), "body starts past the chunk");
        assert!(
            body_from == chunk.len() || filter.in_body(),
            "body given back while still in the header"
        );
        assert!(
            filter.held() <= header::FIELD_HOLD_LIMIT,
            "holds {} octets",
            filter.held()
        );
        if body_from < chunk.len() {
            assert_eq!(
                &chunk[body_from..],
                &message[offset + body_from..offset + chunk.len()],
                "body altered"
            );
        }
        chunked.extend_from_slice(&chunk[body_from..]);
        offset += chunk.len();
    }
    filter.finish(&mut chunked);
    let mut one_piece = whole.header.clone();
    one_piece.extend_from_slice(whole.body);
    assert_eq!(chunked, one_piece, "chunked output differs from the whole");
    assert_eq!(filter.received(), whole.received, "Received count differs");
    assert!(
        message.ends_with(whole.body),
        "the body is not the message's tail"
    );
    let mut stored = OUR_FIELDS.concat();
    stored.extend_from_slice(&chunked);
    if let Err(why) = check_stored_header(&stored, &OUR_FIELDS, HEADER_HOST) {
        panic!("{why}");
    }
}

/// The PROXY header parser on arbitrary bytes, asked at arbitrary cuts as a listener's reads
/// arrive: no panic; an answer other than `Incomplete` stays the same for every longer input
/// (an invalid one may change its reason);
/// `Done` never consumes more than it was given nor more than `MAX_HEADER_LEN`; and the answer
/// never depends on a byte past `MAX_HEADER_LEN` (the most a caller buffers).
pub fn proxy_input(data: &[u8]) {
    let (seed, bytes) = match data {
        [s, rest @ ..] => (*s, rest),
        [] => return,
    };
    let mut seen = 0;
    let mut settled: Option<proxy_protocol::ProxyParse> = None;
    for chunk in reads(bytes, seed) {
        seen += chunk.len();
        let answer = proxy_protocol::parse(&bytes[..seen]);
        if let proxy_protocol::ProxyParse::Done { consumed, .. } = answer {
            assert!(consumed <= seen, "consumed {consumed} of {seen}");
            assert!(
                consumed <= proxy_protocol::MAX_HEADER_LEN,
                "consumed {consumed}"
            );
        }
        match &settled {
            Some(before) => assert!(
                same_outcome(before, &answer),
                "answer changed with more input: {before:?} then {answer:?}"
            ),
            None if answer != proxy_protocol::ProxyParse::Incomplete => settled = Some(answer),
            None => {}
        }
    }
    // Past the cap: whatever follows, the first MAX_HEADER_LEN bytes decide.
    let mut long = bytes.to_vec();
    long.resize(proxy_protocol::MAX_HEADER_LEN + 64, seed);
    let capped = proxy_protocol::parse(&long[..proxy_protocol::MAX_HEADER_LEN]);
    assert_ne!(
        capped,
        proxy_protocol::ProxyParse::Incomplete,
        "undecided after MAX_HEADER_LEN bytes"
    );
    let full = proxy_protocol::parse(&long);
    assert!(
        same_outcome(&capped, &full),
        "a byte past the cap changed the answer: {capped:?} then {full:?}"
    );
}

/// The same decision: the same header, or invalid (the reason given may depend on how much
/// was seen, as the first check to fail names it).
fn same_outcome(a: &proxy_protocol::ProxyParse, b: &proxy_protocol::ProxyParse) -> bool {
    use proxy_protocol::ProxyParse::Invalid;
    matches!((a, b), (Invalid(_), Invalid(_))) || a == b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reply_checker() {
        assert!(check_replies(b"250-a\r\n250 b\r\n").is_ok());
        assert!(check_replies(b"550 5.7.1 no\r\n").is_ok());
        assert!(check_replies(b"550 4.7.1 no\r\n").is_err());
        assert!(check_replies(b"250-a\r\n").is_err());
        assert!(check_replies(b"250 a\n").is_err());
        assert!(check_replies(b"250 a\rb\r\n").is_err());
        assert!(check_replies(b"25 a\r\n").is_err());
    }

    #[test]
    fn drivers_run_a_dialogue() {
        let dialogue = b"EHLO mail.fuzz.test\r\nMAIL FROM:<a@b.c>\r\nRCPT TO:<x@fuzz.test>\r\nDATA\r\nhi\r\n.\r\nQUIT\r\n";
        for opt in 0..=255u8 {
            let mut data = vec![opt, 3];
            data.extend_from_slice(dialogue);
            session_input(&data);
        }
        line_input(dialogue);
    }
}
