//! `heloguard whatif --policy POLICY [--dnsbl-threshold N] FILE...`: replays `helo verdict`
//! log lines under another policy and says what it would have changed (SPEC "What-if").
//!
//! The log line records every check's real result, `log` checks included, so each session can
//! be decided again without DNS. A session counts once, by its last verdict line (by `sid=`).
//! The line is read with the log's own quoting rules, token by token, so a client cannot forge
//! keys through its HELO: a value holding spaces, quotes or backslashes is quoted, and a
//! newline in it is `\x0a`, never a line of its own.
//!
//! The policy string is HELOGUARD_HELO_POLICY, parsed by the server's own parser
//! (`crate::helo::policy::HeloPolicy`), so a replay judges with exactly the grammar, defaults
//! and actions the server would run.
//!
//! A check that was `off` when the line was written was not run and shows `none`: the replay
//! cannot know what it would have said and treats it as `none`.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::fmt;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Write};
use std::net::IpAddr;

pub use crate::helo::Action;
use crate::helo::policy::HeloPolicy;
pub use crate::helo::policy::PolicyError;
use crate::helo::{CHECKS as CHECK_COUNT, Check, CheckResult};

/// SPEC's fifteen checks, in header order: the server's names.
pub const CHECKS: [&str; CHECK_COUNT] = {
    let mut names = [""; CHECK_COUNT];
    let mut i = 0;
    while i < CHECK_COUNT {
        names[i] = Check::ALL[i].name();
        i += 1;
    }
    names
};

const DNSBL: usize = Check::Dnsbl.index();

/// How many HELO names and client networks the report lists.
const TOP: usize = 10;

/// What was, or would be, done with a session: the five lines of the report.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Outcome {
    Pass,
    Tag,
    Greylist,
    Defer,
    Reject,
}

impl Outcome {
    pub const ALL: [Outcome; 5] = [
        Outcome::Pass,
        Outcome::Tag,
        Outcome::Greylist,
        Outcome::Defer,
        Outcome::Reject,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            Outcome::Pass => "pass",
            Outcome::Tag => "tag",
            Outcome::Greylist => "greylist",
            Outcome::Defer => "defer",
            Outcome::Reject => "reject",
        }
    }

    /// Greylist, defer and reject keep the mail out (for now); pass and tag let it in.
    pub fn turns_away(self) -> bool {
        self >= Outcome::Greylist
    }

    /// The `action=` word of a verdict line; `off` and `log` never appear there but mean
    /// that nothing was done.
    fn from_log(word: &[u8]) -> Option<Self> {
        match word {
            b"none" | b"off" | b"log" => Some(Outcome::Pass),
            b"tag" => Some(Outcome::Tag),
            b"greylist" => Some(Outcome::Greylist),
            b"defer" => Some(Outcome::Defer),
            b"reject" => Some(Outcome::Reject),
            _ => None,
        }
    }
}

/// A `--policy` string, read as HELOGUARD_HELO_POLICY is (the server's parser and defaults).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy(HeloPolicy);

impl Policy {
    pub fn parse(spec: &str) -> Result<Self, PolicyError> {
        HeloPolicy::parse(spec).map(Policy)
    }

    /// The action of the check at `index` in [`CHECKS`].
    pub fn action(&self, index: usize) -> Action {
        self.0.action(Check::ALL[index])
    }
}

fn check_index(name: &[u8]) -> Option<usize> {
    CHECKS.iter().position(|c| c.as_bytes() == name)
}

/// What one verdict line says about its session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerdictLine {
    pub sid: Vec<u8>,
    pub ip: IpAddr,
    /// The HELO argument as sent (escapes decoded).
    pub helo: Vec<u8>,
    /// Every check's real result; a check the line does not name is `none`.
    pub results: [CheckResult; 15],
    pub dnsbl_score: Option<i64>,
    /// What the server did.
    pub was: Outcome,
}

/// Reads the verdict line in `line`, after whatever prefix a logger put before it (env_logger's
/// `[time LEVEL target] `, journald's `<6>` or `date host unit[pid]: `). `None` when the line is
/// not a well-formed verdict line.
pub fn parse_line(line: &[u8]) -> Option<VerdictLine> {
    let body = verdict_body(line)?;
    let mut sid = None;
    let mut ip = None;
    let mut helo = None;
    let mut results = None;
    let mut dnsbl_score = None;
    let mut was = None;
    let mut seen: Vec<&[u8]> = Vec::new();
    let mut rest = body;
    while let Some(Pair {
        key,
        value,
        rest: after,
    }) = next_pair(rest)?
    {
        rest = after;
        if seen.contains(&key) {
            return None;
        }
        match key {
            b"sid" => sid = Some(value),
            b"ip" => ip = Some(std::str::from_utf8(&value).ok()?.parse::<IpAddr>().ok()?),
            b"helo" => helo = Some(value),
            b"results" => results = Some(parse_results(&value)?),
            b"dnsbl_score" => {
                dnsbl_score = Some(std::str::from_utf8(&value).ok()?.parse::<i64>().ok()?);
            }
            b"action" => was = Some(Outcome::from_log(&value)?),
            _ => {}
        }
        seen.push(key);
    }
    Some(VerdictLine {
        sid: sid.filter(|s| !s.is_empty())?,
        ip: crate::net::canonical_ip(ip?),
        helo: helo?,
        results: results?,
        dnsbl_score,
        was: was?,
    })
}

/// The text after `helo verdict `, when the log message starts there. The prefixes a logger
/// may put before a message are read by their shape, `[SYSLOG: ][<N>|[...] ]`, and nothing
/// else may come before the marker: a line whose message is another one (`refused ...`, or a
/// debug line quoting what a client sent) never counts, however its text was crafted.
fn verdict_body(line: &[u8]) -> Option<&[u8]> {
    const MARK: &[u8] = b"helo verdict ";
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    let mut rest = line.strip_suffix(b"\r").unwrap_or(line);
    // journald's short formats and syslog: `Dec 07 02:00:01 mx heloguard[77]: `.
    if let Some(colon) = memchr::memmem::find(rest, b": ") {
        let prefix = &rest[..colon];
        let syslog = !matches!(prefix.first(), None | Some(b'[' | b'<'))
            && !prefix.iter().any(|b| matches!(b, b'"' | b'='));
        if syslog {
            rest = &rest[colon + 2..];
        }
    }
    // sd-daemon's `<6>`, or env_logger's `[TIME LEVEL target] `.
    match rest {
        [b'<', digit, b'>', tail @ ..] if digit.is_ascii_digit() => rest = tail,
        [b'[', ..] => {
            let end = memchr::memmem::find(rest, b"] ")?;
            rest = &rest[end + 2..];
        }
        _ => {}
    }
    rest.strip_prefix(MARK)
}

/// One `key=value` token of a log line, its value unescaped, and the text after it.
struct Pair<'a> {
    key: &'a [u8],
    value: Vec<u8>,
    rest: &'a [u8],
}

/// The next token: `Some(None)` at the end of the line, `None` when malformed.
fn next_pair(text: &[u8]) -> Option<Option<Pair<'_>>> {
    let start = text.iter().position(|&b| b != b' ');
    let Some(start) = start else {
        return Some(None);
    };
    let text = &text[start..];
    let eq = text.iter().position(|&b| b == b'=')?;
    let key = &text[..eq];
    if key.is_empty()
        || !key
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'_')
    {
        return None;
    }
    let text = &text[eq + 1..];
    let (value, rest) = if text.first() == Some(&b'"') {
        quoted_value(&text[1..])?
    } else {
        let end = text.iter().position(|&b| b == b' ').unwrap_or(text.len());
        let raw = &text[..end];
        if raw.contains(&b'"') {
            return None;
        }
        (unescape(raw)?, &text[end..])
    };
    if !(rest.is_empty() || rest[0] == b' ') {
        return None;
    }
    Some(Some(Pair { key, value, rest }))
}

/// A quoted value up to its closing quote; `\"`, `\\` and `\xHH` are the only escapes.
fn quoted_value(text: &[u8]) -> Option<(Vec<u8>, &[u8])> {
    let mut value = Vec::new();
    let mut i = 0;
    loop {
        match *text.get(i)? {
            b'"' => return Some((value, &text[i + 1..])),
            b'\\' => {
                let (byte, used) = escape(&text[i + 1..])?;
                value.push(byte);
                i += 1 + used;
            }
            byte => {
                value.push(byte);
                i += 1;
            }
        }
    }
}

/// A bare value may still carry `\xHH` for a non-printable octet.
fn unescape(raw: &[u8]) -> Option<Vec<u8>> {
    let mut value = Vec::with_capacity(raw.len());
    let mut i = 0;
    while let Some(&byte) = raw.get(i) {
        if byte == b'\\' {
            let (byte, used) = escape(&raw[i + 1..])?;
            value.push(byte);
            i += 1 + used;
        } else {
            value.push(byte);
            i += 1;
        }
    }
    Some(value)
}

/// The octet an escape stands for (the text after the backslash) and its length.
fn escape(text: &[u8]) -> Option<(u8, usize)> {
    match text.first()? {
        b'"' => Some((b'"', 1)),
        b'\\' => Some((b'\\', 1)),
        b'x' => {
            let hex = std::str::from_utf8(text.get(1..3)?).ok()?;
            Some((u8::from_str_radix(hex, 16).ok()?, 3))
        }
        _ => None,
    }
}

/// `CHECK:RESULT,...`.
fn parse_results(value: &[u8]) -> Option<[CheckResult; 15]> {
    let mut results = [CheckResult::None; 15];
    let mut seen = [false; 15];
    for item in value.split(|&b| b == b',').filter(|i| !i.is_empty()) {
        let colon = item.iter().position(|&b| b == b':')?;
        let index = check_index(&item[..colon])?;
        if std::mem::replace(&mut seen[index], true) {
            return None;
        }
        results[index] = match &item[colon + 1..] {
            b"pass" => CheckResult::Pass,
            b"fail" => CheckResult::Fail,
            b"temperror" => CheckResult::TempError,
            b"none" => CheckResult::None,
            _ => return None,
        };
    }
    Some(results)
}

/// A session decided again: what would be done and which checks would turn it away.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Redecision {
    pub outcome: Outcome,
    /// Indexes in [`CHECKS`] of the checks whose own action turns the session away.
    pub turned_away_by: Vec<usize>,
}

/// Decides a session under `policy` as the server would (SPEC "HELO checks", "Greylisting"):
/// `off` and `log` checks do not count; a fail counts with its check's action; a temperror
/// counts as a fail under `greylist`, as `defer` (451 4.4.3) under `defer` or `reject`, and
/// not at all under `tag`. With `dnsbl_threshold`, dnsbl's result comes from the score.
pub fn redecide(line: &VerdictLine, policy: &Policy, dnsbl_threshold: Option<i64>) -> Redecision {
    let mut results = line.results;
    if let (Some(threshold), Some(score)) = (dnsbl_threshold, line.dnsbl_score) {
        // `none` means the lists were not asked (no lists, a local or allowed client).
        if results[DNSBL] != CheckResult::None {
            results[DNSBL] = if score >= threshold {
                CheckResult::Fail
            } else {
                CheckResult::Pass
            };
        }
    }
    let mut outcome = Outcome::Pass;
    let mut turned_away_by = Vec::new();
    for (index, result) in results.into_iter().enumerate() {
        let effect = match (result, policy.action(index)) {
            (_, Action::Off | Action::Log) => None,
            (CheckResult::Fail, Action::Tag) => Some(Outcome::Tag),
            (CheckResult::Fail | CheckResult::TempError, Action::Greylist) => {
                Some(Outcome::Greylist)
            }
            (CheckResult::Fail, Action::Defer) => Some(Outcome::Defer),
            (CheckResult::Fail, Action::Reject) => Some(Outcome::Reject),
            (CheckResult::TempError, Action::Defer | Action::Reject) => Some(Outcome::Defer),
            _ => None,
        };
        if let Some(effect) = effect {
            outcome = outcome.max(effect);
            if effect.turns_away() {
                turned_away_by.push(index);
            }
        }
    }
    Redecision {
        outcome,
        turned_away_by,
    }
}

/// The replay: the last verdict line of each session, in order of first sight.
#[derive(Default)]
pub struct Replay {
    sessions: Vec<VerdictLine>,
    by_sid: HashMap<Vec<u8>, usize>,
    /// Lines that name `helo verdict` but could not be read.
    pub malformed: u64,
}

impl Replay {
    /// Takes one log line; anything but a verdict line is passed over.
    pub fn add_line(&mut self, line: &[u8]) {
        if verdict_body(line).is_none() {
            return;
        }
        let Some(verdict) = parse_line(line) else {
            self.malformed += 1;
            return;
        };
        match self.by_sid.entry(verdict.sid.clone()) {
            Entry::Occupied(slot) => self.sessions[*slot.get()] = verdict,
            Entry::Vacant(slot) => {
                slot.insert(self.sessions.len());
                self.sessions.push(verdict);
            }
        }
    }

    /// Reads every line of `input`.
    pub fn add_reader(&mut self, mut input: impl BufRead) -> io::Result<()> {
        let mut line = Vec::new();
        loop {
            line.clear();
            if input.read_until(b'\n', &mut line)? == 0 {
                return Ok(());
            }
            self.add_line(&line);
        }
    }

    pub fn report(&self, policy: &Policy, dnsbl_threshold: Option<i64>) -> Report {
        let mut report = Report {
            sessions: self.sessions.len() as u64,
            ..Report::default()
        };
        let mut helos: HashMap<Vec<u8>, u64> = HashMap::new();
        let mut networks: HashMap<String, u64> = HashMap::new();
        for session in &self.sessions {
            let again = redecide(session, policy, dnsbl_threshold);
            report.now[again.outcome as usize] += 1;
            report.was[session.was as usize] += 1;
            if let [only] = again.turned_away_by.as_slice() {
                report.alone[*only] += 1;
            }
            if again.outcome.turns_away() && !session.was.turns_away() {
                *helos.entry(helo_key(&session.helo)).or_default() += 1;
                *networks.entry(network(session.ip)).or_default() += 1;
            }
        }
        report.helos = top(helos);
        report.networks = top(networks);
        report
    }
}

/// What `whatif` prints.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Report {
    pub sessions: u64,
    /// Sessions per [`Outcome`] under the new policy, and as they were.
    pub now: [u64; 5],
    pub was: [u64; 5],
    /// Per check of [`CHECKS`]: sessions that it alone would turn away.
    pub alone: [u64; 15],
    /// The HELO names and client networks most often newly turned away, most first.
    pub helos: Vec<(Vec<u8>, u64)>,
    pub networks: Vec<(String, u64)>,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "sessions {}", self.sessions)?;
        for outcome in Outcome::ALL {
            let i = outcome as usize;
            writeln!(f, "{} {} was {}", outcome.name(), self.now[i], self.was[i])?;
        }
        for (name, count) in CHECKS.iter().zip(self.alone) {
            writeln!(f, "check {name} alone {count}")?;
        }
        for (helo, count) in &self.helos {
            writeln!(f, "helo {} {count}", log_value(helo))?;
        }
        for (network, count) in &self.networks {
            writeln!(f, "network {network} {count}")?;
        }
        Ok(())
    }
}

/// Names compare case-insensitively and without a trailing dot, as the checks compare them.
fn helo_key(helo: &[u8]) -> Vec<u8> {
    let helo = helo.strip_suffix(b".").unwrap_or(helo);
    helo.to_ascii_lowercase()
}

/// The client's /24 (IPv4) or /64 (IPv6).
fn network(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, c, _] = v4.octets();
            format!("{a}.{b}.{c}.0/24")
        }
        IpAddr::V6(v6) => {
            let bits = u128::from(v6) & !((1u128 << 64) - 1);
            format!("{}/64", std::net::Ipv6Addr::from(bits))
        }
    }
}

fn top<K: Ord>(counts: HashMap<K, u64>) -> Vec<(K, u64)> {
    let mut all: Vec<(K, u64)> = counts.into_iter().collect();
    all.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    all.truncate(TOP);
    all
}

/// A value written as the log writes it, so a client's name cannot start a line of its own or
/// pass for another field of the report.
fn log_value(value: &[u8]) -> String {
    let mut out = String::with_capacity(value.len() + 2);
    crate::logfmt::push_value(&mut out, value);
    out
}

/// Why `whatif` could not run; exit code 2.
#[derive(Debug)]
pub enum WhatifError {
    MissingValue(&'static str),
    UnknownOption(String),
    NoPolicy,
    NoFiles,
    BadThreshold(String),
    BadPolicy(PolicyError),
    Read { path: String, error: io::Error },
}

impl fmt::Display for WhatifError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WhatifError::MissingValue(option) => write!(f, "{option} needs a value"),
            WhatifError::UnknownOption(option) => write!(f, "unknown option `{option}`"),
            WhatifError::NoPolicy => f.write_str("--policy POLICY is required"),
            WhatifError::NoFiles => f.write_str("name at least one FILE (`-` is stdin)"),
            WhatifError::BadThreshold(text) => {
                write!(f, "--dnsbl-threshold `{text}` is not an integer")
            }
            WhatifError::BadPolicy(e) => write!(f, "--policy: {e}"),
            WhatifError::Read { path, error } => write!(f, "cannot read {path}: {error}"),
        }
    }
}

impl std::error::Error for WhatifError {}

/// The command line of `whatif`.
#[derive(Debug)]
pub struct Options {
    pub policy: Policy,
    pub dnsbl_threshold: Option<i64>,
    pub files: Vec<String>,
}

impl Options {
    pub fn parse(args: &[String]) -> Result<Self, WhatifError> {
        let mut policy = None;
        let mut threshold = None;
        let mut files = Vec::new();
        let mut args = args.iter();
        while let Some(arg) = args.next() {
            let (name, inline) = match arg.split_once('=') {
                Some((name, value)) if name.starts_with("--") => (name, Some(value.to_string())),
                _ => (arg.as_str(), None),
            };
            match name {
                "--policy" => {
                    let value = option_value(inline, &mut args, "--policy")?;
                    policy = Some(Policy::parse(&value).map_err(WhatifError::BadPolicy)?);
                }
                "--dnsbl-threshold" => {
                    let value = option_value(inline, &mut args, "--dnsbl-threshold")?;
                    let parsed = value.trim().parse::<i64>();
                    threshold = Some(parsed.map_err(|_| WhatifError::BadThreshold(value))?);
                }
                "-" => files.push(arg.clone()),
                flag if flag.starts_with('-') => {
                    return Err(WhatifError::UnknownOption(arg.clone()));
                }
                _ => files.push(arg.clone()),
            }
        }
        if files.is_empty() {
            return Err(WhatifError::NoFiles);
        }
        Ok(Self {
            policy: policy.ok_or(WhatifError::NoPolicy)?,
            dnsbl_threshold: threshold,
            files,
        })
    }
}

/// An option's value: after `=` in the same argument, else the next argument.
fn option_value(
    inline: Option<String>,
    rest: &mut std::slice::Iter<'_, String>,
    option: &'static str,
) -> Result<String, WhatifError> {
    inline
        .or_else(|| rest.next().cloned())
        .ok_or(WhatifError::MissingValue(option))
}

/// Reads every file (`-` is stdin) into one replay.
pub fn replay_files(files: &[String]) -> Result<Replay, WhatifError> {
    let mut replay = Replay::default();
    for path in files {
        let read = if path == "-" {
            replay.add_reader(io::stdin().lock())
        } else {
            File::open(path).and_then(|f| replay.add_reader(BufReader::new(f)))
        };
        read.map_err(|error| WhatifError::Read {
            path: path.clone(),
            error,
        })?;
    }
    Ok(replay)
}

/// `heloguard whatif ...`; returns the exit code.
pub fn run(args: &[String]) -> u8 {
    let result = Options::parse(args).and_then(|options| {
        let replay = replay_files(&options.files)?;
        Ok((replay, options))
    });
    let (replay, options) = match result {
        Ok(done) => done,
        Err(e) => {
            eprintln!("heloguard whatif: {e}");
            return 2;
        }
    };
    if replay.malformed > 0 {
        eprintln!(
            "heloguard whatif: {} `helo verdict` lines could not be read and were left out",
            replay.malformed
        );
    }
    let report = replay.report(&options.policy, options.dnsbl_threshold);
    let mut out = io::stdout().lock();
    match write!(out, "{report}").and_then(|()| out.flush()) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("heloguard whatif: cannot write the report: {e}");
            1
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SYNTAX: usize = Check::Syntax.index();

    /// A results field: every check `pass` except those given.
    fn results(overrides: &[(&str, &str)]) -> String {
        CHECKS
            .iter()
            .map(|c| {
                let r = overrides
                    .iter()
                    .find(|(name, _)| name == c)
                    .map_or("pass", |(_, r)| r);
                format!("{c}:{r}")
            })
            .collect::<Vec<_>>()
            .join(",")
    }

    fn line(sid: &str, ip: &str, helo: &str, action: &str, res: &str, score: i64) -> String {
        format!(
            "[2026-12-07T02:05:06.123Z INFO  heloguard::server] helo verdict sid={sid} ip={ip} \
             helo={helo} ptr=none verdict=fail action={action} results={res} \
             dnsbl_score={score} dns_ms=12"
        )
    }

    #[test]
    fn the_checks_are_the_servers() {
        let names: Vec<&str> = Check::ALL.iter().map(|c| c.name()).collect();
        assert_eq!(names, CHECKS);
        assert_eq!(CHECKS[DNSBL], "dnsbl");
    }

    #[test]
    fn policies_agree_with_the_servers_parser() {
        for spec in [
            "",
            "default=log",
            "default=tag,syntax=reject",
            "DEFAULT=Defer, fqdn=reject ,syntax=off",
            "localhost=reject,literal_match=reject",
            "default=off,dynamic=tag",
        ] {
            let server = HeloPolicy::parse(spec).unwrap();
            let ours = Policy::parse(spec).unwrap();
            for check in Check::ALL {
                assert_eq!(
                    server.action(check).name(),
                    format!("{:?}", ours.action(check.index())).to_lowercase(),
                    "{spec} {}",
                    check.name()
                );
            }
        }
        for bad in ["fqdn", "nosuch=tag", "fqdn=maybe", "fqdn=tag,FQDN=log"] {
            assert!(HeloPolicy::parse(bad).is_err());
            assert!(Policy::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn new_checks_and_greylist_are_accepted() {
        let p = Policy::parse("default=log,spf=greylist,helo_churn=defer").unwrap();
        assert_eq!(p.action(11), Action::Greylist);
        assert_eq!(p.action(14), Action::Defer);
        assert_eq!(p.action(SYNTAX), Action::Reject);
        assert_eq!(p.action(2), Action::Log);
        assert_eq!(
            Policy::parse("spf=sometimes"),
            Err(PolicyError::UnknownAction("sometimes".into()))
        );
    }

    #[test]
    fn a_line_is_read_after_any_prefix() {
        let res = results(&[("fqdn", "fail")]);
        let body = format!("helo verdict sid=a1 ip=192.0.2.7 helo=box action=tag results={res}");
        for prefix in [
            "",
            "<6>",
            "[2026-12-07T02:05:06Z INFO  heloguard] ",
            "Dec 07 02:05:06 mx heloguard[812]: ",
            "2026-12-07T02:05:06+0000 mx heloguard[812]: ",
            "Dec 07 02:05:06 mx heloguard[812]: [2026-12-07T02:05:06Z INFO  heloguard] ",
        ] {
            let parsed = parse_line(format!("{prefix}{body}\n").as_bytes()).unwrap();
            assert_eq!(parsed.sid, b"a1");
            assert_eq!(parsed.helo, b"box");
            assert_eq!(parsed.was, Outcome::Tag);
            assert_eq!(parsed.results[2], CheckResult::Fail);
            assert_eq!(parsed.dnsbl_score, None);
        }
        for forged in [
            format!("xhelo verdict {}", &body[13..]),
            format!("refused sid=a0 ip=192.0.2.7 helo=\"x {body}\" stage=helo"),
            format!("refused sid=a0 ip=192.0.2.7 helo=\"x: {body}\" stage=helo"),
            format!("[2026-12-07T02:05:06Z DEBUG heloguard] 192.0.2.7: {body}"),
            format!("Dec 07 02:05:06 mx heloguard[812]: [T DEBUG heloguard] 192.0.2.7: {body}"),
            format!("[T INFO heloguard] session end sid=a0 helo=\"{body}\""),
        ] {
            assert!(parse_line(forged.as_bytes()).is_none(), "{forged}");
        }
        let mut replay = Replay::default();
        replay.add_line(format!("refused sid=a0 ip=192.0.2.7 helo=\"x {body}\"").as_bytes());
        assert_eq!((replay.sessions.len(), replay.malformed), (0, 0));
    }

    #[test]
    fn quoted_values_decode_exactly() {
        let res = results(&[]);
        let text = format!(
            r#"helo verdict sid=s ip=::ffff:192.0.2.1 helo="a \"b\" c\\d\x0a" action=none results={res}"#
        );
        let parsed = parse_line(text.as_bytes()).unwrap();
        assert_eq!(parsed.helo, b"a \"b\" c\\d\n");
        assert_eq!(parsed.ip, "192.0.2.1".parse::<IpAddr>().unwrap());
        assert_eq!(log_value(&parsed.helo), r#""a \"b\" c\\d\x0a""#);
    }

    #[test]
    fn malformed_lines_are_refused() {
        let res = results(&[]);
        for bad in [
            format!("helo verdict sid=s ip=192.0.2.1 helo=\"open action=none results={res}"),
            format!("helo verdict sid=s ip=192.0.2.1 helo=a\"b action=none results={res}"),
            format!(
                "helo verdict sid=s ip=192.0.2.1 helo=x action=none action=reject results={res}"
            ),
            format!("helo verdict sid=s ip=nope helo=x action=none results={res}"),
            format!("helo verdict sid=s ip=192.0.2.1 helo=x action=maybe results={res}"),
            "helo verdict sid=s ip=192.0.2.1 helo=x action=none results=fqdn:odd".to_string(),
            format!("helo verdict sid=s ip=192.0.2.1 helo=\"x\"y action=none results={res}"),
            format!("helo verdict sid=s ip=192.0.2.1 helo=x\\q action=none results={res}"),
            "helo verdict sid=s ip=192.0.2.1 helo=x action=none".to_string(),
        ] {
            assert!(parse_line(bad.as_bytes()).is_none(), "{bad}");
        }
    }

    #[test]
    fn temperror_and_dnsbl_are_decided_as_the_server_does() {
        let base = parse_line(
            line(
                "s",
                "192.0.2.1",
                "x",
                "none",
                &results(&[("forward", "temperror"), ("dnsbl", "pass")]),
                3,
            )
            .as_bytes(),
        )
        .unwrap();
        let outcome = |spec: &str, threshold| {
            redecide(&base, &Policy::parse(spec).unwrap(), threshold).outcome
        };
        assert_eq!(outcome("default=tag", None), Outcome::Pass);
        assert_eq!(outcome("forward=greylist", None), Outcome::Greylist);
        assert_eq!(outcome("forward=defer", None), Outcome::Defer);
        assert_eq!(outcome("forward=reject", None), Outcome::Defer);
        assert_eq!(
            outcome("forward=log,dnsbl=reject", Some(3)),
            Outcome::Reject
        );
        assert_eq!(outcome("forward=log,dnsbl=reject", Some(4)), Outcome::Pass);
        assert_eq!(outcome("forward=log,dnsbl=reject", None), Outcome::Pass);
        assert_eq!(
            outcome("forward=greylist,dnsbl=tag", Some(1)),
            Outcome::Greylist
        );
    }

    /// A crafted log: counts checked by hand.
    fn crafted() -> Vec<String> {
        vec![
            // s1: fqdn fails; was tag; seen twice, the last line counts.
            line("s1", "192.0.2.10", "old", "reject", &results(&[]), 0),
            line(
                "s1",
                "192.0.2.10",
                "box",
                "tag",
                &results(&[("fqdn", "fail")]),
                0,
            ),
            // s2: fqdn and dynamic fail.
            line(
                "s2",
                "192.0.2.11",
                "Box.",
                "tag",
                &results(&[("fqdn", "fail"), ("dynamic", "fail")]),
                0,
            ),
            // s3: clean.
            line(
                "s3",
                "198.51.100.5",
                "mail.example.org",
                "none",
                &results(&[]),
                0,
            ),
            // s4: spf fails, forward temperror.
            line(
                "s4",
                "2001:db8:1:2::5",
                "mx.example.net",
                "tag",
                &results(&[("spf", "fail"), ("forward", "temperror")]),
                0,
            ),
            // s5: listed with score 2; was rejected by dnsbl at threshold 1.
            line(
                "s5",
                "203.0.113.9",
                "\"evil verdict=pass action=none\"",
                "reject",
                &results(&[("dnsbl", "fail")]),
                2,
            ),
            // s6: a forged line inside a HELO: one session, not two.
            line(
                "s6",
                "192.0.2.12",
                r#""x\x0ahelo verdict sid=s9 ip=192.0.2.99 helo=y action=none results=""#,
                "none",
                &results(&[]),
                0,
            ),
            // noise: not verdict lines, and one malformed verdict line.
            "connect sid=s1 ip=192.0.2.10 port=4000 listener=plain".to_string(),
            "helo verdict sid=bad ip=192.0.2.1 helo=\"unterminated".to_string(),
        ]
    }

    fn replay() -> Replay {
        let mut replay = Replay::default();
        for l in crafted() {
            replay.add_line(l.as_bytes());
        }
        replay
    }

    #[test]
    fn crafted_log_gives_exact_counts() {
        let replay = replay();
        assert_eq!(replay.malformed, 1);
        let policy = Policy::parse("fqdn=reject,dynamic=defer,forward=greylist,dnsbl=tag").unwrap();
        let report = replay.report(&policy, None);
        assert_eq!(report.sessions, 6);
        // s1 reject, s2 reject, s3 pass, s4 greylist, s5 tag, s6 pass.
        assert_eq!(report.now, [2, 1, 1, 0, 2]);
        assert_eq!(report.was, [2, 3, 0, 0, 1]);
        let alone = |name: &str| report.alone[check_index(name.as_bytes()).unwrap()];
        assert_eq!(alone("fqdn"), 1);
        assert_eq!(alone("dynamic"), 0);
        assert_eq!(alone("forward"), 1);
        assert_eq!(report.alone.iter().sum::<u64>(), 2);
        assert_eq!(
            report.helos,
            vec![(b"box".to_vec(), 2), (b"mx.example.net".to_vec(), 1)]
        );
        assert_eq!(
            report.networks,
            vec![
                ("192.0.2.0/24".to_string(), 2),
                ("2001:db8:1:2::/64".to_string(), 1)
            ]
        );
        let text = report.to_string();
        assert!(text.starts_with(
            "sessions 6\npass 2 was 2\ntag 1 was 3\ngreylist 1 was 0\ndefer 0 was 0\n\
             reject 2 was 1\ncheck syntax alone 0\n"
        ));
        assert!(text.ends_with(
            "check helo_churn alone 0\nhelo box 2\nhelo mx.example.net 1\n\
             network 192.0.2.0/24 2\nnetwork 2001:db8:1:2::/64 1\n"
        ));
    }

    #[test]
    fn dnsbl_threshold_redecides_from_the_score() {
        let replay = replay();
        let policy = Policy::parse("default=tag,dnsbl=reject").unwrap();
        assert_eq!(
            replay.report(&policy, Some(3)).now[Outcome::Reject as usize],
            0
        );
        let report = replay.report(&policy, Some(2));
        assert_eq!(report.now[Outcome::Reject as usize], 1);
        assert_eq!(report.helos, Vec::new());
    }

    #[test]
    fn options_parse_and_refuse() {
        let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let o = Options::parse(&args(&[
            "--policy=fqdn=reject",
            "--dnsbl-threshold",
            "3",
            "-",
        ]))
        .unwrap();
        assert_eq!(o.dnsbl_threshold, Some(3));
        assert_eq!(o.files, vec!["-"]);
        assert_eq!(o.policy.action(2), Action::Reject);
        assert!(matches!(
            Options::parse(&args(&["--policy", "fqdn=nope", "f"])),
            Err(WhatifError::BadPolicy(_))
        ));
        assert!(matches!(
            Options::parse(&args(&["--policy", "fqdn=tag"])),
            Err(WhatifError::NoFiles)
        ));
        assert!(matches!(
            Options::parse(&args(&["f"])),
            Err(WhatifError::NoPolicy)
        ));
        assert!(matches!(
            Options::parse(&args(&["--policy", "", "--dnsbl-threshold", "x", "f"])),
            Err(WhatifError::BadThreshold(_))
        ));
        assert!(matches!(
            Options::parse(&args(&["--policy"])),
            Err(WhatifError::MissingValue("--policy"))
        ));
    }
}
