//! The log lines the loop writes for a session: its HELO verdict and its end.
//!
//! The loop writes them, not the worker, because only the loop knows the client's connection
//! facts (DNS wait times, how the connection ended).

use log::{debug, info};

use crate::helo::policy::HeloVerdict;
use crate::helo::{Check, CheckResult};
use crate::server::conn::Conn;

/// `helo verdict ...`: the verdict, the checks that failed, and how long DNS took.
pub fn log_verdict(conn: &Conn, verdict: &HeloVerdict) {
    let helo = conn
        .state
        .session()
        .and_then(|s| s.summary().helo)
        .unwrap_or_default();
    let failed: Vec<&str> = verdict.failed.iter().map(|c| c.name()).collect();
    // SPEC: a `log` check is run, logged and counted, but left out of the verdict. It is the
    // one that failed by measure while the header shows `none` (an `off` check measures none).
    let log_failed: Vec<&str> = Check::ALL
        .into_iter()
        .filter(|c| {
            verdict.measured[c.index()] == CheckResult::Fail
                && verdict.shown[c.index()] == CheckResult::None
        })
        .map(|c| c.name())
        .collect();
    let list = |names: &[&str]| {
        if names.is_empty() {
            "-".to_string()
        } else {
            names.join(",")
        }
    };
    let dns_ms = conn
        .dns
        .reverse_took
        .max(conn.dns.forward_took)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    info!(
        "helo verdict ip={} helo={:?} ptr={} verdict={} action={} failed={} log_failed={} dns_ms={}",
        conn.client_ip,
        helo,
        verdict.ptr.as_deref().unwrap_or("none"),
        verdict.kind,
        verdict.action.name(),
        list(&failed),
        list(&log_failed),
        dns_ms,
    );
}

/// `session end ...` when the session is in the loop at the end; otherwise (refused before
/// it started, or closed while it was at a worker) a debug line without session facts.
pub fn log_session_end(conn: &Conn, why: &str) {
    let duration = conn.started.elapsed().as_secs_f64();
    match conn.state.session().map(|s| s.summary()) {
        Some(s) => info!(
            "session end ip={} helo={:?} verdict={} messages={} bytes={} duration={:.3}s ending={:?}/{}",
            conn.client_ip,
            s.helo.unwrap_or_default(),
            s.verdict.map(|v| v.name()).unwrap_or("none"),
            s.messages,
            s.bytes,
            duration,
            s.ending,
            why,
        ),
        None => debug!(
            "connection end ip={} duration={:.3}s ending={}",
            conn.client_ip, duration, why
        ),
    }
}
