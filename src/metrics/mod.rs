//! Prometheus counters for SPEC's "Metrics" table, their text rendering, and GET /metrics.
//!
//! Every counter is a relaxed atomic in a fixed array indexed by its labels, so counting on the
//! hot path is one uncontended `fetch_add` and takes no lock. `render` writes the Prometheus
//! text exposition format 0.0.4: `# HELP` and `# TYPE` for every metric, every label value
//! of SPEC's table even at zero (so rates and alerts work from the first scrape), except
//! reply codes, of which only the codes seen are written. A scrape is not a snapshot: counters
//! read one after another may be mid-update, which Prometheus tolerates; a histogram's `_count`
//! is computed from its buckets so the two always agree.
//!
//! `serve` runs a small blocking HTTP/1.1 endpoint on its own thread (no async runtime): one
//! request per connection, `Connection: close`, the request head bounded to 8 KiB and to 5 s
//! in total so that a slow or silent client cannot hold it. It answers connections one at a
//! time; it is meant for a scraper on a private address, not for the open internet.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use crate::dns::{QueryOutcome, QueryType};
use crate::greylist::GreylistOutcome;
use crate::helo::policy::HeloVerdict;
use crate::helo::{Action, CHECKS, Check, CheckResult, VerdictKind};
use crate::protocol::stage::Stage;

mod http;

pub use http::serve;

/// Which kind of listener accepted a connection (`heloguard_connections_total{listener}`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Listener {
    Plain,
    Proxy,
}

impl Listener {
    const ALL: [Listener; 2] = [Listener::Plain, Listener::Proxy];

    pub const fn name(self) -> &'static str {
        match self {
            Listener::Plain => "plain",
            Listener::Proxy => "proxy",
        }
    }
}

/// Why a connection was closed before its session began.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RefuseReason {
    MaxConnections,
    PerIp,
    ProxyHeader,
    ProxyUntrusted,
    Pregreet,
    Shutdown,
}

impl RefuseReason {
    const ALL: [RefuseReason; 6] = [
        RefuseReason::MaxConnections,
        RefuseReason::PerIp,
        RefuseReason::ProxyHeader,
        RefuseReason::ProxyUntrusted,
        RefuseReason::Pregreet,
        RefuseReason::Shutdown,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            RefuseReason::MaxConnections => "max_connections",
            RefuseReason::PerIp => "per_ip",
            RefuseReason::ProxyHeader => "proxy_header",
            RefuseReason::ProxyUntrusted => "proxy_untrusted",
            RefuseReason::Pregreet => "pregreet",
            RefuseReason::Shutdown => "shutdown",
        }
    }
}

/// Why a before-queue relay to the next hop failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RelayFailure {
    Connect,
    Timeout,
    Refused,
    Aborted,
}

impl RelayFailure {
    const ALL: [RelayFailure; 4] = [
        RelayFailure::Connect,
        RelayFailure::Timeout,
        RelayFailure::Refused,
        RelayFailure::Aborted,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            RelayFailure::Connect => "connect",
            RelayFailure::Timeout => "timeout",
            RelayFailure::Refused => "refused",
            RelayFailure::Aborted => "aborted",
        }
    }
}

/// The step of a spool delivery that failed (`heloguard_spool_errors_total{stage}`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SpoolStage {
    Write,
    Fsync,
    Rename,
}

impl SpoolStage {
    const ALL: [SpoolStage; 3] = [SpoolStage::Write, SpoolStage::Fsync, SpoolStage::Rename];

    pub const fn name(self) -> &'static str {
        match self {
            SpoolStage::Write => "write",
            SpoolStage::Fsync => "fsync",
            SpoolStage::Rename => "rename",
        }
    }
}

/// Every counter of SPEC's table; create once and share as `Arc<Metrics>`.
pub struct Metrics {
    connections: [Counter; 2],
    refused: [Counter; 6],
    sessions_active: AtomicI64,
    messages_accepted: Counter,
    messages_rejected: [Counter; 4],
    /// [check][result]
    helo_checks: [[Counter; 4]; CHECKS],
    /// [verdict][action label]
    helo_verdicts: [[Counter; 5]; 3],
    /// [query type][outcome]
    dns_queries: [[Counter; 6]; 5],
    dns_seconds: [Histogram; 5],
    /// [outcome], in `GREYLIST_OUTCOMES` order.
    greylist: [Counter; 5],
    state_errors: Counter,
    /// Per displayed zone name: list entries that matched. Zones are few and fixed by the
    /// configuration, so a small locked map is enough.
    dnsbl_listings: std::sync::Mutex<std::collections::BTreeMap<String, u64>>,
    /// Index `code - FIRST_REPLY_CODE`.
    replies: [Counter; REPLY_CODES],
    /// [ok, error]
    tls_handshakes: [Counter; 2],
    relay_failures: [Counter; 4],
    spool_errors: [Counter; 3],
    spool_bytes: Counter,
    panics: Counter,
}

impl std::fmt::Debug for Metrics {
    /// The values are for `render`; a holder's Debug output only needs to show it is there.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        Self {
            connections: counters(),
            refused: counters(),
            sessions_active: AtomicI64::new(0),
            messages_accepted: Counter::default(),
            messages_rejected: counters(),
            helo_checks: std::array::from_fn(|_| counters()),
            helo_verdicts: std::array::from_fn(|_| counters()),
            dns_queries: std::array::from_fn(|_| counters()),
            dns_seconds: std::array::from_fn(|_| Histogram::default()),
            greylist: counters(),
            state_errors: Counter::default(),
            dnsbl_listings: Default::default(),
            replies: counters(),
            tls_handshakes: counters(),
            relay_failures: counters(),
            spool_errors: counters(),
            spool_bytes: Counter::default(),
            panics: Counter::default(),
        }
    }

    /// A connection was accepted on a listener of this kind.
    pub fn connection(&self, listener: Listener) {
        self.connections[listener as usize].increment();
    }

    /// A connection was closed before (or instead of) its session.
    pub fn refused(&self, reason: RefuseReason) {
        self.refused[reason as usize].increment();
    }

    pub fn session_opened(&self) {
        self.sessions_active.fetch_add(1, Ordering::Relaxed);
    }

    pub fn session_closed(&self) {
        self.sessions_active.fetch_sub(1, Ordering::Relaxed);
    }

    pub fn message_accepted(&self) {
        self.messages_accepted.increment();
    }

    pub fn message_rejected(&self, stage: Stage) {
        self.messages_rejected[stage_index(stage)].increment();
    }

    /// One verdict: each check's measured result (a `log` check counts its real result, an
    /// `off` check `none`), and the verdict with its action.
    pub fn helo_verdict(&self, verdict: &HeloVerdict) {
        for check in Check::ALL {
            let result = verdict.measured[check.index()];
            self.helo_checks[check.index()][result_index(result)].increment();
        }
        let kind = verdict_index(verdict.kind);
        self.helo_verdicts[kind][action_index(verdict.action)].increment();
    }

    /// The state store answered a greylisting question with `outcome`.
    pub fn greylisted(&self, outcome: GreylistOutcome) {
        self.greylist[greylist_index(outcome)].increment();
    }

    /// A state store operation failed or timed out (the store failed open).
    pub fn state_error(&self) {
        self.state_errors.increment();
    }

    /// A list entry of `zone` (its displayed name) matched a client.
    pub fn dnsbl_listing(&self, zone: &str) {
        if let Ok(mut zones) = self.dnsbl_listings.lock() {
            // The zones are few and fixed: a name is allocated once, on its first listing.
            match zones.get_mut(zone) {
                Some(count) => *count += 1,
                None => {
                    zones.insert(zone.to_string(), 1);
                }
            }
        }
    }

    /// One DNS query and its outcome; `elapsed` is its network latency, `None` for an answer
    /// that was already known (counted, but not a latency).
    pub fn dns_query(&self, query: QueryType, outcome: QueryOutcome, elapsed: Option<Duration>) {
        let query = query_index(query);
        self.dns_queries[query][outcome_index(outcome)].increment();
        if let Some(elapsed) = elapsed {
            self.dns_seconds[query].observe(elapsed);
        }
    }

    /// One SMTP reply sent; codes outside 200..=599 are not SMTP replies and are not counted.
    pub fn reply(&self, code: u16) {
        if let Some(slot) = reply_slot(code) {
            self.replies[slot].increment();
        }
    }

    pub fn tls_handshake(&self, ok: bool) {
        self.tls_handshakes[usize::from(!ok)].increment();
    }

    pub fn relay_failure(&self, failure: RelayFailure) {
        self.relay_failures[failure as usize].increment();
    }

    /// A spool delivery failed at `stage`; the client got 451 4.3.0.
    pub fn spool_error(&self, stage: SpoolStage) {
        self.spool_errors[stage as usize].increment();
    }

    /// A message of `bytes` octets reached new/.
    pub fn spool_bytes(&self, bytes: u64) {
        self.spool_bytes.add(bytes);
    }

    /// A worker or writer job panicked; its session got 421 4.3.0.
    pub fn panicked(&self) {
        self.panics.increment();
    }

    /// Every metric in the Prometheus text exposition format 0.0.4.
    pub fn render(&self) -> String {
        let mut out = Exposition::default();
        self.render_connections(&mut out);
        self.render_messages(&mut out);
        self.render_helo(&mut out);
        self.render_dns(&mut out);
        self.render_sender(&mut out);
        self.render_replies(&mut out);
        self.render_tls_and_relay(&mut out);
        self.render_process(&mut out);
        out.text
    }

    fn render_connections(&self, out: &mut Exposition) {
        out.header(
            "heloguard_connections_total",
            "counter",
            "Connections accepted, by listener kind.",
        );
        for listener in Listener::ALL {
            let labels = [("listener", listener.name())];
            out.sample(
                "heloguard_connections_total",
                &labels,
                self.connections[listener as usize].value(),
            );
        }
        out.header(
            "heloguard_connections_refused_total",
            "counter",
            "Connections closed before or instead of a session, by reason.",
        );
        for reason in RefuseReason::ALL {
            let labels = [("reason", reason.name())];
            out.sample(
                "heloguard_connections_refused_total",
                &labels,
                self.refused[reason as usize].value(),
            );
        }
        out.header(
            "heloguard_sessions_active",
            "gauge",
            "SMTP sessions open now.",
        );
        out.line(format_args!(
            "heloguard_sessions_active {}",
            self.sessions_active.load(Ordering::Relaxed)
        ));
    }

    fn render_messages(&self, out: &mut Exposition) {
        out.header(
            "heloguard_messages_accepted_total",
            "counter",
            "Messages accepted (250 after the data).",
        );
        out.sample(
            "heloguard_messages_accepted_total",
            &[],
            self.messages_accepted.value(),
        );
        out.header(
            "heloguard_messages_rejected_total",
            "counter",
            "Messages refused, by the stage of the refusal.",
        );
        for stage in STAGES {
            let labels = [("stage", stage.name())];
            out.sample(
                "heloguard_messages_rejected_total",
                &labels,
                self.messages_rejected[stage_index(stage)].value(),
            );
        }
    }

    fn render_helo(&self, out: &mut Exposition) {
        out.header(
            "heloguard_helo_checks_total",
            "counter",
            "HELO check results, one per check per verdict (log checks count their real result).",
        );
        for check in Check::ALL {
            for result in RESULTS {
                let labels = [("check", check.name()), ("result", result.name())];
                let value = self.helo_checks[check.index()][result_index(result)].value();
                out.sample("heloguard_helo_checks_total", &labels, value);
            }
        }
        out.header(
            "heloguard_helo_verdicts_total",
            "counter",
            "HELO verdicts and the action taken, one per verdict.",
        );
        for kind in VERDICTS {
            for (action, label) in ACTION_LABELS.iter().enumerate() {
                let labels = [("verdict", kind.name()), ("action", *label)];
                let value = self.helo_verdicts[verdict_index(kind)][action].value();
                out.sample("heloguard_helo_verdicts_total", &labels, value);
            }
        }
    }

    fn render_dns(&self, out: &mut Exposition) {
        out.header(
            "heloguard_dns_queries_total",
            "counter",
            "DNS queries, by record type and outcome.",
        );
        for query in QUERY_TYPES {
            for outcome in OUTCOMES {
                let labels = [
                    ("type", query_name(query)),
                    ("outcome", outcome_name(outcome)),
                ];
                let value = self.dns_queries[query_index(query)][outcome_index(outcome)].value();
                out.sample("heloguard_dns_queries_total", &labels, value);
            }
        }
        out.header(
            "heloguard_dns_seconds",
            "histogram",
            "DNS query latency in seconds, by record type.",
        );
        for query in QUERY_TYPES {
            self.dns_seconds[query_index(query)].render(
                out,
                "heloguard_dns_seconds",
                query_name(query),
            );
        }
    }

    fn render_sender(&self, out: &mut Exposition) {
        out.header(
            "heloguard_dnsbl_listings_total",
            "counter",
            "DNSBL/DNSWL entries that matched a client, by zone (its displayed name).",
        );
        if let Ok(zones) = self.dnsbl_listings.lock() {
            for (zone, value) in zones.iter() {
                out.sample("heloguard_dnsbl_listings_total", &[("zone", zone)], *value);
            }
        }
        out.header(
            "heloguard_greylist_total",
            "counter",
            "Greylisting answers for RCPT triplets, by outcome.",
        );
        for (slot, outcome) in GREYLIST_OUTCOMES.into_iter().enumerate() {
            out.sample(
                "heloguard_greylist_total",
                &[("outcome", outcome)],
                self.greylist[slot].value(),
            );
        }
        out.header(
            "heloguard_state_errors_total",
            "counter",
            "State store operations that failed or timed out (the store failed open).",
        );
        out.sample(
            "heloguard_state_errors_total",
            &[],
            self.state_errors.value(),
        );
    }

    fn render_replies(&self, out: &mut Exposition) {
        out.header(
            "heloguard_replies_total",
            "counter",
            "SMTP replies sent, by reply code.",
        );
        for (slot, counter) in self.replies.iter().enumerate() {
            let value = counter.value();
            if value == 0 {
                continue;
            }
            let code = (FIRST_REPLY_CODE as usize + slot).to_string();
            out.sample("heloguard_replies_total", &[("code", &code)], value);
        }
    }

    fn render_tls_and_relay(&self, out: &mut Exposition) {
        out.header(
            "heloguard_tls_handshakes_total",
            "counter",
            "STARTTLS handshakes, by outcome.",
        );
        for (slot, outcome) in ["ok", "error"].into_iter().enumerate() {
            out.sample(
                "heloguard_tls_handshakes_total",
                &[("outcome", outcome)],
                self.tls_handshakes[slot].value(),
            );
        }
        out.header(
            "heloguard_relay_failures_total",
            "counter",
            "Failed hand-offs to the next hop in relay modes, by reason.",
        );
        for failure in RelayFailure::ALL {
            let labels = [("reason", failure.name())];
            out.sample(
                "heloguard_relay_failures_total",
                &labels,
                self.relay_failures[failure as usize].value(),
            );
        }
    }
}

impl Metrics {
    fn render_process(&self, out: &mut Exposition) {
        out.header(
            "heloguard_build_info",
            "gauge",
            "Always 1; the version label says which build is running.",
        );
        out.sample(
            "heloguard_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))],
            1,
        );
        out.header(
            "heloguard_spool_errors_total",
            "counter",
            "Spool deliveries that failed (451 4.3.0), by the step that failed.",
        );
        for stage in SpoolStage::ALL {
            out.sample(
                "heloguard_spool_errors_total",
                &[("stage", stage.name())],
                self.spool_errors[stage as usize].value(),
            );
        }
        out.header(
            "heloguard_spool_bytes_total",
            "counter",
            "Bytes of messages written to the spool's new/.",
        );
        out.sample("heloguard_spool_bytes_total", &[], self.spool_bytes.value());
        out.header(
            "heloguard_panics_total",
            "counter",
            "Worker or writer jobs that panicked (their session got 421 4.3.0).",
        );
        out.sample("heloguard_panics_total", &[], self.panics.value());
    }
}

// ---- label tables: the order here is the order of the exposition ----

const STAGES: [Stage; 4] = [Stage::Helo, Stage::Mail, Stage::Rcpt, Stage::Data];
const RESULTS: [CheckResult; 4] = [
    CheckResult::Pass,
    CheckResult::Fail,
    CheckResult::TempError,
    CheckResult::None,
];
const VERDICTS: [VerdictKind; 3] = [VerdictKind::Pass, VerdictKind::Fail, VerdictKind::TempError];
/// SPEC's action label values; `off` and `log` act as `none`.
const ACTION_LABELS: [&str; 5] = ["none", "tag", "greylist", "defer", "reject"];
const QUERY_TYPES: [QueryType; 5] = [
    QueryType::A,
    QueryType::Aaaa,
    QueryType::Ptr,
    QueryType::Txt,
    QueryType::Mx,
];
const GREYLIST_OUTCOMES: [&str; 5] = ["new", "early", "passed", "known", "unavailable"];
const OUTCOMES: [QueryOutcome; 6] = [
    QueryOutcome::Ok,
    QueryOutcome::NxDomain,
    QueryOutcome::NoData,
    QueryOutcome::ServFail,
    QueryOutcome::Timeout,
    QueryOutcome::Error,
];

const FIRST_REPLY_CODE: u16 = 200;
const LAST_REPLY_CODE: u16 = 599;
const REPLY_CODES: usize = (LAST_REPLY_CODE - FIRST_REPLY_CODE + 1) as usize;

fn reply_slot(code: u16) -> Option<usize> {
    (FIRST_REPLY_CODE..=LAST_REPLY_CODE)
        .contains(&code)
        .then(|| usize::from(code - FIRST_REPLY_CODE))
}

const fn stage_index(stage: Stage) -> usize {
    match stage {
        Stage::Helo => 0,
        Stage::Mail => 1,
        Stage::Rcpt => 2,
        Stage::Data => 3,
    }
}

const fn result_index(result: CheckResult) -> usize {
    match result {
        CheckResult::Pass => 0,
        CheckResult::Fail => 1,
        CheckResult::TempError => 2,
        CheckResult::None => 3,
    }
}

const fn verdict_index(kind: VerdictKind) -> usize {
    match kind {
        VerdictKind::Pass => 0,
        VerdictKind::Fail => 1,
        VerdictKind::TempError => 2,
    }
}

/// Index into `ACTION_LABELS`.
/// The `action` label of heloguard_helo_verdicts_total for `action`; the `helo verdict` log
/// line uses the same words.
pub const fn action_label(action: Action) -> &'static str {
    ACTION_LABELS[action_index(action)]
}

const fn action_index(action: Action) -> usize {
    match action {
        Action::Off | Action::Log => 0,
        Action::Tag => 1,
        Action::Greylist => 2,
        Action::Defer => 3,
        Action::Reject => 4,
    }
}

const fn greylist_index(outcome: GreylistOutcome) -> usize {
    match outcome {
        GreylistOutcome::New { .. } => 0,
        GreylistOutcome::Early { .. } => 1,
        GreylistOutcome::Passed => 2,
        GreylistOutcome::Known => 3,
        GreylistOutcome::Unavailable => 4,
    }
}

const fn query_index(query: QueryType) -> usize {
    match query {
        QueryType::A => 0,
        QueryType::Aaaa => 1,
        QueryType::Ptr => 2,
        QueryType::Txt => 3,
        QueryType::Mx => 4,
    }
}

const fn query_name(query: QueryType) -> &'static str {
    match query {
        QueryType::A => "A",
        QueryType::Aaaa => "AAAA",
        QueryType::Ptr => "PTR",
        QueryType::Txt => "TXT",
        QueryType::Mx => "MX",
    }
}

const fn outcome_index(outcome: QueryOutcome) -> usize {
    match outcome {
        QueryOutcome::Ok => 0,
        QueryOutcome::NxDomain => 1,
        QueryOutcome::NoData => 2,
        QueryOutcome::ServFail => 3,
        QueryOutcome::Timeout => 4,
        QueryOutcome::Error => 5,
    }
}

const fn outcome_name(outcome: QueryOutcome) -> &'static str {
    match outcome {
        QueryOutcome::Ok => "ok",
        QueryOutcome::NxDomain => "nxdomain",
        QueryOutcome::NoData => "nodata",
        QueryOutcome::ServFail => "servfail",
        QueryOutcome::Timeout => "timeout",
        QueryOutcome::Error => "error",
    }
}

// ---- primitives ----

/// A monotonically increasing count.
#[derive(Default)]
struct Counter(AtomicU64);

impl Counter {
    fn increment(&self) {
        // Relaxed: each counter stands alone; nothing else is published through it.
        self.0.fetch_add(1, Ordering::Relaxed);
    }

    fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    fn value(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

fn counters<const N: usize>() -> [Counter; N] {
    std::array::from_fn(|_| Counter::default())
}

/// Upper bounds of the DNS latency buckets in seconds: from a cache hit to the 5 s a lookup
/// is never allowed to reach by default (2 x 2000 ms verdict deadline).
const DNS_BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

/// Per-bucket (not cumulative) counts, one more for above the last bound, and the sum.
struct Histogram {
    buckets: [Counter; DNS_BUCKETS.len() + 1],
    sum_nanos: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self {
            buckets: counters(),
            sum_nanos: AtomicU64::new(0),
        }
    }
}

impl Histogram {
    fn observe(&self, elapsed: Duration) {
        let seconds = elapsed.as_secs_f64();
        let slot = DNS_BUCKETS
            .iter()
            .position(|&bound| seconds <= bound)
            .unwrap_or(DNS_BUCKETS.len());
        self.buckets[slot].increment();
        let nanos = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        self.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    /// `_bucket` lines (cumulative, ending with `+Inf`), then `_sum` and `_count`.
    fn render(&self, out: &mut Exposition, name: &str, query_type: &str) {
        let bucket = format!("{name}_bucket");
        let mut cumulative = 0;
        for (slot, counter) in self.buckets.iter().enumerate() {
            cumulative += counter.value();
            let le = match DNS_BUCKETS.get(slot) {
                Some(bound) => bound.to_string(),
                None => "+Inf".to_string(),
            };
            out.sample(&bucket, &[("type", query_type), ("le", &le)], cumulative);
        }
        let sum = self.sum_nanos.load(Ordering::Relaxed);
        out.line(format_args!(
            "{name}_sum{{type=\"{query_type}\"}} {}.{:09}",
            sum / 1_000_000_000,
            sum % 1_000_000_000
        ));
        // The count is the +Inf bucket, so the two always agree within one scrape.
        out.sample(
            &format!("{name}_count"),
            &[("type", query_type)],
            cumulative,
        );
    }
}

/// The exposition text being written.
#[derive(Default)]
struct Exposition {
    text: String,
}

impl Exposition {
    fn header(&mut self, name: &str, kind: &str, help: &str) {
        self.line(format_args!("# HELP {name} {help}"));
        self.line(format_args!("# TYPE {name} {kind}"));
    }

    /// `name{label="value",...} value`; label values here are fixed identifiers and codes,
    /// never client data, so they need no escaping.
    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: u64) {
        self.text.push_str(name);
        if !labels.is_empty() {
            self.text.push('{');
            for (i, (label, label_value)) in labels.iter().enumerate() {
                if i > 0 {
                    self.text.push(',');
                }
                // Writing to a String cannot fail.
                let _ = write!(self.text, "{label}=\"{label_value}\"");
            }
            self.text.push('}');
        }
        let _ = writeln!(self.text, " {value}");
    }

    fn line(&mut self, args: std::fmt::Arguments<'_>) {
        // Writing to a String cannot fail.
        let _ = self.text.write_fmt(args);
        self.text.push('\n');
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::net::{SocketAddr, TcpListener, TcpStream};
    use std::sync::Arc;

    use super::http::*;
    use super::*;
    use crate::helo::policy::{Decision, IprevResult};

    fn verdict(
        kind: VerdictKind,
        action: Action,
        measured: [CheckResult; crate::helo::CHECKS],
    ) -> HeloVerdict {
        HeloVerdict {
            dnsbl_score: None,
            spf: None,
            dnswl: Vec::new(),
            listed: Vec::new(),
            kind,
            shown: measured,
            measured,
            action,
            failed: Vec::new(),
            allowed_by: None,
            ptr: None,
            iprev: IprevResult::Pass,
            decision: Decision::Accept,
        }
    }

    fn lines_with<'a>(text: &'a str, prefix: &str) -> Vec<&'a str> {
        text.lines().filter(|l| l.starts_with(prefix)).collect()
    }

    #[test]
    fn a_fresh_registry_shows_every_label_at_zero() {
        let text = Metrics::new().render();
        assert_eq!(lines_with(&text, "heloguard_connections_total{").len(), 2);
        assert_eq!(
            lines_with(&text, "heloguard_connections_refused_total{").len(),
            6
        );
        assert_eq!(
            lines_with(&text, "heloguard_messages_rejected_total{").len(),
            4
        );
        assert_eq!(lines_with(&text, "heloguard_helo_checks_total{").len(), 60);
        assert_eq!(
            lines_with(&text, "heloguard_helo_verdicts_total{").len(),
            15
        );
        assert_eq!(lines_with(&text, "heloguard_dns_queries_total{").len(), 30);
        assert_eq!(lines_with(&text, "heloguard_dns_seconds_bucket{").len(), 65);
        assert_eq!(lines_with(&text, "heloguard_greylist_total{").len(), 5);
        // Zones appear once they listed a client.
        assert_eq!(
            lines_with(&text, "heloguard_dnsbl_listings_total{").len(),
            0
        );
        assert!(text.contains("heloguard_state_errors_total 0\n"));
        assert_eq!(lines_with(&text, "heloguard_replies_total").len(), 0);
        assert_eq!(
            lines_with(&text, "heloguard_tls_handshakes_total{").len(),
            2
        );
        assert_eq!(
            lines_with(&text, "heloguard_relay_failures_total{").len(),
            4
        );
        assert!(text.contains("heloguard_sessions_active 0\n"));
        assert!(text.contains("heloguard_messages_accepted_total 0\n"));
        assert!(text.contains("heloguard_dns_seconds_sum{type=\"PTR\"} 0.000000000\n"));
        for name in [
            "heloguard_connections_total",
            "heloguard_connections_refused_total",
            "heloguard_sessions_active",
            "heloguard_messages_accepted_total",
            "heloguard_messages_rejected_total",
            "heloguard_helo_checks_total",
            "heloguard_helo_verdicts_total",
            "heloguard_dns_queries_total",
            "heloguard_dns_seconds",
            "heloguard_replies_total",
            "heloguard_tls_handshakes_total",
            "heloguard_relay_failures_total",
            "heloguard_build_info",
            "heloguard_spool_errors_total",
            "heloguard_spool_bytes_total",
            "heloguard_panics_total",
        ] {
            assert_eq!(
                lines_with(&text, &format!("# HELP {name} ")).len(),
                1,
                "{name}"
            );
            assert_eq!(
                lines_with(&text, &format!("# TYPE {name} ")).len(),
                1,
                "{name}"
            );
        }
        assert!(text.ends_with('\n'));
    }

    #[test]
    fn build_spool_and_panic_metrics_render_exact_lines() {
        let m = Metrics::new();
        m.spool_error(SpoolStage::Fsync);
        m.spool_error(SpoolStage::Fsync);
        m.spool_error(SpoolStage::Rename);
        m.spool_bytes(1000);
        m.spool_bytes(24);
        m.panicked();
        let text = m.render();
        let version = env!("CARGO_PKG_VERSION");
        for line in [
            format!("heloguard_build_info{{version=\"{version}\"}} 1"),
            "# TYPE heloguard_build_info gauge".to_string(),
            "heloguard_spool_errors_total{stage=\"write\"} 0".to_string(),
            "heloguard_spool_errors_total{stage=\"fsync\"} 2".to_string(),
            "heloguard_spool_errors_total{stage=\"rename\"} 1".to_string(),
            "heloguard_spool_bytes_total 1024".to_string(),
            "heloguard_panics_total 1".to_string(),
        ] {
            assert!(text.lines().any(|l| l == line), "missing line {line}");
        }
    }

    #[test]
    fn known_calls_render_exact_lines() {
        let m = Metrics::new();
        m.connection(Listener::Plain);
        m.connection(Listener::Plain);
        m.connection(Listener::Proxy);
        m.refused(RefuseReason::PerIp);
        m.refused(RefuseReason::ProxyUntrusted);
        m.session_opened();
        m.session_opened();
        m.session_closed();
        m.message_accepted();
        m.message_rejected(Stage::Rcpt);
        m.reply(250);
        m.reply(250);
        m.reply(550);
        m.reply(220);
        m.tls_handshake(true);
        m.tls_handshake(false);
        m.tls_handshake(false);
        m.relay_failure(RelayFailure::Timeout);
        let text = m.render();
        for line in [
            "heloguard_connections_total{listener=\"plain\"} 2",
            "heloguard_connections_total{listener=\"proxy\"} 1",
            "heloguard_connections_refused_total{reason=\"max_connections\"} 0",
            "heloguard_connections_refused_total{reason=\"per_ip\"} 1",
            "heloguard_connections_refused_total{reason=\"proxy_untrusted\"} 1",
            "heloguard_sessions_active 1",
            "heloguard_messages_accepted_total 1",
            "heloguard_messages_rejected_total{stage=\"rcpt\"} 1",
            "heloguard_messages_rejected_total{stage=\"data\"} 0",
            "heloguard_tls_handshakes_total{outcome=\"ok\"} 1",
            "heloguard_tls_handshakes_total{outcome=\"error\"} 2",
            "heloguard_relay_failures_total{reason=\"timeout\"} 1",
            "heloguard_relay_failures_total{reason=\"aborted\"} 0",
            "# TYPE heloguard_sessions_active gauge",
            "# TYPE heloguard_dns_seconds histogram",
        ] {
            assert!(text.lines().any(|l| l == line), "missing line {line}");
        }
        assert_eq!(
            lines_with(&text, "heloguard_replies_total"),
            vec![
                "heloguard_replies_total{code=\"220\"} 1",
                "heloguard_replies_total{code=\"250\"} 2",
                "heloguard_replies_total{code=\"550\"} 1",
            ]
        );
    }

    #[test]
    fn a_verdict_counts_each_check_once_and_maps_its_action() {
        let m = Metrics::new();
        let mut measured = [CheckResult::None; crate::helo::CHECKS];
        measured[Check::Syntax.index()] = CheckResult::Pass;
        measured[Check::Fqdn.index()] = CheckResult::Fail;
        measured[Check::Fcrdns.index()] = CheckResult::TempError;
        // A log-only failure: counted as measured, action label `none`.
        m.helo_verdict(&verdict(VerdictKind::Fail, Action::Log, measured));
        m.helo_verdict(&verdict(VerdictKind::Fail, Action::Reject, measured));
        m.helo_verdict(&verdict(
            VerdictKind::Pass,
            Action::Off,
            [CheckResult::Pass; crate::helo::CHECKS],
        ));
        let text = m.render();
        for line in [
            "heloguard_helo_checks_total{check=\"syntax\",result=\"pass\"} 3",
            "heloguard_helo_checks_total{check=\"fqdn\",result=\"fail\"} 2",
            "heloguard_helo_checks_total{check=\"fqdn\",result=\"pass\"} 1",
            "heloguard_helo_checks_total{check=\"fcrdns\",result=\"temperror\"} 2",
            "heloguard_helo_checks_total{check=\"dynamic\",result=\"none\"} 2",
            "heloguard_helo_checks_total{check=\"dynamic\",result=\"pass\"} 1",
            "heloguard_helo_verdicts_total{verdict=\"fail\",action=\"none\"} 1",
            "heloguard_helo_verdicts_total{verdict=\"fail\",action=\"reject\"} 1",
            "heloguard_helo_verdicts_total{verdict=\"pass\",action=\"none\"} 1",
            "heloguard_helo_verdicts_total{verdict=\"temperror\",action=\"defer\"} 0",
        ] {
            assert!(text.lines().any(|l| l == line), "missing line {line}");
        }
        let total: u64 = lines_with(&text, "heloguard_helo_checks_total{")
            .iter()
            .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
            .sum();
        assert_eq!(total, 45);
    }

    #[test]
    fn a_known_answer_is_counted_but_observes_no_latency() {
        let m = Metrics::new();
        m.dns_query(QueryType::Ptr, QueryOutcome::Ok, None);
        let text = m.render();
        assert!(
            text.contains("heloguard_dns_queries_total{type=\"PTR\",outcome=\"ok\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("heloguard_dns_seconds_count{type=\"PTR\"} 0\n"),
            "{text}"
        );
    }

    #[test]
    fn dns_latency_lands_in_cumulative_buckets() {
        let m = Metrics::new();
        m.dns_query(
            QueryType::Ptr,
            QueryOutcome::Ok,
            Some(Duration::from_micros(800)),
        );
        m.dns_query(
            QueryType::Ptr,
            QueryOutcome::NxDomain,
            Some(Duration::from_millis(30)),
        );
        m.dns_query(
            QueryType::Ptr,
            QueryOutcome::Timeout,
            Some(Duration::from_secs(6)),
        );
        m.dns_query(
            QueryType::Aaaa,
            QueryOutcome::NoData,
            Some(Duration::from_millis(1)),
        );
        let text = m.render();
        assert_eq!(
            lines_with(&text, "heloguard_dns_seconds_bucket{type=\"PTR\""),
            vec![
                "heloguard_dns_seconds_bucket{type=\"PTR\",le=\"0.001\"} 1",
                "heloguard_dns_seconds_bucket{type=\"PTR\",le=\"0.0025\"} 1",
                "heloguard_dns_seconds_bucket{type=\"PTR\",le=\"0.005\"} 1",
                "heloguard_dns_seconds_bucket{type=\"PTR\",le=\"0.01\"} 1",
                "heloguard_dns_seconds_bucket{type=\"PTR\",le=\"0.025\"} 1",
                "heloguard_dns_seconds_bucket{type=\"PTR\",le=\"0.05\"} 2",
                "heloguard_dns_seconds_bucket{type=\"PTR\",le=\"0.1\"} 2",
                "heloguard_dns_seconds_bucket{type=\"PTR\",le=\"0.25\"} 2",
                "heloguard_dns_seconds_bucket{type=\"PTR\",le=\"0.5\"} 2",
                "heloguard_dns_seconds_bucket{type=\"PTR\",le=\"1\"} 2",
                "heloguard_dns_seconds_bucket{type=\"PTR\",le=\"2.5\"} 2",
                "heloguard_dns_seconds_bucket{type=\"PTR\",le=\"5\"} 2",
                "heloguard_dns_seconds_bucket{type=\"PTR\",le=\"+Inf\"} 3",
            ]
        );
        for line in [
            "heloguard_dns_seconds_sum{type=\"PTR\"} 6.030800000",
            "heloguard_dns_seconds_count{type=\"PTR\"} 3",
            "heloguard_dns_seconds_bucket{type=\"AAAA\",le=\"0.001\"} 1",
            "heloguard_dns_seconds_count{type=\"A\"} 0",
            "heloguard_dns_queries_total{type=\"PTR\",outcome=\"timeout\"} 1",
            "heloguard_dns_queries_total{type=\"AAAA\",outcome=\"nodata\"} 1",
            "heloguard_dns_queries_total{type=\"A\",outcome=\"ok\"} 0",
        ] {
            assert!(text.lines().any(|l| l == line), "missing line {line}");
        }
    }

    /// Sends `request` to a fresh endpoint and returns the whole response.
    fn http(addr: SocketAddr, request: &[u8]) -> String {
        let mut stream = TcpStream::connect(addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        stream.write_all(request).unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        response
    }

    #[test]
    fn the_endpoint_serves_metrics_and_refuses_the_rest() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let metrics = Arc::new(Metrics::new());
        metrics.reply(421);
        serve(listener, Arc::clone(&metrics)).unwrap();

        let ok = http(addr, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        assert!(ok.contains("\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n"));
        assert!(ok.contains("\r\nConnection: close\r\n"));
        assert!(ok.contains("\nheloguard_replies_total{code=\"421\"} 1\n"));
        let (head, body) = ok.split_once("\r\n\r\n").unwrap();
        assert!(head.contains(&format!("Content-Length: {}", body.len())));

        let query = http(addr, b"GET /metrics?x=1 HTTP/1.0\r\n\r\n");
        assert!(query.starts_with("HTTP/1.1 200 OK\r\n"));
        let head_only = http(addr, b"HEAD /metrics HTTP/1.1\r\n\r\n");
        assert!(head_only.starts_with("HTTP/1.1 200 OK\r\n") && head_only.ends_with("\r\n\r\n"));
        let missing = http(addr, b"GET / HTTP/1.1\r\n\r\n");
        assert!(
            missing.starts_with("HTTP/1.1 404 Not Found\r\n"),
            "{missing}"
        );
        let post = http(addr, b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n");
        assert!(
            post.starts_with("HTTP/1.1 405 Method Not Allowed\r\n"),
            "{post}"
        );
        assert!(post.contains("\r\nAllow: GET, HEAD\r\n"));
        let junk = http(addr, b"HELLO\r\n\r\n");
        assert!(junk.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{junk}");
        let mut huge = b"GET /metrics HTTP/1.1\r\nX: ".to_vec();
        huge.resize(MAX_REQUEST_HEAD + 10, b'a');
        let too_large = http(addr, &huge);
        assert!(too_large.starts_with("HTTP/1.1 431 "), "{too_large}");
    }

    #[test]
    fn request_heads_end_at_the_first_blank_line() {
        assert_eq!(head_end(b"GET / HTTP/1.1\r\n\r\nrest"), Some(18));
        assert_eq!(head_end(b"GET / HTTP/1.1\n\n"), Some(16));
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nHost: x\r\n"), None);
    }
}
