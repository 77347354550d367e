//! One session event as one log line of `key=value` fields (SPEC "Logs").
//!
//! Much of what a line carries was chosen by the client (its HELO, its addresses, a next hop's
//! reply text), so every value is written in a form that cannot leave its field or its line:
//! - a value holding a space, `"` or `\`, or that is empty, goes in double quotes, with `\"`
//!   and `\\` inside;
//! - an octet outside printable ASCII (a newline above all) is `\xHH`, quoted or not.
//!
//! `whatif` reads these lines back with the same rules (`crate::whatif::parse_line`); the
//! tests below keep the two in agreement.

use std::fmt;
use std::fmt::Write;

/// A log line being built: the event words, then fields in the order they are added.
#[derive(Clone, Debug)]
pub(crate) struct LogLine {
    text: String,
}

impl LogLine {
    /// Starts a line with its event words (ours, never a client's) and the session id, so
    /// `grep sid=ID` shows a whole session.
    pub(crate) fn new(event: &'static str, sid: u64) -> Self {
        let mut line = Self {
            text: String::with_capacity(128),
        };
        line.text.push_str(event);
        line.field("sid", Sid(sid).to_string())
    }

    /// Appends ` key=value`, the value escaped as the module says.
    pub(crate) fn field(mut self, key: &'static str, value: impl AsRef<[u8]>) -> Self {
        self.text.push(' ');
        self.text.push_str(key);
        self.text.push('=');
        push_value(&mut self.text, value.as_ref());
        self
    }

    /// Appends the field only when there is a value.
    pub(crate) fn field_opt(self, key: &'static str, value: Option<impl AsRef<[u8]>>) -> Self {
        match value {
            Some(value) => self.field(key, value),
            None => self,
        }
    }
}

impl fmt::Display for LogLine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// A session id as the log writes it: upper-case hex, the prefix of the session's queue IDs
/// (`id=` of `accepted`), so one grep finds a message's session too.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Sid(pub u64);

impl fmt::Display for Sid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}", self.0)
    }
}

/// Writes `value` as one field value.
pub(crate) fn push_value(out: &mut String, value: &[u8]) {
    let quoted = value.is_empty() || value.iter().any(|&b| matches!(b, b' ' | b'"' | b'\\'));
    if quoted {
        out.push('"');
    }
    for &byte in value {
        match byte {
            b'"' => out.push_str("\\\""),
            b'\\' => out.push_str("\\\\"),
            0x20..0x7f => out.push(char::from(byte)),
            // Writing to a String cannot fail.
            _ => {
                let _ = write!(out, "\\x{byte:02x}");
            }
        }
    }
    if quoted {
        out.push('"');
    }
}

/// An address in angle brackets, as `from=<...>` and `to=<...>` show it (`<>` is the null
/// reverse path).
pub(crate) fn angle(address: &str) -> String {
    format!("<{address}>")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::whatif::parse_line;

    fn value(raw: &[u8]) -> String {
        let mut out = String::new();
        push_value(&mut out, raw);
        out
    }

    #[test]
    fn values_are_escaped() {
        let cases: &[(&[u8], &str)] = &[
            (b"mx.example.com", "mx.example.com"),
            (b"", r#""""#),
            (b"a b", r#""a b""#),
            (br#"say "hi""#, r#""say \"hi\"""#),
            (br"back\slash", r#""back\\slash""#),
            (b"line\r\nverdict=pass", r"line\x0d\x0averdict=pass"),
            (b"tab\there", r"tab\x09here"),
            ("caf\u{e9}".as_bytes(), r"caf\xc3\xa9"),
            (b"\x7f\x00", r"\x7f\x00"),
            (b"550 5.7.1 no", r#""550 5.7.1 no""#),
        ];
        for (raw, expected) in cases {
            assert_eq!(value(raw), *expected, "{raw:?}");
        }
    }

    #[test]
    fn no_value_can_break_the_line() {
        for byte in 0..=255u8 {
            let text = value(&[b'a', byte, b'b']);
            assert!(
                text.bytes().all(|b| (0x20..0x7f).contains(&b)),
                "{byte:#x} gave {text:?}"
            );
        }
    }

    #[test]
    fn lines_start_with_the_event_and_sid() {
        let line = LogLine::new("connect", 0x1a2b)
            .field("ip", "192.0.2.1")
            .field_opt("to", None::<&str>)
            .field_opt("from", Some(angle("a@b")));
        assert_eq!(line.to_string(), "connect sid=1A2B ip=192.0.2.1 from=<a@b>");
    }

    #[test]
    fn whatif_reads_back_exactly_what_is_written() {
        let results = "syntax:pass,bare_ip:pass,fqdn:fail,localhost:pass,own_name:pass,\
                       literal_match:none,forward:pass,forward_match:pass,fcrdns:fail,\
                       rdns_match:none,dynamic:pass,spf:none,rhsbl:none,dnsbl:none,\
                       helo_churn:none";
        let helos: &[&[u8]] = &[
            b"mx.example.com",
            b"",
            br#"x" action=reject results=fqdn:fail"#,
            b"a\\\" verdict=pass\nhelo verdict sid=1 ip=192.0.2.9 helo=y action=reject",
            b"\\x41\\",
            "\u{fc}ber \u{2028}".as_bytes(),
            b"[192.0.2.1]",
        ];
        for helo in helos {
            let line = LogLine::new("helo verdict", 77)
                .field("ip", "192.0.2.1")
                .field("helo", helo)
                .field("ptr", "none")
                .field("verdict", "fail")
                .field("action", "tag")
                .field("results", results)
                .field("dns_ms", "3")
                .to_string();
            assert!(!line.contains('\n'));
            let parsed = parse_line(format!("[2026-12-07T03:00:00Z INFO  x] {line}").as_bytes())
                .unwrap_or_else(|| panic!("unreadable: {line}"));
            assert_eq!(parsed.helo, *helo, "{line}");
            assert_eq!(parsed.sid, b"4D");
            assert_eq!(parsed.was, crate::whatif::Outcome::Tag);
            assert_eq!(parsed.results[2], crate::helo::CheckResult::Fail);
        }
    }
}
