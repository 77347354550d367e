//! PROXY protocol v1 and v2 headers (HAProxy's proxy-protocol.txt), sans-I/O.
//!
//! Contract: `parse(buf)` looks at the first bytes a PROXY listener received and answers
//! `Incomplete` (read more and call again with the whole buffer), `Done { source, consumed }`
//! (the header is `buf[..consumed]`; everything after it belongs to the SMTP session), or
//! `Invalid` (close without a banner). The answer is `Invalid` as soon as the bytes seen can no
//! longer begin a valid header, so a client that talks SMTP to a PROXY listener is dropped at
//! its first byte rather than after the 5 s header deadline. Nothing is allocated and no state
//! is kept between calls.
//!
//! `source` is the client address the proxy reports, or None for v1 `UNKNOWN` and v2 `LOCAL`
//! (the socket peer stays the client). IPv4-mapped IPv6 addresses come back as sent; the caller
//! canonicalizes them (`net::canonical_ip`).
//!
//! Decisions beyond the text of the protocol:
//! - v1 is strict: single spaces, the address family must match TCP4/TCP6, ports are decimal
//!   0-65535 without sign or leading zero. Real proxies send exactly this.
//! - v2 PROXY with a family other than TCP over IPv4/IPv6 (UDP, unix sockets, UNSPEC) is
//!   `Invalid`, not treated as UNKNOWN: keeping the socket peer would make the proxy, usually a
//!   local address, the client, and local clients skip checks; an SMTP front end has no use for
//!   such connections anyway. LOCAL (health checks) is accepted with any family.
//! - v2 TLVs are skipped without being looked at; a header longer than `MAX_HEADER_LEN` is
//!   `Invalid`, which bounds what the caller must buffer.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// Largest v1 header, CRLF included (proxy-protocol.txt 2.1).
pub(crate) const V1_MAX_LEN: usize = 107;

/// Largest v2 address-and-TLV block accepted; real TLVs (ALPN, authority, SSL, AWS VPC id)
/// fit many times over.
pub(crate) const V2_MAX_PAYLOAD: usize = 4096;

/// The most bytes a header can take, v1 or v2: what the caller must be ready to buffer.
pub(crate) const MAX_HEADER_LEN: usize = V2_FIXED_LEN + V2_MAX_PAYLOAD;

/// The outcome of looking at the start of a PROXY listener's input.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum ProxyParse {
    /// Could still become a valid header: read more.
    Incomplete,
    /// A complete, valid header of `consumed` bytes.
    Done {
        /// The client as the proxy saw it; None for v1 UNKNOWN and v2 LOCAL.
        source: Option<SocketAddr>,
        consumed: usize,
    },
    /// Not a valid header, and no more bytes can make it one.
    Invalid(ProxyError),
}

/// Why the input is not a valid PROXY header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ProxyError {
    /// The first bytes are neither `PROXY ` nor the v2 signature.
    NoSignature,
    /// No CRLF within the first 107 octets.
    V1TooLong,
    /// A v1 line that breaks the grammar; the text says where.
    V1Syntax(&'static str),
    /// A v2 version nibble other than 2.
    V2Version(u8),
    /// A v2 command other than LOCAL (0) or PROXY (1).
    V2Command(u8),
    /// A v2 PROXY header whose family/transport byte is not TCP over IPv4 or IPv6.
    V2Family(u8),
    /// A v2 length too short for its addresses or above `V2_MAX_PAYLOAD`.
    V2Length(u16),
}

impl fmt::Display for ProxyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoSignature => f.write_str("no PROXY protocol signature"),
            Self::V1TooLong => write!(f, "PROXY v1 line without CRLF in {V1_MAX_LEN} octets"),
            Self::V1Syntax(what) => write!(f, "PROXY v1 line: {what}"),
            Self::V2Version(v) => write!(f, "PROXY v2 header: version {v}"),
            Self::V2Command(c) => write!(f, "PROXY v2 header: command {c}"),
            Self::V2Family(b) => write!(f, "PROXY v2 header: unsupported family 0x{b:02x}"),
            Self::V2Length(n) => write!(f, "PROXY v2 header: bad length {n}"),
        }
    }
}

impl std::error::Error for ProxyError {}

/// Parses the PROXY header at the start of `buf` (see the module docs for the contract).
pub(crate) fn parse(buf: &[u8]) -> ProxyParse {
    match buf.first() {
        None => ProxyParse::Incomplete,
        Some(b'P') => parse_v1(buf),
        Some(&b) if b == V2_SIGNATURE[0] => parse_v2(buf),
        Some(_) => ProxyParse::Invalid(ProxyError::NoSignature),
    }
}

// ---- v1: "PROXY TCP4 192.0.2.1 198.51.100.1 56324 25\r\n" ----

const V1_PREFIX: &[u8] = b"PROXY ";

fn parse_v1(buf: &[u8]) -> ProxyParse {
    let window = &buf[..buf.len().min(V1_MAX_LEN)];
    let Some(lf) = window.iter().position(|&b| b == b'\n') else {
        if buf.len() >= V1_MAX_LEN {
            return ProxyParse::Invalid(ProxyError::V1TooLong);
        }
        // A CR may only be the last byte seen, waiting for its LF.
        let partial = window.strip_suffix(b"\r").unwrap_or(window);
        return match scan_v1(partial, Completeness::Partial) {
            Ok(_) => ProxyParse::Incomplete,
            Err(e) => ProxyParse::Invalid(e),
        };
    };
    let Some(line) = window[..lf].strip_suffix(b"\r") else {
        return ProxyParse::Invalid(ProxyError::V1Syntax("line ends in LF without CR"));
    };
    match scan_v1(line, Completeness::Whole) {
        Ok(source) => ProxyParse::Done {
            source,
            consumed: lf + 1,
        },
        Err(e) => ProxyParse::Invalid(e),
    }
}

/// Whether a v1 scan sees the whole line (without CRLF) or only its beginning.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Completeness {
    Whole,
    Partial,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum V1Family {
    Tcp4,
    Tcp6,
}

/// Checks a v1 line field by field. With `Partial`, the last field seen may be cut short and
/// is checked only for being the beginning of a valid field; the address returned is then
/// meaningless (None).
fn scan_v1(line: &[u8], completeness: Completeness) -> Result<Option<SocketAddr>, ProxyError> {
    use ProxyError::V1Syntax;

    let whole = completeness == Completeness::Whole;
    if line.len() < V1_PREFIX.len() {
        return match !whole && V1_PREFIX.starts_with(line) {
            true => Ok(None),
            false => Err(V1Syntax("does not start with `PROXY `")),
        };
    }
    let Some(rest) = line.strip_prefix(V1_PREFIX) else {
        return Err(V1Syntax("does not start with `PROXY `"));
    };
    if line.contains(&b'\r') {
        return Err(V1Syntax("CR inside the line"));
    }

    // proxy-protocol.txt 2.1: after UNKNOWN the receiver ignores everything up to the CRLF.
    if let Some(after) = rest.strip_prefix(b"UNKNOWN") {
        return match after.first() {
            None | Some(b' ') => Ok(None),
            Some(_) => Err(V1Syntax("unknown protocol")),
        };
    }

    let field_count = rest.split(|&b| b == b' ').count();
    if field_count > 5 {
        return Err(V1Syntax("too many fields"));
    }
    let last = field_count - 1;
    let mut family = None;
    let (mut source_ip, mut source_port) = (None, None);
    for (index, field) in rest.split(|&b| b == b' ').enumerate() {
        // Only the last field of a partial line can be cut short.
        let cut = !whole && index == last;
        match index {
            0 => family = v1_family(field, cut)?,
            _ if index <= 2 => {
                // Only a cut field leaves the family unknown, and a cut field is the last.
                let family = family.ok_or(V1Syntax("unknown protocol"))?;
                let ip = v1_address(field, family, cut)?;
                if index == 1 {
                    source_ip = ip;
                }
            }
            _ => {
                let port = v1_port(field, cut)?;
                if index == 3 {
                    source_port = port;
                }
            }
        }
    }
    if !whole {
        return Ok(None);
    }
    match (field_count, source_ip, source_port) {
        (5, Some(ip), Some(port)) => Ok(Some(SocketAddr::new(ip, port))),
        _ => Err(V1Syntax("too few fields")),
    }
}

/// `TCP4` or `TCP6`; None for a cut field that is the beginning of TCP4, TCP6 or UNKNOWN.
fn v1_family(field: &[u8], cut: bool) -> Result<Option<V1Family>, ProxyError> {
    match field {
        b"TCP4" => Ok(Some(V1Family::Tcp4)),
        b"TCP6" => Ok(Some(V1Family::Tcp6)),
        _ if cut
            && [&b"TCP4"[..], b"TCP6", b"UNKNOWN"]
                .iter()
                .any(|p| p.starts_with(field)) =>
        {
            Ok(None)
        }
        _ => Err(ProxyError::V1Syntax("unknown protocol")),
    }
}

/// A whole address must parse in its family; a cut one must use its family's characters.
fn v1_address(field: &[u8], family: V1Family, cut: bool) -> Result<Option<IpAddr>, ProxyError> {
    // Longest textual forms: `255.255.255.255` and `ffff:...:255.255.255.255`.
    let (max_len, allowed): (usize, fn(&u8) -> bool) = match family {
        V1Family::Tcp4 => (15, |b| b.is_ascii_digit() || *b == b'.'),
        V1Family::Tcp6 => (45, |b| b.is_ascii_hexdigit() || *b == b':' || *b == b'.'),
    };
    let bad = ProxyError::V1Syntax("bad address");
    if field.len() > max_len || !field.iter().all(allowed) {
        return Err(bad);
    }
    if cut {
        return Ok(None);
    }
    let text = std::str::from_utf8(field).map_err(|_| bad)?;
    let ip = match family {
        V1Family::Tcp4 => text.parse::<Ipv4Addr>().map(IpAddr::V4),
        V1Family::Tcp6 => text.parse::<Ipv6Addr>().map(IpAddr::V6),
    };
    ip.map(Some).map_err(|_| bad)
}

/// Decimal 0-65535, digits only, no leading zero; a cut port may be any prefix of one.
fn v1_port(field: &[u8], cut: bool) -> Result<Option<u16>, ProxyError> {
    let bad = ProxyError::V1Syntax("bad port");
    if field.is_empty() {
        return if cut { Ok(None) } else { Err(bad) };
    }
    let digits_only = field.iter().all(u8::is_ascii_digit);
    let leading_zero = field.len() > 1 && field[0] == b'0';
    if !digits_only || leading_zero || field.len() > 5 {
        return Err(bad);
    }
    // Five digits or fewer always fit in u32.
    let value = field.iter().fold(0u32, |n, d| n * 10 + u32::from(d - b'0'));
    match u16::try_from(value) {
        Ok(port) => Ok(Some(port)),
        Err(_) => Err(bad),
    }
}

// ---- v2: 12-byte signature, ver/cmd, fam/proto, length, addresses, TLVs ----

const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
const V2_FIXED_LEN: usize = 16;
const V2_CMD_LOCAL: u8 = 0x0;
const V2_CMD_PROXY: u8 = 0x1;
const V2_TCP_OVER_IPV4: u8 = 0x11;
const V2_TCP_OVER_IPV6: u8 = 0x21;
/// Source and destination addresses and ports.
const V2_IPV4_BLOCK: usize = 4 + 4 + 2 + 2;
const V2_IPV6_BLOCK: usize = 16 + 16 + 2 + 2;

fn parse_v2(buf: &[u8]) -> ProxyParse {
    let seen = buf.len().min(V2_SIGNATURE.len());
    if buf[..seen] != V2_SIGNATURE[..seen] {
        return ProxyParse::Invalid(ProxyError::NoSignature);
    }
    match v2_fixed_part(buf) {
        Err(e) => ProxyParse::Invalid(e),
        Ok(None) => ProxyParse::Incomplete,
        Ok(Some(fixed)) => {
            let total = V2_FIXED_LEN + usize::from(fixed.length);
            if buf.len() < total {
                return ProxyParse::Incomplete;
            }
            let payload = &buf[V2_FIXED_LEN..total];
            ProxyParse::Done {
                source: fixed.source(payload),
                consumed: total,
            }
        }
    }
}

/// The 16-byte fixed part after its checks.
struct V2Fixed {
    command: u8,
    family: u8,
    length: u16,
}

impl V2Fixed {
    /// The source address of the address block; the length was checked to hold it.
    fn source(&self, payload: &[u8]) -> Option<SocketAddr> {
        if self.command == V2_CMD_LOCAL {
            return None;
        }
        match self.family {
            V2_TCP_OVER_IPV4 => {
                let ip: [u8; 4] = payload.get(0..4)?.try_into().ok()?;
                let port = payload.get(8..10)?;
                Some(SocketAddr::new(
                    IpAddr::V4(Ipv4Addr::from(ip)),
                    u16::from_be_bytes([port[0], port[1]]),
                ))
            }
            V2_TCP_OVER_IPV6 => {
                let ip: [u8; 16] = payload.get(0..16)?.try_into().ok()?;
                let port = payload.get(32..34)?;
                Some(SocketAddr::new(
                    IpAddr::V6(Ipv6Addr::from(ip)),
                    u16::from_be_bytes([port[0], port[1]]),
                ))
            }
            _ => None,
        }
    }
}

/// Checks bytes 12-15 as far as they have arrived; None until all four are there.
fn v2_fixed_part(buf: &[u8]) -> Result<Option<V2Fixed>, ProxyError> {
    let Some(&ver_cmd) = buf.get(12) else {
        return Ok(None);
    };
    let (version, command) = (ver_cmd >> 4, ver_cmd & 0x0f);
    if version != 2 {
        return Err(ProxyError::V2Version(version));
    }
    if command != V2_CMD_LOCAL && command != V2_CMD_PROXY {
        return Err(ProxyError::V2Command(command));
    }
    let Some(&family) = buf.get(13) else {
        return Ok(None);
    };
    let address_block = match (command, family) {
        // LOCAL: the receiver must ignore the address information, whatever the family.
        (V2_CMD_LOCAL, _) => 0,
        (_, V2_TCP_OVER_IPV4) => V2_IPV4_BLOCK,
        (_, V2_TCP_OVER_IPV6) => V2_IPV6_BLOCK,
        _ => return Err(ProxyError::V2Family(family)),
    };
    let (Some(&high), Some(&low)) = (buf.get(14), buf.get(15)) else {
        return Ok(None);
    };
    let length = u16::from_be_bytes([high, low]);
    if usize::from(length) < address_block || usize::from(length) > V2_MAX_PAYLOAD {
        return Err(ProxyError::V2Length(length));
    }
    Ok(Some(V2Fixed {
        command,
        family,
        length,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn done(source: Option<&str>, consumed: usize) -> ProxyParse {
        ProxyParse::Done {
            source: source.map(|s| s.parse().unwrap()),
            consumed,
        }
    }

    fn v1_syntax(what: &'static str) -> ProxyParse {
        ProxyParse::Invalid(ProxyError::V1Syntax(what))
    }

    /// A v2 header: ver/cmd byte, family byte, address block, then `tlv` bytes.
    fn v2(ver_cmd: u8, family: u8, addresses: &[u8], tlv: &[u8]) -> Vec<u8> {
        let mut out = V2_SIGNATURE.to_vec();
        out.push(ver_cmd);
        out.push(family);
        let len = u16::try_from(addresses.len() + tlv.len()).unwrap();
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(addresses);
        out.extend_from_slice(tlv);
        out
    }

    fn v2_ipv4_block() -> Vec<u8> {
        let mut block = vec![192, 0, 2, 1, 198, 51, 100, 1];
        block.extend_from_slice(&56324u16.to_be_bytes());
        block.extend_from_slice(&25u16.to_be_bytes());
        block
    }

    fn v2_ipv6_block() -> Vec<u8> {
        let mut block = "2001:db8::1".parse::<Ipv6Addr>().unwrap().octets().to_vec();
        block.extend_from_slice(&"2001:db8::25".parse::<Ipv6Addr>().unwrap().octets());
        block.extend_from_slice(&443u16.to_be_bytes());
        block.extend_from_slice(&25u16.to_be_bytes());
        block
    }

    /// Valid headers and what they give.
    fn valid_headers() -> Vec<(&'static str, Vec<u8>, Option<&'static str>)> {
        let longest_v1 = format!(
            "PROXY TCP6 {a} {a} 65535 65535\r\n",
            a = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
        );
        assert_eq!(longest_v1.len(), 104);
        let mut unknown_padded = b"PROXY UNKNOWN ".to_vec();
        unknown_padded.resize(V1_MAX_LEN - 2, b'x');
        unknown_padded.extend_from_slice(b"\r\n");
        vec![
            (
                "v1 tcp4",
                b"PROXY TCP4 192.0.2.1 198.51.100.1 56324 25\r\n".to_vec(),
                Some("192.0.2.1:56324"),
            ),
            (
                "v1 tcp6",
                b"PROXY TCP6 2001:db8::1 2001:db8::25 443 25\r\n".to_vec(),
                Some("[2001:db8::1]:443"),
            ),
            (
                "v1 tcp6 mapped v4 kept as sent",
                b"PROXY TCP6 ::ffff:192.0.2.1 ::1 0 25\r\n".to_vec(),
                Some("[::ffff:192.0.2.1]:0"),
            ),
            (
                "v1 longest",
                longest_v1.into_bytes(),
                Some("[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535"),
            ),
            ("v1 unknown", b"PROXY UNKNOWN\r\n".to_vec(), None),
            (
                "v1 unknown with addresses",
                b"PROXY UNKNOWN ffff:f...f:ffff ffff:f...f:ffff 65535 65535\r\n".to_vec(),
                None,
            ),
            ("v1 unknown 107 octets", unknown_padded, None),
            (
                "v2 proxy ipv4",
                v2(0x21, 0x11, &v2_ipv4_block(), &[]),
                Some("192.0.2.1:56324"),
            ),
            (
                "v2 proxy ipv6 with TLVs",
                v2(
                    0x21,
                    0x21,
                    &v2_ipv6_block(),
                    &[0x01, 0x00, 0x02, b'h', b'2', 0x04, 0x00, 0x00],
                ),
                Some("[2001:db8::1]:443"),
            ),
            ("v2 local unspec", v2(0x20, 0x00, &[], &[]), None),
            (
                "v2 local with ipv4 block",
                v2(0x20, 0x11, &v2_ipv4_block(), &[]),
                None,
            ),
        ]
    }

    #[test]
    fn valid_headers_give_the_source_and_their_length() {
        for (name, header, source) in valid_headers() {
            assert_eq!(parse(&header), done(source, header.len()), "{name}");
        }
    }

    #[test]
    fn bytes_after_the_header_are_left_to_the_session() {
        for (name, header, source) in valid_headers() {
            let mut input = header.clone();
            input.extend_from_slice(b"EHLO client.example\r\n");
            assert_eq!(parse(&input), done(source, header.len()), "{name}");
        }
    }

    #[test]
    fn every_split_of_a_valid_header_is_incomplete() {
        for (name, header, _) in valid_headers() {
            for cut in 0..header.len() {
                assert_eq!(
                    parse(&header[..cut]),
                    ProxyParse::Incomplete,
                    "{name} at {cut}"
                );
            }
        }
    }

    #[test]
    fn invalid_input_is_refused_as_early_as_possible() {
        let cases: Vec<(&str, &[u8], ProxyParse)> = vec![
            (
                "smtp on a proxy listener",
                b"E",
                ProxyParse::Invalid(ProxyError::NoSignature),
            ),
            (
                "http",
                b"GET / HTTP/1.1\r\n",
                ProxyParse::Invalid(ProxyError::NoSignature),
            ),
            (
                "lower case",
                b"proxy",
                ProxyParse::Invalid(ProxyError::NoSignature),
            ),
            (
                "misspelt",
                b"PROXI",
                v1_syntax("does not start with `PROXY `"),
            ),
            (
                "no space",
                b"PROXYTCP4",
                v1_syntax("does not start with `PROXY `"),
            ),
            (
                "double space",
                b"PROXY  TCP4",
                v1_syntax("unknown protocol"),
            ),
            (
                "unknown proto",
                b"PROXY UDP4 ",
                v1_syntax("unknown protocol"),
            ),
            (
                "proto prefix of nothing",
                b"PROXY TCP5",
                v1_syntax("unknown protocol"),
            ),
            ("unknownx", b"PROXY UNKNOWNX", v1_syntax("unknown protocol")),
            (
                "v6 address under tcp4",
                b"PROXY TCP4 2001:",
                v1_syntax("bad address"),
            ),
            (
                "v4 address under tcp6",
                b"PROXY TCP6 192.0.2.1 ::1 1 2\r\n",
                v1_syntax("bad address"),
            ),
            (
                "octet too large",
                b"PROXY TCP4 192.0.2.256 ",
                v1_syntax("bad address"),
            ),
            (
                "address too long",
                b"PROXY TCP4 1234567890123456",
                v1_syntax("bad address"),
            ),
            ("empty address", b"PROXY TCP4  ", v1_syntax("bad address")),
            (
                "plus port",
                b"PROXY TCP4 192.0.2.1 192.0.2.2 +1",
                v1_syntax("bad port"),
            ),
            (
                "leading zero port",
                b"PROXY TCP4 192.0.2.1 192.0.2.2 025",
                v1_syntax("bad port"),
            ),
            (
                "port too large",
                b"PROXY TCP4 192.0.2.1 192.0.2.2 65536",
                v1_syntax("bad port"),
            ),
            (
                "port too long",
                b"PROXY TCP4 192.0.2.1 192.0.2.2 100000",
                v1_syntax("bad port"),
            ),
            (
                "empty port",
                b"PROXY TCP4 192.0.2.1 192.0.2.2  25\r\n",
                v1_syntax("bad port"),
            ),
            (
                "sixth field",
                b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2 ",
                v1_syntax("too many fields"),
            ),
            (
                "too few",
                b"PROXY TCP4 192.0.2.1 192.0.2.2 1\r\n",
                v1_syntax("too few fields"),
            ),
            (
                "trailing space",
                b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2 \r\n",
                v1_syntax("too many fields"),
            ),
            (
                "bare lf",
                b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2\n",
                v1_syntax("line ends in LF without CR"),
            ),
            (
                "cr inside",
                b"PROXY TCP4 192.0.2.1\r 192",
                v1_syntax("CR inside the line"),
            ),
            (
                "v2 wrong signature",
                b"\r\n\r\n\0\r\nQUIT\r",
                ProxyParse::Invalid(ProxyError::NoSignature),
            ),
            (
                "v2 smtp-like",
                b"\r\nEHLO",
                ProxyParse::Invalid(ProxyError::NoSignature),
            ),
        ];
        for (name, input, expected) in cases {
            assert_eq!(parse(input), expected, "{name}");
        }
    }

    #[test]
    fn a_v1_line_over_107_octets_is_refused() {
        let mut line = b"PROXY UNKNOWN ".to_vec();
        line.resize(V1_MAX_LEN, b'x');
        assert_eq!(parse(&line), ProxyParse::Invalid(ProxyError::V1TooLong));
        line.extend_from_slice(b"\r\n");
        assert_eq!(parse(&line), ProxyParse::Invalid(ProxyError::V1TooLong));
        // The CRLF must end within 107 octets: CR at 107, LF at 108 is too late.
        let mut late = b"PROXY UNKNOWN ".to_vec();
        late.resize(V1_MAX_LEN - 1, b'x');
        late.extend_from_slice(b"\r\n");
        assert_eq!(parse(&late), ProxyParse::Invalid(ProxyError::V1TooLong));
    }

    #[test]
    fn v2_headers_are_checked_field_by_field() {
        let sig = V2_SIGNATURE.to_vec();
        let with = |extra: &[u8]| [sig.as_slice(), extra].concat();
        let cases: Vec<(&str, Vec<u8>, ProxyParse)> = vec![
            (
                "version 1",
                with(&[0x11]),
                ProxyParse::Invalid(ProxyError::V2Version(1)),
            ),
            (
                "command 2",
                with(&[0x22]),
                ProxyParse::Invalid(ProxyError::V2Command(2)),
            ),
            (
                "proxy over udp",
                with(&[0x21, 0x12]),
                ProxyParse::Invalid(ProxyError::V2Family(0x12)),
            ),
            (
                "proxy unix",
                with(&[0x21, 0x31]),
                ProxyParse::Invalid(ProxyError::V2Family(0x31)),
            ),
            (
                "proxy unspec",
                with(&[0x21, 0x00]),
                ProxyParse::Invalid(ProxyError::V2Family(0x00)),
            ),
            (
                "ipv4 block short",
                with(&[0x21, 0x11, 0, 11]),
                ProxyParse::Invalid(ProxyError::V2Length(11)),
            ),
            (
                "ipv6 block short",
                with(&[0x21, 0x21, 0, 12]),
                ProxyParse::Invalid(ProxyError::V2Length(12)),
            ),
            (
                "over the cap",
                with(&[0x20, 0x00, 0x10, 0x01]),
                ProxyParse::Invalid(ProxyError::V2Length(4097)),
            ),
            ("local unix", with(&[0x20, 0x31, 0, 0]), done(None, 16)),
            (
                "waiting for the addresses",
                with(&[0x21, 0x11, 0, 12, 192, 0]),
                ProxyParse::Incomplete,
            ),
        ];
        for (name, input, expected) in cases {
            assert_eq!(parse(&input), expected, "{name}");
        }
    }

    #[test]
    fn garbage_never_panics_and_never_claims_more_than_it_has() {
        // A small deterministic generator: every byte pattern the header alphabet can make.
        let alphabet: &[u8] = b"PROXY TCP46UNKOW0123456789.:abcdef\r\n\0QIT\x11\x21\x20";
        let mut state = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..20_000 {
            let len = (state % 120) as usize;
            let mut input = Vec::with_capacity(len);
            for _ in 0..len {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                input.push(alphabet[(state % alphabet.len() as u64) as usize]);
            }
            if let ProxyParse::Done { consumed, .. } = parse(&input) {
                assert!(consumed <= input.len());
            }
        }
    }
}
