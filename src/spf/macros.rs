//! RFC 7208 7: macro strings, parsed once with the record and expanded per evaluation.
//!
//! Contract: `MacroString::parse` accepts exactly the `macro-string` of RFC 7208 7.1 (the
//! letters `c`, `r` and `t` only where `exp` text is parsed, RFC 7208 7.3; a digit transformer
//! of 0 is refused, 7.1 "the value MUST be nonzero"); `expand` is pure and total: every value
//! it needs (the validated name of `%{p}` included) is in the `MacroContext`, so the caller
//! does the DNS work first. Expansion never panics, whatever the record says.

use std::fmt;
use std::net::IpAddr;

/// A macro string as parsed from a record: literal runs and macros, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct MacroString {
    pieces: Vec<Piece>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Piece {
    /// Visible characters other than `%`, as written.
    Literal(String),
    /// `%%`, `%_` or `%-`: their expansion (`%`, a space, `%20`).
    Escape(&'static str),
    Macro(Macro),
}

/// One `%{...}` expansion.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Macro {
    letter: Letter,
    /// The digit transformer: keep this many right-hand parts (never 0).
    keep: Option<usize>,
    /// The `r` transformer.
    reverse: bool,
    /// Split characters; empty means the default `.`.
    delimiters: String,
    /// An upper-case letter: the value is URL-escaped (RFC 7208 7.3).
    escape: bool,
}

/// RFC 7208 7.2 macro letters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Letter {
    /// `s`: <sender>.
    Sender,
    /// `l`: the local part of <sender>.
    LocalPart,
    /// `o`: the domain of <sender>.
    SenderDomain,
    /// `d`: <domain>, the domain being evaluated (changes with include and redirect).
    Domain,
    /// `i`: <ip> (IPv6 as dot-separated nibbles).
    Ip,
    /// `p`: the validated domain name of <ip> (RFC 7208 5.5), or `unknown`.
    ValidatedName,
    /// `v`: `in-addr` or `ip6`.
    Version,
    /// `h`: the HELO/EHLO domain.
    Helo,
    /// `c`: the client IP in its usual text form (exp only).
    ClientIp,
    /// `r`: the receiving host's name (exp only).
    Receiver,
    /// `t`: the current time, seconds since the epoch (exp only).
    Timestamp,
}

impl Letter {
    fn of(c: char) -> Option<(Letter, bool)> {
        let letter = match c.to_ascii_lowercase() {
            's' => Letter::Sender,
            'l' => Letter::LocalPart,
            'o' => Letter::SenderDomain,
            'd' => Letter::Domain,
            'i' => Letter::Ip,
            'p' => Letter::ValidatedName,
            'v' => Letter::Version,
            'h' => Letter::Helo,
            'c' => Letter::ClientIp,
            'r' => Letter::Receiver,
            't' => Letter::Timestamp,
            _ => return None,
        };
        Some((letter, c.is_ascii_uppercase()))
    }

    /// RFC 7208 7.3: "The following macro letters are allowed only in "exp" text: c r t".
    const fn exp_only(self) -> bool {
        matches!(
            self,
            Letter::ClientIp | Letter::Receiver | Letter::Timestamp
        )
    }
}

/// Where a macro string stops being RFC 7208 7.1 syntax.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct MacroSyntax {
    /// The rest of the string from the offending `%` or character.
    pub(crate) at: String,
}

impl fmt::Display for MacroSyntax {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "syntax error at {:?}", self.at)
    }
}

/// What macros expand to for one evaluation.
#[derive(Clone, Copy, Debug)]
pub(crate) struct MacroContext<'a> {
    /// The local part of <sender> (`postmaster` for the HELO identity, RFC 7208 2.3).
    pub(crate) local_part: &'a str,
    /// The domain of <sender> (the HELO name for the HELO identity).
    pub(crate) sender_domain: &'a str,
    /// <domain>: the domain whose record is being evaluated.
    pub(crate) domain: &'a str,
    pub(crate) ip: IpAddr,
    pub(crate) helo: &'a str,
    /// The validated name of `ip`, if the caller looked it up; `unknown` otherwise.
    pub(crate) validated_name: Option<&'a str>,
    pub(crate) receiver: &'a str,
    /// Seconds since the epoch.
    pub(crate) timestamp: u64,
}

impl MacroString {
    /// Parses a `macro-string`; `exp_text` also allows the exp-only letters `c`, `r`, `t`.
    pub(crate) fn parse(text: &str, exp_text: bool) -> Result<MacroString, MacroSyntax> {
        let mut pieces = Vec::new();
        let mut literal = String::new();
        let mut rest = text;
        while let Some(c) = rest.chars().next() {
            let at = rest;
            if c != '%' {
                // macro-literal = %x21-24 / %x26-7E (visible characters except "%").
                if !('!'..='~').contains(&c) {
                    return Err(MacroSyntax { at: at.to_string() });
                }
                literal.push(c);
                rest = &rest[c.len_utf8()..];
                continue;
            }
            let escape = match rest.as_bytes().get(1) {
                Some(b'%') => Some("%"),
                Some(b'_') => Some(" "),
                Some(b'-') => Some("%20"),
                Some(b'{') => None,
                _ => return Err(MacroSyntax { at: at.to_string() }),
            };
            if !literal.is_empty() {
                pieces.push(Piece::Literal(std::mem::take(&mut literal)));
            }
            if let Some(escape) = escape {
                pieces.push(Piece::Escape(escape));
                rest = &rest[2..];
                continue;
            }
            let Some(close) = rest.find('}') else {
                return Err(MacroSyntax { at: at.to_string() });
            };
            let parsed = parse_macro(&rest[2..close], exp_text)
                .ok_or_else(|| MacroSyntax { at: at.to_string() })?;
            pieces.push(Piece::Macro(parsed));
            rest = &rest[close + 1..];
        }
        if !literal.is_empty() {
            pieces.push(Piece::Literal(literal));
        }
        Ok(MacroString { pieces })
    }

    /// RFC 7208 7.1 `domain-end`: the string ends with a macro expansion, or with `.` and a
    /// top label (not all digits, no leading or trailing hyphen) and an optional `.`.
    pub(crate) fn has_domain_end(&self) -> bool {
        match self.pieces.last() {
            None => false,
            Some(Piece::Macro(_) | Piece::Escape(_)) => true,
            Some(Piece::Literal(text)) => {
                let text = text.strip_suffix('.').unwrap_or(text);
                match text.rsplit_once('.') {
                    Some((_, top)) => is_toplabel(top),
                    None => false,
                }
            }
        }
    }

    /// Whether expanding needs the validated name of the client (`%{p}`).
    pub(crate) fn uses_validated_name(&self) -> bool {
        self.pieces
            .iter()
            .any(|p| matches!(p, Piece::Macro(m) if m.letter == Letter::ValidatedName))
    }

    /// RFC 7208 7.3: the string with every macro replaced.
    pub(crate) fn expand(&self, ctx: &MacroContext<'_>) -> String {
        let mut out = String::new();
        for piece in &self.pieces {
            match piece {
                Piece::Literal(text) => out.push_str(text),
                Piece::Escape(text) => out.push_str(text),
                Piece::Macro(m) => {
                    let value = letter_value(m.letter, ctx);
                    let value = if m.keep.is_some() || m.reverse || !m.delimiters.is_empty() {
                        transform(&value, m.keep, m.reverse, &m.delimiters)
                    } else {
                        value
                    };
                    if m.escape {
                        url_escape(&value, &mut out);
                    } else {
                        out.push_str(&value);
                    }
                }
            }
        }
        out
    }
}

/// The inside of `%{...}`: a letter, digits, an optional `r`, delimiters.
fn parse_macro(inner: &str, exp_text: bool) -> Option<Macro> {
    let mut chars = inner.chars();
    let (letter, escape) = Letter::of(chars.next()?)?;
    if letter.exp_only() && !exp_text {
        return None;
    }
    let rest = chars.as_str();
    let digits_end = rest
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(rest.len());
    let (digits, rest) = rest.split_at(digits_end);
    let keep = if digits.is_empty() {
        None
    } else {
        // More parts than any name can have: a huge number keeps them all.
        let n = digits.parse::<usize>().unwrap_or(usize::MAX);
        if n == 0 {
            return None;
        }
        Some(n)
    };
    let (reverse, delimiters) = match rest.strip_prefix(['r', 'R']) {
        Some(after) => (true, after),
        None => (false, rest),
    };
    if !delimiters.chars().all(|c| ".-+,/_=".contains(c)) {
        return None;
    }
    Some(Macro {
        letter,
        keep,
        reverse,
        delimiters: delimiters.to_string(),
        escape,
    })
}

/// RFC 7208 7.1 `toplabel`.
fn is_toplabel(label: &str) -> bool {
    let b = label.as_bytes();
    if b.is_empty() || !b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'-') {
        return false;
    }
    if b.contains(&b'-') {
        b[0].is_ascii_alphanumeric() && b[b.len() - 1].is_ascii_alphanumeric()
    } else {
        b.iter().any(u8::is_ascii_alphabetic)
    }
}

fn letter_value(letter: Letter, ctx: &MacroContext<'_>) -> String {
    match letter {
        Letter::Sender => format!("{}@{}", ctx.local_part, ctx.sender_domain),
        Letter::LocalPart => ctx.local_part.to_string(),
        Letter::SenderDomain => ctx.sender_domain.to_string(),
        Letter::Domain => ctx.domain.to_string(),
        Letter::Ip => dotted_ip(ctx.ip),
        Letter::ValidatedName => ctx.validated_name.unwrap_or("unknown").to_string(),
        Letter::Version => match ctx.ip {
            IpAddr::V4(_) => "in-addr".to_string(),
            IpAddr::V6(_) => "ip6".to_string(),
        },
        Letter::Helo => ctx.helo.to_string(),
        Letter::ClientIp => ctx.ip.to_string(),
        Letter::Receiver => ctx.receiver.to_string(),
        Letter::Timestamp => ctx.timestamp.to_string(),
    }
}

/// RFC 7208 7.3 `i`: IPv4 dotted quad; IPv6 as 32 dot-separated lower-case nibbles.
fn dotted_ip(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => {
            let mut out = String::with_capacity(63);
            for byte in v6.octets() {
                for nibble in [byte >> 4, byte & 0x0f] {
                    if !out.is_empty() {
                        out.push('.');
                    }
                    out.push(char::from_digit(u32::from(nibble), 16).unwrap_or('0'));
                }
            }
            out
        }
    }
}

/// RFC 7208 7.3 transformers: split on any of `delimiters` (default `.`), reverse if asked,
/// keep the `keep` right-hand parts, join with `.`.
pub(crate) fn transform(
    value: &str,
    keep: Option<usize>,
    reverse: bool,
    delimiters: &str,
) -> String {
    let delimiters = if delimiters.is_empty() {
        "."
    } else {
        delimiters
    };
    let mut parts: Vec<&str> = value.split(|c| delimiters.contains(c)).collect();
    if reverse {
        parts.reverse();
    }
    let skip = keep.map_or(0, |n| parts.len().saturating_sub(n));
    parts[skip..].join(".")
}

/// RFC 7208 7.3: an upper-case macro letter URL-escapes its value; unreserved characters
/// (RFC 3986 2.3) stay, every other byte becomes `%XX`.
fn url_escape(value: &str, out: &mut String) {
    for byte in value.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// RFC 7208 appendix D: sender strong-bad@email.example.com, IP 192.0.2.3 or
    /// 2001:db8::cb01.
    fn appendix_d(ip: &str) -> MacroContext<'static> {
        MacroContext {
            local_part: "strong-bad",
            sender_domain: "email.example.com",
            domain: "email.example.com",
            ip: ip.parse().expect("literal"),
            helo: "mx.example.org",
            validated_name: None,
            receiver: "mx.example.net",
            timestamp: 1_700_000_000,
        }
    }

    fn expand(text: &str, ip: &str) -> String {
        MacroString::parse(text, true)
            .unwrap_or_else(|e| panic!("{text}: {e}"))
            .expand(&appendix_d(ip))
    }

    #[test]
    fn rfc_7208_appendix_d_examples() {
        let v4 = "192.0.2.3";
        for (text, want) in [
            ("%{s}", "strong-bad@email.example.com"),
            ("%{o}", "email.example.com"),
            ("%{d}", "email.example.com"),
            ("%{d4}", "email.example.com"),
            ("%{d3}", "email.example.com"),
            ("%{d2}", "example.com"),
            ("%{d1}", "com"),
            ("%{dr}", "com.example.email"),
            ("%{d2r}", "example.email"),
            ("%{l}", "strong-bad"),
            ("%{l-}", "strong.bad"),
            ("%{lr}", "strong-bad"),
            ("%{lr-}", "bad.strong"),
            ("%{l1r-}", "strong"),
            (
                "%{ir}.%{v}._spf.%{d2}",
                "3.2.0.192.in-addr._spf.example.com",
            ),
            ("%{lr-}.lp._spf.%{d2}", "bad.strong.lp._spf.example.com"),
            (
                "%{lr-}.lp.%{ir}.%{v}._spf.%{d2}",
                "bad.strong.lp.3.2.0.192.in-addr._spf.example.com",
            ),
            (
                "%{ir}.%{v}.%{l1r-}.lp._spf.%{d2}",
                "3.2.0.192.in-addr.strong.lp._spf.example.com",
            ),
            (
                "%{d2}.trusted-domains.example.net",
                "example.com.trusted-domains.example.net",
            ),
        ] {
            assert_eq!(expand(text, v4), want, "{text}");
        }
        assert_eq!(
            expand("%{ir}.%{v}._spf.%{d2}", "2001:db8::cb01"),
            "1.0.b.c.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.ip6._spf.example.com"
        );
    }

    #[test]
    fn escapes_and_the_other_letters() {
        let v4 = "192.0.2.3";
        assert_eq!(expand("a%%b%_c%-d", v4), "a%b c%20d");
        assert_eq!(expand("%{S}", v4), "strong-bad%40email.example.com");
        assert_eq!(expand("%{h}", v4), "mx.example.org");
        assert_eq!(expand("%{p}", v4), "unknown");
        assert_eq!(expand("%{i}", v4), "192.0.2.3");
        assert_eq!(expand("%{v}", v4), "in-addr");
        assert_eq!(expand("%{c}", "2001:db8::cb01"), "2001:db8::cb01");
        assert_eq!(expand("%{r}", v4), "mx.example.net");
        assert_eq!(expand("%{t}", v4), "1700000000");
        assert_eq!(expand("%{d+}", v4), "email.example.com");
        // Several delimiters at once: split on + and -, reverse, keep two.
        let ctx = MacroContext {
            local_part: "foo-bar+zip+quux",
            ..appendix_d(v4)
        };
        let multi = MacroString::parse("%{l2r+-}", false).expect("valid");
        assert_eq!(multi.expand(&ctx), "bar.foo");
        // RFC 3986 unreserved characters stay; the rest is escaped.
        let ctx = MacroContext {
            local_part: "~jack&jill=up-a_b3.c",
            ..appendix_d(v4)
        };
        let upper = MacroString::parse("%{L}", false).expect("valid");
        assert_eq!(upper.expand(&ctx), "~jack%26jill%3Dup-a_b3.c");
        let ctx = MacroContext {
            validated_name: Some("mx.email.example.com"),
            ..appendix_d(v4)
        };
        let p = MacroString::parse("%{p2}", false).expect("valid");
        assert_eq!(p.expand(&ctx), "example.com");
        assert!(p.uses_validated_name());
    }

    #[test]
    fn bad_macros_are_syntax_errors() {
        for text in [
            "%", "%x", "%{", "%{d", "%{x}", "%{d0}", "%{d2rr}", "%{dz}", "a b", "%{}", "é",
        ] {
            assert!(MacroString::parse(text, true).is_err(), "{text}");
        }
        // RFC 7208 7.3: c, r and t only in exp text.
        for text in ["%{c}", "%{r}", "%{t}"] {
            assert!(MacroString::parse(text, false).is_err(), "{text}");
            assert!(MacroString::parse(text, true).is_ok(), "{text}");
        }
        let err = MacroString::parse("x.%{d0}.com", false).expect_err("zero digits");
        assert_eq!(err.to_string(), "syntax error at \"%{d0}.com\"");
    }

    #[test]
    fn domain_end_is_a_top_label_or_a_macro() {
        for (text, ok) in [
            ("example.com", true),
            ("example.com.", true),
            ("%{d}", true),
            ("_spf.%{d}", true),
            ("%{d}.x-1", true),
            ("1.2.3.4", false),
            ("example", false),
            ("example.-com", false),
            ("example.com-", false),
            ("example.", false),
            ("", false),
            ("%{d}.", false),
        ] {
            let parsed = MacroString::parse(text, false).expect("valid macro string");
            assert_eq!(parsed.has_domain_end(), ok, "{text}");
        }
    }

    proptest! {
        #[test]
        fn a_string_without_macros_expands_to_itself(text in "[!-$&-~]{0,64}") {
            let parsed = MacroString::parse(&text, false).expect("macro-free");
            prop_assert_eq!(parsed.expand(&appendix_d("192.0.2.3")), text);
        }

        #[test]
        fn double_percent_is_one_percent(a in "[!-$&-~]{0,16}", b in "[!-$&-~]{0,16}") {
            let parsed = MacroString::parse(&format!("{a}%%{b}"), false).expect("valid");
            prop_assert_eq!(parsed.expand(&appendix_d("192.0.2.3")), format!("{a}%{b}"));
        }

        #[test]
        fn reversing_twice_is_identity(labels in prop::collection::vec("[a-z0-9-]{0,8}", 1..8)) {
            let name = labels.join(".");
            let once = transform(&name, None, true, "");
            prop_assert_eq!(transform(&once, None, true, ""), name);
        }

        #[test]
        fn digits_keep_the_rightmost_labels(
            labels in prop::collection::vec("[a-z0-9-]{1,8}", 1..8),
            keep in 1usize..12,
        ) {
            let name = labels.join(".");
            let kept = transform(&name, Some(keep), false, "");
            let start = labels.len().saturating_sub(keep);
            prop_assert_eq!(kept, labels[start..].join("."));
        }

        #[test]
        fn expansion_never_panics(text in "\\PC{0,40}", ip6 in any::<bool>()) {
            let ip = if ip6 { "2001:db8::cb01" } else { "192.0.2.3" };
            if let Ok(parsed) = MacroString::parse(&text, true) {
                let _ = parsed.expand(&appendix_d(ip));
                let _ = parsed.has_domain_end();
            }
        }

        #[test]
        fn macros_with_random_transformers_never_panic(
            letter in "[slodiphcrtvSLODIPHCRTV]",
            digits in "[0-9]{0,25}",
            reverse in "r?",
            delimiters in "[-.+,/_=]{0,5}",
        ) {
            let text = format!("%{{{letter}{digits}{reverse}{delimiters}}}");
            if let Ok(parsed) = MacroString::parse(&text, true) {
                let _ = parsed.expand(&appendix_d("2001:db8::cb01"));
            }
        }
    }
}
