//! RFC 7208 4.5, 4.6, 5, 6 and 12: an SPF record, parsed into its terms.
//!
//! Contract: `is_spf_record` selects the records of a TXT set (4.5: `v=spf1` then a space or
//! the end, in any case); `parse` turns one into directives and modifiers or refuses it with
//! a `SyntaxError` naming the offending term, which makes `check_host()` give `permerror`
//! before any mechanism is evaluated (4.6: "If there are any syntax errors anywhere in the
//! record, check_host() returns immediately with the result "permerror""). Unknown modifiers
//! are checked for syntax and ignored (6); `redirect` and `exp` may each appear once.

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};

use super::macros::MacroString;
use crate::helo::sender::SpfResult;

/// A parsed `v=spf1` record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Record {
    /// The mechanisms, evaluated left to right.
    pub(crate) directives: Vec<Directive>,
    /// `redirect=`: its domain-spec and the term as written.
    pub(crate) redirect: Option<(MacroString, String)>,
    /// `exp=`: parsed for syntax only; its text is never fetched (third-party text is never
    /// put into our replies).
    pub(crate) exp: Option<MacroString>,
}

/// A qualifier and a mechanism.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Directive {
    pub(crate) qualifier: Qualifier,
    pub(crate) mechanism: Mechanism,
    /// The term as written in the record, for the outcome's `why`.
    pub(crate) text: String,
}

/// RFC 7208 4.6.2: what a matching mechanism makes the result.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Qualifier {
    Pass,
    Fail,
    SoftFail,
    Neutral,
}

impl Qualifier {
    /// RFC 7208 4.6.2: the result of a match.
    pub(crate) const fn result(self) -> SpfResult {
        match self {
            Qualifier::Pass => SpfResult::Pass,
            Qualifier::Fail => SpfResult::Fail,
            Qualifier::SoftFail => SpfResult::SoftFail,
            Qualifier::Neutral => SpfResult::Neutral,
        }
    }
}

/// RFC 7208 5: the mechanisms.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Mechanism {
    All,
    Include(MacroString),
    A {
        domain: Option<MacroString>,
        cidr: DualCidr,
    },
    Mx {
        domain: Option<MacroString>,
        cidr: DualCidr,
    },
    Ptr(Option<MacroString>),
    Ip4 {
        network: Ipv4Addr,
        prefix: u8,
    },
    Ip6 {
        network: Ipv6Addr,
        prefix: u8,
    },
    Exists(MacroString),
}

/// RFC 7208 5.6 `dual-cidr-length`: the prefixes an `a` or `mx` address is compared with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct DualCidr {
    pub(crate) v4: u8,
    pub(crate) v6: u8,
}

impl Default for DualCidr {
    fn default() -> Self {
        Self { v4: 32, v6: 128 }
    }
}

/// The record is not RFC 7208 12 syntax; `at` is the offending term (or the rest of it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct SyntaxError {
    pub(crate) at: String,
}

impl fmt::Display for SyntaxError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "syntax error at {:?}", self.at)
    }
}

/// RFC 7208 4.5: an SPF record starts with `v=spf1` (any case) followed by a space or the end.
pub(crate) fn is_spf_record(txt: &str) -> bool {
    let version = b"v=spf1";
    let bytes = txt.as_bytes();
    bytes.len() >= version.len()
        && bytes[..version.len()].eq_ignore_ascii_case(version)
        && matches!(bytes.get(version.len()), None | Some(b' '))
}

/// Parses a record that `is_spf_record` selected.
pub(crate) fn parse(txt: &str) -> Result<Record, SyntaxError> {
    if !is_spf_record(txt) {
        return Err(error(txt));
    }
    let mut record = Record {
        directives: Vec::new(),
        redirect: None,
        exp: None,
    };
    // RFC 7208 12: terms = *( 1*SP ( directive / modifier ) ), then *SP.
    for term in txt["v=spf1".len()..].split(' ').filter(|t| !t.is_empty()) {
        match modifier_name(term) {
            Some((name, value)) => modifier(&mut record, term, name, value)?,
            None => record.directives.push(directive(term)?),
        }
    }
    Ok(record)
}

fn error(at: &str) -> SyntaxError {
    SyntaxError { at: at.to_string() }
}

/// RFC 7208 12 `name "=" ...`: `name = ALPHA *( ALPHA / DIGIT / "-" / "_" / "." )`.
fn modifier_name(term: &str) -> Option<(&str, &str)> {
    let (name, value) = term.split_once('=')?;
    let mut chars = name.chars();
    let first_is_alpha = chars.next().is_some_and(|c| c.is_ascii_alphabetic());
    let rest_is_name = chars.all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    (first_is_alpha && rest_is_name).then_some((name, value))
}

fn modifier(record: &mut Record, term: &str, name: &str, value: &str) -> Result<(), SyntaxError> {
    if name.eq_ignore_ascii_case("redirect") {
        // RFC 7208 6: redirect and exp MUST NOT appear more than once each.
        if record.redirect.is_some() {
            return Err(error(term));
        }
        record.redirect = Some((domain_spec(value, term)?, term.to_string()));
    } else if name.eq_ignore_ascii_case("exp") {
        if record.exp.is_some() {
            return Err(error(term));
        }
        record.exp = Some(domain_spec(value, term)?);
    } else {
        // RFC 7208 6: unknown modifiers are ignored, but must be a macro-string.
        MacroString::parse(value, false).map_err(|_| error(term))?;
    }
    Ok(())
}

fn directive(term: &str) -> Result<Directive, SyntaxError> {
    let (qualifier, rest) = match term.as_bytes().first() {
        Some(b'+') => (Qualifier::Pass, &term[1..]),
        Some(b'-') => (Qualifier::Fail, &term[1..]),
        Some(b'~') => (Qualifier::SoftFail, &term[1..]),
        Some(b'?') => (Qualifier::Neutral, &term[1..]),
        _ => (Qualifier::Pass, term),
    };
    let name_end = rest
        .find(|c: char| !c.is_ascii_alphanumeric())
        .unwrap_or(rest.len());
    let (name, args) = rest.split_at(name_end);
    let mechanism = match name.to_ascii_lowercase().as_str() {
        "all" if args.is_empty() => Mechanism::All,
        "include" => Mechanism::Include(required_domain(args, term)?),
        "exists" => Mechanism::Exists(required_domain(args, term)?),
        "a" => {
            let (domain, cidr) = domain_and_cidr(args, term)?;
            Mechanism::A { domain, cidr }
        }
        "mx" => {
            let (domain, cidr) = domain_and_cidr(args, term)?;
            Mechanism::Mx { domain, cidr }
        }
        "ptr" if args.is_empty() => Mechanism::Ptr(None),
        "ptr" => Mechanism::Ptr(Some(required_domain(args, term)?)),
        "ip4" => {
            let (network, prefix) = network(args, term, 32)?;
            Mechanism::Ip4 { network, prefix }
        }
        "ip6" => {
            let (network, prefix) = network(args, term, 128)?;
            Mechanism::Ip6 { network, prefix }
        }
        _ => return Err(error(term)),
    };
    Ok(Directive {
        qualifier,
        mechanism,
        text: term.to_string(),
    })
}

/// `":" domain-spec`.
fn required_domain(args: &str, term: &str) -> Result<MacroString, SyntaxError> {
    let spec = args.strip_prefix(':').ok_or_else(|| error(term))?;
    domain_spec(spec, term)
}

/// RFC 7208 7.1 `domain-spec = macro-string domain-end`.
fn domain_spec(spec: &str, term: &str) -> Result<MacroString, SyntaxError> {
    let parsed = MacroString::parse(spec, false).map_err(|_| error(term))?;
    if !parsed.has_domain_end() {
        return Err(error(term));
    }
    Ok(parsed)
}

/// `[ ":" domain-spec ] [ dual-cidr-length ]` of `a` and `mx` (RFC 7208 5.3, 5.4).
fn domain_and_cidr(args: &str, term: &str) -> Result<(Option<MacroString>, DualCidr), SyntaxError> {
    let (rest, cidr) = dual_cidr(args, term)?;
    if rest.is_empty() {
        return Ok((None, cidr));
    }
    Ok((Some(required_domain(rest, term)?), cidr))
}

/// Splits a trailing `dual-cidr-length` (`/N`, `//M`, `/N//M`) off.
fn dual_cidr<'t>(args: &'t str, term: &str) -> Result<(&'t str, DualCidr), SyntaxError> {
    let mut cidr = DualCidr::default();
    let mut rest = args;
    if let Some((before, digits)) = rest.rsplit_once("//")
        && is_digits(digits)
    {
        cidr.v6 = prefix_length(digits, 128).ok_or_else(|| error(term))?;
        rest = before;
    }
    if let Some((before, digits)) = rest.rsplit_once('/')
        && is_digits(digits)
    {
        cidr.v4 = prefix_length(digits, 32).ok_or_else(|| error(term))?;
        rest = before;
    }
    Ok((rest, cidr))
}

/// `ip4:` / `ip6:` network and optional `/N`.
fn network<T: std::str::FromStr>(args: &str, term: &str, max: u8) -> Result<(T, u8), SyntaxError> {
    let spec = args.strip_prefix(':').ok_or_else(|| error(term))?;
    let (addr, prefix) = match spec.split_once('/') {
        Some((addr, digits)) => (addr, prefix_length(digits, max).ok_or_else(|| error(term))?),
        None => (spec, max),
    };
    let addr = addr.parse().map_err(|_| error(term))?;
    Ok((addr, prefix))
}

fn is_digits(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())
}

/// RFC 7208 12: `"0" / %x31-39 0*1DIGIT` (0*2DIGIT for IPv6), at most `max`.
fn prefix_length(digits: &str, max: u8) -> Option<u8> {
    if !is_digits(digits) || digits.len() > 3 || (digits.len() > 1 && digits.starts_with('0')) {
        return None;
    }
    let n: u8 = digits.parse().ok()?;
    (n <= max).then_some(n)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn one(term: &str) -> Mechanism {
        let record = parse(&format!("v=spf1 {term}")).unwrap_or_else(|e| panic!("{term}: {e}"));
        assert_eq!(record.directives.len(), 1, "{term}");
        record.directives[0].mechanism.clone()
    }

    fn spec(text: &str) -> MacroString {
        MacroString::parse(text, false).expect("valid domain-spec")
    }

    #[test]
    fn selects_spf_records_by_version() {
        assert!(is_spf_record("v=spf1"));
        assert!(is_spf_record("V=SPF1 -all"));
        assert!(!is_spf_record("v=spf10 -all"));
        assert!(!is_spf_record("v=spf2.0/pra -all"));
        assert!(!is_spf_record("spf1"));
        assert!(!is_spf_record(" v=spf1"));
    }

    #[test]
    fn every_mechanism_parses() {
        assert_eq!(one("all"), Mechanism::All);
        assert_eq!(
            one("include:_spf.example.net"),
            Mechanism::Include(spec("_spf.example.net"))
        );
        assert_eq!(
            one("a"),
            Mechanism::A {
                domain: None,
                cidr: DualCidr::default()
            }
        );
        assert_eq!(
            one("a/24"),
            Mechanism::A {
                domain: None,
                cidr: DualCidr { v4: 24, v6: 128 }
            }
        );
        assert_eq!(
            one("A:mail.example.com/24//64"),
            Mechanism::A {
                domain: Some(spec("mail.example.com")),
                cidr: DualCidr { v4: 24, v6: 64 }
            }
        );
        assert_eq!(
            one("mx//48"),
            Mechanism::Mx {
                domain: None,
                cidr: DualCidr { v4: 32, v6: 48 }
            }
        );
        assert_eq!(
            one("mx:%{d}"),
            Mechanism::Mx {
                domain: Some(spec("%{d}")),
                cidr: DualCidr::default()
            }
        );
        assert_eq!(one("ptr"), Mechanism::Ptr(None));
        assert_eq!(
            one("ptr:example.com"),
            Mechanism::Ptr(Some(spec("example.com")))
        );
        assert_eq!(
            one("ip4:192.0.2.0/24"),
            Mechanism::Ip4 {
                network: "192.0.2.0".parse().expect("literal"),
                prefix: 24
            }
        );
        assert_eq!(
            one("ip4:192.0.2.1"),
            Mechanism::Ip4 {
                network: "192.0.2.1".parse().expect("literal"),
                prefix: 32
            }
        );
        assert_eq!(
            one("ip6:2001:db8::/32"),
            Mechanism::Ip6 {
                network: "2001:db8::".parse().expect("literal"),
                prefix: 32
            }
        );
        assert_eq!(
            one("exists:%{ir}.%{v}._spf.%{d2}"),
            Mechanism::Exists(spec("%{ir}.%{v}._spf.%{d2}"))
        );
    }

    #[test]
    fn qualifiers_and_the_term_text() {
        let record = parse("v=spf1 +a -mx ~ptr ?all").expect("valid");
        let got: Vec<(Qualifier, &str)> = record
            .directives
            .iter()
            .map(|d| (d.qualifier, d.text.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                (Qualifier::Pass, "+a"),
                (Qualifier::Fail, "-mx"),
                (Qualifier::SoftFail, "~ptr"),
                (Qualifier::Neutral, "?all"),
            ]
        );
    }

    #[test]
    fn modifiers() {
        let record =
            parse("v=spf1 a redirect=_spf.example.com exp=explain.%{d} x-unknown=%{d}.x  ")
                .expect("valid");
        assert_eq!(record.directives.len(), 1);
        assert_eq!(
            record.redirect,
            Some((
                spec("_spf.example.com"),
                "redirect=_spf.example.com".to_string()
            ))
        );
        assert_eq!(record.exp, Some(spec("explain.%{d}")));
        assert_eq!(parse("v=spf1").expect("empty").directives, []);
    }

    #[test]
    fn syntax_errors_name_the_term() {
        for (record, at) in [
            ("v=spf1 a:", "a:"),
            ("v=spf1 a:1.2.3.4", "a:1.2.3.4"),
            ("v=spf1 ip4:192.0.2.0/33", "ip4:192.0.2.0/33"),
            ("v=spf1 ip4:192.0.2.0/024", "ip4:192.0.2.0/024"),
            ("v=spf1 ip4:192.0.2", "ip4:192.0.2"),
            ("v=spf1 ip4:2001:db8::", "ip4:2001:db8::"),
            ("v=spf1 ip6:2001:db8::/129", "ip6:2001:db8::/129"),
            ("v=spf1 ip6", "ip6"),
            ("v=spf1 a/33", "a/33"),
            ("v=spf1 mx//129", "mx//129"),
            ("v=spf1 allx", "allx"),
            ("v=spf1 all:x.com", "all:x.com"),
            ("v=spf1 include", "include"),
            ("v=spf1 exists:", "exists:"),
            ("v=spf1 foo:example.com", "foo:example.com"),
            ("v=spf1 *all", "*all"),
            (
                "v=spf1 -all redirect=a.example redirect=b.example",
                "redirect=b.example",
            ),
            ("v=spf1 exp=a.example exp=b.example", "exp=b.example"),
            ("v=spf1 redirect=", "redirect="),
            ("v=spf1 a:%{c}.example.com", "a:%{c}.example.com"),
            ("v=spf1 x=%z", "x=%z"),
            (
                "v=spf1 include:example.com\t-all",
                "include:example.com\t-all",
            ),
        ] {
            let err = parse(record).expect_err(record);
            assert_eq!(err.at, at, "{record}");
            assert_eq!(err.to_string(), format!("syntax error at {at:?}"));
        }
    }

    /// Terms as publishers write them, valid or not quite.
    fn term() -> impl Strategy<Value = String> {
        let qualifier = prop::sample::select(vec!["", "+", "-", "~", "?"]);
        let mechanism = prop::sample::select(vec![
            "all",
            "a",
            "a/24",
            "a:mail.%{d}",
            "mx//64",
            "mx:example.com/24//48",
            "ptr",
            "ptr:%{d2}",
            "ip4:192.0.2.0/24",
            "ip6:2001:db8::/32",
            "include:_spf.%{d}",
            "exists:%{ir}.%{v}._spf.%{d2}",
            "redirect=_spf.example.com",
            "exp=explain.%{d}",
            "x-unknown=%{l}",
        ]);
        (qualifier, mechanism).prop_map(|(q, m)| {
            if m.contains('=') {
                m.to_string()
            } else {
                format!("{q}{m}")
            }
        })
    }

    proptest! {
        #[test]
        fn parsing_never_panics(text in "\\PC{0,80}") {
            let _ = parse(&format!("v=spf1 {text}"));
            let _ = parse(&text);
        }

        #[test]
        fn well_formed_terms_parse_in_order(terms in prop::collection::vec(term(), 0..12)) {
            let mut seen_modifier = std::collections::HashSet::new();
            let terms: Vec<String> = terms
                .into_iter()
                .filter(|t| !t.contains('=') || seen_modifier.insert(t.split('=').next().map(str::to_string)))
                .collect();
            let record = parse(&format!("v=spf1 {}", terms.join(" ")))
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            let directives: Vec<&str> = terms.iter().map(String::as_str).filter(|t| !t.contains('=')).collect();
            let parsed: Vec<&str> = record.directives.iter().map(|d| d.text.as_str()).collect();
            prop_assert_eq!(parsed, directives);
        }
    }
}
