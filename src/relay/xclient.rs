//! The XCLIENT commands that tell the next hop who the client is (Postfix XCLIENT_README),
//! with their xtext values (RFC 3461 4).

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::net::IpAddr;

use super::{XclientAttrs, XclientName};
use crate::protocol::MAX_COMMAND_LINE;

/// Postfix refuses a HELO attribute longer than this (501, `VALID_HOSTNAME_LEN`), which
/// would fail the whole XCLIENT.
const MAX_HELO_VALUE: usize = 255;

/// The longest xtext HELO value that fits in `XCLIENT HELO=... PROTO=ESMTP` CRLF.
const MAX_HELO_XTEXT: usize = MAX_COMMAND_LINE - "XCLIENT HELO= PROTO=ESMTP\r\n".len();

/// The XCLIENT commands for the attributes the next hop offered. XCLIENT_README:
/// "XCLIENT attribute-name=attribute-value ...", values in xtext, and a client must send only
/// the attribute names listed in the EHLO reply. One command when it fits in RFC 5321's 512
/// octets; otherwise HELO and PROTO go first and NAME and ADDR last (with PORT), since an
/// XCLIENT that changes ADDR makes the next hop judge any further XCLIENT by the new address,
/// which it does not trust. Each command gets its own 220.
pub(super) fn xclient_commands(attrs: &XclientAttrs, offered: &[String]) -> VecDeque<String> {
    let is_offered = |name: &str| offered.iter().any(|o| o == name);
    let mut identity = Vec::new();
    if is_offered("HELO") {
        // A HELO that Postfix would refuse, or whose xtext would not fit in the first
        // command, is sent as unknown: the EHLO after XCLIENT names the client anyway.
        let helo = attrs
            .helo
            .as_deref()
            .filter(|helo| helo.len() <= MAX_HELO_VALUE)
            .map(xtext)
            .filter(|value| value.len() <= MAX_HELO_XTEXT)
            .unwrap_or_else(|| "[UNAVAILABLE]".to_string());
        identity.push(format!("HELO={helo}"));
    }
    if is_offered("PROTO") {
        identity.push(format!("PROTO={}", xtext(attrs.proto)));
    }
    let mut address = Vec::new();
    if is_offered("ADDR") {
        // XCLIENT_README: "IPv6 addresses must be prefixed with IPV6:".
        let addr = match attrs.addr {
            IpAddr::V4(v4) => v4.to_string(),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => v4.to_string(),
                None => format!("IPV6:{v6}"),
            },
        };
        address.push(format!("ADDR={}", xtext(&addr)));
    }
    if is_offered("PORT")
        && let Some(port) = attrs.port
    {
        address.push(format!("PORT={port}"));
    }
    if is_offered("NAME") {
        // XCLIENT_README: "[UNAVAILABLE]" when the name is not known, "[TEMPUNAVAIL]" when the
        // lookup failed temporarily.
        let name = match &attrs.name {
            XclientName::Name(name) => xtext(name),
            XclientName::Unavailable => "[UNAVAILABLE]".to_string(),
            XclientName::TempUnavailable => "[TEMPUNAVAIL]".to_string(),
        };
        address.push(format!("NAME={name}"));
    }
    let one = command(address.iter().chain(&identity));
    let mut commands = VecDeque::new();
    match one {
        Some(line) if line.len() + 2 <= MAX_COMMAND_LINE => commands.push_back(line),
        _ => commands.extend(
            [command(identity.iter()), command(address.iter())]
                .into_iter()
                .flatten(),
        ),
    }
    commands
}

/// `XCLIENT` and the attributes, or None when there are none.
fn command<'a>(items: impl Iterator<Item = &'a String>) -> Option<String> {
    let mut line = String::from("XCLIENT");
    for item in items {
        line.push(' ');
        line.push_str(item);
    }
    (line.len() > "XCLIENT".len()).then_some(line)
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
