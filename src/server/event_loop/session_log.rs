//! The log lines of a session (SPEC "Logs"): `connect`, `helo verdict`, `refused`,
//! `accepted` and `session end`, each with the session's `sid=` so one grep shows a session.
//!
//! The loop writes them, not the worker, because only the loop knows the client's connection
//! facts (DNS wait times, how the connection ended). The session reports what happened as
//! `Observation`s; `crate::logfmt` escapes every value a client chose. With info lines off
//! (RUST_LOG=warn) nothing is formatted: building the lines costs about as many instructions
//! as the rest of a message's protocol work.

use log::{Level, debug, info, log_enabled};

use crate::helo::Check;
use crate::helo::policy::HeloVerdict;
use crate::logfmt::{LogLine, angle};
use crate::metrics::action_label;
use crate::protocol::reply::Reply;
use crate::server::conn::Conn;
use crate::server::listener::ListenerKind;
use crate::session::{AcceptedMessage, Ending, Observation, Refusal, Stage};

/// `connect ...`, once the client's IP is known (after a PROXY header).
pub(super) fn log_connect(conn: &Conn, sid: u64) {
    if !log_enabled!(Level::Info) {
        return;
    }
    let listener = match conn.listener {
        ListenerKind::Plain => "plain",
        ListenerKind::Proxy => "proxy",
    };
    let line = LogLine::new("connect", sid)
        .field("ip", conn.client_ip.to_string())
        .field("port", conn.client_port.to_string())
        .field("listener", listener);
    info!("{line}");
}

/// The lines for what a session reported with its output, in the order it happened.
pub(super) fn log_observations(conn: &Conn, observations: &[Observation]) {
    if !log_enabled!(Level::Info) {
        return;
    }
    let Some(sid) = conn.state.session().map(|s| s.id()) else {
        return;
    };
    for obs in observations {
        match obs {
            Observation::Verdict { verdict, helo } => log_verdict(conn, sid, helo, verdict),
            Observation::Refused(r) => log_refused(conn, sid, r),
            Observation::Accepted(m) => log_accepted(conn, sid, m),
            Observation::Reply(_)
            | Observation::Greylisted(_)
            | Observation::MessageAccepted
            | Observation::MessageRejected(_) => {}
        }
    }
}

/// `helo verdict ...`: every check's real result (`log` checks included, which is what
/// `heloguard whatif` replays), the action in the metric's words, and how long DNS took.
fn log_verdict(conn: &Conn, sid: u64, helo: &str, verdict: &HeloVerdict) {
    let results: Vec<String> = Check::ALL
        .into_iter()
        .map(|c| format!("{}:{}", c.name(), verdict.measured[c.index()].name()))
        .collect();
    let dns_ms = conn
        .dns
        .reverse_took
        .max(conn.dns.forward_took)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    let line = LogLine::new("helo verdict", sid)
        .field("ip", conn.client_ip.to_string())
        .field("helo", helo)
        .field("ptr", verdict.ptr.as_deref().unwrap_or("none"))
        .field("verdict", verdict.kind.name())
        .field_opt("allow", verdict.allowed_by.as_deref())
        .field("action", action_label(verdict.action))
        .field("results", results.join(","))
        .field_opt(
            "dnsbl_score",
            verdict
                .dnsbl_score
                .map(|score| score.to_string())
                .as_deref(),
        )
        .field("dns_ms", dns_ms.to_string());
    info!("{line}");
}

/// `refused ...`: one line per reply that turned something away.
fn log_refused(conn: &Conn, sid: u64, refusal: &Refusal) {
    let stage = match refusal.stage {
        Stage::Helo => "helo",
        Stage::Mail => "mail",
        Stage::Rcpt => "rcpt",
        Stage::Data => "data",
    };
    let line = LogLine::new("refused", sid)
        .field("ip", conn.client_ip.to_string())
        .field("helo", refusal.helo.as_deref().unwrap_or_default())
        .field("stage", stage)
        .field_opt("from", refusal.from.as_deref().map(angle))
        .field_opt(
            "to",
            (!refusal.to.is_empty()).then(|| addresses(&refusal.to)),
        )
        .field("reply", reply_text(&refusal.reply));
    info!("{line}");
}

/// `accepted ...`: the message, by the queue ID of its Received field and 250 reply.
fn log_accepted(conn: &Conn, sid: u64, message: &AcceptedMessage) {
    let line = LogLine::new("accepted", sid)
        .field("ip", conn.client_ip.to_string())
        .field("id", &message.id)
        .field("from", angle(&message.from))
        .field("to", addresses(&message.to))
        .field("size", message.size.to_string())
        .field("proto", message.proto.name())
        .field_opt("relay", message.relay.as_ref().map(reply_text));
    info!("{line}");
}

/// `session end ...` when the session is in the loop at the end; otherwise (refused before
/// it started, or closed while it was at a worker) a debug line without session facts.
pub(super) fn log_session_end(conn: &Conn, why: &str) {
    if !log_enabled!(Level::Info) {
        return;
    }
    let duration = conn.started.elapsed().as_secs_f64();
    let Some(s) = conn.state.session().map(|s| s.summary()) else {
        debug!(
            "connection end ip={} duration={:.3}s ending={}",
            conn.client_ip, duration, why
        );
        return;
    };
    let ending = match s.ending {
        Ending::Quit => "quit",
        Ending::Timeout => "timeout",
        Ending::TooManyErrors => "too_many_errors",
        Ending::TooManyJunk => "too_many_junk",
        Ending::Shutdown => "shutdown",
        Ending::Pregreet => "pregreet",
        // The session did not end it: the loop's reason says what did.
        Ending::Open => why,
    };
    let line = LogLine::new("session end", s.sid)
        .field("ip", conn.client_ip.to_string())
        .field("helo", s.helo.unwrap_or_default())
        .field("verdict", s.verdict.map(|v| v.name()).unwrap_or("none"))
        .field("messages", s.messages.to_string())
        .field("bytes", s.bytes.to_string())
        .field("duration", format!("{duration:.3}s"))
        .field("ending", ending);
    info!("{line}");
}

/// `<a>,<b>`: addresses as the envelope had them.
fn addresses(list: &[String]) -> String {
    list.iter().map(|a| angle(a)).collect::<Vec<_>>().join(",")
}

/// A reply as the client saw it, `CODE X.Y.Z text`, its lines joined by spaces.
fn reply_text(reply: &Reply) -> String {
    format!("{} {}", reply.code, reply.lines.join(" "))
}
