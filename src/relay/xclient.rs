//! The XCLIENT commands that tell the next hop who the client is (Postfix XCLIENT_README),
//! with their xtext values (RFC 3461 4).

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::net::IpAddr;

use super::{XclientAttrs, XclientName};
use crate::protocol::MAX_COMMAND_LINE;

/// The XCLIENT commands for the attributes the next hop offered, in the order ADDR, NAME,
/// HELO, PROTO. XCLIENT_README: "XCLIENT attribute-name=attribute-value ...", values in
/// xtext, and a client must send only the attribute names listed in the EHLO reply. The
/// attributes are split over several commands when one would exceed RFC 5321's 512 octets,
/// as Postfix's smtpd proxy does; each command gets its own 220.
pub(super) fn xclient_commands(attrs: &XclientAttrs, offered: &[String]) -> VecDeque<String> {
    let is_offered = |name: &str| offered.iter().any(|o| o == name);
    let mut items = Vec::new();
    if is_offered("ADDR") {
        // XCLIENT_README: "IPv6 addresses must be prefixed with IPV6:".
        let addr = match attrs.addr {
            IpAddr::V4(v4) => v4.to_string(),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => v4.to_string(),
                None => format!("IPV6:{v6}"),
            },
        };
        items.push(format!("ADDR={}", xtext(&addr)));
    }
    if is_offered("NAME") {
        // XCLIENT_README: "[UNAVAILABLE]" when the name is not known, "[TEMPUNAVAIL]" when the
        // lookup failed temporarily.
        let name = match &attrs.name {
            XclientName::Name(name) => xtext(name),
            XclientName::Unavailable => "[UNAVAILABLE]".to_string(),
            XclientName::TempUnavailable => "[TEMPUNAVAIL]".to_string(),
        };
        items.push(format!("NAME={name}"));
    }
    if is_offered("HELO") {
        let helo = match &attrs.helo {
            Some(helo) => xtext(helo),
            None => "[UNAVAILABLE]".to_string(),
        };
        items.push(format!("HELO={helo}"));
    }
    if is_offered("PROTO") {
        items.push(format!("PROTO={}", xtext(attrs.proto)));
    }
    let mut commands = VecDeque::new();
    let mut line = String::new();
    for item in items {
        if !line.is_empty() && line.len() + 1 + item.len() + 2 > MAX_COMMAND_LINE {
            commands.push_back(std::mem::take(&mut line));
        }
        if line.is_empty() {
            line.push_str("XCLIENT");
        }
        line.push(' ');
        line.push_str(&item);
    }
    if !line.is_empty() {
        commands.push_back(line);
    }
    commands
}

/// RFC 3461 4: xtext is `xchar` (33..=126 except `+` and `=`) or `"+" 2(%x30-39 / %x41-46)`,
/// the octet in upper-case hex.
fn xtext(value: &str) -> String {
    let mut s = String::with_capacity(value.len());
    for b in value.bytes() {
        if (33..=126).contains(&b) && b != b'+' && b != b'=' {
            s.push(char::from(b));
        } else {
            // Writing to a String cannot fail.
            let _ = write!(s, "+{b:02X}");
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xtext_encoding() {
        assert_eq!(xtext("abc"), "abc");
        assert_eq!(xtext("a+b"), "a+2Bb");
        assert_eq!(xtext("a=b"), "a+3Db");
        assert_eq!(xtext("a b\t"), "a+20b+09");
        assert_eq!(xtext("~!"), "~!");
        assert_eq!(xtext("\u{7f}"), "+7F");
    }
}
