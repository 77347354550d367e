//! Helpers over the header section of a message as received.
//!
//! The header section is every line up to the first empty line (RFC 5322 2.1). A line that
//! starts with a space or a tab continues the field before it (RFC 5322 2.2.3, folding). A line
//! that is neither a field nor a continuation also ends the header section: the message then has
//! no (more) header and the rest is body, as Postfix cleanup treats it. Nothing after the end of
//! the header section is ever looked at, so a body line that looks like a field stays.
//!
//! SPEC "What an accepted message carries": before prepending, every `X-HELO-Check` and every
//! `Authentication-Results` field whose first word (the authserv-id) is our hostname is removed,
//! so that a client cannot forge our verdict; the fields of other hosts stay. RFC 8601 5: "a
//! border MTA ... MUST delete or rename" such fields that claim its authserv-id.

use std::borrow::Cow;
use std::ops::Range;

/// The fields whose copies claiming our authserv-id are removed.
const OWN_FIELDS: [&[u8]; 2] = [b"X-HELO-Check", b"Authentication-Results"];

/// `content` without the `X-HELO-Check` and `Authentication-Results` fields (with their folded
/// continuation lines) whose authserv-id is `hostname`; borrowed when nothing is removed.
pub fn strip_own_fields<'a>(content: &'a [u8], hostname: &str) -> Cow<'a, [u8]> {
    let removed = own_field_spans(content, hostname);
    if removed.is_empty() {
        return Cow::Borrowed(content);
    }
    Cow::Owned(kept_slices(content, &removed).concat())
}

/// The byte ranges of `content` that `strip_own_fields` removes, in order and disjoint. Empty
/// (and not allocated) in the common case, so a writer can skip them without copying the body.
pub fn own_field_spans(content: &[u8], hostname: &str) -> Vec<Range<usize>> {
    let mut removed = Vec::new();
    for field in header_fields(content) {
        if is_own_field(&content[field.clone()], hostname.as_bytes()) {
            removed.push(field);
        }
    }
    removed
}

/// The parts of `content` between the `removed` ranges (as given by `own_field_spans`).
pub fn kept_slices<'a>(content: &'a [u8], removed: &[Range<usize>]) -> Vec<&'a [u8]> {
    let mut kept = Vec::with_capacity(removed.len() + 1);
    let mut from = 0;
    for span in removed {
        if span.start > from {
            kept.push(&content[from..span.start]);
        }
        from = span.end;
    }
    if from < content.len() {
        kept.push(&content[from..]);
    }
    kept
}

/// The range of every header field of `content`, each with its continuation lines and line ends.
fn header_fields(content: &[u8]) -> Vec<Range<usize>> {
    let mut fields = Vec::new();
    let mut current: Option<Range<usize>> = None;
    let mut pos = 0;
    while pos < content.len() {
        let end = line_end(content, pos);
        let line = &content[pos..end];
        if is_continuation(line) {
            // A continuation with no field before it is not a header: the body starts here.
            let Some(field) = current.as_mut() else { break };
            field.end = end;
        } else if field_name(line).is_some() {
            fields.extend(current.replace(pos..end));
        } else {
            // The empty line that ends the header section, or a line that is no field at all.
            break;
        }
        pos = end;
    }
    fields.extend(current);
    fields
}

/// The index just past the LF that ends the line starting at `start`, or the end of `content`.
fn line_end(content: &[u8], start: usize) -> usize {
    match memchr::memchr(b'\n', &content[start..]) {
        Some(i) => start + i + 1,
        None => content.len(),
    }
}

/// RFC 5322 2.2.3: a line that starts with WSP continues the previous field. A line made only
/// of whitespace is not taken as a continuation: it is the end of the header for most readers.
fn is_continuation(line: &[u8]) -> bool {
    matches!(line.first(), Some(b' ' | b'\t')) && !is_blank(line)
}

fn is_blank(line: &[u8]) -> bool {
    line.iter().all(|b| b.is_ascii_whitespace())
}

/// The field name of a field's first line: RFC 5322 3.6.8 ftext (printable ASCII but `:`),
/// then `:`; RFC 5322 4.5.8 (obsolete syntax) also allows WSP before the colon.
fn field_name(line: &[u8]) -> Option<&[u8]> {
    let name_len = line.iter().position(|&b| !is_ftext(b))?;
    if name_len == 0 {
        return None;
    }
    let after_wsp = line[name_len..]
        .iter()
        .position(|&b| b != b' ' && b != b'\t')?;
    (line[name_len + after_wsp] == b':').then(|| &line[..name_len])
}

fn is_ftext(b: u8) -> bool {
    (33..=126).contains(&b) && b != b':'
}

/// Whether `field` (whole, folded) is one of `OWN_FIELDS` whose authserv-id is `hostname`.
fn is_own_field(field: &[u8], hostname: &[u8]) -> bool {
    let Some(name) = field_name(field) else {
        return false;
    };
    if !OWN_FIELDS.iter().any(|own| name.eq_ignore_ascii_case(own)) {
        return false;
    }
    let Some(colon) = memchr::memchr(b':', field) else {
        return false;
    };
    match authserv_id(&field[colon + 1..]) {
        Some(id) => same_name(id, hostname),
        None => false,
    }
}

/// The authserv-id of an Authentication-Results value (RFC 8601 2.2: `[CFWS] authserv-id`,
/// a token or a quoted-string), which is also the first word of our X-HELO-Check value. The
/// value may be folded: CR and LF count as whitespace. Comments before it are skipped.
fn authserv_id(value: &[u8]) -> Option<&[u8]> {
    let start = skip_cfws(value);
    let rest = &value[start..];
    if let Some(quoted) = rest.strip_prefix(b"\"") {
        // A quoted-string names the same authserv-id as the bare token (RFC 5322 3.2.4); a
        // quoted-pair inside one is not worth honouring: our hostname never holds one.
        let close = memchr::memchr(b'"', quoted)?;
        return Some(&quoted[..close]);
    }
    let len = rest
        .iter()
        .position(|&b| b.is_ascii_whitespace() || b == b';' || b == b'(')
        .unwrap_or(rest.len());
    (len > 0).then(|| &rest[..len])
}

/// The index of the first byte of `value` after leading whitespace and (nested) comments.
fn skip_cfws(value: &[u8]) -> usize {
    let mut depth = 0usize;
    let mut escaped = false;
    for (i, &b) in value.iter().enumerate() {
        if escaped {
            escaped = false;
            continue;
        }
        match b {
            b'\\' if depth > 0 => escaped = true,
            b'(' => depth += 1,
            b')' if depth > 0 => depth -= 1,
            _ if depth > 0 || b.is_ascii_whitespace() => {}
            _ => return i,
        }
    }
    value.len()
}

/// Host names compare case-insensitively and without a trailing dot (SPEC "HELO checks"), so
/// `Mx.Example.` claims the same identity as `mx.example`.
fn same_name(a: &[u8], b: &[u8]) -> bool {
    let a = a.strip_suffix(b".").unwrap_or(a);
    let b = b.strip_suffix(b".").unwrap_or(b);
    a.eq_ignore_ascii_case(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOST: &str = "mx.example.net";

    fn strip(content: &str) -> String {
        String::from_utf8(strip_own_fields(content.as_bytes(), HOST).into_owned())
            .expect("test input is UTF-8")
    }

    #[test]
    fn removes_own_fields_and_keeps_the_rest() {
        let msg = "Subject: hi\r\n\
                   X-HELO-Check: mx.example.net; pass helo=a ip=1.2.3.4\r\n\
                   Authentication-Results: mx.example.net; iprev=pass\r\n\
                   From: a@b\r\n\
                   \r\n\
                   body\r\n";
        assert_eq!(strip(msg), "Subject: hi\r\nFrom: a@b\r\n\r\nbody\r\n");
    }

    #[test]
    fn keeps_other_hosts_fields() {
        let msg = "Authentication-Results: other.example; iprev=pass\r\n\
                   X-HELO-Check: other.example; pass\r\n\
                   Authentication-Results: mx.example.net.evil; iprev=pass\r\n\
                   \r\nbody\r\n";
        assert!(matches!(
            strip_own_fields(msg.as_bytes(), HOST),
            Cow::Borrowed(_)
        ));
    }

    #[test]
    fn field_names_and_authserv_id_compare_case_insensitively() {
        let msg = "authentication-results: MX.Example.NET; iprev=pass\r\n\
                   x-helo-check :mx.example.net.; fail\r\n\
                   To: c@d\r\n\r\n";
        assert_eq!(strip(msg), "To: c@d\r\n\r\n");
    }

    #[test]
    fn removes_folded_continuation_lines() {
        let msg = "Authentication-Results: mx.example.net;\r\n\
                   \tiprev=pass policy.iprev=1.2.3.4\r\n  (x.example)\r\n\
                   X-Kept: yes\r\n\
                   \tstill kept\r\n\
                   \r\nbody\r\n";
        assert_eq!(strip(msg), "X-Kept: yes\r\n\tstill kept\r\n\r\nbody\r\n");
    }

    #[test]
    fn authserv_id_may_be_folded_quoted_or_after_a_comment() {
        for field in [
            "Authentication-Results:\r\n mx.example.net; iprev=pass\r\n",
            "Authentication-Results: \"mx.example.net\"; iprev=pass\r\n",
            "Authentication-Results: (forged (nested)) mx.example.net 1; iprev=pass\r\n",
            "X-HELO-Check: mx.example.net;pass\r\n",
        ] {
            let msg = format!("{field}Subject: s\r\n\r\n");
            assert_eq!(strip(&msg), "Subject: s\r\n\r\n", "{field:?}");
        }
    }

    #[test]
    fn a_header_less_message_is_left_alone() {
        for msg in [
            "\r\nX-HELO-Check: mx.example.net; pass\r\n",
            "just a body line\r\nX-HELO-Check: mx.example.net; pass\r\n",
            " continuation first\r\nX-HELO-Check: mx.example.net; pass\r\n",
            "",
        ] {
            assert!(
                matches!(strip_own_fields(msg.as_bytes(), HOST), Cow::Borrowed(_)),
                "{msg:?}"
            );
        }
    }

    #[test]
    fn a_body_line_that_looks_like_a_field_stays() {
        let msg = "Subject: s\r\n\r\nX-HELO-Check: mx.example.net; pass\r\n";
        assert_eq!(strip(msg), msg);
    }

    #[test]
    fn a_message_of_header_fields_only_without_final_line_end() {
        let msg = "Subject: s\r\nX-HELO-Check: mx.example.net; pass";
        assert_eq!(strip(msg), "Subject: s\r\n");
    }

    #[test]
    fn spans_and_kept_slices_rebuild_the_stripped_message() {
        let msg = b"X-HELO-Check: mx.example.net; a\r\nA: 1\r\nX-HELO-Check: mx.example.net; b\r\n\
                    B: 2\r\n\r\nbody";
        let spans = own_field_spans(msg, HOST);
        assert_eq!(spans.len(), 2);
        assert_eq!(
            kept_slices(msg, &spans).concat(),
            b"A: 1\r\nB: 2\r\n\r\nbody"
        );
    }
}
