//! A reader of a stored message's header, written apart from `spool::header` on purpose: the
//! tests and the `header` fuzz target check the filter against it, so it shares none of the
//! filter's code. It reads the header as the receivers of our mail do, in three ways:
//!
//! - `Reading::Postfix`: lines end at LF; a line starting with a space or a tab continues the
//!   field above (a whitespace-only line too, as Postfix and Python's email read it); the header
//!   ends at the first empty line or at the first line that is neither a field nor a
//!   continuation;
//! - `Reading::BareCr`: the same, but a bare CR ends a line as well (universal newlines);
//! - `Reading::Lenient`: as `Postfix`, but a line that is neither a field nor a continuation (a
//!   `From ` line, a stray line) is skipped and the header goes on, as Python's email does.
//!
//! A field claims `host` when its name is `X-HELO-Check` or `Authentication-Results` and its
//! first word, as a lenient reader sees it, is `host`: comments gone, quotes and backslashes
//! gone, RFC 2047 encoded words decoded, case ignored, cut at the first octet that is not
//! printable ASCII.

/// One way to read a header; see the module docs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reading {
    Postfix,
    BareCr,
    Lenient,
}

/// Every reading, for checks that must hold under all of them.
pub const READINGS: [Reading; 3] = [Reading::Postfix, Reading::BareCr, Reading::Lenient];

/// The header fields of `msg` as `reading` sees them: each field's raw text, from the start of
/// its first line to the end of its last line (line ends included).
pub fn fields(msg: &[u8], reading: Reading) -> Vec<&[u8]> {
    let mut out: Vec<(usize, usize)> = Vec::new();
    let mut open = false;
    for (start, end) in lines(msg, reading) {
        let line = &msg[start..end];
        let text = without_line_end(line);
        if text.is_empty() {
            break;
        }
        if matches!(text[0], b' ' | b'\t') {
            if let (true, Some(last)) = (open, out.last_mut()) {
                last.1 = end;
                continue;
            }
        } else if has_field_name(text) {
            out.push((start, end));
            open = true;
            continue;
        }
        if reading != Reading::Lenient {
            break;
        }
        open = false;
    }
    out.into_iter().map(|(s, e)| &msg[s..e]).collect()
}

/// Whether `field` (raw, as `fields` gives it) is an `X-HELO-Check` or `Authentication-Results`
/// field whose authserv-id reads as `host`.
pub fn claims(field: &[u8], host: &str) -> bool {
    let Some(colon) = field.iter().position(|&b| b == b':') else {
        return false;
    };
    let name: Vec<u8> = field[..colon]
        .iter()
        .copied()
        .filter(|b| !matches!(b, b' ' | b'\t'))
        .collect();
    if !name.eq_ignore_ascii_case(b"x-helo-check")
        && !name.eq_ignore_ascii_case(b"authentication-results")
    {
        return false;
    }
    let id = first_word(&field[colon + 1..]);
    let id = id.strip_suffix(b".").unwrap_or(&id);
    let host = host.as_bytes();
    let host = host.strip_suffix(b".").unwrap_or(host);
    id.eq_ignore_ascii_case(host)
}

/// Line spans of `msg`: ends at LF, and with `Reading::BareCr` also after a CR not followed by
/// LF.
fn lines(msg: &[u8], reading: Reading) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut i = 0;
    while i < msg.len() {
        let bare_cr =
            reading == Reading::BareCr && msg[i] == b'\r' && msg.get(i + 1) != Some(&b'\n');
        if msg[i] == b'\n' || bare_cr {
            out.push((start, i + 1));
            start = i + 1;
        }
        i += 1;
    }
    if start < msg.len() {
        out.push((start, msg.len()));
    }
    out
}

fn without_line_end(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// RFC 5322 field name (printable ASCII but `:`), optional white space, then `:`.
fn has_field_name(text: &[u8]) -> bool {
    let name = text
        .iter()
        .take_while(|&&b| b > b' ' && b < 0x7f && b != b':')
        .count();
    let spaces = text[name..]
        .iter()
        .take_while(|&&b| b == b' ' || b == b'\t')
        .count();
    name > 0 && text.get(name + spaces) == Some(&b':')
}

/// The authserv-id of a field value as a lenient reader finds it.
fn first_word(value: &[u8]) -> Vec<u8> {
    // Unfold and drop comments first, keeping the quoted strings whole.
    let mut plain = Vec::new();
    let mut depth = 0u32;
    let mut quoted = false;
    let mut i = 0;
    while i < value.len() {
        let b = value[i];
        if b == b'\\' && i + 1 < value.len() {
            if depth == 0 {
                plain.extend_from_slice(&value[i..i + 2]);
            }
            i += 2;
            continue;
        }
        match b {
            b'"' if depth == 0 => quoted = !quoted,
            b'(' if !quoted => depth += 1,
            b')' if !quoted && depth > 0 => {
                depth -= 1;
                plain.push(b' ');
                i += 1;
                continue;
            }
            _ => {}
        }
        if depth == 0 {
            plain.push(b);
        }
        i += 1;
    }
    // The first word: quotes and escapes removed, ended by white space, `;` or any octet that
    // is not printable ASCII; leading octets that are not printable are skipped.
    let mut word = Vec::new();
    let mut quoted = false;
    let mut i = 0;
    while i < plain.len() && !is_printable(plain[i]) {
        i += 1;
    }
    while i < plain.len() {
        let b = plain[i];
        if b == b'\\' && i + 1 < plain.len() {
            word.push(plain[i + 1]);
            i += 2;
            continue;
        }
        if b == b'"' {
            quoted = !quoted;
        } else if !is_printable(b) || (!quoted && b == b';') {
            break;
        } else {
            word.push(b);
        }
        i += 1;
    }
    decode_words(&word)
}

fn is_printable(b: u8) -> bool {
    b > b' ' && b < 0x7f
}

/// RFC 2047 encoded words `=?charset?Q|B?text?=` decoded (charset ignored), the rest kept; the
/// result is cut at its first octet that is not printable ASCII.
fn decode_words(word: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut rest = word;
    while !rest.is_empty() {
        if let Some((decoded, used)) = encoded_word(rest) {
            out.extend(decoded);
            rest = &rest[used..];
        } else {
            out.push(rest[0]);
            rest = &rest[1..];
        }
    }
    let start = out
        .iter()
        .position(|&b| is_printable(b))
        .unwrap_or(out.len());
    let len = out[start..]
        .iter()
        .position(|&b| !is_printable(b) || b == b';')
        .unwrap_or(out.len() - start);
    out[start..start + len].to_vec()
}

fn encoded_word(s: &[u8]) -> Option<(Vec<u8>, usize)> {
    let s2 = s.strip_prefix(b"=?")?;
    let q1 = s2.iter().position(|&b| b == b'?')?;
    let after_charset = &s2[q1 + 1..];
    let (&encoding, after_enc) = after_charset.split_first()?;
    let text_and_rest = after_enc.strip_prefix(b"?")?;
    let end = text_and_rest.windows(2).position(|w| w == b"?=")?;
    let text = &text_and_rest[..end];
    let used = 2 + q1 + 1 + 1 + 1 + end + 2;
    let decoded = match encoding.to_ascii_uppercase() {
        b'Q' => q_decode(text),
        b'B' => b_decode(text),
        _ => return None,
    };
    Some((decoded, used))
}

fn q_decode(text: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < text.len() {
        match text[i] {
            b'_' => out.push(b' '),
            b'=' if i + 2 < text.len() => {
                let hex = std::str::from_utf8(&text[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(v) => {
                        out.push(v);
                        i += 3;
                        continue;
                    }
                    None => out.push(b'='),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    out
}

fn b_decode(text: &[u8]) -> Vec<u8> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = Vec::new();
    let mut acc = 0u32;
    let mut bits = 0;
    for &b in text {
        let Some(v) = ALPHABET.iter().position(|&a| a == b) else {
            continue;
        };
        acc = (acc << 6) | v as u32;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    out
}
